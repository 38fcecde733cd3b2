"""PyTorch Lightning's `DeepSpeedStrategy` with a DeepSpeed config that has a `"fuyou"` block:

    python examples/train_lightning.py --deepspeed_config configs/fuyou_gpu.json

Lightning runs DeepSpeed on CUDA GPUs only (its strategy refuses other accelerators), so this example needs one.
The optimizer is the config's: Lightning then ignores `configure_optimizers`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning
import tiny_llama
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch.utils.data import DataLoader

from deepspeed_fuyou.distributed import exit_distributed


class TinyLlama(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model: torch.nn.Module | None = None

    def configure_model(self) -> None:
        """Called under `zero.Init` by the strategy: the model is partitioned as it is built."""
        if self.model is None:
            self.model = tiny_llama.model()

    def training_step(self, batch: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        print(f"step {index} loss {loss.item():.6f}", flush=True)
        return loss

    def configure_optimizers(self) -> None:
        return None  # the DeepSpeed config's optimizer


parser = argparse.ArgumentParser()
parser.add_argument("--deepspeed_config", required=True)
parser.add_argument("--steps", type=int, default=4)
args = parser.parse_args()

config = json.loads(Path(args.deepspeed_config).read_text())
accumulation = config.pop("gradient_accumulation_steps", 1)  # Lightning's to set (`accumulate_grad_batches`)
strategy = DeepSpeedStrategy(config=config)
trainer = lightning.Trainer(
    strategy=strategy,
    accelerator="gpu",
    devices=1,
    max_steps=args.steps,
    accumulate_grad_batches=accumulation,
    logger=False,
    enable_checkpointing=False,
)
micro_batch = strategy.config["train_micro_batch_size_per_gpu"]
batches = DataLoader(tiny_llama.batches(args.steps, micro_batch), batch_size=None)  # each item one batch
trainer.fit(TinyLlama(), train_dataloaders=batches)
exit_distributed()  # ends the process group cleanly (see deepspeed_fuyou.distributed)
