#!/usr/bin/env python3
"""Linux boot to a busybox shell: vmfork side by side with `qemu-system-x86_64 -accel kvm`, same kernel, same
initramfs, same CPU features off, in one run (both start together and run concurrently, one core each).

    .venv/bin/python bench/linux.py                          # Debian's cloud kernel (build/linux/vmlinux)
    .venv/bin/python bench/linux.py --kernel build/linux-min/vmlinux --seconds 600    # the CI kernel
    .venv/bin/python bench/linux.py --markdown               # a section for docs/benchmarks.md

Each side boots with `console=ttyS0` (plus `--cmdline`), the shell initramfs (build/linux/initramfs-shell.cpio.gz:
`/init` prints VMFORK-SHELL-READY and runs `sh` with the prompt `vmfork# `), and at the prompt gets
`uname -r; cat /proc/cpuinfo | grep -c processor` typed on its serial console. Milestones are the times (from the
start, wall clock) at which these reach the console: the banner, "Run /init as init process", the ready line, the
prompt, the answer. QEMU has no fallbacks for what this host cannot emulate in guest kernel mode, so where kernel
mode is emulated it stops with "KVM internal error" (QEMU pauses the guest and prints its registers): the report
says when and at which instruction (its Code= bytes decoded with capstone), and QEMU is then killed.

Where vmfork's time goes: VM exits by reason (port I/O by device, debug exits, emulation failures, the rest),
fallbacks by instruction, system calls completed and page faults passed on (the syscall completion's breakpoint),
and the split between the kernel's own boot (to "Run /init", all of it in emulated kernel mode) and user space.
`--hide` adds the kernel command-line flags that keep a kernel away from what this host cannot emulate (for a
vmfork without a CPUID policy); QEMU always gets `-cpu qemu64` with the same features off.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vmfork.devices.base import PortBus  # noqa: E402
from vmfork.fork import VM  # noqa: E402

COMMAND = b"uname -r; cat /proc/cpuinfo | grep -c processor\n"
PROMPT = b"vmfork# "
HIDE_FLAGS = ("noxsave nosmap nopcid clearcpuid=cx16,xsave,avx,avx2,smap,popcnt,fsgsbase,pcid,invpcid,movbe,"
              "sse4_2,sse4_1,ssse3,aes,pclmulqdq")
QEMU_CPU = "qemu64,-cx16,-tsc-deadline,-xsave,-avx,-avx2,-smap,-popcnt,-fsgsbase,-pcid,-invpcid,-movbe,-sse4.2," \
           "-sse4.1,-ssse3,-aes,-pclmulqdq"
MILESTONES = (("banner", b"Linux version"), ("run /init", b"Run /init as init process"),
              ("init ready", b"VMFORK-SHELL-READY"), ("prompt", PROMPT))


class Console:
    """A growing console transcript with the wall time each milestone first appeared."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.data = bytearray()
        self.seen: dict[str, float] = {}
        self.typed_at: float | None = None

    def update(self, data: bytes) -> None:
        self.data[:] = data
        now = time.monotonic() - self.t0
        for name, marker in MILESTONES:
            if name not in self.seen and marker in self.data:
                self.seen[name] = now
        if self.typed_at is not None and "answer" not in self.seen:
            after = self.data[self.data.index(COMMAND.rstrip()) + len(COMMAND):] if COMMAND.rstrip() in self.data \
                else b""
            if PROMPT in after:
                self.seen["answer"] = now

    def answer(self) -> str:
        if "answer" not in self.seen:
            return ""
        tail = self.data[self.data.rindex(COMMAND.rstrip()) + len(COMMAND):]
        return tail[:tail.index(PROMPT)].decode(errors="replace").replace("\r", "").strip()

    def last_kernel_line(self) -> str:
        lines = [ln for ln in self.data.decode(errors="replace").splitlines() if ln.startswith("[")]
        return lines[-1].strip() if lines else ""


