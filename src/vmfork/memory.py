"""Guest RAM: memfd-backed memory, copy-on-write fork views, and dirty-page tracking.

A root machine's RAM lives in one memfd mapped MAP_SHARED. A fork maps the same memfd MAP_PRIVATE at the host
address its KVM memory slots already point to (KVM follows the mapping through its MMU notifiers), so it shares every
page until it writes one. A fork of a fork needs the pages its parent fork owns, which exist only as private anonymous
memory in the parent; freezing the parent copies just those pages into a sparse "layer" memfd, and the grandchild
maps the layers over the base at those pages.

Reset copies the parent's version of every page dirtied since the last reset back into the fork (a 4 KiB memcpy per
page, no syscall), which is cheaper here than madvise(MADV_DONTNEED) and keeps the fork's mapping layout unchanged.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _libc, shadow_flush
from ._libc import MAP_FIXED, MAP_NORESERVE
from .errors import MemoryAccessError, VmforkError
from .kvm import DirtyRing, VmFd
from .kvm.constants import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, KVM_MEM_LOG_DIRTY_PAGES

PAGE_SIZE = 4096
PAGE_SHIFT = 12

_sys_mmap = _libc.mmap
_sys_munmap = _libc.munmap


def reserve_address_space(size: int) -> int:
    """Reserve `size` bytes of host address space (no memory is committed until touched)."""
    return _sys_mmap(0, size, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)


def clear_address_space(addr: int, size: int) -> None:
    """Replace whatever is mapped at [addr, addr+size) by fresh reserved address space, in place."""
    _sys_mmap(addr, size, mmap.PROT_READ | mmap.PROT_WRITE,
              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0)


def release_address_space(addr: int, size: int) -> None:
    _sys_munmap(addr, size)


@dataclass(frozen=True, slots=True)
class Slot:
    """One KVM memory slot: guest-physical [gpa, gpa+size) backed by RAM offset [offset, offset+size)."""

    index: int
    gpa: int
    size: int
    offset: int


def make_slots(regions: Sequence[tuple[int, int]]) -> tuple[Slot, ...]:
    """Slots for RAM regions (gpa, size) laid out back to back in the RAM file."""
    slots, offset = [], 0
    for i, (gpa, size) in enumerate(regions):
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise VmforkError(f"RAM region {gpa:#x}+{size:#x} is not page aligned")
        slots.append(Slot(i, gpa, size, offset))
        offset += size
    return tuple(slots)


@dataclass(frozen=True, slots=True)
class Layer:
    """Pages (page numbers in the RAM file, as start/length runs) whose content comes from `fd` at the same offset."""

    fd: int
    runs: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class MemoryImage:
    """The frozen content of a machine's RAM as a fork sees it: a base file plus layers on top, oldest first.

    The base is a root machine's RAM memfd, or a template save file whose RAM image starts at `base_offset`."""

    size: int
    slots: tuple[Slot, ...]
    base_fd: int
    layers: tuple[Layer, ...] = ()
    base_offset: int = 0
    # (st_dev, st_ino) of the base file when the image was made, if known: the fork path checks a premapped
    # shell against it without an fstat (a system call drops the GIL, which the shell pool's threads then hold)
    base_file: tuple[int, int] | None = field(default=None, compare=False)


def file_id(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino) of an open file: the same descriptor number may name another file later."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def describe_image(image: MemoryImage) -> tuple[dict[str, Any], list[int]]:
    """An image as JSON-able data plus the files it maps, to send to another process (with SCM_RIGHTS)."""
    desc = {"size": image.size, "slots": [[s.index, s.gpa, s.size, s.offset] for s in image.slots],
            "layers": [[list(r) for r in layer.runs] for layer in image.layers], "base_offset": image.base_offset}
    return desc, [image.base_fd, *(layer.fd for layer in image.layers)]


def image_from_description(desc: dict[str, Any], fds: Sequence[int]) -> MemoryImage:
    """The inverse of `describe_image`, with the received files (the caller owns them; the image refers to them)."""
    try:
        layers = desc["layers"]
        if len(fds) != 1 + len(layers):
            raise VmforkError(f"a memory image with {len(layers)} layers needs {1 + len(layers)} files, "
                              f"got {len(fds)}")
        return MemoryImage(int(desc["size"]), tuple(Slot(*map(int, sl)) for sl in desc["slots"]), fds[0],
                           tuple(Layer(fd, tuple((int(a), int(b)) for a, b in runs))
                                 for fd, runs in zip(fds[1:], layers, strict=True)),
                           int(desc.get("base_offset", 0)))
    except (KeyError, TypeError, ValueError) as e:
        raise VmforkError(f"malformed memory image description: {e}") from None


def _runs(pages: npt.NDArray[np.int64]) -> tuple[tuple[int, int], ...]:
    """Sorted page numbers -> (start, length) runs of consecutive pages."""
    if pages.size == 0:
        return ()
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [pages.size]))
    return tuple((int(pages[s]), int(e - s)) for s, e in zip(starts, ends, strict=True))


def map_image_anywhere(image: MemoryImage, prot: int) -> int:
    """Map a layerless `image` copy-on-write at a new address the kernel picks; returns it. Unlike map_image over
    reserved space this replaces no mapping, so no MMU notifier runs: replacing one calls every KVM VM's notifier
    in the process (about 0.2 ms per shell with 1,000 VMs here)."""
    if image.layers:
        raise ValueError("map_image_anywhere maps layerless images only")
    return _sys_mmap(0, image.size, prot, mmap.MAP_PRIVATE, image.base_fd, image.base_offset)


