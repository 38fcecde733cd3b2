"""Activation offload: the tensors autograd saves for backward go to host memory or the SSD, and come back in time.

Built on `torch.autograd.graph.saved_tensors_hooks`. Autograd hands the pack hook a detached alias of every tensor it
saves; the hook returns a small handle that the graph keeps instead, and the unpack hook turns the handle back into
a tensor with the same bytes when backward needs it.

* What moves: the storage under a saved tensor, when it is at least `min_tensor_size` bytes and is not a parameter's
  (a linear layer saves its weight, or a transposed view of it; under ZeRO-3 the gathered weight). Parameters are
  recognised by storage identity, checked against the parameters of the layer being run (cheap, and right under
  ZeRO-3, whose gathered storages change every step).
* Deduplication: a storage saved several times in one forward (a view saved by two operators, a tensor saved as
  the output of one and the input of the next) is moved once; every handle rebuilds its own view of it.
* Forwarding: a handle holds the storage only weakly once it is written; if anything still holds the storage when
  backward needs it, the handle uses it and reads nothing.
* Overlap: writes start in the pack hook and run behind the forward (device -> pinned on a side stream, then the
  I/O engine); backward reads run `prefetch_layers` layers ahead of the layer whose backward is starting, signalled
  by a gradient hook on each layer's output (it fires just before that layer's backward).
* Release: a handle lives exactly as long as autograd needs the saved tensor; when the last handle of a storage goes,
  its host copy, staging buffer and restored copy go with it, and when every storage of a forward pass is gone, so
  is that pass's file.
* Failure: a write that fails raises FuyouIOError from the next hook that runs (the same forward, or at the latest
  the backward that would have needed the data), and a storage whose write failed can never be unpacked.

Nesting: our hooks are pushed when the model's forward starts, so hooks pushed inside it are innermost and win:
inside a region under non-reentrant activation checkpointing (torch's `use_reentrant=False`), the checkpoint's hooks
decide, it saves nothing and recomputes in backward, and we move nothing; what the region's caller saves is ours.
Reentrant checkpointing (torch's `use_reentrant=True`, DeepSpeed's `checkpointing.checkpoint`) saves each region's
inputs with `save_for_backward` under our hooks: those are offloaded, and the recomputation in backward, which runs
after our forward has ended, keeps its activations on the device as usual.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from deepspeed_fuyou.activations.policy import layers_to_keep, measure
from deepspeed_fuyou.activations.states import IN_FLIGHT, Where, successor
from deepspeed_fuyou.activations.transfers import (
    DeviceCopies,
    aligned_host_bytes,
    remove_files,
    storage_bytes,
    tier_bandwidth,
)
from deepspeed_fuyou.config.fuyou import ActivationOptions
from deepspeed_fuyou.errors import FuyouIOError
from deepspeed_fuyou.io.engine import ALIGNMENT, IOEngine, IOFuture
from deepspeed_fuyou.io.pinned import PinnedPool
from deepspeed_fuyou.io.swap_space import SwapSpace
from deepspeed_fuyou.plan.layers import HEAD, on_backward_reaching, repeated_layers
from deepspeed_fuyou.storages import WeakStorage, storage_key

log = logging.getLogger(__name__)


@dataclass
class ActivationStats:
    """Counters of the hooks since the offloader was made; bytes are storage bytes."""

    saved: int = 0  # tensors autograd saved, parameters excluded
    offloaded: int = 0  # storages sent to the tier
    offloaded_bytes: int = 0
    deduplicated: int = 0  # saves served by a storage already saved in the same forward
    forwarded: int = 0  # unpacks of an offloaded storage served by the still-alive original: nothing read
    reads: int = 0
    read_bytes: int = 0
    waited_seconds: float = 0.0  # time backward spent waiting for a read that was not finished
    kept_layers: int = 0  # last layers the policy keeps in device memory (auto)
    resident_bytes: int = 0  # saved bytes the hooks hold in device memory now
    peak_resident_bytes: int = 0


class _Pass:
    """The saved tensors of one forward pass: its own file on the SSDs, removed once backward has consumed them."""

    def __init__(self, number: int, files: list[str]) -> None:
        self.number = number
        self.files = files
        self.end = 0  # bump allocator over the file: a pass only ever appends
        self.live = 0  # records of this pass still referenced
        self.open = True
        self.layers: dict[int, list[weakref.ref[_Record]]] = {}
        self.layer_seconds: dict[int, float] = {}
        self.layer_bytes: dict[int, int] = {}

    def allocate(self, nbytes: int) -> int:
        offset = self.end
        self.end += -(-nbytes // ALIGNMENT) * ALIGNMENT
        return offset

    def remove_files(self) -> None:
        remove_files(self.files)


@dataclass
class _Held:
    """Device bytes a record holds: what the offloader's resident count gives back when the record goes."""

    nbytes: int = 0


