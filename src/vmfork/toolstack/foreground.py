"""Commands that run a machine in the CLI's own process rather than as a domain: the config-file forms of `save` and
`save-devices-state` (boot to the ready marker, save that) and `restore --foreground`; `vmfork run` (in vmfork.cli)
shares the foreground loop. They live here, below the CLI, so the toolstack commands reach them without importing
vmfork.cli (which imports the toolstack)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..config import DomainConfig, check_boot_files, host_memory_warning
from ..errors import VmforkError

if TYPE_CHECKING:
    from ..fork import VM
    from ..vm import StopEvent

__all__ = ["check_config_files", "cmd_restore_foreground", "cmd_save_config", "cmd_save_devices_state_config"]


def check_config_files(cfg: DomainConfig, where: str) -> None:
    """Before a machine is made: the kernel and ramdisk are readable regular files (one line naming the key
    otherwise), and a warning on stderr if the memory asked for is more than the host has."""
    check_boot_files(cfg, where)
    warning = host_memory_warning(cfg, where)
    if warning:
        print(f"vmfork: {warning}", file=sys.stderr)


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


def _boot_to_ready(config: str, timeout: float) -> VM:
    """Boot a config's domain until its ready marker (the harness port's start marker) pauses it."""
    from ..config import load_config
    from ..fork import VM

    cfg = load_config(config)
    if cfg.kernel is None:
        raise VmforkError(f"{config}: missing required key \"kernel\"")
    check_config_files(cfg, config)
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


def cmd_save_config(args: argparse.Namespace) -> int:
    from ..snapshot import save

    vm = _boot_to_ready(args.config, args.timeout)
    try:
        result = save(vm, args.file)
    finally:
        vm.destroy()
    print(f"vmfork: saved {vm.name} at its ready marker to {args.file}: {result.file_size:,} bytes "
          f"({result.stored_pages} of {result.ram_pages} RAM pages are not zero)", file=sys.stderr)
    return 0


def cmd_save_devices_state_config(args: argparse.Namespace) -> int:
    from ..snapshot import save_device_state

    vm = _boot_to_ready(args.config, args.timeout)
    try:
        state = save_device_state(vm, args.file)
    finally:
        vm.destroy()
    print(f"vmfork: saved the state of {', '.join(state.names)} of {vm.name} at its ready marker to {args.file}",
          file=sys.stderr)
    return 0


def cmd_restore_foreground(args: argparse.Namespace) -> int:
    """Restore a save file and run it in the foreground, like `run`: console on the terminal, exit status the
    guest's."""
    from ..snapshot import restore

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


