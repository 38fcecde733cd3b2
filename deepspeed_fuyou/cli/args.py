"""What the `fuyou` subcommands share: reading a DeepSpeed config, and the arguments naming what is trained."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deepspeed_fuyou.config.sizes import parse_size
from deepspeed_fuyou.errors import FuyouConfigError


def read_ds_config(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed JSON config as a dict; a missing file or bad JSON is a FuyouConfigError naming the file."""
    try:
        ds_config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FuyouConfigError(
            str(path), None, f"cannot read the config ({err})", "give a DeepSpeed JSON file"
        ) from None
    if not isinstance(ds_config, dict):
        raise FuyouConfigError(str(path), ds_config, "not a JSON object", "give a DeepSpeed JSON config")
    return ds_config


def add_model_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """The arguments that say what is trained, shared with `fuyou validate --model`."""
    parser.add_argument("--model", required=required, help="Hugging Face model id, config.json or model directory")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--micro-batch", type=int, help="sequences per rank and step (default: from the config)")
    parser.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (default 1)")
    parser.add_argument(
        "--gpu-memory",
        type=size_argument,
        help="plan for this accelerator memory (default: from fuyou.estimator, else detected)",
    )
    parser.add_argument(
        "--host-memory", type=size_argument, help="plan for this host memory (default: fuyou.estimator or detected)"
    )


def size_argument(text: str) -> int:
    """A size on the command line, as in the config: "24GiB", "512MiB" or bytes."""
    try:
        return parse_size(int(text) if text.isdigit() else text, "size")
    except FuyouConfigError as err:
        raise argparse.ArgumentTypeError(err.reason) from None
