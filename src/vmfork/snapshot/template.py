"""Template save files: RAM as a page-aligned image that a restore maps copy-on-write instead of reading.

A template is a save file (savefile.py) whose header says `"layout": "image"` and whose RAM is one section,
"ram-image", holding the whole RAM file at a 4096-byte aligned offset, with every all-zero page left as a hole (the
file is sparse: a 256 MiB guest that used 20 MiB takes 20 MiB on disk). A restore then maps that section
MAP_PRIVATE over the new machine's RAM, as Firecracker maps its snapshot memory file: nothing is read up front, the
guest faults pages in from the page cache as it touches them, and every process that restores the same file shares
those page-cache pages until it writes one. The restored machine is a *fork of the file*: `reset()` returns it to
the file's state, and it can be forked like any fork.

Integrity. Copy-on-write protects the file from the machines, not the machines from the file: a page the guest has
not written yet is read from the file whenever it is touched, so a file that changes under a live machine would
silently change its memory. vmfork therefore
- writes templates read-only (mode 0444) and refuses to map a template that anyone may write;
- checks the RAM image's checksum (the container's crc32 of the section, holes included) once per file version and
  caches the result, keyed by device, inode, size, mtime and ctime (ctime cannot be set back by anyone), in
  `${XDG_CACHE_HOME:-~/.cache}/vmfork/templates.json`; any later change to the file gives it a new key and a new
  check (a damaged file is refused with the section's checksum error);
- watches every mapped template with inotify (IN_MODIFY: a write or a truncation, by anyone, root included) and
  stops every machine of this process that maps it, marking it broken ("the template ... changed while mapped"):
  its memory can no longer be trusted, so it cannot be run or reset again, only destroyed.
A machine holds the file open; renaming or deleting the file does not affect it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import threading
import weakref
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import vmgenid
from .._libc import libc
from ..arch.x86.acpi import vmgenid as acpi_vmgenid
from ..errors import VmforkError
from ..memory import PAGE_SHIFT, PAGE_SIZE, MemoryImage, make_slots
from .compact import FORMAT, MAGIC, SaveInfo, header_for, layout_of, nonzero_pages, read_machine
from .container import ContainerFile, ContainerWriter, SectionSpec, crc32_zeros

if TYPE_CHECKING:
    from ..fork import VM
    from ..vm import Machine

__all__ = ["SECTION", "TemplateError", "restore_template", "save_template"]

SECTION = "ram-image"
CHUNK = 8 << 20                 # bytes read per step when checking or copying an image


class TemplateError(VmforkError):
    """A template file cannot be mapped safely (writable, changed, or not a template)."""


# --- save -----------------------------------------------------------------------------------------------------------

def save_template(vm: Machine, path: Path) -> SaveInfo:
    """Write `vm` (paused) to `path` as a template: RAM as a sparse page-aligned image, the file mode 0444."""
    state = vm.capture()
    machine = state.to_bytes()
    mem = vm.memory
    pages = np.flatnonzero(nonzero_pages(mem))
    header = header_for(vm, state, int(pages.size), layout="image")
    specs = [SectionSpec("machine", len(machine)), SectionSpec(SECTION, mem.size, PAGE_SIZE)]
    with ContainerWriter(path, MAGIC, FORMAT, header, specs, file_mode=0o444) as w:
        w.write("machine", machine)
        done = 0
        for first, count in _page_runs(pages):
            w.skip(SECTION, (first - done) << PAGE_SHIFT)
            w.write(SECTION, mem.pages[first:first + count].reshape(-1).data)
            done = first + count
        w.skip(SECTION, (mem.npages - done) << PAGE_SHIFT)
        w.write(SECTION, b"")
        w.commit()
        size = w.file_size
    return SaveInfo(path, size, mem.npages, int(pages.size))


def _page_runs(pages: np.ndarray) -> list[tuple[int, int]]:   # type: ignore[type-arg]
    """Sorted page numbers -> (first, count) runs."""
    if pages.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [pages.size]))
    return [(int(pages[a]), int(b - a)) for a, b in zip(starts, ends, strict=True)]


# --- checking the image ---------------------------------------------------------------------------------------------

def _data_ranges(fd: int, offset: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, end) ranges (relative to `offset`) of the file's data within [offset, offset + size); the rest is
    holes. Without SEEK_DATA, the whole range."""
    pos, end = offset, offset + size
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos - offset, size
                return
            raise
        if start >= end:
            return
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        yield start - offset, stop - offset
        pos = stop


