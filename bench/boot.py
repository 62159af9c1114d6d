#!/usr/bin/env python3
"""Boot and exit-loop benchmark: vmfork side by side with `qemu-system-x86_64 -accel kvm`, same guest file, same run.

    .venv/bin/python bench/boot.py              # table on stdout, progress on stderr
    .venv/bin/python bench/boot.py --markdown   # a section for docs/benchmarks.md

What is measured (every measurement once per round, rounds interleaved vmfork / QEMU / vmfork / QEMU ...; medians):

Boot of the `demo` program to its `vmfork-guest: ready` line.
  - vmfork, whole process: a fresh `python -c` process (import vmfork, VM.create, load_kernel, run) whose UART writes
    its output to its stdout pipe (`console_log`); from spawning it to the ready line arriving on the pipe, and to the
    process being gone.
  - vmfork, in-process: from `VM.create` to the ready line (a serial listener) and to the ready-marker stop.
  - QEMU, whole process (`-serial stdio` into a pipe): from spawning it to the ready line arriving, and to the process
    being gone. QEMU has no harness device at 0xf6: the marker write is ignored and the guest goes on to its exit.
    Two QEMU machines: the default `pc` (SeaBIOS runs first) and `microvm` (qboot, QEMU's minimal-firmware machine).

Exit loop: `det N` prints N lines after the ready marker, one `out` to 0x3f8 (one VM exit) per byte.
  - vmfork, in-process: from the marker stop to the exit event, exits counted by `vm.exits`; with no console log,
    and with the console log in a file, once with the UART's batched log writes (a write() per line, the default)
    and once with a write() per byte (`flush_delay = 0`, the old behaviour), side by side in every round.
  - vmfork and QEMU through a pipe, the same method for both: bytes between the end of the first and the end of the
    last `det` line, divided by the time between their arrivals on the console pipe. vmfork runs batched and per
    byte, side by side.

All timestamps are CLOCK_MONOTONIC (`time.monotonic()`), in this process and in the vmfork child alike, so a child's
own timestamps can be compared with the spawn time recorded here.
"""

from __future__ import annotations

import argparse
import atexit
import bisect
import contextlib
import datetime
import functools
import json
import os
import platform
import re
import resource
import selectors
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DEFAULT_KERNEL = ROOT / "build" / "guests" / "testguest-pvh.elf"
READY_LINE = b"vmfork-guest: ready\n"
DEMO_RESULT = re.compile(rb"result: len=0 fnv=cbf29ce484222325 primes=904\n")
DEMO_STATUS = 0x25                  # the demo program's exit status with an empty input buffer
DET_LINE = re.compile(rb"det (\d+) [0-9a-f]{16}\n")
CHILD_TAG = "VMFORK-BENCH "
QEMU_MACHINES: dict[str, tuple[str, list[str]]] = {
    "pc": ("QEMU pc", []),                                   # the default machine: SeaBIOS, then the PVH option ROM
    "microvm": ("QEMU microvm", ["-machine", "microvm"]),    # qboot, no PCI, no ACPI
}

# The whole-process vmfork run. Arguments: kernel, MiB, command line, timeout. Console bytes go to stdout (like QEMU's
# -serial stdio); a JSON report of the child's own timestamps goes to stderr after CHILD_TAG.
CHILD_SCRIPT = r"""
import time
t_start = time.monotonic()
import json, resource, sys
from vmfork.fork import VM
t_import = time.monotonic()
kernel, mib, cmdline, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
vm = VM.create(memory_mib=mib, name="bench", console_log="/dev/stdout")
vm.device("serial0").flush_delay = float(sys.argv[5])     # 0: a write() per byte
t_create = time.monotonic()
vm.load_kernel(kernel, cmdline=cmdline)
t_load = time.monotonic()
ev = vm.run(timeout=timeout)
t_marker = time.monotonic()
exits_marker = vm.exits
reason, status = ev.reason, ev.status
r0 = resource.getrusage(resource.RUSAGE_SELF)
if ev.reason == "harness-start":
    ev = vm.run(timeout=timeout)
    reason, status = ev.reason, ev.status
t_end = time.monotonic()
r1 = resource.getrusage(resource.RUSAGE_SELF)
exits_end = vm.exits
vm.destroy()
t_destroy = time.monotonic()
print("TAG" + json.dumps(dict(t_start=t_start, t_import=t_import, t_create=t_create, t_load=t_load,
      t_marker=t_marker, t_end=t_end, t_destroy=t_destroy, exits_marker=exits_marker, exits_end=exits_end,
      reason=reason, status=status, user_after_marker=r1.ru_utime - r0.ru_utime,
      sys_after_marker=r1.ru_stime - r0.ru_stime)), file=sys.stderr, flush=True)
""".replace("TAG", CHILD_TAG)


