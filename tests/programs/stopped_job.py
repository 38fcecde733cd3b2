"""Trains the tiny Llama under fuyou until something stops it: a signal from outside, or its own exception.

    deepspeed tests/programs/stopped_job.py --deepspeed_config ds.json --out READY [--fail]

After its first step each rank writes `READY.rank<r>`; then it trains on for as long as it is let (or, with
`--fail`, raises). The clean-exit tests check what it leaves behind.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from probes import tiny_llama_engine

STEP_CAP = 100_000  # a stopped job never gets here; a job nobody stops still ends


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed_config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fail", action="store_true")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = parser.parse_args()
    engine, model = tiny_llama_engine(json.loads(args.deepspeed_config.read_text()))
    ids = torch.randint(0, model.config.vocab_size, (engine.train_micro_batch_size_per_gpu(), 16))
    for step in range(STEP_CAP):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        if step == 0:
            Path(f"{args.out}.rank{engine.global_rank}").write_text("ready")
            if args.fail:
                raise RuntimeError("the job's own error, after its first step")


if __name__ == "__main__":
    main()
