"""The fuzzer's error (a leaf module: the harness, PMU and loop modules all raise it)."""

from __future__ import annotations

from ..errors import VmforkError

__all__ = ["FuzzError"]


class FuzzError(VmforkError):
    """A fuzzing setup or run that cannot go on; the message names what and why, on one line."""
