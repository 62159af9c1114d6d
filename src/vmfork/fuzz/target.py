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
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from .loop import FuzzError

if TYPE_CHECKING:
    from ..fork import VM
    from ..toolstack.attach import HeldFork
    from ..toolstack.registry import DomainRecord, Registry
    from .harness import Harness

__all__ = ["Target", "open_target"]

HARNESS_READY = "harness-start"         # the pause reason of a domain stopped by its guest's ready marker
CONSOLE_TAIL = 4 << 20                  # bytes of each console log searched for what the target printed
START_TIMEOUT = 30.0                    # default seconds to the start marker (--boot-timeout)


@dataclass(eq=False)
class Target:
    """The parent to fuzz (paused at its marker), what its guest printed on its console up to there, and how to let
    it go."""

    vm: VM
    console: Callable[[], bytes]
    release: Callable[[], None]
    what: str                           # for messages: "build/guests/testguest-pvh.elf" or "target (domain 1)"

    def close(self) -> None:
        self.release()


def open_target(args: argparse.Namespace) -> Target:
    """The target of `vmfork fuzz`: --domain, else --kernel."""
    timeout = START_TIMEOUT if args.boot_timeout is None else args.boot_timeout
    harness = getattr(args, "harness_spec", None)
    if getattr(args, "domain", None) is not None:
        return domain_target(args.domain, input_given=args.input_addr is not None and args.input_size is not None,
                             harness=harness, timeout=timeout)
    return kernel_target(args.kernel, cmdline="fuzz" if args.cmdline is None else args.cmdline,
                         memory_mib=64 if args.memory is None else args.memory, timeout=timeout, harness=harness)


# --- --kernel -------------------------------------------------------------------------------------------------------

def kernel_target(kernel: str, *, cmdline: str, memory_mib: int, timeout: float,
                  harness: Harness | None = None) -> Target:
    """Boot `kernel` in this process until its start marker pauses it (the ready marker, or another `harness`'s
    start: fuzz/harness.py)."""
    from ..fork import VM
    from .harness import Harness, run_to_start
    parent = VM.create(memory_mib=memory_mib, name="fuzz-target")
    try:
        parent.load_kernel(kernel, cmdline=cmdline)
        run_to_start(parent, harness or Harness(), timeout=timeout)
    except BaseException:
        parent.destroy(tree=True)
        raise
    return Target(parent, lambda: parent.device("serial0").output(), lambda: parent.destroy(tree=True), kernel)


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
    return Target(held.vm, console, release, held.parent.label())
