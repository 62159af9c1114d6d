"""`python -m vmfork.fuzz ARGS` = `vmfork fuzz ARGS` (for running under afl-fuzz before the CLI hook is in): the same
command through the same entry point, so errors, Ctrl-C and a closed pipe end it the same way."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as vmfork_main  # an entry point, like the `vmfork` script: the CLI is above fuzz/
    return vmfork_main(["fuzz", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
