"""`vmfork demo --linux`: a Linux at its shell prompt (booted, or restored from the cached save file), forked N
times; every fork runs a different shell command and reads /dev/urandom; a table of what it cost and what came back.

Which kernel: the small CI kernel (guests/linux/build-kernel.sh, build/linux-min/vmlinux) with the busybox shell
initramfs (build/linux/initramfs-shell.cpio), because where guest kernel mode is emulated (kvm_pvm) Debian's cloud
kernel does not reach /init in reasonable time (over 1,600 s measured). `--kernel`/`--initrd` choose others.

The machine at the prompt is cached as a save file in build/linux-demo/, keyed by the kernel, the initramfs, the
command line, the CPU policy and the save format, so the second run restores instead of booting; before the save it
waits until the guest's RNG is ready, since Linux reseeds on a VM fork (VMGenID) only then. `--restore FILE` forks a
Linux saved elsewhere at the same prompt instead (the test uses its session's Linux). `boot_to_prompt`, `run_until`
and `ram_kib` are shared with bench/linux_fork.py and the Linux tests.

Where guest kernel mode is emulated the table also says where each command's wall time went: CPU in the host kernel
(KVM running and emulating the guest), CPU in vmfork (its exit handling), and the rest, waiting for a CPU.
"""

from __future__ import annotations

import hashlib
import os
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


def _key(kernel: Path, initrd: Path, cmdline: str, memory_mib: int, settle: str | None = None) -> str:
    from .arch.x86 import emulator_probe
    from .snapshot import savefile
    from .vm import open_kvm
    h = hashlib.sha256()
    for f in (kernel, initrd):
        h.update(hashlib.sha256(f.read_bytes()).digest())
    policy = emulator_probe.concrete(open_kvm(), CPUID)
    h.update(f"{cmdline}|{memory_mib}|{policy}|{savefile.FORMAT}|{savefile.MAGIC!r}".encode())
    if settle is not None:
        h.update(f"|settle={settle}".encode())
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


KERNEL_LINE = re.compile(rb"\[ *\d+\.\d+\] [^\n]*\n")       # a printk line that interleaves with the answer
ESCAPE = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def strip_echo(out: bytes, typed: bytes) -> bytes:
    """What follows the terminal's echo of `typed` in `out`. Busybox's line editor wraps a long line at the
    terminal's width, inserting line breaks and escape sequences into the echo, so the echo is matched character by
    character, skipping those; `out` is returned whole when it does not start with the echo."""
    i = j = 0
    while j < len(typed) and i < len(out):
        if out[i] == typed[j]:
            i += 1
            j += 1
        elif out[i] in b"\r\n ":
            i += 1
        elif (m := ESCAPE.match(out, i)) is not None:
            i = m.end()
        else:
            return out
    return out[i:].lstrip(b"\r").removeprefix(b"\n") if j == len(typed) else out


def ask(vm: VM, command: str, timeout: float = 300) -> str:
    """Type `command` at the shell prompt of a paused `vm`, run it until the next prompt, and return the answer (the
    lines between the echoed command and the prompt, without kernel messages printed meanwhile)."""
    vm.feed_console(command.encode() + b"\n")
    out = run_until(vm, PROMPT, timeout).replace(b"\r\n", b"\n")
    if PROMPT not in out:
        ev = vm.stop_event if vm.state != "paused" else None
        why = f" ({ev.reason}: {ev.detail})" if ev is not None and ev.reason != "pause" else ""
        raise VmforkError(f"{vm.name}: no prompt within {timeout:.0f} s after {command!r}{why}: {out[-300:]!r}")
    body = strip_echo(KERNEL_LINE.sub(b"", out[:out.rindex(PROMPT)]), command.encode())
    return body.decode(errors="replace").replace("\r", "").strip()


def boot_to_prompt(*, kernel: Path = KERNEL, initrd: Path = INITRD, cmdline: str = CMDLINE, memory_mib: int = 256,
                   limit: float = 1800, cache: Path | None = CACHE, log: bool = True,
                   prompt: bytes = PROMPT, settle: str | None = None) -> AtPrompt:
    """A machine paused at the shell prompt (or another console marker, `prompt`): restored from the cached save
    file, or booted (and then saved). `settle`: a command typed at the prompt after the boot, before the save (the
    demo waits for the guest's RNG there)."""
    from .snapshot import savefile
    for f in (kernel, initrd):
        if not f.exists():
            raise VmforkError(f"{f} is missing: build it with guests/linux/build.sh and guests/linux/build-kernel.sh")
    saved = cache / f"{_key(kernel, initrd, cmdline, memory_mib, settle)}.save" if cache is not None else None
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
    if settle is not None:
        try:
            ask(vm, settle, limit)
        except VmforkError:
            vm.destroy()
            raise
        took = time.monotonic() - t0
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_suffix(".tmp")
        savefile.save(vm, tmp)
        tmp.rename(saved)
    return AtPrompt(vm, "booted", took)


