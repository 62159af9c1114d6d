#!/usr/bin/env python3
"""Save and restore: vmfork side by side with QEMU (KVM), next to vmfork's fork and boot times, in one run.

    .venv/bin/python bench/snapshot.py              # table on stdout, progress on stderr
    .venv/bin/python bench/snapshot.py --markdown   # a section for docs/benchmarks.md

The guest is the `demo` test program (guests/README.md) at 256 MiB and 1 GiB, which leaves almost all of its RAM
zero, and, to measure RAM streaming, the `pattern` program filling 512 MiB of a 1 GiB guest. Rounds interleave
vmfork and QEMU; the tables show medians (and min-max).

vmfork, in this process:
  - boot: `VM.create` + `load_kernel` + `run` to the ready marker (demo: the machine pauses there) or to the exit
    (pattern: after its checksum line);
  - save: `vmfork.snapshot.save()` of that paused machine to a file (written, fsynced and renamed; the fsyncs are
    also shown on their own);
  - restore: `vmfork.snapshot.restore()` of that file into a new paused machine, checked every round, not timed
    (demo: it continues to the demo's exit with the right result; pattern: a sample of its RAM equals the saved);
  - fork: `parent.fork()` after `parent.prepare_forks(n)` (demo only).
vmfork, a whole process: a fresh `python -c` process that imports vmfork and calls `restore(file, paused=False)`,
from spawning it to its "restored" line on a pipe.

QEMU (`qemu-system-x86_64 -accel kvm -m MIB -kernel <guest> -append demo -nodefaults -display none -serial stdio
-qmp unix:<sock>,server=on,wait=off`; no harness device, so its guest runs past the ready marker):
  - boot: spawn to the ready line (demo) or the checksum line (pattern) on the serial pipe;
  - save: after the ready line, QMP `stop`, then `migrate` to `exec:cat > file` (QEMU 7.2 has no `file:` URI) with
    max-bandwidth lifted, from the `migrate` command to the MIGRATION "completed" event;
  - restore: a new QEMU with `-incoming defer`: start-up (spawn to QMP ready), then `migrate-incoming`
    `exec:cat file` to the MIGRATION "completed" event (a paused machine, as it was saved: vmfork's restore gives a
    paused machine too); the whole process: spawn to the RESUME event after `cont`. The restored RAM is checked
    through HMP `xp` (the guest's kernel info block signature `VMFKINFO`; pattern: its first qword too).
Every file is read back from the page cache (it was just written): restore times do not include disk reads.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

from vmfork.errors import VmforkError  # noqa: E402
from vmfork.fork import VM  # noqa: E402
from vmfork.snapshot import restore, save  # noqa: E402

GUEST = ROOT / "build" / "guests" / "testguest-pvh.elf"
READY_LINE = b"vmfork-guest: ready\n"
DEMO_RESULT = b"result: len=0 fnv=cbf29ce484222325 primes=904\n"
DEMO_STATUS = 0x25
KINFO_SIGNATURE = "56 4d 46 4b 49 4e 46 4f"     # "VMFKINFO" at 0x101000, as HMP `xp /8xb` prints it
PATTERN_ADDR = 0x1000000
PATTERN_FIRST = 0x40822041                     # xorshift64(1): `pattern 1 ...`'s first qword
PATTERN_LINE = re.compile(rb"checksum=[0-9a-f]{16}\n")


@dataclass(frozen=True)
class Scenario:
    key: str            # prefix of its sample keys
    mib: int            # guest RAM
    cmdline: str
    title: str

    @property
    def demo(self) -> bool:
        return self.cmdline == "demo"

    @property
    def ready(self) -> bytes | re.Pattern[bytes]:
        """The end of the console line after which QEMU's guest is saved."""
        return READY_LINE if self.demo else PATTERN_LINE

CHILD_SCRIPT = r"""
import time
t_start = time.monotonic()
import sys, json
from vmfork.snapshot import restore
t_import = time.monotonic()
vm = restore(sys.argv[1], paused=False)
sys.stdout.write("restored\n"); sys.stdout.flush()
ev = vm.wait(60) if sys.argv[2] == "demo" else vm.pause()
out = vm.device("serial0").output()
vm.destroy()
sys.stdout.write(json.dumps({"reason": ev.reason, "status": ev.status, "console": out.decode(errors="replace"),
                             "t_start": t_start, "t_import": t_import}) + "\n")
"""


_fsync_seconds = [0.0]
_real_fsync = os.fsync


