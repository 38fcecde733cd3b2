"""Reads and writes full fp32 state through DeepSpeed's `safe_get_full_*` / `safe_set_full_*` API during training.

    deepspeed --num_gpus N tests/programs/full_state_probe.py --deepspeed_config ds.json --out result.json

Users call these to log gradient norms, inspect or edit the master weights and Adam moments, and they reach the
optimizer swapper directly: with optimizer states on the SSD each call swaps a sub-group in (and writes it back
after a set). The same steps run under any config, so a stock ZeRO-Infinity run and a fuyou run can be compared
value for value. Written by rank 0: for a few parameters, the full gradient after backward, the master weight and
both moments after the step, what a get returns right after a set, and the losses of the steps after the set (which
train from the set values only if the swapper wrote them back).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from probes import probe_arguments, tiny_llama_engine

from deepspeed_fuyou.distributed import exit_distributed

SEQ_LEN = 32


def summary(tensor: torch.Tensor) -> list[float]:
    """Enough of a tensor to compare two runs: its sum, its norm and its first and last elements."""
    flat = tensor.detach().float().reshape(-1)
    return [flat.sum().item(), flat.norm().item(), *flat[:4].tolist(), *flat[-4:].tolist()]


def main() -> None:
    args, ds_config = probe_arguments()
    engine, model = tiny_llama_engine(ds_config)
    named = dict(engine.module.named_parameters())
    probed = {name: named[name] for name in (next(iter(named)), "model.layers.1.mlp.up_proj.weight", "lm_head.weight")}
    batch = ds_config["train_micro_batch_size_per_gpu"]
    generator = torch.Generator().manual_seed(1 + engine.global_rank)
    batches = [torch.randint(0, model.config.vocab_size, (batch, SEQ_LEN), generator=generator) for _ in range(4)]

    def train_step(ids: torch.Tensor, before_step: Callable[[], None] = lambda: None) -> float:
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        before_step()
        engine.step()
        return loss.item()

    result: dict = {
        "optimizer": type(engine.optimizer).__name__,
        "optimizer_swapper": type(engine.optimizer.optimizer_swapper).__name__,
    }
    train_step(batches[0])
    grads: dict[str, list[float]] = {}
    train_step(batches[1], lambda: grads.update({n: summary(safe_get_full_grad(p)) for n, p in probed.items()}))
    result["grad"] = grads
    result["fp32"] = {n: summary(safe_get_full_fp32_param(p)) for n, p in probed.items()}
    result["exp_avg"] = {n: summary(safe_get_full_optimizer_state(p, "exp_avg")) for n, p in probed.items()}
    result["exp_avg_sq"] = {n: summary(safe_get_full_optimizer_state(p, "exp_avg_sq")) for n, p in probed.items()}
    result["set_then_get"] = {}
    for index, (name, param) in enumerate(probed.items()):
        shape = safe_get_full_fp32_param(param).shape
        value = torch.linspace(-0.1, 0.1, shape.numel()).reshape(shape) * (index + 1)
        safe_set_full_fp32_param(param, value)
        safe_set_full_optimizer_state(param, torch.full(shape, 1e-3), "exp_avg")
        read_back = safe_get_full_fp32_param(param).cpu()
        result["set_then_get"][name] = [
            torch.equal(read_back, value),
            torch.equal(safe_get_full_optimizer_state(param, "exp_avg").cpu(), torch.full(shape, 1e-3)),
        ]
    result["losses_after_set"] = [train_step(ids) for ids in batches[2:]]
    result["fp32_after_set"] = {n: summary(safe_get_full_fp32_param(p)) for n, p in probed.items()}
    if engine.global_rank == 0:
        args.out.write_text(json.dumps(result))
    exit_distributed()


if __name__ == "__main__":
    main()
