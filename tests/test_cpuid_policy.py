"""CPUID policies (xl.cfg `cpuid=`, VM.create(cpuid=...)): parsing, what a guest sees, the default policy from the
CPL0 instruction probe, forks, and save files that carry the policy."""

from __future__ import annotations

import ctypes
import json
import struct
from pathlib import Path

import pytest

from guest import boot, console, run_to_exit, run_to_ready
from vmfork.arch.x86 import cpu, cpuid_policy, emulator_probe, flat
from vmfork.arch.x86.cpuid_policy import CpuidPolicy
from vmfork.config import parse_config
from vmfork.errors import ConfigError, SnapshotHostError, VmStateError
from vmfork.fork import VM
from vmfork.snapshot import restore, save
from vmfork.snapshot.container import ContainerWriter, SectionSpec
from vmfork.vm import Machine, open_kvm

CX16 = cpuid_policy.feature("cx16")          # CPUID.1:ECX bit 13, offered by KVM on most hosts


# --- the syntax ---------------------------------------------------------------------------------------------------

def test_libxl_syntax_and_canonical_text() -> None:
    p = CpuidPolicy.parse("host,popcnt=0, sse4_1=0,cx16=0,tsc-deadline=k,xsave=0")
    assert str(p) == "host,cmpxchg16=0,sse4.1=0,popcnt=0,xsave=0"      # libxl names, table order
    assert CpuidPolicy.parse(str(p)) == p
    assert CpuidPolicy.parse("popcnt=0").base == "host"                  # xl: no base word means host
    assert CpuidPolicy.parse("default,popcnt=1").base == "default"
    assert CpuidPolicy.parse("HOST,Sse4.2=0") == CpuidPolicy.parse("host,sse4_2=0")
    # hiding xsave hides what needs it, as a CPU would
    assert {"xsave", "avx", "avx2", "avx512f", "xsaveopt", "fma"} <= CpuidPolicy.parse("host,xsave=0").hidden


@pytest.mark.parametrize("text, message", [
    ("host,popcount=0", r"unknown CPU feature 'popcount' \(did you mean 'popcnt'\?\)"),
    ("host,frobnicate=0", r"unknown CPU feature 'frobnicate'$"),
    ("host,popcnt", r"'popcnt' needs a value"),
    ("host,popcnt=2", r"the value must be 0 \(hide\) or 1 \(show\)"),
    ("popcnt=0,host", r"the base 'host' must be the first word"),
    ("host,,popcnt=0", r"empty item"),
])
def test_bad_policies_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CpuidPolicy.parse(text)


def test_config_key_errors_name_the_feature_and_the_line() -> None:
    cfg = parse_config('name = "a"\nkernel = "k"\ncpuid = "host,popcnt=0"\n', path="/x/a.cfg")
    assert cfg.cpuid == "host,popcnt=0"
    assert parse_config('name = "a"\nkernel = "k"\n').cpuid is None
    with pytest.raises(ConfigError) as e:
        parse_config('name = "a"\nkernel = "k"\n\ncpuid = "host,popcnt=0,frob=0"\n', path="/x/a.cfg")
    assert str(e.value) == "/x/a.cfg:4: cpuid: unknown CPU feature 'frob'"


# --- applying it --------------------------------------------------------------------------------------------------

# mov eax, 1; cpuid; mov eax, ecx; shr eax, 13; and al, 1; out 0xf4, al; jmp $   (the guest reports CPUID.1:ECX[13])
READ_CX16 = (b"\xb8\x01\x00\x00\x00\x0f\xa2\x89\xc8\xc1\xe8\x0d\x24\x01" + flat.exit_with(0)[2:])


def _guest_sees_cx16(policy: str | None) -> int:
    m = Machine.create(memory_mib=8, name="cpuid", with_devices=False, cpuid=policy)
    try:
        from vmfork.devices import ExitDevice
        m.attach_devices([ExitDevice(m)])
        flat.setup_long_mode(m, code=READ_CX16, cpl=3)
        ev = m.run(timeout=5)
        assert ev.reason == "exit", ev
        assert ev.status is not None
        return ev.status
    finally:
        m.destroy()