def map_image(image: MemoryImage, addr: int, prot: int) -> None:
    """Map `image` copy-on-write at `addr` (which must already be reserved for image.size bytes)."""
    _sys_mmap(addr, image.size, prot, mmap.MAP_PRIVATE | MAP_FIXED, image.base_fd, image.base_offset)
    for layer in image.layers:
        for start, length in layer.runs:
            off = start << PAGE_SHIFT
            _sys_mmap(addr + off, length << PAGE_SHIFT, prot, mmap.MAP_PRIVATE | MAP_FIXED, layer.fd, off)


class _DirtyTracker:
    """Pages written since the last reset: KVM's dirty log (guest writes) plus pages vmfork itself wrote.

    Guest writes live in bitmaps (KVM's format, one bit per page); host writes, which are few and frequent (a
    fuzzer writes its input every iteration), in sets of page numbers. The three bitmaps are made on first use, in
    one allocation: a fork whose resets take the dirty rings' few-pages path never needs them, and fresh memory
    costs a page fault per 4 KiB on first touch here (about 8 µs each, several per fork otherwise)."""

    __slots__ = ("_bitmaps", "_words_view", "ever_mark", "ever_pages", "host", "host_ever", "npages", "words")

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.words = (npages + 63) // 64
        self._bitmaps: npt.NDArray[np.uint64] | None = None
        self._words_view: memoryview | None = None
        self.host: set[int] = set()
        self.host_ever: set[int] = set()
        self.ever_pages: set[int] = set()               # guest-dirty pages read by resets of a few pages
        self.ever_mark: npt.NDArray[np.uint8] | None = None   # the same, from ring resets of many pages: a byte each

    def _all(self) -> npt.NDArray[np.uint64]:
        if self._bitmaps is None:
            self._bitmaps = np.zeros((3, self.words), np.uint64)
        return self._bitmaps

    @property
    def scratch(self) -> npt.NDArray[np.uint64]:
        """KVM_GET_DIRTY_LOG's target, and the few-words scan's input."""
        return self._all()[0]

    @property
    def guest(self) -> npt.NDArray[np.uint64]:
        """Guest-written pages accumulated since the last reset."""
        return self._all()[1]

    @property
    def ever(self) -> npt.NDArray[np.uint64]:
        """Guest-written pages since the fork was made."""
        return self._all()[2]

    @property
    def scratch_addr(self) -> int:
        return int(self._all()[0].ctypes.data)

    @property
    def scratch_words(self) -> memoryview:
        if self._words_view is None:
            self._words_view = self.scratch.data.cast("B").cast("Q")
        return self._words_view


