"""How fuyou sizes stage 3 for a model and a pinned budget: one place, used by the optimizer and the estimator.

Nothing here imports DeepSpeed, so `fuyou estimate` can size a model on fake tensors exactly as training will.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from deepspeed_fuyou.config.fuyou import FuyouConfig

PREFETCH_SHARE = 0.5
"""Share of the pinned budget that parameter reads in flight may hold; the rest stays for optimizer sub-groups
and write-back staging, which run while prefetched parameters are still held."""

SUBGROUP_TENSORS_IN_FLIGHT = 3 * 4
"""Tensors a sub-group holds in flight per element: master, two Adam moments and the gradient, for the sub-group
being prefetched, the one being stepped and the one being written back."""

SLOT_SHARE = 0.8
"""A sub-group tensor at least this share of the largest sub-group's is given a buffer of the largest's size."""

# DeepSpeed's names (in "zero_optimization") for the knobs `prefetch_window` derives, with their aliases.
_WINDOW_KEYS = {
    "prefetch_bucket_size": ("stage3_prefetch_bucket_size", "prefetch_bucket_size"),
    "max_live_parameters": ("stage3_max_live_parameters", "max_live_parameters"),
    "max_reuse_distance": ("stage3_max_reuse_distance", "max_reuse_distance"),
    "reduce_bucket_size": ("reduce_bucket_size",),
}


def layer_numel(module: torch.nn.Module) -> int:
    """Elements of the largest repeated block (a transformer layer) or leaf module (an embedding may be larger).

    Parameters already partitioned by stage 3 count with their full size, `ds_numel`.
    """

    def numel(m: torch.nn.Module) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters())

    blocks = max((m for m in module.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=[])
    leaves = [m for m in module.modules() if not list(m.children())]
    return max(1, *(numel(m) for m in [*blocks, *leaves]))


def prefetch_window(module: torch.nn.Module, prefetch_layers: int) -> dict[str, int]:
    """Stage 3's gather/prefetch limits for reading `prefetch_layers` layers ahead of compute.

    Stock defaults count in elements without regard to the model: `max_reuse_distance` 1e9 keeps every parameter of
    a smaller model gathered from forward until its backward, so NVMe offload saves no memory at all, and a 5e7
    prefetch bucket is a fraction of a layer of a large model or several small models at once. Here the prefetch
    reaches `prefetch_layers` layers ahead, at most that plus the layer being computed stays gathered, and a
    parameter is kept only when it is reused within one layer's worth of compute (recomputation under activation
    checkpointing, tied weights in neighbouring modules). Gradients are reduced one layer at a time: the stock
    5e8-element bucket holds every gradient of a smaller model in device memory until the end of backward (host
    memory on the CPU accelerator, 4 bytes per parameter).
    """
    layer = layer_numel(module)
    return {
        "prefetch_bucket_size": prefetch_layers * layer,
        "max_live_parameters": (prefetch_layers + 1) * layer,
        "max_reuse_distance": layer,
        "reduce_bucket_size": layer,
    }


def explicit_window_settings(ds_config: Mapping[str, Any]) -> set[str]:
    """The window knobs the DeepSpeed config sets itself: those win over `prefetch_window`."""
    zero = ds_config.get("zero_optimization") or {}
    return {name for name, keys in _WINDOW_KEYS.items() if any(key in zero for key in keys)}


def sub_group_cap(config: FuyouConfig, master_itemsize: int = 4) -> int:
    """The largest sub-group (in elements) whose pipelined swap fits in the optimizer's share of the budget."""
    share = int(config.pinned_memory * (1 - PREFETCH_SHARE))
    return max(1, share // (SUBGROUP_TENSORS_IN_FLIGHT * master_itemsize))


def sub_group_buffer_numel(numel: int, largest: int) -> int:
    """Elements of the pooled buffer for a sub-group tensor of `numel` elements; the largest sub-group has `largest`.

    Sub-groups differ by a few parameters, and a buffer freed by a smaller one cannot hold a larger one's tensor: the
    pool would map another slab while the freed one sits idle, and pinned memory would grow with the number of
    sub-groups, i.e. with the model's depth. Tensors within `SLOT_SHARE` of the largest take its size and reuse each
    other's buffers; a much smaller one (the model's remainder) keeps its own size rather than hold room it never uses.
    """
    return largest if numel >= SLOT_SHARE * largest else numel


def stage3_overrides(
    module: torch.nn.Module, config: FuyouConfig, ds_config: Mapping[str, Any], sub_group_size: int
) -> dict[str, int]:
    """The stage-3 arguments fuyou replaces: its window (unless set explicitly) and a sub-group size that fits."""
    explicit = explicit_window_settings(ds_config)
    window = prefetch_window(module, config.params.prefetch_layers)
    return {
        "sub_group_size": min(sub_group_size, sub_group_cap(config)),
        **{name: value for name, value in window.items() if name not in explicit},
    }
