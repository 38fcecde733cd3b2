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
from deepspeed_fuyou.io.engine import checksum_table_bytes
from deepspeed_fuyou.plan.host_tier import HostTier
from deepspeed_fuyou.plan.sizing import (
    PoolBudgets,
    ReadAheadPlan,
    aligned,
    forward_backward_need,
    pool_budgets,
    read_ahead_plan,
    step_slot,
    window_peak,
)
from deepspeed_fuyou.plan.zero_layout import FP32, TrainingSetup, ZeroLayout

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
    # fuyou: bytes of each kind its swap files hold (unrounded); of "persistent_parameters", the parameter files
    # of partitions stage 3 keeps gathered between uses (it reads them once a step, not in every backward); and of
    # "parameters_in_masters", the partitions read from their sub-group's master file (fp32 training); of
    # "read_ahead_gradients" and "read_ahead_states", the gradients and the master and states of the sub-groups
    # `optimizer.read_ahead` carries across the end of backward, and "written_behind_states", the states it carries
    # across the end of the step
    swapped: dict[str, int] = field(default_factory=dict)
    # fuyou: what a checkpoint save writes on the first SSD path besides the swap files (master and optimizer states
    # of every sub-group, whichever tier holds them), before DeepSpeed copies it into the checkpoint
    checkpoint_export: int = 0
    # fuyou: pinned bytes of the `optimizer.read_ahead` pool's buffers at its peak (part of `pinned_host.buffers`)
    read_ahead_pool: int = 0

    def device(self, name: str) -> Breakdown:
        return getattr(self, name)


def stock_window(zero) -> dict[str, int]:
    """Stage 3's gather, prefetch and reduce limits as the DeepSpeed config sets them (explicitly or by default),
    under `plan.sizing.prefetch_window`'s names: fuyou replaces those the config leaves unset, so every knob has a
    value either way."""
    return {
        "prefetch_bucket_size": zero.prefetch_bucket_size,
        "max_live_parameters": zero.max_live_parameters,
        "max_reuse_distance": zero.max_reuse_distance,
        "reduce_bucket_size": zero.reduce_bucket_size,
    }


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


def fuyou_plan(
    layout: ZeroLayout,
    setup: TrainingSetup,
    facts: ModelFacts,
    window: dict,
    nvme_paths: Sequence[str],
    host_tier_budget: int = 0,
) -> Plan:
    """Our swappers: parameters and optimizer on the SSD, every staging buffer drawn from the pinned budget, except
    the files the DRAM tier holds (`host_tier_budget`, placed as training places them: `place_in_host_tier`)."""
    assert setup.fuyou is not None
    plan = Plan("fuyou")
    _accelerator(plan, layout, setup, facts, window)
    if _device(setup.zero.offload_optimizer) != "nvme":  # on NVMe, gradients stream to their sub-group files
        _host_gradient_buffer(plan, layout, setup)
    files = layout.swap_files(setup.itemsize, setup.optimizer_states)
    if setup.overlap == "backward" and setup.gradient_accumulation_steps == 1:
        files["gradients"] = []  # kept in pinned memory from backward to their step, never written
    placed = place_in_host_tier(files, setup.optimizer_states, host_tier_budget)
    need = forward_backward_need(window, setup.itemsize)
    budgets = pool_budgets(setup.fuyou, setup.overlap, need)
    carried, ahead = read_ahead(layout, setup, files, placed, budgets.read_ahead)
    plan.swapped.update(carried)
    plan.read_ahead_pool = ahead.pool_bytes
    step_pool_sub_groups = len(layout.sub_group_numels) - len(ahead.read_states)
    pools = pinned_pool_peak(layout, setup, facts, window, budgets, step_pool_sub_groups, len(ahead.read_early))
    plan.pinned_host.buffers = pools + plan.read_ahead_pool
    plan.checkpoint_export = sum(files["optimizer_states"])
    for component, in_host in placed.items():
        for nbytes, here in zip(files[component], in_host, strict=True):
            if here:
                setattr(plan.pageable_host, component, getattr(plan.pageable_host, component) + nbytes)
            else:
                _stripe(plan, component, nbytes, setup.fuyou.io.block_size, nvme_paths)
                plan.swapped[component] = plan.swapped.get(component, 0) + nbytes
    threshold = setup.zero.param_persistence_threshold
    for (full, nbytes), here in zip(layout.parameter_files(setup.itemsize), placed["parameters"], strict=True):
        if full <= threshold and not here:
            plan.swapped["persistent_parameters"] = plan.swapped.get("persistent_parameters", 0) + nbytes
    if setup.itemsize == FP32:
        plan.swapped["parameters_in_masters"] = _parameters_in_masters(layout, placed)
    # Released partitions stay in the window's pool up to its peak (`FuyouParamSwapper._keep`): the next pass over
    # the layers, which runs the other way, finds its first ones in memory.
    kept = window_peak(need, budgets.forward_backward)
    plan.swapped["kept_parameters"] = min(plan.swapped.get("parameters", 0), kept)
    # Stage 3 builds each sub-group's fp32 master in a plain tensor before the swapper writes it out.
    plan.pageable_host.temporaries = max(layout.sub_group_numels) * FP32
    _activation_offload(plan, setup.fuyou, facts, nvme_paths)
    if setup.fuyou.io.verify:  # the engine's checksums of every swap file it writes
        plan.pageable_host.buffers += checksum_table_bytes(plan.ssd.total)
    return plan


