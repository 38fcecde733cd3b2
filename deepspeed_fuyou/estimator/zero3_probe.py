"""`python -m deepspeed_fuyou.estimator.zero3_probe REQUEST.json`: one model's step under ZeRO-Offload, timed.

The child process of `rates.compute_rates`. It reads the request (a transformers model config, micro-batch,
sequence length, dtype, the stage-3 knobs training sets, repeats), builds the model random-initialised under
`zero.Init` as training does, wraps it in a one-rank DeepSpeed engine with ZeRO-3, parameters and optimizer
offloaded to host memory (DeepSpeed's CPU Adam), runs forward, backward and step `repeats + 1` times (the first
warms up) and writes the shortest seconds of each to `answer.json` in its working directory: on a shared machine
noise only ever adds time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(request_path: str) -> None:
    from deepspeed_fuyou.distributed import exit_distributed, free_port

    request = json.loads(Path(request_path).read_text())
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))

    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    dtype = getattr(torch, request["dtype"])
    ds_config = {
        "train_micro_batch_size_per_gpu": request["micro_batch"],
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-6}},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "cpu"},
            "offload_optimizer": {"device": "cpu"},
            **request["zero"],
        },
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }
    config = AutoConfig.for_model(**request["model_config"])
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (the model is built under zero.Init while it lives)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    tokens = torch.randint(0, config.vocab_size, (request["micro_batch"], request["seq_len"]), device=engine.device)
    synchronize = get_accelerator().synchronize
    phases = {"forward": [], "backward": [], "step": []}
    for _ in range(request["repeats"] + 1):
        marks = [time.perf_counter()]
        loss = engine(input_ids=tokens, labels=tokens).loss
        synchronize()
        marks.append(time.perf_counter())
        engine.backward(loss)
        synchronize()
        marks.append(time.perf_counter())
        engine.step()
        synchronize()
        marks.append(time.perf_counter())
        for times, start, end in zip(phases.values(), marks[:-1], marks[1:], strict=True):
            times.append(end - start)
    answer = {phase: min(times[1:]) for phase, times in phases.items()}
    Path("answer.json").write_text(json.dumps(answer))
    exit_distributed()  # no gloo abort at exit, no 66 MiB /dev/shm buffer left behind


if __name__ == "__main__":
    main(sys.argv[1])
