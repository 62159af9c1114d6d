"""`vmfork fuzz --jobs N`: one campaign on N cores, as libFuzzer's -jobs, honggfuzz's -n or AFL++'s -M/-S do it.

The CLI process (the supervisor) forks N workers before anything is booted (no VM, no thread yet), and each runs
the ordinary one-process campaign (fuzz/cli.py) with a seed of its own (--seed + its index): with --kernel it boots
its own parent (tens of ms: cheaper than sharing one parent's pages across processes), with --domain it holds its
own fork of the domain (`NAME-fuzz-N`, one per worker). Forking rather than starting `vmfork fuzz` again hands each
worker the parsed and checked arguments as they are. Each worker fuzzes for --seconds from its own start (they start
within tens of milliseconds of each other); the summary's `seconds` runs from the first start to the last end.

What the workers share, and why this way:
  the board      one anonymous shared page: each worker's live counters go up (the supervisor's status line, the
                 campaign's --execs), a stop word comes down. Workers read it when they look at the clock (every 32
                 inputs), so --execs, --stop-on-crash (the first crash in any worker) and the end of a failed campaign
                 reach every worker within a few dozen inputs.
  OUT/NAME-i/    each worker is an AFL++ instance of the sync dir OUT (syncdir.py; NAME is --name, default
                 `vmfork`): its finds go to its queue/ and every SYNC_S it runs, unchanged, the entries the other
                 instances queued since it last looked (AFL++'s .synced/ bookkeeping), those of afl-fuzz instances
                 and of other machines' workers (an rsync'ed sync dir) included; those that reach blocks new to it
                 join its own queue too. fuzzer_stats and plot_data are AFL++'s, so afl-whatsup and afl-plot work.
  OUT/.NAME.jobs/  the campaign's scratch directory, removed at the end: crash claims (a worker saves a crash only
                 if it creates its signature's claim file first, O_EXCL, so the same bug found by two workers is one
                 file) and each worker's final report for the supervisor.

Signals: workers ignore SIGINT (a terminal sends Ctrl-C to the whole process group); the supervisor turns Ctrl-C or
SIGTERM into one SIGTERM per worker, which a worker turns into KeyboardInterrupt once (its cleanup runs: forks
destroyed, a held domain fork let go), and waits for them (SIGKILL after GRACE_S). PR_SET_PDEATHSIG: a supervisor
killed outright takes its workers with it the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import mmap
import os
import shutil
import signal
import struct
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from ..errors import user_error_line
from .loop import FuzzError, Stats
from .status import LiveView, Numbers
from .syncdir import InstanceDir, InstanceSync

__all__ = ["Worker", "cpu_count", "run_jobs"]

SYNC_S = 1.0                # how often a worker looks for the others' new inputs
STATUS_S = 0.5              # the supervisor's status line
GRACE_S = 15.0              # how long a stopped worker may take to clean up before SIGKILL
DEFAULT_NAME = "vmfork"      # the workers' names without --name: vmfork-1, vmfork-2, ...

# The board: a header word (stop), then one slot of signed 64-bit counters per worker.
FIELDS = ("state", "start_ns", "execs", "ok", "crashes", "unique_crashes", "hangs", "rejected", "corpus",
          "blocks_hit", "blocks_total", "imported", "last_find")
_SLOT = struct.Struct(f"<{len(FIELDS)}q")
_HEADER = 64
STARTING, FUZZING = 0, 1


def cpu_count() -> int:
    """The CPUs this process may run on (what --jobs is compared with)."""
    return len(os.sched_getaffinity(0))


class Board:
    """The shared page (MAP_SHARED | MAP_ANONYMOUS, so forks of the supervisor see the same memory)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.mem = mmap.mmap(-1, _HEADER + workers * _SLOT.size)

    def stop(self) -> None:
        struct.pack_into("<q", self.mem, 0, 1)

    def stopped(self) -> bool:
        return bool(struct.unpack_from("<q", self.mem, 0)[0])

    def put(self, index: int, values: dict[str, int]) -> None:
        _SLOT.pack_into(self.mem, _HEADER + index * _SLOT.size, *(int(values.get(f, 0)) for f in FIELDS))

    def get(self, index: int) -> dict[str, int]:
        return dict(zip(FIELDS, _SLOT.unpack_from(self.mem, _HEADER + index * _SLOT.size), strict=True))

    def total_execs(self) -> int:
        at = FIELDS.index("execs") * 8
        return sum(struct.unpack_from("<q", self.mem, _HEADER + i * _SLOT.size + at)[0] for i in range(self.workers))

    def close(self) -> None:
        self.mem.close()


