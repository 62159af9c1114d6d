"""The xl-style toolstack commands of the `vmfork` CLI (registered by vmfork.cli).

Every command takes a domid or a name where it takes a domain, exits 0 on success and prints one line
(`vmfork: error: ...`) and exits non-zero on failure.

Fork configs (`fork-vm -C FILE`, xl.cfg syntax): a fork is a copy of its parent, so its config only says what differs.
  name                              required, and different from the parent's (and from every other domain's)
  on_poweroff, on_reboot, on_crash  may change (what happens when the fork powers off, resets, crashes;
                                    "restart" of a fork resets it to the fork point and runs it again)
  memory, vcpus                     may be left out (inherited); if given they must equal the parent's
  kernel, ramdisk, cmdline, extra, boot_protocol
                                    accepted and ignored (a fork does not boot), so the parent's own config with
                                    a new name works
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from typing import Any

from ..config import DomainConfig, load_config
from ..errors import ConfigError
from .client import DomainClient, destroy_domain, open_registry, require_control, start_domain, sweep
from .domfile import live_domains
from .foreground import check_config_files
from .jail import JAIL_HELP, NO_JAIL_HELP, jail_spec
from .passfd import OutputFile, named, open_input
from .qmp import QmpChannel, QmpCommandError
from .registry import DomainRecord, Registry, record_from_file
from .runtime import RunDir, ToolstackError

__all__ = ["add_toolstack_commands"]

FORK_MAY_CHANGE = ("name", "on_poweroff", "on_reboot", "on_crash")
FORK_MUST_MATCH = ("memory", "vcpus")


def _registry() -> Registry:
    return open_registry()


def _config_keys(path: str) -> set[str]:
    """The keys a config file sets (the parser fills in defaults for the others)."""
    from ..config import _Parser  # the settings as written, before defaults
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return {"cmdline" if s.key == "extra" else s.key for s in _Parser(text, path).parse()}


def _fork_config(path: str, parent: DomainRecord) -> tuple[DomainConfig, dict[str, str]]:
    """A fork's config checked against its parent: (config, the on_* overrides it sets)."""
    cfg = load_config(path, require_kernel=False)
    keys = _config_keys(path)
    for key in FORK_MUST_MATCH:
        if key in keys and getattr(cfg, key) != getattr(parent, key):
            unit = " MiB" if key == "memory" else ""
            raise ConfigError(f"{path}: {key}: a fork has its parent's {key} ({getattr(parent, key)}{unit} for "
                              f"{parent.label()}); the config gives {getattr(cfg, key)}{unit}")
    overrides: dict[str, str] = {k: str(getattr(cfg, k)) for k in ("on_poweroff", "on_reboot", "on_crash")
                                 if k in keys}
    return cfg, overrides


def _check_max_vcpus(value: int | None, rec: DomainRecord) -> None:
    if value is not None and value != rec.vcpus:
        raise ToolstackError(f"-m {value}: a fork has its parent's vCPUs, and {rec.label()} has {rec.vcpus}")


# --- commands -------------------------------------------------------------------------------------------------------