def read_ahead(
    layout: ZeroLayout, setup: TrainingSetup, files: dict[str, list[int]], placed: dict[str, list[bool]], budget: int
) -> tuple[dict[str, int], ReadAheadPlan]:
    """What `optimizer.read_ahead` (a pool of `budget` bytes) carries, as training chooses it
    (`FuyouOptimizerSwapper.plan_read_ahead`): bytes of gradients kept from their files ("read_ahead_gradients"), of
    master and states read during backward ("read_ahead_states") and of states written during the next backward
    ("written_behind_states"); of master and states the step pool reads during backward ("early_read_states",
    none in the overlap mode "backward", whose steps run during backward); and the plan itself."""
    assert setup.fuyou is not None
    numels = layout.swapped_sub_group_numels
    gradient_files = [not here for here in placed["gradients"]] if files["gradients"] else [False] * len(numels)
    plan = read_ahead_plan(
        numels,
        FP32,
        setup.optimizer_states,
        gradient_files,
        [not here for here in placed["optimizer_states"][: len(numels)]],
        budget,
    )
    if setup.overlap == "backward":  # its steps run during backward, where the step pool reads nothing early
        plan = plan._replace(read_early=[])
    carried = {
        "read_ahead_gradients": sum(numels[i] * FP32 for i in plan.kept_gradients),
        "read_ahead_states": sum(numels[i] * FP32 * (1 + plan.states) for i in plan.read_states),
        "written_behind_states": sum(numels[i] * FP32 * plan.states for i in plan.written_behind),
        "early_read_states": sum(numels[i] * FP32 * (1 + plan.states) for i in plan.read_early),
    }
    return carried, plan


def _parameters_in_masters(layout: ZeroLayout, placed: dict[str, list[bool]]) -> int:
    """Bytes of fp32 parameter partitions on the SSD that are stored in their sub-group's master file on the SSD
    (`FuyouZeroOptimizer._store_partitions_in_masters`): the step writes them once, with the master."""
    has_file = layout.partitions_with_files(FP32)
    partition_on_ssd = iter([not here for here in placed["parameters"]])
    on_ssd = [has and next(partition_on_ssd) for has in has_file]
    swappable = layout.sub_groups_with_files
    master_on_ssd = iter([not here for here in placed["optimizer_states"]])
    total = 0
    for group, swapped in zip(layout.groups, swappable, strict=True):
        if swapped and next(master_on_ssd):
            total += sum(layout.partitions[i] * FP32 for i in group if on_ssd[i])
    return total


