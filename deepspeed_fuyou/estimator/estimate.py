"""The estimate of one training setup: both plans, the machine's limits, and a verdict with what to change.

`estimate(model, ds_config, seq_len=...)` builds the model on fake tensors, traces one forward for its activations,
lays out ZeRO-3 for the world size, and prices stock ZeRO-Infinity and fuyou side by side. The plan the config
selects (fuyou when it has a `"fuyou"` block) is judged against the machine: each device's peak against its memory
less `estimator.margin`, each SSD path's bytes against its free space. When something does not fit, the
suggestions name the cheapest change that does, computed from the same model (activations scale with the
micro-batch, so the largest micro-batch that fits is exact to one sequence).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from deepspeed_fuyou.config.fuyou import MIN_PINNED_MEMORY, EstimatorOptions
from deepspeed_fuyou.config.sizes import format_size
from deepspeed_fuyou.estimator.memory import DEVICES, ModelFacts, Plan, fuyou_plan, stock_plan, stock_window
from deepspeed_fuyou.estimator.model import FakeModel, ModelSpec, build_fake_model, load_model_config
from deepspeed_fuyou.estimator.rates import MachineRates, compute_rates, ssd_rates
from deepspeed_fuyou.estimator.step_time import StepShape, StepTime, model_step_time
from deepspeed_fuyou.plan.layers import repeated_layers
from deepspeed_fuyou.plan.preflight import machine_problems
from deepspeed_fuyou.plan.sizing import layer_numel, stage3_overrides, window_as_zero_config
from deepspeed_fuyou.plan.zero_layout import TrainingSetup, ZeroLayout

RUNTIME_OVERHEAD_HOST = 400 << 20
"""Pageable host memory of the training process before any model state: Python, torch, DeepSpeed, transformers
and the collective backend (measured on the CPU accelerator, see benchmarks/RESULTS.md, with fuyou's host cache
serving the large tensors, so that none of glibc's heap slack below is in it)."""

GLIBC_HEAP_SLACK = 112 << 20
"""What glibc's heap holds free at the peak where it serves the large tensors (stock DeepSpeed, or fuyou with
`host_cache: false`): freed blocks that small allocations between them keep from being reused or returned. It grows
with the model (a 32-layer model's backward left 1.2 GiB free on the CPU accelerator); this is the least measured,
on the main job's models (benchmarks/RESULTS.md)."""


@dataclass(frozen=True)
class Machine:
    """The limits the verdict uses. `gpu_memory` None: the accelerator is the host (DeepSpeed's CPU accelerator)."""

    gpu_memory: int | None
    host_memory: int
    margin: float = 0.05

    @classmethod
    def detect(cls, options: EstimatorOptions | None = None) -> Machine:
        """This machine, with what `fuyou.estimator` states explicitly taking precedence."""
        options = options or EstimatorOptions()
        gpu = options.gpu_memory
        if gpu is None and torch.cuda.is_available():
            gpu = torch.cuda.get_device_properties(0).total_memory
        return cls(gpu, options.host_memory_bytes, options.margin)

    @property
    def accelerator_is_host(self) -> bool:
        return self.gpu_memory is None

    def usable(self, nbytes: int) -> int:
        return int(nbytes * (1 - self.margin))


@dataclass
class Estimate:
    """Both plans, the one the config selects, and whether (and how) it fits the machine."""

    inputs: dict[str, Any]
    stock: Plan
    fuyou: Plan | None
    machine: Machine
    problems: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    exceeded: dict[str, int] = field(default_factory=dict)  # "accelerator" / "host" / "ssd" -> bytes over
    step_time: StepTime | None = None  # fuyou's modelled step, when the machine's rates were given

    @property
    def chosen(self) -> Plan:
        return self.fuyou or self.stock

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The `fuyou estimate --json` object: the chosen plan's peaks at top level, both plans in `plans`."""
        return {
            **_plan_json(self.chosen),
            "plan": self.chosen.name,
            "fits": self.fits,
            "problems": self.problems,
            "suggestions": self.suggestions,
            "inputs": self.inputs,
            "machine": asdict(self.machine),
            "plans": {plan.name: _plan_json(plan) for plan in (self.stock, self.fuyou) if plan is not None},
            "step_time": self.step_time.to_json() if self.step_time is not None else None,
        }


def _plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "gpu_peak_bytes": plan.gpu.total,
        "pinned_host_peak_bytes": plan.pinned_host.total,
        "pageable_host_peak_bytes": plan.pageable_host.total,
        "ssd_bytes": plan.ssd.total,
        "ssd_bytes_per_path": dict(plan.ssd_per_path),
        "checkpoint_export_bytes": plan.checkpoint_export,
        "kept_parameter_bytes": plan.swapped.get("kept_parameters", 0),
        "placement": placement(plan),
        "read_ahead_bytes": {
            "gradients": plan.swapped.get("read_ahead_gradients", 0),
            "optimizer_states": plan.swapped.get("read_ahead_states", 0),
            "written_behind": plan.swapped.get("written_behind_states", 0),
            "step_pool_early": plan.swapped.get("early_read_states", 0),
            "pinned_pool": plan.read_ahead_pool,
        },
        "breakdown": {device: asdict(plan.device(device)) for device in DEVICES},
    }


