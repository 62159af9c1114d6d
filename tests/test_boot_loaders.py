"""The x86 boot loaders (vmfork.arch.x86.boot): images are built here with struct, loaded into a fake RAM, and every
structure the loader wrote is parsed back. Real guest images under build/ are loaded too when they exist."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from vmfork.arch.x86 import layout
from vmfork.arch.x86.boot import EntryState, load_kernel
from vmfork.arch.x86.boot import gdt as gdt_mod
from vmfork.arch.x86.boot.elf import parse_elf
from vmfork.arch.x86.boot.linux import page_tables
from vmfork.arch.x86.boot.pvh import pvh_entry
from vmfork.errors import BootError, ConfigError, MemoryAccessError

MiB = 1 << 20
GiB = 1 << 30
ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096


class FakeRam:
    """Sparse guest RAM laid out like layout.ram_regions: pages exist once written."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.regions = layout.ram_regions(size)
        self.pages: dict[int, bytearray] = {}

    def _check(self, gpa: int, n: int) -> None:
        if not any(r <= gpa and gpa + n <= r + s for r, s in self.regions):
            raise MemoryAccessError(f"guest-physical address {gpa:#x} is outside guest RAM")

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        self._check(gpa, len(src))
        pos = 0
        while pos < len(src):
            page, off = divmod(gpa + pos, PAGE)
            n = min(PAGE - off, len(src) - pos)
            buf = self.pages.get(page)
            if buf is None:
                buf = self.pages[page] = bytearray(PAGE)
            buf[off:off + n] = src[pos:pos + n]
            pos += n

    def read(self, gpa: int, n: int) -> bytes:
        self._check(gpa, n)
        out = bytearray()
        while len(out) < n:
            page, off = divmod(gpa + len(out), PAGE)
            k = min(PAGE - off, n - len(out))
            buf = self.pages.get(page)
            out += buf[off:off + k] if buf is not None else bytes(k)
        return bytes(out)

    def u8(self, gpa: int) -> int:
        return self.read(gpa, 1)[0]

    def u16(self, gpa: int) -> int:
        return int(struct.unpack("<H", self.read(gpa, 2))[0])

    def u32(self, gpa: int) -> int:
        return int(struct.unpack("<I", self.read(gpa, 4))[0])

    def u64(self, gpa: int) -> int:
        return int(struct.unpack("<Q", self.read(gpa, 8))[0])

    def cstr(self, gpa: int) -> bytes:
        out = b""
        while (c := self.read(gpa + len(out), 1)) != b"\0":
            out += c
        return out


# --- image builders -------------------------------------------------------------------------------------------------

def note(name: bytes, note_type: int, desc: bytes, align: int = 4) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % align)
    return struct.pack("<III", len(name) + 1, len(desc), note_type) + pad(name + b"\0") + pad(desc)


def pvh_note(entry: int, size: int = 4) -> bytes:
    return note(b"Xen", 18, entry.to_bytes(size, "little"))


def make_elf(segments: Sequence[tuple[int, int, bytes, int]], *, entry: int, elf_class: int = 1,
             machine: int | None = None, phdr_notes: bytes = b"", section_notes: bytes = b"", e_type: int = 2,
             tail: bytes = b"") -> bytes:
    """segments: (paddr, vaddr, file bytes, memsz). Notes go in a PT_NOTE segment and/or an SHT_NOTE section."""
    is64 = elf_class == 2
    machine = machine if machine is not None else (62 if is64 else 3)
    ehdr_size, phent, shent = (64, 56, 64) if is64 else (52, 32, 40)
    nph = len(segments) + (1 if phdr_notes else 0)
    body = bytearray()
    data_start = ehdr_size + nph * phent
    phdrs = bytearray()

    def add(blob: bytes) -> int:
        off = data_start + len(body)
        body.extend(blob)
        body.extend(bytes(-len(body) % 16))
        return off

    for paddr, vaddr, blob, memsz in segments:
        off = add(blob)
        if is64:
            phdrs += struct.pack("<IIQQQQQQ", 1, 5, off, vaddr, paddr, len(blob), memsz, 0x1000)
        else:
            phdrs += struct.pack("<IIIIIIII", 1, off, vaddr, paddr, len(blob), memsz, 5, 0x1000)
    if phdr_notes:
        off = add(phdr_notes)
        if is64:
            phdrs += struct.pack("<IIQQQQQQ", 4, 4, off, 0, 0, len(phdr_notes), len(phdr_notes), 4)
        else:
            phdrs += struct.pack("<IIIIIIII", 4, off, 0, 0, len(phdr_notes), len(phdr_notes), 4, 4)
    sh_off, shnum = 0, 0
    shdrs = bytearray()
    if section_notes:
        off = add(section_notes)
        sh_off = data_start + len(body) + len(tail) + (-len(tail) % 16)
        if is64:
            shdrs += bytes(64) + struct.pack("<IIQQQQIIQQ", 0, 7, 2, 0, off, len(section_notes), 0, 0, 4, 0)
        else:
            shdrs += bytes(40) + struct.pack("<IIIIIIIIII", 0, 7, 2, 0, off, len(section_notes), 0, 0, 4, 0)
        shnum = 2
    add(tail)
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    if is64:
        ehdr = ident + struct.pack("<HHIQQQIHHHHHH", e_type, machine, 1, entry, ehdr_size, sh_off, 0, ehdr_size,
                                   phent, nph, shent, shnum, 0)
    else:
        ehdr = ident + struct.pack("<HHIIIIIHHHHHH", e_type, machine, 1, entry, ehdr_size, sh_off, 0, ehdr_size,
                                   phent, nph, shent, shnum, 0)
    image = bytes(ehdr + phdrs + body)
    if section_notes:
        assert len(image) == sh_off
        image += bytes(shdrs)
    return image


