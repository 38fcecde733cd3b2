"""The optimizer swapper: fp32 master weights, optimizer states and gradients of each ZeRO-3 sub-group on the SSD.

Stage 3 steps the optimizer one sub-group at a time: swap in (master, states, gradients), unscale/clip, step, write
the new low-precision parameters, swap out. This swapper answers the calls stage 3 makes on DeepSpeed's
`PartitionedOptimizerSwapper`, and pipelines them: while sub-group i is stepped, the reads of sub-group i+1
(stage 3 names it `async_parameter`) and the writes of sub-group i-1 are in flight on the I/O threads. Sub-group
i-2's writes are finished before i+1's reads start: three sub-groups in memory at once, whatever the model's depth
(on a disk slower than the step, a longer backlog would buy no speed and hold pinned memory that grows with the
number of sub-groups). Buffers come from the one pinned budget; states an optimizer creates lazily at its first
step are picked up when they appear.

Checkpoints: DeepSpeed copies the directory `swap_folder` into the checkpoint and back. Our live files are striped
over several SSDs, so `export_checkpoint` writes a self-contained copy there (plain files plus a manifest with the
optimizer's non-tensor state such as Adam's step count) and `import_checkpoint` restores from it. Unlike stock
DeepSpeed, whose lazily created Adam moments are not restored in a fresh process, a resumed run continues exactly.
"""

from __future__ import annotations

import collections
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deepspeed_fuyou.errors import FuyouIOError
from deepspeed_fuyou.io.engine import ALIGNMENT, IOFuture
from deepspeed_fuyou.swap.runtime import SwapRuntime
from deepspeed_fuyou.swap.sizing import sub_group_buffer_numel

log = logging.getLogger(__name__)

MASTER = "master"  # the name under which a sub-group's fp32 weights are stored next to its optimizer states
MANIFEST = "fuyou-optimizer.pt"
MANIFEST_FORMAT = 1


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
    prefetched: _Resident | None = None

    def file(self, name: str) -> str:
        return f"optim-{self.key}-{name}"

    @property
    def grad_file(self) -> str:
        return f"optim-{self.key}-grad"


