"""Activation memory: the bytes autograd holds for backward at the end of forward, counted by saved-tensor hooks.

Every tensor autograd saves passes through the pack hook of `torch.autograd.graph.saved_tensors_hooks`. What it
costs is not the sum of those tensors: a view saved twice, or a tensor saved by two operators, shares one storage,
and parameters (and views of them, such as the transposed weight a linear layer saves) are model state, not
activations. So the count is the bytes of the distinct storages saved, parameters' excluded. The same function
measures a real forward pass and estimates a fake one (see `estimator.model`): the two agree because the fake pass
runs the same operators on the same shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SavedTensors:
    """What one forward pass leaves saved for backward."""

    nbytes: int  # bytes of the distinct non-parameter storages
    storages: int  # how many distinct storages
    largest: int  # bytes of the largest one (the unit activation offload moves at once)
    loss: torch.Tensor


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of the storage under `tensor`: the same for every view of it, real or fake."""
    return tensor.untyped_storage()._cdata


def saved_tensors(model: torch.nn.Module, input_ids: torch.Tensor) -> SavedTensors:
    """Runs one training forward of a causal LM (labels = inputs) and counts what autograd saved for backward."""
    parameters = {storage_key(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key not in parameters:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    return SavedTensors(sum(saved.values()), len(saved), max(saved.values(), default=0), loss)
