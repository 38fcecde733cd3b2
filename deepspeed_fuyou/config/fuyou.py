"""The `"fuyou"` block of a DeepSpeed config, typed, with the ZeRO fields it depends on cross-checked.

DeepSpeed keeps unknown top-level keys without looking at them, so everything under `"fuyou"` is ours to validate:
a misspelt key or an impossible value is a FuyouConfigError that names the JSON path, before anything is allocated.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepspeed_fuyou.config.sizes import parse_size
from deepspeed_fuyou.errors import FuyouConfigError
from deepspeed_fuyou.io.engine import IOOptions

BLOCK = "fuyou"
OVERLAP_MODES = ("auto", "off", "backward", "forward")
# Sections of the block that later components own; accepted here so configs written for them already load.
_DEFERRED_SECTIONS = ("activations", "estimator")
_KEYS = ("nvme_paths", "io", "pinned_memory", "params", "optimizer", *_DEFERRED_SECTIONS)
_IO_KEYS = ("engine", "block_size", "queue_depth", "threads")


def _reject_unknown(section: Mapping[str, Any], known: tuple[str, ...], prefix: str) -> None:
    if not isinstance(section, Mapping):
        raise FuyouConfigError(prefix, section, "must be a JSON object", f"write {prefix} as {{...}}")
    for key in section:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            raise FuyouConfigError(f"{prefix}.{key}", section[key], "unknown key", hint)


def _integer(value: Any, path: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FuyouConfigError(path, value, f"must be an integer >= {minimum}", f"use e.g. {max(minimum, 2)}")
    return value


def host_memory_bytes() -> int:
    """Physical memory of this machine, from sysconf."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_pinned_budget() -> int:
    """A quarter of host memory, at most 8 GiB: room for the staging buffers, the rest stays for everything else."""
    return min(host_memory_bytes() // 4, 8 << 30)


@dataclass(frozen=True)
class ParamsOptions:
    """`fuyou.params`: how far ahead of compute parameters are read from the SSD."""

    prefetch_layers: int = 2


@dataclass(frozen=True)
class OptimizerOptions:
    """`fuyou.optimizer`: whether optimizer sub-groups are swapped in ahead and written back behind the step."""

    overlap: str = "auto"

    @property
    def pipelined(self) -> bool:
        return self.overlap != "off"


@dataclass(frozen=True)
class FuyouConfig:
    """The validated block. Hashable, so one process shares one I/O engine and pool per distinct config."""

    nvme_paths: tuple[Path, ...]
    io: IOOptions = field(default_factory=IOOptions)
    pinned_memory: int = field(default_factory=default_pinned_budget)
    params: ParamsOptions = field(default_factory=ParamsOptions)
    optimizer: OptimizerOptions = field(default_factory=OptimizerOptions)

    @classmethod
    def from_ds_config(cls, ds_config: Mapping[str, Any]) -> FuyouConfig | None:
        """The block of a DeepSpeed config dict, or None when it has none (then DeepSpeed runs as stock)."""
        block = ds_config.get(BLOCK)
        if block is None:
            return None
        _reject_unknown(block, _KEYS, BLOCK)
        zero = ds_config.get("zero_optimization") or {}
        _check_zero(zero)
        io_block = block.get("io", {})
        _reject_unknown(io_block, _IO_KEYS, "fuyou.io")
        params = block.get("params", {})
        _reject_unknown(params, ("prefetch_layers",), "fuyou.params")
        optimizer = block.get("optimizer", {})
        _reject_unknown(optimizer, ("overlap",), "fuyou.optimizer")
        overlap = optimizer.get("overlap", "auto")
        if overlap not in OVERLAP_MODES:
            raise FuyouConfigError("fuyou.optimizer.overlap", overlap, "unknown mode", f"use one of {OVERLAP_MODES}")
        pinned = block.get("pinned_memory")
        budget = default_pinned_budget() if pinned is None else parse_size(pinned, "fuyou.pinned_memory")
        if budget > host_memory_bytes():
            raise FuyouConfigError(
                "fuyou.pinned_memory",
                pinned,
                f"larger than this machine's memory ({host_memory_bytes()} bytes)",
                "lower it; a quarter of host memory is a safe start",
            )
        return cls(
            nvme_paths=_nvme_paths(block, zero),
            io=IOOptions(**io_block),
            pinned_memory=budget,
            params=ParamsOptions(_integer(params.get("prefetch_layers", 2), "fuyou.params.prefetch_layers", 0)),
            optimizer=OptimizerOptions(overlap),
        )


def _check_zero(zero: Mapping[str, Any]) -> None:
    """The block only means something for ZeRO-3 with at least one kind of state offloaded to NVMe."""
    stage = zero.get("stage", 0)
    if stage != 3:
        raise FuyouConfigError(
            "zero_optimization.stage", stage, "the fuyou block needs ZeRO stage 3", 'set "stage": 3 or remove "fuyou"'
        )
    devices = {name: (zero.get(name) or {}).get("device", "none") for name in ("offload_param", "offload_optimizer")}
    if "nvme" not in devices.values():
        raise FuyouConfigError(
            "zero_optimization.offload_param.device",
            devices["offload_param"],
            "the fuyou block swaps to NVMe, but neither parameters nor optimizer states are offloaded there",
            'set offload_param and/or offload_optimizer "device": "nvme", or remove "fuyou"',
        )
    if (zero.get("offload_optimizer") or {}).get("fast_init"):
        raise FuyouConfigError(
            "zero_optimization.offload_optimizer.fast_init",
            True,
            "fast_init reads DeepSpeed's own swap-file layout, which fuyou replaces",
            "remove fast_init; fuyou initialises optimizer files with pipelined I/O anyway",
        )


def _nvme_paths(block: Mapping[str, Any], zero: Mapping[str, Any]) -> tuple[Path, ...]:
    paths = block.get("nvme_paths")
    if paths is None:
        offload = [(zero.get(name) or {}) for name in ("offload_param", "offload_optimizer")]
        paths = list(dict.fromkeys(o["nvme_path"] for o in offload if o.get("device") == "nvme" and o.get("nvme_path")))
        if not paths:
            raise FuyouConfigError(
                "fuyou.nvme_paths", None, "no SSD directory given", 'list one, e.g. "nvme_paths": ["/mnt/nvme0"]'
            )
    if isinstance(paths, str) or not isinstance(paths, list) or not paths:
        raise FuyouConfigError(
            "fuyou.nvme_paths", paths, "must be a non-empty list of directories", 'write e.g. ["/mnt/nvme0"]'
        )
    for i, path in enumerate(paths):
        if not isinstance(path, str) or not path:
            raise FuyouConfigError(f"fuyou.nvme_paths[{i}]", path, "must be a directory path", "write it as a string")
    return tuple(Path(p) for p in paths)
