"""The compact save-file layout: a whole machine (vCPUs, platform, devices and RAM) in one file, RAM stored as its
non-zero pages and a map; the header and machine checks every layout shares (template.py maps the other layout).

The container (preamble, JSON header, checksummed sections) is described in `container.py`. A save file has magic
b"VMFKSAVE", header "format" "vmfork-save", and the sections

    machine   MachineState.to_bytes(): every vCPU, the in-kernel PIC/IOAPIC/PIT/clock, and the device states
              (or none, for a machine without a device model)
    ram-map   one bit per 4 KiB page of the RAM file (RAM-file page order, little-endian bit order within a byte):
              1 = the page is stored in "ram", 0 = the page is all zeros
    ram       the stored pages, in page order; 4096-byte aligned in the file

and the header keys "machine" (name, memory_mib, vcpus, device names or null, block_interrupts), "memory" (size,
page_size, pages, stored_pages, slots as [gpa, size, RAM-file offset] triples), "cpu" (vendor, family, model,
stepping and the CPUID feature words the vCPUs were given: see cpufeatures.py), "cpuid" (the machine's concrete
CPUID policy, and whether it was the saving host's default policy; absent in older files: "host"), "created" and
"vmfork" (the writer's version).

RAM is streamed: save scans it in 2 MiB windows for non-zero pages (numpy, on the guest RAM mapping itself, reading
only the parts of the RAM file that hold data: a never-written page is never touched), then writes the non-zero
pages straight from the mapping; restore reads them straight into the new machine's RAM. Nothing holds more than one
2 MiB window of RAM in Python memory.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import __version__
from ..arch.x86 import cpu
from ..errors import DeviceStateError, SnapshotHostError, VmStateError
from ..memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory, make_slots
from ..vm import Machine, MachineShape, MachineState, open_kvm
from . import cpufeatures
from .container import ContainerFile, ContainerWriter, SectionSpec

MAGIC = b"VMFKSAVE"
FORMAT = "vmfork-save"
WINDOW = 512                    # pages per scan/copy window: 2 MiB

Bits = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class SaveInfo:
    """What `save()` wrote."""

    path: Path
    file_size: int
    ram_pages: int          # pages of guest RAM
    stored_pages: int       # non-zero pages, the only ones in the file




def header_for(vm: Machine, state: MachineState, stored: int, *, layout: str = "compact") -> dict[str, Any]:
    """The header of a save file of `vm` in `state` with `stored` non-zero pages, RAM in `layout` (LAYOUTS)."""
    mem = vm.memory
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "vmfork": __version__,
        "machine": {"name": vm.name, "memory_mib": vm.shape.memory_mib, "vcpus": vm.shape.vcpus,
                    "devices": None if state.devices is None else list(state.devices.names),
                    "block_interrupts": vm.irqs_blocked},
        "memory": {"size": mem.size, "page_size": PAGE_SIZE, "pages": mem.npages, "stored_pages": stored,
                   "slots": [[s.gpa, s.size, s.offset] for s in mem.slots], "layout": layout},
        "cpu": cpufeatures.describe(cpu.vcpu_cpuid(vm.kvm, 0, policy=vm.shape.cpuid)),
        "cpuid": cpufeatures.policy_header(vm.kvm, vm.shape.cpuid),
    }


def save_compact(vm: Machine, path: Path) -> SaveInfo:
    state = vm.capture()
    machine = state.to_bytes()
    mem = vm.memory
    bits = nonzero_pages(mem)
    stored = int(np.count_nonzero(bits))
    bitmap = np.packbits(bits, bitorder="little").tobytes()
    header = header_for(vm, state, stored)
    specs = [SectionSpec("machine", len(machine)), SectionSpec("ram-map", len(bitmap)),
             SectionSpec("ram", stored << PAGE_SHIFT, PAGE_SIZE)]
    with ContainerWriter(path, MAGIC, FORMAT, header, specs) as w:
        w.write("machine", machine)
        w.write("ram-map", bitmap)
        write_ram(w, mem, bits)
        w.commit()
        return SaveInfo(path, w.file_size, mem.npages, stored)


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Page ranges [first, end) of a file that hold data (SEEK_DATA/SEEK_HOLE): the rest reads as zeros."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start >> PAGE_SHIFT, (end + PAGE_SIZE - 1) >> PAGE_SHIFT
        pos = end


def _candidates(mem: GuestMemory) -> Bits:
    """Pages that may hold data. Reading a never-written page of a memfd through the mapping would allocate it (and,
    for a fork, in its parent's file), so a scan reads only what some file or private copy really holds."""
    cand = np.zeros(mem.npages, np.bool_)
    try:
        if mem.base is None and mem.fd is not None:          # a root machine: its own RAM file
            for a, b in _data_extents(mem.fd, mem.size):
                cand[a:b] = True
        elif mem.base is not None:                           # a fork: the image it maps, plus its own copies
            for a, b in _data_extents(mem.base.base_fd, mem.size):
                cand[a:b] = True
            for layer in mem.base.layers:
                for start, length in layer.runs:
                    cand[start:start + length] = True
            cand[mem.owned_pages()] = True
        else:
            cand[:] = True
    except OSError:                                          # no SEEK_DATA here: scan everything
        cand[:] = True
    return cand


def _windows(bits: Bits) -> Iterator[tuple[int, npt.NDArray[np.int64]]]:
    """(first page, pages set) per WINDOW-page window that has any set."""
    pages = np.flatnonzero(bits)
    if pages.size == 0:
        return
    window_of = pages // WINDOW
    cuts = np.flatnonzero(np.diff(window_of)) + 1
    for chunk in np.split(pages, cuts):
        yield int(chunk[0]), chunk


def _contiguous(pages: npt.NDArray[np.int64]) -> bool:
    return int(pages[-1]) - int(pages[0]) + 1 == pages.size


def nonzero_pages(mem: GuestMemory) -> Bits:
    """One bool per page: True where the page holds a non-zero byte."""
    bits = np.zeros(mem.npages, np.bool_)
    for a, pages in _windows(_candidates(mem)):
        b = int(pages[-1]) + 1
        bits[a:b] = mem.pages[a:b].view(np.uint64).any(axis=1)
    return bits


def write_ram(w: ContainerWriter, mem: GuestMemory, bits: Bits) -> None:
    """The "ram" section: each window's stored pages, straight from the mapping when they are contiguous, else
    gathered into one window-sized copy."""
    for _, pages in _windows(bits):
        if _contiguous(pages):
            a, b = int(pages[0]), int(pages[-1]) + 1
            w.write("ram", mem.pages[a:b].reshape(-1).data)
        else:
            w.write("ram", mem.pages[pages].reshape(-1).data)


# --- restore ------------------------------------------------------------------------------------------------------

LAYOUTS = ("compact", "image")     # RAM as stored non-zero pages + a map, or as a sparse page-aligned image


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    shape: MachineShape             # its cpuid: the policy the restored machine gets
    state: MachineState
    bits: Bits
    block_interrupts: bool


def layout_of(f: ContainerFile) -> str:
    memory = f.header.get("memory")
    layout = memory.get("layout", "compact") if isinstance(memory, dict) else "compact"
    if layout not in LAYOUTS:
        raise f.fail(f"the header's RAM layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    return str(layout)


def read_machine(f: ContainerFile, cpuid: str | None = None) -> tuple[str, MachineShape, MachineState, bool]:
    """The saved machine's name, shape, state and block_interrupts flag, checked (RAM aside), against this host's
    CPU and the CPUID policy (`cpuid`: a policy asked for instead of the saved one)."""
    h = f.header
    m, memory = h.get("machine"), h.get("memory")
    if not isinstance(m, dict) or not isinstance(memory, dict):
        raise f.fail("the header lacks its \"machine\" or \"memory\" description")
    name, mib, nvcpus, blocked = m.get("name"), m.get("memory_mib"), m.get("vcpus"), m.get("block_interrupts", False)
    if not isinstance(name, str) or not isinstance(mib, int) or not isinstance(nvcpus, int) \
            or not isinstance(blocked, bool) or mib < 2 or not 1 <= nvcpus <= 64:
        raise f.fail(f"the header's machine description is malformed: {m!r}")
    saved_policy = cpufeatures.saved_policy(f)
    shape = MachineShape(mib, nvcpus, saved_policy)
    slots = make_slots(shape.regions())
    size = sum(s.size for s in slots)
    npages = size >> PAGE_SHIFT
    stored_slots = memory.get("slots")
    if memory.get("page_size") != PAGE_SIZE or memory.get("size") != size or memory.get("pages") != npages:
        raise f.fail(f"the header's memory description {memory!r} does not fit a {mib} MiB machine "
                     f"({size} bytes in {PAGE_SIZE}-byte pages)")
    if stored_slots != [[s.gpa, s.size, s.offset] for s in slots]:
        raise f.fail(f"the saved RAM layout {stored_slots} differs from this vmfork's for {mib} MiB: "
                     f"{[[s.gpa, s.size, s.offset] for s in slots]}")
    try:
        state = MachineState.from_bytes(f.read("machine"))
    except (VmStateError, DeviceStateError) as e:
        raise f.fail(f"section 'machine': {e}") from None
    if state.shape != shape:
        raise f.fail(f"section 'machine' is the state of a {state.shape.memory_mib} MiB / {state.shape.vcpus}-vCPU "
                     f"machine with CPUID policy {state.shape.cpuid!r}, the header says {mib} MiB / {nvcpus} and "
                     f"{saved_policy!r}")
    check_host(f)
    policy = cpufeatures.check_policy(f, open_kvm(), cpuid, state)
    if policy != saved_policy:
        shape = MachineShape(mib, nvcpus, policy)
        state = dataclasses.replace(state, shape=shape)
    return name, shape, state, blocked


def read_plan(f: ContainerFile, cpuid: str | None = None) -> Plan:
    """Everything but RAM, checked, before any machine exists."""
    name, shape, state, blocked = read_machine(f, cpuid)
    npages = sum(s.size for s in make_slots(shape.regions())) >> PAGE_SHIFT
    raw = f.read("ram-map")
    if len(raw) != (npages + 7) // 8:
        raise f.fail(f"section 'ram-map' is {len(raw)} bytes, {npages} pages need {(npages + 7) // 8}")
    all_bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little").astype(np.bool_)
    if all_bits[npages:].any():
        raise f.fail("section 'ram-map' marks pages beyond the end of RAM")
    bits = all_bits[:npages]
    stored = int(np.count_nonzero(bits))
    ram = f.section("ram")
    if ram.size != stored << PAGE_SHIFT:
        raise f.fail(f"section 'ram' holds {ram.size} bytes, section 'ram-map' lists {stored} pages "
                     f"({stored << PAGE_SHIFT} bytes)")
    return Plan(name, shape, state, bits, blocked)


def check_host(f: ContainerFile) -> None:
    """Refuse a file whose vCPUs were given a CPU vendor or feature this host lacks."""
    saved = f.header.get("cpu")
    if not isinstance(saved, dict) or not isinstance(saved.get("vendor"), str) \
            or not isinstance(saved.get("features"), dict):
        raise f.fail("the header lacks a valid \"cpu\" description")
    features: dict[str, Any] = saved["features"]
    for word, value in features.items():
        try:
            cpufeatures.parse_word(word)
        except ValueError:
            raise f.fail(f"the header's cpu description has a malformed feature word {word!r}") from None
        if not isinstance(value, int) or not 0 <= value < 1 << 32:
            raise f.fail(f"the header's cpu feature word {word} is {value!r}")
    host_cpuid = cpu.vcpu_cpuid(open_kvm(), 0)
    host = cpufeatures.describe(host_cpuid)
    if saved["vendor"] != host["vendor"]:
        raise SnapshotHostError(f"{f.path}: saved on a {saved['vendor']} CPU, this host's is {host['vendor']}: "
                                "vmfork does not restore across CPU vendors")
    lacking = cpufeatures.missing(features, cpufeatures.words_of(host_cpuid, features))
    if lacking:
        raise SnapshotHostError(f"{f.path}: this host lacks {len(lacking)} CPU feature(s) the saved machine was "
                                f"given: {', '.join(lacking)}")


def read_ram(f: ContainerFile, mem: GuestMemory, bits: Bits) -> None:
    """Fill fresh (all-zero) RAM from the "ram" section, checking its checksum: one window at a time into a bounce
    buffer, then into the machine's RAM file with pwrite (cheaper here than faulting in every page of the mapping
    by reading straight into it); through the mapping for RAM without a file of its own."""
    offset = f.section("ram").offset
    crc = 0
    bounce = np.empty(WINDOW << PAGE_SHIFT, np.uint8)
    for _, pages in _windows(bits):
        n = pages.size << PAGE_SHIFT
        view = bounce[:n].data
        f.readinto(view, offset)
        crc = zlib.crc32(view, crc)
        offset += n
        if mem.fd is not None:
            pos = 0
            for first, count in _runs(pages):
                _pwrite_all(mem.fd, view[pos:pos + (count << PAGE_SHIFT)], first << PAGE_SHIFT)
                pos += count << PAGE_SHIFT
        else:
            mem.pages[pages] = bounce[:n].reshape(-1, PAGE_SIZE)
    f.check_crc("ram", crc)


def _runs(pages: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    """Sorted page numbers -> (first, count) runs of consecutive pages."""
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [pages.size]))
    return [(int(pages[a]), int(b - a)) for a, b in zip(starts, ends, strict=True)]


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n



__all__ = ["FORMAT", "LAYOUTS", "MAGIC", "Plan", "SaveInfo", "check_host", "header_for", "layout_of", "nonzero_pages",
           "read_machine", "read_plan", "read_ram", "save_compact", "write_ram"]
