"""A vmfork fuzzer as an AFL++ instance directory in a sync dir (`vmfork fuzz --out SYNC_DIR --name NAME`).

AFL++'s parallel and distributed fuzzing is a directory layout, not a protocol: every instance owns
SYNC_DIR/NAME/ and the tools (afl-whatsup, afl-plot, afl-cmin, rsync-based distribution scripts) read it. vmfork
writes the same layout, as AFL++ 4.04c (Debian 12's) writes it:

    NAME/queue/id:000000,time:0,execs:0,orig:SEED        the seeds, then what this instance found:
    NAME/queue/id:000007,src:000003,time:MS,execs:N,op:havoc,+cov      (an input that reached new blocks)
    NAME/queue/id:000009,sync:OTHER,src:000004,+cov      an input imported from OTHER that was new here
    NAME/crashes/id:000000,sig:11,time:MS,execs:N,op:havoc,kind:vector,vec:14,rip:1002f8
    NAME/crash_reports/<that name>.json                  vmfork's outcome of it (registers, vector, error code)
    NAME/hangs/id:000000,time:MS,execs:N,op:havoc
    NAME/fuzzer_stats, NAME/plot_data, NAME/cmdline      what afl-whatsup and afl-plot read
    NAME/.synced/OTHER                                   the next queue id to import from OTHER (a u32, AFL++'s)

`sig` is the signal AFL++ would have seen (fuzz/afl.py's wait statuses: SIGSEGV for a fault vector, SIGILL for #UD,
SIGFPE for #DE, SIGABRT for a sink or a triple fault). `time` is milliseconds since this instance started, `execs`
its inputs run so far; `op:havoc` because vmfork's mutator stacks 1-8 random mutations (mutate.py), which is what
AFL++ calls havoc. Every input vmfork keeps reached basic blocks new to it, hence `+cov`.

Import (AFL++'s sync_fuzzers): every SYNC_S the instance looks at each other directory of SYNC_DIR that has a
queue/ (dot entries and itself skipped), reads `.synced/OTHER` (the first id not yet imported), runs the entries
from there on as they are, and keeps those that reach blocks new to it, named `sync:OTHER,src:ID`. Inputs whose
content this instance already has are not run again. Anything that is not an AFL++ queue entry (a name without
`id:N`, a directory, an empty file or one over AFL++'s MAX_FILE, an unreadable file, a damaged `.synced` record)
is skipped with one warning per path, never an error (empty files quietly, as AFL++ does: vmfork's mutator can
make an empty input).

AFL++ secondaries (`afl-fuzz -S`) import only from main instances (those with an `is_main_node` file); with none
in the sync dir a secondary elects itself main after its first sync and then imports from everyone, vmfork
instances included. `--main` makes a vmfork instance the main node instead (it imports from everyone either way).

The instance directory is locked (flock, as afl-fuzz locks its own) while a fuzzer writes it: a second fuzzer with
the same name is refused. Restarting with the same name continues: the queue becomes the corpus again and the ids
go on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import struct
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from .errors import FuzzError
from .loop import Result, Stats

__all__ = ["SYNC_S", "InstanceDir", "InstanceSync", "check_name", "signal_of"]

SYNC_S = 1.0                    # how often an instance imports the others' queues
STATS_S = 1.0                   # fuzzer_stats
PLOT_S = 5.0                    # a plot_data row (AFL++ writes one at most every 5 s too)
MAX_FILE = 1 << 20              # AFL++'s MAX_FILE: larger queue entries are not imported (it skips them too)
SCRATCH = ".vmfork"             # inside the instance: where the loop drops crashes and hangs before they get ids
VERSION = "vmfork-0.1.0"
PLOT_HEADER = ("# relative_time, cycles_done, cur_item, corpus_count, pending_total, pending_favs, map_size, "
               "saved_crashes, saved_hangs, max_depth, execs_per_sec, total_execs, edges_found\n")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_ID = re.compile(r"id:(\d{6,10})(?:,|\Z)")
_SAFE = re.compile(r"[^A-Za-z0-9_.+-]")
_SYNCED = struct.Struct("<I")


def check_name(name: str) -> str | None:
    """Why `name` cannot name an instance (None if it can): AFL++'s tools read it unquoted from fuzzer_stats in a
    shell, so letters, digits, `_`, `.`, `-` only."""
    if not _NAME.match(name):
        return (f"--name {name!r}: an instance name is 1-64 letters, digits, '_', '.' or '-', starting with a letter "
                "or digit")
    return None


def signal_of(kind: str, vector: int | None) -> int:
    """The `sig:` of a crash: the signal AFL++ is told for it in --afl mode (afl.wait_status)."""
    from .afl import wait_status
    return wait_status(Result("crash", kind, vector=vector))


def _entry_id(name: str) -> int | None:
    m = _ID.match(name)
    return int(m.group(1)) if m else None


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _write_atomic(tmp_dir: Path, path: Path, data: bytes) -> None:
    """Others (afl-fuzz, rsync, other vmfork instances) may read `path` at any time: never half of it."""
    tmp = tmp_dir / f".tmp-{os.getpid()}-{path.name[:32]}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class InstanceDir:
    """SYNC_DIR/NAME, written as an AFL++ instance (see the module doc). `warn` gets one line per skipped path."""

    def __init__(self, sync_dir: Path, name: str, *, command_line: Sequence[str] = (), exec_timeout_ms: int = 0,
                 main: bool = False, warn: Callable[[str], None] | None = None) -> None:
        problem = check_name(name)
        if problem is not None:
            raise FuzzError(problem)
        self.sync_dir = Path(sync_dir)
        self.name = name
        self.path = self.sync_dir / name
        self.warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self.exec_timeout_ms = exec_timeout_ms
        self.command_line = " ".join(command_line)
        self.warned: set[str] = set()
        self._looked: dict[str, int] = {}       # other instance -> its queue/'s mtime when last listed
        try:
            self.sync_dir.mkdir(parents=True, exist_ok=True)
            self.path.mkdir(exist_ok=True)
        except OSError as e:
            raise FuzzError(f"--out {self.sync_dir}: {e.strerror or e}") from None
        if not self.path.is_dir():
            raise FuzzError(f"{self.path} is not a directory")
        self._lock_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise FuzzError(f"{self.path} is in use by another fuzzer (give another --name)") from None
        for sub in ("queue", "crashes", "hangs", "crash_reports", ".synced", SCRATCH):
            (self.path / sub).mkdir(exist_ok=True)
        self.scratch = self.path / SCRATCH
        if main:
            (self.path / "is_main_node").touch()
        (self.path / "cmdline").write_text("\n".join(command_line) + "\n")
        self.queue_ids: list[int] = []          # the loop's corpus index -> queue id
        self.depth: list[int] = []              # AFL++'s depth of each corpus entry (seeds 1)
        self.known: set[str] = set()            # sha1 of every corpus entry
        self.next_queue = self._next_id(self.path / "queue")
        self.next_crash = self._next_id(self.path / "crashes")
        self.next_hang = self._next_id(self.path / "hangs")
        self.saved_crashes = 0
        self.saved_hangs = 0
        self.found = 0
        self.imported = 0
        self.start_time = time.time()
        self.last_find = 0.0
        self.last_crash = 0.0
        self.last_hang = 0.0
        self.execs_at_crash = 0
        self._plot_last: tuple[float, int] | None = None
        new_plot = not (self.path / "plot_data").exists()
        self._plot = open(self.path / "plot_data", "a")         # open while the instance lives
        if new_plot:
            self._plot.write(PLOT_HEADER)
            self._plot.flush()

    @staticmethod
    def _next_id(directory: Path) -> int:
        ids = [i for i in (_entry_id(n) for n in os.listdir(directory)) if i is not None]
        return max(ids) + 1 if ids else 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._plot.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def _warn_once(self, key: str, line: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            self.warn(f"vmfork fuzz: warning: {line}")

    # --- the corpus -----------------------------------------------------------------------------------------------

    def initial_corpus(self, seeds: Sequence[tuple[str, bytes]]) -> list[bytes]:
        """The loop's starting corpus: this instance's queue from an earlier run (in id order), then the seeds it
        does not hold yet (written as `orig:` entries), or one input of 8 zero bytes if that leaves nothing."""
        corpus: list[bytes] = []
        queue = self.path / "queue"
        for name in sorted(os.listdir(queue)):
            qid = _entry_id(name)
            if qid is None:
                continue
            try:
                data = (queue / name).read_bytes()
            except OSError as e:
                self._warn_once(str(queue / name), f"{queue / name}: {e.strerror or e}, skipped")
                continue
            if _sha1(data) not in self.known:
                self._remember(data, qid, 1)
                corpus.append(data)
        if not seeds and not corpus:
            seeds = [("zero", b"\0" * 8)]
        for seed_name, data in seeds:
            if _sha1(data) in self.known:
                continue
            qid = self.next_queue
            self._put("queue", f"id:{qid:06d},time:0,execs:0,orig:{_SAFE.sub('_', seed_name)[:64]}", data)
            self.next_queue += 1
            self._remember(data, qid, 1)
            corpus.append(data)
        return corpus

    def _remember(self, data: bytes, qid: int, depth: int) -> None:
        self.queue_ids.append(qid)
        self.depth.append(depth)
        self.known.add(_sha1(data))

    def _put(self, sub: str, name: str, data: bytes) -> Path:
        path = self.path / sub / name
        _write_atomic(self.scratch, path, data)
        return path

    def add_found(self, data: bytes, src: int, millis: int, execs: int) -> Path:
        """An input of this instance's own that reached new blocks; `src`: the corpus index it was mutated from."""
        qid = self.next_queue
        origin = self.queue_ids[src] if 0 <= src < len(self.queue_ids) else 0
        path = self._put("queue", f"id:{qid:06d},src:{origin:06d},time:{millis},execs:{execs},op:havoc,+cov", data)
        self.next_queue += 1
        self._remember(data, qid, (self.depth[src] if 0 <= src < len(self.depth) else 1) + 1)
        self.found += 1
        self.last_find = time.time()
        return path

    def add_imported(self, data: bytes, other: str, other_id: int) -> Path:
        """An input from instance `other` (its queue id `other_id`) that reached blocks new to this one."""
        qid = self.next_queue
        path = self._put("queue", f"id:{qid:06d},sync:{other},src:{other_id:06d},+cov", data)
        self.next_queue += 1
        self._remember(data, qid, 1)
        self.imported += 1
        self.last_find = time.time()
        return path

    # --- crashes and hangs ----------------------------------------------------------------------------------------

    def collect(self, millis: int, execs: int) -> dict[str, str]:
        """Give ids to the crashes and hangs the loop saved in the scratch directory since the last call (it saves
        `<kind>-...bin` with a `.json` outcome, and hangs by hash); returns {scratch path: final path}."""
        moved: dict[str, str] = {}
        crashes = self.scratch / "crashes"
        if crashes.is_dir():
            for name in sorted(os.listdir(crashes)):
                if not name.endswith(".bin"):
                    continue
                src = crashes / name
                report = src.with_suffix(".json")
                try:
                    outcome = json.loads(report.read_text())
                except (OSError, ValueError):
                    outcome = {}
                kind = str(outcome.get("kind") or "crash")
                vector = outcome.get("vector")
                fields = [f"id:{self.next_crash:06d}", f"sig:{signal_of(kind, vector):02d}", f"time:{millis}",
                          f"execs:{execs}", "op:havoc", f"kind:{_SAFE.sub('_', kind)}"]
                if vector is not None:
                    fields.append(f"vec:{vector}")
                if outcome.get("sink"):
                    fields.append(f"sink:{_SAFE.sub('_', str(outcome['sink']))[:48]}")
                if outcome.get("rip") is not None:
                    fields.append(f"rip:{int(outcome['rip']):x}")
                final = self.path / "crashes" / ",".join(fields)
                os.replace(src, final)
                with contextlib.suppress(OSError):
                    os.replace(report, self.path / "crash_reports" / f"{final.name}.json")
                self.next_crash += 1
                self.saved_crashes += 1
                self.last_crash = time.time()
                self.execs_at_crash = execs
                moved[str(src)] = str(final)
        hangs = self.scratch / "hangs"
        if hangs.is_dir():
            for name in sorted(os.listdir(hangs)):
                final = self.path / "hangs" / f"id:{self.next_hang:06d},time:{millis},execs:{execs},op:havoc"
                os.replace(hangs / name, final)
                self.next_hang += 1
                self.saved_hangs += 1
                self.last_hang = time.time()
        return moved

    # --- import ---------------------------------------------------------------------------------------------------

    def _synced(self, other: str) -> int:
        path = self.path / ".synced" / other
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as e:
            self._warn_once(str(path), f"{path}: {e.strerror or e}; importing {other}'s queue from its start")
            return 0
        if len(raw) != _SYNCED.size:
            self._warn_once(str(path), f"{path}: {len(raw)} bytes, not an AFL++ sync record (4); importing "
                                       f"{other}'s queue from its start")
            return 0
        return int(_SYNCED.unpack(raw)[0])

    def pull(self) -> list[tuple[bytes, str, int]]:
        """The queue entries of the other instances not imported yet, as (data, instance, its id), in id order;
        `.synced/` records how far each instance was read (AFL++'s bookkeeping)."""
        found: list[tuple[bytes, str, int]] = []
        try:
            entries = sorted(os.scandir(self.sync_dir), key=lambda e: e.name)
        except OSError as e:
            self._warn_once(str(self.sync_dir), f"{self.sync_dir}: {e.strerror or e}; nothing imported")
            return found
        for entry in entries:
            other = entry.name
            if other.startswith(".") or other == self.name:
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if not is_dir:
                self._warn_once(entry.path, f"{entry.path}: not an instance directory, skipped")
                continue
            queue = Path(entry.path) / "queue"
            try:
                stamp = os.stat(queue).st_mtime_ns
                if self._looked.get(other) == stamp:
                    continue                    # nothing added or renamed there since the last look
                names = os.listdir(queue)
            except FileNotFoundError:
                continue                        # not (yet) an instance: AFL++ skips it too
            except OSError as e:
                self._warn_once(str(queue), f"{queue}: {e.strerror or e}, skipped")
                continue
            if not _NAME.match(other):
                self._warn_once(entry.path, f"{entry.path}: not a name an instance can have, skipped")
                continue
            if time.time_ns() - stamp > 1_000_000_000:
                # (a directory changed within the last second may change again with the same coarse timestamp)
                self._looked[other] = stamp
            first = self._synced(other)
            todo: list[tuple[int, str]] = []
            for name in names:
                if name.startswith("."):
                    continue                    # AFL++'s queue/.state/, temporary files
                qid = _entry_id(name)
                if qid is None:
                    self._warn_once(str(queue / name), f"{queue / name}: not an AFL++ queue entry "
                                                       "(id:NNNNNN,...), skipped")
                elif qid >= first:
                    todo.append((qid, name))
            if not todo:
                continue
            todo.sort()
            for qid, name in todo:
                data = self._read_entry(queue / name)
                if data is not None and _sha1(data) not in self.known:
                    found.append((data, other, qid))
            record = self.path / ".synced" / other
            with contextlib.suppress(OSError):
                _write_atomic(self.scratch, record, _SYNCED.pack(todo[-1][0] + 1))
                (self.path / ".synced" / f"{other}.last").touch()
        return found

    def _read_entry(self, path: Path) -> bytes | None:
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if not (st.st_mode & 0o170000 == 0o100000):
                    why = "not a regular file"
                elif st.st_size == 0:
                    return None                 # vmfork's mutator can make empty inputs; AFL++ skips them quietly
                elif st.st_size > MAX_FILE:
                    why = f"{st.st_size} bytes, more than AFL++'s MAX_FILE ({MAX_FILE})"
                else:
                    return f.read(MAX_FILE)
        except IsADirectoryError:
            why = "a directory"
        except OSError as e:
            why = e.strerror or str(e)
        self._warn_once(str(path), f"{path}: {why}, skipped")
        return None

    # --- what afl-whatsup and afl-plot read -----------------------------------------------------------------------

    def write_stats(self, st: Stats, *, elapsed: float, recent_eps: float) -> None:
        """fuzzer_stats, with AFL++ 4.04c's fields in its order (afl-whatsup sources it in a shell)."""
        now = time.time()
        cvg = 100.0 * st.blocks_hit / st.blocks_total if st.blocks_total else 0.0
        eps = st.execs / elapsed if elapsed > 0 else 0.0
        rss_mb = 0
        with contextlib.suppress(OSError, ValueError):
            import resource
            rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
        fields: list[tuple[str, object]] = [
            ("start_time", int(self.start_time)), ("last_update", int(now)), ("run_time", int(elapsed)),
            ("fuzzer_pid", os.getpid()), ("cycles_done", 0), ("cycles_wo_finds", 0), ("execs_done", st.execs),
            ("execs_per_sec", f"{eps:0.2f}"), ("execs_ps_last_min", f"{recent_eps:0.2f}"),
            ("corpus_count", max(st.corpus, len(self.queue_ids), 1)), ("corpus_favored", 0),
            ("corpus_found", self.found), ("corpus_imported", self.imported), ("corpus_variable", 0),
            ("max_depth", max(self.depth, default=1)), ("cur_item", 0), ("pending_favs", 0), ("pending_total", 0),
            ("stability", "100.00%"), ("bitmap_cvg", f"{cvg:0.2f}%"), ("saved_crashes", self.saved_crashes),
            ("saved_hangs", self.saved_hangs), ("last_find", int(self.last_find)),
            ("last_crash", int(self.last_crash)), ("last_hang", int(self.last_hang)),
            ("execs_since_crash", st.execs - self.execs_at_crash), ("exec_timeout", self.exec_timeout_ms),
            ("slowest_exec_ms", 0), ("peak_rss_mb", rss_mb), ("cpu_affinity", -1),
            ("edges_found", st.blocks_hit), ("total_edges", st.blocks_total), ("var_byte_count", 0),
            ("havoc_expansion", 0), ("auto_dict_entries", 0), ("testcache_size", 0), ("testcache_count", 0),
            ("testcache_evict", 0), ("afl_banner", self.name), ("afl_version", VERSION),
            ("target_mode", "vmfork"), ("command_line", self.command_line)]
        text = "".join(f"{key:<18}: {value}\n" for key, value in fields)
        with contextlib.suppress(OSError):
            _write_atomic(self.scratch, self.path / "fuzzer_stats", text.encode())

    def plot(self, st: Stats, *, elapsed: float) -> None:
        """A plot_data row (AFL++ 4.04c's 13 columns; vmfork has no cycles, pending or favoured entries: 0)."""
        now = time.monotonic()
        eps = st.execs / elapsed if elapsed > 0 else 0.0
        if self._plot_last is not None and now > self._plot_last[0]:
            eps = (st.execs - self._plot_last[1]) / (now - self._plot_last[0])
        self._plot_last = (now, st.execs)
        cvg = 100.0 * st.blocks_hit / st.blocks_total if st.blocks_total else 0.0
        with contextlib.suppress(OSError, ValueError):
            self._plot.write(f"{int(elapsed)}, 0, 0, {max(st.corpus, len(self.queue_ids))}, 0, 0, {cvg:0.2f}%, "
                             f"{self.saved_crashes}, {self.saved_hangs}, {max(self.depth, default=1)}, {eps:0.2f}, "
                             f"{st.execs}, {st.blocks_hit}\n")
            self._plot.flush()