def _cmd_create(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    assert cfg.kernel is not None
    check_config_files(cfg, args.config)
    reg = _registry()
    sweep(reg)
    # With -c the domain starts paused and runs once the console is attached, so none of its output is missed.
    paused = args.paused or args.console
    domid = start_domain(reg.run_dir, jail_spec({"kind": "create", "config": cfg.to_dict(), "paused": paused},
                                                no_jail=args.no_jail, jail=args.jail, config_jail=cfg.jail,
                                                label=cfg.name))
    print(domid, flush=True)
    if args.console:
        rec = reg.find(domid)
        from .console import attach

        def run() -> None:
            if not args.paused:
                with DomainClient(rec, registry=reg) as c:
                    c.execute("cont")
        return attach(rec.console_socket, label=rec.label(), on_attached=run)
    return 0


def _pages_owned(rec: DomainRecord) -> int | None:
    if rec.parent is None or not rec.alive or rec.held:
        return None
    try:
        with QmpChannel.connect(rec.qmp_socket, timeout=2.0) as chan:
            pages = chan.execute("vmfork-query").get("pages_owned")
            return None if pages is None else int(pages)
    except ToolstackError:
        return None


def _shown_reason(rec: DomainRecord) -> str:
    """The reason column: the row's, plus who holds a paused domain paused (like Xen's pause count)."""
    reason = rec.shown_reason
    if rec.alive and rec.holders and rec.state == "paused":
        held = f"paused by {rec.holders.replace(',', ' and ')}"
        reason = f"{reason}; {held}" if reason else held
    return reason


def _query_extras(rec: DomainRecord) -> tuple[dict[str, int] | None, dict[str, Any] | None]:
    """How often each host workaround (vmfork.workarounds) did its work in the domain, and whether its guest uses
    the VMGenID device (vmfork.vmgenid.status); None for what it cannot say."""
    if not rec.alive or rec.held:
        return None, None
    try:
        with QmpChannel.connect(rec.qmp_socket, timeout=2.0) as chan:
            q = chan.execute("vmfork-query")
    except ToolstackError:
        return None, None
    counts, generation = q.get("workarounds"), q.get("vmgenid")
    return ({str(k): int(v) for k, v in counts.items()} if isinstance(counts, dict) else None,
            generation if isinstance(generation, dict) else None)


def _entry(rec: DomainRecord, now: float) -> dict[str, Any]:
    return {
        "domid": rec.domid, "name": rec.name, "state": rec.shown_state, "reason": _shown_reason(rec),
        "pause_holders": [h for h in rec.holders.split(",") if h] if rec.alive else [],
        "parent": rec.parent, "kind": rec.kind, "memory": rec.memory, "vcpus": rec.vcpus,
        "uptime": round(now - rec.created, 1), "pages_owned": _pages_owned(rec), "launch_dm": rec.launch_dm,
        "pid": rec.pid, "alive": rec.alive, "console_log": rec.console_log, "qmp_socket": rec.qmp_socket,
        "console_socket": rec.console_socket, "created": rec.created, "config": rec.config,
        "cpuid": rec.config.get("cpuid"),
    }


FUZZ_NUMBERS = ("execs", "execs_per_s", "crashes", "unique_crashes", "hangs", "corpus", "blocks_hit", "blocks_total")


def _fuzz_stats(reg: Registry, rec: DomainRecord, now: float) -> dict[str, Any] | None:
    """A held fork's live fuzzing numbers from the file its fuzzer writes about once a second (fuzz/target.py),
    with their age in seconds; None if there are none (not started yet, or unreadable)."""
    if not rec.held or not rec.alive:
        return None
    try:
        data = json.loads(reg.fuzz_stats(rec.domid).read_text())
        out: dict[str, Any] = {k: data[k] for k in FUZZ_NUMBERS}
        if not all(v is None or isinstance(v, int | float) for v in out.values()):
            return None
        out["age_s"] = round(max(0.0, now - float(data["updated"])), 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return out


def _fuzz_line(stats: dict[str, Any] | None) -> str:
    """The numbers under a held fork's row of `vmfork list` ("-" for those it does not have)."""
    s = stats or {}

    def num(key: str) -> str:
        return "-" if s.get(key) is None else f"{s[key]:g}" if isinstance(s[key], float) else str(s[key])
    rate = "-" if s.get("execs_per_s") is None else f"{s['execs_per_s']:.0f}/s"
    cov = "-" if s.get("blocks_total") is None else f"{num('blocks_hit')}/{num('blocks_total')}"
    age = "-" if s.get("age_s") is None else f"{num('age_s')}s"
    return (f"    fuzz: execs {num('execs')}  {rate}  crashes {num('crashes')} ({num('unique_crashes')} unique)  "
            f"corpus {num('corpus')}  cov {cov}  age {age}")


def _list_records() -> tuple[Registry | None, list[DomainRecord]]:
    """The domains to list: the registry's, swept (see client.sweep), plus live domains it lacks. A registry that
    cannot be opened or read (damaged, or a full disk) is reported in one line on stderr, and the live domains are
    listed from their domain files."""
    rd = RunDir.open()
    try:
        reg = Registry(rd)
    except ToolstackError as e:
        print(f"vmfork: warning: {e}", file=sys.stderr)
        reg = None
    records: dict[int, DomainRecord] = {}
    if reg is not None:
        with contextlib.suppress(ToolstackError):
            sweep(reg)
        try:
            records = {r.domid: r for r in reg.all()}
        except ToolstackError as e:
            print(f"vmfork: warning: {e}", file=sys.stderr)
    for domid, data in live_domains(rd.path).items():
        if domid not in records:
            rec = record_from_file(data)
            if rec is not None:
                records[domid] = rec
    return reg, [records[d] for d in sorted(records)]


def _cmd_list(args: argparse.Namespace) -> int:
    reg, records = _list_records()
    now = time.time()
    if args.domains:
        by_name = {r.name: r.domid for r in records}
        wanted = []
        for d in args.domains:
            if d.isdigit() and any(r.domid == int(d) for r in records):
                wanted.append(int(d))
            elif d in by_name:
                wanted.append(by_name[d])
            else:
                raise ToolstackError(f"no domain {'with id ' if d.isdigit() else 'named '}"
                                     f"{d if d.isdigit() else repr(d)} (vmfork list shows the domains)")
        records = [r for r in records if r.domid in wanted]
    entries = [_entry(r, now) for r in records]
    for e, r in zip(entries, records, strict=True):
        e["fuzz"] = _fuzz_stats(reg, r, now) if reg is not None else None
    history: list[dict[str, Any]] = []
    if args.all and reg is not None:
        with contextlib.suppress(ToolstackError):
            history = reg.history()
    if args.json:
        for e, r in zip(entries, records, strict=True):
            e["workarounds"], e["vmgenid"] = _query_extras(r)
        ended = [{"domid": h["domid"], "name": h["name"], "state": "ended", "reason": h["why"],
                  "ended": h["ended"]} for h in history]
        print(json.dumps(entries + ended, indent=2))
        return 0
    if args.tree:
        _print_tree(entries)
        return 0
    print(f"{'Name':<24} {'ID':>5} {'Mem':>6} {'VCPUs':>5} {'State':<9} {'Parent':>6} {'Uptime':>8} {'Pages':>7}  "
          "Reason")
    for e in entries:
        parent = "-" if e["parent"] is None else str(e["parent"])
        pages = "-" if e["pages_owned"] is None else str(e["pages_owned"])
        print(f"{e['name']:<24} {e['domid']:>5} {e['memory']:>6} {e['vcpus']:>5} {e['state']:<9} {parent:>6} "
              f"{e['uptime']:>8.1f} {pages:>7}  {e['reason']}")
        if e["kind"] == "fuzz":
            print(_fuzz_line(e["fuzz"]))
    if history:
        print("Ended:")
        for h in history:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["ended"]))
            print(f"  {h['name']} ({h['domid']}) {when}: {h['why']}")
    return 0


