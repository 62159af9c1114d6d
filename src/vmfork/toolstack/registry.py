"""The registry of domains: one SQLite database in the runtime directory (`registry.db`, WAL mode).

It plays the role of xenstore's per-domain entries: every domain has a row, written by its own domain process (which
reserves it when it starts, updates its state as it runs, and deletes it when it ends) and read by the CLI.

The registry is an index, not the truth: each domain process holds the lock on its domain file (domfile.py), and
`vmfork list` rebuilds rows missing from those files (`adopt`). Allocation is safe under concurrent CLI calls, and
with the registry deleted: a domain reserves its domid and name under the run directory's allocation lock and in
one `BEGIN IMMEDIATE` transaction (SQLite's write lock), taking a domid above the counter (which only grows) and
above every file in the directory, and a name no row and no live domain file holds; then it takes its domain file.

Opening the registry writes nothing unless it has no tables yet, and reading never writes: on a full disk the
domains can still be listed (a write that fails leaves everything as it was). A damaged database is reported in
one line with the way out (move it away; `vmfork list` rebuilds the rows of the live domains).

A row whose process is gone (killed, crashed) is handled by the first command that notices (client.sweep) as the
domain's on_crash says: destroy removes it, leaving one line of why in the history (`vmfork list --all`); preserve
keeps it as crashed. A row still "creating" (its start failed) and a row "destroying" (its destroy was interrupted)
are removed.

Held forks (kind "fuzz"): a process that is not a domain process can hold a fork of a paused domain in-process
(`vmfork fuzz --domain`, toolstack/attach.py). It has a row like a fork domain's (its parent, its pid), so the
parent's rules see it as a live fork, but no control or console socket and no log. Its row goes when it ends, or, if
it was killed, at the next sweep: there is nothing left to inspect. A fuzzer's live numbers for `vmfork list` are in
`<domid>.stats` beside the registry (fuzz/target.py writes it); removing the row removes that file too.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .domfile import allocation_lock, highest_domid, live_domains
from .runtime import RunDir, ToolstackError, pid_alive

__all__ = ["HELD_KINDS", "DomainRecord", "Registry", "record_from_file", "registry_hint"]

HELD_KINDS = frozenset({"fuzz"})        # entries that are forks held by another process, not domain processes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS domains (
    domid          INTEGER PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    state          TEXT NOT NULL,
    reason         TEXT NOT NULL DEFAULT '',
    parent         INTEGER,
    kind           TEXT NOT NULL,
    config         TEXT NOT NULL,
    launch_dm      TEXT NOT NULL,
    console_log    TEXT NOT NULL,
    qmp_socket     TEXT NOT NULL,
    console_socket TEXT NOT NULL,
    pid            INTEGER,
    pid_start      INTEGER,
    created        REAL NOT NULL,
    memory         INTEGER NOT NULL,
    vcpus          INTEGER NOT NULL,
    forks_made     INTEGER NOT NULL DEFAULT 0,
    holders        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS domains_parent ON domains(parent);
CREATE TABLE IF NOT EXISTS history (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    domid  INTEGER NOT NULL,
    name   TEXT NOT NULL,
    ended  REAL NOT NULL,
    why    TEXT NOT NULL
);
"""
HISTORY_KEPT = 200              # lines of `vmfork list --all`


_COLUMNS = ("domid", "name", "state", "reason", "parent", "kind", "config", "launch_dm", "console_log", "qmp_socket",
            "console_socket", "pid", "pid_start", "created", "memory", "vcpus", "forks_made", "holders")
_UPDATABLE = frozenset(("state", "reason", "config", "launch_dm", "memory", "vcpus", "name", "holders"))


