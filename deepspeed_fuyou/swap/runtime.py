"""What the parameter and optimizer swappers of one process share: the I/O engine, the pinned pools, the swap space.

The one budget `fuyou.pinned_memory` is split in pools (`sizing.pool_budgets`): `read_ahead_pool`
(`optimizer.read_ahead`, if any) for the sub-groups carried across the end of backward; of the rest, `pool`
(`PREFETCH_SHARE`) for what forward and backward hold (parameter partitions read ahead, activations on their way to
and from the SSD), and `step_pool` for the optimizer step (sub-groups' master weights, states and gradients,
updated parameters being written).
With the step running beside forward or backward (`optimizer.overlap`), each side then waits only for memory that
its own progress frees: the step thread never waits for the training thread's buffers, so neither can stall the
other, and buffers of one side never fragment the other's. A buffer that backs a write in flight cannot be reused
until the write ends, so a swapper that needs room first waits for the oldest writes rather than for the pool's
timeout: a pool never deadlocks on buffers that only our own unfinished writes hold.

Writes are never waited for just to be safe: a read (or another write) of a byte range waits only for the writes in
flight to that same range of that file. So write-back of one step runs behind the next one's compute, and a read
can never see data older than the last write issued before it.

The training thread and the optimizer's step thread (`optimizer.overlap`) share one runtime. The list of writes in
flight is guarded by a lock that is never held while waiting: a wait happens outside it, and a write leaves the list
only once it has ended, so no reader can miss a write still in flight.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
from dataclasses import dataclass, field

import torch

from deepspeed_fuyou.config.fuyou import FuyouConfig, OverlapMode
from deepspeed_fuyou.config.sizes import format_size
from deepspeed_fuyou.io.engine import ALIGNMENT, IOEngine, IOFuture
from deepspeed_fuyou.io.pinned import PinnedPool
from deepspeed_fuyou.io.swap_space import SwapSpace
from deepspeed_fuyou.plan.host_tier import HostTier
from deepspeed_fuyou.plan.sizing import aligned, pinned_budget_error, pool_budgets, window_peak
from deepspeed_fuyou.swap.host_heap import install_host_cache
from deepspeed_fuyou.swap.updates import PendingUpdates
from deepspeed_fuyou.trace import start_from_environment

log = logging.getLogger(__name__)


SWAP_FILE_KINDS = ("parameters", "gradients", "optimizer_states")
"""What a swap file holds; the estimator's traffic model (`estimator.step_time`) counts bytes by the same kinds."""


def parameter_file(ds_id: int) -> str:
    """The swap file of one low-precision parameter partition."""
    return f"param-{ds_id}"


def optimizer_file(sub_group: str, tensor: str) -> str:
    """The swap file of one sub-group's fp32 master (`tensor` "master") or optimizer state ("exp_avg", ...)."""
    return f"optim-{sub_group}-{tensor}"


def gradient_file(sub_group: str) -> str:
    """The swap file of one sub-group's fp32 gradient."""
    return optimizer_file(sub_group, "grad")


def swap_file_kind(name: str) -> str:
    """Which of `SWAP_FILE_KINDS` the file `name` (made by the functions above) holds."""
    if name.startswith("param-"):
        return "parameters"
    return "gradients" if name.endswith("-grad") else "optimizer_states"


@dataclass
class SwapCounters:
    """Bytes each direction moved through the swap files, in all and by `swap_file_kind`, for benchmarks and logs."""

    bytes_written: int = 0
    bytes_read: int = 0
    written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SWAP_FILE_KINDS, 0))
    read: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SWAP_FILE_KINDS, 0))
    reads_saved: int = 0  # partition bytes a fetch found still in memory, kept since their release, and did not read

    def count(self, name: str, nbytes: int, write: bool, kind: str | None = None) -> None:
        """Counts a transfer of file `name`, as `kind` if given (a parameter partition stored in a master file)."""
        kind = kind or swap_file_kind(name)
        if write:
            self.bytes_written += nbytes
            self.written[kind] += nbytes
        else:
            self.bytes_read += nbytes
            self.read[kind] += nbytes


@dataclass
class _Write:
    """A write in flight: what it covers (for ordering), and what must stay alive until it ends."""

    future: IOFuture
    name: str
    start: int
    end: int
    keep: object
    number: int  # how many writes were started before this one

    def overlaps(self, name: str, start: int, end: int) -> bool:
        return self.name == name and self.start < end and start < self.end


