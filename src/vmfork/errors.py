"""The vmfork exception hierarchy. Every error a user can cause is a VmforkError with a message naming the problem."""

from __future__ import annotations


class VmforkError(Exception):
    """Base of every error vmfork raises on purpose."""


class ConfigError(VmforkError):
    """A configuration file or option is wrong."""


class BootError(VmforkError):
    """A kernel image or initrd cannot be loaded."""


class DeviceStateError(VmforkError):
    """A device state does not fit the device set it is restored into."""


class KvmUnavailableError(VmforkError):
    """/dev/kvm is missing or not accessible."""


class KvmError(VmforkError):
    """A KVM ioctl failed."""

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        import os

        self.ioctl = ioctl
        self.errno = errno
        msg = f"{ioctl} failed: {os.strerror(errno)} (errno {errno})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class MemoryAccessError(VmforkError):
    """A guest-physical access falls outside guest RAM."""


class VmStateError(VmforkError):
    """An operation does not fit the machine's current state (e.g. forking a running VM)."""


class ForkError(VmforkError):
    """A fork cannot be created or reset."""


class GuestCrash(VmforkError):
    """The guest stopped in a way the host cannot continue (triple fault, emulation failure)."""


class SnapshotFormatError(VmforkError):
    """A save file or device-state file is not one, is damaged, or is of a format version this vmfork cannot read.
    The message names the file and the part (preamble, header or section) that is wrong."""


class SnapshotHostError(VmforkError):
    """A save file is intact, but this host cannot run the machine in it (a CPU feature or vendor it lacks)."""


def user_error_line(e: BaseException) -> str | None:
    """The one line `vmfork` prints for an error the user caused (a VmforkError, a missing file), or None for
    anything else (a bug, which gets its traceback)."""
    if isinstance(e, VmforkError):
        return f"vmfork: error: {e}"
    if isinstance(e, FileNotFoundError):
        return f"vmfork: error: {e.filename or e}: no such file"
    return None
