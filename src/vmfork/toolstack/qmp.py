"""The QEMU Machine Protocol (QMP) as a domain's control socket speaks it: framing, errors, argument checks, and a
small blocking client.

Wire format (QEMU's qmp-spec): the server greets with `{"QMP": {"version": {...}, "capabilities": []}}`; the client
must send `{"execute": "qmp_capabilities"}` first; then each `{"execute": NAME, "arguments": {...}, "id": ANY}` gets
`{"return": VALUE, "id": ANY}` or `{"error": {"class": CLASS, "desc": TEXT}, "id": ANY}`; asynchronous events are
`{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": US}}`. The server ends every message it
sends with CRLF. Client input is a stream of JSON objects, not lines: objects may span lines or share one, as with
QEMU's JSON streamer. As a convenience for text pasted from documentation, a backslash at the end of a line outside a
string counts as a space (the seed's socat example breaks a command over lines that way).

Error classes used: GenericError (bad JSON, bad arguments, a refused command) and CommandNotFound (unknown command,
commands before capabilities negotiation).
"""

from __future__ import annotations

import array
import json
import os
import re
import select
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .runtime import ToolstackError

__all__ = ["MAX_MESSAGE", "ArgSpec", "JsonSplitter", "QmpChannel", "QmpCommandError", "QmpError", "check_args",
           "encode", "error_reply", "event", "greeting"]

MAX_MESSAGE = 64 << 20          # one client message (a memory write of up to 32 MiB in hex fits)
BARE_KEPT = 64                  # bytes of a bare (non-JSON) token kept for its error reply
MAX_FDS = 253


