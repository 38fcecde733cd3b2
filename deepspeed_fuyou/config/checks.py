"""What the `"fuyou"` block cannot check about itself: the DeepSpeed fields it relies on, and this machine.

`deepspeed_problems` always runs: a fuyou block on a config fuyou cannot serve is a mistake whatever the machine.
`machine_problems` runs when `estimator.validate` is on (the default): swap directories that are missing, not
writable or too small, and a pinned budget the host cannot give. Each returns every problem it finds, so that
`FuyouConfig.from_ds_config` and `fuyou validate` report them all at once; what only costs speed (no O_DIRECT)
is a warning.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepspeed_fuyou.config.sizes import format_size
from deepspeed_fuyou.errors import FuyouConfigError
from deepspeed_fuyou.io import native
from deepspeed_fuyou.io.swap_space import check_swap_root, supports_o_direct

if TYPE_CHECKING:
    from deepspeed_fuyou.config.fuyou import FuyouConfig

_OFFLOADS = ("offload_param", "offload_optimizer")


class FuyouConfigWarning(UserWarning):
    """A setting that works, but slower or differently than the user probably expects."""


def section(ds_config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = ds_config.get(name)
    return value if isinstance(value, Mapping) else {}


def offload_nvme_paths(ds_config: Mapping[str, Any]) -> list[str]:
    """The `nvme_path`s of the ZeRO offload blocks that point at NVMe: where `fuyou.nvme_paths` defaults to."""
    zero = section(ds_config, "zero_optimization")
    offloads = [section(zero, name) for name in _OFFLOADS]
    paths = (o.get("nvme_path") for o in offloads if o.get("device") == "nvme")
    return list(dict.fromkeys(path for path in paths if isinstance(path, str) and path))


def deepspeed_problems(ds_config: Mapping[str, Any]) -> list[FuyouConfigError]:
    """The DeepSpeed fields a fuyou block depends on: ZeRO-3 with NVMe offload, one half precision, a micro-batch."""
    problems = []
    zero = section(ds_config, "zero_optimization")
    stage = zero.get("stage", 0)
    if stage != 3:
        problems.append(
            FuyouConfigError(
                "zero_optimization.stage",
                stage,
                "the fuyou block needs ZeRO stage 3",
                'set "stage": 3 or remove "fuyou"',
            )
        )
    devices = {name: section(zero, name).get("device", "none") for name in _OFFLOADS}
    if "nvme" not in devices.values():
        problems.append(
            FuyouConfigError(
                "zero_optimization.offload_param.device",
                devices["offload_param"],
                "the fuyou block swaps to NVMe, but neither parameters nor optimizer states are offloaded there",
                'set offload_param and/or offload_optimizer "device": "nvme", or remove "fuyou"',
            )
        )
    for name in _OFFLOADS:
        path = section(zero, name).get("nvme_path")
        if devices[name] == "nvme" and path is not None and not isinstance(path, str):
            problems.append(
                FuyouConfigError(
                    f"zero_optimization.{name}.nvme_path",
                    path,
                    "must be a directory path (a string)",
                    'write e.g. "/mnt/nvme0"; several SSDs go in "fuyou": {"nvme_paths": [...]}',
                )
            )
    if section(zero, "offload_optimizer").get("fast_init"):
        problems.append(
            FuyouConfigError(
                "zero_optimization.offload_optimizer.fast_init",
                True,
                "fast_init reads DeepSpeed's own swap-file layout, which fuyou replaces",
                "remove fast_init; fuyou initialises optimizer files with pipelined I/O anyway",
            )
        )
    if ds_config.get("managed_gradient_accumulation") is False:
        problems.append(
            FuyouConfigError(
                "managed_gradient_accumulation",
                False,
                "fuyou streams each gradient partition to the SSD as backward produces it; unmanaged accumulation "
                "needs the whole model's gradients held in host memory until step()",
                'remove "managed_gradient_accumulation" (call engine.backward and engine.step as usual)',
            )
        )
    if section(ds_config, "fp16").get("enabled") and section(ds_config, "bf16").get("enabled"):
        problems.append(
            FuyouConfigError(
                "bf16.enabled", True, "fp16 and bf16 are both enabled", "enable one of them (bf16 on GPUs that have it)"
            )
        )
    micro_batch = ds_config.get("train_micro_batch_size_per_gpu")
    if micro_batch not in (None, "auto") and (type(micro_batch) is not int or micro_batch < 1):
        problems.append(
            FuyouConfigError(
                "train_micro_batch_size_per_gpu", micro_batch, "must be an integer >= 1", "use e.g. 1 or 4"
            )
        )
    return problems


AIO_LIMIT = Path("/proc/sys/fs/aio-max-nr")
AIO_IN_USE = Path("/proc/sys/fs/aio-nr")


def aio_events_left() -> int | None:
    """Linux AIO events the kernel can still give new queues (fs.aio-max-nr less fs.aio-nr); None where unknown."""
    try:
        return int(AIO_LIMIT.read_text()) - int(AIO_IN_USE.read_text())
    except (OSError, ValueError):
        return None


def io_problems(config: FuyouConfig, usable_host: int) -> list[FuyouConfigError]:
    """`fuyou.io` against the kernel's AIO limit and the host memory: what would otherwise fail or hang at start."""
    io = config.io
    problems = []
    events, left = io.queue_depth * io.threads, aio_events_left()
    if io.engine in ("aio", "auto") and left is not None and events > left:
        shortage = (
            f"{io.threads} threads x {io.queue_depth} in flight need {events} Linux AIO events, the kernel has {left} "
            "left (fs.aio-max-nr less those in use)"
        )
        raise_limit = f"sysctl -w fs.aio-max-nr={int(AIO_LIMIT.read_text()) + events}"
        if io.engine == "aio":
            fix = f"lower fuyou.io.queue_depth or fuyou.io.threads, or raise the limit ({raise_limit})"
            problems.append(FuyouConfigError("fuyou.io.queue_depth", io.queue_depth, shortage, fix))
        else:
            warnings.warn(
                f"fuyou.io: {shortage}; fuyou will use the pread/pwrite thread engine, which is slower. Lower "
                f"fuyou.io.queue_depth or fuyou.io.threads, or raise the limit ({raise_limit}).",
                FuyouConfigWarning,
                stacklevel=3,
            )
    bounce = io.threads * native.BOUNCE_BLOCKS_PER_WORKER * io.block_size
    room = usable_host - config.pinned_memory  # negative: the pinned budget alone is too large, reported below
    if 0 <= room < bounce:
        problems.append(
            FuyouConfigError(
                "fuyou.io.block_size",
                format_size(io.block_size),
                f"the engine's bounce blocks (for transfers of unaligned memory) can take {io.threads} threads x "
                f"{native.BOUNCE_BLOCKS_PER_WORKER} x {format_size(io.block_size)} = {format_size(bounce)} of host "
                f"memory, more than the {format_size(room)} left beside the pinned "
                "budget",
                'lower fuyou.io.block_size (e.g. "1MiB") or fuyou.io.threads',
            )
        )
    return problems