def _host_has_cx16() -> bool:
    host = cpu.host_cpuid(open_kvm())
    return any(e.function == 1 and e.ecx >> 13 & 1 for e in host.entries[:host.nent])  # type: ignore[attr-defined]


def test_a_guest_sees_what_the_policy_shows() -> None:
    if not _host_has_cx16():
        pytest.skip("this host's KVM does not offer cmpxchg16b, so no policy can show it")
    assert _guest_sees_cx16("host") == 1
    assert _guest_sees_cx16("host,cx16=0") == 0
    with pytest.raises(ConfigError, match="this host's KVM does not offer"):
        absent = next(f.name for f in cpuid_policy.FEATURES if f.leaf == 7 and f.reg == "ebx"
                      and not any(e.function == 7 and e.index == 0 and e.ebx >> f.bit & 1
                                  for e in cpu.host_cpuid(open_kvm()).entries[:cpu.host_cpuid(open_kvm()).nent]))  # type: ignore[attr-defined]
        Machine.create(memory_mib=8, cpuid=f"host,{absent}=1")


def test_hiding_xsave_keeps_vcpu_state_consistent() -> None:
    """With XSAVE hidden (leaf 0xD gone), KVM keeps XCR0 at x87: capture, fork and reset still round-trip."""
    vm = VM.create(memory_mib=16, name="noxsave", cpuid="host,xsave=0")
    try:
        st = vm.capture()
        assert st.vcpus[0].xcrs.xcrs[0].value & ~1 == 0 if st.vcpus[0].xcrs.nr_xcrs else True
        child = vm.fork()
        assert child.shape.cpuid == vm.shape.cpuid == "host,xsave=0"
        child.reset()
        child.destroy()
    finally:
        vm.destroy(tree=True)


# --- the default policy -------------------------------------------------------------------------------------------

def test_default_policy_hides_what_the_emulator_cannot_run() -> None:
    kvm = open_kvm()
    report = emulator_probe.report(kvm)
    policy = report.default_policy()
    assert policy.base == "host"
    for r in report.results:
        fam = next(f for f in emulator_probe.FAMILIES if f.name == r.name)
        if r.status == emulator_probe.WORKS:
            assert not set(fam.features) & policy.hidden, r
        elif r.fails:      # hidden, or reported as a feature this host shows whatever the policy says
            assert set(fam.features) <= policy.hidden | set(report.leaks), r
    for name in report.leaks:
        assert name in report.stuck and name not in policy.hidden
    vm = VM.create(memory_mib=8, name="dflt", with_devices=False)
    try:
        assert vm.shape.cpuid == str(policy)
    finally:
        vm.destroy()
    # the probe result is cached per host and kernel: a second report is the same object, no probing
    assert emulator_probe.report(kvm) is report
    stored = json.loads(emulator_probe.cache_path().read_text())
    assert stored["key"] == emulator_probe.cache_key()


def test_default_policy_on_this_host_keeps_cmpxchg16b_away_from_the_guest() -> None:
    report = emulator_probe.report(open_kvm())
    if report.result("cmpxchg16b").status != emulator_probe.EMULATION_FAILURE:
        pytest.skip(f"this host runs lock cmpxchg16b in guest kernel mode ({report.result('cmpxchg16b').detail})")
    assert "cmpxchg16" in report.default_policy().hidden
    assert _guest_sees_cx16(None) == 0
    assert "cmpxchg16" in emulator_probe.describe_default(open_kvm())


# --- the TSC-deadline timer ------------------------------------------------------------------------------------------

def _needs_tsc_deadline() -> ctypes.Structure:
    host = cpu.vcpu_cpuid(open_kvm(), 0)
    for name in ("tsc-deadline", "x2apic"):
        if not emulator_probe._host_has(host, name):
            pytest.skip(f"this host's KVM does not offer {name}")
    return host


