"""Fuzzing on forks (issue 6): execs/s, time to find the planted bug, reset cost per input, and the same under AFL++,
for the two example targets.

    .venv/bin/python bench/fuzz.py [--target fuzz|jsmn|all] [--seconds 5] [--runs 5] [--afl-seconds 15] [--markdown]
    .venv/bin/python bench/fuzz.py --target jsmn --afl-only [--afl-seconds 15]      # only the afl-fuzz rows
    .venv/bin/python bench/fuzz.py --target fuzz --jobs-only [--seconds 5]          # only `vmfork fuzz --jobs 1 vs 2`
    .venv/bin/python bench/fuzz.py --target jsmn --fixed-only [--rounds 9]         # only the per-input cost rows
    .venv/bin/python bench/fuzz.py --target jsmn --baseline /work/main [--rounds 3] # this tree vs another, alternating
    .venv/bin/python bench/fuzz.py --target jsmn --afl-only --baseline TREE          # the same under afl-fuzz

Targets (guests/README.md):
  fuzz   the test guest's `fuzz` program: a tiny parser in assembly whose "FUZZ" + 'B' record with a nonzero bank
         writes outside the mapped memory (#PF)
  jsmn   the example on a third-party parser: Debian's jsmn JSON tokenizer compiled into the guest's user mode, with
         an off-by-one in its token allocator that overwrites the stack canary once a document has 25 tokens (#UD
         from __stack_chk_fail), seeds from guests/jsmn/seeds/; under afl-fuzz also the jsmn-afl-pvh.elf build of
         the same code, which keeps its own edge map (`vmfork fuzz --afl-map auto`, no breakpoints)
  kfx    a target with KF/x's conventions and none of vmfork's (guests/kfx/kfx.asm): int3 harness with one magic,
         the buffer at a vmalloc-style virtual address over two non-contiguous physical pages, its own fault
         handlers (print and halt), two #PF bugs found by vmfork's fault breakpoints
One core: the fuzz fork runs inline in this process; except the `--jobs` row, `vmfork fuzz` campaigns through the
CLI with one worker process and with two (fuzz/jobs.py), run alternately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vmfork.fork import VM  # noqa: E402
from vmfork.fuzz import Fuzzer  # noqa: E402
from vmfork.fuzz.harness import Harness, run_to_start  # noqa: E402
from vmfork.fuzz.inputbuf import InputBuffer  # noqa: E402

GUESTS = ROOT / "build" / "guests"
JSMN_SEEDS = ROOT / "guests" / "jsmn" / "seeds"
BUG_CAP_S = 60.0            # one bug-finding run gives up after this long


@dataclass(frozen=True)
class Target:
    name: str
    image: Path
    cmdline: str
    fixed: bytes                                # one valid input, run over and over for the per-input cost
    corpora: tuple[tuple[str, tuple[bytes, ...]], ...]      # (label, seeds) to find the bug from; the first is
    #                                                         also the campaigns' corpus
    budget_s: float                             # time per input before it is a hang
    note: str
    afl_image: Path | None = None               # the same target built with its own edge map (--afl-map auto)
    harness: str = "port"                       # how it marks its start and end (fuzz/harness.py)


def targets() -> dict[str, Target]:
    jsmn_seeds = tuple(p.read_bytes() for p in sorted(JSMN_SEEDS.iterdir()))
    return {
        "fuzz": Target("fuzz", GUESTS / "testguest-pvh.elf", "fuzz", b"FUZZA\x01C\x00",
                       (("b'FUZZA\\x00'", (b"FUZZA\x00",)), ("b'hello!'", (b"hello!",))), 0.05,
                       "the test guest's `fuzz` program (a user-mode parser with a planted out-of-bounds write)"),
        "jsmn": Target("jsmn", GUESTS / "jsmn-pvh.elf", "jsmn", (JSMN_SEEDS / "vm.json").read_bytes(),
                       (("guests/jsmn/seeds/", jsmn_seeds),), 0.05,
                       "Debian's jsmn 1.1.0 in the guest's user mode, planted off-by-one in its token allocator "
                       "caught by the stack protector (guests/README.md, the jsmn example)",
                       GUESTS / "jsmn-afl-pvh.elf"),
        "kfx": Target("kfx", GUESTS / "kfx-multiboot.elf", "", b"A" * 14 + b"KFX0",
                      (("b'A' * 14 + b'KFX0'", (b"A" * 14 + b"KFX0",)), ("b'hello!'", (b"hello!",))), 0.05,
                      "a Multiboot kernel with KF/x's conventions and none of vmfork's (guests/kfx/kfx.asm): KF/x's "
                      "int3 harness with one magic at both ends, raw input at a vmalloc-style virtual address "
                      "over two non-contiguous physical pages, its own fault handlers; two #PF bugs, caught by "
                      "vmfork's hardware breakpoints on the guest's fault handlers", harness="int3"),
    }


def ready_vm(t: Target) -> tuple[VM, int, int]:
    vm = VM.create(memory_mib=64, name=f"bench-{t.name}")
    vm.load_kernel(t.image, cmdline=t.cmdline)
    if t.harness != "port":
        run_to_start(vm, Harness(t.harness), timeout=60)
    else:
        ev = vm.run(timeout=60)
        if ev.reason != "harness-start":
            raise SystemExit(f"{t.image.name} {t.cmdline} did not reach its ready marker: {ev}")
    m = re.search(rb"parse=(0x[0-9a-f]+) end=(0x[0-9a-f]+)", vm.device("serial0").output())
    assert m
    return vm, int(m.group(1), 16), int(m.group(2), 16)


def make_fuzzer(t: Target, vm: VM, **options: object) -> Fuzzer:
    return Fuzzer(vm, int3_markers=t.harness == "int3", **options)  # type: ignore[arg-type]


def cli_harness(t: Target) -> list[str]:
    return [] if t.harness == "port" else ["--harness", t.harness]


def write_rows(t: Target, vm: VM) -> list[tuple[str, str, str]]:
    """The cost of putting an input into the fork: the buffer's translation (once per fuzzer), and per input the
    fuzzer's write through the translated pieces against one plain guest-physical write of the same bytes."""
    regs = vm.vcpus[0].get_regs()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        buf = InputBuffer.at(vm, int(regs.rdi), int(regs.rsi), format="raw" if t.harness == "int3" else "len64")
    translate = (time.perf_counter() - t0) / n
    with make_fuzzer(t, vm, budget_s=t.budget_s) as fz:
        fz.execute(t.fixed)
        write_virtual = fz.input.writer(fz.fork.memory)
        write_phys = fz.fork.memory.write
        gpa = buf.pieces[0][0]
        data = t.fixed
        best = {"virtual": float("inf"), "physical": float("inf")}
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(20000):
                write_virtual(data)
            best["virtual"] = min(best["virtual"], (time.perf_counter() - t0) / 20000)
            t0 = time.perf_counter()
            for _ in range(20000):
                write_phys(gpa, data)
            best["physical"] = min(best["physical"], (time.perf_counter() - t0) / 20000)
    return [(f"input write per input, virtual buffer ({len(buf.pieces)} physical piece"
             f"{'s' if len(buf.pieces) > 1 else ''}, {buf.format}) vs one guest-physical write",
             f"{best['virtual'] * 1e6:.1f} µs",
             f"one plain guest-physical write of the same {len(t.fixed)} bytes: {best['physical'] * 1e6:.1f} µs; "
             f"the translation, once per fuzzer (reused by every fork and reset): {translate * 1e6:.0f} µs")]


