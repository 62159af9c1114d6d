"""The `vmfork` CLI run as a user runs it, against domains in one runtime directory per test (VMFORK_RUN_DIR).

`CliHarness` runs commands in subprocesses (text or bytes output, optional stdin input), writes domain configs,
creates domains, waits for their states, reaches them over QMP, and on teardown (`cleanup`, or leaving its `with`
block) kills the CLI processes it started and every domain process of its runtime directory, even when a test
fails. A test module makes it a fixture:

    @pytest.fixture
    def ts(tmp_path: Path, pvh_guest: Path) -> Iterator[CliHarness]:
        with CliHarness(tmp_path, pvh_guest) as t:
            yield t
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from vmfork.toolstack.qmp import QmpChannel
from vmfork.toolstack.registry import DomainRecord, Registry
from vmfork.toolstack.runtime import RunDir, pid_alive


def domain_pids(run_dir: Path) -> list[int]:
    """Domain processes whose command line names this runtime directory."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vmfork.toolstack.domain" in cmd and str(run_dir).encode() in cmd:
            pids.append(int(entry))
    return pids


def result_line(text: str) -> str:
    """The last `result:` line a test guest printed (there must be one)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("result:")]
    assert lines, text
    return lines[-1]


class CliHarness:
    """`vmfork` in one runtime directory (`base/run`); domain processes' stderr goes to `base/domains.stderr`."""

    def __init__(self, base: Path, kernel: Path) -> None:
        self.base = base
        self.run_dir = base / "run"
        self.kernel = kernel
        self.env = dict(os.environ, VMFORK_RUN_DIR=str(self.run_dir),
                        VMFORK_DOMAIN_STDERR=str(base / "domains.stderr"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self._registry: Registry | None = None

    def __enter__(self) -> CliHarness:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        orphans = self.cleanup()
        if exc_type is None and orphans:
            raise AssertionError(f"domain processes outlived their registry entries (killed at teardown): {orphans}")

    # --- running commands -------------------------------------------------------------------------------------------

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "vmfork.cli", *args]

    def run(self, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A command with text output (and text input on stdin, if given)."""
        return subprocess.run(self.argv(*args), env=self.env, capture_output=True, text=True, input=input,
                              timeout=timeout, cwd=self.base)

    def run_bytes(self, *args: str, input: bytes | None = None,
                  timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        """A command with bytes output (and bytes input on stdin, if given)."""
        return subprocess.run(self.argv(*args), env=self.env, capture_output=True, input=input, timeout=timeout,
                              cwd=self.base)

    def ok(self, *args: str, input: str | None = None, timeout: float = 60) -> str:
        """A command that must succeed without a traceback; returns its output."""
        p = self.run(*args, input=input, timeout=timeout)
        assert p.returncode == 0, f"vmfork {' '.join(args)} failed ({p.returncode}): {p.stderr}{self.debug()}"
        assert "Traceback" not in p.stderr, p.stderr
        return p.stdout

    def fail(self, *args: str, match: str) -> str:
        """A command that must fail (exit 1) with one clear line mentioning `match`; returns that line."""
        p = self.run(*args)
        err = p.stderr
        assert p.returncode == 1, f"vmfork {' '.join(args)} should fail: exit {p.returncode}, {p.stdout!r} {err}"
        assert "Traceback" not in err, err
        assert err.startswith("vmfork: error: ") and err.count("\n") == 1, err
        assert match in err, err
        return err

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        """A command left running in the background (stdout and stderr piped); killed at teardown if still there."""
        p = subprocess.Popen(self.argv(*args), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=self.base)
        self.procs.append(p)
        return p

    def debug(self) -> str:
        log = self.base / "domains.stderr"
        return f"\n--- domain stderr:\n{log.read_text()[-3000:]}" if log.exists() else ""

    # --- configs and domains ----------------------------------------------------------------------------------------

    def config(self, name: str, program: str, **keys: Any) -> Path:
        """A config for the test guest (64 MiB) running `program`, with further keys as given."""
        path = self.base / f"{name}.cfg"
        lines = [f'name = "{name}"', "memory = 64", f'kernel = "{self.kernel}"', f'cmdline = "{program}"']
        lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def fork_config(self, name: str, **keys: Any) -> Path:
        path = self.base / f"{name}.cfg"
        path.write_text("\n".join([f'name = "{name}"', *(f"{k} = {json.dumps(v)}" for k, v in keys.items())])
                        + "\n")
        return path

    def create(self, cfg: Path, *flags: str) -> int:
        """`vmfork create [flags] cfg`; returns the domid."""
        return int(self.ok("create", *flags, str(cfg)).strip())

    def create_program(self, name: str, program: str, **keys: Any) -> int:
        """A domain of the test guest running `program` (see `config`); returns the domid."""
        return self.create(self.config(name, program, **keys))

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry(RunDir.open(self.run_dir))
        return self._registry

    def record(self, domain: int | str) -> DomainRecord:
        return self.registry.find(domain)

    def list_json(self) -> list[dict[str, Any]]:
        return json.loads(self.ok("list", "--json"))

    def listed(self, domain: str) -> dict[str, Any]:
        """The domain as `vmfork list --json` shows it (the command must work)."""
        entries = {e["name"]: e for e in self.list_json()}
        assert domain in entries, entries
        return entries[domain]

    def log(self, domid: int) -> str:
        path = self.run_dir / f"{domid}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- waiting ----------------------------------------------------------------------------------------------------

    def wait(self, what: str, cond: Callable[[], bool], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}{self.debug()}"
            time.sleep(0.02)

    def wait_state(self, domain: int | str, state: str, timeout: float = 20) -> DomainRecord:
        self.wait(f"{domain} to be {state}", lambda: self.registry.find(domain).state == state, timeout)
        return self.record(domain)

    def wait_gone(self, domid: int, timeout: float = 20) -> None:
        self.wait(f"domain {domid} to end", lambda: self.registry.get(domid) is None, timeout)

    # --- QMP --------------------------------------------------------------------------------------------------------

    def qmp(self, domain: int | str) -> QmpChannel:
        return QmpChannel.connect(self.record(domain).qmp_socket, timeout=30)

    def execute(self, domain: int | str, command: str, **args: Any) -> Any:
        with self.qmp(domain) as q:
            return q.execute(command, args)

    # --- teardown ---------------------------------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Kill the commands `popen` started and every domain process of this runtime directory; wait for them.
        Returns the orphans among them: processes no registry entry names, which a destroy or a failed create
        should have ended (a test that left them behind fails; see __exit__)."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        orphans = self._orphans()
        if self._registry is not None:
            self._registry.close()
            self._registry = None
        pids = domain_pids(self.run_dir)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(pid_alive(p, None) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        return orphans

    def _orphans(self) -> list[str]:
        """Domain processes still alive 2 s after the test that no registry entry names (a process exiting
        right now gets those 2 s), as "pid: command line"."""
        deadline = time.monotonic() + 2
        while True:
            pids = domain_pids(self.run_dir)
            if not pids:
                return []
            try:
                known = {r.pid for r in self.registry.all()}
            except Exception:       # no registry (nothing was created) or a broken one: every process is unknown
                known = set()
            unknown = [pid for pid in pids if pid not in known]
            if not unknown or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        out = []
        for pid in unknown:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue            # it exited after all
            out.append(f"{pid}: {cmd.strip()}")
        return out
