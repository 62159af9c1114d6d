"""The file container shared by save files and device-state files: a preamble, a JSON header, checksummed sections.

Layout (all integers little-endian):

    offset  size  field
    0       8     magic: b"VMFKSAVE" (save file) or b"VMFKDEVS" (device-state file)
    8       4     container format version (FORMAT_VERSION)
    12      4     flags, 0
    16      4     header length H
    20      4     CRC32 of the header's H bytes
    24      8     file size: the offset just past the last section
    32      H     header: a UTF-8 JSON object, padded with spaces to H bytes
    32 + H        sections, in the order the header lists them, each at its own alignment; the bytes between two
                  sections are zero

The header always holds "format" (the file kind, e.g. "vmfork-save") and "sections", a list of
{"name", "offset", "size", "crc32"} (crc32: 8 lowercase hex digits of zlib.crc32 of the section's bytes); the
rest depends on the kind. Every byte of the file is covered by a check: the magic, the version, the header's
checksum, each section's checksum, the zero padding, and the file size.

Where a file goes depends on what is at the target path (`save_target`):
- nothing, or a regular file: the file is written to an unnamed temporary file in the target's directory
  (O_TMPFILE), linked under a temporary name carrying the writer's pid (`.NAME.PID.RAND.tmp`) only once complete,
  and renamed over the target. A writer killed before that leaves nothing behind: the kernel frees an unnamed
  file with its last descriptor. Where the file system has no O_TMPFILE the temporary file is named from the start;
  such files whose writer is gone are removed by the next write into that directory.
- a FIFO, a character device, or an open descriptor (`/proc/self/fd/N`, how a domain gets the CLI's stdout for
  `vmfork save DOM -`): the file is built in an unnamed temporary file and then streamed to the target as it is
  (`/dev/null` stays a device, a pipe gets the bytes).
- an open descriptor of an empty regular file (`/proc/self/fd/N`; how the CLI hands a domain the unnamed temporary
  file it made for a save, so the domain never opens a path): written in place, holes kept; naming it, its mode
  and the rename over the target are the descriptor's owner's business (toolstack/passfd.py).
- anything else (a directory, a socket, a block device) is refused with one line, before anything is written.
The preamble (with the magic) is the last thing written before fsync and rename: an interrupted write leaves
neither a file at the target path nor a temporary file that passes for a complete one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from .._libc import link_open_file, replace_durably
from ..errors import SnapshotFormatError, VmforkError

FORMAT_VERSION = 1
PREAMBLE = struct.Struct("<8sIIIIQ")
PREAMBLE_SIZE = PREAMBLE.size              # 32
MAX_HEADER = 16 << 20                      # a header is a few KiB; anything near this is garbage

# Every magic vmfork writes, with what the file is called in messages.
KINDS: dict[bytes, str] = {b"VMFKSAVE": "save file", b"VMFKDEVS": "device-state file"}

_ZEROS = bytes(4096)

_Fail = Callable[[str], SnapshotFormatError]


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _crc_hex(crc: int) -> str:
    return f"{crc & 0xFFFFFFFF:08x}"


_PROC_FD = re.compile(r"/proc/self/fd/(\d+)")
_TEMP_NAME = re.compile(r"\..+\.(\d+)\.[0-9a-f]{8}\.tmp")


def save_target(path: str | os.PathLike[str], what: str = "file") -> str:
    """How a file written to `path` gets there: "replace" (a new path or a regular file: atomic temporary file and
    rename), "stream" (a FIFO, a character device, an open descriptor: written in place). Anything else raises
    VmforkError with one line, so a caller can check before it changes anything."""
    text = os.fspath(path)
    if _PROC_FD.fullmatch(text):
        return "stream"
    try:
        st = os.stat(text)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(text))
        if not os.path.isdir(parent):
            raise VmforkError(f"cannot write {what} {text}: the directory {parent} does not exist") from None
        return "replace"
    except OSError as e:
        raise VmforkError(f"cannot write {what} {text}: {e.strerror or e}") from None
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return "replace"
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        return "stream"
    kind = "a directory" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode) else \
        "a block device" if stat.S_ISBLK(mode) else "not a regular file"
    raise VmforkError(f"cannot write {what} {text}: it is {kind}; give a new file name, a regular file to replace, "
                      "a FIFO or a character device")


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> int:
    """Remove temporary files (`.NAME.PID.RAND.tmp`) that writers killed mid-write left in `directory`: those whose
    pid no longer runs. Returns how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for e in entries:
        m = _TEMP_NAME.fullmatch(e.name)
        if m is None or not e.is_file(follow_symlinks=False):
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue                    # its writer runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue                    # someone else's live process
        try:
            os.unlink(e.path)
            removed += 1
        except OSError:
            pass
    return removed