def mb_header(flags: int, *, addrs: tuple[int, int, int, int, int] | None = None, checksum: int | None = None) -> bytes:
    magic = 0x1BADB002
    cks = (-(magic + flags)) & 0xFFFFFFFF if checksum is None else checksum
    hdr = struct.pack("<III", magic, flags, cks)
    if addrs is not None:
        hdr += struct.pack("<5I", *addrs)
    return hdr


def make_bzimage(*, version: int = 0x020F, setup_sects: int = 4, loadflags: int = 0x01, xloadflags: int = 0x03,
                 relocatable: int = 1, alignment: int = 0x200000, pref: int = 0x1000000, init_size: int = 0x800000,
                 initrd_addr_max: int = 0x7FFFFFFF, cmdline_size: int = 2047, hdr_end: int = 0x26C,
                 kernel: bytes = b"", length: int | None = None) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    for i in range(0x1F1, 0x290):                       # recognisable filler everywhere in the header area
        setup[i] = 0xA5
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200] = 0xEB
    setup[0x201] = hdr_end - 0x202
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x210] = 0
    setup[0x211] = loadflags
    struct.pack_into("<IIII", setup, 0x218, 0, 0, 0, 0)
    struct.pack_into("<I", setup, 0x228, 0)
    struct.pack_into("<II", setup, 0x22C, initrd_addr_max, alignment)
    setup[0x234] = relocatable
    struct.pack_into("<HI", setup, 0x236, xloadflags, cmdline_size)
    struct.pack_into("<Q", setup, 0x250, 0)
    struct.pack_into("<QI", setup, 0x258, pref, init_size)
    kernel = kernel or bytes(range(256)) * 64
    image = bytes(setup) + kernel
    return image if length is None else image[:length]


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def check_gdt(ram: FakeRam, state: EntryState) -> None:
    assert state.gdt_base == layout.GDT_ADDR and state.gdt_limit == layout.GDT_SIZE - 1
    table = ram.read(state.gdt_base, state.gdt_limit + 1)
    assert table == gdt_mod.gdt_bytes()
    cs = gdt_mod.decode_descriptor(int.from_bytes(table[state.cs_selector:state.cs_selector + 8], "little"))
    ds = gdt_mod.decode_descriptor(int.from_bytes(table[state.ds_selector:state.ds_selector + 8], "little"))
    assert (cs.base, cs.limit, cs.present, cs.s, cs.type & 0x8) == (0, 0xFFFFFFFF, 1, 1, 0x8)   # flat code
    assert (ds.base, ds.limit, ds.present, ds.s, ds.type) == (0, 0xFFFFFFFF, 1, 1, 0x3)         # flat data
    if state.mode == "long64":
        assert (cs.l, cs.db) == (1, 0)
    else:
        assert (cs.l, cs.db) == (0, 1)


def check_protected32(state: EntryState, protocol: str) -> None:
    assert state.mode == "protected32"
    assert state.protocol == protocol
    assert (state.cr0 & 0x80000001, state.cr3, state.cr4, state.efer) == (1, 0, 0, 0)   # PE, paging off
    assert state.rflags == 0x2
    assert state.cs_selector == 0x08 and state.ds_selector == 0x18
    assert state.rsp == layout.BOOT_STACK_TOP


# --- PVH ------------------------------------------------------------------------------------------------------------

KERNEL_TEXT = bytes(range(1, 256)) * 40


def parse_start_info(ram: FakeRam, addr: int) -> dict[str, int]:
    names = ("magic", "version", "flags", "nr_modules", "modlist_paddr", "cmdline_paddr", "rsdp_paddr",
             "memmap_paddr", "memmap_entries", "reserved")
    return dict(zip(names, struct.unpack("<IIIIQQQQII", ram.read(addr, 56)), strict=True))


def parse_memmap(ram: FakeRam, info: dict[str, int]) -> list[tuple[int, ...]]:
    return [struct.unpack("<QQII", ram.read(info["memmap_paddr"] + 24 * i, 24)) for i in range(info["memmap_entries"])]