class InstanceSync:
    """The loop's CampaignSync (loop.py) for one AFL++ instance: queue entries for its finds, ids for its crashes
    and hangs, fuzzer_stats and plot_data as it goes, and the other instances' queues imported every SYNC_S.
    `--jobs` workers (jobs.Worker) add the campaign's shared board and crash claims to it."""

    def __init__(self, instance: InstanceDir) -> None:
        self.instance = instance
        self.start = 0.0
        self.next_sync = 0.0
        self.next_stats = 0.0
        self.next_plot = 0.0
        self.incoming: dict[str, tuple[str, int]] = {}      # sha1 -> (instance, id) of inputs being imported
        self.ran_imports = 0                                # inputs run from the others
        self._seen = (0, 0)                                 # (unique crashes, hangs) when last collected
        self._eps: tuple[float, int] = (0.0, 0)
        self.recent_eps = 0.0
        self.moved: dict[str, str] = {}
        self.st: Stats | None = None                        # the loop's numbers (the same object every tick)

    def millis(self, now: float | None = None) -> int:
        return int(((time.monotonic() if now is None else now) - self.start) * 1000)

    # --- loop.CampaignSync ----------------------------------------------------------------------------------------

    def begin(self, start: float, corpus: Sequence[bytes]) -> None:
        self.start = start
        self.next_sync = start              # import at the first look at the clock (AFL_IMPORT_FIRST's way)
        self.next_stats = start
        self.next_plot = start + PLOT_S
        self._eps = (start, 0)

    def stop_soon(self, signum: int = 0, frame: object = None) -> None:
        """End the loop at its next look at the clock (a signal handler: Ctrl-C or SIGTERM end a campaign with its
        last numbers written and its summary, as afl-fuzz does)."""
        self.stopping = True

    stopping = False

    def tick(self, st: Stats, now: float) -> list[bytes] | None:
        self.st = st
        if self.stopping:
            return None
        if (st.unique_crashes, st.hangs) != self._seen:
            self._seen = (st.unique_crashes, st.hangs)
            self.moved.update(self.instance.collect(self.millis(now), st.execs))
        if now >= self.next_stats and st.execs > 0:         # afl-whatsup divides by execs_done
            self.next_stats = now + STATS_S
            if now > self._eps[0]:
                self.recent_eps = (st.execs - self._eps[1]) / (now - self._eps[0])
            self._eps = (now, st.execs)
            st.elapsed_s = now - self.start
            self.instance.write_stats(st, elapsed=now - self.start, recent_eps=self.recent_eps)
            if now >= self.next_plot:
                self.next_plot = now + PLOT_S
                self.instance.plot(st, elapsed=now - self.start)
        if now < self.next_sync:
            return []
        self.next_sync = now + SYNC_S
        incoming = []
        for data, other, qid in self.instance.pull():
            key = _sha1(data)
            if key not in self.incoming:
                self.incoming[key] = (other, qid)
                incoming.append(data)
        self.ran_imports += len(incoming)
        return incoming

    def add(self, data: bytes, src: int = -1) -> None:
        key = _sha1(data)
        origin = self.incoming.get(key)
        if origin is not None:
            self.instance.add_imported(data, *origin)
        elif key not in self.instance.known:
            self.instance.add_found(data, src, self.millis(), self.st.execs if self.st is not None else 0)

    def claim(self, signature: tuple[str, str, int | None]) -> bool:
        return True

    def crashed(self) -> None:
        pass

    def finish(self, st: Stats) -> None:
        """The end of the loop: the last crashes and hangs get their ids, the last stats and plot row are written,
        and `st.crash_files` names the crashes where they are now."""
        inst = self.instance
        self.moved.update(inst.collect(self.millis(), st.execs))
        st.crash_files = [self.moved.get(f, f) for f in st.crash_files]
        if st.execs > 0:
            inst.write_stats(st, elapsed=st.elapsed_s, recent_eps=self.recent_eps)
            inst.plot(st, elapsed=st.elapsed_s)
        with contextlib.suppress(OSError):
            for sub in ("crashes", "hangs", "corpus"):
                with contextlib.suppress(FileNotFoundError):
                    (inst.scratch / sub).rmdir()
            inst.scratch.rmdir()
        inst.close()


def status_file(instance: Path) -> dict[str, str]:
    """A fuzzer_stats file as {field: value} (for tests and `vmfork`'s own readers)."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in (instance / "fuzzer_stats").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep:
                out[key.strip()] = value.strip()
    return out


def stderr_warn(stream: TextIO | None = None) -> Callable[[str], None]:
    def warn(line: str) -> None:
        print(line, file=stream or sys.stderr, flush=True)
    return warn