def faults_row(t: Target, vm: VM, rounds: int = 5, n: int = 500) -> tuple[str, str, str]:
    """execs/s of the fixed input with the fault breakpoints (the default) and without, on one fuzz fork whose
    breakpoints are put in and taken out between blocks (alternating), so nothing else differs."""
    best = {True: 0.0, False: 0.0}
    with make_fuzzer(t, vm, budget_s=t.budget_s) as fz:
        trap = fz._faults
        if trap is None:
            raise SystemExit(f"{t.name}: no fault breakpoints ({fz.describe_faults()})")
        for _ in range(rounds):
            for faults in best:
                if faults:
                    trap.install()
                else:
                    trap.uninstall()
                fz.execute(t.fixed)
                t0 = time.perf_counter()
                for _ in range(n):
                    fz.execute(t.fixed)
                best[faults] = max(best[faults], n / (time.perf_counter() - t0))
        trap.install()
    return ("fixed input, fault breakpoints on (default) vs off, one fork", f"{best[True] / best[False]:.2f}x",
            f"on: {best[True]:,.0f} execs/s, off: {best[False]:,.0f} execs/s; best of {rounds} alternating blocks "
            f"of {n}")


BASELINE_SNIPPET = """
import re, sys, time, json
sys.path.insert(0, sys.argv[1] + "/src")
from vmfork.fork import VM
from vmfork.fuzz import Fuzzer
vm = VM.create(memory_mib=64, name="baseline")
vm.load_kernel(sys.argv[2], cmdline=sys.argv[3])
assert vm.run(timeout=60).reason == "harness-start"
m = re.search(rb"parse=(0x[0-9a-f]+) end=(0x[0-9a-f]+)", vm.device("serial0").output())
seeds = [open(p, "rb").read() for p in sys.argv[5:]]
with Fuzzer(vm, coverage=[(int(m.group(1), 16), int(m.group(2), 16))], budget_s=0.05) as fz:
    c0 = time.process_time()
    st = fz.fuzz(seeds, seconds=float(sys.argv[4]), rng_seed=1)
    cpu = time.process_time() - c0
print(json.dumps({"execs_per_s": st.execs_per_s, "execs_per_cpu_s": st.execs / cpu}))
vm.destroy(tree=True)
"""


