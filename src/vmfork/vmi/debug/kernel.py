"""Breakpoints and stepping in guest kernel mode on hosts that emulate it (kvm_pvm): vmfork's `int3` in CPL0 stops
the VM with an emulation failure at its address, and that stop is the breakpoint exit (the recognition itself is the
host workaround vmfork.workarounds.cpl0_breakpoints; the guest's own int3s go on to the int3-cpl0 workaround); KVM
single-step, which such hosts run in kernel mode, steps there (claimed as owner "debugger" in `vcpu.debug`).

Breakpoints set before the guest runs in 64-bit mode (at a Multiboot or PVH entry, say) cannot yet tell whether
user mode will run them, and on such hosts user mode reaches them only through the #BP stub, which needs the guest's
final IDT and page tables. So the debugger single-steps the guest's kernel mode from there ("settling", at most
SETTLE_LIMIT instructions, one exit each) until it is in 64-bit mode and about to enter user mode (an `iretq`,
`sysretq`), and arms the stub right then.

Both hooks sit first in the machine's `exit_hooks` while the debugger is attached. A vCPU stopped at such a
breakpoint is stopped *at* the address (nothing of the guest's changed), as under KVM's own guest debugging.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...kvm import constants as c
from ...workarounds.bp_stub import INT3
from ...workarounds.cpl0_breakpoints import HOOK_NAME, cpl0_int3_hook
from ..errors import TranslationError
from ..memory import AddressSpace
from .base import DebuggerBase
from .stepping import _leaves_kernel
from .values import Hit, _Parked, _Step

if TYPE_CHECKING:
    from ...vcpu import Vcpu

__all__ = ["OWNER", "STEP_HOOK_NAME", "KernelMixin"]

OWNER = "debugger"                  # the debugger's name in vcpu.debug (KVM_SET_GUEST_DEBUG claims)
STEP_HOOK_NAME = "debugger-single-step"
SETTLE_LIMIT = 200_000
EFER_LMA = 1 << 10


class KernelMixin(DebuggerBase):
    """Kernel-mode breakpoints through the emulation-failure exit, and KVM single-step in kernel mode."""

    def _machine(self) -> Any:
        return getattr(self.target, "machine", None)

    def _install_kernel_hooks(self) -> None:
        """Put the debugger's exit hooks first on its machine (once; forks get their own debugger's)."""
        machine = self._machine()
        if machine is None or self._hooked is machine or not hasattr(machine, "exit_hooks"):
            return

        def read_byte(vcpu: int, address: int) -> int | None:
            try:
                gpa = AddressSpace(self.target, vcpu).resolve(address)[0]
                return self.target.read_phys(gpa, 1)[0]
            except Exception:
                return None

        def on_int3(vcpu: int, rip: int) -> bool:
            return self._in_exit_of(vcpu, lambda: self._on_kernel_int3(vcpu, rip))

        for v in getattr(machine, "vcpus", ()):
            if v.index not in self._steps:
                v.debug.release(OWNER)          # a claim a previous user of a recycled (pooled) vCPU left
        machine.exit_hooks.add("emulation_failure", HOOK_NAME, cpl0_int3_hook(read_byte, on_int3), first=True)
        machine.exit_hooks.add("debug", STEP_HOOK_NAME, self._on_debug_exit, first=True)
        self._hooked = machine

    def _remove_kernel_hooks(self) -> None:
        machine = self._hooked
        if machine is not None:
            machine.exit_hooks.remove(HOOK_NAME)        # type: ignore[attr-defined]
            machine.exit_hooks.remove(STEP_HOOK_NAME)   # type: ignore[attr-defined]
            for vcpu in getattr(machine, "vcpus", ()):
                vcpu.debug.release(OWNER)
        self._hooked = None

    def _in_exit_of(self, vcpu: int, fn: Any) -> bool:
        """Run `fn` as the vCPU's exit handler (registers writable), stopping the machine if it fails."""
        local = getattr(self.target, "_exit", None)
        if local is not None:
            local.vcpu = vcpu
        try:
            with self._lock:
                return bool(fn())
        except BaseException as e:
            self.error = e
            self.target.request_stop("debugger-error", vcpu)
            return True
        finally:
            if local is not None:
                local.vcpu = None

    def _on_kernel_int3(self, vcpu: int, rip: int) -> bool:
        """An int3 in kernel mode stopped vCPU `vcpu` at `rip`: one of ours (True: handled) or the guest's (False)."""
        space = AddressSpace(self.target, vcpu)
        try:
            gpa = space.resolve(rip)[0]
        except TranslationError:
            return False
        step = self._steps.get(vcpu)
        if step is not None and rip in step.targets:
            self._finish_step(vcpu)
            if step.kind == "step":
                self._park(vcpu, _Parked(0, rip, "step", None))
                self.target.request_stop("step", vcpu)
            return True
        if gpa in self._temps:
            return True             # another vCPU's step: retry until it is done
        bp = self.breakpoints.get(gpa)
        if bp is None or gpa in self._lifted or bp.original == INT3:
            return self._watched_guest_int3(vcpu)       # the guest's own: a watcher may take it
        regs, sregs = self.target.get_regs(vcpu), self.target.get_sregs(vcpu)
        bp.hits += 1
        hit = Hit(vcpu, bp.address, "breakpoint", bp, regs, sregs, self._as_debugger())
        self.last_hit = hit
        callback = bp.callback or self.on_hit
        if callback is not None and callback(hit) is True:
            regs = self.target.get_regs(vcpu)
            if regs.rip == rip:
                self._begin_step(vcpu, "over", rip)
            return True
        self._park(vcpu, _Parked(0, rip, "breakpoint", bp))
        self.target.request_stop("breakpoint", vcpu)
        return True

    def _watched_guest_int3(self, vcpu: int) -> bool:
        """The guest's own kernel-mode int3 (at an emulation failure): shown to `watch_guest_int3`'s hook with RIP
        right after it, as the #BP route shows it. A stop consumes the int3 (True); otherwise the guest gets it
        (False: the next emulation-failure hook delivers it as #BP)."""
        if self._guest_int3 is None:
            return False
        after = self.target.get_regs(vcpu)
        after.rip += 1
        stop = self._guest_int3(vcpu, after)
        if stop is None:
            return False
        self.target.set_regs(vcpu, after)
        self.target.request_stop(stop[0], stop[1])
        return True

    # --- KVM single-step in kernel mode ---------------------------------------------------------------------------

    def _begin_single_step(self, vcpu: int, kind: str, rip: int, space: AddressSpace) -> None:
        origin_gpa = space.resolve(rip)[0]
        lifted = origin_gpa if origin_gpa in self.breakpoints else None
        self._install_kernel_hooks()
        self.target.set_guest_debug(vcpu, c.KVM_GUESTDBG_ENABLE | c.KVM_GUESTDBG_SINGLESTEP)
        if lifted is not None:
            self._lifted.setdefault(lifted, set()).add(vcpu)
            self._poke(lifted, self.breakpoints[lifted].original)
        self._steps[vcpu] = _Step(kind, rip, lifted, [], set(), single=True)
        self._skip.pop(vcpu, None)
        if not self._in_exit():
            self._write_table()

    def _end_single_step(self, vcpu: int) -> None:
        self.target.set_guest_debug(vcpu, 0)

    # --- settling: breakpoints set before 64-bit mode --------------------------------------------------------------

    def _begin_settle(self) -> None:
        if self._settling or 0 in self._steps or not any(bp.user is None for bp in self.breakpoints.values()):
            return
        if not self._kernel_single_step() or not self._cpl0_int3_is_exit():
            return
        sregs = self.target.get_sregs(0)
        if sregs.cr0 & 1 and sregs.cs.dpl != 0:
            return
        self._install_kernel_hooks()
        self._settling = SETTLE_LIMIT
        self.target.set_guest_debug(0, c.KVM_GUESTDBG_ENABLE | c.KVM_GUESTDBG_SINGLESTEP)

    def _end_settle(self) -> None:
        if self._settling:
            self._settling = 0
            if 0 not in self._steps:
                self.target.set_guest_debug(0, 0)

    def _settle_step(self) -> bool:
        self._settling -= 1
        sregs = self.target.get_sregs(0)
        done = self._settling <= 0
        if sregs.efer & EFER_LMA and sregs.cs.l:
            self._settle_modes()
            if not any(bp.user is None or bp.user for bp in self.breakpoints.values()):
                self._end_settle()  # kernel-only breakpoints (e.g. Linux's text): nothing for user mode to wait for
                return True
            rip = self.target.get_regs(0).rip
            try:
                code = AddressSpace(self.target, 0, sregs=sregs).read(rip, 16)
            except Exception:
                code = b""
            done = done or _leaves_kernel(code, 64)
        if done:
            self._end_settle()
            self.sync()             # the modes settle, the stub is armed with the IDT the guest uses from now on
        return True

    def _on_debug_exit(self, vcpu: Vcpu) -> bool:
        if self._settling and vcpu.index == 0 and 0 not in self._steps:
            return self._in_exit_of(0, self._settle_step)
        step = self._steps.get(vcpu.index)
        if step is None or not step.single:
            return False
        if vcpu.run.exit.debug.dr6 & 0xF and not vcpu.run.exit.debug.dr6 & 0x4000:
            return False            # a hardware breakpoint of another owner, not our step

        def finish() -> bool:
            self._finish_step(vcpu.index)
            if step.kind == "step":
                rip = self.target.get_regs(vcpu.index).rip
                self._park(vcpu.index, _Parked(0, rip, "step", None))
                self.target.request_stop("step", vcpu.index)
            return True

        return self._in_exit_of(vcpu.index, finish)