class QmpError(Exception):
    """An error reply to send: `{"error": {"class": cls, "desc": desc}}`."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


class QmpCommandError(ToolstackError):
    """The domain answered a command with an error (the client side)."""

    def __init__(self, command: str, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.command = command
        self.cls = cls
        self.desc = desc


def encode(msg: Mapping[str, Any]) -> bytes:
    return json.dumps(msg, separators=(", ", ": ")).encode() + b"\r\n"


def error_reply(exc: QmpError, msg_id: Any = None, has_id: bool = False) -> dict[str, Any]:
    reply: dict[str, Any] = {"error": {"class": exc.cls, "desc": exc.desc}}
    if has_id:
        reply["id"] = msg_id
    return reply


def greeting(version: str) -> dict[str, Any]:
    major, minor, micro = ([int(p) for p in version.split(".")[:3] if p.isdigit()] + [0, 0, 0])[:3]
    return {"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                                "package": f"vmfork {version}"},
                    "capabilities": []}}


def event(name: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    now = time.time()
    sec = int(now)
    return {"event": name, "data": dict(data or {}),
            "timestamp": {"seconds": sec, "microseconds": int((now - sec) * 1e6)}}


# --- framing ------------------------------------------------------------------------------------------------------

# The bytes that end a run of string, code or bare-token bytes (see _find).
_STRING_STOP = b'"\\'
_CODE_STOP = b'{}[]"\\'
_BARE_STOP = b" \t\r\n\f\v{["                # where a bare (non-JSON) token ends
_CONTINUATION = re.compile(rb"\\[ \t\r]*\n")


_STRING_RE = re.compile(rb'["\\]')
_CODE_RE = re.compile(rb'[{}\[\]"\\]')
_BARE_RE = re.compile(rb"[ \t\r\n\f\v{\[]")
_NEAR = 4096                    # bytes searched with the regex before memchr takes over


def _find(buf: bytearray, regex: re.Pattern[bytes], stops: bytes, start: int, end: int) -> int:
    """The first index in buf[start:end] holding one of `stops` (which `regex` matches), or -1. Nearby stops (dense
    JSON) are found with one regex search of a small window; beyond it with one bytearray.find (memchr) per stop
    byte, each bounded by the nearest hit so far: a long string or garbage line costs one fast pass, where a regex
    character class scans at a few tens of MB/s here."""
    m = regex.search(buf, start, start + _NEAR)
    if m is not None:
        return m.start()
    if start + _NEAR >= end:
        return -1
    best = end
    for ch in stops:
        j = buf.find(ch, start + _NEAR, best)
        if j >= 0:
            best = j
    return best if best < end else -1


@dataclass(frozen=True, slots=True)
class Framed:
    """One client message: its bytes, or a framing error to report."""

    data: bytes
    error: str | None = None


class JsonSplitter:
    """Cuts a byte stream into top-level JSON texts by bracket depth outside strings (as QEMU's JSON streamer
    does), so messages can span lines and several can share one line. Parsing each text is left to json.loads."""

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self.buf = bytearray()
        self.limit = limit
        self._pos = 0           # scan position in buf
        self._start = -1        # start of the message being scanned, -1 between messages
        self._depth = 0
        self._in_string = False
        self._bare = False      # the message being scanned is a bare token (not an object or array)
        self._bare_len = 0      # its length so far (only its first BARE_KEPT bytes are kept)
        self.broken = False     # an oversized message: the stream cannot be resynchronised

    def feed(self, data: bytes) -> list[Framed]:
        if self.broken:
            return []
        self.buf += data
        return self._scan(final=False)

    def finish(self) -> list[Framed]:
        """The end of the stream: whatever is left is one last (incomplete, hence malformed) message."""
        if self.broken:
            return []
        out = self._scan(final=True)
        rest = bytes(self.buf).strip()
        self.buf.clear()
        self._pos = 0
        self._start = -1
        self._bare = False
        if rest:
            out.append(Framed(rest))
        return out

    def _scan(self, *, final: bool) -> list[Framed]:
        out: list[Framed] = []
        buf = self.buf
        i = self._pos
        n = len(buf)
        while i < n:
            if self._start < 0:
                # between messages: skip blanks; an object/array starts a message, anything else is a bare token
                while i < n and buf[i] in b" \t\r\n\f\v":
                    i += 1
                if i >= n:
                    break
                self._start = i
                if buf[i] in b"{[":
                    self._depth = 1
                    i += 1
                else:
                    self._bare = True
                    self._bare_len = 0
                continue
            if self._bare:
                # A bare token is never valid QMP: it is scanned once (a long garbage line costs one pass, not one
                # per chunk received) and only its first bytes are kept, for the error message.
                stop = _find(buf, _BARE_RE, _BARE_STOP, i, n)
                end = n if stop < 0 else stop
                self._bare_len += end - i
                keep = self._start + BARE_KEPT
                if end > keep:
                    del buf[keep:end]
                    n -= end - keep
                    end = keep
                i = end
                if stop < 0 and not final:
                    break
                out.append(Framed(bytes(buf[self._start:end])))
                self._start = -1
                self._bare = False
                if self._bare_len > self.limit:
                    self.broken = True
                    out[-1] = Framed(b"", f"message larger than {self.limit >> 20} MiB: closing the connection")
                    break
                continue
            if self._in_string:
                j = _find(buf, _STRING_RE, _STRING_STOP, i, n)
                if j < 0:
                    i = n
                    break
                if buf[j] == 0x5C:                       # backslash: skip the escaped character
                    if j + 1 >= n:
                        i = j
                        break
                    i = j + 2
                    continue
                self._in_string = False
                i = j + 1
                continue
            j = _find(buf, _CODE_RE, _CODE_STOP, i, n)
            if j < 0:
                i = n
                break
            ch = buf[j]
            if ch == 0x22:                               # "
                self._in_string = True
                i = j + 1
            elif ch == 0x5C:                             # a backslash outside a string
                cont = _CONTINUATION.match(buf, j)
                if cont is not None:
                    buf[j:cont.end()] = b" " * (cont.end() - j)
                    i = cont.end()
                elif not final and re.fullmatch(rb"\\[ \t\r]*", buf[j:]):
                    i = j                                # wait for the rest of the line
                    break
                else:
                    i = j + 1                            # json.loads will report it
            elif ch in b"{[":
                self._depth += 1
                i = j + 1
            else:                                        # } or ]
                self._depth -= 1
                i = j + 1
                if self._depth == 0:
                    out.append(Framed(bytes(buf[self._start:i])))
                    self._start = -1
        # drop what has been consumed
        keep_from = self._start if self._start >= 0 else i
        if keep_from > 0:
            del buf[:keep_from]
            i -= keep_from
            if self._start >= 0:
                self._start = 0
        self._pos = i
        if self._start >= 0 and len(buf) > self.limit:
            self.broken = True
            buf.clear()
            self._pos = 0
            self._start = -1
            self._bare = False
            out.append(Framed(b"", f"message larger than {self.limit >> 20} MiB: closing the connection"))
        return out


def parse_message(framed: Framed) -> tuple[dict[str, Any], Any, bool]:
    """A framed text as a QMP command object: (message, id, has_id). Raises QmpError for anything else."""
    if framed.error is not None:
        raise QmpError(f"JSON parse error, {framed.error}")
    try:
        msg = json.loads(framed.data)
    except UnicodeDecodeError:
        raise QmpError("JSON parse error, input is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise QmpError(f"JSON parse error, {e.msg} at character {e.pos + 1}") from None
    except RecursionError:
        raise QmpError("JSON parse error, nesting too deep") from None
    if not isinstance(msg, dict):
        raise QmpError("QMP input must be a JSON object")
    return msg, msg.get("id"), "id" in msg


def command_of(msg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The command name and arguments of a parsed message (QEMU's checks and messages)."""
    for key in msg:
        if key not in ("execute", "arguments", "id", "exec-oob"):
            raise QmpError(f"QMP input member '{key}' is unexpected")
    if "exec-oob" in msg:
        raise QmpError("QMP input member 'exec-oob' is not supported: out-of-band execution was not negotiated")
    if "execute" not in msg:
        raise QmpError("QMP input lacks member 'execute'")
    name = msg["execute"]
    if not isinstance(name, str):
        raise QmpError("QMP input member 'execute' must be a string")
    args = msg.get("arguments", {})
    if not isinstance(args, dict):
        raise QmpError("QMP input member 'arguments' must be an object")
    return name, args