def test_pvh_elf32(tmp_path: Path) -> None:
    data_seg = b"DATA" * 100
    elf = make_elf([(0x100000, 0x100000, KERNEL_TEXT, len(KERNEL_TEXT)),
                    (0x200000, 0x200000, data_seg, len(data_seg) + 0x3000)],
                   entry=0x100000, phdr_notes=note(b"GNU", 3, b"abcd") + pvh_note(0x100010))
    kernel = write(tmp_path, "k.elf", elf)
    initrd_data = bytes(range(7, 207)) * 51
    initrd = write(tmp_path, "initrd.img", initrd_data)
    ram = FakeRam(64 * MiB)
    ram.write(0x200000 + len(data_seg), b"\xff" * 0x3000)            # stale bytes where the bss goes
    state = load_kernel(kernel, ram, cmdline="console=ttyS0 quiet", initrd=initrd)

    check_protected32(state, "pvh")
    check_gdt(ram, state)
    assert state.rip == 0x100010
    assert dict(state.gprs) == {"rbx": layout.START_INFO_ADDR}
    info = parse_start_info(ram, state.gprs["rbx"])
    assert info["magic"] == 0x336EC578 and info["version"] == 1 and info["flags"] == 0
    assert info["rsdp_paddr"] == 0 and info["reserved"] == 0
    assert ram.cstr(info["cmdline_paddr"]) == b"console=ttyS0 quiet"
    assert info["nr_modules"] == 1
    paddr, size, mod_cmdline, reserved = struct.unpack("<QQQQ", ram.read(info["modlist_paddr"], 32))
    assert size == len(initrd_data) and reserved == 0 and mod_cmdline == 0
    assert paddr % PAGE == 0 and paddr + size <= 64 * MiB and paddr + size + PAGE > 64 * MiB   # at the top of RAM
    assert ram.read(paddr, size) == initrd_data
    memmap = parse_memmap(ram, info)
    assert memmap == [(a, s, t, 0) for a, s, t in layout.e820_map(64 * MiB)]
    assert ram.read(0x100000, len(KERNEL_TEXT)) == KERNEL_TEXT
    assert ram.read(0x200000, len(data_seg) + 0x3000) == data_seg + bytes(0x3000)     # bss zeroed


def test_pvh_elf64_note_only_in_a_section(tmp_path: Path) -> None:
    elf = make_elf([(0x1000000, 0xFFFFFFFF81000000, KERNEL_TEXT, 0x10000)], entry=0xFFFFFFFF81000000, elf_class=2,
                   section_notes=pvh_note(0x1000040, size=8))
    ram = FakeRam(128 * MiB)
    state = load_kernel(write(tmp_path, "k64.elf", elf), ram)
    check_protected32(state, "pvh")
    assert state.rip == 0x1000040
    info = parse_start_info(ram, state.gprs["rbx"])
    assert (info["nr_modules"], info["modlist_paddr"]) == (0, 0)
    assert ram.cstr(info["cmdline_paddr"]) == b""
    assert ram.read(0x1000000, len(KERNEL_TEXT)) == KERNEL_TEXT


def test_pvh_note_with_8_byte_alignment(tmp_path: Path) -> None:
    notes = note(b"GNU", 5, b"12345", align=8) + note(b"Xen", 18, (0x100000).to_bytes(8, "little"), align=8)
    elf = make_elf([(0x100000, 0x100000, KERNEL_TEXT, 0x3000)], entry=0x100000, elf_class=2, phdr_notes=notes)
    # make_elf writes p_align 4 for the PT_NOTE: patch it to 8 (ELF64 phdr p_align at +48)
    data = bytearray(elf)
    phoff = 64 + 56
    struct.pack_into("<Q", data, phoff + 48, 8)
    state = load_kernel(write(tmp_path, "k.elf", bytes(data)), FakeRam(64 * MiB))
    assert state.rip == 0x100000


@pytest.mark.parametrize(("notes", "tail"), [
    (note(b"Linux", 0x100, b"6.1\0") + pvh_note(0x1000000), b""),
    (pvh_note(0x1000000), b"\0Linux version 6.1.0 (gcc)\0"),
])
def test_linux_vmlinux_is_linux_pvh(tmp_path: Path, notes: bytes, tail: bytes) -> None:
    elf = make_elf([(0x1000000, 0xFFFFFFFF81000000, KERNEL_TEXT, 0x10000)], entry=0x1000000, elf_class=2,
                   phdr_notes=notes, tail=tail)
    path = write(tmp_path, "vmlinux", elf)
    assert load_kernel(path, FakeRam(64 * MiB)).protocol == "linux-pvh"
    assert load_kernel(path, FakeRam(64 * MiB), protocol="linux").protocol == "linux-pvh"
    assert load_kernel(path, FakeRam(64 * MiB), protocol="pvh").protocol == "linux-pvh"


def test_pvh_with_ram_above_4g(tmp_path: Path) -> None:
    elf = make_elf([(0x100000, 0x100000, KERNEL_TEXT, 0x3000)], entry=0x100000, phdr_notes=pvh_note(0x100000))
    initrd = write(tmp_path, "initrd", b"\x42" * 5000)
    ram = FakeRam(5 * GiB)
    state = load_kernel(write(tmp_path, "k", elf), ram, initrd=initrd)
    info = parse_start_info(ram, state.gprs["rbx"])
    memmap = parse_memmap(ram, info)
    assert memmap[-1] == (4 * GiB, 2 * GiB, 1, 0)
    assert len(memmap) == 4
    paddr, size = struct.unpack("<QQ", ram.read(info["modlist_paddr"], 16))
    assert paddr + size <= 3 * GiB and paddr + size + PAGE > 3 * GiB       # top of the RAM below 4 GiB


# --- Multiboot ------------------------------------------------------------------------------------------------------

