"""Forks of a booted Linux (256 MiB, the CI kernel, 1 vCPU), side by side in one run (issue 15's numbers):

  - a restore of the same machine's save file (and of its template save file), and fork latency (median and p90 of
    `--latency-forks` forks, prepared with prepare_forks as the demo does);
  - one command in each of `--forks` forks: its wall time and where it went (the host kernel, i.e. KVM running and,
    where kernel mode is emulated, emulating the guest; vmfork's exit handling; waiting for a CPU), the PSS per fork
    afterwards (and how much of it is the fork's own copies of pages it wrote), the reset after it, the same command
    after the reset; with the fork's written pages tracked by bitmaps and by dirty rings (fork(dirty_log=...));
  - QEMU's migration clone of the same guest (`x-ignore-shared`: RAM in a shared memory-backend-file, only device
    state migrated, the clone started with -incoming on the same file), which needs QEMU to bring the same kernel to
    its prompt first: where guest kernel mode is emulated (kvm_pvm) QEMU dies on the way (no fallbacks for what the
    host cannot emulate), and the row says where.

    .venv/bin/python bench/linux_fork.py [--guest shell|env] [--forks N] [--latency-forks N] [--modes bitmap,ring]
                                         [--qemu-seconds S] [--markdown]

`--guest shell` (default) uses the busybox shell at its prompt and the command `echo $((6*7))` (a builtin: no new
process); `--guest env` uses the initramfs whose /init is guests/linux/vmfork-env (it answers a line on the console:
read, ioperm, port reads, write). The machine at the prompt is booted once and cached (vmfork.demo_linux). Timings
are noisy on a busy host: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from linux import QEMU_CPU, _qemu_instruction  # noqa: E402
from rows import print_rows  # noqa: E402

from vmfork import demo_linux  # noqa: E402
from vmfork.fork import VM, kernel_mode_emulated  # noqa: E402
from vmfork.snapshot import savefile  # noqa: E402


def _smaps_kib(*fields: str) -> dict[str, int]:
    out = dict.fromkeys(fields, 0)
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            name = line.split(":")[0]
            if name in out:
                out[name] = int(line.split()[1])
    return out


def _env_initrd() -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_envchannel_linux import env_initrd
    return env_initrd()


class Command:
    """One command in a fork, timed: wall seconds (inf when no answer came within the limit), CPU seconds in the
    host kernel and in this process's user space meanwhile, and the VM exits it took."""

    def __init__(self, vm: VM, guest: str, limit: float) -> None:
        exits, cpu, t0 = vm.exits, os.times(), time.monotonic()
        if guest == "shell":
            vm.feed_console(b"echo $((6*7))\n")
            out = demo_linux.run_until(vm, demo_linux.PROMPT, limit)
            ok = b"42" in out and demo_linux.PROMPT in out
        else:
            vm.feed_console(b"\n")
            ok = b"VMFORK-ENV-END" in demo_linux.run_until(vm, b"VMFORK-ENV-END", limit)
        end = os.times()
        self.wall = time.monotonic() - t0 if ok else float("inf")
        self.host_kernel = end.system - cpu.system
        self.user = end.user - cpu.user
        self.exits = vm.exits - exits


def _secs(values: list[float]) -> str:
    done = [v for v in values if v != float("inf")]
    if not done:
        return f"no answer within the limit ({len(values)} of {len(values)})"
    late = len(values) - len(done)
    return f"{statistics.median(done):.2f} s" + (f" ({late} of {len(values)} gave no answer in time)" if late else "")