def test_a_tsc_deadline_interrupt_arrives_at_its_deadline_in_a_tiny_guest() -> None:
    """The probe's guest: x2APIC timer in TSC-deadline mode, armed a few ms ahead, halted; the handler records the
    TSC it came at. On this host (kvm_pvm) it arrives, after the deadline: the default policy hides tsc-deadline
    for the emulated tick, not for a missing interrupt (see emulator_probe)."""
    host = _needs_tsc_deadline()
    code, handler = emulator_probe.tsc_deadline_guest()
    data = bytearray(16)
    status, detail = emulator_probe.run_cpl0(open_kvm(), code, cpuid=host, lapic=True,
                                             handlers={emulator_probe.TIMER_VECTOR: handler}, out=data)
    assert status == emulator_probe.WORKS, detail
    deadline, arrived = struct.unpack("<QQ", data)
    assert deadline and arrived >= deadline, (deadline, arrived)


def test_the_tsc_deadline_guest_can_fail() -> None:
    """With tsc-deadline hidden from its CPUID table, KVM does not arm the timer: the guest sees #GP at the deadline
    MSR, or (kvm_pvm) no interrupt at all, which the probe reports as "no-interrupt"."""
    _needs_tsc_deadline()
    hidden = cpu.vcpu_cpuid(open_kvm(), 0, policy="host,tsc-deadline=0")
    code, handler = emulator_probe.tsc_deadline_guest()
    status, detail = emulator_probe.run_cpl0(open_kvm(), code, cpuid=hidden, lapic=True,
                                             handlers={emulator_probe.TIMER_VECTOR: handler})
    assert status in ("#GP", emulator_probe.HANGS), detail


def test_the_default_policy_hides_tsc_deadline_where_the_probe_says_so() -> None:
    kvm = open_kvm()
    report = emulator_probe.report(kvm)
    r = report.result(emulator_probe.TIMER)
    policy = report.default_policy()
    if r.status == emulator_probe.ABSENT:
        pytest.skip(r.detail)
    if r.status == emulator_probe.WORKS:
        assert "tsc-deadline" not in policy.hidden
        return
    assert "tsc-deadline" in policy.hidden, (r, policy)
    assert "TSC-deadline timer" in emulator_probe.describe_default(kvm)
    from vmfork.doctor import probe_tsc_deadline
    item = probe_tsc_deadline(True)
    assert not item.supported and "hides tsc-deadline" in item.detail and item.status == r.status
    if r.status == emulator_probe.EMULATED_TICK:       # the measured reason: emulated kernel mode, in ns/instruction
        assert emulator_probe.cpl0_ns_per_instruction(kvm, cpu.vcpu_cpuid(kvm, 0)) >= emulator_probe.EMULATED_NS
    # with the default policy's table KVM does not arm the timer (the table is what KVM goes by, even on kvm_pvm)
    code, handler = emulator_probe.tsc_deadline_guest()
    status, _ = emulator_probe.run_cpl0(kvm, code, cpuid=cpu.vcpu_cpuid(kvm, 0, policy=policy), lapic=True,
                                        handlers={emulator_probe.TIMER_VECTOR: handler}, timeout=0.5)
    assert status in ("#GP", emulator_probe.HANGS)
    vm = VM.create(memory_mib=8, name="tscd", with_devices=False)
    try:
        assert "tsc-deadline=0" in vm.shape.cpuid
    finally:
        vm.destroy()


# --- save files -----------------------------------------------------------------------------------------------------

@pytest.fixture
def saved(pvh_guest: Path, tmp_path: Path, machines: list) -> tuple[Path, str]:  # type: ignore[type-arg]
    vm = boot(pvh_guest, "det 12", machines)
    run_to_ready(vm)
    path = tmp_path / "det.vmfork"
    save(vm, path)
    before = console(vm)
    run_to_exit(vm)
    return path, console(vm)[len(before):]


