"""The chunked, double-buffered file <-> device pipeline: exact on the CPU stand-in, and on CUDA when present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepspeed_fuyou.errors import FuyouIOError
from deepspeed_fuyou.io import DeviceTransfer, IOEngine, PinnedPool

MiB = 1 << 20
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
    ),
]


@pytest.fixture
def transfer(aio_engine: IOEngine) -> DeviceTransfer:
    return DeviceTransfer(aio_engine, PinnedPool(8 * MiB), chunk_size=MiB)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numel", [1, 262_143, 3 * 262_144 + 17])
def test_store_then_load_round_trips_exactly_over_several_chunks(
    transfer: DeviceTransfer, tmp_path: Path, device: str, numel: int
) -> None:
    src = torch.randn(numel, device=device)
    transfer.store(src, tmp_path / "t")
    assert (tmp_path / "t").stat().st_size == numel * 4
    dst = torch.empty_like(src)
    transfer.load(dst, tmp_path / "t")
    assert torch.equal(dst, src)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_tensors_striped_over_two_files_round_trip(transfer: DeviceTransfer, tmp_path: Path, device: str) -> None:
    src = torch.randn(1000, 777, device=device).to(torch.bfloat16)
    paths = [tmp_path / "a", tmp_path / "b"]
    transfer.store(src, paths, offset=4096, stripe_size=256 << 10)
    dst = torch.zeros_like(src)
    transfer.load(dst, paths, offset=4096, stripe_size=256 << 10)
    assert torch.equal(dst, src)


def test_staging_buffers_come_from_the_pool_once(aio_engine: IOEngine, tmp_path: Path) -> None:
    pool = PinnedPool(8 * MiB)
    transfer = DeviceTransfer(aio_engine, pool, chunk_size=2 * MiB, depth=3)
    assert pool.stats().in_use == 6 * MiB
    transfer.store(torch.randn(5 * MiB), tmp_path / "t")
    assert pool.stats().allocations == 3


def test_a_load_from_a_short_file_raises_and_the_transfer_stays_usable(
    transfer: DeviceTransfer, tmp_path: Path
) -> None:
    transfer.store(torch.randn(MiB // 4), tmp_path / "short")
    with pytest.raises(FuyouIOError, match="short read"):
        transfer.load(torch.empty(MiB), tmp_path / "short")
    src = torch.randn(3 * MiB // 4)
    transfer.store(src, tmp_path / "ok")
    dst = torch.empty_like(src)
    transfer.load(dst, tmp_path / "ok")
    assert torch.equal(dst, src)


def test_non_contiguous_tensors_are_rejected(transfer: DeviceTransfer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="contiguous"):
        transfer.store(torch.randn(64, 64).t(), tmp_path / "t")


def test_pipeline_settings_are_checked(aio_engine: IOEngine) -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        DeviceTransfer(aio_engine, PinnedPool(MiB), chunk_size=1000)
    with pytest.raises(ValueError, match="depth"):
        DeviceTransfer(aio_engine, PinnedPool(MiB), chunk_size=4096, depth=1)
