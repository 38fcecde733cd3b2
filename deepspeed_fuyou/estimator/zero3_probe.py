"""`python -m deepspeed_fuyou.estimator.zero3_probe REQUEST.json`: one model's step under ZeRO-Offload, timed.

The child process of `rates.compute_rates`. It reads the request (a transformers model config, micro-batch,
sequence length, dtype, the stage-3 knobs training sets, repeats), builds the model random-initialised under
`zero.Init` as training does, wraps it in a one-rank DeepSpeed engine with ZeRO-3, parameters and optimizer
offloaded to host memory (DeepSpeed's CPU Adam), and runs forward, backward and step `repeats + 1` times (the first
warms up).

Each phase is split into what its layers take and the rest, within the step itself: marks where the forward enters
the first layer and leaves the last one, and where the backward reaches the last layer and the first one, time the
layers; the optimizer step is split by parameters, Adam's work being proportional to them. Not the difference of
two cut models' totals: that difference is a few layers' worth of time, and on a shared machine a slow spell in
either total is multiplied by the model's depth over the layers between them (one such probe put a layer at 0.086 s
that ZeRO-Offload's own runs at 4 to 64 layers put at 0.108-0.117 s; RESULTS.md, 2026-12-07 18:35). `answer.json`
in the working directory gets each of `ComputeRates`'s fields as the median over the timed steps: a training step
meets this machine's noise too, and the model predicts its typical step, not its fastest.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deepspeed_fuyou.plan.layers import full_numel, on_backward_reaching, repeated_layers

PHASES = ("forward", "backward", "step")  # the order a step runs them in


class _Clock:
    """Marks on the accelerator's timeline: CUDA events on a GPU, where the host runs ahead of the kernels it
    queues; the host's clock elsewhere. Read only after the phase synchronised."""

    def __init__(self, cuda: bool) -> None:
        self._cuda = cuda

    def mark(self) -> Any:
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1000 if self._cuda else end - start


class _LayerMarks:
    """The marks that time the layers of one step: forward into the first layer and out of the last one (after
    stage 3's hooks on both sides, so its gathers and releases count), backward at the last layer and at the first,
    which times all the layers' backward but the first one's."""

    def __init__(self, layers: list[torch.nn.Module], clock: _Clock) -> None:
        self.times: dict[str, Any] = {}

        def note(name: str) -> Callable[..., None]:
            return lambda *_: self.times.__setitem__(name, clock.mark())

        layers[0].register_forward_pre_hook(note("forward in"), prepend=True)
        layers[-1].register_forward_hook(note("forward out"))
        layers[-1].register_forward_hook(
            lambda _module, _inputs, output: on_backward_reaching(output, note("backward in"))
        )
        layers[0].register_forward_hook(
            lambda _module, _inputs, output: on_backward_reaching(output, note("backward out"))
        )


def split_step(
    seconds: dict[str, float],
    forward_layers_s: float,
    backward_layers_s: float,
    layers: int,
    layer_param_share: float,
) -> dict[str, float]:
    """One step's `ComputeRates` fields: each phase's seconds (`seconds`) split into a layer's and the rest's.

    `forward_layers_s` and `backward_layers_s` are the forward and backward through all `layers`;
    `layer_param_share` the layers' share of the model's parameters, by which the optimizer step splits. A rest that
    comes out negative (noise) is 0."""
    per_layer = {
        "forward": forward_layers_s / layers,
        "backward": backward_layers_s / layers,
        "step": seconds["step"] * layer_param_share / layers,
    }
    rates = {}
    for phase, one in per_layer.items():
        rates[f"{phase}_per_layer"] = one
        rates[f"{phase}_rest"] = max(0.0, seconds[phase] - layers * one)
    return rates


def main(request_path: str) -> None:
    from deepspeed_fuyou.distributed import exit_distributed, free_port

    request = json.loads(Path(request_path).read_text())
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))

    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    dtype = getattr(torch, request["dtype"])
    ds_config = {
        "train_micro_batch_size_per_gpu": request["micro_batch"],
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-6}},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "cpu"},
            "offload_optimizer": {"device": "cpu"},
            **request["zero"],
        },
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }
    config = AutoConfig.for_model(**request["model_config"])
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (the model is built under zero.Init while it lives)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    tokens = torch.randint(0, config.vocab_size, (request["micro_batch"], request["seq_len"]), device=engine.device)
    synchronize = get_accelerator().synchronize
    clock = _Clock(engine.device.type == "cuda")
    layers = repeated_layers(model)
    marks = _LayerMarks(layers, clock) if layers else None  # hooks after stage 3's: they see its work
    share = sum(full_numel(layer) for layer in layers) / full_numel(model)
    steps = []
    for _ in range(request["repeats"] + 1):
        edges = [clock.mark()]
        loss = engine(input_ids=tokens, labels=tokens).loss
        edges.append(clock.mark())
        engine.backward(loss)
        edges.append(clock.mark())
        engine.step()
        edges.append(clock.mark())
        synchronize()
        seconds = {phase: clock.seconds(edges[i], edges[i + 1]) for i, phase in enumerate(PHASES)}
        if marks is None:  # no repeated blocks (a one-layer model): the layers are all there is
            steps.append(split_step(seconds, seconds["forward"], seconds["backward"], config.num_hidden_layers, 1.0))
            continue
        forward_layers = clock.seconds(marks.times["forward in"], marks.times["forward out"])
        backward_layers = clock.seconds(marks.times["backward in"], marks.times["backward out"])
        steps.append(
            split_step(seconds, forward_layers, backward_layers * len(layers) / (len(layers) - 1), len(layers), share)
        )
    answer = {field: statistics.median(step[field] for step in steps[1:]) for field in steps[0]}
    Path("answer.json").write_text(json.dumps(answer))
    exit_distributed()  # no gloo abort at exit, no 66 MiB /dev/shm buffer left behind


if __name__ == "__main__":
    main(sys.argv[1])
