"""What `vmfork fuzz` fuzzes: a parent machine paused at the target's harness ready marker, in this process.

    --kernel K   boot K here to its ready marker (the machine is this process's own)
    --domain D   a toolstack domain paused at its marker: this process holds a fork of it (toolstack/attach.py),
                 sharing the domain's RAM copy-on-write, and fuzzes forks of that at in-process speed. While the
                 fuzzer runs, `vmfork list` shows it as a fork of D (`<D>-fuzz-<n>`), so D stays paused, refuses
                 `unpause` naming the fuzzer, and `destroy` of D needs --force (which ends the fuzzer first).
                 With another start marker (--harness int3, --start), D may be paused anywhere before it: the held
                 fork (never D itself) runs to the start like a booted --kernel, and is then the parent.

This module is the fuzz CLI's glue (only fuzz/cli.py imports it): it may use the toolstack's client side, as the
CLI may. The fuzzing engine (loop, coverage, mutate, afl) knows nothing of domains.

A fuzzer holding a domain lets it go when it ends: normally, on Ctrl-C, or on SIGTERM (turned into the same
KeyboardInterrupt, so the cleanup runs). If it is killed outright, the kernel closes its link to the parent (which
frees the parent at once) and the next sweep (`vmfork list`, `create`, `fork-vm`, another `fuzz`) removes its entry.

While it fuzzes, a fuzzer holding a domain publishes its live numbers (execs, recent execs/s, crashes, corpus,
coverage) about once a second in the runtime directory's `<domid>.stats` for `vmfork list` (LiveStats); the file goes
with its registry entry.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from .loop import FuzzError, Stats

if TYPE_CHECKING:
    from ..fork import VM
    from ..toolstack.attach import HeldFork
    from ..toolstack.registry import DomainRecord, Registry
    from .harness import Harness

__all__ = ["Target", "open_target"]

HARNESS_READY = "harness-start"         # the pause reason of a domain stopped by its guest's ready marker
CONSOLE_TAIL = 4 << 20                  # bytes of each console log searched for what the target printed
START_TIMEOUT = 30.0                    # default seconds to the start marker (--boot-timeout)
STATS_EVERY = 1.0                       # seconds between writes of a held fork's stats file


@dataclass(eq=False)
class Target:
    """The parent to fuzz (paused at its marker), what its guest printed on its console up to there, and how to let
    it go."""

    vm: VM
    console: Callable[[], bytes]
    release: Callable[[], None]
    what: str                           # for messages: "build/guests/testguest-pvh.elf" or "target (domain 1)"
    stats: tuple[Path, Path] | None = None      # a held fork's stats file and its temporary name (LiveStats)

    def progress(self) -> Callable[[Stats], None] | None:
        """What Fuzzer.fuzz is to call with its numbers when its status line is due: for a held fork, the writer
        of its stats file."""
        return None if self.stats is None else LiveStats(*self.stats)

    def close(self) -> None:
        self.release()


class LiveStats:
    """Fuzzer.fuzz's `progress` callback for a held fork (called at its status interval, never per input): about
    once a second the numbers go to the fork's stats file for `vmfork list`, atomically (the temporary file, then a
    rename). The registry removes the file with the fork's entry (toolstack/registry.py), so a killed fuzzer's
    numbers go at the next sweep."""

    def __init__(self, path: Path, temporary: Path) -> None:
        self.path = path
        self.temporary = temporary
        self.last: tuple[float, int] | None = None      # (time.monotonic(), execs) when the file was last written

    def __call__(self, st: Stats) -> None:
        now = time.monotonic()
        if self.last is not None and now - self.last[0] < STATS_EVERY:
            return
        # Recent: since the last write (about a second); the first one has only the whole run's average.
        rate = st.execs_per_s if self.last is None else (st.execs - self.last[1]) / (now - self.last[0])
        self.last = (now, st.execs)
        cov = st.blocks_total > 0
        numbers = {"pid": os.getpid(), "updated": time.time(), "seconds": round(st.elapsed_s, 1),
                   "execs": st.execs, "execs_per_s": round(rate, 1), "crashes": st.crashes,
                   "unique_crashes": st.unique_crashes, "hangs": st.hangs, "corpus": st.corpus,
                   "blocks_hit": st.blocks_hit if cov else None, "blocks_total": st.blocks_total if cov else None}
        # Best effort: numbers for `vmfork list` must never stop the fuzzer.
        with contextlib.suppress(OSError):
            fd = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(numbers))
            os.replace(self.temporary, self.path)


def open_target(args: argparse.Namespace) -> Target:
    """The target of `vmfork fuzz`: --domain, else --kernel."""
    timeout = START_TIMEOUT if args.boot_timeout is None else args.boot_timeout
    harness = getattr(args, "harness_spec", None)
    if getattr(args, "domain", None) is not None:
        sized = args.input_size is not None or getattr(args, "input_limit", None) is not None
        return domain_target(args.domain, input_given=args.input_addr is not None and sized,
                             harness=harness, timeout=timeout)
    if getattr(args, "template", None) is not None:
        return template_target(args.template, harness=harness, timeout=timeout)
    return kernel_target(args.kernel, cmdline="fuzz" if args.cmdline is None else args.cmdline,
                         memory_mib=64 if args.memory is None else args.memory, timeout=timeout, harness=harness,
                         initrd=getattr(args, "initrd", None), cpuid=getattr(args, "cpuid", None))


# --- --kernel -------------------------------------------------------------------------------------------------------

def kernel_target(kernel: str, *, cmdline: str, memory_mib: int, timeout: float,
                  harness: Harness | None = None, initrd: str | None = None, cpuid: str | None = None) -> Target:
    """Boot `kernel` (with `initrd`, shown the CPU policy `cpuid`) in this process until its start marker pauses it
    (the ready marker, or another `harness`'s start: fuzz/harness.py)."""
    from ..fork import VM
    from .harness import Harness, run_to_start
    parent = VM.create(memory_mib=memory_mib, name="fuzz-target", cpuid=cpuid)
    try:
        parent.load_kernel(kernel, cmdline=cmdline, initrd=initrd)
        run_to_start(parent, harness or Harness(), timeout=timeout)
    except BaseException:
        parent.destroy(tree=True)
        raise
    return Target(parent, lambda: parent.device("serial0").output(), lambda: parent.destroy(tree=True), kernel)


# --- --template -----------------------------------------------------------------------------------------------------

def template_target(path: str, *, harness: Harness | None = None, timeout: float = START_TIMEOUT) -> Target:
    """Map the template save file `path` copy-on-write (snapshot/template.py: every fuzzer of every process on this
    machine shares its pages); with a harness other than the port's, run it on to its start marker."""
    from ..snapshot.savefile import restore
    from ..snapshot.template import is_template
    from .harness import Harness, run_to_start
    if not is_template(path):
        raise FuzzError(f"--template {path}: not a template save file (write one with `vmfork save --template "
                        "DOMAIN FILE`)")
    parent = restore(path, paused=True, name="fuzz-template", template=True)
    try:
        if harness is not None and harness.kind != "port":
            run_to_start(parent, harness or Harness(), timeout=timeout)
    except BaseException:
        parent.destroy(tree=True)
        raise
    return Target(parent, lambda: parent.device("serial0").output(), lambda: parent.destroy(tree=True), path)


# --- --domain -------------------------------------------------------------------------------------------------------

def _fuzzable(input_given: bool, start: str | None) -> Callable[[DomainRecord, dict[str, Any]], None]:
    """The fuzzer's check of the domain before it takes its RAM (the toolstack's own checks follow: paused, not
    ended). With the ready marker as the start (`start` None) and no explicit input buffer, the buffer comes from
    the registers the marker set (RDI/RSI), so the domain must be paused right at its marker. With another start
    marker (`start` names it) the held fork runs there first, so the domain may be paused anywhere before it."""
    def check(parent: DomainRecord, info: dict[str, Any]) -> None:
        state, reason = info.get("state"), info.get("reason") or ""
        if state == "running" and start is not None:
            raise FuzzError(f"{parent.label()} is running: vmfork fuzz --domain needs it paused somewhere before "
                            f"its {start} (vmfork pause {parent.domid})")
        if state == "running":
            raise FuzzError(f"{parent.label()} is running: vmfork fuzz --domain needs it paused at its harness "
                            f"ready marker (a target pauses there by itself; vmfork pause {parent.domid} pauses "
                            "it anywhere, then give --input-addr and --input-size)")
        if state == "paused" and reason != HARNESS_READY and not input_given and start is None:
            why = f" ({reason})" if reason else ""
            raise FuzzError(f"{parent.label()} is paused{why}, not at its harness ready marker: let it run to the "
                            f"marker (vmfork unpause {parent.domid}), or give --input-addr and --input-size")
    return check


def _console_logs(registry: Registry, parent: DomainRecord) -> Callable[[], bytes]:
    """The console output of the domain and its ancestors, oldest first: a fork domain's own log starts at its
    fork point, so what the target printed at boot is in a parent's log."""
    chain: list[str] = []
    rec: DomainRecord | None = parent
    while rec is not None and len(chain) < 64:
        chain.append(rec.console_log)
        rec = registry.get(rec.parent) if rec.parent is not None else None

    def read() -> bytes:
        out = b""
        for path in reversed(chain):
            try:
                with open(path, "rb") as f:
                    size = f.seek(0, 2)
                    f.seek(max(0, size - CONSOLE_TAIL))
                    out += f.read()
            except OSError:
                continue                # a destroyed ancestor's log may be gone
        return out
    return read


class _TerminateAsInterrupt:
    """SIGTERM (e.g. from `vmfork destroy --force PARENT`) raises KeyboardInterrupt, so the fuzzer ends the way
    Ctrl-C ends it and lets its parent go on the way out."""

    def __init__(self) -> None:
        self.previous: Any = signal.signal(signal.SIGTERM, self._raise)

    @staticmethod
    def _raise(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def domain_target(domain: str, *, input_given: bool, harness: Harness | None = None,
                  timeout: float = START_TIMEOUT) -> Target:
    """Hold a fork of the paused domain `domain` (domid or name) in this process, as `<domain>-fuzz-<n>`; with a
    `harness` other than the port's, run that fork (not the domain) to its start marker, within `timeout` s."""
    from ..toolstack.attach import hold_fork
    from ..toolstack.client import open_registry
    from .harness import HarnessError, run_to_start
    start = harness.start_name() if harness is not None and harness.kind != "port" else None
    term = _TerminateAsInterrupt()
    try:
        registry = open_registry()
        held: HeldFork = hold_fork(domain, kind="fuzz", check=_fuzzable(input_given, start), registry=registry)
    except BaseException:
        term.restore()
        raise

    def release() -> None:
        try:
            held.close()
        finally:
            term.restore()
    logs = _console_logs(registry, held.parent)
    serial = held.vm.device("serial0")

    def console() -> bytes:
        # What the held fork printed on its way to the start follows the domain's own log.
        return logs() + serial.output()
    if harness is not None and harness.kind != "port":
        try:
            run_to_start(held.vm, harness, timeout=timeout)
        except HarnessError as e:
            release()
            raise HarnessError(f"{held.parent.label()}, run in its fork {held.record.name}: {e}") from None
        except BaseException:
            release()
            raise
    stats = (registry.fuzz_stats(held.record.domid), registry.fuzz_stats(held.record.domid, temporary=True))
    return Target(held.vm, console, release, held.parent.label(), stats)