_ZERO_CHUNK = 1 << 21
_zero_chunk: bytes | None = None


def crc32_zeros(n: int, crc: int = 0) -> int:
    """zlib.crc32 continued over `n` zero bytes."""
    global _zero_chunk
    if _zero_chunk is None:
        _zero_chunk = bytes(_ZERO_CHUNK)
    while n >= _ZERO_CHUNK:
        crc = zlib.crc32(_zero_chunk, crc)
        n -= _ZERO_CHUNK
    return zlib.crc32(memoryview(_zero_chunk)[:n], crc)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _unnamed_file(directory: str | os.PathLike[str]) -> int:
    """An unnamed file in `directory` (O_TMPFILE): it disappears with its last descriptor, so a writer killed
    mid-write leaves nothing behind."""
    return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)


def _empty_regular_file(fd: int) -> bool:
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


@dataclass(frozen=True, slots=True)
class SectionSpec:
    """A section to write: its name, exact size in bytes and alignment in the file."""

    name: str
    size: int
    align: int = 8


@dataclass(slots=True)
class _Placed:
    name: str
    offset: int
    size: int
    written: int = 0
    crc: int = 0


class ContainerWriter:
    """Writes one container file atomically. Declare every section's size up front, fill the sections in order with
    `write()`, then `commit()`; any failure before the commit (or `abort()`) removes the temporary file.

        with ContainerWriter(path, magic, "vmfork-save", header, specs) as w:
            w.write("machine", data)
            w.commit()
    """

    def __init__(self, path: str | os.PathLike[str], magic: bytes, fmt: str, header: dict[str, Any],
                 sections: Sequence[SectionSpec], *, file_mode: int = 0o600) -> None:
        if magic not in KINDS:
            raise ValueError(f"unknown magic {magic!r}")
        self.path = Path(path)
        self.what = KINDS[magic]
        self._magic = magic
        self._header = {"format": fmt, **header}
        names = [s.name for s in sections]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate section names in {names}")
        self._placed, self._header_len, self.file_size = self._layout(sections)
        self._current = 0
        self._committed = False
        self._fd = -1
        self.file_mode = file_mode      # the finished file's permissions (a file replaced or created)
        self.mode = save_target(self.path, self.what)
        directory = self.path.parent
        self._tmp = directory / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        self._named = False             # whether the temporary file has a name yet (else it is O_TMPFILE)
        try:
            m = _PROC_FD.fullmatch(os.fspath(self.path))
            if m is not None and _empty_regular_file(int(m.group(1))):
                self.mode = "fd"
                self._fd = os.dup(int(m.group(1)))
            elif self.mode == "stream":
                self._fd = _unnamed_file(tempfile.gettempdir())
            else:
                remove_stale_temporaries(directory)
                try:
                    self._fd = _unnamed_file(directory)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT) or \
                            not os.path.isdir("/proc/self/fd"):
                        raise
                    self._fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    self._named = True
            # The preamble stays zero (not a vmfork file) until commit(); the header gets its checksums then.
            _write_all(self._fd, bytes(PREAMBLE_SIZE))
            _write_all(self._fd, self._render_header())
        except OSError as e:
            self.abort()
            raise VmforkError(f"cannot write {self.what} {self.path}: {e.strerror or e}") from None

    # --- layout ---------------------------------------------------------------------------------------------

    def _render(self, placed: list[_Placed]) -> bytes:
        table = [{"name": p.name, "offset": p.offset, "size": p.size, "crc32": _crc_hex(p.crc)} for p in placed]
        return json.dumps({**self._header, "sections": table}, indent=1, sort_keys=False).encode()

    def _layout(self, specs: Sequence[SectionSpec]) -> tuple[list[_Placed], int, int]:
        """Offsets for the sections right after a header that lists them (the header's length depends on the
        offsets and the offsets on its length: iterate to the fixed point, then pad the header with spaces)."""
        start = _align(PREAMBLE_SIZE + 2, 8)
        while True:
            placed, pos = [], start
            for spec in specs:
                if spec.size < 0 or spec.align < 1:
                    raise ValueError(f"bad section spec {spec}")
                pos = _align(pos, spec.align)
                placed.append(_Placed(spec.name, pos, spec.size))
                pos += spec.size
            need = _align(PREAMBLE_SIZE + len(self._render(placed)), 8)
            if need <= start:
                return placed, start - PREAMBLE_SIZE, pos
            start = need

    def _render_header(self) -> bytes:
        text = self._render(self._placed)
        if len(text) > self._header_len:
            raise AssertionError("the header grew between layout and commit")
        return text + b" " * (self._header_len - len(text))

    # --- writing --------------------------------------------------------------------------------------------

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Append `data` to section `name` (the current section, or the next one once the current is full)."""
        while self._current < len(self._placed) and self._placed[self._current].name != name:
            p = self._placed[self._current]
            if p.written != p.size:
                raise ValueError(f"section {p.name!r}: {p.written} of {p.size} bytes written before {name!r}")
            self._current += 1
        if self._current == len(self._placed):
            raise ValueError(f"section {name!r} is not declared, or is written out of order")
        p = self._placed[self._current]
        view = memoryview(data).cast("B")
        if p.written + len(view) > p.size:
            raise ValueError(f"section {name!r}: {p.written + len(view)} bytes written, {p.size} declared")
        try:
            if p.written == 0:
                self._pad_to(p.offset)
            _write_all(self._fd, view)
        except OSError as e:
            raise VmforkError(f"cannot write {self.what} {self.path}: {e.strerror or e}") from None
        p.crc = zlib.crc32(view, p.crc)
        p.written += len(view)

    def skip(self, name: str, n: int) -> None:
        """Append `n` zero bytes to section `name` as a hole (nothing written; the file stays sparse there)."""
        if n <= 0:
            return
        self.write(name, b"")
        p = self._placed[self._current]
        if p.written + n > p.size:
            raise ValueError(f"section {name!r}: {p.written + n} bytes written, {p.size} declared")
        try:
            os.lseek(self._fd, n, os.SEEK_CUR)
        except OSError as e:
            raise VmforkError(f"cannot write {self.what} {self.path}: {e.strerror or e}") from None
        p.crc = crc32_zeros(n, p.crc)
        p.written += n

    def _pad_to(self, offset: int) -> None:
        here = os.lseek(self._fd, 0, os.SEEK_CUR)
        while here < offset:
            n = min(offset - here, len(_ZEROS))
            _write_all(self._fd, _ZEROS[:n])
            here += n

    def commit(self) -> None:
        """Finish the file: checksums into the header, the preamble, fsync, rename over the target, fsync the
        directory."""
        for p in self._placed:
            if p.written != p.size:
                raise ValueError(f"section {p.name!r}: {p.written} of {p.size} bytes written")
        try:
            if not self._placed or self._placed[-1].size == 0:
                self._pad_to(self.file_size)
            if os.fstat(self._fd).st_size < self.file_size:        # the last section ends in a hole (skip())
                os.ftruncate(self._fd, self.file_size)
            header = self._render_header()
            os.pwrite(self._fd, header, PREAMBLE_SIZE)
            os.pwrite(self._fd, PREAMBLE.pack(self._magic, FORMAT_VERSION, 0, len(header), zlib.crc32(header),
                                              self.file_size), 0)
            if self.mode == "fd":
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1
                self._committed = True
                return
            if self.mode == "stream":
                self._stream_out()
                os.close(self._fd)
                self._fd = -1
                self._committed = True
                return
            os.fchmod(self._fd, self.file_mode)
            os.fsync(self._fd)
            if not self._named:
                # Only a complete file gets a name (linkat through /proc: an unnamed file cannot be renamed).
                link_open_file(self._fd, self._tmp)
                self._named = True
            os.close(self._fd)
            self._fd = -1
            replace_durably(self._tmp, self.path)
            self._committed = True
        except OSError as e:
            raise VmforkError(f"cannot write {self.what} {self.path}: {e.strerror or e}") from None

    def _stream_out(self) -> None:
        """Copy the finished file to a FIFO, a character device or an open descriptor, in place."""
        m = _PROC_FD.fullmatch(os.fspath(self.path))
        out = os.dup(int(m.group(1))) if m else os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            pos = 0
            while pos < self.file_size:
                chunk = os.pread(self._fd, min(1 << 20, self.file_size - pos), pos)
                if not chunk:
                    raise OSError(errno.EIO, "the temporary file is shorter than written")
                _write_all(out, chunk)
                pos += len(chunk)
        finally:
            os.close(out)

    def abort(self) -> None:
        """Drop the temporary file (no-op after a commit)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self._committed and self._named:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