class CountingBus(PortBus):
    """The machine's port bus, counting exits by device (a VM exit per port access or MMIO access)."""

    def __init__(self, devices: Any, counter: Counter[str]) -> None:
        super().__init__(devices)
        self.counter = counter

    def _name(self, port: int) -> str:
        d = self.device_at(port)
        return d.name if d is not None else f"absent {port:#x}"

    def io_read(self, port: int, size: int) -> int:
        self.counter[self._name(port)] += 1
        return super().io_read(port, size)

    def io_write(self, port: int, size: int, value: int) -> None:
        self.counter[self._name(port)] += 1
        super().io_write(port, size, value)

    def mmio_read(self, addr: int, size: int) -> int:
        self.counter["mmio"] += 1
        return super().mmio_read(addr, size)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self.counter["mmio"] += 1
        super().mmio_write(addr, size, value)


def run_vmfork(kernel: str, initrd: str, cmdline: str, seconds: float, memory: int, out: dict[str, Any],
               cpuid: str | None = None, vcpus: int = 1) -> None:
    t0 = time.monotonic()
    con = Console(t0)
    out["console"] = con
    vm = VM.create(memory_mib=memory, vcpus=vcpus, name="bench-linux", cpuid=cpuid)
    out["cpuid"] = vm.shape.cpuid
    try:
        vm.load_kernel(kernel, initrd=initrd, cmdline=cmdline)
        ports: Counter[str] = Counter()
        counting = CountingBus(vm.devices, ports)
        counting.on_unknown = vm.bus.on_unknown
        vm.bus = counting
        serial = vm.device("serial0")
        vm.start()
        while time.monotonic() - t0 < seconds and vm.wait(0.25).reason == "timeout":
            con.update(bytes(serial.output()))
            if "prompt" in con.seen and con.typed_at is None:
                vm.feed_console(COMMAND)
                con.typed_at = time.monotonic() - t0
            if "answer" in con.seen:
                break
        ev = vm.pause() if vm.state == "running" else vm.stop_event
        con.update(bytes(serial.output()))
        out["end"] = time.monotonic() - t0
        out["stop"] = f"{ev.reason}: {ev.detail}" if ev is not None and ev.detail else (ev.reason if ev else "?")
        out["exits"] = vm.exits
        out["io"] = dict(ports)
        out["hooks"] = dict(vm.exit_hooks.counts)
        out["workarounds"] = vm.workarounds.counts() if vm.workarounds is not None else {}
    finally:
        vm.destroy()


def _qemu_instruction(stderr: str) -> str:
    m = re.search(r"Code=((?:[0-9a-f]{2} |<[0-9a-f]{2}> )+)", stderr)
    rip = re.search(r"RIP=([0-9a-f]+)", stderr)
    if not m:
        return ""
    parts = m.group(1).split()
    at = next((i for i, p in enumerate(parts) if p.startswith("<")), 0)
    code = bytes(int(p.strip("<>"), 16) for p in parts[at:])
    import capstone
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    for insn in cs.disasm(code, int(rip.group(1), 16) if rip else 0, 1):
        return f"`{insn.mnemonic} {insn.op_str}`".replace(" `", "`") + (f" at {int(rip.group(1), 16):#x}" if rip
                                                                         else "")
    return code[:8].hex(" ")


