"""What this machine can run of a config: checked before anything is allocated, every problem at once.

`load_fuyou_config` is the entry point of everything about to train or estimate: the `"fuyou"` block parsed and
checked against its DeepSpeed fields (`config`), then, when `estimator.validate` is on (the default), against this
machine: swap directories that are missing, not writable, listed twice or too small, a pinned budget the host
cannot give, an I/O queue the kernel has no room for. What only costs speed (no O_DIRECT, the thread engine
instead of Linux AIO) is a `FuyouConfigWarning`.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepspeed_fuyou.config.checks import FuyouConfigWarning
from deepspeed_fuyou.config.fuyou import FuyouConfig
from deepspeed_fuyou.config.sizes import format_size
from deepspeed_fuyou.errors import FuyouConfigError
from deepspeed_fuyou.io import native
from deepspeed_fuyou.io.swap_space import check_swap_root, supports_o_direct


def load_fuyou_config(ds_config: Mapping[str, Any], ssd_bytes: int | None = None) -> FuyouConfig | None:
    """The block of a DeepSpeed config dict, checked against this machine too (`ssd_bytes` of swap, when known,
    against the free space); None when it has none. Raises one FuyouConfigError listing every problem."""
    return FuyouConfig.from_ds_config(ds_config, machine_problems=lambda config: machine_problems(config, ssd_bytes))


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
