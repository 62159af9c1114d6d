"""The #BP stub: how vmfork sees its own `int3`s on hosts whose KVM ignores software breakpoints (kvm_pvm).

An `int3` of vmfork's raises #BP in the guest; vmfork points the #BP gate of the guest's IDT (or of an IDT it lends
the vCPU, below) at this small kernel-mode stub in guest memory that vmfork reserved, and the stub asks vmfork through
the debug port (0xf5, `vmfork.devices.debugport`) what to do, in the vCPU's exit:

    push rax; in al, 0xf5      vmfork looks at the interrupt frame: RIP - 1 is the address of the int3
      1 -> pop rax; iretq      one of vmfork's: the frame's RIP is rewound to the breakpoint address (and, if the
                               machine must stop, it stops here; continuing resumes right here)
      0 -> pop rax; jmp [orig] not vmfork's (the guest's own int3): its own #BP handler runs, frame unchanged
      0xff (no debugger: the port reads as absent) -> the stub looks the address up in a table of vmfork's inserted
                               bytes kept beside it, puts the original byte back itself (CR0.WP off, EFLAGS.AC on
                               for the one write), rewinds the frame and returns; unknown addresses go to the guest
                               handler. So a fork that inherited breakpoints but has no debugger attached runs through
                               them as if they were not there.

## The debug area (guest-physical, reserved in the memory map vmfork gives the guest)

`vmfork.arch.x86.layout.DEBUG_AREA_ADDR` (0xAF000, inside the legacy VGA window 0xA0000-0xBFFFF that vmfork's e820,
Multiboot and PVH maps report reserved) by default, or wherever the user points it (`stub_gpa`, `--stub-addr`):

    +0x0000  stub code (STUB_CODE_SIZE), the guest handler's address at +0x100, the table of inserted bytes at +0x200
    +0x1000  the lent IDT (256 gates), used only for a vCPU whose own IDT has no present #BP gate
    +0x2000  the lent TSS (a copy of the guest's, with the I/O bitmap; RSP0 = the lent stack), only when the guest's
             own TSS gives no usable kernel stack
    +0x5000  the lent stack (one page; its top is +0x6000)

The guest must map the area where kernel code may execute (an identity map of low memory does). Before vmfork
writes there it checks that the guest has not used the memory (all zero, or vmfork's own stub): otherwise the attach
fails with an error naming the address, never a silent corruption.

## The lent IDT

A guest with no IDT, or none with a present #BP gate (legal for a guest that takes no exceptions), still gets
breakpoints: while the debugger needs the stub, vmfork sets the vCPU's IDTR to the lent IDT, a copy of the guest's
own gates with vector 3 pointing at the stub, and where needed its TR to the lent TSS (KVM_SET_SREGS; the guest's GDT
is not touched). The debugger shows the guest's own IDTR and TR, and gives them back when it no longer needs the stub.
A guest `int3` that is not vmfork's goes to `ud2` in the stub when the guest had no #BP handler: with the guest's own
(absent) gates the vCPU then shuts down as it would have without vmfork.
"""

from __future__ import annotations

import struct

from ..arch.x86.layout import DEBUG_AREA_ADDR
from . import Workaround, register

__all__ = [
    "ANSWER_ABSENT", "ANSWER_PASS", "ANSWER_RESUME", "INT3", "LENT_AREA_SIZE", "LENT_IDT", "LENT_STACK_TOP",
    "LENT_TSS", "LENT_TSS_MAX", "STUB_AFTER_IN", "STUB_CODE", "STUB_GPA", "STUB_NO_HANDLER", "STUB_ORIG",
    "STUB_RESUME", "STUB_TABLE", "STUB_TABLE_CAPACITY", "idt_gate", "stub_code",
]

INT3 = 0xCC
STUB_GPA = DEBUG_AREA_ADDR
STUB_CODE_SIZE = 0x100
STUB_ORIG = 0x100           # u64: the guest's own #BP handler
STUB_TABLE = 0x200          # (u64 address, u8 original byte, 7 bytes padding) per inserted int3, 0-terminated
STUB_TABLE_CAPACITY = (0x1000 - STUB_TABLE) // 16 - 1
LENT_IDT = 0x1000           # offsets in the debug area, see the module docstring
LENT_TSS = 0x2000
LENT_TSS_MAX = 0x3000       # a TSS with a full I/O bitmap: 104 + 8192 + 1 bytes
LENT_STACK_TOP = 0x6000
LENT_AREA_SIZE = 0x6000

ANSWER_PASS = 0             # continue into the guest's #BP handler
ANSWER_RESUME = 1           # return to the (rewritten) frame
ANSWER_ABSENT = 0xFF        # what an absent port reads: the stub's own fallback


