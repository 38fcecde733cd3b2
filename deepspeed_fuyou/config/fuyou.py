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
    """Integer >= 0: stage 3's parameter window in layers of the model; the layers after the one computing are read
    ahead (`0`: each layer is read when it is needed), and the window's knobs follow from it."""


OverlapMode = Literal["off", "backward", "forward"]


class OptimizerOptions(FuyouModel):
    """`fuyou.optimizer`: when the optimizer steps each sub-group, relative to compute. Every mode gives the same
    numbers as stock DeepSpeed."""

    json_path: ClassVar[str] = "fuyou.optimizer"
    overlap: Literal["auto", "off", "backward", "forward"] = "auto"
    """`off`: in `step()`, after backward, sub-group after sub-group as stock ZeRO-3 does (the next sub-group's state
    read and the previous one's written while one is stepped); `backward`: each sub-group as soon as its gradients
    are final, on the step thread, while backward goes on with earlier layers, its gradients never on the SSD
    (refused with `gradient_clipping` or fp16 loss scaling, which need the global norm first); `forward`: `step()`
    takes the global norm and the overflow verdict and returns, and the sub-groups are stepped behind the next
    forward, which waits only for the sub-group holding a parameter it fetches and takes updated parameters from
    memory; `auto`: `backward` where it is valid, else `forward`."""
    read_ahead: SizeOrAuto = Field(None, examples=["auto", "2GiB", 0])
    """Size, part of `pinned_memory`, that carries work across the end of backward with `off` and `forward`: final
    gradients stay in it instead of going through their files (the sub-groups stepped first first); what is left
    first holds the last sub-groups' optimizer states from the step until the next backward writes them, then takes
    the first sub-groups' master weights and states, read during backward. `0`: nothing is carried. With `backward`
    it enlarges the step's pool instead. `auto`: what the parameter window leaves unused of its share of
    `pinned_memory`, beyond a quarter more than it needs (room for its prefetch and the fetches it misses; none with
    `backward` or activation offload), known once the model is."""

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
    """`fuyou.placement`: which swap files live in host memory instead of on the SSD (`plan.host_tier`)."""

    json_path: ClassVar[str] = "fuyou.placement"
    host_memory: SizeOrAuto = Field(None, examples=["auto", "8GiB", 0])
    """Size: at most that much host memory holds swap files, filled with what saves the most SSD traffic per byte
    held (low-precision parameter partitions, three transfers a step; then gradients, two; then whole optimizer
    sub-groups, two), the rest on the SSD; `0`: everything on the SSD; `auto`: half of the memory available at
    start-up after the pinned budget (`fuyou estimate` shows the placement and the peaks)."""

    def budget(self, pinned_memory: int, available: int | None = None) -> int:
        """The bytes of host memory the tier may hold with `available` bytes of host memory (default: now, here)."""
        if self.host_memory is not None:
            return self.host_memory
        return max(0, ((available_host_memory() if available is None else available) - pinned_memory) // 2)


class ActivationOptions(FuyouModel):
    """`fuyou.activations`: which tensors autograd saves for backward go to host memory or the SSD."""

    json_path: ClassVar[str] = "fuyou.activations"
    offload: Literal["off", "auto", "all"] = "off"
    """`off`: activations stay on the device; `all`: every saved storage of at least `min_tensor_size` is moved;
    `auto`: as `all`, except the last layers whose reads backward could not hide (measured in the first forward)."""
    tier: Literal["cpu", "nvme"] = "nvme"
    """`cpu`: host memory; `nvme`: files under `nvme_paths`."""
    min_tensor_size: Size = Field(4 << 20, examples=["4MiB"])
    """Size: smaller saved storages stay on the device."""
    prefetch_layers: StrictInt = Field(2, ge=1, examples=[2])
    """Integer >= 1: layers whose activations are read back ahead of backward."""


class EstimatorOptions(FuyouModel):
    """`fuyou.estimator`: the checks run before anything is allocated, and the machine they assume."""

    json_path: ClassVar[str] = "fuyou.estimator"
    # `validate` is a (deprecated) method name of pydantic's BaseModel, so the field takes it as its JSON alias.
    validate_at_start: StrictBool = Field(True, alias="validate", examples=[True])
    """`true`: the machine checks run at start-up (swap directories, free space, host memory, the kernel's AIO room);
    `false`: only the block and its DeepSpeed fields are checked."""
    gpu_memory: SizeOrAuto = Field(None, examples=["auto", "24GiB"])
    """Size, or `auto` (detected): the accelerator memory the estimate checks its peak against."""
    host_memory: SizeOrAuto = Field(None, examples=["auto", "64GiB"])
    """Size, or `auto` (detected): the host memory the checks and the estimate assume."""
    margin: float = Field(0.05, ge=0, lt=0.5, examples=[0.05])
    """Fraction in [0, 0.5) of each memory kept free."""

    @property
    def host_memory_bytes(self) -> int:
        return self.host_memory if self.host_memory is not None else host_memory_bytes()


class FuyouConfig(FuyouModel):
    """The validated block. Immutable and hashable, so one process shares one I/O engine and pool per config."""

    nvme_paths: tuple[Path, ...] = Field(
        examples=[["/mnt/nvme0"]], json_schema_extra={"default_text": "the `offload_*` `nvme_path`s"}
    )
    """Non-empty list of existing, writable directories, one per SSD: swap files are striped over all of them."""
    io: IOOptions = IOOptions()
    pinned_memory: Size = Field(
        default_factory=default_pinned_budget,
        examples=["8GiB"],
        json_schema_extra={"default_text": "a quarter of host memory, at most 8GiB"},
    )
    """Size >= 16MiB that fits host memory less the margin: the one budget of page-locked staging buffers, split
    between the parameter window and the optimizer step."""
    params: ParamsOptions = ParamsOptions()
    optimizer: OptimizerOptions = OptimizerOptions()
    placement: PlacementOptions = PlacementOptions()
    activations: ActivationOptions = ActivationOptions()
    estimator: EstimatorOptions = EstimatorOptions()
    host_cache: StrictBool = Field(True, examples=[False])
    """`true`: CPU tensors of 128 KiB and more come from fuyou's caching allocator (see "Host memory"), so host
    memory stays flat; `false`: glibc's heap, as in stock DeepSpeed."""

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
        machine_problems: Callable[[FuyouConfig], list[FuyouConfigError]],
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
        if config is not None and config.estimator.validate_at_start:
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
