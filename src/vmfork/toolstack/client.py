"""The CLI side of the toolstack: finding domains, talking to them, starting and destroying them.

    from vmfork.toolstack.client import DomainClient
    with DomainClient("web-1") as d:              # a domid (int or digits) or a name
        d.execute("stop")
        data = d.execute("vmfork-memory-read", gpa=0x1000, length=16)["data"]

`DomainClient.execute` returns the command's "return" value and raises QmpCommandError (a VmforkError) with the
domain's message otherwise, so a CLI command built on it prints one line on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .domfile import live_domains, remove_stale
from .qmp import QmpChannel
from .registry import DomainRecord, Registry
from .runtime import RunDir, ToolstackError, pid_alive

__all__ = ["DomainClient", "destroy_domain", "open_registry", "require_control", "start_domain", "sweep"]

_SRC_DIR = str(Path(__file__).resolve().parents[2])
START_TIMEOUT = 120.0


def open_registry(run_dir: str | os.PathLike[str] | None = None) -> Registry:
    return Registry(RunDir.open(run_dir))


class DomainClient:
    """A QMP connection to one domain, found by domid or name (negotiated, ready for commands)."""

    def __init__(self, domain: int | str | DomainRecord, *, registry: Registry | None = None,
                 timeout: float | None = 60.0) -> None:
        self.registry = registry if registry is not None else open_registry()
        self.record = domain if isinstance(domain, DomainRecord) else self.registry.find(domain)
        rec = self.record
        require_control(rec)
        self.channel = QmpChannel.connect(rec.qmp_socket, timeout=timeout, pid=rec.pid, label=rec.label())

    @property
    def domid(self) -> int:
        return self.record.domid

    @property
    def name(self) -> str:
        return self.record.name

    def execute(self, command: str, *, fds: list[int] | None = None, **arguments: Any) -> Any:
        """Run one QMP command; returns its "return" value (QmpCommandError on an error reply)."""
        return self.channel.execute(command, arguments, fds=fds)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DomainClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def require_control(rec: DomainRecord) -> None:
    """Raise ToolstackError unless `rec` is a live domain process with a control socket (a held fork, such as a
    `vmfork fuzz --domain` process, has none)."""
    if rec.held:
        parent = f" of domain {rec.parent}" if rec.parent is not None else ""
        raise ToolstackError(f"{rec.label()} is a fork{parent} held by a `vmfork {rec.kind}` process (pid {rec.pid}), "
                             f"not a domain: it has no control socket or console (vmfork destroy {rec.domid} ends it)")
    if not rec.alive:
        raise ToolstackError(f"{rec.label()} is not running: its process (pid {rec.pid}) is gone "
                             f"(vmfork destroy {rec.domid} cleans it up)")


# --- starting a domain process ------------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = _SRC_DIR if not path else f"{_SRC_DIR}{os.pathsep}{path}"
    return env


def start_domain(run_dir: RunDir, spec: Mapping[str, Any], *, timeout: float = START_TIMEOUT) -> int:
    """Start a detached domain process and wait for its report: its domid, or ToolstackError with its one-line
    error. `VMFORK_DOMAIN_STDERR=FILE` keeps the domain's stderr in FILE (for debugging vmfork itself)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    stderr_path = os.environ.get("VMFORK_DOMAIN_STDERR")
    stderr: Any = subprocess.DEVNULL
    if stderr_path:
        stderr = open(stderr_path, "ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmfork.toolstack.domain", "--run-dir", str(run_dir.path), "--report-fd",
             str(w), "--spec", json.dumps(dict(spec))],
            pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True, env=_env())
    except OSError as e:
        os.close(r)
        os.close(w)
        raise ToolstackError(f"cannot start the domain process: {e.strerror or e}") from None
    finally:
        if stderr is not subprocess.DEVNULL:
            stderr.close()
    os.close(w)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise ToolstackError(f"the domain process (pid {proc.pid}) did not report within {timeout:.0f} s")
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
    line = data.decode(errors="replace").strip()
    if line.startswith("ready "):
        # The domain outlives this process: keep subprocess from waiting for it or warning about it.
        proc.returncode = 0
        return int(line.split()[1])
    if line.startswith("error "):
        _reap(proc)
        raise ToolstackError(line[len("error "):])
    rc = _reap(proc)
    how = "is still running" if rc is None else (f"was killed by signal {-rc}" if rc < 0 else f"exited with "
                                                                                               f"status {rc}")
    raise ToolstackError(f"the domain process (pid {proc.pid}) {how} before it was ready")


def _reap(proc: subprocess.Popen[bytes]) -> int | None:
    try:
        return proc.wait(5.0)
    except subprocess.TimeoutExpired:
        return None


# --- stale state ------------------------------------------------------------------------------------------------------

DESTROY_ACTIONS = ("destroy", "coredump-destroy")


