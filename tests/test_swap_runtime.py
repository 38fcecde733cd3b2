"""The swap runtime both swappers share: read-after-write ordering, pooled staging, and failures that stay visible."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from deepspeed_fuyou.config.fuyou import FuyouConfig
from deepspeed_fuyou.errors import FuyouConfigError, FuyouIOError
from deepspeed_fuyou.io import IOEngine
from deepspeed_fuyou.swap.runtime import SwapRuntime

MiB = 1 << 20


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[SwapRuntime]:
    rt = SwapRuntime(FuyouConfig(nvme_paths=(tmp_path / "a", tmp_path / "b"), pinned_memory=256 * MiB))
    yield rt
    rt.close()


@pytest.fixture(autouse=True)
def _dirs(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()


def test_a_read_waits_for_the_write_in_flight_to_the_same_bytes(runtime: SwapRuntime) -> None:
    data = torch.randn(16 * MiB)  # 64 MiB: still in flight when the read is issued
    write = runtime.write(data, "x", keep=data)
    back = torch.empty_like(data)
    read = runtime.read(back, "x")
    assert write.done(), "the read was issued before the write it depends on had finished"
    read.wait()
    assert torch.equal(back, data)


def test_a_read_of_other_bytes_or_another_file_does_not_wait(runtime: SwapRuntime) -> None:
    runtime.write(torch.ones(1024), "y").wait()
    data = torch.randn(16 * MiB)
    write = runtime.write(data, "x", offset=4096, keep=data)
    head = torch.empty(1024)
    runtime.read(head, "y").wait()  # another file: not ordered after the large write
    assert torch.equal(head, torch.ones(1024))
    runtime.flush()
    assert write.done()


def test_rewriting_bytes_waits_for_the_earlier_write_so_the_last_one_wins(runtime: SwapRuntime) -> None:
    first, second = torch.zeros(8 * MiB), torch.full((8 * MiB,), 7.0)
    runtime.write(first, "x", keep=first)
    runtime.write(second, "x", keep=second)
    back = torch.empty_like(first)
    runtime.read(back, "x").wait()
    assert torch.equal(back, second)


def test_staging_buffers_come_from_the_one_pinned_budget_split_between_compute_and_the_step(
    runtime: SwapRuntime,
) -> None:
    """Half for forward and backward, half for the optimizer step: neither side can take the other's memory."""
    held = [runtime.staging(64 * MiB) for _ in range(2)] + [runtime.step_staging(64 * MiB) for _ in range(2)]
    assert runtime.pool.stats().in_use == runtime.step_pool.stats().in_use == 128 * MiB
    assert runtime.pool.budget + runtime.step_pool.budget == 256 * MiB
    with pytest.raises(FuyouConfigError, match=r"fuyou.pinned_memory = '256.00 MiB'.*at least 320.00 MiB"):
        runtime.pool.acquire(32 * MiB, timeout=0.1)  # the message names the whole budget, not the share
    del held
    assert runtime.staging(100).numel() == 4096  # aligned to the I/O block
    assert runtime.pinned_peak_reserved() == 256 * MiB


def test_every_wait_on_a_failed_transfer_raises(tmp_path: Path) -> None:
    engine = IOEngine()
    try:
        future = engine.read(torch.empty(1024), [str(tmp_path / "missing")])
        for _ in range(2):
            with pytest.raises(FuyouIOError, match="missing"):
                future.wait()
    finally:
        engine.close()


def test_close_removes_the_swap_directories(tmp_path: Path) -> None:
    rt = SwapRuntime(FuyouConfig(nvme_paths=(tmp_path / "a",), pinned_memory=64 * MiB))
    rt.write(torch.ones(MiB), "x").wait()
    assert any((tmp_path / "a").iterdir())
    rt.close()
    assert list((tmp_path / "a").iterdir()) == []