def parse_mbi(ram: FakeRam, addr: int) -> dict[str, int]:
    f = struct.unpack("<IIIIIII", ram.read(addr, 28))
    out = dict(zip(("flags", "mem_lower", "mem_upper", "boot_device", "cmdline", "mods_count", "mods_addr"), f,
                   strict=True))
    out["mmap_length"], out["mmap_addr"] = struct.unpack("<II", ram.read(addr + 44, 8))
    out["boot_loader_name"] = ram.u32(addr + 64)
    return out


def parse_mmap(ram: FakeRam, addr: int, length: int) -> list[tuple[int, int, int]]:
    entries, pos = [], 0
    while pos < length:
        size, base, n, kind = struct.unpack("<IQQI", ram.read(addr + pos, 24))
        assert size == 20
        entries.append((base, n, kind))
        pos += size + 4
    assert pos == length
    return entries


def test_multiboot_elf32_higher_half(tmp_path: Path) -> None:
    text = mb_header(0x3) + KERNEL_TEXT
    elf = make_elf([(0x100000, 0xC0100000, text, len(text)), (0x110000, 0xC0110000, b"D" * 64, 0x5000)],
                   entry=0xC0100020)
    initrd_data = b"module-bytes" * 1000
    initrd = write(tmp_path, "mod.bin", initrd_data)
    ram = FakeRam(32 * MiB)
    state = load_kernel(write(tmp_path, "mb.elf", elf), ram, cmdline="root=/dev/x", initrd=initrd)

    check_protected32(state, "multiboot")
    check_gdt(ram, state)
    assert state.rip == 0x100020                                        # e_entry translated to physical
    assert dict(state.gprs) == {"rax": 0x2BADB002, "rbx": layout.MBI_ADDR}
    mbi = parse_mbi(ram, state.gprs["rbx"])
    assert mbi["flags"] == (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9)
    assert mbi["mem_lower"] == 639
    assert mbi["mem_upper"] == (32 * MiB - MiB) // 1024
    assert ram.cstr(mbi["cmdline"]) == b"root=/dev/x"
    assert ram.cstr(mbi["boot_loader_name"]) == b"vmfork"
    assert mbi["mods_count"] == 1
    start, end, string, reserved = struct.unpack("<IIII", ram.read(mbi["mods_addr"], 16))
    assert start % PAGE == 0 and start >= 0x115000 and end == start + len(initrd_data) and reserved == 0
    assert ram.read(start, len(initrd_data)) == initrd_data
    assert ram.cstr(string) == str(initrd).encode()
    assert parse_mmap(ram, mbi["mmap_addr"], mbi["mmap_length"]) == layout.e820_map(32 * MiB)
    assert ram.read(0x100000, len(text)) == text
    assert ram.read(0x110040, 0x5000 - 64) == bytes(0x5000 - 64)


def test_multiboot_elf64(tmp_path: Path) -> None:
    text = mb_header(0x2) + KERNEL_TEXT
    elf = make_elf([(0x100000, 0x100000, text, 0x4000)], entry=0x100010, elf_class=2)
    ram = FakeRam(16 * MiB)
    state = load_kernel(write(tmp_path, "mb64.elf", elf), ram)
    check_protected32(state, "multiboot")
    assert state.rip == 0x100010 and ram.read(0x100000, len(text)) == text


def test_multiboot_aout_kludge(tmp_path: Path) -> None:
    load = 0x200000
    hdr_off = 0x40
    prefix = b"\x90" * hdr_off
    body = b"\xcc" * 0x100
    image_len = hdr_off + 32 + len(body)
    hdr = mb_header(0x10002, addrs=(load + hdr_off, load, load + image_len, load + image_len + 0x2000, load + 0x80))
    image = prefix + hdr + body + b"TRAILER-NOT-LOADED"
    ram = FakeRam(16 * MiB)
    ram.write(load + image_len, b"\xee" * 0x2000)
    state = load_kernel(write(tmp_path, "aout.bin", image), ram, protocol="multiboot")
    check_protected32(state, "multiboot")
    assert state.rip == load + 0x80
    assert ram.read(load, image_len) == image[:image_len]
    assert ram.read(load + image_len, 0x2000 + 18) == bytes(0x2000 + 18)
    mbi = parse_mbi(ram, layout.MBI_ADDR)
    assert mbi["mods_count"] == 0


def test_multiboot_aout_kludge_whole_file(tmp_path: Path) -> None:
    load = 0x100000
    hdr = mb_header(0x10000, addrs=(load, load, 0, 0, load + 0x20))
    image = hdr + b"\xf4" * 100
    ram = FakeRam(8 * MiB)
    state = load_kernel(write(tmp_path, "aout.bin", image), ram)      # auto: not ELF, not bzImage -> Multiboot
    assert state.protocol == "multiboot" and state.rip == load + 0x20
    assert ram.read(load, len(image)) == image


def test_multiboot_header_must_be_in_first_8k(tmp_path: Path) -> None:
    image = bytes(8192) + mb_header(0x10000, addrs=(0x100000, 0x100000, 0, 0, 0x100000))
    with pytest.raises(BootError, match="no Multiboot header"):
        load_kernel(write(tmp_path, "late", image), FakeRam(8 * MiB), protocol="multiboot")


