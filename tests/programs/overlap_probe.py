"""Shows, under real DeepSpeed, when each `fuyou.optimizer.overlap` mode steps the optimizer's sub-groups.

    deepspeed tests/programs/overlap_probe.py --deepspeed_config ds.json --out result.json

For each mode ("off", "backward", "forward") a fresh engine trains a small Llama for a few steps with the config's
block and that mode (without clipping for "backward"), in this one process. Only what each mode guarantees is
recorded, never a duration:
- where every sub-group's Adam ran: on which thread, and inside or outside `step()`;
- how many sub-groups reached the step thread from inside autograd's backward, and how many gradient pieces went to
  the SSD at the accumulation boundary;
- in one iteration, with the step thread held back: whether `step()` returned before any sub-group was stepped, and
  whether the next forward then waited for a parameter's update (the hold is released by that wait).
Rank 0 writes the result.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import torch
from probes import probe_each_overlap_mode, tiny_llama_engine

SEQ_LEN = 32
STEPS = 4
HELD_ITERATION = 2  # the iteration whose step thread is held back ("forward")


def probe(config: dict[str, Any]) -> dict[str, Any]:
    engine, model = tiny_llama_engine(config)
    optimizer = engine.optimizer
    runtime = optimizer.fuyou_runtime
    record: dict[str, Any] = {
        "mode": optimizer.overlap,
        "sub_groups": len(optimizer.fp16_groups),
        "adam": [],
        "queued_during_backward": 0,
        "gradient_pieces_written_at_boundary": 0,
        "losses": [],
    }
    in_step = threading.Event()

    def adam(sub_group_id: int, stock: Any = optimizer._optimizer_step) -> None:
        where = "step thread" if threading.current_thread() is not threading.main_thread() else "main thread"
        record["adam"].append({"where": where, "inside_step": in_step.is_set()})
        stock(sub_group_id)

    def completed(sub_group: int, stock: Any = optimizer._sub_group_completed) -> None:
        record["queued_during_backward"] += torch._C._current_graph_task_id() != -1
        stock(sub_group)

    def gradients_out(
        parameter: Any, gradient_offsets: list[int], gradient_tensors: list[Any], stock: Any = None
    ) -> None:
        if optimizer.is_gradient_accumulation_boundary():
            record["gradient_pieces_written_at_boundary"] += len(gradient_tensors)
        stock(parameter, gradient_offsets, gradient_tensors)

    optimizer._optimizer_step = adam
    optimizer._sub_group_completed = completed
    swapper = optimizer.optimizer_swapper
    swapper.swap_out_gradients = functools.partial(gradients_out, stock=swapper.swap_out_gradients)

    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, model.config.vocab_size, (2, SEQ_LEN), generator=generator) for _ in range(STEPS)]
    for iteration, batch in enumerate(batches):
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        held = iteration == HELD_ITERATION and optimizer.overlap == "forward"
        if held:
            hold_step_thread(optimizer, runtime, record)
        in_step.set()
        engine.step()
        in_step.clear()
        if held:
            record["adam_before_step_returned"] = len(record["adam"]) - record.pop("adam_before_hold")
            record["pending_after_step"] = runtime.updates.pending()
        record["losses"].append(loss.item())
    optimizer.finish_pending_steps()
    engine.destroy()
    return record


def hold_step_thread(optimizer: Any, runtime: Any, record: dict[str, Any]) -> None:
    """Makes the step thread wait until the next forward waits for a parameter update; records that wait."""
    release = threading.Event()
    record["adam_before_hold"] = len(record["adam"])
    record["forward_waited_for_update"] = False
    step_sub_group, wait = optimizer._step_sub_group, runtime.updates.wait

    def held_step(*args: Any) -> None:
        release.wait()
        step_sub_group(*args)

    def waiting(ds_ids: Any) -> None:
        ds_ids = list(ds_ids)
        if any(runtime.updates.is_pending(ds_id) for ds_id in ds_ids):
            record["forward_waited_for_update"] = True
            release.set()
            runtime.updates.wait = wait
        wait(ds_ids)

    optimizer._step_sub_group = held_step
    runtime.updates.wait = waiting


if __name__ == "__main__":
    probe_each_overlap_mode(probe)
