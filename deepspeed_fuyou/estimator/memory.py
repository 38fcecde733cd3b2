"""Where each byte of a training step lives, per rank: accelerator, pinned host, pageable host and SSD.

Two plans for the same model and config: stock ZeRO-Infinity (DeepSpeed's own swappers and buffers) and fuyou (our
swappers, everything staged through the one pinned budget). Each device gets a `Breakdown` by what the bytes hold.
The stock plan follows DeepSpeed 0.19's allocations (module `stage3.py`, `partitioned_param_swapper.py`,
`optimizer_utils.py`); the fuyou plan follows ours (`swap/`).

`gpu` is the accelerator, whatever DeepSpeed's accelerator is: on the CPU accelerator it is host memory too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from deepspeed_fuyou.config.fuyou import FuyouConfig
from deepspeed_fuyou.estimator.activations import SavedTensors
from deepspeed_fuyou.estimator.zero_layout import TrainingSetup, ZeroLayout, aligned
from deepspeed_fuyou.io.engine import ALIGNMENT
from deepspeed_fuyou.swap.sizing import PREFETCH_SHARE, sub_group_buffer_numel

FP32 = 4
COMPONENTS = ("parameters", "gradients", "optimizer_states", "activations", "buffers", "temporaries", "overhead")
DEVICES = ("gpu", "pinned_host", "pageable_host", "ssd")


@dataclass
class Breakdown:
    """Peak bytes on one device, by what they hold."""

    parameters: int = 0
    gradients: int = 0
    optimizer_states: int = 0
    activations: int = 0
    buffers: int = 0  # staging and swap buffers, reduce buckets
    temporaries: int = 0  # short-lived copies around the peak (gradients of the largest activation, init copies)
    overhead: int = 0  # the runtime itself

    @property
    def total(self) -> int:
        return sum(asdict(self).values())


@dataclass(frozen=True)
class ModelFacts:
    """What the fake model tells the plans: parameter sizes, the largest layer, and what forward saves."""

    numels: tuple[int, ...]
    layer_numel: int
    saved: SavedTensors


@dataclass
class Plan:
    """One way of running the step (stock or fuyou) and its bytes on every device."""

    name: str
    gpu: Breakdown = field(default_factory=Breakdown)
    pinned_host: Breakdown = field(default_factory=Breakdown)
    pageable_host: Breakdown = field(default_factory=Breakdown)
    ssd: Breakdown = field(default_factory=Breakdown)
    ssd_per_path: dict[str, int] = field(default_factory=dict)

    def device(self, name: str) -> Breakdown:
        return getattr(self, name)


def stock_window(zero) -> dict[str, int]:
    """Stage 3's gather and reduce limits as the DeepSpeed config sets them (fuyou replaces them, see swap.sizing)."""
    return {"max_live_parameters": zero.max_live_parameters, "reduce_bucket_size": zero.reduce_bucket_size}


def gathered_numel(numels: Sequence[int], layer: int, max_live: int, persistence_threshold: int) -> int:
    """Elements stage 3 keeps gathered on the accelerator at most: persistent (small) parameters for good, and
    the others up to `max_live_parameters`, never less than the largest layer it must compute with."""
    persistent = sum(n for n in numels if n <= persistence_threshold)
    return persistent + min(sum(numels) - persistent, max(max_live, layer))


def _accelerator(plan: Plan, layout: ZeroLayout, setup: TrainingSetup, facts: ModelFacts, window: dict) -> None:
    """What both plans hold on the accelerator: gathered parameters, the reduce bucket, activations."""
    zero = setup.zero
    plan.gpu.parameters = setup.itemsize * gathered_numel(
        facts.numels, facts.layer_numel, window["max_live_parameters"], zero.param_persistence_threshold
    )
    if _device(zero.offload_param) == "none":
        plan.gpu.parameters += layout.partition_total * setup.itemsize
    if zero.contiguous_gradients:
        bucket = window["reduce_bucket_size"]
        if setup.cpu_accelerator:  # pages of the bucket are resident once a gradient is written there, not before
            bucket = min(bucket, sum(facts.numels))
        plan.gpu.buffers = bucket * setup.itemsize
    plan.gpu.activations = facts.saved.nbytes
    # Backward of the operator that saved the largest tensor holds its input and output gradients at once.
    plan.gpu.temporaries = 2 * facts.saved.largest
    if _device(zero.offload_optimizer) == "none":
        plan.gpu.gradients = layout.partition_total * setup.grad_accum_dtype.itemsize
        master = 0 if setup.itemsize == FP32 else layout.partition_total * FP32
        plan.gpu.optimizer_states = master + setup.optimizer_states * layout.partition_total * FP32