def baseline_row(t: Target, other: Path, seconds: float, rounds: int) -> tuple[str, str, str]:
    """This tree against another checkout (`other`, e.g. /work/main), the same campaign (coverage of the parser,
    RNG seed 1) in fresh processes, alternating; each tree uses its own build of the guest."""
    seeds = sorted(str(p) for p in JSMN_SEEDS.iterdir()) if t.name == "jsmn" else []
    if t.harness != "port" or not seeds:
        raise SystemExit("--baseline compares the jsmn campaign")
    rates: dict[str, list[float]] = {"this": [], "other": []}
    per_cpu: dict[str, list[float]] = {"this": [], "other": []}
    for _ in range(rounds):
        for which, tree in (("this", ROOT), ("other", other)):
            image = tree / "build" / "guests" / t.image.name
            out = json.loads(subprocess.run([sys.executable, "-c", BASELINE_SNIPPET, str(tree), str(image),
                                             t.cmdline, str(seconds), *seeds], capture_output=True, text=True,
                                            check=True, timeout=seconds + 120).stdout)
            rates[which].append(out["execs_per_s"])
            per_cpu[which].append(out["execs_per_cpu_s"])
    this, base = statistics.median(rates["this"]), statistics.median(rates["other"])
    this_cpu, base_cpu = statistics.median(per_cpu["this"]), statistics.median(per_cpu["other"])
    return (f"campaign with coverage, {seconds:g} s: this tree vs {other}", f"{this / base:.2f}x",
            f"this tree {', '.join(f'{x:,.0f}' for x in rates['this'])} execs/s; {other}: "
            f"{', '.join(f'{x:,.0f}' for x in rates['other'])} execs/s ({rounds} alternating rounds, medians "
            f"{this:,.0f} vs {base:,.0f}); per CPU-second of the process (what one core of its own would give): "
            f"{this_cpu:,.0f} vs {base_cpu:,.0f} ({this_cpu / base_cpu:.2f}x)")


def _cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of process `pid` so far (None once it is gone)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class AflRun:
    stats: dict[str, str]           # afl-fuzz's fuzzer_stats
    afl_cpu_us: float               # CPU per input of afl-fuzz's own process, from its first queue cycle to its end
    vmfork_cpu_us: float            # the same for the fork server (vmfork)

    @property
    def execs_per_s(self) -> float:
        return float(self.stats["execs_per_sec"])