PLACED = ("parameters", "gradients", "optimizer_states")


def placement(plan: Plan) -> dict[str, dict[str, int]]:
    """Bytes of each kind of model state per tier: "dram" (fuyou's DRAM tier, or stock's host copies) and "ssd"."""
    host = (plan.pageable_host, plan.pinned_host)
    return {kind: {"dram": sum(getattr(h, kind) for h in host), "ssd": getattr(plan.ssd, kind)} for kind in PLACED}


def estimate(
    model: ModelSpec,
    ds_config: Mapping[str, Any],
    seq_len: int,
    micro_batch: int | None = None,
    world_size: int = 1,
    machine: Machine | None = None,
    rates: RatesSource | None = None,
) -> Estimate:
    """Prices one training step of `model` under `ds_config` per rank; nothing real is allocated.

    `model` may also be a `FakeModel` already built (`auto_configure` estimates one model many times). With
    `rates` (what gives this machine's measured rates for the setup, e.g. `measured_rates`), fuyou's step time is
    modelled too (`step_time`).
    """
    setup = TrainingSetup.from_ds_config(ds_config, seq_len, micro_batch, world_size)
    machine = machine or Machine.detect(setup.fuyou.estimator if setup.fuyou else None)
    setup = replace(setup, cpu_accelerator=machine.accelerator_is_host)
    if isinstance(model, FakeModel):
        fake = model if model.dtype == setup.dtype else build_fake_model(model.module.config, setup.dtype)
    else:
        fake = build_fake_model(load_model_config(model), setup.dtype)
    facts = ModelFacts(
        numels=tuple(p.numel for p in fake.params),
        layer_numel=layer_numel(fake.module),
        saved=fake.saved_tensors(setup.micro_batch, seq_len),
    )
    zero = setup.zero
    stock = stock_plan(ZeroLayout.build(facts.numels, world_size, zero.sub_group_size), setup, facts)
    plan = None
    if setup.fuyou is not None:
        window = stock_window(zero) | stage3_overrides(fake.module, setup.fuyou, ds_config, zero.sub_group_size)
        layout = ZeroLayout.build(facts.numels, world_size, window["sub_group_size"])
        tier = setup.fuyou.placement.budget(setup.fuyou.pinned_memory, available=machine.host_memory)
        plan = fuyou_plan(layout, setup, facts, window, [str(p) for p in setup.fuyou.nvme_paths], tier)
    stock.pageable_host.overhead = RUNTIME_OVERHEAD_HOST + GLIBC_HEAP_SLACK
    if plan is not None:
        plan.pageable_host.overhead = RUNTIME_OVERHEAD_HOST + (0 if setup.fuyou.host_cache else GLIBC_HEAP_SLACK)
    result = Estimate(
        inputs={
            "model": str(model) if isinstance(model, str | os.PathLike) else fake.name,
            "parameters": sum(facts.numels),
            "micro_batch": setup.micro_batch,
            "seq_len": seq_len,
            "world_size": world_size,
            "dtype": str(setup.dtype).removeprefix("torch."),
        },
        stock=stock,
        fuyou=plan,
        machine=machine,
    )
    _judge(result, setup, _offload_saving(setup, facts))
    if plan is not None and rates is not None:
        shape = StepShape(
            parameters=plan.swapped.get("parameters", 0),
            parameters_in_masters=plan.swapped.get("parameters_in_masters", 0),
            gradients=plan.swapped.get("gradients", 0),
            optimizer_states=plan.swapped.get("optimizer_states", 0),
            retained=plan.swapped.get("persistent_parameters", 0)
            + max(  # this rank's partitions of the gathered window, or those kept after their release
                window["max_live_parameters"] * setup.itemsize // world_size, plan.swapped["kept_parameters"]
            ),
            read_ahead_gradients=plan.swapped["read_ahead_gradients"],
            read_ahead_states=plan.swapped["read_ahead_states"] + plan.swapped["early_read_states"],
            written_behind_states=plan.swapped["written_behind_states"],
            activations=plan.ssd.activations,
            layers=len(repeated_layers(fake.module)),
            sub_groups=len(layout.sub_group_numels),
            micro_steps=setup.gradient_accumulation_steps,
            overlap=setup.overlap,
            accelerator_is_host=machine.accelerator_is_host,
        )
        result.step_time = model_step_time(shape, rates(fake, setup, window_as_zero_config(window)))
    return result


