"""Consoles: the domain side (log file + live stream to console clients) and the client side (`vmfork console`).

A domain appends everything its guest writes to the serial console to `<domid>.log` and streams it to every client
connected to `<domid>.console`. The log is capped: past the config's `console_log_max` (KiB, default 16 MiB) it is
renamed `<domid>.log.1` (replacing an older one) and a new log starts, so at most twice that is kept, the newest
output always. Logs stay after the domain ends (the guest's last words); a log the guest never wrote to is removed
with its domain. Clients that do not read lose their oldest output: each keeps at most 4 MiB, and all of a
domain's clients together 16 MiB. A client first receives one JSON header line,
`{"log": PATH, "offset": N, "device_model": BOOL}`, where N is how many bytes of the log precede the live stream:
the client replays the log up to N (the last 64 KiB of it) and then prints the stream, so nothing is lost or shown
twice. Bytes a client sends are the guest's console input.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import socket
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .runtime import ToolstackError

__all__ = ["REPLAY_BYTES", "ConsoleHub", "attach"]

REPLAY_BYTES = 64 * 1024
CLIENT_BUFFER = 4 << 20         # a client that falls further behind loses the oldest output
CLIENTS_BUFFER = 16 << 20       # all clients of a domain together: many clients that never read share this
ESCAPE = 0x1D                   # Ctrl-]
FAREWELL = re.compile(rb"\[vmfork: [^\r\n]* ended: [^\r\n]*\]\r?\n?$")    # what an ending domain says last


@dataclass(eq=False)
class ConsoleClient:
    sock: socket.socket
    out: bytearray = field(default_factory=bytearray)
    dropped: int = 0                # output bytes it lost by not reading
    dropped_input: int = 0          # input bytes the guest's UART could not take
    told_dropped: bool = False      # it has been told that its input is being dropped


class ConsoleHub:
    """The domain side: `write()` is the serial device's listener, called on a vCPU thread or the UART's flush
    timer thread with the guest's output in batches (a line, or a partial line once it has waited the UART's
    flush_delay; the machine writes out the rest whenever it stops), so the log costs a write() per line, not per
    byte."""

    def __init__(self, log_path: str, wake: Callable[[], None], *, log_max: int = 16 << 20) -> None:
        self.log_path = log_path
        self.log_max = log_max          # bytes before the log is rotated to `<log>.1`
        self._log: int | None = self._open_log()
        self.offset = os.fstat(self._log).st_size
        self._lock = threading.Lock()
        self.clients: dict[int, ConsoleClient] = {}
        self._wake = wake
        # How a full log is replaced: renamed here, or (a jailed domain, which cannot see the path) by its jailer,
        # which returns the new log's descriptor (jail_files.py).
        self.rotate_log: Callable[[], int] | None = None

    def write(self, data: bytes) -> None:
        wake = False
        with self._lock:
            if self._log is not None:
                if self.offset + len(data) > self.log_max and self.offset > 0:
                    self._rotate()
                try:
                    _write_all(self._log, data)     # a write interrupted by the vCPU kick signal may be partial
                except OSError:
                    pass                    # a full disk must not stop the guest
            self.offset += len(data)
            limit = min(CLIENT_BUFFER, CLIENTS_BUFFER // max(1, len(self.clients)))
            for c in self.clients.values():
                if not c.out:
                    wake = True
                c.out += data
                if len(c.out) > limit:
                    extra = len(c.out) - limit
                    del c.out[:extra]
                    c.dropped += extra
        if wake:
            self._wake()

    def _open_log(self) -> int:
        return os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _rotate(self) -> None:
        """(lock held) The log is full: it becomes `<log>.1` (replacing an older one) and a new log starts, so at
        most twice log_max is kept, the newest output always. A failure keeps appending to the old one."""
        try:
            if self.rotate_log is not None:
                new = self.rotate_log()
            else:
                os.replace(self.log_path, self.log_path + ".1")
                new = self._open_log()
        except OSError:
            return
        if self._log is not None:
            os.close(self._log)
        self._log = new
        self.offset = 0

    def add(self, sock: socket.socket, *, device_model: bool) -> ConsoleClient:
        """Register a client and queue its header (the log offset where its live stream starts)."""
        with self._lock:
            c = ConsoleClient(sock)
            header = {"log": self.log_path, "offset": self.offset, "device_model": device_model}
            c.out += json.dumps(header).encode() + b"\n"
            self.clients[sock.fileno()] = c
        return c

    def remove(self, c: ConsoleClient) -> None:
        with self._lock:
            self.clients.pop(c.sock.fileno(), None)

    def note(self, text: str) -> None:
        """A line from vmfork itself on every client's stream (not in the log)."""
        with self._lock:
            for c in self.clients.values():
                c.out += text.encode()
        self._wake()

    def note_to(self, c: ConsoleClient, text: str) -> None:
        """A line from vmfork to one client (not in the log)."""
        with self._lock:
            c.out += text.encode()

    def take(self, c: ConsoleClient) -> bytes:
        with self._lock:
            data = bytes(c.out)
            c.out.clear()
            return data

    def put_back(self, c: ConsoleClient, data: bytes) -> None:
        with self._lock:
            c.out[0:0] = data

    def pending(self) -> list[ConsoleClient]:
        with self._lock:
            return [c for c in self.clients.values() if c.out]

    def close(self) -> None:
        with self._lock:
            if self._log is not None:
                os.close(self._log)
                self._log = None