class SwapRuntime:
    """One per process and distinct `"fuyou"` block; created on first use, closed at exit."""

    _instances: dict[FuyouConfig, SwapRuntime] = {}  # noqa: RUF012 (process-wide registry)

    def __init__(self, config: FuyouConfig) -> None:
        self.config = config
        start_from_environment(int(os.environ.get("RANK", 0)))
        if config.host_cache:
            install_host_cache()
        budgets = pool_budgets(config, "forward")  # until the optimizer knows its mode and model (`size_pools`)
        self.pool = self._share_of_pinned_memory(budgets.forward_backward)
        self.step_pool = self._share_of_pinned_memory(budgets.step)
        self.read_ahead_pool = self._read_ahead_pool(budgets.read_ahead)
        self.step_slot_bytes = ALIGNMENT  # every step buffer is at least this (the optimizer swapper sets it)
        self.engine = IOEngine(config.io)
        self.space = SwapSpace([str(p) for p in config.nvme_paths], field="fuyou.nvme_paths")
        self.host = HostTier(config.placement.budget(config.pinned_memory))
        self.counters = SwapCounters()
        self.updates = PendingUpdates()
        self.window_peak = 0  # the most the parameter window may hold, kept partitions included (`size_pools`)
        self.files_replaced = 0  # times swap files got other bytes wholesale (a checkpoint): kept copies are stale
        self._writes: collections.deque[_Write] = collections.deque()
        self._lock = threading.Lock()
        self.writes_started = 0
        log.info(
            "fuyou: swapping to %s with %s I/O, pinned budget %s, DRAM tier %s",
            ", ".join(str(d) for d in self.space.dirs),
            self.engine.backend,
            format_size(config.pinned_memory),
            format_size(self.host.budget),
        )

    @classmethod
    def for_config(cls, config: FuyouConfig) -> SwapRuntime:
        runtime = cls._instances.get(config)
        if runtime is None:
            runtime = cls._instances[config] = cls(config)
        return runtime

    @classmethod
    def close_all(cls) -> None:
        """Waits for outstanding writes and removes every swap directory (also run at interpreter exit)."""
        for runtime in cls._instances.values():
            runtime.close()
        cls._instances.clear()

    def files(self, name: str) -> list[str]:
        return self.space.files(name)

    def staging(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least `nbytes` from `pool` (forward and backward), aligned; see `_acquire`."""
        return self._acquire(self.pool, nbytes)

    def try_staging(self, nbytes: int) -> torch.Tensor | None:
        """A buffer from `pool` if it has room now, else None (for work that may as well not be done)."""
        self._reap()
        return self.pool.try_acquire(aligned(max(nbytes, 1)))

    def step_staging(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least `nbytes` from `step_pool` (the optimizer step), aligned; see `_acquire`.

        Smaller requests get a whole `step_slot_bytes` (the largest sub-group's fp32 tensor): every buffer of the step
        pool then fits in any freed one, so the pool cannot fragment while the step runs beside compute and waits for
        no memory that its own progress will not free.
        """
        return self._acquire(self.step_pool, max(nbytes, self.step_slot_bytes))

    def gradient_staging(self, nbytes: int) -> torch.Tensor:
        """A buffer of `nbytes` from `step_pool` for a gradient on its way to the SSD.

        Gradients are written while backward runs and the step does not (its thread is drained before backward): they
        take the step's memory, not the pool that holds the parameters backward reads, and their exact size, since
        nothing of the step's slots is live to be fragmented around them.
        """
        return self._acquire(self.step_pool, nbytes)

    def _share_of_pinned_memory(self, budget: int) -> PinnedPool:
        """A pool of `budget` bytes out of `fuyou.pinned_memory`, whose errors name the whole setting."""
        total = self.config.pinned_memory
        fewer = "lower params.prefetch_layers so fewer buffers are held at once"
        return PinnedPool(budget, short_budget=pinned_budget_error("fuyou.pinned_memory", total, budget / total, fewer))

    def size_pools(self, mode: OverlapMode, forward_backward_need: int) -> None:
        """Sizes the pools for the optimizer's overlap `mode` and the model's parameter window (which needs
        `forward_backward_need` bytes of the forward/backward pool at most), before the optimizer takes anything
        from them: in "backward" nothing is carried and the read-ahead budget joins the step pool; with `read_ahead:
        "auto"` the forward/backward pool gives what its window leaves unused to the read-ahead pool
        (`sizing.pool_budgets`). The forward/backward pool is replaced once the writes of the parameters swapped out
        while the model was built have ended, which frees all of it. `window_peak` is then what the window may hold,
        partitions kept after their release included (`sizing.window_peak`)."""
        budgets = pool_budgets(self.config, mode, forward_backward_need)
        if budgets.forward_backward != self.pool.budget:
            self.flush()
            if self.pool.stats().in_use:  # partitions of an earlier model of this config: the pool stays as it is
                log.info("fuyou: the parameter window's pool stays at %s", format_size(self.pool.budget))
                spare = self.config.pinned_memory - self.pool.budget - budgets.step
                budgets = budgets._replace(forward_backward=self.pool.budget, read_ahead=min(budgets.read_ahead, spare))
            else:
                self.pool.trim()
                self.pool = self._share_of_pinned_memory(budgets.forward_backward)
        if budgets.step != self.step_pool.budget:
            assert self.step_pool.stats().reserved == 0, "the step pool is resized before its first use"
            self.step_pool = self._share_of_pinned_memory(budgets.step)
        if budgets.read_ahead != self.read_ahead_budget:
            self.read_ahead_pool = self._read_ahead_pool(budgets.read_ahead)
        self.window_peak = window_peak(forward_backward_need, self.pool.budget)

    @staticmethod
    def _read_ahead_pool(budget: int) -> PinnedPool | None:
        if not budget:
            return None
        return PinnedPool(budget, short_budget=pinned_budget_error("fuyou.optimizer.read_ahead", budget))

    @property
    def read_ahead_budget(self) -> int:
        """Bytes `optimizer.read_ahead` may carry: its pool's budget, 0 without one."""
        return self.read_ahead_pool.budget if self.read_ahead_pool is not None else 0

    def read_ahead_staging(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least `nbytes` from `read_ahead_pool`, for a sub-group carried across the end of backward.

        Every buffer is a whole `step_slot_bytes`, as in the step pool: the buffers are taken in a different order
        each step (reads ending as they may), and uniform ones always fit where others were freed, so the pool never
        unmaps and pins memory anew. They are released by the step's writes, so a full pool waits for our own writes
        only (`_acquire`); what is carried is sized to fit it (`sizing.read_ahead_plan`).
        """
        assert self.read_ahead_pool is not None, "optimizer.read_ahead is 0: nothing is carried"
        return self._acquire(self.read_ahead_pool, max(nbytes, self.step_slot_bytes))

    def pinned_peak_reserved(self) -> int:
        """The most the pools held at once, at most (the sum of their peaks)."""
        pools = [self.pool, self.step_pool, self.read_ahead_pool]
        return sum(pool.stats().peak_reserved for pool in pools if pool is not None)

    def _acquire(self, pool: PinnedPool, nbytes: int) -> torch.Tensor:
        """A pooled uint8 buffer; waits for our own writes first when the pool is full."""
        need = aligned(max(nbytes, 1))
        self._reap()
        while pool.budget - pool.stats().in_use < need and self._wait_oldest():
            pass
        return pool.acquire(need)

    def write(
        self, tensor: torch.Tensor, name: str, offset: int = 0, keep: object = None, kind: str | None = None
    ) -> IOFuture:
        """Starts writing `tensor` into logical file `name`; `keep` (e.g. its staging buffer) lives until it ends.
        `kind` counts the bytes as one of `SWAP_FILE_KINDS` other than the file's own."""
        nbytes = tensor.numel() * tensor.element_size()
        self._order_after_writes(name, offset, offset + nbytes)
        with self._lock:
            future = self.engine.write(tensor, self.files(name), offset)
            self.counters.count(name, nbytes, write=True, kind=kind)
            self._writes.append(_Write(future, name, offset, offset + nbytes, keep, self.writes_started))
            self.writes_started += 1
        return future

    def read(self, tensor: torch.Tensor, name: str, offset: int = 0, kind: str | None = None) -> IOFuture:
        """Starts reading logical file `name` at `offset` into `tensor`, after any write in flight to those bytes."""
        nbytes = tensor.numel() * tensor.element_size()
        self._order_after_writes(name, offset, offset + nbytes)
        with self._lock:
            self.counters.count(name, nbytes, write=False, kind=kind)
        return self.engine.read(tensor, self.files(name), offset)

    def flush(self) -> None:
        """Waits for every write in flight; raises the first failure as FuyouIOError."""
        self.wait_for_writes(self.writes_started)

    def wait_for_writes(self, started_before: int) -> None:
        """Waits for the first `started_before` writes (a `writes_started` taken earlier); later ones stay in flight."""
        while self._wait_oldest(started_before):
            pass

    def writes_ended(self, started_before: int) -> bool:
        """Whether the first `started_before` writes (a `writes_started` taken earlier) have all ended."""
        self._reap()
        with self._lock:
            return not self._writes or self._writes[0].number >= started_before

    def _order_after_writes(self, name: str, start: int, end: int) -> None:
        """Waits for the writes in flight to bytes [start, end) of `name` (a failed one raises here)."""
        self._reap()
        with self._lock:
            pending = [write.future for write in self._writes if write.overlaps(name, start, end)]
        for future in pending:
            future.wait()

    def _wait_oldest(self, started_before: int | None = None) -> bool:
        """Waits for the oldest write in flight (if it was started before `started_before`) and forgets it.

        Returns whether there was one. It stays listed while it is waited for, so readers keep ordering after it.
        """
        with self._lock:
            if not self._writes or (started_before is not None and self._writes[0].number >= started_before):
                return False
            oldest = self._writes[0]
        try:
            oldest.future.wait()
        finally:
            with self._lock:
                if self._writes and self._writes[0] is oldest:
                    self._writes.popleft()
        return True

    def _reap(self) -> None:
        """Forgets the writes that have ended (raising the first failure)."""
        while True:
            with self._lock:
                if not self._writes or not self._writes[0].future.done():
                    return
                oldest = self._writes.popleft()
            oldest.future.wait()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.engine.close()
            self.space.close()


atexit.register(SwapRuntime.close_all)