@dataclass(frozen=True, slots=True)
class Section:
    name: str
    offset: int
    size: int
    crc32: int


class ContainerFile:
    """An open container, checked on opening: magic, version, size, header checksum and JSON, section table and
    padding. Section contents are checked when read (`read()`, or `check_crc()` after streaming them)."""

    def __init__(self, path: Path, fd: int, what: str, header: dict[str, Any], sections: dict[str, Section]) -> None:
        self.path = path
        self.fd = fd
        self.what = what
        self.header = header
        self.sections = sections

    @classmethod
    def open(cls, path: str | os.PathLike[str], magic: bytes, fmt: str) -> ContainerFile:
        path = Path(path)
        what = KINDS[magic]
        m = _PROC_FD.fullmatch(os.fspath(path))
        try:
            # an open descriptor (`/proc/self/fd/N`, passed by a client) is used as it is: reopening it by that path
            # would check the file's permissions against this process (a jailed domain's uid may not read it)
            fd = os.dup(int(m.group(1))) if m else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SnapshotFormatError(f"cannot open {what} {path}: {e.strerror or e}") from None
        try:
            header, sections = _check(fd, path, magic, fmt, what)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, what, header, sections)

    def fail(self, message: str) -> SnapshotFormatError:
        return SnapshotFormatError(f"{self.what} {self.path}: {message}")

    def section(self, name: str) -> Section:
        s = self.sections.get(name)
        if s is None:
            raise self.fail(f"section {name!r} is missing")
        return s

    def read(self, name: str) -> bytes:
        """A whole section's bytes, checksum verified."""
        s = self.section(name)
        data = self._pread(s.offset, s.size, f"section {name!r}")
        self.check_crc(name, zlib.crc32(data))
        return data

    def _pread(self, offset: int, size: int, what: str) -> bytes:
        try:
            data = os.pread(self.fd, size, offset)
        except OSError as e:
            raise self.fail(f"cannot read {what}: {e.strerror or e}") from None
        if len(data) != size:
            raise self.fail(f"{what} is truncated (the file changed while it was read)")
        return data

    def readinto(self, view: memoryview, offset: int) -> None:
        """Fill `view` from the file at `offset` (streaming big sections straight into their destination)."""
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as e:
                raise self.fail(f"cannot read: {e.strerror or e}") from None
            if n <= 0:
                raise self.fail("truncated while reading (the file changed while it was read)")
            done += n

    def check_crc(self, name: str, crc: int) -> None:
        s = self.section(name)
        if crc & 0xFFFFFFFF != s.crc32:
            raise self.fail(f"section {name!r}: checksum mismatch (stored {s.crc32:08x}, computed "
                            f"{crc & 0xFFFFFFFF:08x}): the file is corrupt")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check(fd: int, path: Path, magic: bytes, fmt: str, what: str) -> tuple[dict[str, Any], dict[str, Section]]:
    def fail(message: str) -> SnapshotFormatError:
        return SnapshotFormatError(f"{what} {path}: {message}")

    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, PREAMBLE_SIZE, 0)
    except OSError as e:
        raise fail(f"cannot read: {e.strerror or e}") from None
    if size == 0:
        raise fail(f"the file is empty, not a vmfork {what}")
    got = head[:8]
    if got != magic[:len(got)]:
        other = KINDS.get(got)
        if other is not None:
            raise fail(f"this is a vmfork {other}, not a {what}")
        raise fail(f"not a vmfork {what}: it starts with {got!r}, a {what} starts with {magic!r}")
    if size < PREAMBLE_SIZE:
        raise fail(f"truncated in the preamble: the file has {size} bytes, the preamble alone {PREAMBLE_SIZE}")
    _, version, flags, header_len, header_crc, file_size = PREAMBLE.unpack(head)
    if version != FORMAT_VERSION:
        raise fail(f"format version {version}, this vmfork reads version {FORMAT_VERSION}")
    if flags != 0:
        raise fail(f"unknown flags {flags:#x} in the preamble")
    if header_len < 2 or header_len > MAX_HEADER or PREAMBLE_SIZE + header_len > max(file_size, size):
        raise fail(f"the preamble gives an impossible header length ({header_len} bytes): the file is corrupt")
    if size < PREAMBLE_SIZE + header_len:
        raise fail(f"truncated in the header: the file has {size} bytes, the header ends at byte "
                   f"{PREAMBLE_SIZE + header_len} (the complete file has {file_size})")
    raw = os.pread(fd, header_len, PREAMBLE_SIZE)
    if zlib.crc32(raw) != header_crc:
        raise fail("header checksum mismatch: the file is corrupt")
    try:
        header = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise fail(f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise fail("the header is not a JSON object")
    if header.get("format") != fmt:
        raise fail(f"the header says format {header.get('format')!r}, expected {fmt!r}")
    sections = _section_table(header.get("sections"), PREAMBLE_SIZE + header_len, file_size, fail)
    if size < file_size:
        where = next((f"in section {s.name!r} (bytes {s.offset}-{s.offset + s.size})" for s in sections.values()
                      if s.offset <= size < s.offset + s.size), "between sections")
        raise fail(f"truncated: the file has {size} of its {file_size} bytes; it ends {where}")
    if size > file_size:
        raise fail(f"{size - file_size} unexpected bytes after the end of the last section")
    _check_padding(fd, sections, PREAMBLE_SIZE + header_len, fail)
    return header, sections


def _section_table(table: object, data_start: int, file_size: int, fail: _Fail) -> dict[str, Section]:
    if not isinstance(table, list):
        raise fail("the header has no section table")
    out: dict[str, Section] = {}
    pos = data_start
    for i, entry in enumerate(table):
        if not isinstance(entry, dict):
            raise fail(f"section table entry #{i} is not an object")
        name, offset, size, crc = entry.get("name"), entry.get("offset"), entry.get("size"), entry.get("crc32")
        if not isinstance(name, str) or not isinstance(offset, int) or not isinstance(size, int) \
                or not isinstance(crc, str) or len(crc) != 8:
            raise fail(f"section table entry #{i} is malformed: {entry!r}")
        try:
            crc_value = int(crc, 16)
        except ValueError:
            raise fail(f"section {name!r}: bad checksum field {crc!r}") from None
        if name in out:
            raise fail(f"section {name!r} appears twice")
        if offset < pos or size < 0 or offset + size > file_size:
            raise fail(f"section {name!r} (bytes {offset}-{offset + size}) overlaps another or lies outside the "
                       "file: the file is corrupt")
        out[name] = Section(name, offset, size, crc_value)
        pos = offset + size
    if pos != file_size:
        raise fail(f"the sections end at byte {pos}, the preamble gives a file size of {file_size}: "
                   "the file is corrupt")
    return out


def _gaps(sections: dict[str, Section], data_start: int) -> Iterator[tuple[int, int, str]]:
    pos = data_start
    for s in sections.values():
        if s.offset > pos:
            yield pos, s.offset - pos, s.name
        pos = s.offset + s.size


def _check_padding(fd: int, sections: dict[str, Section], data_start: int, fail: _Fail) -> None:
    for offset, length, before in _gaps(sections, data_start):
        if length > 1 << 20:
            raise fail(f"a {length}-byte gap before section {before!r}: the file is corrupt")
        if os.pread(fd, length, offset).count(0) != length:
            raise fail(f"non-zero padding before section {before!r} (bytes {offset}-{offset + length}): "
                       "the file is corrupt")
