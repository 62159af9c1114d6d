"""The cost of the jail (issue 16): domain start, fork and reset, jailed and unjailed, side by side in one run;
and the same for process forks (`isolation="process"`, procfork_jail.py).

    sudo .venv/bin/python bench/jail.py [--rounds 10] [--resets 200] [--markdown]

Each round starts one domain of each kind in turn (jailed, then unjailed, alternating which goes first), so host
noise falls on both alike. Measured from the toolstack's client, as `vmfork create` / `fork-vm` / `fork-reset` see
it: start = spawn until the domain reports ready (paused at the `loop` guest's ready marker); fork = `fork-vm -p`
of that paused domain until the fork reports ready; reset = one QMP `vmfork-reset` round trip on the fork after it
wrote 16 pages (the seccomp filter runs on every system call of the reset, the socket calls included).
Process forks: each round runs one child process per setting (VMFORK_PROCFORK_JAIL=1 / 0, alternating first):
a cold process fork (the worker started on demand, its jail included), five warm ones (a worker started and
jailed ahead, as the pool does) and resets after 16 written pages, from the VMM's side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vmfork.toolstack.client import DomainClient, start_domain  # noqa: E402
from vmfork.toolstack.registry import Registry  # noqa: E402
from vmfork.toolstack.runtime import RunDir  # noqa: E402

GUEST = ROOT / "build" / "guests" / "testguest-pvh.elf"


def fmt(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.0f} µs" if us < 10_000 else f"{us / 1000:,.1f} ms"


def one_round(rd: RunDir, reg: Registry, jailed: bool, n: int, resets: int) -> tuple[float, float, list[float]]:
    name = f"{'j' if jailed else 'u'}{n}"
    cfg = {"name": name, "memory": 64, "vcpus": 1, "kernel": str(GUEST), "cmdline": "loop",
           "jail": 1 if jailed else 0}
    t = time.perf_counter()
    parent = start_domain(rd, {"kind": "create", "config": cfg, "paused": False})
    with DomainClient(parent, registry=reg) as c:
        while c.execute("query-status")["status"] != "paused":
            time.sleep(0.002)
    start_s = time.perf_counter() - t
    t = time.perf_counter()
    fork = start_domain(rd, {"kind": "fork", "parent": parent, "name": None, "overrides": {}, "launch_dm": "yes",
                             "device_state": None, "paused": True, "block_interrupts": False})
    fork_s = time.perf_counter() - t
    samples = []
    with DomainClient(fork, registry=reg) as c:
        addr = c.execute("vmfork-regs-get")["rdi"]
        import base64
        c.execute("vmfork-memory-write", gpa=addr, data=base64.b64encode(struct.pack("<QQ", 16, 1)).decode())
        c.execute("cont")
        while c.execute("query-status")["status"] != "paused":
            time.sleep(0.002)
        for _ in range(resets):
            t = time.perf_counter()
            c.execute("vmfork-reset")
            samples.append(time.perf_counter() - t)
    with DomainClient(fork, registry=reg) as c:
        c.execute("quit")
    time.sleep(0.2)
    with DomainClient(parent, registry=reg) as c:
        c.execute("quit")
    deadline = time.monotonic() + 10       # the jailers' clean-up done before the next round (and the rmtree)
    while time.monotonic() < deadline and (reg.all() or list(rd.path.glob(".jail-*"))):
        time.sleep(0.02)
    return start_s, fork_s, samples


def procfork_child(resets: int) -> None:
    """(in a child process, the jail setting from its environment) one cold and one warm process fork, resets."""
    import json

    from vmfork.fork import VM
    from vmfork.procfork import fork_process, worker_pool
    parent = VM.create(memory_mib=64, name="pj")
    parent.load_kernel(GUEST, cmdline="loop")
    assert parent.run(timeout=30).reason == "harness-start"
    addr = parent.vcpus[0].get_regs().rdi
    pool = worker_pool(parent.shape)
    pool.target = 0
    t = time.perf_counter()
    cold = fork_process(parent)
    cold_s = time.perf_counter() - t
    cold.destroy()
    warm = []
    for _ in range(5):
        pool.prefill(1)
        time.sleep(0.3)
        t = time.perf_counter()
        h = fork_process(parent)
        warm.append(time.perf_counter() - t)
        h.destroy()
    pool.prefill(1)
    time.sleep(0.3)
    h = fork_process(parent)
    h.memory_write(addr, struct.pack("<QQ", 16, 1))
    h.run(timeout=30)
    samples = []
    for _ in range(resets):
        t = time.perf_counter()
        h.reset()
        samples.append(time.perf_counter() - t)
    h.destroy()
    parent.destroy(tree=True)
    print(json.dumps({"cold": cold_s, "warm": warm, "reset": samples}))


def procfork_round(jailed: bool, resets: int) -> dict[str, list[float]]:
    import json
    import subprocess
    env = dict(os.environ, VMFORK_PROCFORK_JAIL="1" if jailed else "0")
    p = subprocess.run([sys.executable, __file__, "--procfork-child", "--resets", str(resets)], env=env,
                       capture_output=True, text=True, check=True, timeout=300)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return {"cold": [out["cold"]], "warm": out["warm"], "preset": out["reset"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--resets", type=int, default=200)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--procfork-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.procfork_child:
        procfork_child(args.resets)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench/jail.py: the jail needs root")
    with tempfile.TemporaryDirectory(prefix="vmfork-bench-jail-", ignore_cleanup_errors=True) as tmp:
        rd = RunDir.open(Path(tmp) / "run")
        reg = Registry(rd)
        res: dict[bool, dict[str, list[float]]] = {j: {"start": [], "fork": [], "reset": []} for j in (True, False)}
        for n in range(args.rounds):
            for jailed in ((True, False) if n % 2 == 0 else (False, True)):
                s, f, r = one_round(rd, reg, jailed, n, args.resets)
                res[jailed]["start"].append(s)
                res[jailed]["fork"].append(f)
                res[jailed]["reset"].extend(r)
            for jailed in ((True, False) if n % 2 == 0 else (False, True)):
                for k, v in procfork_round(jailed, args.resets).items():
                    res[jailed].setdefault(k, []).extend(v)
    rows = [("domain start (create to ready marker)", "start"), ("fork-vm -p (to ready)", "fork"),
            ("fork-reset after 16 pages (QMP round trip)", "reset"),
            ("process fork, cold (worker started on demand)", "cold"),
            ("process fork, warm (worker started ahead)", "warm"),
            ("process fork reset after 16 pages", "preset")]
    print(f"{args.rounds} rounds, {args.resets} resets per fork; medians")
    if args.markdown:
        print("| operation | unjailed | jailed | jailed / unjailed |\n|---|---:|---:|---:|")
    for label, key in rows:
        u, j = statistics.median(res[False][key]), statistics.median(res[True][key])
        if args.markdown:
            print(f"| {label} | {fmt(u)} | {fmt(j)} | {j / u:.2f}x |")
        else:
            print(f"  {label:45s} unjailed {fmt(u):>10s}   jailed {fmt(j):>10s}   {j / u:.2f}x")


if __name__ == "__main__":
    main()