def _timed_fsync(fd: int) -> None:
    """os.fsync, timed: the save's fsyncs (file and directory) are reported on their own line, since QEMU's
    `exec:cat > file` stream is not synced at all."""
    t = time.perf_counter()
    _real_fsync(fd)
    _fsync_seconds[0] += time.perf_counter() - t


os.fsync = _timed_fsync  # type: ignore[assignment]


class BenchError(Exception):
    """A measurement could not be taken; the message says why."""


def progress(msg: str) -> None:
    print(f"snapshot.py: {msg}", file=sys.stderr, flush=True)


# --- child processes ----------------------------------------------------------------------------------------------

def read_until(proc: subprocess.Popen[bytes], marker: bytes | re.Pattern[bytes], timeout: float,
               what: str) -> tuple[float, bytes]:
    """Read a child's stdout until `marker` (bytes or a pattern) arrives; returns (arrival time, data so far)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    data = bytearray()
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not (marker.search(data) if isinstance(marker, re.Pattern) else marker in data):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{what}: no {marker!r} within {timeout:g} s; output: {bytes(data[-300:])!r}")
            if sel.select(remaining):
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    raise BenchError(f"{what}: exited before {marker!r}; output: {bytes(data[-300:])!r}; "
                                     f"stderr: {err.strip()[-500:]!r}")
                data += chunk
    return time.monotonic(), bytes(data)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            f.close()


class Qmp:
    """A minimal QMP client: one command at a time, events kept in order."""

    def __init__(self, path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise BenchError(f"QMP socket {path} did not come up within {timeout:g} s") from None
                time.sleep(0.0005)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self._message()                                  # the greeting
        self.execute("qmp_capabilities")

    def _message(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError("QEMU closed its QMP socket")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        req: dict[str, Any] = {"execute": command}
        if args:
            req["arguments"] = args
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._message()
            if "event" in msg:
                self.events.append(msg)
            elif "error" in msg:
                raise BenchError(f"QMP {command}: {msg['error'].get('desc')}")
            elif "return" in msg:
                return msg["return"]

    def wait_event(self, name: str, done: Callable[[dict[str, Any]], bool] = lambda e: True) -> float:
        """The arrival time of the first event `name` for which `done(data)` holds."""
        while True:
            while self.events:
                ev = self.events.pop(0)
                if ev["event"] == name and done(ev.get("data", {})):
                    return time.monotonic()
                if ev["event"] == "MIGRATION" and ev.get("data", {}).get("status") == "failed":
                    raise BenchError("QEMU reports the migration failed")
            msg = self._message()
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        self.sock.close()


# --- the measurements ---------------------------------------------------------------------------------------------

Samples = defaultdict[str, list[float]]


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
        self.s: Samples = defaultdict(list)
        self.facts: dict[str, Any] = {}
        self.load_before = load_average()
        self.load_after = ""

    def add(self, key: str, value: float) -> None:
        self.s[key].append(value)

    def qemu_argv(self, scn: Scenario, qmp: Path, *extra: str) -> list[str]:
        return [self.args.qemu, "-accel", "kvm", "-m", str(scn.mib), "-kernel", str(GUEST), "-append", scn.cmdline,
                "-nodefaults", "-display", "none", "-serial", "stdio", "-qmp", f"unix:{qmp},server=on,wait=off",
                *extra]

    # vmfork

    def vmfork(self, scn: Scenario, record: bool = True) -> None:
        k = f"vf.{scn.key}"
        path = self.dir / f"vmfork-{scn.key}.save"
        t0 = time.perf_counter()
        parent = VM.create(memory_mib=scn.mib, name="bench")
        try:
            parent.load_kernel(GUEST, cmdline=scn.cmdline)
            ev = parent.run(timeout=120)
            t_boot = time.perf_counter() - t0
            expected = "harness-start" if scn.demo else "exit"
            if ev.reason != expected or (not scn.demo and ev.status != 0):
                raise BenchError(f"vmfork {scn.title}: the guest stopped with {ev}, expected {expected}")
            _fsync_seconds[0] = 0.0
            t = time.perf_counter()
            info = save(parent, path)
            t_save = time.perf_counter() - t
            t_fsync = _fsync_seconds[0]
            t = time.perf_counter()
            copy = restore(path)
            t_restore = time.perf_counter() - t
            try:
                self.check_vmfork_copy(scn, parent, copy)
            finally:
                copy.destroy()
            fork_time = self.fork_time(parent) if scn.demo else None
        finally:
            parent.destroy(tree=True)
        if record:
            self.add(f"{k}.boot", t_boot)
            self.add(f"{k}.save", t_save)
            self.add(f"{k}.fsync", t_fsync)
            self.add(f"{k}.restore", t_restore)
            if fork_time is not None:
                self.add(f"{k}.fork", fork_time)
            self.facts[f"{k}.size"] = info.file_size
            self.facts[f"{k}.stored"] = info.stored_pages
            self.vmfork_process(scn, path)

    @staticmethod
    def check_vmfork_copy(scn: Scenario, parent: VM, copy: VM) -> None:
        if scn.demo:
            ev = copy.run(timeout=60)
            out = copy.device("serial0").output()
            if ev.reason != "exit" or ev.status != DEMO_STATUS or DEMO_RESULT not in out:
                raise BenchError(f"vmfork {scn.title}: the restored demo ended with {ev}; console {out[-200:]!r}")
        else:
            first = PATTERN_ADDR >> 12
            sample = slice(first, parent.memory.npages, 97)
            if not (copy.memory.pages[sample] == parent.memory.pages[sample]).all() \
                    or int.from_bytes(copy.memory.read(PATTERN_ADDR, 8), "little") != PATTERN_FIRST:
                raise BenchError(f"vmfork {scn.title}: the restored RAM differs from the saved")

    def fork_time(self, parent: VM) -> float:
        n = self.args.forks
        parent.prepare_forks(n)
        forks, times = [], []
        for _ in range(n):
            t = time.perf_counter()
            forks.append(parent.fork())
            times.append(time.perf_counter() - t)
        for f in forks:
            f.destroy()
        return statistics.median(times)

    def vmfork_process(self, scn: Scenario, path: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
        what = f"vmfork {scn.title} whole-process restore"
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", CHILD_SCRIPT, str(path), "demo" if scn.demo else "pause"],
                                stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            t_restored, _ = read_until(proc, b"restored\n", 60, what)
            _, data = read_until(proc, b"}\n", 60, what)
            proc.wait(timeout=30)
            t_exit = time.monotonic()
        finally:
            stop(proc)
        report = json.loads(data.split(b"restored\n", 1)[-1])
        if scn.demo and (report["reason"] != "exit" or report["status"] != DEMO_STATUS
                         or DEMO_RESULT.decode() not in report["console"]):
            raise BenchError(f"{what}: the guest ended with {report}")
        self.add(f"vf.{scn.key}.proc_restore", t_restored - t0)
        self.add(f"vf.{scn.key}.startup", report["t_import"] - t0)
        self.add(f"vf.{scn.key}.proc_exit", t_exit - t0)

    # QEMU

    def qemu(self, scn: Scenario) -> None:
        k = f"q.{scn.key}"
        path = self.dir / f"qemu-{scn.key}.mig"
        path.unlink(missing_ok=True)
        sock = self.dir / f"qmp-{scn.key}.sock"
        sock.unlink(missing_ok=True)
        t0 = time.monotonic()
        proc = subprocess.Popen(self.qemu_argv(scn, sock), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            t_ready, _ = read_until(proc, scn.ready, 120, f"QEMU {scn.title} boot")
            qmp = Qmp(sock, 30)
            qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            qmp.execute("migrate-set-parameters", {"max-bandwidth": 100 << 30})
            t = time.monotonic()
            qmp.execute("stop")
            t_stopped = time.monotonic()
            qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(path))}"})
            t_done = qmp.wait_event("MIGRATION", lambda d: d.get("status") == "completed")
            qmp.execute("quit")
            qmp.close()
            proc.wait(timeout=30)
        finally:
            stop(proc)
        self.add(f"{k}.boot", t_ready - t0)
        self.add(f"{k}.stop", t_stopped - t)
        self.add(f"{k}.save", t_done - t_stopped)
        self.facts[f"{k}.size"] = path.stat().st_size

        sock.unlink(missing_ok=True)
        t0 = time.monotonic()
        proc = subprocess.Popen(self.qemu_argv(scn, sock, "-incoming", "defer"), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            qmp = Qmp(sock, 30)
            t_up = time.monotonic()
            qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            t = time.monotonic()
            qmp.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(path))}"})
            t_loaded = qmp.wait_event("MIGRATION", lambda d: d.get("status") == "completed")
            qmp.execute("cont")                          # saved stopped, restored stopped: like vmfork's restore
            t_running = qmp.wait_event("RESUME")
            status = qmp.execute("query-status")
            seen = qmp.execute("human-monitor-command", {"command-line": "xp /8xb 0x101000"})
            first = qmp.execute("human-monitor-command", {"command-line": f"xp /1gx {PATTERN_ADDR:#x}"})
            qmp.execute("quit")
            qmp.close()
            proc.wait(timeout=30)
        finally:
            stop(proc)
        if status.get("status") != "running" or KINFO_SIGNATURE not in re.sub(r"0x", "", str(seen)) \
                or (not scn.demo and int(str(first).split(":")[1], 16) != PATTERN_FIRST):
            raise BenchError(f"QEMU {scn.title} restore: status {status}, guest memory at 0x101000: {seen!r}, "
                             f"at {PATTERN_ADDR:#x}: {first!r}")
        self.add(f"{k}.startup", t_up - t0)
        self.add(f"{k}.restore", t_loaded - t)
        self.add(f"{k}.proc_restore", t_running - t0)

    def scenarios(self) -> list[Scenario]:
        out = [Scenario(f"demo{mib}", mib, "demo", f"`demo`, {mib} MiB") for mib in self.args.memory]
        if self.args.pattern:
            mib, data = self.args.pattern
            out.append(Scenario(f"pattern{mib}", mib, f"pattern 1 {data}",
                                f"`pattern 1 {data}`, {mib} MiB ({data} MiB of non-zero RAM)"))
        return out

    def run(self) -> None:
        for scn in self.scenarios():
            self.vmfork(scn, record=False)                # warm-up: imports, pools, first-use costs
            for r in range(self.args.rounds):
                t = time.monotonic()
                self.vmfork(scn)
                self.qemu(scn)
                progress(f"{scn.title}: round {r + 1}/{self.args.rounds} done in {time.monotonic() - t:.1f} s")
                for f in self.dir.iterdir():
                    f.unlink()
        self.load_after = load_average()


# --- reporting ----------------------------------------------------------------------------------------------------

def fmt_time(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 1000:
        return f"{seconds:.2f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_size(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    return f"{n / 1024:.0f} KiB"


def times(a: float, b: float) -> str:
    """How many times a is b, as "12x"."""
    r = a / b
    return f"{r:.1f}x" if r < 10 else f"{r:,.0f}x"


class Report:
    def __init__(self, bench: Bench, markdown: bool) -> None:
        self.b = bench
        self.md = markdown

    def med(self, key: str) -> float:
        return statistics.median(self.b.s[key])

    def cell(self, key: str) -> str:
        v = self.b.s.get(key)
        if not v:
            return "—"
        text = fmt_time(statistics.median(v))
        if len(v) > 1:
            lo, hi = fmt_time(min(v)), fmt_time(max(v))
            if lo.split()[1:] == hi.split()[1:]:
                lo = lo.split()[0]
            text += f" ({lo}-{hi})"
        return text

    def table(self, header: list[str], rows: list[list[str]]) -> str:
        if self.md:
            out = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
            return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])
        widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]

        def line(r: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                              strict=True)))
        return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])

    def render(self, argv: list[str], elapsed: float) -> str:
        b, a = self.b, self.b.args
        h2, h3 = ("## ", "### ") if self.md else ("", "")
        now = datetime.datetime.now().astimezone()
        qemu = subprocess.run([a.qemu, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        out = [f"{h2}Save and restore: vmfork versus QEMU with KVM", "",
               f"Command: `{shlex.join(argv)}` ({elapsed:.0f} s), {now:%Y-%m-%d %H:%M %Z}.",
               f"Host: {platform.release()}, {os.cpu_count()} CPUs, a nested VM whose KVM is kvm_pvm; {qemu}; "
               f"Python {platform.python_version()}; load average {b.load_before} before the run, {b.load_after} "
               "after. Guest: `build/guests/testguest-pvh.elf` (`demo`, and `pattern` for the RAM-heavy case), 1 vCPU. "
               f"Medians of {a.rounds} interleaved rounds (min-max); fork: the median of {a.forks} forks per round. "
               "Files are read back from the page cache. How each number is taken: `bench/snapshot.py`'s docstring.",
               ""]
        for scn in b.scenarios():
            v, q = f"vf.{scn.key}", f"q.{scn.key}"
            point = "the ready point" if scn.demo else "the checksum line (vmfork: the exit)"
            rows = [
                [f"boot to {point} (vmfork: in-process; QEMU: spawn → console line)", self.cell(f"{v}.boot"),
                 self.cell(f"{q}.boot")],
                ["save a paused guest to a file (QEMU: `migrate` → completed; `stop` took "
                 f"{fmt_time(self.med(f'{q}.stop'))})", self.cell(f"{v}.save"), self.cell(f"{q}.save")],
                ["  of which fsync of the file and its directory (QEMU's stream is not synced)",
                 self.cell(f"{v}.fsync"), "—"],
                ["file size", fmt_size(b.facts[f"{v}.size"]), fmt_size(b.facts[f"{q}.size"])],
                ["restore, in-process: file → paused machine (QEMU: `migrate-incoming` → completed)",
                 self.cell(f"{v}.restore"), self.cell(f"{q}.restore")],
                ["restore, whole process: spawn → restored and running (QEMU: `cont` → RESUME)",
                 self.cell(f"{v}.proc_restore"), self.cell(f"{q}.proc_restore")],
                ["  of which process start-up (vmfork: interpreter + `import vmfork.snapshot`; QEMU: to QMP ready)",
                 self.cell(f"{v}.startup"), self.cell(f"{q}.startup")],
            ]
            if scn.demo:
                rows.append(["fork of the paused guest (prepared shells)", self.cell(f"{v}.fork"), "—"])
            out += [f"{h3}{scn.title}: {b.facts[f'{v}.stored']:,} non-zero pages stored", "",
                    self.table(["", "vmfork", "QEMU"], rows), ""]
            ratios = [f"QEMU save / vmfork save {times(self.med(f'{q}.save'), self.med(f'{v}.save'))}",
                      f"QEMU restore / vmfork restore {times(self.med(f'{q}.restore'), self.med(f'{v}.restore'))} "
                      f"in-process, {times(self.med(f'{q}.proc_restore'), self.med(f'{v}.proc_restore'))} as "
                      "whole processes",
                      f"QEMU file / vmfork file {times(b.facts[f'{q}.size'], b.facts[f'{v}.size'])}"]
            if scn.demo:
                ratios += [f"vmfork restore / fork {times(self.med(f'{v}.restore'), self.med(f'{v}.fork'))}",
                           f"vmfork boot / restore {times(self.med(f'{v}.boot'), self.med(f'{v}.restore'))}"]
            else:
                data = b.facts[f"{v}.stored"] << 12
                ratios.append(f"vmfork streams {data / self.med(f'{v}.save') / (1 << 20):,.0f} MiB/s saving, "
                              f"{data / self.med(f'{v}.restore') / (1 << 20):,.0f} MiB/s restoring")
            out += ["Ratios (medians): " + "; ".join(ratios) + ".", ""]
        return "\n".join(out).rstrip() + "\n"


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--markdown", action="store_true", help="print a markdown section for docs/benchmarks.md")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per memory size (default 5)")
    ap.add_argument("--forks", type=int, default=20, help="forks timed per round (default 20)")
    ap.add_argument("--memory", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024],
                    help="guest sizes in MiB, comma-separated (default 256,1024)")
    ap.add_argument("--pattern", type=lambda s: tuple(int(x) for x in s.split(":")), default=(1024, 512),
                    metavar="MIB:DATA", help="also a guest of MIB MiB that fills DATA MiB with `pattern` "
                                             "(default 1024:512; 0:0 to skip)")
    ap.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    args = ap.parse_args(argv)
    if args.pattern == (0, 0):
        args.pattern = None
    if not GUEST.is_file():
        print(f"snapshot.py: error: {GUEST} is missing: run guests/build.sh", file=sys.stderr)
        return 2
    if shutil.which(args.qemu) is None:
        print(f"snapshot.py: error: {args.qemu} not found (Debian: apt-get install qemu-system-x86)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vmfork-bench-", dir=args_dir()) as d:
        bench = Bench(args, Path(d))
        try:
            bench.run()
        except (BenchError, VmforkError, OSError) as e:
            print(f"snapshot.py: error: {e}", file=sys.stderr)
            return 2
    print(Report(bench, args.markdown).render(list(getattr(sys, "orig_argv", sys.argv)), time.monotonic() - t0))
    return 0


def args_dir() -> str | None:
    """Where the files go: $TMPDIR, else /var/tmp (a disk, like real save files), else the default."""
    for d in (os.environ.get("TMPDIR"), "/var/tmp"):
        if d and os.path.isdir(d) and os.access(d, os.W_OK):
            return d
    return None


if __name__ == "__main__":
    sys.exit(main())