class BenchError(Exception):
    """A measurement could not be taken; the message says why."""


# --- child processes --------------------------------------------------------------------------------------------

_live: set[subprocess.Popen[bytes]] = set()


def _kill_live() -> None:
    for proc in list(_live):
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        _live.discard(proc)


atexit.register(_kill_live)


@dataclass
class Capture:
    """A child process's stdout with the arrival time of every chunk, its exit and its CPU time."""

    start: float                         # just before the spawn
    data: bytes
    arrivals: list[float]                # arrival time of chunk i
    ends: list[int]                      # len(data) after chunk i
    end: float                           # when the process was reaped
    returncode: int
    utime: float
    stime: float
    stderr: str

    def time_at(self, offset: int) -> float:
        """When the first `offset` bytes had all arrived."""
        return self.arrivals[bisect.bisect_left(self.ends, offset)]

    def tail(self, n: int = 300) -> str:
        return self.data[-n:].decode(errors="replace")


def run_captured(argv: Sequence[str], *, what: str, timeout: float, env: dict[str, str] | None = None) -> Capture:
    """Run a process to its end, timestamping its stdout as it arrives; kill it after `timeout` seconds."""
    with tempfile.TemporaryFile() as err:
        start = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env)
        except OSError as e:
            raise BenchError(f"{what}: cannot start {argv[0]}: {e}") from e
        _live.add(proc)
        data = bytearray()
        arrivals: list[float] = []
        ends: list[int] = []
        try:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            os.set_blocking(fd, False)
            pidfd = os.pidfd_open(proc.pid)
            deadline = start + timeout
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ, "out")
                sel.register(pidfd, selectors.EVENT_READ, "pid")
                eof = reaped = False
                status, usage = 0, None
                while not (eof and reaped):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise BenchError(f"{what} did not finish within {timeout:g} s (killed); console so far: "
                                         f"{bytes(data[-300:]).decode(errors='replace')!r}")
                    for key, _ in sel.select(remaining):
                        if key.data == "out":
                            chunk = os.read(fd, 1 << 16)
                            now = time.monotonic()
                            if not chunk:
                                eof = True
                                sel.unregister(fd)
                                continue
                            data += chunk
                            arrivals.append(now)
                            ends.append(len(data))
                        else:
                            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                            if pid:
                                end = time.monotonic()
                                reaped = True
                                sel.unregister(pidfd)
                                proc.returncode = os.waitstatus_to_exitcode(status)
            os.close(pidfd)
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
            _live.discard(proc)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    assert usage is not None
    return Capture(start, bytes(data), arrivals, ends, end, proc.returncode, usage.ru_utime, usage.ru_stime, stderr)


def ready_offset(cap: Capture, what: str) -> int:
    i = cap.data.find(READY_LINE)
    if i < 0:
        raise BenchError(f"{what}: no {READY_LINE!r} on the console (exit {cap.returncode}); console: {cap.tail()!r};"
                         f" stderr: {cap.stderr.strip()[-300:]!r}")
    return i + len(READY_LINE)


def det_span(data: bytes, lines: int, what: str) -> tuple[int, int]:
    """Byte offsets of the end of the first and of the last `det` line, checking all `lines` lines are there."""
    found = list(DET_LINE.finditer(data))
    if len(found) != lines or [int(m.group(1)) for m in found] != list(range(lines)):
        raise BenchError(f"{what}: expected {lines} det lines, got {len(found)}; console tail: {data[-200:]!r}")
    return found[0].end(), found[-1].end()


# --- the measurements -------------------------------------------------------------------------------------------

Samples = defaultdict[str, list[float]]


@dataclass
class Config:
    kernel: Path
    qemu: str
    machines: list[str]
    rounds: int
    lines: int
    memory_mib: int
    timeout: float


