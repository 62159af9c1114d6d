#!/usr/bin/env python3
"""Campaign throughput in AFL++'s sync-dir layout, side by side in one run: one vmfork worker, two (`--jobs 2`), and
one vmfork worker beside a real `afl-fuzz -S` secondary in the same sync dir (plus afl-fuzz alone, for scale).

    .venv/bin/python bench/campaign.py                  # table on stdout, progress on stderr
    .venv/bin/python bench/campaign.py --markdown --seconds 20 --rounds 2

The target is the jsmn example: vmfork fuzzes jsmn-pvh.elf with breakpoint coverage (`--cover auto`); afl-fuzz
drives `vmfork fuzz --afl` on jsmn-afl-pvh.elf, which keeps its own edge map (`--afl-map auto`). Every
configuration runs for --seconds from a fresh sync dir and the three seeds of guests/jsmn/seeds; rounds interleave
the configurations. execs/s: vmfork's from its summary (inputs / its fuzzing seconds), afl-fuzz's from its
fuzzer_stats (execs_done / run_time, which includes its start-up). `imported`: queue entries each side took from
the other (`sync:` names).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python")
GUESTS = ROOT / "build" / "guests"
SEEDS = ROOT / "guests" / "jsmn" / "seeds"
AFL_ENV = {"AFL_SKIP_BIN_CHECK": "1", "AFL_NO_UI": "1", "AFL_SKIP_CPUFREQ": "1", "AFL_NO_AFFINITY": "1",
           "AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES": "1", "AFL_FORKSRV_INIT_TMOUT": "60000", "AFL_IMPORT_FIRST": "1"}


def progress(msg: str) -> None:
    print(f"[campaign] {msg}", file=sys.stderr, flush=True)


def vmfork_fuzz(sync: Path, name: str, seconds: float, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([PY, "-m", "vmfork.cli", "fuzz", "--kernel", str(GUESTS / "jsmn-pvh.elf"), "--cmdline",
                             "jsmn", "--cover", "auto", "--corpus", str(SEEDS), "--out", str(sync), "--name", name,
                             "--seconds", str(seconds), "--quiet", "--seed", "1", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def afl_fuzz(sync: Path, seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["afl-fuzz", "-i", str(SEEDS), "-o", str(sync), "-S", "other", "-t", "200",
                             "-V", str(int(seconds)), "--", PY, "-m", "vmfork.fuzz", "--afl", "--kernel",
                             str(GUESTS / "jsmn-afl-pvh.elf"), "--cmdline", "jsmn", "--budget-ms", "400",
                             "--afl-map", "auto"], env={**os.environ, **AFL_ENV}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def summary(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"vmfork fuzz failed ({proc.returncode}): {err[-2000:]}")
    return json.loads(out)  # type: ignore[no-any-return]


def afl_rate(instance: Path) -> float:
    fields = {}
    for line in (instance / "fuzzer_stats").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return int(fields["execs_done"]) / max(1, int(fields["run_time"]))


def imported(instance: Path, origin: str) -> int:
    return sum(f",sync:{origin}," in p.name for p in (instance / "queue").iterdir()) if instance.is_dir() else 0


def run(config: str, base: Path, seconds: float) -> dict[str, float]:
    sync = base / config
    shutil.rmtree(sync, ignore_errors=True)
    if config == "1 worker":
        st = summary(vmfork_fuzz(sync, "one", seconds))
        return {"vmfork": float(st["execs_per_s"])}   # type: ignore[arg-type]
    if config == "2 workers":
        st = summary(vmfork_fuzz(sync, "two", seconds, "--jobs", "2"))
        return {"vmfork": float(st["execs_per_s"])}   # type: ignore[arg-type]
    if config == "afl-fuzz alone":
        afl = afl_fuzz(sync, seconds)
        afl.wait(timeout=seconds + 120)
        return {"afl": afl_rate(sync / "other")}
    # 1 worker + afl-fuzz -S: started together, afl-fuzz ends by its -V
    afl = afl_fuzz(sync, seconds)
    native = vmfork_fuzz(sync, "native", seconds, "--main")
    try:
        st = summary(native)
        afl.wait(timeout=seconds + 120)
    finally:
        if afl.poll() is None:
            afl.send_signal(signal.SIGTERM)
            afl.wait()
    return {"vmfork": float(st["execs_per_s"]), "afl": afl_rate(sync / "other"),   # type: ignore[arg-type]
            "into vmfork": imported(sync / "native", "other"), "into afl": imported(sync / "other", "native")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    configs = ["1 worker", "2 workers", "1 worker + afl-fuzz -S"]
    if shutil.which("afl-fuzz") is None:
        progress("afl-fuzz is not installed (Debian: afl++): its rows are left out")
        configs = configs[:2]
    else:
        configs.append("afl-fuzz alone")
    results: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="vmfork-campaign-") as d:
        for r in range(args.rounds):
            for config in configs:
                progress(f"round {r + 1}/{args.rounds}: {config}")
                t0 = time.monotonic()
                results[config].append(run(config, Path(d), args.seconds))
                progress(f"  {results[config][-1]} ({time.monotonic() - t0:.0f} s)")
    base = statistics.median(x["vmfork"] for x in results["1 worker"])
    rows = []
    for config in configs:
        med = {k: statistics.median(x[k] for x in results[config]) for k in results[config][0]}
        vm = f"{med['vmfork']:,.0f} ({med['vmfork'] / base:.2f}x 1 worker)" if "vmfork" in med else "-"
        afl = f"{med['afl']:,.0f}" if "afl" in med else "-"
        total = f"{med.get('vmfork', 0) + med.get('afl', 0):,.0f}"
        sync = f"{med['into vmfork']:.0f} into vmfork, {med['into afl']:.0f} into afl-fuzz" \
            if "into afl" in med else "-"
        rows.append((config, vm, afl, total, sync))
    head = ("configuration", "vmfork execs/s", "afl-fuzz execs/s", "total execs/s", "imported (median)")
    if args.markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        for row in (head, *rows):
            print(f"{row[0]:<24} {row[1]:<24} {row[2]:>16} {row[3]:>14}  {row[4]}")
    print(json.dumps({"load": os.getloadavg(), "seconds": args.seconds, "rounds": args.rounds}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
