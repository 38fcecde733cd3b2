"""Builds each model of a list under real DeepSpeed ZeRO-3, takes one step, and writes what each rank holds.

    deepspeed --num_gpus N tests/programs/zero_state_probe.py --models models.json --config ds.json --out DIR

`models.json` maps a name to a transformers config dict (`model_type` plus fields). For every model, rank r writes
DIR/<name>-rank<r>.json with the element counts DeepSpeed actually allocated: each parameter's partition, each
sub-group's fp32 master, the gradient partition buffer, and every optimizer state tensor after the first step.
The estimator's test compares them with its own layout of the same model.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import deepspeed
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from deepspeed_fuyou.distributed import exit_distributed


def probe(name: str, fields: dict, ds_config: dict, out: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    ids = torch.randint(0, model.config.vocab_size, (ds_config["train_micro_batch_size_per_gpu"], 16))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    optimizer = engine.optimizer
    states = [
        t.numel() for s in optimizer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()
    ]
    facts = {
        "partitions": [p.ds_tensor.ds_numel for p in engine.module.parameters()],
        "sub_groups": [int(n) for n in optimizer.fp16_partitioned_groups_flat_numel],
        "master": [t.numel() for t in optimizer.fp32_partitioned_groups_flat],
        "gradient_buffer": optimizer.grad_partitions_flat_buffer.numel(),
        "optimizer_states": sum(states),
    }
    (out / f"{name}-rank{engine.global_rank}.json").write_text(json.dumps(facts))
    engine.destroy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = parser.parse_args()
    ds_config = json.loads(Path(args.config).read_text())
    for name, fields in json.loads(Path(args.models).read_text()).items():
        probe(name, fields, ds_config, Path(args.out))
    exit_distributed()


if __name__ == "__main__":
    main()