def run_afl(command: list[str], env: dict[str, str], seconds: int) -> AflRun:
    """Run afl-fuzz (`-o` inside `command`) to its -V limit, sampling the CPU time of afl-fuzz and of its fork
    server (its one child) from /proc: from "All set and ready to roll" (seeds and calibration done) to the last
    sample before it ends, per input of the whole run (the calibration's few dozen inputs are in the count)."""
    out = Path(command[command.index("-o") + 1])
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    ready = threading.Event()
    tail: list[bytes] = []

    def read_output() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail[:] = [*tail[-40:], line]
            if b"ready to roll" in line:
                ready.set()
    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    server: int | None = None
    first = last = None
    deadline = time.monotonic() + seconds + 180
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("afl-fuzz did not end")
        time.sleep(0.1)
        if server is None:
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split() \
                if Path(f"/proc/{proc.pid}").exists() else []
            server = int(kids[0]) if kids else None
        sample = (_cpu_s(proc.pid), _cpu_s(server))
        if sample[0] is None or sample[1] is None:
            continue
        if first is None and ready.is_set():
            first = sample
        last = sample
    reader.join(timeout=5)
    if proc.returncode != 0 or first is None or last is None:
        raise SystemExit(f"afl-fuzz failed ({proc.returncode}):\n" + b"".join(tail).decode(errors="replace"))
    text = (out / "default/fuzzer_stats").read_text()
    stats = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}
    execs = int(stats["execs_done"])
    return AflRun(stats, (last[0] - first[0]) / execs * 1e6, (last[1] - first[1]) / execs * 1e6)