RatesSource = Callable[[FakeModel, TrainingSetup, dict[str, int]], MachineRates]
"""Gives the machine's rates for a model, setup and the stage-3 knobs fuyou sets (tests pass fixed ones; the CLI
measures, `measured_rates`)."""


def measured_rates(fake: FakeModel, setup: TrainingSetup, zero: dict[str, int]) -> MachineRates:
    """This machine's rates for the setup's SSD paths and I/O options and the model's shape, trained with the
    "zero_optimization" knobs `zero`, measured on first use and cached (`estimator.rates`)."""
    assert setup.fuyou is not None
    device = "cuda" if torch.cuda.is_available() and not setup.cpu_accelerator else "cpu"
    return MachineRates(
        ssd=ssd_rates([str(p) for p in setup.fuyou.nvme_paths], setup.fuyou.io),
        compute=compute_rates(fake.module.config, setup.micro_batch, setup.seq_len, setup.dtype, device, zero),
    )


def _offload_saving(setup: TrainingSetup, facts: ModelFacts) -> int:
    """Device bytes `fuyou.activations.offload: auto` would free where the config leaves it off (0 otherwise)."""
    if setup.fuyou is None or setup.fuyou.activations.offload != "off":
        return 0
    auto = setup.fuyou.activations.model_copy(update={"offload": "auto"})
    return facts.saved.nbytes - facts.saved.resident_with_offload(auto)


