"""The two-column result table the Linux benches print (bench/linux_fork.py, bench/linux_kfx.py): one line of
context, then `measurement | result` rows, as plain aligned text or, with --markdown, as a table for
docs/benchmarks.md."""

from __future__ import annotations


def print_rows(title: str, rows: list[tuple[str, str]], *, markdown: bool, width: int = 50) -> None:
    print(title)
    if markdown:
        print("| measurement | result |\n|---|---:|")
        for what, value in rows:
            print(f"| {what} | {value} |")
    else:
        for what, value in rows:
            print(f"  {what:<{width}} {value}")


# The section of docs/benchmarks.md that `--check` compares with first: the current medians, refreshed when a
# hot-path change lands. Rows it lacks fall back to the section each bench names (its first-round table).
REFERENCE_SECTION = "## Reference medians for `--check`"


def documented_medians(text: str, *sections: str) -> dict[str, str]:
    """The `measurement | median | ...` rows of the given sections of docs/benchmarks.md (`text`), by measurement
    name: the first section that has a row wins."""
    found: dict[str, str] = {}
    for title in sections:
        if title not in text:
            continue
        body = text.split(title, 1)[1].split("\n## ", 1)[0]
        for line in body.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("|") and len(cells) >= 2:
                found.setdefault(cells[0], cells[1])
    return found


def parse_duration(text: str) -> float | None:
    """'396 µs' / '7.9 ms' / '1,234 µs' -> seconds; None for anything else."""
    parts = text.replace(",", "").split()
    if len(parts) != 2:
        return None
    try:
        value = float(parts[0])
    except ValueError:
        return None
    return {"µs": 1e-6, "ms": 1e-3, "s": 1.0}.get(parts[1], 0.0) * value or None
