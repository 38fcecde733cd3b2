"""Our optimizer swapper driven the way stage 3 drives it: sub-group after sub-group, pipelined, on real files.

Stage 3's step loop is reproduced here without DeepSpeed (`stage3_step`), so the swapper's own promises can be
checked directly: the same numbers as an optimizer that never leaves memory, and pinned memory that depends on the
size of a sub-group, not on how many there are (the model's depth), on a fast disk and on a slow one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from deepspeed_fuyou.config.fuyou import FuyouConfig
from deepspeed_fuyou.errors import FuyouIOError
from deepspeed_fuyou.io.engine import IOFuture
from deepspeed_fuyou.swap.optimizer_swapper import FuyouOptimizerSwapper
from deepspeed_fuyou.swap.runtime import SwapRuntime, optimizer_file

MiB = 1 << 20
STEPS = 3


def new_runtime(root: Path) -> SwapRuntime:
    """A swap runtime striped over two fresh directories under `root`, with a 256 MiB pinned budget."""
    paths = (root / "a", root / "b")
    for path in paths:
        path.mkdir(parents=True)
    return SwapRuntime(FuyouConfig(nvme_paths=paths, pinned_memory=256 * MiB))


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[SwapRuntime]:
    rt = new_runtime(tmp_path)
    yield rt
    rt.close()


def sub_group_sizes(count: int) -> list[int]:
    """Sub-groups as DeepSpeed forms them: about the same size, differing by a few parameters."""
    return [MiB - (k % 3) * 5000 for k in range(count)]


def gradients(sizes: list[int], step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(n, generator=generator) for n in sizes]


def stage3_step(swapper: FuyouOptimizerSwapper, masters: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """`FuyouZeroOptimizer.step` for swapped sub-groups: swap in (and read the next one ahead), step, swap out
    behind the next sub-group, drop the gradient."""
    for index, master in enumerate(masters):
        following = masters[index + 1] if index + 1 < len(masters) else None
        swapper.swap_in_optimizer_state(master, async_parameter=following)
        optimizer.param_groups[0]["params"] = [master]
        optimizer.step()
        optimizer.param_groups[0]["params"] = []
        swapper.gradient_applied(master)  # as FuyouZeroOptimizer._optimizer_step
        swapper.swap_out_optimizer_state(master, async_swap=following is not None)
        master.grad = None


class _SlowWrite:
    """A write that reports itself finished only `seconds` after it started: a disk slower than the step."""

    def __init__(self, future: IOFuture, seconds: float) -> None:
        self._future = future
        self._ready = time.monotonic() + seconds

    def done(self) -> bool:
        return self._future.done() and time.monotonic() >= self._ready

    def wait(self, timeout: float | None = None) -> int:
        time.sleep(max(0.0, self._ready - time.monotonic()))
        return self._future.wait(timeout)


@contextlib.contextmanager
def slow_writes(runtime: SwapRuntime, seconds: float) -> Iterator[None]:
    """Within the block, every write of `runtime` takes at least `seconds`."""
    if seconds <= 0:
        yield
        return
    write = runtime.engine.write
    runtime.engine.write = lambda *args, **kwargs: _SlowWrite(write(*args, **kwargs), seconds)
    try:
        yield
    finally:
        del runtime.engine.write  # the instance attribute goes: the method is the engine's own again


def swapped_sub_groups(
    runtime: SwapRuntime, initial: list[torch.Tensor], plan_read_ahead: bool = False
) -> tuple[FuyouOptimizerSwapper, list[torch.Tensor]]:
    """A swapper for Adam with one sub-group per tensor of `initial`, its master written to its file, and the masters
    stage 3 would hold; with `plan_read_ahead`, `optimizer.read_ahead` is planned first (gradients go to files and
    are not kept)."""
    masters = []
    for index in range(len(initial)):
        master = torch.empty(0, requires_grad=True)
        master.ds_id = f"{index}"
        masters.append(master)
    swapper = FuyouOptimizerSwapper(
        runtime, torch.optim.Adam([torch.empty(0, requires_grad=True)], lr=1e-2), torch.float32
    )
    if plan_read_ahead:
        swapper.plan_read_ahead([(m.ds_id, w.numel()) for m, w in zip(masters, initial, strict=True)], 2, False)
    for master, weights in zip(masters, initial, strict=True):
        swapper.initialize_parameters([master], [weights])
    return swapper, masters


def train_swapped(
    runtime: SwapRuntime, initial: list[torch.Tensor], step_write_seconds: float = 0.0
) -> list[torch.Tensor]:
    """STEPS steps of Adam over sub-groups that live on the SSD between steps; returns the final weights.

    With `step_write_seconds`, the optimizer step's writes are slow (a disk slower than the step)."""
    swapper, masters = swapped_sub_groups(runtime, initial)
    optimizer = swapper.optimizer
    sizes = [w.numel() for w in initial]
    for step in range(STEPS):
        for master, grad in zip(masters, gradients(sizes, step), strict=True):  # backward, at the boundary
            swapper.swap_out_gradients(master, [0], [grad])
            runtime.flush()  # one at a time: the step's own pipeline is what is measured
        with slow_writes(runtime, step_write_seconds):
            stage3_step(swapper, masters, optimizer)
    final = []
    for master in masters:
        swapper.swap_in_optimizer_state(master)
        final.append(master.detach().clone())
        swapper.release_swap_buffers(master)
    return final


