"""The optimizer's step thread and its hyper-parameter snapshots, without DeepSpeed."""

from __future__ import annotations

import threading

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
