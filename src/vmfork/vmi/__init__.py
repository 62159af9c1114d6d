"""Introspection: read and change any machine from outside, breakpoints and stepping, a fork's diff, a GDB server.

    from vmfork import vmi
    vmi.read_virt(vm, 0x101000, 64)              # through the guest's page tables (vCPU 0)
    print(vmi.translate(vm, 0x10a391).describe())
    vmi.set_register(vm, "rdi", 5)
    dbg = vmi.debugger(vm, symbols=vmi.load_symbols("guest.map"))
    dbg.add_breakpoint("vmi_target", callback=print)
    print(vmi.diff(fork).text())
    vmi.serve_gdb(vm, port=1234)

Everything works on a `Target` (vmfork.vmi.target): an in-process machine now, a domain behind a control socket
later. `vmfork.vmi.commands` has the same operations as functions returning printable text, for the CLI.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .breakpoints import Breakpoint, Debugger, Hit, debugger
    from .diff import ForkDiff, PageDiff, RegisterDiff, diff
    from .disasm import Instruction, disassemble, format_disassembly
    from .errors import (
                         BreakpointError,
                         NonCanonicalAddress,
                         SteppingError,
                         SymbolError,
                         TranslationError,
                         UnmappedAddress,
                         VcpuIndexError,
                         VmiError,
    )
    from .gdbserver import GdbServer, serve_gdb
    from .memory import AddressSpace, Translation, hexdump, read_phys, read_virt, translate, write_phys, write_virt
    from .regs import format_regs, get_register, set_register
    from .symbols import Symbol, SymbolTable, load_symbols
    from .target import LocalTarget, Target, as_target

__all__ = [
    "AddressSpace", "Breakpoint", "BreakpointError", "Debugger", "ForkDiff", "GdbServer", "Hit", "Instruction",
    "LocalTarget", "NonCanonicalAddress", "PageDiff", "RegisterDiff", "SteppingError", "Symbol", "SymbolError",
    "SymbolTable", "Target", "Translation", "TranslationError", "UnmappedAddress", "VcpuIndexError", "VmiError",
    "as_target", "debugger", "diff", "disassemble", "format_disassembly", "format_regs", "get_register", "hexdump",
    "load_symbols", "read_phys", "read_virt", "serve_gdb", "set_register", "translate", "write_phys", "write_virt",
]

_EXPORTS = {
    "Breakpoint": "breakpoints", "Debugger": "breakpoints", "Hit": "breakpoints", "debugger": "breakpoints",
    "ForkDiff": "diff", "PageDiff": "diff", "RegisterDiff": "diff", "diff": "diff",
    "Instruction": "disasm", "disassemble": "disasm", "format_disassembly": "disasm",
    "BreakpointError": "errors", "NonCanonicalAddress": "errors", "SteppingError": "errors", "SymbolError": "errors",
    "TranslationError": "errors", "UnmappedAddress": "errors", "VcpuIndexError": "errors", "VmiError": "errors",
    "GdbServer": "gdbserver", "serve_gdb": "gdbserver",
    "AddressSpace": "memory", "Translation": "memory", "hexdump": "memory", "read_phys": "memory",
    "read_virt": "memory", "translate": "memory", "write_phys": "memory", "write_virt": "memory",
    "format_regs": "regs", "get_register": "regs", "set_register": "regs",
    "Symbol": "symbols", "SymbolTable": "symbols", "load_symbols": "symbols",
    "LocalTarget": "target", "Target": "target", "as_target": "target",
}
assert set(_EXPORTS) == set(__all__)
__getattr__ = lazy_exports(__name__, _EXPORTS)
