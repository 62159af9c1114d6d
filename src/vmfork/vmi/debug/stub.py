"""The #BP stub mechanism of the debugger (hosts whose KVM ignores software breakpoints; the stub itself, its
reserved debug area and the lent IDT are described in vmfork.workarounds.bp_stub).

This part installs the stub and its gates (the guest's own #BP gate, or an IDT lent to a vCPU that has none),
answers the stub's question in the vCPU's exit (`_on_port`), parks a stopped vCPU in the stub, and shows the
interrupted code's registers from the interrupt frame.
"""

from __future__ import annotations

import struct

from ...errors import MemoryAccessError, VmforkError
from ...kvm import structs as s
from ...workarounds.bp_stub import (
    ANSWER_ABSENT,
    ANSWER_PASS,
    ANSWER_RESUME,
    INT3,
    LENT_AREA_SIZE,
    LENT_IDT,
    LENT_STACK_TOP,
    LENT_TSS,
    LENT_TSS_MAX,
    STUB_AFTER_IN,
    STUB_CODE,
    STUB_NO_HANDLER,
    STUB_ORIG,
    STUB_TABLE,
    idt_gate,
)
from ...workarounds.lent_idt import (
    TSS_MIN,
    give_back,
    is_lent,
    kernel_code_selector,
    lend,
    lent_idt,
    lent_tss,
    own_view,
)
from ..errors import BreakpointError, TranslationError
from ..memory import AddressSpace, find_virtual
from ..regs import cpu_mode
from .base import DebuggerBase
from .values import Breakpoint, Hit, _Parked, _Stub, copy_struct

__all__ = ["StubMixin"]

EFER_LMA = 1 << 10
GATE_3 = 3 * 16