def commands(n: int) -> list[tuple[str, str]]:
    """n different shell commands and the answers they must give. Mostly shell builtins: where guest kernel mode is
    emulated every new process costs seconds (fork, exec, page faults and exit all run in the guest kernel)."""
    forms = [
        (lambda i: f"echo $(({i} * {i} + 7))", lambda i: str(i * i + 7)),
        (lambda i: f"expr {i} + 1000", lambda i: str(i + 1000)),
        (lambda i: f"printf '%x\\n' {i * 4099}", lambda i: f"{i * 4099:x}"),
        (lambda i: f"x=fork-{i}; echo ${{x#fork-}}${{#x}}", lambda i: f"{i}{len(f'fork-{i}')}"),
        (lambda i: f"s=0; for w in 1 2 3 4 5; do s=$((s + w * {i})); done; echo $s", lambda i: str(15 * i)),
    ]
    out = []
    for i in range(n):
        cmd, want = forms[i % len(forms)]
        out.append((cmd(i), want(i)))
    return out


URANDOM_COMMAND = "printf RND:; od -An -N8 -tx1 /dev/urandom"
# Linux reseeds on a VM fork (VMGenID) only once its RNG is ready, and says so on the console
RNG_READY_COMMAND = "head -c 1 /dev/random >/dev/null"
RESEEDED = b"crng reseeded due to virtual machine fork"


def ram_kib(vm: VM) -> tuple[int, int]:
    """PSS and anonymous KiB of `vm`'s RAM view in this process (/proc/self/smaps over its range): the pages it read
    from its parent are shared with the parent and the other forks that read them (PSS divides them among the
    mappings), the anonymous ones are its own copies of pages it wrote."""
    lo, hi = vm.memory.host_addr, vm.memory.host_addr + vm.memory.size
    pss = anon = 0
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                start = int(head.split("-")[0], 16)
                inside = lo <= start < hi
            elif inside and head == "Pss:":
                pss += int(line.split()[1])
            elif inside and head == "Anonymous:":
                anon += int(line.split()[1])
    return pss, anon


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if seconds < 0.01 else f"{seconds * 1e3:,.1f} ms"


@dataclass
class Answer:
    """One fork's command: what it printed, and where the wall time went."""

    n: int
    command: str
    want: str
    got: str
    random: str             # the hex of 8 bytes of its /dev/urandom, "?" when none came
    fork_s: float
    wall_s: float
    host_kernel_s: float    # CPU in the host kernel meanwhile: KVM running (and emulating) the guest
    vmfork_s: float         # CPU in this process's user space meanwhile: vmfork handling the fork's exits
    exits: int
    reseeded: bool          # the kernel said it reseeded its RNG for this fork (RESEEDED on its console)

    @property
    def ok(self) -> bool:
        return self.got == self.want


def run_command(vm: VM, n: int, command: str, want: str, fork_s: float, timeout: float = 300) -> Answer:
    """`command` and then 8 bytes of /dev/urandom in the fork `vm`, timed."""
    exits0, cpu0, t0 = vm.exits, os.times(), time.monotonic()
    answer = ask(vm, f"{command}; {URANDOM_COMMAND}", timeout)
    wall, cpu = time.monotonic() - t0, os.times()
    reseeded = RESEEDED in vm.device("serial0").output()        # a fork's console starts empty
    m = URANDOM.search(answer.encode())
    lines = [ln for ln in answer.split("\n") if not ln.startswith("RND:")]
    return Answer(n, command, want, lines[0].strip() if lines else "",
                  m.group(1).decode().replace(" ", "") if m else "?", fork_s, wall,
                  cpu.system - cpu0.system, cpu.user - cpu0.user, vm.exits - exits0, reseeded)


