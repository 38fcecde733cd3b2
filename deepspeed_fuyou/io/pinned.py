"""The pinned buffer pool: one byte budget for every host staging buffer (csrc/fuyou/pinned_pool.cpp).

Stock ZeRO-Infinity sizes pinned buffers per tensor and per swapper, so host memory grows with the model until the
OOM killer ends the run. Here every staging buffer comes out of one budget: a request that does not fit waits for
a release, and a request that can never fit, or waits too long, raises an error that says how much budget would
have been needed. The pool knows bytes, not settings: its owner passes `short_budget`, which turns that into an
error naming the setting the budget came from (`plan.sizing.pinned_budget_error`). Buffers are ordinary uint8 CPU
tensors; a buffer returns to the pool when its last view is gone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deepspeed_fuyou.config.sizes import format_size
from deepspeed_fuyou.errors import FuyouError
from deepspeed_fuyou.io import native

LOCK_MODES = ("auto", "cuda", "mlock", "none")

ShortBudget = Callable[[str, int, bool], Exception]
"""Builds the error for a request the pool cannot serve, from what happened, the pool budget that would have served
it, and whether the request waited (buffers held at once, rather than one too large)."""


def _short_budget(problem: str, need: int, waited: bool) -> FuyouError:
    return FuyouError(f"pinned pool: {problem}; it needs a budget of at least {format_size(need)}")


@dataclass(frozen=True)
class PoolStats:
    """The pool's own counters: the estimator's ground truth for pinned host memory."""

    budget: int
    reserved: int  # slabs the pool holds: in use + free for reuse
    in_use: int
    peak_reserved: int
    peak_in_use: int
    locked: int  # of `reserved`, how much is page-locked
    allocations: int  # slabs mapped
    evictions: int  # wholly free slabs unmapped to make room
    pieces_unmapped: int  # free ranges between buffers in use unmapped so that a larger buffer fits
    waits: int
    lock_mode: str


class PinnedPool:
    """Aligned, page-locked host buffers under one budget.

    `lock` picks how buffers are locked: "auto" registers them with CUDA when the extension was built with CUDA and
    a GPU is visible, else mlocks them; "mlock" and "none" force a mode. Without the privilege to lock (RLIMIT_MEMLOCK)
    buffers stay pageable and `stats().locked` shows it.
    """

    def __init__(
        self, budget: int, lock: str = "auto", timeout: float = 60.0, short_budget: ShortBudget = _short_budget
    ) -> None:
        if lock not in LOCK_MODES:
            raise ValueError(f"lock must be one of {LOCK_MODES}, got {lock!r}")
        if budget <= 0:
            raise ValueError(f"a pinned pool needs a positive budget, got {budget}")
        self.budget = budget
        self.timeout = timeout
        self._short_budget = short_budget
        self._pool = native.PinnedPool(budget, lock)

    def acquire(self, nbytes: int, timeout: float | None = None) -> torch.Tensor:
        """A uint8 tensor of `nbytes` whose memory is 4 KiB-aligned and (where permitted) page-locked.

        Blocks while the budget is exhausted; raises `short_budget`'s error after `timeout` seconds (default: the
        pool's), or at once if `nbytes` exceeds the whole budget.
        """
        timeout = self.timeout if timeout is None else timeout
        try:
            buffer = self._pool.acquire(nbytes, timeout)
        except ValueError as err:  # std::length_error: larger than the whole budget
            raise self._short_budget(f"one staging buffer needs {format_size(nbytes)}", nbytes, False) from err
        if buffer is None:
            stats = self.stats()
            problem = f"waited {timeout:g} s for {format_size(nbytes)} while {format_size(stats.in_use)} stayed in use"
            need = stats.in_use + nbytes
            if need <= self.budget:  # enough free bytes, but between buffers still in use: no range is large enough
                problem += f", the {format_size(self.budget - stats.in_use)} free in pieces too small for it"
                need = stats.reserved + nbytes
            raise self._short_budget(problem, need, True)
        return buffer

    def try_acquire(self, nbytes: int) -> torch.Tensor | None:
        """A buffer as `acquire` gives it if the budget has room now, else None (for callers with a fallback)."""
        if nbytes > self.budget:
            return None
        return self._pool.acquire(nbytes, 0.0)

    def room_for(self, nbytes: int) -> int:
        """How many buffers of `nbytes` `try_acquire` would give now, one after another. Free bytes between buffers
        in use count where the pool can unmap them and map a buffer anew; of CUDA-registered slabs, which can only be
        unregistered whole, only ranges that hold a whole buffer count."""
        return self._pool.room_for(nbytes)

    def acquire_tensor(
        self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, timeout: float | None = None
    ) -> torch.Tensor:
        """A pooled buffer viewed as a tensor of `shape` and `dtype`."""
        return self.acquire(math.prod(shape) * dtype.itemsize, timeout).view(dtype).view(shape)

    def stats(self) -> PoolStats:
        return PoolStats(**self._pool.stats())

    def trim(self) -> None:
        """Frees every cached idle buffer (the budget itself is unchanged)."""
        self._pool.trim()
