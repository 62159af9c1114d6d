"""guests/build.sh builds the two test guest images with the headers their boot protocols need.

The QEMU smoke tests (TCG, a fraction of a second each) run only where qemu-system-x86_64 is installed."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_SH = ROOT / "guests" / "build.sh"
OUT = ROOT / "build" / "guests"
VARIANTS = ("multiboot", "pvh")

LOAD_ADDR = 0x100000
KINFO_ADDR = 0x101000
MULTIBOOT_MAGIC = 0x1BADB002
XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_LOAD, PT_NOTE = 1, 4

pytestmark = pytest.mark.skipif(shutil.which("nasm") is None, reason="nasm is not installed (apt-get install nasm)")


class Phdr(NamedTuple):
    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int


def elf_header(img: bytes) -> tuple[int, int, int, list[Phdr]]:
    """(class, machine, entry, program headers) of an ELF image, 32- or 64-bit."""
    assert img[:4] == b"\x7fELF", "not an ELF file"
    cls = img[4]
    assert img[5] == 1, "not little-endian"
    etype, machine = struct.unpack_from("<HH", img, 16)
    assert etype == 2, "not ET_EXEC"
    phdrs = []
    if cls == 1:
        entry, phoff = struct.unpack_from("<II", img, 24)
        phentsize, phnum = struct.unpack_from("<HH", img, 42)
        for i in range(phnum):
            t, off, va, pa, fsz, msz, _flags, _align = struct.unpack_from("<8I", img, phoff + i * phentsize)
            phdrs.append(Phdr(t, off, va, pa, fsz, msz))
    else:
        assert cls == 2, f"bad ELF class {cls}"
        entry, phoff = struct.unpack_from("<QQ", img, 24)
        phentsize, phnum = struct.unpack_from("<HH", img, 54)
        for i in range(phnum):
            t, _flags, off, va, pa, fsz, msz, _align = struct.unpack_from("<IIQQQQQQ", img, phoff + i * phentsize)
            phdrs.append(Phdr(t, off, va, pa, fsz, msz))
    return cls, machine, entry, phdrs


def multiboot_header(img: bytes) -> tuple[int, int] | None:
    """(offset, flags) of a valid Multiboot v1 header in the first 8 KiB, or None."""
    for off in range(0, min(len(img), 8192) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", img, off)
        if magic == MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off, flags
    return None


def xen_notes(img: bytes) -> list[tuple[int, bytes]]:
    """(type, desc) of every note named "Xen" in the PT_NOTE segments."""
    notes = []
    for ph in elf_header(img)[3]:
        if ph.type != PT_NOTE:
            continue
        p, end = ph.offset, ph.offset + ph.filesz
        while p + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", img, p)
            name = img[p + 12:p + 12 + namesz]
            desc_at = p + 12 + ((namesz + 3) & ~3)
            if name == b"Xen\0":
                notes.append((ntype, img[desc_at:desc_at + descsz]))
            p = desc_at + ((descsz + 3) & ~3)
    return notes


def in_loaded_code(img: bytes, addr: int) -> bool:
    return any(ph.type == PT_LOAD and ph.paddr <= addr < ph.paddr + ph.filesz for ph in elf_header(img)[3])


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    subprocess.run(["bash", str(BUILD_SH)], check=True, capture_output=True, text=True)
    return {v: (OUT / f"testguest-{v}.elf").read_bytes() for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_image_is_an_elf_loaded_at_1mib(images: dict[str, bytes], variant: str) -> None:
    img = images[variant]
    _cls, machine, entry, phdrs = elf_header(img)
    assert machine in (3, 62)  # EM_386, EM_X86_64
    loads = [ph for ph in phdrs if ph.type == PT_LOAD]
    assert loads and min(ph.paddr for ph in loads) == LOAD_ADDR
    for ph in loads:
        assert ph.memsz >= ph.filesz and ph.offset + ph.filesz <= len(img)
    assert in_loaded_code(img, entry)


def test_multiboot_image_has_a_valid_header(images: dict[str, bytes]) -> None:
    img = images["multiboot"]
    assert img[4] == 1, "QEMU loads only ELF32 multiboot kernels"
    found = multiboot_header(img)
    assert found is not None, "no Multiboot header with a valid checksum in the first 8 KiB"
    _off, flags = found
    assert flags & 0x2, "the header must ask for memory information"
    assert not flags & 0x10000, "addresses come from the ELF program headers, not the a.out kludge"
    assert xen_notes(img) == [], "a PVH note would make loaders that prefer PVH ignore the multiboot entry"


def test_pvh_image_has_a_phys32_entry_note(images: dict[str, bytes]) -> None:
    img = images["pvh"]
    entries = [desc for ntype, desc in xen_notes(img) if ntype == XEN_ELFNOTE_PHYS32_ENTRY]
    assert len(entries) == 1
    assert len(entries[0]) == 4
    (entry,) = struct.unpack("<I", entries[0])
    assert in_loaded_code(img, entry)
    assert multiboot_header(img) is None, "QEMU tries multiboot first: the PVH image must not have its header"


@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_info_block_is_at_its_documented_address(images: dict[str, bytes], variant: str) -> None:
    img = images[variant]
    offset = KINFO_ADDR - LOAD_ADDR  # the PT_LOAD maps file offset 0 at LOAD_ADDR
    assert img[offset:offset + 8] == b"VMFKINFO"
    assert struct.unpack_from("<I", img, offset + 8)[0] == 1


def test_build_is_idempotent(images: dict[str, bytes]) -> None:
    before = {v: (OUT / f"testguest-{v}.elf").stat().st_mtime_ns for v in VARIANTS}
    result = subprocess.run(["bash", str(BUILD_SH)], check=True, capture_output=True, text=True)
    assert result.stdout == ""
    assert before == {v: (OUT / f"testguest-{v}.elf").stat().st_mtime_ns for v in VARIANTS}


QEMU = shutil.which("qemu-system-x86_64")


def run_qemu(variant: str, cmdline: str) -> tuple[int, str]:
    """Boot an image under QEMU TCG; (exit status as QEMU reports it, serial output)."""
    assert QEMU is not None
    proc = subprocess.run(
        [QEMU, "-accel", "tcg", "-m", "64", "-kernel", str(OUT / f"testguest-{variant}.elf"), "-append", cmdline,
         "-serial", "stdio", "-display", "none", "-nodefaults", "-no-reboot",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=1"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
@pytest.mark.parametrize("variant", VARIANTS)
def test_hello_boots_under_qemu(images: dict[str, bytes], variant: str) -> None:
    status, out = run_qemu(variant, "hello")
    assert out.splitlines() == [f"vmfork-guest: hello {variant} ram=64MiB", "vmfork-guest: ready"]
    assert status == (0 << 1) | 1  # isa-debug-exit: (v << 1) | 1


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
@pytest.mark.parametrize("variant", VARIANTS)
def test_pattern_and_exceptions_under_qemu(images: dict[str, bytes], variant: str) -> None:
    status, out = run_qemu(variant, "pattern 7 4")
    assert out.splitlines()[-1] == "checksum=4d689fba4bc0053b" and status == 1
    status, out = run_qemu(variant, "ud2")
    assert out.splitlines()[-1].startswith("EXCEPTION vec=6 rip=0x") and status == ((0x86 << 1) | 1) & 0xFF
    status, out = run_qemu(variant, "no-such-program")
    assert "unknown program" in out and status == ((0x7F << 1) | 1) & 0xFF
