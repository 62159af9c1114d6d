"""`python -m vmfork.fuzz ARGS` = `vmfork fuzz ARGS` (for running under afl-fuzz before the CLI hook is in)."""

from __future__ import annotations

import argparse
import sys

from ..errors import VmforkError
from .cli import register_fuzz_commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmfork")
    register_fuzz_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["fuzz", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except VmforkError as e:
        print(f"vmfork: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
