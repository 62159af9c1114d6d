"""The `vmfork` command. User errors print one line (`vmfork: error: ...`) and exit non-zero, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import VmforkError, user_error_line

if TYPE_CHECKING:
    from .fork import VM
    from .vm import StopEvent


def _echo_console(vm: VM) -> None:
    """Copy the guest's console output to stdout as it comes."""
    out = sys.stdout.buffer

    def echo(b: bytes) -> None:
        out.write(b)
        out.flush()

    vm.device("serial0").add_listener(echo)


def _run_foreground(vm: VM, timeout: float | None) -> StopEvent | None:
    """Run until the machine stops for good (harness markers only matter to forks and fuzzers, so a plain run goes
    on past them). None: interrupted with Ctrl-C (the machine is paused and the message printed)."""
    while True:
        vm.start()
        try:
            ev = vm.wait(timeout, pause_on_timeout=True)
        except KeyboardInterrupt:
            vm.pause()
            print("\nvmfork: interrupted, machine destroyed", file=sys.stderr)
            return None
        if not ev.reason.startswith("harness"):
            return ev


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .fork import VM

    cfg = load_config(args.config)
    if cfg.kernel is None:
        raise VmforkError(f"{args.config}: missing required key \"kernel\"")
    noted = False
    while True:
        vm = VM.create(memory_mib=cfg.memory, vcpus=cfg.vcpus, name=cfg.name, console_log=args.console_log,
                       cpuid=cfg.cpuid)
        try:
            vm.load_kernel(cfg.kernel, cmdline=cfg.cmdline, initrd=cfg.ramdisk, protocol=cfg.boot_protocol)
            if vm.cpuid_note and not noted:
                print(f"vmfork: {vm.cpuid_note}", file=sys.stderr, flush=True)     # once, at the first boot
                noted = True
            _echo_console(vm)
            stopped = _run_foreground(vm, args.timeout)
            if stopped is None:
                return 130
            ev = stopped
        finally:
            vm.destroy(tree=True)
        if ev.reason == "exit":
            return int(ev.status or 0)
        if ev.reason == "poweroff":
            return 0
        if ev.reason == "reset":
            if cfg.on_reboot in ("restart", "rename-restart", "coredump-restart"):
                continue
            return 0
        if ev.reason == "timeout":
            print(f"vmfork: {cfg.name} still running after {args.timeout} s; stopped", file=sys.stderr)
            return 124
        if ev.crashed:
            print(f"vmfork: {cfg.name} crashed: {ev.detail}", file=sys.stderr)
            if cfg.on_crash.endswith("restart"):
                continue
            return 1
        return 0


def _boot_to_ready(config: str, timeout: float) -> VM:
    """Boot a config's domain until its ready marker (the harness port's start marker) pauses it."""
    from .config import load_config
    from .fork import VM

    cfg = load_config(config)
    if cfg.kernel is None:
        raise VmforkError(f"{config}: missing required key \"kernel\"")
    vm = VM.create(memory_mib=cfg.memory, vcpus=cfg.vcpus, name=cfg.name, cpuid=cfg.cpuid)
    try:
        vm.load_kernel(cfg.kernel, cmdline=cfg.cmdline, initrd=cfg.ramdisk, protocol=cfg.boot_protocol)
        ev = vm.run(timeout=timeout)
        if ev.reason != "harness-start":
            what = ev.reason + ("" if ev.status is None else f" (status {ev.status})")
            what += f": {ev.detail}" if ev.detail else ""
            raise VmforkError(f"{cfg.name} did not reach its ready marker (port 0xf6 write of 1) within "
                              f"{timeout:g} s: it stopped with {what}")
    except BaseException:
        vm.destroy()
        raise
    return vm


def _cmd_save(args: argparse.Namespace) -> int:
    from .snapshot import save

    vm = _boot_to_ready(args.config, args.timeout)
    try:
        result = save(vm, args.file)
    finally:
        vm.destroy()
    print(f"vmfork: saved {vm.name} at its ready marker to {args.file}: {result.file_size:,} bytes "
          f"({result.stored_pages} of {result.ram_pages} RAM pages are not zero)", file=sys.stderr)
    return 0


def _cmd_save_devices_state(args: argparse.Namespace) -> int:
    from .snapshot import save_device_state

    vm = _boot_to_ready(args.config, args.timeout)
    try:
        state = save_device_state(vm, args.file)
    finally:
        vm.destroy()
    print(f"vmfork: saved the state of {', '.join(state.names)} of {vm.name} at its ready marker to {args.file}",
          file=sys.stderr)
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    """Restore a save file and run it in the foreground, like `run`: console on the terminal, exit status the
    guest's."""
    from .snapshot import restore

    vm = restore(args.file, console_log=args.console_log)
    try:
        if not vm.devices:
            print(f"vmfork: {vm.name} has no device model: its console is silent", file=sys.stderr)
        else:
            _echo_console(vm)
        stopped = _run_foreground(vm, args.timeout)
        if stopped is None:
            return 130
        ev = stopped
    finally:
        vm.destroy()
    if ev.reason == "exit":
        return int(ev.status or 0)
    if ev.reason == "timeout":
        print(f"vmfork: {vm.name} still running after {args.timeout} s; stopped", file=sys.stderr)
        return 124
    if ev.crashed:
        print(f"vmfork: {vm.name} crashed: {ev.detail}", file=sys.stderr)
        return 1
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor
    return run_doctor(json=args.json)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(forks=args.forks, memory_mib=args.memory, kernel=args.kernel)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmfork", description="Fork running KVM virtual machines in about a millisecond.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="boot a guest, fork it many times, run every fork with its own input")
    demo.add_argument("-n", "--forks", type=int, default=100, help="number of forks (default 100)")
    demo.add_argument("--memory", type=int, default=256, help="guest memory in MiB (default 256)")
    demo.add_argument("--kernel", default=None, help="demo guest kernel (default: the built test guest)")
    demo.set_defaults(func=_cmd_demo)

    run = sub.add_parser("run", help="boot a domain from an xl-style config file in the foreground")
    run.add_argument("config", help="config file (xl.cfg syntax)")
    run.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    run.add_argument("--console-log", default=None, help="also append the console output to this file")
    run.set_defaults(func=_cmd_run)

    doctor = sub.add_parser("doctor", help="measure what this host's KVM can do")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(func=_cmd_doctor)

    # The toolstack commands (create, list, ..., fork-vm). `save`, `restore` and `save-devices-state` are theirs
    # too; the config-file forms above (_cmd_save, _cmd_save_devices_state) and the foreground restore
    # (_cmd_restore, `restore --foreground`) are reached through them.
    from .toolstack.commands import add_toolstack_commands
    add_toolstack_commands(sub)
    # Introspection of domains (mem, regs, translate, disasm, diff, gdbserver).
    from .vmi.cli import register_vmi_commands
    register_vmi_commands(sub)

    from .fuzz.cli import register_fuzz_commands
    register_fuzz_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (VmforkError, FileNotFoundError) as e:
        print(user_error_line(e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nvmfork: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
