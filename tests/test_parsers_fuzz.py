"""Fuzzed parsers (hypothesis): every input ends in a clean VmforkError (or a QMP/GDB protocol error reply), never
an unexpected exception or a hang.

Parsers: xl.cfg (config.py), save files and device-state files (snapshot/), QMP messages (toolstack/qmp.py: framing,
message and argument checks against every registered command), GDB remote packets (vmi/gdbserver.py's packet layer
and command handling, on a fork of a real paused guest), and kernel images (arch/x86/boot: Multiboot, PVH/ELF and
bzImage headers). Inputs are grammar-shaped where a grammar fits and mutations of real files otherwise.

A fixed budget runs here (VMFORK_FUZZ_EXAMPLES examples per parser, 300 by default: under a minute in all);
bench/fuzz_parsers.py runs the same targets for longer and reports inputs run and lines covered. Inputs that once
failed are kept in tests/corpus/<parser>/ and replayed by test_corpus_regressions.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmfork.errors import VmforkError

EXAMPLES = int(os.environ.get("VMFORK_FUZZ_EXAMPLES", "300"))
CORPUS = Path(__file__).parent / "corpus"
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


# --- targets (one function per parser: bytes in, a clean outcome or a test failure) ----------------------------------

def target_config(data: bytes) -> None:
    from vmfork.config import parse_config
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return                              # load_config refuses non-UTF-8 before parsing (tested in test_config)
    with contextlib.suppress(VmforkError):
        parse_config(text, path="fuzz.cfg", require_kernel=False)


def target_qmp(data: bytes) -> None:
    from vmfork.toolstack import domain as dom
    from vmfork.toolstack.qmp import JsonSplitter, QmpError, check_args, command_of, parse_message
    dom._load_extensions()
    splitter = JsonSplitter(limit=1 << 16)
    framed = splitter.feed(data[: len(data) // 2]) + splitter.feed(data[len(data) // 2:]) + splitter.finish()
    for f in framed:
        try:
            msg, _id, _has = parse_message(f)
            name, args = command_of(msg)
            cmd = dom.COMMANDS.get(name)
            if cmd is not None:
                check_args(cmd.args, args)
        except QmpError:
            pass


def _file_target(tmp: Path, suffix: str, load: Callable[[Path], Any]) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        path = tmp / f"input{suffix}"
        path.write_bytes(data)
        try:
            result = load(path)
        except VmforkError:
            return
        destroy = getattr(result, "destroy", None)
        if destroy is not None:
            destroy()
    return run


class _NullRam:
    """Guest RAM for the boot loaders (the GuestRam protocol): 64 MiB that only checks bounds."""

    size = 64 << 20

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        assert 0 <= gpa and gpa + len(data) <= (4 << 30) + self.size, (gpa, len(data))


def kernel_target(tmp: Path) -> Callable[[bytes], None]:
    from vmfork.arch.x86.boot import load_kernel

    def run(data: bytes) -> None:
        path = tmp / "kernel.img"
        path.write_bytes(data)
        for protocol in ("auto", "multiboot", "pvh", "linux"):
            with contextlib.suppress(VmforkError):
                load_kernel(path, _NullRam(), cmdline="console=ttyS0", protocol=protocol)  # type: ignore[arg-type]
    return run


# --- strategies -------------------------------------------------------------------------------------------------------

def mutations(seed: bytes, *, max_edits: int = 8) -> st.SearchStrategy[bytes]:
    """A real file with a few edits: byte overwrites, 32/64-bit field overwrites, truncation, insertion."""
    edit = st.one_of(
        st.tuples(st.just("byte"), st.integers(0, max(0, len(seed) - 1)), st.binary(min_size=1, max_size=4)),
        st.tuples(st.just("field"), st.integers(0, max(0, len(seed) - 8)),
                  st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 63, (1 << 64) - 1,
                                   len(seed), len(seed) + 1, 0x1000, 0x100000])),
        st.tuples(st.just("truncate"), st.integers(0, len(seed)), st.just(b"")),
        st.tuples(st.just("insert"), st.integers(0, len(seed)), st.binary(min_size=1, max_size=64)),
    )

    def apply(edits: list[tuple[str, int, Any]]) -> bytes:
        b = bytearray(seed)
        for kind, off, val in edits:
            if kind == "byte":
                b[off:off + len(val)] = val
            elif kind == "field":
                width = 8 if val >= 1 << 32 else 4
                b[off:off + width] = val.to_bytes(width, "little")
            elif kind == "truncate":
                del b[off:]
            else:
                b[off:off] = val
        return bytes(b)
    return st.lists(edit, min_size=1, max_size=max_edits).map(apply)


_CFG_KEYS = ["name", "memory", "vcpus", "kernel", "ramdisk", "cmdline", "extra", "on_poweroff", "on_reboot",
             "on_crash", "boot_protocol", "jail", "jail_user", "cap", "maxmem", "Name", "x"]
_CFG_VALUES = st.one_of(
    st.integers(-(1 << 70), 1 << 70).map(str), st.sampled_from(["0x10", "0x", "010", "0", "-1", "1e3", "\"\"", "[]"]),
    st.text(max_size=20).map(lambda s: '"' + s.replace("\n", "\\n") + '"'),
    st.text(max_size=12).map(lambda s: "'" + s + "'"),
    st.lists(st.sampled_from(['"a"', "1", "'b'", "[", "]", ","]), max_size=6).map(lambda x: "[" + ", ".join(x) + "]"),
    st.sampled_from(['"destroy"', '"restart"', '"auto"', '"pvh"', '"\\x41"', '"\\q"', '"unterminated']),
)
CONFIG_TEXT = st.one_of(
    st.lists(st.tuples(st.sampled_from(_CFG_KEYS), st.sampled_from([" = ", "=", " := ", " "]), _CFG_VALUES,
                       st.sampled_from(["\n", ";", " # c\n", "\r\n", ""])), max_size=12)
    .map(lambda lines: "".join(k + op + v + end for k, op, v, end in lines)).map(str.encode),
    st.binary(max_size=300),
    st.text(alphabet="name=\"'[],;#\\\n x0123456789-_.", max_size=200).map(str.encode),
)

_JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=False),
                          st.text(max_size=12))
_JSON = st.recursive(_JSON_SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                          max_size=4), max_leaves=12)


def _qmp_message(draw: Callable[[Any], Any]) -> bytes:
    import json

    from vmfork.toolstack import domain as dom
    dom._load_extensions()
    names = [*sorted(dom.COMMANDS), "qmp_capabilities", "nope"]
    msg: dict[str, Any] = {}
    if draw(st.booleans()):
        msg["execute"] = draw(st.sampled_from(names) | _JSON)
    if draw(st.booleans()):
        keys = ["filename", "gpa", "length", "data", "encoding", "vcpu", "regs", "memory", "state", "child", "name",
                "addr", "count", "host", "port", "hold", "live", "actions", "action", "x"]
        msg["arguments"] = draw(st.dictionaries(st.sampled_from(keys), _JSON, max_size=4) | _JSON)
    if draw(st.booleans()):
        msg["id"] = draw(_JSON)
    if draw(st.integers(0, 9)) == 0:
        msg[draw(st.text(max_size=6))] = draw(_JSON)
    text = json.dumps(msg)
    return text.encode()


QMP_STREAM = st.one_of(
    st.lists(st.composite(lambda draw: _qmp_message(draw))(), max_size=6).map(lambda m: b"\n".join(m)),
    st.binary(max_size=400),
    st.text(alphabet='{}[]"\\:,  \nabc01', max_size=300).map(str.encode),
)


def _gdb_packet(payload: bytes, good: bool) -> bytes:
    from vmfork.vmi.gdbserver import _checksum
    return b"$" + payload + b"#" + (_checksum(payload) if good else b"zz")


_GDB_SAFE_CMDS = [b"?", b"g", b"G", b"p", b"P", b"m", b"M", b"X", b"H", b"T", b"Z0,", b"z0,", b"Z1,", b"z1,", b"Z2,",
                  b"z4,", b"qSupported", b"qXfer:features:read:target.xml:", b"qXfer:x:", b"qfThreadInfo",
                  b"qsThreadInfo", b"qC", b"qThreadExtraInfo,", b"qAttached", b"qSymbol", b"QStartNoAckMode",
                  b"qRcmd,", b"vMustReplyEmpty", b"q", b"Q", b""]
GDB_STREAM = st.one_of(
    st.lists(st.tuples(st.sampled_from(_GDB_SAFE_CMDS),
                       st.binary(max_size=24).map(lambda b: bytes(c for c in b if c not in b"$#}*"))
                       | st.sampled_from([b"0", b"1,8", b"ffffffffffffffff,10", b"1000,4:41424344", b"-1", b"p1.1",
                                          b"1000,fffff", b"0:", b"10=ff", b",", b":"]),
                       st.booleans()), max_size=8)
    .map(lambda ps: b"".join(_gdb_packet(c + p, g) for c, p, g in ps)),
    # raw bytes, without the commands that resume, step, kill or detach the target (those wait for the guest)
    st.binary(max_size=200).map(lambda b: bytes(c for c in b if c not in b"cCsSkDRvi")),
)


# --- fixtures ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def paused_guest(pvh_guest: Path) -> Iterator[Any]:
    from vmfork import VM
    vm = VM.create(memory_mib=64, name="fuzz-parent")
    vm.load_kernel(pvh_guest, cmdline="demo")
    ev = vm.run(timeout=30)
    assert ev.reason == "harness-start", ev
    yield vm
    vm.destroy(tree=True)


@pytest.fixture(scope="module")
def seed_files(paused_guest: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    from vmfork.snapshot import save, save_device_state
    d = tmp_path_factory.mktemp("seeds")
    save(paused_guest, d / "g.sav")
    save_device_state(paused_guest, d / "g.dm")
    return {"save": (d / "g.sav").read_bytes(), "devstate": (d / "g.dm").read_bytes()}


# --- the fuzz tests ---------------------------------------------------------------------------------------------------

@FUZZ
@given(CONFIG_TEXT)
def test_fuzz_xl_cfg(data: bytes) -> None:
    target_config(data)


@FUZZ
@given(QMP_STREAM)
def test_fuzz_qmp_messages(data: bytes) -> None:
    target_qmp(data)


def test_fuzz_device_state_files(seed_files: dict[str, bytes], tmp_path: Path) -> None:
    from vmfork.snapshot import load_device_state
    run = _file_target(tmp_path, ".dm", load_device_state)

    @FUZZ
    @given(mutations(seed_files["devstate"]) | st.binary(max_size=200))
    def fuzz(data: bytes) -> None:
        run(data)
    fuzz()


def _containers(x: Any) -> list[Any]:
    """The dicts and lists in a JSON document, depth first."""
    if not isinstance(x, dict | list):
        return []
    out = [x]
    for v in (x.values() if isinstance(x, dict) else x):
        out += _containers(v)
    return out


def _edit_json(doc: Any, edits: list[tuple[int, int, Any]]) -> Any:
    """`doc` with leaves replaced or keys dropped: each edit (which node, what, value) walks to the node-th
    container in a depth-first order."""
    import copy
    doc = copy.deepcopy(doc)
    for which, what, value in edits:
        nodes = _containers(doc)
        node = nodes[which % len(nodes)]
        if not node:
            continue
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = keys[what % len(keys)]
        if what % 5 == 0 and isinstance(node, dict):
            del node[key]
        else:
            node[key] = value
    return doc


def device_state_file(path: Path, doc: Any) -> None:
    """A well-formed device-state container (checksums right) around any JSON document."""
    import json

    from vmfork.snapshot.container import ContainerWriter, SectionSpec
    from vmfork.snapshot.devstate import FORMAT, MAGIC
    data = json.dumps(doc).encode()
    with ContainerWriter(path, MAGIC, FORMAT, {"vm": "fuzz", "devices": []}, [SectionSpec("devices", len(data))]) as w:
        w.write("devices", data)
        w.commit()


def test_fuzz_device_state_contents(paused_guest: Any, tmp_path: Path) -> None:
    """Past the container's checks: the device states themselves (DeviceSetState.from_dict and every device's)."""
    from vmfork.devices import DeviceSetState
    from vmfork.snapshot import load_device_state
    seed = DeviceSetState.capture_all(paused_guest.devices).to_dict()
    path = tmp_path / "c.dm"

    @FUZZ
    @given(st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 1 << 16), _JSON), min_size=1, max_size=4))
    def fuzz(edits: list[tuple[int, int, Any]]) -> None:
        device_state_file(path, _edit_json(seed, edits))
        try:
            state = load_device_state(path)
        except VmforkError:
            return
        fork = paused_guest.fork(launch_dm="no")     # a state that loads must also attach, or be refused cleanly
        try:
            fork.attach_device_model(state)
        except VmforkError:
            pass
        finally:
            fork.destroy()
    fuzz()


def test_fuzz_save_file_contents(seed_files: dict[str, bytes], tmp_path: Path) -> None:
    """Past the container's checks: well-formed save files (checksums right) around an edited header, machine state
    or RAM map, restored."""
    from vmfork.snapshot import restore
    from vmfork.snapshot.container import ContainerFile, ContainerWriter, SectionSpec
    from vmfork.snapshot.savefile import FORMAT, MAGIC
    seed_path = tmp_path / "seed.sav"
    seed_path.write_bytes(seed_files["save"])
    with ContainerFile.open(seed_path, MAGIC, FORMAT) as f:
        header = dict(f.header)
        sections = {name: f.read(name) for name in ("machine", "ram-map", "ram")}
    header.pop("sections", None)
    path = tmp_path / "c.sav"

    @FUZZ
    @given(st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 1 << 16), _JSON), max_size=3),
           st.one_of(st.just(None), mutations(sections["machine"], max_edits=4)),
           st.one_of(st.just(None), mutations(sections["ram-map"], max_edits=2)))
    def fuzz(edits: list[tuple[int, int, Any]], machine: bytes | None, ram_map: bytes | None) -> None:
        head = _edit_json(header, edits) if edits else header
        if not isinstance(head, dict):
            return
        parts = {"machine": machine if machine is not None else sections["machine"],
                 "ram-map": ram_map if ram_map is not None else sections["ram-map"], "ram": sections["ram"]}
        try:
            with ContainerWriter(path, MAGIC, FORMAT, head, [SectionSpec(n, len(d), 4096 if n == "ram" else 8)
                                                             for n, d in parts.items()]) as w:
                for n, d in parts.items():
                    w.write(n, d)
                w.commit()
        except (TypeError, ValueError):
            return                          # a header JSON cannot hold (e.g. a float NaN key): not a file
        try:
            vm = restore(path)
        except VmforkError:
            return
        vm.destroy()
    fuzz()


def test_fuzz_save_files(seed_files: dict[str, bytes], tmp_path: Path) -> None:
    from vmfork.snapshot import restore
    run = _file_target(tmp_path, ".sav", restore)
    seed = seed_files["save"]
    header_end = min(len(seed), 8192)       # most of the structure (preamble, header, section table) is up front

    @FUZZ
    @given(mutations(seed[:header_end]).map(lambda head: head + seed[header_end:]) | mutations(seed, max_edits=3))
    def fuzz(data: bytes) -> None:
        run(data)
    fuzz()


def test_fuzz_kernel_headers(pvh_guest: Path, multiboot_guest: Path, tmp_path: Path) -> None:
    seeds = [pvh_guest.read_bytes()[:16384], multiboot_guest.read_bytes()[:16384]]
    bz = Path(__file__).resolve().parents[1] / "build" / "linux"
    bzimages = sorted(bz.glob("*bzImage*")) + sorted(bz.glob("vmlinuz*"))
    if bzimages:
        seeds.append(bzimages[0].read_bytes()[:32768])
    run = kernel_target(tmp_path)

    @FUZZ
    @given(st.sampled_from(range(len(seeds))).flatmap(lambda i: mutations(seeds[i], max_edits=6)))
    def fuzz(data: bytes) -> None:
        run(data)
    fuzz()


def gdb_session(server: Any, data: bytes) -> None:
    """Feed `data` to the server's packet layer and command handling as one client's stream (then EOF)."""
    from vmfork.vmi.gdbserver import _Disconnected
    ours, peer = socket.socketpair()
    replies = bytearray()

    def drain() -> None:
        with contextlib.suppress(OSError):
            while chunk := peer.recv(65536):
                replies.extend(chunk)
    t = threading.Thread(target=drain, daemon=True)
    t.start()
    peer.sendall(data)
    peer.shutdown(socket.SHUT_WR)
    server._conn, server._buf, server._ack = ours, b"", True
    try:
        server._attach()
        server._session()
    except _Disconnected:
        pass
    finally:
        ours.close()
        t.join(10)
        peer.close()
        server._conn = None
    assert not t.is_alive(), "the GDB server's replies did not end"


def test_fuzz_gdb_packets(paused_guest: Any) -> None:
    from vmfork.vmi.gdbserver import GdbServer
    holder: dict[str, Any] = {}

    @FUZZ
    @given(GDB_STREAM)
    def fuzz(data: bytes) -> None:
        fork = paused_guest.fork()
        server = GdbServer(fork, "127.0.0.1", 0)
        holder["server"] = server
        try:
            gdb_session(server, data)
        finally:
            server.close()
            fork.destroy()
    fuzz()


# --- regressions ------------------------------------------------------------------------------------------------------

def _corpus(parser: str) -> list[Path]:
    return sorted((CORPUS / parser).glob("*")) if (CORPUS / parser).is_dir() else []


@pytest.mark.parametrize("parser", ["config", "qmp", "devstate", "save", "kernel", "gdb"])
def test_corpus_regressions(parser: str, tmp_path: Path, paused_guest: Any) -> None:
    """Inputs that once crashed or hung a parser: each now ends cleanly."""
    from vmfork.snapshot import load_device_state, restore
    from vmfork.vmi.gdbserver import GdbServer
    files = _corpus(parser)
    for path in files:
        data = path.read_bytes()
        if parser == "config":
            target_config(data)
        elif parser == "qmp":
            target_qmp(data)
        elif parser == "devstate":
            _file_target(tmp_path, ".dm", load_device_state)(data)
        elif parser == "save":
            _file_target(tmp_path, ".sav", restore)(data)
        elif parser == "kernel":
            kernel_target(tmp_path)(data)
        else:
            fork = paused_guest.fork()
            server = GdbServer(fork, "127.0.0.1", 0)
            try:
                gdb_session(server, data)
            finally:
                server.close()
                fork.destroy()
