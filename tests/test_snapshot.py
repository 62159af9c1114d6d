"""Save files and device-state files: round trips on real /dev/kvm with the test guests, zero pages left out, the
saved machine left alone, atomic writes, and every kind of damaged, foreign or incompatible file refused with a
message naming what is wrong and without leaving a machine behind."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from guest import boot, console, field, run_to_exit, run_to_ready
from vmfork.devices import DeviceSetState
from vmfork.errors import DeviceStateError, SnapshotFormatError, SnapshotHostError, VmforkError, VmStateError
from vmfork.fork import VM, _pools
from vmfork.snapshot import (
    compact,
    container,
    cpufeatures,
    info,
    load_device_state,
    restore,
    save,
    save_device_state,
    savefile,
    write_device_state,
)
from vmfork.snapshot.container import ContainerFile, ContainerWriter, SectionSpec
from vmfork.vcpu import VcpuState
from vmfork.vm import open_kvm

MIB = 1 << 20
SCRATCH = 64 << 20


# --- helpers ----------------------------------------------------------------------------------------------------

def ram_digest(vm: VM) -> str:
    return hashlib.sha256(vm.memory.pages.tobytes()).hexdigest()


def open_fds() -> int:
    """Open file descriptors of this process, once the fork shell pools have stopped refilling."""
    deadline = time.monotonic() + 10
    for pool in _pools.values():
        while pool._thread is not None and pool.ready() < pool.target and time.monotonic() < deadline:
            time.sleep(0.01)
    return len(os.listdir("/proc/self/fd"))


def sections_of(path: Path) -> tuple[dict, dict[str, bytes]]:  # type: ignore[type-arg]
    """A container's header (without format and section table) and every section's bytes."""
    magic = path.read_bytes()[:8]
    fmt = "vmfork-save" if magic == b"VMFKSAVE" else "vmfork-device-state"
    with ContainerFile.open(path, magic, fmt) as f:
        header = {k: v for k, v in f.header.items() if k not in ("format", "sections")}
        return header, {name: f.read(name) for name in f.sections}


def rewrite(src: Path, dst: Path, *, header: Callable[[dict], None] | None = None,  # type: ignore[type-arg]
            sections: dict[str, bytes] | None = None) -> None:
    """Copy a save file, changing its header or sections, with valid checksums (a well-formed file that lies)."""
    hdr, data = sections_of(src)
    if header is not None:
        header(hdr)
    data.update(sections or {})
    specs = [SectionSpec(n, len(b), 4096 if n == "ram" else 8) for n, b in data.items()]
    with ContainerWriter(dst, b"VMFKSAVE", "vmfork-save", hdr, specs) as w:
        for n, b in data.items():
            w.write(n, b)
        w.commit()


@pytest.fixture(scope="module")
def saved_det(pvh_guest: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A save file of the `det 12` guest at its ready marker, and what the guest prints after it."""
    path = tmp_path_factory.mktemp("saved") / "det.vmfork"
    made: list[VM] = []
    vm = boot(pvh_guest, "det 12", made, memory_mib=64)
    try:
        run_to_ready(vm)
        save(vm, path)
        before = console(vm)
        run_to_exit(vm)
        yield path, console(vm)[len(before):]
    finally:
        vm.destroy(tree=True)


def expect_refusal(path: Path, match: str, error: type[Exception] = SnapshotFormatError) -> str:
    """restore(path) fails with `error` matching `match`, and leaves no machine (no file descriptor) behind."""
    open_kvm()
    before = open_fds()
    with pytest.raises(error, match=match) as exc:
        restore(path)
    assert open_fds() == before, "a failed restore left file descriptors (a half-built machine) behind"
    return str(exc.value)


# --- round trips --------------------------------------------------------------------------------------------------

