"""The XSAVE family in guest kernel mode: `xsave`, `xsaveopt`, `xsavec`, `xsaves`, `xrstor`, `xrstors` (and their
64-bit forms). The host's emulator cannot run them, and on kvm_pvm the guest reads CPUID natively, so XSAVE cannot be
hidden from it: Linux saves and restores every task's FPU state with them. vmfork completes each one against KVM's
copy of the vCPU's extended state (KVM_GET/SET_XSAVE, always in the standard format) and the guest's save area,
standard or compacted, as Intel SDM vol. 1, 13.7-13.12 describes: RFBM = (XCR0 | IA32_XSS for the supervisor
variants) & EDX:EAX; the legacy region's x87 and SSE parts, MXCSR, the components >= 2 at the offsets CPUID leaf 0xD
gives (in the compacted format one after another in XCOMP_BV's order, 64-byte aligned where ECX bit 1 says so), the
header's XSTATE_BV (and XCOMP_BV); a component whose XSTATE_BV bit is clear is restored to its initial state.
Supervisor components KVM does not hold (none here: IA32_XSS stays 0 where the host offers none) stop the machine
with the crash report instead. `xsaveopt` is completed as `xsave` (writing an unmodified component is allowed).
A save area the instruction may not access (Linux's signal delivery saves straight into the user stack, whose page
may be absent or copy-on-write) raises #PF with CR2 through the guest's IDT, as the CPU would: the kernel's
exception-table fixup faults the page in and tries again."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

from ..kvm import structs as s
from . import Workaround, register
from .guest_access import CheckedRange, GuestAccessError, PageFault, access
from .operands import decode_at, mem_address

if TYPE_CHECKING:
    from ..memory import GuestMemory
    from ..vcpu import Vcpu

__all__ = ["INFO", "XsaveFallback"]

INFO = register(Workaround(
    "xsave-cpl0", "xsave/xsaveopt/xsavec/xsaves/xrstor/xrstors in guest kernel mode: done against KVM's copy of the "
    "extended state", "doctor cpl0_instructions: xsave"))

SAVES = {"xsave", "xsave64", "xsaveopt", "xsaveopt64", "xsavec", "xsavec64", "xsaves", "xsaves64"}
RESTORES = {"xrstor", "xrstor64", "xrstors", "xrstors64"}
MSR_IA32_XSS = 0xDA0
HEADER = 512
COMPACTED = 1 << 63
# legacy region byte ranges: x87 (FCW..FDP, ST0-7), MXCSR + MXCSR_MASK, XMM0-15
X87 = ((0, 24), (32, 160))
MXCSR = (24, 32)
XMM = (160, 416)


class _Layout:
    """Each extended component's size, standard offset and 64-byte alignment (CPUID leaf 0xD)."""

    def __init__(self, cpuid: Any) -> None:
        self.size: dict[int, int] = {}
        self.offset: dict[int, int] = {}
        self.align: dict[int, bool] = {}
        for e in cpuid.entries[:cpuid.nent]:
            if e.function == 0xD and 2 <= e.index < 63 and e.eax:
                self.size[e.index], self.offset[e.index], self.align[e.index] = e.eax, e.ebx, bool(e.ecx & 2)

    def compacted(self, xcomp: int) -> dict[int, int] | None:
        out, off = {}, 576
        for i in range(2, 63):
            if xcomp >> i & 1:
                if i not in self.size:
                    return None
                if self.align[i]:
                    off = (off + 63) & ~63
                out[i] = off
                off += self.size[i]
        return out


