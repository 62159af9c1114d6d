"""The parser fuzzers for longer (issue 16), with inputs run and line coverage per parser.

    .venv/bin/python bench/fuzz_parsers.py [--examples 5000] [--only config,qmp,...] [--markdown]

Runs the targets and strategies of tests/test_parsers_fuzz.py under hypothesis with a larger budget and counts the
lines of each parser's modules that the inputs executed (a sys.settrace line tracer limited to those files; lines
that can execute are those of the modules' code objects). A failing input is printed by hypothesis and the run stops:
put it in tests/corpus/<parser>/ and fix the parser.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import test_parsers_fuzz as T  # noqa: E402

SRC = ROOT / "src" / "vmfork"
MODULES = {
    "config": ["config.py"],
    "qmp": ["toolstack/qmp.py"],
    "devstate": ["snapshot/container.py", "snapshot/devstate.py", "devices/base.py"],
    "save": ["snapshot/container.py", "snapshot/savefile.py"],
    "kernel": ["arch/x86/boot/__init__.py", "arch/x86/boot/elf.py", "arch/x86/boot/multiboot.py",
               "arch/x86/boot/pvh.py", "arch/x86/boot/linux.py", "arch/x86/boot/plan.py"],
    "gdb": ["vmi/gdbserver.py"],
}


def executable_lines(path: Path) -> set[int]:
    code = compile(path.read_text(), str(path), "exec")
    out: set[int] = set()
    todo = [code]
    while todo:
        c = todo.pop()
        out.update(line for _, _, line in c.co_lines() if line is not None)
        todo.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return out


class LineCoverage:
    def __init__(self, files: list[Path]) -> None:
        self.files = {str(f.resolve()) for f in files}
        self.hit: set[tuple[str, int]] = set()

    def _trace(self, frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename not in self.files:
            return None
        if event == "line":
            self.hit.add((frame.f_code.co_filename, frame.f_lineno))
        return self._trace

    def __enter__(self) -> LineCoverage:
        sys.settrace(self._trace)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)


def havoc(rng: random.Random, seed: bytes) -> bytes:
    """A few random edits of a seed (byte flips, interesting values, cuts, duplications, splices of noise)."""
    b = bytearray(seed)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(6)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and len(b) >= 4:
            pos = min(pos, len(b) - 4)
            b[pos:pos + 4] = rng.choice([0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, len(b), 1]).to_bytes(4, "little")
        elif op == 2:
            del b[pos:pos + rng.randint(1, 64)]
        elif op == 3 and b:
            start = rng.randrange(len(b))
            b[pos:pos] = b[start:start + rng.randint(1, 64)]
        elif op == 4:
            b[pos:pos] = rng.randbytes(rng.randint(1, 16))
        else:
            b[pos:pos] = rng.choice([b"{", b"}", b"[", b"]", b'"', b"\\", b"\n", b"#", b"$", b"=", b",", b":"])
    return bytes(b)


def run_random(name: str, strategy: st.SearchStrategy[bytes], target: Callable[[bytes], None], seconds: float,
               seeds: list[bytes]) -> tuple[int, float, int, int]:
    """Mutation fuzzing without hypothesis's engine (much faster per input): seeds drawn from the strategy once,
    then random edits of them, for `seconds`."""
    files = [SRC / m for m in MODULES[name]]
    total = sum(len(executable_lines(f)) for f in files)
    rng = random.Random(16)
    pool = list(seeds)

    @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(data: bytes) -> None:
        pool.append(data)
    collect()
    cov = LineCoverage(files)
    count = 0
    t = time.perf_counter()
    with cov:
        while time.perf_counter() - t < seconds:
            target(havoc(rng, rng.choice(pool)))
            count += 1
    return count, time.perf_counter() - t, len(cov.hit), total


def run(name: str, strategy: st.SearchStrategy[bytes], target: Callable[[bytes], None], examples: int
        ) -> tuple[int, float, int, int]:
    files = [SRC / m for m in MODULES[name]]
    total = sum(len(executable_lines(f)) for f in files)
    count = 0

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def fuzz(data: bytes) -> None:
        nonlocal count
        count += 1
        target(data)
    cov = LineCoverage(files)
    t = time.perf_counter()
    with cov:
        fuzz()
    return count, time.perf_counter() - t, len(cov.hit), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=5000)
    ap.add_argument("--only", default="")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--random-seconds", type=float, default=0.0,
                    help="instead of hypothesis: random mutation fuzzing, this many seconds per parser")
    args = ap.parse_args()
    from vmfork import VM
    from vmfork.snapshot import load_device_state, restore, save, save_device_state
    from vmfork.vmi.gdbserver import GdbServer
    tmp = Path(tempfile.mkdtemp(prefix="vmfork-fuzz-"))
    guests = ROOT / "build" / "guests"
    vm = VM.create(memory_mib=64, name="fuzz-parent")
    vm.load_kernel(guests / "testguest-pvh.elf", cmdline="demo")
    assert vm.run(timeout=30).reason == "harness-start"
    save(vm, tmp / "g.sav")
    save_device_state(vm, tmp / "g.dm")
    sav, dm = (tmp / "g.sav").read_bytes(), (tmp / "g.dm").read_bytes()
    kernels = [(guests / "testguest-pvh.elf").read_bytes()[:16384],
               (guests / "testguest-multiboot.elf").read_bytes()[:16384]]
    bz = sorted((ROOT / "build" / "linux").glob("*bzImage*")) + sorted((ROOT / "build" / "linux").glob("vmlinuz*"))
    if bz:
        kernels.append(bz[0].read_bytes()[:32768])

    def gdb(data: bytes) -> None:
        fork = vm.fork()
        server = GdbServer(fork, "127.0.0.1", 0)
        try:
            T.gdb_session(server, data)
        finally:
            server.close()
            fork.destroy()

    head = min(len(sav), 8192)
    targets: dict[str, tuple[st.SearchStrategy[bytes], Callable[[bytes], None]]] = {
        "config": (T.CONFIG_TEXT, T.target_config),
        "qmp": (T.QMP_STREAM, T.target_qmp),
        "devstate": (T.mutations(dm) | st.binary(max_size=200), T._file_target(tmp, ".dm", load_device_state)),
        "save": (T.mutations(sav[:head]).map(lambda h: h + sav[head:]) | T.mutations(sav, max_edits=3),
                 T._file_target(tmp, ".sav", restore)),
        "kernel": (st.sampled_from(range(len(kernels))).flatmap(lambda i: T.mutations(kernels[i], max_edits=6)),
                   T.kernel_target(tmp)),
        "gdb": (T.GDB_STREAM, gdb),
    }
    only = [x for x in args.only.split(",") if x] or list(targets)
    rows = []
    for name in only:
        strategy, target = targets[name]
        if args.random_seconds:
            seeds = {"devstate": [dm], "save": [sav], "kernel": kernels}.get(name, [])
            n, secs, hit, total = run_random(name, strategy, target, args.random_seconds, seeds)
        else:
            n, secs, hit, total = run(name, strategy, target, args.examples)
        rows.append((name, n, secs, hit, total))
        print(f"  {name:9s} {n:7d} inputs in {secs:6.1f} s ({n / secs:7.0f}/s), lines {hit}/{total} "
              f"({100 * hit / total:.0f}%) of {', '.join(MODULES[name])}", flush=True)
    vm.destroy(tree=True)
    if args.markdown:
        print("| parser | inputs | inputs/s | lines covered | modules |\n|---|---:|---:|---:|---|")
        for name, n, secs, hit, total in rows:
            print(f"| {name} | {n:,} | {n / secs:,.0f} | {hit}/{total} ({100 * hit / total:.0f}%) | "
                  f"{', '.join(MODULES[name])} |")


if __name__ == "__main__":
    main()