class StubMixin(DebuggerBase):
    """The #BP stub: installing it, answering it, and the view of a vCPU parked in it."""

    # --- installing: the stub, the gates, the lent IDT ------------------------------------------------------------

    def _install_stub(self) -> None:
        """Find the stub's virtual address and check that the guest leaves its page alone (once per arming)."""
        gpa = self.stub_gpa
        if gpa & 0xFFF:
            raise BreakpointError(f"the breakpoint stub's address {gpa:#x} is not page-aligned")
        if not any(start <= gpa and gpa + LENT_AREA_SIZE <= start + size for start, size in self.target.ram_ranges()):
            raise BreakpointError(f"the breakpoint stub's area {gpa:#x}-{gpa + LENT_AREA_SIZE - 1:#x} is not guest RAM")
        page = self.target.read_phys(gpa, 0x1000)
        if page[:len(STUB_CODE)] != STUB_CODE and any(page[:STUB_TABLE]):
            raise BreakpointError(
                f"the guest uses the memory at {gpa:#x} where vmfork puts its breakpoint stub (it is not free: "
                "vmfork's memory map reserves 0xa0000-0xbffff for it); pass a free, reserved address (stub_gpa=, "
                "--stub-addr)")
        va = self.stub_va
        if va is None:
            for v in range(self.target.vcpu_count):
                sregs = self.target.get_sregs(v)
                if sregs.efer & EFER_LMA:
                    found = find_virtual(AddressSpace(self.target, v, sregs=sregs), gpa, supervisor_exec=True)
                    break
            else:
                raise BreakpointError(self._not_long_mode(0))
            if not found:
                raise BreakpointError(
                    f"the guest's page tables map the breakpoint stub's page ({gpa:#x}) nowhere that kernel "
                    "code can execute: pass stub_gpa= and stub_va= of a page it does, or use a host where KVM "
                    f"intercepts breakpoints ({self._probe_reason('sw_breakpoints')})")
            va = found[0]
        self._stub = _Stub(gpa, va, 0)

    def _not_long_mode(self, vcpu: int) -> str:
        mode = cpu_mode(self.target.get_sregs(vcpu))
        return (f"vCPU {vcpu} runs in {mode.name}: vmfork's breakpoints in guest user mode need a 64-bit guest on "
                f"this host (its KVM ignores software breakpoints: {self._probe_reason('sw_breakpoints')})")

    @staticmethod
    def _gate_target(gate: bytes) -> int:
        low, _sel, _ist, _attr, mid, high = struct.unpack_from("<HHBBHI", gate)
        return low | mid << 16 | high << 32

    def _sync_stub(self) -> None:
        """Stub code, its handler slot, the gates (or lent IDTs) and the debug port as they should be (a reset, a new
        IDT or a newly attached device model may have changed any of them)."""
        stub = self._stub
        assert stub is not None
        t = self.target
        if t.read_phys(stub.gpa, len(STUB_CODE)) != STUB_CODE:
            t.write_phys(stub.gpa, STUB_CODE)
        handlers: set[int] = set()
        done: set[int] = set()
        for v in range(t.vcpu_count):
            sregs = t.get_sregs(v)
            if not sregs.efer & EFER_LMA:
                if v > 0:
                    continue        # an AP the guest has not started yet (its IDT is checked once it has one)
                raise BreakpointError(self._not_long_mode(v))
            lent = stub.lent.get(v)
            if lent is not None:
                if is_lent(sregs, stub.va):
                    self._write_lent_gate(sregs)    # a reset to a state before the lending took the gate back
                    continue
                del stub.lent[v]                    # the guest loaded an IDT of its own meanwhile
            gate_gpa, gate = self._own_gate(v, sregs)
            if gate_gpa is None or gate is None or not gate[5] & 0x80:
                self._lend(v, sregs)
                continue
            if gate_gpa in done:
                continue
            done.add(gate_gpa)
            current = self._gate_target(gate)
            if current != stub.va:
                handlers.add(current)
                stub.gates[gate_gpa] = gate
                patched = bytearray(gate)
                struct.pack_into("<H", patched, 0, stub.va & 0xFFFF)
                struct.pack_into("<H", patched, 6, (stub.va >> 16) & 0xFFFF)
                struct.pack_into("<I", patched, 8, stub.va >> 32)
                t.write_phys(gate_gpa, bytes(patched))
            elif gate_gpa in stub.gates:
                handlers.add(self._gate_target(stub.gates[gate_gpa]))
        if len(handlers) > 1:
            raise BreakpointError("the vCPUs have different #BP handlers; the stub supports one")
        if handlers:
            stub.handler = handlers.pop()
        elif not stub.handler or stub.handler == stub.va + STUB_NO_HANDLER:
            stub.handler = stub.va + STUB_NO_HANDLER    # nobody's: the guest's own int3 shuts it down as before
        want = stub.handler.to_bytes(8, "little")
        if t.read_phys(stub.gpa + STUB_ORIG, 8) != want:
            t.write_phys(stub.gpa + STUB_ORIG, want)
        t.set_debug_handler(self._on_port)

    def _own_gate(self, vcpu: int, sregs: s.Sregs) -> tuple[int | None, bytes | None]:
        """The guest-physical address and bytes of the vCPU's own #BP gate (None, None: no IDT that has one)."""
        if sregs.idt.limit < GATE_3 + 15:
            return None, None
        try:
            gpa = AddressSpace(self.target, vcpu, sregs=sregs).translate(sregs.idt.base + GATE_3).paddr
        except TranslationError:
            return None, None
        return gpa, self.target.read_phys(gpa, 16)

    def _area(self, offset: int, *, writable: bool = False) -> int:
        """The virtual address of `offset` in the debug area, checked against the page tables."""
        stub = self._stub
        assert stub is not None
        va = stub.va + offset
        try:
            t = AddressSpace(self.target, 0).translate(va)
        except TranslationError as e:
            raise BreakpointError(f"vmfork's debug area is not mapped at {va:#x} (after the stub at {stub.va:#x}): "
                                  f"{e}") from None
        if t.paddr != stub.gpa + offset or (writable and not t.writable):
            raise BreakpointError(f"the guest maps {va:#x} to {t.paddr:#x}, not to vmfork's debug area at "
                                  f"{stub.gpa + offset:#x}{' (or read-only)' if writable else ''}")
        return va

    def _kernel_code_selector(self, vcpu: int, sregs: s.Sregs, space: AddressSpace) -> int:
        if sregs.cs.l and cpu_mode(sregs).cpl == 0:
            return int(sregs.cs.selector)
        try:
            gdt = space.read(sregs.gdt.base, min(sregs.gdt.limit + 1, 0x400))
        except VmforkError:
            gdt = b""
        found = kernel_code_selector(gdt)
        if found is None:
            raise BreakpointError(f"vCPU {vcpu}'s GDT has no 64-bit kernel code segment for the #BP gate vmfork "
                                  "lends")
        return found

    def _write_lent_gate(self, sregs: s.Sregs) -> None:
        stub = self._stub
        assert stub is not None
        gate = idt_gate(stub.va, self._lent_selector)
        if self.target.read_phys(stub.gpa + LENT_IDT + GATE_3, 16) != gate:
            self.target.write_phys(stub.gpa + LENT_IDT + GATE_3, gate)

    def _lend(self, vcpu: int, sregs: s.Sregs) -> None:
        """Point the vCPU at an IDT of vmfork's (a copy of its own gates, #BP at the stub) and, if its TSS gives no
        kernel stack, at a TSS of vmfork's with one. The guest's IDTR and TR are kept for the view and given back
        in `_unlend`."""
        stub = self._stub
        assert stub is not None
        t = self.target
        space = AddressSpace(t, vcpu, sregs=sregs)
        idt_va = self._area(LENT_IDT)
        tss_va = self._area(LENT_TSS, writable=True)
        stack_top = self._area(LENT_STACK_TOP - 0x1000, writable=True) + 0x1000
        for off in range(0x1000, LENT_AREA_SIZE, 0x1000):
            self._area(off)
        if not stub.lent:
            used = t.read_phys(stub.gpa + 0x1000, LENT_AREA_SIZE - 0x1000)
            ours = self._gate_target(used[GATE_3:GATE_3 + 16]) == stub.va
            if any(used) and not ours:
                raise BreakpointError(
                    f"the guest uses the memory at {stub.gpa + 0x1000:#x}-{stub.gpa + LENT_AREA_SIZE - 1:#x} where "
                    "vmfork lends an IDT to a guest without a #BP gate (vmfork's memory map reserves 0xa0000-0xbffff "
                    "for it); pass a free, reserved address (stub_gpa=, --stub-addr)")
        self._lent_selector = self._kernel_code_selector(vcpu, sregs, space)
        own = b""
        if sregs.idt.limit:
            try:
                own = space.read(sregs.idt.base, min(sregs.idt.limit + 1, 0x1000))
            except VmforkError:
                own = b""
        t.write_phys(stub.gpa + LENT_IDT, lent_idt(own, stub.va, self._lent_selector))
        tss: bytes | None = None
        if not self._kernel_stack_ok(space, sregs):
            own = b""
            if sregs.tr.limit >= TSS_MIN - 1:
                try:
                    own = space.read(sregs.tr.base, min(sregs.tr.limit + 1, LENT_TSS_MAX))
                except VmforkError:
                    own = b""
            tss = lent_tss(own, stack_top)
            t.write_phys(stub.gpa + LENT_TSS, tss)
        new = copy_struct(sregs)
        stub.lent[vcpu] = lend(sregs, new, stub.va, tss)
        assert new.idt.base == idt_va and (tss is None or new.tr.base == tss_va)
        if not stub.handler:
            stub.handler = stub.va + STUB_NO_HANDLER
        t.set_sregs(vcpu, new)

    @staticmethod
    def _kernel_stack_ok(space: AddressSpace, sregs: s.Sregs) -> bool:
        """The guest's TSS gives a kernel stack (RSP0) that #BP from user mode can use."""
        if sregs.tr.limit < 0x67 or not sregs.tr.present:
            return False
        try:
            rsp0 = struct.unpack("<Q", space.read(sregs.tr.base + 4, 8))[0]
            return rsp0 != 0 and space.translate(rsp0 - 8).writable
        except VmforkError:
            return False

    def _unlend(self) -> None:
        """Give every vCPU its own IDTR (and TR) back."""
        stub = self._stub
        if stub is None:
            return
        for vcpu, lent in list(stub.lent.items()):
            sregs = self.target.get_sregs(vcpu)
            if is_lent(sregs, stub.va):
                give_back(sregs, lent, stub.va)
                self.target.set_sregs(vcpu, sregs)
        stub.lent.clear()

    def _own_view(self, vcpu: int, sregs: s.Sregs) -> s.Sregs:
        """The vCPU's system registers as the guest set them (its own IDTR and TR while it runs on lent ones)."""
        stub = self._stub
        lent = stub.lent.get(vcpu) if stub is not None else None
        if lent is None or stub is None or not is_lent(sregs, stub.va):
            return sregs
        view = copy_struct(sregs)
        own_view(view, lent, stub.va)
        return view  # type: ignore[no-any-return]

    def _write_table(self) -> None:
        if self._stub is None:
            return
        rows = b"".join(struct.pack("<QB7x", addr, orig) for addr, orig in self._inserted().values())
        data = rows + bytes(16)
        if self.target.read_phys(self._stub.gpa + STUB_TABLE, len(data)) != data:
            self.target.write_phys(self._stub.gpa + STUB_TABLE, data)

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
        hit = Hit(vcpu, bp.address, "breakpoint", bp, ctx_regs, ctx_sregs, self._as_debugger())
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
        r = copy_struct(regs)
        r.rax, r.rip, r.rflags, r.rsp = rax, rip, rflags, rsp
        sr = copy_struct(sregs)
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

    def _leave_stub(self, vcpu: int) -> None:
        """Do what the rest of the stub would (`pop rax; iretq`) for a vCPU parked in it, so that it stands at the
        interrupted instruction with the interrupted code's registers (a detach leaves nothing of vmfork's behind)."""
        frame = self._parked_frame(vcpu)
        if not frame:
            return
        regs, sregs = self.target.get_regs(vcpu), self.target.get_sregs(vcpu)
        space = AddressSpace(self.target, vcpu, sregs=sregs)
        ctx_regs, ctx_sregs = self._frame_view(regs, sregs, space, frame)
        new = copy_struct(sregs)
        new.cs, new.ss = ctx_sregs.cs, ctx_sregs.ss
        self.target.set_regs(vcpu, ctx_regs)
        self.target.set_sregs(vcpu, new)
        del self._parked[vcpu]

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
