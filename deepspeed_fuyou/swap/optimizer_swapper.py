"""The optimizer swapper: fp32 master weights, optimizer states and gradients of each ZeRO-3 sub-group on the SSD.

Stage 3 steps the optimizer one sub-group at a time: swap in (master, states, gradients), unscale/clip, step, write
the new low-precision parameters, swap out. This swapper answers the calls stage 3 makes on DeepSpeed's
`PartitionedOptimizerSwapper`, and pipelines them: while sub-group i is stepped, the reads of the sub-group stepped
next (stage 3 names it `async_parameter`) and the writes of the one stepped before are in flight on the I/O threads.
The writes of the sub-group stepped before that are finished before the next reads start: three sub-groups in
memory at once, whatever the model's depth (on a disk slower than the step, a longer backlog would buy no speed and
hold pinned memory that grows with the number of sub-groups). Buffers come from the one pinned budget; states an
optimizer creates lazily at its first step are picked up when they appear.

Gradients reach a sub-group's gradient file as backward produces them (`swap_out_gradients`), or, when the optimizer
steps each sub-group during backward (`optimizer.overlap: "backward"`), stay in a pinned buffer until that step
(`hold_gradients`): they never touch the SSD then.

Read-ahead (`optimizer.read_ahead`, modes "off" and "forward"): work is carried across the end of backward in a pool
of its own (`plan_read_ahead`). Final gradients stay in it instead of their files (`keep_final_gradients`). The
last sub-groups of a step are stepped with their optimizer states in it, and leave them there, written only during
the next backward (write-behind; their master is written at once, since the next forward or backward may read
parameters from it). Once those writes have ended, the master and states of the first sub-groups are read into it
(`read_ahead_next`, one sub-group at a time, behind backward's own reads), so the step finds them in memory. The SSD
moves fewer bytes, and moves some while backward leaves it time rather than while the step is waited for. A read of
a sub-group's states (the next step, a checkpoint) first starts its writes still behind. After the carried
sub-groups, the first two that the step reads into its own pool are read during backward too
(`STEP_POOL_EARLY_READS`), into the slots the step would read them into: the step starts with them in memory.

Sub-groups and gradient files the DRAM tier takes (`plan_host_tier`, `fuyou.placement.host_memory`) are host tensors
instead of files: the optimizer steps the sub-group's own master and states in place, and gradients are copied into
and attached from the tensor. They take no pinned slot and no I/O.

Checkpoints: DeepSpeed copies the directory `swap_folder` into the checkpoint and back. Our live files are striped
over several SSDs, so `export_checkpoint` writes a self-contained copy there (plain files plus a manifest with the
optimizer's non-tensor state such as Adam's step count, and the CRC32C of every file) and `import_checkpoint` restores
from it, refusing a file whose bytes no longer have their checksum. Unlike stock DeepSpeed, whose lazily created Adam
moments are not restored in a fresh process, a resumed run continues exactly.
"""

from __future__ import annotations

import collections
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deepspeed_fuyou.config.sizes import format_size
from deepspeed_fuyou.errors import FuyouIOError
from deepspeed_fuyou.io.engine import IOFuture
from deepspeed_fuyou.io.native import crc32c
from deepspeed_fuyou.plan.sizing import read_ahead_plan, step_slot
from deepspeed_fuyou.plan.zero_layout import gets_a_file
from deepspeed_fuyou.swap.runtime import SwapRuntime, gradient_file, optimizer_file
from deepspeed_fuyou.trace import TRACE

log = logging.getLogger(__name__)

MASTER = "master"  # the name under which a sub-group's fp32 weights are stored next to its optimizer states
MANIFEST = "fuyou-optimizer.pt"
MANIFEST_FORMAT = 2  # 2: with each file's CRC32C


@dataclass
class _Resident:
    """A sub-group's tensors in pinned memory: views by name, the gradient view, and reads still in flight."""

    views: dict[str, torch.Tensor]
    grad: torch.Tensor | None
    reads: list[IOFuture]
    buffers: list[torch.Tensor]