def sweep(registry: Registry) -> None:
    """Bring the registry in line with the processes (the truth; see domfile.py):
    - a live domain without a row (the registry was deleted or damaged and moved away) gets its row back from its
      domain file;
    - a domain whose process is gone is handled as its on_crash says: destroy (the default) removes the entry,
      keeping one line of why in the history (`vmfork list --all`); preserve keeps it, shown as crashed; restart
      cannot restart a process that is gone, so it is kept as crashed with that said. An entry still "creating"
      (a start that failed: nothing was made) or "destroying" (an interrupted destroy) is removed. Held forks'
      entries go (a held fork leaves nothing to inspect);
    - sockets and domain files of domains with no live process are removed.
    Every step is a write that may fail (a full disk): the failure is left for the next sweep, nothing is half
    done, and reading goes on."""
    rd = registry.run_dir
    sockets = rd.socket_files()       # listed before the registry is read (see below)
    live = live_domains(rd.path)
    records = {r.domid: r for r in registry.all()}
    for domid, data in live.items():
        if domid not in records:
            with contextlib.suppress(ToolstackError):
                rec = registry.adopt(data)
                if rec is not None:
                    records[domid] = rec
    # A domain inserts its entry before it creates its sockets, and removes its sockets before its entry, so a
    # socket listed above without an entry read after it belongs to no live domain.
    for domid, paths in sockets.items():
        rec = records.get(domid)
        if (rec is None or not rec.alive) and domid not in live:
            for p in paths:
                with contextlib.suppress(OSError):
                    p.unlink()
    for rec in records.values():
        if rec.alive or rec.domid in live:
            continue
        with contextlib.suppress(ToolstackError):
            _gone(registry, rec)


def _gone(registry: Registry, rec: DomainRecord) -> None:
    """Apply what happens to a domain whose process has ended without removing its entry."""
    action = str(rec.config.get("on_crash", "destroy"))
    was = f"its process (pid {rec.pid}) ended unexpectedly while {rec.state}"
    if rec.held or rec.state in ("creating", "destroying"):
        registry.remove(rec.domid, why=None if rec.held or rec.state == "creating" else "destroyed")
    elif rec.state == "crashed":
        return                                  # preserved already (by the domain itself, or an earlier sweep)
    elif action in DESTROY_ACTIONS:
        registry.remove(rec.domid, why=f"{was}; on_crash = {action}")
        _remove_files(registry.run_dir, rec)
        return
    elif action == "preserve":
        registry.mark_crashed(rec.domid, was)
    else:
        registry.mark_crashed(rec.domid, f"{was}; on_crash = {action} cannot restart a domain whose process is gone")
    remove_stale(registry.run_dir.path, rec.domid)


def _remove_files(rd: RunDir, rec: DomainRecord) -> None:
    """A dead domain's sockets and domain file, and its console log if the guest never wrote to it."""
    for path in (rec.qmp_socket, rec.console_socket):
        with contextlib.suppress(OSError):
            os.unlink(path)
    remove_stale(rd.path, rec.domid)
    with contextlib.suppress(OSError):
        if os.path.getsize(rec.console_log) == 0:
            os.unlink(rec.console_log)


# --- destroying ---------------------------------------------------------------------------------------------------

def _wait_gone(rec: DomainRecord, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(rec.pid, rec.pid_start):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _end_holder(rec: DomainRecord, timeout: float) -> None:
    """End the process holding a held fork: SIGTERM (it lets its fork go and removes its entry), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not pid_alive(rec.pid, rec.pid_start) or not rec.pid:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, sig)
        if _wait_gone(rec, wait):
            return
    raise ToolstackError(f"{rec.label()}: its process (pid {rec.pid}) does not end")


def destroy_domain(registry: Registry, rec: DomainRecord, *, timeout: float = 10.0) -> None:
    """End one domain (asking it to quit, killing it if it does not) and remove its sockets and entry.

    It completes or changes nothing: the entry is first marked "destroying" (a write; on a full disk it fails and
    the domain is left as it was), then the process is ended, then the entry goes (if that write fails, the next
    sweep removes an entry left "destroying" whose process is gone; it is never shown as crashed)."""
    if rec.alive or rec.held:
        registry.update(rec.domid, state="destroying", reason="vmfork destroy")
    if rec.held:
        _end_holder(rec, timeout)
    elif rec.alive:
        try:
            with DomainClient(rec, registry=registry, timeout=timeout) as c:
                c.execute("quit")
        except ToolstackError as e:
            from .qmp import QmpCommandError
            if isinstance(e, QmpCommandError):
                with contextlib.suppress(ToolstackError):
                    registry.update(rec.domid, state=rec.state, reason=rec.reason)
                raise
            # unreachable (hung, or its socket is gone): it is killed below
        if not _wait_gone(rec, timeout):
            with contextlib.suppress(ProcessLookupError):
                if pid_alive(rec.pid, rec.pid_start) and rec.pid:
                    os.kill(rec.pid, signal.SIGKILL)
            if not _wait_gone(rec, 5.0):
                raise ToolstackError(f"{rec.label()}: its process (pid {rec.pid}) does not end")
    _remove_files(registry.run_dir, rec)
    registry.remove(rec.domid)
