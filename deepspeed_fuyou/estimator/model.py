"""The model the estimator reasons about: built from its config on fake tensors, so nothing is downloaded or allocated.

A fake tensor (torch's `FakeTensorMode`) has a shape, dtype, device and storage identity but no memory, and every
operator on it runs its real shape and dispatch logic. So the fake model is the real architecture: the parameter
shapes DeepSpeed will partition, and a forward pass whose saved tensors are exactly those a real pass saves
(same attention kernel choice, same views and in-place ops), at no cost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from deepspeed_fuyou.errors import FuyouConfigError
from deepspeed_fuyou.estimator.activations import SavedTensors, saved_tensors

ModelSpec = str | os.PathLike | object
"""A Hugging Face model id, a `config.json` path or a directory holding one, or a `transformers` config object."""


def load_model_config(model: ModelSpec):  # -> transformers.PretrainedConfig
    """The transformers config of `model`; only a model id needs the network (for its config.json, no weights)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    path = Path(model)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FuyouConfigError("--model", str(model), "the directory has no config.json", "give a model directory")
    try:
        if path.is_file():
            return AutoConfig.for_model(**_read_json(path))
        return AutoConfig.from_pretrained(str(model))
    except (OSError, ValueError, KeyError) as err:
        raise FuyouConfigError(
            "--model",
            str(model),
            f"cannot load its config ({str(err).splitlines()[0]})",
            "give a local config.json, a model directory, or a Hugging Face id reachable from this machine",
        ) from None


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON: {err}") from None


@dataclass(frozen=True)
class Param:
    """One trainable parameter as DeepSpeed sees it: its name and full (unpartitioned) element count."""

    name: str
    numel: int


@dataclass
class FakeModel:
    """A causal LM on fake tensors, the fake mode that owns them, and its parameters in registration order."""

    module: torch.nn.Module
    mode: FakeTensorMode
    dtype: torch.dtype

    @property
    def params(self) -> list[Param]:
        """Trainable parameters, tied ones once, in the order DeepSpeed partitions and groups them."""
        return [Param(name, p.numel()) for name, p in self.module.named_parameters() if p.requires_grad]

    @property
    def name(self) -> str:
        config = self.module.config
        return getattr(config, "name_or_path", "") or config.model_type

    def saved_tensors(self, micro_batch: int, seq_len: int) -> SavedTensors:
        """What a training forward of `micro_batch` sequences of `seq_len` tokens saves for backward."""
        with self.mode:
            return saved_tensors(self.module, torch.zeros(micro_batch, seq_len, dtype=torch.long))


def build_fake_model(config, dtype: torch.dtype = torch.float32) -> FakeModel:
    """`AutoModelForCausalLM.from_config(config)` in `dtype`, in training mode, on fake CPU tensors."""
    from transformers import AutoModelForCausalLM

    mode = FakeTensorMode()
    with mode:
        module = AutoModelForCausalLM.from_config(config, dtype=dtype)
    module.train()
    return FakeModel(module, mode, dtype)
