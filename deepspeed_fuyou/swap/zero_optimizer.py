"""Our ZeRO-3 optimizer: DeepSpeed's stage 3 with fuyou's swappers and host-memory bounds.

Only what differs is overridden (DeepSpeed's `SuperOffloadOptimizer_Stage3` is the precedent):
- `_configure_tensor_swapping` builds `FuyouOptimizerSwapper` instead of DeepSpeed's swappers;
- `_configure_offloading` keeps NVMe-offloaded parameters on the SSD: stock stage 3 moves up to `max_in_cpu`
  (1e9) elements of them into a pinned host copy for good, which is why its host memory grows with the model;
- sub-groups are capped so that three of them (prefetch, step, write-back) fit in the pinned budget;
- `fuyou.params.prefetch_layers` sets how many parameters stage 3 keeps gathered and prefetches, in layers of the
  model (see `prefetch_window`), unless the config sets DeepSpeed's own knobs explicitly;
- checkpoints export and import our striped state through the folder DeepSpeed copies.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from deepspeed_fuyou.config.fuyou import FuyouConfig
from deepspeed_fuyou.integration import STOCK_STAGE3
from deepspeed_fuyou.swap.optimizer_swapper import FuyouOptimizerSwapper
from deepspeed_fuyou.swap.param_swapper import PREFETCH_SHARE
from deepspeed_fuyou.swap.runtime import SwapRuntime

# Tensors a sub-group holds in flight per element: master, two Adam moments and the gradient, for the sub-group
# being prefetched, the one being stepped and the one being written back.
_SUBGROUP_TENSORS_IN_FLIGHT = 3 * 4


log = logging.getLogger(__name__)

# DeepSpeed's names (in "zero_optimization") for the knobs `prefetch_window` derives, with their aliases.
_WINDOW_KEYS = {
    "prefetch_bucket_size": ("stage3_prefetch_bucket_size", "prefetch_bucket_size"),
    "max_live_parameters": ("stage3_max_live_parameters", "max_live_parameters"),
    "max_reuse_distance": ("stage3_max_reuse_distance", "max_reuse_distance"),
    "reduce_bucket_size": ("reduce_bucket_size",),
}


def layer_numel(module: torch.nn.Module) -> int:
    """Elements of the largest repeated block (a transformer layer) or leaf module (an embedding may be larger).

    Parameters are already partitioned here, so their full size is `ds_numel`.
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


def _explicit_window_settings(ds_config: Mapping[str, Any]) -> set[str]:
    zero = ds_config.get("zero_optimization") or {}
    return {name for name, keys in _WINDOW_KEYS.items() if any(key in zero for key in keys)}


def sub_group_cap(config: FuyouConfig, master_itemsize: int = 4) -> int:
    """The largest sub-group (in elements) whose pipelined swap fits in the optimizer's share of the budget."""
    share = int(config.pinned_memory * (1 - PREFETCH_SHARE))
    return max(1, share // (_SUBGROUP_TENSORS_IN_FLIGHT * master_itemsize))


class FuyouZeroOptimizer(STOCK_STAGE3):
    """Stage 3 for configs with a `"fuyou"` block (the registration picks stock stage 3 for all others)."""

    def __init__(self, module: Any, init_optimizer: Any, param_names: Any, *args: Any, **kwargs: Any) -> None:
        # Set before the base constructor: it calls the overridden methods below.
        self.fuyou_config = FuyouConfig.from_ds_config(kwargs["ds_config"])
        self.fuyou_runtime = SwapRuntime.for_config(self.fuyou_config)
        kwargs["sub_group_size"] = min(kwargs.get("sub_group_size", 10**12), sub_group_cap(self.fuyou_config))
        window = prefetch_window(module, self.fuyou_config.params.prefetch_layers)
        explicit = _explicit_window_settings(kwargs["ds_config"])
        kwargs.update({name: value for name, value in window.items() if name not in explicit})
        log.info("fuyou: parameter window %s (kept from the DeepSpeed config: %s)", window, sorted(explicit) or "none")
        super().__init__(module, init_optimizer, param_names, *args, **kwargs)

    def _configure_offloading(self, offload_optimizer_config: Any, offload_param_config: Any) -> None:
        super()._configure_offloading(offload_optimizer_config, offload_param_config)
        self.max_params_in_cpu = 0

    def _configure_tensor_swapping(self, offload_optimizer_config: Any, aio_config: Any) -> None:
        self.optimizer_swapper = FuyouOptimizerSwapper(
            self.fuyou_runtime,
            self.optimizer,
            self.master_weights_and_grads_dtype,
            pipelined=self.fuyou_config.optimizer.pipelined,
        )

    def checkpoint_event_prologue(self) -> None:
        super().checkpoint_event_prologue()
        if self.swap_optimizer:
            self.optimizer_swapper.export_checkpoint()

    def reset_swap_buffers(self) -> None:
        """Called by `load_checkpoint` after it copied the checkpoint's files into `swap_folder`."""
        self.optimizer_swapper.import_checkpoint()
        super().reset_swap_buffers()

    def checkpoint_event_epilogue(self) -> None:
        super().checkpoint_event_epilogue()
        if self.swap_optimizer:
            self.optimizer_swapper.discard_export()
