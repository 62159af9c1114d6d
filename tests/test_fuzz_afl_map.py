"""AFL++ coverage from an edge map the target keeps itself (`vmfork fuzz --afl --afl-map`): the jsmn example built
with gcc's -fsanitize-coverage=trace-pc (build/guests/jsmn-afl-pvh.elf, guests/jsmn/afl_cov.c) fills 8 KiB of its
.bss per input, and vmfork copies that into AFL++'s map instead of taking a breakpoint exit per block."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest import console
from test_fuzz import AFL_ENV, needs_afl, stop_afl_and_check_nothing_is_left
from test_fuzz_example import MAX_TOKENS, SEEDS, array_of
from vmfork.fork import VM
from vmfork.fuzz import Fuzzer, FuzzError
from vmfork.fuzz.afl import (
    AUTO_MAP,
    FS_OPT_ENABLED,
    FS_OPT_MAPSIZE,
    FS_OPT_SHDMEM_FUZZ,
    MAX_FILE,
    SHM_FUZZ_ENV,
    GuestMap,
    guest_map,
    hello,
)

MAP = GuestMap(0x410000, 0x2000)             # guests/README.md: 8 KiB at the first 64 KiB boundary after the C code


@pytest.fixture(scope="module")
def afl_image(guest_dir: Path) -> Path:
    return guest_dir / "jsmn-afl-pvh.elf"


@pytest.fixture(scope="module")
def target(afl_image: Path) -> Iterator[VM]:
    vm = VM.create(memory_mib=64, name="jsmn-afl-target")
    try:
        vm.load_kernel(afl_image, cmdline="jsmn")
        ev = vm.run(timeout=30)
        assert ev.reason == "harness-start", f"{ev} / {console(vm)!r}"
        yield vm
    finally:
        vm.destroy(tree=True)


def edges(fz: Fuzzer) -> bytes:
    return fz.fork.memory.read(MAP.addr, MAP.size)


def test_the_target_prints_where_its_map_is(target: VM) -> None:
    assert re.search(r"vmfork-guest: jsmn parse=0x400000 end=0x[0-9a-f]+\n"
                     r"vmfork-guest: jsmn afl-map=0x410000 size=0x2000\nvmfork-guest: ready\n", console(target))
    assert guest_map(AUTO_MAP, target, target.device("serial0").output(), "jsmn-afl") == MAP


def test_each_input_fills_the_map_from_zero(target: VM) -> None:
    seed = (SEEDS / "vm.json").read_bytes()
    with Fuzzer(target, budget_s=0.5) as fz:
        maps = []
        for data in (seed, seed, b"[1,2]", b'{"name": "x"}', seed):
            assert fz.execute(data).outcome == "ok"
            maps.append(edges(fz))
        assert maps[0] == maps[1] == maps[4]                     # the same input, the same map: nothing carried over
        assert len({maps[0], maps[2], maps[3]}) == 3             # different paths, different maps
        assert all(sum(1 for b in m if b) > 10 for m in maps)
        assert sum(maps[0]) > sum(maps[2])                       # a bigger document runs more edges
        fz.fork.reset()
        assert not any(edges(fz))                                # the reset restores the parent's zero map
        res = fz.execute(array_of(MAX_TOKENS + 1))               # the planted bug, still caught by the canary
        assert (res.outcome, res.vector) == ("crash", 6) and any(edges(fz))
    assert not any(target.memory.read(MAP.addr, MAP.size))       # and the parent never saw any of it


def test_bad_maps_are_one_line_errors(target: VM) -> None:
    out = target.device("serial0").output()
    for spec, text, why in ((AUTO_MAP, b"vmfork-guest: ready\n", "printed no `afl-map=0x... size=0x...` line"),
                            (GuestMap(0x410000, 0x3000), out, "not a power of two"),
                            (GuestMap(0x8000000, 0x10000), out, "not inside the guest's RAM"),
                            (GuestMap(0x400000, 0x1000), out, "not zero in the parent")):     # the code itself
        with pytest.raises(FuzzError, match=re.escape(why)):
            guest_map(spec, target, text, "the target")


def vmfork_fuzz(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmfork.fuzz", *args]


def test_the_command_line_checks_the_map(afl_image: Path, guest_dir: Path) -> None:
    plain = guest_dir / "jsmn-pvh.elf"                 # the jsmn example without the instrumentation
    cases = ((afl_image, ["--afl", "--afl-map", "0x410000:0x3000"], "SIZE must be a power of two"),
             (afl_image, ["--afl", "--afl-map", "auto", "--cover", "auto"], "--afl-map and --cover would both"),
             (afl_image, ["--afl-map", "auto", "--out", "x"], "--afl-map is for --afl"),
             (plain, ["--afl", "--afl-map", "auto"], "printed no `afl-map=0x... size=0x...` line"))
    for image, args, why in cases:
        cmd = vmfork_fuzz("--kernel", str(image), "--cmdline", "jsmn", *args)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and why in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_hello_announces_the_map_size() -> None:
    """AFL++'s options word: FS_OPT_ENABLED | FS_OPT_MAPSIZE, size - 1 in bits 1-23 (afl-fuzz reads it back as
    ((word & 0xfffffe) >> 1) + 1); a size the word cannot carry gives the classic hello, which announces nothing."""
    for size in (2, 0x10000, 0x20000, 1 << 23):
        [word] = struct.unpack("<I", hello(size))
        assert word & FS_OPT_ENABLED == FS_OPT_ENABLED and word & FS_OPT_MAPSIZE, hex(word)
        assert ((word & 0xFFFFFE) >> 1) + 1 == size
    assert struct.unpack("<I", hello(0x10000)) == (0xC001FFFF,)
    assert hello(1) == hello((1 << 23) + 1) == b"\0\0\0\0"
    # asking for shared-memory test cases: AFL++'s FS_OPT_SHDMEM_FUZZ, with or without a size
    assert struct.unpack("<I", hello(0x2000, shmem_input=True)) == (0xC1003FFF,)
    assert struct.unpack("<I", hello(1, shmem_input=True)) == (FS_OPT_ENABLED | FS_OPT_SHDMEM_FUZZ,)


class SysvSegment:
    """A System V shared-memory segment, as afl-fuzz makes for its test cases (removed on close)."""

    def __init__(self, size: int) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.libc.shmat.restype = ctypes.c_void_p
        self.libc.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
        self.id = self.libc.shmget(0, size, 0o1600)         # IPC_PRIVATE, IPC_CREAT | 0600
        assert self.id >= 0, os.strerror(ctypes.get_errno())
        self.buf = (ctypes.c_ubyte * size).from_address(self.libc.shmat(self.id, None, 0))

    def put(self, data: bytes) -> None:
        ctypes.memmove(self.buf, struct.pack("<I", len(data)) + data, len(data) + 4)

    def close(self) -> None:
        self.libc.shmctl(self.id, 0, None)                  # IPC_RMID


@pytest.mark.parametrize("how", ["shared memory", "--afl-input"])
def test_the_fork_server_protocol_one_write_per_input(afl_image: Path, tmp_path: Path, how: str) -> None:
    """vmfork driven over fds 198/199 as afl-fuzz drives it: with `__AFL_SHM_FUZZ_ID` (and no --afl-input) the hello
    asks for shared-memory test cases and the inputs come from that segment, else from the --afl-input file. The
    "child pid" comes before the first request, and each wait status comes in one write with the next pid; the pid
    is an exited child of vmfork's, so a kill() of it (afl-fuzz's on a timeout) is harmless."""
    seg = SysvSegment(MAX_FILE + 4)
    ctl_r, ctl_w = os.pipe()
    st_r, st_w = os.pipe()
    infile = tmp_path / "cur_input"
    extra = ["--afl-input", str(infile)] if how == "--afl-input" else []
    proc = None
    try:
        proc = subprocess.Popen(["bash", "-c", f'exec 198<&{ctl_r} 199>&{st_w} "$@"', "bash",
                                 *vmfork_fuzz("--afl", "--kernel", str(afl_image), "--cmdline", "jsmn",
                                              "--afl-map", "auto", *extra)],
                                env={**os.environ, SHM_FUZZ_ENV: str(seg.id)}, pass_fds=(ctl_r, st_w),
                                stderr=subprocess.PIPE)
        os.close(ctl_r)
        os.close(st_w)
        shmem = how == "shared memory"
        assert os.read(st_r, 4) == hello(0x2000, shmem_input=shmem)
        if shmem:
            os.write(ctl_w, struct.pack("<I", FS_OPT_ENABLED | FS_OPT_SHDMEM_FUZZ))      # afl-fuzz's yes
        [pid] = struct.unpack("<i", os.read(st_r, 4))
        assert pid > 0 and pid != proc.pid
        seed = (SEEDS / "vm.json").read_bytes()
        for data, status in ((seed, 0), (array_of(MAX_TOKENS + 1), int(signal.SIGILL)), (b"[1,2]", 0),
                             (seed, 0)):
            if shmem:
                seg.put(data)
                infile.write_bytes(b"not this")
            else:
                seg.put(b"not this")
                infile.write_bytes(data)
            os.write(ctl_w, b"\0\0\0\0")
            reply = b""
            while len(reply) < 8:                   # one write: the status and the next pid together
                chunk = os.read(st_r, 8 - len(reply))
                assert chunk, proc.stderr.read() if proc.stderr else ""
                reply += chunk
            assert struct.unpack("<ii", reply) == (status, pid), data
            os.kill(pid, signal.SIGKILL)            # afl-fuzz's timeout kill: nothing happens
        os.close(ctl_w)                             # afl-fuzz goes away: vmfork ends
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    finally:
        seg.close()
        os.close(st_r)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_guest_map_larger_than_afls_is_announced_then_refused(afl_image: Path) -> None:
    """Without afl-fuzz's own stop (an AFL that ignores the announced size): vmfork sends the hello with the guest
    map's size, then ends with one line naming AFL_MAP_SIZE and the size, copying nothing past AFL++'s map."""
    r, w = os.pipe()
    with os.fdopen(r, "rb") as status:
        try:    # the fork server's status pipe is fd 199 (bash: dash cannot redirect a descriptor above 9)
            proc = subprocess.run(["bash", "-c", f'exec 199>&{w} "$@"', "bash",
                                   *vmfork_fuzz("--afl", "--kernel", str(afl_image), "--cmdline", "jsmn",
                                                "--afl-map", "auto")],
                                  env={**os.environ, "AFL_MAP_SIZE": "4096"}, pass_fds=(w,), capture_output=True,
                                  text=True, timeout=60)
        finally:
            os.close(w)
        assert status.read() == hello(0x2000)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == ("vmfork: error: the guest's edge map (8192 bytes) is larger than AFL++'s "
                                   "(4096): run afl-fuzz with AFL_MAP_SIZE=8192")


def afl_command(tmp_path: Path, image: Path, seconds: int) -> list[str]:
    (tmp_path / "in").mkdir()
    for seed in SEEDS.iterdir():
        (tmp_path / "in" / seed.name).write_bytes(seed.read_bytes())
    return ["afl-fuzz", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-t", "200", "-s", "1",
            "-V", str(seconds), "--",
            *vmfork_fuzz("--afl", "--kernel", str(image), "--cmdline", "jsmn", "--budget-ms", "400",
                         "--afl-map", "auto")]


def fuzzer_stats(tmp_path: Path) -> dict[str, str]:
    text = (tmp_path / "out" / "default" / "fuzzer_stats").read_text()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


@needs_afl
def test_afl_fuzz_finds_paths_and_the_bug_through_the_guest_map(target: VM, afl_image: Path, tmp_path: Path) -> None:
    """Without a single breakpoint: AFL++ sees the edges only through the map vmfork copies, so a growing corpus
    and the crash mean the map reaches it."""
    env = {**os.environ, **AFL_ENV, "AFL_BENCH_UNTIL_CRASH": "1"}
    proc = subprocess.run(afl_command(tmp_path, afl_image, 25), env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert b"Using SHARED MEMORY FUZZING feature" in proc.stdout        # the inputs come without a file
    stats = fuzzer_stats(tmp_path)
    seeds = len(list(SEEDS.iterdir()))
    assert int(stats["corpus_count"]) > seeds + 10 and int(stats["edges_found"]) > 50, stats
    assert float(stats["execs_per_sec"]) > 300, stats       # breakpoints give well under 100 here
    crashes = [p for p in (tmp_path / "out" / "default" / "crashes").iterdir() if p.name.startswith("id:")]
    assert crashes and all(",sig:04," in p.name for p in crashes), stats      # SIGILL: #UD from __stack_chk_fail
    with Fuzzer(target, budget_s=0.5) as fz:
        assert fz.execute(crashes[0].read_bytes()).vector == 6


@needs_afl
def test_sigterm_of_afl_fuzz_leaves_no_vmfork_behind(afl_image: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(afl_command(tmp_path, afl_image, 60), env={**os.environ, **AFL_ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stop_afl_and_check_nothing_is_left(proc, tmp_path / "out", signal.SIGTERM, start_timeout=30)


@needs_afl
@pytest.mark.parametrize(("afl_map_size", "ends"), [(0x20000, "fuzzing"), (0x1000, "stopped by afl-fuzz")])
def test_afl_fuzz_sizes_its_map_from_the_handshake(afl_image: Path, tmp_path: Path, afl_map_size: int,
                                                   ends: str) -> None:
    """afl-fuzz takes the map size vmfork announces: with AFL_MAP_SIZE larger than the guest map it looks at only
    the guest's 8 KiB (fuzzer_stats' total_edges); with it smaller, afl-fuzz itself stops at the handshake and
    says which AFL_MAP_SIZE to set, instead of "Fork server handshake failed"."""
    env = {**os.environ, **AFL_ENV, "AFL_MAP_SIZE": str(afl_map_size)}
    proc = subprocess.run(afl_command(tmp_path, afl_image, 4), env=env, capture_output=True, timeout=60)
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert "Target map size: 8192" in out, out[-2000:]
    if ends == "fuzzing":
        assert proc.returncode == 0, out[-2000:]
        stats = fuzzer_stats(tmp_path)
        assert stats["total_edges"] == "8192" and int(stats["execs_done"]) > 0, stats
    else:
        assert proc.returncode != 0 and "Fork server handshake failed" not in out, out[-2000:]
        assert "coverage map size of 8192 is larger than the one this afl++ is set with (4096)" in out.lower()
        assert "AFL_MAP_SIZE=8192" in out