def machine_problems(
    config: FuyouConfig, ssd_bytes: int | None = None, export_bytes: int = 0
) -> list[FuyouConfigError]:
    """Swap directories and host memory of this machine against the config (and `ssd_bytes` of swap, when known, with
    `export_bytes` of checkpoint export on the first path: see `space_problems`)."""
    problems = []
    usable: dict[int, list[Path]] = defaultdict(list)  # file system (st_dev) -> swap directories on it
    seen: dict[Path, int] = {}
    for i, path in enumerate(config.nvme_paths):
        field = f"fuyou.nvme_paths[{i}]"
        try:
            check_swap_root(path, field)
        except FuyouConfigError as err:
            problems.append(err)
            continue
        resolved = path.resolve()
        if resolved in seen:
            problems.append(
                FuyouConfigError(
                    field, str(path), f"the same directory as fuyou.nvme_paths[{seen[resolved]}]", "list it once"
                )
            )
            continue
        seen[resolved] = i
        usable[os.stat(path).st_dev].append(path)
        if not supports_o_direct(path):
            warnings.warn(
                f"{field} = {str(path)!r}: the file system does not support O_DIRECT; fuyou falls back to buffered "
                "I/O there, which is slower and fills the page cache. Put swap directories on an SSD file system "
                "such as ext4 or xfs.",
                FuyouConfigWarning,
                stacklevel=2,
            )
    if ssd_bytes is not None:
        problems += _space_problems(config, list(usable.values()), ssd_bytes, export_bytes)
    host = config.estimator.host_memory_bytes
    usable_host = int(host * (1 - config.estimator.margin))
    problems += io_problems(config, usable_host)
    if config.pinned_memory > usable_host:
        problems.append(
            FuyouConfigError(
                "fuyou.pinned_memory",
                format_size(config.pinned_memory),
                f"more than this machine's {format_size(host)} of memory, less the {config.estimator.margin:.0%} "
                "margin (pinned memory cannot be swapped out)",
                f"lower it; a quarter of host memory ({format_size(host // 4)}) is a safe start",
            )
        )
    return problems


def space_problems(config: FuyouConfig, ssd_bytes: int, export_bytes: int = 0) -> list[FuyouConfigError]:
    """`ssd_bytes` of swap files against the free space of the (already checked) swap directories.

    `export_bytes` is what a checkpoint save writes next to the swap files on the first path (the optimizer's master
    weights and states, exported before DeepSpeed copies them into the checkpoint): a run that has room to train
    but not to save would die at its first save, after the training it could not keep.
    """
    usable: dict[int, list[Path]] = defaultdict(list)
    distinct = {path.resolve(): path for path in reversed(config.nvme_paths)}  # the first spelling of each
    for path in distinct.values():
        usable[os.stat(path).st_dev].append(path)
    return _space_problems(config, list(usable.values()), ssd_bytes, export_bytes)


def _space_problems(
    config: FuyouConfig, usable: list[list[Path]], ssd_bytes: int, export_bytes: int
) -> list[FuyouConfigError]:
    """Files are striped evenly over the paths: each file system needs its paths' share of `ssd_bytes`, and the one
    of the first path the checkpoint export too."""
    problems = []
    share = ssd_bytes / len(config.nvme_paths)
    first = config.nvme_paths[0].resolve()
    for paths in usable:
        swap = int(share * len(paths))
        export = export_bytes if any(path.resolve() == first for path in paths) else 0
        free = shutil.disk_usage(paths[0]).free
        if swap + export > free:
            i = config.nvme_paths.index(paths[0])
            need = f"{format_size(swap)} of swap space"
            if export:
                need += f" and {format_size(export)} for a checkpoint's export of the optimizer state"
            problems.append(
                FuyouConfigError(
                    f"fuyou.nvme_paths[{i}]",
                    str(paths[0]),
                    f"needs {need}, has {format_size(free)} free",
                    "free space there, or add another SSD to fuyou.nvme_paths (files are striped over all of them; "
                    "checkpoint exports go to the first)",
                )
            )
    return problems
