"""What the parameter and optimizer swappers of one process share: the I/O engine, the pinned pool, the swap space.

Both swappers draw staging buffers from one budget. A buffer that backs a write in flight cannot be reused until the
write ends, so a swapper that needs room first waits for the oldest writes rather than for the pool's timeout: the
pool never deadlocks on buffers that only our own unfinished writes hold.

Writes are never waited for just to be safe: a read (or another write) of a byte range waits only for the writes in
flight to that same range of that file. So write-back of one step runs behind the next one's compute, and a read
can never see data older than the last write issued before it.
"""

from __future__ import annotations

import atexit
import collections
import logging
from dataclasses import dataclass

import torch

from deepspeed_fuyou.config.fuyou import FuyouConfig
from deepspeed_fuyou.config.sizes import format_size
from deepspeed_fuyou.io.engine import ALIGNMENT, IOEngine, IOFuture
from deepspeed_fuyou.io.pinned import PinnedPool
from deepspeed_fuyou.io.swap_space import SwapSpace
from deepspeed_fuyou.swap.host_heap import install_host_cache

log = logging.getLogger(__name__)


def aligned(nbytes: int) -> int:
    """`nbytes` rounded up to the I/O alignment, the size of a staging buffer that holds them."""
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


@dataclass
class SwapCounters:
    """Bytes each direction moved through the swap files, for benchmarks and logs."""

    bytes_written: int = 0
    bytes_read: int = 0


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
        if config.host_cache:
            install_host_cache()
        self.pool = PinnedPool(config.pinned_memory)
        self.engine = IOEngine(config.io)
        self.space = SwapSpace([str(p) for p in config.nvme_paths])
        self.counters = SwapCounters()
        self._writes: collections.deque[_Write] = collections.deque()
        self.writes_started = 0
        log.info(
            "fuyou: swapping to %s with %s I/O, pinned budget %s",
            ", ".join(str(d) for d in self.space.dirs),
            self.engine.backend,
            format_size(config.pinned_memory),
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
        """A pooled uint8 buffer of at least `nbytes`, aligned; waits for our own writes first when the pool is full."""
        need = aligned(max(nbytes, 1))
        self._reap()
        while self._writes and self.pool.budget - self.pool.stats().in_use < need:
            self._wait_oldest()
        return self.pool.acquire(need)

    def write(self, tensor: torch.Tensor, name: str, offset: int = 0, keep: object = None) -> IOFuture:
        """Starts writing `tensor` into logical file `name`; `keep` (e.g. its staging buffer) lives until it ends."""
        nbytes = tensor.numel() * tensor.element_size()
        self._order_after_writes(name, offset, offset + nbytes)
        future = self.engine.write(tensor, self.files(name), offset)
        self.counters.bytes_written += nbytes
        self._writes.append(_Write(future, name, offset, offset + nbytes, keep, self.writes_started))
        self.writes_started += 1
        return future

    def read(self, tensor: torch.Tensor, name: str, offset: int = 0) -> IOFuture:
        """Starts reading logical file `name` at `offset` into `tensor`, after any write in flight to those bytes."""
        nbytes = tensor.numel() * tensor.element_size()
        self._order_after_writes(name, offset, offset + nbytes)
        self.counters.bytes_read += nbytes
        return self.engine.read(tensor, self.files(name), offset)

    def flush(self) -> None:
        """Waits for every write in flight; raises the first failure as FuyouIOError."""
        self.wait_for_writes(self.writes_started)

    def wait_for_writes(self, started_before: int) -> None:
        """Waits for the first `started_before` writes (a `writes_started` taken earlier); later ones stay in flight."""
        while self._writes and self._writes[0].number < started_before:
            self._wait_oldest()

    def _order_after_writes(self, name: str, start: int, end: int) -> None:
        """Waits for the writes in flight to bytes [start, end) of `name` (a failed one raises here)."""
        self._reap()
        for write in self._writes:
            if write.overlaps(name, start, end):
                write.future.wait()

    def _wait_oldest(self) -> None:
        self._writes.popleft().future.wait()

    def _reap(self) -> None:
        while self._writes and self._writes[0].future.done():
            self._wait_oldest()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.engine.close()
            self.space.close()


atexit.register(SwapRuntime.close_all)
