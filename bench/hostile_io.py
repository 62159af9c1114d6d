#!/usr/bin/env python3
"""A hostile client against a domain's QMP and console servers (issue 20, item 6): the time to reject a 32 MiB
line of garbage, and the guest's speed meanwhile, side by side with the same guest undisturbed, in one run.

    .venv/bin/python bench/hostile_io.py [--mib 32] [--rounds 3] [--markdown]

The guest is the test guest's `det` program printing lines without end: every byte is a UART `out`, one VM exit,
so exits per second (vmfork-query `exits`) are its speed. Per round: exits/s over one second undisturbed; then a
32 MiB line of `x` to the QMP socket (from the send to the error reply: "JSON parse error"); then 32 MiB of input
to the console socket (from the send to the domain's note that the input is dropped, the guest's UART queue being
full); the guest's exits/s over each of those windows.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from cli_harness import CliHarness  # noqa: E402


def exits(ts: CliHarness) -> int:
    return int(ts.execute("det", "vmfork-query")["exits"])


def rate_over(ts: CliHarness, fn: object) -> tuple[float, float]:
    """(seconds fn took, guest exits/s meanwhile)."""
    e0, t0 = exits(ts), time.monotonic()
    fn()  # type: ignore[operator]
    t1 = time.monotonic()
    return t1 - t0, (exits(ts) - e0) / max(1e-6, time.monotonic() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    kernel = ROOT / "build" / "guests" / "testguest-pvh.elf"
    garbage = b"x" * (args.mib << 20)
    rows: dict[str, list[tuple[float, float]]] = {"idle": [], "qmp": [], "console": []}
    with tempfile.TemporaryDirectory(prefix="vmfork-hostile-") as d, CliHarness(Path(d), kernel) as ts:
        dom = ts.create(ts.config("det", "det 100000000"))
        ts.wait_state(dom, "paused")
        ts.ok("unpause", "det")
        rec = ts.record(dom)
        time.sleep(0.5)
        for _ in range(args.rounds):
            rows["idle"].append(rate_over(ts, lambda: time.sleep(1.0)))

            def qmp() -> None:
                s = socket.socket(socket.AF_UNIX)
                s.connect(rec.qmp_socket)
                f = s.makefile("rb")
                f.readline()
                s.sendall(b'{"execute": "qmp_capabilities"}\n')
                f.readline()
                s.sendall(garbage + b"\n")
                reply = json.loads(f.readline())
                assert reply["error"]["desc"].startswith("JSON parse error"), reply
                s.close()
            rows["qmp"].append(rate_over(ts, qmp))

            def console() -> None:
                s = socket.socket(socket.AF_UNIX)
                s.connect(rec.console_socket)
                s.sendall(garbage)
                buf = b""
                while b"console input dropped" not in buf:
                    chunk = s.recv(1 << 16)
                    assert chunk, "the console closed"
                    buf = buf[-200:] + chunk
                s.close()
            rows["console"].append(rate_over(ts, console))
        ts.ok("destroy", "det")

    def med(key: str, i: int) -> float:
        return statistics.median(r[i] for r in rows[key])
    idle = med("idle", 1)
    if args.markdown:
        print(f"| {args.mib} MiB garbage line | time to reject | guest exits/s meanwhile | undisturbed | ratio |")
        print("|---|---:|---:|---:|---:|")
        for key, what in (("qmp", "QMP socket (error reply)"), ("console", "console socket (dropped-input note)")):
            print(f"| {what} | {med(key, 0):.2f} s | {med(key, 1):,.0f} | {idle:,.0f} | "
                  f"{med(key, 1) / idle:.2f} |")
    else:
        print(json.dumps({k: [[round(a, 3), round(b)] for a, b in v] for k, v in rows.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
