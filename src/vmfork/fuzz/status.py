"""`vmfork fuzz`'s live status for people: on a terminal, a small rich panel redrawn in place (execs, execs/s now,
corpus, coverage, crashes, hangs, time since the last find and crash; with --jobs one line per worker too) that
rich fits to the terminal's width; anywhere else (a pipe, a log file, a CI job) the plain status line as before.

    view = LiveView.open(sys.stderr, "jsmn")        # None when the stream is not a terminal
    view.update(Numbers.of(stats, now))             # at the loop's status interval (Fuzzer.fuzz's `progress`)
    view.close()
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from .loop import Stats

__all__ = ["LiveView", "Numbers", "ProgressView", "ago"]


def ago(then: float | None, now: float) -> str:
    """`12 s ago`, `3 min ago`, `2.1 h ago`, or `none yet`."""
    if not then:
        return "none yet"
    s = max(0.0, now - then)
    if s < 120:
        return f"{s:.0f} s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    return f"{s / 3600:.1f} h ago"


@dataclass
class Numbers:
    """One row of the view: a worker's (or the campaign's) numbers at wall-clock time `now`."""

    name: str
    seconds: float
    execs: int
    execs_per_s: float
    corpus: int
    blocks_hit: int
    blocks_total: int
    crashes: int
    unique_crashes: int
    hangs: int
    last_find: float | None = None          # time.time() of the last input that joined the corpus
    last_crash: float | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def coverage(self) -> str:
        if not self.blocks_total:
            return "-"
        return f"{self.blocks_hit}/{self.blocks_total} blocks ({100 * self.blocks_hit / self.blocks_total:.1f}%)"


class LiveView:
    """A rich Live panel on a terminal stream."""

    def __init__(self, stream: TextIO, title: str) -> None:
        from rich.console import Console
        from rich.live import Live
        self.console = Console(file=stream, highlight=False)
        self.title = title
        self.live = Live(console=self.console, refresh_per_second=4, transient=False, auto_refresh=False)
        self.live.start()

    @classmethod
    def open(cls, stream: TextIO, title: str) -> LiveView | None:
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        return cls(stream, title) if tty else None

    def update(self, total: Numbers, workers: list[Numbers] | None = None) -> None:
        self.live.update(self._render(total, workers or []), refresh=True)

    def _render(self, t: Numbers, workers: list[Numbers]) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        now = time.time()
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_column(style="bold")
        grid.add_column()
        crashes = f"{t.unique_crashes} unique ({t.crashes} in all)"
        grid.add_row("run time", _duration(t.seconds), "execs", f"{t.execs:,}")
        grid.add_row("execs/s", f"{t.execs_per_s:,.0f}", "corpus", f"{t.corpus:,}")
        grid.add_row("coverage", t.coverage(), "hangs", f"{t.hangs:,}")
        grid.add_row("crashes", f"[red]{crashes}[/red]" if t.unique_crashes else crashes, "last find",
                     ago(t.last_find, now))
        grid.add_row("last crash", ago(t.last_crash, now), "", "")
        parts: list[Any] = [grid]
        if workers:
            table = Table(box=None, padding=(0, 1), show_edge=False)
            for col in ("worker", "execs/s", "execs", "corpus", "cov", "crashes", "last find"):
                table.add_column(col, justify="left" if col in ("worker", "last find") else "right")
            for w in workers:
                table.add_row(w.name, f"{w.execs_per_s:,.0f}", f"{w.execs:,}", str(w.corpus),
                              str(w.blocks_hit) if w.blocks_total else "-", str(w.unique_crashes),
                              ago(w.last_find, now))
            parts.append(table)
        return Panel(Group(*parts), title=f"vmfork fuzz: {self.title}", title_align="left", expand=False)

    def close(self) -> None:
        self.live.stop()


class ProgressView:
    """Fuzzer.fuzz's `progress` callback for one process on a terminal: recent execs/s and the time of the last
    find (the corpus grew) from the loop's numbers, into a LiveView."""

    def __init__(self, view: LiveView, name: str) -> None:
        self.view = view
        self.name = name
        self.last: tuple[float, int] | None = None
        self.corpus = -1
        self.unique = 0
        self.last_find: float | None = None
        self.last_crash: float | None = None

    def __call__(self, st: Stats) -> None:
        now = time.monotonic()
        rate = st.execs_per_s
        if self.last is not None and now > self.last[0]:
            rate = (st.execs - self.last[1]) / (now - self.last[0])
        self.last = (now, st.execs)
        if self.corpus >= 0 and st.corpus > self.corpus:
            self.last_find = time.time()
        self.corpus = st.corpus
        if st.unique_crashes > self.unique:
            self.last_crash = time.time()
        self.unique = st.unique_crashes
        self.view.update(Numbers(self.name, st.elapsed_s, st.execs, rate, st.corpus, st.blocks_hit, st.blocks_total,
                                 st.crashes, st.unique_crashes, st.hangs, self.last_find, self.last_crash))


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
