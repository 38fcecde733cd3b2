"""The optimizer's step thread: sub-groups stepped behind compute (`fuyou.optimizer.overlap`).

One thread steps sub-groups in the order they are submitted, while the training thread goes on with backward or the
next forward. Its waits on the SSD (a sub-group's state read in, its update written out) then cost no compute time,
and DeepSpeed's CPU Adam releases the GIL, so its arithmetic runs beside the training thread's too.

Whatever waits for the thread (`drain`, `wait_backlog`, `close`) says so to `PendingUpdates.reader_waiting`, so a
step held back until the forward takes its hand-over (`PendingUpdates.wait_until_taken`) goes on while it is waited
for.

A step that raises stops the thread's work: later submissions are not run, every waiter gets the error
(`PendingUpdates.fail`), and so does every later `check()` or `drain()`, i.e. the next call into the engine. The
error stays: the optimizer's state on the SSD is no longer one step's, so training must not go on from it.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

import torch

from deepspeed_fuyou.swap.updates import PendingUpdates
from deepspeed_fuyou.trace import mark_background_thread

log = logging.getLogger(__name__)


class StepThread:
    def __init__(self, updates: PendingUpdates, name: str = "fuyou-optimizer-step") -> None:
        self._updates = updates
        self._name = name
        self._tasks: deque[tuple[Hashable, Callable[[], None]]] = deque()
        self._busy = False  # a task has been taken and is running
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.error: BaseException | None = None
        atexit.register(_drain_at_exit, weakref.ref(self))

    def submit(self, key: Hashable, task: Callable[[], None]) -> None:
        """Runs `task` after everything submitted before; `updates.done(key)` once it has run."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the optimizer's step thread is closed")
            self._tasks.append((key, task))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def backlog(self) -> int:
        """Tasks submitted and not yet started."""
        with self._cond:
            return len(self._tasks)

    def wait_backlog(self, at_most: int) -> None:
        """Blocks until at most `at_most` tasks wait to start (back-pressure on the submitting thread)."""
        with self._updates.reader_waiting(), self._cond:
            self._cond.wait_for(lambda: len(self._tasks) <= at_most or self.error is not None)
        self.check()

    def idle(self) -> bool:
        with self._cond:
            return not self._tasks and not self._busy

    def drain(self) -> None:
        """Blocks until every submitted task has run; raises the error of one that failed."""
        with self._updates.reader_waiting(), self._cond:
            self._cond.wait_for(lambda: (not self._tasks and not self._busy) or self.error is not None)
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Finishes what was submitted, then ends the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            with self._updates.reader_waiting():
                thread.join()

    def _run(self) -> None:
        mark_background_thread()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._tasks or self._closed)
                if not self._tasks:
                    return
                key, task = self._tasks.popleft()
                self._busy = True
                self._cond.notify_all()
            failed = self.error is not None
            if not failed:
                try:
                    with torch.no_grad():  # grad mode is per thread: the optimizer's arithmetic builds no graph
                        task()
                except BaseException as err:
                    log.error("fuyou: the optimizer step of sub-group %s failed: %s", key, err)
                    self.error = err
                    self._updates.fail(err)
                    failed = True
            if not failed:
                self._updates.done(key)
            with self._cond:
                self._busy = False
                if failed:
                    self._tasks.clear()
                self._cond.notify_all()


def _drain_at_exit(ref: weakref.ReferenceType[StepThread]) -> None:
    """The end of training finishes the steps still running, before the swap files go."""
    thread = ref()
    if thread is not None:
        try:
            thread.close()
        except Exception as err:
            log.warning("fuyou: pending optimizer steps at exit: %s", err)


def hyperparameter_view(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer (same class, same state dict, same native handle) with its own `param_groups`.

    Steps run on the step thread use it: their learning rate, betas and weight decay are a snapshot taken for the
    step they belong to (`snapshot`), so a scheduler that moves the optimizer's own groups on to the next step in the
    meantime changes nothing here. The view never destroys what it shares (DeepSpeed's CPU Adam frees its native
    state in `__del__`).
    """
    view_class = type(f"{type(optimizer).__name__}StepView", (type(optimizer),), {"__del__": lambda self: None})
    view = object.__new__(view_class)
    view.__dict__.update(optimizer.__dict__)
    view.param_groups = []
    return view


def snapshot(view: torch.optim.Optimizer, optimizer: torch.optim.Optimizer) -> None:
    """Copies the optimizer's current hyper-parameters into `view` (each group's parameters left empty)."""
    view.param_groups = [_group_copy(group) for group in optimizer.param_groups]


def _group_copy(group: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key != "params"} | {"params": []}
