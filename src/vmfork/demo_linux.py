"""`vmfork demo --linux`: a Linux at its shell prompt (booted, or restored from the cached save file), forked N
times; every fork runs a different shell command and reads /dev/urandom; a table of what it cost and what came back.

Which kernel: the small CI kernel (guests/linux/build-kernel.sh, build/linux-min/vmlinux) with the busybox shell
initramfs (build/linux/initramfs-shell.cpio), because where guest kernel mode is emulated (kvm_pvm) Debian's cloud
kernel does not reach /init in reasonable time (over 1,600 s measured). `--kernel`/`--initrd` choose others.

The machine at the prompt is cached as a save file in build/linux-demo/, keyed by the kernel, the initramfs, the
command line, the CPU policy and the save format, so the second run restores instead of booting. `boot_to_prompt`
is shared with bench/linux_fork.py.
"""

from __future__ import annotations

import hashlib
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import VmforkError
from .fork import VM, DirtyLog, dirty_log_mode, kernel_mode_emulated

ROOT = Path(__file__).resolve().parents[2]
KERNEL = ROOT / "build" / "linux-min" / "vmlinux"
INITRD = ROOT / "build" / "linux" / "initramfs-shell.cpio"
CACHE = ROOT / "build" / "linux-demo"
CMDLINE = "console=ttyS0"
CPUID = "default"      # hides tsc-deadline where the host needs it (emulator_probe)
PROMPT = b"vmfork# "
URANDOM = re.compile(rb"RND:([0-9a-f ]+)")


@dataclass
class AtPrompt:
    vm: VM
    how: str            # "booted" or "restored"
    seconds: float


def _key(kernel: Path, initrd: Path, cmdline: str, memory_mib: int) -> str:
    from .arch.x86 import emulator_probe
    from .snapshot import savefile
    from .vm import open_kvm
    h = hashlib.sha256()
    for f in (kernel, initrd):
        h.update(hashlib.sha256(f.read_bytes()).digest())
    policy = emulator_probe.concrete(open_kvm(), CPUID)
    h.update(f"{cmdline}|{memory_mib}|{policy}|{savefile.FORMAT}|{savefile.MAGIC!r}".encode())
    return h.hexdigest()[:20]


def run_until(vm: VM, marker: bytes, timeout: float, *, count: int = 1) -> bytes:
    """Run `vm` until its console printed `marker` `count` times since now (or `timeout`); pause it; return what
    it printed meanwhile."""
    serial = vm.device("serial0")
    since = len(serial.output())
    vm.start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and vm.wait(0.1).reason == "timeout":
            if bytes(serial.output())[since:].count(marker) >= count:
                break
    finally:
        if vm.state == "running":
            vm.pause()
    return bytes(serial.output())[since:]


def ask(vm: VM, command: str, timeout: float = 300) -> str:
    """Type `command` at the shell prompt of a paused `vm`, run it until the next prompt, and return the answer (the
    lines between the echoed command and the prompt)."""
    vm.feed_console(command.encode() + b"\n")
    out = run_until(vm, PROMPT, timeout).replace(b"\r", b"")
    if PROMPT not in out:
        raise VmforkError(f"{vm.name}: no prompt within {timeout:.0f} s after {command!r}: {out[-300:]!r}")
    body = out[:out.rindex(PROMPT)].decode(errors="replace")
    lines = body.split("\n")
    return "\n".join(lines[1:]).strip() if lines and command.strip() in lines[0] else body.strip()


def boot_to_prompt(*, kernel: Path = KERNEL, initrd: Path = INITRD, cmdline: str = CMDLINE, memory_mib: int = 256,
                   limit: float = 1800, cache: Path | None = CACHE, log: bool = True,
                   prompt: bytes = PROMPT) -> AtPrompt:
    """A machine paused at the shell prompt (or another console marker, `prompt`): restored from the cached save
    file, or booted (and then saved)."""
    from .snapshot import savefile
    for f in (kernel, initrd):
        if not f.exists():
            raise VmforkError(f"{f} is missing: build it with guests/linux/build.sh and guests/linux/build-kernel.sh")
    saved = cache / f"{_key(kernel, initrd, cmdline, memory_mib)}.save" if cache is not None else None
    if saved is not None and saved.exists():
        t0 = time.monotonic()
        vm = savefile.restore(saved)
        return AtPrompt(vm, "restored", time.monotonic() - t0)
    if log:
        print(f"booting {kernel} to its shell prompt (up to {limit:.0f} s here; saved for next time) ...",
              flush=True)
    vm = VM.create(memory_mib=memory_mib, name="linux", cpuid=CPUID)
    vm.load_kernel(kernel, initrd=str(initrd), cmdline=cmdline)
    t0 = time.monotonic()
    out = run_until(vm, prompt, limit)
    took = time.monotonic() - t0
    if prompt not in out:
        ev = vm.stop_event
        vm.destroy()
        tail = out[-400:].decode(errors="replace")
        raise VmforkError(f"Linux did not reach {prompt.decode(errors='replace')!r} within {took:.0f} s"
                          f"{f' ({ev.reason}: {ev.detail})' if ev else ''}; console ends: {tail!r}")
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_suffix(".tmp")
        savefile.save(vm, tmp)
        tmp.rename(saved)
    return AtPrompt(vm, "booted", took)