def _walk_image(f: ContainerFile, sink: Callable[[int, memoryview], None] | None = None) -> None:
    """Read the image section's data (holes as zeros, not read), check its checksum; `sink(offset, data)` gets the
    data parts."""
    sec = f.section(SECTION)
    crc, done = 0, 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for start, stop in _data_ranges(f.fd, sec.offset, sec.size):
        crc = crc32_zeros(start - done, crc)
        pos = start
        while pos < stop:
            n = min(CHUNK, stop - pos)
            f.readinto(view[:n], sec.offset + pos)
            crc = zlib.crc32(view[:n], crc)
            if sink is not None:
                sink(pos, view[:n])
            pos += n
        done = stop
    crc = crc32_zeros(sec.size - done, crc)
    f.check_crc(SECTION, crc)


def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vmfork" / "templates.json"


def _identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _verified(key: str) -> bool:
    try:
        return key in json.loads(_cache_path().read_text())
    except (OSError, ValueError, TypeError):
        return False


def _remember(key: str, path: Path) -> None:
    """Best effort: a cache that cannot be written only means the next restore checks again."""
    cache = _cache_path()
    try:
        try:
            known = json.loads(cache.read_text())
            if not isinstance(known, dict):
                known = {}
        except (OSError, ValueError):
            known = {}
        known[key] = str(path)
        if len(known) > 256:                            # keep the newest entries
            known = dict(list(known.items())[-256:])
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache)
    except OSError:
        pass


def check_image(f: ContainerFile) -> None:
    """The image's checksum, checked unless this very version of the file was checked before."""
    st = os.fstat(f.fd)
    key = _identity(st)
    if _verified(key):
        return
    _walk_image(f)
    if _identity(os.fstat(f.fd)) != key:
        raise TemplateError(f"{f.path} changed while it was being checked")
    _remember(key, f.path)


# --- mapped templates and their watcher -----------------------------------------------------------------------------

@dataclass(eq=False)
class _Mapped:
    """One template file mapped by machines of this process: its open file and those machines."""

    path: Path
    fd: int
    identity: str
    machines: weakref.WeakSet[Machine] = field(default_factory=weakref.WeakSet)
    broken: str | None = None


_mapped: dict[tuple[int, int], _Mapped] = {}          # (st_dev, st_ino) -> the open template
_lock = threading.Lock()

IN_MODIFY = 0x2
IN_CLOEXEC = 0o2000000


