"""Process-isolated forks on real /dev/kvm with the test guest: each fork in its own worker process, isolated from
its parent and siblings, surviving the death of one of them, and cleaned up after."""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from guest import boot, console, field, run_to_ready
from vmfork.errors import DeviceStateError, ForkError, MemoryAccessError, VmforkError, VmStateError
from vmfork.procfork import fork_process, worker_pool
from vmfork.vcpu import VcpuState
from vmfork.vm import MachineState, PlatformState

SCRATCH = 64 << 20          # where the `loop` program writes its pages


def loop_input(h, addr: int, npages: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    h.memory_write(addr, struct.pack("<QQ", npages, seed))


def scratch_words(h, npages: int) -> list[int]:  # type: ignore[no-untyped-def]
    data = h.memory_read(SCRATCH, npages * 4096)
    return [struct.unpack_from("<Q", data, i * 4096)[0] for i in range(npages)]


def parent_words(vm, npages: int) -> list[int]:  # type: ignore[no-untyped-def]
    return [struct.unpack("<Q", vm.memory.read(SCRATCH + i * 4096, 8))[0] for i in range(npages)]


def ram_digest(vm) -> str:  # type: ignore[no-untyped-def]
    return hashlib.sha256(vm.memory.pages.tobytes()).hexdigest()


def gone(pid: int) -> bool:
    """No such process, or only its zombie (a reparented one waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def reaped(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def wait_dead(h, timeout: float = 2) -> bool:  # type: ignore[no-untyped-def]
    """alive() turns False (and the handle dead) soon after the worker is killed."""
    deadline = time.monotonic() + timeout
    while h.alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    return not h.alive()


@pytest.fixture
def loop_parent(pvh_guest, machines):  # type: ignore[no-untyped-def]
    parent = boot(pvh_guest, "loop", machines, memory_mib=128)
    addr, _ = run_to_ready(parent)
    worker_pool(parent.shape).prefill(2)
    return parent, addr


def test_process_fork_runs_isolated_from_parent_and_siblings(loop_parent) -> None:  # type: ignore[no-untyped-def]
    parent, addr = loop_parent
    before = ram_digest(parent)
    a, b = fork_process(parent), fork_process(parent)
    assert len({a.pid, b.pid, os.getpid()}) == 3
    assert parent.children == [a, b] and a.state == b.state == "paused"
    loop_input(a, addr, 16, 0xAAAA)
    loop_input(b, addr, 16, 0xBBBB)
    assert a.run(timeout=20).reason == "harness-end"
    assert b.run(timeout=20).reason == "harness-end"
    assert scratch_words(a, 16) == [0xAAAA ^ i for i in range(16)]
    assert scratch_words(b, 16) == [0xBBBB ^ i for i in range(16)]
    assert parent_words(parent, 16) == [0] * 16
    assert ram_digest(parent) == before, "a process fork changed its parent's memory"


def test_process_fork_continues_exactly_like_its_parent(pvh_guest, machines) -> None:  # type: ignore[no-untyped-def]
    parent = boot(pvh_guest, "det 30", machines)
    run_to_ready(parent)
    before_fork = console(parent)
    child = fork_process(parent)
    ev = child.run(timeout=20)
    assert ev.reason == "exit" and ev.status == 0, ev
    child_out = child.console().decode()
    child.destroy()
    assert parent.run(timeout=20).reason == "exit"
    assert child_out.count("det ") == 30
    assert child_out == console(parent)[len(before_fork):]


def test_reset_through_the_worker(loop_parent) -> None:  # type: ignore[no-untyped-def]
    parent, addr = loop_parent
    child = fork_process(parent)
    base_regs = child.get_regs()
    assert base_regs["rip"] == parent.vcpus[0].get_regs().rip
    for seed in (1, 2, 3):
        loop_input(child, addr, 16, seed)
        assert child.run(timeout=20).reason == "harness-end"
        assert scratch_words(child, 16) == [seed ^ i for i in range(16)]
        pages = child.reset()
        assert 16 <= pages < 64, f"reset restored {pages} pages for a 16-page write"
        assert scratch_words(child, 16) == [0] * 16
        assert child.get_regs() == base_regs
        assert child.memory_read(addr, 4096) == parent.memory.read(addr, 4096)
    loop_input(child, addr, 4, 7)
    assert child.run(timeout=20).reason == "harness-end"
    end_rip = child.get_regs()["rip"]
    child.reset(memory=False)
    assert child.get_regs() == base_regs
    assert scratch_words(child, 4) == [7 ^ i for i in range(4)], "state-only reset must keep memory"
    loop_input(child, addr, 4, 9)
    assert child.run(timeout=20).reason == "harness-end"
    child.reset(state=False)
    assert scratch_words(child, 4) == [0] * 4
    assert child.get_regs()["rip"] == end_rip, "memory-only reset must keep the vCPU state"


def test_killed_worker_is_noticed_and_the_others_carry_on(loop_parent) -> None:  # type: ignore[no-untyped-def]
    parent, addr = loop_parent
    a, b = fork_process(parent, name="victim"), fork_process(parent, name="survivor")
    os.kill(a.pid, signal.SIGKILL)
    with pytest.raises(ForkError, match=rf"^fork victim \(pid {a.pid}\) died: killed by signal 9$"):
        loop_input(a, addr, 4, 1)
    assert a.state == "dead" and not a.alive()
    assert a not in parent.children and parent.children == [b]
    assert reaped(a.pid), "the dead worker was not waited for"
    with pytest.raises(ForkError, match="killed by signal 9"):
        a.run(timeout=1)
    # The sibling and the parent are untouched.
    loop_input(b, addr, 8, 0xB0)
    assert b.run(timeout=20).reason == "harness-end"
    assert scratch_words(b, 8) == [0xB0 ^ i for i in range(8)]
    assert parent_words(parent, 8) == [0] * 8
    c = fork_process(parent)
    loop_input(c, addr, 8, 0xC0)
    assert c.run(timeout=20).reason == "harness-end"
    assert scratch_words(c, 8) == [0xC0 ^ i for i in range(8)]
    # alive() notices a death without a request.
    os.kill(b.pid, signal.SIGKILL)
    assert wait_dead(b) and b.state == "dead" and reaped(b.pid)
    a.destroy()                                       # destroying a dead fork just unlinks it
    c.destroy()
    assert parent.children == [] and parent.memory.readonly is None
    parent.memory.write(addr, struct.pack("<QQ", 2, 5))
    assert parent.run(timeout=20).reason == "harness-end"
    assert parent_words(parent, 2) == [5, 4]


def test_destroy_leaves_no_worker_behind(pvh_guest, machines) -> None:  # type: ignore[no-untyped-def]
    parent = boot(pvh_guest, "det 3", machines)
    child = fork_process(parent)
    pid = child.pid
    assert child.alive() and not gone(pid)
    child.destroy()
    assert child.state == "destroyed" and gone(pid) and reaped(pid)
    child.destroy()
    with pytest.raises(VmStateError, match="destroyed"):
        child.run(timeout=1)
    assert parent.children == [] and parent.memory.readonly is None


def test_forks_of_process_forks_see_their_parent_fork(loop_parent) -> None:  # type: ignore[no-untyped-def]
    root, addr = loop_parent
    child = fork_process(root)
    loop_input(child, addr, 8, 0x1000)
    assert child.run(timeout=20).reason == "harness-end"
    grandchild = child.fork(name="gc")
    assert grandchild.parent is child and child.children == [grandchild]
    assert scratch_words(grandchild, 8) == [0x1000 ^ i for i in range(8)]
    with pytest.raises(VmStateError, match="gc"):
        child.run(timeout=1)
    with pytest.raises(MemoryAccessError, match="read-only"):
        child.memory_write(SCRATCH, b"x")
    with pytest.raises(VmStateError, match="gc"):
        child.destroy()
    # The grandchild continues from the end marker back to the ready marker, then writes its own pages.
    assert grandchild.run(timeout=20).reason == "harness-start"
    loop_input(grandchild, addr, 12, 0x2000)
    assert grandchild.run(timeout=20).reason == "harness-end"
    assert scratch_words(grandchild, 12) == [0x2000 ^ i for i in range(12)]
    assert scratch_words(child, 12) == [0x1000 ^ i for i in range(8)] + [0] * 4
    grandchild.reset()
    assert scratch_words(grandchild, 12) == [0x1000 ^ i for i in range(8)] + [0] * 4
    great = fork_process(grandchild)
    assert scratch_words(great, 8) == [0x1000 ^ i for i in range(8)]
    assert parent_words(root, 8) == [0] * 8
    pids = [grandchild.pid, great.pid]
    grandchild.destroy(tree=True)
    assert great.state == "destroyed" and all(gone(p) for p in pids)
    assert child.children == []
    assert child.run(timeout=20).reason == "harness-start", "the fork runs again once its forks are gone"
    # A fork of a fork does not depend on its parent fork's process: it keeps its own copies of the files.
    orphan = child.fork()
    os.kill(child.pid, signal.SIGKILL)
    assert scratch_words(orphan, 8) == [0x1000 ^ i for i in range(8)]
    assert orphan.run(timeout=20).reason == "harness-end"
    assert wait_dead(child) and child.state == "dead"
    orphan.destroy()
    assert child.children == [] and root.children == []


def test_parent_stays_paused_while_it_has_process_forks(loop_parent) -> None:  # type: ignore[no-untyped-def]
    parent, _ = loop_parent
    child = fork_process(parent, name="kid-1")
    with pytest.raises(VmStateError, match="kid-1"):
        parent.run(timeout=1)
    with pytest.raises(VmStateError, match="kid-1"):
        parent.destroy()
    with pytest.raises(MemoryAccessError, match="read-only"):
        parent.memory.write(SCRATCH, b"x")
    inproc = parent.fork()
    child.destroy()
    assert parent.memory.readonly is not None, "an in-process fork still lives"
    inproc.destroy()
    assert parent.run(timeout=20).reason == "harness-end"
    again = fork_process(parent)
    pid = again.pid
    parent.destroy(tree=True)
    assert again.state == "destroyed" and parent.state == "destroyed" and gone(pid)


def test_worker_errors_come_back_as_the_same_exception(pvh_guest, machines) -> None:  # type: ignore[no-untyped-def]
    parent = boot(pvh_guest, "fault", machines)
    child = fork_process(parent)
    with pytest.raises(MemoryAccessError) as local:
        parent.memory.read(1 << 40, 8)
    with pytest.raises(MemoryAccessError) as remote:
        child.memory_read(1 << 40, 8)
    assert str(remote.value) == str(local.value)
    assert any(f"pid {child.pid}" in note for note in remote.value.__notes__)
    ev = child.run(timeout=20)
    assert ev.crashed and child.state == "crashed" and "shut down" in ev.detail
    with pytest.raises(VmStateError, match="has crashed"):
        child.run(timeout=1)
    child.reset()
    assert child.state == "paused"
    with pytest.raises(ForkError, match="launch_dm"):
        fork_process(parent, launch_dm="maybe")  # type: ignore[arg-type]
    assert parent.children == [child]


def test_blocked_interrupts_and_capture(pvh_guest, machines) -> None:  # type: ignore[no-untyped-def]
    parent = boot(pvh_guest, "timer 40", machines)
    blocked = fork_process(parent, block_interrupts=True)
    normal = fork_process(parent)
    assert blocked.run(timeout=20).reason == "exit"
    assert normal.run(timeout=20).reason == "exit"
    assert int(field(blocked.console().decode(), "ticks")) == 0
    assert int(field(normal.console().decode(), "ticks")) > 0
    normal.reset()
    st = normal.capture()
    ref = parent.capture()
    assert st.shape == ref.shape and st.devices == ref.devices
    assert bytes(st.vcpus[0].regs) == bytes(ref.vcpus[0].regs)
    assert bytes(st.vcpus[0].sregs) == bytes(ref.vcpus[0].sregs)


def test_start_pause_and_pause_from_another_thread(pvh_guest, machines) -> None:  # type: ignore[no-untyped-def]
    parent = boot(pvh_guest, "timer 5000", machines)
    child = fork_process(parent)
    child.start()
    assert child.state == "running"
    assert child.wait(0.05).reason == "timeout" and child.state == "running"
    assert child.pause().reason == "pause" and child.state == "paused"
    events = []
    t = threading.Thread(target=lambda: events.append(child.run()))
    t.start()
    time.sleep(0.2)
    assert child.state == "running"
    child.pause()                       # must not wait for the guest's 5 seconds
    t.join(2)
    assert not t.is_alive() and events[0].reason == "pause"
    assert child.state == "paused"


def test_workers_die_with_their_parent_process(pvh_guest) -> None:  # type: ignore[no-untyped-def]
    script = (
        "import sys, time\n"
        "from vmfork.fork import VM\n"
        "from vmfork.procfork import fork_process, worker_pool\n"
        "vm = VM.create(memory_mib=64, name='p')\n"
        "vm.load_kernel(sys.argv[1], cmdline='det 3')\n"
        "worker_pool(vm.shape).target = 1\n"
        "h = fork_process(vm)\n"
        "print(h.pid, flush=True)\n"
        "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(pvh_guest)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        worker = int(proc.stdout.readline())
        time.sleep(0.1)
        workers = {worker} | {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                              and _ppid(p) == proc.pid}
        assert not gone(worker)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 2
    while not all(gone(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(gone(p) for p in workers), f"workers outlived their parent: {workers}"


def _ppid(p: Path) -> int:
    try:
        return int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def test_state_binary_form_round_trips_and_rejects_bad_bytes(pvh_guest, machines) -> None:  # type: ignore[no-untyped-def]
    vm = boot(pvh_guest, "det 3", machines)
    run_to_ready(vm)
    st = vm.capture()
    data = st.to_bytes()
    back = MachineState.from_bytes(data)
    assert back.shape == st.shape and back.vcpus == st.vcpus and back.devices == st.devices
    assert back.platform.parts() == st.platform.parts()
    assert back.to_bytes() == data
    assert VcpuState.from_bytes(st.vcpus[0].to_bytes()) == st.vcpus[0]
    assert PlatformState.from_bytes(st.platform.to_bytes()).parts() == st.platform.parts()

    def fails(blob: bytes, exc: type[VmforkError], pattern: str) -> None:
        with pytest.raises(exc, match=pattern):
            MachineState.from_bytes(blob)

    fails(data[:10], VmStateError, "too short")
    fails(b"X" + data[1:], VmStateError, "bad magic")
    fails(data[:8] + struct.pack("<I", 99) + data[12:], VmStateError, "format version 99")
    fails(data[:-1], VmStateError, "part 'devices' is truncated")
    fails(data + b"\0", VmStateError, "unexpected bytes")
    vcpu = st.vcpus[0].to_bytes()
    i = vcpu.index(b"lapic")            # grow the lapic part by one byte inside the nested vCPU state
    n = struct.unpack_from("<I", vcpu, i + 5)[0]
    bad_vcpu = vcpu[:i + 5] + struct.pack("<I", n + 1) + vcpu[i + 9:i + 9 + n] + b"\0" + vcpu[i + 9 + n:]
    bad = data.replace(struct.pack("<I", len(vcpu)) + vcpu, struct.pack("<I", len(bad_vcpu)) + bad_vcpu)
    assert bad != data
    fails(bad, VmStateError, r"part 'vcpu0': vCPU 0 state: part 'lapic' is 1025 bytes, expected 1024")
    i = data.index(b'{"version"')
    fails(data[:i] + b"[" + data[i + 1:], DeviceStateError, "part 'devices'")


def test_fork_out_of_memory_stops_only_that_fork(pvh_guest, machines) -> None:
    """A fork that goes over its memory limit while the guest writes is ended by the kernel and reported as out
    of memory; its parent and its sibling go on."""
    parent = boot(pvh_guest, "loop", machines, memory_mib=256)
    addr, _ = run_to_ready(parent)
    greedy = parent.fork(isolation="process", name="greedy", memory_limit_mib=24)
    modest = parent.fork(isolation="process", name="modest")
    greedy.memory_write(addr, struct.pack("<QQ", 16384, 1))          # 64 MiB of guest writes
    with pytest.raises(ForkError, match=r"greedy \(pid \d+\) died: killed by signal 9 \(out of memory"):
        greedy.run(timeout=60)
    assert greedy.state == "dead" and greedy not in parent.children
    modest.memory_write(addr, struct.pack("<QQ", 16, 2))
    assert modest.run(timeout=30).reason == "harness-end"
    assert struct.unpack("<Q", modest.memory_read(64 << 20, 8))[0] == 2
    modest.destroy()
    assert parent.run(timeout=30).reason == "harness-end"
    with pytest.raises(ForkError, match="needs a process fork"):
        parent.fork(memory_limit_mib=10)  # type: ignore[call-overload]


def test_a_prepared_worker_gives_the_same_fork(loop_parent) -> None:  # type: ignore[no-untyped-def]
    """Idle workers get ready for the parent last forked (its image mapped, its state's clock-free parts loaded,
    the machine built); a fork from such a worker runs exactly like one from a worker that got everything at the
    spawn, and with a console log file it is built at the spawn instead."""
    from vmfork import procfork
    parent, addr = loop_parent
    pool = worker_pool(parent.shape)
    pool.prefill(3)
    procfork.PREPARE_WORKERS = False
    try:
        plain = fork_process(parent)
    finally:
        procfork.PREPARE_WORKERS = True
    first = fork_process(parent)            # names the parent's key: the idle workers get ready for it
    key = procfork._prepare_key(parent, parent._state_for_forks())
    deadline = time.monotonic() + 20
    while not any(w.prepared == key for w in pool._idle) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert any(w.prepared == key for w in pool._idle), "no idle worker got prepared"
    before = pool.prepared_spawns
    prepared = fork_process(parent)
    assert pool.prepared_spawns == before + 1, "the fork did not come from the prepared worker"
    results = []
    for h in (plain, first, prepared):
        for seed in (3, 4):
            h.memory_write(addr, struct.pack("<QQ", 8, seed))
            assert h.run(timeout=20).reason == "harness-end"
            results.append((seed, h.get_regs()["rip"], h.memory_read(64 << 20, 8 * 4096)))
            h.reset()
    assert results[0:2] == results[2:4] == results[4:6]
    for h in (plain, first, prepared):
        h.destroy()
