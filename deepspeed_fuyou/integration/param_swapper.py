"""The parameter swapper: ZeRO-3 partitions of low-precision parameters between the SSD and pinned host buffers.

It answers the calls DeepSpeed makes on `AsyncPartitionedParameterSwapper` (zero.Init, the prefetch coordinator,
stage 3's optimizer), with three differences users feel:
- buffers come from the one pinned budget, sized per partition: no `buffer_count` / `buffer_size`, no
  "not enough buffers" assertion, any partition size (the engine aligns, files hold exactly the partition's bytes);
- files are striped over `fuyou.nvme_paths` inside our private swap directories (0600, removed at exit), so a second
  `zero.Init` never deletes the files of the first;
- every short read or failed write is a FuyouIOError naming the file;
- with the optimizer stepping behind the forward (`optimizer.overlap: "forward"`), a prefetch stops at a partition
  whose sub-group is not yet stepped, a read of it waits for its update, and an update the step has just produced
  is taken from memory instead of its file (`SwapRuntime.updates`);
- with several ranks, what a prefetch reads is agreed between them, since stage 3 gathers ahead only what is off
  the SSD and every rank must run the same collectives (`swap_in`);
- partitions placed in the DRAM tier (`fuyou.placement.host_memory`, `plan.host_tier`) live in a host tensor of
  their own, which stage 3 gathers from directly: no file, no read, no pinned buffer;
- in fp32 training a partition on the SSD is the same bytes as its piece of its sub-group's master weights, so once
  the optimizer has written the masters it is read from there (`store_in`) and the step writes it only once, as
  part of the master: stock writes every updated parameter a second time, into its own file;
- a released partition keeps its buffer while the window has room to spare (`_keep`, up to `sizing.window_peak`,
  which the estimator counts): backward's first layers are forward's last, and gradient accumulation's next forward
  starts with backward's last, so these are found in memory instead of read again. An update written since the
  buffer was filled, or a checkpoint's files, make the copy stale; the pool takes the oldest back when it needs room.

The state contract is DeepSpeed's: `ds_tensor` objects stay, only their `.data` moves; `ds_tensor.status` is
DeepSpeed's own `PartitionedParamStatus`; while a partition is on the SSD its data is a 0-dim placeholder.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Set

import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

from deepspeed_fuyou.io.engine import ALIGNMENT, IOFuture
from deepspeed_fuyou.plan.sizing import aligned
from deepspeed_fuyou.plan.zero_layout import gets_a_file
from deepspeed_fuyou.swap.runtime import SwapRuntime, parameter_file, swap_file_kind
from deepspeed_fuyou.trace import TRACE

PARAMETERS = swap_file_kind(parameter_file(0))  # how the swap counters count a partition's bytes, wherever stored
Buffer = torch.Tensor | None  # a pooled buffer a partition is read into, or None where it needs none

FETCH_RESERVE_PARTITIONS = 2
"""Room, in buffers of the largest partition, that stage 3's prefetch leaves in the forward/backward pool for the
partitions it did not prefetch (its trace skipped them, or an update handed over from the step). Their fetch must
have a buffer at once: the pool's other buffers hold partitions prefetched for modules after theirs, released only
after them, so a fetch that found the pool full would wait for the pool's timeout and fail. The prefetch keeps the
room itself, as buffers the pool gives without waiting (`PinnedPool.room_for`): the coordinator's count
(`available_swap_in_buffers`) knows only this swapper's buffers, and on a GPU the free bytes between registered
buffers of different sizes lie in pieces that a fetch cannot use."""


class FuyouParamSwapper:
    """Swaps partitions of one dtype; one instance per `zero.Init`, all sharing the process's `SwapRuntime`."""

    def __init__(self, runtime: SwapRuntime, dtype: torch.dtype) -> None:
        self.runtime = runtime
        self.dtype = dtype
        self.placeholder = torch.empty((), dtype=dtype)
        self._numel: dict[int, int] = {}  # ds_id -> partition numel, for every partition with a file
        self._buffers: dict[int, torch.Tensor] = {}  # ds_id -> pooled buffer holding the partition in memory
        self._reads: dict[int, tuple[torch.nn.Parameter, IOFuture]] = {}  # ds_id -> read in flight
        self._deferred: dict[int, torch.nn.Parameter] = {}  # ds_id -> release asked while its gather was in flight
        self._resident: dict[int, torch.Tensor] = {}  # ds_id -> the partition, for those kept in the DRAM tier
        self._stored_in: dict[int, tuple[str, int]] = {}  # ds_id -> (file, byte offset), if not its own file
        self._apart: dict[int, tuple[str, int]] = {}  # ds_id -> its master's place, until the next step writes it
        self._kept: OrderedDict[int, tuple[torch.Tensor, int]] = OrderedDict()  # ds_id -> buffer, files_replaced
        self._outdated: set[int] = set()  # held partitions an update was written for: never kept after release
        self._keeping = threading.Lock()  # the step thread's updates against forward's and backward's releases
        self._largest_nbytes = ALIGNMENT

    # -- what zero.Init calls while it partitions a freshly built module -------------------------------------------

    def swappable_tensor(self, param: torch.nn.Parameter | None = None, numel: int | None = None) -> bool:
        """Partitions that `gets_a_file` gives a file go to the SSD."""
        numel = param.ds_tensor.ds_numel if numel is None else numel
        return gets_a_file(numel * self.dtype.itemsize)

    def get_buffer(self, param: torch.nn.Parameter, numel: int) -> torch.Tensor:
        """A buffer for a partition about to be filled and then swapped out with `swap_out_and_release`: the
        partition's own host tensor if the DRAM tier takes it (parameters are placed first), else a pinned buffer."""
        self._numel[param.ds_id] = numel
        self._forget_kept([param])  # it is filled anew
        if param.ds_id in self._resident or self.runtime.host.reserve(numel * self.dtype.itemsize):
            self._resident.setdefault(param.ds_id, torch.empty(numel, dtype=self.dtype))
            return self._resident[param.ds_id]
        self._largest_nbytes = max(self._largest_nbytes, aligned(numel * self.dtype.itemsize))
        return self._hold(param, numel)

    def swap_out_and_release(
        self, params: Iterable[torch.nn.Parameter], async_op: bool = False, force_buffer_release: bool = False
    ) -> None:
        """Writes each partition from its buffer to its file, then frees the buffers.

        The write is always complete on return: the caller may modify or free the data next, and a failure must
        surface here, at the step that caused it.
        """
        params = list(params)
        for param in params:
            if param.ds_id in self._resident:
                continue  # the partition was filled in place
            with self._keeping:
                self._outdated.discard(param.ds_id)  # its buffer is what the file gets: kept after release
            self.runtime.updates.discard(param.ds_id)
            name, offset = self._location(param)
            self.runtime.write(self._view(param), name, offset, keep=self._buffers[param.ds_id], kind=PARAMETERS)
        self.runtime.flush()
        self.remove_partition_and_release_buffers(params)

    # -- forward / backward: the prefetch coordinator -------------------------------------------------------------

    def swap_in(
        self, params: Iterable[torch.nn.Parameter], async_op: bool = True, swap_in_buffers: object = None
    ) -> None:
        """Starts reading each partition into a fresh pooled buffer; with `async_op=False` also waits for them.

        The prefetch coordinator walks its trace, where a parameter used twice (tied weights) appears twice: a
        partition already being read is not read again.

        A prefetch (`async_op`) is best effort: it starts the leading partitions whose sub-group is stepped and for
        which the pool has a buffer now that leaves `FETCH_RESERVE_PARTITIONS`, and stops at the first other one.
        Stage 3's coordinator gathers a partition ahead of its module only once it is off the SSD, and every rank
        must gather the same ones in the same order: with several ranks they first take their buffers, then agree on
        how many leading partitions all of them could start (`_agree`) and give back the rest, so that what one
        rank's timing allows (a step finished, a write ended) never decides the collectives.
        """
        self._release_deferred()
        params = list(dict.fromkeys(params))  # a tied weight is listed twice
        if not async_op:
            with TRACE.wait("parameter update"):
                self.runtime.updates.wait(param.ds_id for param in params)
            for param in params:
                self._start_read(param)
            self.synchronize_reads()
            return
        startable = self._leading_buffers(params)
        for param, buffer in startable[: self._agree(params, len(startable))]:
            self._start_read(param, buffer)

    def take_hand_overs(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Makes available, from memory, the partitions among `params` whose update the step has handed over.

        Called just before stage 3 gathers `params`, which reads the others: taken or read, each is in memory when
        the gather starts, on every rank, whichever way this rank got it."""
        self._release_deferred()
        updates = self.runtime.updates
        for param in params:
            if param.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE and updates.has_hand_over(param.ds_id):
                self._start_read(param)

    def _leading_buffers(self, params: list[torch.nn.Parameter]) -> list[tuple[torch.nn.Parameter, Buffer]]:
        """The leading `params` a prefetch can start now, each with the pooled buffer it takes (None: it needs none,
        being in memory, kept, read already or in the DRAM tier), up to the first whose sub-group is not stepped yet
        or for which the pool has no buffer now that leaves the fetch reserve (`_fetch_reserve_left`), even after
        giving back kept partitions other than those listed."""
        updates = self.runtime.updates
        startable: list[tuple[torch.nn.Parameter, Buffer]] = []
        for param in params:
            if param.ds_id in self._reads or param.ds_id in self._resident:
                startable.append((param, None))
                continue
            if updates.is_pending(param.ds_id) and not updates.has_hand_over(param.ds_id):
                break
            if param.ds_id in self._kept:
                startable.append((param, None))
                continue
            spared = {p.ds_id for p, buffer in startable if buffer is None}
            buffer = self._staging(self._numel[param.ds_id] * self.dtype.itemsize, spared)
            if buffer is None or not self._fetch_reserve_left(spared):
                break  # a buffer taken goes back to the pool with its last reference
            startable.append((param, buffer))
        return startable

    def _fetch_reserve_left(self, spared: Set[int]) -> bool:
        """Whether the pool still has `FETCH_RESERVE_PARTITIONS` whole buffers of the largest partition, after giving
        back kept buffers (not those in `spared`) if it must."""
        while self.runtime.pool.room_for(self._largest_nbytes) < FETCH_RESERVE_PARTITIONS:
            with self._keeping:
                if not self._give_back_oldest(spared):
                    return False
        return True

    @staticmethod
    def _agree(params: list[torch.nn.Parameter], count: int) -> int:
        """The fewest of `count` over the ranks that share `params` (`count` itself on one rank)."""
        if not params or not dist.is_initialized():
            return count
        group = getattr(params[0], "ds_process_group", None)
        if dist.get_world_size(group) == 1:
            return count
        agreed = torch.tensor([count], dtype=torch.int64, device=get_accelerator().current_device_name())
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
        return int(agreed.item())

    def _start_read(self, param: torch.nn.Parameter, buffer: Buffer = None) -> None:
        """Makes `param`'s partition available or in flight: from the DRAM tier, kept since its release, from a
        hand-over copied into `buffer`, or read into it; without `buffer`, one is taken from the pool, waiting for
        room."""
        if param.ds_id in self._reads:
            return  # being read since an earlier prefetch
        status = param.ds_tensor.status
        if status != PartitionedParamStatus.NOT_AVAILABLE:
            raise RuntimeError(f"fuyou: swap_in of parameter {param.ds_id} whose partition is {status}")
        if param.ds_id in self._resident:
            param.ds_tensor.data = self._resident[param.ds_id]
            param.ds_tensor.status = PartitionedParamStatus.AVAILABLE
            return
        if self._take_kept(param):
            return
        if buffer is None:
            self._hold(param, self._numel[param.ds_id])
        else:
            self._buffers[param.ds_id] = buffer
        fresh = self.runtime.updates.take(param.ds_id)
        if fresh is not None:  # copied out, so that the step's memory goes back to its pool at once
            param.ds_tensor.data = self._view(param).copy_(fresh.view(self.dtype))
            param.ds_tensor.status = PartitionedParamStatus.AVAILABLE
            return
        future = self.runtime.read(self._view(param), *self._location(param), kind=PARAMETERS)
        self._reads[param.ds_id] = (param, future)
        param.ds_tensor.status = PartitionedParamStatus.INFLIGHT

    def synchronize_reads(self) -> None:
        """Waits for every read in flight and makes those partitions available."""
        reads, self._reads = self._reads, {}
        with TRACE.wait("parameters"):
            for _, future in reads.values():
                future.wait()
        for param, _ in reads.values():
            param.ds_tensor.data = self._view(param)
            param.ds_tensor.status = PartitionedParamStatus.AVAILABLE

    def available_swap_in_buffers(self) -> int:
        """How many more partitions the coordinator may prefetch: the forward/backward pool's room, in partitions,
        less `FETCH_RESERVE_PARTITIONS`.

        It counts the buffers of the partitions this swapper holds or reads, which every rank holds alike, so that
        all of them offer the coordinator the same prefetch (see `swap_in`)."""
        return max(
            0, (self.runtime.pool.budget - self._held_bytes()) // self._largest_nbytes - FETCH_RESERVE_PARTITIONS
        )

    def remove_partition_and_release_buffers(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Releases the in-memory copy (the file stays valid; nothing changed in forward or backward), which stays
        kept while the window has room (`_keep`).

        DeepSpeed releases persistent parameters right after *starting* their all-gather. On the CPU accelerator
        that gather reads `ds_tensor` itself, not a device copy, so replacing its data now would feed the gather
        a placeholder: such releases wait until the gather has completed.
        """
        self._release_deferred()
        for param in params:
            if param.ds_status == ZeroParamStatus.INFLIGHT:
                self._deferred[param.ds_id] = param
            else:
                self._release(param)

    def _release_deferred(self) -> None:
        for ds_id, param in list(self._deferred.items()):
            if param.ds_status != ZeroParamStatus.INFLIGHT:
                del self._deferred[ds_id]
                self._release(param)

    def _release(self, param: torch.nn.Parameter) -> None:
        read = self._reads.pop(param.ds_id, None)
        if read is not None:
            read[1].wait()  # the engine may still write into the buffer: never hand it back before the end
        self._keep(param.ds_id)
        param.ds_tensor.data = self.placeholder
        param.ds_tensor.status = PartitionedParamStatus.NOT_AVAILABLE

    # -- partitions kept after their release ------------------------------------------------------------------------

    def _keep(self, ds_id: int) -> None:
        """Takes back the buffer of a partition being released and keeps it, since it holds its file's bytes, unless
        an update was written since it was filled; then gives back the oldest kept buffers until the window holds no
        more than `window_peak`. One lock covers it all: an update on the step thread marks only held buffers."""
        with self._keeping:
            buffer = self._buffers.pop(ds_id, None)
            if buffer is None:
                return
            if ds_id in self._outdated:
                self._outdated.discard(ds_id)
                return
            self._kept[ds_id] = (buffer, self.runtime.files_replaced)
            held = self._held_bytes()
            while self._kept and held + sum(kept.numel() for kept, _ in self._kept.values()) > self.runtime.window_peak:
                self._give_back_oldest()

    def _take_kept(self, param: torch.nn.Parameter) -> bool:
        """Makes `param`'s partition available from its kept buffer, if it has one that is not stale."""
        with self._keeping:
            kept = self._kept.pop(param.ds_id, None)
            if kept is None:
                return False
            buffer, files_replaced = kept
            if files_replaced != self.runtime.files_replaced:
                return False
            self._buffers[param.ds_id] = buffer
        param.ds_tensor.data = self._view(param)
        param.ds_tensor.status = PartitionedParamStatus.AVAILABLE
        self.runtime.counters.reads_saved += self._numel[param.ds_id] * self.dtype.itemsize
        return True

    def _forget_kept(self, params: Iterable[torch.nn.Parameter]) -> None:
        """An update of `params` is being written: their kept copies are stale, and so are those held now."""
        with self._keeping:
            for param in params:
                self._kept.pop(param.ds_id, None)
                if param.ds_id in self._buffers:
                    self._outdated.add(param.ds_id)

    def _give_back_oldest(self, spared: Set[int] = frozenset()) -> bool:
        """Gives the oldest kept buffer not in `spared` back to the pool; False if there is none. The caller holds
        `_keeping`."""
        oldest = next((ds_id for ds_id in self._kept if ds_id not in spared), None)
        if oldest is None:
            return False
        del self._kept[oldest]
        return True

    def _staging(self, nbytes: int, spared: Set[int] = frozenset()) -> Buffer:
        """A pooled buffer if the pool has room now, after giving back kept buffers (not those in `spared`)."""
        while True:
            buffer = self.runtime.try_staging(nbytes)
            if buffer is not None:
                return buffer
            with self._keeping:
                if not self._give_back_oldest(spared):
                    return None

    # -- stage 3's optimizer ----------------------------------------------------------------------------------------

    def swap_into_buffer(self, param: torch.nn.Parameter, dest_buffer: torch.Tensor) -> None:
        """Reads a partition straight into a caller's buffer (stage 3 moving it to CPU memory for good)."""
        self._forget_kept([param])
        view = dest_buffer.narrow(0, 0, self._numel[param.ds_id])
        if param.ds_id in self._resident:
            view.copy_(self._resident[param.ds_id])
        else:
            self.runtime.read(view, *self._location(param), kind=PARAMETERS).wait()
        param.ds_tensor.data = view.data
        param.ds_tensor.status = PartitionedParamStatus.AVAILABLE

    def store_in(self, param: torch.nn.Parameter, name: str, byte_offset: int) -> None:
        """From now on the partition of `param` is the bytes at `byte_offset` of file `name`, which hold the same
        values: its piece of its sub-group's fp32 master, written by the optimizer's swapper. A partition without a
        file of its own (too small, or in the DRAM tier) keeps living where it is."""
        if param.ds_id in self._numel and param.ds_id not in self._resident:
            self._stored_in[param.ds_id] = (name, byte_offset)

    def keep_apart_from_master(self, param: torch.nn.Parameter) -> None:
        """The master of `param` is about to change outside a step (stage 3's `set_full_hp_param`), which leaves the
        partition as it is until the next step: the partition's current bytes go back to a file of its own, and
        the next step's update stores it in the master's file again."""
        location = self._stored_in.pop(param.ds_id, None)
        if location is None:
            return
        self._apart[param.ds_id] = location
        staging = self.runtime.staging(self._numel[param.ds_id] * self.dtype.itemsize)
        current = staging.view(self.dtype).narrow(0, 0, self._numel[param.ds_id])
        self.runtime.read(current, *location, kind=PARAMETERS).wait()
        self.runtime.write(current, parameter_file(param.ds_id), keep=staging, kind=PARAMETERS)

    def reserve_partitioned_swap_space(self, partition_num_elems: list[int]) -> None:
        """Stock DeepSpeed allocates a dedicated write-back buffer here; ours are drawn from the pool per write."""

    def swap_out_partitioned_params(
        self,
        dst_fp16_params: list[torch.nn.Parameter],
        src_fp32_params: list[torch.Tensor],
        in_read_ahead_memory: bool = False,
    ) -> None:
        """Starts writing updated master weights, in the parameter dtype, into the partitions' files.

        Nothing waits here: the writes run behind the rest of the step, and the next read of a partition waits for
        its own write (the runtime orders them), which is also where a failed write is reported. The updated
        partition is also handed over (`PendingUpdates.hand_over`) for a forward that is about to read it. A
        partition stored in its master's file (`store_in`) is not written here: the master's write is its write.

        Master weights of the parameter dtype (fp32 training) are written from the master's own buffer, which the
        writes keep alive; others are cast into one staging buffer for the whole sub-group, so that the step's pool
        holds few, similar-sized buffers rather than one per parameter. A master read ahead during backward
        (`in_read_ahead_memory`) is in memory nothing else needs before the next backward: handed over from there,
        it is kept until the forward takes it (`PendingUpdates.hand_over`, `limited=False`).
        """
        on_file: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        for param, master in zip(dst_fp16_params, src_fp32_params, strict=True):
            source = master.reshape(-1)[: self._numel[param.ds_id]]
            if param.ds_id in self._resident:
                self._resident[param.ds_id].copy_(source)
            else:
                on_file.append((param, source))
        if not on_file:
            return
        self._forget_kept(param for param, _ in on_file)
        limited = True
        if on_file[0][1].dtype == self.dtype:
            updated = [source for _, source in on_file]
            limited = not in_read_ahead_memory
        else:
            staging = self.runtime.step_staging(sum(src.numel() for _, src in on_file) * self.dtype.itemsize)
            updated, offset = [], 0
            for _, source in on_file:
                updated.append(staging.view(self.dtype).narrow(0, offset, source.numel()).copy_(source))
                offset += source.numel()
        for (param, _), low in zip(on_file, updated, strict=True):
            if param.ds_id in self._apart:
                self._stored_in[param.ds_id] = self._apart.pop(param.ds_id)
            if param.ds_id not in self._stored_in:
                self.runtime.write(low, *self._location(param), keep=low)
        handed = {param.ds_id: low for (param, _), low in zip(on_file, updated, strict=True)}
        self.runtime.updates.hand_over(handed, limited)

    # -- internals ------------------------------------------------------------------------------------------------

    def _held_bytes(self) -> int:
        """Bytes of the pooled buffers of the partitions held (in memory or being read), kept ones not counted."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())

    def _hold(self, param: torch.nn.Parameter, numel: int) -> torch.Tensor:
        """Assigns `param` a pooled buffer for `numel` elements, giving back kept ones or else waiting for room, and
        returns the partition's view of it."""
        nbytes = numel * self.dtype.itemsize
        buffer = self._staging(nbytes)
        self._buffers[param.ds_id] = self.runtime.staging(nbytes) if buffer is None else buffer
        return self._view(param)

    def _view(self, param: torch.nn.Parameter) -> torch.Tensor:
        return self._buffers[param.ds_id].view(self.dtype).narrow(0, 0, self._numel[param.ds_id])

    def _location(self, param: torch.nn.Parameter) -> tuple[str, int]:
        """The file and byte offset that hold the partition of `param`."""
        return self._stored_in.get(param.ds_id, (parameter_file(param.ds_id), 0))
