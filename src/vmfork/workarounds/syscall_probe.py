"""Whether `syscall` from guest user mode stays in user mode on this host (kvm_pvm: RIP = LSTAR and CPL still 3;
host-kvm notes), measured once per process with a tiny guest of its own. It decides whether machines get the
syscall completion (installed.py); doctor's `syscall_cpl3` probe reports the same guest code.

The probe's machine is made by the class the caller passes (vm.py's Machine, without workarounds): this module sits
below vm.py and imports nothing above it."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..arch.x86 import flat
from ..arch.x86.flat import exit_with

if TYPE_CHECKING:
    from ..vm import Machine

__all__ = ["NOT_REACHED", "OK", "SYSCALL_CODE", "USER_MODE_HANDLER", "kernel_handler", "stays_in_user_mode"]

# Guest exit statuses (the flat environment's default handlers report 0xdf-0xff).
OK = 0x2A                         # the probed thing worked
NOT_REACHED = 0x01                # code after the probed instruction ran: the instruction did nothing
USER_MODE_HANDLER = 0x04          # a handler meant for kernel mode ran with CPL 3

SYSCALL_CODE = b"\x0f\x05" + exit_with(NOT_REACHED)      # syscall, then "it did nothing"


def kernel_handler(ok: int = OK) -> bytes:
    """A handler that stops the machine with `ok` if it runs in kernel mode (CS.RPL = 0), else USER_MODE_HANDLER."""
    return (
        b"\x8c\xc8"                 # mov eax, cs
        b"\xa8\x03"                 # test al, 3
        b"\x75\x06"                 # jnz user       (skips the 6-byte exit below)
        + exit_with(ok)             # mov al, ok; out 0xf4, al; jmp $
        + exit_with(USER_MODE_HANDLER)  # user: mov al, 4; out 0xf4, al; jmp $
    )


_lock = threading.Lock()
_answer: bool | None = None


def stays_in_user_mode(machine_type: type[Machine]) -> bool:
    """The probe, once per process (a few milliseconds): True when the syscall entry ran with CPL 3. A probe that
    cannot run (no usable KVM) answers False: nothing to complete."""
    global _answer
    with _lock:
        if _answer is None:
            try:
                _answer = _run(machine_type)
            except Exception:
                _answer = False
        return _answer


def _run(machine_type: type[Machine]) -> bool:
    from ..devices import ExitDevice
    m = machine_type.create(memory_mib=8, vcpus=1, name="syscall-probe", with_devices=False, cpuid="host",
                            workarounds=False)
    try:
        m.attach_devices([ExitDevice(m)])
        flat.setup_long_mode(m, code=SYSCALL_CODE, cpl=3, syscall_entry=kernel_handler())
        ev = m.run(timeout=1.0)
        return ev.reason == "exit" and ev.status == USER_MODE_HANDLER
    finally:
        m.destroy()
