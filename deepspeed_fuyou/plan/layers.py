"""What a layer is, for everything that works layer by layer: the parameter window stage 3 gathers, the
activation offloader's prefetch and the estimator's per-layer costs all count the same blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

HEAD = -1
"""Layer index of what runs before the first layer (embeddings): its activations' backward comes last."""


def repeated_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: those of the `ModuleList` of more than one block that holds the most parameters
    (a transformer's decoder layers), [] if there is none. Parameters already partitioned by stage 3 count with
    their full size (`full_numel`), so that the answer is the same before and after `zero.Init`."""
    best: list[torch.nn.Module] = []
    best_params = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            params = full_numel(module)
            if params > best_params:
                best, best_params = list(module), params
    return best


def full_numel(module: torch.nn.Module) -> int:
    """Elements of `module`'s parameters, those stage 3 partitioned at their full size (`ds_numel`)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def on_backward_reaching(output: Any, note: Callable[[], None]) -> None:
    """Calls `note` when backward has computed the gradient of a layer's `output` (its first tensor): when backward
    reaches the layer. For a forward hook to call with the output it sees."""
    first = output[0] if isinstance(output, tuple | list) and output else output
    if isinstance(first, torch.Tensor) and first.requires_grad:
        first.register_hook(lambda _grad: note())
