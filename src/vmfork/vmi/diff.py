"""What did a fork change? The guest pages a fork (and its ancestors up to a chosen one) owns, each compared byte
by byte with the ancestor's page, and the registers that differ from the state the fork started from.

    d = vmi.diff(fork)                  # against its parent
    d = vmi.diff(grandchild, ancestor=root)
    print(d.text())
    [p.gpa for p in d.pages if p.changed]

Pages come from the fork's dirty tracking (`GuestMemory.owned_pages()`: every page the guest or vmfork wrote since the
fork was made, resets included). That list is a superset: on hosts whose dirty log over-reports (pages only read
through a page-table entry with the dirty bit set, see `vmfork doctor`: dirty_log_reads) and for pages written back to
their old bytes, a page is listed but shows no differing bytes. The byte comparison is exact: the ancestor is paused
and its RAM read-only while it has forks, so its pages are what the fork started from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..kvm import structs as s
from .errors import VmiError
from .memory import hexdump_line

__all__ = ["ForkDiff", "LineDiff", "PageDiff", "RegisterDiff", "diff", "diff_text"]

PAGE = 4096
LINE = 16
_BATCH = 512            # pages compared per numpy batch (bounded memory for forks that own many pages)


@dataclass(frozen=True, slots=True)
class LineDiff:
    offset: int         # within the page
    old: bytes
    new: bytes


@dataclass(frozen=True, slots=True)
class PageDiff:
    gpa: int
    owner: str          # the machine in the chain that wrote it last (the fork itself, or an ancestor fork)
    lines: tuple[LineDiff, ...]
    changed_bytes: int

    @property
    def changed(self) -> bool:
        return self.changed_bytes > 0


@dataclass(frozen=True, slots=True)
class RegisterDiff:
    vcpu: int
    name: str
    old: int
    new: int


@dataclass(frozen=True, slots=True)
class ForkDiff:
    fork: str
    ancestor: str
    chain: tuple[str, ...]              # the fork, then its ancestors before `ancestor`
    pages: tuple[PageDiff, ...]
    registers: tuple[RegisterDiff, ...]
    other_state: tuple[tuple[int, str], ...] = ()   # (vCPU, part) of other vCPU state that differs (xsave, msrs...)

    @property
    def changed_pages(self) -> tuple[PageDiff, ...]:
        return tuple(p for p in self.pages if p.changed)

    @property
    def changed_bytes(self) -> int:
        return sum(p.changed_bytes for p in self.pages)

    def text(self, *, max_pages: int | None = 64, max_lines: int | None = 16) -> str:
        return diff_text(self, max_pages=max_pages, max_lines=max_lines)


def _chain(fork: Any, ancestor: Any | None) -> list[Any]:
    if getattr(fork, "fork_state", None) is None or getattr(fork, "parent", None) is None:
        raise VmiError(f"{getattr(fork, 'name', fork)!r} is not a fork: only a fork has a parent to compare with")
    if ancestor is None:
        ancestor = fork.parent
    chain = [fork]
    m = fork.parent
    while m is not ancestor:
        if m is None or (getattr(m, "parent", None) is None and m is not ancestor):
            raise VmiError(f"{getattr(ancestor, 'name', ancestor)!r} is not an ancestor of {fork.name!r}")
        chain.append(m)
        m = m.parent
    return chain


_REG_FIELDS = (*s.GPR_NAMES,)
_SREG_FIELDS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


def _register_diffs(vcpu: int, old_regs: s.Regs, old_sregs: s.Sregs, regs: s.Regs,
                    sregs: s.Sregs) -> list[RegisterDiff]:
    out = []
    for n in _REG_FIELDS:
        a, b = int(getattr(old_regs, n)), int(getattr(regs, n))
        if a != b:
            out.append(RegisterDiff(vcpu, n, a, b))
    for n in _SREG_FIELDS:
        a, b = int(getattr(old_sregs, n)), int(getattr(sregs, n))
        if a != b:
            out.append(RegisterDiff(vcpu, n, a, b))
    for seg in _SEGMENTS:
        for f in ("selector", "base", "limit"):
            a, b = int(getattr(getattr(old_sregs, seg), f)), int(getattr(getattr(sregs, seg), f))
            if a != b:
                out.append(RegisterDiff(vcpu, f"{seg}.{f}" if f != "selector" else seg, a, b))
    for t in ("gdt", "idt"):
        for f in ("base", "limit"):
            a, b = int(getattr(getattr(old_sregs, t), f)), int(getattr(getattr(sregs, t), f))
            if a != b:
                out.append(RegisterDiff(vcpu, f"{t}.{f}", a, b))
    return out


def diff(fork: Any, ancestor: Any | None = None, *, registers: bool = True, max_lines_per_page: int | None = None,
         ) -> ForkDiff:
    """Compare a fork (an in-process `vmfork.fork.VM`) with `ancestor` (default: its parent)."""
    chain = _chain(fork, ancestor)
    anc = chain[-1].parent
    if fork.state == "destroyed" or anc.state == "destroyed":
        raise VmiError("cannot diff a destroyed machine")
    owner_of: dict[int, str] = {}
    for m in reversed(chain):                    # the youngest owner wins
        for page in m.memory.owned_pages().tolist():
            owner_of[int(page)] = m.name
    pages = np.array(sorted(owner_of), dtype=np.int64)
    mine, theirs = fork.memory.pages, anc.memory.pages
    memory = fork.memory
    results: list[PageDiff] = []
    for start in range(0, pages.size, _BATCH):
        batch = pages[start:start + _BATCH]
        new = mine[batch].reshape(batch.size, PAGE // LINE, LINE)
        old = theirs[batch].reshape(batch.size, PAGE // LINE, LINE)
        neq = new != old
        line_changed = neq.any(axis=2)
        counts = neq.sum(axis=(1, 2))
        for k, page in enumerate(batch.tolist()):
            lines_idx = np.flatnonzero(line_changed[k])
            if max_lines_per_page is not None:
                lines_idx = lines_idx[:max_lines_per_page]
            lines = tuple(LineDiff(int(li) * LINE, old[k, li].tobytes(), new[k, li].tobytes()) for li in lines_idx)
            results.append(PageDiff(memory.gpa_of_offset(page << 12), owner_of[page], lines, int(counts[k])))
    reg_diffs: list[RegisterDiff] = []
    other: list[tuple[int, str]] = []
    if registers:
        start_state = chain[-1].fork_state          # what the oldest fork in the chain started from
        for i, vcpu in enumerate(fork.vcpus):
            ref = start_state.vcpus[i]
            reg_diffs += _register_diffs(i, ref.regs, ref.sregs, vcpu.get_regs(), vcpu.get_sregs())
        if fork.state != "running":
            now = fork.capture()
            for i, (a, b) in enumerate(zip(start_state.vcpus, now.vcpus, strict=True)):
                pa, pb = a.parts(), b.parts()
                other += [(i, part) for part in ("xsave", "xcrs", "msrs", "lapic", "mp_state", "debugregs", "events")
                          if pa[part] != pb[part]]
    return ForkDiff(fork.name, anc.name, tuple(m.name for m in chain), tuple(results), tuple(reg_diffs),
                    tuple(other))


def diff_text(d: ForkDiff, *, max_pages: int | None = 64, max_lines: int | None = 16) -> str:
    """The report: a summary line, each page with its differing hexdump lines (- ancestor, + fork), the registers."""
    changed = d.changed_pages
    via = f" (through {', '.join(d.chain[1:])})" if len(d.chain) > 1 else ""
    out = [f"{d.fork} against {d.ancestor}{via}: {len(d.pages)} pages owned, {len(changed)} with differing bytes "
           f"({d.changed_bytes} bytes)"]
    shown = 0
    for p in d.pages:
        if max_pages is not None and shown >= max_pages:
            out.append(f"... {len(d.pages) - shown} more pages")
            break
        shown += 1
        owner = "" if p.owner == d.fork else f", written by {p.owner}"
        if not p.changed:
            out.append(f"page {p.gpa:#x}{owner}: no differing bytes")
            continue
        out.append(f"page {p.gpa:#x}{owner}: {p.changed_bytes} bytes differ in {len(p.lines)} lines")
        for k, line in enumerate(p.lines):
            if max_lines is not None and k >= max_lines:
                out.append(f"  ... {len(p.lines) - k} more lines")
                break
            out.append("  - " + hexdump_line(p.gpa + line.offset, line.old))
            out.append("  + " + hexdump_line(p.gpa + line.offset, line.new))
    if d.registers:
        out.append("registers:")
        for r in d.registers:
            out.append(f"  vCPU {r.vcpu} {r.name:<10} {r.old:#x} -> {r.new:#x}")
    else:
        out.append("registers: no differences")
    if d.other_state:
        parts: dict[int, list[str]] = {}
        for v, part in d.other_state:
            parts.setdefault(v, []).append(part)
        for v, names in parts.items():
            out.append(f"  vCPU {v} other state that differs: {', '.join(names)}")
    return "\n".join(out)