class XsaveFallback:
    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self._layout: _Layout | None = None

    def _state(self, vcpu: Vcpu) -> tuple[int, int]:
        xcrs = s.Xcrs()
        vcpu.fd.get_xcrs(xcrs)
        xcr0 = next((int(x.value) for x in xcrs.xcrs[:xcrs.nr_xcrs] if x.xcr == 0), 3)
        m: Any = s.msrs_type(1)()
        m.nmsrs = 1
        m.entries[0].index = MSR_IA32_XSS
        xss = int(m.entries[0].data) if vcpu.fd.get_msrs(m) == 1 else 0
        return xcr0, xss

    def __call__(self, vcpu: Vcpu) -> bool:
        regs = vcpu.get_regs()
        try:
            d = decode_at(vcpu, self.memory, regs.rip)
            if d is None or (d.mnemonic not in SAVES and d.mnemonic not in RESTORES):
                return False
            sregs = vcpu.get_sregs()
            addr = mem_address(d.operands[0], regs, sregs, regs.rip + d.size)
            if addr & 63:
                return False                # #GP on the CPU; the crash report says where
            if self._layout is None:
                from ..arch.x86.cpu import host_cpuid
                self._layout = _Layout(host_cpuid(vcpu.kvm))
            xcr0, xss = self._state(vcpu)
            supervisor = d.mnemonic.startswith(("xsaves", "xrstors"))
            rfbm = (xcr0 | (xss if supervisor else 0)) & ((regs.rdx & 0xFFFFFFFF) << 32 | (regs.rax & 0xFFFFFFFF))
            try:
                area = access(vcpu, self.memory, addr, self._extent(rfbm), write=d.mnemonic in SAVES, sregs=sregs,
                              rflags=regs.rflags)
            except PageFault as pf:
                from .idt import deliver_page_fault
                deliver_page_fault(vcpu, self.memory, regs.rip, pf)
                return True
            kb: Any = vcpu._xsave_type()
            vcpu.fd.get_xsave(kb)
            state = bytearray(bytes(kb))
            if d.mnemonic in SAVES:
                done = self._save(area, rfbm, state, compacted=d.mnemonic.startswith(("xsavec", "xsaves")))
            else:
                done = self._restore(area, rfbm, state)
                if done:
                    ctypes.memmove(ctypes.addressof(kb), bytes(state), len(state))
                    vcpu.fd.set_xsave(kb)
        except GuestAccessError:
            return False
        if not done:
            return False
        regs.rip += d.size
        vcpu.set_regs(regs)
        return True

    def _extent(self, rfbm: int) -> int:
        """Bytes of the save area an instruction with this RFBM may touch: the legacy region and header, and the
        standard-format extent of the components asked for (the compacted format is never longer)."""
        layout = self._layout
        assert layout is not None
        return max([HEADER + 64] + [layout.offset[i] + layout.size[i] for i in layout.size if rfbm >> i & 1])

    def _save(self, area: CheckedRange, rfbm: int, state: bytearray, *, compacted: bool) -> bool:
        layout = self._layout
        assert layout is not None
        kvm_bv = int.from_bytes(state[HEADER:HEADER + 8], "little")
        if compacted:
            offsets = layout.compacted(rfbm)
            if offsets is None:
                return False
            header = (kvm_bv & rfbm).to_bytes(8, "little") + (rfbm | COMPACTED).to_bytes(8, "little")
        else:
            offsets = {i: layout.offset[i] for i in layout.offset}
            old_bv = int.from_bytes(area.read(HEADER, 8), "little")
            header = ((old_bv & ~rfbm) | (kvm_bv & rfbm)).to_bytes(8, "little")
        writes: list[tuple[int, bytes]] = []
        if rfbm & 1:
            writes += [(a, bytes(state[a:b])) for a, b in X87]
        if rfbm & 6:
            writes.append((MXCSR[0], bytes(state[MXCSR[0]:MXCSR[1]])))
        if rfbm & 2:
            writes.append((XMM[0], bytes(state[XMM[0]:XMM[1]])))
        for i in range(2, 63):
            if rfbm >> i & 1:
                if i not in layout.size or i not in offsets:
                    return False            # a component KVM does not hold (supervisor state)
                src = layout.offset[i]
                writes.append((offsets[i], bytes(state[src:src + layout.size[i]])))
        writes.append((HEADER, header))
        for off, data in writes:
            area.write(off, data)
        return True

    def _restore(self, area: CheckedRange, rfbm: int, state: bytearray) -> bool:
        layout = self._layout
        assert layout is not None
        hdr = area.read(HEADER, 16)
        bv, xcomp = int.from_bytes(hdr[:8], "little"), int.from_bytes(hdr[8:], "little")
        compacted = bool(xcomp & COMPACTED)
        if compacted:
            offsets = layout.compacted(xcomp & ~COMPACTED)
            if offsets is None:
                return False
        else:
            offsets = dict(layout.offset)
        legacy = area.read(0, 416)
        if rfbm & 1:
            for a, b in X87:
                state[a:b] = legacy[a:b] if bv & 1 else bytes(b - a)
            if not bv & 1:
                state[0:2] = (0x37F).to_bytes(2, "little")          # FCW's initial value
        if rfbm & 2:
            state[XMM[0]:XMM[1]] = legacy[XMM[0]:XMM[1]] if bv & 2 else bytes(XMM[1] - XMM[0])
        if rfbm & 6:
            if not compacted or bv & 6:
                state[24:28] = legacy[24:28]
            else:
                state[24:28] = (0x1F80).to_bytes(4, "little")
        for i in range(2, 63):
            if rfbm >> i & 1:
                if i not in layout.size:
                    return False
                dst, n = layout.offset[i], layout.size[i]
                if bv >> i & 1:
                    if i not in offsets:
                        return False
                    state[dst:dst + n] = area.read(offsets[i], n)
                else:
                    state[dst:dst + n] = bytes(n)
        kvm_bv = int.from_bytes(state[HEADER:HEADER + 8], "little")
        state[HEADER:HEADER + 8] = ((kvm_bv & ~rfbm) | (bv & rfbm)).to_bytes(8, "little")
        state[HEADER + 8:HEADER + 16] = bytes(8)        # KVM's copy is always in the standard format
        return True
