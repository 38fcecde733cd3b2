"""Activation offload to host memory or the SSD (the SSDTrain part of fuyou); see `activations.offloader`.

Without DeepSpeed::

    with deepspeed_fuyou.offload_activations(model, tier="nvme", path="/mnt/nvme0"):
        loss = model(**batch).loss
    loss.backward()

`offload_activations` returns the model's offloader (one per model and settings, reused by every call), which is
also a function decorator (`@offload_activations(model, ...)` around a training step's forward);
`offload_module(model, ...)` offloads every forward of the module from then on. With DeepSpeed, the `"fuyou"`
block's `activations` section turns it on for the engine's model.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch

from deepspeed_fuyou.activations.offloader import ActivationOffloader, ActivationStats
from deepspeed_fuyou.config.fuyou import ActivationOptions, default_pinned_budget
from deepspeed_fuyou.config.sizes import parse_size
from deepspeed_fuyou.io.engine import IOEngine, IOOptions
from deepspeed_fuyou.io.pinned import PinnedPool
from deepspeed_fuyou.io.swap_space import SwapSpace
from deepspeed_fuyou.plan.sizing import pinned_budget_error

__all__ = ["ActivationOffloader", "ActivationStats", "offload_activations", "offload_module"]

_offloaders: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[Any, ...], _Offload]] = weakref.WeakKeyDictionary()


class _Offload(contextlib.ContextDecorator):
    """The context-manager and decorator face of one model's offloader."""

    def __init__(self, offloader: ActivationOffloader) -> None:
        self.offloader = offloader

    def __enter__(self) -> ActivationOffloader:
        return self.offloader.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.offloader.__exit__(*exc)


def make_offloader(
    model: torch.nn.Module,
    tier: str = "nvme",
    path: str | None = None,
    offload: str = "auto",
    min_tensor_size: int | str = "4MiB",
    prefetch_layers: int = 2,
    pinned_memory: int | str | None = None,
    io: IOOptions | None = None,
) -> ActivationOffloader:
    """A new offloader for `model` that owns its I/O engine, swap directory and pinned pool (closed by `close()`)."""
    options = ActivationOptions.parse(
        {"offload": offload, "tier": tier, "min_tensor_size": min_tensor_size, "prefetch_layers": prefetch_layers}
    )
    if options.offload == "off":
        raise ValueError('offload="off" offloads nothing: do not wrap the forward at all')
    engine = space = None
    if options.tier == "nvme":
        if path is None:
            raise ValueError('the nvme tier needs path=, a directory on the SSD (e.g. path="/mnt/nvme0")')
        space = SwapSpace([path], field="path")
        engine = IOEngine(io)
    budget = default_pinned_budget() if pinned_memory is None else parse_size(pinned_memory, "pinned_memory")
    pool = None
    if torch.cuda.is_available():  # staging only exists for GPU tensors
        pool = PinnedPool(budget, short_budget=pinned_budget_error("pinned_memory", budget))

    def release() -> None:
        if engine is not None:
            engine.close()
        if space is not None:
            space.close()

    return ActivationOffloader(model, options, engine, space, pool, on_close=release)


def offload_activations(model: torch.nn.Module, **settings: Any) -> _Offload:
    """Offload what autograd saves in the forward passes of `model` run inside `with` (or a decorated function).

    Settings are those of `make_offloader`: `tier` ("cpu" or "nvme"), `path` (nvme), `offload` ("auto" keeps the
    last layers the policy picks, "all"), `min_tensor_size`, `prefetch_layers`, `pinned_memory`. The offloader is
    made once per model and settings and lives as long as the model.
    """
    per_model = _offloaders.setdefault(model, {})
    key = tuple(sorted((name, repr(value)) for name, value in settings.items()))
    if key not in per_model:
        per_model[key] = _Offload(make_offloader(model, **settings))
        weakref.finalize(model, per_model[key].offloader.close)
    return per_model[key]


def offload_module(module: torch.nn.Module, **settings: Any) -> ActivationOffloader:
    """Offload every forward of `module` from now on; `.close()` on the result stops it and releases its files."""
    return make_offloader(module, **settings).attach(module)