def place_in_host_tier(files: dict[str, list[int]], optimizer_states: int, budget: int) -> dict[str, list[bool]]:
    """Which of `ZeroLayout.swap_files` the DRAM tier holds: reserved in the order training reserves them (`HostTier`):
    parameters, then gradients, then each sub-group's master and states together."""
    tier = HostTier(budget)
    placed = {
        "parameters": [tier.reserve(n) for n in files["parameters"]],
        "gradients": [tier.reserve(n) for n in files["gradients"]],
    }
    masters = files["optimizer_states"][: len(files["optimizer_states"]) // (1 + optimizer_states)]
    whole = [tier.reserve(n * (1 + optimizer_states)) for n in masters]
    placed["optimizer_states"] = whole * (1 + optimizer_states)
    return placed


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


def pinned_pool_peak(
    layout: ZeroLayout,
    setup: TrainingSetup,
    facts: ModelFacts,
    window: dict,
    budgets: PoolBudgets,
    step_pool_sub_groups: int,
    early_reads: int,
) -> int:
    """What our forward/backward and step pools (`SwapRuntime`, of `budgets`) reserve at most: each its peak, never
    more than its budget (the read-ahead pool is `read_ahead`'s).

    Forward/backward pool: `sizing.window_peak`, what the window needs (`sizing.forward_backward_need`) with the
    headroom `sizing.AUTO_WINDOW_HEADROOM` (stage 3's NVMe prefetch counts the elements of its gathers in flight, not
    the bytes the pool holds, and holds more than the need: the headroom is what "auto" leaves it), which the
    partitions the parameter swapper keeps after their release fill up to. Step pool,
    in slots of the largest sub-group's fp32 tensor (`SwapRuntime.step_slot_bytes`), at its peak: sub-group i+1 read
    ahead and i stepped, each with master, states and gradient, i-1 written back (master and states), and the new
    low-precision parameters of i and i-1 being written (a slot each, none in fp32, where they are written from the
    master's slot). With `optimizer.overlap` "backward" no gradient is read ahead, but two are held in memory (the
    one backward is producing, one waiting for the step thread); with "forward" the updated parameters of a
    sub-group wait for the next forward to take them, which may keep two more slots alive. Only the
    `step_pool_sub_groups` sub-groups that `optimizer.read_ahead` does not read ahead take these slots: the others
    are stepped in read-ahead memory. In backward, when no step runs, the step pool stages one layer's gradients on
    their way to the SSD instead (none with "backward", which keeps them) beside the master and states of the
    `early_reads` sub-groups it reads early (`sizing.STEP_POOL_EARLY_READS`), and before the first step the
    optimizer writes each sub-group's initial master through it.
    """
    sub_groups = len(layout.sub_group_numels)
    slot = step_slot(layout.sub_group_numels, FP32)
    states = setup.optimizer_states
    backward = setup.overlap == "backward"
    roles = [2 + states, 1 + states + (0 if backward else 1), 1 + states]  # stepped, read ahead, written back
    slots = sum(roles[:step_pool_sub_groups])
    if setup.itemsize != FP32:
        slots += min(2, sub_groups)
    if setup.overlap != "off":  # held gradients ("backward") or updated parameters waiting to be taken ("forward")
        slots += min(2, sub_groups - 1)
    step = max(slots * slot, aligned(max(layout.sub_group_numels) * FP32))
    if not backward:  # in backward, with no step running, a layer's gradients on their way to the SSD
        step = max(step, facts.layer_numel * FP32 + early_reads * (1 + states) * slot)
    forward_backward = window_peak(forward_backward_need(window, setup.itemsize), budgets.forward_backward)
    return forward_backward + min(budgets.step, step)


def striped_member_bytes(nbytes: int, stripe: int, paths: int) -> list[int]:
    """Disk bytes each path holds of one file striped in `stripe`-sized pieces, rounded to filesystem blocks."""
    full, tail = divmod(nbytes, stripe)
    members = [(full // paths + (1 if k < full % paths else 0)) * stripe for k in range(paths)]
    members[full % paths] += tail
    return [aligned(m) for m in members]


def _on_path(plan: Plan, path: str, nbytes: int) -> None:
    plan.ssd_per_path[path] = plan.ssd_per_path.get(path, 0) + nbytes
