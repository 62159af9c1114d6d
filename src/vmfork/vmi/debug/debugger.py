"""Breakpoints and stepping on a machine, whatever its host's KVM can do: the one public `Debugger`.

    dbg = vmi.debugger(vm, symbols=vmi.load_symbols("guest.map"))
    bp = dbg.add_breakpoint("vmi_target", callback=lambda hit: print(hit.describe()))
    ev = dbg.run(timeout=10)          # StopEvent(reason="breakpoint", vcpu=0, detail="0x10a391 <vmi_target>")
    dbg.get_regs(0).rdi               # the interrupted code's registers
    dbg.step()                        # StopEvent(reason="step"): one instruction
    dbg.run()                         # continue (over the breakpoint) to the next stop
    dbg.detach()                      # every byte and gate back as it was

A callback that returns True lets the guest continue without stopping (a counting or logging breakpoint); any other
return value stops the machine, and the run returns a StopEvent with reason "breakpoint".

## Mechanisms (chosen from the host probes, `vmfork doctor`), one module each

"kvm" (kvm.py; hosts where KVM intercepts software breakpoints, `sw_breakpoints` works: VT-x/AMD-V): an `int3`
written at the address exits to vmfork (KVM_EXIT_DEBUG) in any guest mode, IDT or not; steps use KVM single-step.

"stub" (hosts whose KVM ignores software breakpoints, like kvm_pvm):
- guest user mode: the #BP vector is routed through a small kernel-mode stub in memory vmfork reserves (stub.py;
  the stub, its debug area and the IDT vmfork lends a guest that has no #BP gate: vmfork.workarounds.bp_stub);
- guest kernel mode: an `int3` there is an emulation failure on such hosts, and at one of vmfork's that stop is the
  breakpoint exit (kernel.py, vmfork.workarounds.cpl0_breakpoints); KVM single-step, which works there, steps.
Stepping (stepping.py) uses single-step where the host can in the vCPU's mode, else temporary breakpoints, through
the stub or the emulation-failure exit, installed for the step whether or not breakpoints exist. The guest's own #BP
handler never sees one of vmfork's int3s, and on every stop every byte is the guest's again.

`watch_guest_int3(hook)` shows the guest's own int3s (those at no breakpoint of vmfork's) to a hook first, which may
stop the machine right after the int3 instead of passing it to the guest's handler: how `vmfork fuzz --harness int3`
sees KF/x-style markers (int3 with a magic value in RAX) while every other int3 still reaches the guest's handler.

## Breakpoint sets, forks and resets

Breakpoint sets are per machine. The `int3` bytes, the patched IDT gate and the stub are guest memory, so a fork
inherits them: `debugger(fork)` of a fork whose ancestor has a debugger starts with a copy of the ancestor's set
(stopping where the ancestor would); a fork nobody attaches a debugger to passes through them (the stub's own
fallback). A parent with forks has read-only RAM, so its set cannot change while they live. Writes go through the
tracked path, so a fork's reset undoes them; `sync()` (called at every run, step and breakpoint change) puts every
byte, gate and the stub back as the debugger wants them.

Reads through the debugger (`read_phys`, `read_virt`, the GDB server) show the original bytes under breakpoints;
writes there change the saved original byte and keep the breakpoint. Its `get_sregs` shows the guest's own IDTR and
TR while the vCPU runs on lent ones.

Multi-vCPU machines: all vCPUs stop when one hits a breakpoint. While one vCPU steps over a breakpoint (a single
instruction), another vCPU executing that address is not stopped; one reaching another vCPU's temporary breakpoint
retries it until the step is done.
"""

from __future__ import annotations

import struct
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ...errors import MemoryAccessError
from ...kvm import constants as c
from ...kvm import structs as s
from ...workarounds.bp_stub import INT3, LENT_IDT, STUB_GPA, STUB_TABLE, STUB_TABLE_CAPACITY
from ..errors import BreakpointError, TranslationError
from ..memory import AddressSpace
from ..regs import cpu_mode
from ..symbols import SymbolTable
from ..target import Target, as_target
from .base import probe_status
from .kernel import KernelMixin
from .kvm import CONTINUE, KvmMixin
from .stepping import StepMixin
from .stub import StubMixin
from .values import Breakpoint, GuestInt3Hook, Hit, _Parked, _Step, _Stub, _Temp, copy_struct