def run_demo_linux(*, forks: int = 20, kernel: str | None = None, initrd: str | None = None,
                   dirty_log: DirtyLog = "auto", restore: str | None = None, memory_mib: int = 256) -> int:
    """The demo; returns the exit status (0 when every fork answered correctly with its own random bytes).
    `restore`: a save file of a Linux paused at the "vmfork# " prompt, instead of the cached boot."""
    if forks < 1:
        raise VmforkError(f"--forks must be at least 1, got {forks}")
    k = Path(kernel) if kernel else KERNEL
    i = Path(initrd) if initrd else INITRD
    if restore is not None:
        if not Path(restore).is_file():
            raise VmforkError(f"--restore: {restore} is not a file")
        which = f"the machine saved in {restore}"
    else:
        for needed in (k, i):
            if not needed.exists():
                raise VmforkError(f"{needed} is missing: build it with guests/linux/build.sh and "
                                  "guests/linux/build-kernel.sh")
        which = ("the CI kernel (guests/linux/build-kernel.sh)" if kernel is None else str(k)) + \
            f", busybox shell initramfs, {memory_mib} MiB"
    print(f"Linux: {which}")
    emulated = kernel_mode_emulated()
    if emulated:
        print("this host's KVM (kvm_pvm) emulates guest kernel mode instruction by instruction (0.5-2 µs each; "
              "user mode runs natively):\n  a boot takes minutes instead of about a second, and every new process "
              "costs seconds (fork, exec,\n  page faults and exit run in the guest kernel); Debian's cloud kernel "
              "does not reach /init in reasonable time here, hence the CI kernel")
    rng_s = 0.0
    if restore is not None:
        from .snapshot import savefile
        t0 = time.monotonic()
        at = AtPrompt(savefile.restore(restore), "restored", 0.0)
        at.seconds = time.monotonic() - t0
    else:       # the cached machine waited for its RNG before it was saved
        at = boot_to_prompt(kernel=k, initrd=i, memory_mib=memory_mib, settle=RNG_READY_COMMAND)
    parent = at.vm
    try:
        if restore is not None:
            t0 = time.monotonic()
            ask(parent, RNG_READY_COMMAND)
            rng_s = time.monotonic() - t0
        mode = dirty_log_mode(parent, dirty_log)
        todo = commands(forks)
        parent.prepare_forks(min(forks, 32), dirty_log=dirty_log)
        made: list[tuple[VM, float]] = []
        for _ in range(forks):
            t0 = time.perf_counter()
            f = parent.fork(dirty_log=dirty_log)
            made.append((f, time.perf_counter() - t0))
        rows = [run_command(f, n, cmd, want, fork_s)
                for n, ((f, fork_s), (cmd, want)) in enumerate(zip(made, todo, strict=True))]
        ram = [ram_kib(f) for f, _ in made]
        _table(rows, at, rng_s, (statistics.mean(r[0] for r in ram), statistics.mean(r[1] for r in ram)), mode,
               emulated, parent.shape.memory_mib)
        for f, _ in made:
            f.destroy()
        distinct = len({r.random for r in rows if r.random != "?"})
        return 0 if all(r.ok for r in rows) and distinct == forks else 1
    finally:
        parent.destroy(tree=True)


def _table(rows: list[Answer], at: AtPrompt, rng_s: float, memory_kib: tuple[float, float], mode: str,
           emulated: bool, memory_mib: int) -> None:
    forks = len(rows)
    width = max(len(r.command) for r in rows)
    print(f"\n  {'fork':>4}  {'command':<{width}}  {'answer':<8} ok   {'/dev/urandom':<16} reseeded  {'fork':>9}"
          f"  {'command':>7}  exits")
    for r in rows:
        print(f"  {r.n:>4}  {r.command:<{width}}  {r.got[:8]:<8} {'yes' if r.ok else 'NO ':<4} {r.random:<16} "
              f"{'yes' if r.reseeded else 'no':<8}  {_us(r.fork_s):>9}  {r.wall_s:>5.2f} s  {r.exits:,}")
    fork_p50 = statistics.median(r.fork_s for r in rows)
    than = "booting" if at.how == "booted" else "restoring"
    wall = sum(r.wall_s for r in rows)
    host = sum(r.host_kernel_s for r in rows)
    ours = sum(r.vmfork_s for r in rows)
    print()
    label = "booted to prompt, RNG ready" if at.how == "booted" else f"{at.how} to the prompt"
    print(f"  {label:<27}{at.seconds:>10.2f} s" + (
        f"   (then {rng_s:.1f} s until the guest's RNG was ready: Linux reseeds on a fork only then)" if rng_s else
        ""))
    print(f"  fork (median of {forks}){'':<{10 - len(str(forks))}}{_us(fork_p50):>12}   "
          f"{at.seconds / fork_p50:,.0f}x faster than {than}")
    print(f"  memory per fork (PSS){'':<6}{memory_kib[0]:>10,.0f} KiB of RAM after its command, of a {memory_mib} MiB "
          f"guest: {memory_kib[1]:,.0f} KiB its own copies\n{'':<30}of pages it wrote, the rest its share of the "
          "parent's pages it read")
    print(f"  /dev/urandom{'':<15}{len({r.random for r in rows if r.random != '?'}):>10}/{forks} different; "
          f"{sum(r.reseeded for r in rows)}/{forks} forks said '{RESEEDED.decode()}' (VMGenID)")
    print(f"  correct answers{'':<12}{sum(r.ok for r in rows):>10}/{forks}")
    print(f"  commands, one at a time{'':<4}{wall / forks:>10.2f} s each (dirty log: {mode})")
    if emulated:
        print(f"  guest kernel mode emulated  {host / wall:>9.0%} of that time in the host kernel (KVM emulating "
              f"the guest's kernel),\n{'':<30}{ours / wall:>9.0%} in vmfork ({sum(r.exits for r in rows) / forks:,.0f} "
              "exits handled per command), the rest waiting for a CPU")
