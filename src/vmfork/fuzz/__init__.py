"""Fuzzing on forks (KF/x style): a parent paused at its ready marker, a sink fork with crash and coverage
breakpoints, a fuzz fork reset per input. See `loop.Fuzzer`; `vmfork fuzz` is the command (`cli.py`)."""

from .coverage import Coverage, basic_blocks
from .loop import Fuzzer, FuzzError, Result, Stats, save_crash
from .mutate import Mutator

__all__ = ["Coverage", "FuzzError", "Fuzzer", "Mutator", "Result", "Stats", "basic_blocks", "save_crash"]