class FuyouOptimizerSwapper:
    """Drop-in for DeepSpeed's optimizer swappers, on the process's `SwapRuntime`."""

    def __init__(self, runtime: SwapRuntime, optimizer: torch.optim.Optimizer, dtype: torch.dtype, pipelined: bool):
        self.runtime = runtime
        self.optimizer = optimizer
        self.dtype = dtype
        self.pipelined = pipelined
        self.groups: dict[str, _SubGroup] = {}
        self._largest_numel = 0  # of any sub-group: sizes the step's buffers (`sub_group_buffer_numel`)
        self._written_by: collections.deque[int] = collections.deque(maxlen=2)  # writes started by the last swap-outs

    @property
    def swap_folder(self) -> str:
        """Where DeepSpeed's checkpoint code copies our state to and from (see the module docstring)."""
        return str(self.runtime.space.dirs[0] / "checkpoint-optimizer")

    # -- set-up -----------------------------------------------------------------------------------------------------

    def is_swappable_tensor(self, tensor: torch.Tensor | None = None, numel: int | None = None) -> bool:
        """Anything of at least one page goes to the SSD; a tensor marked `swappable = False` stays in memory."""
        if tensor is not None:
            if not getattr(tensor, "swappable", True):
                return False
            numel = tensor.numel()
        return numel is not None and numel * self.dtype.itemsize >= ALIGNMENT

    def initialize_parameters(self, parameters: list[torch.Tensor], src_tensors: list[torch.Tensor]) -> None:
        """Creates each sub-group's master file from its initial (low-precision or fp32) weights."""
        for master, src in zip(parameters, src_tensors, strict=True):
            group = self.groups[master.ds_id] = _SubGroup(master.ds_id, master, src.numel())
            self._largest_numel = max(self._largest_numel, group.numel)
            group.layout[MASTER] = (src.numel(), self.dtype)
            self._write_cast(src.reshape(-1), group.file(MASTER))
        self.runtime.flush()

    # -- the step ---------------------------------------------------------------------------------------------------

    def swap_in_optimizer_state(self, parameter: torch.Tensor, async_parameter: torch.Tensor | None = None) -> None:
        """Makes master, states and gradients of `parameter` resident; starts reading `async_parameter`'s."""
        group = self.groups.get(parameter.ds_id)
        if group is None:
            return
        self._discover_states(group)
        resident = group.prefetched or self._start_reads(group)
        group.prefetched = None
        for future in resident.reads:
            future.wait()
        self._attach(group, resident)
        if self.pipelined and async_parameter is not None and async_parameter.ds_id in self.groups:
            if len(self._written_by) == 2:  # the sub-group before last is written back before the next one is read
                self.runtime.wait_for_writes(self._written_by[0])
            following = self.groups[async_parameter.ds_id]
            self._discover_states(following)
            following.prefetched = self._start_reads(following)

    def swap_out_optimizer_state(self, parameter: torch.Tensor, async_swap: bool = False) -> None:
        """Writes master and states back and frees their memory; the writes may finish behind the next sub-group."""
        group = self.groups.get(parameter.ds_id)
        if group is None:
            return
        self._discover_states(group)
        self._write_state(group)
        self._release(group)
        self._written_by.append(self.runtime.writes_started)
        if not (self.pipelined and async_swap):
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
            self._write_cast(tensor.reshape(-1), group.grad_file, offset * self.dtype.itemsize)

    def read_gradient(self, parameter: torch.Tensor, offset: int, numel: int, device: torch.device) -> torch.Tensor:
        """A copy on `device` of the `numel` gradient elements at `offset` written last by `swap_out_gradients`.

        Gradient accumulation reads its running sum back with this; the read waits for a write of those bytes still
        in flight.
        """
        group = self.groups[parameter.ds_id]
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
                self.runtime.write(piece, group.grad_file, offset * self.dtype.itemsize, keep=piece)
        self.runtime.flush()
        self._release(group)

    def purge_state(self) -> None:
        """Forgets optimizer states and gradients (a checkpoint load is about to replace them)."""
        for group in self.groups.values():
            group.layout = {MASTER: group.layout[MASTER]}
            group.grad_pieces.clear()

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
        self.runtime.flush()
        folder = Path(self.swap_folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o700)
        manifest = {"format": MANIFEST_FORMAT, "groups": {}}
        for group in self.groups.values():
            for name, (numel, dtype) in group.layout.items():
                self._copy_file(numel, dtype, self.runtime.files(group.file(name)), [str(folder / group.file(name))])
            manifest["groups"][group.key] = {
                "layout": {
                    name: (numel, str(dtype).removeprefix("torch.")) for name, (numel, dtype) in group.layout.items()
                },
                "scalars": self._scalar_state(group),
            }
        torch.save(manifest, folder / MANIFEST)
        self.runtime.flush()

    def import_checkpoint(self) -> None:
        """Restores master, states and non-tensor optimizer state from a `swap_folder` filled from a checkpoint."""
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
                self._copy_file(numel, dtype, [str(folder / group.file(name))], self.runtime.files(group.file(name)))
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

    def _start_reads(self, group: _SubGroup) -> _Resident:
        """Starts reading a sub-group's tensors into pooled buffers (sized by `sub_group_buffer_numel`)."""
        views: dict[str, torch.Tensor] = {}
        reads: list[IOFuture] = []
        buffers: list[torch.Tensor] = []
        for name, (numel, dtype) in group.layout.items():
            buffer = self.runtime.staging(sub_group_buffer_numel(numel, self._largest_numel) * dtype.itemsize)
            views[name] = buffer.view(dtype).narrow(0, 0, numel)
            buffers.append(buffer)
            reads.append(self.runtime.read(views[name], group.file(name)))
        grad = None
        if group.grad_pieces:
            buffer = self.runtime.staging(
                sub_group_buffer_numel(group.numel, self._largest_numel) * self.dtype.itemsize
            )
            grad = buffer.view(self.dtype).narrow(0, 0, group.numel)
            grad.zero_()  # padding between pieces is never written; it must read as zero gradient
            buffers.append(buffer)
            for offset, length in group.grad_pieces.items():
                reads.append(
                    self.runtime.read(grad.narrow(0, offset, length), group.grad_file, offset * grad.element_size())
                )
        return _Resident(views, grad, reads, buffers)

    def _attach(self, group: _SubGroup, resident: _Resident) -> None:
        group.master.data = resident.views[MASTER]
        for name, tensor in self._state_tensors(group).items():
            tensor.data = resident.views[name]
        if resident.grad is not None:
            group.master.grad = resident.grad

    def _write_state(self, group: _SubGroup) -> None:
        tensors = {MASTER: group.master, **self._state_tensors(group)}
        for name, tensor in tensors.items():
            data = tensor.data.reshape(-1)
            self.runtime.write(data, group.file(name), keep=data)

    def _release(self, group: _SubGroup) -> None:
        """Points the sub-group's tensors at empty storage and drops its gradient; pooled buffers return once their
        writes are done."""
        group.master.data = torch.empty(0, dtype=group.master.dtype)
        group.master.grad = None
        for tensor in self._state_tensors(group).values():
            tensor.data = torch.empty(0, dtype=tensor.dtype)

    def _write_cast(self, tensor: torch.Tensor, name: str, offset: int = 0) -> IOFuture:
        """Writes `tensor` converted to the master dtype through a staging buffer (the source may change next)."""
        staging = self.runtime.staging(tensor.numel() * self.dtype.itemsize)
        view = staging.view(self.dtype).narrow(0, 0, tensor.numel())
        view.copy_(tensor)
        return self.runtime.write(view, name, offset, keep=staging)

    def _copy_file(self, numel: int, dtype: torch.dtype, source: list[str], target: list[str]) -> None:
        buffer = self.runtime.staging(numel * dtype.itemsize)
        view = buffer.view(dtype).narrow(0, 0, numel)
        self.runtime.engine.read(view, source).wait()
        self.runtime.engine.write(view, target).wait()
