"""Parameters whose optimizer step is still running behind compute, and the updated partitions it hands over.

With `optimizer.overlap: "forward"`, `step()` returns before the sub-groups are stepped; they are stepped behind the
next forward. Whatever reads a parameter partition in between (stage 3 gathering a parameter, the parameter swapper
reading its file, a `GatheredParameters` block) must first wait for the sub-group that owns it. This registry, shared
by the swappers of one process through their `SwapRuntime`, says which partitions are pending and lets readers wait.

It also holds the low-precision partitions a step has just produced (`hand_over`), so that the forward that reads
them next takes them from memory instead of reading back what was just written (`take`). Those buffers come from the
pinned pool and are bounded by `hand_over_limit` bytes: past it, the oldest is dropped and read from its file.

A step that fails wakes every waiter with its error (`fail`), so a reader never waits for an update that will not
come.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Hashable, Iterable

import torch


class PendingUpdates:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: dict[Hashable, threading.Event] = {}  # key of a step (a sub-group) -> set once it is stepped
        self._owner: dict[int, Hashable] = {}  # ds_id of a pending partition -> the step that updates it
        self._members: dict[Hashable, list[int]] = {}  # the inverse: key -> ds_ids
        self._fresh: collections.OrderedDict[int, torch.Tensor] = collections.OrderedDict()
        self._fresh_bytes = 0
        self.hand_over_limit = 0
        self.error: BaseException | None = None

    def expect(self, key: Hashable, ds_ids: Iterable[int]) -> None:
        """The partitions `ds_ids` are stale until `done(key)`."""
        with self._lock:
            self._done[key] = threading.Event()
            self._members[key] = list(ds_ids)
            for ds_id in self._members[key]:
                self._owner[ds_id] = key

    def done(self, key: Hashable) -> None:
        with self._lock:
            event = self._done.pop(key, None)
            for ds_id in self._members.pop(key, ()):
                if self._owner.get(ds_id) == key:
                    del self._owner[ds_id]
        if event is not None:
            event.set()

    def fail(self, error: BaseException) -> None:
        """A step failed: every waiter, present and future, gets `error`."""
        with self._lock:
            self.error = error
            events = list(self._done.values())
        for event in events:
            event.set()

    def is_pending(self, ds_id: int) -> bool:
        return ds_id in self._owner

    def pending(self) -> bool:
        return bool(self._done)

    def wait(self, ds_ids: Iterable[int]) -> None:
        """Blocks until none of `ds_ids` is pending; raises the error of a failed step."""
        with self._lock:
            events = {self._done[self._owner[ds_id]] for ds_id in ds_ids if ds_id in self._owner}
        for event in events:
            event.wait()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def hand_over(self, ds_id: int, partition: torch.Tensor) -> None:
        """Keeps `partition` (a pooled buffer holding the updated partition of `ds_id`) for the next reader."""
        nbytes = partition.numel() * partition.element_size()
        with self._lock:
            if nbytes > self.hand_over_limit:
                return
            self._drop(ds_id)
            while self._fresh and self._fresh_bytes + nbytes > self.hand_over_limit:
                self._drop(next(iter(self._fresh)))
            self._fresh[ds_id] = partition
            self._fresh_bytes += nbytes

    def take(self, ds_id: int) -> torch.Tensor | None:
        """The updated partition of `ds_id` if one was handed over (and not yet taken), else None."""
        with self._lock:
            partition = self._fresh.get(ds_id)
            self._drop(ds_id)
            return partition

    def discard(self, ds_id: int) -> None:
        """Forgets a handed-over partition that is now out of date (a newer value was written)."""
        with self._lock:
            self._drop(ds_id)

    def clear_hand_overs(self) -> None:
        with self._lock:
            self._fresh.clear()
            self._fresh_bytes = 0

    @property
    def hand_over_bytes(self) -> int:
        return self._fresh_bytes

    def _drop(self, ds_id: int) -> None:
        partition = self._fresh.pop(ds_id, None)
        if partition is not None:
            self._fresh_bytes -= partition.numel() * partition.element_size()
