"""The `"fuyou"` block of a DeepSpeed config, typed, and cross-checked against the ZeRO fields it depends on.

DeepSpeed keeps unknown top-level keys without looking at them, so everything under `"fuyou"` is ours to validate:
a misspelt key or an impossible value is a FuyouConfigError that names the JSON path, before anything is allocated.
`FuyouConfig.from_ds_config` parses the block, checks the DeepSpeed fields fuyou relies on and whatever machine
checks it is given (`plan.preflight.load_fuyou_config` gives this machine's), and reports every problem at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, StrictBool, StrictInt, field_validator

from deepspeed_fuyou.config import checks
from deepspeed_fuyou.config.io_options import IOOptions
from deepspeed_fuyou.config.schema import FuyouModel, Size, SizeOrAuto, invalid
from deepspeed_fuyou.config.sizes import format_size
from deepspeed_fuyou.errors import FuyouConfigError

BLOCK = "fuyou"
MIN_PINNED_MEMORY = 16 << 20
"""The smallest budget that still holds a few staging buffers of every kind."""


def host_memory_bytes() -> int:
    """Physical memory of this machine, from sysconf."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_host_memory() -> int:
    """Memory the kernel could give now without swapping (MemAvailable), or all of it where that is not reported."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return host_memory_bytes()


def default_pinned_budget() -> int:
    """A quarter of host memory, at most 8 GiB: room for the staging buffers, the rest stays for everything else."""
    return min(host_memory_bytes() // 4, 8 << 30)


class ParamsOptions(FuyouModel):
    """`fuyou.params`: how far ahead of compute parameters are read from the SSD."""

    json_path: ClassVar[str] = "fuyou.params"
    prefetch_layers: StrictInt = Field(2, ge=0, examples=[2])


OverlapMode = Literal["off", "backward", "forward"]


class OptimizerOptions(FuyouModel):
    """`fuyou.optimizer`: when the optimizer steps each sub-group, relative to compute.

    `overlap`:
    - "off": in `step()`, after backward, sub-group after sub-group as stock ZeRO-3 does (the next sub-group's state
      is read and the previous one's written while one is stepped);
    - "backward": each sub-group as soon as its gradients are final, on the step thread, while backward goes on
      with earlier layers; its gradients never go to the SSD. Only where nothing needs the global gradient norm
      before the first update: refused with `gradient_clipping` or fp16 loss scaling;
    - "forward": `step()` takes the global norm and the overflow verdict, then returns; sub-groups are stepped on the
      step thread behind the next forward, which waits only for the sub-group holding a parameter it fetches and
      takes updated parameters from memory;
    - "auto": "backward" where it is valid, else "forward".
    Every mode gives the same numbers as stock DeepSpeed.

    `read_ahead`: pinned memory, part of `pinned_memory`, that carries work across the end of backward in the modes
    whose gradients go to the SSD ("off", "forward"): final gradients stay in it instead of making the round trip
    through their files (the sub-groups stepped first first). What is left serves twice while backward runs, when
    the SSD has time to spare: first the optimizer states of the last sub-groups, updated by the step, are written
    from it (the step left them there instead of writing them while it was waited for), then the master weights
    and states of the first sub-groups are read into it. The step then moves fewer bytes while the next forward
    (or, with "off", compute) waits for it. 0: nothing is carried. In
    "backward", whose gradients never go to the SSD and whose sub-groups are stepped during backward already,
    nothing is carried: the step's pool gets this memory (larger sub-groups).
    """

    json_path: ClassVar[str] = "fuyou.optimizer"
    overlap: Literal["auto", "off", "backward", "forward"] = "auto"
    read_ahead: Size = Field(0, examples=["2GiB", 0])

    def mode(self, gradient_clipping: float, fp16: bool) -> OverlapMode:
        """The mode `overlap` selects for a run with this clipping threshold (0: none) and precision."""
        if self.overlap != "auto":
            return self.overlap
        return "forward" if norm_needed_before_step(gradient_clipping, fp16) else "backward"


def norm_needed_before_step(gradient_clipping: float, fp16: bool) -> str | None:
    """Why a run needs its global gradient norm before the first sub-group is stepped, or None."""
    if fp16:
        return "fp16 loss scaling skips a step on overflow, which is known only once backward has ended"
    if gradient_clipping > 0:
        return f"gradient_clipping {gradient_clipping:g} scales every gradient by the global norm"
    return None


class PlacementOptions(FuyouModel):
    """`fuyou.placement`: which swap files live in host memory instead of on the SSD (`plan.host_tier`).

    `host_memory` is a budget for them, filled with what saves the most SSD traffic per byte held: low-precision
    parameter partitions (three transfers a step), then gradients (two), then whole optimizer sub-groups (two);
    whatever does not fit stays on the SSD. `0`: everything on the SSD. A size: at most that much host memory.
    `"auto"`: half of what the machine has available when training starts, after the pinned budget, so that the rest
    stays for activations, gathered layers and everything else (`fuyou estimate` shows the placement and the peaks).
    """

    json_path: ClassVar[str] = "fuyou.placement"
    host_memory: SizeOrAuto = Field(None, examples=["auto", "8GiB", 0])

    def budget(self, pinned_memory: int, available: int | None = None) -> int:
        """The bytes of host memory the tier may hold with `available` bytes of host memory (default: now, here)."""
        if self.host_memory is not None:
            return self.host_memory
        return max(0, ((available_host_memory() if available is None else available) - pinned_memory) // 2)


class ActivationOptions(FuyouModel):
    """`fuyou.activations`: which tensors autograd saves for backward go to host memory or the SSD."""

    json_path: ClassVar[str] = "fuyou.activations"
    offload: Literal["off", "auto", "all"] = "off"
    tier: Literal["cpu", "nvme"] = "nvme"
    min_tensor_size: Size = Field(4 << 20, examples=["4MiB"])
    prefetch_layers: StrictInt = Field(2, ge=1, examples=[2])


class EstimatorOptions(FuyouModel):
    """`fuyou.estimator`: the checks run before anything is allocated, and the machine they assume."""

    json_path: ClassVar[str] = "fuyou.estimator"
    # `validate` is a (deprecated) method name of pydantic's BaseModel, so the field takes it as its JSON alias.
    validate_at_start: StrictBool = Field(True, alias="validate", examples=[True])
    gpu_memory: SizeOrAuto = Field(None, examples=["auto", "24GiB"])
    host_memory: SizeOrAuto = Field(None, examples=["auto", "64GiB"])
    margin: float = Field(0.05, ge=0, lt=0.5, examples=[0.05])

    @property
    def host_memory_bytes(self) -> int:
        return self.host_memory if self.host_memory is not None else host_memory_bytes()


class FuyouConfig(FuyouModel):
    """The validated block. Immutable and hashable, so one process shares one I/O engine and pool per config."""

    nvme_paths: tuple[Path, ...] = Field(examples=[["/mnt/nvme0"]])  # non-empty: see _paths_are_strings
    io: IOOptions = IOOptions()
    pinned_memory: Size = Field(default_factory=default_pinned_budget, examples=["8GiB"])
    params: ParamsOptions = ParamsOptions()
    optimizer: OptimizerOptions = OptimizerOptions()
    placement: PlacementOptions = PlacementOptions()
    activations: ActivationOptions = ActivationOptions()
    estimator: EstimatorOptions = EstimatorOptions()
    # fuyou's CPU allocator for large tensors (swap.host_heap); off: glibc's heap, as in stock DeepSpeed
    host_cache: StrictBool = Field(True, examples=[False])

    @field_validator("nvme_paths", mode="before")
    @classmethod
    def _paths_are_strings(cls, paths: Any) -> Any:
        if not isinstance(paths, list | tuple) or not paths:
            raise invalid("must be a non-empty list of directories", 'write e.g. ["/mnt/nvme0", "/mnt/nvme1"]')
        for path in paths:
            if not isinstance(path, str | os.PathLike) or not str(path):
                raise invalid(f"{path!r} is not a directory path", "write each directory as a non-empty string")
            if "\x00" in str(path):
                raise invalid(f"{path!r} contains a NUL byte, which no file name can", "remove it from the path")
        return paths

    @field_validator("pinned_memory")
    @classmethod
    def _holds_a_few_buffers(cls, budget: int) -> int:
        if budget < MIN_PINNED_MEMORY:
            raise invalid(
                f"{format_size(budget)} cannot hold the staging buffers",
                f"give at least {format_size(MIN_PINNED_MEMORY)}; a quarter of host memory is a good start",
            )
        return budget

    @classmethod
    def from_ds_config(
        cls,
        ds_config: Mapping[str, Any],
        machine_problems: Callable[[FuyouConfig], list[FuyouConfigError]] | None = None,
    ) -> FuyouConfig | None:
        """The block of a DeepSpeed config dict, or None when it has none (then DeepSpeed runs as stock).

        Raises one FuyouConfigError listing every problem: of the block, of the DeepSpeed fields it depends on and,
        with `estimator.validate` on, what `machine_problems` finds (`plan.preflight.load_fuyou_config` passes this
        machine's checks; the schema itself knows no machine). A block that is there but not an object
        (`"fuyou": null` included) is a problem, never stock DeepSpeed.
        """
        if BLOCK not in ds_config:
            return None
        block = ds_config[BLOCK]
        problems = checks.deepspeed_problems(ds_config)
        if not isinstance(block, Mapping):
            problems.insert(0, FuyouConfigError(BLOCK, block, "must be a JSON object", 'write "fuyou": {...}'))
            raise FuyouConfigError.combine(problems)
        offload_paths = checks.offload_nvme_paths(ds_config)
        block = {"nvme_paths": offload_paths, **block} if offload_paths else dict(block)
        try:
            config = cls.parse(block)
            block_problems = []
        except FuyouConfigError as err:
            block_problems = err.problems
            config = cls._without_bad_keys(block, block_problems)
        if config is not None:
            problems += _optimizer_problems(config, ds_config)
        if config is not None and config.estimator.validate_at_start and machine_problems is not None:
            reported = {_key_of(problem.field) for problem in block_problems}
            problems += [p for p in machine_problems(config) if _key_of(p.field) not in reported]
        problems[:0] = block_problems
        if problems:
            raise FuyouConfigError.combine(problems)
        return config

    @classmethod
    def _without_bad_keys(cls, block: dict[str, Any], problems: list[FuyouConfigError]) -> FuyouConfig | None:
        """The block less the keys that have problems, so that the machine checks of the rest are reported too."""
        bad = {_key_of(problem.field) for problem in problems}
        try:
            return cls.parse({key: value for key, value in block.items() if key not in bad})
        except FuyouConfigError:
            return None


def _clipping_and_fp16(ds_config: Mapping[str, Any]) -> tuple[float, bool]:
    clipping = ds_config.get("gradient_clipping", 0)
    clipping = 1.0 if clipping == "auto" else clipping  # the HF Trainer fills it with max_grad_norm, 1.0 by default
    fp16 = bool(checks.section(ds_config, "fp16").get("enabled"))
    return (clipping if isinstance(clipping, int | float) else 0.0), fp16


def overlap_mode(options: OptimizerOptions, ds_config: Mapping[str, Any]) -> OverlapMode:
    """The mode `optimizer.overlap` selects for this DeepSpeed config (its clipping and precision)."""
    return options.mode(*_clipping_and_fp16(ds_config))


def _optimizer_problems(config: FuyouConfig, ds_config: Mapping[str, Any]) -> list[FuyouConfigError]:
    """`overlap: "backward"` on a run that needs the global gradient norm first; a `read_ahead` that leaves too
    little of the pinned budget."""
    options = config.optimizer
    reason = norm_needed_before_step(*_clipping_and_fp16(ds_config))
    problems = []
    if options.overlap == "backward" and reason is not None:
        problems.append(
            FuyouConfigError(
                "fuyou.optimizer.overlap",
                "backward",
                f"stepping sub-groups during backward needs no global gradient norm first, but {reason}",
                'use "forward" (or "auto"), which steps behind the next forward with the same numbers',
            )
        )
    if options.read_ahead and config.pinned_memory - options.read_ahead < MIN_PINNED_MEMORY:
        problems.append(
            FuyouConfigError(
                "fuyou.optimizer.read_ahead",
                format_size(options.read_ahead),
                f"it is taken out of fuyou.pinned_memory ({format_size(config.pinned_memory)}), which must keep at "
                f"least {format_size(MIN_PINNED_MEMORY)} for the staging buffers",
                f"raise fuyou.pinned_memory to at least {format_size(options.read_ahead + MIN_PINNED_MEMORY)}, "
                "or lower read_ahead",
            )
        )
    return problems


def _key_of(field: str) -> str:
    """The key of the block a JSON path is under: "fuyou.io.threads" -> "io", "fuyou.nvme_paths[1]" -> "nvme_paths"."""
    return field.removeprefix(f"{BLOCK}.").split(".")[0].split("[")[0]
