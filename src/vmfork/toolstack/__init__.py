"""The toolstack: domains, the registry of domains, and the xl-style commands of the `vmfork` CLI.

A domain is one VM in a process of its own (`python -m vmfork.toolstack.domain`, started detached by the CLI), with
a numeric domid (allocated from a counter that only grows), a unique name, a QMP control socket and a console.
No daemon: the registry is an SQLite database every process opens.

Runtime directory (runtime.py): root uses /run/vmfork/, other users $XDG_RUNTIME_DIR/vmfork (else
/tmp/vmfork-<uid>); VMFORK_RUN_DIR overrides. Mode 0700, refused if it belongs to someone else or others may write
to it. Per domain: `<domid>.qmp` (control socket, 0600), `<domid>.console` (console socket, 0600), `<domid>.log`
(console log, 0600; it stays after the domain ends, like xl's logs), `<domid>.stats` (a fuzzer's live numbers for a
fork it holds, gone with it), and `registry.db` (WAL).

Permissions: besides the file modes, a domain checks each socket peer's credentials (SO_PEERCRED) and serves only
its own uid and root (root can ptrace the process anyway); any other peer gets one QMP error and is disconnected.

Domain states (`vmfork list`): running; paused (with a reason: harness-start when the guest's ready marker paused
it, harness-end, created paused, fork-reset, ...); shutdown (the guest powered off or exited and on_poweroff is
"preserve"); crashed (on_crash = "preserve", or the domain's process is gone: killed, or died); creating.
The config's on_poweroff (also for the exit device), on_reboot and on_crash apply: destroy (the domain ends and
leaves the registry), preserve (it stays, stopped), restart (a created domain boots again; a fork is reset to its
fork point and runs again). coredump-* act as their plain forms (no core dump is written).

QMP (qmp.py; the commands in domain.py): the greeting, `qmp_capabilities`, `query-status`, `query-name`,
`query-version`, `query-commands`, `stop`, `cont` (refused naming the forks while the domain has live forks),
`quit` (likewise), `xen-save-devices-state` {filename, live: false}; vmfork extensions:

    vmfork-query              name, domid, parent, state, forks, pages owned (forks), port accesses without a
                              device model, console input bytes, ...
    vmfork-fork-source        {child, name}: used by a new fork domain (RAM files passed with SCM_RIGHTS)
    vmfork-reset              {memory: bool, state: bool}: a fork back to its fork point
    vmfork-memory-read        {gpa, length, encoding: "base64" | "hex"} -> {data}
    vmfork-memory-write       {gpa, data, encoding}
    vmfork-regs-get           {vcpu}: general-purpose registers, rip, rflags, control registers, segments
    vmfork-regs-set           {vcpu, regs: {name: value}}
    vmfork-save               {filename}: a save file (vmfork.snapshot.save)
    vmfork-attach-dm          {filename, actions, name}: a late device model from a device-state file

Events: STOP, RESUME, SHUTDOWN, GUEST_PANICKED. More commands can be added by modules that register them with
`domain.qmp_command` (the domain imports `domain.EXTENSION_MODULES` at start).

From Python (client.py):

    from vmfork.toolstack import DomainClient
    with DomainClient("web-1") as d:                       # domid or name
        d.execute("stop")
        data = d.execute("vmfork-memory-read", gpa=0x1000, length=16)["data"]

Held forks: a process that is not a domain can hold a fork of a paused domain as an in-process machine
(attach.py `hold_fork`; `vmfork fuzz --domain` does, to fuzz forks of it at in-process speed). It takes the RAM and
state the way a fork domain does and keeps the parent's hold while it lives; its registry entry (kind "fuzz",
`<parent>-fuzz-<n>`, running) makes it a live fork for the parent's rules (`cont`/`quit` refused naming it,
`destroy` needs --force, which sends it SIGTERM). It has no control socket or console; commands that need one say
so. The entry goes when it ends, or at the next sweep if it was killed.

Modules: runtime.py (runtime directory, process liveness), registry.py (SQLite registry), qmp.py (protocol,
framing, a blocking client), domain.py (the domain process), console.py (logs, console streams, `vmfork console`),
client.py (DomainClient, starting and destroying domains), commands.py (the CLI commands; fork config rules),
attach.py (receiving a parent's RAM and state; held forks).
"""

from .client import DomainClient
from .qmp import QmpCommandError
from .runtime import ToolstackError

__all__ = ["DomainClient", "QmpCommandError", "ToolstackError"]