@pytest.mark.parametrize(("image", "match"), [
    (mb_header(0x10000, addrs=(0x100000, 0x100000, 0, 0, 0x100000), checksum=5) + bytes(64), "bad checksum"),
    (mb_header(0x8 | 0x10000, addrs=(0x100000, 0x100000, 0, 0, 0x100000)) + bytes(64),
     r"requires features vmfork does not support \(flags 0x8\)"),
    (mb_header(0x10000) + bytes(8), "truncated file: the Multiboot header at 0x0"),
    (mb_header(0x10000, addrs=(0xFF000, 0x100000, 0, 0, 0x100000)) + bytes(64), "header_addr 0xff000 is below"),
    (mb_header(0x10000, addrs=(0x100100, 0x100000, 0, 0, 0x100000)) + bytes(64), "before the start of the file"),
    (mb_header(0x10000, addrs=(0x100000, 0x100000, 0x200000, 0, 0x100000)), "truncated file"),
    (mb_header(0x10000, addrs=(0x100000, 0x100000, 0x100020, 0x100010, 0x100000)) + bytes(64),
     "bss_end_addr 0x100010 is below"),
    (mb_header(0x10000, addrs=(0x100000, 0x100000, 0, 0, 0x500000)) + bytes(64), "entry_addr 0x500000 is not inside"),
    (mb_header(0x0) + bytes(64), "not an ELF file and the Multiboot header has no a.out-kludge"),
])
def test_multiboot_errors(tmp_path: Path, image: bytes, match: str) -> None:
    path = write(tmp_path, "bad-mb", image)
    with pytest.raises(BootError, match=match) as exc:
        load_kernel(path, FakeRam(8 * MiB), protocol="multiboot")
    assert str(path) in str(exc.value)


def test_multiboot_elf_without_header(tmp_path: Path) -> None:
    elf = make_elf([(0x100000, 0x100000, KERNEL_TEXT, 0x3000)], entry=0x100000)
    with pytest.raises(BootError, match="no Multiboot header"):
        load_kernel(write(tmp_path, "plain.elf", elf), FakeRam(8 * MiB), protocol="multiboot")


def test_pvh_note_wins_over_multiboot_header(tmp_path: Path) -> None:
    text = mb_header(0x3) + KERNEL_TEXT
    elf = make_elf([(0x100000, 0x100000, text, 0x3000)], entry=0x100000, phdr_notes=pvh_note(0x100100))
    path = write(tmp_path, "both.elf", elf)
    assert load_kernel(path, FakeRam(16 * MiB)).protocol == "pvh"
    assert load_kernel(path, FakeRam(16 * MiB), protocol="multiboot").protocol == "multiboot"


# --- Linux bzImage --------------------------------------------------------------------------------------------------

def test_bzimage(tmp_path: Path) -> None:
    image = make_bzimage()
    kernel_code = image[5 * 512:]
    initrd_data = bytes(range(256)) * 300
    ram = FakeRam(256 * MiB)
    state = load_kernel(write(tmp_path, "vmlinuz", image), ram, cmdline="console=ttyS0 panic=-1",
                        initrd=write(tmp_path, "initrd", initrd_data))

    assert state.protocol == "linux-bzimage" and state.mode == "long64"
    assert state.rip == 0x1000000 + 0x200
    assert dict(state.gprs) == {"rsi": layout.ZERO_PAGE_ADDR}
    assert state.cr0 & 0x80000001 == 0x80000001                        # PE | PG
    assert state.cr4 & 0x20 and state.efer & 0x500 == 0x500             # PAE, LME | LMA
    assert state.cr3 == layout.PML4_ADDR
    assert (state.cs_selector, state.ds_selector, state.rflags) == (0x10, 0x18, 0x2)
    check_gdt(ram, state)
    assert ram.read(0x1000000, len(kernel_code)) == kernel_code

    zp = layout.ZERO_PAGE_ADDR
    boot_params = ram.read(zp, 4096)
    assert boot_params[:0x1E8] == bytes(0x1E8)                          # nothing but ext_ fields (zero here)
    assert boot_params[0x1EF] == 0                                      # sentinel
    changed = set(range(0x210, 0x212)) | set(range(0x218, 0x220)) | set(range(0x228, 0x22C))
    for off in range(0x1F1, 0x26C):                                     # the setup header, copied
        if off not in changed:
            assert boot_params[off] == image[off], hex(off)
    assert boot_params[0x26C:0x2D0] == bytes(0x2D0 - 0x26C)              # not past the header's end
    assert ram.u8(zp + 0x210) == 0xFF                                   # type_of_loader
    assert ram.u8(zp + 0x211) & 0x01                                    # LOADED_HIGH
    assert ram.cstr(ram.u32(zp + 0x228)) == b"console=ttyS0 panic=-1"
    assert ram.u32(zp + 0xC8) == 0
    rd_addr, rd_size = ram.u32(zp + 0x218), ram.u32(zp + 0x21C)
    assert (ram.u32(zp + 0xC0), ram.u32(zp + 0xC4)) == (0, 0)
    assert rd_size == len(initrd_data)
    assert rd_addr % PAGE == 0 and rd_addr >= 0x1000000 + 0x800000 and rd_addr + rd_size <= 256 * MiB
    assert rd_addr + rd_size + PAGE > 256 * MiB                         # high
    assert ram.read(rd_addr, rd_size) == initrd_data
    n = ram.u8(zp + 0x1E8)
    e820 = [struct.unpack("<QQI", ram.read(zp + 0x2D0 + 20 * i, 20)) for i in range(n)]
    assert e820 == layout.e820_map(256 * MiB)

    # identity page tables: PML4 -> PDPT -> 4 PDs of 2 MiB pages covering [0, 4 GiB)
    pml4 = state.cr3
    assert ram.u64(pml4) & ~0xFFF == layout.PDPT_ADDR and ram.u64(pml4) & 0x3 == 0x3
    assert ram.read(pml4 + 8, 4088) == bytes(4088)
    for gib in range(4):
        pdpte = ram.u64(layout.PDPT_ADDR + 8 * gib)
        assert pdpte & 0x3 == 0x3 and not pdpte & 0x80
        pd = pdpte & ~0xFFF
        entries = struct.unpack("<512Q", ram.read(pd, 4096))
        for j, pde in enumerate(entries):
            assert pde & 0x83 == 0x83                                   # present, writable, 2 MiB page
            assert pde & ~0xFFF == gib * GiB + j * 2 * MiB
    assert ram.read(layout.PDPT_ADDR + 32, 4096 - 32) == bytes(4096 - 32)
    assert page_tables() == ram.read(layout.PML4_ADDR, layout.PAGE_TABLES_END - layout.PML4_ADDR)


