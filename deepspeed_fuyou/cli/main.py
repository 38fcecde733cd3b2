"""The `fuyou` command. Errors a user can fix are printed as one message and exit 2, never a traceback.

Standard output carries the command's result and nothing else, so that `fuyou estimate ... --json | jq` works: while
a command runs, whatever else writes to it (DeepSpeed logs to stdout, native code prints to descriptor 1) goes to
standard error, and the command writes its result to `args.stdout`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from typing import TextIO

from deepspeed_fuyou import __version__
from deepspeed_fuyou.cli import bench_io, estimate, trace, validate
from deepspeed_fuyou.errors import FuyouError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuyou", description="deepspeed-fuyou tools")
    parser.add_argument("--version", action="version", version=f"deepspeed-fuyou {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    bench_io.add_parser(subparsers)
    estimate.add_parser(subparsers)
    validate.add_parser(subparsers)
    trace.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    with _only_the_result_on_stdout() as args.stdout:
        try:
            return args.run(args)
        except FuyouError as err:
            print(f"fuyou: {err}", file=sys.stderr)
            return 2


@contextlib.contextmanager
def _only_the_result_on_stdout() -> Iterator[TextIO]:
    """Yields the stream for the result; until it closes, anything else written to stdout goes to stderr."""
    sys.stdout.flush()
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):  # not a file (a caller capturing it): swap streams
        result, sys.stdout = sys.stdout, sys.stderr
        try:
            yield result
        finally:
            sys.stdout = result
        return
    saved = os.dup(descriptor)
    os.dup2(sys.stderr.fileno(), descriptor)
    result = os.fdopen(os.dup(saved), "w")
    try:
        yield result
    finally:
        result.close()
        sys.stdout.flush()
        os.dup2(saved, descriptor)
        os.close(saved)


if __name__ == "__main__":
    sys.exit(main())
