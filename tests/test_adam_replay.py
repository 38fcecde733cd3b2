"""A resumed DeepSpeed CPU Adam steps exactly as one that never stopped (`replay_adam_step_count`)."""

from __future__ import annotations

import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam

from deepspeed_fuyou.integration.zero_optimizer import replay_adam_step_count

STEPS = 7


def adam(weights: torch.Tensor) -> tuple[DeepSpeedCPUAdam, torch.Tensor]:
    parameter = torch.nn.Parameter(weights.clone())
    return DeepSpeedCPUAdam([parameter], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01), parameter


def step(optimizer: DeepSpeedCPUAdam, parameter: torch.Tensor, seed: int) -> None:
    parameter.grad = torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed))
    optimizer.step()


def resumed(running: DeepSpeedCPUAdam, parameter: torch.Tensor, replay: bool) -> torch.Tensor:
    """A fresh optimizer given the running one's weights and state (as a checkpoint load does), one step on."""
    fresh, fresh_parameter = adam(parameter.detach())
    fresh.state[fresh_parameter] = {
        k: v.clone() if torch.is_tensor(v) else v for k, v in running.state[parameter].items()
    }
    if replay:
        replay_adam_step_count(fresh)
    step(fresh, fresh_parameter, STEPS)
    return fresh_parameter.detach()


def test_replaying_the_step_count_makes_a_resumed_cpu_adam_step_bit_for_bit_like_the_running_one() -> None:
    running, parameter = adam(torch.randn(4096, generator=torch.Generator().manual_seed(0)))
    for seed in range(STEPS):
        step(running, parameter, seed)
    with_replay = resumed(running, parameter, replay=True)
    without_replay = resumed(running, parameter, replay=False)
    step(running, parameter, STEPS)
    assert torch.equal(with_replay, parameter.detach())
    assert not torch.equal(without_replay, parameter.detach()), "the powers agreed by chance: nothing was shown"
