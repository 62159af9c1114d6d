"""Just enough of ELF (32- and 64-bit, little endian, x86) to load a kernel: program headers and notes."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ....errors import BootError

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
ET_DYN = 3
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
SHT_NOTE = 7
PN_XNUM = 0xFFFF

_EHDR = {ELFCLASS32: struct.Struct("<HHIIIIIHHHHHH"), ELFCLASS64: struct.Struct("<HHIQQQIHHHHHH")}
_PHDR = {ELFCLASS32: struct.Struct("<IIIIIIII"), ELFCLASS64: struct.Struct("<IIQQQQQQ")}
_SHDR = {ELFCLASS32: struct.Struct("<IIIIIIIIII"), ELFCLASS64: struct.Struct("<IIQQQQIIQQ")}
_NHDR = struct.Struct("<III")


@dataclass(frozen=True, slots=True)
class Segment:
    index: int          # in the program header table
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True, slots=True)
class Note:
    name: bytes         # without its NUL terminator
    type: int
    desc: bytes


@dataclass(frozen=True, slots=True)
class ElfImage:
    elf_class: int
    machine: int
    entry: int
    segments: tuple[Segment, ...]        # PT_LOAD only, in program header order
    notes: tuple[Note, ...]              # from PT_NOTE segments and SHT_NOTE sections (duplicates possible)

    def find_note(self, name: bytes, note_type: int) -> Note | None:
        for note in self.notes:
            if note.name == name and note.type == note_type:
                return note
        return None

    def phys_of_virt(self, vaddr: int) -> int:
        """The physical address of a virtual address inside a loaded segment (unchanged when in none)."""
        for seg in self.segments:
            if seg.vaddr <= vaddr < seg.vaddr + seg.memsz:
                return vaddr - seg.vaddr + seg.paddr
        return vaddr


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def _parse_notes(data: bytes, start: int, size: int, align: int) -> list[Note]:
    """Notes in data[start:start+size]; a malformed tail is ignored (other note sources may still be fine)."""
    notes: list[Note] = []
    end = min(start + size, len(data))
    pos = start
    pad = 8 if align == 8 else 4
    while pos + _NHDR.size <= end:
        namesz, descsz, note_type = _NHDR.unpack_from(data, pos)
        name_at = pos + _NHDR.size
        desc_at = name_at + (namesz + pad - 1) // pad * pad
        next_at = desc_at + (descsz + pad - 1) // pad * pad
        if desc_at + descsz > end:
            break
        notes.append(Note(data[name_at:name_at + namesz].rstrip(b"\0"), note_type, data[desc_at:desc_at + descsz]))
        pos = next_at
    return notes


def parse_elf(data: bytes, path: str) -> ElfImage:
    """Parse an x86 ELF executable; BootError names `path` and the problem."""

    def fail(message: str) -> BootError:
        return BootError(f"{path}: {message}")

    if len(data) < 16:
        raise fail(f"truncated file: {len(data)} bytes is too short for an ELF header")
    if data[:4] != ELF_MAGIC:
        raise fail(f"not an ELF file (wrong magic {data[:4].hex()}, expected 7f454c46)")
    elf_class, encoding = data[4], data[5]
    if elf_class not in _EHDR:
        raise fail(f"bad ELF class {elf_class} (expected 1 for ELF32 or 2 for ELF64)")
    if encoding != ELFDATA2LSB:
        raise fail(f"bad ELF data encoding {encoding} (expected 1, little endian)")
    ehdr = _EHDR[elf_class]
    if len(data) < 16 + ehdr.size:
        raise fail(f"truncated file: {len(data)} bytes is too short for an ELF{32 * elf_class} header")
    (e_type, machine, _version, entry, phoff, shoff, _flags, _ehsize, phentsize, phnum, shentsize, shnum,
     _shstrndx) = ehdr.unpack_from(data, 16)
    if machine not in (EM_386, EM_X86_64):
        raise fail(f"bad ELF machine {machine} (expected {EM_386} for i386 or {EM_X86_64} for x86-64)")
    if e_type not in (ET_EXEC, ET_DYN):
        raise fail(f"ELF type {e_type} is not an executable (expected {ET_EXEC}, ET_EXEC)")

    phdr, shdr = _PHDR[elf_class], _SHDR[elf_class]
    sections: list[tuple[int, ...]] = []
    if shoff and shentsize == shdr.size:
        first_count = shnum or 1
        if shoff + first_count * shdr.size <= len(data):
            sec0 = shdr.unpack_from(data, shoff)
            if shnum == 0:       # extended numbering: the count is in section 0's sh_size
                shnum = sec0[5]
            if phnum == PN_XNUM:
                phnum = sec0[7]
            if shoff + shnum * shdr.size <= len(data):
                sections = [shdr.unpack_from(data, shoff + i * shdr.size) for i in range(shnum)]
    if phnum == 0:
        raise fail("the ELF file has no program headers")
    if phentsize != phdr.size:
        raise fail(f"ELF program header size {phentsize} is wrong (expected {phdr.size})")
    if phoff + phnum * phdr.size > len(data):
        raise fail(f"truncated file: the program header table ends at {phoff + phnum * phdr.size:#x}, "
                   f"past the end of the file ({len(data):#x})")

    segments: list[Segment] = []
    notes: list[Note] = []
    for i in range(phnum):
        fields = phdr.unpack_from(data, phoff + i * phdr.size)
        if elf_class == ELFCLASS32:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _p_flags, p_align = fields
        else:
            p_type, _p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = fields
        if p_type in (PT_LOAD, PT_NOTE) and p_offset + p_filesz > len(data):
            raise fail(f"truncated file: ELF segment {i} needs file bytes up to {p_offset + p_filesz:#x} "
                       f"but the file has {len(data):#x}")
        if p_type == PT_LOAD:
            if p_filesz > p_memsz:
                raise fail(f"ELF segment {i} has a file size {p_filesz:#x} larger than its memory size {p_memsz:#x}")
            if p_memsz:
                segments.append(Segment(i, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz))
        elif p_type == PT_NOTE:
            notes += _parse_notes(data, p_offset, p_filesz, p_align)
    for sec in sections:
        sh_type, sh_offset, sh_size, sh_addralign = sec[1], sec[4], sec[5], sec[8]
        if sh_type == SHT_NOTE and sh_offset + sh_size <= len(data):
            notes += _parse_notes(data, sh_offset, sh_size, sh_addralign)
    return ElfImage(elf_class, machine, entry, tuple(segments), tuple(notes))
