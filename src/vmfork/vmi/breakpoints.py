"""Breakpoints and stepping: the `Debugger` (kept here for existing imports; the code lives in vmfork.vmi.debug,
one module per mechanism, and the host-specific stub in vmfork.workarounds.bp_stub)."""

from ..workarounds.bp_stub import (
    ANSWER_ABSENT,
    ANSWER_PASS,
    ANSWER_RESUME,
    INT3,
    STUB_AFTER_IN,
    STUB_CODE,
    STUB_GPA,
    STUB_ORIG,
    STUB_TABLE,
    stub_code,
)
from .debug import Breakpoint, Debugger, GuestInt3Hook, Hit, debugger

__all__ = [
    "ANSWER_ABSENT", "ANSWER_PASS", "ANSWER_RESUME", "INT3", "STUB_AFTER_IN", "STUB_CODE", "STUB_GPA", "STUB_ORIG",
    "STUB_TABLE",
    "Breakpoint", "Debugger", "GuestInt3Hook", "Hit", "debugger", "stub_code",
]