def qemu_argv(cfg: Config, machine: str, cmdline: str) -> list[str]:
    return [cfg.qemu, "-accel", "kvm", *QEMU_MACHINES[machine][1], "-m", str(cfg.memory_mib),
            "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=1", "-kernel", str(cfg.kernel), "-append", cmdline]


def child_argv(cfg: Config, cmdline: str, *, batched: bool = True) -> list[str]:
    from vmfork.devices.serial import FLUSH_DELAY
    return [sys.executable, "-c", CHILD_SCRIPT, str(cfg.kernel), str(cfg.memory_mib), cmdline, str(cfg.timeout),
            str(FLUSH_DELAY if batched else 0)]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    return env


def child_report(cap: Capture, what: str) -> dict[str, Any]:
    for line in cap.stderr.splitlines():
        if line.startswith(CHILD_TAG):
            rep: dict[str, Any] = json.loads(line[len(CHILD_TAG):])
            return rep
    raise BenchError(f"{what} failed (exit {cap.returncode}): {cap.stderr.strip()[-600:] or cap.tail()!r}")


class Bench:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.s: Samples = defaultdict(list)
        self.det_reference: bytes | None = None    # the det lines every system must print identically
        self.facts: dict[str, int] = {}
        self.load_before = load_average()
        self.load_after = ""

    def add(self, key: str, value: float) -> None:
        self.s[key].append(value)

    def check_det(self, data: bytes, what: str) -> None:
        lines = b"".join(m.group(0) for m in DET_LINE.finditer(data))
        if self.det_reference is None:
            self.det_reference = lines
        elif lines != self.det_reference:
            raise BenchError(f"{what} printed different det lines than the first run (the program is deterministic)")

    # vmfork, in this process

    def vmfork_inproc_boot(self, *, record: bool = True) -> None:
        from vmfork.fork import VM
        ready_at: list[float] = []
        seen = bytearray()

        def listener(b: bytes) -> None:
            seen.extend(b)
            if not ready_at and b.endswith(b"\n") and seen.endswith(READY_LINE):   # batches end at newlines
                ready_at.append(time.monotonic())

        t0 = time.monotonic()
        vm = VM.create(memory_mib=self.cfg.memory_mib, name="bench-boot")
        try:
            t_create = time.monotonic()
            vm.device("serial0").add_listener(listener)
            vm.load_kernel(self.cfg.kernel, cmdline="demo")
            t_load = time.monotonic()
            ev = vm.run(timeout=self.cfg.timeout)
            t_marker = time.monotonic()
            if ev.reason != "harness-start" or not ready_at:
                raise BenchError(f"vmfork (in-process) demo did not reach its ready marker: {ev}; console: "
                                 f"{vm.device('serial0').output()[-300:]!r}")
            exits = vm.exits
            ev = vm.run(timeout=self.cfg.timeout)
            if ev.reason != "exit" or ev.status != DEMO_STATUS:
                raise BenchError(f"vmfork (in-process) demo ended with {ev}, expected exit status {DEMO_STATUS:#x}")
        finally:
            t_d = time.monotonic()
            vm.destroy()
            t_destroyed = time.monotonic()
        if record:
            self.add("vf.in.create", t_create - t0)
            self.add("vf.in.load", t_load - t_create)
            self.add("vf.in.ready", ready_at[0] - t0)
            self.add("vf.in.marker", t_marker - t0)
            self.add("vf.in.run", t_marker - t_load)
            self.add("vf.in.destroy", t_destroyed - t_d)
            self.facts["vf.exits_to_marker"] = exits

    def vmfork_inproc_det(self, log: str | None = None) -> None:
        """`log`: None (no console log), "batched" or "per-byte" (a console log file, flush_delay default or 0)."""
        from vmfork.fork import VM
        log_dir = tempfile.TemporaryDirectory(prefix="vmfork-bench-") if log else None
        log_path = os.path.join(log_dir.name, "console.log") if log_dir else None
        vm = VM.create(memory_mib=self.cfg.memory_mib, name="bench-det", console_log=log_path)
        if log == "per-byte":
            vm.device("serial0").flush_delay = 0
        try:
            vm.load_kernel(self.cfg.kernel, cmdline=f"det {self.cfg.lines}")
            ev = vm.run(timeout=self.cfg.timeout)
            if ev.reason != "harness-start":
                raise BenchError(f"vmfork (in-process) det did not reach its ready marker: {ev}")
            e0 = vm.exits
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.monotonic()
            ev = vm.run(timeout=self.cfg.timeout)
            t1 = time.monotonic()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            exits = vm.exits - e0
            if ev.reason != "exit" or ev.status != 0:
                raise BenchError(f"vmfork (in-process) det ended with {ev}, expected exit status 0")
            out = vm.device("serial0").output()
        finally:
            vm.destroy()
            logged = Path(log_path).read_bytes() if log_path else None
            if log_dir:
                log_dir.cleanup()
        what = f"vmfork (in-process{', console log ' + log if log else ''})"
        if logged is not None and logged != out:
            raise BenchError(f"{what}: the console log differs from the UART's output ({len(logged)} against "
                             f"{len(out)} bytes)")
        self.check_det(out, what)
        det_span(out, self.cfg.lines, what)
        key = {None: "vf.in", "batched": "vf.file", "per-byte": "vf.file1"}[log]
        self.add(f"{key}.rate", exits / (t1 - t0))
        self.add(f"{key}.user_per_exit", (r1.ru_utime - r0.ru_utime) / exits)
        self.add(f"{key}.sys_per_exit", (r1.ru_stime - r0.ru_stime) / exits)
        self.facts["vf.det_exits"] = exits

    # vmfork, a whole process

    def vmfork_proc_boot(self) -> None:
        what = "vmfork (whole process) demo"
        cap = run_captured(child_argv(self.cfg, "demo"), what=what, timeout=self.cfg.timeout + 30, env=child_env())
        rep = child_report(cap, what)
        if rep["reason"] != "exit" or rep["status"] != DEMO_STATUS or not DEMO_RESULT.search(cap.data):
            raise BenchError(f"{what} ended with {rep['reason']} {rep['status']}; console: {cap.tail()!r}")
        ready = cap.time_at(ready_offset(cap, what))
        self.add("vf.proc.ready", ready - cap.start)
        self.add("vf.proc.exit", cap.end - cap.start)
        self.add("vf.proc.interp", rep["t_start"] - cap.start)
        self.add("vf.proc.import", rep["t_import"] - rep["t_start"])
        self.add("vf.proc.create", rep["t_create"] - rep["t_import"])
        self.add("vf.proc.load", rep["t_load"] - rep["t_create"])
        self.add("vf.proc.run", rep["t_marker"] - rep["t_load"])
        self.add("vf.proc.after", cap.end - rep["t_marker"])
        self.add("vf.proc.user", cap.utime)
        self.add("vf.proc.sys", cap.stime)

    def vmfork_proc_det(self, batched: bool = True) -> None:
        what = f"vmfork (whole process, {'batched' if batched else 'per-byte'}) det"
        cap = run_captured(child_argv(self.cfg, f"det {self.cfg.lines}", batched=batched), what=what,
                           timeout=self.cfg.timeout * 2 + 30, env=child_env())
        rep = child_report(cap, what)
        if rep["reason"] != "exit" or rep["status"] != 0:
            raise BenchError(f"{what} ended with {rep['reason']} {rep['status']}; console: {cap.tail()!r}")
        self.check_det(cap.data, what)
        a, b = det_span(cap.data, self.cfg.lines, what)
        key = "vf.pipe" if batched else "vf.pipe1"
        self.add(f"{key}.rate", (b - a) / (cap.time_at(b) - cap.time_at(a)))
        exits = rep["exits_end"] - rep["exits_marker"]
        self.add(f"{key}.user_per_exit", rep["user_after_marker"] / exits)
        self.add(f"{key}.sys_per_exit", rep["sys_after_marker"] / exits)

    # QEMU

    def qemu_boot(self, machine: str) -> None:
        what = f"{QEMU_MACHINES[machine][0]} demo"
        cap = run_captured(qemu_argv(self.cfg, machine, "demo"), what=what, timeout=self.cfg.timeout + 60)
        ready = ready_offset(cap, what)
        if cap.returncode != (DEMO_STATUS << 1) | 1 or not DEMO_RESULT.search(cap.data):
            raise BenchError(f"{what}: exit code {cap.returncode}, expected {(DEMO_STATUS << 1) | 1}; console: "
                             f"{cap.tail()!r}; stderr: {cap.stderr.strip()[-300:]!r}")
        q = f"q.{machine}"
        self.add(f"{q}.first", cap.time_at(1) - cap.start)
        self.add(f"{q}.ready", cap.time_at(ready) - cap.start)
        self.add(f"{q}.exit", cap.end - cap.start)
        self.add(f"{q}.banner", cap.time_at(ready) - cap.time_at(1))
        self.add(f"{q}.after", cap.end - cap.time_at(ready))
        self.add(f"{q}.user", cap.utime)
        self.add(f"{q}.sys", cap.stime)
        self.facts["q.bytes_to_ready"] = ready

    def qemu_det(self, machine: str) -> None:
        what = f"{QEMU_MACHINES[machine][0]} det"
        cap = run_captured(qemu_argv(self.cfg, machine, f"det {self.cfg.lines}"), what=what,
                           timeout=self.cfg.timeout * 2 + 60)
        if cap.returncode != 1:
            raise BenchError(f"{what}: exit code {cap.returncode}, expected 1; stderr: {cap.stderr.strip()[-300:]!r}")
        self.check_det(cap.data, what)
        a, b = det_span(cap.data, self.cfg.lines, what)
        q = f"q.{machine}"
        self.add(f"{q}.rate", (b - a) / (cap.time_at(b) - cap.time_at(a)))
        self.add(f"{q}.det_user", cap.utime)
        self.add(f"{q}.det_sys", cap.stime)
        self.facts["det_bytes"] = len(cap.data) - ready_offset(cap, what)

    def run(self, progress: Callable[[str], None]) -> None:
        self.vmfork_inproc_boot(record=False)   # warm-up: lazy imports and first-use costs of this process
        ms = self.cfg.machines
        boot = _alternate([self.vmfork_inproc_boot, self.vmfork_proc_boot],
                          [functools.partial(self.qemu_boot, m) for m in ms])
        for r in range(self.cfg.rounds):
            # The batched/per-byte pairs run next to each other, their order swapped every round.
            order = (True, False) if r % 2 == 0 else (False, True)
            vf: list[Callable[[], None]] = [self.vmfork_inproc_det]
            vf += [functools.partial(self.vmfork_inproc_det, "batched" if x else "per-byte") for x in order]
            vf += [functools.partial(self.vmfork_proc_det, x) for x in order]
            det = _alternate(vf, [functools.partial(self.qemu_det, m) for m in ms])
            t = time.monotonic()
            for step in (*boot, *det):
                step()
            progress(f"round {r + 1}/{self.cfg.rounds} done in {time.monotonic() - t:.1f} s")
        self.load_after = load_average()


