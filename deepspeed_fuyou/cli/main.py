"""The `fuyou` command. Errors a user can fix are printed as one message and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import logging
import sys

from deepspeed_fuyou.cli import bench_io, estimate, trace, validate
from deepspeed_fuyou.errors import FuyouError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuyou", description="deepspeed-fuyou tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    bench_io.add_parser(subparsers)
    estimate.add_parser(subparsers)
    validate.add_parser(subparsers)
    trace.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FuyouError as err:
        print(f"fuyou: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