def _rewrite_header(src: Path, dst: Path, change) -> None:  # type: ignore[no-untyped-def]
    from test_snapshot import sections_of
    hdr, data = sections_of(src)
    change(hdr)
    specs = [SectionSpec(n, len(b), 4096 if n == "ram" else 8) for n, b in data.items()]
    with ContainerWriter(dst, b"VMFKSAVE", "vmfork-save", hdr, specs) as w:
        for n, b in data.items():
            w.write(n, b)
        w.commit()


def test_save_files_carry_the_policy(saved, machines) -> None:  # type: ignore[no-untyped-def]
    path, expected = saved
    from vmfork.snapshot import info
    header = info(path)
    default = str(emulator_probe.default_policy(open_kvm()))
    assert header["cpuid"] == {"policy": default, "default": True}
    vm = restore(path)
    machines.append(vm)
    assert vm.shape.cpuid == default
    run_to_exit(vm)
    assert console(vm) == expected


def test_restore_refuses_a_policy_that_takes_a_feature_away(saved, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path, _ = saved
    given = restore(path)
    try:
        shown = cpu.vcpu_cpuid(open_kvm(), 0, policy=given.shape.cpuid)
    finally:
        given.destroy()
    sse2 = cpuid_policy.feature("sse2")
    assert any(e.function == 1 and e.edx >> sse2.bit & 1 for e in shown.entries[:shown.nent])  # type: ignore[attr-defined]
    with pytest.raises(SnapshotHostError, match=r"hides sse2 \(CPUID.1.0:EDX bit 26\).*saved machine was given"):
        restore(path, cpuid="host,sse2=0")


def test_restore_refuses_a_host_whose_default_policy_would_hide_a_given_feature(saved, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path, _ = saved
    hidden = emulator_probe.default_policy(open_kvm()).hidden
    if "cmpxchg16" not in hidden or not _host_has_cx16():
        pytest.skip("this host's default policy does not hide cmpxchg16b")

    def from_a_host_that_runs_cx16(h: dict) -> None:  # type: ignore[type-arg]
        h["cpu"]["features"]["1.0.ecx"] |= 1 << CX16.bit           # saved where the default showed it

    other = tmp_path / "other-host.vmfork"
    _rewrite_header(path, other, from_a_host_that_runs_cx16)
    with pytest.raises(SnapshotHostError, match=r"default CPUID policy hides cx16 \(CPUID.1.0:ECX bit 13\)"):
        restore(other)
    vm = restore(other, cpuid="host")            # asked for explicitly: given
    try:
        assert vm.shape.cpuid == "host"
    finally:
        vm.destroy()


def test_a_state_for_another_policy_is_refused() -> None:
    a = VM.create(memory_mib=8, name="a", with_devices=False, cpuid="host")
    b = VM.create(memory_mib=8, name="b", with_devices=False, cpuid="host,sse4.1=0")
    try:
        with pytest.raises(VmStateError, match="shown the CPU"):
            b.restore(a.capture())
    finally:
        a.destroy()
        b.destroy()


def test_doctor_reports_the_cpl0_instructions_and_the_default_policy() -> None:
    from vmfork.doctor import probe_cpl0_instructions, probe_cpuid_default
    item = probe_cpl0_instructions(True)
    report = emulator_probe.report(open_kvm())
    assert item.supported == (not report.failing)
    for r in report.failing:
        assert r.name in item.detail
    policy = probe_cpuid_default(True)
    assert str(report.default_policy()) in policy.detail


# --- domains ------------------------------------------------------------------------------------------------------

def test_domains_take_the_policy_from_the_config_and_list_shows_it(tmp_path: Path, pvh_guest: Path) -> None:
    from cli_harness import CliHarness
    with CliHarness(tmp_path, pvh_guest) as ts:
        plain = ts.create(ts.config("plain", "demo"))
        own = ts.create(ts.config("own", "demo", cpuid="host,sse4_1=0,cx16=0"))
        ts.wait_state(plain, "paused")
        ts.wait_state(own, "paused")
        fork = int(ts.ok("fork-vm", "-p", "own").strip())
        entries = {e["name"]: e for e in ts.list_json()}
        assert entries["plain"]["cpuid"] == str(emulator_probe.default_policy(open_kvm()))
        forked = next(e for e in entries.values() if e["domid"] == fork)
        assert entries["own"]["cpuid"] == forked["cpuid"] == "host,cmpxchg16=0,sse4.1=0"
        bad = ts.config("bad", "demo", cpuid="host,cx17=0")
        msg = ts.fail("create", str(bad), match="cx17")
        assert f"{bad}:5: cpuid: unknown CPU feature 'cx17'" in msg
        ts.ok("destroy", "--force", "own")
        ts.ok("destroy", "plain")


def test_process_forks_keep_the_policy(pvh_guest: Path, machines: list) -> None:  # type: ignore[type-arg]
    parent = VM.create(memory_mib=64, name="pf", cpuid="host,sse4.2=0,cx16=0")
    machines.append(parent)
    parent.load_kernel(pvh_guest, cmdline="det 12")
    run_to_ready(parent)
    child = parent.fork(isolation="process")
    try:
        assert child.shape.cpuid == parent.shape.cpuid == "host,cmpxchg16=0,sse4.2=0"
        ev = child.run(timeout=30)
        assert ev.reason == "exit", ev
    finally:
        child.destroy()


def test_vmfork_run_says_once_what_the_policy_hides(pvh_guest: Path, tmp_path: Path) -> None:
    import subprocess
    import sys
    cfg = tmp_path / "r.cfg"
    cfg.write_text(f'name = "r"\nmemory = 64\nkernel = "{pvh_guest}"\ncmdline = "hello"\ncpuid = "host,cx16=0"\n')
    vmfork = Path(sys.executable).with_name("vmfork")
    r = subprocess.run([str(vmfork), "run", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmfork: CPUID policy"), lines   # one line, not one per boot
    assert "cmpxchg16" in lines[0] or not _host_has_cx16()


def test_restore_names_the_state_that_shows_a_hidden_feature_in_use(tmp_path: Path, machines: list) -> None:  # type: ignore[type-arg]
    """A guest running with a feature switched on in CR4 (OSXSAVE, else UMIP: whichever this host's KVM offers),
    saved, then restored under a policy hiding that feature: refused, naming it and the evidence."""
    kvm = open_kvm()
    host = cpu.host_cpuid(kvm)
    if emulator_probe._host_has(host, "xsave"):
        feat, cr4_bit, shown = "xsave", 18, r"xsave \(CPUID.1.0:ECX bit 26\), in use: CR4.OSXSAVE set on vCPU 0"
    elif emulator_probe._host_has(host, "umip"):
        feat, cr4_bit, shown = "umip", 11, r"umip \(CPUID.7.0:ECX bit 2\), in use: CR4.UMIP set on vCPU 0"
    else:
        pytest.skip("this host's KVM offers neither XSAVE nor UMIP in its CPUID table")
    vm = VM.create(memory_mib=8, name="inuse", cpuid="host", with_devices=False)
    machines.append(vm)
    flat.setup_long_mode(vm, code=flat.exit_with(0), cpl=0)
    sregs = vm.vcpus[0].get_sregs()
    sregs.cr4 |= 1 << cr4_bit
    vm.vcpus[0].set_sregs(sregs)
    path = tmp_path / "inuse.vmfork"
    save(vm, path)
    with pytest.raises(SnapshotHostError, match=shown):
        restore(path, cpuid=f"host,{feat}=0")
    again = restore(path)               # under its own policy it comes back, CR4 and all
    machines.append(again)
    assert again.vcpus[0].get_sregs().cr4 >> cr4_bit & 1
