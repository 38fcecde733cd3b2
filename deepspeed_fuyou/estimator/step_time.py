"""How long one optimizer step of fuyou takes, modelled from its SSD traffic and the machine's measured rates.

A step is a sequence of phases: per micro-step a forward and a backward, and the optimizer's work on every
sub-group (`rates.ComputeRates`: CPU Adam and stage 3's bookkeeping around it, as ZeRO-Offload does it). Each phase
also moves bytes between the SSD and host memory:
- a forward reads the parameter partitions on the SSD; a backward reads them again, except the last layers', which
  stay gathered from the forward (`max_live_parameters`) or kept in the window's pool after their release (up to
  its peak, `sizing.window_peak`), and the persistent (small) parameters, which stage 3 keeps gathered between uses.
  The same goes for the forward of a micro-step after the first, which starts where the backward before it ended;
  after a step, the forward finds nothing kept, every partition being updated;
- with `optimizer.overlap` "off" and "forward", every backward writes the gradients of the sub-groups on the SSD,
  and from the second micro-step on reads them first to accumulate; the step reads them once more. With
  "backward" the last micro-step's gradients stay in memory: its backward reads the accumulated ones (if any), and
  the step reads none;
- the optimizer's work reads the master weights and optimizer states on the SSD and writes them back, with the
  updated parameter partitions that are not stored in their master's file (in fp32 training they are);
- the sub-groups `optimizer.read_ahead` carries move part of that into a backward: their master and states are
  read in the last one, their final gradients are neither written nor read back, and the optimizer states of the
  last sub-groups are written in the first one;
- activations offloaded to the SSD are written by the forward and read by the backward.
Where the optimizer's work goes is the overlap mode: a phase of its own after the last backward ("off"), inside
that backward ("backward"), or inside the next forward, whose parameter reads it hands over in memory
("forward"). When it shares a phase, one sub-group's share stays exposed. With "backward" it is the last one,
stepped once backward is over: a phase of its own. With "forward" it is the first one, whose update the forward's
first layer waits for: its reads (unless `read_ahead` carried them) and, on a GPU, its Adam are time before the
forward's compute can start, while its bytes move in the same stream as the rest of the forward's.

A phase lasts as long as its busiest resource: the accelerator, the host CPU, or the SSD (reads at the read rate,
writes at the write rate, both together as the probe's mixed rate says, `ssd_seconds`). The host CPU runs the
optimizer and the engine's side of every byte moved (`SsdRates.cpu_per_byte_*`); on DeepSpeed's CPU accelerator it
runs forward and backward too, so all of it adds up there, while on a GPU compute overlaps the host's work. A
phase waits for its reads only: its writes go out behind it, in the SSD time later phases' reads leave (the engine
queues them; what waits for a write is the pinned buffer it holds and a read of the same bytes). Where the SSD is
busy the whole step, a last phase holds the writes still queued; the time the writes take beside reads is not
modelled phase by phase. The step's time is the sum of its phases; its
bound is the busiest resource over the whole step, what perfect overlap would reach. The traffic is exact (it is
what the swap runtime counts, `SwapCounters`); the times are as good as the rates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from deepspeed_fuyou.estimator.rates import MachineRates, SsdRates

WRITES_QUEUED = "SSD, writes queued"
"""The phase that ends a step whose SSD is its busiest resource: the writes still queued when its work is done."""


@dataclass
class Phase:
    """One phase of the step: the CPU or accelerator seconds and the SSD bytes it needs, and how long it takes."""

    name: str
    compute_s: float = 0.0  # forward or backward on the accelerator
    waits_s: float = 0.0  # before the compute can start: the update of the first sub-group it needs
    optimizer_s: float = 0.0  # CPU Adam and stage 3's bookkeeping
    read_bytes: int = 0
    written_bytes: int = 0
    seconds: float = 0.0
    bound_by: str = ""


@dataclass
class StepTime:
    """The modelled step of one plan on one machine."""

    phases: list[Phase] = field(default_factory=list)
    seconds: float = 0.0
    bound_seconds: float = 0.0
    bottleneck: str = ""  # the resource busiest over the whole step: "SSD", "compute" or (on a GPU) "CPU"
    rates: MachineRates | None = None  # what the times were computed from

    @property
    def read_bytes(self) -> int:
        return sum(phase.read_bytes for phase in self.phases)

    @property
    def written_bytes(self) -> int:
        return sum(phase.written_bytes for phase in self.phases)

    def to_json(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "bound_seconds": self.bound_seconds,
            "bottleneck": self.bottleneck,
            "ssd_read_bytes": self.read_bytes,
            "ssd_written_bytes": self.written_bytes,
            "phases": [asdict(phase) for phase in self.phases],
            "rates": asdict(self.rates) if self.rates is not None else None,
        }


@dataclass(frozen=True)
class StepShape:
    """What the model needs of a plan: bytes of each kind on the SSD, and how the step runs."""

    parameters: int  # low-precision parameter partitions in swap files
    parameters_in_masters: int  # those of them stored in their sub-group's master file, which the step writes anyway
    gradients: int  # fp32 gradient files
    optimizer_states: int  # master weights and optimizer states in swap files
    retained: int  # parameter bytes a pass finds in memory from the one before (gathered, kept, or persistent)
    read_ahead_gradients: int  # of `gradients`: those the last backward keeps in memory for the step
    read_ahead_states: int  # of `optimizer_states`: those the last backward reads for the step
    written_behind_states: int  # of `optimizer_states`: those the step leaves for the next backward to write
    activations: int  # activation bytes a forward writes to the SSD
    layers: int
    sub_groups: int
    micro_steps: int
    overlap: str  # "off", "backward" or "forward"
    accelerator_is_host: bool


def phases(shape: StepShape, rates: MachineRates) -> list[Phase]:
    """The step's phases in order, with their work (see the module's docstring); times not yet set."""
    compute = rates.compute
    forward_s, backward_s = compute.seconds("forward", shape.layers), compute.seconds("backward", shape.layers)
    optimizer = Phase(
        "optimizer",
        optimizer_s=compute.seconds("step", shape.layers),
        read_bytes=shape.optimizer_states
        - shape.read_ahead_states
        + (shape.gradients - shape.read_ahead_gradients if shape.overlap != "backward" else 0),
        written_bytes=shape.optimizer_states
        - shape.written_behind_states
        + shape.parameters
        - shape.parameters_in_masters,
    )
    result = []
    k = shape.micro_steps
    within_backward = 1 - 1 / max(1, shape.sub_groups)  # of the optimizer's work, all but the last sub-group's
    not_retained = max(0, shape.parameters - shape.retained)
    for micro in range(1, k + 1):
        forward = Phase(f"forward {micro}", compute_s=forward_s, written_bytes=shape.activations)
        if micro == 1:
            forward.read_bytes = 0 if shape.overlap == "forward" else shape.parameters
        else:
            forward.read_bytes = not_retained
        backward = Phase(f"backward {micro}", compute_s=backward_s)
        backward.read_bytes = not_retained + shape.activations
        keeps_gradient = shape.overlap == "backward" and micro == k
        backward.written_bytes = 0 if keeps_gradient else shape.gradients
        backward.read_bytes += shape.gradients if micro > 1 else 0
        backward.written_bytes += shape.written_behind_states if micro == 1 else 0
        if micro == k:
            backward.written_bytes -= shape.read_ahead_gradients
            backward.read_bytes += shape.read_ahead_states
        if micro == 1 and shape.overlap == "forward":
            _merge(forward, optimizer, 1.0)
            forward.waits_s = _first_update_s(shape, optimizer, rates)
        if keeps_gradient:
            _merge(backward, optimizer, within_backward)
        result += [forward, backward]
    if shape.overlap == "off":
        result.append(optimizer)
    elif shape.overlap == "backward":
        result.append(_share(optimizer, 1 - within_backward, "exposed optimizer"))
    return result


def _merge(phase: Phase, optimizer: Phase, fraction: float) -> None:
    """Puts `fraction` of the optimizer's work into `phase`."""
    share = _share(optimizer, fraction, phase.name)
    phase.optimizer_s += share.optimizer_s
    phase.read_bytes += share.read_bytes
    phase.written_bytes += share.written_bytes