if TYPE_CHECKING:
    from ...vm import StopEvent

__all__ = ["Debugger", "debugger"]


class Debugger(StubMixin, KernelMixin, StepMixin, KvmMixin):
    """Breakpoints and stepping on one machine, and a view of it (a `Target`) that shows the interrupted code's
    registers and the original bytes under breakpoints. Get one with `debugger(machine)`. `stub_gpa`: where the
    #BP stub's debug area goes (a page-aligned guest-physical address the guest does not use; by default vmfork's
    reserved 0xaf000), `stub_va` its virtual address if the guest's page tables do not identity-map it."""

    is_vmi_target = True

    def __init__(self, target: Target | object, *, mechanism: str = "auto", symbols: SymbolTable | None = None,
                 stub_gpa: int = STUB_GPA, stub_va: int | None = None) -> None:
        self.target: Target = as_target(target)
        self.symbols = symbols
        self.stub_gpa = self._valid_stub_gpa(stub_gpa)
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
        self._hooked: object | None = None
        self._settling = 0
        self._lent_selector = 0
        self._watch_kernel_only = False                  # see watch_guest_int3(kernel_only=)

    def _valid_stub_gpa(self, gpa: int) -> int:
        """A stub address is page-aligned guest RAM with room for the whole debug area (checked before any use; that
        the guest leaves it alone is checked when the stub is installed)."""
        from ...workarounds.bp_stub import LENT_AREA_SIZE
        if not isinstance(gpa, int) or gpa < 0 or gpa & 0xFFF:
            raise BreakpointError(f"the breakpoint stub's address {gpa!r} is not page-aligned")
        if not any(start <= gpa and gpa + LENT_AREA_SIZE <= start + size for start, size in self.target.ram_ranges()):
            raise BreakpointError(f"the breakpoint stub's area {gpa:#x}-{gpa + LENT_AREA_SIZE - 1:#x} is not guest RAM")
        return gpa

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
            user: bool | None = t.user
            if self.mechanism == "stub":
                sregs = self.target.get_sregs(vcpu)
                if not sregs.cr0 & 1:
                    raise BreakpointError(f"vCPU {vcpu} runs in real mode: vmfork's breakpoints cannot work there on "
                                          f"this host ({self._probe_reason('sw_breakpoints')})")
                if not space.mode.long and cpu_mode(sregs).cpl == 0:
                    # Not known yet: until the guest runs in long mode this int3 can only be hit in kernel mode (an
                    # exit, kernel.py); once it does, the page decides at the next resume (`_settle_modes`).
                    user = None
                if not user and not self._cpl0_int3_is_exit() and probe_status("int3_cpl0") != "works":
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
            bp = Breakpoint(address, t.paddr, original, label, callback, owner, user=user)
            self.breakpoints[t.paddr] = bp
            self._known[t.paddr] = original
            try:
                self._arm(user=bool(user))
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

    def watch_guest_int3(self, hook: GuestInt3Hook | None, *, kernel_only: bool = False) -> None:
        """See the guest's own int3s (those at no breakpoint of vmfork's) before its #BP handler does.

        `hook(vcpu, regs)` runs in the vCPU's exit with the interrupted code's registers (RIP right after the
        int3). Returning (reason, status) stops the machine there with StopEvent(reason, status) and consumes the
        int3: the guest's handler never sees it, and continuing resumes after it. Returning None passes it to the
        guest's handler as usual. The #BP route stays armed while a hook is set, breakpoints or not; forks'
        debuggers inherit it (e.g. a fuzzer's magic-value markers, vmfork.fuzz.harness). None removes it.

        `kernel_only`: the int3s to watch run in guest kernel mode (a KF/x harness in a kernel module). Where such
        int3s are exits of their own (the emulation failure on hosts that emulate kernel mode) the #BP stub is then
        not needed for them, which matters for guests that map the stub's page nowhere executable (Linux maps low
        memory non-executable): the guest's user-mode int3s go to its handler unseen."""
        with self._lock:
            self._require_paused("watch the int3s of")
            self._guest_int3 = hook
            self._watch_kernel_only = kernel_only
            if hook is not None:
                self._install_kernel_hooks()     # kernel-mode int3s reach vmfork as emulation failures on some hosts
            self.sync()

    def _needs_stub(self) -> bool:
        """The #BP stub is needed: an int3 of ours may be hit in guest user mode (or, on hosts where an int3 in
        kernel mode is no exit of its own, anywhere), a vCPU is parked in it, or the guest's int3s are watched."""
        if self._parked_in_stub():
            return True
        if self._guest_int3 is not None and not (self._watch_kernel_only and self._cpl0_int3_is_exit()):
            return True
        inserted = self._inserted()
        if not self._cpl0_int3_is_exit():
            return bool(inserted)
        self._settle_modes()
        for gpa in inserted:
            temp = self._temps.get(gpa)
            if temp.user if temp is not None else self.breakpoints[gpa].user:
                return True
        return False

    def _settle_modes(self) -> None:
        """Breakpoints set before the guest ran in long mode: once it does, their page tells whether user mode may
        run them (and so whether they need the #BP stub)."""
        unknown = [bp for bp in self.breakpoints.values() if bp.user is None]
        if not unknown or not self.target.get_sregs(0).efer & (1 << 10):
            return
        space = AddressSpace(self.target, 0)
        for bp in unknown:
            try:
                t = space.translate(bp.address)
            except TranslationError:
                continue
            if t.paddr == bp.gpa:
                bp.user = t.user

    def _arm(self, user: bool = True) -> None:
        """Make vmfork's int3s reach the debugger: KVM guest debugging ("kvm"), or the kernel-mode exit hooks and,
        if `user` (an int3 that may run in guest user mode), the #BP stub ("stub")."""
        if self.mechanism == "kvm":
            if not self._kvm_debug_on:
                for v in range(self.target.vcpu_count):
                    self.target.set_guest_debug(v, c.KVM_GUESTDBG_ENABLE | c.KVM_GUESTDBG_USE_SW_BP)
                self._kvm_debug_on = True
            return
        self._install_kernel_hooks()
        if not user and self._cpl0_int3_is_exit():
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
        self._unlend()
        # The stub's code stays (a vCPU may still be on its way out of it); an empty table disables its fallback.
        self.target.write_phys(stub.gpa + STUB_TABLE, bytes(16))
        self.target.set_debug_handler(None)
        self._stub = None

    def sync(self) -> None:
        """Make guest memory match the debugger: every int3 of ours in place (re-inserting what a reset took out),
        bytes of removed breakpoints back to their originals, and the stub, gates, lent IDTs and device (stub
        mechanism) there exactly while they are needed. Runs before every run and step."""
        with self._lock:
            if self._detached:
                return
            want = self._inserted()
            stub_needed = self.mechanism == "stub" and self._needs_stub()
            # a watcher needs the kernel-mode exit hooks even with no breakpoint and no stub (kernel_only)
            armed = bool(want) or stub_needed or (self.mechanism == "stub" and self._guest_int3 is not None)
            if armed:
                self._arm(user=stub_needed)
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
            if stub_needed:
                self._write_table()
            elif self._stub is not None or (self._kvm_debug_on and not armed):
                self._disarm()
            elif self.mechanism == "stub":
                self._clear_inherited_gates()

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
            own = self._own_view(vcpu, sregs)
            if not frame:
                return own
            space = AddressSpace(self.target, vcpu, sregs=sregs)
            return self._frame_view(self.target.get_regs(vcpu), own, space, frame)[1]  # type: ignore[no-any-return]

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
            new = copy_struct(regs)
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
            stub = self._stub
            lent = stub.lent.get(vcpu) if stub is not None else None
            if stub is not None and lent is not None:
                current = self.target.get_sregs(vcpu)
                if current.idt.base == stub.va + LENT_IDT and sregs.idt.base == lent.idt_base:
                    sregs = copy_struct(sregs)      # the guest's own IDTR (and TR) stay lent while vmfork needs them
                    sregs.idt.base, sregs.idt.limit = current.idt.base, current.idt.limit
                    if lent.tr_base is not None and sregs.tr.base == lent.tr_base:
                        sregs.tr.base, sregs.tr.limit = current.tr.base, current.tr.limit
            self.target.set_sregs(vcpu, sregs)

    def context(self, vcpu: int) -> tuple[s.Regs, s.Sregs]:
        return self.get_regs(vcpu), self.get_sregs(vcpu)

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
        self._begin_settle()

    def _next_unreported(self) -> StopEvent | None:
        for vcpu, parked in sorted(self._parked.items()):
            if not parked.reported and self._parked_frame(vcpu):
                parked.reported = True
                return self._event(parked.reason, vcpu, parked.address)
        return None

    def _finish_event(self, ev: StopEvent) -> StopEvent:
        """Turn the machine's stop into the debugger's: which vCPU stopped where; clean up interrupted steps."""
        with self._lock:
            self._descriptors.clear()
            self._end_settle()
            try:
                return self._classify(ev)
            finally:
                if self.target.state not in ("running", "destroyed"):
                    self._write_table()

    def _classify(self, ev: StopEvent) -> StopEvent:
        if True:
            if ev.reason == "debugger-error" and self.error is not None:
                from ...vm import StopEvent
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
            if ev is not CONTINUE:
                return ev
            with self._lock:
                self._kvm_prepare(None)
            self.target.start()

    def start(self) -> None:
        self.resume()

    def detach(self) -> None:
        """Remove every breakpoint and temporary breakpoint, give the #BP gate back to the guest, and forget this
        machine. A vCPU stopped at a breakpoint resumes at its instruction when the machine runs again."""
        with self._lock:
            if self._detached:
                return
            if self.target.state == "running" and not self._in_exit():
                raise BreakpointError(f"cannot detach from {self.target.name} while it runs: pause it first")
            if self.target.state != "destroyed":
                for vcpu in list(self._parked_in_stub()):
                    self._leave_stub(vcpu)
                for vcpu in list(self._steps):
                    self._finish_step(vcpu)
                for gpa, bp in list(self.breakpoints.items()):
                    self._poke(gpa, bp.original)
                self.breakpoints.clear()
                self._temps.clear()
                self._lifted.clear()
                self._guest_int3 = None
                self._disarm()
            self._remove_kernel_hooks()
            self._parked.clear()
            self._skip.clear()
            self._detached = True
            _forget(self)

    def __repr__(self) -> str:
        return (f"<Debugger {self.target.name} {self.mechanism}: {len(self.breakpoints)} breakpoints"
                f"{', detached' if self._detached else ''}>")



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
        if stub_gpa is not None and stub_gpa != found.stub_gpa:
            if found._stub is not None:
                raise BreakpointError(f"the debugger of {found.target.name} already has its stub at "
                                      f"{found.stub_gpa:#x}: detach it first")
            found.stub_gpa = found._valid_stub_gpa(stub_gpa)
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
            child.breakpoints[gpa] = Breakpoint(bp.address, bp.gpa, bp.original, bp.label, bp.callback, bp.owner,
                                                user=bp.user)
        child._known = dict(parent._known)
        child._guest_int3 = parent._guest_int3
        child._watch_kernel_only = parent._watch_kernel_only
        child._skip = dict(parent._skip)
        child._parked = {v: _Parked(p.frame, p.address, p.reason, child.breakpoints.get(
            p.breakpoint.gpa) if p.breakpoint else None, p.reported) for v, p in parent._parked.items()}
        if parent._stub is not None:
            st = parent._stub
            child._stub = _Stub(st.gpa, st.va, st.handler, dict(st.gates), dict(st.lent))
            child._lent_selector = parent._lent_selector
            child._inherited_stub = child._stub
    child.sync()

