"""The fuzzing loop, KF/x style: parent (paused at its ready marker) -> sink fork (crash breakpoints, coverage
breakpoints) -> fuzz fork; per input: reset, write the input, run to the end marker, a sink, a fault or the time
budget, classify.

    parent.run(timeout=10)                    # -> StopEvent("harness-start"): RDI/RSI = input buffer and size
    fz = Fuzzer(parent, sinks=[0x10a4d5], coverage=[(start, end)], budget_s=0.05)
    fz.execute(b"FUZZB\\x01")                  # Result(outcome="crash", kind="vector", vector=14, rip=...)
    stats = fz.fuzz([b"FUZZA\\x00"], seconds=10, rng_seed=1, out_dir="out")
    fz.close()

Outcomes: "ok" (end marker, or an exit status below 0x80), "crash" (a sink breakpoint; an exit status >= 0x80,
the test guests' convention for "exception vector = status & 0x7f"; a triple fault or another fatal stop), "hang"
(the time budget ran out), "rejected" (an input larger than the buffer with `oversize="reject"`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import re
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..errors import VmforkError
from ..kvm import structs as s
from ..vmi import Debugger, Hit, debugger
from ..vmi.symbols import SymbolTable
from .coverage import Coverage
from .mutate import Mutator

__all__ = ["FuzzError", "Fuzzer", "Result", "Stats"]

LENGTH_PREFIX = 8           # u64 little-endian length before the bytes, as the test guests expect
_EXCEPTION = re.compile(rb"EXCEPTION vec=(\d+) rip=0x([0-9a-f]+) err=0x([0-9a-f]+)")


class FuzzError(VmforkError):
    pass


@dataclass
class Result:
    """What one input did. `rip` is the faulting instruction (vector crashes: from the guest's `EXCEPTION vec=..
    rip=..` report on the console, else the vCPU's RIP at the stop), the sink's address, or where a hang was
    stopped. `registers`: at a sink, the interrupted code's; for a vector crash or a triple fault, the vCPU's at the
    stop (for the test guests: inside the exception report, after the fault)."""

    outcome: str                        # ok, crash, hang, rejected
    kind: str                           # end, exit, vector, sink, triple-fault, <stop reason>, timeout, oversize
    status: int | None = None
    vector: int | None = None
    sink: str | None = None
    rip: int | None = None
    error_code: int | None = None
    registers: dict[str, int] | None = None
    detail: str = ""
    new_blocks: list[int] = field(default_factory=list)

    @property
    def signature(self) -> tuple[str, str, int | None]:
        """Crashes with the same signature are the same bug (for saving one input per crash)."""
        what = self.sink or (str(self.vector) if self.vector is not None else "")
        return (self.kind, what, self.rip)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["new_blocks"] = len(self.new_blocks)
        if self.rip is not None:
            d["rip_hex"] = f"{self.rip:#x}"
        return d


_OK = Result("ok", "end", 2)


@dataclass
class Stats:
    execs: int = 0
    ok: int = 0
    crashes: int = 0
    hangs: int = 0
    rejected: int = 0
    unique_crashes: int = 0
    corpus: int = 0
    blocks_hit: int = 0
    blocks_total: int = 0
    elapsed_s: float = 0.0
    reset_s: float = 0.0
    first_crash_s: float | None = None
    first_crash_execs: int | None = None
    crash_files: list[str] = field(default_factory=list)

    @property
    def execs_per_s(self) -> float:
        return self.execs / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def reset_share(self) -> float:
        return self.reset_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        cov = f"  cov {self.blocks_hit}/{self.blocks_total}" if self.blocks_total else ""
        return (f"[{self.elapsed_s:7.1f}s] execs {self.execs}  {self.execs_per_s:6.0f}/s  corpus {self.corpus}"
                f"{cov}  crashes {self.crashes} ({self.unique_crashes} unique)  hangs {self.hangs}")


def _registers(regs: s.Regs) -> dict[str, int]:
    return {name: int(getattr(regs, name)) for name in s.GPR_NAMES}


class Fuzzer:
    """Fuzzes a parent VM paused at its ready marker. `input_addr`/`input_size` default to RDI/RSI (the harness
    port's convention). `sinks`: addresses or symbols (with `symbols`) that are crashes when reached.
    `coverage`: a `Coverage`, or (start, end) code ranges to cover by basic blocks. `budget_s`: time per input.
    `oversize`: "truncate" or "reject" an input that does not fit the buffer (with its length prefix).
    `block_hook`: makes the coverage breakpoints persistent (every hit of every block, in order, is passed to it;
    each hit costs two exits): for AFL-style edge maps. Without it they are one-shot."""

    def __init__(self, parent: Any, input_addr: int | None = None, input_size: int | None = None, *,
                 sinks: Sequence[int | str] = (), budget_s: float = 0.05,
                 coverage: Coverage | Iterable[tuple[int, int]] | None = None, oversize: str = "truncate",
                 symbols: SymbolTable | None = None, length_prefix: bool = True,
                 block_hook: Callable[[int], object] | None = None) -> None:
        if oversize not in ("truncate", "reject"):
            raise FuzzError(f"oversize must be 'truncate' or 'reject', not {oversize!r}")
        if parent.state != "paused":
            raise FuzzError(f"{parent.name} must be paused at its ready marker (it is {parent.state})")
        regs = parent.vcpus[0].get_regs()
        self.parent = parent
        self.input_addr = int(regs.rdi if input_addr is None else input_addr)
        self.input_size = int(regs.rsi if input_size is None else input_size)
        self.prefix = LENGTH_PREFIX if length_prefix else 0
        self.capacity = self.input_size - self.prefix
        if self.capacity <= 0:
            raise FuzzError(f"an input buffer of {self.input_size} bytes has no room for input")
        self.budget_s = budget_s
        self.oversize = oversize
        self.block_hook = block_hook
        if coverage is not None and not isinstance(coverage, Coverage):
            coverage = Coverage.of_ranges(parent, list(coverage))
        self.coverage = coverage
        self._buf = bytearray(self.input_size)
        self._view = memoryview(self._buf)
        self._new: list[int] = []               # blocks first reached by the current input
        self._covered: list[int] = []           # blocks to remove from the sink at the next rebuild
        self._sink_hit: Hit | None = None
        self._stale = False
        self.reset_s = 0.0
        self.kept: list[Any] = []
        self.last_crash: Result | None = None
        self.sink = parent.fork(name=f"{parent.name}-sink")
        self.sink_dbg: Debugger | None = None
        self.sinks: dict[int, str] = {}
        try:
            if sinks or (coverage is not None and coverage.blocks):
                dbg = self.sink_dbg = debugger(self.sink, symbols=symbols)
                for where in sinks:
                    bp = dbg.add_breakpoint(where, self._on_sink, owner="sink")
                    self.sinks[bp.address] = bp.label or f"{bp.address:#x}"
                if coverage is not None:
                    for block in coverage.remaining:
                        if block not in self.sinks:
                            dbg.add_breakpoint(block, self._on_block, owner="coverage")
            self.fork: Any = None
            self._make_fork()
        except BaseException:
            self.sink.destroy(tree=True)
            raise

    # --- forks ------------------------------------------------------------------------------------------------

    def _make_fork(self) -> None:
        if self.fork is not None:
            self.fork.destroy()
        dbg = self.sink_dbg
        if dbg is not None and self._covered and not self.sink.children:     # kept forks freeze the sink
            for block in self._covered:
                bp = dbg.find(block)
                if bp is not None and bp.owner == "coverage":
                    dbg.remove_breakpoint(bp)
        self._covered.clear()
        self.fork = self.sink.fork(name=f"{self.parent.name}-fuzz")
        self.fork_dbg: Debugger | None = None
        if dbg is not None and dbg.breakpoints:
            self.fork_dbg = debugger(self.fork)
            self._run: Callable[..., Any] = self.fork_dbg.run
        else:
            self._run = self.fork.run
        self._stale = False

    def _on_block(self, hit: Hit) -> bool:
        hook = self.block_hook
        if hook is not None:
            hook(hit.address)
            return True
        self._new.append(hit.address)
        dbg = hit.debugger
        if hit.breakpoint is not None and len(dbg.breakpoints) > 1:
            dbg.remove_breakpoint(hit.breakpoint)       # one-shot; the last one goes when the fork is rebuilt
        return True

    def _on_sink(self, hit: Hit) -> bool:
        self._sink_hit = hit
        return False

    # --- one input --------------------------------------------------------------------------------------------

    def execute(self, data: bytes) -> Result:
        """Run one input in the fuzz fork (reset first) and say what it did."""
        return self._exec(data) or _OK

    def _exec(self, data: bytes) -> Result | None:
        """None for the common case: the end marker and nothing new covered."""
        if self._stale:
            self._make_fork()
        n = len(data)
        if n > self.capacity:
            if self.oversize == "reject":
                return Result("rejected", "oversize", detail=f"{n} bytes > {self.capacity}")
            n = self.capacity
            data = data[:n]
        fork = self.fork
        t0 = time.perf_counter()
        fork.reset()
        self.reset_s += time.perf_counter() - t0
        view = self._view
        if self.prefix:
            struct.pack_into("<Q", self._buf, 0, n)
        view[self.prefix:self.prefix + n] = data
        fork.memory.write(self.input_addr, view[:self.prefix + n])
        ev = self._run(timeout=self.budget_s)
        if ev.reason == "harness-end" and not self._new:
            return None
        return self._classify(ev)

    def _classify(self, ev: Any) -> Result:
        reason = ev.reason
        new = self._new
        if new:
            self._new = []
            self._covered.extend(new)
            if self.coverage is not None:
                self.coverage.hit.update(new)
            self._stale = True
        if reason == "harness-end":
            return Result("ok", "end", ev.status, new_blocks=new)
        fork = self.fork
        if reason == "exit" and isinstance(ev.status, int) and ev.status < 0x80:
            return Result("ok", "exit", ev.status, new_blocks=new)
        if reason == "harness-start":
            return Result("ok", "harness-start", ev.status, new_blocks=new)
        if reason == "timeout":
            rip = fork.vcpus[0].get_regs().rip
            return Result("hang", "timeout", rip=int(rip), detail=f"no end marker within {self.budget_s}s",
                          new_blocks=new)
        if reason == "debugger-error":
            raise FuzzError(f"the debugger failed in {fork.name}: {ev.detail}")
        self._stale = True      # a crashed fork (or one stopped at a sink) is replaced by a fresh one
        if reason == "breakpoint" and self._sink_hit is not None:
            hit, self._sink_hit = self._sink_hit, None
            return Result("crash", "sink", sink=self.sinks.get(hit.address, f"{hit.address:#x}"), rip=hit.address,
                          registers=_registers(hit.regs), detail=ev.detail, new_blocks=new)
        regs = _registers(fork.vcpus[0].get_regs())
        if reason == "exit" and isinstance(ev.status, int):
            vector = ev.status & 0x7F
            rip, err = regs["rip"], None
            tail = fork.device("serial0").output()[-256:]
            found = list(_EXCEPTION.finditer(tail))
            if found:
                m = found[-1]
                vector, rip, err = int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16)
            return Result("crash", "vector", ev.status, vector=vector, rip=rip, error_code=err, registers=regs,
                          detail=f"exception vector {vector}", new_blocks=new)
        kind = "triple-fault" if reason in ("crash", "reset") else reason
        return Result("crash", kind, ev.status, rip=regs["rip"], registers=regs, detail=ev.detail or reason,
                      new_blocks=new)

    def keep_fork(self) -> Any:
        """Keep the current fuzz fork as it is (e.g. paused at a crash) and stop using it. The sink can no longer
        change (its breakpoints are frozen) while kept forks live."""
        kept = self.fork
        self.kept.append(kept)
        self.fork = None
        self.fork_dbg = None
        self._covered.clear()
        self.fork = self.sink.fork(name=f"{self.parent.name}-fuzz-{len(self.kept)}")
        self._run = debugger(self.fork).run if self.sink_dbg is not None and self.sink_dbg.breakpoints \
            else self.fork.run
        self._stale = False
        return kept

    # --- a campaign -------------------------------------------------------------------------------------------

    def fuzz(self, seeds: Sequence[bytes] = (), *, seconds: float = 10.0, rng_seed: int | None = None,
             max_execs: int | None = None, stop_on_crash: bool = False, out_dir: str | os.PathLike[str] | None = None,
             status: TextIO | None = None, status_interval: float = 0.5, max_len: int = 4096,
             dictionary: Sequence[bytes] = (), keep: bool = False) -> Stats:
        """Mutate the corpus for `seconds` (or `max_execs`). Inputs that reach new blocks join the corpus; each
        distinct crash is saved in OUT/crashes/ with a JSON sidecar; a live status line goes to `status`."""
        rng = random.Random(rng_seed)
        mutator = Mutator(rng, max_len=min(max_len, self.capacity), dictionary=dictionary)
        corpus: list[bytes] = [bytes(x) for x in seeds] or [b"\0" * 8]
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            (out / "crashes").mkdir(parents=True, exist_ok=True)
            (out / "corpus").mkdir(parents=True, exist_ok=True)
            (out / "hangs").mkdir(parents=True, exist_ok=True)
        st = Stats(blocks_total=len(self.coverage.blocks) if self.coverage else 0)
        seen: set[tuple[str, str, int | None]] = set()
        self.reset_s = 0.0
        gc.collect()
        gc.freeze()
        start = time.monotonic()
        deadline = start + seconds
        next_status = start + status_interval
        execute = self._exec
        mutate = mutator.mutate
        pending = corpus[::-1]          # the seeds run first, unchanged, in order
        stop = False
        countdown = 0                   # inputs until the next look at the clock (every 32, and after slow ones)
        while not stop:
            if pending:
                data = pending.pop()
            else:
                countdown -= 1
                if countdown <= 0:
                    countdown = 32
                    now = time.monotonic()
                    if now >= deadline or (max_execs is not None and st.execs >= max_execs):
                        break
                    if status is not None and now >= next_status:
                        st.elapsed_s = now - start
                        st.corpus = len(corpus)
                        if self.coverage is not None:
                            st.blocks_hit = len(self.coverage.hit)
                        status.write("\r" + st.line())
                        status.flush()
                        next_status = now + status_interval
                data = mutate(corpus[rng.randrange(len(corpus))], corpus)
            res = execute(data)
            st.execs += 1
            if res is None:
                st.ok += 1
                continue
            countdown = 0
            if res.new_blocks and res.outcome == "ok" and data not in corpus:
                corpus.append(data)
                if out is not None:
                    (out / "corpus" / hashlib.sha1(data).hexdigest()).write_bytes(data)
            o = res.outcome
            if o == "ok":
                st.ok += 1
            elif o == "hang":
                st.hangs += 1
                if out is not None:
                    (out / "hangs" / hashlib.sha1(data).hexdigest()).write_bytes(data)
            elif o == "rejected":
                st.rejected += 1
            else:
                st.crashes += 1
                self.last_crash = res
                if st.first_crash_s is None:
                    st.first_crash_s = time.monotonic() - start
                    st.first_crash_execs = st.execs
                if res.signature not in seen:
                    seen.add(res.signature)
                    st.unique_crashes += 1
                    if out is not None:
                        st.crash_files.append(str(save_crash(out / "crashes", data, res)))
                if keep:
                    self.keep_fork()
                    stop = True
                elif stop_on_crash:
                    stop = True
        gc.unfreeze()
        st.elapsed_s = time.monotonic() - start
        st.reset_s = self.reset_s
        st.corpus = len(corpus)
        if self.coverage is not None:
            st.blocks_hit = len(self.coverage.hit)
        if status is not None:
            status.write("\r" + st.line() + "\n")
            status.flush()
        return st

    def close(self) -> None:
        """Destroy the fuzz fork, any kept forks and the sink (the parent stays)."""
        if self.sink.state != "destroyed":
            self.sink.destroy(tree=True)

    def __enter__(self) -> Fuzzer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_crash(directory: Path, data: bytes, res: Result) -> Path:
    """OUT/crashes/<kind>-<vector or sink>-<rip>-<sha1>.bin and a .json sidecar with the outcome."""
    what = res.sink or (str(res.vector) if res.vector is not None else "")
    rip = f"{res.rip:x}" if res.rip is not None else "none"
    name = f"{res.kind}-{what}-{rip}-{hashlib.sha1(data).hexdigest()[:12]}".replace("/", "_")
    path = directory / f"{name}.bin"
    path.write_bytes(data)
    path.with_suffix(".json").write_text(json.dumps(res.to_json(), indent=2) + "\n")
    return path


def status_stream() -> TextIO:
    return sys.stderr
