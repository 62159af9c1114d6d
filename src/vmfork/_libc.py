"""The few libc calls vmfork makes through ctypes (mmap with MAP_FIXED, which Python's mmap module cannot do)."""

from __future__ import annotations

import ctypes
import os

from .errors import VmforkError

libc = ctypes.CDLL(None, use_errno=True)

_mmap = libc.mmap
_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_mmap.restype = ctypes.c_void_p
_munmap = libc.munmap
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_munmap.restype = ctypes.c_int

MAP_FAILED = ctypes.c_void_p(-1).value
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000


def mmap(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """mmap(2); returns the address or raises VmforkError naming the failure."""
    ret = _mmap(addr or None, length, prot, flags, fd, offset)
    if ret is None or ret == MAP_FAILED:
        raise VmforkError(f"mmap of {length} bytes failed: {os.strerror(ctypes.get_errno())}")
    return int(ret)


def munmap(addr: int, length: int) -> None:
    if _munmap(addr, length) != 0:
        raise VmforkError(f"munmap failed: {os.strerror(ctypes.get_errno())}")


_linkat = libc.linkat
_linkat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
_linkat.restype = ctypes.c_int
AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400


def link_open_file(fd: int, path: str | os.PathLike[str]) -> None:
    """Give the open (e.g. O_TMPFILE) file `fd` the name `path`: linkat through /proc/self/fd with
    AT_SYMLINK_FOLLOW (os.link does not follow that link here). Raises OSError."""
    if _linkat(AT_FDCWD, f"/proc/self/fd/{fd}".encode(), AT_FDCWD, os.fsencode(path), AT_SYMLINK_FOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(path))


def replace_durably(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Rename the finished file `tmp` over `path` and fsync the directory, so the new name survives a crash.
    Raises OSError."""
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
