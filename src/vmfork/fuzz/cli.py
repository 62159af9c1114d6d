"""`vmfork fuzz`: boot a target kernel in-process to its ready marker and fuzz it (or replay one input).

    vmfork fuzz --kernel build/guests/testguest-pvh.elf --cmdline fuzz --corpus seeds/ --out out/ --seconds 30 \\
        --cover 0x10a468-0x10a4df
    vmfork fuzz --kernel build/guests/testguest-pvh.elf --cmdline fuzz --replay out/crashes/vector-14-....bin
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["register_fuzz_commands", "run_fuzz"]


def _int(text: str) -> int:
    return int(text, 0)


AUTO = (-1, -1)       # --cover auto: the range the target printed at boot
_PRINTED_RANGE = re.compile(rb"parse=(0x[0-9a-fA-F]+) end=(0x[0-9a-fA-F]+)")


def _range(text: str) -> tuple[int, int]:
    if text == "auto":
        return AUTO
    start, sep, end = text.partition("-")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected START-END (e.g. 0x10a468-0x10a4df)")
    try:
        return int(start, 0), int(end, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: START and END must be numbers") from None


def register_fuzz_commands(sub: Any) -> None:
    """Add `fuzz` to the CLI's subcommands (`sub` is build_parser()'s add_subparsers() object)."""
    p = sub.add_parser("fuzz", help="fuzz a guest paused at its ready marker, in forks (or replay one input)")
    p.add_argument("--kernel", required=True, help="target kernel (Multiboot, PVH or Linux), booted in-process")
    p.add_argument("--cmdline", default="fuzz", help="kernel command line (default: the test guest's 'fuzz')")
    p.add_argument("--memory", type=int, default=64, help="guest memory in MiB (default 64)")
    p.add_argument("--corpus", default=None, help="directory of seed inputs (default: one input of 8 zero bytes)")
    p.add_argument("--out", default=None, help="output directory: crashes/ (input + .json), corpus/, hangs/")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to fuzz (default 10)")
    p.add_argument("--execs", type=int, default=None, help="stop after this many inputs")
    p.add_argument("--input-addr", type=_int, default=None, help="input buffer address (default: RDI at the marker)")
    p.add_argument("--input-size", type=_int, default=None, help="input buffer size (default: RSI at the marker)")
    p.add_argument("--budget-ms", type=float, default=50.0, help="time per input before it is a hang (default 50)")
    p.add_argument("--sink", action="append", default=[], metavar="ADDR|SYMBOL",
                   help="a crash sink: reaching it is a crash (repeatable)")
    p.add_argument("--symbols", default=None, help="symbol map or ELF for --sink names")
    p.add_argument("--cover", action="append", default=[], type=_range, metavar="START-END",
                   help="collect basic-block coverage of this code range (repeatable); `auto`: the range the "
                        "target printed on its console before its ready marker as `parse=0x... end=0x...`")
    p.add_argument("--oversize", choices=("truncate", "reject"), default="truncate",
                   help="an input larger than the buffer: truncate it (default) or reject it")
    p.add_argument("--max-len", type=int, default=4096, help="longest mutated input (default 4096)")
    p.add_argument("--seed", type=int, default=None, help="RNG seed (reproducible campaigns)")
    p.add_argument("--stop-on-crash", action="store_true", help="stop at the first crash")
    p.add_argument("--keep", action="store_true",
                   help="stop at the first crash and keep its fork paused (in this process: says where it is)")
    p.add_argument("--replay", default=None, metavar="FILE", help="run this one input and print its outcome (JSON)")
    p.add_argument("--afl", action="store_true",
                   help="be AFL++'s fork server: afl-fuzz -i IN -o OUT -t MS -- vmfork fuzz --afl ... (fuzz/afl.py)")
    p.add_argument("--afl-input", default=None, metavar="FILE",
                   help="with --afl: read each input from FILE (AFL++'s @@) instead of stdin")
    p.add_argument("--boot-timeout", type=float, default=30.0, help="seconds to reach the ready marker")
    p.add_argument("--quiet", action="store_true", help="no live status line")
    p.set_defaults(func=run_fuzz)


def run_fuzz(args: argparse.Namespace) -> int:
    from ..fork import VM
    from ..vmi.symbols import load_symbols
    from .loop import Fuzzer, FuzzError

    if args.replay is None and args.out is None and not args.afl:
        print("vmfork fuzz: --out DIR is required (or --replay FILE)", file=sys.stderr)
        return 2
    parent = VM.create(memory_mib=args.memory, name="fuzz-target")
    try:
        parent.load_kernel(args.kernel, cmdline=args.cmdline)
        ev = parent.run(timeout=args.boot_timeout)
        if ev.reason != "harness-start":
            raise FuzzError(f"the target did not reach its ready marker: {ev.reason} {ev.detail}".strip())
        if AUTO in args.cover:
            m = _PRINTED_RANGE.search(parent.device("serial0").output())
            if m is None:
                raise FuzzError("--cover auto: the target printed no `parse=0x... end=0x...` range before its "
                                "ready marker; give --cover START-END")
            args.cover = [r for r in args.cover if r != AUTO] + [(int(m.group(1), 16), int(m.group(2), 16))]
        symbols = load_symbols(args.symbols) if args.symbols else None
        amap = None
        if args.afl:
            from .afl import AflMap
            amap = AflMap()
        fz = Fuzzer(parent, args.input_addr, args.input_size, sinks=args.sink, budget_s=args.budget_ms / 1000,
                    coverage=args.cover or None, oversize=args.oversize, symbols=symbols,
                    block_hook=amap.hook() if amap is not None and args.cover else None)
        try:
            if amap is not None:
                from .afl import serve_afl
                serve_afl(fz, amap, input_path=args.afl_input, max_execs=args.execs)
                return 0
            if args.replay is not None:
                res = fz.execute(Path(args.replay).read_bytes())
                print(json.dumps(res.to_json(), indent=2))
                return 0
            seeds = _load_corpus(args.corpus)
            print(f"vmfork fuzz: input buffer {fz.input_addr:#x} ({fz.input_size} bytes), {len(seeds)} seeds"
                  + (f", {len(fz.coverage.blocks)} blocks to cover" if fz.coverage else ""), file=sys.stderr)
            st = fz.fuzz(seeds, seconds=args.seconds, rng_seed=args.seed, max_execs=args.execs,
                         stop_on_crash=args.stop_on_crash, out_dir=args.out,
                         status=None if args.quiet else sys.stderr, max_len=args.max_len, keep=args.keep)
            print(json.dumps({"execs": st.execs, "execs_per_s": round(st.execs_per_s, 1), "ok": st.ok,
                              "crashes": st.crashes, "unique_crashes": st.unique_crashes, "hangs": st.hangs,
                              "rejected": st.rejected, "corpus": st.corpus, "blocks_hit": st.blocks_hit,
                              "blocks_total": st.blocks_total, "seconds": round(st.elapsed_s, 3),
                              "reset_share": round(st.reset_share, 3), "first_crash_s": st.first_crash_s,
                              "crash_files": st.crash_files}, indent=2))
            crash = fz.last_crash
            for kept in fz.kept:
                rip = kept.vcpus[0].get_regs().rip
                what = f"{crash.kind} {crash.vector if crash.vector is not None else crash.sink} at " \
                    f"{crash.rip:#x}, " if crash is not None and crash.rip is not None else ""
                print(f"vmfork fuzz: kept the crashing fork {kept.name} ({what}state {kept.state}, vCPU RIP now "
                      f"{rip:#x}) in this process; it goes when the command ends", file=sys.stderr)
            return 0
        finally:
            fz.close()
    finally:
        parent.destroy(tree=True)


def _load_corpus(directory: str | None) -> list[bytes]:
    if directory is None:
        return []
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(directory)
    return [p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()]