def _print_tree(entries: list[dict[str, Any]]) -> None:
    by_id = {e["domid"]: e for e in entries}
    kids: dict[int | None, list[dict[str, Any]]] = {}
    templates: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        parent = e["parent"] if e["parent"] in by_id else None
        template = (e.get("config") or {}).get("template")
        if parent is None and template:
            templates.setdefault(template, []).append(e)     # a fork of a template file: under the file
            continue
        kids.setdefault(parent, []).append(e)

    def line(e: dict[str, Any]) -> str:
        text = f"{e['name']} ({e['domid']}) {e['state']}"
        if e["reason"]:
            text += f": {e['reason']}"
        if e["pages_owned"] is not None:
            text += f" [{e['pages_owned']} pages owned]"
        if e["parent"] is not None and e["parent"] not in by_id:
            text += f" (parent {e['parent']} is gone)"
        if e["kind"] == "fuzz":
            text += " [" + _fuzz_line(e["fuzz"]).strip() + "]"
        return text

    def walk(e: dict[str, Any], prefix: str, last: bool, root: bool) -> None:
        if root:
            print(line(e))
            child_prefix = ""
        else:
            print(f"{prefix}{'└── ' if last else '├── '}{line(e)}")
            child_prefix = prefix + ("    " if last else "│   ")
        children = kids.get(e["domid"], [])
        for i, ch in enumerate(children):
            walk(ch, child_prefix, i == len(children) - 1, False)

    for e in kids.get(None, []):
        walk(e, "", True, True)
    for path, forks in templates.items():
        print(f"{path} (template file)")
        for i, e in enumerate(forks):
            walk(e, "", i == len(forks) - 1, False)


