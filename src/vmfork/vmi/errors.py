"""Errors of the introspection layer. All are `VmforkError`s with a message naming the problem."""

from __future__ import annotations

from ..errors import MemoryAccessError, VmforkError

__all__ = ["BreakpointError", "MemoryAccessError", "NonCanonicalAddress", "SteppingError", "SymbolError",
           "TranslationError", "UnmappedAddress", "VcpuIndexError", "VmiError"]


class VmiError(VmforkError):
    """Base of the introspection errors."""


class VcpuIndexError(VmiError):
    """A vCPU index the machine does not have."""


class TranslationError(VmiError, MemoryAccessError):
    """A guest-virtual address has no translation. `level` names the paging level where the walk stopped
    ("PML4", "PD", ...; "canonical" for a non-canonical address), `walk` holds the levels walked so far."""

    def __init__(self, message: str, vaddr: int, level: str, walk: tuple[object, ...] = ()) -> None:
        super().__init__(message)
        self.vaddr = vaddr
        self.level = level
        self.walk = walk


class UnmappedAddress(TranslationError):
    """The walk found a non-present entry (or a table outside guest RAM)."""


class NonCanonicalAddress(TranslationError):
    """A 64-bit address whose upper bits are not a sign extension of the top translated bit."""


class SymbolError(VmiError):
    """A symbol file cannot be read, or a name is not in it."""


class BreakpointError(VmiError):
    """A breakpoint cannot be set, removed or handled."""


class SteppingError(BreakpointError):
    """An instruction cannot be stepped over with the mechanism this host allows."""
