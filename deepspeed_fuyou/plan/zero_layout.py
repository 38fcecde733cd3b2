"""How ZeRO-3 lays a model out on one rank: the DeepSpeed settings that matter, partitions and sub-groups.

The arithmetic is DeepSpeed's (0.19): a parameter of n elements is padded to a multiple of the world size and each
rank holds n / world of it (`Init._partition_param`); stage 3 cuts the rank's partitions, in parameter order, into
sub-groups that close once they reach `sub_group_size` elements (`_create_fp16_sub_groups`), and steps the
optimizer one sub-group at a time, so fp32 master weights and optimizer states exist per sub-group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deepspeed_fuyou.config.fuyou import BLOCK, FuyouConfig, overlap_mode
from deepspeed_fuyou.errors import FuyouConfigError
from deepspeed_fuyou.io.engine import ALIGNMENT
from deepspeed_fuyou.plan.preflight import load_fuyou_config

FP32 = 4  # bytes of the master weights, optimizer states and gradient files, whatever the training dtype

DS_AIO_ALIGNED_BYTES = 1024
"""Stock swap files pad every tensor to this many bytes times the aio `intra_op_parallelism`."""

OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "fusedadam": 2, "cpuadam": 2, "lamb": 2, "lion": 1, "adagrad": 1}
"""fp32 tensors per parameter element that each optimizer keeps besides the master weights."""


def gets_a_file(nbytes: int) -> bool:
    """Whether a tensor of `nbytes` is swapped through a file: one of at least a page. A smaller one stays in memory;
    its file would cost an open file and an I/O of the engine's smallest size for a few bytes."""
    return nbytes >= ALIGNMENT


