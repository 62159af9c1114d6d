"""Breakpoints and stepping on a machine, whatever its host's KVM can do.

    dbg = vmi.debugger(vm, symbols=vmi.load_symbols("guest.map"))
    bp = dbg.add_breakpoint("vmi_target", callback=lambda hit: print(hit.describe()))
    ev = dbg.run(timeout=10)          # StopEvent(reason="breakpoint", vcpu=0, detail="0x10a391 <vmi_target>")
    dbg.get_regs(0).rdi               # the interrupted code's registers
    dbg.step()                        # StopEvent(reason="step"): one instruction
    dbg.run()                         # continue (over the breakpoint) to the next stop
    dbg.detach()                      # every byte and gate back as it was

A callback that returns True lets the guest continue without stopping (a counting or logging breakpoint); any other
return value stops the machine, and the run returns a StopEvent with reason "breakpoint".

## Mechanisms (chosen from the host probe, `vmfork doctor`)

"kvm": where KVM intercepts software breakpoints (`sw_breakpoints` works), an `int3` written at the address exits to
vmfork (KVM_EXIT_DEBUG) and steps use KVM single-step (or temporary breakpoints). Guest kernel mode and user mode.

"stub" (this project's CI host, where KVM ignores software breakpoints and single-step): the guest's own #BP vector
is routed through a small kernel-mode stub that vmfork writes into guest memory. An `int3` at the breakpoint
address raises #BP; the gate of vector 3 in the guest's IDT now points at the stub, which asks vmfork through the
debug port (0xf5, `vmfork.devices.debugport`) what to do, in the vCPU's exit:

    push rax; in al, 0xf5      vmfork looks at the interrupt frame: RIP - 1 is the address of the int3
      1 -> pop rax; iretq      one of vmfork's: the frame's RIP is rewound to the breakpoint address (and, if the
                               machine must stop, it stops here; continuing resumes right here)
      0 -> pop rax; jmp [orig] not vmfork's (the guest's own int3): its own #BP handler runs, frame unchanged
      0xff (no debugger: the port reads as absent) -> the stub looks the address up in a table of vmfork's inserted
                               bytes kept beside it, puts the original byte back itself (CR0.WP off, EFLAGS.AC on
                               for the one write), rewinds the frame and returns; unknown addresses go to the guest
                               handler. So a fork that inherited breakpoints but has no debugger attached runs through
                               them as if they were not there.

Continuing over a breakpoint puts the original byte back, plants temporary `int3`s on every instruction that can run
next (capstone: the fall-through and the branch target; `ret` through the stack; indirect jumps and calls through
the registers and memory), lets the instruction run, and when a temporary one is reached (one more exit, no stop)
removes them and re-inserts the breakpoint. A single step is the same with a stop at the temporary breakpoint.

Guest kernel mode on this host: `int3` in (emulated) CPL0 is an emulation failure, so the stub mechanism refuses
breakpoints in supervisor-only pages and steps in kernel mode, naming the probe. (The test guest maps its kernel
code user-accessible: a breakpoint there is accepted, and kills the guest when kernel code reaches it.)

The stub page: guest-physical 0xAF000 by default (`stub_gpa`), inside the legacy VGA window [0xA0000, 0xC0000)
that vmfork's e820 map reports as reserved (every vmfork machine has RAM there, and no guest allocates reserved
memory; unlike the top of RAM, which kernels allocate first, and the BIOS area [0xE0000, 0x100000), which Linux scans
for firmware tables). Its virtual address is any mapping of that page that kernel code may execute, found by
searching the guest's page tables (identity-mapped in vmfork's test guest). A guest whose tables do not map it
(e.g. Linux, whose direct map is not executable) needs `stub_gpa`/`stub_va` of a page it maps executable, or the
"kvm" mechanism. Only 64-bit (long mode) guests are supported by the stub.

`watch_guest_int3(hook)` shows the guest's own int3s (answer 0 above, or KVM's exit for an int3 that is not
vmfork's) to a hook first, which may stop the machine right after the int3 instead of passing it to the guest's
handler: how `vmfork fuzz --harness int3` sees KF/x-style markers (int3 with a magic value in RAX) while every other
int3 of the guest still reaches its own handler.

## Breakpoint sets, forks and resets

Breakpoint sets are per machine. The `int3` bytes, the patched IDT gate and the stub are guest memory, so a fork
inherits them: `debugger(fork)` of a fork whose ancestor has a debugger starts with a copy of the ancestor's set
(stopping where the ancestor would); a fork nobody attaches a debugger to passes through them (see 0xff above).
A parent with forks has read-only RAM, so its set cannot change while they live. Writes go through the tracked path,
so a fork's reset undoes them; `sync()` (called at every run, step and breakpoint change) puts every byte, gate and
the stub back as the debugger wants them.

Reads through the debugger (`read_phys`, `read_virt`, the GDB server) show the original bytes under breakpoints;
writes there change the saved original byte and keep the breakpoint.

Multi-vCPU machines: all vCPUs stop when one hits a breakpoint. While one vCPU steps over a breakpoint (a single
instruction), another vCPU executing that address is not stopped; one reaching another vCPU's temporary breakpoint
retries it until the step is done.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import MemoryAccessError, VmforkError
from ..kvm import constants as c
from ..kvm import structs as s
from .disasm import MAX_INSN, successors
from .errors import BreakpointError, SteppingError, TranslationError
from .memory import AddressSpace, find_virtual
from .regs import cpu_mode
from .symbols import SymbolTable
from .target import Target, as_target

if TYPE_CHECKING:
    from ..vm import StopEvent

__all__ = ["STUB_GPA", "Breakpoint", "Debugger", "GuestInt3Hook", "Hit", "debugger", "stub_code"]

INT3 = 0xCC
STUB_GPA = 0xAF000
STUB_CODE_SIZE = 0x100
STUB_ORIG = 0x100           # u64: the guest's own #BP handler
STUB_TABLE = 0x200          # (u64 address, u8 original byte, 7 bytes padding) per inserted int3, 0-terminated
STUB_TABLE_CAPACITY = (0x1000 - STUB_TABLE) // 16 - 1
RETIRED = (1 << 64) - 1     # a table entry the stub has used (its byte is back)

ANSWER_PASS = 0             # continue into the guest's #BP handler
ANSWER_RESUME = 1           # return to the (rewritten) frame
ANSWER_ABSENT = 0xFF        # what an absent port reads: the stub's own fallback

# Debugger.watch_guest_int3: (vCPU, the interrupted code's registers) -> (stop reason, status) or None
GuestInt3Hook = Callable[[int, s.Regs], "tuple[str, int | None] | None"]


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


def _build_stub() -> tuple[bytes, int, int]:
    """(code, offset right after the `in`, offset of the resume path)."""
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
    a.labels["orig"] = STUB_ORIG
    a.labels["table"] = STUB_TABLE
    code = a.build()
    assert len(code) <= STUB_CODE_SIZE
    return code, a.labels["after_in"], a.labels["resume"]


STUB_CODE, STUB_AFTER_IN, STUB_RESUME = _build_stub()


def stub_code() -> bytes:
    """The position-independent stub (data slots at +0x100 and +0x200 of its page)."""
    return STUB_CODE


def _copy(struct_value: Any) -> Any:
    new = type(struct_value)()
    ctypes.pointer(new)[0] = struct_value
    return new


# --- values ---------------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Breakpoint:
    """A software breakpoint at a virtual address (and the guest-physical byte it was translated to)."""

    address: int
    gpa: int
    original: int
    label: str = ""
    callback: Callable[[Hit], object] | None = None
    owner: str = ""
    hits: int = 0

    def describe(self) -> str:
        name = f" <{self.label}>" if self.label else ""
        return f"breakpoint at {self.address:#x}{name} (physical {self.gpa:#x}, {self.hits} hits)"


@dataclass(frozen=True)
class Hit:
    """A vCPU stopped at a breakpoint (reason "breakpoint") or after a step (reason "step"). `regs`/`sregs` are the
    interrupted code's registers (RIP = `address`)."""

    vcpu: int
    address: int
    reason: str
    breakpoint: Breakpoint | None
    regs: s.Regs
    sregs: s.Sregs
    debugger: Debugger = field(repr=False)

    def describe(self) -> str:
        where = self.debugger.describe_address(self.address)
        what = "breakpoint" if self.reason == "breakpoint" else "step"
        return f"vCPU {self.vcpu}: {what} at {where}"