class _Record:
    """One saved storage of one forward pass, and where its bytes are. When the last handle lets it go, its memory
    goes, and with the pass's last record the pass's file (`ActivationOffloader._forget`)."""

    def __init__(self, owner: ActivationOffloader, fpass: _Pass, storage: torch.UntypedStorage, layer: int) -> None:
        self.owner = owner
        self.fpass = fpass
        self.layer = layer
        self.nbytes = storage.nbytes()
        self.device = storage.device
        self._weak = WeakStorage(storage)
        self.state = Where.KEPT
        self.source: torch.Tensor | None = None  # the storage's bytes, held while they must stay on the device
        self.host: torch.Tensor | None = None  # cpu tier: the copy; nvme tier: a staging buffer in transit
        self.offset = -1
        self.future: IOFuture | None = None
        self.event: torch.cuda.Event | None = None
        self.restored: torch.Tensor | None = None  # bytes back on the device, with their offset in their storage
        self.restored_delta = 0
        self.error: BaseException | None = None
        self.held = _Held()  # its bytes in device memory now
        self.handles = 0  # _Saved handles the autograd graph still holds
        fpass.live += 1
        finalizer = weakref.finalize(self, owner._forget, fpass, self.held, self._weak)
        finalizer.atexit = False  # at exit the memory and the files go with the process and its swap directory

    def live_storage(self) -> torch.UntypedStorage | None:
        """The original storage if anything still holds it (forwarding), else None."""
        if self.source is not None:
            return self.source.untyped_storage()
        return self._weak.get()


class _Saved:
    """What the autograd graph holds instead of a saved tensor: its record and how to rebuild the view."""

    __slots__ = ("__weakref__", "dtype", "kept", "offset", "record", "shape", "stride")

    def __init__(self, record: _Record, tensor: torch.Tensor, kept: bool) -> None:
        self.record = record
        self.kept = tensor if kept else None
        self.dtype = tensor.dtype
        self.shape = tensor.shape
        self.stride = tensor.stride()
        self.offset = tensor.storage_offset()
        record.handles += 1
        weakref.finalize(self, record.owner._release, record).atexit = False

    def view(self, storage: torch.UntypedStorage, delta: int = 0) -> torch.Tensor:
        """The saved tensor rebuilt on `storage`, whose bytes start `delta` bytes into it."""
        offset = self.offset + delta // self.dtype.itemsize
        return torch.empty(0, dtype=self.dtype, device=storage.device).set_(storage, offset, self.shape, self.stride)


