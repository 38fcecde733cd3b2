"""Parameters whose optimizer step is still running behind compute, and the updated partitions it hands over.

With `optimizer.overlap: "forward"`, `step()` returns before the sub-groups are stepped; they are stepped behind the
next forward. Whatever reads a parameter partition in between (stage 3 gathering a parameter, the parameter swapper
reading its file, a `GatheredParameters` block) must first wait for the sub-group that owns it. This registry, shared
by the swappers of one process through their `SwapRuntime`, says which partitions are pending and lets readers wait.

It also holds the low-precision partitions a step has just produced (`hand_over`), so that the forward that reads
them next takes them from memory instead of reading back what was just written (`take`). Those buffers come from the
step's pinned pool, which budgets `hand_over_sub_groups` sub-groups' buffers for them: past that, the oldest
sub-group's are dropped and read from their files. So the step thread does not run further ahead of the forward than
that (`wait_until_taken`): where the step is faster than the forward, each sub-group it stepped ahead would push out
partitions the forward then reads back from the SSD, queued behind the step's own writes. It holds back only while
nobody waits for it (`reader_waiting`): a forward that needs a sub-group not yet stepped, the end of the step being
waited for, or a failure lets it go on at once, so the two threads never wait for each other. A master read ahead
during backward (`optimizer.read_ahead`, fp32 training) is handed over from memory nothing else needs until the next
backward: it is kept whatever the limit, so the step steps those sub-groups as fast as it can.

A step that fails wakes every waiter with its error (`fail`), so a reader never waits for an update that will not
come.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Hashable, Iterable, Iterator

import torch


class PendingUpdates:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: dict[Hashable, threading.Event] = {}  # key of a step (a sub-group) -> set once it is stepped
        self._owner: dict[int, Hashable] = {}  # ds_id of a pending partition -> the step that updates it
        self._members: dict[Hashable, list[int]] = {}  # the inverse: key -> ds_ids
        self._fresh: dict[int, tuple[torch.Tensor, int]] = {}  # ds_id -> (updated partition, its hand-over's number)
        self._fresh_bytes = 0
        self._hand_overs = 0  # hand-overs numbered so far (one per sub-group stepped)
        # limited hand-overs with partitions not yet taken, oldest first: number -> those partitions' ds_ids
        self._held: collections.OrderedDict[int, set[int]] = collections.OrderedDict()
        self.taken_bytes = 0  # over the run: handed-over partitions a reader took from memory
        self.pushed_out_bytes = 0  # over the run: handed-over partitions dropped for the limit before anyone took them
        self._room = threading.Condition(self._lock)  # notified when a hand-over is taken or the step may go on
        self._readers = 0  # threads waiting for a step (`reader_waiting`): the step thread must not hold back then
        self.hand_over_sub_groups = 0  # limited hand-overs kept at once (`sizing.HAND_OVER_SUB_GROUPS`); 0: none
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
            self._room.notify_all()
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
        if events:
            with self.reader_waiting():
                for event in events:
                    event.wait()
        self.raise_error()

    @contextlib.contextmanager
    def reader_waiting(self) -> Iterator[None]:
        """Marks the calling thread as waiting for the step thread (a pending update, the end of every step): while
        it waits, `wait_until_taken` does not hold the step back."""
        with self._room:
            self._readers += 1
            self._room.notify_all()
        try:
            yield
        finally:
            with self._lock:
                self._readers -= 1

    def wait_until_taken(self) -> None:
        """Called by the step thread before it steps a sub-group: blocks while the sub-group's hand-over would push
        out partitions not yet taken, unless a reader waits for a step (`reader_waiting`) or a step failed."""
        with self._room:
            self._room.wait_for(lambda: self._has_room() or self._readers > 0 or self.error is not None)

    def _has_room(self) -> bool:
        return not self.hand_over_sub_groups or len(self._held) < self.hand_over_sub_groups

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def hand_over(self, partitions: dict[int, torch.Tensor], limited: bool = True) -> None:
        """Keeps the updated partitions of one sub-group (ds_id -> a view of a pooled buffer) for the next reader.

        Of those `limited`, the last `hand_over_sub_groups` sub-groups' are kept (their buffers are what the step's
        pool budgets for them); an older one's partitions not yet taken are pushed out. `limited=False`: the buffer
        is memory that nothing else needs before the forward is over (the master of a sub-group read ahead, in fp32
        training), so it is kept whatever the limit, and never holds the step back. With `hand_over_sub_groups` 0
        nothing is kept."""
        with self._lock:
            for ds_id in partitions:
                self._drop(ds_id)  # an older value
            if not self.hand_over_sub_groups:
                return
            number = self._hand_overs
            self._hand_overs += 1
            if limited:
                while len(self._held) >= self.hand_over_sub_groups:
                    _, oldest = self._held.popitem(last=False)
                    for ds_id in oldest:
                        self.pushed_out_bytes += self._drop(ds_id)
                self._held[number] = set(partitions)
            for ds_id, partition in partitions.items():
                self._fresh[ds_id] = (partition, number)
                self._fresh_bytes += partition.numel() * partition.element_size()

    def has_hand_over(self, ds_id: int) -> bool:
        with self._lock:
            return ds_id in self._fresh

    def take(self, ds_id: int) -> torch.Tensor | None:
        """The updated partition of `ds_id` if one was handed over (and not yet taken), else None."""
        with self._lock:
            partition, _ = self._fresh.get(ds_id, (None, 0))
            self.taken_bytes += self._drop(ds_id)
            self._room.notify_all()
            return partition

    def discard(self, ds_id: int) -> None:
        """Forgets a handed-over partition that is now out of date (a newer value was written)."""
        with self._lock:
            self._drop(ds_id)
            self._room.notify_all()

    def clear_hand_overs(self) -> None:
        with self._lock:
            self._fresh.clear()
            self._held.clear()
            self._fresh_bytes = 0
            self._room.notify_all()

    @property
    def hand_over_bytes(self) -> int:
        return self._fresh_bytes

    def _drop(self, ds_id: int) -> int:
        """Forgets the hand-over of `ds_id`; returns its bytes (0 if there was none)."""
        partition, number = self._fresh.pop(ds_id, (None, 0))
        if partition is None:
            return 0
        waiting = self._held.get(number)
        if waiting is not None:
            waiting.discard(ds_id)
            if not waiting:
                del self._held[number]
        nbytes = partition.numel() * partition.element_size()
        self._fresh_bytes -= nbytes
        return nbytes