@dataclass
class _Parked:
    """A vCPU the debugger stopped: in the stub right after the `in` (stub), or at the address (kvm)."""

    frame: int              # virtual address of the interrupt frame (stub), 0 for kvm
    address: int
    reason: str
    breakpoint: Breakpoint | None
    reported: bool = False


@dataclass
class _Step:
    kind: str                           # "over" (continue past a breakpoint) or "step"
    origin: int
    lifted: int | None                  # gpa of the breakpoint lifted for the step
    temps: list[int]                    # gpas of temporary breakpoints
    targets: set[int]                   # virtual addresses that end the step


@dataclass
class _Temp:
    address: int
    original: int
    owners: set[int]


@dataclass
class _Stub:
    gpa: int
    va: int
    handler: int                        # the guest's own #BP handler (virtual address)
    gates: dict[int, bytes] = field(default_factory=dict)      # gate gpa -> the guest's own 16 bytes


# --- the debugger -----------------------------------------------------------------------------------------------

class Debugger:
    """Breakpoints and stepping on one machine, and a view of it (a `Target`) that shows the interrupted code's
    registers and the original bytes under breakpoints. Get one with `debugger(machine)`."""

    is_vmi_target = True

    def __init__(self, target: Target | object, *, mechanism: str = "auto", symbols: SymbolTable | None = None,
                 stub_gpa: int = STUB_GPA, stub_va: int | None = None) -> None:
        self.target: Target = as_target(target)
        self.symbols = symbols
        self.stub_gpa = stub_gpa
        self.stub_va = stub_va
        self.mechanism = self._choose(mechanism)
        self.breakpoints: dict[int, Breakpoint] = {}         # by gpa
        self.on_hit: Callable[[Hit], object] | None = None   # for breakpoints without their own callback
        self.last_hit: Hit | None = None
        self.error: BaseException | None = None              # a failure inside an exit (the run stops)
        self.round_trips = 0
        self._lock = threading.RLock()
        self._known: dict[int, int] = {}       # gpa -> original byte, for every byte an int3 of ours ever replaced
        self._temps: dict[int, _Temp] = {}
        self._steps: dict[int, _Step] = {}
        self._lifted: dict[int, set[int]] = {}
        self._parked: dict[int, _Parked] = {}
        self._skip: dict[int, int] = {}        # vcpu -> breakpoint address to step over on the next resume
        self._stub: _Stub | None = None
        self._inherited_stub: _Stub | None = None
        self._kvm_step_vcpu: int | None = None
        self._regs_changed = False
        self._descriptors: dict[tuple[int, int, int], int] = {}     # GDT entries, cached during a run
        self._kvm_debug_on = False
        self._detached = False
        self._guest_int3: GuestInt3Hook | None = None    # see watch_guest_int3()

    # --- mechanism ----------------------------------------------------------------------------------------------

    @staticmethod
    def _choose(mechanism: str) -> str:
        if mechanism not in ("auto", "kvm", "stub"):
            raise BreakpointError(f"mechanism must be auto, kvm or stub, not {mechanism!r}")
        if mechanism != "auto":
            return mechanism
        from ..doctor import probe_host
        return "kvm" if probe_host(cached=True).supports("sw_breakpoints") else "stub"

    @staticmethod
    def _probe_reason(name: str) -> str:
        from ..doctor import probe_host
        try:
            return probe_host(cached=True).reason(name)
        except (KeyError, VmforkError) as e:
            return str(e)

    def _kvm_single_step(self) -> bool:
        from ..doctor import probe_host
        return probe_host(cached=True).supports("single_step")

    # --- symbols ------------------------------------------------------------------------------------------------

    def resolve(self, where: int | str) -> int:
        if isinstance(where, int):
            return where
        text = where.strip()
        try:
            return int(text, 0)
        except ValueError:
            pass
        if self.symbols is None:
            raise BreakpointError(f"{where!r} is not an address and the debugger has no symbols (pass symbols=)")
        return self.symbols.address(text)

    def describe_address(self, address: int) -> str:
        if self.symbols is not None:
            name = self.symbols.describe(address)
            if not name.startswith("0x"):
                return f"{address:#x} <{name}>"
        return f"{address:#x}"

    # --- breakpoints --------------------------------------------------------------------------------------------

    def add_breakpoint(self, where: int | str, callback: Callable[[Hit], object] | None = None, *, vcpu: int = 0,
                       owner: str = "") -> Breakpoint:
        """A breakpoint at a virtual address or symbol (translated through vCPU `vcpu`'s page tables). The machine
        must be paused. Adding one where one is already set returns that one."""
        address = self.resolve(where)
        with self._lock:
            self._require_paused("set a breakpoint on")
            space = AddressSpace(self.target, vcpu)
            try:
                t = space.translate(address)
            except TranslationError as e:
                raise BreakpointError(f"cannot set a breakpoint at {address:#x}: {e}") from None
            if self.mechanism == "stub":
                if not space.mode.long:
                    raise BreakpointError(f"the breakpoint stub needs a 64-bit guest; vCPU {vcpu} uses "
                                          f"{space.mode.name} paging (try mechanism='kvm' on a host that supports it)")
                if not t.user and not self._cpl0_int3_works():
                    raise BreakpointError(
                        f"{address:#x} is in a supervisor-only page (guest kernel code): an int3 there cannot work "
                        f"on this host ({self._probe_reason('int3_cpl0')})")
            existing = self.breakpoints.get(t.paddr)
            if existing is not None:
                return existing
            if len(self._inserted()) >= STUB_TABLE_CAPACITY:
                raise BreakpointError(f"at most {STUB_TABLE_CAPACITY} breakpoints at a time")
            original = self._known.get(t.paddr)
            if original is None:
                original = self.target.read_phys(t.paddr, 1)[0]
            label = ""
            if isinstance(where, str) and not where.strip().lower().startswith("0x") and not where.strip().isdigit():
                label = where.strip()
            elif self.symbols is not None:
                label = self.symbols.describe(address)
                label = "" if label.startswith("0x") else label
            bp = Breakpoint(address, t.paddr, original, label, callback, owner)
            self.breakpoints[t.paddr] = bp
            self._known[t.paddr] = original
            try:
                self._arm()
                self._poke(t.paddr, INT3)
                self._write_table()
            except BaseException:
                del self.breakpoints[t.paddr]
                raise
            return bp

    def remove_breakpoint(self, where: int | str | Breakpoint, *, vcpu: int = 0) -> None:
        """Remove a breakpoint (by object, address or symbol). Removing one that is not set is an error."""
        with self._lock:
            self._require_paused("remove a breakpoint from")
            bp = where if isinstance(where, Breakpoint) else self.find(where, vcpu=vcpu)
            if bp is None or self.breakpoints.get(bp.gpa) is not bp:
                raise BreakpointError(f"no breakpoint at {where if isinstance(where, str) else hex(self._addr(where))}")
            del self.breakpoints[bp.gpa]
            if bp.gpa not in self._temps:
                self._poke(bp.gpa, bp.original)
            self._write_table()
            if not self.breakpoints and not self._temps and not self._parked_in_stub() and self._guest_int3 is None:
                self._disarm()

    def _addr(self, where: int | str | Breakpoint) -> int:
        return where.address if isinstance(where, Breakpoint) else self.resolve(where)

    def find(self, where: int | str, *, vcpu: int = 0) -> Breakpoint | None:
        address = self.resolve(where)
        for bp in self.breakpoints.values():
            if bp.address == address:
                return bp
        try:
            gpa = AddressSpace(self.target, vcpu).translate(address).paddr
        except TranslationError:
            return None
        return self.breakpoints.get(gpa)

    def clear(self, *, owner: str | None = None) -> None:
        """Remove every breakpoint (or every one set by `owner`)."""
        for bp in list(self.breakpoints.values()):
            if owner is None or bp.owner == owner:
                self.remove_breakpoint(bp)

    def list(self) -> list[Breakpoint]:
        return sorted(self.breakpoints.values(), key=lambda b: b.address)

    @property
    def stub_address(self) -> int | None:
        """The virtual address of the #BP stub while the stub mechanism is armed (for a fork's own lean handler of
        the stub's port question, e.g. vmfork.fuzz.traps.ForkTraps), else None."""
        return self._stub.va if self._stub is not None else None

    def watch_guest_int3(self, hook: GuestInt3Hook | None) -> None:
        """See the guest's own int3s (those at no breakpoint of vmfork's) before its #BP handler does.

        `hook(vcpu, regs)` runs in the vCPU's exit with the interrupted code's registers (RIP right after the
        int3). Returning (reason, status) stops the machine there with StopEvent(reason, status) and consumes the
        int3: the guest's handler never sees it, and continuing resumes after it. Returning None passes it to the
        guest's handler as usual. The #BP route stays armed while a hook is set, breakpoints or not; forks'
        debuggers inherit it (e.g. a fuzzer's magic-value markers, vmfork.fuzz.harness). None removes it."""
        with self._lock:
            self._require_paused("watch the int3s of")
            self._guest_int3 = hook
            self.sync()

    def _inserted(self) -> dict[int, tuple[int, int]]:
        """gpa -> (virtual address, original byte) of every int3 of ours that should be in memory now."""
        out = {gpa: (t.address, t.original) for gpa, t in self._temps.items()}
        for gpa, bp in self.breakpoints.items():
            if gpa not in self._lifted and gpa not in out:
                out[gpa] = (bp.address, bp.original)
        return out

    def _cpl0_int3_works(self) -> bool:
        from ..doctor import probe_host
        try:
            return probe_host(cached=True).supports("int3_cpl0")
        except KeyError:
            return True

    def _require_paused(self, what: str) -> None:
        if self._detached:
            raise BreakpointError("this debugger is detached")
        state = self.target.state
        if state == "running" and not self._in_exit():
            raise BreakpointError(f"cannot {what} {self.target.name} while it runs: pause it first")
        if state == "destroyed":
            raise BreakpointError(f"cannot {what} {self.target.name}: it is destroyed")

    def _in_exit(self) -> bool:
        local = getattr(self.target, "_exit", None)
        return local is not None and getattr(local, "vcpu", None) is not None

    def _poke(self, gpa: int, value: int) -> None:
        try:
            self.target.write_phys(gpa, bytes([value]))
        except MemoryAccessError as e:
            raise BreakpointError(f"cannot write {self.target.name}'s memory at {gpa:#x}: {e}") from None

    # --- arming: the stub or KVM guest debugging ----------------------------------------------------------------

    def _arm(self) -> None:
        if self.mechanism == "kvm":
            if not self._kvm_debug_on:
                for v in range(self.target.vcpu_count):
                    self.target.set_guest_debug(v, c.KVM_GUESTDBG_ENABLE | c.KVM_GUESTDBG_USE_SW_BP)
                self._kvm_debug_on = True
            return
        if self._stub is None:
            self._install_stub()
        self._sync_stub()

    def _disarm(self) -> None:
        if self.mechanism == "kvm":
            if self._kvm_debug_on:
                for v in range(self.target.vcpu_count):
                    self.target.set_guest_debug(v, 0)
                self._kvm_debug_on = False
            return
        stub = self._stub
        if stub is None:
            return
        for gate_gpa, original in stub.gates.items():
            try:
                if self.target.read_phys(gate_gpa, 16) != original:
                    self.target.write_phys(gate_gpa, original)
            except MemoryAccessError:
                pass
        # The stub's code stays (a vCPU may still be on its way out of it); an empty table disables its fallback.
        self.target.write_phys(stub.gpa + STUB_TABLE, bytes(16))
        self.target.set_debug_handler(None)
        self._stub = None

    def _gate_addresses(self) -> dict[int, tuple[int, int]]:
        """IDT vector 3 gate of every vCPU: gate gpa -> (IDT base, vCPU)."""
        out: dict[int, tuple[int, int]] = {}
        for v in range(self.target.vcpu_count):
            sregs = self.target.get_sregs(v)
            if not sregs.efer & (1 << 10):
                if v > 0:
                    continue        # an AP the guest has not started yet (its IDT is checked once it has one)
                raise BreakpointError(f"the breakpoint stub needs a 64-bit guest; vCPU {v} is not in long mode")
            if sregs.idt.limit < 3 * 16 + 15:
                raise BreakpointError(f"vCPU {v}'s IDT (limit {sregs.idt.limit:#x}) has no #BP gate")
            try:
                gpa = AddressSpace(self.target, v, sregs=sregs).translate(sregs.idt.base + 3 * 16).paddr
            except TranslationError as e:
                raise BreakpointError(f"vCPU {v}'s IDT is not mapped: {e}") from None
            out.setdefault(gpa, (sregs.idt.base, v))
        return out

    @staticmethod
    def _gate_target(gate: bytes) -> int:
        low, _sel, _ist, _attr, mid, high = struct.unpack_from("<HHBBHI", gate)
        return low | mid << 16 | high << 32

    def _install_stub(self) -> None:
        gates = self._gate_addresses()
        handlers = {}
        for gate_gpa in gates:
            gate = self.target.read_phys(gate_gpa, 16)
            if not gate[5] & 0x80:
                raise BreakpointError("the guest has no #BP handler (IDT vector 3 is not present)")
            handlers[gate_gpa] = self._gate_target(gate)
        va = self.stub_va
        if va is None:
            space = AddressSpace(self.target, 0)
            found = find_virtual(space, self.stub_gpa, supervisor_exec=True)
            if not found:
                raise BreakpointError(
                    f"the guest's page tables map the breakpoint stub's page ({self.stub_gpa:#x}) nowhere that kernel "
                    "code can execute: pass stub_gpa= and stub_va= of a page it does, or use a host where KVM "
                    f"intercepts breakpoints ({self._probe_reason('sw_breakpoints')})")
            va = found[0]
        distinct = {h for h in handlers.values() if h != va}
        if len(distinct) > 1:
            raise BreakpointError("the vCPUs have different #BP handlers; the stub supports one")
        handler = distinct.pop() if distinct else 0
        self._stub = _Stub(self.stub_gpa, va, handler)

    def _sync_stub(self) -> None:
        """Stub code, its handler slot, the gates and the debug port as they should be (a reset, a new IDT or a
        newly attached device model may have changed any of them)."""
        stub = self._stub
        assert stub is not None
        t = self.target
        if t.read_phys(stub.gpa, len(STUB_CODE)) != STUB_CODE:
            t.write_phys(stub.gpa, STUB_CODE)
        for gate_gpa in self._gate_addresses():
            gate = t.read_phys(gate_gpa, 16)
            current = self._gate_target(gate)
            if current != stub.va:
                if not gate[5] & 0x80:
                    raise BreakpointError("the guest has no #BP handler (IDT vector 3 is not present)")
                stub.handler = current
                stub.gates[gate_gpa] = gate
                patched = bytearray(gate)
                struct.pack_into("<H", patched, 0, stub.va & 0xFFFF)
                struct.pack_into("<H", patched, 6, (stub.va >> 16) & 0xFFFF)
                struct.pack_into("<I", patched, 8, stub.va >> 32)
                t.write_phys(gate_gpa, bytes(patched))
            elif gate_gpa not in stub.gates:
                stub.gates[gate_gpa] = gate     # inherited from an ancestor: its original is in _Stub already
        want = stub.handler.to_bytes(8, "little")
        if t.read_phys(stub.gpa + STUB_ORIG, 8) != want:
            t.write_phys(stub.gpa + STUB_ORIG, want)
        t.set_debug_handler(self._on_port)

    def _write_table(self) -> None:
        if self._stub is None:
            return
        rows = b"".join(struct.pack("<QB7x", addr, orig) for addr, orig in self._inserted().values())
        data = rows + bytes(16)
        if self.target.read_phys(self._stub.gpa + STUB_TABLE, len(data)) != data:
            self.target.write_phys(self._stub.gpa + STUB_TABLE, data)

    def sync(self) -> None:
        """Make guest memory match the debugger: every int3 of ours in place (re-inserting what a reset took out),
        bytes of removed breakpoints back to their originals, and the stub, gates and device (stub mechanism).
        Runs before every run and step."""
        with self._lock:
            if self._detached:
                return
            want = self._inserted()
            armed = bool(want) or bool(self._parked_in_stub()) or self._guest_int3 is not None
            if armed:
                self._arm()
            for gpa, original in self._known.items():
                current = self.target.read_phys(gpa, 1)[0]
                if gpa in want:
                    if current != INT3:
                        if current != original:
                            # the guest (or a reset to a state before the breakpoint) put other code here
                            self._known[gpa] = current
                            if gpa in self.breakpoints:
                                self.breakpoints[gpa].original = current
                        self._poke(gpa, INT3)
                elif current == INT3 and original != INT3:
                    self._poke(gpa, original)
            if armed:
                self._write_table()
            elif self._stub is not None or self._kvm_debug_on:
                self._disarm()
            elif self.mechanism == "stub":
                self._clear_inherited_gates()

    def _clear_inherited_gates(self) -> None:
        """A gate still pointing at a stub this debugger no longer uses (inherited, or brought back by a reset)."""
        inherited = self._inherited_stub
        if inherited is None:
            return
        for gate_gpa, original in inherited.gates.items():
            try:
                if self.target.read_phys(gate_gpa, 16) != original and \
                        self._gate_target(self.target.read_phys(gate_gpa, 16)) == inherited.va:
                    self.target.write_phys(gate_gpa, original)
            except MemoryAccessError:
                pass

    # --- the exit handler (stub mechanism) ----------------------------------------------------------------------

    def _on_port(self, vcpu: int) -> int:
        """Called in the exit of a vCPU that read the debug port. Must not raise."""
        with self._lock:
            try:
                return self._handle_trap(vcpu)
            except BaseException as e:      # stop the machine and report; the stub's own fallback keeps the guest
                self.error = e              # consistent meanwhile
                self.target.request_stop("debugger-error", vcpu)
                return ANSWER_ABSENT

    def _handle_trap(self, vcpu: int) -> int:
        stub = self._stub
        if stub is None:
            return ANSWER_ABSENT
        t = self.target
        regs = t.get_regs(vcpu)
        if regs.rip not in (stub.va + 1, stub.va + STUB_AFTER_IN):
            return ANSWER_ABSENT        # not our stub reading the port
        self.round_trips += 1
        sregs = t.get_sregs(vcpu)
        space = AddressSpace(t, vcpu, sregs=sregs)
        frame = regs.rsp + 8
        address = space.read_u64(frame) - 1
        try:
            gpa = space.resolve(address)[0]
        except TranslationError:
            return ANSWER_PASS
        step = self._steps.get(vcpu)
        if step is not None and address in step.targets:
            self._finish_step(vcpu)
            space.write_u64(frame, address)
            if step.kind == "step":
                self._park(vcpu, _Parked(frame, address, "step", None))
                t.request_stop("step", vcpu)
                return ANSWER_RESUME
            bp = self.breakpoints.get(gpa)
            if bp is None:
                return ANSWER_RESUME
            return self._user_hit(vcpu, bp, frame, space, regs, sregs)
        if gpa in self._temps:              # another vCPU's step: retry until it is done
            space.write_u64(frame, address)
            return ANSWER_RESUME
        bp = self.breakpoints.get(gpa)
        if bp is not None and gpa not in self._lifted and bp.original != INT3:
            space.write_u64(frame, address)
            return self._user_hit(vcpu, bp, frame, space, regs, sregs)
        if self._guest_int3 is not None:
            return self._guest_int3_hit(vcpu, frame, space, regs, sregs)
        return ANSWER_PASS

    def _guest_int3_hit(self, vcpu: int, frame: int, space: AddressSpace, regs: s.Regs, sregs: s.Sregs) -> int:
        """The guest's own int3 (stub mechanism): ask the watcher; a stop parks the vCPU in the stub so that
        `get_regs` shows the interrupted code (RIP after the int3), and the stub then returns there."""
        ctx_regs, _ = self._frame_view(regs, sregs, space, frame)
        assert self._guest_int3 is not None
        stop = self._guest_int3(vcpu, ctx_regs)
        if stop is None:
            return ANSWER_PASS
        self._park(vcpu, _Parked(frame, ctx_regs.rip, "int3", None, reported=True))
        self.target.request_stop(stop[0], stop[1])
        return ANSWER_RESUME

    def _user_hit(self, vcpu: int, bp: Breakpoint, frame: int, space: AddressSpace, regs: s.Regs,
                  sregs: s.Sregs) -> int:
        bp.hits += 1
        parked = _Parked(frame, bp.address, "breakpoint", bp)
        self._park(vcpu, parked)
        ctx_regs, ctx_sregs = self._frame_view(regs, sregs, space, frame)
        hit = Hit(vcpu, bp.address, "breakpoint", bp, ctx_regs, ctx_sregs, self)
        self.last_hit = hit
        callback = bp.callback or self.on_hit
        if callback is not None and callback(hit) is True:
            if self._regs_changed:      # the callback changed registers: read them back
                self._regs_changed = False
                ctx_regs, ctx_sregs = self._frame_view(self.target.get_regs(vcpu), sregs, space, frame)
            self._begin_step(vcpu, "over", bp.address, (ctx_regs, ctx_sregs, space))
            del self._parked[vcpu]
            return ANSWER_RESUME
        self.target.request_stop("breakpoint", vcpu)
        return ANSWER_RESUME

    def _park(self, vcpu: int, parked: _Parked) -> None:
        self._parked[vcpu] = parked
        if parked.reason == "breakpoint":
            self._skip[vcpu] = parked.address

    def _parked_in_stub(self) -> dict[int, _Parked]:
        return {v: p for v, p in self._parked.items() if p.frame}

    # --- the interrupted code's registers -------------------------------------------------------------------------

    def _descriptor(self, space: AddressSpace, sregs: s.Sregs, selector: int) -> int | None:
        if selector & 4 or selector < 8 or (selector & ~7) + 7 > sregs.gdt.limit:
            return None
        key = (sregs.gdt.base, space.mode.root, selector & ~7)
        found = self._descriptors.get(key)
        if found is None:
            try:
                found = self._descriptors[key] = space.read_u64(sregs.gdt.base + (selector & ~7))
            except VmforkError:
                return None
        return found

    def _frame_view(self, regs: s.Regs, sregs: s.Sregs, space: AddressSpace, frame: int) -> tuple[s.Regs, s.Sregs]:
        rax, rip, cs, rflags, rsp, ss = struct.unpack("<6Q", space.read(frame - 8, 48))
        r = _copy(regs)
        r.rax, r.rip, r.rflags, r.rsp = rax, rip, rflags, rsp
        sr = _copy(sregs)
        for seg, sel in (("cs", cs), ("ss", ss)):
            segment = getattr(sr, seg)
            segment.selector = sel & 0xFFFF
            d = self._descriptor(space, sregs, sel)
            if d is None:
                segment.dpl = sel & 3
                continue
            segment.type = (d >> 40) & 0xF
            segment.s = (d >> 44) & 1
            segment.dpl = (d >> 45) & 3
            segment.present = (d >> 47) & 1
            segment.l = (d >> 53) & 1
            segment.db = (d >> 54) & 1
            segment.g = (d >> 55) & 1
            segment.base = ((d >> 16) & 0xFFFFFF) | ((d >> 56) & 0xFF) << 24
            limit = (d & 0xFFFF) | ((d >> 48) & 0xF) << 16
            segment.limit = (limit << 12) | 0xFFF if segment.g else limit
        return r, sr

    def _parked_frame(self, vcpu: int) -> int:
        """The frame address of a vCPU parked in the stub, or 0 (also dropping a park the machine left)."""
        parked = self._parked.get(vcpu)
        if parked is None or not parked.frame:
            return 0
        stub_va = self._stub.va if self._stub is not None else None
        regs = self.target.get_regs(vcpu)
        if stub_va is None or regs.rip not in (stub_va + STUB_AFTER_IN, stub_va + 1) or regs.rsp + 8 != parked.frame:
            del self._parked[vcpu]          # the machine was reset or moved on without us
            self._skip.pop(vcpu, None)
            return 0
        return parked.frame

    def get_regs(self, vcpu: int) -> s.Regs:
        with self._lock:
            frame = self._parked_frame(vcpu)
            regs = self.target.get_regs(vcpu)
            if not frame:
                return regs
            space = AddressSpace(self.target, vcpu)
            return self._frame_view(regs, space.sregs, space, frame)[0]  # type: ignore[no-any-return]

    def get_sregs(self, vcpu: int) -> s.Sregs:
        with self._lock:
            frame = self._parked_frame(vcpu)
            sregs = self.target.get_sregs(vcpu)
            if not frame:
                return sregs
            space = AddressSpace(self.target, vcpu, sregs=sregs)
            return self._frame_view(self.target.get_regs(vcpu), sregs, space, frame)[1]  # type: ignore[no-any-return]

    def set_regs(self, vcpu: int, regs: s.Regs) -> None:
        with self._lock:
            frame = self._parked_frame(vcpu)
            if not frame:
                self.target.set_regs(vcpu, regs)
                return
            if self.target.state == "running" and not self._in_exit():
                raise BreakpointError(f"cannot set registers of {self.target.name} while it runs: pause it first")
            space = AddressSpace(self.target, vcpu)
            space.write(frame - 8, struct.pack("<2Q", regs.rax, regs.rip))
            space.write(frame + 16, struct.pack("<2Q", regs.rflags, regs.rsp))
            self._regs_changed = True
            current = self.target.get_regs(vcpu)
            new = _copy(regs)
            new.rax, new.rip, new.rflags, new.rsp = current.rax, current.rip, current.rflags, current.rsp
            self.target.set_regs(vcpu, new)
            parked = self._parked[vcpu]
            if regs.rip != parked.address:
                self._skip.pop(vcpu, None)

    def set_sregs(self, vcpu: int, sregs: s.Sregs) -> None:
        with self._lock:
            if self._parked_frame(vcpu):
                raise BreakpointError(f"vCPU {vcpu} is stopped at a breakpoint: its system registers are those of the "
                                      "breakpoint handler; continue or step first")
            self.target.set_sregs(vcpu, sregs)

    def context(self, vcpu: int) -> tuple[s.Regs, s.Sregs]:
        return self.get_regs(vcpu), self.get_sregs(vcpu)

    # --- memory through the debugger: original bytes under breakpoints --------------------------------------------

    def read_phys(self, gpa: int, length: int) -> bytes:
        data = self.target.read_phys(gpa, length)
        with self._lock:
            inserted = self._inserted()
        hidden = [(g, orig) for g, (_va, orig) in inserted.items() if gpa <= g < gpa + length]
        if not hidden:
            return data
        buf = bytearray(data)
        for g, orig in hidden:
            buf[g - gpa] = orig
        return bytes(buf)

    def write_phys(self, gpa: int, data: bytes) -> None:
        with self._lock:
            inserted = self._inserted()
            covered = [g for g in inserted if gpa <= g < gpa + len(data)]
            if not covered:
                self.target.write_phys(gpa, data)
                return
            buf = bytearray(data)
            for g in covered:
                new = buf[g - gpa]
                self._known[g] = new
                if g in self.breakpoints:
                    self.breakpoints[g].original = new
                if g in self._temps:
                    self._temps[g].original = new
                buf[g - gpa] = INT3
            self.target.write_phys(gpa, bytes(buf))
            self._write_table()

    # --- the rest of the Target protocol --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def vcpu_count(self) -> int:
        return self.target.vcpu_count

    @property
    def state(self) -> str:
        return self.target.state

    def ram_ranges(self) -> Sequence[tuple[int, int]]:
        return self.target.ram_ranges()

    def get_fpu(self, vcpu: int) -> s.Fpu:
        return self.target.get_fpu(vcpu)

    def set_debug_handler(self, handler: Callable[[int], int] | None) -> None:
        self.target.set_debug_handler(handler)

    def set_guest_debug(self, vcpu: int, control: int, debugregs: Sequence[int] = ()) -> None:
        self.target.set_guest_debug(vcpu, control, debugregs)

    def touch(self) -> None:
        self.target.touch()

    def request_stop(self, reason: str, status: int | None = None) -> None:
        self.target.request_stop(reason, status)

    def pause(self) -> StopEvent:
        ev = self.target.pause()
        return self._kvm_finish(ev) if self.mechanism == "kvm" else self._finish_event(ev)

    def interrupt(self) -> None:
        """Stop a running machine (from any thread); its run or wait returns StopEvent("pause")."""
        self.target.request_stop("pause", None)

    # --- stepping -------------------------------------------------------------------------------------------------

    def _context_for_step(self, vcpu: int) -> tuple[s.Regs, s.Sregs, AddressSpace]:
        regs, sregs = self.get_regs(vcpu), self.get_sregs(vcpu)
        space = AddressSpace(self.target, vcpu, sregs=self.target.get_sregs(vcpu))
        return regs, sregs, space

    def _begin_step(self, vcpu: int, kind: str, origin: int | None = None,
                    ctx: tuple[s.Regs, s.Sregs, AddressSpace] | None = None) -> None:
        """Plant temporary breakpoints on what can run after the vCPU's current instruction (lifting a breakpoint
        of ours at that instruction)."""
        regs, sregs, space = self._context_for_step(vcpu) if ctx is None else ctx
        rip = regs.rip if origin is None else origin
        mode = cpu_mode(sregs)
        if mode.cpl == 0 and not self._cpl0_int3_works():
            raise SteppingError(f"vCPU {vcpu} is in guest kernel mode at {rip:#x}: stepping there needs an int3 in "
                                f"kernel mode, which this host cannot run ({self._probe_reason('int3_cpl0')})")
        code = self._read_code(space, rip)
        names = {n: int(getattr(regs, n)) for n in s.GPR_NAMES}

        def read_mem(addr: int, size: int) -> bytes:
            return self._shadow(space.read(addr, size), space, addr)

        _insn, targets = successors(code, rip, mode.bits, names, read_mem, fs_base=sregs.fs.base,
                                    gs_base=sregs.gs.base)
        origin_gpa = space.resolve(rip)[0]
        if rip in targets:
            raise SteppingError(f"the instruction at {rip:#x} jumps to itself: stepping over it would never end")
        lifted = origin_gpa if origin_gpa in self.breakpoints else None
        temps: list[int] = []
        planted: list[int] = []
        try:
            for target_va in targets:
                try:
                    gpa = space.resolve(target_va)[0]
                except TranslationError:
                    continue        # a fault will run the guest's handler first; the step ends when it returns
                if gpa in self.breakpoints and gpa != origin_gpa:
                    continue        # our int3 is there already
                temp = self._temps.get(gpa)
                if temp is None:
                    original = self.target.read_phys(gpa, 1)[0]
                    self._temps[gpa] = _Temp(target_va, original, {vcpu})
                    self._known.setdefault(gpa, original)
                    planted.append(gpa)
                    if gpa != origin_gpa:
                        self._poke(gpa, INT3)
                else:
                    temp.owners.add(vcpu)
                temps.append(gpa)
        except BaseException:
            for gpa in planted:
                self._poke(gpa, self._temps.pop(gpa).original)
            raise
        if lifted is not None:
            self._lifted.setdefault(lifted, set()).add(vcpu)
            self._poke(lifted, self.breakpoints[lifted].original)
        self._steps[vcpu] = _Step(kind, rip, lifted, temps, set(targets))
        self._skip.pop(vcpu, None)
        if not self._in_exit():     # in an exit the table is brought up to date when the machine stops
            self._write_table()

    def _finish_step(self, vcpu: int) -> None:
        step = self._steps.pop(vcpu, None)
        if step is None:
            return
        for gpa in step.temps:
            temp = self._temps.get(gpa)
            if temp is None:
                continue
            temp.owners.discard(vcpu)
            if not temp.owners:
                del self._temps[gpa]
                if gpa not in self.breakpoints or gpa in self._lifted:
                    self._poke(gpa, temp.original)
        if step.lifted is not None:
            owners = self._lifted.get(step.lifted, set())
            owners.discard(vcpu)
            if not owners:
                self._lifted.pop(step.lifted, None)
                if step.lifted in self.breakpoints:
                    self._poke(step.lifted, INT3)
        if not self._in_exit():
            self._write_table()

    def _shadow(self, data: bytes, space: AddressSpace, vaddr: int) -> bytes:
        inserted = self._inserted()
        if not inserted:
            return data
        buf = bytearray(data)
        for i in range(len(buf)):
            if buf[i] == INT3:
                try:
                    gpa = space.resolve(vaddr + i)[0]
                except TranslationError:
                    continue
                if gpa in inserted:
                    buf[i] = inserted[gpa][1]
                elif gpa in self.breakpoints:
                    buf[i] = self.breakpoints[gpa].original
        return bytes(buf)

    def _read_code(self, space: AddressSpace, rip: int) -> bytes:
        out = b""
        for n in (MAX_INSN, 4096 - (rip & 0xFFF)):
            try:
                out = space.read(rip, min(n, MAX_INSN))
                break
            except MemoryAccessError:
                continue
        if not out:
            raise SteppingError(f"the code at {rip:#x} is not mapped")
        return self._shadow(out, space, rip)

    # --- running --------------------------------------------------------------------------------------------------

    def _prepare_resume(self, step_vcpu: int | None = None) -> None:
        if self.mechanism == "kvm":
            return
        self.sync()
        for vcpu, address in list(self._skip.items()):
            if vcpu == step_vcpu:
                continue
            regs = self.get_regs(vcpu)
            if regs.rip != address or vcpu in self._steps:
                self._skip.pop(vcpu, None)
                continue
            space = AddressSpace(self.target, vcpu)
            try:
                gpa = space.translate(address).paddr
            except TranslationError:
                self._skip.pop(vcpu, None)
                continue
            if gpa in self.breakpoints:
                self._begin_step(vcpu, "over", address)
            else:
                self._skip.pop(vcpu, None)
        if step_vcpu is not None:
            self._begin_step(step_vcpu, "step")
        self._parked.clear()

    def _next_unreported(self) -> StopEvent | None:
        for vcpu, parked in sorted(self._parked.items()):
            if not parked.reported and self._parked_frame(vcpu):
                parked.reported = True
                return self._event(parked.reason, vcpu, parked.address)
        return None

    def _event(self, reason: str, vcpu: int, address: int) -> StopEvent:
        from ..vm import StopEvent
        return StopEvent(reason, None, vcpu, self.describe_address(address))

    def _finish_event(self, ev: StopEvent) -> StopEvent:
        """Turn the machine's stop into the debugger's: which vCPU stopped where; clean up interrupted steps."""
        with self._lock:
            self._descriptors.clear()
            try:
                return self._classify(ev)
            finally:
                if self.target.state not in ("running", "destroyed"):
                    self._write_table()

    def _classify(self, ev: StopEvent) -> StopEvent:
        if True:
            if ev.reason == "debugger-error" and self.error is not None:
                from ..vm import StopEvent
                err = self.error
                self.error = None
                return StopEvent("crash" if isinstance(err, AssertionError) else "debugger-error", None, ev.status,
                                 f"{type(err).__name__}: {err}")
            for vcpu in list(self._steps):
                step = self._steps[vcpu]
                rip = self.get_regs(vcpu).rip
                self._finish_step(vcpu)
                if rip == step.origin and step.kind == "over":
                    self._skip[vcpu] = step.origin      # not run yet: step over it on the next resume
            if ev.reason in ("breakpoint", "step"):
                for parked in self._parked.values():
                    parked.reported = False
                first = ev.status if isinstance(ev.status, int) and ev.status in self._parked else None
                if first is not None:
                    self._parked[first].reported = True
                    p = self._parked[first]
                    return self._event(p.reason, first, p.address)
                found = self._next_unreported()
                if found is not None:
                    return found
            return ev

    def run(self, timeout: float | None = None) -> StopEvent:
        """Run (continue) until the machine stops; a vCPU stopped at a breakpoint first steps over it."""
        if self.mechanism == "kvm":
            return self._kvm_run(timeout)
        with self._lock:
            pending = self._next_unreported()
            if pending is not None:
                return pending
            self._prepare_resume()
        return self._finish_event(self.target.run(timeout))

    cont = run

    def step(self, vcpu: int = 0, timeout: float | None = 10.0) -> StopEvent:
        """Execute one instruction of `vcpu` (the others run meanwhile); StopEvent("step") when it is done."""
        if self.mechanism == "kvm":
            return self._kvm_step(vcpu, timeout)
        with self._lock:
            self._require_paused("step")
            if not 0 <= vcpu < self.target.vcpu_count:
                from .errors import VcpuIndexError
                raise VcpuIndexError(f"{self.target.name} has no vCPU {vcpu}")
            self._prepare_resume(step_vcpu=vcpu)
        return self._finish_event(self.target.run(timeout))

    def resume(self, *, step_vcpu: int | None = None) -> None:
        """Start running in the background (stepping `step_vcpu` if given); `wait()` for the stop."""
        if self.mechanism == "kvm":
            with self._lock:
                self._kvm_prepare(step_vcpu)
            self.target.start()
            return
        with self._lock:
            self._prepare_resume(step_vcpu=step_vcpu)
        self.target.start()

    def wait(self, timeout: float | None = None) -> StopEvent:
        while True:
            ev = self.target.wait(timeout)
            if ev.reason == "timeout" and self.target.state == "running":
                return ev
            if self.mechanism != "kvm":
                return self._finish_event(ev)
            ev = self._kvm_finish(ev)
            if ev is not _CONTINUE:
                return ev
            with self._lock:
                self._kvm_prepare(None)
            self.target.start()

    def start(self) -> None:
        self.resume()

    # --- KVM guest debugging (hosts whose KVM intercepts int3) ---------------------------------------------------

    def _kvm_prepare(self, step_vcpu: int | None) -> None:
        self.sync()
        self._kvm_step_vcpu = step_vcpu
        for v in range(self.target.vcpu_count):
            control = 0
            if self.breakpoints or self._guest_int3 is not None or v == step_vcpu or v in self._skip:
                control = c.KVM_GUESTDBG_ENABLE | c.KVM_GUESTDBG_USE_SW_BP
                if v == step_vcpu or v in self._skip:
                    control |= c.KVM_GUESTDBG_SINGLESTEP
                    regs = self.target.get_regs(v)
                    try:
                        gpa = AddressSpace(self.target, v).translate(regs.rip).paddr
                    except TranslationError:
                        gpa = -1
                    if gpa in self.breakpoints:
                        self._lifted.setdefault(gpa, set()).add(v)
                        self._poke(gpa, self.breakpoints[gpa].original)
            self.target.set_guest_debug(v, control)
        self._kvm_debug_on = True
        self._parked.clear()

    def _kvm_reinsert(self) -> None:
        for gpa in list(self._lifted):
            del self._lifted[gpa]
            if gpa in self.breakpoints:
                self._poke(gpa, INT3)

    def _kvm_finish(self, ev: StopEvent) -> StopEvent:
        """Classify a stop under KVM guest debugging; returns None-equivalent by looping in _kvm_run."""
        with self._lock:
            self._kvm_reinsert()
            if ev.reason != "debug" or ev.vcpu is None:
                return ev
            vcpu = ev.vcpu
            regs = self.target.get_regs(vcpu)
            stepping = self._kvm_step_vcpu
            if ev.status == 1:                  # #DB: a single step finished
                skipping = self._skip.pop(vcpu, None)
                if vcpu == stepping:
                    self._parked[vcpu] = _Parked(0, regs.rip, "step", None, True)
                    return self._event("step", vcpu, regs.rip)
                if skipping is not None:
                    return _CONTINUE  # type: ignore[no-any-return]
                return ev
            space = AddressSpace(self.target, vcpu)
            try:
                gpa = space.translate(regs.rip).paddr
            except TranslationError:
                gpa = -1
            bp = self.breakpoints.get(gpa)
            if bp is None and self._guest_int3 is not None:
                after = _copy(regs)
                after.rip = regs.rip + 1            # as the stub mechanism reports it: right after the int3
                stop = self._guest_int3(vcpu, after)
                if stop is not None:
                    self.target.set_regs(vcpu, after)
                    from ..vm import StopEvent
                    return StopEvent(stop[0], stop[1], vcpu)
            if bp is None:
                # not ours: give the guest its #BP (the int3 is re-executed as an exception the guest handles)
                events = s.VcpuEvents()
                fd = getattr(getattr(self.target, "machine", None), "vcpus", None)
                if fd is None:
                    raise BreakpointError("the guest's own int3 cannot be re-injected through this target")
                fd[vcpu].fd.get_vcpu_events(events)
                events.exception.injected = 1
                events.exception.nr = 3
                events.exception.has_error_code = 0
                fd[vcpu].fd.set_vcpu_events(events)
                return _CONTINUE  # type: ignore[no-any-return]
            bp.hits += 1
            sregs = self.target.get_sregs(vcpu)
            hit = Hit(vcpu, bp.address, "breakpoint", bp, regs, sregs, self)
            self.last_hit = hit
            self._skip[vcpu] = bp.address
            callback = bp.callback or self.on_hit
            if callback is not None and callback(hit) is True:
                return _CONTINUE  # type: ignore[no-any-return]
            self._parked[vcpu] = _Parked(0, bp.address, "breakpoint", bp, True)
            return self._event("breakpoint", vcpu, bp.address)

    def _kvm_run(self, timeout: float | None, step_vcpu: int | None = None) -> StopEvent:
        while True:
            with self._lock:
                self._kvm_prepare(step_vcpu)
            ev = self._kvm_finish(self.target.run(timeout))
            if ev is not _CONTINUE:
                return ev
            step_vcpu = None

    def _kvm_step(self, vcpu: int, timeout: float | None) -> StopEvent:
        if not self._kvm_single_step():
            raise SteppingError(f"this host cannot single-step ({self._probe_reason('single_step')})")
        return self._kvm_run(timeout, step_vcpu=vcpu)

    # --- detaching ------------------------------------------------------------------------------------------------

    def detach(self) -> None:
        """Remove every breakpoint and temporary breakpoint, give the #BP gate back to the guest, and forget this
        machine. A vCPU stopped at a breakpoint resumes at its instruction when the machine runs again."""
        with self._lock:
            if self._detached:
                return
            if self.target.state == "running" and not self._in_exit():
                raise BreakpointError(f"cannot detach from {self.target.name} while it runs: pause it first")
            if self.target.state != "destroyed":
                for vcpu in list(self._steps):
                    self._finish_step(vcpu)
                for gpa, bp in list(self.breakpoints.items()):
                    self._poke(gpa, bp.original)
                self.breakpoints.clear()
                self._temps.clear()
                self._lifted.clear()
                self._guest_int3 = None
                self._disarm()
            self._parked.clear()
            self._skip.clear()
            self._detached = True
            _forget(self)

    def __repr__(self) -> str:
        return (f"<Debugger {self.target.name} {self.mechanism}: {len(self.breakpoints)} breakpoints"
                f"{', detached' if self._detached else ''}>")


