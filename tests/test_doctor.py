"""`vmfork doctor` and the flat long-mode environment, on the real /dev/kvm."""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import hostprobe
from vmfork import doctor
from vmfork.arch.x86 import flat
from vmfork.devices import ExitDevice
from vmfork.doctor import PROBES, HostReport, ProbeItem, probe_host, run_doctor
from vmfork.vm import Machine

SUPPORTED_STATUSES = {"works", "native", "measured", "exact"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point the doctor's cache file into a temporary directory for this module."""
    d = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(d))
        yield d


@pytest.fixture(scope="module")
def fresh(cache_dir: Path) -> HostReport:
    """One fresh (uncached) quick measurement for the whole module."""
    return probe_host(quick=True)


@pytest.fixture
def machine() -> Iterator[Machine]:
    m = Machine.create(memory_mib=8, vcpus=1, name="flat-test", with_devices=False)
    m.attach_devices([ExitDevice(m)])
    yield m
    m.destroy()


# --- the report ---------------------------------------------------------------------------------------------------

def test_report_has_every_probe_and_no_probe_failed(fresh: HostReport) -> None:
    assert fresh.names == tuple(PROBES)
    errors = {it.name: it.detail for it in fresh.items if it.status == "error"}
    assert not errors
    for it in fresh.items:
        assert it.detail, it.name
        assert it.supported == (it.status in SUPPORTED_STATUSES), it


def test_values_are_plausible(fresh: HostReport) -> None:
    cpl3 = fresh.item("cpl3_speed")
    assert cpl3.supported and cpl3.unit == "Minstr/s" and cpl3.value is not None and cpl3.value > 200
    cpl0 = fresh.item("cpl0_speed")
    assert cpl0.value is not None and 0 < cpl0.value < 100_000
    assert cpl0.supported == (cpl0.value < doctor.NATIVE_CPL0_NS)
    # host-kvm.md: the x2APIC timer interrupts CPL3 code and the EOI by wrmsr works on this host
    timer = fresh.item("lapic_timer")
    assert timer.supported and timer.value is not None and timer.value > 1, timer.detail
    exits = fresh.item("exit_cost")
    assert exits.value is not None and 1 < exits.value < 5000
    assert fresh.supports("int3_cpl3"), fresh.reason("int3_cpl3")
    assert fresh.supports("dirty_logging"), fresh.reason("dirty_logging")
    assert fresh.quick and fresh.duration < 10


def test_reason_names_the_measurement(fresh: HostReport) -> None:
    reason = fresh.reason("cpl0_speed")
    assert reason.startswith("host KVM: guest kernel mode (CPL0) ")
    assert "vmfork doctor" in reason and "cpl0_speed" in reason
    assert "\n" not in reason
    with pytest.raises(KeyError, match="no probe named"):
        fresh.supports("warp_drive")


