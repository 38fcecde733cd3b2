"""What a layer is, for everything that works layer by layer: the parameter window stage 3 gathers, the
activation offloader's prefetch and the estimator's per-layer costs all count the same blocks."""

from __future__ import annotations

import torch

HEAD = -1
"""Layer index of what runs before the first layer (embeddings): its activations' backward comes last."""


def repeated_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: those of the `ModuleList` of more than one block that holds the most parameters
    (a transformer's decoder layers), [] if there is none. Parameters already partitioned by stage 3 count with
    their full size, `ds_numel`, so that the answer is the same before and after `zero.Init`."""
    best: list[torch.nn.Module] = []
    best_params = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            params = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
            if params > best_params:
                best, best_params = list(module), params
    return best