@dataclass(frozen=True, slots=True)
class DomainRecord:
    """One domain as the registry knows it."""

    domid: int
    name: str
    state: str                # creating | running | paused | shutdown | crashed
    reason: str
    parent: int | None
    kind: str                 # create | fork | restore | fuzz (a held fork, see HELD_KINDS)
    config: dict[str, Any] = field(hash=False)
    launch_dm: str            # yes | no
    console_log: str
    qmp_socket: str
    console_socket: str
    pid: int | None
    pid_start: int | None
    created: float
    memory: int
    vcpus: int
    forks_made: int = 0
    holders: str = ""         # who holds a paused domain paused: "toolstack", "debugger" (comma-separated)

    @property
    def alive(self) -> bool:
        """Whether the domain's process still runs."""
        return pid_alive(self.pid, self.pid_start)

    @property
    def shown_state(self) -> str:
        """The state to show: a domain whose process is gone is crashed whatever its row says (unless it was being
        destroyed)."""
        return self.state if self.alive or self.state == "destroying" else "crashed"

    @property
    def shown_reason(self) -> str:
        if self.alive:
            return self.reason
        if self.state == "crashed" and self.reason:
            return self.reason
        return f"its process (pid {self.pid}) is gone"

    @property
    def held(self) -> bool:
        """Whether this entry is a fork held by another process (no control socket, console or log)."""
        return self.kind in HELD_KINDS

    def label(self) -> str:
        return f"{self.name} (domain {self.domid})"


def registry_hint(path: Path, e: Exception) -> str:
    """One line for a registry that cannot be used, with the way out."""
    text = str(e)
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return (f"registry {path} is damaged ({text}): move it away (mv {path} {path}.bad); `vmfork list` then "
                "rebuilds the entries of the live domains from their domain files")
    return f"registry {path}: {text}"


def _record(row: sqlite3.Row) -> DomainRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["config"] = json.loads(values["config"])
    return DomainRecord(**values)