def test_bzimage_not_relocatable_loads_at_1m(tmp_path: Path) -> None:
    image = make_bzimage(relocatable=0)
    ram = FakeRam(64 * MiB)
    state = load_kernel(write(tmp_path, "vmlinuz", image), ram, protocol="linux")
    assert state.rip == 0x100200
    assert ram.read(0x100000, 64) == image[5 * 512:5 * 512 + 64]


def test_bzimage_setup_sects_zero_means_four(tmp_path: Path) -> None:
    image = make_bzimage(setup_sects=4)
    patched = bytearray(image)
    patched[0x1F1] = 0
    ram = FakeRam(64 * MiB)
    load_kernel(write(tmp_path, "vmlinuz", bytes(patched)), ram)
    assert ram.read(0x1000000, 64) == image[5 * 512:5 * 512 + 64]


def test_bzimage_initrd_below_initrd_addr_max(tmp_path: Path) -> None:
    ram = FakeRam(2 * GiB)
    load_kernel(write(tmp_path, "vmlinuz", make_bzimage(initrd_addr_max=0x37FFFFFF)), ram,
                initrd=write(tmp_path, "initrd", b"x" * 10000))
    addr, size = ram.u32(layout.ZERO_PAGE_ADDR + 0x218), ram.u32(layout.ZERO_PAGE_ADDR + 0x21C)
    assert addr + size <= 0x38000000 and addr + size + PAGE > 0x38000000