def _median_s(make: Callable[[], object], n: int) -> float:
    """Median wall seconds of n calls of `make`; what it returns is destroyed."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        made = make()
        times.append(time.perf_counter() - t0)
        made.destroy()      # type: ignore[attr-defined]
    return statistics.median(times)


def fork_rows(parent: VM, mode: str, args: argparse.Namespace, restore_s: float) -> list[tuple[str, str]]:
    rows = []
    parent.prepare_forks(args.latency_forks, dirty_log=mode)        # type: ignore[arg-type]
    times = []
    forks = []
    for _ in range(args.latency_forks):
        t0 = time.perf_counter()
        forks.append(parent.fork(dirty_log=mode))                    # type: ignore[arg-type]
        times.append(time.perf_counter() - t0)
    for f in forks:
        f.destroy()
    times.sort()
    fork_s = statistics.median(times)
    rows.append((f"[{mode}] fork (median of {len(times)}; p90)",
                 f"{fork_s * 1e6:,.0f} µs; {times[int(len(times) * 0.9)] * 1e6:,.0f} µs "
                 f"({restore_s / fork_s:,.0f}x faster than the restore)"))
    parent.prepare_forks(args.forks, dirty_log=mode)                 # type: ignore[arg-type]
    before = _smaps_kib("Pss")
    forks = [parent.fork(dirty_log=mode) for _ in range(args.forks)]  # type: ignore[arg-type]
    runs = [Command(f, args.guest, args.limit) for f in forks]
    after = _smaps_kib("Pss")
    ram = [demo_linux.ram_kib(f) for f in forks]
    resets, pages = [], []
    for f in forks:
        t0 = time.perf_counter()
        pages.append(f.reset())
        resets.append(time.perf_counter() - t0)
    answered = any(r.wall != float("inf") for r in runs)      # else the same would time out again after a reset
    again = [Command(f, args.guest, args.limit) for f in forks[:2]] if answered else []
    for f in forks:
        f.destroy()
    rows.append((f"[{mode}] one command in a fork (median of {len(runs)})", _secs([r.wall for r in runs])))
    wall = sum(r.wall for r in runs)
    if wall != float("inf"):
        rows.append((f"[{mode}]   of that: host kernel / vmfork / waiting for a CPU",
                     f"{sum(r.host_kernel for r in runs) / wall:.0%} / {sum(r.user for r in runs) / wall:.0%} / "
                     f"{1 - sum(r.host_kernel + r.user for r in runs) / wall:.0%}, "
                     f"{statistics.median(r.exits for r in runs):,.0f} exits"))
    if again:
        rows.append((f"[{mode}] the same after a reset (median of {len(again)})", _secs([r.wall for r in again])))
    rows.append((f"[{mode}] PSS per fork after the command: its RAM view",
                 f"{statistics.mean(r[0] for r in ram):,.0f} KiB, of which {statistics.mean(r[1] for r in ram):,.0f} "
                 f"KiB its own copies of pages it wrote (the rest: its share of {args.forks} forks' reads)"))
    rows.append((f"[{mode}]   the whole process's PSS growth per fork",
                 f"{(after['Pss'] - before['Pss']) / args.forks:,.0f} KiB (with the VM objects and the shells "
                 "the pool made meanwhile)"))
    rows.append((f"[{mode}] reset after the command (median)",
                 f"{statistics.median(resets) * 1e6:,.0f} µs, {statistics.median(pages):.0f} pages"))
    return rows


def qemu_clone(guest: str, seconds: float) -> str:
    """QEMU's x-ignore-shared clone of the same guest, as far as it goes here: QEMU boots the same kernel and
    initramfs with its RAM in a shared memory-backend-file (what the clone would map), until the prompt or
    `seconds`. Returns the row's text."""
    if guest != "shell":
        return "not tried for --guest env"
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        cmd = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", QEMU_CPU, "-m", "256", "-smp", "1", "-nodefaults",
               "-object", f"memory-backend-file,id=ram,size=256M,mem-path={tmp}/ram,share=on",
               "-machine", "pc,memory-backend=ram", "-display", "none", "-no-reboot", "-serial", "stdio",
               "-kernel", str(demo_linux.KERNEL), "-initrd", str(demo_linux.INITRD),
               "-append", demo_linux.CMDLINE]
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None and p.stderr is not None
        os.set_blocking(p.stdout.fileno(), False)
        os.set_blocking(p.stderr.fileno(), False)
        out, err = bytearray(), bytearray()
        try:
            while time.monotonic() - t0 < seconds and p.poll() is None:
                time.sleep(0.25)
                out += p.stdout.read() or b""
                err += p.stderr.read() or b""
                if demo_linux.PROMPT in out or b"KVM internal error" in err:
                    time.sleep(0.5)
                    err += p.stderr.read() or b""
                    break
        finally:
            took = time.monotonic() - t0
            p.kill()
            p.wait()
    text = err.decode(errors="replace")
    if demo_linux.PROMPT in out:
        return (f"QEMU reached the prompt in {took:.0f} s; the clone itself (migrate with x-ignore-shared, -incoming "
                "on the same file) is not measured by this script yet")
    last = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("[")]
    where = f"; last kernel line `{last[-1].strip()}`" if last else ""
    if "KVM internal error" in text:
        line = next((ln for ln in text.splitlines() if "KVM internal error" in ln), "KVM internal error")
        return (f"not possible here: QEMU -accel kvm cannot boot the guest to its prompt: {line.strip()} at "
                f"{took:.0f} s, {_qemu_instruction(text)}{where}")
    return f"not possible here: no prompt within {took:.0f} s{where}: {text.strip()[-200:]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", choices=("shell", "env"), default="shell")
    ap.add_argument("--forks", type=int, default=3, help="forks that run a command, per dirty-log mode (default 3)")
    ap.add_argument("--latency-forks", type=int, default=20, help="forks timed per mode (default 20)")
    ap.add_argument("--modes", default="bitmap,ring", help="dirty-log modes, comma-separated (default bitmap,ring)")
    ap.add_argument("--qemu-seconds", type=float, default=150, help="QEMU's time to the prompt (default 150; 0: skip)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--limit", type=float, default=120, help="seconds a command may take (default 120)")
    args = ap.parse_args()
    modes = args.modes.split(",")
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
            path, template = Path(tmp) / "linux.save", Path(tmp) / "linux.tpl"
            savefile.save(parent, path)
            savefile.save(parent, template, template=True)
            restore_s = _median_s(lambda: savefile.restore(path), 3)
            template_s = _median_s(lambda: savefile.restore(template), 3)
        rows.append(("restore of its save file (median of 3)", f"{restore_s * 1e3:.1f} ms"))
        rows.append(("restore of its template save file (median of 3)", f"{template_s * 1e3:.1f} ms"))
        for mode in modes:
            rows += fork_rows(parent, mode, args, restore_s)
    finally:
        parent.destroy(tree=True)
    if args.qemu_seconds > 0:
        rows.append(("QEMU x-ignore-shared clone of the same guest", qemu_clone(args.guest, args.qemu_seconds)))
    note = "guest kernel mode emulated (kvm_pvm)" if kernel_mode_emulated() else "hardware virtualization"
    command = "`echo $((6*7))` at the busybox prompt" if args.guest == "shell" else "one line to vmfork-env as /init"
    print_rows(f"Linux 6.1 CI kernel, 256 MiB, 1 vCPU; {note}; command: {command}", rows, markdown=args.markdown,
               width=56)
    return 0


if __name__ == "__main__":
    sys.exit(main())
