"""How fuyou sizes stage 3 for a model and a pinned budget: one place, used by the optimizer and the estimator.

Nothing here imports DeepSpeed, so `fuyou estimate` can size a model on fake tensors exactly as training will.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from deepspeed_fuyou.config.fuyou import MIN_PINNED_MEMORY, FuyouConfig, OverlapMode, overlap_mode
from deepspeed_fuyou.config.sizes import format_size
from deepspeed_fuyou.errors import FuyouConfigError
from deepspeed_fuyou.io.engine import ALIGNMENT
from deepspeed_fuyou.io.pinned import ShortBudget
from deepspeed_fuyou.plan.layers import full_numel, repeated_layers

PREFETCH_SHARE = 0.5
"""Share of the pinned budget for what forward and backward hold (parameter reads in flight, activations); the rest
is the optimizer step's (sub-groups and write-back staging), which may run at the same time (`optimizer.overlap`)."""

AUTO_READ_AHEAD_GRANULE = 1 << 20
"""`read_ahead: "auto"` sizes its pool in whole MiB, so that the size it logs reads as one."""

AUTO_WINDOW_HEADROOM = 1.25
"""`read_ahead: "auto"` leaves the forward/backward pool this multiple of what its window needs. Stage 3's NVMe
prefetch fills whatever room the pool reports, beyond what `forward_backward_need` counts, except the room kept for
fetches it did not prefetch (`param_swapper.FETCH_RESERVE_PARTITIONS`), and the pool carves buffers of several sizes
(a layer's partitions differ), whose free bytes may lie in pieces: the headroom gives back the reserved room and
the pieces, so that the window still reads as far ahead as its need counts."""


class PoolBudgets(NamedTuple):
    """The pinned budget split into the pools of `SwapRuntime`."""

    forward_backward: int  # parameter partitions read ahead, activations on their way
    step: int  # the optimizer step's pipeline of sub-groups, gradients on their way to the SSD
    read_ahead: int  # sub-groups carried across the end of backward (`optimizer.read_ahead`)


def pool_budgets(config: FuyouConfig, mode: OverlapMode, forward_backward_need: int | None = None) -> PoolBudgets:
    """The pools of `config.pinned_memory` in the overlap `mode`.

    A `read_ahead` size is taken out of the budget first, the rest shared by `PREFETCH_SHARE`. In the overlap `mode`
    "backward" nothing is carried (gradients never go to the SSD, each sub-group is stepped during backward): the
    read-ahead budget joins the step's pool, whose sub-groups grow with it (`sub_group_cap`).

    `read_ahead: "auto"` leaves the step pool its share and gives the forward/backward pool what its window needs at
    most (`forward_backward_need`, bytes; None while the model is not known yet) with some headroom; what its share
    has beyond that is the read-ahead pool, so that the memory a small window leaves idle moves SSD traffic out of
    the step (`auto_read_ahead`).
    """
    share = int(config.pinned_memory * PREFETCH_SHARE)
    read_ahead = config.optimizer.read_ahead
    if read_ahead is None:
        carried = auto_read_ahead(config, mode, share, forward_backward_need)
        return PoolBudgets(share - carried, config.pinned_memory - share, carried)
    forward_backward = int((config.pinned_memory - read_ahead) * PREFETCH_SHARE)
    carried = 0 if mode == "backward" else read_ahead
    return PoolBudgets(forward_backward, config.pinned_memory - forward_backward - carried, carried)


