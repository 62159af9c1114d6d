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
