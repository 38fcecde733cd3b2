"""The offloaded record's state machine (`activations.states`), on its own: every path, and nothing after the end."""

from __future__ import annotations

import pytest

from deepspeed_fuyou.activations.states import IN_FLIGHT, Where, successor


def path(tier: str, on_gpu: bool) -> list[Where]:
    states = [Where.KEPT]
    while states[-1] is not Where.RESTORED:
        states.append(successor(states[-1], tier, on_gpu))
    return states


@pytest.mark.parametrize(
    ("tier", "on_gpu", "expected"),
    [
        ("cpu", True, "KEPT COPYING STORED UPLOADING RESTORED"),
        ("cpu", False, "KEPT STORED RESTORED"),
        ("nvme", True, "KEPT COPYING WRITING STORED READING UPLOADING RESTORED"),
        ("nvme", False, "KEPT WRITING STORED READING RESTORED"),
    ],
)
def test_each_tier_and_device_walks_one_path_from_kept_to_restored(tier: str, on_gpu: bool, expected: str) -> None:
    assert [state.name for state in path(tier, on_gpu)] == expected.split()


def test_every_path_passes_stored_once_and_every_other_middle_state_is_a_transfer_in_flight() -> None:
    for tier in ("cpu", "nvme"):
        for on_gpu in (True, False):
            middle = path(tier, on_gpu)[1:-1]
            assert middle.count(Where.STORED) == 1
            assert all(state in IN_FLIGHT for state in middle if state is not Where.STORED)


@pytest.mark.parametrize("end", [Where.RESTORED, Where.FAILED])
def test_nothing_follows_the_end_states(end: Where) -> None:
    with pytest.raises(ValueError, match=end.name):
        successor(end, "nvme", on_gpu=True)
