"""What `register()` puts into DeepSpeed, and DeepSpeed's own, captured before it does.

DeepSpeed looks up two names at call time, and these are the only two we replace:
- `deepspeed.runtime.zero.partition_parameters.AsyncPartitionedParameterSwapper`, which `zero.Init` calls to build
  the parameter swapper (both when a model is built under `zero.Init` and when stage 3 converts a finished model);
- `deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3`, which the engine imports inside
  `_configure_zero_optimizer` to build the ZeRO-3 optimizer.
Each replacement is a factory that looks at the config it is given: with a `"fuyou"` block it builds ours, without
one it builds DeepSpeed's own class with the same arguments, so stock configs run exactly as before.

With the optimizer stepped behind compute (`fuyou.optimizer.overlap`), two more points: stage 3's parameter
coordinator waits for a parameter's pending update before it gathers it (`gate_parameter_fetches`, per optimizer),
and `GatheredParameters` first finishes every pending step (`register()`), since user code and checkpoints gather
parameters outside the coordinator.

When fuyou runs an engine, its `save_checkpoint` writes under a temporary tag and commits it once complete, and its
`load_checkpoint` refuses a checkpoint that was never completed (`deepspeed_fuyou.checkpoints`).

Importing this module changes nothing in DeepSpeed; `register()` does (idempotent), called by the import hook
(`deepspeed_fuyou._hook`) and by `deepspeed_fuyou.integration.initialize`. `check_deepspeed_internals()` asserts
every DeepSpeed name and signature this module and the swappers rely on; the test suite runs it, so a DeepSpeed
upgrade that moves them fails loudly.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import deepspeed
import torch._dynamo  # noqa: F401  (see register(): must be imported before zero.Init patches Tensor.__new__)
from deepspeed.runtime.engine import DeepSpeedEngine

# SuperOffload subclasses the stage-3 class it finds at its first import: bind it to DeepSpeed's before we replace it.
from deepspeed.runtime.superoffload import superoffload_stage3  # noqa: F401
from deepspeed.runtime.swap_tensor.partitioned_param_swapper import AsyncPartitionedParameterSwapper
from deepspeed.runtime.zero import partition_parameters, partitioned_param_coordinator, stage3
from deepspeed.utils import numa
from packaging.version import Version

from deepspeed_fuyou import checkpoints
from deepspeed_fuyou.config.fuyou import BLOCK
from deepspeed_fuyou.distributed import clean_up_when_stopped
from deepspeed_fuyou.errors import FuyouError
from deepspeed_fuyou.plan.preflight import load_fuyou_config

SUPPORTED_DEEPSPEED = (Version("0.19.8"), Version("0.20"))  # [low, high): the versions whose internals we checked

SETUP_FOR_REAL_OPTIMIZER = (
    "self._create_fp32_partitions()",
    "dist.barrier()",
    "self._create_next_swappable_fp32_groups()",
    "self.initialize_optimizer_states()",
    "bucket.buffer = torch.empty(self.reduce_bucket_size",
    "self.grad_partitions_flat_buffer: Tensor = torch.zeros(",
)
"""What stock stage 3's `_setup_for_real_optimizer` does, in order; FuyouZeroOptimizer's repeats all but the last."""

STOCK_STEP = (
    "self._pre_step()",
    "self._partition_all_parameters()",
    "self._overflow_check_and_loss_scale_update(update_scale=False)",
    "self._get_norm_groups()",
    "combine_grad_norm_groups(",
    "is_invalid_grad_norm(",
    "self._loss_scale_update_and_overflow_cleanup()",
    "self._global_grad_norm = scaled_global_grad_norm / self.loss_scale",
    "self._prepare_sub_group(",
    "self.unscale_and_clip_grads(",
    "self._optimizer_step(",
    "self._reassign_or_swap_out_partitioned_parameters(",
    "self._release_sub_group(",
    "self._post_step(",
)
"""What stock stage 3's `step` does, in order; FuyouZeroOptimizer's overlapped step makes the same calls."""

STOCK_PARAM_SWAPPER = AsyncPartitionedParameterSwapper
STOCK_STAGE3 = stage3.DeepSpeedZeroOptimizer_Stage3
"""DeepSpeed's own ZeRO-3 optimizer, captured before `register()` puts our factory under its name."""

