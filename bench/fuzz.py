"""Fuzzing on forks (issue 6): execs/s on the example target, time to find its planted bug, reset cost per input.

    .venv/bin/python bench/fuzz.py [--seconds 5] [--runs 5] [--markdown]

The target is the `fuzz` test guest (guests/README.md): a CPL3 parser whose "FUZZ" + 'B' record with a nonzero
bank writes outside the mapped memory (#PF). One core: the fuzz fork runs inline in this process.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vmfork.fork import VM  # noqa: E402
from vmfork.fuzz import Fuzzer  # noqa: E402

GUEST = ROOT / "build" / "guests" / "testguest-pvh.elf"


def ready_vm() -> tuple[VM, int, int]:
    vm = VM.create(memory_mib=64, name="bench-fuzz")
    vm.load_kernel(GUEST, cmdline="fuzz")
    ev = vm.run(timeout=60)
    if ev.reason != "harness-start":
        raise SystemExit(f"the fuzz guest did not reach its ready marker: {ev}")
    m = re.search(rb"parse=(0x[0-9a-f]+) end=(0x[0-9a-f]+)", vm.device("serial0").output())
    assert m
    return vm, int(m.group(1), 16), int(m.group(2), 16)


def afl_row(seconds: int, start: int, end: int) -> tuple[str, str, str]:
    """execs/s under the real afl-fuzz (fork-server mode, persistent block breakpoints feeding its edge map)."""
    env = {**os.environ, "AFL_SKIP_BIN_CHECK": "1", "AFL_NO_UI": "1", "AFL_SKIP_CPUFREQ": "1",
           "AFL_NO_AFFINITY": "1", "AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES": "1", "AFL_FORKSRV_INIT_TMOUT": "60000"}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "in").mkdir()
        (Path(tmp) / "in" / "seed").write_bytes(b"FUZZA\x00")
        subprocess.run(["afl-fuzz", "-i", f"{tmp}/in", "-o", f"{tmp}/out", "-t", "200", "-V", str(seconds), "--",
                        sys.executable, "-m", "vmfork.fuzz", "--afl", "--kernel", str(GUEST), "--budget-ms", "400",
                        "--cover", f"{start:#x}-{end:#x}"], env=env, capture_output=True, check=True,
                       timeout=seconds + 120)
        text = (Path(tmp) / "out/default/fuzzer_stats").read_text()
        stats = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}
        execs = int(stats["execs_done"])
        crashes = int(stats["saved_crashes"])
    return (f"under afl-fuzz (AFL++ fork server), {seconds} s", f"{execs / seconds:,.0f} execs/s",
            f"{execs} inputs incl. start-up, {crashes} crashes saved; every block hit is two exits (edge map)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each throughput campaign")
    ap.add_argument("--runs", type=int, default=5, help="bug-finding runs per seed corpus (RNG seeds 1..N)")
    ap.add_argument("--afl-seconds", type=int, default=15, help="length of the AFL++ run (0: none)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()

    rows: list[tuple[str, str, str]] = []
    vm, start, end = ready_vm()
    try:
        with Fuzzer(vm) as fz:
            t = time.perf_counter()
            n = 2000
            for _ in range(n):
                fz.execute(b"FUZZA\x01C\x00")
            per = (time.perf_counter() - t) / n
            fz.reset_s = 0.0
            for _ in range(n):
                fz.execute(b"FUZZA\x01C\x00")
            reset = fz.reset_s / n
        rows.append(("one fixed input, reset + write + run to the end marker", f"{1 / per:,.0f} execs/s",
                     f"{per * 1e6:,.0f} µs per input, of which reset {reset * 1e6:,.0f} µs ({reset / per:.0%})"))
        for label, cov in (("no coverage", None), ("block coverage of the parser", [(start, end)])):
            with Fuzzer(vm, coverage=cov) as fz:
                st = fz.fuzz([b"FUZZA\x00"], seconds=args.seconds, rng_seed=1)
            rows.append((f"campaign, {label}, {args.seconds:g} s", f"{st.execs_per_s:,.0f} execs/s",
                         f"{st.execs} inputs, {st.crashes} crashes ({st.unique_crashes} unique), reset "
                         f"{st.reset_share:.0%} of the time" + (f", {st.blocks_hit}/{st.blocks_total} blocks"
                                                              if cov else "")))
        for seed in (b"FUZZA\x00", b"hello!"):
            times, execs = [], []
            for rng in range(1, args.runs + 1):
                with Fuzzer(vm, coverage=[(start, end)]) as fz:
                    st = fz.fuzz([seed], seconds=60, rng_seed=rng, stop_on_crash=True)
                if st.first_crash_s is None:
                    raise SystemExit(f"no crash within 60 s from {seed!r} (RNG seed {rng})")
                times.append(st.first_crash_s)
                execs.append(st.first_crash_execs or 0)
            rows.append((f"time to the planted bug from {seed!r} (coverage)",
                         f"{statistics.median(times):.2f} s",
                         f"median of {args.runs} (RNG seeds 1..{args.runs}): {statistics.median(execs):,.0f} "
                         f"inputs; slowest {max(times):.2f} s"))
    finally:
        vm.destroy(tree=True)
    if args.afl_seconds > 0 and shutil.which("afl-fuzz"):
        rows.append(afl_row(args.afl_seconds, start, end))

    host = f"{platform.node()}, Python {platform.python_version()}"
    if args.markdown:
        print(f"### Fuzzing (`bench/fuzz.py`, {host})\n")
        print("| measurement | result | notes |")
        print("|---|---:|---|")
        for name, value, note in rows:
            print(f"| {name} | {value} | {note} |")
    else:
        print(f"fuzzing on {host}")
        for name, value, note in rows:
            print(f"  {name:<58} {value:>16}   {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
