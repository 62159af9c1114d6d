"""The introspection commands of the `vmfork` CLI, on domains (registered by vmfork.cli):

    vmfork mem read DOMAIN ADDR LEN [--virt] [--vcpu N] [--raw]     hexdump (--raw: the bytes on stdout)
    vmfork mem write DOMAIN ADDR DATA [--virt] [--vcpu N]           DATA: hex bytes ("de ad be ef"), or @FILE
    vmfork regs DOMAIN [--vcpu N]                                   every vCPU's registers, or one's
    vmfork translate DOMAIN VADDR [--vcpu N]                        the page-table walk
    vmfork disasm DOMAIN [ADDR] [-n COUNT] [--vcpu N]               disassembly (default: at rip)
    vmfork diff FORK [--max-pages N] [--max-lines N]                what a fork changed against its parent
    vmfork gdbserver DOMAIN [--listen HOST:PORT]                    a GDB server until Ctrl-C

Each takes a domid or a name. Numbers parse as Python integers (`0x800000`, `8388608`, `0o40000000`). Addresses are
guest-physical unless `--virt` (then virtual, through vCPU N's page tables, default 0). Reading a running domain is
allowed and racy (memory as it is at that moment, registers from each vCPU's last exit); a paused domain reads
consistently. Errors print one line and exit 1. The commands run in the domain process through its control socket
(`vmfork.vmi.qmp_commands`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import signal
import sys
from pathlib import Path
from typing import Any

from .errors import VmiError

__all__ = ["register_vmi_commands"]

CHUNK = 1 << 20                 # bytes per control-socket request (the domain's hexdump limit)


def _number(text: str, what: str, *, minimum: int = 0) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise VmiError(f"{what}: not a number: {text!r} (decimal, or 0x... hex)") from None
    if value < minimum:
        raise VmiError(f"{what}: must be at least {minimum}, got {text}")
    if value >= 1 << 64:
        raise VmiError(f"{what}: larger than 64 bits: {text}")
    return value


def _client(domain: str) -> Any:
    from ..toolstack.client import DomainClient
    return DomainClient(domain)


def _vcpu_args(args: argparse.Namespace) -> dict[str, Any]:
    return {} if args.vcpu is None else {"vcpu": _number(args.vcpu, "--vcpu")}


# --- mem ------------------------------------------------------------------------------------------------------------

def _cmd_mem_read(args: argparse.Namespace) -> int:
    addr = _number(args.addr, "ADDR")
    length = _number(args.length, "LEN", minimum=1)
    if addr + length > 1 << 64:
        raise VmiError(f"ADDR + LEN goes past 2^64: {addr:#x} + {length:#x}")
    extra: dict[str, Any] = {"virt": args.virt, **_vcpu_args(args)}
    out = sys.stdout.buffer
    with _client(args.domain) as c:
        pos, end = addr, addr + length
        while pos < end:
            n = min(CHUNK, end - pos)
            r = c.execute("vmfork-mem-read", addr=pos, length=n, raw=args.raw, partial=True, **extra)
            if args.raw:
                out.write(base64.b64decode(r["data"]))
            elif r["text"]:
                out.write(r["text"].encode() + b"\n")
            if r.get("stopped_at") is not None:
                out.flush()
                # What was readable is printed; the error names where it stopped.
                stop = int(r["stopped_at"])
                raise VmiError(f"read {stop - addr} of {length} bytes: {stop:#x} is not readable ({r['error']})")
            pos += n
    out.flush()
    return 0


def _cmd_mem_write(args: argparse.Namespace) -> int:
    addr = _number(args.addr, "ADDR")
    if args.data.startswith("@"):
        path = args.data[1:]
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise VmiError(f"{path}: no such file") from None
        except OSError as e:
            raise VmiError(f"{path}: {e.strerror or e}") from None
    else:
        from .commands import parse_bytes
        data = parse_bytes(args.data)
    if not data:
        raise VmiError("nothing to write: DATA is empty")
    extra: dict[str, Any] = {"virt": args.virt, **_vcpu_args(args)}
    with _client(args.domain) as c:
        for off in range(0, len(data), CHUNK):
            piece = data[off:off + CHUNK]
            c.execute("vmfork-mem-write", addr=addr + off, data=base64.b64encode(piece).decode(), encoding="base64",
                      **extra)
    print(f"wrote {len(data)} bytes at {'virtual' if args.virt else 'physical'} {addr:#x}")
    return 0


# --- registers, translation, disassembly ----------------------------------------------------------------------------

def _cmd_regs(args: argparse.Namespace) -> int:
    with _client(args.domain) as c:
        print(c.execute("vmfork-regs", **_vcpu_args(args))["text"])
    return 0


def _cmd_translate(args: argparse.Namespace) -> int:
    vaddr = _number(args.vaddr, "VADDR")
    with _client(args.domain) as c:
        print(c.execute("vmfork-translate", vaddr=vaddr, **_vcpu_args(args))["text"])
    return 0


def _cmd_disasm(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = _vcpu_args(args)
    if args.addr is not None:
        extra["addr"] = _number(args.addr, "ADDR")
    extra["count"] = _number(args.count, "-n", minimum=1)
    with _client(args.domain) as c:
        print(c.execute("vmfork-disasm", **extra)["text"])
    return 0


# --- diff -----------------------------------------------------------------------------------------------------------

def _cmd_diff(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {"max_pages": _number(args.max_pages, "--max-pages"),
                             "max_lines": _number(args.max_lines, "--max-lines")}
    if args.ancestor is not None:
        extra["ancestor"] = args.ancestor
    with _client(args.domain) as c:
        print(c.execute("vmfork-diff", **extra)["text"])
    return 0


# --- gdbserver ------------------------------------------------------------------------------------------------------

def parse_listen(text: str, option: str = "--listen") -> tuple[str, int]:
    """HOST:PORT, [IPV6]:PORT or PORT (loopback)."""
    host, port_text = "127.0.0.1", text
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1:close + 2] != ":":
            raise VmiError(f"{option} {text}: expected [IPV6]:PORT")
        host, port_text = text[1:close], text[close + 2:]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if not host:
            host = "127.0.0.1"
    try:
        port = int(port_text, 10)
    except ValueError:
        raise VmiError(f"{option} {text}: expected HOST:PORT or PORT") from None
    if not 0 <= port <= 65535:
        raise VmiError(f"{option} {text}: port must be 0-65535")
    return host, port


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _cmd_gdbserver(args: argparse.Namespace) -> int:
    from ..toolstack.runtime import ToolstackError
    listen: dict[str, Any] = {}
    if args.listen is not None:
        host, port = parse_listen(args.listen)
        listen = {"host": host, "port": port}

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    with _client(args.domain) as c:
        r = c.execute("vmfork-gdbserver-start", hold=True, **listen)
        where = _hostport(r["host"], int(r["port"]))
        label = c.record.label()
        old = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            print(f"gdb: target remote {where}", flush=True)
            print(f"vmfork: GDB server of {label} on {where}; Ctrl-C stops it", file=sys.stderr, flush=True)
            c.channel.sock.settimeout(None)
            try:
                while True:
                    c.channel.read_message()        # events; the domain closing the socket means it ended
            except ToolstackError:
                raise ToolstackError(f"{label} ended; its GDB server is gone") from None
        except KeyboardInterrupt:
            c.channel.sock.settimeout(30.0)
            with contextlib.suppress(ToolstackError, KeyboardInterrupt):
                c.execute("vmfork-gdbserver-stop")
            print(f"vmfork: GDB server of {label} stopped", file=sys.stderr, flush=True)
            return 0
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


# --- registration ---------------------------------------------------------------------------------------------------

def register_vmi_commands(sub: Any) -> None:
    """Add the introspection subcommands to the CLI's subparsers."""
    def domain_arg(p: argparse.ArgumentParser, name: str = "DOMAIN") -> None:
        p.add_argument("domain", metavar=name, help="domid or name")

    def vcpu_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--vcpu", metavar="N", default=None, help="vCPU index (default 0)")

    mem = sub.add_parser("mem", help="read or write a domain's memory (physical, or virtual with --virt)")
    mem_sub = mem.add_subparsers(dest="mem_command", required=True, metavar="read|write")
    p = mem_sub.add_parser("read", help="hexdump guest memory (--raw: the bytes on stdout)")
    domain_arg(p)
    p.add_argument("addr", metavar="ADDR", help="address (int(x, 0): 0x800000, 8388608)")
    p.add_argument("length", metavar="LEN", help="bytes to read")
    p.add_argument("--virt", action="store_true", help="ADDR is virtual, through the vCPU's page tables")
    vcpu_arg(p)
    p.add_argument("--raw", action="store_true", help="write the bytes to stdout instead of a hexdump")
    p.set_defaults(func=_cmd_mem_read)

    p = mem_sub.add_parser("write", help="write guest memory (a fork's next reset undoes it)")
    domain_arg(p)
    p.add_argument("addr", metavar="ADDR", help="address (int(x, 0))")
    p.add_argument("data", metavar="DATA", help="hex bytes (\"de ad be ef\", \"deadbeef\"), or @FILE")
    p.add_argument("--virt", action="store_true", help="ADDR is virtual, through the vCPU's page tables")
    vcpu_arg(p)
    p.set_defaults(func=_cmd_mem_write)

    p = sub.add_parser("regs", help="a domain's vCPU registers (all vCPUs unless --vcpu)")
    domain_arg(p)
    p.add_argument("--vcpu", metavar="N", default=None, help="only this vCPU")
    p.set_defaults(func=_cmd_regs)

    p = sub.add_parser("translate", help="translate a virtual address through a domain's page tables (the walk)")
    domain_arg(p)
    p.add_argument("vaddr", metavar="VADDR", help="virtual address (int(x, 0))")
    vcpu_arg(p)
    p.set_defaults(func=_cmd_translate)

    p = sub.add_parser("disasm", help="disassemble a domain's code (at rip unless ADDR)")
    domain_arg(p)
    p.add_argument("addr", metavar="ADDR", nargs="?", default=None, help="virtual address (default: rip)")
    p.add_argument("-n", dest="count", default="10", metavar="COUNT", help="instructions (default 10)")
    vcpu_arg(p)
    p.set_defaults(func=_cmd_disasm)

    p = sub.add_parser("diff", help="what a fork changed: its pages byte by byte against its parent's, and its "
                                    "registers against its fork point")
    domain_arg(p, "FORK")
    p.add_argument("--ancestor", default=None, metavar="DOMAIN",
                   help="compare with this ancestor (across domains only the parent is supported)")
    p.add_argument("--max-pages", default="64", metavar="N", help="pages shown (default 64; 0: all)")
    p.add_argument("--max-lines", default="16", metavar="N", help="differing lines shown per page (default 16; "
                                                                   "0: all)")
    p.set_defaults(func=_cmd_diff)

    p = sub.add_parser("gdbserver", help="serve GDB for a domain until Ctrl-C (loopback, port 1234 or the next "
                                         "free one, unless --listen)")
    domain_arg(p)
    p.add_argument("--listen", default=None, metavar="HOST:PORT",
                   help="address to listen on (PORT alone: loopback; port 0: any free port)")
    p.set_defaults(func=_cmd_gdbserver)