def partition_numel(numel: int, world_size: int) -> int:
    """Elements of one rank's partition of a parameter: padded to a multiple of the world size, then split."""
    return -(-numel // world_size)


def sub_groups(partitions: Sequence[int], sub_group_size: int) -> list[range]:
    """Parameter index ranges of stage 3's sub-groups: each closes at the parameter that reaches the size."""
    if sub_group_size >= sum(partitions):
        return [range(len(partitions))]
    groups, start, size = [], 0, 0
    for index, numel in enumerate(partitions):
        size += numel
        if size >= sub_group_size or index == len(partitions) - 1:
            groups.append(range(start, index + 1))
            start, size = index + 1, 0
    return groups


@dataclass(frozen=True)
class TrainingSetup:
    """What the estimate needs from the DeepSpeed config and the command line."""

    zero: Any  # deepspeed.runtime.zero.config.DeepSpeedZeroConfig: its defaults are the ones training will use
    fuyou: FuyouConfig | None
    dtype: torch.dtype
    micro_batch: int
    seq_len: int
    world_size: int
    optimizer_states: int
    grad_accum_dtype: torch.dtype
    aio_alignment_bytes: int
    cpu_accelerator: bool = False  # DeepSpeed's CPU accelerator: "device" memory is host memory, counted resident
    overlap: str = "off"  # fuyou's optimizer.overlap mode for this config: when sub-groups are stepped
    gradient_accumulation_steps: int = 1

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @classmethod
    def from_ds_config(
        cls,
        ds_config: Mapping[str, Any],
        seq_len: int,
        micro_batch: int | None = None,
        world_size: int = 1,
        fuyou: FuyouConfig | None = None,
    ) -> TrainingSetup:
        """Reads the config as DeepSpeed will. `"auto"` values (the HF Trainer fills them in) take the defaults."""
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        zero_block = _without_auto(ds_config.get("zero_optimization") or {})
        try:
            zero = DeepSpeedZeroConfig(**zero_block)
        except ValueError as err:
            raise FuyouConfigError(
                "zero_optimization", zero_block, f"DeepSpeed rejects it: {err}", "fix the ZeRO block"
            ) from None
        if micro_batch is None:
            micro_batch = ds_config.get("train_micro_batch_size_per_gpu")
        if not isinstance(micro_batch, int) or isinstance(micro_batch, bool) or micro_batch < 1:
            raise FuyouConfigError(
                "train_micro_batch_size_per_gpu",
                micro_batch,
                "the estimate needs the micro-batch per rank",
                "set it in the config or pass --micro-batch",
            )
        optimizer = str((ds_config.get("optimizer") or {}).get("type", "adamw")).lower()
        aio = ds_config.get("aio") or {}
        grad_accum = (ds_config.get("data_types") or {}).get("grad_accum_dtype")
        if fuyou is None and BLOCK in ds_config:
            fuyou = load_fuyou_config(ds_config)
        return cls(
            zero=zero,
            fuyou=fuyou,
            overlap=overlap_mode(fuyou.optimizer, ds_config) if fuyou is not None else "off",
            gradient_accumulation_steps=_positive_int(ds_config.get("gradient_accumulation_steps"), 1),
            dtype=_training_dtype(ds_config),
            micro_batch=micro_batch,
            seq_len=seq_len,
            world_size=world_size,
            optimizer_states=OPTIMIZER_STATES.get(optimizer, 2),
            grad_accum_dtype={"fp16": torch.float16, "bf16": torch.bfloat16}.get(grad_accum, torch.float32),
            aio_alignment_bytes=DS_AIO_ALIGNED_BYTES * int(aio.get("intra_op_parallelism", 1)),
        )


def _positive_int(value: Any, default: int) -> int:
    """`value` if the config gives a positive integer there, else `default` (absent, or "auto" for the Trainer)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _without_auto(block: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: _without_auto(value) if isinstance(value, Mapping) else value
        for key, value in block.items()
        if value != "auto"
    }


def _training_dtype(ds_config: Mapping[str, Any]) -> torch.dtype:
    for key, dtype in (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16)):
        if (ds_config.get(key) or {}).get("enabled") is True:
            return dtype
    return torch.float32


@dataclass(frozen=True)
class ZeroLayout:
    """One rank's share of the model under ZeRO-3."""

    full: tuple[int, ...]  # elements of each trainable parameter
    partitions: tuple[int, ...]  # this rank's elements of each
    groups: tuple[range, ...]  # sub-groups, as parameter index ranges

    @classmethod
    def build(cls, numels: Sequence[int], world_size: int, sub_group_size: int) -> ZeroLayout:
        partitions = tuple(partition_numel(n, world_size) for n in numels)
        return cls(tuple(numels), partitions, tuple(sub_groups(partitions, sub_group_size)))

    @property
    def partition_total(self) -> int:
        return sum(self.partitions)

    @property
    def sub_group_numels(self) -> list[int]:
        return [sum(self.partitions[i] for i in group) for group in self.groups]

    @property
    def largest_sub_group_full(self) -> int:
        """Full (unpartitioned) elements of the largest sub-group: stock sizes some host buffers by it."""
        return max(sum(self.full[i] for i in group) for group in self.groups)

    @property
    def sub_groups_with_files(self) -> list[bool]:
        """Whether each sub-group's fp32 tensors get files: those of at least a page (smaller ones stay in memory)."""
        return [gets_a_file(n * FP32) for n in self.sub_group_numels]

    @property
    def swapped_sub_group_numels(self) -> list[int]:
        """Elements of each sub-group whose fp32 tensors get files, in order."""
        return [n for n, has in zip(self.sub_group_numels, self.sub_groups_with_files, strict=True) if has]

    def partitions_with_files(self, itemsize: int) -> list[bool]:
        """Whether each parameter's partition of `itemsize`-byte elements gets a file: one of at least a page."""
        return [gets_a_file(n * itemsize) for n in self.partitions]

    def swap_files(self, itemsize: int, optimizer_states: int) -> dict[str, list[int]]:
        """Bytes of each file fuyou's swappers write, by what it holds: a file per parameter partition of at least
        a page (smaller ones stay in memory), and per sub-group one for the master weights, one per optimizer state
        and one for the gradients."""
        per_sub_group = [n * FP32 for n in self.swapped_sub_group_numels]
        return {
            "parameters": [nbytes for _, nbytes in self.parameter_files(itemsize)],
            "optimizer_states": (1 + optimizer_states) * per_sub_group,
            "gradients": per_sub_group,
        }

    def parameter_files(self, itemsize: int) -> list[tuple[int, int]]:
        """(full elements, partition bytes) of each parameter whose partition gets a file: one of at least a page."""
        pairs = zip(self.full, self.partitions, self.partitions_with_files(itemsize), strict=True)
        return [(full, n * itemsize) for full, n, has in pairs if has]