def commands(n: int) -> list[tuple[str, str]]:
    """n different shell commands and the answers they must give."""
    forms = [
        (lambda i: f"echo $(({i} * {i} + 7))", lambda i: str(i * i + 7)),
        (lambda i: f"expr {i} + 1000", lambda i: str(i + 1000)),
        (lambda i: f"printf '%x\\n' {i * 4099}", lambda i: f"{i * 4099:x}"),
        (lambda i: f"echo fork-{i} | tr a-z A-Z", lambda i: f"FORK-{i}"),
        (lambda i: f"seq {i} {i + 4} | wc -l", lambda i: "5"),
    ]
    out = []
    for i in range(n):
        cmd, want = forms[i % len(forms)]
        out.append((cmd(i), want(i)))
    return out


def _pss_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if seconds < 0.01 else f"{seconds * 1e3:,.1f} ms"


def run_demo_linux(*, forks: int = 20, kernel: str | None = None, initrd: str | None = None,
                   dirty_log: DirtyLog = "auto") -> int:
    """The demo; returns the exit status (0 when every fork answered correctly with its own random bytes)."""
    if forks < 1:
        raise VmforkError(f"--forks must be at least 1, got {forks}")
    k = Path(kernel) if kernel else KERNEL
    i = Path(initrd) if initrd else INITRD
    for needed in (k, i):
        if not needed.exists():
            raise VmforkError(f"{needed} is missing: build it with guests/linux/build.sh and "
                              "guests/linux/build-kernel.sh")
    which = "the CI kernel (guests/linux/build-kernel.sh)" if kernel is None else str(k)
    print(f"Linux: {which}, busybox shell initramfs, 256 MiB, 1 vCPU")
    if kernel_mode_emulated():
        print("this host's KVM (kvm_pvm) emulates guest kernel mode instruction by instruction (0.5-2 µs each; "
              "user mode runs natively):\n  a boot takes minutes instead of about a second, and every system call, "
              "interrupt and page fault\n  in a fork costs tens of µs to ms; Debian's cloud kernel does not reach "
              "/init in reasonable time here, hence the CI kernel by default")
    at = boot_to_prompt(kernel=k, initrd=i)
    parent = at.vm
    try:
        mode = dirty_log_mode(parent, dirty_log)
        todo = commands(forks)
        parent.prepare_forks(min(forks, 32), dirty_log=dirty_log)
        pss0 = _pss_kib()
        made: list[tuple[VM, float]] = []
        for n in range(forks):
            t0 = time.perf_counter()
            f = parent.fork(env={"hostname": f"fork-{n}"}, dirty_log=dirty_log)
            made.append((f, time.perf_counter() - t0))
        rows = []
        t_run = time.monotonic()
        for n, ((f, fork_s), (cmd, want)) in enumerate(zip(made, todo, strict=True)):
            t0 = time.monotonic()
            answer = ask(f, f"{cmd}; echo RND:$(head -c 8 /dev/urandom | od -An -tx1)")
            took = time.monotonic() - t0
            m = URANDOM.search(answer.encode())
            rnd = m.group(1).decode().replace(" ", "") if m else "?"
            got = answer.split("\n")[0].strip()
            rows.append((n, cmd, got, got == want, rnd, fork_s, took))
        run_total = time.monotonic() - t_run
        pss = (_pss_kib() - pss0) / forks
        print(f"\n  {'fork':>4}  {'command':<28} {'answer':<10} ok  {'/dev/urandom':<16}  {'fork':>9}  run")
        for n, cmd, got, ok, rnd, fork_s, took in rows:
            print(f"  {n:>4}  {cmd:<28} {got[:10]:<10} {'yes' if ok else 'NO ':<3} {rnd:<16}  "
                  f"{_us(fork_s):>9}  {took:.2f} s")
        distinct = len({r[4] for r in rows})
        correct = sum(1 for r in rows if r[3])
        print()
        print(f"  {at.how} to the prompt      {at.seconds:>10.2f} s")
        fork_p50 = statistics.median(r[5] for r in rows)
        than = "booting" if at.how == "booted" else "restoring"
        print(f"  fork (median of {forks})       {_us(fork_p50):>10}   "
              f"{at.seconds / fork_p50:,.0f}x faster than {than}")
        print(f"  memory per fork (PSS)      {pss:>10,.0f} KiB after its command, of a 256 MiB guest")
        print(f"  commands, all forks        {run_total:>10.1f} s   ({run_total / forks:.2f} s each, one at a time; "
              f"dirty log: {mode})")
        print(f"  /dev/urandom               {distinct:>10}/{forks} different (VMGenID reseeds every fork)")
        print(f"  correct answers            {correct:>10}/{forks}")
        for f, _ in made:
            f.destroy()
        return 0 if correct == forks and distinct == forks else 1
    finally:
        parent.destroy(tree=True)
