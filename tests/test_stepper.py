"""The optimizer's step thread and its hyper-parameter snapshots, without DeepSpeed."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from deepspeed_fuyou.swap.stepper import StepThread, hyperparameter_view, snapshot
from deepspeed_fuyou.swap.updates import PendingUpdates


def test_steps_run_in_submission_order_and_mark_their_parameters_updated() -> None:
    updates = PendingUpdates()
    thread = StepThread(updates)
    release = threading.Event()
    order: list[int] = []
    for key in range(3):
        updates.expect(key, [10 * key])
    thread.submit(0, lambda: (release.wait(), order.append(0)))
    thread.submit(1, lambda: order.append(1))
    thread.submit(2, lambda: order.append(2))
    assert updates.is_pending(0) and updates.is_pending(20) and thread.backlog() >= 2
    release.set()
    updates.wait([20])  # a reader of the last sub-group's parameter waits for it, and only that long
    thread.drain()
    assert order == [0, 1, 2] and not updates.pending()
    thread.close()


def test_a_failed_step_is_raised_at_every_later_call_and_wakes_every_waiter() -> None:
    updates = PendingUpdates()
    thread = StepThread(updates)
    ran: list[int] = []
    updates.expect(0, [1])
    updates.expect(1, [2])
    thread.submit(0, lambda: 1 / 0)
    thread.submit(1, lambda: ran.append(1))
    with pytest.raises(ZeroDivisionError):
        updates.wait([2])  # waits for a step that will never come: woken with the error instead of hanging
    with pytest.raises(ZeroDivisionError):
        thread.drain()
    with pytest.raises(ZeroDivisionError):
        thread.check()  # and again: the optimizer's state is no longer one step's, training must not go on
    assert ran == []  # nothing is stepped after a failure
    thread.close()


def test_a_step_runs_with_the_hyper_parameters_of_its_own_step_whatever_the_scheduler_does_meanwhile() -> None:
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, weight_decay=0.0)
    view = hyperparameter_view(optimizer)
    snapshot(view, optimizer)
    optimizer.param_groups[0]["lr"] = 100.0  # the scheduler moves on to the next step
    weight.grad = torch.ones(4)
    view.param_groups[0]["params"] = [weight]
    view.step()
    assert torch.allclose(weight.detach(), torch.full((4,), 0.9))  # Adam's first step moves by lr: 0.1
    assert optimizer.state[weight]["step"] == 1  # the state is the optimizer's own
    assert optimizer.param_groups[0]["lr"] == 100.0 and optimizer.param_groups[0]["params"] == [weight]
    del view  # a view never destroys what it shares (DeepSpeed's CPU Adam frees its native state in __del__)
    optimizer.step()
    assert optimizer.state[weight]["step"] == 2


def _blocked(target: Callable[[], None]) -> threading.Thread:
    """`target` started on a thread of its own, once it is seen to block (it has not returned within a moment; a
    target that does not block makes the caller's assertion fail, whatever the machine's speed)."""
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(0.2)
    return thread


def _handed_over_one(updates: PendingUpdates) -> None:
    """One sub-group's update handed over, where one is all the step keeps."""
    updates.hand_over_sub_groups = 1
    updates.hand_over({7: torch.zeros(4)})


def test_the_step_holds_back_until_the_forward_takes_the_partition_it_handed_over() -> None:
    updates = PendingUpdates()
    _handed_over_one(updates)
    step = _blocked(updates.wait_until_taken)
    assert step.is_alive()  # stepping on would push the partition out before the forward reads it
    assert updates.take(7) is not None
    step.join(30)
    assert not step.is_alive()


def test_the_step_goes_on_at_once_while_a_reader_waits_for_a_step() -> None:
    """The forward needs a sub-group not yet stepped: the step must not hold back then (neither would go on)."""
    updates = PendingUpdates()
    _handed_over_one(updates)
    step = _blocked(updates.wait_until_taken)
    assert step.is_alive()
    with updates.reader_waiting():
        step.join(30)
        assert not step.is_alive()
    again = _blocked(updates.wait_until_taken)
    assert again.is_alive()  # the reader has gone: the step holds back again
    updates.take(7)
    again.join(30)


@pytest.mark.parametrize("how", ["drain", "close"])
def test_waiting_for_the_step_thread_lets_a_held_back_step_finish(how: str) -> None:
    """`drain` (before backward, a checkpoint, an evaluation) and `close` (the end of training) wait for steps whose
    hand-over nobody will take: they must not hang."""
    updates = PendingUpdates()
    thread = StepThread(updates)
    ran: list[int] = []
    updates.expect(0, [7])
    updates.expect(1, [8])
    thread.submit(0, lambda: _handed_over_one(updates))
    thread.submit(1, lambda: (updates.wait_until_taken(), ran.append(1)))
    finished = _blocked(getattr(thread, how))
    finished.join(30)
    assert not finished.is_alive() and ran == [1] and not updates.pending()
    thread.close()


def test_a_failed_step_releases_a_held_back_one() -> None:
    updates = PendingUpdates()
    _handed_over_one(updates)
    step = _blocked(updates.wait_until_taken)
    updates.fail(RuntimeError("the step of another sub-group failed"))
    step.join(30)
    assert not step.is_alive()


def test_a_new_sub_groups_hand_over_pushes_out_the_oldest_one_of_those_kept() -> None:
    updates = PendingUpdates()
    updates.hand_over_sub_groups = 2
    updates.hand_over({1: torch.zeros(4), 2: torch.zeros(4)})
    updates.hand_over({3: torch.zeros(4)})
    assert updates.take(1) is not None  # the first sub-group's parameter 2 is still to be taken: room for no other
    step = _blocked(updates.wait_until_taken)
    assert step.is_alive()
    updates.hand_over({4: torch.zeros(4)})  # the next sub-group all the same, as when a reader waits for it
    assert updates.take(2) is None and updates.pushed_out_bytes == 16
    assert updates.take(3) is not None and updates.take(4) is not None and updates.taken_bytes == 48
    step.join(30)
    assert not step.is_alive()


def test_a_partition_in_read_ahead_memory_is_kept_past_the_limit_and_never_holds_the_step_back() -> None:
    """The master of a sub-group read ahead during backward is memory nothing else needs before the next backward:
    the forward gets every such partition from memory, however far the step runs ahead of it."""
    updates = PendingUpdates()
    updates.hand_over_sub_groups = 1
    for ds_id in range(3):
        updates.hand_over({ds_id: torch.zeros(4)}, limited=False)
    updates.wait_until_taken()  # returns at once
    updates.hand_over({3: torch.zeros(4)})  # one within the limit: pushes out none of the others
    assert all(updates.take(ds_id) is not None for ds_id in range(4)) and updates.pushed_out_bytes == 0


def test_without_hand_overs_nothing_is_kept() -> None:
    """The overlap modes other than "forward" step before any forward could take an update."""
    updates = PendingUpdates()
    updates.hand_over({1: torch.zeros(4)})
    assert updates.take(1) is None