class Registry:
    """A connection to the registry of one runtime directory."""

    def __init__(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir
        path = run_dir.registry
        try:
            self.db = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA busy_timeout = 30000")
            try:
                os.chmod(path, 0o600)       # the WAL and shared-memory files take the database file's mode
            except OSError:
                pass
            # Only a new database is written to here: reading must work on a full disk.
            mode = self.db.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise ToolstackError(f"registry {path}: cannot switch to WAL mode (got {mode})")
            self.db.execute("PRAGMA synchronous = NORMAL")
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"counters", "domains", "history"} <= tables:
                with self._write():
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self.db.execute(statement)
            columns = {r[1] for r in self.db.execute("PRAGMA table_info(domains)")}
            if "holders" not in columns:        # a registry made by an older vmfork
                with self._write():
                    self.db.execute("ALTER TABLE domains ADD COLUMN holders TEXT NOT NULL DEFAULT ''")
        except sqlite3.DatabaseError as e:
            raise ToolstackError(registry_hint(path, e)) from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _write(self) -> Iterator[None]:
        """A write transaction that holds SQLite's write lock from its start (BEGIN IMMEDIATE)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- allocation -------------------------------------------------------------------------------------------

    def reserve(self, *, name: str | None, auto_name: str | None = None, parent: int | None, kind: str,
                config: dict[str, Any], launch_dm: str, pid: int, pid_start: int | None, memory: int,
                vcpus: int, auto_word: str = "fork",
                claim: Callable[[DomainRecord], None] | None = None) -> DomainRecord:
        """Allocate a domid and take a name in one transaction. `name` None: `<auto_name>-<auto_word>-<n>`, n as
        _next_fork_name picks it (skipping names in use). `claim(record)` (a domain process taking its domain file)
        runs under the allocation lock, after the row is in; if it fails the row goes again."""
        with allocation_lock(self.run_dir.path):
            live = live_domains(self.run_dir.path)
            live_names = {str(d.get("name")): domid for domid, d in live.items()}
            try:
                record = self._reserve(name, auto_name, parent, kind, config, launch_dm, pid, pid_start, memory,
                                       vcpus, auto_word, live_names)
            except sqlite3.Error as e:
                raise ToolstackError(f"registry: {e}") from None
            if claim is not None:
                try:
                    claim(record)
                except BaseException:
                    with contextlib.suppress(ToolstackError):
                        self.remove(record.domid)
                    raise
        return record

    def _reserve(self, name: str | None, auto_name: str | None, parent: int | None, kind: str,
                 config: dict[str, Any], launch_dm: str, pid: int, pid_start: int | None, memory: int, vcpus: int,
                 auto_word: str, live_names: dict[str, int]) -> DomainRecord:
        with self._write():
            row = self.db.execute("SELECT value FROM counters WHERE key = 'next_domid'").fetchone()
            domid = max(1 if row is None else int(row[0]), highest_domid(self.run_dir.path) + 1)
            if name is None:
                if auto_name is None or parent is None:
                    raise ToolstackError("a domain needs a name")
                name = self._next_fork_name(parent, auto_name, auto_word, set(live_names))
            else:
                used = self.db.execute("SELECT domid FROM domains WHERE name = ?", (name,)).fetchone()
                if used is None and name in live_names:
                    used = (live_names[name],)
                if used is not None:
                    raise ToolstackError(f"name {name!r} is already used by domain {used[0]}")
            rd = self.run_dir
            values = (domid, name, "creating", "", parent, kind, json.dumps(config), launch_dm,
                      str(rd.console_log(domid)), str(rd.qmp_socket(domid)), str(rd.console_socket(domid)),
                      pid, pid_start, time.time(), memory, vcpus, 0, "")
            self.db.execute(f"INSERT INTO domains ({', '.join(_COLUMNS)}) VALUES "
                            f"({', '.join('?' * len(_COLUMNS))})", values)
            self.db.execute("INSERT INTO counters (key, value) VALUES ('next_domid', ?) "
                            "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (domid + 1,))
        record = self.get(domid)
        assert record is not None
        return record

    def adopt(self, data: dict[str, Any]) -> DomainRecord | None:
        """Put back the row of a live domain from its domain file (the registry was deleted or lost it). None if
        the file does not hold a usable row, or a row with that domid or name exists."""
        try:
            values = {k: data[k] for k in _COLUMNS if k not in ("forks_made",)}
            values["forks_made"] = int(data.get("forks_made", 0))
            values["config"] = json.dumps(values["config"])
        except (KeyError, TypeError, ValueError):
            return None
        try:
            with self._write():
                self.db.execute(f"INSERT OR IGNORE INTO domains ({', '.join(_COLUMNS)}) VALUES "
                                f"({', '.join('?' * len(_COLUMNS))})", tuple(values[k] for k in _COLUMNS))
                self.db.execute("INSERT INTO counters (key, value) VALUES ('next_domid', ?) ON CONFLICT(key) DO "
                                "UPDATE SET value = max(value, excluded.value)", (int(values["domid"]) + 1,))
        except sqlite3.Error as e:
            raise ToolstackError(f"registry: {e}") from None
        return self.get(int(values["domid"]))

    def _next_fork_name(self, parent: int, base: str, word: str = "fork", taken: set[str] | None = None) -> str:
        """Forks number on from the parent's count of forks made (a fork domain's name, like its log, is never
        reused); held forks (another word, e.g. "fuzz") take the lowest free number and leave that count alone."""
        counted = word == "fork"
        n = 0
        if counted:
            row = self.db.execute("SELECT forks_made FROM domains WHERE domid = ?", (parent,)).fetchone()
            n = 0 if row is None else int(row[0])
        while True:
            n += 1
            suffix = f"-{word}-{n}"
            name = base[:64 - len(suffix)] + suffix
            if self.db.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone() is None and \
                    name not in (taken or ()):
                break
        if counted:
            self.db.execute("UPDATE domains SET forks_made = ? WHERE domid = ?", (n, parent))
        return name

    # --- reading ----------------------------------------------------------------------------------------------

    def get(self, domid: int) -> DomainRecord | None:
        try:
            row = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM domains WHERE domid = ?", (domid,)).fetchone()
        except sqlite3.Error as e:
            raise ToolstackError(f"registry: {e}") from None
        return None if row is None else _record(row)

    def by_name(self, name: str) -> DomainRecord | None:
        try:
            row = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM domains WHERE name = ?", (name,)).fetchone()
        except sqlite3.Error as e:
            raise ToolstackError(f"registry: {e}") from None
        return None if row is None else _record(row)

    def find(self, domain: str | int) -> DomainRecord:
        """A domain by domid (an int, or a string of digits) or by name; ToolstackError if there is none. A live
        domain the registry lacks (see domfile.py) is found from its domain file and its row put back."""
        by_id = isinstance(domain, int) or (isinstance(domain, str) and domain.isdigit())
        record = self.get(int(domain)) if by_id else self.by_name(str(domain))
        if record is None:
            for data in live_domains(self.run_dir.path).values():
                if (data.get("domid") == int(domain)) if by_id else (data.get("name") == domain):
                    try:
                        record = self.adopt(data)
                    except ToolstackError:
                        record = None
                    record = record or record_from_file(data)
                    break
        if record is None:
            what = f"with id {int(domain)}" if by_id else f"named {domain!r}"
            raise ToolstackError(f"no domain {what} (vmfork list shows the domains)")
        return record

    def all(self) -> list[DomainRecord]:
        try:
            rows = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM domains ORDER BY domid").fetchall()
        except sqlite3.Error as e:
            raise ToolstackError(f"registry: {e}") from None
        return [_record(r) for r in rows]

    def children(self, domid: int) -> list[DomainRecord]:
        try:
            rows = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM domains WHERE parent = ? ORDER BY domid",
                                   (domid,)).fetchall()
        except sqlite3.Error as e:
            raise ToolstackError(f"registry: {e}") from None
        return [_record(r) for r in rows]

    def subtree(self, domid: int) -> list[DomainRecord]:
        """The domain's descendants, leaves first (a domain always comes after its own forks)."""
        out: list[DomainRecord] = []

        def visit(d: int, depth: int) -> None:
            if depth > 1000:
                raise ToolstackError("the registry's fork tree has a cycle")
            for ch in self.children(d):
                visit(ch.domid, depth + 1)
                out.append(ch)
        visit(domid, 0)
        return out

    # --- writing ----------------------------------------------------------------------------------------------

    def update(self, domid: int, **values: Any) -> None:
        bad = set(values) - _UPDATABLE
        if bad:
            raise ValueError(f"registry: cannot update {', '.join(sorted(bad))}")
        if "config" in values:
            values["config"] = json.dumps(values["config"])
        sets = ", ".join(f"{k} = ?" for k in values)
        try:
            with self._write():
                self.db.execute(f"UPDATE domains SET {sets} WHERE domid = ?", (*values.values(), domid))
        except sqlite3.IntegrityError:
            raise ToolstackError(f"name {values.get('name')!r} is already used by another domain") from None
        except sqlite3.Error as e:
            raise ToolstackError(f"registry: {e}") from None

    def mark_crashed(self, domid: int, reason: str) -> None:
        """Record that a domain's process is gone (only if the row still belongs to a dead process)."""
        try:
            with self._write():
                self.db.execute("UPDATE domains SET state = 'crashed', reason = ? WHERE domid = ? AND "
                                "state != 'crashed'", (reason, domid))
        except sqlite3.Error as e:
            raise ToolstackError(f"registry: {e}") from None

    def remove(self, domid: int, *, why: str | None = None) -> None:
        """Remove a row; with `why`, keep one line of history about it (`vmfork list --all`)."""
        try:
            with self._write():
                if why is not None:
                    row = self.db.execute("SELECT name FROM domains WHERE domid = ?", (domid,)).fetchone()
                    if row is not None:
                        self.db.execute("INSERT INTO history (domid, name, ended, why) VALUES (?, ?, ?, ?)",
                                        (domid, row[0], time.time(), why))
                        self.db.execute("DELETE FROM history WHERE id <= (SELECT max(id) FROM history) - ?",
                                        (HISTORY_KEPT,))
                self.db.execute("DELETE FROM domains WHERE domid = ?", (domid,))
        except sqlite3.Error as e:
            raise ToolstackError(f"registry: {e}") from None
        # Whoever removes the row (the fuzzer on its way out, or the sweep after a killed one) removes its stats.
        for path in (self.fuzz_stats(domid), self.fuzz_stats(domid, temporary=True)):
            with contextlib.suppress(OSError):
                path.unlink()

    def history(self) -> list[dict[str, Any]]:
        """Domains that ended, oldest first: domid, name, ended (a time stamp), why."""
        try:
            rows = self.db.execute("SELECT domid, name, ended, why FROM history ORDER BY id").fetchall()
        except sqlite3.Error as e:
            raise ToolstackError(f"registry: {e}") from None
        return [{"domid": r[0], "name": r[1], "ended": r[2], "why": r[3]} for r in rows]

    def fuzz_stats(self, domid: int, *, temporary: bool = False) -> Path:
        """Where the fuzzer holding fork `domid` publishes its live numbers (JSON; written to the temporary name,
        then renamed over it)."""
        return self.run_dir.path / (f".{domid}.stats.tmp" if temporary else f"{domid}.stats")


def record_from_file(data: dict[str, Any]) -> DomainRecord | None:
    """A live domain as its domain file describes it (for listing without a usable registry)."""
    try:
        values = {k: data[k] for k in _COLUMNS if k != "forks_made"}
        return DomainRecord(**values, forks_made=int(data.get("forks_made", 0)))
    except (KeyError, TypeError, ValueError):
        return None
