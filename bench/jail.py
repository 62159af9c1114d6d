"""The cost of the jail (issue 16): domain start, fork and reset, jailed and unjailed, side by side in one run.

    sudo .venv/bin/python bench/jail.py [--rounds 10] [--resets 200] [--markdown]

Each round starts one domain of each kind in turn (jailed, then unjailed, alternating which goes first), so host
noise falls on both alike. Measured from the toolstack's client, as `vmfork create` / `fork-vm` / `fork-reset` see
it: start = spawn until the domain reports ready (paused at the `loop` guest's ready marker); fork = `fork-vm -p`
of that paused domain until the fork reports ready; reset = one QMP `vmfork-reset` round trip on the fork after it
wrote 16 pages (the seccomp filter runs on every system call of the reset, the socket calls included).
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
    return start_s, fork_s, samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--resets", type=int, default=200)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/jail.py: the jail needs root")
    with tempfile.TemporaryDirectory(prefix="vmfork-bench-jail-") as tmp:
        rd = RunDir.open(Path(tmp) / "run")
        reg = Registry(rd)
        res: dict[bool, dict[str, list[float]]] = {j: {"start": [], "fork": [], "reset": []} for j in (True, False)}
        for n in range(args.rounds):
            for jailed in ((True, False) if n % 2 == 0 else (False, True)):
                s, f, r = one_round(rd, reg, jailed, n, args.resets)
                res[jailed]["start"].append(s)
                res[jailed]["fork"].append(f)
                res[jailed]["reset"].extend(r)
    rows = [("domain start (create to ready marker)", "start"), ("fork-vm -p (to ready)", "fork"),
            ("fork-reset after 16 pages (QMP round trip)", "reset")]
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