class Worker:
    """One worker of the campaign, in its process: its AFL++ instance NAME-<index + 1> in the sync dir (syncdir.py),
    whose loop sync (`sync`) also keeps the campaign's board and crash claims, and what it tells the supervisor at
    the end (`finish`)."""

    def __init__(self, index: int, jobs: int, board: Board, scratch: Path, base: str, *, seed: int | None,
                 max_execs: int | None) -> None:
        self.index = index
        self.jobs = jobs
        self.seed = seed
        self.board = board
        self.scratch = scratch
        self.name = f"{base}-{index + 1}"
        self.max_execs = max_execs
        self.loop_sync: _WorkerSync | None = None

    def sync(self, instance: InstanceDir) -> _WorkerSync:
        """The loop's CampaignSync for this worker's instance."""
        self.loop_sync = _WorkerSync(instance, self)
        # From here on the supervisor's SIGTERM ends the loop at its next look at the clock (within 32 inputs), so
        # the instance gets its last crashes' ids and numbers (_WorkerSync.finish puts the KeyboardInterrupt back).
        signal.signal(signal.SIGTERM, self.loop_sync.stop_soon)
        return self.loop_sync

    def finish(self, st: Stats, hit: Sequence[int]) -> None:
        """The worker's final numbers, for the supervisor (atomically: it reads the file once the worker is gone)."""
        ls = self.loop_sync
        assert ls is not None
        inst = ls.instance
        report = {"execs": st.execs, "ok": st.ok, "crashes": st.crashes, "unique_crashes": st.unique_crashes,
                  "hangs": st.hangs, "rejected": st.rejected, "corpus": st.corpus, "seconds": st.elapsed_s,
                  "start": ls.start, "reset_s": st.reset_s, "first_crash_s": st.first_crash_s,
                  "crash_files": st.crash_files, "blocks_total": st.blocks_total, "blocks": sorted(hit),
                  "names": sorted(inst.known), "added": inst.found, "imported": ls.ran_imports,
                  "imported_new": inst.imported, "seed": self.seed, "name": self.name}
        _write_report(self.scratch, self.index, report)

    def fail(self, line: str) -> None:
        _write_report(self.scratch, self.index, {"error": line})


class _WorkerSync(InstanceSync):
    """InstanceSync plus the campaign: live numbers up to the board, its stop word and --execs down; a crash saved
    by the worker that claims its signature first (O_EXCL in the campaign's scratch directory), so one bug found by
    two workers is one file."""

    def __init__(self, instance: InstanceDir, worker: Worker) -> None:
        super().__init__(instance)
        self.worker = worker

    def begin(self, start: float, corpus: Sequence[bytes]) -> None:
        super().begin(start, corpus)
        self.worker.board.put(self.worker.index, {"state": FUZZING, "start_ns": int(start * 1e9)})

    def tick(self, st: Stats, now: float) -> list[bytes] | None:
        w = self.worker
        w.board.put(w.index, {"state": FUZZING, "start_ns": int(self.start * 1e9), "execs": st.execs,
                              "ok": st.ok, "crashes": st.crashes, "unique_crashes": st.unique_crashes,
                              "hangs": st.hangs, "rejected": st.rejected, "corpus": st.corpus,
                              "blocks_hit": st.blocks_hit, "blocks_total": st.blocks_total,
                              "imported": self.ran_imports, "last_find": int(self.instance.last_find)})
        if w.board.stopped():
            return None
        if w.max_execs is not None and w.board.total_execs() >= w.max_execs:
            return None
        return super().tick(st, now)

    def claim(self, signature: tuple[str, str, int | None]) -> bool:
        path = self.worker.scratch / f"crash-{hashlib.sha1(repr(signature).encode()).hexdigest()}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        return True

    def crashed(self) -> None:
        self.worker.board.stop()

    def finish(self, st: Stats) -> None:
        try:
            super().finish(st)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN if self.stopping else _interrupt_once)


