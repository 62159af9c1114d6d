"""`vmfork demo`, the main job, as a newcomer runs it: every fork's result correct, and the table it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def vmfork(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmfork.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_demo_forks_runs_and_reports(pvh_guest: Path) -> None:
    p = vmfork("demo", "-n", "12", "--kernel", str(pvh_guest))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "correct results             12/12" in out, out
    assert len(re.findall(r"^\s+\d+\s+\S+\s+\d+\s+result: len=\d+ fnv=[0-9a-f]{16} primes=\d+$", out, re.M)) == 12
    for row in ("boot to ready point", "fork (median of 12)", "faster than booting", "reset, once per fork",
                "memory per fork (PSS)"):
        assert row in out, (row, out)


def test_demo_bad_arguments_are_one_line_errors() -> None:
    for args, message in ((["-n", "0"], "--forks must be at least 1"), (["--memory", "1"], "at least 2 MiB"),
                          (["--kernel", "/nonexistent", "-n", "2"], "/nonexistent does not exist")):
        p = vmfork("demo", *args)
        assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
