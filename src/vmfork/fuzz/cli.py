"""`vmfork fuzz`: boot a target kernel in-process to its ready marker and fuzz it (or replay one input).

    vmfork fuzz --kernel build/guests/testguest-pvh.elf --cmdline fuzz --corpus seeds/ --out out/ --seconds 30 \\
        --cover 0x10a468-0x10a4df
    vmfork fuzz --kernel build/guests/testguest-pvh.elf --cmdline fuzz --replay out/crashes/vector-14-....bin
    vmfork fuzz --kernel build/guests/testguest-pvh.elf --cmdline 'fuzz 1' --harness int3 --corpus seeds/ --out out/
    vmfork fuzz --kernel build/guests/testguest-pvh.elf --cmdline 'fuzz 2' --symbols testguest.map \
        --start prog_fuzz.input --end prog_fuzz.done --input-addr 0x800000 --input-size 0x10000 \
        --corpus seeds/ --out out/
    vmfork fuzz --domain target --harness int3 --corpus seeds/ --out out/    # a domain paused before its start
    vmfork fuzz --kernel build/guests/testguest-pvh.elf --corpus seeds/ --out out/ --cover auto --jobs 2  # fuzz/jobs.py
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .jobs import Worker

__all__ = ["register_fuzz_commands", "run_fuzz"]


def _int(text: str) -> int:
    return int(text, 0)


AUTO = (-1, -1)       # --cover auto: the range the target printed at boot

# `--replay`'s exit status: what the input did (documented in the README). An error (the target could not be
# brought to its start, the input could not be run) is 1, and a bad command line 2, as for every vmfork command.
REPLAY_STATUS = {"ok": 0, "crash": 10, "hang": 11, "rejected": 12}
REPLAY_ERROR = 1
_PRINTED_RANGE = re.compile(rb"parse=(0x[0-9a-fA-F]+) end=(0x[0-9a-fA-F]+)")


def _positive(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


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


INPUT_FORMATS = ("raw", "len64")


def _input_addr(text: str) -> tuple[int, bool]:
    from .inputbuf import parse_input_addr
    try:
        return parse_input_addr(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _page(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0 or value & 0xFFF:
        raise argparse.ArgumentTypeError(f"{text!r}: must be the address of a 4 KiB page (a multiple of 0x1000)")
    return value


def _faults(text: str) -> bool | tuple[int, ...]:
    if text == "auto":
        return True
    if text == "none":
        return False
    try:
        vectors = tuple(int(v, 0) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, none or vectors like 13,14") from None
    if not all(0 <= v < 32 for v in vectors):
        raise argparse.ArgumentTypeError(f"{text!r}: fault vectors are 0-31")
    return vectors


def _afl_map(text: str) -> Any:
    from .afl import afl_map_arg
    return afl_map_arg(text)


def register_fuzz_commands(sub: Any) -> None:
    """Add `fuzz` to the CLI's subcommands (`sub` is build_parser()'s add_subparsers() object)."""
    p = sub.add_parser("fuzz", help="fuzz a guest paused at its ready marker, in forks (or replay one input)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--kernel", help="target kernel (Multiboot, PVH or Linux), booted in-process")
    target.add_argument("--template", metavar="FILE",
                        help="a template save file of a target paused at its start marker (vmfork save --template): "
                             "each fuzzer maps it copy-on-write (give --cover START-END: a file keeps no console)")
    target.add_argument("--domain", metavar="NAME|DOMID",
                        help="a domain paused at its ready marker (vmfork create): fuzz forks of it in this process, "
                             "shown as its fork `NAME-fuzz-N` while the fuzzer runs; with --harness int3 or --start, "
                             "a domain paused anywhere before that start (its fork runs there, the domain stays "
                             "paused) (--cmdline and --memory are for --kernel)")
    p.add_argument("--cmdline", default=None, help="with --kernel: its command line (default: the test guest's 'fuzz')")
    p.add_argument("--memory", type=int, default=None, help="with --kernel: guest memory in MiB (default 64)")
    p.add_argument("--initrd", "--ramdisk", default=None, metavar="FILE",
                   help="with --kernel: an initial ramdisk (a Linux target's initramfs)")
    p.add_argument("--cpuid", default=None, metavar="POLICY",
                   help="with --kernel: the CPU the vCPUs are shown (libxl syntax, as the config key `cpuid`)")
    p.add_argument("--corpus", default=None, help="directory of seed inputs (default: one input of 8 zero bytes)")
    p.add_argument("--out", default=None, help="output directory: crashes/ (input + .json), corpus/, hangs/")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to fuzz (default 10)")
    p.add_argument("--execs", type=int, default=None, help="stop after this many inputs")
    p.add_argument("--input-addr", "--address", type=_input_addr, default=None, metavar="ADDR|phys:ADDR",
                   help="input buffer: a guest-virtual address, translated through the page tables of the vCPU at "
                        "the start marker (default: RDI there); phys:ADDR for a guest-physical one (KF/x: --address)")
    p.add_argument("--input-size", type=_int, default=None, help="input buffer size (default: RSI at the marker)")
    p.add_argument("--input-limit", type=_positive, default=None, metavar="N",
                   help="longest input, in bytes (KF/x's option); also the buffer size when there is no "
                        "--input-size and no RSI from a marker")
    p.add_argument("--input-format", choices=INPUT_FORMATS, default=None,
                   help="how an input lies in the buffer: raw, its bytes only (KF/x's way; the default with --harness "
                        "int3 and --start), or len64, a u64 little-endian length first (the default with the port "
                        "harness, vmfork's test guests' convention)")
    p.add_argument("--start-byte", type=_int, default=None, metavar="BYTE",
                   help="with --harness int3: the harness's int3 was written over the first byte of an instruction; "
                        "put BYTE back there and start each input on it (KF/x's option)")
    p.add_argument("--faults", type=_faults, default=True, metavar="auto|none|V,V,...",
                   help="catch faults at the guest's own handlers (hardware breakpoints on its IDT entries; no guest "
                        "cooperation): `auto` (default) hooks #PF, #GP, #UD, #DF, #DE (in that order) as far as "
                        "the 4 debug slots allow, or the listed vectors; a fault inside a --cover range (anywhere, "
                        "without --cover) is a crash, signed by the faulting RIP")
    p.add_argument("--no-default-sinks", action="store_true",
                   help="with Linux --symbols (a table with start_kernel): do not add the default sinks (panic, "
                        "oops_begin, __die, kasan_report, the ubsan handlers, report_bug, ...: fuzz/sinks.py)")
    p.add_argument("--stub-addr", type=_page, default=None, metavar="GPA",
                   help="guest-physical page for vmfork's breakpoint stub (hosts that ignore KVM software "
                        "breakpoints), instead of the page vmfork reserves; the guest must not use it")
    p.add_argument("--budget-ms", type=float, default=50.0, help="time per input before it is a hang (default 50)")
    p.add_argument("--sink", "--sink-vaddr", action="append", default=[], metavar="ADDR|SYMBOL",
                   help="a crash sink: reaching it is a crash (repeatable); a symbol must exist in --symbols")
    p.add_argument("--symbols", default=None, help="symbol map or ELF for --sink, --start and --end names")
    p.add_argument("--harness", choices=("port", "int3", "breakpoint"), default=None,
                   help="how the target marks an input's start and end: `port` (default), the vmfork harness port "
                        "0xf6; `int3` (or KF/x's name, `breakpoint`), KF/x's breakpoint harness, int3 with RAX = "
                        "0x13371337 (start) and 0x13371337 or 0x13371338 (end), RDI/RSI = input buffer and size at "
                        "the start (fuzz/harness.py)")
    p.add_argument("--start", default=None, metavar="ADDR|SYMBOL",
                   help="a target without markers: pause the parent at a breakpoint here (input buffer: RDI/RSI "
                        "there, or --input-addr/--input-size); needs --end")
    p.add_argument("--end", action="append", default=[], metavar="ADDR|SYMBOL",
                   help="reaching this address ends an input like the end marker (repeatable)")
    p.add_argument("--budget-instructions", type=_positive, default=None, metavar="N",
                   help="an input that retires N instructions is a hang (kind `instructions`); needs a virtual PMU "
                        "(vmfork doctor: vpmu)")
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
    p.add_argument("--gdb", default=None, metavar="[HOST:]PORT",
                   help="implies --keep: then serve the kept crashing fork to one GDB client on HOST:PORT (loopback "
                        "by default; 0 picks a free port, printed as `gdb: target remote HOST:PORT`), and end when "
                        "it detaches")
    p.add_argument("--replay", default=None, metavar="FILE", help="run this one input and print its outcome (JSON)")
    p.add_argument("--afl", action="store_true",
                   help="be AFL++'s fork server: afl-fuzz -i IN -o OUT -t MS -- vmfork fuzz --afl ... (fuzz/afl.py)")
    p.add_argument("--afl-input", default=None, metavar="FILE",
                   help="with --afl: read each input from FILE (AFL++'s @@) instead of stdin")
    p.add_argument("--afl-map", default=None, type=_afl_map, metavar="auto|ADDR:SIZE",
                   help="with --afl: the target keeps its own AFL-style edge map at guest address ADDR (SIZE bytes, "
                        "a power of two), copied to AFL++ after each input instead of breakpoint coverage; `auto`: "
                        "the map the target printed before its ready marker as `afl-map=0x... size=0x...`")
    p.add_argument("--boot-timeout", type=float, default=None,
                   help="seconds to reach the start marker (default 30): with --kernel, from boot; with --domain "
                        "and --harness int3 or --start, from where the domain is paused")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="fuzz in N processes (default 1), one target each, sharing --out: its corpus (each runs "
                        "what the others found), its crashes (one file per crash) and --seconds, --execs and "
                        "--stop-on-crash; the summary adds each worker's numbers (fuzz/jobs.py)")
    p.add_argument("--name", default=None, metavar="NAME",
                   help="write --out as an AFL++ sync dir: this fuzzer is the instance OUT/NAME (queue/, crashes/, "
                        "hangs/, fuzzer_stats, plot_data: afl-whatsup and afl-plot read it) and imports the other "
                        "instances' queues (afl-fuzz -M/-S ones too); with --jobs N the workers are NAME-1..N "
                        "(default name `vmfork`) (fuzz/syncdir.py)")
    p.add_argument("--main", action="store_true",
                   help="with --name: be the sync dir's main node (is_main_node: afl-fuzz -S secondaries import "
                        "from main nodes only); with --jobs, the first worker")
    p.add_argument("--quiet", action="store_true", help="no live status line")
    p.set_defaults(func=run_fuzz)


def run_fuzz(args: argparse.Namespace) -> int:
    from ..vmi.symbols import load_symbols

    if args.replay is None and args.out is None and not args.afl:
        print("vmfork fuzz: --out DIR is required (or --replay FILE)", file=sys.stderr)
        return 2
    if args.afl_map is not None and (not args.afl or args.cover):
        why = "is for --afl" if not args.afl else "and --cover would both fill AFL++'s map: give one"
        print(f"vmfork fuzz: --afl-map {why}", file=sys.stderr)
        return 2
    if args.boot_timeout is not None and not args.boot_timeout > 0:     # (NaN too)
        print(f"vmfork fuzz: --boot-timeout {args.boot_timeout:g}: must be more than 0 seconds", file=sys.stderr)
        return 2
    if args.domain is not None or args.template is not None:
        given = [opt for opt, value in (("--cmdline", args.cmdline), ("--memory", args.memory),
                                        ("--initrd", args.initrd), ("--cpuid", args.cpuid)) if value is not None]
        if given:
            what = "a domain is already booted (its config sets them)" if args.domain is not None else \
                "a template is a booted machine (its file sets them)"
            print(f"vmfork fuzz: {', '.join(given)} {'is' if len(given) == 1 else 'are'} for --kernel: {what}",
                  file=sys.stderr)
            return 2
        if args.boot_timeout is not None and args.harness in (None, "port") and args.start is None:
            print("vmfork fuzz: --boot-timeout is for --kernel, or for --domain with --harness int3 or --start: a "
                  "domain at its ready marker is fuzzed from there, with no run to a start", file=sys.stderr)
            return 2
    gdb_listen: tuple[str, int] | None = None
    if args.gdb is not None:
        from ..vmi.cli import parse_listen
        from ..vmi.errors import VmiError
        try:
            gdb_listen = parse_listen(args.gdb, "--gdb")
        except VmiError as e:
            print(f"vmfork fuzz: {e}", file=sys.stderr)
            return 2
        if args.afl or args.replay is not None:
            print("vmfork fuzz: --gdb is for a campaign (not --afl or --replay)", file=sys.stderr)
            return 2
    problem = _check_jobs(args) or _check_sync(args)
    if problem is not None:
        print(f"vmfork fuzz: {problem}", file=sys.stderr)
        return 2
    symbols = load_symbols(args.symbols) if args.symbols else None
    problem = _check_harness(args, symbols)       # before booting anything: bad input is one line, exit 2
    if problem is not None:
        print(f"vmfork fuzz: {problem}", file=sys.stderr)
        return 2
    if args.jobs > 1:
        from .jobs import cpu_count, run_jobs
        cpus = cpu_count()
        if args.jobs > cpus:
            print(f"vmfork fuzz: warning: --jobs {args.jobs} on {cpus} CPU{'s' if cpus != 1 else ''}: the workers "
                  "will share them", file=sys.stderr)
        return run_jobs(args, lambda worker: _campaign(args, symbols, gdb_listen, worker))
    code = _campaign(args, symbols, gdb_listen, None)
    if code < 0:                # --afl without a fork server: end as the input ended, once everything is closed
        from .afl import end_as
        return end_as(-code)
    return code


def _check_jobs(args: argparse.Namespace) -> str | None:
    """--jobs: at least 1, and more only for a campaign whose parts can be shared by processes."""
    jobs = getattr(args, "jobs", 1)
    if jobs < 1:
        return f"--jobs {jobs}: must be at least 1"
    if jobs == 1:
        return None
    alone = [opt for opt, given in (("--afl", args.afl), ("--replay", args.replay is not None),
                                    ("--keep", args.keep), ("--gdb", args.gdb is not None)) if given]
    if alone:
        why = {"--afl": "AFL++ runs one fork server per afl-fuzz (run afl-fuzz -M/-S for more cores)",
               "--replay": "one input runs in one process",
               "--keep": "a kept fork lives in the one process that found the crash",
               "--gdb": "a kept fork lives in the one process that found the crash"}[alone[0]]
        return f"--jobs {jobs} and {alone[0]}: {why}"
    return None


def _check_sync(args: argparse.Namespace) -> str | None:
    """--name and --main: an instance name AFL++'s tools can read, for a campaign with --out."""
    from .syncdir import check_name
    if args.main and args.name is None and args.jobs == 1:
        return "--main is for an AFL++ sync dir: give --name NAME too"
    if args.name is None:
        return None
    if args.afl or args.replay is not None:
        return f"--name is for a campaign of vmfork's own (with {'--afl' if args.afl else '--replay'}, afl-fuzz " \
               "-o/-S or nothing writes the instance)"
    if args.keep or args.gdb is not None:
        return "--name and --keep: a kept fork ends the campaign at its first crash; fuzz without --name to keep one"
    return check_name(args.name) if args.jobs == 1 else check_name(f"{args.name}-{args.jobs}")