@dataclass
class _SubGroup:
    """What the swapper knows of one sub-group: its tensors' shapes on disk and its gradient pieces."""

    key: str
    master: torch.Tensor  # the Python object stage 3 and the optimizer hold; only its .data moves
    numel: int
    layout: dict[str, tuple[int, torch.dtype]] = field(default_factory=dict)  # stored tensors: numel, dtype
    grad_pieces: dict[int, int] = field(default_factory=dict)  # element offset -> length in the gradient file
    grad_in_file: bool = False  # the last gradient is in its file (not kept in memory by read-ahead)
    held_grad: torch.Tensor | None = None  # the gradient kept in memory for a step during backward
    prefetched: _Resident | None = None
    host: dict[str, torch.Tensor] | None = None  # master and states, if the DRAM tier holds them
    host_grad: torch.Tensor | None = None  # the gradient "file", if the DRAM tier holds it
    stepped: bool = False  # its gradient was applied since it was swapped in: a held one is dropped at swap-out

    def file(self, name: str) -> str:
        return optimizer_file(self.key, name)

    @property
    def grad_file(self) -> str:
        return gradient_file(self.key)


class FuyouOptimizerSwapper:
    """Drop-in for DeepSpeed's optimizer swappers, on the process's `SwapRuntime`."""

    def __init__(self, runtime: SwapRuntime, optimizer: torch.optim.Optimizer, dtype: torch.dtype):
        self.runtime = runtime
        self.optimizer = optimizer
        self.dtype = dtype
        self.holds_gradients = False  # final gradients stay in memory (`hold_gradients`) instead of their files
        self.groups: dict[str, _SubGroup] = {}
        self._largest_numel = 0  # of any sub-group: sizes the step pool's slots (`SwapRuntime.step_slot_bytes`)
        self._written_by: collections.deque[int] = collections.deque(maxlen=2)  # writes started by the last swap-outs
        self._host_plan: dict[str, tuple[bool, bool]] = {}  # sub-group key -> (gradient, master and states) in DRAM
        self._kept_gradients: set[str] = set()  # keys of the sub-groups whose final gradient stays in memory
        self._read_ahead: list[str] = []  # keys of the sub-groups whose state is read during backward, in step order
        self._read_early: list[str] = []  # keys of the sub-groups read during backward into the step pool, in order
        self._reading: _SubGroup | None = None  # the carried sub-group whose reads were started last
        self._write_behind: set[str] = set()  # keys of the sub-groups whose states are written in the next backward
        self._deferred: dict[str, list[tuple[torch.Tensor, str]]] = {}  # key -> states (data, file) not yet written
        self._behind_mark = 0  # `runtime.writes_started` once the last state written behind was started
        self._carried_written = 0  # `runtime.writes_started` once the last sub-group read ahead was written back

    @property
    def swap_folder(self) -> str:
        """Where DeepSpeed's checkpoint code copies our state to and from (see the module docstring)."""
        return str(self.runtime.space.dirs[0] / "checkpoint-optimizer")

    # -- set-up -----------------------------------------------------------------------------------------------------

    def is_swappable_tensor(self, tensor: torch.Tensor | None = None, numel: int | None = None) -> bool:
        """What `gets_a_file` says; a tensor marked `swappable = False` stays in memory."""
        if tensor is not None:
            if not getattr(tensor, "swappable", True):
                return False
            numel = tensor.numel()
        return numel is not None and gets_a_file(numel * self.dtype.itemsize)

    def plan_host_tier(self, sub_groups: list[tuple[str, int]], states: int, gradients_on_file: bool) -> None:
        """Places sub-groups (key, elements) in the DRAM tier: every gradient file first (if gradients go to files in
        this run), then whole sub-groups, master and `states` optimizer states, in order, while the budget lasts."""
        host = self.runtime.host
        itemsize = self.dtype.itemsize
        gradients = {key: gradients_on_file and host.reserve(numel * itemsize) for key, numel in sub_groups}
        for key, numel in sub_groups:
            self._host_plan[key] = (gradients[key], host.reserve(numel * itemsize * (1 + states)))

    def plan_read_ahead(self, sub_groups: list[tuple[str, int]], states: int, gradients_on_file: bool) -> None:
        """Chooses what `optimizer.read_ahead` carries (`sizing.read_ahead_plan`) among the sub-groups (key,
        elements; in step order): whose final gradients stay in memory, whose master and states are read during
        backward, whose states are written during the next backward; and which sub-groups the step pool reads during
        backward. A gradient or state the DRAM tier holds needs none of it."""
        keys = [key for key, _ in sub_groups]
        placed = [self._host_plan.get(key, (False, False)) for key in keys]
        plan = read_ahead_plan(
            [numel for _, numel in sub_groups],
            self.dtype.itemsize,
            states,
            [gradients_on_file and not gradient_in_host for gradient_in_host, _ in placed],
            [not state_in_host for _, state_in_host in placed],
            self.runtime.read_ahead_budget,
        )
        self._kept_gradients = {keys[i] for i in plan.kept_gradients}
        self._read_ahead = [keys[i] for i in plan.read_states]
        self._read_early = [keys[i] for i in plan.read_early]
        self._write_behind = {keys[i] for i in plan.written_behind}
        if self.runtime.read_ahead_budget:
            log.info(
                "fuyou: optimizer.read_ahead (%s) keeps the gradients of %d, reads the state of %d and writes the "
                "state of %d behind, of %d sub-groups",
                format_size(self.runtime.read_ahead_budget),
                len(self._kept_gradients),
                len(self._read_ahead),
                len(self._write_behind),
                len(sub_groups),
            )

    def initialize_parameters(self, parameters: list[torch.Tensor], src_tensors: list[torch.Tensor]) -> None:
        """Creates each sub-group's master file (or host tensor) from its initial (low-precision or fp32) weights."""
        for master, src in zip(parameters, src_tensors, strict=True):
            group = self.groups[master.ds_id] = _SubGroup(master.ds_id, master, src.numel())
            self._largest_numel = max(self._largest_numel, group.numel)
            group.layout[MASTER] = (src.numel(), self.dtype)
            gradient_in_host, state_in_host = self._host_plan.get(group.key, (False, False))
            if gradient_in_host:
                group.host_grad = torch.zeros(group.numel, dtype=self.dtype)
            if state_in_host:
                group.host = {MASTER: src.reshape(-1).to(self.dtype, copy=True)}
            else:
                self._write_cast(src.reshape(-1), group.file(MASTER))
        self.runtime.flush()
        slot = step_slot([self._largest_numel], self.dtype.itemsize)
        self.runtime.step_slot_bytes = max(self.runtime.step_slot_bytes, slot)

    def master_file(self, parameter: torch.Tensor) -> str | None:
        """The swap file of the sub-group's master weights, None if it has none (DRAM tier, or not swapped)."""
        group = self.groups.get(parameter.ds_id)
        return None if group is None or group.host is not None else group.file(MASTER)

    # -- the step ---------------------------------------------------------------------------------------------------

    def swap_in_optimizer_state(self, parameter: torch.Tensor, async_parameter: torch.Tensor | None = None) -> None:
        """Makes master, states and gradients of `parameter` resident; starts reading `async_parameter`'s."""
        group = self.groups.get(parameter.ds_id)
        if group is None:
            return
        self._discover_states(group)
        resident = group.prefetched or self._start_reads(group)
        group.prefetched = None
        if resident.grad is None and group.held_grad is None:  # read ahead without it, and backward kept none
            resident.grad = self._read_gradient(group, resident.reads)
        with TRACE.wait(f"optimizer state {group.key}"):
            for future in resident.reads:
                future.wait()
        self._attach(group, resident)
        if async_parameter is not None and async_parameter.ds_id in self.groups:
            if len(self._written_by) == 2:  # the sub-group before last is written back before the next one is read
                self.runtime.wait_for_writes(self._written_by[0])
            following = self.groups[async_parameter.ds_id]
            if following.prefetched is None:
                self._discover_states(following)
                following.prefetched = self._start_reads(following)

    def gradient_applied(self, parameter: torch.Tensor) -> None:
        """The optimizer has stepped `parameter`'s sub-group: a gradient held in memory for it is used up."""
        group = self.groups.get(parameter.ds_id)
        if group is not None:
            group.stepped = True

    def swap_out_optimizer_state(self, parameter: torch.Tensor, async_swap: bool = False) -> None:
        """Writes master and states back and frees their memory; the writes may finish behind the next sub-group. A
        gradient held in memory is dropped only if the sub-group was stepped (`gradient_applied`): stage 3 also swaps
        sub-groups in and out to read or set their state (`safe_get_full_fp32_param`, ...), before their step."""
        group = self.groups.get(parameter.ds_id)
        if group is None:
            return
        self._discover_states(group)
        self._write_state(group, behind=group.key in self._write_behind)
        self._release(group, stepped=group.stepped)
        group.stepped = False
        if group.key in self._read_ahead:
            self._carried_written = self.runtime.writes_started
        self._written_by.append(self.runtime.writes_started)
        if not async_swap:
            self.runtime.flush()

    def swap_out_gradients(
        self, parameter: torch.Tensor, gradient_offsets: list[int], gradient_tensors: list[torch.Tensor]
    ) -> None:
        """Writes a sub-group's gradient pieces (at the accumulation boundary) behind the rest of backward.

        Each piece is copied into a staging buffer first: its source is the gradient accumulation buffer, which the
        next micro-step overwrites while the write may still be in flight.
        """
        group = self.groups.get(parameter.ds_id)
        if group is None:
            return
        for offset, tensor in zip(gradient_offsets, gradient_tensors, strict=True):
            group.grad_pieces[offset] = tensor.numel()
            if group.host_grad is not None:
                group.host_grad.narrow(0, offset, tensor.numel()).copy_(tensor.reshape(-1))
            else:
                self._write_cast(tensor.reshape(-1), group.grad_file, offset * self.dtype.itemsize)
                group.grad_in_file = True

    def hold_gradients(
        self, parameter: torch.Tensor, gradient_offsets: list[int], gradient_tensors: list[torch.Tensor]
    ) -> None:
        """Copies a sub-group's final gradient pieces into its in-memory gradient, for a step during backward."""
        group = self.groups.get(parameter.ds_id)
        if group is None:
            return
        if group.held_grad is None:
            group.held_grad = self._zeroed_gradient(group)
        for offset, tensor in zip(gradient_offsets, gradient_tensors, strict=True):
            group.held_grad.narrow(0, offset, tensor.numel()).copy_(tensor.reshape(-1))

    def keep_final_gradients(
        self, parameter: torch.Tensor, gradient_offsets: list[int], gradient_tensors: list[torch.Tensor]
    ) -> bool:
        """Keeps a sub-group's final gradient pieces in read-ahead memory instead of its gradient file, if
        `plan_read_ahead` chose it; False (nothing done) for another, whose pieces the caller writes as usual."""
        group = self.groups.get(parameter.ds_id)
        if group is None or group.key not in self._kept_gradients:
            return False
        if group.held_grad is None:
            group.held_grad = self._zeroed_gradient(group, self.runtime.read_ahead_staging)
        group.grad_in_file = False
        for offset, tensor in zip(gradient_offsets, gradient_tensors, strict=True):
            group.grad_pieces[offset] = tensor.numel()
            group.held_grad.narrow(0, offset, tensor.numel()).copy_(tensor.reshape(-1))
        return True

    def read_ahead_next(self) -> None:
        """Starts reading the master and states of the next carried sub-group not yet in memory, once the reads of
        the one before have ended: one sub-group at a time, so backward's own parameter reads never queue behind all
        of them. Called as backward goes on (at the accumulation boundary); the step reads what is left.

        Before anything is read ahead, the states written behind are written, one sub-group at a time, so that
        backward's own reads never queue behind many of them; what is read ahead then takes their memory."""
        if not self.runtime.writes_ended(self._behind_mark):
            return
        if self._deferred:
            self._write_deferred([next(iter(self._deferred))])
            return
        reading = self._reading.prefetched if self._reading is not None else None  # None once it was stepped
        if reading is not None and not all(future.done() for future in reading.reads):
            return
        for key in self._read_ahead + self._read_early:
            group = self.groups[key]
            if group.prefetched is None:
                self._read_ahead_state(group)
                self._reading = group
                return

    def finish_read_ahead(self) -> None:
        """Backward is over: writes what is still behind and, once that has ended, starts reading every carried
        sub-group not yet read, then those the step pool reads early, in step order, which is the order the step
        needs them in."""
        self._write_deferred()
        self.runtime.wait_for_writes(self._behind_mark)
        for key in self._read_ahead + self._read_early:
            if self.groups[key].prefetched is None:
                self._read_ahead_state(self.groups[key])

    def _read_ahead_state(self, group: _SubGroup) -> None:
        """Starts reading a sub-group's master and states during backward: into the read-ahead pool if it is
        carried, else into the step pool, whose slots the step then steps it in."""
        self._discover_states(group)
        staging = self.runtime.read_ahead_staging if group.key in self._read_ahead else None
        group.prefetched = self._start_reads(group, staging, gradient=False)

    def is_carried(self, parameter: torch.Tensor) -> bool:
        """Whether the sub-group's master and states are in read-ahead memory or being read into it (read ahead
        during backward); those read early into the step pool are not."""
        group = self.groups.get(parameter.ds_id)
        return group is not None and group.prefetched is not None and group.key in self._read_ahead

    def holds_no_gradient(self, parameter: torch.Tensor) -> bool:
        group = self.groups.get(parameter.ds_id)
        return group is None or group.held_grad is None

    def forget_step_buffers(self) -> None:
        """Drops gradients held in memory and states read ahead (a skipped step, a checkpoint load: none of them is
        used), once the reads into them have ended. States still to be written behind are written: they are the
        last step's."""
        self._write_deferred()
        for group in self.groups.values():
            if group.prefetched is not None:
                for future in group.prefetched.reads:
                    future.wait()
            group.held_grad = None
            group.prefetched = None
        self._reading = None

    def read_gradient(self, parameter: torch.Tensor, offset: int, numel: int, device: torch.device) -> torch.Tensor:
        """A copy on `device` of the `numel` gradient elements at `offset` written last by `swap_out_gradients`.

        Gradient accumulation reads its running sum back with this; the read waits for a write of those bytes still
        in flight.
        """
        group = self.groups[parameter.ds_id]
        if group.host_grad is not None:
            return group.host_grad.narrow(0, offset, numel).to(device=device, copy=True)
        staging = self.runtime.staging(numel * self.dtype.itemsize)
        view = staging.view(self.dtype).narrow(0, 0, numel)
        self.runtime.read(view, group.grad_file, offset * self.dtype.itemsize).wait()
        return view.to(device=device, copy=True)

    def release_swap_buffers(self, parameter: torch.Tensor) -> None:
        """Frees a sub-group's memory without writing (it was only read)."""
        group = self.groups.get(parameter.ds_id)
        if group is not None:
            self._release(group)

    def writeback_optimizer_state_and_gradients(
        self, parameter: torch.Tensor, write_opt_state: bool, write_gradients: bool
    ) -> None:
        """Persists what a caller modified in place (states and/or gradients), then frees the memory."""
        group = self.groups.get(parameter.ds_id)
        if group is None:
            return
        if write_opt_state:
            self._discover_states(group)
            self._write_state(group)
        if write_gradients and parameter.grad is not None:
            for offset, length in group.grad_pieces.items():
                piece = parameter.grad.narrow(0, offset, length)
                if group.host_grad is not None:
                    group.host_grad.narrow(0, offset, length).copy_(piece)
                else:
                    self.runtime.write(piece, group.grad_file, offset * self.dtype.itemsize, keep=piece)
                    group.grad_in_file = True
        self.runtime.flush()
        self._release(group)

    def purge_state(self) -> None:
        """Forgets optimizer states and gradients (a checkpoint load is about to replace them)."""
        for group in self.groups.values():
            group.layout = {MASTER: group.layout[MASTER]}
            group.grad_pieces.clear()
            group.grad_in_file = False
            if group.host is not None:
                group.host = {MASTER: group.host[MASTER]}

    # Stage 3 brackets backward and the step with these for DeepSpeed's own timers; our counters run always.
    def init_timers(self) -> None:
        """Nothing to reset: `SwapRuntime.counters` accumulate over the run."""

    def log_timers(self) -> None:
        counters = self.runtime.counters
        log.debug("fuyou swap: %d bytes read, %d written so far", counters.bytes_read, counters.bytes_written)

    def pre_backward(self) -> None:
        """Nothing to prepare: gradient writes need no flush (the runtime orders each read after its writes)."""

    def post_backward(self) -> None:
        """Gradient writes stay in flight until a sub-group's swap-in reads those bytes."""

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def export_checkpoint(self) -> None:
        """Writes every sub-group's master and states as plain files plus a manifest into `swap_folder`."""
        self._write_deferred()
        self.runtime.flush()
        folder = Path(self.swap_folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o700)
        manifest = {"format": MANIFEST_FORMAT, "groups": {}}
        for group in self.groups.values():
            checksums = {}
            for name, (numel, dtype) in group.layout.items():
                target = [str(folder / group.file(name))]
                if group.host is not None:
                    self.runtime.engine.write(group.host[name], target).wait()
                    checksums[name] = crc32c(group.host[name])
                else:
                    checksums[name] = self._copy_file(numel, dtype, self.runtime.files(group.file(name)), target)
            manifest["groups"][group.key] = {
                "layout": {
                    name: (numel, str(dtype).removeprefix("torch.")) for name, (numel, dtype) in group.layout.items()
                },
                "scalars": self._scalar_state(group),
                "checksums": checksums,
            }
        torch.save(manifest, folder / MANIFEST)
        self.runtime.flush()

    def import_checkpoint(self) -> None:
        """Restores master, states and non-tensor optimizer state from a `swap_folder` filled from a checkpoint."""
        self.forget_step_buffers()
        self.runtime.flush()  # no write of the state it replaces may land after it
        self.runtime.files_replaced += 1  # fp32 masters hold parameter partitions: copies kept in memory are stale
        folder = Path(self.swap_folder)
        manifest_path = folder / MANIFEST
        if not manifest_path.exists():
            raise FuyouIOError(
                str(manifest_path),
                0,
                0,
                None,
                "checkpoint has no fuyou optimizer manifest",
                "load a checkpoint saved with the fuyou block enabled (stock DeepSpeed NVMe checkpoints differ)",
            )
        manifest = torch.load(manifest_path, weights_only=True)
        if manifest.get("format") != MANIFEST_FORMAT:
            raise FuyouIOError(
                str(manifest_path),
                0,
                0,
                None,
                f"checkpoint manifest has format {manifest.get('format')}, this fuyou reads format {MANIFEST_FORMAT}",
                "load it with the fuyou version that saved it, or resume from a checkpoint saved by this one",
            )
        for key, saved in manifest["groups"].items():
            group = self.groups.get(key)
            if group is None:
                raise FuyouIOError(
                    str(manifest_path),
                    0,
                    0,
                    None,
                    f"checkpoint sub-group {key} does not exist in this model",
                    "load with the same model, world size and fuyou.pinned_memory / sub_group_size as at save time",
                )
            group.layout = {name: (numel, getattr(torch, dtype)) for name, (numel, dtype) in saved["layout"].items()}
            state = self.optimizer.state[group.master]
            state.clear()
            state.update(saved["scalars"])
            for name, (numel, dtype) in group.layout.items():
                source = [str(folder / group.file(name))]
                self.runtime.engine.forget_checksums(source)  # DeepSpeed copied them into place, not our engine
                expected = saved["checksums"][name]
                if group.host is not None:
                    group.host[name] = torch.empty(numel, dtype=dtype)
                    self.runtime.engine.read(group.host[name], source).wait()
                    _check_saved(group.host[name], source[0], expected)
                else:
                    self._copy_file(numel, dtype, source, self.runtime.files(group.file(name)), expected)
                if name != MASTER:
                    state[name] = torch.empty(0, dtype=dtype)
        self.runtime.flush()

    def discard_export(self) -> None:
        shutil.rmtree(self.swap_folder, ignore_errors=True)

    # -- internals --------------------------------------------------------------------------------------------------

    def _state_tensors(self, group: _SubGroup) -> dict[str, torch.Tensor]:
        state = self.optimizer.state.get(group.master, {})
        return {name: value for name, value in state.items() if name in group.layout}

    def _discover_states(self, group: _SubGroup) -> None:
        """Adds optimizer states created since the last look (Adam creates its moments at the first step)."""
        for name, value in self.optimizer.state.get(group.master, {}).items():
            if name not in group.layout and torch.is_tensor(value) and self.is_swappable_tensor(tensor=value):
                group.layout[name] = (value.numel(), value.dtype)

    def _scalar_state(self, group: _SubGroup) -> dict[str, object]:
        state = self.optimizer.state.get(group.master, {})
        return {name: value for name, value in state.items() if name not in group.layout}

    def _start_reads(
        self, group: _SubGroup, staging: Callable[[int], torch.Tensor] | None = None, gradient: bool = True
    ) -> _Resident:
        """Starts reading a sub-group's tensors into buffers from `staging` (default: step pool slots), and its
        gradient unless `gradient` is False (read ahead before backward has produced it). The states of a sub-group
        written behind take read-ahead memory, where they stay until the next backward writes them; its states still
        waiting to be written from the last step are written first (the reads are ordered after them)."""
        self._write_deferred([group.key])
        views: dict[str, torch.Tensor] = {}
        reads: list[IOFuture] = []
        buffers: list[torch.Tensor] = []
        states_behind = staging is None and group.host is None and group.key in self._write_behind
        if states_behind:
            self.runtime.wait_for_writes(self._carried_written)  # what was read ahead has left the pool
        for name, (numel, dtype) in group.layout.items():
            if group.host is not None:
                views[name] = group.host[name]
                continue
            take = staging or self.runtime.step_staging
            if states_behind and name != MASTER:
                take = self.runtime.read_ahead_staging
            buffer = take(numel * dtype.itemsize)
            views[name] = buffer.view(dtype).narrow(0, 0, numel)
            buffers.append(buffer)
            reads.append(self.runtime.read(views[name], group.file(name)))
        grad = self._read_gradient(group, reads) if gradient else None
        return _Resident(views, grad, reads, buffers)

    def _read_gradient(self, group: _SubGroup, reads: list[IOFuture]) -> torch.Tensor | None:
        """The sub-group's gradient for its step: its DRAM-tier tensor, or a buffer whose reads from the gradient
        file are appended to `reads`; None where the gradient is held in memory or there is none."""
        if not group.grad_pieces or self.holds_gradients or group.held_grad is not None:
            return None
        if group.host_grad is not None:
            return group.host_grad
        if not group.grad_in_file:  # kept in read-ahead memory and used up by its step: no file holds it
            return None
        grad = self._zeroed_gradient(group)
        for offset, length in group.grad_pieces.items():
            reads.append(
                self.runtime.read(grad.narrow(0, offset, length), group.grad_file, offset * grad.element_size())
            )
        return grad

    def _zeroed_gradient(self, group: _SubGroup, staging: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """A pooled gradient for `group` (from `staging`, default the step pool), zero: padding between parameters'
        pieces is never written."""
        buffer = (staging or self.runtime.step_staging)(group.numel * self.dtype.itemsize)
        return buffer.view(self.dtype).narrow(0, 0, group.numel).zero_()

    def _attach(self, group: _SubGroup, resident: _Resident) -> None:
        group.master.data = resident.views[MASTER]
        for name, tensor in self._state_tensors(group).items():
            tensor.data = resident.views[name]
        if group.held_grad is not None:
            group.master.grad = group.held_grad
        elif resident.grad is not None:
            group.master.grad = resident.grad

    def _write_state(self, group: _SubGroup, behind: bool = False) -> None:
        """Writes master and states to their files, the states only in the next backward if `behind`
        (`read_ahead_next`); a sub-group in the DRAM tier keeps them (new states included)."""
        tensors = {MASTER: group.master, **self._state_tensors(group)}
        for name, tensor in tensors.items():
            data = tensor.data.reshape(-1)
            if group.host is not None:
                group.host[name] = data
            elif behind and name != MASTER:
                self._deferred.setdefault(group.key, []).append((data, group.file(name)))
            else:
                self.runtime.write(data, group.file(name), keep=data)

    def _write_deferred(self, keys: list[str] | None = None) -> None:
        """Starts writing the states written behind of the sub-groups `keys` (default: all of them)."""
        for key in list(self._deferred) if keys is None else keys:
            for data, name in self._deferred.pop(key, []):
                self.runtime.write(data, name, keep=data)
                self._behind_mark = self.runtime.writes_started

    def _release(self, group: _SubGroup, stepped: bool = False) -> None:
        """Points the sub-group's tensors at empty storage and drops its gradient (a gradient held in memory only once
        it has been stepped); pooled buffers return once their writes are done."""
        group.master.data = torch.empty(0, dtype=group.master.dtype)
        group.master.grad = None
        if stepped:
            group.held_grad = None
        for tensor in self._state_tensors(group).values():
            tensor.data = torch.empty(0, dtype=tensor.dtype)

    def _write_cast(self, tensor: torch.Tensor, name: str, offset: int = 0) -> IOFuture:
        """Writes `tensor` converted to the master dtype through a staging buffer (the source may change next):
        gradients while backward runs, initial master weights before anything else does."""
        staging = self.runtime.gradient_staging(tensor.numel() * self.dtype.itemsize)
        view = staging.view(self.dtype).narrow(0, 0, tensor.numel())
        view.copy_(tensor)
        return self.runtime.write(view, name, offset, keep=staging)

    def _copy_file(
        self, numel: int, dtype: torch.dtype, source: list[str], target: list[str], expected: int | None = None
    ) -> int:
        """Copies a tensor's file (`expected`: the CRC32C its bytes must have, checked before anything is written);
        returns the CRC32C of what it copied."""
        buffer = self.runtime.step_staging(numel * dtype.itemsize)
        view = buffer.view(dtype).narrow(0, 0, numel)
        self.runtime.engine.read(view, source).wait()
        checksum = _check_saved(view, source[0], expected)
        self.runtime.engine.write(view, target).wait()
        return checksum


def _check_saved(tensor: torch.Tensor, path: str, expected: int | None) -> int:
    """The CRC32C of `tensor`, read from the checkpoint file `path`; raises if it is not `expected` (None: any)."""
    found = crc32c(tensor)
    if expected is not None and found != expected:
        raise FuyouIOError(
            path,
            0,
            tensor.nbytes,
            None,
            f"checkpoint file corrupted: its CRC32C is 0x{found:08x}, 0x{expected:08x} when it was saved",
            "resume from the previous checkpoint (this one cannot be trusted), and check the disk that holds it",
        )
    return found
