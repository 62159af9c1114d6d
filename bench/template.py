#!/usr/bin/env python3
"""Template restores (a save file mapped copy-on-write) side by side with classic restores and forks, in one run.

    .venv/bin/python bench/template.py                 # table on stdout, progress on stderr
    .venv/bin/python bench/template.py --markdown      # a section for docs/benchmarks.md
    .venv/bin/python bench/template.py --procs 100     # the memory of N processes restoring one file (default 100)

The guest is the `demo` test program at its ready marker (256 MiB and 1 GiB). Rounds interleave the ways to get a
machine at that point:
  - fork: `parent.fork()` of the booted parent (shells prepared ahead, as a fuzzer has them);
  - template restore: `restore(template)`: the file is mapped MAP_PRIVATE (its checksum was checked once, before
    the rounds, and is cached);
  - classic restore: `restore(save file)`: the non-zero pages are read into fresh RAM;
each machine then runs the demo input to its exit (checked), and is destroyed. "New process" rows spawn
`python -c` that imports vmfork and restores the file, from spawn to its "restored" line.

Memory: N processes each restore the same file and run the demo to its exit, then stay alive while their
/proc/PID/smaps_rollup is read: total PSS and private memory, template against classic, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from guest import run_to_exit, write_input  # noqa: E402
from vmfork.fork import VM  # noqa: E402
from vmfork.snapshot import restore, save  # noqa: E402

GUEST = ROOT / "build" / "guests" / "testguest-pvh.elf"
PY = str(ROOT / ".venv" / "bin" / "python")


def progress(msg: str) -> None:
    print(f"[template] {msg}", file=sys.stderr, flush=True)


def boot(mib: int) -> tuple[VM, int]:
    vm = VM.create(memory_mib=mib, name=f"demo{mib}")
    vm.load_kernel(GUEST, cmdline="demo")
    ev = vm.run(timeout=30)
    assert ev.reason == "harness-start", ev
    return vm, vm.vcpus[0].get_regs().rdi


def timed(make: object, buf: int) -> float:
    t0 = time.perf_counter()
    vm = make()  # type: ignore[operator]
    t = time.perf_counter() - t0
    write_input(vm, buf, b"bench")
    run_to_exit(vm)
    vm.destroy()
    return t


CHILD = ("import sys, time; t0 = time.perf_counter(); from vmfork.snapshot import restore; "
         "vm = restore(sys.argv[1]); print('restored', time.perf_counter() - t0, flush=True); "
         "sys.stdin.readline()")

RUNNER = ("import sys; from vmfork.snapshot import restore; vm = restore(sys.argv[1]); "
          "pages = vm.memory.pages if sys.argv[2] == 'all' else vm.memory.pages[4096:4096 + 16384]; "
          "total = int(pages.sum(dtype='uint64')); print('done', total, flush=True); sys.stdin.readline()")
# --touch data: only the 64 MiB `pattern` wrote from PATTERN_ADDR (16 MiB, guests/testguest/layout.inc): a classic
# restore's untouched zero pages then cost nothing either, so 100 of them fit in this host's memory (all: 100 x 274 MiB)


def process_restore(path: Path) -> float:
    t0 = time.perf_counter()
    p = subprocess.Popen([PY, "-c", CHILD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdin is not None
    line = p.stdout.readline()
    t = time.perf_counter() - t0
    assert line.startswith("restored"), line
    p.stdin.close()
    p.wait()
    return t


def memory_of(path: Path, n: int, touch: str = "all") -> dict[str, float]:
    """N processes restoring `path`, each reading all of its guest's RAM (or `touch` "data": the pattern's 64 MiB):
    total PSS and private memory (MiB)."""
    procs = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([PY, "-c", RUNNER, str(path), touch], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True))
        sums = set()
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline().split()
            assert line and line[0] == "done", line
            sums.add(line[1])
        assert len(sums) == 1, sums                      # every process saw the same RAM
        pss = private = 0
        for p in procs:
            fields = {}
            for line in Path(f"/proc/{p.pid}/smaps_rollup").read_text().splitlines()[1:]:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0])
            pss += fields["Pss"]
            private += fields["Private_Clean"] + fields["Private_Dirty"]
        return {"pss_mib": pss / 1024, "private_mib": private / 1024}
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in procs:
            p.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--memory", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024])
    ap.add_argument("--procs", type=int, default=100)
    ap.add_argument("--touch", choices=("all", "data"), default=None,
                    help="what each of the --procs processes reads of its guest's RAM: all of it, or the 64 MiB of "
                         "data (default: all up to 20 processes, data above: 100 classic restores reading all "
                         "256 MiB would need 27 GiB)")
    args = ap.parse_args(argv)
    os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="vmfork-bench-cache-"))
    rows: list[tuple[str, str, str]] = []
    mem_rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="vmfork-bench-") as d:
        for mib in args.memory:
            parent, buf = boot(mib)
            tpl, sav = Path(d) / f"t{mib}.tpl", Path(d) / f"t{mib}.sav"
            save(parent, tpl, template=True)
            save(parent, sav)
            restore(tpl).destroy()                      # checks the file once (cached)
            parent.prepare_forks(4)
            samples: dict[str, list[float]] = {"fork": [], "template": [], "classic": [], "proc-template": [],
                                               "proc-classic": []}
            for r in range(args.rounds):
                progress(f"{mib} MiB round {r + 1}/{args.rounds}")
                samples["fork"].append(timed(parent.fork, buf))
                samples["template"].append(timed(lambda tpl=tpl: restore(tpl), buf))
                samples["classic"].append(timed(lambda sav=sav: restore(sav), buf))
                samples["proc-template"].append(process_restore(tpl))
                samples["proc-classic"].append(process_restore(sav))
            med = {k: statistics.median(v) for k, v in samples.items()}
            for key, label in (("fork", "fork (pooled shell)"), ("template", "template restore"),
                               ("classic", "classic restore")):
                rows.append((f"{mib} MiB", label, f"{med[key] * 1e3:.2f} ms  ({med['classic'] / med[key]:.1f}x "
                             "classic)"))
            rows.append((f"{mib} MiB", "new process, template",
                         f"{med['proc-template'] * 1e3:.0f} ms  ({med['proc-classic'] / med['proc-template']:.2f}x "
                         "classic)"))
            rows.append((f"{mib} MiB", "new process, classic", f"{med['proc-classic'] * 1e3:.0f} ms"))
            parent.destroy()
        if args.procs:
            # A guest with data in its RAM: `pattern` writes 64 MiB of a 256 MiB guest, then exits (paused there).
            vm = VM.create(memory_mib=256, name="pattern")
            vm.load_kernel(GUEST, cmdline="pattern 1 64")
            assert vm.run(timeout=60).reason == "exit"
            tpl, sav = Path(d) / "pattern.tpl", Path(d) / "pattern.sav"
            save(vm, tpl, template=True)
            save(vm, sav)
            vm.destroy()
            restore(tpl).destroy()
            touch = args.touch or ("all" if args.procs <= 20 else "data")
            read = "all RAM read" if touch == "all" else "its 64 MiB of data read"
            progress(f"{args.procs} processes restoring the template")
            t = memory_of(tpl, args.procs, touch)
            progress(f"{args.procs} processes restoring the save file")
            c = memory_of(sav, args.procs, touch)
            what = f"{args.procs} x 256 MiB (64 MiB data)"
            mem_rows.append((what, f"template, {read}",
                             f"PSS {t['pss_mib']:.0f} MiB, private {t['private_mib']:.0f} MiB"))
            mem_rows.append((what, f"classic, {read}",
                             f"PSS {c['pss_mib']:.0f} MiB, private {c['private_mib']:.0f} MiB "
                             f"({c['pss_mib'] / t['pss_mib']:.2f}x the template's PSS)"))
    if args.markdown:
        print("| guest | what | median |\n|---|---|---|")
        for row in rows + mem_rows:
            print(f"| {' | '.join(row)} |")
    else:
        for row in rows + mem_rows:
            print(f"{row[0]:>14}  {row[1]:<24} {row[2]}")
    print(json.dumps({"load": os.getloadavg()}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