def train_in_memory(initial: list[torch.Tensor]) -> list[torch.Tensor]:
    masters = [w.clone().requires_grad_() for w in initial]
    optimizer = torch.optim.Adam(masters, lr=1e-2)
    for step in range(STEPS):
        for master, grad in zip(masters, gradients([w.numel() for w in initial], step), strict=True):
            master.grad = grad
        optimizer.step()
    return [m.detach() for m in masters]


def initial_weights(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    return [torch.randn(n, generator=generator) for n in sub_group_sizes(count)]


def test_pipelined_swapped_adam_equals_adam_in_memory_bit_for_bit(runtime: SwapRuntime) -> None:
    initial = initial_weights(6)
    for swapped, expected in zip(train_swapped(runtime, initial), train_in_memory(initial), strict=True):
        assert torch.equal(swapped, expected)


@pytest.mark.parametrize("slow_disk", [False, True])
def test_pinned_memory_of_the_step_does_not_grow_with_the_number_of_sub_groups(tmp_path: Path, slow_disk: bool) -> None:
    """Three sub-groups in memory at once (read ahead, stepped, written back), each tensor in a buffer of the
    largest sub-group's size, so that near-equal sub-groups reuse each other's: the pool maps no more for 12
    sub-groups than for 4. On a slow disk the sub-group before last is written before the next one is read."""
    peaks = {}
    for count in (4, 12):
        runtime = new_runtime(tmp_path / f"{count}")
        try:
            train_swapped(runtime, initial_weights(count), step_write_seconds=0.05 if slow_disk else 0.0)
            peaks[count] = runtime.step_pool.stats()
        finally:
            runtime.close()
    tensor = 4 * MiB  # one fp32 tensor of the largest sub-group
    for stats in peaks.values():  # read ahead and stepped: master, moments, gradient; written back: master, moments
        assert stats.peak_in_use <= (4 + 4 + 3) * tensor
    assert peaks[12].peak_reserved == peaks[4].peak_reserved


def trained_swapper(runtime: SwapRuntime) -> tuple[FuyouOptimizerSwapper, list[torch.Tensor]]:
    """A swapper after two steps of Adam over three sub-groups (so its moments exist), and its masters."""
    swapper, masters = swapped_sub_groups(runtime, initial_weights(3))
    optimizer = swapper.optimizer
    for step in range(2):
        for master, grad in zip(masters, gradients([MiB] * 3, step), strict=True):
            swapper.swap_out_gradients(master, [0], [grad[: swapper.groups[master.ds_id].numel]])
        runtime.flush()
        stage3_step(swapper, masters, optimizer)
    return swapper, masters


def resident_state(swapper: FuyouOptimizerSwapper, masters: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    state = []
    for master in masters:
        swapper.swap_in_optimizer_state(master)
        tensors = {"master": master.detach().clone()}
        tensors |= {k: v.clone() for k, v in swapper.optimizer.state[master].items() if torch.is_tensor(v)}
        state.append(tensors)
        swapper.release_swap_buffers(master)
    return state


def test_a_checkpoint_export_imports_back_to_the_same_state_with_its_checksums_verified(runtime: SwapRuntime) -> None:
    swapper, masters = trained_swapper(runtime)
    saved = resident_state(swapper, masters)
    swapper.export_checkpoint()
    stage3_step(swapper, masters, swapper.optimizer)  # the run moves on: the import must bring the saved state back
    swapper.import_checkpoint()
    restored = resident_state(swapper, masters)
    assert [sorted(s) for s in restored] == [sorted(s) for s in saved]
    assert all(torch.equal(r[k], s[k]) for r, s in zip(restored, saved, strict=True) for k in s)


def test_a_corrupted_checkpoint_file_is_refused_naming_the_file_and_both_checksums(runtime: SwapRuntime) -> None:
    swapper, _ = trained_swapper(runtime)
    swapper.export_checkpoint()
    victim = Path(swapper.swap_folder) / optimizer_file("1", "exp_avg")
    assert victim.exists(), sorted(p.name for p in Path(swapper.swap_folder).iterdir())
    with open(victim, "r+b") as f:
        f.seek(123 * 4)
        byte = f.read(1)
        f.seek(123 * 4)
        f.write(bytes([byte[0] ^ 0x01]))  # one flipped bit
    with pytest.raises(FuyouIOError) as err:
        swapper.import_checkpoint()
    message = str(err.value)
    assert str(victim) in message
    assert "CRC32C" in message and "previous checkpoint" in message


def test_states_written_behind_reach_their_files_during_the_next_backward_before_anything_is_read_ahead(
    tmp_path: Path,
) -> None:
    """`optimizer.read_ahead` without gradients to keep: the step leaves the moments of its last sub-groups in the
    read-ahead pool (their master is written at once), backward's calls (`read_ahead_next`) write them, one
    sub-group a call, and only then read the first sub-group's state ahead; the numbers stay Adam's in memory, and a
    checkpoint taken right after a step holds the moments still to be written."""
    paths = (tmp_path / "a", tmp_path / "b")
    for path in paths:
        path.mkdir()
    runtime = SwapRuntime(FuyouConfig(nvme_paths=paths, pinned_memory=256 * MiB, optimizer={"read_ahead": "16MiB"}))
    initial = initial_weights(6)
    swapper, masters = swapped_sub_groups(runtime, initial, plan_read_ahead=True)
    optimizer = swapper.optimizer
    nbytes = [4 * w.numel() for w in initial]  # each takes one 4 MiB slot: 16 MiB hold two sub-groups' moments
    written, read = runtime.counters.written, runtime.counters.read
    try:
        for step in range(STEPS):
            for master, grad in zip(masters, gradients([w.numel() for w in initial], step), strict=True):
                swapper.swap_out_gradients(master, [0], [grad])
            runtime.flush()
            if step > 0:  # backward goes on: one sub-group's moments a call, nothing read ahead until they are written
                before, states_read = written["optimizer_states"], read["optimizer_states"]
                for behind in (1, 2):
                    swapper.read_ahead_next()
                    runtime.flush()
                    assert written["optimizer_states"] - before == 2 * sum(nbytes[4 : 4 + behind])
                    assert read["optimizer_states"] == states_read
                swapper.read_ahead_next()
                assert read["optimizer_states"] == states_read + 3 * nbytes[0]  # the first sub-group's master, moments
            before = written["optimizer_states"]
            stage3_step(swapper, masters, optimizer)
            runtime.flush()
            assert written["optimizer_states"] - before == sum(nbytes) + 2 * sum(nbytes[:4])  # masters; 4 have moments
        swapper.export_checkpoint()  # with two sub-groups' moments still in memory
        final = resident_state(swapper, masters)
        for swapped, expected in zip(final, train_in_memory(initial), strict=True):
            assert torch.equal(swapped["master"], expected)
        swapper.import_checkpoint()
        for restored, expected in zip(resident_state(swapper, masters), final, strict=True):
            assert restored.keys() == expected.keys() == {"master", "exp_avg", "exp_avg_sq", "step"}
            assert all(torch.equal(restored[name], expected[name]) for name in expected)
    finally:
        runtime.close()


def test_a_swap_out_outside_a_step_keeps_the_gradient_kept_in_memory_for_the_step(tmp_path: Path) -> None:
    """Stage 3 swaps a sub-group in and out to read or set its state (`safe_get_full_fp32_param`, ...) between
    backward and the step, and after it. A final gradient read-ahead kept in memory has no file to come back from:
    a swap-out before the step keeps it, the step's own swap-out drops it, and a state read after the step finds no
    gradient rather than a file that was never written."""
    config = FuyouConfig(nvme_paths=[tmp_path], pinned_memory=256 * MiB, optimizer={"read_ahead": "16MiB"})
    runtime = SwapRuntime(config)
    try:
        (size,) = sub_group_sizes(1)
        master = torch.empty(0, requires_grad=True)
        master.ds_id = "0"
        swapper = FuyouOptimizerSwapper(runtime, torch.optim.Adam([torch.empty(0, requires_grad=True)]), torch.float32)
        swapper.plan_read_ahead([(master.ds_id, size)], 2, gradients_on_file=True)
        swapper.initialize_parameters([master], [torch.randn(size)])
        gradient = torch.randn(size)
        assert swapper.keep_final_gradients(master, [0], [gradient])
        for stepped in (False, True):  # a state read, then the step
            swapper.swap_in_optimizer_state(master)
            assert torch.equal(master.grad, gradient)
            if stepped:
                swapper.gradient_applied(master)  # as FuyouZeroOptimizer._optimizer_step
            master.grad = None
            swapper.swap_out_optimizer_state(master)
        swapper.swap_in_optimizer_state(master)  # a state read after the step
        assert master.grad is None and runtime.counters.read["gradients"] == 0
        swapper.swap_out_optimizer_state(master)
    finally:
        runtime.close()


def test_the_step_pool_reads_its_first_two_sub_groups_during_backward_and_the_step_finds_them_in_memory(
    runtime: SwapRuntime,
) -> None:
    """Without a read-ahead pool, backward's calls (`read_ahead_next`) read the master and moments of the first two
    sub-groups into the step pool, one sub-group a call, once the reads of the one before have ended; the step then
    reads only the others' and every gradient, and the step pool holds no more than when nothing was read early.
    The numbers stay Adam's in memory."""
    initial = initial_weights(6)
    swapper, masters = swapped_sub_groups(runtime, initial, plan_read_ahead=True)
    optimizer = swapper.optimizer
    nbytes = [4 * w.numel() for w in initial]
    read = runtime.counters.read
    peaks = []
    for step in range(STEPS):
        for master, grad in zip(masters, gradients([w.numel() for w in initial], step), strict=True):
            swapper.swap_out_gradients(master, [0], [grad])
        runtime.flush()
        before = read["optimizer_states"]
        masters_only = 1 if step == 0 else 3  # Adam creates its moments at the first step
        swapper.read_ahead_next()
        assert read["optimizer_states"] - before == masters_only * nbytes[0]
        swapper.read_ahead_next()  # the first sub-group's reads may not have ended yet
        swapper.finish_read_ahead()  # the end of backward: the rest is started
        assert read["optimizer_states"] - before == masters_only * (nbytes[0] + nbytes[1])
        assert not swapper.is_carried(masters[0]) and not swapper.is_carried(masters[1])
        before_step, gradients_before = read["optimizer_states"], read["gradients"]
        stage3_step(swapper, masters, optimizer)
        assert read["optimizer_states"] - before_step == masters_only * sum(nbytes[2:])
        assert read["gradients"] - gradients_before == sum(nbytes)
        peaks.append(runtime.step_pool.stats().peak_reserved)
    for swapped, expected in zip(resident_state(swapper, masters), train_in_memory(initial), strict=True):
        assert torch.equal(swapped["master"], expected)
    assert peaks[-1] <= 11 * 4 * MiB  # a 4 MiB slot each: stepped (4), read ahead (4), written back (3)