def test_restored_machine_continues_exactly_like_the_saved_one(pvh_guest, machines, tmp_path) -> None:
    parent = boot(pvh_guest, "det 30", machines, memory_mib=64)
    addr, _ = run_to_ready(parent)
    parent.memory.write(addr, struct.pack("<Q", 0x1234_5678_9ABC))     # det's seed
    regs, digest = bytes(parent.vcpus[0].get_regs()), ram_digest(parent)
    result = save(parent, tmp_path / "det.vmfork")
    # The saved machine is unaffected: still paused, same registers, same RAM.
    assert parent.state == "paused"
    assert bytes(parent.vcpus[0].get_regs()) == regs and ram_digest(parent) == digest
    assert result.file_size == (tmp_path / "det.vmfork").stat().st_size

    copy = restore(tmp_path / "det.vmfork", name="copy")
    machines.append(copy)
    assert copy.name == "copy" and copy.state == "paused"
    assert bytes(copy.vcpus[0].get_regs()) == regs
    assert np.array_equal(copy.memory.pages, parent.memory.pages)

    before = console(parent)
    run_to_exit(parent)
    expected = console(parent)[len(before):]
    run_to_exit(copy)
    assert expected.count("det ") == 30
    assert console(copy) == expected


def test_restore_started_and_forks_of_a_restored_machine(saved_det, machines) -> None:
    path, expected = saved_det
    vm = restore(path, paused=False)
    machines.append(vm)
    ev = vm.wait(30)
    assert ev.reason == "exit" and ev.status == 0
    assert console(vm) == expected
    # A restored machine is a root like any other: it can be forked.
    again = restore(path)
    machines.append(again)
    child = again.fork()
    run_to_exit(child)
    assert console(child) == expected


def test_zero_pages_are_not_stored(pvh_guest, machines, tmp_path) -> None:
    vm = boot(pvh_guest, "demo", machines, memory_mib=256)
    run_to_ready(vm)
    result = save(vm, tmp_path / "demo.vmfork")
    assert result.ram_pages == 65536
    assert 0 < result.stored_pages < 256
    assert result.file_size < 2 * MIB, f"a 256 MiB guest that uses a few pages gave a {result.file_size}-byte file"
    hdr = info(tmp_path / "demo.vmfork")
    assert hdr["memory"]["stored_pages"] == result.stored_pages
    assert hdr["machine"] == {"name": "test", "memory_mib": 256, "vcpus": 1, "block_interrupts": False,
                              "devices": ["serial0", "i8042", "rtc", "exit", "harness", "env"]}
    # Every non-zero page is there and nothing else: the restored RAM equals the saved one.
    bits = compact.nonzero_pages(vm.memory)
    assert int(bits.sum()) == result.stored_pages
    copy = restore(tmp_path / "demo.vmfork")
    machines.append(copy)
    assert np.array_equal(copy.memory.pages, vm.memory.pages)


def test_saving_a_running_machine_pauses_it_and_resumes_it(pvh_guest, machines, tmp_path) -> None:
    vm = boot(pvh_guest, "timer 300", machines, memory_mib=64)
    vm.start()
    time.sleep(0.05)
    save(vm, tmp_path / "timer.vmfork")
    assert vm.state == "running", "save must resume a machine it paused"
    ev = vm.wait(30)
    assert ev.reason == "exit" and ev.status == 0
    copy = restore(tmp_path / "timer.vmfork")
    machines.append(copy)
    ev = copy.run(timeout=30)
    assert ev.reason == "exit" and ev.status == 0
    assert int(field(console(copy), "ticks")) > 0       # the timer kept ticking across the save


def test_forks_and_forks_of_forks_save_their_own_memory(pvh_guest, machines, tmp_path) -> None:
    root = boot(pvh_guest, "loop", machines, memory_mib=128)
    addr, _ = run_to_ready(root)
    child = root.fork()
    child.memory.write(addr, struct.pack("<QQ", 40, 0xAB00))
    assert child.run(timeout=20).reason == "harness-end"
    grandchild = child.fork()
    grandchild.memory.write(SCRATCH + 4096 * 100, b"grandchild")
    for vm, name in ((child, "child"), (grandchild, "grandchild")):
        save(vm, tmp_path / f"{name}.vmfork")
        copy = restore(tmp_path / f"{name}.vmfork")
        machines.append(copy)
        assert np.array_equal(copy.memory.pages, vm.memory.pages), name
        assert bytes(copy.vcpus[0].get_regs()) == bytes(vm.vcpus[0].get_regs())
    assert root.state == child.state == "paused"