def afl_run(t: Target, seconds: int, start: int, end: int, *, guest_map: bool = False,
            tree: Path | None = None) -> AflRun:
    """One afl-fuzz run (fork-server mode), its edge map fed by persistent block breakpoints, or (`guest_map`)
    copied from the map the target's instrumented build keeps itself (t.afl_image). `tree`: run another checkout's
    vmfork (its src/ first on PYTHONPATH) with that checkout's build of the guest (this tree's if it has none)."""
    env = {**os.environ, "AFL_SKIP_BIN_CHECK": "1", "AFL_NO_UI": "1", "AFL_SKIP_CPUFREQ": "1",
           "AFL_NO_AFFINITY": "1", "AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES": "1", "AFL_FORKSRV_INIT_TMOUT": "60000"}
    if tree is not None:
        env["PYTHONPATH"] = str(tree / "src")
    # Breakpoint edges: every block hit is an exit, so a seed of a few hundred bytes takes tens of milliseconds;
    # AFL++ aborts when its seeds time out. AFL++'s own timer sees hangs before vmfork's.
    budget_ms = 400 if guest_map else max(1000, int(t.budget_s * 1000))
    timeout_ms = max(200, budget_ms // 2)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "in").mkdir()
        for i, seed in enumerate(t.corpora[0][1]):
            (Path(tmp) / "in" / f"seed{i}").write_bytes(seed)
        image = t.afl_image if guest_map and t.afl_image is not None else t.image
        if tree is not None and (tree / "build" / "guests" / image.name).exists():
            image = tree / "build" / "guests" / image.name
        coverage = ["--afl-map", "auto"] if guest_map else ["--cover", f"{start:#x}-{end:#x}"]
        return run_afl(["afl-fuzz", "-i", f"{tmp}/in", "-o", f"{tmp}/out", "-t", str(timeout_ms), "-V", str(seconds),
                        "--", sys.executable, "-m", "vmfork.fuzz", "--afl", "--kernel", str(image), "--cmdline",
                        t.cmdline, "--budget-ms", str(budget_ms), *cli_harness(t), *coverage], env, seconds)


def afl_row(t: Target, seconds: int, start: int, end: int, *, guest_map: bool = False) -> tuple[str, str, str]:
    """execs/s under the real afl-fuzz (its fuzzer_stats), with the CPU per input of both processes."""
    run = afl_run(t, seconds, start, end, guest_map=guest_map)
    st = run.stats
    found = (f"{st['execs_done']} inputs, corpus {st['corpus_count']}, {st['edges_found']} edges, "
             f"{st['saved_crashes']} crashes saved; CPU per input: afl-fuzz {run.afl_cpu_us:.0f} µs, vmfork "
             f"{run.vmfork_cpu_us:.0f} µs")
    if guest_map:
        assert t.afl_image is not None
        return (f"under afl-fuzz, guest edge map (`--afl-map auto`, {t.afl_image.name}), {seconds} s",
                f"{run.execs_per_s:,.0f} execs/s",
                f"{found}; no breakpoints: the guest's trace-pc callback counts edges, one copy of its map per input")
    return (f"under afl-fuzz, breakpoint edges (`--cover`), {seconds} s", f"{run.execs_per_s:,.0f} execs/s",
            f"{found}; every block hit is an exit")


def afl_baseline_row(t: Target, other: Path, seconds: int, start: int, end: int,
                     rounds: int) -> tuple[str, str, str]:
    """The guest-edge-map afl-fuzz run with this tree's vmfork and guest and another checkout's, alternating."""
    runs: dict[str, list[AflRun]] = {"this": [], "other": []}
    for _ in range(rounds):
        for which, tree in (("this", None), ("other", other)):
            runs[which].append(afl_run(t, seconds, start, end, guest_map=True, tree=tree))

    def median(which: str, what: str) -> float:
        return statistics.median(getattr(r, what) for r in runs[which])

    this, base = median("this", "execs_per_s"), median("other", "execs_per_s")
    cpu = {w: (median(w, "afl_cpu_us"), median(w, "vmfork_cpu_us")) for w in runs}
    return (f"under afl-fuzz, guest edge map, {seconds} s: this tree vs {other}", f"{this / base:.2f}x",
            f"this tree {', '.join(f'{r.execs_per_s:,.0f}' for r in runs['this'])} execs/s; {other}: "
            f"{', '.join(f'{r.execs_per_s:,.0f}' for r in runs['other'])} execs/s ({rounds} alternating rounds, "
            f"each tree with its own build of the guest, afl-fuzz's execs_per_sec); CPU per input (medians), "
            f"afl-fuzz + vmfork: this tree {cpu['this'][0]:.0f} + {cpu['this'][1]:.0f} µs, {other} "
            f"{cpu['other'][0]:.0f} + {cpu['other'][1]:.0f} µs")


def afl_floor_row(seconds: int, map_size: int = 8192) -> tuple[str, str, str]:
    """afl-fuzz driving a fork server that runs nothing (bench/afl_null_server.c, vmfork's protocol in C): what
    afl-fuzz and the pipe cost per input on this host, the floor vmfork's time per input adds to."""
    with tempfile.TemporaryDirectory() as tmp:
        server = Path(tmp) / "afl_null_server"
        subprocess.run(["gcc", "-O2", "-o", str(server), str(ROOT / "bench" / "afl_null_server.c")], check=True)
        (Path(tmp) / "in").mkdir()
        (Path(tmp) / "in" / "seed").write_bytes(b"hello")
        env = {**os.environ, "AFL_SKIP_BIN_CHECK": "1", "AFL_NO_UI": "1", "AFL_SKIP_CPUFREQ": "1",
               "AFL_NO_AFFINITY": "1", "AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES": "1"}
        run = run_afl(["afl-fuzz", "-i", f"{tmp}/in", "-o", f"{tmp}/out", "-t", "200", "-V", str(seconds), "--",
                       str(server), str(map_size)], env, seconds)
    per = 1e6 / run.execs_per_s
    return (f"under afl-fuzz, a fork server that runs nothing (bench/afl_null_server.c, {map_size // 1024} KiB map), "
            f"{seconds} s", f"{run.execs_per_s:,.0f} execs/s",
            f"{per:.0f} µs per input: afl-fuzz's own work and one pipe round trip, the floor any fork server adds to; "
            f"CPU per input: afl-fuzz {run.afl_cpu_us:.0f} µs, the server {run.vmfork_cpu_us:.0f} µs")


def afl_rows(t: Target, args: argparse.Namespace, start: int, end: int) -> list[tuple[str, str, str]]:
    """The afl-fuzz runs, side by side and of the same length: breakpoint edges, then the guest's own map."""
    if args.afl_seconds <= 0 or not shutil.which("afl-fuzz"):
        return []
    rows = [afl_row(t, args.afl_seconds, start, end)]
    if t.afl_image is not None:
        rows.append(afl_row(t, args.afl_seconds, start, end, guest_map=True))
        rows.append(afl_floor_row(args.afl_seconds))
    return rows


def jobs_row(t: Target, seconds: float, rounds: int = 2) -> tuple[str, str, str]:
    """Campaign execs/s of `vmfork fuzz --cover auto` through the CLI with --jobs 1 and --jobs 2, side by side
    (alternating, the best round of each): the summary's execs_per_s, all workers' inputs over the campaign's wall
    time (from the first worker's start to the last one's end; boots excluded, as in one process)."""
    best = {1: 0.0, 2: 0.0}
    per_worker: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        seeds = Path(tmp) / "seeds"
        seeds.mkdir()
        for i, seed in enumerate(t.corpora[0][1]):
            (seeds / f"seed{i}").write_bytes(seed)
        for r in range(rounds):
            for jobs in best:
                out = subprocess.run([sys.executable, "-m", "vmfork.cli", "fuzz", "--kernel", str(t.image),
                                      "--cmdline", t.cmdline, "--corpus", str(seeds), "--out", f"{tmp}/out{r}-{jobs}",
                                      *cli_harness(t), "--cover", "auto", "--budget-ms", str(t.budget_s * 1000),
                                      "--seconds",
                                      str(seconds), "--seed", "1", "--quiet", "--jobs", str(jobs)],
                                     capture_output=True, text=True, check=True, timeout=seconds + 120).stdout
                summary = json.loads(out)
                if summary["execs_per_s"] > best[jobs]:
                    best[jobs] = summary["execs_per_s"]
                    if jobs == 2:
                        per_worker = [w["execs_per_s"] for w in summary["workers"]]
    cpus = len(os.sched_getaffinity(0))
    return (f"campaign through the CLI (`--cover auto`), `--jobs 2` vs `--jobs 1`, {seconds:g} s",
            f"{best[2] / best[1]:.2f}x",
            f"--jobs 1: {best[1]:,.0f} execs/s; --jobs 2: {best[2]:,.0f} execs/s (workers "
            f"{', '.join(f'{x:,.0f}' for x in per_worker)}); best of {rounds} alternating rounds, {cpus} CPUs")


def measure(t: Target, args: argparse.Namespace) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    if args.jobs_only:
        return [jobs_row(t, args.seconds)]
    if args.baseline is not None and not args.afl_only:
        return [baseline_row(t, Path(args.baseline), args.seconds, args.rounds)]
    vm, start, end = ready_vm(t)
    if args.afl_only:
        vm.destroy(tree=True)
        if args.baseline is not None:
            return [afl_baseline_row(t, Path(args.baseline), args.afl_seconds, start, end, args.rounds),
                    afl_floor_row(args.afl_seconds)]
        return afl_rows(t, args, start, end)
    campaign_seeds = list(t.corpora[0][1])
    try:
        with make_fuzzer(t, vm, budget_s=t.budget_s) as fz:
            if fz.execute(t.fixed).outcome != "ok":
                raise SystemExit(f"{t.name}: the fixed input {t.fixed!r} does not run to the end marker")
            # Blocks with the fork's hot pages on (the default) and off (hot_limit 0: every page the input writes
            # is write-protected again at each reset), alternating; the best block of each counts.
            # And the one-call iteration (VM.reset_and_run: reset, input and KVM_RUN in one C call, the default)
            # against the three steps apart, with hot pages on: (hot_limit, compiled_iteration) per block.
            # Each block's thread CPU time too: on a shared host it is what one core of our own would give.
            # And the end marker's `out` left for the next reset to drop (Fuzzer.settle False, the default) against
            # completing it with one more KVM_RUN at every stop: (hot_limit, compiled_iteration, settle) per block.
            default_limit = fz.fork.memory.hot_limit
            # And resets that leave out the parts the guest provably did not touch (VM.reset_and_run's `lean`)
            # against restoring every part: (hot_limit, compiled_iteration, settle, lean_resets).
            modes = [(default_limit, True, False, True), (default_limit, True, False, False),
                     (default_limit, True, True, False), (default_limit, False, True, False), (0, False, True, False)]
            per_input = dict.fromkeys(modes, float("inf"))
            cpu_of = dict.fromkeys(modes, float("inf"))
            reset_of = dict.fromkeys(modes, 0.0)
            n = 1000
            for _ in range(args.rounds):
                for mode in modes:
                    fz.fork.memory.hot_limit, fz.compiled_iteration, fz.settle, fz.lean_resets = mode
                    fz.execute(t.fixed)
                    fz.reset_s = 0.0
                    t0, c0 = time.perf_counter(), time.thread_time()
                    for _ in range(n):
                        fz.execute(t.fixed)
                    per, cpu = (time.perf_counter() - t0) / n, (time.thread_time() - c0) / n
                    cpu_of[mode] = min(cpu_of[mode], cpu)
                    if per < per_input[mode]:
                        per_input[mode], reset_of[mode] = per, fz.reset_s / n
            fz.fork.memory.hot_limit, fz.compiled_iteration, fz.settle, fz.lean_resets = modes[0]
        per, cpu = per_input[modes[0]], cpu_of[modes[0]]
        rows.append((f"one fixed input ({len(t.fixed)} bytes), reset + write + run to the end marker, one call "
                     "(`VM.reset_and_run`, the default)", f"{1 / per:,.0f} execs/s",
                     f"{per * 1e6:,.0f} µs per input; CPU {cpu * 1e6:,.0f} µs per input ({1 / cpu:,.0f}/s of one "
                     f"core); best of {args.rounds} blocks of {n}, alternating with the next four rows"))
        per0, cpu0 = per_input[modes[1]], cpu_of[modes[1]]
        rows.append(("the same, every reset restoring every state part (no lean resets)", f"{1 / per0:,.0f} execs/s",
                     f"{per0 * 1e6:,.0f} µs per input; CPU {cpu0 * 1e6:,.0f} µs per input; lean resets make an "
                     f"input {per0 / per:.2f}x faster (CPU {cpu0 / cpu:.2f}x)"))
        per1, cpu1 = per_input[modes[2]], cpu_of[modes[2]]
        rows.append(("the same, also the end marker's `out` completed at each stop (one more KVM_RUN)",
                     f"{1 / per1:,.0f} execs/s",
                     f"{per1 * 1e6:,.0f} µs per input; CPU {cpu1 * 1e6:,.0f} µs per input; leaving it to the reset "
                     f"is {per1 / per0:.2f}x faster (CPU {cpu1 / cpu0:.2f}x); both changes {per1 / per:.2f}x (CPU "
                     f"{cpu1 / cpu:.2f}x)"))
        per, reset, cpu = per_input[modes[3]], reset_of[modes[3]], cpu_of[modes[3]]
        rows.append(("the same, reset + write + run as three calls", f"{1 / per:,.0f} execs/s",
                     f"{per * 1e6:,.0f} µs per input, of which reset {reset * 1e6:,.0f} µs ({reset / per:.0%}); CPU "
                     f"{cpu * 1e6:,.0f} µs per input; the one call (completing the `out`) is {per / per1:.2f}x faster "
                     f"(CPU {cpu / cpu1:.2f}x)"))
        per_off, reset_off = per_input[modes[4]], reset_of[modes[4]]
        rows.append(("the same, hot pages off (each written page write-protected again at every reset)",
                     f"{1 / per_off:,.0f} execs/s",
                     f"{per_off * 1e6:,.0f} µs per input, of which reset {reset_off * 1e6:,.0f} µs; hot pages make "
                     f"an input {per_off / per:.2f}x faster"))
        if args.fixed_only:
            return rows
        rows += write_rows(t, vm)
        rows.append(faults_row(t, vm))
        for label, cov in (("no coverage", None), ("block coverage of the parser", [(start, end)])):
            with make_fuzzer(t, vm, coverage=cov, budget_s=t.budget_s) as fz:
                st = fz.fuzz(campaign_seeds, seconds=args.seconds, rng_seed=1)
            rows.append((f"campaign, {label}, {args.seconds:g} s", f"{st.execs_per_s:,.0f} execs/s",
                         f"{st.execs} inputs, {st.crashes} crashes ({st.unique_crashes} unique), reset "
                         f"{st.reset_share:.0%} of the time" + (f", {st.blocks_hit}/{st.blocks_total} blocks"
                                                              if cov else "")))
        rows.append(jobs_row(t, args.seconds))
        for label, seeds in t.corpora:
            times, execs, rates = [], [], []
            for rng in range(1, args.runs + 1):
                with make_fuzzer(t, vm, coverage=[(start, end)], budget_s=t.budget_s) as fz:
                    st = fz.fuzz(list(seeds), seconds=BUG_CAP_S, rng_seed=rng, stop_on_crash=True)
                rates.append(st.execs_per_s)
                if st.first_crash_s is not None:
                    times.append(st.first_crash_s)
                    execs.append(st.first_crash_execs or 0)
                else:
                    times.append(float("inf"))
                    execs.append(st.execs)
            found = sum(x != float("inf") for x in times)
            median = statistics.median(times)
            rows.append((f"time to the planted bug from {label} (coverage)",
                         f"{median:.2f} s" if median != float("inf") else f"> {BUG_CAP_S:g} s",
                         f"median of {args.runs} (RNG seeds 1..{args.runs}): {statistics.median(execs):,.0f} "
                         f"inputs at {statistics.median(rates):,.0f} execs/s; found {found}/{args.runs} within "
                         f"{BUG_CAP_S:g} s" + (f", slowest {max(x for x in times if x != float('inf')):.2f} s"
                                                if found else "")))
    finally:
        vm.destroy(tree=True)
    return rows + afl_rows(t, args, start, end)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", choices=("fuzz", "jsmn", "kfx", "all"), default="all")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each throughput campaign")
    ap.add_argument("--runs", type=int, default=5, help="bug-finding runs per seed corpus (RNG seeds 1..N)")
    ap.add_argument("--afl-seconds", type=int, default=15, help="length of the AFL++ run (0: none)")
    ap.add_argument("--afl-only", action="store_true", help="only the afl-fuzz rows")
    ap.add_argument("--jobs-only", action="store_true", help="only the `vmfork fuzz --jobs 1` vs `--jobs 2` row")
    ap.add_argument("--fixed-only", action="store_true", help="only the fixed-input rows (one call vs three calls)")
    ap.add_argument("--baseline", default=None, metavar="TREE",
                    help="only: the jsmn campaign of this tree vs another checkout's (e.g. /work/main), alternating")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (--baseline, the fixed-input rows)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()

    host = f"{platform.node()}, Python {platform.python_version()}"
    all_targets = targets()
    for name in (("fuzz", "jsmn", "kfx") if args.target == "all" else (args.target,)):
        t = all_targets[name]
        rows = measure(t, args)
        if args.markdown:
            print(f"### Fuzzing: `{t.name}` (`bench/fuzz.py`, {host})\n")
            print(f"Target: {t.note}; `{t.image.relative_to(ROOT)}`, command line `{t.cmdline}`.\n")
            print("| measurement | result | notes |")
            print("|---|---:|---|")
            for what, value, note in rows:
                print(f"| {what} | {value} | {note} |")
            print()
        else:
            print(f"fuzzing `{t.name}` on {host}")
            for what, value, note in rows:
                print(f"  {what:<64} {value:>16}   {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
