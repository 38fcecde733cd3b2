"""Accelerate with a DeepSpeed config file that has a `"fuyou"` block:

    accelerate launch --config_file examples/accelerate_deepspeed.yaml examples/train_accelerate.py

The YAML names the DeepSpeed config (`deepspeed_config_file`); the optimizer is the config's, so the script passes
Accelerate's placeholder. On a machine without a GPU set `DS_ACCELERATOR=cpu`.
"""

from __future__ import annotations

import argparse

import tiny_llama
from accelerate import Accelerator
from accelerate.utils import DummyOptim

from deepspeed_fuyou.distributed import exit_distributed

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=4)
args = parser.parse_args()

accelerator = Accelerator()
model = tiny_llama.model()  # under zero.Init (`zero3_init_flag`): partitioned as it is built
engine, optimizer = accelerator.prepare(model, DummyOptim(model.parameters()))
micro_batch = accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"]
for step, batch in enumerate(tiny_llama.batches(args.steps, micro_batch)):
    loss = engine(**{name: tensor.to(accelerator.device) for name, tensor in batch.items()}).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    accelerator.print(f"step {step} loss {loss.item():.6f}")
exit_distributed()  # ends the process group cleanly (see deepspeed_fuyou.distributed)