STOCK_GATHERED_ENTER = partition_parameters.GatheredParameters.__enter__
STOCK_SAVE_CHECKPOINT = DeepSpeedEngine.save_checkpoint
STOCK_LOAD_CHECKPOINT = DeepSpeedEngine.load_checkpoint
CHECKPOINT_ARGUMENTS = {
    "save_checkpoint": ["self", "save_dir", "tag", "client_state", "save_latest", "exclude_frozen_parameters"],
    "load_checkpoint": ["self", "load_dir", "tag"],
}
"""The leading parameters of the engine's checkpoint methods, which `_save_checkpoint` / `_load_checkpoint` pass on."""
_COORDINATOR_GATHER = "_PartitionedParameterCoordinator__all_gather_params"
_overlapped_optimizers: weakref.WeakSet[Any] = weakref.WeakSet()


def gate_parameter_fetches(coordinator: Any, wait: Callable[[Iterable[Any]], None]) -> None:
    """Makes stage 3's parameter coordinator call `wait(params)` before it gathers `params` (current or prefetched)."""
    gather = getattr(coordinator, _COORDINATOR_GATHER)

    def gated(params: Any, forward: bool) -> None:
        wait(params)
        gather(params, forward)

    setattr(coordinator, _COORDINATOR_GATHER, gated)


def track_pending_steps(optimizer: Any) -> None:
    """`optimizer.finish_pending_steps()` runs before a `GatheredParameters` block of its parameters is entered
    (`optimizer.steps_any(ds_ids)`): the block must see them updated, and a failed step raises there. Blocks of
    other models' parameters neither wait for this optimizer nor inherit its failure."""
    _overlapped_optimizers.add(optimizer)


def _gathered_parameters_enter(self: Any) -> Any:
    gathered = {param.ds_id for param in getattr(self, "params", ())}  # none when the block is disabled
    for optimizer in list(_overlapped_optimizers):
        if optimizer.steps_any(gathered):
            optimizer.finish_pending_steps()
    return STOCK_GATHERED_ENTER(self)


def _runs_fuyou(engine: Any) -> bool:
    return getattr(engine.optimizer, "fuyou_config", None) is not None


def _save_checkpoint(
    self: Any,
    save_dir: str,
    tag: Any = None,
    client_state: Any = None,
    save_latest: bool = True,
    exclude_frozen_parameters: bool = False,
) -> Any:
    """`DeepSpeedEngine.save_checkpoint`, crash-consistent under fuyou: written as `partial_tag(tag)`, committed."""
    client_state = {} if client_state is None else client_state
    if not _runs_fuyou(self) or self.checkpoint_engine.is_decoupled():
        return STOCK_SAVE_CHECKPOINT(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters)
    tag = str(tag if tag is not None else f"global_step{self.global_steps}")
    commits = (self.local_rank if self.use_node_local_storage() else self.global_rank) == 0  # as DeepSpeed's makedirs
    if commits:
        checkpoints.remove_partial(save_dir, tag)
    deepspeed.comm.barrier()  # no rank writes into the partial directory before its leftovers are gone
    partial = checkpoints.partial_tag(tag)
    saved = STOCK_SAVE_CHECKPOINT(self, save_dir, partial, client_state, False, exclude_frozen_parameters)
    if commits:  # stock's save ends with a barrier: every rank's part is written
        checkpoints.commit(save_dir, tag, save_latest)
    deepspeed.comm.barrier()
    return saved