def _campaign(args: argparse.Namespace, symbols: Any, gdb_listen: tuple[str, int] | None,
              worker: Worker | None) -> int:
    """Boot or take the target and fuzz it in this process: the whole campaign, or (`worker`) one process's part
    of a campaign of --jobs N (fuzz/jobs.py), which reports to the CLI process instead of printing a summary.
    A negative result -S: --afl ran one input without a fork server, and the process is to end killed by signal S
    (run_fuzz does that once the target is closed)."""
    from .loop import Fuzzer, FuzzError
    from .target import open_target
    harness = args.harness_spec
    target = open_target(args)          # the parent, paused at its start marker: booted here, or a domain's fork
    parent = target.vm
    try:
        if AUTO in args.cover:
            m = _PRINTED_RANGE.search(target.console())
            if m is None:
                raise FuzzError(f"--cover auto: {target.what} printed no `parse=0x... end=0x...` range on its "
                                "console before its ready marker; give --cover START-END")
            args.cover = [r for r in args.cover if r != AUTO] + [(int(m.group(1), 16), int(m.group(2), 16))]
        amap = None
        guest_map = None
        if args.afl:
            from .afl import AflMap
            amap = AflMap()
            if args.afl_map is not None:
                from .afl import guest_map as check_guest_map
                guest_map = check_guest_map(args.afl_map, parent, target.console(), target.what)
        address, physical = args.input_addr if args.input_addr is not None else (None, False)
        size = args.input_size
        if size is None and address is not None and args.input_limit is not None:
            size = args.input_limit         # KF/x: --address and --input-limit say it all
        fz = Fuzzer(parent, address, size, sinks=args.sinks, budget_s=args.budget_ms / 1000,
                    coverage=args.cover or None, oversize=args.oversize, symbols=symbols,
                    block_hook=amap.hook() if amap is not None and args.cover else None, ends=harness.ends,
                    int3_markers=harness.kind == "int3", budget_instructions=args.budget_instructions,
                    input_format=args.input_format, input_physical=physical, faults=args.faults,
                    input_limit=args.input_limit, stub_gpa=args.stub_addr)
        try:
            if amap is not None:
                from .afl import forkserver_present, run_once, serve_afl
                if not forkserver_present():        # afl-showmap with one input: one run, no fork server
                    return -run_once(fz, amap, input_path=args.afl_input, guest=guest_map)
                serve_afl(fz, amap, input_path=args.afl_input, max_execs=args.execs, guest=guest_map)
                return 0
            if args.replay is not None:
                res = fz.execute(Path(args.replay).read_bytes())
                print(json.dumps(res.to_json(), indent=2))
                return REPLAY_STATUS.get(res.outcome, REPLAY_ERROR)
            named = _load_corpus(args.corpus)
            seeds = [data for _, data in named]
            instance = None                 # this process's AFL++ instance OUT/NAME (fuzz/syncdir.py), locked
            if worker is not None or args.name is not None:
                instance = _instance(args, worker.name if worker is not None else args.name,
                                     main=args.main and (worker is None or worker.index == 0))
            if worker is None or worker.index == 0:
                print(f"vmfork fuzz: input buffer {fz.input.describe()}, {len(seeds)} seeds"
                      + (f", {len(fz.coverage.blocks)} blocks to cover" if fz.coverage else "")
                      + (f", {harness.kind} harness" if harness.kind != "port" else "")
                      + f", {fz.describe_faults()}"
                      + (f", {worker.jobs} jobs" if worker is not None else ""), file=sys.stderr, flush=True)
            if worker is not None:          # the campaign's --execs and status line are the CLI process's
                # (a worker's own numbers go only to its held fork's stats file, if it holds one: target.status)
                assert instance is not None
                wsync = worker.sync(instance)
                st = fz.fuzz(instance.initial_corpus(named), seconds=args.seconds, rng_seed=worker.seed,
                             stop_on_crash=args.stop_on_crash, out_dir=instance.scratch, max_len=args.max_len,
                             sync=wsync, progress=target.progress())
                wsync.finish(st)
                worker.finish(st, sorted(fz.coverage.hit) if fz.coverage is not None else [])
                return 0
            sync = None
            out_dir = args.out
            if instance is not None:        # one AFL++ instance of the sync dir --out
                from .syncdir import InstanceSync
                sync = InstanceSync(instance)
                seeds = instance.initial_corpus(named)
                out_dir = str(instance.scratch)
            from .status import LiveView, ProgressView
            view = None if args.quiet else LiveView.open(sys.stderr, args.name or Path(str(target.what)).name)
            progress = target.progress()
            if view is not None:
                progress = _both(ProgressView(view, args.name or ""), progress)
            handlers: dict[int, Any] = {}
            if sync is not None and threading.current_thread() is threading.main_thread():
                handlers = {sig: signal.signal(sig, sync.stop_soon) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                st = fz.fuzz(seeds, seconds=args.seconds, rng_seed=args.seed, max_execs=args.execs,
                             stop_on_crash=args.stop_on_crash, out_dir=out_dir,
                             status=None if args.quiet or view is not None else sys.stderr, progress=progress,
                             max_len=args.max_len, keep=args.keep or gdb_listen is not None, sync=sync)
                if view is not None and progress is not None:
                    progress(st)            # the last numbers stay on the terminal
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
                if view is not None:
                    view.close()
            if sync is not None:
                sync.finish(st)
            print(json.dumps({"execs": st.execs, "execs_per_s": round(st.execs_per_s, 1), "ok": st.ok,
                              "crashes": st.crashes, "unique_crashes": st.unique_crashes, "hangs": st.hangs,
                              "rejected": st.rejected, "corpus": st.corpus, "blocks_hit": st.blocks_hit,
                              "blocks_total": st.blocks_total, "seconds": round(st.elapsed_s, 3),
                              "reset_share": round(st.reset_share, 3), "first_crash_s": st.first_crash_s,
                              "crash_files": st.crash_files}, indent=2))
            if sync is not None and sync.stopping:     # Ctrl-C or SIGTERM: the numbers so far, then as interrupted
                print("vmfork: interrupted", file=sys.stderr)
                return 130
            crash = fz.last_crash
            for kept in fz.kept:
                rip = kept.vcpus[0].get_regs().rip
                what = f"{crash.kind} {crash.vector if crash.vector is not None else crash.sink} at " \
                    f"{crash.rip:#x}, " if crash is not None and crash.rip is not None else ""
                print(f"vmfork fuzz: kept the crashing fork {kept.name} ({what}state {kept.state}, vCPU RIP now "
                      f"{rip:#x}) in this process; it goes when the command ends", file=sys.stderr)
            if gdb_listen is not None:
                if not fz.kept:
                    print("vmfork fuzz: --gdb: no crash, so no fork to inspect", file=sys.stderr)
                    return 1
                _serve_gdb_once(fz.kept[0], *gdb_listen)
            return 0
        finally:
            fz.close()
    finally:
        target.close()


def _check_harness(args: argparse.Namespace, symbols: Any) -> str | None:
    """Set `args.harness_spec` (a fuzz.harness.Harness, its addresses resolved) from --harness/--start/--end, or
    say what is wrong with them or with --budget-instructions on this host."""
    from .harness import Harness, resolve
    from .loop import FuzzError
    from .sinks import resolve_sinks
    try:
        start = resolve(args.start, symbols, "start") if args.start is not None else None
        ends = tuple(resolve(e, symbols, "end") for e in args.end)
        if start is not None and not ends:
            return "--start needs at least one --end (where an input is over)"
        harness = Harness.of(args.harness, start, ends, symbols, start_byte=args.start_byte,
                             stub_gpa=args.stub_addr)
        args.sinks = resolve_sinks(args.sink, symbols, defaults=not args.no_default_sinks)
    except FuzzError as e:
        return str(e)
    if args.budget_instructions is not None:
        from ..doctor import probe_host
        report = probe_host(cached=True)
        if not report.supports("vpmu"):
            return f"--budget-instructions needs a virtual PMU, and this host has none: {report.reason('vpmu')}"
    args.harness_spec = harness
    return None


def _load_corpus(directory: str | None) -> list[tuple[str, bytes]]:
    """The seeds, as (file name, content)."""
    if directory is None:
        return []
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(directory)
    return [(p.name, p.read_bytes()) for p in sorted(d.iterdir()) if p.is_file()]


def _both(first: Callable[[Any], None], second: Callable[[Any], None] | None) -> Callable[[Any], None]:
    """Two progress callbacks as one (the terminal view and a held fork's stats file)."""
    if second is None:
        return first

    def both(st: Any) -> None:
        first(st)
        second(st)
    return both


def _instance(args: argparse.Namespace, name: str, *, main: bool) -> Any:
    """This process's AFL++ instance directory OUT/NAME (fuzz/syncdir.py)."""
    from .syncdir import InstanceDir
    return InstanceDir(Path(args.out), name, command_line=["vmfork", *sys.argv[1:]],
                       exec_timeout_ms=int(args.budget_ms), main=main)


def _serve_gdb_once(vm: Any, host: str, port: int) -> None:
    """The kept crashing fork, to one GDB client (like `vmfork gdbserver`, but in this process)."""
    from ..vmi.gdbserver import GdbServer
    server = GdbServer(vm, host, port)
    try:
        print(f"gdb: target remote {server.host}:{server.port}", flush=True)
        server.serve_one()
    finally:
        server.close()