def run_qemu(kernel: str, initrd: str, cmdline: str, seconds: float, memory: int, out: dict[str, Any],
             vcpus: int = 1) -> None:
    t0 = time.monotonic()
    con = Console(t0)
    out["console"] = con
    cmd = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", QEMU_CPU, "-m", str(memory), "-smp", str(vcpus),
           "-nodefaults",
           "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", kernel, "-initrd", initrd,
           "-append", cmdline]
    out["command"] = " ".join(cmd)
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None and p.stdin is not None
    data = bytearray()
    err = bytearray()
    os.set_blocking(p.stdout.fileno(), False)
    os.set_blocking(p.stderr.fileno(), False)
    died = None
    try:
        while time.monotonic() - t0 < seconds and p.poll() is None:
            time.sleep(0.25)
            for f, buf in ((p.stdout, data), (p.stderr, err)):
                chunk = f.read()
                if chunk:
                    buf += chunk
            con.update(bytes(data))
            if b"KVM internal error" in err or b"emulation failure" in err:
                time.sleep(0.5)
                err += p.stderr.read() or b""
                died = time.monotonic() - t0
                break
            if "prompt" in con.seen and con.typed_at is None:
                p.stdin.write(COMMAND)
                p.stdin.flush()
                con.typed_at = time.monotonic() - t0
            if "answer" in con.seen:
                break
    finally:
        out["end"] = time.monotonic() - t0
        p.kill()
        p.wait()
    text = err.decode(errors="replace")
    if died is not None:
        first = next((ln for ln in text.splitlines() if "error" in ln.lower()), "KVM internal error")
        out["stop"] = f"died at {died:.0f} s: {first.strip()}; {_qemu_instruction(text)}"
    elif p.returncode not in (None, -9) and "answer" not in con.seen:
        out["stop"] = f"exited with status {p.returncode}: {text.strip().splitlines()[-1] if text.strip() else ''}"
    else:
        out["stop"] = "answered" if "answer" in con.seen else "time limit"


def _fmt(t: float | None) -> str:
    return "-" if t is None else f"{t:.0f} s"


