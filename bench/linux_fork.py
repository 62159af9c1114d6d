"""Forks of a booted Linux (256 MiB, the CI kernel), side by side in one run (issue 15's numbers):

  - fork latency (median), and a restore of the same machine's save file;
  - one command in a fork: its wall time, PSS per fork afterwards, and the reset after it, with the fork's written
    pages tracked by dirty rings and by bitmaps (fork(dirty_log=...)).

    .venv/bin/python bench/linux_fork.py [--guest shell|env] [--forks N] [--markdown]

`--guest shell` (default) uses the busybox shell at its prompt and the command `echo $((6*7))`; `--guest env` uses
the initramfs whose /init is guests/linux/vmfork-env (it answers a line on the console: read, ioperm, port reads,
write), for hosts where the shell does not come up. The machine at the prompt is booted once and cached
(vmfork.demo_linux). Timings are noisy on a busy host: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from vmfork import demo_linux  # noqa: E402
from vmfork.fork import VM, kernel_mode_emulated  # noqa: E402
from vmfork.snapshot import savefile  # noqa: E402


def _pss_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _env_initrd() -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_envchannel_linux import env_initrd
    return env_initrd()


def one_command(vm: VM, guest: str, limit: float) -> float:
    """Wall seconds for one command in `vm`; inf when no answer came within `limit`."""
    t0 = time.monotonic()
    if guest == "shell":
        vm.feed_console(b"echo $((6*7))\n")
        out = demo_linux.run_until(vm, demo_linux.PROMPT, limit)
        ok = b"42" in out and demo_linux.PROMPT in out
    else:
        vm.feed_console(b"\n")
        ok = b"VMFORK-ENV-END" in demo_linux.run_until(vm, b"VMFORK-ENV-END", limit)
    return time.monotonic() - t0 if ok else float("inf")


def _secs(values: list[float]) -> str:
    done = [v for v in values if v != float("inf")]
    if not done:
        return f"no answer within the limit ({len(values)} of {len(values)})"
    late = len(values) - len(done)
    return f"{statistics.median(done):.2f} s" + (f" ({late} of {len(values)} gave no answer in time)" if late else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", choices=("shell", "env"), default="shell")
    ap.add_argument("--forks", type=int, default=5, help="forks per dirty-log mode (default 5)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--limit", type=float, default=120, help="seconds a command may take (default 120)")
    args = ap.parse_args()
    if args.guest == "env":
        at = demo_linux.boot_to_prompt(initrd=_env_initrd(), prompt=b"VMFORK-ENV-READY",
                                       cache=ROOT / "build" / "linux-test" / "env")
    else:
        at = demo_linux.boot_to_prompt()
    parent = at.vm
    rows: list[tuple[str, str]] = []
    rows.append((f"{at.how} to the {'prompt' if args.guest == 'shell' else 'ready line'}", f"{at.seconds:.2f} s"))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "linux.save"
            savefile.save(parent, path)
            restores = []
            for _ in range(3):
                t0 = time.perf_counter()
                r = savefile.restore(path)
                restores.append(time.perf_counter() - t0)
                r.destroy()
            template = Path(tmp) / "linux.tpl"
            savefile.save(parent, template, template=True)
            tpl = []
            for _ in range(3):
                t0 = time.perf_counter()
                r = savefile.restore(template)
                tpl.append(time.perf_counter() - t0)
                r.destroy()
        restore_s = statistics.median(restores)
        rows.append(("restore of its save file (median of 3)", f"{restore_s * 1e3:.1f} ms"))
        rows.append(("restore of its template save file (median of 3)", f"{statistics.median(tpl) * 1e3:.1f} ms"))
        for mode in ("bitmap", "ring"):
            parent.prepare_forks(args.forks, dirty_log=mode)    # type: ignore[arg-type]
            forks, times = [], []
            pss0 = _pss_kib()
            for _ in range(args.forks):
                t0 = time.perf_counter()
                forks.append(parent.fork(dirty_log=mode))       # type: ignore[arg-type]
                times.append(time.perf_counter() - t0)
            runs = [one_command(f, args.guest, args.limit) for f in forks]
            pss = (_pss_kib() - pss0) / args.forks
            resets, pages = [], []
            for f in forks:
                t0 = time.perf_counter()
                pages.append(f.reset())
                resets.append(time.perf_counter() - t0)
            again = [one_command(f, args.guest, args.limit) for f in forks[:2]]
            for f in forks:
                f.destroy()
            fork_s = statistics.median(times)
            rows.append((f"[{mode}] fork (median of {args.forks})",
                         f"{fork_s * 1e6:,.0f} µs ({restore_s / fork_s:,.0f}x faster than the restore)"))
            rows.append((f"[{mode}] one command in a fork (median)", _secs(runs)))
            rows.append((f"[{mode}] the same after a reset (median of 2)", _secs(again)))
            rows.append((f"[{mode}] PSS per fork after the command", f"{pss:,.0f} KiB"))
            rows.append((f"[{mode}] reset after the command (median)",
                         f"{statistics.median(resets) * 1e6:,.0f} µs, {statistics.median(pages):.0f} pages"))
    finally:
        parent.destroy(tree=True)
    note = "guest kernel mode emulated (kvm_pvm)" if kernel_mode_emulated() else "hardware virtualization"
    command = "`echo $((6*7))` at the busybox prompt" if args.guest == "shell" else "one line to vmfork-env as /init"
    print(f"Linux 6.1 CI kernel, 256 MiB, 1 vCPU; {note}; command: {command}")
    if args.markdown:
        print("| measurement | result |\n|---|---:|")
        for k, v in rows:
            print(f"| {k} | {v} |")
    else:
        for k, v in rows:
            print(f"  {k:<50} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