# --- arguments ----------------------------------------------------------------------------------------------------

_TYPE_NAMES = {str: "string", int: "integer", bool: "boolean", dict: "object", list: "array"}


@dataclass(frozen=True, slots=True)
class ArgSpec:
    """One command argument: its type and whether it must be given."""

    type: type
    required: bool = False
    check: Callable[[Any], str | None] | None = None    # returns a problem description, or None


def check_args(spec: Mapping[str, ArgSpec], args: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments checked against a spec (unknown, missing and mistyped ones are QmpErrors as QEMU words them)."""
    for key in args:
        if key not in spec:
            raise QmpError(f"Parameter '{key}' is unexpected")
    out: dict[str, Any] = {}
    for key, a in spec.items():
        if key not in args:
            if a.required:
                raise QmpError(f"Parameter '{key}' is missing")
            continue
        value = args[key]
        ok = isinstance(value, a.type) and not (a.type is int and isinstance(value, bool))
        if not ok:
            raise QmpError(f"Invalid parameter type for '{key}', expected: {_TYPE_NAMES.get(a.type, a.type.__name__)}")
        if a.check is not None:
            problem = a.check(value)
            if problem:
                raise QmpError(f"Parameter '{key}' {problem}")
        out[key] = value
    return out


# --- a blocking client ----------------------------------------------------------------------------------------------

STOPPED_GRACE = 3.0             # seconds a stopped domain process gets before a client says so


def process_stopped(pid: int) -> bool:
    """Whether the process is stopped (state T: SIGSTOP; t: a tracer holds it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[-1].split()
    except OSError:
        return False
    return bool(fields) and fields[0] in (b"T", b"t")


def _await_greeting(sock: socket.socket, pid: int, label: str, timeout: float | None) -> None:
    """Wait until the server has something to say; fail early, naming the domain, if its process is stopped."""
    start = time.monotonic()
    while True:
        left = None if timeout is None else timeout - (time.monotonic() - start)
        if left is not None and left <= 0:
            return                          # read_message reports the timeout
        ready, _, _ = select.select([sock], [], [], 0.5 if left is None else min(0.5, left))
        if ready:
            return
        if time.monotonic() - start >= STOPPED_GRACE and process_stopped(pid):
            raise ToolstackError(f"{label} does not answer: its process (pid {pid}) is stopped (SIGSTOP or a "
                                 f"tracer); kill -CONT {pid} resumes it")

class QmpChannel:
    """A blocking QMP client over a unix socket, with file descriptor passing (vmfork extensions). Events are kept
    in `events`."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        self._buf = bytearray()
        self._fds: list[int] = []
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}

    @classmethod
    def connect(cls, path: str, *, timeout: float | None = 30.0, negotiate: bool = True, pid: int | None = None,
                label: str | None = None) -> QmpChannel:
        """Connect and read the greeting (and negotiate). With the domain's `pid`, a process that is stopped
        (SIGSTOP, or a debugger's) is reported after STOPPED_GRACE seconds instead of waiting out `timeout`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise ToolstackError(f"cannot connect to the control socket {path}: {e.strerror or e}") from None
        chan = cls(sock, path)
        try:
            if pid is not None:
                _await_greeting(sock, pid, label or path, timeout)
            msg = chan.read_message()
            if "QMP" not in msg:
                if "error" in msg:
                    raise QmpCommandError("(greeting)", msg["error"].get("class", "GenericError"),
                                          msg["error"].get("desc", "refused"))
                raise ToolstackError(f"{path} did not greet with QMP: {msg!r:.200}")
            chan.greeting = msg
            if negotiate:
                chan.execute("qmp_capabilities")
        except BaseException:
            chan.close()
            raise
        return chan

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self.sock.close()

    def __enter__(self) -> QmpChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise ToolstackError(f"control socket {self.path}: {e.strerror or e}") from None

    def read_message(self) -> dict[str, Any]:
        """The next message from the server (a CRLF-terminated JSON line)."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl + 1])
                del self._buf[:nl + 1]
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    raise ToolstackError(f"control socket {self.path}: the domain sent something that is not "
                                         f"JSON: {line[:200]!r}") from None
                if not isinstance(msg, dict):
                    raise ToolstackError(f"control socket {self.path}: unexpected message {msg!r:.200}")
                return msg
            try:
                data, anc, _flags, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(MAX_FDS * 4),
                                                         socket.MSG_CMSG_CLOEXEC)
            except TimeoutError:
                raise ToolstackError(f"control socket {self.path}: the domain did not answer in time") from None
            except OSError as e:
                raise ToolstackError(f"control socket {self.path}: {e.strerror or e}") from None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
                    self._fds.extend(fds)
            if not data:
                raise ToolstackError(f"control socket {self.path}: the domain closed the connection")
            self._buf += data

    def take_fds(self) -> list[int]:
        """File descriptors received so far (the caller owns them)."""
        fds, self._fds = self._fds, []
        return fds

    def reply_to(self, msg_id: Any) -> dict[str, Any]:
        """Read until the reply with this id (or an id-less error, the server's answer to unparsable input)."""
        while True:
            msg = self.read_message()
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") == msg_id or ("error" in msg and "id" not in msg):
                return msg

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                fds: list[int] | None = None) -> Any:
        """Run one command (with file descriptors passed along it, e.g. for getfd); its "return" value, or
        QmpCommandError."""
        self._next_id += 1
        msg_id = f"vmfork-{self._next_id}"
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = dict(arguments)
        data = json.dumps(msg).encode() + b"\n"
        if fds:
            try:
                sent = socket.send_fds(self.sock, [data], fds)
            except OSError as e:
                raise ToolstackError(f"control socket {self.path}: {e.strerror or e}") from None
            data = data[sent:]
        if data:
            self.send_raw(data)
        reply = self.reply_to(msg_id)
        if "error" in reply:
            err = reply["error"]
            raise QmpCommandError(command, str(err.get("class", "GenericError")), str(err.get("desc", "")))
        return reply.get("return")