def report(args: argparse.Namespace, cmdline: str, vm: dict[str, Any], qemu: dict[str, Any]) -> str:
    lines = []
    md = args.markdown
    kernel = Path(args.kernel)
    lines.append(f"Kernel `{kernel.relative_to(ROOT) if kernel.is_relative_to(ROOT) else kernel}`, initramfs "
                 f"`{Path(args.initrd).name}`, {args.memory} MiB, {args.vcpus} vCPU{'s' if args.vcpus > 1 else ''}, "
                 f"command line `{cmdline}`, vmfork's CPU "
                 f"policy `{vm.get('cpuid', '?')}`; time limit "
                 f"{args.seconds:.0f} s each; {datetime.date.today()} on {platform.node() or 'this host'}.")
    lines.append("")
    lines.append("| milestone (wall time from start) | vmfork | QEMU -accel kvm |")
    lines.append("|---|---:|---:|")
    cv, cq = vm["console"], qemu["console"]
    for name, _ in (*MILESTONES, ("answer", b"")):
        lines.append(f"| {name} | {_fmt(cv.seen.get(name))} | {_fmt(cq.seen.get(name))} |")
    lines.append(f"| how it ended | {vm.get('stop', '?')} | {qemu.get('stop', '?')} |")
    lines.append(f"| last kernel line | {cv.last_kernel_line()[:90]} | {cq.last_kernel_line()[:90]} |")
    lines.append("")
    lines.append(f"vmfork's answer to `{COMMAND.decode().strip()}`: `{cv.answer() or '(none)'}`"
                 + (f"; QEMU's: `{cq.answer()}`" if cq.answer() else "") + ".")
    lines.append("")
    total = vm.get("exits", 0)
    io = vm.get("io", {})
    hooks = vm.get("hooks", {})
    wk = vm.get("workarounds", {})
    debug = sum(v for k, v in hooks.items() if k in ("syscall-completion", "step-past"))
    emul = sum(v for k, v in wk.items() if k.endswith("-cpl0"))
    other = total - sum(io.values()) - debug - emul
    lines.append(f"vmfork's {total:,} VM exits by reason:")
    lines.append("")
    lines.append("| exit reason | count |")
    lines.append("|---|---:|")
    for dev, n in sorted(io.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {'MMIO' if dev == 'mmio' else 'port I/O, ' + dev} | {n:,} |")
    lines.append(f"| debug (syscall completion's #PF breakpoint, and stepping past it) | {debug:,} |")
    lines.append(f"| emulation failure (completed by a fallback) | {emul:,} |")
    lines.append(f"| other (interrupt windows, signals, HLT, ...) | {max(other, 0):,} |")
    lines.append("")
    lines.append("Fallbacks and the syscall completion: "
                 + ", ".join(f"{k} {v:,}" for k, v in wk.items()) + ".")
    run_init = cv.seen.get("run /init")
    if run_init is not None:
        end = cv.seen.get("answer", vm.get("end", run_init))
        lines.append(f"Time in the kernel's own boot (to \"Run /init\", all in emulated kernel mode): "
                     f"{run_init:.0f} s; "
                     f"from there to the answer (busybox in native user mode, every system call and page fault in "
                     f"emulated kernel mode): {end - run_init:.0f} s.")
    lines.append("")
    lines.append(f"QEMU: `{qemu.get('command', '')}`")
    return "\n".join(lines) if md else "\n".join(lines).replace("`", "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", default=str(ROOT / "build" / "linux" / "vmlinux"))
    ap.add_argument("--initrd", default=str(ROOT / "build" / "linux" / "initramfs-shell.cpio.gz"))
    ap.add_argument("--memory", type=int, default=256)
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=2400.0, help="time limit of each side")
    ap.add_argument("--cmdline", default="", help="more kernel command line after console=ttyS0")
    ap.add_argument("--cpuid", default="default",
                    help="vmfork's CPU policy (default: this host's default, as tests/test_linux.py uses)")
    ap.add_argument("--hide", action="store_true", help="add the CPUID-hiding kernel flags (see the docstring)")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    for f in (args.kernel, args.initrd):
        if not Path(f).exists():
            print(f"bench/linux.py: {f} does not exist (run guests/linux/build.sh, or build-kernel.sh)",
                  file=sys.stderr)
            return 1
    cmdline = " ".join(x for x in ("console=ttyS0", HIDE_FLAGS if args.hide else "", args.cmdline) if x)
    vm: dict[str, Any] = {}
    qemu: dict[str, Any] = {"stop": "not run"}
    # vmfork in this (main) thread, which its first machine needs; QEMU's console is read by a thread meanwhile
    qemu_thread = None
    if not args.no_qemu:
        qemu_thread = threading.Thread(target=run_qemu, args=(args.kernel, args.initrd, cmdline, args.seconds,
                                                              args.memory, qemu, args.vcpus))
        qemu_thread.start()
    run_vmfork(args.kernel, args.initrd, cmdline, args.seconds, args.memory, vm, args.cpuid, args.vcpus)
    if qemu_thread is not None:
        qemu_thread.join()
    if "console" not in qemu:
        qemu["console"] = Console(0.0)
    print(report(args, cmdline, vm, qemu))
    _record(args, cmdline, vm)
    return 0


def _record(args: argparse.Namespace, cmdline: str, vm: dict[str, Any]) -> None:
    """The measurement `vmfork doctor` shows as its Linux boot line (vmfork.doctor.linux_boot_path)."""
    import json

    from vmfork.doctor import linux_boot_path
    con = vm["console"]
    kernel = Path(args.kernel)
    release = ""
    m = re.search(rb"Linux version (\S+)", bytes(con.data))
    if m:
        release = m.group(1).decode(errors="replace")
    d = {"host": platform.release(), "kernel": str(kernel.relative_to(ROOT) if kernel.is_relative_to(ROOT)
                                                   else kernel),
         "release": release, "cmdline": cmdline, "limit_s": args.seconds, "date": str(datetime.date.today()),
         "prompt_s": con.seen.get("prompt"), "answer_s": con.seen.get("answer"),
         "run_init_s": con.seen.get("run /init"), "stop": vm.get("stop", "")}
    path = linux_boot_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d, indent=1), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
