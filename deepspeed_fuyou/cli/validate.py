"""`fuyou validate ds.json`: every problem of a DeepSpeed config's `"fuyou"` block, before anything is allocated.

Checks the block itself (types, ranges, unknown keys with a did-you-mean), the DeepSpeed fields it depends on
(ZeRO stage 3, NVMe offload, one half precision, the micro-batch) and this machine (swap directories exist and are
writable, O_DIRECT, the pinned budget against host memory). Exits 0 when the config is valid, 2 with every problem
listed when it is not; warnings (slower but working settings) are printed and do not fail.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from deepspeed_fuyou.cli.args import add_model_arguments, read_ds_config
from deepspeed_fuyou.config.checks import FuyouConfigWarning
from deepspeed_fuyou.config.fuyou import BLOCK
from deepspeed_fuyou.errors import FuyouConfigError
from deepspeed_fuyou.plan.preflight import load_fuyou_config


def run(args: argparse.Namespace) -> int:
    path = Path(args.config)
    ds_config = read_ds_config(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FuyouConfigWarning)
        try:
            config = load_fuyou_config(ds_config)
        except FuyouConfigError as err:
            print(f"{path}: {len(err.problems)} problem(s):", file=sys.stderr)
            for problem in err.problems:
                print(f"  {problem.line()}", file=sys.stderr)
            return 2
        finally:
            for warning in caught:
                print(f"{path}: warning: {warning.message}", file=sys.stderr)
    if config is None:
        print(f'{path}: no "{BLOCK}" block: DeepSpeed runs as stock, nothing of fuyou to validate', file=args.stdout)
    elif args.model is None:
        print(f"{path}: valid", file=args.stdout)
    else:
        return _fits(path, args)
    return 0


def _fits(path: Path, args: argparse.Namespace) -> int:
    """With --model, a valid config must also fit: the estimate's problems are validation errors."""
    from deepspeed_fuyou.cli.estimate import estimate_from_args

    result = estimate_from_args(args)
    if result.fits:
        print(f"{path}: valid, and {args.model} fits ({result.chosen.name})", file=args.stdout)
        return 0
    print(f"{path}: {args.model} does not fit, {len(result.problems)} problem(s):", file=sys.stderr)
    for problem in result.problems:
        print(f"  {problem}", file=sys.stderr)
    for suggestion in result.suggestions:
        print(f"  fix: {suggestion}", file=sys.stderr)
    return 2


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a DeepSpeed config's fuyou block, its ZeRO settings and this machine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="the DeepSpeed JSON config")
    add_model_arguments(parser, required=False)
    parser.set_defaults(run=run)