def _alternate(a: list[Callable[[], None]], b: list[Callable[[], None]]) -> list[Callable[[], None]]:
    """a0, b0, a1, b1, ... then the rest of the longer list."""
    out: list[Callable[[], None]] = []
    for i in range(max(len(a), len(b))):
        out += a[i:i + 1] + b[i:i + 1]
    return out


# --- reporting --------------------------------------------------------------------------------------------------

def fmt_time(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 1000:
        return f"{seconds:.2f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def fmt_rate(rate: float) -> str:
    return f"{rate:,.0f} exits/s"


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs"


def speedup(vmfork: float, qemu: float, *, higher_is_better: bool) -> str:
    """How many times faster vmfork is than QEMU (or slower)."""
    r = vmfork / qemu if higher_is_better else qemu / vmfork
    x = r if r >= 1 else 1 / r
    return f"{x:.2f}x {'faster' if r >= 1 else 'slower'}" if x < 10 else f"{x:.0f}x {'faster' if r >= 1 else 'slower'}"


class Report:
    def __init__(self, bench: Bench, markdown: bool) -> None:
        self.b = bench
        self.md = markdown
        self.spread = markdown     # markdown shows min-max next to each median

    def med(self, key: str) -> float:
        return statistics.median(self.b.s[key])

    def cell(self, key: str, fmt: Callable[[float], str], transform: Callable[[float], float] | None = None) -> str:
        v = self.b.s.get(key)
        if not v:
            return "—"
        if transform is not None:
            v = [transform(x) for x in v]
        text = fmt(statistics.median(v))
        if self.spread and len(v) > 1:
            lo, hi = fmt(min(v)), fmt(max(v))
            if " " in lo and lo.split()[1:] == hi.split()[1:]:
                lo = lo.split()[0]
            text += f" ({lo}-{hi})"
        return text

    def table(self, header: list[str], rows: list[list[str]]) -> str:
        if self.md:
            out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:"
                                                                      for i in range(len(header))) + "|"]
            out += ["| " + " | ".join(r) + " |" for r in rows]
            return "\n".join(out)
        widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
        line = "  ".join("-" * w for w in widths)

        def fmt_row(r: list[str]) -> str:
            cells = zip(r, widths, strict=True)
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))
        return "\n".join([fmt_row(header), line, *map(fmt_row, rows)])

    def compare_rows(self, rows: list[tuple[str, str, str | None, Callable[[float], str], bool]],
                     transform: Callable[[float], float] | None = None) -> list[list[str]]:
        """Rows (label, vmfork key, QEMU key suffix or None, formatter, higher is better)."""
        machines = self.b.cfg.machines
        out = []
        for label, vkey, qsuffix, fmt, hib in rows:
            row = [label, self.cell(vkey, fmt, transform)]
            row += [self.cell(f"q.{m}.{qsuffix}", fmt, transform) if qsuffix else "—" for m in machines]
            row += [speedup(self.med(vkey), self.med(f"q.{m}.{qsuffix}"), higher_is_better=hib) if qsuffix else "—"
                    for m in machines]
            out.append(row)
        return out

    def render(self, argv: list[str], elapsed: float) -> str:
        b, cfg = self.b, self.b.cfg
        labels = [QEMU_MACHINES[m][0] for m in cfg.machines]
        header = ["", "vmfork", *labels, *[f"vmfork vs {lab}" for lab in labels]]
        lines = cfg.lines
        det_bytes = b.facts.get("det_bytes", 0)
        boot = self.compare_rows([
            ("whole process: spawn → ready line on the console pipe", "vf.proc.ready", "ready", fmt_time, False),
            ("whole process: spawn → process exited (demo ran to its exit)", "vf.proc.exit", "exit", fmt_time, False),
            ("in-process: VM.create → ready line", "vf.in.ready", None, fmt_time, False),
            ("in-process: VM.create → ready-marker stop", "vf.in.marker", None, fmt_time, False),
        ])
        exits = self.compare_rows([
            ("exits/s, in-process: marker → exit event, vm.exits (QEMU: console pipe)", "vf.in.rate", "rate",
             fmt_rate, True),
            ("exits/s, console pipe both: first → last det line", "vf.pipe.rate", "rate", fmt_rate, True),
        ])
        batching = [
            [label, self.cell(old, fmt_rate), self.cell(new, fmt_rate),
             speedup(self.med(new), self.med(old), higher_is_better=True)]
            for label, old, new in (
                ("exits/s, in-process, console log in a file: marker → exit event", "vf.file1.rate", "vf.file.rate"),
                ("exits/s, whole process, console log to the stdout pipe: first → last det line", "vf.pipe1.rate",
                 "vf.pipe.rate"))]
        batching += [[label, *[f"{fmt_us(self.med(f'{k}.user_per_exit'))} / {fmt_us(self.med(f'{k}.sys_per_exit'))}"
                               for k in keys], ""]
                     for label, keys in (("CPU per exit (user / system), file", ("vf.file1", "vf.file")),
                                         ("CPU per exit (user / system), pipe", ("vf.pipe1", "vf.pipe")))]
        per_exit = self.compare_rows([
            ("wall time per exit, in-process (QEMU: console pipe)", "vf.in.rate", "rate", fmt_us, True),
            ("wall time per exit, console pipe both", "vf.pipe.rate", "rate", fmt_us, True),
        ], transform=lambda r: 1 / r)
        for row in per_exit:   # same ratios as the rates: drop them
            row[-len(cfg.machines):] = ["" for _ in cfg.machines]

        where_vf = [
            ["interpreter start (spawn → first statement of the script)", self.cell("vf.proc.interp", fmt_time)],
            ["`from vmfork.fork import VM`", self.cell("vf.proc.import", fmt_time)],
            ["`VM.create` (256 MiB memfd, KVM VM, irqchip, PIT, vCPU, devices)" if cfg.memory_mib == 256 else
             "`VM.create`", self.cell("vf.proc.create", fmt_time)],
            ["`load_kernel` (first call: imports the boot loaders)", self.cell("vf.proc.load", fmt_time)],
            [f"`run` to the ready marker ({b.facts.get('vf.exits_to_marker', 0)} exits)",
             self.cell("vf.proc.run", fmt_time)],
            ["marker → process exited (rest of demo, destroy, interpreter exit)", self.cell("vf.proc.after", fmt_time)],
            ["CPU time of the process: user / system",
             f"{fmt_time(self.med('vf.proc.user'))} / {fmt_time(self.med('vf.proc.sys'))}"],
            ["in-process, warm: `VM.create` / `load_kernel` / `run` to marker / `destroy`",
             " / ".join(fmt_time(self.med(k)) for k in ("vf.in.create", "vf.in.load", "vf.in.run", "vf.in.destroy"))],
        ]
        where_q = []
        for m, lab in zip(cfg.machines, labels, strict=True):
            where_q += [
                [f"{lab}: spawn → first console byte (QEMU start-up, firmware, guest boot code)",
                 self.cell(f"q.{m}.first", fmt_time)],
                [f"{lab}: first console byte → ready line (the guest prints {b.facts.get('q.bytes_to_ready', 0)} "
                 "bytes)", self.cell(f"q.{m}.banner", fmt_time)],
                [f"{lab}: ready line → process exited", self.cell(f"q.{m}.after", fmt_time)],
                [f"{lab}: CPU time of the process: user / system",
                 f"{fmt_time(self.med(f'q.{m}.user'))} / {fmt_time(self.med(f'q.{m}.sys'))}"],
            ]
        cpu_rows = [["vmfork in-process (getrusage around the run)",
                     f"{fmt_us(self.med('vf.in.user_per_exit'))} / {fmt_us(self.med('vf.in.sys_per_exit'))}"],
                    ["vmfork whole process, UART output written to the stdout pipe, batched (getrusage in the "
                     "child)",
                     f"{fmt_us(self.med('vf.pipe.user_per_exit'))} / {fmt_us(self.med('vf.pipe.sys_per_exit'))}"]]
        for m, lab in zip(cfg.machines, labels, strict=True):
            if det_bytes:
                du = (self.med(f"q.{m}.det_user") - self.med(f"q.{m}.user")) / det_bytes
                ds = (self.med(f"q.{m}.det_sys") - self.med(f"q.{m}.sys")) / det_bytes
                cpu_rows.append([f"{lab} (det process minus demo process, per det byte; "
                                 "rough when the boot alone costs seconds)",
                                 f"{fmt_us(du)} / {fmt_us(ds)}"])

        now = datetime.datetime.now().astimezone()
        qemu_ver = qemu_version(cfg.qemu)
        host = (f"host kernel {platform.release()} ({cpu_model()}, {os.cpu_count()} CPUs), a nested VM whose KVM is "
                f"kvm_pvm{'' if Path('/sys/module/kvm_pvm').exists() else ' (module not seen in this run!)'}; "
                f"{qemu_ver}; Python {platform.python_version()}; load average {b.load_before} before the run, "
                f"{b.load_after} after")
        rel = _rel(cfg.kernel)
        out: list[str] = []
        h2, h3 = ("## ", "### ") if self.md else ("", "")
        out.append(f"{h2}Boot and exit loop: vmfork versus QEMU with KVM")
        out.append("")
        out.append(f"Command: `{shlex.join(argv)}` ({elapsed:.0f} s), {now:%Y-%m-%d %H:%M %Z}.")
        out.append(f"Host: {host}. Note: this is a nested kvm_pvm host, where guest CPL0 code is emulated and every "
                   "VM exit is expensive; absolute numbers are not those of bare-metal KVM.")
        out.append(f"Guest: `{rel}` (the same file for both), {cfg.memory_mib} MiB, 1 vCPU. QEMU: "
                   f"`{' '.join(qemu_argv(cfg, 'pc', '<program>')[1:]).replace(str(cfg.kernel), rel)}`, "
                   "`pc` = the default machine (SeaBIOS), `microvm` adds `-machine microvm` (qboot). vmfork's whole-"
                   "process run is a fresh `python -c` process that imports vmfork and writes the UART output to "
                   "its stdout pipe, like `-serial stdio`.")
        spread = " (min-max)" if self.spread else ""
        out.append(f"Medians of {cfg.rounds} interleaved rounds{spread}. \"vmfork vs X\" compares the medians.")
        out.append("")
        out.append(f"{h3}Boot of `demo` to `vmfork-guest: ready`")
        out.append("")
        out.append(self.table(header, boot))
        out.append("")
        out.append(f"{h3}Exit loop: `det {lines}` ({det_bytes:,} UART bytes after the ready line, one `out` = one VM "
                   "exit each)")
        out.append("")
        out.append(self.table(header, exits + per_exit))
        out.append("")
        out.append(f"{h3}Exit loop: console log batching, side by side (`det {lines}`)")
        out.append("")
        out.append(self.table(["", "a write() per byte (`flush_delay = 0`)", "batched (default)",
                               "batched vs per byte"], batching))
        out.append("")
        out.append(f"{h3}Where the time goes")
        out.append("")
        out.append(self.table(["vmfork, whole process (demo)", "median"], where_vf))
        out.append("")
        out.append(self.table(["QEMU, whole process (demo)", "median"], where_q))
        out.append("")
        out.append(self.table(["CPU time per UART exit", "user / system"], cpu_rows))
        return "\n".join(out)


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "QEMU (version unknown)"
    m = re.search(r"version (\S+)", out)
    return f"QEMU {m.group(1)}" if m else "QEMU (version unknown)"