def _write_report(scratch: Path, index: int, report: dict[str, Any]) -> None:
    tmp = scratch / f".worker-{index}"
    tmp.write_text(json.dumps(report))
    os.replace(tmp, scratch / f"worker-{index}.json")


# --- the supervisor -----------------------------------------------------------------------------------------------

def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _interrupt_once(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)       # the cleanup that follows is not to be interrupted again
    raise KeyboardInterrupt


def _set_pdeathsig(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, ctypes.c_ulong(sig), 0, 0, 0) != 0:      # PR_SET_PDEATHSIG
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _worker_main(index: int, make: Callable[[int], Worker], campaign: Callable[[Worker], int],
                 supervisor: int, mask: set[int | signal.Signals], scratch: Path) -> NoReturn:
    """A forked worker: run the campaign, report, and leave with os._exit (never back into the supervisor's
    callers)."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _interrupt_once)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _set_pdeathsig(signal.SIGTERM)
        if os.getppid() != supervisor:          # it died before prctl took effect
            raise KeyboardInterrupt
        worker = make(index)
        code = campaign(worker)
        if code != 0:
            worker.fail(f"vmfork fuzz: worker {index} ended with exit status {code}")
    except KeyboardInterrupt:
        code = 130
    except BaseException as e:      # whatever it is, the supervisor gets its one line
        code = 1
        line = user_error_line(e)
        if line is None:
            traceback.print_exc()
            line = f"vmfork: error: {type(e).__name__}: {e}"
        with contextlib.suppress(BaseException):
            _write_report(scratch, index, {"error": line})
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def run_jobs(args: argparse.Namespace, campaign: Callable[[Worker], int]) -> int:
    """Run `campaign` (one process's campaign, given its Worker) in args.jobs forked workers, show their combined
    progress, and print the campaign's summary (the one-process summary's keys, plus `jobs` and `workers`)."""
    jobs = int(args.jobs)
    out = Path(args.out)
    base = args.name or DEFAULT_NAME
    created = not out.exists()
    scratch = out / f".{base}.jobs"     # a dot entry: AFL++ and the instances' imports skip it
    shutil.rmtree(scratch, ignore_errors=True)      # what a campaign killed outright left
    try:
        scratch.mkdir(parents=True)
    except OSError as e:
        raise FuzzError(f"--out {out}: {e.strerror or e}") from None
    board = Board(jobs)

    def make(index: int) -> Worker:
        return Worker(index, jobs, board, scratch, base, seed=None if args.seed is None else args.seed + index,
                      max_execs=args.execs)

    pids: dict[int, int] = {}
    codes: dict[int, int] = {}
    shown = False
    done = False
    supervisor = os.getpid()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        for index in range(jobs):
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            try:
                pid = os.fork()
                if pid == 0:
                    _worker_main(index, make, campaign, supervisor, mask, scratch)
                pids[index] = pid
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        view = None if args.quiet else LiveView.open(sys.stderr, f"{base}-1..{jobs} in {out}")
        try:
            shown = _supervise(pids, codes, board, None if args.quiet else view or sys.stderr, names=base)
        finally:
            if view is not None:
                view.close()
                shown = False
        done = all(code == 0 for code in codes.values())
    finally:
        try:
            _end(pids, codes)
        finally:
            signal.signal(signal.SIGTERM, previous)
            reports = _reports(scratch, jobs)
            shutil.rmtree(scratch, ignore_errors=True)
            started = any(board.get(i)["state"] == FUZZING for i in range(jobs))
            board.close()
            if created and not done and not started:    # a campaign that failed before it fuzzed leaves no OUT
                shutil.rmtree(out, ignore_errors=True)
    failed = [i for i in sorted(codes) if codes[i] != 0]
    if failed:
        # The workers' own error lines, each once (all of them fail alike on a missing --corpus, say); the others
        # were stopped because of them.
        errors: dict[str, list[int]] = {}
        for i in failed:
            error = reports.get(i, {}).get("error")
            if error:
                errors.setdefault(str(error), []).append(i)
        if not errors:
            errors[f"vmfork fuzz: worker {failed[0]} ended with exit status {codes[failed[0]]}"] = [failed[0]]
        if shown:
            print(file=sys.stderr)
        for line, which in errors.items():
            print(f"{line} (worker{'s' if len(which) > 1 else ''} {', '.join(map(str, which))} of {jobs})",
                  file=sys.stderr)
        first = min(i for which in errors.values() for i in which)
        return codes[first] if codes[first] > 0 else 1
    total = summary([reports[i] for i in range(jobs)])
    if shown:                   # the status line's last word: the workers' final numbers
        st = Stats(execs=total["execs"], crashes=total["crashes"], unique_crashes=total["unique_crashes"],
                   hangs=total["hangs"], corpus=total["corpus"], blocks_hit=total["blocks_hit"],
                   blocks_total=total["blocks_total"], elapsed_s=total["seconds"])
        print(f"\r{st.line()}  {jobs} jobs", file=sys.stderr, flush=True)
    print(json.dumps(total, indent=2))
    return 0


def _supervise(pids: dict[int, int], codes: dict[int, int], board: Board, status: Any, names: str = "") -> bool:
    """Until every worker has ended: reap them and show the combined progress (True if it did: a status line on
    `status`, a stream, or a LiveView's panel with a row per worker); return early when one fails (then _end stops
    the others)."""
    next_status = time.monotonic() + STATUS_S
    line = ""
    rates = Rates()
    while len(codes) < len(pids):
        for index, pid in pids.items():
            if index in codes:
                continue
            got, wstatus = os.waitpid(pid, os.WNOHANG)
            if got:
                codes[index] = os.waitstatus_to_exitcode(wstatus)
                if codes[index] != 0:
                    return bool(line)
        now = time.monotonic()
        if isinstance(status, LiveView) and now >= next_status:
            total, rows = rates.numbers(board, now, names)
            if total is not None:
                status.update(total, rows)
            next_status = now + STATUS_S
        elif status is not None and now >= next_status:
            line = live_line(board, now)
            if line:
                status.write("\r" + line)
                status.flush()
            next_status = now + STATUS_S
        time.sleep(0.05)
    return bool(line)


def _end(pids: dict[int, int], codes: dict[int, int]) -> None:
    """Stop the workers still running (SIGTERM: their cleanup runs) and wait for them; SIGKILL after GRACE_S."""
    alive = {i: pid for i, pid in pids.items() if i not in codes}
    for pid in alive.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    killed = False
    while alive:
        for index, pid in list(alive.items()):
            try:
                got, wstatus = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, wstatus = pid, 0
            if got:
                codes.setdefault(index, os.waitstatus_to_exitcode(wstatus))
                del alive[index]
        if alive and not killed and time.monotonic() > deadline:
            for pid in alive.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed = True
        if alive:
            try:
                time.sleep(0.02)
            except KeyboardInterrupt:
                continue                # a second Ctrl-C: still wait for them (they are already stopping)


def _reports(scratch: Path, jobs: int) -> dict[int, dict[str, Any]]:
    reports: dict[int, dict[str, Any]] = {}
    for i in range(jobs):
        with contextlib.suppress(OSError, ValueError):
            reports[i] = json.loads((scratch / f"worker-{i}.json").read_text())
    return reports


class Rates:
    """The panel's numbers from the board: each worker's execs/s over the last status interval, and the times of
    the last find and crash (when its corpus or unique crashes last grew)."""

    def __init__(self) -> None:
        self.last: dict[int, tuple[float, int]] = {}
        self.crash: dict[int, tuple[int, float]] = {}

    def numbers(self, board: Board, now: float, base: str) -> tuple[Numbers | None, list[Numbers]]:
        rows: list[Numbers] = []
        wall = time.time()
        for i in range(board.workers):
            s = board.get(i)
            if s["state"] != FUZZING:
                continue
            seconds = max(0.0, now - s["start_ns"] / 1e9)
            prev = self.last.get(i)
            rate = (s["execs"] - prev[1]) / (now - prev[0]) if prev and now > prev[0] else \
                (s["execs"] / seconds if seconds > 0 else 0.0)
            self.last[i] = (now, s["execs"])
            seen = self.crash.get(i, (0, 0.0))
            if s["unique_crashes"] > seen[0]:
                seen = (s["unique_crashes"], wall)
                self.crash[i] = seen
            rows.append(Numbers(f"{base}-{i + 1}", seconds, s["execs"], rate, s["corpus"], s["blocks_hit"],
                                s["blocks_total"], s["crashes"], s["unique_crashes"], s["hangs"],
                                float(s["last_find"]) or None, seen[1] or None))
        if not rows:
            return None, rows
        finds = [r.last_find for r in rows if r.last_find]
        crashes = [r.last_crash for r in rows if r.last_crash]
        total = Numbers("all", max(r.seconds for r in rows), sum(r.execs for r in rows),
                        sum(r.execs_per_s for r in rows), max(r.corpus for r in rows),
                        max(r.blocks_hit for r in rows), max(r.blocks_total for r in rows),
                        sum(r.crashes for r in rows), sum(r.unique_crashes for r in rows), sum(r.hangs for r in rows),
                        max(finds) if finds else None, max(crashes) if crashes else None)
        return total, rows


def live_line(board: Board, now: float) -> str:
    """The one-process status line, over all workers: counters summed; corpus and coverage the largest worker's
    (their union is in the summary)."""
    slots = [board.get(i) for i in range(board.workers)]
    started = [s for s in slots if s["state"] == FUZZING]
    if not started:
        return ""
    st = Stats(execs=sum(s["execs"] for s in slots), ok=sum(s["ok"] for s in slots),
               crashes=sum(s["crashes"] for s in slots), hangs=sum(s["hangs"] for s in slots),
               unique_crashes=sum(s["unique_crashes"] for s in slots), corpus=max(s["corpus"] for s in slots),
               blocks_hit=max(s["blocks_hit"] for s in slots), blocks_total=max(s["blocks_total"] for s in slots),
               elapsed_s=max(0.0, now - min(s["start_ns"] for s in started) / 1e9))
    return f"{st.line()}  {len(started)}/{board.workers} jobs"


def summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The one-process summary's keys for the whole campaign, then `jobs` and each worker's own numbers. `seconds`
    runs from the first worker's start to the last one's end; crashes, hangs and inputs are summed; unique crashes
    and crash files are the workers' saved ones (each signature saved once); corpus and blocks are the union."""
    start = min(r["start"] for r in reports)
    end = max(r["start"] + r["seconds"] for r in reports)
    seconds = max(end - start, 1e-9)
    execs = sum(r["execs"] for r in reports)
    busy = sum(r["seconds"] for r in reports)
    firsts = [r["start"] + r["first_crash_s"] - start for r in reports if r["first_crash_s"] is not None]
    blocks: set[int] = set()
    names: set[str] = set()
    for r in reports:
        blocks.update(r["blocks"])
        names.update(r["names"])
    return {"execs": execs, "execs_per_s": round(execs / seconds, 1), "ok": sum(r["ok"] for r in reports),
            "crashes": sum(r["crashes"] for r in reports),
            "unique_crashes": sum(r["unique_crashes"] for r in reports), "hangs": sum(r["hangs"] for r in reports),
            "rejected": sum(r["rejected"] for r in reports), "corpus": len(names), "blocks_hit": len(blocks),
            "blocks_total": reports[0]["blocks_total"], "seconds": round(seconds, 3),
            "reset_share": round(sum(r["reset_s"] for r in reports) / busy, 3) if busy > 0 else 0.0,
            "first_crash_s": round(min(firsts), 3) if firsts else None,
            "crash_files": [f for r in reports for f in r["crash_files"]], "jobs": len(reports),
            "workers": [{"worker": i, "name": r["name"], "seed": r["seed"], "execs": r["execs"],
                         "execs_per_s": round(r["execs"] / r["seconds"], 1) if r["seconds"] > 0 else 0.0,
                         "crashes": r["crashes"], "unique_crashes": r["unique_crashes"], "corpus": r["corpus"],
                         "added": r["added"], "imported": r["imported"], "imported_new": r["imported_new"]}
                        for i, r in enumerate(reports)]}
