"""Issue 18, item 4: one campaign on two machines, as AFL++ users run it (an rsync'ed sync dir), each machine with its
own copy of one template file (`vmfork save --template`) and its own vmfork workers. The machines are simulated:
two sync dirs on this host joined by a periodic local `rsync` of each side's own instances to the other, the recipe
of the README's "Many machines" section."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from cli_harness import CliHarness
from test_fuzz_sync import queue, seeds, stop, wait_for

ON_A = b'{"a":{"b":[true,{"c":null}]},"d":-1.5}'        # reaches jsmn code the other machine's seed does not
ON_B = b'["\\u00e9\\u0041\\n"]'

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed (./dev's APT_TEST)")


def push(src_sync: Path, prefix: str, dst_sync: Path) -> None:
    """One side's own instances to the other side (the README recipe, with a local path for `host:path`)."""
    own = sorted(str(p) for p in src_sync.glob(f"{prefix}*") if p.is_dir())
    if own:
        subprocess.run(["rsync", "-a", "--exclude=.vmfork", "--exclude=.synced", *own, f"{dst_sync}/"], check=True,
                       capture_output=True, timeout=30)


def test_two_machines_joined_by_rsync_share_finds(guest_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    template = tmp_path / "jsmn.tpl"
    with CliHarness(tmp_path / "build", guest_dir / "jsmn-pvh.elf") as ts:
        (tmp_path / "build").mkdir()
        ts.env.update(XDG_CACHE_HOME=env["XDG_CACHE_HOME"])
        domid = ts.create(ts.config("jsmn", "jsmn"))
        assert ts.wait_state(domid, "paused").reason == "harness-start"
        ts.ok("save", "--template", "jsmn", str(template))
        m = re.search(r"parse=(0x[0-9a-f]+) end=(0x[0-9a-f]+)", ts.log(domid))
        assert m, ts.log(domid)
        ts.ok("destroy", "jsmn")
    cover = f"{m.group(1)}-{m.group(2)}"
    machines = {name: tmp_path / name for name in ("A", "B")}
    for home in machines.values():          # ship the template: one file, its read-only mode kept (rsync -a)
        home.mkdir()
        subprocess.run(["rsync", "-a", str(template), f"{home}/"], check=True, timeout=30)
        assert (home / "jsmn.tpl").stat().st_mode & 0o777 == 0o444
    procs: dict[str, subprocess.Popen[str]] = {}
    common = ["--cover", cover, "--seconds", "90", "--quiet", "--seed", "5"]
    procs["A"] = subprocess.Popen([sys.executable, "-m", "vmfork.cli", "fuzz", "--template",
                                   str(machines["A"] / "jsmn.tpl"), "--corpus", str(seeds(machines["A"] / "in", ON_A)),
                                   "--out", str(machines["A"] / "sync"), "--name", "a", "--jobs", "2", *common],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs["B"] = subprocess.Popen([sys.executable, "-m", "vmfork.cli", "fuzz", "--template",
                                   str(machines["B"] / "jsmn.tpl"), "--corpus", str(seeds(machines["B"] / "in", ON_B)),
                                   "--out", str(machines["B"] / "sync"), "--name", "b", *common],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()
    errors: list[BaseException] = []

    def rsync_loop() -> None:               # the periodic job each machine runs (cron, a shell loop)
        while not done.wait(1.0):
            try:
                push(machines["A"] / "sync", "a-", machines["B"] / "sync")
                push(machines["B"] / "sync", "b", machines["A"] / "sync")
            except BaseException as e:      # the test thread reports it
                errors.append(e)
                return
    syncer = threading.Thread(target=rsync_loop, daemon=True)
    syncer.start()

    def imported(sync: Path, instances: tuple[str, ...], origin: str, data: bytes) -> bool:
        return any(re.search(rf",sync:{origin},", name) and content == data
                   for inst in instances for name, content in queue(sync / inst).items())
    try:
        wait_for("finds crossing between the machines",
                 lambda: errors == [] and imported(machines["B"] / "sync", ("b",), "a-[12]", ON_A) and
                 imported(machines["A"] / "sync", ("a-1", "a-2"), "b", ON_B), 90, tuple(procs.values()))
    finally:
        done.set()
        syncer.join(timeout=30)
        for p in procs.values():
            stop(p)
    assert not errors, errors
    results: dict[str, Any] = {name: (p.returncode, p.stderr.read() if p.stderr else "") for name, p in procs.items()}
    for name, (code, err) in results.items():
        assert "Traceback" not in err and code == 130 and err.endswith("vmfork: interrupted\n"), (name, code, err)
        assert not [line for line in err.splitlines() if "warning" in line], (name, err)
    # each machine's workers fuzzed forks of its own copy of the template
    for name, prefix in (("A", "a-"), ("B", "b")):
        own = sorted((machines[name] / "sync").glob(f"{prefix}*"))      # (a worker still starting may have none)
        assert own
        for inst in own:
            assert str(machines[name] / "jsmn.tpl") in (inst / "cmdline").read_text()
    # the other machine's instances arrived as copies (no lock, no scratch), and were read through .synced/
    copies = sorted((machines["B"] / "sync").glob("a-*"))
    assert copies, list((machines["B"] / "sync").iterdir())
    for copy in copies:
        assert (copy / "queue").is_dir() and not (copy / ".vmfork").exists() and not (copy / ".synced").exists()
    origins = {m.group(1) for name in queue(machines["B"] / "sync" / "b")
               if (m := re.search(r",sync:(a-[12]),", name))}
    for origin in origins:          # read through AFL++'s bookkeeping: the next id to import from there
        assert (machines["B"] / "sync" / "b" / ".synced" / origin).stat().st_size == 4
