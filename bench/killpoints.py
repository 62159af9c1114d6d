#!/usr/bin/env python3
"""Nothing lost under SIGKILL: the seeded loop of kill points during save, fork-vm, create, restore, destroy and
registry transactions (issue 16, item 5; what each point does and what is checked: tests/killpoints.py).

    .venv/bin/python bench/killpoints.py                      # 200 points, seed 16; progress on stderr
    .venv/bin/python bench/killpoints.py --points 50 --seed 3
    .venv/bin/python bench/killpoints.py --markdown           # the row for docs/benchmarks.md

Exit status 1 if anything was inconsistent, orphaned, passed for complete or left behind.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from cli_harness import CliHarness  # noqa: E402
from killpoints import KillLoop, KillResult  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=200)
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    kernel = ROOT / "build" / "guests" / "testguest-pvh.elf"
    if not kernel.exists():
        print(f"{kernel} is missing: run ./dev setup", file=sys.stderr)
        return 2

    def progress(i: int, op: str, r: KillResult) -> None:
        print(f"\r{i + 1}/{args.points} {op:<9} inconsistent {len(r.inconsistent)} orphaned {len(r.orphaned)}",
              end="", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="vmfork-kill-") as d, CliHarness(Path(d), kernel) as ts:
        result = KillLoop(ts, seed=args.seed).run(args.points, progress)
    print(file=sys.stderr)
    s = result.summary()
    if args.markdown:
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        ops = ", ".join(f"{k} {v}" for k, v in sorted(s["by_op"].items()))
        print(f"| {s['points']} (seed {args.seed}; {ops}) | {s['inconsistent']} | {s['orphaned']} | "
              f"{s['partial_complete']} | {s['saves_restored']}/{s['saves_completed']} | {s['cleanup_left']} | "
              f"{s['seconds']:.0f} s, {when} |")
    else:
        print(json.dumps(s, indent=2))
    bad = s["inconsistent"] or s["orphaned"] or s["partial_complete"] or s["cleanup_left"] or \
        s["saves_restored"] != s["saves_completed"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
