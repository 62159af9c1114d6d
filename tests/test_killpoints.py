"""Nothing lost under SIGKILL (issue 16, item 5): a few seeded kill points of each kind in CI (the mechanism and
what is checked: tests/killpoints.py; the full 200: bench/killpoints.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_harness import CliHarness
from killpoints import OPS, KillLoop

POINTS = int(os.environ.get("VMFORK_KILL_POINTS", "6"))      # one of each kind; bench/killpoints.py runs 200


@pytest.fixture
def ts(tmp_path: Path, pvh_guest: Path) -> Iterator[CliHarness]:
    with CliHarness(tmp_path, pvh_guest) as t:
        yield t


def test_seeded_kill_points_lose_nothing(ts: CliHarness) -> None:
    result = KillLoop(ts, seed=20).run(POINTS)
    s = result.summary()
    assert s["points"] == POINTS and set(s["by_op"]) == set(OPS[:min(POINTS, len(OPS))]), s
    assert s["inconsistent"] == 0 and s["orphaned"] == 0 and s["partial_complete"] == 0, s
    assert s["cleanup_left"] == 0 and s["saves_restored"] == s["saves_completed"], s
