"""vmfork: identical copies of a running KVM virtual machine in about a millisecond.

    from vmfork import VM
    parent = VM.create(memory_mib=256)
    parent.load_kernel("guest.elf", cmdline="demo")
    parent.run()                      # until the guest's ready marker pauses it
    child = parent.fork()             # copy-on-write, exact CPU/platform/device state
    child.run(); child.reset()        # back to the parent's state in microseconds
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import VmforkError

if TYPE_CHECKING:
    from .fork import VM, create
    from .vm import StopEvent

__version__ = "0.1.0"
__all__ = ["VM", "StopEvent", "VmforkError", "__version__", "create"]


def __getattr__(name: str) -> Any:
    # The machine layers import numpy (about 0.15 s here): load them on first use, so that CLI commands which only
    # talk to domains (list, console, destroy, ...) start without them.
    if name in ("VM", "create"):
        from . import fork, procfork  # noqa: F401  (procfork registers VM.fork(isolation="process"))
        return getattr(fork, name)
    if name == "StopEvent":
        from .vm import StopEvent
        return StopEvent
    raise AttributeError(f"module 'vmfork' has no attribute {name!r}")
