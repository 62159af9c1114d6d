"""vmfork: identical copies of a running KVM virtual machine in about a millisecond.

    from vmfork import VM
    parent = VM.create(memory_mib=256)
    parent.load_kernel("guest.elf", cmdline="demo")
    parent.run()                      # until the guest's ready marker pauses it
    child = parent.fork()             # copy-on-write, exact CPU/platform/device state
    child.run(); child.reset()        # back to the parent's state in microseconds
"""

from .errors import VmforkError
from .fork import VM, create
from .vm import StopEvent

__version__ = "0.1.0"
__all__ = ["VM", "StopEvent", "VmforkError", "__version__", "create"]