# --- main -------------------------------------------------------------------------------------------------------

def preflight(cfg: Config) -> None:
    if not cfg.kernel.is_file():
        raise BenchError(f"guest image {cfg.kernel} is missing: build the test guests with guests/build.sh "
                         "(needs nasm)")
    if shutil.which(cfg.qemu) is None:
        raise BenchError(f"{cfg.qemu} not found: install QEMU (Debian: apt-get install qemu-system-x86) or pass "
                         "--qemu PATH")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise BenchError("/dev/kvm is missing or not readable and writable by this user")
    if cfg.rounds < 1 or cfg.lines < 1:
        raise BenchError("--rounds and --lines must be at least 1")
    if cfg.lines * 27 > 60000:
        raise BenchError("--lines too large: the det output must fit a pipe buffer and the UART's output buffer "
                         "(at most about 2200 lines)")
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--markdown", action="store_true", help="print a markdown section for docs/benchmarks.md")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--lines", type=int, default=500, help="det lines for the exit loop (default 500)")
    ap.add_argument("--machines", default="pc,microvm",
                    help="QEMU machines, comma-separated, from: " + ", ".join(QEMU_MACHINES) + " (default both)")
    ap.add_argument("--kernel", type=Path, default=DEFAULT_KERNEL, help="guest ELF (default: the PVH test guest)")
    ap.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    ap.add_argument("--memory", type=int, default=256, help="guest RAM, MiB (default 256)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds a single guest run may take (default 30)")
    args = ap.parse_args(argv)
    machines = [m.strip() for m in args.machines.split(",") if m.strip()]
    unknown = [m for m in machines if m not in QEMU_MACHINES]
    if unknown or not machines:
        ap.error(f"unknown QEMU machine(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(QEMU_MACHINES)}")
    cfg = Config(kernel=args.kernel, qemu=args.qemu, machines=machines, rounds=args.rounds, lines=args.lines,
                 memory_mib=args.memory, timeout=args.timeout)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))   # run the clean-ups
    t0 = time.monotonic()
    try:
        preflight(cfg)
        from vmfork.errors import VmforkError
        bench = Bench(cfg)
        try:
            bench.run(lambda msg: print(f"boot.py: {msg}", file=sys.stderr, flush=True))
        except VmforkError as e:
            raise BenchError(f"vmfork: {e}") from e
    except BenchError as e:
        print(f"boot.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        _kill_live()
    print(Report(bench, args.markdown).render(list(getattr(sys, "orig_argv", sys.argv)), time.monotonic() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