_CONTINUE: Any = object()

# --- one debugger per machine -----------------------------------------------------------------------------------

_debuggers: weakref.WeakKeyDictionary[Any, Debugger] = weakref.WeakKeyDictionary()


def _key(obj: object) -> Any:
    machine = getattr(obj, "machine", None)
    return machine if machine is not None else obj


def _forget(dbg: Debugger) -> None:
    key = _key(dbg.target)
    if _debuggers.get(key) is dbg:
        del _debuggers[key]


def debugger(machine: Target | object, *, mechanism: str = "auto", symbols: SymbolTable | None = None,
             stub_gpa: int | None = None, stub_va: int | None = None) -> Debugger:
    """The machine's debugger, made on first use. A fork whose nearest ancestor with a debugger has breakpoints gets
    a copy of that ancestor's set (see the module docstring)."""
    if isinstance(machine, Debugger):
        return machine
    target = as_target(machine)
    key = _key(target)
    found = _debuggers.get(key)
    if found is not None:
        if symbols is not None:
            found.symbols = symbols
        return found
    parent_dbg = None
    ancestor = getattr(key, "parent", None)
    while ancestor is not None and parent_dbg is None:
        parent_dbg = _debuggers.get(ancestor)
        ancestor = getattr(ancestor, "parent", None)
    if parent_dbg is not None and mechanism == "auto":
        mechanism = parent_dbg.mechanism
    dbg = Debugger(target, mechanism=mechanism, symbols=symbols or (parent_dbg.symbols if parent_dbg else None),
                   stub_gpa=stub_gpa if stub_gpa is not None else (parent_dbg.stub_gpa if parent_dbg else STUB_GPA),
                   stub_va=stub_va if stub_va is not None else (parent_dbg._stub.va if parent_dbg and parent_dbg._stub
                                                                else None))
    if parent_dbg is not None:
        _inherit(dbg, parent_dbg)
    _debuggers[key] = dbg
    return dbg


def _inherit(child: Debugger, parent: Debugger) -> None:
    with parent._lock:
        for gpa, bp in parent.breakpoints.items():
            child.breakpoints[gpa] = Breakpoint(bp.address, bp.gpa, bp.original, bp.label, bp.callback, bp.owner)
        child._known = dict(parent._known)
        child._guest_int3 = parent._guest_int3
        child._skip = dict(parent._skip)
        child._parked = {v: _Parked(p.frame, p.address, p.reason, child.breakpoints.get(
            p.breakpoint.gpa) if p.breakpoint else None, p.reported) for v, p in parent._parked.items()}
        if parent._stub is not None:
            st = parent._stub
            child._stub = _Stub(st.gpa, st.va, st.handler, dict(st.gates))
            child._inherited_stub = child._stub
    child.sync()