# --- the client ---------------------------------------------------------------------------------------------------

def _replay(log_path: str, offset: int, limit: int) -> bytes:
    try:
        with open(log_path, "rb") as f:
            start = max(0, offset - limit)
            f.seek(start)
            data = f.read(offset - start)
    except OSError:
        return b""
    if start > 0:
        nl = data.find(b"\n")
        if 0 <= nl < len(data) - 1:
            data = data[nl + 1:]
    return data


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    old = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        mode = termios.tcgetattr(fd)
        mode[1] |= termios.OPOST | termios.ONLCR        # keep "\n" -> "\r\n" on output
        termios.tcsetattr(fd, termios.TCSANOW, mode)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def attach(socket_path: str, *, label: str, stdin_fd: int | None = None, stdout_fd: int | None = None,
           replay: int = REPLAY_BYTES, on_attached: Callable[[], None] | None = None) -> int:
    """Attach to a domain's console: replay the recent output, then follow it live and send stdin to the guest.
    Ctrl-] detaches when stdin is a terminal (which is put in raw mode). `on_attached` runs once the live stream is
    connected (create -c unpauses the new domain there, so no output is missed). Returns an exit status."""
    in_fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    out_fd = sys.stdout.fileno() if stdout_fd is None else stdout_fd
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(socket_path)
        header_bytes = b""
        while not header_bytes.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                break
            header_bytes += chunk
            if len(header_bytes) > 65536:
                break
    except OSError as e:
        sock.close()
        raise ToolstackError(f"cannot attach to the console of {label}: {e.strerror or e}") from None
    try:
        header = json.loads(header_bytes)
        offset = int(header["offset"])
        log_path = str(header["log"])
    except (ValueError, KeyError, TypeError):
        sock.close()
        msg = header_bytes.decode(errors="replace").strip()
        try:
            msg = json.loads(msg)["error"]["desc"]
        except (ValueError, KeyError, TypeError):
            pass
        raise ToolstackError(f"console of {label}: {msg or 'the domain closed the connection'}") from None
    sock.settimeout(None)
    is_tty = os.isatty(in_fd)
    _write_all(out_fd, _replay(log_path, offset, replay))
    if not header.get("device_model", True):
        print(f"vmfork: {label} has no device model: its console stays silent until one is attached "
              "(vmfork fork-vm --launch-dm late)", file=sys.stderr)
    if is_tty:
        print(f"vmfork: connected to the console of {label}; Ctrl-] detaches\r", file=sys.stderr)
    if on_attached is not None:
        try:
            on_attached()
        except BaseException:
            sock.close()
            raise
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    try:
        sel.register(in_fd, selectors.EVENT_READ, "stdin")
    except (ValueError, OSError, PermissionError):
        pass            # stdin cannot be polled (e.g. /dev/null on some systems): output only
    ctx = _raw_terminal(in_fd) if is_tty else contextlib.nullcontext()
    status = 0
    tail = b""                  # the last bytes received: the domain's own farewell line, if it said one
    closed_by_domain = False
    with ctx:
        try:
            done = False
            while not done:
                for key, _ in sel.select():
                    if key.data == "sock":
                        data = sock.recv(65536)
                        if not data:
                            done = closed_by_domain = True
                            break
                        tail = (tail + data)[-4096:]
                        _write_all(out_fd, data)
                    else:
                        data = os.read(in_fd, 4096)
                        if not data:
                            sel.unregister(in_fd)       # stdin closed: keep following the output
                            continue
                        if is_tty and ESCAPE in data:
                            before = data[:data.index(ESCAPE)]
                            if before:
                                sock.sendall(before)
                            done = True
                            break
                        sock.sendall(data)
        except KeyboardInterrupt:
            status = 130
        except BrokenPipeError:
            status = 0
        except OSError as e:
            raise ToolstackError(f"console of {label}: {e.strerror or e}") from None
        finally:
            sel.close()
            sock.close()
    if is_tty:
        print(file=sys.stderr)
    if closed_by_domain and not FAREWELL.search(tail):
        # An ending domain says why on the stream (Domain._exit); a connection closed without it means its process
        # died (killed, or crashed) under the console.
        raise ToolstackError(f"the console of {label} closed without a word from the domain: its process died "
                             "(vmfork list shows it)")
    return status