def _cmd_console(args: argparse.Namespace) -> int:
    reg = _registry()
    rec = reg.find(args.domain)
    require_control(rec)
    from .console import attach
    return attach(rec.console_socket, label=rec.label())


def _simple(command: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        with DomainClient(args.domain) as c:
            c.execute(command)
        return 0
    return run


def _cmd_destroy(args: argparse.Namespace) -> int:
    reg = _registry()
    rec = reg.find(args.domain)
    tree = reg.subtree(rec.domid)
    live = [r for r in tree if r.alive]
    if live and not args.force:
        names = ", ".join(r.label() for r in live)
        raise ToolstackError(f"{rec.label()} has live forks ({names}): destroy them first, or the whole tree "
                             f"with vmfork destroy --force {rec.domid}")
    if args.force:
        for r in tree:                      # leaves first
            destroy_domain(reg, r)
    destroy_domain(reg, rec)
    return 0


def _ended(rec: DomainRecord, wait: float) -> bool:
    """Whether the domain's process is gone, giving it `wait` seconds (a killed process closes its sockets a moment
    before it is gone from /proc)."""
    deadline = time.monotonic() + wait
    while rec.alive:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _config_form(reg: Registry, arg: str) -> bool:
    """Whether a `save`/`save-devices-state` argument names a config file rather than a domain (a domain with that
    name or id wins)."""
    if not os.path.isfile(arg):
        return False
    try:
        reg.find(arg)
    except ToolstackError:
        return True
    return False


def _cmd_save(args: argparse.Namespace) -> int:
    reg = _registry()
    if _config_form(reg, args.domain):
        if args.destroy or args.paused:
            raise ToolstackError(f"--destroy and -p act on a domain after saving it; {args.domain} is a config file")
        from .foreground import cmd_save_config as save_config
        args.config = args.domain
        return save_config(args)
    rec = reg.find(args.domain)
    to_stdout = args.file == "-"
    path = "-" if to_stdout else os.path.abspath(args.file)
    existed = not to_stdout and os.path.lexists(path)
    keep = not args.destroy
    if not keep:
        live = [r for r in reg.subtree(rec.domid) if r.alive]
        if live:
            raise ToolstackError(f"cannot save and destroy {rec.label()}: it has live forks "
                                 f"({', '.join(r.label() for r in live)}); without --destroy it is kept")
    # This command opens the file (as the invoking user) and the domain writes to the descriptor it is passed
    # (passfd.py): a domain, jailed or not, never opens a path for a save. A directory, a socket...: refused here.
    with OutputFile(path, "save file", mode=0o444 if args.template else 0o600) as out, \
            DomainClient(rec, registry=reg) as c:
        template: dict[str, Any] = {"template": True} if args.template else {}
        try:
            c.execute("getfd", fdname="vmfork-save-out", fds=[out.fd])
            c.execute("vmfork-save", fdname="vmfork-save-out", **template)
        except QmpCommandError as e:
            raise named(e, path) from None
        except ToolstackError:
            if not _ended(rec, 2.0):
                raise
            what = "the output is incomplete" if to_stdout else f"{path} is unchanged" if existed else \
                f"{path} was not written"
            raise ToolstackError(f"{rec.label()} died during the save (its process, pid {rec.pid}, is gone); "
                                 f"{what}") from None
        out.commit()
        if args.paused:
            c.execute("stop")
    if not keep:
        destroy_domain(reg, rec)
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    if args.foreground or args.timeout is not None or args.console_log is not None:
        if args.paused or args.name:
            raise ToolstackError("-p and -n are for a restored domain; --foreground runs the save file here")
        from .foreground import cmd_restore_foreground as restore_foreground
        return restore_foreground(args)
    path = os.path.abspath(args.file)
    from ..snapshot import info
    info(path)                      # a damaged or foreign file is refused before a domain process starts
    reg = _registry()
    sweep(reg)
    if args.name is not None:
        from ..config import DomainConfig
        DomainConfig(name=args.name)        # the name's rules, checked here
        used = reg.by_name(args.name)
        if used is not None:
            raise ToolstackError(f"name {args.name!r} is already used by domain {used.domid}")
    domid = start_domain(reg.run_dir, jail_spec({"kind": "restore", "file": path, "name": args.name,
                                                 "paused": args.paused, "template": args.template},
                                                no_jail=args.no_jail, jail=args.jail, label=path))
    print(domid, flush=True)
    return 0


def _cmd_save_devices_state(args: argparse.Namespace) -> int:
    reg = _registry()
    if _config_form(reg, args.domain):
        from .foreground import cmd_save_devices_state_config as save_config
        args.config = args.domain
        return save_config(args)
    with OutputFile(os.path.abspath(args.file), "device-state file") as out, \
            DomainClient(args.domain, registry=reg) as c:
        c.execute("getfd", fdname="vmfork-dm-out", fds=[out.fd])
        try:
            c.execute("xen-save-devices-state", fdname="vmfork-dm-out", live=False)
        except QmpCommandError as e:
            raise named(e, out.path) from None
        out.commit()
    return 0


def _fork_from_template(args: argparse.Namespace) -> int:
    """`fork-vm --from FILE`: a fork domain whose parent is a template save file, not a domain."""
    if args.domain is not None:
        raise ToolstackError(f"fork-vm --from {args.template_file} forks the file: give no parent domain "
                             f"(got {args.domain})")
    if args.launch_dm != "yes" or args.dm_state or args.block_interrupts or args.max_vcpus is not None:
        raise ToolstackError("fork-vm --from takes -C (name), --set and -p only")
    path = os.path.abspath(args.template_file)
    from ..snapshot.template import is_template
    if not is_template(path):
        raise ToolstackError(f"{args.template_file} is not a template save file (write one with "
                             "`vmfork save --template DOMAIN FILE`)")
    env = _env_arguments(args)
    if env:
        from ..snapshot import info
        if not info(path).get("machine", {}).get("devices"):
            raise ToolstackError(f"--set: {args.template_file} was saved without a device model, so its forks "
                                 "have no env channel for the strings")
    name = None
    if args.config:
        name = load_config(args.config, require_kernel=False).name
    reg = _registry()
    sweep(reg)
    if name is None:
        used = {r.name for r in reg.all()}
        stem = os.path.basename(path).rsplit(".", 1)[0] or "template"
        n = 1
        while f"{stem}-fork-{n}" in used:
            n += 1
        name = f"{stem}-fork-{n}"
    domid = start_domain(reg.run_dir, jail_spec({"kind": "restore", "file": path, "name": name,
                                                 "paused": args.paused, "template": True, "env": env},
                                                no_jail=args.no_jail, jail=args.jail, label=path))
    print(domid, flush=True)
    return 0


def _cmd_fork_vm(args: argparse.Namespace) -> int:
    if args.template_file is not None:
        return _fork_from_template(args)
    if args.domain is None:
        raise ToolstackError("fork-vm needs the parent domain (or --from TEMPLATE_FILE)")
    env = _env_arguments(args)
    reg = _registry()
    rec = reg.find(args.domain)
    dm_file = os.path.abspath(args.dm_state) if args.dm_state else None
    if dm_file is not None and not os.path.isfile(dm_file):
        raise ToolstackError(f"-Q {args.dm_state}: no such file")
    if dm_file is not None:
        # Checked here, before a domain process is started or anything renamed (the domain reads it again).
        from ..snapshot import load_device_state
        load_device_state(dm_file)
    if rec.held:
        require_control(rec)
    if args.launch_dm == "late":
        return _late_dm(args, reg, rec, dm_file, env)
    if not rec.alive:
        raise ToolstackError(f"cannot fork {rec.label()}: its process is gone")
    if env and dm_file is None and rec.launch_dm != "yes":
        # (with --launch-dm no the strings wait in the fork's device state for its late device model)
        raise ToolstackError(f"--set: {rec.label()} has no device model, so its forks have no env channel for "
                             "the strings (give the fork a device state with -Q FILE)")
    _check_max_vcpus(args.max_vcpus, rec)
    name: str | None = None
    overrides: dict[str, str] = {}
    if args.config:
        cfg, overrides = _fork_config(args.config, rec)
        if cfg.name == rec.name:
            raise ConfigError(f"{args.config}: name: a fork needs a name of its own; {cfg.name!r} is the "
                              f"parent's ({rec.label()})")
        name = cfg.name
    if dm_file is not None and args.launch_dm == "no":
        raise ToolstackError("-Q gives the device model's state: it goes with --launch-dm yes (or late), "
                             "not no")
    sweep(reg)
    domid = start_domain(reg.run_dir, jail_spec({
        "kind": "fork", "parent": rec.domid, "name": name, "overrides": overrides, "launch_dm": args.launch_dm,
        "device_state": dm_file, "paused": args.paused, "block_interrupts": args.block_interrupts, "env": env},
        no_jail=args.no_jail, jail=args.jail, config_jail=rec.config.get("jail"),
        label=f"the fork of {rec.label()}"))
    print(domid, flush=True)
    return 0


def _env_arguments(args: argparse.Namespace) -> dict[str, str]:
    """The `--set KEY=VALUE` strings, checked (an EnvError names a bad one)."""
    if not args.env:
        return {}
    from ..devices.envchannel import parse_assignments
    return parse_assignments(args.env)


def _late_dm(args: argparse.Namespace, reg: Registry, rec: DomainRecord, dm_file: str | None,
             env: dict[str, str]) -> int:
    """`fork-vm --launch-dm late [-C CONFIG] [-Q FILE] [--set KEY=VALUE] FORK`: give an existing fork its device
    model (with `env` set in its env channel)."""
    if rec.parent is None:
        raise ToolstackError(f"{rec.label()} is not a fork: --launch-dm late gives a fork created with "
                             "--launch-dm no its device model")
    if args.block_interrupts:
        raise ToolstackError("--block-interrupts is chosen when a fork is created, not with --launch-dm late")
    _check_max_vcpus(args.max_vcpus, rec)
    arguments: dict[str, Any] = {}
    if args.config:
        cfg, overrides = _fork_config(args.config, rec)
        parent = reg.get(rec.parent)
        if parent is not None and cfg.name == parent.name:
            raise ConfigError(f"{args.config}: name: a fork needs a name of its own; {cfg.name!r} is the "
                              f"parent's ({parent.label()})")
        if cfg.name != rec.name:
            arguments["name"] = cfg.name
        if overrides:
            arguments["actions"] = overrides
    with DomainClient(rec, registry=reg) as c:
        if dm_file is not None:
            # read by the domain from a descriptor this command opened (passfd.py), never by its path
            fd = open_input(dm_file, "device-state file")
            try:
                c.execute("getfd", fdname="vmfork-dm-in", fds=[fd])
            finally:
                os.close(fd)
            arguments["fdname"] = "vmfork-dm-in"
        if env:
            arguments["env"] = env
        try:
            c.execute("vmfork-attach-dm", **arguments)
        except QmpCommandError as e:
            raise named(e, dm_file) if dm_file is not None else e from None
    return 0


def _cmd_fork_reset(args: argparse.Namespace) -> int:
    with DomainClient(args.domain) as c:
        c.execute("vmfork-reset", memory=not args.state_only, state=not args.memory_only)
    return 0


def _cmd_qmp(args: argparse.Namespace) -> int:
    """Send JSON text as given (one or more commands) after negotiation; print every reply, one per line."""
    reg = _registry()
    rec = reg.find(args.domain)
    require_control(rec)
    text = args.json
    if re.fullmatch(r"[A-Za-z][\w-]*", text.strip()):
        text = json.dumps({"execute": text.strip()})        # a bare command name; anything else goes as it is
    import socket
    with QmpChannel.connect(rec.qmp_socket, timeout=60.0, pid=rec.pid, label=rec.label()) as chan:
        chan.send_raw(text.encode() + b"\n")
        chan.sock.shutdown(socket.SHUT_WR)
        errors: list[str] = []
        while True:
            try:
                msg = chan.read_message()
            except ToolstackError:
                break               # the domain closed the connection after answering
            if "event" in msg:
                continue
            print(json.dumps(msg), flush=True)
            if "error" in msg:
                errors.append(str(msg["error"].get("desc", "")))
    if errors:
        print(f"vmfork: error: {errors[0]}", file=sys.stderr)
        return 1
    return 0


# --- registration ---------------------------------------------------------------------------------------------------

def add_toolstack_commands(sub: Any) -> None:
    """Add the toolstack subcommands to the CLI's subparsers."""
    def domain_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("domain", metavar="DOMAIN", help="domid or name")

    p = sub.add_parser("create", help="start a domain from an xl-style config file; prints its domid")
    p.add_argument("--no-jail", action="store_true", help=NO_JAIL_HELP)
    p.add_argument("--jail", action="store_true", help=JAIL_HELP)
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("-p", dest="paused", action="store_true", help="leave it paused before its first instruction")
    p.add_argument("-c", dest="console", action="store_true", help="attach to its console")
    p.set_defaults(func=_cmd_create)

    p = sub.add_parser("list", help="list the domains")
    p.add_argument("domains", nargs="*", metavar="DOMAIN")
    p.add_argument("--json", action="store_true", help="machine-readable, with log and socket paths")
    p.add_argument("--tree", action="store_true", help="draw the fork tree")
    p.add_argument("--all", action="store_true", help="also the domains that ended, with why (the last 200)")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("console", help="attach to a domain's console (Ctrl-] detaches)")
    domain_arg(p)
    p.set_defaults(func=_cmd_console)

    p = sub.add_parser("pause", help="pause a domain")
    domain_arg(p)
    p.set_defaults(func=_simple("stop"))

    p = sub.add_parser("unpause", help="unpause a domain")
    domain_arg(p)
    p.set_defaults(func=_simple("cont"))

    p = sub.add_parser("reboot", help="reset a domain, as QMP system_reset: a hard reset, since the guests have no "
                                      "ACPI or PV channel to be asked to reboot (a created domain boots again, a fork "
                                      "goes back to its fork point, a paused domain stays paused; refused for a "
                                      "parent with live forks and a restored domain)")
    domain_arg(p)
    p.set_defaults(func=_simple("system_reset"))

    p = sub.add_parser("shutdown", help="refused: the guests have no ACPI power button or PV shutdown channel to "
                                        "be asked to shut down (use destroy)")
    domain_arg(p)
    p.set_defaults(func=_simple("system_powerdown"))

    p = sub.add_parser("destroy", help="destroy a domain (refused while it has live forks, unless --force)")
    p.add_argument("--force", action="store_true", help="destroy its forks too, leaves first")
    domain_arg(p)
    p.set_defaults(func=_cmd_destroy)

    p = sub.add_parser("save", help="save a domain to a file; it keeps running (or stays paused) unless --destroy; "
                                    "given a config file instead: boot it to its ready marker and save that")
    p.add_argument("-c", dest="checkpoint", action="store_true",
                   help="leave the domain as it was (the default; accepted for xl compatibility)")
    p.add_argument("-p", dest="paused", action="store_true", help="leave the domain paused")
    p.add_argument("--destroy", action="store_true", help="destroy the domain after saving it (as plain xl save)")
    p.add_argument("--template", action="store_true",
                   help="write a template: RAM as a sparse image that restores map copy-on-write (read-only file)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="config form: seconds to reach the ready marker (default 60)")
    p.add_argument("domain", metavar="DOMAIN_OR_CONFIG", help="domid or name (or a config file)")
    p.add_argument("file", metavar="FILE", help="a new file or a regular file (replaced atomically), a FIFO or a "
                                                "character device (written in place), or - for stdout")
    p.set_defaults(func=_cmd_save)

    p = sub.add_parser("restore", help="start a domain from a save file and print its domid (--foreground: run "
                                       "it here instead, console on the terminal)")
    p.add_argument("--no-jail", action="store_true", help=NO_JAIL_HELP)
    p.add_argument("--jail", action="store_true", help=JAIL_HELP)
    p.add_argument("-p", dest="paused", action="store_true", help="leave it paused")
    p.add_argument("-n", "--name", default=None, help="a name for it (default: the saved domain's)")
    p.add_argument("--foreground", action="store_true", help="run it in this process until it stops")
    p.add_argument("--timeout", type=float, default=None, help="foreground: stop after this many seconds")
    p.add_argument("--console-log", default=None, help="foreground: also append the console output to this file")
    mapping = p.add_mutually_exclusive_group()
    mapping.add_argument("--template", dest="template", action="store_const", const=True, default=None,
                         help="map the file copy-on-write (the default for a template; refused for other files)")
    mapping.add_argument("--copy", dest="template", action="store_const", const=False,
                         help="read a template into RAM of its own instead of mapping it")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=_cmd_restore)

    p = sub.add_parser("save-devices-state", help="write a domain's device-model state to a file (given a config "
                                                  "file instead: boot it to its ready marker and save that)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="config form: seconds to reach the ready marker (default 60)")
    p.add_argument("domain", metavar="DOMAIN_OR_CONFIG", help="domid or name (or a config file)")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=_cmd_save_devices_state)

    p = sub.add_parser("fork-vm", help="fork a paused domain (or, with --launch-dm late, give a fork its device "
                                       "model)")
    p.add_argument("--no-jail", action="store_true", help=NO_JAIL_HELP)
    p.add_argument("--jail", action="store_true", help=JAIL_HELP)
    p.add_argument("-C", dest="config", default=None, metavar="CONFIG",
                   help="the fork's config: a new name, on_* actions (see vmfork.toolstack.commands)")
    p.add_argument("-Q", dest="dm_state", default=None, metavar="DM_STATE_FILE",
                   help="device-state file for the fork's device model (default: the parent's device state)")
    p.add_argument("-p", dest="paused", action="store_true", help="leave the fork paused")
    p.add_argument("-m", "--max-vcpus", dest="max_vcpus", type=int, default=None, metavar="MAX_VCPUS",
                   help="must equal the parent's vCPU count")
    p.add_argument("--block-interrupts", action="store_true", help="the fork gets no external or timer interrupts")
    p.add_argument("--set", dest="env", action="append", default=[], metavar="KEY=VALUE",
                   help="a string for the fork's env channel (repeatable; the guest reads them with "
                        "guests/linux/vmfork-env, e.g. hostname=web-3); with --launch-dm no they wait in the "
                        "fork's device state for --launch-dm late, which may set more; also with --from")
    p.add_argument("--launch-dm", choices=("yes", "no", "late"), default="yes",
                   help="yes: a fork with its device model (default); no: none; late: give the fork named by "
                        "DOMAIN its device model")
    p.add_argument("--from", dest="template_file", default=None, metavar="TEMPLATE_FILE",
                   help="fork a template save file instead of a domain (no parent domain needed)")
    p.add_argument("domain", metavar="PARENT_OR_FORK", nargs="?", default=None,
                   help="the parent (domid or name); with --launch-dm late, the fork")
    p.set_defaults(func=_cmd_fork_vm)

    p = sub.add_parser("fork-reset", help="reset a fork to its parent's state")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--memory-only", action="store_true", help="only the memory")
    group.add_argument("--state-only", action="store_true", help="only vCPU, platform and device state")
    domain_arg(p)
    p.set_defaults(func=_cmd_fork_reset)

    p = sub.add_parser("qmp", help="send QMP JSON (or a bare command name) to a domain and print the replies")
    domain_arg(p)
    p.add_argument("json", metavar="JSON")
    p.set_defaults(func=_cmd_qmp)

