"""Symbols: names to addresses and back, from an ELF symbol table or a text symbol map.

Sources, detected from the content:
- ELF (32- or 64-bit, little-endian): `.symtab`, else `.dynsym`; functions, objects and untyped symbols with a
  section (section and file symbols, and undefined ones, are skipped). A guest kernel's `vmlinux`, a user program.
- text maps: `System.map` and `nm` output (`ADDRESS TYPE NAME`, or `ADDRESS SIZE TYPE NAME` from `nm -S`), and
  nasm map files (`[map symbols FILE]`: the `Real Virtual Name` rows; vmfork's test guest is built with nasm).

`bias` is added to every address (a position-independent program loaded at a base address).
"""

from __future__ import annotations

import bisect
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import SymbolError

__all__ = ["Symbol", "SymbolTable", "load_symbols"]

SHT_SYMTAB = 2
SHT_DYNSYM = 11
STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION, STT_FILE = 0, 1, 2, 3, 4
_KINDS = {STT_NOTYPE: "notype", STT_OBJECT: "object", STT_FUNC: "func"}


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    address: int
    size: int = 0           # 0: unknown (text maps), the next symbol bounds it
    kind: str = "notype"    # func, object, notype


class SymbolTable:
    """Symbols sorted by address. `address("name")`, `lookup(addr)` (the symbol containing or nearest below),
    `describe(addr)` ("name+0x12")."""

    def __init__(self, symbols: Iterable[Symbol] = (), *, source: str = "") -> None:
        self.source = source
        self._by_name: dict[str, Symbol] = {}
        for sym in symbols:
            old = self._by_name.get(sym.name)
            # Prefer functions and sized symbols when a name repeats (local symbols of several files).
            if old is None or (old.kind != "func" and sym.kind == "func") or (not old.size and sym.size):
                self._by_name[sym.name] = sym
        self._sorted = sorted(self._by_name.values(), key=lambda x: (x.address, x.kind != "func", x.name))
        self._addrs = [x.address for x in self._sorted]

    def __len__(self) -> int:
        return len(self._sorted)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._sorted)

    @property
    def names(self) -> list[str]:
        return [x.name for x in self._sorted]

    def get(self, name: str) -> Symbol | None:
        return self._by_name.get(name)

    def address(self, expr: str) -> int:
        """The address of `name`, `name+offset` or `name-offset` (offset decimal or 0x hex)."""
        m = re.fullmatch(r"\s*([^\s+-]+)\s*(?:([+-])\s*(0[xX][0-9a-fA-F]+|\d+))?\s*", expr)
        if not m:
            raise SymbolError(f"cannot read symbol expression {expr!r}")
        name, sign, off = m.groups()
        sym = self._by_name.get(name)
        if sym is None:
            close = sorted(n for n in self._by_name if name.lower() in n.lower())[:5]
            hint = f" (similar: {', '.join(close)})" if close else ""
            raise SymbolError(f"no symbol {name!r} in {self.source or 'the symbol table'}{hint}")
        delta = int(off, 0) if off else 0
        return sym.address + (-delta if sign == "-" else delta)

    def lookup(self, address: int, *, max_distance: int = 1 << 20) -> tuple[Symbol, int] | None:
        """(symbol, offset) for the symbol at or below `address`: within its size when known, else within
        `max_distance` and before the next symbol."""
        i = bisect.bisect_right(self._addrs, address) - 1
        if i < 0:
            return None
        # several symbols may share the address: the first in sort order (a function) wins
        j = bisect.bisect_left(self._addrs, self._addrs[i])
        sym = self._sorted[j]
        off = address - sym.address
        if sym.size:
            if off >= sym.size:
                return None
        elif off > max_distance:
            return None
        return sym, off

    def describe(self, address: int) -> str:
        """"name+0x1c" (or "name"), or the hex address when no symbol covers it."""
        found = self.lookup(address)
        if found is None:
            return f"{address:#x}"
        sym, off = found
        return sym.name if off == 0 else f"{sym.name}+{off:#x}"

    def merged(self, other: SymbolTable) -> SymbolTable:
        return SymbolTable([*self._sorted, *other._sorted], source=f"{self.source}, {other.source}")

    # --- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def from_elf(cls, data: bytes, *, bias: int = 0, source: str = "ELF") -> SymbolTable:
        if data[:4] != b"\x7fELF":
            raise SymbolError(f"{source}: not an ELF file")
        ei_class, ei_data = data[4], data[5]
        if ei_data != 1:
            raise SymbolError(f"{source}: big-endian ELF is not supported")
        try:
            if ei_class == 2:
                (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
                e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)
                shdr = struct.Struct("<IIQQQQIIQQ")
                sym_fmt = struct.Struct("<IBBHQQ")
            elif ei_class == 1:
                (e_shoff,) = struct.unpack_from("<I", data, 0x20)
                e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x2E)
                shdr = struct.Struct("<IIIIIIIIII")
                sym_fmt = struct.Struct("<IIIBBH")
            else:
                raise SymbolError(f"{source}: unknown ELF class {ei_class}")
            if e_shoff == 0:
                raise SymbolError(f"{source}: the ELF file has no section headers (so no symbol table)")
            if e_shnum == 0:        # extended numbering: the count is in section 0's sh_size
                e_shnum = shdr.unpack_from(data, e_shoff)[5]
            sections = [shdr.unpack_from(data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
        except struct.error:
            raise SymbolError(f"{source}: truncated ELF headers") from None
        # fields: name, type, flags, addr, offset, size, link, info, addralign, entsize
        tables = [sec for sec in sections if sec[1] == SHT_SYMTAB] or [sec for sec in sections if sec[1] == SHT_DYNSYM]
        if not tables:
            raise SymbolError(f"{source}: the ELF file has no symbol table (stripped?)")
        out: list[Symbol] = []
        for sec in tables:
            offset, size, link = sec[4], sec[5], sec[6]
            if link >= len(sections):
                raise SymbolError(f"{source}: symbol table links to missing section {link}")
            str_off, str_size = sections[link][4], sections[link][5]
            strtab = data[str_off:str_off + str_size]
            for pos in range(offset, offset + size - sym_fmt.size + 1, sym_fmt.size):
                if ei_class == 2:
                    st_name, st_info, _other, shndx, value, sz = sym_fmt.unpack_from(data, pos)
                else:
                    st_name, value, sz, st_info, _other, shndx = sym_fmt.unpack_from(data, pos)
                kind = st_info & 0xF
                if shndx == 0 or kind not in _KINDS or st_name == 0:
                    continue
                end = strtab.find(b"\0", st_name)
                name = strtab[st_name:end if end >= 0 else None].decode(errors="replace")
                if name:
                    out.append(Symbol(name, value + bias, sz, _KINDS[kind]))
        return cls(out, source=source)

    @classmethod
    def from_text(cls, text: str, *, bias: int = 0, source: str = "symbol map") -> SymbolTable:
        out: list[Symbol] = []
        nasm_rows = False
        for line in text.splitlines():
            words = line.split()
            if not words:
                continue
            if words[:3] == ["Real", "Virtual", "Name"]:
                nasm_rows = True
                continue
            if line.startswith("--"):
                nasm_rows = False
                continue
            try:
                if nasm_rows and len(words) == 3:
                    out.append(Symbol(words[2], int(words[1], 16) + bias))
                elif not nasm_rows and len(words) == 3 and len(words[1]) == 1:
                    if words[1] in "UuwvN":
                        continue
                    kind = "func" if words[1] in "Tt" else "object" if words[1] in "DdBbRr" else "notype"
                    out.append(Symbol(words[2], int(words[0], 16) + bias, 0, kind))
                elif not nasm_rows and len(words) == 4 and len(words[2]) == 1:
                    kind = "func" if words[2] in "Tt" else "object" if words[2] in "DdBbRr" else "notype"
                    out.append(Symbol(words[3], int(words[0], 16) + bias, int(words[1], 16), kind))
            except ValueError:
                continue
        if not out:
            raise SymbolError(f"{source}: no symbols found (expected an ELF file, System.map/nm output or a nasm "
                              "map file)")
        return cls(out, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, bias: int = 0) -> SymbolTable:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise SymbolError(f"cannot read symbols from {os.fspath(path)}: {e.strerror}") from None
        name = os.path.basename(os.fspath(path))
        if data[:4] == b"\x7fELF":
            return cls.from_elf(data, bias=bias, source=name)
        return cls.from_text(data.decode(errors="replace"), bias=bias, source=name)


def load_symbols(*paths: str | os.PathLike[str], bias: int = 0) -> SymbolTable:
    """One table from several files (e.g. a kernel and a user program)."""
    if not paths:
        return SymbolTable()
    table = SymbolTable.load(paths[0], bias=bias)
    for p in paths[1:]:
        table = table.merged(SymbolTable.load(p, bias=bias))
    return table