def auto_read_ahead(config: FuyouConfig, mode: OverlapMode, share: int, forward_backward_need: int | None) -> int:
    """The read-ahead pool of `read_ahead: "auto"`: the forward/backward `share` beyond what the window needs
    (`forward_backward_need` with `AUTO_WINDOW_HEADROOM`, at least `MIN_PINNED_MEMORY`), in whole
    `AUTO_READ_AHEAD_GRANULE`s; none while the need is unknown, in "backward" (nothing is carried) and with
    activation offload, whose staging takes what the pool has room for."""
    if forward_backward_need is None or mode == "backward" or config.activations.offload != "off":
        return 0
    spare = share - max(math.ceil(forward_backward_need * AUTO_WINDOW_HEADROOM), MIN_PINNED_MEMORY)
    return max(0, spare // AUTO_READ_AHEAD_GRANULE * AUTO_READ_AHEAD_GRANULE)


def forward_backward_need(window: Mapping[str, int], itemsize: int) -> int:
    """The most the forward/backward pool holds with stage 3's `window` (the knobs as `prefetch_window` names them)
    for parameters of `itemsize` bytes: the partitions of the gathered window and those stage 3 reads from the SSD
    ahead of it (its NVMe prefetch considers up to twice the elements of the gathers in flight, a prefetch bucket)."""
    return (window["max_live_parameters"] + 2 * window["prefetch_bucket_size"]) * itemsize


def window_peak(forward_backward_need: int, budget: int) -> int:
    """The most the forward/backward pool of `budget` bytes holds: what its window needs
    (`forward_backward_need`) with `AUTO_WINDOW_HEADROOM`. The estimator counts this much, and the parameter
    swapper keeps released partitions in memory only up to it, so that keeping them never pins more."""
    return min(budget, math.ceil(forward_backward_need * AUTO_WINDOW_HEADROOM))


def pinned_budget_error(field: str, configured: int, share: float = 1.0, fewer_held: str = "") -> ShortBudget:
    """The error of a pool holding `share` of the setting `field` (`configured` bytes) when a request does not fit:
    it names the setting and the value it needs, so that the pool's own share never shows. `fewer_held`: the other
    fix when the request waited for buffers held at once."""

    def error(problem: str, need: int, waited: bool) -> FuyouConfigError:
        fix = f"raise {field} to at least {format_size(need / share)}"
        if waited and fewer_held:
            fix += f", or {fewer_held}"
        return FuyouConfigError(field, format_size(configured), problem, fix)

    return error


STEP_POOL_EARLY_READS = 2
"""Sub-groups whose master and states the step pool reads during backward (modes "off" and "forward", where no step
runs then): the first two the step reads into its own pool, the one it steps first and the one it reads meanwhile.
Its pipeline holds two at its start anyway (`STEP_SLOTS`), so reading them early takes no memory the step would not
take, and moves their reads from the step, where they are waited for, into backward, which leaves the SSD time."""


class ReadAheadPlan(NamedTuple):
    """What `optimizer.read_ahead` carries, by sub-group index in step order; every buffer is one `slot`. Also the
    sub-groups read early into the step pool, which the read-ahead pool does not hold."""

    kept_gradients: list[int]  # final gradients kept in memory instead of their files
    read_states: list[int]  # master and states read during backward, for the step
    written_behind: list[int]  # optimizer states (not the master) written during the next backward
    slot: int  # bytes of each buffer: the largest sub-group's tensor, aligned
    states: int  # optimizer states per sub-group besides the master
    read_early: list[int]  # master and states read during backward into the step pool (`STEP_POOL_EARLY_READS`)

    @property
    def pool_bytes(self) -> int:
        """The pool's peak, at most: the gradients kept, and either the states written behind or, once their writes
        have ended, those read ahead."""
        states = max((1 + self.states) * len(self.read_states), self.states * len(self.written_behind))
        return self.slot * (len(self.kept_gradients) + states)


def read_ahead_plan(
    numels: Sequence[int],
    itemsize: int,
    states: int,
    gradients_on_file: Sequence[bool],
    states_on_ssd: Sequence[bool],
    budget: int,
) -> ReadAheadPlan:
    """What `optimizer.read_ahead` (`budget` bytes) carries across the end of backward and the end of the step, over
    the sub-groups in step order (`numels` elements of `itemsize` bytes, with `states` optimizer states besides the
    master; a gradient that goes to no file, or states the DRAM tier holds, need nothing). The training run and the
    estimator both decide here.

    First, the final gradients of the longest prefix of sub-groups that fits: a byte of gradient held saves two bytes
    of SSD traffic (its write in backward and its read in the step). What is left serves twice, one after the other:
    the optimizer states of the longest suffix that fits are written during the next backward instead of while the
    step is waited for (the master is written at once: the next forward or backward may read its parameters from
    it), and once those writes have ended, the master and states of the longest prefix that fits are read during
    backward, where the SSD has time to spare, instead of in the step.

    Of the sub-groups left, the step pool reads the master and states of the first ones (`STEP_POOL_EARLY_READS`)
    during backward too, except those whose states are written behind: their states take read-ahead memory, which
    the plan has given to gradients and reads.
    """
    slot = step_slot(numels, itemsize)
    gradient_bytes = [slot if on_file else 0 for on_file in gradients_on_file]
    kept = _longest_prefix(gradient_bytes, budget)
    left = budget - sum(gradient_bytes[:kept])
    read = _longest_prefix([slot * (1 + states) if on_ssd else 0 for on_ssd in states_on_ssd], left)
    behind = _longest_prefix([slot * states if on_ssd else 0 for on_ssd in reversed(states_on_ssd)], left)
    count = len(numels)
    read_states = [i for i in range(read) if states_on_ssd[i]]
    written_behind = [i for i in range(count - behind, count) if states_on_ssd[i] and states]
    left_for_step = [i for i in range(read, count) if states_on_ssd[i] and i not in written_behind]
    return ReadAheadPlan(
        kept_gradients=[i for i in range(kept) if gradients_on_file[i]],
        read_states=read_states,
        written_behind=written_behind,
        slot=slot,
        states=states,
        read_early=left_for_step[:STEP_POOL_EARLY_READS],
    )


def _longest_prefix(sizes: Sequence[int], budget: int) -> int:
    total = 0
    for count, nbytes in enumerate(sizes):
        total += nbytes
        if total > budget:
            return count
    return len(sizes)


def aligned(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """`nbytes` rounded up to the I/O alignment (ours unless another is given: stock's buffers follow DeepSpeed's),
    the size of a staging buffer that holds them."""
    return -(-nbytes // alignment) * alignment


def step_slot(numels: Sequence[int], itemsize: int) -> int:
    """The one buffer size of the step and read-ahead pools: the largest sub-group's tensor, aligned. One size for
    every buffer keeps the pools from fragmenting when buffers are released in another order than taken."""
    return aligned(max(numels, default=0) * itemsize)


STEP_SLOTS = 15
"""Buffers of the step pool's slot size (the largest sub-group's fp32 tensor) the optimizer step may hold at once,
for Adam (master and two moments per sub-group), in the `optimizer.overlap` mode that holds the most, "forward": the
sub-group read ahead (master, moments, gradient), the one stepped (the same), the one written back (master, moments),
the new low-precision parameters of two sub-groups being written (a slot each unless they are fp32, written from the
master's own slot) and the updated parameters kept for the next forward to take (`HAND_OVER_SUB_GROUPS`). "off"
holds two slots fewer; "backward" reads no gradient ahead but holds two in memory (the sub-group whose gradients
backward is producing, one finished and waiting for the step thread). Every mode sizes sub-groups for the most, so
that a mode never changes the sub-groups, nor the rounding of the global gradient norm that clipping uses, which sums
per sub-group."""

HAND_OVER_SUB_GROUPS = 2
"""Sub-groups whose updated low-precision parameters the step keeps for the next forward to take from memory
(`optimizer.overlap` "forward"; `swap.updates.PendingUpdates`): a slot each (their buffer, or in fp32 their master's).
Two, because stage 3's sub-groups do not follow layers: the forward may wait for the next sub-group while the rest of
the last one's parameters are still to be taken, for its next layer."""

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
    leaves = [m for m in module.modules() if not list(m.children())]
    return max(1, *(full_numel(m) for m in [*repeated_layers(module), *leaves]))


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


def window_as_zero_config(window: Mapping[str, int]) -> dict[str, int]:
    """The window knobs of `window` (as `prefetch_window` names them) under their names in "zero_optimization"."""
    return {keys[0]: window[name] for name, keys in _WINDOW_KEYS.items() if name in window}


def explicit_window_settings(ds_config: Mapping[str, Any]) -> set[str]:
    """The window knobs the DeepSpeed config sets itself: those win over `prefetch_window`."""
    zero = ds_config.get("zero_optimization") or {}
    return {name for name, keys in _WINDOW_KEYS.items() if any(key in zero for key in keys)}


def sub_group_cap(config: FuyouConfig, mode: OverlapMode, largest_param: int, master_itemsize: int = 4) -> int:
    """The `sub_group_size` (in elements) whose pipelined step fits in the optimizer's share of the budget (in the
    overlap `mode`).

    Stage 3 closes a sub-group at the parameter that reaches `sub_group_size`, so a sub-group can exceed it by up to
    `largest_param` - 1 elements: the cap leaves room for that.
    """
    step = pool_budgets(config, mode).step
    return max(1, step // (STEP_SLOTS * master_itemsize) - largest_param)


def stage3_overrides(
    module: torch.nn.Module, config: FuyouConfig, ds_config: Mapping[str, Any], sub_group_size: int
) -> dict[str, int]:
    """The stage-3 arguments fuyou replaces: its window (unless set explicitly) and a sub-group size that fits."""
    explicit = explicit_window_settings(ds_config)
    window = prefetch_window(module, config.params.prefetch_layers)
    largest_param = max((getattr(p, "ds_numel", p.numel()) for p in module.parameters()), default=0)
    cap = sub_group_cap(config, overlap_mode(config.optimizer, ds_config), largest_param)
    return {
        "sub_group_size": min(sub_group_size, cap),
        **{name: value for name, value in window.items() if name not in explicit},
    }