def _bits_to_pages(bitmap: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    """Page numbers of the set bits, scanning only non-zero words (the bitmap is mostly zeros)."""
    nz = np.flatnonzero(bitmap)
    if nz.size == 0:
        return np.empty(0, np.int64)
    bits = np.unpackbits(bitmap[nz].view(np.uint8), bitorder="little").reshape(nz.size, 64)
    rows, cols = np.nonzero(bits)
    return (nz[rows].astype(np.int64) << 6) | cols.astype(np.int64)


def _set_bits(bitmap: npt.NDArray[np.uint64], pages: npt.NDArray[np.int64]) -> None:
    """Set the bits of `pages` (any order, repeats allowed) in `bitmap` (np.bitwise_or.at is much slower)."""
    if pages.size == 0:
        return
    if pages.size > 1 and not (pages[1:] >= pages[:-1]).all():
        pages = np.sort(pages)
    words = pages >> 6
    bits = np.left_shift(np.uint64(1), (pages & 63).astype(np.uint64))
    starts = np.flatnonzero(np.concatenate(([True], words[1:] != words[:-1])))
    bitmap[words[starts]] |= np.bitwise_or.reduceat(bits, starts)


_RING_LOOP = 32        # ring entries read one by one before the rest is read with numpy
# A reset copying more pages than this (the hot pages plus vmfork's writes) write-protects the hot pages again.
# Keeping a page writable saves its write-protect fault (about 8 µs here) and ring entry on each input that writes
# it again; an idle hot page costs a 4 KiB copy per reset (under 1 µs).
HOT_LIMIT = 64
_RING_WINDOW = 1024    # entries numpy looks at per step
_HARVEST = KVM_DIRTY_GFN_F_DIRTY | KVM_DIRTY_GFN_F_RESET   # xor turns a DIRTY entry into a RESET one


# Entries KVM keeps free at the end of a ring (KVM_DIRTY_RING_RSVD_ENTRIES, 64, plus the CPU's dirty-log buffer:
# 512 with Intel's PML): its soft limit is at least the ring's size less these.
_RING_RESERVED = 64 + 512


def _mark_harvested(flags: npt.NDArray[np.int64], start: int, n: int, mask: int) -> None:
    """Mark `n` ring entries from the free-running index `start` harvested (RESET, not DIRTY), slot and offset
    kept: KVM's reset walk passes them, re-arming whatever page they last named (harmless: that page's next write
    is logged)."""
    if n <= 0:
        return
    idx = (start + np.arange(n, dtype=np.int64)) & mask
    flags[idx] = (flags[idx] & ~np.int64(KVM_DIRTY_GFN_F_DIRTY | KVM_DIRTY_GFN_F_RESET)) | KVM_DIRTY_GFN_F_RESET


def _harvest_ring_bulk(ring: DirtyRing, f: int,
                       slot_base: npt.NDArray[np.int64] | None) -> tuple[int, npt.NDArray[np.int64]]:
    """Read every pending entry of `ring` from `f` on with numpy (a reset after hundreds or thousands of written
    pages), a window of entries at a time (never across the ring's end, so each window is a plain slice), in as
    few numpy calls as possible: right after a guest run each costs several microseconds here. Pending entries
    are contiguous from `f`, and the others are either cleared (KVM clears what it re-arms) or marked harvested by
    this call (a window that wraps onto them), so a window's count of DIRTY flags is its count of pending entries;
    except after a ring overflowed (kvm_pvm, see GuestMemory._ring_trouble), when a window may hold pending entries
    after a gap: only those before the gap are read, and the caller resynchronises.
    `slot_base` None: one slot at RAM offset 0. Returns the new fetch index and the RAM-file page numbers, in the
    order written.
    """
    entries = np.frombuffer(ring.words, np.int64).reshape(ring.entries, 2)
    parts = []
    while True:
        j = f & ring.mask
        window = entries[j:j + min(_RING_WINDOW, ring.entries - j)]
        flags = window[:, 0]
        dirty = (flags & KVM_DIRTY_GFN_F_DIRTY) != 0
        k = int(np.count_nonzero(dirty))
        if k and not dirty[k - 1]:                  # not a prefix: stop at the gap
            k = int(np.argmin(dirty))
            window = window[:k + 1]                 # (so that the loop ends below)
        if k:
            if slot_base is None:
                parts.append(window[:k, 1].copy())
            else:
                parts.append(slot_base[(flags[:k] >> 32) & 0xFFFF] + window[:k, 1])
            np.bitwise_xor(flags[:k], _HARVEST, out=flags[:k])
            f += k
        if k < len(window):
            break
    if not parts:                   # nothing pending at `f` (a loop that ended right at its full count)
        return f, np.empty(0, np.int64)
    return f, parts[0] if len(parts) == 1 else np.concatenate(parts)


_memmove = ctypes.memmove


def _page_runs(dst_addr: int, src_addr: int, pages: list[int]) -> list[tuple[int, int, int]]:
    """memmove arguments (dst, src, size) copying sorted pages from src to dst, one per run of consecutive pages."""
    runs = []
    i, n = 0, len(pages)
    while i < n:
        first = last = pages[i]
        i += 1
        while i < n and pages[i] == last + 1:
            last = pages[i]
            i += 1
        runs.append((dst_addr + (first << PAGE_SHIFT), src_addr + (first << PAGE_SHIFT),
                     (last - first + 1) << PAGE_SHIFT))
    return runs


def _copy_runs(dst_addr: int, src_addr: int, pages: list[int]) -> None:
    """Copy sorted pages from src to dst, one memmove per run of consecutive pages."""
    for dst, src, size in _page_runs(dst_addr, src_addr, pages):
        _memmove(dst, src, size)


def _copy_page_array(dst_addr: int, src_addr: int, dst: npt.NDArray[np.uint8], src: npt.NDArray[np.uint8],
                     pages: npt.NDArray[np.int64]) -> None:
    """Copy many pages: one memmove per run of consecutive ascending pages (the pages may come in any order, and
    repeat), unless they are so scattered that numpy's gather/scatter (two copies, but no per-run Python) is
    cheaper."""
    breaks = np.flatnonzero(np.diff(pages) != 1)
    if breaks.size > pages.size // 8:
        dst[pages] = src[pages]
        return
    firsts = pages[np.concatenate(([0], breaks + 1))].tolist()
    lasts = pages[np.concatenate((breaks, [pages.size - 1]))].tolist()
    for first, last in zip(firsts, lasts, strict=True):
        _memmove(dst_addr + (first << PAGE_SHIFT), src_addr + (first << PAGE_SHIFT), (last - first + 1) << PAGE_SHIFT)


# Above this many non-zero bitmap words (64 pages each), scanning switches from a Python loop to numpy.
_SMALL_WORDS = 16
_pagemap: tuple[int, int] | None = None      # (pid, descriptor) of this process's /proc/self/pagemap


def pagemap_fd() -> int:
    """This process's /proc/self/pagemap, opened once and kept. A jailed domain (toolstack/jail.py) opens it while
    it enters the jail: once a process has changed its uid it is not dumpable, and its /proc files belong to root.
    A forked child (process forks) opens its own: the descriptor reads the mm of the process that opened it."""
    global _pagemap
    pid = os.getpid()
    if _pagemap is None or _pagemap[0] != pid:
        if _pagemap is not None:
            os.close(_pagemap[1])
        _pagemap = (pid, os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC))
    return _pagemap[1]


