"""A hostile guest (the test guest's `hostile` program, guests/testguest/hostile.asm): from CPL3 it writes random
values to every port vmfork decodes and to the IO-APIC, local APIC and unbacked MMIO, resets the UART mid-transfer,
and gets absurd console input from the host, for a fixed time and seeds. vmfork must keep running: no Python
exception escapes a device model (the vCPU loop turns one into a "vCPU thread failed" crash), memory stays bounded
(console buffers, the unknown-MMIO table), and fork, reset, save and restore of the attacked guest round-trip
exactly. bench/hostile.py runs the same loop for 10 minutes.
"""

from __future__ import annotations

import hashlib
import os
import resource
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmfork import VM
from vmfork.devices.base import MAX_UNKNOWN_MMIO

SECONDS = float(os.environ.get("VMFORK_HOSTILE_SECONDS", "20"))
OPS_PER_RUN = 3000
RUN_TIMEOUT = 2.0
CONSOLE_FLOOD = 4 << 20                  # bytes of console input fed during the attack


@dataclass
class HostileRun:
    """What one attack loop did."""

    seconds: float = 0.0
    runs: int = 0
    accesses: int = 0                    # port and MMIO accesses the guest completed
    outcomes: dict[str, int] = field(default_factory=dict)
    max_rss_kib: int = 0
    unknown_mmio: int = 0

    @property
    def per_second(self) -> float:
        return self.accesses / self.seconds if self.seconds else 0.0


def boot_hostile(kernel: Path) -> tuple[VM, int]:
    vm = VM.create(memory_mib=64, name="hostile")
    vm.load_kernel(kernel, cmdline="hostile")
    ev = vm.run(timeout=30)
    assert ev.reason == "harness-start", ev
    return vm, vm.vcpus[0].get_regs().rdi


def attack(fork: VM, buf: int, *, seconds: float, first_seed: int = 1, flood: int = CONSOLE_FLOOD) -> HostileRun:
    """Reset the fork, give it a seed, run it until it ends (end marker, exit, crash or timeout); repeat."""
    out = HostileRun()
    start = time.monotonic()
    seed = first_seed
    fed = 0
    while time.monotonic() - start < seconds:
        fork.reset()
        fork.memory.write(buf, struct.pack("<QQQ", seed, OPS_PER_RUN, 0))
        if fed < flood:
            chunk = b"\x1b[999999;999999H" * 4096 + bytes(range(256)) * 256
            fork.feed_console(chunk)             # the serial model keeps a bounded backlog; the rest is dropped
            fed += len(chunk)
        ev = fork.run(timeout=RUN_TIMEOUT)
        assert not (ev.crashed and "vCPU thread failed" in ev.detail), f"seed {seed}: {ev.detail}"
        out.outcomes[ev.reason] = out.outcomes.get(ev.reason, 0) + 1
        out.accesses += struct.unpack("<Q", fork.memory.read(buf + 16, 8))[0]
        out.runs += 1
        seed += 1
    out.seconds = time.monotonic() - start
    out.max_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.unknown_mmio = len(fork.bus.unknown_mmio)
    return out


LAPIC_TMCCT = 0x390            # the timer's current count: KVM computes it from the host clock at each read


def _digest(vm: VM) -> tuple[Any, ...]:
    """RAM and every part of the machine's state that does not move with host time by itself (the TSC, kvmclock,
    the PIT's load times, the PIC's request lines the PIT raises, the LAPIC timer count and the RTC do)."""
    st = vm.capture()
    v = st.vcpus[0]
    lapic = bytearray(bytes(v.lapic))
    lapic[LAPIC_TMCCT:LAPIC_TMCCT + 4] = bytes(4)
    devices = {k: d for k, d in st.devices.to_dict().items() if "rtc" not in k} if st.devices else None
    return (hashlib.sha256(vm.memory.read(0, 64 << 20)).hexdigest(), bytes(v.regs), bytes(v.sregs),
            bytes(v.xsave), bytes(lapic), bytes(st.platform.ioapic), devices)


def test_hostile_guest_cannot_break_the_device_models(pvh_guest: Path, tmp_path: Path, machines: list[Any]) -> None:
    parent, buf = boot_hostile(pvh_guest)
    machines.append(parent)
    fork = parent.fork()
    machines.append(fork)
    fork_point = _digest(fork)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = attack(fork, buf, seconds=SECONDS)
    print(f"hostile: {result.accesses} accesses in {result.runs} runs, {result.per_second:.0f}/s, "
          f"outcomes {result.outcomes}")
    assert result.runs >= 3 and result.accesses > 1000, result
    # Memory stays bounded: the serial backlog, the console output and the unknown-MMIO table have caps.
    assert result.max_rss_kib - rss_before < 128 << 10, result
    assert result.unknown_mmio <= MAX_UNKNOWN_MMIO + 1
    serial = fork.device("serial0")
    assert len(serial.output()) <= serial._output_limit
    assert fork.state != "destroyed"

    # Fork, reset, save and restore of the attacked guest round-trip exactly.
    attacked = _digest(fork)
    child = fork.fork()
    machines.append(child)
    assert _digest(child) == attacked
    save_path = tmp_path / "attacked.sav"
    from vmfork.snapshot import restore, save
    save(fork, save_path)
    back = restore(save_path)
    machines.append(back)
    assert _digest(back) == attacked
    child.destroy()
    fork.reset()
    assert _digest(fork) == fork_point
    # ... and the reset guest runs a seed as it did before the attack went on.
    fork.memory.write(buf, struct.pack("<QQQ", 7, 200, 0))
    ev1 = fork.run(timeout=RUN_TIMEOUT)
    done1 = fork.memory.read(buf + 16, 8)
    fork.reset()
    fork.memory.write(buf, struct.pack("<QQQ", 7, 200, 0))
    ev2 = fork.run(timeout=RUN_TIMEOUT)
    assert (ev1.reason, ev1.status) == (ev2.reason, ev2.status) and fork.memory.read(buf + 16, 8) == done1