def _judge(result: Estimate, setup: TrainingSetup, offload_saving: int) -> None:
    """Fills `problems` (what exceeds which limit, by how much) and `suggestions` (the cheapest fixes).

    `offload_saving`: device bytes activation offload would free, when the config has it off.
    """
    plan, machine = result.chosen, result.machine
    activations = plan.gpu.activations + plan.gpu.temporaries
    host = plan.pinned_host.total + plan.pageable_host.total
    if machine.accelerator_is_host:  # the accelerator's bytes are host bytes
        host += plan.gpu.total
        accelerator_limit, accelerator_need, where = machine.host_memory, host, "host memory"
    else:
        accelerator_limit, accelerator_need, where = machine.gpu_memory, plan.gpu.total, "GPU memory"
        if host > machine.usable(machine.host_memory):
            _over(result, "host", "host memory", host, machine.host_memory)
            _suggest_host(result, setup)
    if accelerator_need > machine.usable(accelerator_limit):
        _over(result, "accelerator", where, accelerator_need, accelerator_limit)
        room = machine.usable(accelerator_limit) - (accelerator_need - activations)
        per_sequence = activations / setup.micro_batch
        fitting = int(room // per_sequence) if per_sequence else 0
        if offload_saving and accelerator_need - offload_saving <= machine.usable(accelerator_limit):
            result.suggestions.append(
                'offload activations: "fuyou": {"activations": {"offload": "auto"}} keeps '
                f"{format_size(plan.gpu.activations - offload_saving)} of {format_size(plan.gpu.activations)} "
                "saved activations on the device, at the same micro-batch"
            )
        if room <= 0:
            result.suggestions.append(
                f"without any activation this needs {format_size(accelerator_need - activations)}: offload "
                'parameters and optimizer states to NVMe (offload_param/offload_optimizer "nvme" and a "fuyou" '
                "block), or spread them over more ranks"
            )
        elif 1 <= fitting < setup.micro_batch:
            result.suggestions.append(
                f"lower train_micro_batch_size_per_gpu from {setup.micro_batch} to {fitting} (activations and "
                f"their gradients: {format_size(activations)} -> {format_size(int(per_sequence * fitting))})"
            )
        elif fitting < 1:
            result.suggestions.append(
                f"one sequence of {setup.seq_len} tokens needs {format_size(int(per_sequence))} of activations: "
                "shorten the sequences or enable gradient checkpointing (model.gradient_checkpointing_enable())"
            )
        if machine.accelerator_is_host:
            _suggest_host(result, setup)
    if result.fuyou is not None:
        for problem in machine_problems(setup.fuyou, plan.ssd.total, plan.checkpoint_export):
            result.problems.append(problem.line())
            result.suggestions.append(problem.fix)
            result.exceeded.setdefault("ssd", 0)
    else:
        _check_stock_paths(result)


def _over(result: Estimate, kind: str, where: str, need: int, limit: int) -> None:
    margin = result.machine.margin
    result.exceeded[kind] = need - result.machine.usable(limit)
    result.problems.append(
        f"{where}: needs {format_size(need)}, has {format_size(limit)} ({margin:.0%} kept free): "
        f"{format_size(need - result.machine.usable(limit))} over"
    )


def _suggest_host(result: Estimate, setup: TrainingSetup) -> None:
    """Host memory is short by `exceeded`: fuyou's pinned budget can give it back, or more memory is needed."""
    over = max(result.exceeded.values())
    if result.fuyou is None:
        result.suggestions.append('add a "fuyou" block: its swappers stage everything through one pinned budget')
    elif setup.fuyou.pinned_memory - over >= MIN_PINNED_MEMORY:
        lower = format_size(setup.fuyou.pinned_memory - over)
        result.suggestions.append(f"lower fuyou.pinned_memory to {lower} (fuyou estimate --auto finds it)")
    result.suggestions.append(f"run on a machine with {format_size(over)} more host memory")


def _check_stock_paths(result: Estimate) -> None:
    for path, need in result.stock.ssd_per_path.items():
        if not os.path.isdir(path):
            result.exceeded.setdefault("ssd", 0)
            result.problems.append(f"{path}: the NVMe offload directory does not exist")
            result.suggestions.append(f"create {path} on an SSD, or point nvme_path at one")
            continue
        free = shutil.disk_usage(path).free
        if need > free:
            result.exceeded["ssd"] = result.exceeded.get("ssd", 0) + need - free
            result.problems.append(f"{path}: needs {format_size(need)} of swap space, has {format_size(free)} free")
            result.suggestions.append(f"free {format_size(need - free)} on {path}, or use another SSD")