def test_the_dram_tier_takes_parameters_then_gradients_then_whole_sub_groups_while_its_budget_lasts(
    tmp_path: Path,
) -> None:
    """Per byte held, a parameter saves three SSD transfers a step, a gradient two, a sub-group's state two: the tier
    is filled in that order, each file whole. What it holds is used in place: no file is written or read for it."""
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from deepspeed_fuyou.integration.param_swapper import FuyouParamSwapper
    from deepspeed_fuyou.swap.optimizer_swapper import FuyouOptimizerSwapper

    paths = (tmp_path / "a", tmp_path / "b")
    placement = {"host_memory": 3 * MiB + MiB // 2}
    runtime = SwapRuntime(FuyouConfig(nvme_paths=paths, pinned_memory=64 * MiB, placement=placement))
    try:
        swapper = FuyouParamSwapper(runtime, torch.float32)
        params = []
        for ds_id, numel in enumerate((MiB // 4, MiB // 4, MiB // 2)):  # 1, 1 and 2 MiB of fp32
            param = torch.nn.Parameter(torch.empty(0))
            param.ds_id, param.ds_tensor, param.ds_status = ds_id, torch.empty(0), ZeroParamStatus.AVAILABLE
            swapper.get_buffer(param, numel).fill_(ds_id)
            params.append(param)
        assert runtime.host.reserved == 2 * MiB  # the third parameter does not fit in the 1.5 MiB left
        swapper.swap_out_and_release(params)
        assert runtime.counters.bytes_written == 2 * MiB  # only it went to the SSD
        optimizer = FuyouOptimizerSwapper(
            runtime, torch.optim.Adam([torch.empty(0, requires_grad=True)]), torch.float32
        )
        optimizer.plan_host_tier([("g0", MiB // 4), ("g1", MiB // 4)], states=2, gradients_on_file=True)
        # the first gradient takes 1 MiB of the 1.5 left; the second no longer fits, nor any sub-group (3 MiB each)
        assert runtime.host.reserved == 3 * MiB
        swapper.swap_in(params[:2], async_op=False)
        assert runtime.counters.bytes_read == 0
        for param in params[:2]:
            assert param.ds_tensor.status == PartitionedParamStatus.AVAILABLE
            assert torch.equal(param.ds_tensor, torch.full((MiB // 4,), float(param.ds_id)))
    finally:
        runtime.close()


def _swapper(tmp_path: Path, partition_bytes: list[int], pinned_memory: int) -> tuple[SwapRuntime, Any, list[Any]]:
    """A parameter swapper with one fp32 partition on the SSD per entry of `partition_bytes` (partition i holds i),
    behind a forward/backward pool of half `pinned_memory`."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from deepspeed_fuyou.integration.param_swapper import FuyouParamSwapper

    config = FuyouConfig(
        nvme_paths=[tmp_path], pinned_memory=pinned_memory, placement={"host_memory": 0}, optimizer={"read_ahead": 0}
    )
    runtime = SwapRuntime(config)
    swapper = FuyouParamSwapper(runtime, torch.float32)
    params = []
    for ds_id, nbytes in enumerate(partition_bytes):
        param = torch.nn.Parameter(torch.empty(0))
        param.ds_id, param.ds_tensor, param.ds_status = ds_id, torch.empty(0), ZeroParamStatus.AVAILABLE
        swapper.get_buffer(param, nbytes // 4).fill_(ds_id)
        swapper.swap_out_and_release([param])
        params.append(param)
    return runtime, swapper, params


@pytest.fixture
def partitions(tmp_path: Path) -> Iterator[tuple[SwapRuntime, Any, list[torch.nn.Parameter]]]:
    """A parameter swapper with five 8 MiB partitions on the SSD (partition i holds i), behind a 32 MiB
    forward/backward pool: four of them fit."""
    runtime, swapper, params = _swapper(tmp_path, [8 * MiB] * 5, pinned_memory=64 * MiB)
    try:
        yield runtime, swapper, params
    finally:
        runtime.close()


def test_a_prefetch_reads_the_leading_partitions_up_to_one_not_yet_stepped_or_that_would_take_the_fetch_reserve(
    partitions: tuple[SwapRuntime, Any, list[torch.nn.Parameter]],
) -> None:
    """Stage 3 gathers a partition ahead of its module only once it is off the SSD, and every rank must gather the
    same ones: a prefetch starts the leading partitions only, up to the first whose sub-group is not stepped yet or
    whose buffer would leave the pool without room for `FETCH_RESERVE_PARTITIONS` fetches (the ranks then agree on
    the fewest), never one past it. A partition the step has handed over takes a buffer like one read. The room it
    offers the coordinator counts the buffers of the partitions held, not what the step happens to have handed
    over."""
    from deepspeed_fuyou.integration.param_swapper import FETCH_RESERVE_PARTITIONS

    runtime, swapper, params = partitions
    assert FETCH_RESERVE_PARTITIONS == 2  # of the pool's four buffers, a prefetch may take two
    runtime.updates.hand_over_sub_groups = 1  # as with optimizer.overlap "forward"
    runtime.updates.expect("sub-group", [1])
    runtime.updates.hand_over({3: torch.full((2 * MiB,), 3.0)})
    assert swapper.available_swap_in_buffers() == 2

    def statuses() -> list[str]:
        return [param.ds_tensor.status.name for param in params]

    swapper.swap_in(params, async_op=True)
    assert statuses() == ["INFLIGHT"] + ["NOT_AVAILABLE"] * 4  # partition 2 could be read, but 1 is not stepped
    runtime.updates.done("sub-group")
    swapper.swap_in([params[3], params[1], params[2]], async_op=True)  # 3 from memory; 1 would take the reserve
    assert statuses() == ["INFLIGHT", "NOT_AVAILABLE", "NOT_AVAILABLE", "AVAILABLE", "NOT_AVAILABLE"]
    assert swapper.available_swap_in_buffers() == 0
    swapper.synchronize_reads()
    swapper.swap_in(params[1:3], async_op=False)  # a fetch finds the reserve
    assert statuses() == ["AVAILABLE"] * 4 + ["NOT_AVAILABLE"]
    for param in params[:4]:
        assert torch.equal(param.ds_tensor, torch.full((2 * MiB,), float(param.ds_id)))


def test_a_fetch_the_prefetch_left_out_gets_its_buffer_at_once_though_the_free_bytes_lie_in_pieces(
    tmp_path: Path,
) -> None:
    """Stage 3 fetches a partition its prefetch did not read while the pool holds those of the modules ahead, released
    only after it: its buffer must come at once. A layer's partitions differ in size (attention's and the MLP's
    matrices), so the free bytes between the buffers held lie in pieces: before the pool unmapped pieces for a
    larger buffer, this walk found no room for a 2.75 MiB partition in the backward, 18.75 MiB in use of 27.25.
    Here the coordinator prefetches as many partitions ahead as the swapper offers, and keeps the last ten
    gathered."""
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus

    layer = [MiB] * 4 + [2816 << 10] * 3
    runtime, swapper, params = _swapper(tmp_path, layer * 5, pinned_memory=109 * MiB // 2)
    runtime.pool.timeout = 0.1  # a fetch that waits fails at once rather than after a minute
    try:
        for walk in (params, params[::-1]):  # forward, backward
            gathered: list[Any] = []
            for position, param in enumerate(walk):
                if param.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE:
                    swapper.swap_in([param], async_op=False)
                swapper.synchronize_reads()
                assert torch.equal(param.ds_tensor, torch.full_like(param.ds_tensor, float(param.ds_id)))
                gathered.append(param)
                ahead = [p for p in walk[position + 1 :] if p.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE]
                swapper.swap_in(ahead[: swapper.available_swap_in_buffers()], async_op=True)
                if len(gathered) > 10:
                    swapper.remove_partition_and_release_buffers([gathered.pop(0)])
            swapper.synchronize_reads()
            swapper.remove_partition_and_release_buffers(gathered)
    finally:
        runtime.close()


def test_a_released_partition_stays_in_memory_while_the_window_has_room_until_an_update_makes_it_stale(
    partitions: tuple[SwapRuntime, Any, list[torch.nn.Parameter]],
) -> None:
    """Backward starts with the layers forward ended with: a partition released keeps its buffer, up to what the
    window may hold (`window_peak`, oldest given back first), and a fetch takes it from there instead of reading
    it. An update written since its buffer was filled (held then, or kept), or a checkpoint's files, leave the
    file's bytes to be read; the pool takes kept buffers back when a fetch needs the room."""
    from deepspeed_fuyou.integration.param_swapper import PARAMETERS

    runtime, swapper, params = partitions
    assert runtime.counters.reads_saved == 0  # nothing is kept before the window is sized

    def fetch(*ids: int) -> int:
        """Gathers and releases `ids`; returns the partition bytes read from the SSD."""
        before = runtime.counters.read[PARAMETERS]
        chosen = [params[i] for i in ids]
        swapper.swap_in(chosen, async_op=False)
        values = [float(param.ds_tensor[0]) for param in chosen]
        swapper.remove_partition_and_release_buffers(chosen)
        fetch.values = values
        return runtime.counters.read[PARAMETERS] - before

    runtime.window_peak = 24 * MiB  # three partitions
    assert fetch(0, 1, 2) == 24 * MiB
    assert fetch(2, 1, 0) == 0 and fetch.values == [2.0, 1.0, 0.0]
    assert runtime.counters.reads_saved == 24 * MiB
    assert fetch(3) == 8 * MiB  # released, it pushes out the one released longest ago: 2
    assert fetch(0, 1, 3) == 0
    assert fetch(2) == 8 * MiB

    swapper.swap_out_partitioned_params([params[1]], [torch.full((2 * MiB,), 7.0)])  # a kept one updated
    swapper.swap_in([params[2]], async_op=False)
    swapper.swap_out_partitioned_params([params[2]], [torch.full((2 * MiB,), 9.0)])  # a held one updated
    swapper.remove_partition_and_release_buffers([params[2]])
    assert fetch(1, 2) == 16 * MiB and fetch.values == [7.0, 9.0]
    runtime.files_replaced += 1  # a checkpoint's files
    assert fetch(1, 2) == 16 * MiB

    runtime.window_peak = 32 * MiB  # the whole pool: kept buffers fill it
    assert fetch(0, 1, 2, 3) == 16 * MiB
    assert fetch(4) == 8 * MiB and fetch.values == [4.0]  # the pool gave a kept buffer back for it
    assert fetch(4, 3, 2, 1) == 0 and fetch.values == [4.0, 3.0, 9.0, 7.0]
    prefetched = [params[1], params[0]]  # room for 0 and the fetch reserve comes from 4, 3, 2: not from 1
    swapper.swap_in(prefetched, async_op=True)
    assert [param.ds_tensor.status.name for param in prefetched] == ["AVAILABLE", "INFLIGHT"]
    swapper.synchronize_reads()
    assert [float(param.ds_tensor[0]) for param in prefetched] == [7.0, 0.0]
    swapper.remove_partition_and_release_buffers(prefetched)
    assert fetch(1, 0) == 0 and fetch(2) == 8 * MiB
