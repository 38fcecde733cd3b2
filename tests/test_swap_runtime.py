"""The swap runtime both swappers share: read-after-write ordering, pooled staging, and failures that stay visible."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from deepspeed_fuyou.config.fuyou import FuyouConfig
from deepspeed_fuyou.errors import FuyouIOError
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


def test_staging_buffers_come_from_the_one_pinned_budget(runtime: SwapRuntime) -> None:
    held = [runtime.staging(64 * MiB) for _ in range(4)]
    assert runtime.pool.stats().in_use == 256 * MiB
    del held
    assert runtime.staging(100).numel() == 4096  # aligned to the I/O block


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
