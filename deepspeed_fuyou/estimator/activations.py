"""Activation memory: the bytes autograd holds for backward at the end of forward, counted by saved-tensor hooks.

Every tensor autograd saves passes through the pack hook of `torch.autograd.graph.saved_tensors_hooks`. What it
costs is not the sum of those tensors: a view saved twice, or a tensor saved by two operators, shares one storage,
and parameters (and views of them, such as the transposed weight a linear layer saves) are model state, not
activations. So the count is the bytes of the distinct storages saved, parameters' excluded. The same function
measures a real forward pass and estimates a fake one (see `estimator.model`): the two agree because the fake pass
runs the same operators on the same shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from deepspeed_fuyou.config.fuyou import ActivationOptions
from deepspeed_fuyou.plan.layers import HEAD, repeated_layers
from deepspeed_fuyou.storages import storage_key


@dataclass(frozen=True)
class SavedTensors:
    """What one forward pass leaves saved for backward."""

    nbytes: int  # bytes of the distinct non-parameter storages
    storages: int  # how many distinct storages
    largest: int  # bytes of the largest one (the unit activation offload moves at once)
    loss: torch.Tensor
    layers: int = 0  # repeated blocks found (see plan.layers.repeated_layers)
    by_layer: tuple[tuple[int, int], ...] = ()  # (layer saved in, bytes) per storage; -1 before the first layer

    def resident_with_offload(self, options: ActivationOptions) -> int:
        """Saved bytes on the device at their peak when `options` offloads what it can.

        Kept for good: storages below `min_tensor_size`; with `offload: auto` also the last layer's and what follows
        it (the policy's minimum; on a slow SSD it keeps more layers). Moved: everything else, with the layer being
        consumed plus `prefetch_layers` read ahead on the device in backward. The peak is the largest of the end of
        forward (all kept bytes, writes having kept up), the start of the last layer's backward (the tail consumed,
        the read-ahead begun) and the steady state further down.
        """
        small, last, tail, moved = self._split(options)
        layer = max(moved.values(), default=0)
        window = min((options.prefetch_layers + 1) * layer, sum(moved.values()))
        return small + max(last + tail, last + min(options.prefetch_layers * layer, sum(moved.values())), window)

    def offloaded(self, options: ActivationOptions) -> int:
        """Bytes one forward pass sends to the tier (host memory or the SSD)."""
        return sum(self._split(options)[3].values())

    def _split(self, options: ActivationOptions) -> tuple[int, int, int, dict[int, int]]:
        """Bytes kept as too small, kept in the last layer, kept after it, and bytes moved per layer."""
        if options.offload == "off":
            return self.nbytes, 0, 0, {}
        small = last = tail = 0
        moved: dict[int, int] = {}
        for layer, nbytes in self.by_layer:
            if nbytes < options.min_tensor_size:
                small += nbytes
            elif options.offload == "auto" and self.layers and layer == self.layers - 1:
                last += nbytes
            elif options.offload == "auto" and self.layers and layer == self.layers:
                tail += nbytes
            else:
                moved[layer] = moved.get(layer, 0) + nbytes
        return small, last, tail, moved


def saved_tensors(model: torch.nn.Module, input_ids: torch.Tensor) -> SavedTensors:
    """Runs one training forward of a causal LM (labels = inputs) and counts what autograd saved for backward,
    and in which layer (the unit activation offload keeps, prefetches and measures)."""
    parameters = {storage_key(p) for p in model.parameters()}
    saved: dict[int, tuple[int, int]] = {}
    layers = repeated_layers(model)
    current = [HEAD]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key not in parameters and key not in saved:
            saved[key] = (current[0], tensor.untyped_storage().nbytes())
        return tensor

    def entering(index: int) -> Callable[..., None]:
        return lambda module, args: current.__setitem__(0, index)

    def leaving(index: int) -> Callable[..., None]:
        return lambda module, args, output: current.__setitem__(0, index + 1)

    hooks = [
        h
        for i, layer in enumerate(layers)
        for h in (layer.register_forward_pre_hook(entering(i)), layer.register_forward_hook(leaving(i)))
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(input_ids=input_ids, labels=input_ids).loss
    finally:
        for hook in hooks:
            hook.remove()
    sizes = [nbytes for _, nbytes in saved.values()]
    return SavedTensors(sum(sizes), len(sizes), max(sizes, default=0), loss, len(layers), tuple(saved.values()))