def _first_update_s(shape: StepShape, optimizer: Phase, rates: MachineRates) -> float:
    """How long the forward's first layer waits for its sub-group's update with "forward": the sub-group's reads
    that `read_ahead` did not carry, and its Adam where the Adam does not run on the cores the forward needs anyway
    (on the CPU accelerator it is part of the phase's CPU time already)."""
    sub_groups = max(1, shape.sub_groups)
    states = max(0, shape.optimizer_states // sub_groups - shape.read_ahead_states)  # it carries the first ones
    gradients = max(0, shape.gradients // sub_groups - shape.read_ahead_gradients)
    adam_s = 0.0 if shape.accelerator_is_host else optimizer.optimizer_s / sub_groups
    return (states + gradients) / rates.ssd.read + adam_s


def _share(phase: Phase, fraction: float, name: str) -> Phase:
    return Phase(
        name,
        compute_s=phase.compute_s * fraction,
        optimizer_s=phase.optimizer_s * fraction,
        read_bytes=int(phase.read_bytes * fraction),
        written_bytes=int(phase.written_bytes * fraction),
    )


def model_step_time(shape: StepShape, rates: MachineRates) -> StepTime:
    """The modelled step: each phase as long as its busiest resource, summed; and the step's bound.

    A phase's reads must arrive within it, but its writes need not end with it: the engine goes on writing behind
    the next phases, so a phase's SSD time is that of its reads alone. The writes are paid for by the step as a
    whole: where its SSD time, reads and writes together, is longer than its phases, the writes still queued at the
    end are a phase of their own (`WRITES_QUEUED`), so the step is never shorter than its bound."""
    result = StepTime(phases=phases(shape, rates), rates=rates)
    for phase in result.phases:
        phase.seconds, phase.bound_by = _busiest(phase, shape, rates.ssd, written_bytes=0)
    whole = Phase(
        "step",
        compute_s=sum(p.compute_s for p in result.phases),
        optimizer_s=sum(p.optimizer_s for p in result.phases),
        read_bytes=result.read_bytes,
        written_bytes=result.written_bytes,
    )
    result.bound_seconds, result.bottleneck = _busiest(whole, shape, rates.ssd)
    laid_out = sum(phase.seconds for phase in result.phases)
    if result.bound_seconds > laid_out * (1 + 1e-9):  # not where they are equal but for rounding
        result.phases.append(Phase(WRITES_QUEUED, seconds=result.bound_seconds - laid_out, bound_by="SSD"))
    result.seconds = sum(phase.seconds for phase in result.phases)
    return result


def ssd_seconds(read: int, written: int, ssd: SsdRates) -> float:
    """Seconds the SSD takes to read and write these bytes at once, in any proportion.

    Each direction alone takes its own rate's time; together they take at least the longer of the two, and at most
    their sum (a disk that serves one direction at a time). Where a disk lies between is what the probe's mixed rate
    says for equal bytes each way: the share of the sum it saves, applied to this phase's sum. A fixed combined rate
    would instead charge a write-heavy phase as much as an even one of the same bytes."""
    alone = read / ssd.read + written / ssd.write
    probe_alone = 1 / ssd.read + 1 / ssd.write  # seconds for one byte each way, one direction after the other
    saved = min(1.0, max(0.0, 1 - (2 / ssd.mixed) / probe_alone))
    return max(read / ssd.read, written / ssd.write, alone * (1 - saved))


def _busiest(phase: Phase, shape: StepShape, ssd: SsdRates, written_bytes: int | None = None) -> tuple[float, str]:
    """Seconds of the busiest resource for `phase`'s work, and its name; with `written_bytes`, as if the SSD wrote
    only those (the host CPU still pays for all of the phase's writes)."""
    read, written = phase.read_bytes, phase.written_bytes
    ssd_s = ssd_seconds(read, written if written_bytes is None else written_bytes, ssd)
    host_s = phase.optimizer_s + read * ssd.cpu_per_byte_read + written * ssd.cpu_per_byte_written
    if shape.accelerator_is_host:  # forward, backward, the optimizer and the engine share the same cores
        candidates = {"compute": phase.waits_s + phase.compute_s + host_s, "SSD": ssd_s}
    else:
        candidates = {"compute": phase.waits_s + phase.compute_s, "CPU": host_s, "SSD": ssd_s}
    name = max(candidates, key=candidates.__getitem__)
    return candidates[name], name
