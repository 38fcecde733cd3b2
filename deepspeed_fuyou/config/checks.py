"""What the `"fuyou"` block cannot check about itself but its DeepSpeed config can: the fields fuyou relies on.

`deepspeed_problems` always runs: a fuyou block on a config fuyou cannot serve is a mistake whatever the machine.
It returns every problem it finds, so that `FuyouConfig.from_ds_config` reports them all at once. What this
machine can run of a config is checked a layer up, next to the I/O engine (`plan.preflight`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deepspeed_fuyou.errors import FuyouConfigError

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
