"""Crash sinks: where a target's crash paths start, as breakpoints the fuzzer counts as crashes.

Explicit sinks (`--sink ADDR|SYMBOL`) must all exist: a name the symbols do not have is a one-line error before
fuzzing starts. For a Linux guest (a symbol table with `start_kernel`: its System.map or vmlinux) the fuzzer adds
a default list, after KF/x's: the panic, oops and BUG paths, the sanitizer reports (KASAN, KMSAN, UBSAN, KCSAN,
KFENCE), the general protection and page fault handlers. The ones this kernel lacks are skipped silently (a kernel
built without KASAN has no kasan_report).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..vmi.symbols import SymbolTable
from .errors import FuzzError

__all__ = ["LINUX_SINKS", "is_linux", "linux_sinks", "resolve_sinks"]

LINUX_SINKS = (
    "panic", "oops_begin", "__die", "die", "report_bug", "do_trap", "__warn",
    "kasan_report", "kasan_report_invalid_free", "__kasan_report",
    "kmsan_report", "kcsan_report", "kfence_report_error",
    "ubsan_prologue", "__ubsan_handle_out_of_bounds", "__ubsan_handle_shift_out_of_bounds",
    "__ubsan_handle_divrem_overflow", "__ubsan_handle_load_invalid_value", "__ubsan_handle_type_mismatch_v1",
    "__ubsan_handle_alignment_assumption", "__ubsan_handle_builtin_unreachable",
    "asm_exc_page_fault", "page_fault", "asm_exc_general_protection", "asm_exc_invalid_op",
    "asm_exc_divide_error", "asm_exc_double_fault",
)


def is_linux(symbols: SymbolTable | None) -> bool:
    return symbols is not None and "start_kernel" in symbols


def linux_sinks(symbols: SymbolTable) -> list[str]:
    """The default Linux sinks this kernel has (by name, in LINUX_SINKS order)."""
    return [name for name in LINUX_SINKS if name in symbols]


def resolve_sinks(explicit: Sequence[str], symbols: SymbolTable | None, *, defaults: bool = True) -> list[str]:
    """The sinks to arm: every explicit one (FuzzError naming the first that is neither an address nor a symbol),
    then, for a Linux symbol table and `defaults`, the default ones it has that are not explicit already."""
    out: list[str] = []
    for where in explicit:
        try:
            int(where, 0)
        except ValueError:
            if symbols is None:
                raise FuzzError(f"--sink {where}: not an address, and no --symbols to look it up in") from None
            try:
                symbols.address(where)
            except Exception as e:
                raise FuzzError(f"--sink {where}: {e}") from None
        out.append(where)
    if defaults and symbols is not None and is_linux(symbols):
        out += [name for name in linux_sinks(symbols) if name not in out]
    return out
