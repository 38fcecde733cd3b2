"""What the probe programs share: their command line and the small Llama they train under DeepSpeed.

Each probe is launched by the `deepspeed` launcher (`tests/conftest.py::run_deepspeed`), which puts this folder on
`sys.path` as the program's own.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deepspeed
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from deepspeed_fuyou.distributed import exit_distributed

MODEL = Path(__file__).resolve().parents[2] / "configs" / "models" / "llama-tiny"


def probe_arguments() -> tuple[argparse.Namespace, dict[str, Any]]:
    """`--deepspeed_config FILE --out FILE` (and the launcher's `--local_rank`); the parsed DeepSpeed config."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed_config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = parser.parse_args()
    return args, json.loads(args.deepspeed_config.read_text())


def tiny_llama_engine(ds_config: dict[str, Any]) -> tuple[Any, torch.nn.Module]:
    """The shipped tiny Llama, random-initialised from seed 0 under `zero.Init`, and its DeepSpeed engine."""
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (transformers builds the model under zero.Init while it lives)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL), dtype=torch.float32)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return engine, model


OVERLAP_MODES = ("off", "backward", "forward")


def with_overlap(ds_config: dict[str, Any], mode: str) -> dict[str, Any]:
    """A copy of `ds_config` whose fuyou block steps the optimizer in `mode` (without clipping for "backward")."""
    config = copy.deepcopy(ds_config)
    config["fuyou"]["optimizer"] = {"overlap": mode}
    if mode == "backward":
        config["gradient_clipping"] = 0.0
    return config


def probe_each_overlap_mode(probe: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Runs `probe` on a fresh engine's config per overlap mode, in this process; rank 0 writes the results, keyed
    by mode, to `--out`."""
    args, ds_config = probe_arguments()
    deepspeed.init_distributed()
    result = {mode: probe(with_overlap(ds_config, mode)) for mode in OVERLAP_MODES}
    if torch.distributed.get_rank() == 0:
        args.out.write_text(json.dumps(result))
    exit_distributed()