def test_json_output_parses(fresh: HostReport, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_doctor(json=True, quick=True, cached=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data["items"]) == list(PROBES)
    assert data["items"]["cpl3_speed"]["status"] == fresh.item("cpl3_speed").status
    assert HostReport.from_dict(data) == fresh


def test_table_output_lists_every_probe(fresh: HostReport, capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor.main(["--quick", "--cached"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("vmfork doctor: kernel ")
    for it in fresh.items:
        assert any(line.startswith(f"{it.name} ") and f" {it.status} " in line for line in lines), it.name


def test_cache_file(fresh: HostReport, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = cache_dir / "vmfork" / "doctor.json"
    assert doctor.cache_path() == path
    stored = json.loads(path.read_text())
    assert stored["key"]["kernel"] == os.uname().release
    monkeypatch.setattr(doctor, "_process_cache", {})
    assert probe_host(quick=True, cached=True) == fresh                 # from the file, not measured again
    assert doctor._load_cached(quick=False) is None                     # a quick report does not answer a full one
    stale = dict(stored, report=dict(stored["report"], created=time.time() - 2 * doctor.CACHE_TTL))
    path.write_text(json.dumps(stale))
    assert doctor._load_cached(quick=True) is None
    path.write_text(json.dumps(dict(stored, key=dict(stored["key"], kernel="other"))))
    assert doctor._load_cached(quick=True) is None
    path.write_text(json.dumps(stored))


def test_one_failing_probe_does_not_stop_the_report(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    def boom(quick: bool) -> ProbeItem:
        raise RuntimeError("probe exploded")

    def hangs(quick: bool) -> ProbeItem:
        return doctor._binary_probe("hangs", "a guest spinning in `jmp $`", b"\xeb\xfe", timeout=0.2, cpl=3)

    monkeypatch.setattr(doctor, "PROBES", {"boom": ("raises", boom), "hangs": ("spins", hangs),
                                           "int3_cpl3": PROBES["int3_cpl3"]})
    monkeypatch.setattr(doctor, "_process_cache", {})
    monkeypatch.setattr(doctor, "_store_cached", lambda report: None)
    r = probe_host(quick=True)
    assert r.names == ("boom", "hangs", "int3_cpl3")
    assert r.item("boom").status == "error" and "probe exploded" in r.item("boom").detail
    assert r.item("hangs").status == "hangs" and not r.supports("hangs")
    assert r.item("int3_cpl3").status != "error"


# --- the flat environment -----------------------------------------------------------------------------------------

def test_flat_cpl3_code_stops_with_its_status(machine: Machine) -> None:
    layout = flat.setup_long_mode(machine, code=flat.exit_with(0x5A), cpl=3)
    ev = machine.run(timeout=2)
    assert (ev.reason, ev.status) == ("exit", 0x5A), ev
    sregs = machine.vcpus[0].get_sregs()
    assert sregs.cs.selector == flat.USER_CS and sregs.cs.dpl == 3 and sregs.efer & flat.EFER_LMA
    assert layout.entry <= machine.vcpus[0].get_regs().rip < layout.code_end


def test_flat_cpl0_code_stops_with_its_status(machine: Machine) -> None:
    flat.setup_long_mode(machine, code=flat.exit_with(0x33), cpl=0)
    ev = machine.run(timeout=2)
    assert (ev.reason, ev.status) == ("exit", 0x33), ev
    assert machine.vcpus[0].get_sregs().cs.selector == flat.KERNEL_CS


def test_flat_code_runs_again_after_reset_regs(machine: Machine) -> None:
    layout = flat.setup_long_mode(machine, code=doctor.COUNT_LOOP, cpl=3)
    for n in (1, 1000):
        flat.reset_regs(machine, layout)
        regs = machine.vcpus[0].get_regs()
        regs.rcx = n
        machine.vcpus[0].set_regs(regs)
        ev = machine.run(timeout=2)
        assert (ev.reason, ev.status) == ("exit", doctor.OK), ev
        assert machine.vcpus[0].get_regs().rcx == 0


def test_flat_ud2_in_cpl3_reaches_its_handler(machine: Machine) -> None:
    hostprobe.require("exceptions_cpl3")
    flat.setup_long_mode(machine, code=b"\x0f\x0b" + flat.exit_with(doctor.NOT_REACHED), cpl=3,   # ud2
                         handlers={6: doctor.kernel_handler(0x66)})
    ev = machine.run(timeout=2)
    assert (ev.reason, ev.status) == ("exit", 0x66), ev


def test_flat_default_handler_reports_vector_and_frame(machine: Machine) -> None:
    hostprobe.require("exceptions_cpl3")
    layout = flat.setup_long_mode(machine, code=b"\x90\x0f\x0b", cpl=3)      # nop; ud2
    ev = machine.run(timeout=2)
    assert (ev.reason, ev.status) == ("exit", 0xE6), ev
    regs = machine.vcpus[0].get_regs()
    assert regs.rdi == 6
    rip, cs, _rflags, rsp, ss = struct.unpack("<5Q", machine.memory.read(regs.rsp, 40))
    assert (rip, cs, rsp, ss) == (layout.entry + 1, flat.USER_CS, layout.user_stack_top, flat.USER_DS)


def test_flat_int3_in_cpl3_enters_kernel_mode(machine: Machine) -> None:
    hostprobe.require("int3_cpl3")
    flat.setup_long_mode(machine, code=b"\xcc" + flat.exit_with(doctor.NOT_REACHED), cpl=3,      # int3
                         handlers={3: doctor.kernel_handler(0x44)})
    ev = machine.run(timeout=2)
    assert (ev.reason, ev.status) == ("exit", 0x44), ev


def test_flat_layout_checks_its_inputs(machine: Machine) -> None:
    with pytest.raises(ValueError):
        flat.setup_long_mode(machine, code=b"", cpl=1)
    with pytest.raises(ValueError):
        flat.exit_with(0x100)
    assert flat.trap_status(14) == 0xEE and flat.trap_status(0x20) == flat.UNEXPECTED_VECTOR_STATUS
    gdt = flat.gdt_bytes()
    assert len(gdt) == flat.GDT_LIMIT + 1 and gdt[:8] == bytes(8)
    pml4, pdpt, pd = flat.page_table_bytes()
    assert struct.unpack_from("<Q", pml4)[0] == flat.PDPT_ADDR | 0x27 and struct.unpack_from("<Q", pdpt)[0] == (
        flat.PD_ADDR | 0x27)                                                # P RW US A
    assert struct.unpack_from("<Q", pd, 8 * 3)[0] == (3 << 21) | 0xA7    # P RW US A PS, dirty clear