def _host_gradient_buffer(plan: Plan, layout: ZeroLayout, setup: TrainingSetup) -> None:
    """Stage 3's `grad_partitions_flat_buffer`: every gradient partition, on the host if the optimizer is offloaded."""
    zero = setup.zero
    if _device(zero.offload_optimizer) != "none":
        host = plan.pinned_host if zero.offload_optimizer.pin_memory else plan.pageable_host
        host.gradients = layout.partition_total * setup.grad_accum_dtype.itemsize


def _device(offload) -> str:
    return "none" if offload is None else str(getattr(offload.device, "value", offload.device))


def stock_plan(layout: ZeroLayout, setup: TrainingSetup, facts: ModelFacts) -> Plan:
    """DeepSpeed's own ZeRO-3 / ZeRO-Infinity with this config."""
    zero = setup.zero
    plan = Plan("stock")
    _accelerator(plan, layout, setup, facts, stock_window(zero))
    _host_gradient_buffer(plan, layout, setup)
    lp, alignment = setup.itemsize, setup.aio_alignment_bytes

    param_device = _device(zero.offload_param)
    if param_device == "cpu":
        host = plan.pinned_host if zero.offload_param.pin_memory else plan.pageable_host
        host.parameters = layout.partition_total * lp
    elif param_device == "nvme":
        swap = zero.offload_param
        plan.pinned_host.buffers += swap.buffer_count * aligned(int(swap.buffer_size) * lp, alignment)
        in_cpu = min(layout.partition_total, int(swap.max_in_cpu))  # stage 3 keeps these in a pinned copy
        plan.pinned_host.parameters = in_cpu * lp
        if in_cpu < layout.partition_total:  # the write-back buffer of `reserve_partitioned_swap_space`
            plan.pinned_host.buffers += layout.largest_sub_group_full * lp
        files = [aligned(n * lp, alignment) for n in layout.partitions if n * lp >= alignment]
        plan.ssd.parameters = sum(files)
        _on_path(plan, str(swap.nvme_path), plan.ssd.parameters)

    optimizer_device = _device(zero.offload_optimizer)
    states = setup.optimizer_states * layout.partition_total * FP32
    if optimizer_device == "cpu":
        plan.pageable_host.optimizer_states = layout.partition_total * FP32 + states
    elif optimizer_device == "nvme":
        swap = zero.offload_optimizer
        largest = max(layout.sub_group_numels)
        plan.pinned_host.buffers += swap.buffer_count * aligned(largest * FP32, alignment)
        per_tensor = sum(aligned(n * FP32, alignment) for n in layout.sub_group_numels)
        plan.ssd.optimizer_states = (1 + setup.optimizer_states) * per_tensor
        plan.ssd.gradients = per_tensor
        # initialize_optimizer_states zero-fills a gradient buffer of the largest sub-group's full size.
        plan.pageable_host.temporaries = layout.largest_sub_group_full * FP32
        _on_path(plan, str(swap.nvme_path), plan.ssd.optimizer_states + plan.ssd.gradients)
    return plan


def fuyou_swap_files(layout: ZeroLayout, itemsize: int, optimizer_states: int) -> dict[str, list[int]]:
    """Bytes of each file our swappers write, by what it holds: a file per parameter partition of at least a page
    (smaller ones stay in memory), and per sub-group one for the master weights, one per optimizer state and one
    for the gradients."""
    per_sub_group = [n * FP32 for n in layout.sub_group_numels if n * FP32 >= ALIGNMENT]
    return {
        "parameters": [n * itemsize for n in layout.partitions if n * itemsize >= ALIGNMENT],
        "optimizer_states": (1 + optimizer_states) * per_sub_group,
        "gradients": per_sub_group,
    }


