"""A flat 64-bit environment written straight into guest RAM: long mode at a chosen RIP without running boot code.

Guest kernel-mode code may be emulated by the host (on some nested hosts at about 2 µs per instruction), so small
probe and test guests do not boot: this module writes page tables, a GDT, a TSS and an IDT from Python and loads
the vCPU's registers directly, so the first guest instruction executed is the caller's code, in CPL3 or CPL0.

Guest-physical layout (linear = physical: the first GiB is identity mapped):

    0x001000  PML4 (one entry)
    0x002000  PDPT (one entry)
    0x003000  page directory: 512 x 2 MiB pages, present | R/W | U/S | accessed; the dirty bit is left clear (see
              below), so the first write into each 2 MiB page sets it and thereby writes this page
    0x004000  GDT: 0x08 kernel code 64, 0x10 kernel data, 0x18 user data (selector 0x1b), 0x20 user code 64 (0x23),
              0x28 64-bit TSS (16 bytes); every descriptor already marked accessed (busy for the TSS)
    0x005000  IDT: 256 interrupt gates to kernel code 0x08; DPL 3 for `user_vectors` (int3, into, int 0x80 by
              default) so CPL3 may raise them with an `int` instruction, DPL 0 otherwise
    0x006000  default handlers, 16 bytes per vector (see below)
    0x007000  64-bit TSS: RSP0 = KERNEL_STACK_TOP, then an all-zero I/O permission bitmap (every port allowed)
    0x00a000  the caller's handlers and syscall entry, 16-byte aligned, up to 0x010000
    0x010000  kernel stack, top at KERNEL_STACK_TOP = 0x020000 (RSP0; exceptions push their frame here)
    0x020000  user stack, top at USER_STACK_TOP = 0x030000
    0x100000  the caller's code (entry point), up to 1 MiB
    0x200000  DATA_ADDR: free for the guest and the host (counters, buffers)

Dirty bits: under shadow paging (kvm_pvm hosts) KVM maps a page writable, and reports it in the dirty log, as soon
as the guest touches it through a PTE whose dirty bit is set, even for a read or an instruction fetch. Leaving the
dirty bits clear keeps the dirty log to the pages the guest really wrote, plus the page directory (0x3000) whose
dirty bits those writes set. `preset_dirty=True` sets them instead (no page-table writes ever).

CPL3 code gets port I/O both ways: RFLAGS.IOPL = 3 and an I/O bitmap allowing every port. Both are needed to be
portable: kvm_pvm hosts run guest user mode with IOPL 0 whatever RFLAGS says, so only the bitmap works there.

Default handlers: the handler of vector v loads v into EDI and stops the machine through the exit port (0xf4) with
status `trap_status(v)`: 0xE0 | v for the exceptions 0-31 (#DE = 0xE0, #BP = 0xE3, #UD = 0xE6, #GP = 0xED,
#PF = 0xEE), 0xDF for any other vector. Guests signal success with statuses below 0xDF. The exception frame is on
the kernel stack at the stopped vCPU's RSP.

The instruction snippets below are hand-assembled; each byte string carries its assembly in a comment.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...errors import VmforkError
from ...kvm import structs as s

if TYPE_CHECKING:
    from ...vm import Machine

# --- layout -------------------------------------------------------------------------------------------------------

PML4_ADDR = 0x1000
PDPT_ADDR = 0x2000
PD_ADDR = 0x3000
GDT_ADDR = 0x4000
IDT_ADDR = 0x5000
STUBS_ADDR = 0x6000
STUB_SIZE = 16
TSS_ADDR = 0x7000
HANDLERS_ADDR = 0xA000
HANDLERS_END = 0x10000
KERNEL_STACK_TOP = 0x20000
USER_STACK_TOP = 0x30000
CODE_ADDR = 0x100000
CODE_MAX = 0x100000
DATA_ADDR = 0x200000
MIN_RAM = DATA_ADDR + 0x100000      # the layout needs at least 3 MiB of RAM

KERNEL_CS = 0x08
KERNEL_DS = 0x10
USER_DS = 0x1B                      # GDT entry 0x18, RPL 3
USER_CS = 0x23                      # GDT entry 0x20, RPL 3
TSS_SELECTOR = 0x28
GDT_LIMIT = 0x37                    # 7 descriptor slots (the TSS takes two)
TSS_HEADER = 0x68                   # the 64-bit TSS proper; the I/O bitmap follows it
IO_BITMAP_SIZE = 0x10000 // 8
TSS_LIMIT = TSS_HEADER + IO_BITMAP_SIZE     # bitmap plus its all-ones terminator byte, minus 1

EXIT_PORT = 0xF4
TRAP_STATUS_BASE = 0xE0
UNEXPECTED_VECTOR_STATUS = 0xDF
DEFAULT_USER_VECTORS = (3, 4, 0x80)

# control registers and flags
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE = 1 << 5, 1 << 9, 1 << 10, 1 << 18
EFER_SCE, EFER_LME, EFER_LMA = 1 << 0, 1 << 8, 1 << 10
RFLAGS_FIXED, RFLAGS_IF, RFLAGS_IOPL3 = 1 << 1, 1 << 9, 3 << 12

# MSRs
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SFMASK = 0xC0000084
APIC_BASE_DEFAULT = 0xFEE00000
APIC_BASE_BSP, APIC_BASE_EXTD, APIC_BASE_ENABLE = 1 << 8, 1 << 10, 1 << 11
X2APIC_EOI_MSR = 0x80B

# page-table entry bits
PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7

# LAPIC register offsets (in struct kvm_lapic_state, the same in xAPIC and x2APIC mode)
LAPIC_SVR = 0xF0
LAPIC_LVT_TIMER = 0x320
LAPIC_TIMER_INITIAL = 0x380
LAPIC_TIMER_CURRENT = 0x390
LAPIC_TIMER_DIVIDE = 0x3E0
LVT_MASKED = 1 << 16
LVT_TIMER_PERIODIC = 1 << 17


def trap_status(vector: int) -> int:
    """The exit status a default handler reports for `vector`."""
    if not 0 <= vector <= 255:
        raise ValueError(f"vector {vector} is not 0-255")
    return TRAP_STATUS_BASE | vector if vector < 32 else UNEXPECTED_VECTOR_STATUS


# --- instruction snippets -----------------------------------------------------------------------------------------

def exit_with(status: int, port: int = EXIT_PORT) -> bytes:
    """Stop the machine through the exit port with `status`, then spin if resumed."""
    if not 0 <= status <= 0xFF or not 0 <= port <= 0xFF:
        raise ValueError(f"status {status:#x} and port {port:#x} must be bytes")
    return (
        bytes((0xB0, status))       # mov al, status
        + bytes((0xE6, port))       # out port, al
        + b"\xeb\xfe"               # jmp $
    )


def _default_stub(vector: int) -> bytes:
    stub = (
        b"\xbf" + struct.pack("<I", vector)     # mov edi, vector
        + exit_with(trap_status(vector))        # mov al, status; out 0xf4, al; jmp $
    )
    return stub.ljust(STUB_SIZE, b"\xcc")       # int3 padding, never reached


# --- tables -------------------------------------------------------------------------------------------------------

def _descriptor(access: int, flags: int, base: int = 0, limit: int = 0xFFFFF) -> int:
    return ((limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | access << 40 | (limit >> 16 & 0xF) << 48 | flags << 52
            | (base >> 24 & 0xFF) << 56)


def gdt_bytes() -> bytes:
    """The GDT (GDT_LIMIT + 1 bytes)."""
    table = bytearray(GDT_LIMIT + 1)
    struct.pack_into("<Q", table, KERNEL_CS, _descriptor(0x9B, 0xA))   # P, DPL0, code exec/read accessed; G, L
    struct.pack_into("<Q", table, KERNEL_DS, _descriptor(0x93, 0xC))   # P, DPL0, data read/write accessed; G, D/B
    struct.pack_into("<Q", table, USER_DS & ~3, _descriptor(0xF3, 0xC))  # P, DPL3, data read/write accessed
    struct.pack_into("<Q", table, USER_CS & ~3, _descriptor(0xFB, 0xA))  # P, DPL3, code exec/read accessed; L
    struct.pack_into("<Q", table, TSS_SELECTOR, _descriptor(0x8B, 0x0, TSS_ADDR, TSS_LIMIT))  # P, busy 64-bit TSS
    struct.pack_into("<Q", table, TSS_SELECTOR + 8, TSS_ADDR >> 32)      # upper half: base bits 63:32
    return bytes(table)


def tss_bytes(*, io_bitmap: bool = True) -> bytes:
    """The TSS with RSP0 and an I/O permission bitmap allowing every port (TSS_LIMIT + 1 bytes). Without
    `io_bitmap` the bitmap is all ones (every port denied), so only RFLAGS.IOPL can grant CPL3 port I/O."""
    tss = bytearray(TSS_HEADER) + (b"\0" if io_bitmap else b"\xff") * IO_BITMAP_SIZE + b"\xff"
    struct.pack_into("<Q", tss, 4, KERNEL_STACK_TOP)      # RSP0
    struct.pack_into("<H", tss, 0x66, TSS_HEADER)        # I/O map base: right after the TSS
    return bytes(tss)


def page_table_bytes(*, preset_dirty: bool = False) -> tuple[bytes, bytes, bytes]:
    """PML4, PDPT and page directory identity-mapping [0, 1 GiB) with 2 MiB pages, user-accessible and writable,
    already marked accessed (and dirty with `preset_dirty`)."""
    table_flags = PTE_P | PTE_RW | PTE_US | PTE_A
    leaf_flags = table_flags | PTE_PS | (PTE_D if preset_dirty else 0)
    pml4 = struct.pack("<Q", PDPT_ADDR | table_flags).ljust(4096, b"\0")
    pdpt = struct.pack("<Q", PD_ADDR | table_flags).ljust(4096, b"\0")
    pd = b"".join(struct.pack("<Q", (i << 21) | leaf_flags) for i in range(512))
    return pml4, pdpt, pd


def _gate(handler: int, dpl: int) -> bytes:
    """A 64-bit interrupt gate to kernel code (IF cleared on entry, no IST)."""
    return struct.pack("<HHBBHII", handler & 0xFFFF, KERNEL_CS, 0, 0x8E | dpl << 5, handler >> 16 & 0xFFFF,
                       handler >> 32, 0)


# --- setup --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FlatLayout:
    """Where `setup_long_mode` put things."""

    cpl: int
    entry: int = CODE_ADDR
    code_end: int = CODE_ADDR
    handlers: Mapping[int, int] = field(default_factory=dict)   # vector -> address of the caller's handler
    syscall_entry: int | None = None
    data: int = DATA_ADDR
    user_stack_top: int = USER_STACK_TOP
    kernel_stack_top: int = KERNEL_STACK_TOP
    idt: int = IDT_ADDR
    gdt: int = GDT_ADDR
    tss: int = TSS_ADDR
    cr3: int = PML4_ADDR

    def handler_address(self, vector: int) -> int:
        """The address the IDT sends `vector` to."""
        return self.handlers.get(vector, STUBS_ADDR + vector * STUB_SIZE)

    @staticmethod
    def trap_status(vector: int) -> int:
        return trap_status(vector)


def _segment(seg: s.Segment, selector: int, *, code: bool, dpl: int) -> None:
    seg.base, seg.limit, seg.selector = 0, 0xFFFFFFFF, selector
    seg.type = 0xB if code else 0x3
    seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, dpl, 1, 1, 0, 0
    seg.l, seg.db = (1, 0) if code else (0, 1)


def long_mode_sregs(sregs: s.Sregs, *, cpl: int, syscall: bool = False, osxsave: bool = False,
                    x2apic: bool = False) -> None:
    """Fill `sregs` for the flat environment (the tables must be in RAM)."""
    user = cpl == 3
    _segment(sregs.cs, USER_CS if user else KERNEL_CS, code=True, dpl=cpl)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _segment(getattr(sregs, name), USER_DS if user else KERNEL_DS, code=False, dpl=cpl)
    tr = sregs.tr
    tr.base, tr.limit, tr.selector, tr.type = TSS_ADDR, TSS_LIMIT, TSS_SELECTOR, 0xB
    tr.present, tr.dpl, tr.s, tr.g, tr.l, tr.db, tr.avl, tr.unusable = 1, 0, 0, 0, 0, 0, 0, 0
    ldt = sregs.ldt
    ldt.base, ldt.limit, ldt.selector, ldt.type, ldt.present, ldt.s, ldt.unusable = 0, 0, 0, 2, 0, 0, 1
    sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, GDT_LIMIT
    sregs.idt.base, sregs.idt.limit = IDT_ADDR, 256 * 16 - 1
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | (CR4_OSXSAVE if osxsave else 0)
    sregs.efer = EFER_LME | EFER_LMA | (EFER_SCE if syscall else 0)
    if x2apic:
        sregs.apic_base = (sregs.apic_base & ~0xFFF) | APIC_BASE_BSP | APIC_BASE_ENABLE | APIC_BASE_EXTD


def _set_msrs(machine: Machine, vcpu: int, values: Mapping[int, int]) -> None:
    msrs: Any = s.msrs_type(len(values))()
    msrs.nmsrs = len(values)
    for entry, (index, value) in zip(msrs.entries, values.items(), strict=True):
        entry.index, entry.data = index, value
    done = machine.vcpus[vcpu].fd.set_msrs(msrs)
    if done != len(values):
        bad = list(values)[done]
        raise VmforkError(f"KVM refused MSR {bad:#x} = {values[bad]:#x}")


def setup_long_mode(machine: Machine, *, code: bytes, cpl: int = 3, interrupts: bool = False,
                    handlers: Mapping[int, bytes] | None = None, user_vectors: Collection[int] = DEFAULT_USER_VECTORS,
                    syscall_entry: bytes | None = None, xcr0: int | None = None, x2apic: bool = False,
                    io_bitmap: bool = True, preset_dirty: bool = False, vcpu: int = 0) -> FlatLayout:
    """Write the flat environment into `machine`'s RAM and point vCPU `vcpu` at `code` (placed at CODE_ADDR).

    cpl           3 (user; IOPL=3 and an I/O bitmap allowing every port, so port I/O works) or 0 (kernel)
    interrupts    start with RFLAGS.IF set
    handlers      vector -> handler code (kernel mode, ends with iretq or stops the machine); other vectors get
                  the default handler (see the module docstring)
    user_vectors  vectors whose gate has DPL 3 (an `int n` from CPL3 to any other vector is a #GP)
    syscall_entry code for LSTAR; also sets EFER.SCE and STAR (syscall to 0x08/0x10, sysret to 0x23/0x1b) and
                  SFMASK = IF
    xcr0          set CR4.OSXSAVE and XCR0 to this value
    x2apic        switch the LAPIC to x2APIC mode (see `start_lapic_timer`)
    io_bitmap     False: the TSS I/O bitmap denies every port, so CPL3 port I/O depends on IOPL alone
    preset_dirty  set the dirty bit of every page-directory entry (see "Dirty bits" above)

    The machine must be paused; its RAM needs at least MIN_RAM bytes. Returns the addresses used.
    """
    if cpl not in (0, 3):
        raise ValueError(f"cpl must be 0 or 3, got {cpl}")
    if len(code) > CODE_MAX:
        raise VmforkError(f"flat code is {len(code)} bytes, at most {CODE_MAX} fit")
    if machine.memory.size < MIN_RAM:
        raise VmforkError(f"the flat layout needs {MIN_RAM >> 20} MiB of RAM, {machine.name} has "
                          f"{machine.memory.size >> 20} MiB")
    mem = machine.memory
    pml4, pdpt, pd = page_table_bytes(preset_dirty=preset_dirty)
    mem.write(PML4_ADDR, pml4)
    mem.write(PDPT_ADDR, pdpt)
    mem.write(PD_ADDR, pd)
    mem.write(GDT_ADDR, gdt_bytes())
    mem.write(TSS_ADDR, tss_bytes(io_bitmap=io_bitmap))
    mem.write(STUBS_ADDR, b"".join(_default_stub(v) for v in range(256)))

    placed: dict[int, int] = {}
    cursor = HANDLERS_ADDR

    def place(blob: bytes) -> int:
        nonlocal cursor
        addr = cursor
        if addr + len(blob) > HANDLERS_END:
            raise VmforkError(f"handlers need more than {HANDLERS_END - HANDLERS_ADDR} bytes")
        mem.write(addr, blob)
        cursor = (addr + len(blob) + 15) & ~15
        return addr

    for vector, blob in sorted((handlers or {}).items()):
        if not 0 <= vector <= 255:
            raise ValueError(f"vector {vector} is not 0-255")
        placed[vector] = place(blob)
    lstar = place(syscall_entry) if syscall_entry is not None else None
    layout = FlatLayout(cpl=cpl, code_end=CODE_ADDR + len(code), handlers=placed, syscall_entry=lstar)
    mem.write(IDT_ADDR, b"".join(_gate(layout.handler_address(v), 3 if v in user_vectors else 0)
                                 for v in range(256)))
    mem.write(CODE_ADDR, code)

    v = machine.vcpus[vcpu]
    sregs = v.get_sregs()
    long_mode_sregs(sregs, cpl=cpl, syscall=lstar is not None, osxsave=xcr0 is not None, x2apic=x2apic)
    v.set_sregs(sregs)
    reset_regs(machine, layout, interrupts=interrupts, vcpu=vcpu)
    v.flush_sync()      # make the new mode current in KVM before the MSR/XCR/LAPIC ioctls below
    if lstar is not None:
        _set_msrs(machine, vcpu, {
            MSR_STAR: (KERNEL_DS << 48) | (KERNEL_CS << 32),    # sysret: CS = 0x10+16 | 3, SS = 0x10+8 | 3
            MSR_LSTAR: lstar,
            MSR_SFMASK: RFLAGS_IF,
        })
    if xcr0 is not None:
        xcrs = s.Xcrs()
        xcrs.nr_xcrs = 1
        xcrs.xcrs[0].xcr = 0
        xcrs.xcrs[0].value = xcr0
        v.fd.set_xcrs(xcrs)
    return layout


def reset_regs(machine: Machine, layout: FlatLayout, *, interrupts: bool = False, rip: int | None = None,
               vcpu: int = 0) -> None:
    """Zero the general registers and point the vCPU at `rip` (default: the entry) with the layout's stack, so the
    same code can run again."""
    regs = s.Regs()
    regs.rip = layout.entry if rip is None else rip
    regs.rsp = layout.user_stack_top if layout.cpl == 3 else layout.kernel_stack_top
    regs.rflags = RFLAGS_FIXED | RFLAGS_IOPL3 | (RFLAGS_IF if interrupts else 0)
    machine.vcpus[vcpu].set_regs(regs)


def start_lapic_timer(machine: Machine, *, vector: int, period_ns: int, periodic: bool = True,
                      vcpu: int = 0) -> None:
    """Program vCPU `vcpu`'s LAPIC timer from the host: software-enabled APIC, timer `vector`, divide by 1, first
    expiry after `period_ns` (the KVM APIC bus runs at 1 GHz). Call after `setup_long_mode`; with `x2apic=True`
    there, the guest acknowledges with `wrmsr` to X2APIC_EOI_MSR (`x2apic_eoi_iretq()`)."""
    if not 32 <= vector <= 255:
        raise ValueError(f"timer vector {vector} must be 32-255")
    fd = machine.vcpus[vcpu].fd
    lapic = s.LapicState()
    fd.get_lapic(lapic)

    def put(offset: int, value: int) -> None:
        ctypes.c_uint32.from_buffer(lapic.regs, offset).value = value

    put(LAPIC_SVR, 0x100 | 0xFF)                    # APIC software enabled, spurious vector 0xff
    put(LAPIC_TIMER_DIVIDE, 0xB)                    # divide by 1
    put(LAPIC_LVT_TIMER, vector | (LVT_TIMER_PERIODIC if periodic else 0))
    put(LAPIC_TIMER_INITIAL, period_ns)
    put(LAPIC_TIMER_CURRENT, period_ns)             # KVM_SET_LAPIC starts the timer from the current count
    fd.set_lapic(lapic)


def x2apic_eoi_iretq(counter: int | None = None) -> bytes:
    """An interrupt handler: optionally `inc qword [counter]`, then EOI through the x2APIC EOI MSR and iretq."""
    body = b""
    if counter is not None:
        if not 0 <= counter < 1 << 31:
            raise ValueError(f"counter address {counter:#x} must fit a 32-bit displacement")
        body += b"\x48\xff\x04\x25" + struct.pack("<I", counter)   # inc qword [counter]
    return body + (
        b"\x50"                     # push rax
        b"\x51"                     # push rcx
        b"\x52"                     # push rdx
        b"\xb9" + struct.pack("<I", X2APIC_EOI_MSR)  # mov ecx, 0x80b
        + b"\x31\xc0"               # xor eax, eax
        b"\x31\xd2"                 # xor edx, edx
        b"\x0f\x30"                 # wrmsr
        b"\x5a"                     # pop rdx
        b"\x59"                     # pop rcx
        b"\x58"                     # pop rax
        b"\x48\xcf"                 # iretq
    )


__all__ = [
    "CODE_ADDR", "DATA_ADDR", "EXIT_PORT", "KERNEL_CS", "KERNEL_DS", "MIN_RAM", "TSS_SELECTOR", "USER_CS",
    "USER_DS", "FlatLayout", "exit_with", "gdt_bytes", "long_mode_sregs", "page_table_bytes", "reset_regs",
    "setup_long_mode", "start_lapic_timer", "trap_status", "tss_bytes", "x2apic_eoi_iretq",
]