def test_destroyed_and_crashed_machines_are_not_saved(pvh_guest, machines, tmp_path) -> None:
    vm = boot(pvh_guest, "fault", machines, memory_mib=64)
    assert vm.run(timeout=30).crashed
    with pytest.raises(VmStateError, match="crashed"):
        save(vm, tmp_path / "x")
    vm.destroy()
    with pytest.raises(VmStateError, match="destroyed"):
        save(vm, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


# --- atomic writes ------------------------------------------------------------------------------------------------

def test_a_failed_save_leaves_no_file_and_keeps_the_old_one(pvh_guest, machines, tmp_path, monkeypatch) -> None:
    vm = boot(pvh_guest, "det 3", machines, memory_mib=64)
    run_to_ready(vm)
    target = tmp_path / "vm.vmfork"
    real = compact.write_ram

    def disk_full(w, mem, bits):  # type: ignore[no-untyped-def]
        some = bits.copy()
        some[np.flatnonzero(bits)[3:]] = False
        real(w, mem, some)                              # a few pages reach the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compact, "write_ram", disk_full)
    with pytest.raises(OSError, match="No space"):
        save(vm, target)
    assert list(tmp_path.iterdir()) == [], "an interrupted save left a file behind"

    target.write_bytes(b"the previous save")
    with pytest.raises(OSError, match="No space"):
        save(vm, target)
    assert target.read_bytes() == b"the previous save"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.vmfork"]
    assert vm.state == "paused"

    # A real write failure halfway (disk full inside the container writer) is reported as a VmforkError.
    monkeypatch.setattr(compact, "write_ram", real)
    real_write_all = container._write_all
    written = [0]

    def fills_up(fd: int, data) -> None:  # type: ignore[no-untyped-def]
        written[0] += len(memoryview(data))
        if written[0] > 30_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write_all(fd, data)

    monkeypatch.setattr(container, "_write_all", fills_up)
    with pytest.raises(VmforkError, match=f"cannot write save file {target}: No space left on device"):
        save(vm, target)
    assert target.read_bytes() == b"the previous save"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.vmfork"]

    monkeypatch.setattr(container, "_write_all", real_write_all)
    save(vm, target)
    assert info(target)["machine"]["name"] == "test"


def test_an_unfinished_file_is_never_taken_for_a_save_file(tmp_path) -> None:
    """What a killed save leaves (its temporary file) has no magic: it is refused, not half-restored."""
    w = ContainerWriter(tmp_path / "x.vmfork", b"VMFKSAVE", "vmfork-save", {}, [SectionSpec("machine", 4)])
    w.write("machine", b"abcd")
    assert list(tmp_path.iterdir()) == []           # unnamed (O_TMPFILE) until complete: a kill leaves nothing
    (tmp_path / "copy").write_bytes(Path(f"/proc/self/fd/{w._fd}").read_bytes())
    w.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]
    expect_refusal(tmp_path / "copy", "not a vmfork save file")


# --- damaged, foreign and incompatible files ----------------------------------------------------------------------

def test_truncated_files_are_refused(saved_det, tmp_path) -> None:
    path, _ = saved_det
    data = path.read_bytes()
    with ContainerFile.open(path, b"VMFKSAVE", "vmfork-save") as f:
        sections = dict(f.sections)
        header_end = container.PREAMBLE_SIZE + struct.unpack_from("<I", data, 16)[0]
    cases = {0: "empty", 5: "truncated", 20: "truncated in the preamble", 40: "truncated in the header",
             header_end - 1: "truncated in the header",
             sections["machine"].offset + 100: "truncated.*section 'machine'",
             sections["ram-map"].offset + 1: "truncated.*section 'ram-map'",
             sections["ram"].offset + 5000: "truncated.*section 'ram'",
             len(data) - 1: "truncated.*section 'ram'"}
    for cut, match in cases.items():
        p = tmp_path / f"cut-{cut}"
        p.write_bytes(data[:cut])
        expect_refusal(p, match)


