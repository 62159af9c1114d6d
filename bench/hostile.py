"""The hostile guest for longer (issue 16): 10 minutes of random port/MMIO writes, UART resets and console floods.

    .venv/bin/python bench/hostile.py [--seconds 600] [--seed 1]

The loop of tests/test_hostile_guest.py (reset, seed, run to the end marker, exit, crash or timeout; repeat), then
the same round-trip checks, and the numbers: accesses the guest completed per second, runs and how they ended, the
process's peak RSS and the unknown-MMIO table's size.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from test_hostile_guest import _digest, attack, boot_hostile  # noqa: E402
from vmfork.snapshot import restore, save  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    parent, buf = boot_hostile(ROOT / "build" / "guests" / "testguest-pvh.elf")
    fork = parent.fork()
    fork_point = _digest(fork)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = attack(fork, buf, seconds=args.seconds, first_seed=args.seed, flood=64 << 20)
    attacked = _digest(fork)
    child = fork.fork()
    ok_fork = _digest(child) == attacked
    child.destroy()
    with tempfile.TemporaryDirectory() as tmp:
        save(fork, Path(tmp) / "a.sav")
        back = restore(Path(tmp) / "a.sav")
        ok_restore = _digest(back) == attacked
        back.destroy()
    fork.reset()
    ok_reset = _digest(fork) == fork_point
    print(json.dumps({"seconds": round(r.seconds, 1), "runs": r.runs, "accesses": r.accesses,
                      "accesses_per_second": round(r.per_second), "outcomes": r.outcomes,
                      "rss_kib_start": rss0, "rss_kib_peak": r.max_rss_kib, "unknown_mmio_entries": r.unknown_mmio,
                      "fork_exact": ok_fork, "save_restore_exact": ok_restore, "reset_exact": ok_reset}, indent=1))
    parent.destroy(tree=True)
    if not (ok_fork and ok_restore and ok_reset):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
