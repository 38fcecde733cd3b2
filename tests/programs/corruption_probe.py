"""Corrupts a swap file under a running DeepSpeed engine and records what training does next.

    deepspeed tests/programs/corruption_probe.py --deepspeed_config ds.json --out result.json

For each `fuyou.optimizer.overlap` mode ("off", "backward" without clipping, "forward") a fresh engine trains a small
Llama for two steps; then 4 KiB of random bytes overwrite the start of the first sub-group's master-weights file,
behind the engine's back, as a failing SSD or another program would; then it tries two more steps. Recorded per
mode: the losses before, the error that stopped training (type, file, offset, message) and the losses of the steps
that completed after the corruption (none, if it was caught). Rank 0 writes the result.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from probes import probe_each_overlap_mode, tiny_llama_engine

from deepspeed_fuyou.swap.optimizer_swapper import MASTER
from deepspeed_fuyou.swap.runtime import optimizer_file

SEQ_LEN = 32


def probe(config: dict[str, Any]) -> dict[str, Any]:
    engine, model = tiny_llama_engine(config)
    optimizer = engine.optimizer
    generator = torch.Generator().manual_seed(1)
    record: dict[str, Any] = {"mode": optimizer.overlap, "losses_before": [], "losses_after": [], "error": None}

    def train_step() -> float:
        batch = torch.randint(0, model.config.vocab_size, (2, SEQ_LEN), generator=generator)
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        return loss.item()

    record["losses_before"] = [train_step() for _ in range(2)]
    optimizer.finish_pending_steps()
    first = next(iter(optimizer.optimizer_swapper.groups.values()))
    target = optimizer.fuyou_runtime.files(optimizer_file(first.key, MASTER))[0]
    record["corrupted"] = target
    fd = os.open(target, os.O_WRONLY)
    os.pwrite(fd, os.urandom(4096), 0)
    os.fsync(fd)
    os.close(fd)
    try:
        for _ in range(2):
            record["losses_after"].append(train_step())
        optimizer.finish_pending_steps()
    except Exception as err:
        record["error"] = {
            "type": type(err).__name__,
            "path": getattr(err, "path", None),
            "offset": getattr(err, "offset", None),
            "message": str(err),
        }
    return record


if __name__ == "__main__":
    probe_each_overlap_mode(probe)
