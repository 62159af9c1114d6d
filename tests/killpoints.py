"""Seeded SIGKILL points during the toolstack's commands (issue 16, item 5; issue 20's numbers): the mechanism
shared by tests/test_killpoints.py (a few points in CI) and bench/killpoints.py (the full 200).

Each point starts one command in the background and, after a random delay drawn from the seeded RNG, kills a
process with SIGKILL:

    save      `vmfork save VICTIM FILE` (half of them over an existing file): the domain is killed
    fork-vm   `vmfork fork-vm -p BASE`: the new fork's domain process is killed (before, during or after its start)
    create    `vmfork create CFG`: the new domain process is killed
    restore   `vmfork restore -p FILE`: the new domain process is killed
    destroy   `vmfork destroy VICTIM`: the destroying command (half of the points) or the domain is killed
    registry  `vmfork pause|unpause VICTIM` in a loop (each a registry transaction in the domain): the domain is
              killed, or a `vmfork list` sweeping the registry

After every point the run directory must be consistent: `vmfork list --json` works; every entry's process is alive,
or it is kept as crashed (on_crash = preserve); no entry is left "creating" or "destroying"; no two entries share a
name; every domain process of the directory has an entry (no ghosts); no socket or domain file of a dead domain
is left after the sweep ("orphaned"), and no hidden temporary file in the save directory. Every save that reported
success is restored (and must run), and no file at a save target that did not complete passes for a save file
(a container whose header checks). At the end `vmfork destroy --force` of every root leaves nothing: no entry, no
process, no socket or domain file.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli_harness import CliHarness, domain_pids

OPS = ("save", "fork-vm", "create", "restore", "destroy", "registry")
WINDOW = {"save": 2.5, "fork-vm": 1.5, "create": 1.5, "restore": 1.5, "destroy": 1.0, "registry": 1.0}


@dataclass
class KillResult:
    points: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    inconsistent: list[str] = field(default_factory=list)       # what was wrong, after which point
    orphaned: list[str] = field(default_factory=list)           # files left behind
    partial_complete: list[str] = field(default_factory=list)   # files that pass for complete saves but are not
    saves_completed: int = 0
    saves_restored: int = 0
    cleanup_left: list[str] = field(default_factory=list)       # what destroy --force left at the end
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"points": self.points, "by_op": self.by_op, "inconsistent": len(self.inconsistent),
                "orphaned": len(self.orphaned), "partial_complete": len(self.partial_complete),
                "saves_completed": self.saves_completed, "saves_restored": self.saves_restored,
                "cleanup_left": len(self.cleanup_left), "seconds": round(self.seconds, 1),
                "details": (self.inconsistent + self.orphaned + self.partial_complete + self.cleanup_left)[:20]}


class KillLoop:
    def __init__(self, ts: CliHarness, seed: int) -> None:
        self.ts = ts
        self.rng = random.Random(seed)
        self.saves = ts.base / "saves"
        self.saves.mkdir(exist_ok=True)
        self.result = KillResult()
        self.completed: list[Path] = []
        self.n = 0

    # --- helpers ---------------------------------------------------------------------------------------------------

    def _entries(self) -> list[dict[str, Any]]:
        return json.loads(self.ts.ok("list", "--json"))

    def _victim(self, program: str = "demo", **keys: Any) -> tuple[str, int]:
        self.n += 1
        name = f"v{self.n}"
        domid = self.ts.create(self.ts.config(name, program, **keys))
        return name, domid

    def _new_domain_pid(self, known: set[int], deadline: float) -> int | None:
        while time.monotonic() < deadline:
            fresh = [p for p in domain_pids(self.ts.run_dir) if p not in known]
            if fresh:
                return max(fresh)
            time.sleep(0.002)
        return None

    def _kill(self, pid: int | None) -> None:
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _finish(self, proc: subprocess.Popen[bytes]) -> int:
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return -9
        return proc.returncode

    # --- the operations --------------------------------------------------------------------------------------------

    def op_save(self, delay: float) -> None:
        name, domid = self._victim()
        self.ts.wait_state(domid, "paused")
        self.ts.execute(domid, "vmfork-memory-write", gpa=16 << 20,
                        data=base64.b64encode(os.urandom(1 << 20) * 16).decode())
        target = self.saves / f"s{self.n}.sav"
        old = b""
        if self.rng.random() < 0.5:
            old = b"old contents"
            target.write_bytes(old)
        pid = self.ts.record(domid).pid
        proc = self.ts.popen("save", name, str(target))
        time.sleep(delay)
        self._kill(pid)
        rc = self._finish(proc)
        if rc == 0:
            self.completed.append(target)
        elif target.exists() and target.read_bytes() != old:
            self._check_not_complete(target)

    def op_fork_vm(self, delay: float) -> None:
        known = set(domain_pids(self.ts.run_dir))
        proc = self.ts.popen("fork-vm", "-p", "base")
        pid = self._new_domain_pid(known, time.monotonic() + delay)
        time.sleep(max(0.0, delay - 0.0))
        if pid is None:
            pid = self._new_domain_pid(known, time.monotonic() + 5)
        self._kill(pid)
        self._finish(proc)

    def op_create(self, delay: float) -> None:
        self.n += 1
        known = set(domain_pids(self.ts.run_dir))
        proc = self.ts.popen("create", str(self.ts.config(f"c{self.n}", "demo")))
        time.sleep(delay)
        self._kill(self._new_domain_pid(known, time.monotonic() + 5))
        self._finish(proc)

    def op_restore(self, delay: float) -> None:
        self.n += 1
        known = set(domain_pids(self.ts.run_dir))
        proc = self.ts.popen("restore", "-p", "-n", f"r{self.n}", str(self.base_save))
        time.sleep(delay)
        self._kill(self._new_domain_pid(known, time.monotonic() + 5))
        self._finish(proc)

    def op_destroy(self, delay: float) -> None:
        name, domid = self._victim()
        self.ts.wait_state(domid, "paused")
        pid = self.ts.record(domid).pid
        proc = self.ts.popen("destroy", name)
        time.sleep(delay)
        self._kill(proc.pid if self.rng.random() < 0.5 else pid)
        self._finish(proc)

    def op_registry(self, delay: float) -> None:
        name, domid = self._victim("timer 60000", on_crash="preserve" if self.rng.random() < 0.3 else "destroy")
        self.ts.wait_state(domid, "running")
        pid = self.ts.record(domid).pid
        procs = [self.ts.popen("pause", name), self.ts.popen("unpause", name), self.ts.popen("list")]
        time.sleep(delay)
        self._kill(procs[2].pid if self.rng.random() < 0.25 else pid)
        for p in procs:
            self._finish(p)

    # --- checks ----------------------------------------------------------------------------------------------------

    def _check_not_complete(self, path: Path) -> None:
        from vmfork.errors import VmforkError
        from vmfork.snapshot import info
        try:
            info(path)
        except VmforkError:
            return
        self.result.partial_complete.append(f"point {self.result.points}: {path} looks complete after a failed save")

    def check(self, after: str) -> None:
        r = self.result
        try:
            entries = self._entries()
        except AssertionError as e:
            r.inconsistent.append(f"{after}: vmfork list failed: {str(e).splitlines()[0]}")
            return
        names = [e["name"] for e in entries]
        if len(names) != len(set(names)):
            r.inconsistent.append(f"{after}: duplicate names {names}")
        for e in entries:
            if e["alive"]:
                if e["state"] in ("creating", "destroying"):
                    # a command still running would show these; every command of the point has ended
                    r.inconsistent.append(f"{after}: {e['name']} is alive but {e['state']}")
            elif not (e["state"] == "crashed" and e["config"].get("on_crash") == "preserve"):
                r.inconsistent.append(f"{after}: {e['name']} ({e['domid']}) is {e['state']} with no process "
                                      f"(on_crash = {e['config'].get('on_crash')})")
        listed = {e["pid"] for e in entries if e["alive"]}
        ghosts = [p for p in domain_pids(self.ts.run_dir) if p not in listed]
        if ghosts:
            time.sleep(0.5)                 # a process that is just ending
            listed = {e["pid"] for e in self._entries() if e["alive"]}
            ghosts = [p for p in domain_pids(self.ts.run_dir) if p not in listed]
        if ghosts:
            r.inconsistent.append(f"{after}: domain processes without an entry: {ghosts}")
        alive_ids = {e["domid"] for e in entries if e["alive"]}
        for f in os.listdir(self.ts.run_dir):
            stem, _, ext = f.partition(".")
            if ext in ("qmp", "console", "dom") and stem.isdigit() and int(stem) not in alive_ids:
                r.orphaned.append(f"{after}: {f}")
        for f in os.listdir(self.saves):
            if f.startswith(".") and f.endswith(".tmp"):
                r.orphaned.append(f"{after}: saves/{f}")

    def _tidy(self) -> None:
        """Destroy the victims (everything but the base and its forks) so the host does not fill up."""
        for e in self._entries():
            if e["parent"] is None and e["name"] != "base":
                self.ts.run("destroy", "--force", e["name"])
        forks = [e for e in self._entries() if e["parent"] is not None]
        if len(forks) > 4:
            for e in forks:
                self.ts.run("destroy", e["name"])

    def restore_completed(self) -> None:
        for path in self.completed:
            p = self.ts.run("restore", "-p", "-n", f"check{self.n}", str(path))
            self.n += 1
            if p.returncode == 0:
                self.result.saves_restored += 1
                self.ts.run("destroy", p.stdout.strip())
            else:
                self.result.inconsistent.append(f"completed save {path} does not restore: {p.stderr.strip()}")
        self.result.saves_completed = len(self.completed)

    # --- the loop --------------------------------------------------------------------------------------------------

    def run(self, points: int, progress: Any = None) -> KillResult:
        t0 = time.monotonic()
        base = self.ts.create(self.ts.config("base", "demo"))
        self.ts.wait_state(base, "paused")
        self.base_save = self.saves / "base.sav"
        self.ts.ok("save", "base", str(self.base_save))
        for i in range(points):
            op = OPS[i % len(OPS)] if i < len(OPS) else self.rng.choice(OPS)
            delay = self.rng.uniform(0.0, WINDOW[op])
            getattr(self, "op_" + op.replace("-", "_"))(delay)
            self.result.points += 1
            self.result.by_op[op] = self.result.by_op.get(op, 0) + 1
            self.check(f"point {i} ({op}, kill after {delay * 1000:.0f} ms)")
            self._tidy()
            if progress is not None:
                progress(i, op, self.result)
        self.restore_completed()
        for e in self._entries():
            if e["parent"] is None:
                self.ts.run("destroy", "--force", e["name"])
        left = self._entries()
        if left:
            self.result.cleanup_left.append(f"entries after destroy --force: {[e['name'] for e in left]}")
        if domain_pids(self.ts.run_dir):
            self.result.cleanup_left.append(f"processes after destroy --force: {domain_pids(self.ts.run_dir)}")
        stale = [f for f in os.listdir(self.ts.run_dir) if f.partition(".")[2] in ("qmp", "console", "dom")]
        if stale:
            self.result.cleanup_left.append(f"files after destroy --force: {stale}")
        self.result.seconds = time.monotonic() - t0
        return self.result