def test_a_flipped_byte_anywhere_is_refused_naming_the_part(saved_det, tmp_path) -> None:
    path, _ = saved_det
    data = path.read_bytes()
    with ContainerFile.open(path, b"VMFKSAVE", "vmfork-save") as f:
        sections = dict(f.sections)
    cases = {0: "not a vmfork save file", 8: "format version", 12: "unknown flags", 20: "header checksum",
             24: "file size|unexpected bytes|truncated|the file is corrupt", 100: "header checksum"}
    for name, s in sections.items():
        cases[s.offset + s.size // 2] = f"section '{name}': checksum mismatch"
    gap = sections["ram"].offset - 10
    assert gap > sections["ram-map"].offset + sections["ram-map"].size
    cases[gap] = "non-zero padding before section 'ram'"
    for offset, match in cases.items():
        bad = bytearray(data)
        bad[offset] ^= 0x40
        p = tmp_path / f"flip-{offset}"
        p.write_bytes(bad)
        expect_refusal(p, match)


def test_foreign_files_are_refused(saved_det, tmp_path) -> None:
    path, _ = saved_det
    data = path.read_bytes()
    rng = np.random.default_rng(7)
    (tmp_path / "random").write_bytes(rng.bytes(100_000))
    expect_refusal(tmp_path / "random", "not a vmfork save file")
    (tmp_path / "empty").write_bytes(b"")
    expect_refusal(tmp_path / "empty", "empty")
    newer = bytearray(data)
    struct.pack_into("<I", newer, 8, 2)
    (tmp_path / "v2").write_bytes(newer)
    assert "format version 2, this vmfork reads version 1" in expect_refusal(tmp_path / "v2", "format version")
    (tmp_path / "longer").write_bytes(data + b"\0")
    expect_refusal(tmp_path / "longer", "1 unexpected bytes after")
    devices = DeviceSetState.capture_all([])
    write_device_state(devices, tmp_path / "dm.state")
    expect_refusal(tmp_path / "dm.state", "is a vmfork device-state file, not a save file")
    expect_refusal(tmp_path / "missing", "cannot open save file .*No such file")


def test_a_state_of_the_wrong_size_is_refused_naming_the_section(saved_det, tmp_path) -> None:
    path, _ = saved_det
    _, data = sections_of(path)
    parts = VcpuState._unpack_parts(data["machine"], b"VMFKMACH", 1, "test")
    vcpu = VcpuState._unpack_parts(parts["vcpu0"], b"VMFKVCPU", 1, "test")
    vcpu["regs"] = vcpu["regs"][:-8]
    parts["vcpu0"] = VcpuState._pack_parts(b"VMFKVCPU", 1, list(vcpu.items()))
    machine = VcpuState._pack_parts(b"VMFKMACH", 1, list(parts.items()))
    rewrite(path, tmp_path / "short-regs", sections={"machine": machine})
    expect_refusal(tmp_path / "short-regs", r"section 'machine': .*vcpu0.*'regs' is \d+ bytes, expected \d+")
    rewrite(path, tmp_path / "map", sections={"ram-map": data["ram-map"][:-1]})
    expect_refusal(tmp_path / "map", "section 'ram-map' is .* bytes")
    rewrite(path, tmp_path / "ram", sections={"ram": data["ram"][:-4096]})
    expect_refusal(tmp_path / "ram", "section 'ram' holds .* bytes, section 'ram-map' lists")
    rewrite(path, tmp_path / "shape", header=lambda h: h["machine"].update(memory_mib=128))
    expect_refusal(tmp_path / "shape", "memory description|128 MiB")


def test_a_host_lacking_a_saved_cpu_feature_is_refused(saved_det, tmp_path) -> None:
    path, expected = saved_det
    host = cpufeatures.host_cpu(open_kvm())["features"]["7.0.ebx"]
    bit = next(b for b in (16, 30, 31, 29, 5) if not host >> b & 1)       # avx512f, avx512bw, ... whatever is absent
    name = cpufeatures.feature_name("7.0.ebx", bit)

    def demand(h: dict) -> None:  # type: ignore[type-arg]
        h["cpu"]["features"]["7.0.ebx"] |= 1 << bit

    rewrite(path, tmp_path / "more-features", header=demand)
    msg = expect_refusal(tmp_path / "more-features", "lacks 1 CPU feature", SnapshotHostError)
    assert name in msg and f"CPUID.7.0:EBX bit {bit}" in msg

    def other_vendor(h: dict) -> None:  # type: ignore[type-arg]
        h["cpu"]["vendor"] = "VendorFromMars"

    rewrite(path, tmp_path / "vendor", header=other_vendor)
    expect_refusal(tmp_path / "vendor", "VendorFromMars CPU", SnapshotHostError)

    def unknown_word(h: dict) -> None:  # type: ignore[type-arg]
        h["cpu"]["features"]["80000021.0.eax"] = 1 << 31           # a word a newer vmfork might record

    rewrite(path, tmp_path / "newer-word", header=unknown_word)
    expect_refusal(tmp_path / "newer-word", r"CPUID.80000021.0:EAX bit 31", SnapshotHostError)

    rewrite(path, tmp_path / "same", header=lambda h: None)       # the rewrite itself is faithful
    vm = restore(tmp_path / "same")
    try:
        run_to_exit(vm)
        assert console(vm) == expected
    finally:
        vm.destroy()


def test_feature_names() -> None:
    assert cpufeatures.feature_name("1.0.ecx", 28) == "avx (CPUID.1.0:ECX bit 28)"
    assert cpufeatures.feature_name("7.0.ebx", 5) == "avx2 (CPUID.7.0:EBX bit 5)"
    assert cpufeatures.feature_name("80000001.0.edx", 29) == "lm (CPUID.80000001.0:EDX bit 29)"
    assert cpufeatures.missing({"1.0.ecx": (1 << 28) | (1 << 27)}, {"1.0.ecx": 0}) == [
        "avx (CPUID.1.0:ECX bit 28)"]                            # OSXSAVE is OS state, not a capability


# --- device-state files -------------------------------------------------------------------------------------------

def test_device_state_round_trip_and_damage(pvh_guest, machines, tmp_path) -> None:
    vm = boot(pvh_guest, "det 3", machines, memory_mib=64)
    run_to_ready(vm)
    state = save_device_state(vm, tmp_path / "dm.state")
    assert state == DeviceSetState.capture_all(vm.devices)
    assert load_device_state(tmp_path / "dm.state") == state
    assert vm.state == "paused"

    data = (tmp_path / "dm.state").read_bytes()
    with ContainerFile.open(tmp_path / "dm.state", b"VMFKDEVS", "vmfork-device-state") as f:
        assert f.header["devices"] == list(state.names) and f.header["vm"] == "test"
        devices = f.sections["devices"]
    bad = bytearray(data)
    bad[devices.offset + 3] ^= 1
    (tmp_path / "flipped").write_bytes(bad)
    with pytest.raises(SnapshotFormatError, match="section 'devices': checksum mismatch"):
        load_device_state(tmp_path / "flipped")
    (tmp_path / "cut").write_bytes(data[:-1])
    with pytest.raises(SnapshotFormatError, match=r"truncated.*section 'devices'"):
        load_device_state(tmp_path / "cut")
    save(vm, tmp_path / "whole.vmfork")
    with pytest.raises(SnapshotFormatError, match="is a vmfork save file, not a device-state file"):
        load_device_state(tmp_path / "whole.vmfork")

    # A state version this vmfork does not know is refused when the file is read, naming the device.
    doc = state.to_dict()
    doc["devices"]["serial0"]["version"] = 99
    raw = json.dumps(doc).encode()
    with ContainerWriter(tmp_path / "v99", b"VMFKDEVS", "vmfork-device-state", {},
                         [SectionSpec("devices", len(raw))]) as w:
        w.write("devices", raw)
        w.commit()
    with pytest.raises(DeviceStateError, match="serial0 state version 99, this vmfork supports 1"):
        load_device_state(tmp_path / "v99")


def test_device_state_needs_a_device_model(pvh_guest, machines, tmp_path) -> None:
    parent = boot(pvh_guest, "det 3", machines, memory_mib=64)
    run_to_ready(parent)
    bare = parent.fork(launch_dm="no")
    with pytest.raises(DeviceStateError, match="no device model"):
        save_device_state(bare, tmp_path / "dm.state")
    assert not (tmp_path / "dm.state").exists()
    # A machine without a device model saves and restores as one.
    save(bare, tmp_path / "bare.vmfork")
    assert info(tmp_path / "bare.vmfork")["machine"]["devices"] is None
    copy = restore(tmp_path / "bare.vmfork")
    machines.append(copy)
    assert copy.devices == [] and copy.launch_dm == "no"
    copy.attach_device_model(load_device_state_of(parent, tmp_path))
    run_to_exit(copy)
    assert console(copy).count("det ") == 3


def load_device_state_of(vm: VM, tmp_path: Path) -> DeviceSetState:
    save_device_state(vm, tmp_path / f"{vm.name}.state")
    return load_device_state(tmp_path / f"{vm.name}.state")


def test_container_checksums_are_crc32_of_each_section(saved_det) -> None:
    """The documented format, read without the library: preamble fields, header JSON, section CRCs."""
    path, _ = saved_det
    data = path.read_bytes()
    magic, version, flags, hlen, hcrc, size = struct.unpack_from("<8sIIIIQ", data, 0)
    assert (magic, version, flags, size) == (b"VMFKSAVE", 1, 0, len(data))
    raw = data[32:32 + hlen]
    assert zlib.crc32(raw) == hcrc
    header = json.loads(raw)
    assert header["format"] == "vmfork-save"
    assert [s["name"] for s in header["sections"]] == ["machine", "ram-map", "ram"]
    for s in header["sections"]:
        assert f"{zlib.crc32(data[s['offset']:s['offset'] + s['size']]):08x}" == s["crc32"]
    ram = header["sections"][2]
    assert ram["offset"] % 4096 == 0 and ram["offset"] + ram["size"] == len(data)
    assert set(header["cpu"]) == {"vendor", "family", "model", "stepping", "features"}
    assert dataclasses.is_dataclass(savefile.SaveInfo)


# --- command line -------------------------------------------------------------------------------------------------

def test_cli_save_restore_and_save_devices_state(pvh_guest, tmp_path, capfd, monkeypatch) -> None:
    """The file forms of the commands (the toolstack's `save DOMAIN`/`restore` route config files and
    `restore --foreground` here)."""
    from vmfork.cli import main
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    monkeypatch.setenv("VMFORK_RUN_DIR", str(run_dir))
    cfg = tmp_path / "det.cfg"
    cfg.write_text(f'name = "det"\nmemory = 64\nkernel = "{pvh_guest}"\ncmdline = "det 4"\n')
    assert main(["save", str(cfg), str(tmp_path / "det.vmfork")]) == 0
    assert "saved det at its ready marker" in capfd.readouterr().err
    assert main(["restore", "--foreground", str(tmp_path / "det.vmfork")]) == 0
    out = capfd.readouterr().out
    assert out.count("det ") == 4 and "ready" not in out          # it starts after the ready line
    assert main(["save-devices-state", str(cfg), str(tmp_path / "det.dm")]) == 0
    assert load_device_state(tmp_path / "det.dm").names == ("serial0", "i8042", "rtc", "exit", "harness", "env")
    capfd.readouterr()

    # Errors are one line, never a traceback.
    (tmp_path / "junk").write_bytes(b"junk" * 100)
    hello = tmp_path / "hello.cfg"
    hello.write_text(f'name = "hi"\nmemory = 64\nkernel = "{pvh_guest}"\ncmdline = "hello"\n')
    for argv, message in (
            (["restore", "--foreground", str(tmp_path / "junk")], "not a vmfork save file"),
            (["restore", "--foreground", str(tmp_path / "nope")], "cannot open save file"),
            (["restore", "--foreground", str(tmp_path / "det.dm")], "device-state file, not a save file"),
            (["save", str(hello), str(tmp_path / "hi.vmfork")], "did not reach its ready marker"),
            (["save", str(cfg), str(tmp_path / "no-such-dir" / "x")], "cannot write save file"),
    ):
        assert main(argv) == 1, argv
        err = capfd.readouterr().err
        assert err.startswith("vmfork: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "hi.vmfork").exists()
