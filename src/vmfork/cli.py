"""The `vmfork` command. User errors print one line (`vmfork: error: ...`) and exit non-zero, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .errors import VmforkError, user_error_line


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .fork import VM
    from .toolstack.foreground import _echo_console, _run_foreground, check_config_files

    cfg = load_config(args.config)
    if cfg.kernel is None:
        raise VmforkError(f"{args.config}: missing required key \"kernel\"")
    check_config_files(cfg, args.config)
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


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor
    return run_doctor(json=args.json)


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.linux:
        from .demo_linux import run_demo_linux
        return run_demo_linux(forks=20 if args.forks is None else args.forks, kernel=args.kernel,
                              initrd=args.initrd, dirty_log=args.dirty_log, restore=args.restore,
                              memory_mib=args.memory)
    from .demo import run_demo
    return run_demo(forks=100 if args.forks is None else args.forks, memory_mib=args.memory, kernel=args.kernel)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmfork", description="Fork running KVM virtual machines in about a millisecond.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="boot a guest, fork it many times, run every fork with its own input")
    demo.add_argument("-n", "--forks", type=int, default=None, help="number of forks (default 100; 20 with --linux)")
    demo.add_argument("--memory", type=int, default=256, help="guest memory in MiB (default 256)")
    demo.add_argument("--kernel", default=None, help="demo guest kernel (default: the built test guest; with --linux "
                                                     "the CI kernel build/linux-min/vmlinux)")
    demo.add_argument("--linux", action="store_true",
                      help="fork a Linux at its shell prompt (booted once, then restored from build/linux-demo/)")
    demo.add_argument("--initrd", default=None, help="with --linux: the initramfs (default: the busybox shell one)")
    demo.add_argument("--dirty-log", choices=("auto", "ring", "bitmap"), default="auto",
                      help="with --linux: how forks track written pages (default auto: bitmap where guest kernel "
                           "mode is emulated)")
    demo.add_argument("--restore", default=None, metavar="FILE",
                      help="with --linux: fork the Linux saved in FILE (paused at the prompt 'vmfork# ') instead of "
                           "booting or restoring the cached one")
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
    # too, with their config-file forms and the foreground restore (toolstack/foreground.py).
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