class ActivationOffloader:
    """Offloads the activations of `model`'s forward passes run inside `with offloader:` (or `offload_module`).

    `engine` and `space` are needed for the nvme tier; `pool` gives pinned staging buffers when tensors live on a GPU.
    One offloader serves every forward pass of its model; `close()` waits for its transfers and removes its files.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        options: ActivationOptions,
        engine: IOEngine | None = None,
        space: SwapSpace | None = None,
        pool: PinnedPool | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if options.tier == "nvme" and (engine is None or space is None):
            raise ValueError("the nvme tier needs an I/O engine and a swap space")
        self.options = options
        self.engine = engine
        self.space = space
        self.pool = pool
        self.stats = ActivationStats()
        self._on_close = on_close
        self._copies = DeviceCopies()
        self._lock = threading.RLock()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._depth = 0
        self._passes = 0
        self._pass: _Pass | None = None
        self._in_flight: list[_Record] = []
        self._unreported_failure: BaseException | None = None  # of a transfer finished after its last reader went
        self._by_storage: weakref.WeakValueDictionary[int, _Record] = weakref.WeakValueDictionary()
        self._layers = repeated_layers(model)
        self._layer = HEAD
        self._layer_started = 0.0
        layer_params = {id(p) for layer in self._layers for p in layer.parameters()}
        self._outside_params = [p for p in model.parameters() if id(p) not in layer_params]
        self._measured = options.offload != "auto" or not self._layers
        self.stats.kept_layers = 1 if options.offload == "auto" and self._layers else 0
        self._module_hooks = [h for i, layer in enumerate(self._layers) for h in self._hook_layer(i, layer)]

    # ----- forward passes -------------------------------------------------------------------------------------

    def __enter__(self) -> ActivationOffloader:
        if self._depth == 0:
            self._begin_pass()
            self._hooks.__enter__()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._hooks.__exit__(*exc)
            self._end_pass(completed=exc[0] is None)

    def attach(self, module: torch.nn.Module) -> ActivationOffloader:
        """Offloads every forward of `module` from now on (until `remove()`): the module form of `with offloader:`."""

        def enter(module: torch.nn.Module, args: Any) -> None:
            self.__enter__()

        def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.__exit__(*sys.exc_info())

        self._module_hooks += [
            module.register_forward_pre_hook(enter),
            module.register_forward_hook(leave, always_call=True),  # also when forward raises: the stack stays right
        ]
        return self

    def _begin_pass(self) -> None:
        with self._lock:
            self._reap()
            name = f"activations-{self._passes}"
            files = self.space.files(name) if self.space is not None else []
            self._pass = _Pass(self._passes, files)
            self._passes += 1
            self._layer = HEAD

    def _end_pass(self, completed: bool) -> None:
        """Closes the pass; a write already known to have failed is raised here, so the forward itself fails.

        Only a forward that ran to its end is measured for the auto policy: one that raised part-way (an
        out-of-memory retried with a smaller batch, as HF's `auto_find_batch_size` does) timed only some layers,
        and its average would fix the policy for the whole run.
        """
        with self._lock:
            fpass, self._pass = self._pass, None
            if fpass is None:
                return
            fpass.open = False
            if fpass.live == 0:
                fpass.remove_files()
            if not completed:
                return
            self._reap()
            if not self._measured and fpass.layer_bytes:  # a pass that saved nothing (no_grad) measures nothing
                self._measured = True
                bandwidth = functools.partial(tier_bandwidth, self.options.tier, self.engine, self.space)
                measured = measure(len(self._layers), fpass.layer_seconds, fpass.layer_bytes, bandwidth)
                self.stats.kept_layers = layers_to_keep(measured)
                log.info("fuyou: activation offload keeps the last %d layer(s) in place", self.stats.kept_layers)

    def _hook_layer(self, index: int, layer: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        def before(module: torch.nn.Module, args: Any) -> None:
            if self._pass is None:  # a recomputation in backward, or a forward without offload
                return
            if not self._measured and self._layer_timed():
                torch.cuda.synchronize()
            self._layer = index
            self._layer_started = time.perf_counter()

        def after(module: torch.nn.Module, args: Any, output: Any) -> None:
            fpass = self._pass
            if fpass is None:
                return
            if not self._measured:
                if self._layer_timed():
                    torch.cuda.synchronize()
                fpass.layer_seconds[index] = time.perf_counter() - self._layer_started
            self._layer = index + 1  # the last layer's successor is the tail (head, loss)
            on_backward_reaching(output, lambda: self._backward_reaches(fpass, index))

        return [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]

    def _layer_timed(self) -> bool:
        return torch.cuda.is_available() and torch.cuda.is_initialized()

    # ----- pack: forward --------------------------------------------------------------------------------------

    def _pack(self, tensor: torch.Tensor) -> Any:
        if not self._may_offload(tensor) or self._is_parameter(tensor):
            return tensor
        with self._lock:
            self._reap()
            fpass = self._pass
            storage, key = tensor.untyped_storage(), storage_key(tensor)
            record = self._by_storage.get(key)
            self.stats.saved += 1
            if record is not None and record.fpass is fpass:
                self.stats.deduplicated += 1
            else:
                record = self._by_storage[key] = _Record(self, fpass, storage, self._layer)
                fpass.layers.setdefault(self._layer, []).append(weakref.ref(record))
                if record.nbytes >= self.options.min_tensor_size:
                    fpass.layer_bytes[self._layer] = fpass.layer_bytes.get(self._layer, 0) + record.nbytes
                if self._offloads(record):
                    self._offload(record, storage)
                else:  # every handle of a kept record holds its own tensor, and with it the storage
                    self._hold(record, record.nbytes)
            return _Saved(record, tensor, kept=record.state is Where.KEPT)

    @staticmethod
    def _may_offload(tensor: torch.Tensor) -> bool:
        return (
            type(tensor) is torch.Tensor
            and tensor.layout == torch.strided
            and tensor.device.type in ("cpu", "cuda")
            and not tensor.is_quantized
            and not tensor.is_conj()
            and not tensor.is_neg()
        )

    def _is_parameter(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` shares its storage with a parameter of the layer being run (or of no layer)."""
        in_layer = 0 <= self._layer < len(self._layers)
        params = self._layers[self._layer].parameters() if in_layer else self._outside_params
        key = storage_key(tensor)
        return any(storage_key(p) == key for p in params)

    def _offloads(self, record: _Record) -> bool:
        if record.nbytes < self.options.min_tensor_size:
            return False
        if self.options.offload == "all" or not self._layers:
            return True
        return record.layer < len(self._layers) - self.stats.kept_layers

    def _offload(self, record: _Record, storage: torch.UntypedStorage) -> None:
        """Starts moving the storage off the device; the record holds it until its bytes are safe elsewhere."""
        self.stats.offloaded += 1
        self.stats.offloaded_bytes += record.nbytes
        self._move(record, source=storage_bytes(storage))

    def _move(self, record: _Record, source: torch.Tensor | None = None) -> None:
        """Takes `record` to its next state (`states.successor`): settles the transfer that has just finished and
        starts the next one. `source` is the storage's bytes, for the first move."""
        before = record.state
        after = successor(before, self.options.tier, record.device.type == "cuda")
        n = record.nbytes
        if after is Where.COPYING:  # off a GPU: into pinned memory first
            assert source is not None
            cpu_tier = self.options.tier == "cpu"
            record.host = self._host_buffer(n, pinned=True) if cpu_tier else self._staging(n)
            record.event = self._copies.to_host(source, record.host[:n])
            record.source = source
            self._hold(record, n)
        elif after is Where.WRITING:
            if before is Where.KEPT:  # host memory: the engine writes straight from the tensor, which stays held
                assert source is not None
                record.source = data = source
                self._hold(record, n)
            else:
                self._drop_source(record)
                data = record.host[:n]
            record.offset = record.fpass.allocate(n)
            record.future = self.engine.write(data, record.fpass.files, record.offset)
        elif after is Where.STORED:
            if before is Where.KEPT:  # cpu tier on a host device: the copy takes the original's place in memory
                assert source is not None
                record.host = self._host_buffer(n, pinned=False)
                record.host[:n].copy_(source)
                self._hold(record, n)
            else:
                self._drop_source(record)
                if before is Where.WRITING:
                    record.host = None  # the staging buffer goes back to the pool
        elif after is Where.READING:
            if record.device.type == "cuda":
                record.host = self._staging(n)
                target = record.host[:n]
            else:  # into new host memory, aligned for O_DIRECT, which then is the tensor's
                target, record.restored_delta = aligned_host_bytes(n)
                record.restored = target
                self._hold(record, n)
            record.future = self.engine.read(target, record.fpass.files, record.offset)
        elif after is Where.UPLOADING:
            record.restored, record.event = self._copies.to_device(record.host[:n], record.device)
            self._hold(record, n)
        elif before is Where.STORED:  # RESTORED, cpu tier on a host device: the host copy is the tensor
            record.restored, record.restored_delta, record.host = record.host[:n], 0, None
        elif before is Where.UPLOADING:  # RESTORED: the pinned buffer goes back; the event stays for users
            record.host = None
        if before is Where.STORED:
            self.stats.reads += 1
            self.stats.read_bytes += n
        record.state = after
        if after in IN_FLIGHT and record not in self._in_flight:
            self._in_flight.append(record)

    def _host_buffer(self, nbytes: int, pinned: bool) -> torch.Tensor:
        """Host memory for a cpu-tier copy: pinned from the pool while it has room (fast, async), else pageable."""
        if pinned and self.pool is not None:
            buffer = self.pool.try_acquire(nbytes)
            if buffer is not None:
                return buffer
        return torch.empty(nbytes, dtype=torch.uint8)

    def _staging(self, nbytes: int) -> torch.Tensor:
        """A pinned staging buffer; while the pool is full, our own oldest transfers are finished first."""
        assert self.pool is not None, "offloading GPU tensors to the SSD needs a pinned pool"
        while (buffer := self.pool.try_acquire(nbytes)) is None and self._in_flight:
            self._advance(self._in_flight[0], block=True)
            self._in_flight.pop(0)
            self._reap()
        return buffer if buffer is not None else self.pool.acquire(nbytes)

    # ----- unpack: backward -----------------------------------------------------------------------------------

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Saved):
            return saved
        with self._lock:
            self._reap()
            record = saved.record
            if record.error is not None:
                raise record.error
            if saved.kept is not None:
                return saved.kept
            storage = record.live_storage()
            if storage is not None and record.state is not Where.RESTORED:
                self.stats.forwarded += 1
                return saved.view(storage)
            if record.state is Where.STORED:
                self._move(record)
            if record.state in IN_FLIGHT:
                started = time.perf_counter()
                self._advance(record, block=True)  # raises the transfer's error, if any
                self.stats.waited_seconds += time.perf_counter() - started
            assert record.restored is not None
            DeviceCopies.use_on_current_stream(record.restored, record.event)
            return saved.view(record.restored.untyped_storage(), record.restored_delta)

    def _backward_reaches(self, fpass: _Pass, index: int) -> None:
        """Backward is about to run layer `index`: start reading the layers below it, `prefetch_layers` deep."""
        with self._lock:
            self._reap()
            for layer in range(index - 1, max(index - 1 - self.options.prefetch_layers, HEAD - 1), -1):
                for ref in fpass.layers.get(layer, []):
                    record = ref()
                    if record is not None and record.state is Where.STORED and record.live_storage() is None:
                        self._move(record)

    # ----- the transfer state machine -------------------------------------------------------------------------

    def _advance(self, record: _Record, block: bool) -> None:
        """Moves a record's transfers on as far as they can go (all the way with `block`); raises its I/O error."""
        try:
            while record.state in IN_FLIGHT:
                if record.state in (Where.COPYING, Where.UPLOADING):
                    assert record.event is not None
                    if not block and not record.event.query():
                        return
                    record.event.synchronize()
                else:
                    assert record.future is not None
                    if not block and not record.future.done():
                        return
                    record.future.wait()
                    record.future = None
                self._move(record)
        except BaseException as err:
            record.state, record.error = Where.FAILED, err
            self._drop_source(record)
            record.host = record.restored = None
            raise

    def _reap(self) -> None:
        """Advances every transfer in flight without waiting; raises the first failure found."""
        still: list[_Record] = []
        failure, self._unreported_failure = self._unreported_failure, None
        for record in self._in_flight:
            try:
                self._advance(record, block=False)
            except BaseException as err:
                failure = failure or err
                continue
            if record.state in IN_FLIGHT:
                still.append(record)
        self._in_flight = still
        if failure is not None:
            raise failure

    def _drop_source(self, record: _Record) -> None:
        if record.source is not None:
            record.source = None
            self._hold(record, 0)

    def _hold(self, record: _Record, nbytes: int) -> None:
        """Sets the device bytes counted for `record` (resident saved bytes) and the peak."""
        self.stats.resident_bytes += nbytes - record.held.nbytes
        record.held.nbytes = nbytes
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.stats.resident_bytes)

    def _release(self, record: _Record) -> None:
        """One handle of `record` is gone. With its last one nothing will read the bytes any more, so a transfer
        still in flight (a write lagging behind a backward that forwarded the live tensor) is finished now: the
        record, and with the pass's last record the pass's file, then go at once instead of at the next pass.
        Its failure is raised by the offloader's next unpack or pack, not here: the graph frees handles in a
        destructor, where an exception would only be printed."""
        with self._lock:
            record.handles -= 1
            if record.handles or record not in self._in_flight:
                return
            try:
                self._advance(record, block=True)
            except BaseException as err:
                self._unreported_failure = self._unreported_failure or err
            finally:
                self._in_flight = [other for other in self._in_flight if other is not record]

    def _forget(self, fpass: _Pass, held: _Held, weak: WeakStorage) -> None:
        """A record is gone (its finalizer): its memory goes, and with the pass's last record, the pass's file."""
        weak.free()
        with self._lock:
            self.stats.resident_bytes -= held.nbytes
            fpass.live -= 1
            if fpass.live == 0 and not fpass.open:
                fpass.remove_files()

    # ----- end of life ----------------------------------------------------------------------------------------

    @property
    def saved_storages(self) -> int:
        """Storages of forward passes that the autograd graphs still hold handles of (kept or moved)."""
        with self._lock:
            return len(self._by_storage)

    @property
    def transfers_in_flight(self) -> int:
        """Copies, writes and reads started and not yet seen finished."""
        with self._lock:
            return len(self._in_flight)

    def flush(self) -> None:
        """Waits for every transfer in flight; raises the first failure."""
        with self._lock:
            while self._in_flight:
                record = self._in_flight.pop(0)
                self._advance(record, block=True)

    def remove(self) -> None:
        """Detaches the layer hooks from the model (what is saved already still comes back)."""
        for handle in self._module_hooks:
            handle.remove()
        self._module_hooks = []

    def close(self) -> None:
        """Detaches from the model, finishes transfers in flight and releases what the offloader owns."""
        self.remove()
        try:
            self.flush()
        except FuyouIOError as err:  # nothing will read these bytes any more; say so, do not fail the shutdown
            log.warning("fuyou: an activation transfer failed while closing: %s", err)
        finally:
            if self._on_close is not None:
                self._on_close()
                self._on_close = None