def _load_checkpoint(self: Any, load_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
    """`DeepSpeedEngine.load_checkpoint`, refusing under fuyou a checkpoint whose save was never completed."""
    if _runs_fuyou(self) and not self.load_universal_checkpoint():
        resolved = tag if tag is not None else checkpoints.latest_tag(load_dir)
        if resolved is not None:
            checkpoints.check_complete(load_dir, str(resolved))
    return STOCK_LOAD_CHECKPOINT(self, load_dir, tag, *args, **kwargs)


def parameter_swapper(ds_config: Any, model_dtype: Any) -> Any:
    """Factory in place of `AsyncPartitionedParameterSwapper(ds_config, model_dtype)` inside `zero.Init`."""
    config = load_fuyou_config(ds_config._param_dict)
    if config is None:
        return STOCK_PARAM_SWAPPER(ds_config, model_dtype)
    # The swappers are imported on first use: they import DeepSpeed, whose import may be what is registering us.
    from deepspeed_fuyou.integration.param_swapper import FuyouParamSwapper
    from deepspeed_fuyou.swap.runtime import SwapRuntime

    clean_up_when_stopped()
    return FuyouParamSwapper(SwapRuntime.for_config(config), model_dtype)


def zero3_optimizer(module: Any, init_optimizer: Any, param_names: Any, *args: Any, **kwargs: Any) -> Any:
    """Factory in place of `DeepSpeedZeroOptimizer_Stage3(...)` inside the engine."""
    if BLOCK not in kwargs["ds_config"]:  # FuyouZeroOptimizer validates the block itself (null is an error)
        return STOCK_STAGE3(module, init_optimizer, param_names, *args, **kwargs)
    from deepspeed_fuyou.integration.zero_optimizer import FuyouZeroOptimizer

    clean_up_when_stopped()
    return FuyouZeroOptimizer(module, init_optimizer, param_names, *args, **kwargs)


def check_deepspeed_version(version: str = deepspeed.__version__) -> None:
    low, high = SUPPORTED_DEEPSPEED
    if not low <= Version(version) < high:
        raise FuyouError(
            f"DeepSpeed {version} is outside the range deepspeed-fuyou supports ({low} <= version < {high}): "
            f"install deepspeed>={low},<{high}, or set FUYOU_DISABLE=1 to run stock DeepSpeed"
        )


def _stage3_method_source(name: str) -> str:
    """A stage-3 method's text ("" if gone): DeepSpeed's nvtx decorator hides some methods from `inspect`."""
    module = inspect.getsource(stage3)
    start = module.find(f"    def {name}(")
    return "" if start < 0 else module[start : module.find("\n    def ", start + 1)]


def read_numa_layout_once() -> None:
    """Makes DeepSpeed's CPU accelerator read the machine's NUMA layout once per process instead of at every call.

    Unless the launcher set `LOCAL_SIZE` (DeepSpeed's does; torchrun, accelerate and plain `python` do not), the CPU
    accelerator's `device_count()` runs `numactl --hardware` in a subprocess, and stage 3 asks at every gradient
    bucket: fuyou reduces one layer per bucket, and forking a training process of several GB costs more than the
    bucket's arithmetic (RESULTS.md, 2026-12-02 09:16). The layout does not change while a process runs.
    """
    if not hasattr(numa.get_numa_cores, "cache_info"):
        numa.get_numa_cores = functools.cache(numa.get_numa_cores)


def check_deepspeed_internals() -> None:
    """Raises FuyouError naming the first DeepSpeed internal that no longer looks as this module expects."""
    expectations = {
        "zero.Init builds its swapper by the module-global name": "AsyncPartitionedParameterSwapper("
        in inspect.getsource(partition_parameters.Init.__init__),
        "the engine imports stage 3 at call time": (
            "from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3"
        )
        in inspect.getsource(DeepSpeedEngine._configure_zero_optimizer),
        "stage 3 builds its optimizer swapper in _configure_tensor_swapping": "self._configure_tensor_swapping("
        in inspect.getsource(STOCK_STAGE3.__init__),
        "stage 3 pins NVMe parameters in CPU memory through max_params_in_cpu": "self.max_params_in_cpu"
        in inspect.getsource(STOCK_STAGE3._create_param_groups_fp16_flat_cpu_memory),
        "load_checkpoint restores NVMe optimizer state through reset_swap_buffers": "reset_swap_buffers()"
        in inspect.getsource(STOCK_LOAD_CHECKPOINT),
        "save_checkpoint copies optimizer_swapper.swap_folder": "optimizer_swapper.swap_folder"
        in inspect.getsource(STOCK_SAVE_CHECKPOINT),
        "save_checkpoint ends with a barrier": inspect.getsource(STOCK_SAVE_CHECKPOINT)
        .rstrip()
        .endswith("dist.barrier()\n\n        return True"),
    }
    for method, stock in (("save_checkpoint", STOCK_SAVE_CHECKPOINT), ("load_checkpoint", STOCK_LOAD_CHECKPOINT)):
        names = CHECKPOINT_ARGUMENTS[method]
        parameters = list(inspect.signature(stock).parameters)
        expectations[f"DeepSpeedEngine.{method} takes {', '.join(names[1:])} first"] = parameters[: len(names)] == names
    setup = _stage3_method_source("_setup_for_real_optimizer")
    steps = [setup.find(call) for call in SETUP_FOR_REAL_OPTIMIZER]
    expectations["stage 3's _setup_for_real_optimizer makes the calls FuyouZeroOptimizer repeats, in order"] = (
        -1 not in steps and steps == sorted(steps)
    )
    partition_grads = _stage3_method_source("partition_grads")
    for name in ("_offload_grad_partition_at_boundary(", "_swap_out_offload_fp32_gradients(", "micro_step_id == 0"):
        expectations[f"stage 3's partition_grads uses {name}"] = name in partition_grads
    step = _stage3_method_source("step")
    calls = [step.find(call) for call in STOCK_STEP]
    expectations["stage 3's step makes the calls FuyouZeroOptimizer's overlapped step repeats, in order"] = (
        -1 not in calls and calls == sorted(calls)
    )
    expectations["stage 3's _post_step gathers self.persistent_parameters"] = (
        "self.persistent_parameters[0].all_gather(" in _stage3_method_source("_post_step")
    )
    expectations["the CPU accelerator reads the NUMA layout through deepspeed.utils.numa.get_numa_cores"] = callable(
        getattr(numa, "get_numa_cores", None)
    )
    coordinator = inspect.getsource(partitioned_param_coordinator.PartitionedParameterCoordinator)
    expectations["the parameter coordinator gathers through __all_gather_params"] = (
        coordinator.count("self.__all_gather_params(") >= 2
    )
    for method in (
        "checkpoint_event_prologue",
        "checkpoint_event_epilogue",
        "reset_swap_buffers",
        "_configure_offloading",
        "_partitioned_params_swap_out",
        "backward_prologue",
        "backward_epilogue",
        "get_full_hp_param",
        "set_full_hp_param",
        "get_local_fp32_param",
        "set_local_hp_param",
        "get_fp32_grad_for_param",
        "set_fp32_grad_for_param",
        "get_local_fp32_grad_for_param",
        "set_local_grad_for_param",
        "state_dict",
        "load_state_dict",
        "destroy",
    ):
        expectations[f"stage 3 has {method}"] = hasattr(STOCK_STAGE3, method)
    for method in (
        "swappable_tensor",
        "get_buffer",
        "swap_out_and_release",
        "swap_in",
        "synchronize_reads",
        "available_swap_in_buffers",
        "remove_partition_and_release_buffers",
        "swap_into_buffer",
        "reserve_partitioned_swap_space",
        "swap_out_partitioned_params",
    ):
        expectations[f"the parameter swapper interface has {method}"] = hasattr(STOCK_PARAM_SWAPPER, method)
    for name, holds in expectations.items():
        if not holds:
            raise FuyouError(f"DeepSpeed {deepspeed.__version__} changed: expected that {name}")


REPLACED: tuple[tuple[Any, str, Any, Any], ...] = (
    (partition_parameters, "AsyncPartitionedParameterSwapper", STOCK_PARAM_SWAPPER, parameter_swapper),
    (stage3, "DeepSpeedZeroOptimizer_Stage3", STOCK_STAGE3, zero3_optimizer),
    (partition_parameters.GatheredParameters, "__enter__", STOCK_GATHERED_ENTER, _gathered_parameters_enter),
    (DeepSpeedEngine, "save_checkpoint", STOCK_SAVE_CHECKPOINT, _save_checkpoint),
    (DeepSpeedEngine, "load_checkpoint", STOCK_LOAD_CHECKPOINT, _load_checkpoint),
)
"""Every DeepSpeed name fuyou replaces: (where it lives, its name, DeepSpeed's own, ours)."""


def register() -> None:
    """Installs every replacement (idempotent). Raises FuyouError on a DeepSpeed this version does not support."""
    check_deepspeed_version()
    for owner, name, _, ours in REPLACED:
        setattr(owner, name, ours)


def unregister() -> None:
    """Puts DeepSpeed's own back (for tests that compare against stock in one process)."""
    for owner, name, stock, _ in REPLACED:
        setattr(owner, name, stock)


def is_registered() -> bool:
    return stage3.DeepSpeedZeroOptimizer_Stage3 is zero3_optimizer


def initialize(*args: Any, **kwargs: Any) -> Any:
    """Drop-in for `deepspeed.initialize`: registers fuyou, then calls it with the same arguments."""
    register()
    return deepspeed.initialize(*args, **kwargs)
