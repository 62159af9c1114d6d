"""The ctypes structures and ioctl numbers must match the C headers of the kernel we run on."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from vmfork.kvm import constants as c
from vmfork.kvm import structs as s

STRUCTS = {
    "kvm_regs": s.Regs, "kvm_sregs": s.Sregs, "kvm_fpu": s.Fpu, "kvm_msr_entry": s.MsrEntry,
    "kvm_cpuid_entry2": s.CpuidEntry2, "kvm_vcpu_events": s.VcpuEvents, "kvm_lapic_state": s.LapicState,
    "kvm_mp_state": s.MpState, "kvm_debugregs": s.DebugRegs, "kvm_xcrs": s.Xcrs, "kvm_xsave": s.Xsave,
    "kvm_irqchip": s.IrqChip, "kvm_pit_state2": s.PitState2, "kvm_pit_config": s.PitConfig,
    "kvm_clock_data": s.ClockData, "kvm_userspace_memory_region": s.UserspaceMemoryRegion,
    "kvm_dirty_log": s.DirtyLog, "kvm_irq_level": s.IrqLevel, "kvm_guest_debug": s.GuestDebug,
    "kvm_enable_cap": s.EnableCap, "kvm_translation": s.Translation, "kvm_segment": s.Segment,
    "kvm_dtable": s.DTable, "kvm_sync_regs": s.SyncRegs, "kvm_dirty_gfn": s.DirtyGfn,
}
IOCTLS = [name for name in dir(c) if name.startswith("KVM_") and isinstance(getattr(c, name), int)
          and getattr(c, name) > 0xFFFF]
# Small values the filter above leaves out (ioctls without a structure, exit reasons, capabilities, flags).
CONSTANTS = ["KVM_RESET_DIRTY_RINGS", "KVM_EXIT_DIRTY_RING_FULL", "KVM_CAP_DIRTY_LOG_RING",
             "KVM_CAP_DIRTY_LOG_RING_ACQ_REL", "KVM_DIRTY_LOG_PAGE_OFFSET", "KVM_DIRTY_GFN_F_DIRTY",
             "KVM_DIRTY_GFN_F_RESET", "KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_MP_STATE_RUNNABLE", "KVM_CAP_SYNC_REGS"]
OFFSETS = {
    ("kvm_run", "exit_reason"): s.Run.exit_reason.offset,
    ("kvm_run", "kvm_valid_regs"): s.Run.kvm_valid_regs.offset,
    ("kvm_run", "s"): s.Run.s.offset,
    ("kvm_vcpu_events", "exception_payload"): s.VcpuEvents.exception_payload.offset,
    ("kvm_sregs", "apic_base"): s.Sregs.apic_base.offset,
    ("kvm_fpu", "mxcsr"): s.Fpu.mxcsr.offset,
}


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if shutil.which("gcc") is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("gcc or /usr/include/linux/kvm.h missing (the test setup installs gcc and linux-libc-dev)")
    d = tmp_path_factory.mktemp("abi")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for name in STRUCTS:
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
    for name in IOCTLS:
        lines.append(f"#ifdef {name}\n" f'printf("ioctl {name} %lu\\n", (unsigned long){name});\n#endif')
    for name in CONSTANTS:
        lines.append(f"#ifdef {name}\n" f'printf("const {name} %lu\\n", (unsigned long){name});\n#endif')
    for (st, field) in OFFSETS:
        lines.append(f'printf("offset {st}.{field} %zu\\n", offsetof(struct {st}, {field}));')
    lines.append("return 0; }")
    src = d / "abi.c"
    src.write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(d / "abi"), str(src)], check=True)
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        kind, name, value = line.split()
        values[f"{kind} {name}"] = int(value)
    return values


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_size_matches_c(c_values: dict[str, int], name: str) -> None:
    assert ctypes.sizeof(STRUCTS[name]) == c_values[f"sizeof {name}"]


@pytest.mark.parametrize("name", sorted(IOCTLS))
def test_ioctl_number_matches_c(c_values: dict[str, int], name: str) -> None:
    key = f"ioctl {name}"
    if key not in c_values:
        pytest.skip(f"{name} is not defined by this host's linux/kvm.h")
    assert getattr(c, name) == c_values[key]


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_matches_c(c_values: dict[str, int], name: str) -> None:
    key = f"const {name}"
    if key not in c_values:
        pytest.skip(f"{name} is not defined by this host's linux/kvm.h")
    assert getattr(c, name) == c_values[key]


@pytest.mark.parametrize("key", sorted(OFFSETS))
def test_field_offsets_match_c(c_values: dict[str, int], key: tuple[str, str]) -> None:
    assert OFFSETS[key] == c_values[f"offset {key[0]}.{key[1]}"]