class _Watcher:
    """One inotify instance and thread per process, for every mapped template."""

    def __init__(self) -> None:
        fd = libc.inotify_init1(IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd = fd
        self.watches: dict[int, _Mapped] = {}
        threading.Thread(target=self._main, name="vmfork-template-watch", daemon=True).start()

    def watch(self, m: _Mapped) -> None:
        wd = libc.inotify_add_watch(self.fd, os.fsencode(f"/proc/self/fd/{m.fd}"), IN_MODIFY)
        if wd < 0:
            raise TemplateError(f"cannot watch template {m.path} for changes: "
                                f"{os.strerror(ctypes.get_errno())}")
        self.watches[wd] = m

    def _main(self) -> None:
        header = 16                                       # struct inotify_event without its name
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except OSError:
                return
            pos = 0
            while pos + header <= len(data):
                wd, mask, _cookie, length = np.frombuffer(data, np.uint32, 4, pos).tolist()
                pos += header + length
                m = self.watches.get(int(np.int32(wd)))
                if m is not None and mask & IN_MODIFY:
                    _break(m, f"the template {m.path} changed while mapped (written or truncated): this machine's "
                              "memory can no longer be trusted; destroy it")


_watcher: _Watcher | None = None


def _break(m: _Mapped, why: str) -> None:
    with _lock:
        if m.broken is not None:
            return
        m.broken = why
        machines = list(m.machines)
    seen: set[int] = set()
    while machines:
        vm = machines.pop()
        if id(vm) in seen or vm.state == "destroyed":
            continue
        seen.add(id(vm))
        vm.mark_broken(why)
        machines.extend(vm.children)


def _open_mapped(path: Path, st: os.stat_result) -> _Mapped:
    """This process's open handle on the template (one per file), opened afresh and checked to be the same file."""
    global _watcher
    with _lock:
        m = _mapped.get((st.st_dev, st.st_ino))
        if m is not None and m.identity == _identity(st) and m.broken is None:
            return m
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _identity(os.fstat(fd)) != _identity(st):
                raise TemplateError(f"{path} was replaced while it was being restored")
            m = _Mapped(path, fd, _identity(st))
            if _watcher is None:
                _watcher = _Watcher()
            _watcher.watch(m)
        except BaseException:
            os.close(fd)
            raise
        _mapped[(st.st_dev, st.st_ino)] = m
        return m


# --- restore --------------------------------------------------------------------------------------------------------

def _checked_section(f: ContainerFile, size: int) -> None:
    sec = f.section(SECTION)
    if sec.size != size or sec.offset % PAGE_SIZE:
        raise f.fail(f"section {SECTION!r} is {sec.size} bytes at offset {sec.offset}; the machine's RAM is {size} "
                     f"bytes, at a {PAGE_SIZE}-byte aligned offset")


def restore_template(f: ContainerFile, *, paused: bool = True, name: str | None = None,
                     console_log: str | None = None, cpuid: str | None = None) -> VM:
    """Map the template open as `f` copy-on-write into a new machine, a fork of the file (see the module doc)."""
    from ..fork import kernel_mode_emulated, machine_from_image
    saved_name, shape, state, blocked = read_machine(f, cpuid)
    slots = make_slots(shape.regions())
    size = sum(s.size for s in slots)
    _checked_section(f, size)
    st = os.fstat(f.fd)
    if st.st_mode & 0o222:
        raise TemplateError(f"{f.path} is writable: a template must not change while machines map it "
                            f"(chmod a-w {f.path})")
    check_image(f)
    m = _open_mapped(f.path, st)
    image = MemoryImage(size, slots, m.fd, base_offset=f.section(SECTION).offset)
    # A Linux guest where kernel mode is emulated: bitmaps and the translation flush, as for its forks (fork.py,
    # dirty_log_mode): with rings, each emulated kernel store logs an entry and the machine crawls.
    linux = kernel_mode_emulated() and _carries_vmgenid(image)
    vm = machine_from_image(image, state, name=name or saved_name,
                            launch_dm="yes" if state.devices is not None else "no", console_log=console_log,
                            block_interrupts=blocked, dirty_ring=not linux)
    vm.flush_translations_on_reset = linux
    vm.template = str(f.path)
    vmgenid.new_generation(vm)              # every restore of a template is a new generation (vmgenid.py)
    with _lock:
        m.machines.add(vm)
    if not paused:
        vm.start()
    return vm


def _carries_vmgenid(image: MemoryImage) -> bool:
    """Whether the image's ACPI reserved memory holds vmfork's VMGenID block (what vmgenid.present reads from a
    live machine): the sign of a Linux guest booted by vmfork."""
    gpa = acpi_vmgenid.BLOCK_ADDR
    for slot in image.slots:
        if slot.gpa <= gpa and gpa + len(acpi_vmgenid.MAGIC) <= slot.gpa + slot.size:
            where = image.base_offset + slot.offset + gpa - slot.gpa
            return os.pread(image.base_fd, len(acpi_vmgenid.MAGIC), where) == acpi_vmgenid.MAGIC
    return False


def read_image_copy(f: ContainerFile, *, name: str | None = None, console_log: str | None = None,
                    cpuid: str | None = None) -> VM:
    """A template's machine in fresh RAM of its own (no mapping: the file may change or go away afterwards)."""
    from ..fork import VM
    saved_name, shape, state, blocked = read_machine(f, cpuid)
    slots = make_slots(shape.regions())
    _checked_section(f, sum(s.size for s in slots))
    vm = VM.create(memory_mib=shape.memory_mib, vcpus=shape.vcpus, name=name or saved_name,
                   console_log=console_log, with_devices=state.devices is not None, cpuid=shape.cpuid)
    try:
        mem = vm.memory

        assert mem.fd is not None                   # a new root machine's RAM is a memfd

        def copy(offset: int, data: memoryview) -> None:
            done = 0
            while done < len(data):
                done += os.pwrite(mem.fd, data[done:], offset + done)   # type: ignore[arg-type]

        _walk_image(f, copy)
        vm.restore(state)
        vm.irqs_blocked = blocked
        vmgenid.new_generation(vm)
        if state.devices is None:
            vm.launch_dm = "no"
    except BaseException:
        vm.destroy()
        raise
    return vm


def is_template(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a template save file (container checks only)."""
    with ContainerFile.open(path, MAGIC, FORMAT) as f:
        return layout_of(f) == "image"
