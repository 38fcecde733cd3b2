"""`fuyou estimate --auto`: the fastest settings that fit, found with the estimator itself.

What is searched, and why in this order:
- the micro-batch, over the divisors of the global batch per rank (micro-batch x gradient accumulation steps), so
  the optimizer sees the same batch and training is unchanged: a larger micro-batch keeps the accelerator busier
  and swaps parameters fewer times per optimizer step, which is what makes NVMe offload fast;
- activation offload (`fuyou.activations.offload: auto`) at each micro-batch before a smaller one, unless the
  config says `offload` itself: moving saved activations to the SSD behind compute costs little, while a smaller
  micro-batch costs a parameter swap per extra micro-step;
- `fuyou.params.prefetch_layers`, 2 then 1 then 0: deeper prefetch hides SSD reads behind compute but holds more
  gathered layers, so it gives way only when even a micro-batch of one does not fit;
- `fuyou.pinned_memory`: kept when given and it fits, else a quarter of host memory (at most 8 GiB), lowered
  when the host cannot hold it next to everything else;
- with the machine's rates (`--auto --time`), then `fuyou.placement.host_memory`, `fuyou.optimizer.overlap` and
  `fuyou.optimizer.read_ahead`: the configured values against "auto" (the DRAM tier as large as the host allows; the
  optimizer stepped behind compute where the config allows it; the read-ahead pool what the parameter window leaves
  of its share of the pinned budget) and against read-ahead pools of none, an eighth, a quarter, half and all of
  what the step moves through the SSD (gradients, master and states), each added to the pinned budget; the one with
  the shortest modelled step that still fits. The read-ahead is searched last because its worth depends on what the
  placement leaves on the SSD and the overlap sends through it, and it competes with the DRAM tier for the same host
  memory.
Offload placement stays as configured: fuyou needs parameters and optimizer states on NVMe.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deepspeed_fuyou.config.fuyou import BLOCK, MIN_PINNED_MEMORY, default_pinned_budget
from deepspeed_fuyou.config.sizes import format_size, parse_size
from deepspeed_fuyou.estimator.estimate import Estimate, Machine, RatesSource, estimate
from deepspeed_fuyou.estimator.model import ModelSpec, build_fake_model, load_model_config
from deepspeed_fuyou.plan.sizing import aligned
from deepspeed_fuyou.plan.zero_layout import TrainingSetup

PREFETCH_DEPTHS = (2, 1, 0)
PROPOSAL_GRANULE = 1 << 20  # proposed sizes are whole MiB, so that they read as sizes
READ_AHEAD_SHARES = (0.0, 1 / 8, 1 / 4, 1 / 2, 1.0)  # of the bytes the step moves through the SSD


@dataclass
class AutoConfig:
    """The proposed DeepSpeed config, its estimate, and what changed from the given one."""

    ds_config: dict[str, Any]
    estimate: Estimate
    changes: list[str]


def auto_configure(
    model: ModelSpec,
    ds_config: Mapping[str, Any],
    seq_len: int,
    world_size: int = 1,
    machine: Machine | None = None,
    rates: RatesSource | None = None,
) -> AutoConfig:
    """Searches micro-batch, prefetch depth and pinned budget (see above) for the first setting whose accelerator
    memory fits, then (with `rates`) placement and overlap for the fastest; what no setting here can fix (SSD
    space, host memory taken by model states) stays in the estimate's problems. When nothing fits, the smallest
    setting is returned with its problems."""
    config = copy.deepcopy(dict(ds_config))
    block = config.setdefault(BLOCK, {})
    setup = TrainingSetup.from_ds_config(config, seq_len, world_size=world_size)
    fake = build_fake_model(load_model_config(model), setup.dtype)
    per_rank_batch = setup.micro_batch * int(config.get("gradient_accumulation_steps", 1))
    if "pinned_memory" not in block:
        block["pinned_memory"] = default_pinned_budget()
    given = block.get("activations", {}).get("offload")
    offload_choices = [given] if given is not None else [None, "auto"]
    result = None
    for depth in PREFETCH_DEPTHS:
        for micro_batch in sorted((d for d in range(1, per_rank_batch + 1) if per_rank_batch % d == 0), reverse=True):
            for offload in offload_choices:
                _apply(config, micro_batch, per_rank_batch // micro_batch, depth, offload)
                result = estimate(fake, config, seq_len, world_size=world_size, machine=machine)
                if "host" in result.exceeded or "accelerator" in result.exceeded:
                    result = _with_smaller_pinned_budget(fake, config, seq_len, world_size, machine, result)
                if "accelerator" not in result.exceeded:  # what is still over (SSD space, ...) no setting here fixes
                    if rates is not None:
                        config, result = _fastest(fake, config, seq_len, world_size, machine, rates)
                    return AutoConfig(config, result, _changes(ds_config, config))
    return AutoConfig(config, result, _changes(ds_config, config))


def _fastest(
    fake: Any, config: dict[str, Any], seq_len: int, world_size: int, machine: Machine | None, rates: RatesSource
) -> tuple[dict[str, Any], Estimate]:
    """`config` with the placement, overlap and read-ahead (configured or searched, see above) of the shortest
    modelled step that fits."""
    block = config[BLOCK]
    placements = [None, *(["auto"] if block.get("placement", {}).get("host_memory", "auto") != "auto" else [])]
    overlaps = [None, *(["auto"] if block.get("optimizer", {}).get("overlap", "auto") != "auto" else [])]

    def timed(candidate: dict[str, Any]) -> Estimate:
        return estimate(fake, candidate, seq_len, world_size=world_size, machine=machine, rates=rates)

    best: tuple[dict[str, Any], Estimate] | None = None
    for host_memory in placements:  # None: as configured
        for overlap in overlaps:
            candidate = copy.deepcopy(config)
            if host_memory is not None:
                candidate[BLOCK].setdefault("placement", {})["host_memory"] = host_memory
            if overlap is not None:
                candidate[BLOCK].setdefault("optimizer", {})["overlap"] = overlap
            result = timed(candidate)
            choices = [(candidate, result)] + [
                (other, timed(other)) for other in _with_read_ahead_choices(candidate, result)
            ]
            for choice, choice_result in choices:
                if choice_result.fits and (best is None or choice_result.step_time.seconds < best[1].step_time.seconds):
                    best = choice, choice_result
    return best or (config, timed(config))


def _with_read_ahead_choices(config: dict[str, Any], result: Estimate) -> list[dict[str, Any]]:
    """`config` with `optimizer.read_ahead` "auto" (within the pinned budget) and with each share
    (`READ_AHEAD_SHARES`) of what its step moves through the SSD, on top of the pinned budget the rest of fuyou has
    now; those that differ from the configured read-ahead."""
    assert result.fuyou is not None
    given = config[BLOCK].get("optimizer", {}).get("read_ahead", "auto")
    taken = 0 if given == "auto" else parse_size(given, "fuyou.optimizer.read_ahead")
    staging = parse_size(config[BLOCK]["pinned_memory"], "fuyou.pinned_memory") - taken
    carried = result.fuyou.swapped.get("gradients", 0) + result.fuyou.swapped.get("optimizer_states", 0)
    sizes = {aligned(int(share * carried), PROPOSAL_GRANULE) for share in READ_AHEAD_SHARES}
    candidates = []
    for size in sorted(sizes) if given == "auto" else ["auto", *sorted(sizes - {taken})]:
        candidate = copy.deepcopy(config)
        candidate[BLOCK]["pinned_memory"] = staging + (0 if size == "auto" else size)
        candidate[BLOCK].setdefault("optimizer", {})["read_ahead"] = size
        candidates.append(candidate)
    return candidates


def _apply(config: dict[str, Any], micro_batch: int, accumulation: int, depth: int, offload: str | None) -> None:
    """Sets one point of the search; `offload` None leaves `fuyou.activations.offload` unset (its default, off)."""
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = accumulation
    config.pop("train_batch_size", None)  # DeepSpeed derives it from the two above and the world size
    config[BLOCK].setdefault("params", {})["prefetch_layers"] = depth
    activations = config[BLOCK].setdefault("activations", {})
    if offload is None:
        activations.pop("offload", None)
    else:
        activations["offload"] = offload
    if not activations:
        del config[BLOCK]["activations"]


def _with_smaller_pinned_budget(
    fake: Any, config: dict[str, Any], seq_len: int, world_size: int, machine: Machine | None, result: Estimate
) -> Estimate:
    """When host memory is short, the pinned budget gives back what is missing, down to the pool's minimum (on the
    CPU accelerator, host memory is also the accelerator's)."""
    host_is_short = "host" in result.exceeded or result.machine.accelerator_is_host
    over = max(result.exceeded.get("host", 0), result.exceeded.get("accelerator", 0))
    budget = parse_size(config[BLOCK]["pinned_memory"], "fuyou.pinned_memory") - over
    if not host_is_short or budget < MIN_PINNED_MEMORY:
        return result
    config[BLOCK]["pinned_memory"] = int(budget)
    return estimate(fake, config, seq_len, world_size=world_size, machine=machine)


def _changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """`key: old -> new` for every setting the search changed."""

    def get(config: Mapping[str, Any], path: tuple[str, ...]) -> Any:
        for key in path:
            config = config.get(key) if isinstance(config, Mapping) else None
        return config

    paths = [
        ("train_micro_batch_size_per_gpu",),
        ("gradient_accumulation_steps",),
        ("train_batch_size",),
        (BLOCK, "params", "prefetch_layers"),
        (BLOCK, "activations", "offload"),
        (BLOCK, "pinned_memory"),
        (BLOCK, "placement", "host_memory"),
        (BLOCK, "optimizer", "overlap"),
        (BLOCK, "optimizer", "read_ahead"),
    ]
    changes = []
    for path in paths:
        old, new = get(before, path), get(after, path)
        if old != new:
            shown = format_size(new) if path[-1] in ("pinned_memory", "read_ahead") and isinstance(new, int) else new
            changes.append(f"{'.'.join(path)}: {old if old is not None else '(default)'} -> {shown}")
    return changes
