"""`deepspeed.initialize` in a plain training loop: the same script under the `deepspeed` launcher and `torchrun`.

    deepspeed examples/train_deepspeed.py --deepspeed_config configs/fuyou_cpu.json
    torchrun --nproc_per_node 1 examples/train_deepspeed.py --deepspeed_config configs/fuyou_cpu.json

Nothing here names fuyou: installing the package registers it into DeepSpeed, and the config's `"fuyou"` block
selects it (without the block this is stock DeepSpeed). On a machine without a GPU set `DS_ACCELERATOR=cpu`.
"""

from __future__ import annotations

import argparse
import os

import deepspeed
import tiny_llama
from transformers.integrations import HfDeepSpeedConfig

from deepspeed_fuyou.distributed import exit_distributed

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))  # the launcher's
args = deepspeed.add_config_arguments(parser).parse_args()

zero_init = HfDeepSpeedConfig(args.deepspeed_config)  # while it lives, models are partitioned as they are built
model = tiny_llama.model()
engine, *_ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
for step, batch in enumerate(tiny_llama.batches(args.steps, engine.train_micro_batch_size_per_gpu())):
    loss = engine(**{name: tensor.to(engine.device) for name, tensor in batch.items()}).loss
    engine.backward(loss)
    engine.step()
    print(f"step {step} loss {loss.item():.6f}", flush=True)
exit_distributed()  # ends the process group cleanly (see deepspeed_fuyou.distributed)