class GuestMemory:
    """A machine's RAM as mapped in this process, with its KVM slots and dirty tracking."""

    def __init__(self, size: int, slots: tuple[Slot, ...], host_addr: int, *, fd: int | None,
                 base: MemoryImage | None, base_addr: int | None, owns_fd: bool) -> None:
        self.size = size
        self.slots = slots
        self.host_addr = host_addr
        self.fd = fd                    # the memfd holding this RAM (root machines only)
        self.base = base                # for forks: what the fork started from (and resets to)
        self._base_addr = base_addr
        self._owns_fd = owns_fd
        self.npages = size >> PAGE_SHIFT
        self._buf = (ctypes.c_uint8 * size).from_address(host_addr)
        self.pages: npt.NDArray[np.uint8] = np.ctypeslib.as_array(self._buf).reshape(self.npages, PAGE_SIZE)
        self.base_pages: npt.NDArray[np.uint8] | None = None
        self._base_pages_addr = base_addr or 0
        if base_addr is not None:
            base_buf = (ctypes.c_uint8 * size).from_address(base_addr)
            self.base_pages = np.ctypeslib.as_array(base_buf).reshape(self.npages, PAGE_SIZE)
        self._dirty = _DirtyTracker(self.npages)
        self._guest_any = False     # d.guest has bits set (saves a bitmap pass on the reset path)
        self._vm: VmFd | None = None
        self._dirty_logging = False
        self._rings: list[DirtyRing] = []     # the VM's dirty rings, when it logs into rings instead of bitmaps
        self._fruitless_full = 0              # ring-full exits in a row that harvested nothing of their ring
        self._last_cleared = 0                # entries the last re-arming (_protect_again) let KVM reuse
        self._ring_lock = threading.Lock()    # vCPU threads empty full rings while the machine runs
        self._slot_base = [s.offset >> PAGE_SHIFT for s in slots]            # ring entry slot -> first page
        flat = len(slots) == 1 and slots[0].offset == 0
        self._slot_base_bulk = None if flat else np.array(self._slot_base, np.int64)
        # Ring mode: pages a fork's recent resets restored and left writable (a fuzzer's working set), copied back
        # at every reset; more than `hot_limit` pages restored in one reset write-protects them all again.
        self.hot_limit = HOT_LIMIT
        self._hot: set[int] = set()
        # A dirty ring that filled up to its last entry may have overflowed (a guest whose kernel mode the host
        # emulates logs a ring entry per emulated store, and can push past the soft limit within one exit): ring
        # entries are then lost, and the next reset restores every page the fork owns according to the kernel's
        # page tables instead (`_private_pages`). `_ever_lost` keeps owned_pages() honest for the fork's life.
        self._lost = False
        self._ever_lost = False
        self._hot_runs: list[tuple[int, int, int]] | None = []   # memmove arguments for _hot; None: rebuild
        # steady_copies(): (the _hot_runs and host pages it was made for, memmoves, count)
        self._steady: tuple[list[tuple[int, int, int]], frozenset[int], list[tuple[int, int, int]], int] | None = None
        self._frozen: MemoryImage | None = None
        self._layer_fds: list[int] = []
        self.closed = False
        # Set while forks map this RAM: their view of it must not change under them.
        self.readonly: str | None = None

    # --- construction -------------------------------------------------------------------------------------------

    @classmethod
    def allocate(cls, regions: Sequence[tuple[int, int]], *, name: str = "vmfork-ram") -> GuestMemory:
        """Fresh zeroed RAM for a root machine, in a memfd that forks can map."""
        slots = make_slots(regions)
        size = sum(s.size for s in slots)
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            addr = _sys_mmap(0, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | MAP_NORESERVE, fd, 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(size, slots, addr, fd=fd, base=None, base_addr=None, owns_fd=True)

    @classmethod
    def fork_of(cls, image: MemoryImage, host_addr: int, *, base: GuestMemory | None = None,
                premapped: bool = False) -> GuestMemory:
        """A copy-on-write view of `image` at `host_addr`, a range reserved (and registered with KVM) beforehand.

        Reset needs the image's content to copy pages back from. An in-process parent's own mapping is exactly
        that (and stays frozen while it has forks), so `base` saves mapping the image a second time.
        `premapped`: the image is already mapped at host_addr (a shell prepared by the pool)."""
        if not premapped:
            map_image(image, host_addr, mmap.PROT_READ | mmap.PROT_WRITE)
        if base is not None:
            mem = cls(image.size, image.slots, host_addr, fd=None, base=image, base_addr=None, owns_fd=False)
            mem.base_pages = base.pages
            mem._base_pages_addr = base.host_addr
            return mem
        if image.layers:
            base_addr = reserve_address_space(image.size)
            try:
                map_image(image, base_addr, mmap.PROT_READ)
            except BaseException:
                release_address_space(base_addr, image.size)
                raise
        else:
            base_addr = _sys_mmap(0, image.size, mmap.PROT_READ, mmap.MAP_PRIVATE | MAP_NORESERVE, image.base_fd,
                                  image.base_offset)
        return cls(image.size, image.slots, host_addr, fd=None, base=image, base_addr=base_addr, owns_fd=False)

    def attach(self, vm: VmFd, *, dirty_logging: bool) -> None:
        """Register this RAM's slots with a VM (done once per VM; a fork's shell registers before mapping)."""
        flags = KVM_MEM_LOG_DIRTY_PAGES if dirty_logging else 0
        for s in self.slots:
            vm.set_user_memory_region(s.index, s.gpa, s.size, self.host_addr + s.offset, flags)
        self._vm = vm
        self._dirty_logging = dirty_logging

    def drop_translations(self) -> None:
        """Make KVM drop every translation it derived from guest memory. Needed after a reset rewrote guest page
        tables from the host on a host that shadows them (kvm_pvm: guest kernel mode emulated): its shadow page
        tables keep mappings built from the old page-table contents, because host writes to an already private page
        reach KVM neither through its write tracking nor through an MMU notifier. (Seen on Linux: after a reset, a
        shell jumped into another process's vDSO.) One move of the VM's flush slot (shadow_flush), or, where KVM
        refuses that slot, re-registering the RAM slots."""
        if self._vm is not None and not shadow_flush.drop_translations(self._vm):
            self.reregister_slots()

    def reregister_slots(self) -> None:
        """Remove and register again this RAM's slots in its VM, which makes KVM drop every translation it derived
        from guest memory (drop_translations' fallback; its flush costs about 1.7 times as much, docs/benchmarks.md)."""
        if self._vm is None:
            return
        flags = KVM_MEM_LOG_DIRTY_PAGES if self._dirty_logging else 0
        for s in self.slots:
            self._vm.set_user_memory_region(s.index, s.gpa, 0, self.host_addr + s.offset, 0)
            self._vm.set_user_memory_region(s.index, s.gpa, s.size, self.host_addr + s.offset, flags)

    def bind(self, vm: VmFd, *, dirty_logging: bool) -> None:
        """Adopt slots that a VM shell registered already at this host address (and its dirty rings, if the VM
        logs into rings)."""
        self._vm = vm
        self._dirty_logging = dirty_logging
        self._rings = vm.dirty_rings if dirty_logging else []

    # --- addressing ---------------------------------------------------------------------------------------------

    def offset_of(self, gpa: int, length: int = 1) -> int:
        """RAM-file offset of guest-physical `gpa`; the whole range must lie in one slot."""
        for s in self.slots:
            if s.gpa <= gpa and gpa + length <= s.gpa + s.size:
                return s.offset + (gpa - s.gpa)
        raise MemoryAccessError(
            f"guest-physical range {gpa:#x}..{gpa + length:#x} is outside guest RAM "
            f"({', '.join(f'{s.gpa:#x}..{s.gpa + s.size:#x}' for s in self.slots)})")

    def gpa_of_offset(self, offset: int) -> int:
        for s in self.slots:
            if s.offset <= offset < s.offset + s.size:
                return s.gpa + (offset - s.offset)
        raise MemoryAccessError(f"RAM offset {offset:#x} is outside guest RAM")

    def _chunks(self, gpa: int, length: int) -> list[tuple[int, int]]:
        """Split a guest-physical range into (offset, length) pieces, one per slot it crosses."""
        out = []
        while length > 0:
            for s in self.slots:
                if s.gpa <= gpa < s.gpa + s.size:
                    n = min(length, s.gpa + s.size - gpa)
                    out.append((s.offset + gpa - s.gpa, n))
                    gpa += n
                    length -= n
                    break
            else:
                raise MemoryAccessError(f"guest-physical address {gpa:#x} is outside guest RAM")
        return out

    # --- access -------------------------------------------------------------------------------------------------

    def read(self, gpa: int, length: int) -> bytes:
        flat = self.pages.reshape(-1)
        return b"".join(flat[off:off + n].tobytes() for off, n in self._chunks(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write into guest RAM from the host; the pages count as dirty for the next reset."""
        if self.readonly:
            raise MemoryAccessError(f"guest RAM is read-only: {self.readonly}")
        src = np.frombuffer(data, np.uint8)
        flat = self.pages.reshape(-1)
        pos = 0
        for off, n in self._chunks(gpa, len(src)):
            flat[off:off + n] = src[pos:pos + n]
            self._mark_host_dirty(off, n)
            pos += n

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM (no copy). Writes through it are NOT tracked: use write() for that."""
        off = self.offset_of(gpa, length)
        return memoryview(self._buf).cast("B")[off:off + length]

    def note_host_written(self, pages: Iterable[int]) -> None:
        """The host writes these pages (page numbers from the start of RAM) itself: they count as dirty for the
        next reset (write(), and fork.VM.run_input, which writes its input in C)."""
        self._dirty.host.update(pages)
        self._dirty.host_ever.update(pages)
        self._frozen = None

    def _mark_host_dirty(self, off: int, n: int) -> None:
        self.note_host_written(range(off >> PAGE_SHIFT, ((off + n - 1) >> PAGE_SHIFT) + 1))

    # --- dirty tracking -----------------------------------------------------------------------------------------

    def sync_dirty_log(self) -> None:
        """Fold KVM's dirty log (which it clears on read) into the accumulated guest-dirty bitmap."""
        if self._vm is None or not self._dirty_logging:
            return
        d = self._dirty
        if self._rings:
            with self._ring_lock:
                before = [r.fetch for r in self._rings]
                small, bulk = self._harvest_rings()
                if self._ring_trouble(before):
                    more_small, more_bulk = self._harvest_rings()
                    small += more_small
                    bulk += more_bulk
                small += self._protect_again(bool(small or bulk))
            if small or bulk:
                _set_bits(d.scratch, np.concatenate([np.array(small, np.int64), *bulk]))
        else:
            scratch_addr = d.scratch.ctypes.data
            for s in self.slots:
                word = s.offset >> (PAGE_SHIFT + 6)
                self._vm.get_dirty_log(s.index, scratch_addr + word * 8)
        if d.scratch.any():
            np.bitwise_or(d.guest, d.scratch, out=d.guest)
            np.bitwise_or(d.ever, d.scratch, out=d.ever)
            d.scratch.fill(0)
            self._guest_any = True
            self._frozen = None

    def dirty_pages(self) -> npt.NDArray[np.int64]:
        """RAM-file page numbers written (by the guest or by vmfork) since the last reset. A fork's hot pages (see
        `hot_limit`) are not logged, so they count as written, and reading this write-protects them again."""
        self.sync_dirty_log()
        d = self._dirty
        return np.union1d(_bits_to_pages(d.guest), np.fromiter(d.host, np.int64, len(d.host)))

    def owned_pages(self) -> npt.NDArray[np.int64]:
        """Pages this fork has ever written since it was created (its private copies)."""
        self.sync_dirty_log()
        d = self._dirty
        if d.ever_pages:
            _set_bits(d.ever, np.fromiter(d.ever_pages, np.int64, len(d.ever_pages)))
            d.ever_pages.clear()
        if d.ever_mark is not None:
            _set_bits(d.ever, np.flatnonzero(d.ever_mark))
        owned = np.union1d(_bits_to_pages(d.ever), np.fromiter(d.host_ever, np.int64, len(d.host_ever)))
        if self._ever_lost:
            owned = np.union1d(owned, self._private_pages())
        return owned

    @property
    def dirty_logging(self) -> bool:
        return self._dirty_logging

    def reset_to_base(self) -> int:
        """Copy the base version of every page dirtied since the last reset back; returns the page count (after
        a reset of many pages from dirty rings, a page written both by the guest and by vmfork counts twice).

        This is the hot path of a fuzzing loop. With dirty rings (`_reset_from_rings`): read the ring entries, one
        KVM_RESET_DIRTY_RINGS, one memmove per run of pages. With bitmaps: one KVM_GET_DIRTY_LOG per slot, one
        numpy scan of the bitmap, then plain Python over the few dirty words and one memmove per run of pages."""
        if self.base_pages is None:
            raise VmforkError("only a fork's memory can be reset")
        if self._rings:
            if self._lost:
                return self._reset_after_loss()
            return self._reset_from_rings()
        d = self._dirty
        scratch = d.scratch
        if self._vm is not None and self._dirty_logging:
            addr = d.scratch_addr
            for s in self.slots:
                self._vm.get_dirty_log(s.index, addr + (s.offset >> (PAGE_SHIFT + 6)) * 8)
        if self._guest_any:
            np.bitwise_or(scratch, d.guest, out=scratch)
            d.guest.fill(0)
            self._guest_any = False
        nz = np.flatnonzero(scratch)
        count = 0
        if nz.size > _SMALL_WORDS:
            pages_arr = _bits_to_pages(scratch)
            if d.host:
                pages_arr = np.union1d(pages_arr, np.fromiter(d.host, np.int64, len(d.host)))
                d.host.clear()
            np.bitwise_or(d.ever, scratch, out=d.ever)
            scratch.fill(0)
            _copy_page_array(self.host_addr, self._base_pages_addr, self.pages, self.base_pages, pages_arr)
            count = int(pages_arr.size)
        else:
            pages: list[int] = []
            if nz.size:
                words = d.scratch_words
                for wi in nz.tolist():
                    w = words[wi]
                    base = wi << 6
                    while w:
                        low = w & -w
                        pages.append(base + low.bit_length() - 1)
                        w ^= low
                scratch.fill(0)
                d.ever_pages.update(pages)
            if d.host:
                pages = sorted(d.host.union(pages))
                d.host.clear()
            if pages:
                _copy_runs(self.host_addr, self._base_pages_addr, pages)
            count = len(pages)
        if count:
            self._frozen = None
        return count

    def _ring_trouble(self, before: list[int]) -> bool:
        """After a harvest (rings were at `before`): note a ring that held entries up to its last one (it may have
        overflowed: entries lost), and put a ring whose pending entries do not start at its fetch index (the
        overflow moved KVM's index on) back in step with KVM. True when a ring was resynchronised: harvest again."""
        resync = False
        for ring, was in zip(self._rings, before, strict=True):
            if ring.fetch - was >= ring.entries:
                self._lost = self._ever_lost = True
            flags = np.frombuffer(ring.words, np.int64).reshape(ring.entries, 2)[:, 0]
            dirty = (flags & KVM_DIRTY_GFN_F_DIRTY) != 0
            if not dirty.any():
                continue
            # Still pending entries after a harvest: they are one circular run; its start is where KVM wrote first.
            starts = np.flatnonzero(dirty & ~np.roll(dirty, 1))
            first = int(starts[0]) if starts.size else 0
            gap = (first - (ring.fetch & ring.mask)) & ring.mask
            # KVM's reset walks from its reset index (our fetch: each reset re-arms exactly what was harvested up to
            # it) over entries marked harvested, and stops at the first that is not. The entries skipped here
            # (overwritten, or re-armed under their earlier lap) are KVM's used entries too: they are marked, else
            # the walk stops in front of them for good and KVM counts the ring full at every KVM_RUN.
            _mark_harvested(flags, ring.fetch, gap, ring.mask)
            ring.fetch += gap
            self._lost = self._ever_lost = True
            resync = True
        return resync

    @property
    def ring_overflowed(self) -> bool:
        """Whether a dirty ring of this VM ever lost entries (the next reset copied back every page held)."""
        return self._ever_lost and bool(self._rings)

    def ring_full(self, vcpu_index: int) -> bool:
        """A vCPU stopped with KVM_EXIT_DIRTY_RING_FULL: empty the rings (sync_dirty_log) and return False, or
        return True where the ring can no longer be used (the caller stops the machine: vm.RING_OVERFLOW). An exit
        with nothing to harvest is normal when the ring is full of entries harvested but left armed (the hot
        pages', which a reset re-arms only now: _protect_again); with none of those either, the ring overflowed
        (_unstick_ring)."""
        ring = self._rings[vcpu_index] if 0 <= vcpu_index < len(self._rings) else None
        if ring is not None and not np.any(np.frombuffer(ring.words, np.int64)[0::2] & KVM_DIRTY_GFN_F_DIRTY):
            self._last_cleared = 0
            self.sync_dirty_log()
            if self._last_cleared:
                return False            # the hot pages' entries re-armed: the ring has room again
            with self._ring_lock:
                return not self._unstick_ring(ring)
        before = ring.fetch if ring is not None else 0
        self.sync_dirty_log()
        # (a full ring whose harvests read nothing of it, exit after exit, cannot be brought back either)
        self._fruitless_full = self._fruitless_full + 1 if ring is not None and ring.fetch == before else 0
        if self._fruitless_full >= 3:
            self._lost = self._ever_lost = True
            return True
        return False

    def _unstick_ring(self, ring: DirtyRing) -> bool:
        """A "ring full" exit with nothing to harvest and nothing harvested left to re-arm. KVM exits so while its
        count of used entries (dirty index - reset index) is at its soft limit, and a reset lowers that count only
        by the entries it walks from its reset index. Where one run pushed more entries than the ring holds
        (kvm_pvm emulates guest kernel code without looking at the ring between its stores), they overwrote each
        other, and KVM still counts up to the limit used. The exit proves at least the soft limit used, so a walk
        of at most that many entries (fewer: the smallest soft limit any KVM sets) cannot pass KVM's dirty index:
        entries still marked harvested (which no walk reached) are unmarked, that many from our index are marked,
        and KVM walks whatever part of them starts at its own. Their pages' records are lost: the next reset copies
        back every page the fork holds. False if KVM walked none of them."""
        assert self._vm is not None
        flags = np.frombuffer(ring.words, np.int64).reshape(ring.entries, 2)[:, 0]
        flags &= ~np.int64(KVM_DIRTY_GFN_F_RESET)
        m = ring.entries - _RING_RESERVED
        _mark_harvested(flags, ring.fetch, m, ring.mask)
        cleared = self._vm.reset_dirty_rings()
        flags &= ~np.int64(KVM_DIRTY_GFN_F_RESET)           # (a part of the run before KVM's index: not walked)
        self._lost = self._ever_lost = True
        if not cleared:
            return False
        ring.fetch += m                 # the walk ended where the marked run did
        return True

    def _private_pages(self) -> npt.NDArray[np.int64]:
        """RAM-file pages this fork's mapping holds as private copies, from /proc/self/pagemap (present or swapped,
        and not a file or shared page): every page the fork ever wrote, whatever its dirty log says."""
        raw = os.pread(pagemap_fd(), self.npages * 8, (self.host_addr >> PAGE_SHIFT) * 8)
        entries = np.frombuffer(raw, np.uint64)
        in_memory = (entries >> np.uint64(62)) != 0                        # bit 63 present, bit 62 swapped
        private = ((entries >> np.uint64(61)) & np.uint64(1)) == 0         # bit 61: file page or shared anon
        return np.flatnonzero(in_memory & private).astype(np.int64)

    def _reset_after_loss(self) -> int:
        """reset_to_base() after a dirty ring overflowed: every privately held page is copied back."""
        assert self.base_pages is not None
        with self._ring_lock:
            self._harvest_rings()
            self._protect_again(True)
        d = self._dirty
        d.guest.fill(0)
        self._guest_any = False
        d.host.clear()
        pages = self._private_pages()
        _copy_page_array(self.host_addr, self._base_pages_addr, self.pages, self.base_pages, pages)
        self._lost = False
        self._frozen = None
        return int(pages.size)

    def _harvest_rings(self) -> tuple[list[int], list[npt.NDArray[np.int64]]]:
        """Read every vCPU's dirty ring and mark the entries harvested (_protect_again re-arms them): the RAM-file
        pages of the entries, in `small` when a ring has fewer than _RING_LOOP (a plain loop over the mapped ring
        is the cheapest way to read a handful), else all of that ring's with numpy, in `bulk`. The caller
        serialises calls."""
        small: list[int] = []
        bulk: list[npt.NDArray[np.int64]] = []
        base = self._slot_base
        for ring in self._rings:
            q, mask, f = ring.words, ring.mask, ring.fetch
            stop = f + _RING_LOOP
            if q[(stop & mask) << 1] & 1:               # more than a loop's worth pending: all with numpy
                f, pages = _harvest_ring_bulk(ring, f, self._slot_base_bulk)
                bulk.append(pages)
                ring.fetch = f
                continue
            while True:
                j = (f & mask) << 1
                w = q[j]
                if not w & 1:                           # KVM_DIRTY_GFN_F_DIRTY
                    break
                small.append(base[(w >> 32) & 0xFFFF] + q[j + 1])
                q[j] = w ^ _HARVEST                     # DIRTY -> RESET, slot kept for KVM
                f += 1
                if f == stop:
                    f, pages = _harvest_ring_bulk(ring, f, self._slot_base_bulk)
                    bulk.append(pages)
                    break
            ring.fetch = f
        return small, bulk

    def _protect_again(self, harvested: bool) -> list[int]:
        """KVM_RESET_DIRTY_RINGS when anything is harvested but not yet re-armed (`harvested`: this call's
        entries; the hot pages' entries always are): KVM write-protects those pages again, so their next write is
        logged. Returns the hot pages, no longer hot: the caller counts them as written."""
        hot = self._hot
        if not (harvested or hot):
            return []
        assert self._vm is not None
        self._last_cleared = self._vm.reset_dirty_rings()
        pages = list(hot)
        hot.clear()
        self._hot_runs = []
        return pages

    def _ever_mark(self) -> npt.NDArray[np.uint8]:
        """One byte per page, set for every page a bulk ring reset restored (part of owned_pages()); allocated on
        first use (zero pages cost nothing until written)."""
        d = self._dirty
        if d.ever_mark is None:
            d.ever_mark = np.zeros(self.npages, np.uint8)
        return d.ever_mark

    def _reset_from_rings(self) -> int:
        """reset_to_base() for a VM that logs into dirty rings: no bitmap to fetch or scan. The rings are read once;
        fewer than a loop's worth of new entries in every ring, and nothing folded in by sync_dirty_log(), is the
        fuzzing loop's case (hot pages); anything more takes the general path."""
        small, bulk = self._harvest_rings()
        if bulk or self._guest_any:
            return self._reset_many_from_rings(small, bulk)
        return self._reset_few_from_rings(small)

    def _reset_many_from_rings(self, small: list[int], bulk: list[npt.NDArray[np.int64]]) -> int:
        """Any number of harvested entries (`small`, `bulk`: _harvest_rings), and pages folded into the bitmap by
        sync_dirty_log(); every page is write-protected again, the hot ones included."""
        d = self._dirty
        assert self.base_pages is not None
        small += self._protect_again(bool(small or bulk))
        if self._guest_any:                             # pages folded in by sync_dirty_log() since the last reset
            bulk.append(_bits_to_pages(d.guest))
            d.guest.fill(0)
            self._guest_any = False
        if bulk:
            # Ring entries are in first-write order and each page appears once per harvest; a page may also be in
            # `small`, `host` or the folded bitmap. No sort or dedup: _copy_page_array copies runs of ascending
            # pages in any order, and copying a page twice is only a little slower.
            if small:
                bulk.append(np.array(small, np.int64))
            if d.host:
                bulk.append(np.fromiter(d.host, np.int64, len(d.host)))
                d.host.clear()
            pages_arr = np.concatenate(bulk) if len(bulk) > 1 else bulk[0]
            self._ever_mark()[pages_arr] = 1
            _copy_page_array(self.host_addr, self._base_pages_addr, self.pages, self.base_pages, pages_arr)
            count = int(pages_arr.size)
        else:
            if small:
                d.ever_pages.update(small)
            if d.host:
                small.extend(d.host)
                d.host.clear()
            if not small:
                return 0
            pages = sorted(set(small))
            _copy_runs(self.host_addr, self._base_pages_addr, pages)
            count = len(pages)
        self._frozen = None
        return count

    def _reset_few_from_rings(self, new: list[int]) -> int:
        """The fuzzing loop's reset: `new`, the pages of fewer than a loop's worth of new entries in every ring.

        They join the hot pages (see `hot_limit`), which are not write-protected again: the guest writes them again
        without a fault or a ring entry, and every reset copies all of them back, through memmove arguments
        prepared when the set changes. Once the set outgrows `hot_limit` it is protected again
        (KVM_RESET_DIRTY_RINGS) and starts over. Pages vmfork wrote (the input) are copied too."""
        d = self._dirty
        hot = self._hot
        runs = self._hot_runs
        if new:
            hot.update(new)
            runs = None
        if runs is None:
            d.ever_pages.update(hot)
            runs = self._hot_runs = _page_runs(self.host_addr, self._base_pages_addr, sorted(hot))
        for dst, src, size in runs:
            _memmove(dst, src, size)
        count = len(hot)
        host = d.host
        if host:
            for page in host:
                if page not in hot:
                    offset = page << PAGE_SHIFT
                    _memmove(self.host_addr + offset, self._base_pages_addr + offset, PAGE_SIZE)
                    count += 1
            host.clear()
        if hot and count > self.hot_limit:
            self._protect_again(True)
        if count:
            self._frozen = None
        return count

    # --- the fuzzing loop's reset in one compiled call (fork.VM.reset_and_run) ------------------------------------

    def steady_copies(self) -> tuple[list[tuple[int, int, int]], int] | None:
        """The memmoves the next reset_to_base() would make, when that is all it would do (the fuzzing loop's
        steady state): dirty rings, none lost, every ring empty, nothing folded in by sync_dirty_log(), and the hot
        pages with the pages vmfork wrote since within hot_limit. Returns (memmoves, pages restored), or None: then
        reset_to_base() it is. The caller calls steady_done(the pages its input writes), then makes the copies and
        writes its input, before anything else writes guest RAM."""
        if not self._rings or self._lost or self._guest_any or self.base_pages is None:
            return None
        runs = self._hot_runs
        if runs is None:
            return None
        for ring in self._rings:
            if ring.words[(ring.fetch & ring.mask) << 1] & 1:      # an entry pending: the full path harvests it
                return None
        host = self._dirty.host
        cached = self._steady
        if cached is None or cached[0] is not runs or cached[1] != host:
            hot = self._hot
            more = sorted(host - hot)
            count = len(hot) + len(more)
            if hot and count > self.hot_limit:
                return None
            cached = self._steady = (runs, frozenset(host),
                                     runs + _page_runs(self.host_addr, self._base_pages_addr, more), count)
        return cached[2], cached[3]

    def steady_done(self, written: frozenset[int]) -> None:
        """The bookkeeping of reset_to_base() and write() for the copies of steady_copies() and an input written
        into the pages `written`: those pages count as written by vmfork (for the next reset and owned_pages()),
        and nothing else since the reset."""
        d = self._dirty
        host = d.host
        if host != written:
            host.clear()
            host.update(written)
        if not written <= d.host_ever:
            d.host_ever.update(written)
        self._frozen = None

    # --- forking ------------------------------------------------------------------------------------------------

    def freeze(self) -> MemoryImage:
        """The current content as an image forks can map. The caller keeps this machine paused while forks live."""
        if self._frozen is not None:
            return self._frozen
        if self.base is None:
            assert self.fd is not None
            self._frozen = MemoryImage(self.size, self.slots, self.fd, base_file=file_id(self.fd))
            return self._frozen
        pages = self.owned_pages()
        layers = self.base.layers
        if pages.size:
            fd = os.memfd_create("vmfork-layer", os.MFD_CLOEXEC)
            self._layer_fds.append(fd)
            os.ftruncate(fd, self.size)
            runs = _runs(pages)
            flat = memoryview(self._buf).cast("B")
            for start, length in runs:
                off = start << PAGE_SHIFT
                os.pwrite(fd, flat[off:off + (length << PAGE_SHIFT)], off)
            layers = (*layers, Layer(fd, runs))
        self._frozen = MemoryImage(self.size, self.slots, self.base.base_fd, layers, self.base.base_offset)
        return self._frozen

    # --- teardown -----------------------------------------------------------------------------------------------

    def close(self, *, unmap_view: bool = True) -> None:
        """Release the mappings and files. `unmap_view=False` leaves the view's address range to its owner."""
        if self.closed:
            return
        self.closed = True
        self.pages = np.empty((0, PAGE_SIZE), np.uint8)
        self.base_pages = None
        if unmap_view:
            _sys_munmap(self.host_addr, self.size)
        if self._base_addr is not None:
            _sys_munmap(self._base_addr, self.size)
        for fd in self._layer_fds:
            os.close(fd)
        self._layer_fds.clear()
        if self._owns_fd and self.fd is not None:
            os.close(self.fd)
            self.fd = None