def fuyou_plan(
    layout: ZeroLayout, setup: TrainingSetup, facts: ModelFacts, window: dict, nvme_paths: Sequence[str]
) -> Plan:
    """Our swappers: parameters and optimizer on the SSD, every staging buffer drawn from the pinned budget."""
    assert setup.fuyou is not None
    plan = Plan("fuyou")
    _accelerator(plan, layout, setup, facts, window)
    if _device(setup.zero.offload_optimizer) != "nvme":  # on NVMe, gradients stream to their sub-group files
        _host_gradient_buffer(plan, layout, setup)
    plan.pinned_host.buffers = pinned_pool_peak(layout, setup, facts, window)
    for component, files in fuyou_swap_files(layout, setup.itemsize, setup.optimizer_states).items():
        for nbytes in files:
            _stripe(plan, component, nbytes, setup.fuyou.io.block_size, nvme_paths)
    # Stage 3 builds each sub-group's fp32 master in a plain tensor before the swapper writes it out.
    plan.pageable_host.temporaries = max(layout.sub_group_numels) * FP32
    _activation_offload(plan, setup.fuyou, facts, nvme_paths)
    return plan


def _stripe(plan: Plan, component: str, nbytes: int, block: int, nvme_paths: Sequence[str]) -> None:
    """Adds a file of `nbytes` striped over `nvme_paths` in `block` pieces to the SSD breakdown and each path."""
    for path, member in zip(nvme_paths, striped_member_bytes(nbytes, block, len(nvme_paths)), strict=True):
        setattr(plan.ssd, component, getattr(plan.ssd, component) + member)
        _on_path(plan, path, member)


def _activation_offload(plan: Plan, fuyou: FuyouConfig, facts: ModelFacts, nvme_paths: Sequence[str]) -> None:
    """With `fuyou.activations` on, what forward saves leaves the device for host memory or the SSD files."""
    options = fuyou.activations
    if options.offload == "off":
        return
    plan.gpu.activations = facts.saved.resident_with_offload(options)
    moved = facts.saved.offloaded(options)
    if options.tier == "cpu":
        plan.pageable_host.activations = moved
    else:  # one file per forward pass, striped like the swap files
        _stripe(plan, "activations", moved, fuyou.io.block_size, nvme_paths)


def pinned_pool_peak(layout: ZeroLayout, setup: TrainingSetup, facts: ModelFacts, window: dict) -> int:
    """What our pool reserves at most: the larger of its two busiest phases, never more than the budget.

    Forward/backward: the partitions of the gathered window (reads in flight may hold up to `PREFETCH_SHARE` of the
    budget) and the staging of one layer's gradients on their way to the SSD. Optimizer step, at its peak (the new
    low-precision parameters of sub-group i being staged): sub-group i+1 read ahead and i stepped, each with master,
    states and gradient in fp32, i-1 written back (master and states), all in buffers sized by
    `sub_group_buffer_numel`, and the parameter staging of i and i-1 (the swapper finishes i-2's writes before it
    reads i+1); the step's first reads are sized while the last layer's gradient writes may still hold their staging.
    """
    budget = setup.fuyou.pinned_memory
    window_bytes = window["max_live_parameters"] * setup.itemsize
    forward_backward = min(int(budget * PREFETCH_SHARE), window_bytes) + facts.layer_numel * FP32
    largest = max(layout.sub_group_numels, default=0)
    in_flight = sorted(layout.sub_group_numels, reverse=True)[:3]
    tensors = (2 + setup.optimizer_states, 2 + setup.optimizer_states, 1 + setup.optimizer_states)
    step = sum(
        aligned(sub_group_buffer_numel(n, largest) * FP32, ALIGNMENT) * count
        for n, count in zip(in_flight, tensors, strict=False)
    )
    step += sum(n * setup.itemsize for n in in_flight[:2])
    step += facts.layer_numel * FP32
    return min(budget, max(forward_backward, step))


def striped_member_bytes(nbytes: int, stripe: int, paths: int) -> list[int]:
    """Disk bytes each path holds of one file striped in `stripe`-sized pieces, rounded to filesystem blocks."""
    full, tail = divmod(nbytes, stripe)
    members = [(full // paths + (1 if k < full % paths else 0)) * stripe for k in range(paths)]
    members[full % paths] += tail
    return [aligned(m, ALIGNMENT) for m in members]


def _on_path(plan: Plan, path: str, nbytes: int) -> None:
    plan.ssd_per_path[path] = plan.ssd_per_path.get(path, 0) + nbytes
