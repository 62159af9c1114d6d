"""The Linux module target of issue 13 (guests/linux-kfx/): execs/s and time to the planted bug, with the Multiboot
KF/x target in kernel mode (guests/kfx, `kernel` on its command line) measured side by side in the same run.

    .venv/bin/python bench/linux_kfx.py [--seconds 20] [--runs 3] [--restore FILE] [--save FILE] [--markdown]

The Linux target boots the CI kernel (build/linux-min/vmlinux, CONFIG_MODULES=y) with the kfx initramfs
(build/linux-kfx/initramfs.cpio: a static /init that finit_module()s kfx_target.ko) to the module's start marker,
or restores a machine saved there (`--restore`, e.g. the test's cache in build/linux-kfx-test/; `--save` writes one).
Each input runs the module's parser in guest KERNEL mode: on hosts where kernel mode is emulated (kvm_pvm: about
1-2 us an instruction, an exit to user space for every int3) that is what the numbers measure, not native speed.
Rows: the per-input rate of one valid input run over and over (no coverage, fault breakpoints on), and campaigns
from that valid seed with --cover on the module's code until the planted bug (the median of `--runs`).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from rows import print_rows  # noqa: E402

from vmfork.fork import VM  # noqa: E402
from vmfork.fuzz import Fuzzer  # noqa: E402
from vmfork.fuzz.harness import Harness, run_to_start  # noqa: E402
from vmfork.fuzz.sinks import resolve_sinks  # noqa: E402
from vmfork.snapshot import savefile  # noqa: E402
from vmfork.vmi.symbols import SymbolTable  # noqa: E402

KERNEL = ROOT / "build" / "linux-min" / "vmlinux"
SYSTEM_MAP = ROOT / "build" / "linux-min" / "System.map"
INITRD = ROOT / "build" / "linux-kfx" / "initramfs.cpio"
CPUID = "default,tsc-deadline=0"            # as tests/linux_guest.py (TSC-deadline gives no timer here)
VALID = bytes.fromhex("0103414243" "020300050a" "0000")
KFX_MB = ROOT / "build" / "guests" / "kfx-multiboot.elf"
KFX_MB_VALID = b"A" * 18


def _range(console: bytes) -> tuple[int, int]:
    m = re.search(rb"parse=0x([0-9a-f]+) end=0x([0-9a-f]+)", console)
    if m is None:
        raise SystemExit("the target printed no parse=0x... end=0x... range")
    return int(m.group(1), 16), int(m.group(2), 16)


def linux_parent(args: argparse.Namespace) -> tuple[VM, str]:
    if args.restore:
        t0 = time.monotonic()
        vm = savefile.restore(args.restore)
        return vm, f"restored in {time.monotonic() - t0:.2f} s"
    subprocess.run([str(ROOT / "guests" / "linux-kfx" / "build.sh")], check=True)
    vm = VM.create(memory_mib=256, vcpus=1, name="linux-kfx", cpuid=CPUID)
    vm.load_kernel(KERNEL, initrd=str(INITRD), cmdline="console=ttyS0")
    t0 = time.monotonic()
    run_to_start(vm, Harness("int3"), timeout=args.boot_timeout)
    how = f"booted to the start marker in {time.monotonic() - t0:.0f} s"
    if args.save:
        savefile.save(vm, args.save)
    return vm, how


def kfx_parent() -> VM:
    vm = VM.create(memory_mib=64, name="kfx-kernel")
    vm.load_kernel(KFX_MB, cmdline="kernel")
    run_to_start(vm, Harness("int3"), timeout=60)
    return vm


def per_input(fz: Fuzzer, data: bytes, seconds: float) -> float:
    """Inputs per second of one input run over and over."""
    fz.execute(data)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fz.execute(data)
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0, help="per-input measurement, seconds (default 20)")
    p.add_argument("--runs", type=int, default=3, help="campaigns to the planted bug (default 3)")
    p.add_argument("--cap", type=float, default=300.0, help="a campaign gives up after this long (default 300 s)")
    p.add_argument("--restore", default=None, help="a machine saved at the module's start marker")
    p.add_argument("--save", default=None, help="save the booted machine here")
    p.add_argument("--boot-timeout", type=float, default=900.0)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()

    symbols = SymbolTable.load(SYSTEM_MAP)
    linux, how = linux_parent(args)
    console = bytes(linux.device("serial0").output()) if not args.restore else b""
    if not console:
        log = Path(args.restore).with_suffix(".log") if args.restore else None
        console = log.read_bytes() if log is not None and log.exists() else b""
    parse = _range(console)
    mb = kfx_parent()
    rows: list[tuple[str, str]] = []
    try:
        # per-input cost, side by side (alternating halves, so the host's load falls on both alike)
        lk, mk = [], []
        with Fuzzer(linux, int3_markers=True, symbols=symbols, sinks=resolve_sinks([], symbols),
                    budget_s=2.0) as lf, Fuzzer(mb, int3_markers=True, budget_s=2.0, coverage=None) as mf:
            for _ in range(2):
                lk.append(per_input(lf, VALID, args.seconds / 4))
                mk.append(per_input(mf, KFX_MB_VALID, args.seconds / 4))
        lrate, mrate = statistics.mean(lk), statistics.mean(mk)
        rows.append(("Linux module target, one valid input over and over (kernel mode emulated here)",
                     f"{lrate:,.0f} execs/s"))
        rows.append(("Multiboot kfx target in kernel mode, the same way (side by side)", f"{mrate:,.0f} execs/s"))
        rows.append(("ratio Linux module / Multiboot kernel-mode", f"{lrate / mrate:.2f}x"))
        # campaigns to the planted bug
        found: list[float] = []
        rates: list[float] = []
        misses = 0
        for run in range(args.runs):
            with Fuzzer(linux, int3_markers=True, coverage=[parse], symbols=symbols,
                        sinks=resolve_sinks([], symbols), budget_s=2.0) as fz:
                st = fz.fuzz([VALID], seconds=args.cap, rng_seed=run + 1, stop_on_crash=True, max_len=64)
            rates.append(st.execs / st.elapsed_s)
            if st.first_crash_s is None:
                misses += 1
            else:
                found.append(st.first_crash_s)
        bug = (f"{statistics.median(found):.1f} s (median of {len(found)})" if found else "not found") + (
            f", {misses} of {args.runs} runs did not find it within {args.cap:.0f} s" if misses else "")
        rows.append(("Linux module target, campaign with --cover on the module: execs/s (median)",
                     f"{statistics.median(rates):,.0f} execs/s"))
        rows.append(("Linux module target: time to the planted bug from a valid seed", bug))
    finally:
        linux.destroy(tree=True)
        mb.destroy(tree=True)
    print_rows(f"# Linux: {how}", rows, markdown=args.markdown, width=92)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
