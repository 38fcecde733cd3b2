"""The model and data every example trains: the repository's small Llama-style model, randomly initialised, and a
few fixed batches of random tokens. Swap in your own model and data; nothing else in the examples changes."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

MODEL = Path(__file__).resolve().parent.parent / "configs" / "models" / "llama-tiny"


def model() -> torch.nn.Module:
    """Built from seed 0, so every launcher trains the same weights."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL), dtype=torch.float32)


def batches(count: int, batch_size: int = 2, seq_len: int = 64) -> list[dict[str, torch.Tensor]]:
    """`count` batches of token ids, each its own labels (the model shifts them)."""
    generator = torch.Generator().manual_seed(1)
    vocab = AutoConfig.from_pretrained(MODEL).vocab_size
    ids = torch.randint(vocab, (count, batch_size, seq_len), generator=generator)
    return [{"input_ids": batch, "labels": batch} for batch in ids]