class _Asm:
    """Just enough of an assembler for the stub: bytes, labels, rel8/rel32 references."""

    def __init__(self) -> None:
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str, int]] = []    # (position, label, size)

    def emit(self, data: bytes) -> None:
        self.code += data

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def rel8(self, opcode: bytes, target: str) -> None:
        self.code += opcode
        self.fixups.append((len(self.code), target, 1))
        self.code += b"\0"

    def rel32(self, opcode: bytes, target: str) -> None:
        self.code += opcode
        self.fixups.append((len(self.code), target, 4))
        self.code += b"\0\0\0\0"

    def build(self) -> bytes:
        for pos, name, size in self.fixups:
            delta = self.labels[name] - (pos + size)
            self.code[pos:pos + size] = delta.to_bytes(size, "little", signed=True)
        return bytes(self.code)


def _build_stub() -> tuple[bytes, int, int, int]:
    """(code, offset right after the `in`, offset of the resume path, offset of the no-handler `ud2`)."""
    a = _Asm()
    a.emit(b"\x50")                                 # push rax
    a.emit(b"\xe4\xf5")                             # in al, 0xf5
    a.label("after_in")
    a.emit(b"\x3c\x01")                             # cmp al, 1
    a.rel8(b"\x74", "resume")                       # je resume
    a.emit(b"\x84\xc0")                             # test al, al
    a.rel8(b"\x74", "pass")                         # jz pass
    a.emit(b"\x51")                                 # push rcx          (no debugger: look the address up)
    a.emit(b"\x52")                                 # push rdx
    a.emit(b"\x48\x8b\x44\x24\x18")                 # mov rax, [rsp+0x18]   frame RIP
    a.emit(b"\x48\xff\xc8")                         # dec rax               the int3's address
    a.rel32(b"\x48\x8d\x0d", "table")               # lea rcx, [rip+table]
    a.label("loop")
    a.emit(b"\x48\x8b\x11")                         # mov rdx, [rcx]
    a.emit(b"\x48\x85\xd2")                         # test rdx, rdx
    a.rel8(b"\x74", "notfound")                     # jz notfound
    a.emit(b"\x48\x39\xc2")                         # cmp rdx, rax
    a.rel8(b"\x74", "found")                        # je found
    a.emit(b"\x48\x83\xc1\x10")                     # add rcx, 16
    a.rel8(b"\xeb", "loop")                         # jmp loop
    a.label("found")
    a.emit(b"\x48\xc7\x01\xff\xff\xff\xff")         # mov qword [rcx], -1   retire the entry
    a.emit(b"\x8a\x51\x08")                         # mov dl, [rcx+8]       the original byte
    a.emit(b"\x0f\x20\xc1")                         # mov rcx, cr0
    a.emit(b"\x51")                                 # push rcx
    a.emit(b"\x48\x0f\xba\xf1\x10")                 # btr rcx, 16           CR0.WP off: code may be read-only
    a.emit(b"\x0f\x22\xc1")                         # mov cr0, rcx
    a.emit(b"\x9c")                                 # pushfq
    a.emit(b"\x81\x0c\x24\x00\x00\x04\x00")         # or dword [rsp], 0x40000   EFLAGS.AC: SMAP allows the write
    a.emit(b"\x9d")                                 # popfq
    a.emit(b"\x88\x10")                             # mov [rax], dl         the original byte back
    a.emit(b"\x59")                                 # pop rcx
    a.emit(b"\x0f\x22\xc1")                         # mov cr0, rcx
    a.emit(b"\x48\x89\x44\x24\x18")                 # mov [rsp+0x18], rax   rewind the frame
    a.emit(b"\x5a")                                 # pop rdx
    a.emit(b"\x59")                                 # pop rcx
    a.label("resume")
    a.emit(b"\x58")                                 # pop rax
    a.emit(b"\x48\xcf")                             # iretq
    a.label("notfound")
    a.emit(b"\x5a")                                 # pop rdx
    a.emit(b"\x59")                                 # pop rcx
    a.label("pass")
    a.emit(b"\x58")                                 # pop rax
    a.rel32(b"\xff\x25", "orig")                    # jmp [rip+orig]        the guest's own #BP handler
    a.label("no_handler")
    a.emit(b"\x0f\x0b")                             # ud2    (orig of a guest without a #BP handler: see above)
    a.labels["orig"] = STUB_ORIG
    a.labels["table"] = STUB_TABLE
    code = a.build()
    assert len(code) <= STUB_CODE_SIZE
    return code, a.labels["after_in"], a.labels["resume"], a.labels["no_handler"]


STUB_CODE, STUB_AFTER_IN, STUB_RESUME, STUB_NO_HANDLER = _build_stub()


def stub_code() -> bytes:
    """The position-independent stub (data slots at +0x100 and +0x200 of its page)."""
    return STUB_CODE


def idt_gate(handler: int, selector: int, *, dpl: int = 3, ist: int = 0) -> bytes:
    """A 64-bit interrupt gate (16 bytes)."""
    return struct.pack("<HHBBHII", handler & 0xFFFF, selector, ist, 0x8E | dpl << 5, (handler >> 16) & 0xFFFF,
                       handler >> 32, 0)


register(Workaround(
    "bp-stub", "vmfork's int3s raised in guest user mode reach vmfork through a #BP stub in reserved guest memory "
    "(and an IDT lent to guests without a #BP gate)", "sw_breakpoints"))