def test_bzimage_e820_above_4g(tmp_path: Path) -> None:
    ram = FakeRam(6 * GiB)
    load_kernel(write(tmp_path, "vmlinuz", make_bzimage()), ram, initrd=write(tmp_path, "initrd", b"x" * 10000))
    zp = layout.ZERO_PAGE_ADDR
    e820 = [struct.unpack("<QQI", ram.read(zp + 0x2D0 + 20 * i, 20)) for i in range(ram.u8(zp + 0x1E8))]
    assert e820 == layout.e820_map(6 * GiB) and e820[-1] == (4 * GiB, 3 * GiB, 1)
    assert ram.u32(zp + 0x218) + 10000 <= 3 * GiB


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"xloadflags": 0}, "32-bit-only kernel: xloadflags lacks XLF_KERNEL_64"),
    ({"version": 0x020B}, r"boot protocol version 2\.11 is too old"),
    ({"version": 0x0200}, r"version 2\.00 is too old"),
    ({"loadflags": 0}, "zImage"),
    ({"length": 0x300}, "truncated file"),
    ({"length": 5 * 512}, "leaving no protected-mode kernel"),
    ({"hdr_end": 0x250}, "setup header end 0x250"),
    ({"init_size": 0x8000000}, r"the kernel \(its image and init_size\) at \[0x1000000, 0x9000000\) does not fit"),
    ({"pref": 0x8000, "relocatable": 0}, "pref_address 0x8000 is below the load address"),
    ({"pref": 0x10000, "alignment": 0x1000}, r"the kernel .* overlaps the loader's command line"),
])
def test_bzimage_errors(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    path = write(tmp_path, "vmlinuz", make_bzimage(**kwargs))
    ram = FakeRam(64 * MiB)
    with pytest.raises(BootError, match=match) as exc:
        load_kernel(path, ram)
    assert str(exc.value).startswith(f"{path}: ")
    assert not ram.pages                                                # nothing written on failure


def test_bzimage_cmdline_longer_than_cmdline_size(tmp_path: Path) -> None:
    path = write(tmp_path, "vmlinuz", make_bzimage(cmdline_size=16))
    load_kernel(path, FakeRam(64 * MiB), cmdline="x" * 16)
    with pytest.raises(BootError, match="more than the kernel's cmdline_size 16"):
        load_kernel(path, FakeRam(64 * MiB), cmdline="x" * 17)


def test_bzimage_initrd_does_not_fit(tmp_path: Path) -> None:
    # kernel needs [16 MiB, 24 MiB); 32 MiB of RAM leaves 8 MiB for the initrd
    path = write(tmp_path, "vmlinuz", make_bzimage())
    load_kernel(path, FakeRam(32 * MiB), initrd=write(tmp_path, "ok", b"i" * (8 * MiB)))
    with pytest.raises(BootError, match=r"initrd .*big.* \(8392704 bytes\) does not fit"):
        load_kernel(path, FakeRam(32 * MiB), initrd=write(tmp_path, "big", b"i" * (8 * MiB + 4096)))


# --- errors common to all protocols ---------------------------------------------------------------------------------

def simple_pvh(paddr: int = 0x100000, *, memsz: int = 0x1000, **kwargs: Any) -> bytes:
    return make_elf([(paddr, paddr, KERNEL_TEXT[:64], memsz)], entry=paddr, phdr_notes=pvh_note(paddr), **kwargs)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(BootError, match=r"cannot read kernel image .*nope: No such file"):
        load_kernel(tmp_path / "nope", FakeRam(8 * MiB))
    kernel = write(tmp_path, "k", simple_pvh())
    with pytest.raises(BootError, match=r"cannot read initrd .*missing-initrd: No such file"):
        load_kernel(kernel, FakeRam(8 * MiB), initrd=tmp_path / "missing-initrd")
    with pytest.raises(BootError, match=r"initrd .*empty-initrd: the file is empty"):
        load_kernel(kernel, FakeRam(8 * MiB), initrd=write(tmp_path, "empty-initrd", b""))


def test_unknown_protocol(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown boot protocol 'uefi'"):
        load_kernel(write(tmp_path, "k", simple_pvh()), FakeRam(8 * MiB), protocol="uefi")  # type: ignore[arg-type]


@pytest.mark.parametrize(("protocol", "image", "match"), [
    ("auto", b"\x00" * 9000, "no supported boot format: not a bzImage .* no PVH ELF note .* no Multiboot header"),
    ("auto", b"", "no supported boot format"),
    ("pvh", b"MZ" + bytes(100), r"not an ELF file \(wrong magic 4d5a0000"),
    ("linux", b"\x7fELX" + bytes(100), "not a Linux kernel: wrong magic"),
    ("pvh", b"\x7fELF\x01", "truncated file: 5 bytes is too short for an ELF header"),
    ("pvh", b"\x7fELF\x02\x01\x01" + bytes(30), "truncated file: 37 bytes is too short for an ELF64 header"),
    ("pvh", make_elf([(0x100000, 0x100000, KERNEL_TEXT, 0x3000)], entry=0x100000), "no PVH entry: no ELF note 'Xen'"),
    ("linux", make_elf([(0x100000, 0x100000, KERNEL_TEXT, 0x3000)], entry=0x100000, elf_class=2),
     "needs CONFIG_PVH"),
    ("auto", simple_pvh(elf_class=3), "bad ELF class 3"),
    ("auto", simple_pvh(machine=40), "bad ELF machine 40"),
    ("auto", simple_pvh(e_type=1), "ELF type 1 is not an executable"),
    ("auto", simple_pvh()[:60], "truncated file: the program header table ends at"),
    ("auto", simple_pvh(0x4000000), r"ELF segment 0 at \[0x4000000, 0x4001000\) does not fit in guest RAM"),
    ("auto", simple_pvh(0x8000), r"ELF segment 0 at \[0x8000, 0x9000\) overlaps the loader's PVH start info at "
                                 r"\[0x8000, 0x9000\)"),
    ("auto", simple_pvh(0x500), r"ELF segment 0 at \[0x500, 0x1500\) overlaps the loader's GDT at \[0x500, 0x530\)"),
    ("auto", simple_pvh(0x10000), "command line and strings"),
    ("auto", simple_pvh(0x100000, memsz=0x10), "larger than its memory size"),
])
def test_load_errors(tmp_path: Path, protocol: Any, image: bytes, match: str) -> None:
    path = write(tmp_path, "kernel-image", image)
    ram = FakeRam(64 * MiB)
    with pytest.raises(BootError, match=match) as exc:
        load_kernel(path, ram, protocol=protocol)
    assert str(path) in str(exc.value)
    assert not ram.pages


def test_segment_in_pci_hole_or_above_4g(tmp_path: Path) -> None:
    with pytest.raises(BootError, match=r"ELF segment 0 at \[0xd0000000, 0xd0001000\) does not fit in guest RAM"):
        load_kernel(write(tmp_path, "k", simple_pvh(0xD0000000)), FakeRam(5 * GiB))
    elf = make_elf([(5 * GiB, 5 * GiB, b"x", 0x1000)], entry=0x100000, elf_class=2, phdr_notes=pvh_note(0x100000))
    with pytest.raises(BootError, match="is not below 4 GiB"):
        load_kernel(write(tmp_path, "k2", elf), FakeRam(6 * GiB))


def test_truncated_segment(tmp_path: Path) -> None:
    image = simple_pvh()
    bad = bytearray(image)
    struct.pack_into("<I", bad, 52 + 16, 0x100000)                     # p_filesz of phdr 0 (ELF32)
    struct.pack_into("<I", bad, 52 + 20, 0x100000)                     # p_memsz
    with pytest.raises(BootError, match="truncated file: ELF segment 0 needs file bytes up to"):
        load_kernel(write(tmp_path, "k", bytes(bad)), FakeRam(64 * MiB))


def test_entry_outside_segments(tmp_path: Path) -> None:
    elf = make_elf([(0x100000, 0x100000, b"x", 0x1000)], entry=0x100000, phdr_notes=pvh_note(0x300000))
    with pytest.raises(BootError, match="PVH entry point 0x300000 is not inside any loaded segment"):
        load_kernel(write(tmp_path, "k", elf), FakeRam(64 * MiB))


def test_pvh_initrd_does_not_fit(tmp_path: Path) -> None:
    with pytest.raises(BootError, match=r"initrd .*huge \(8388608 bytes\) does not fit"):
        load_kernel(write(tmp_path, "k", simple_pvh()), FakeRam(8 * MiB),
                    initrd=write(tmp_path, "huge", bytes(8 * MiB)))


def test_cmdline_errors(tmp_path: Path) -> None:
    kernel = write(tmp_path, "k", simple_pvh())
    with pytest.raises(BootError, match="contains a NUL"):
        load_kernel(kernel, FakeRam(8 * MiB), cmdline="a\0b")
    load_kernel(kernel, FakeRam(8 * MiB), cmdline="x" * (layout.CMDLINE_MAX - 1))
    with pytest.raises(BootError, match="command line is 65536 bytes"):
        load_kernel(kernel, FakeRam(8 * MiB), cmdline="x" * layout.CMDLINE_MAX)


def test_entry_state_is_frozen(tmp_path: Path) -> None:
    state = load_kernel(write(tmp_path, "k", simple_pvh()), FakeRam(8 * MiB))
    with pytest.raises(AttributeError):
        state.rip = 0  # type: ignore[misc]


# --- real images, when the other build scripts have made them -------------------------------------------------------

def need(relpath: str, script: str) -> Path:
    path = ROOT / relpath
    if not path.exists():
        pytest.skip(f"{relpath} is missing: build it with {script}")
    return path


def kernel_env() -> dict[str, str]:
    env_file = ROOT / "build/linux/kernel.env"
    if not env_file.exists():
        return {}
    pairs = (line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line and line[0] != "#")
    return {k.strip(): v.strip() for k, v in pairs}


def optional_initrd() -> Path | None:
    path = ROOT / "build/linux/initramfs.cpio.gz"
    return path if path.exists() else None


def test_real_testguest_multiboot() -> None:
    path = need("build/guests/testguest-multiboot.elf", "guests/build.sh")
    ram = FakeRam(64 * MiB)
    state = load_kernel(path, ram, cmdline="test", protocol="multiboot")
    check_protected32(state, "multiboot")
    image = parse_elf(path.read_bytes(), str(path))
    assert state.rip == image.phys_of_virt(image.entry)
    mbi = parse_mbi(ram, layout.MBI_ADDR)
    assert mbi["flags"] & 0x1 and ram.cstr(mbi["cmdline"]) == b"test"


def test_real_testguest_pvh() -> None:
    path = need("build/guests/testguest-pvh.elf", "guests/build.sh")
    ram = FakeRam(64 * MiB)
    state = load_kernel(path, ram, cmdline="test")
    check_protected32(state, "pvh")
    note_entry = pvh_entry(parse_elf(path.read_bytes(), str(path)), str(path))
    assert note_entry is not None and state.rip == note_entry
    info = parse_start_info(ram, state.gprs["rbx"])
    assert info["magic"] == 0x336EC578 and ram.cstr(info["cmdline_paddr"]) == b"test"


def test_real_linux_bzimage() -> None:
    path = need("build/linux/vmlinuz", "guests/linux/build.sh")
    initrd = optional_initrd()
    ram = FakeRam(256 * MiB)
    state = load_kernel(path, ram, cmdline="console=ttyS0", initrd=initrd)
    assert state.protocol == "linux-bzimage" and state.mode == "long64"
    zp = layout.ZERO_PAGE_ADDR
    assert ram.read(zp + 0x202, 4) == b"HdrS" and ram.u16(zp + 0x206) >= 0x020C
    pref = ram.u64(zp + 0x258)
    assert state.rip == pref + 0x200
    assert ram.cstr(ram.u32(zp + 0x228)) == b"console=ttyS0"
    if initrd is not None:
        addr, size = ram.u32(zp + 0x218), ram.u32(zp + 0x21C)
        assert size == initrd.stat().st_size and addr >= pref + ram.u32(zp + 0x260)
        assert ram.read(addr, 2) == initrd.read_bytes()[:2]


def test_real_linux_vmlinux_pvh() -> None:
    path = need("build/linux/vmlinux", "guests/linux/build.sh")
    initrd = optional_initrd()
    ram = FakeRam(256 * MiB)
    state = load_kernel(path, ram, cmdline="console=ttyS0", initrd=initrd)
    check_protected32(state, "linux-pvh")
    expected = kernel_env().get("PVH_ENTRY")
    if expected:
        assert state.rip == int(expected, 16)
    info = parse_start_info(ram, state.gprs["rbx"])
    assert info["magic"] == 0x336EC578 and info["nr_modules"] == (1 if initrd else 0)
