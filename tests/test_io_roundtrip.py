"""Every byte written comes back, whatever the size, dtype, memory alignment, file offset or striping."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from deepspeed_fuyou.io import IOEngine, SwapSpace
from tests.conftest import make_engine

ODD_SIZES = [1, 3, 511, 513, 4095, 4097, 65_537, 1_048_575, 1_048_577, 7_340_033, 100_000_007]


def random_bytes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def page_aligned(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` that starts on a 4 KiB boundary, so an offset into it has a known alignment.

    The allocator only promises 64-byte alignment, so a slice of a plain tensor may land on a page boundary by chance.
    """
    room = torch.empty(tensor.numel() + 4096, dtype=torch.uint8)
    start = -room.data_ptr() % 4096
    aligned = room[start : start + tensor.numel()]
    aligned.copy_(tensor)
    return aligned


@pytest.mark.parametrize("nbytes", ODD_SIZES)
def test_odd_sized_tensors_round_trip_byte_exact_and_file_has_exact_size(
    engine: IOEngine, tmp_path: Path, nbytes: int
) -> None:
    data = random_bytes(nbytes, seed=nbytes)
    path = tmp_path / "t.bin"
    assert engine.write(data, path).wait() == nbytes
    assert os.path.getsize(path) == nbytes
    assert path.read_bytes() == data.numpy().tobytes()  # an independent reader sees the same bytes
    back = torch.empty_like(data)
    assert engine.read(back, path).wait() == nbytes
    assert torch.equal(back, data)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.complex64, torch.int8]
)
def test_every_dtype_round_trips(engine: IOEngine, tmp_path: Path, dtype: torch.dtype) -> None:
    src = random_bytes(3 * 5 * 7 * 11 * 8 * 17)  # divisible by every element size
    tensor = src.view(dtype)[: 3 * 5 * 7 * 11 * 17].reshape(3 * 5 * 7, 11 * 17)
    if dtype == torch.bool:
        tensor = tensor.view(torch.uint8).remainder(2).view(torch.bool)
    engine.write(tensor, tmp_path / "t").wait()
    back = torch.empty_like(tensor)
    engine.read(back, tmp_path / "t").wait()
    assert torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))


@pytest.mark.parametrize("storage_offset", [1, 7, 4095, 4096 + 64])
@pytest.mark.parametrize("file_offset", [0, 1, 4096, 12_345, (1 << 20) + 3])
def test_views_at_any_storage_offset_and_any_file_offset_round_trip(
    engine: IOEngine, tmp_path: Path, storage_offset: int, file_offset: int
) -> None:
    view = page_aligned(random_bytes(storage_offset + 3_000_001, seed=storage_offset))[storage_offset:]
    assert view.data_ptr() % 4096 == storage_offset % 4096  # misaligned by exactly the offset under test
    engine.write(view, tmp_path / "t", offset=file_offset).wait()
    assert os.path.getsize(tmp_path / "t") == file_offset + view.numel()
    target = torch.zeros(storage_offset + view.numel(), dtype=torch.uint8)[storage_offset:]
    engine.read(target, tmp_path / "t", offset=file_offset).wait()
    assert torch.equal(target, view)


def test_writes_at_offsets_leave_neighbouring_bytes_untouched(engine: IOEngine, tmp_path: Path) -> None:
    whole = random_bytes(3 << 20, seed=1)
    engine.write(whole, tmp_path / "t").wait()
    patch = random_bytes(10_001, seed=2)
    engine.write(patch, tmp_path / "t", offset=777_777).wait()
    expected = whole.clone()
    expected[777_777 : 777_777 + patch.numel()] = patch
    back = torch.empty_like(whole)
    engine.read(back, tmp_path / "t").wait()
    assert torch.equal(back, expected)


def test_non_contiguous_tensors_are_written_as_their_contiguous_copy_and_read_back_into_place(
    engine: IOEngine, tmp_path: Path
) -> None:
    matrix = torch.randn(513, 257)
    transposed = matrix.t()
    assert not transposed.is_contiguous()
    engine.write(transposed, tmp_path / "t").wait()
    assert (tmp_path / "t").read_bytes() == transposed.contiguous().numpy().tobytes()
    target = torch.zeros(513, 257).t()
    engine.read(target, tmp_path / "t").wait()
    assert torch.equal(target, transposed)


def test_device_tensors_are_rejected_with_a_pointer_to_device_transfer(engine: IOEngine, tmp_path: Path) -> None:
    meta = torch.empty(10, device="meta")
    with pytest.raises(ValueError, match="DeviceTransfer"):
        engine.write(meta, tmp_path / "t")


def test_one_hundred_concurrent_requests_of_mixed_sizes_all_complete_correctly(
    engine: IOEngine, tmp_path: Path
) -> None:
    rng = random.Random(0)
    tensors = [random_bytes(rng.randint(1, 3 << 20), seed=i) for i in range(100)]
    files = [tmp_path / f"f{i % 10}" for i in range(100)]
    offsets = [(i // 10) * (4 << 20) + rng.randint(0, 4096) for i in range(100)]
    writes = [engine.write(t, f, o) for t, f, o in zip(tensors, files, offsets, strict=True)]
    assert sum(w.wait() for w in writes) == sum(t.numel() for t in tensors)
    targets = [torch.empty_like(t) for t in tensors]
    reads = [engine.read(t, f, o) for t, f, o in zip(targets, files, offsets, strict=True)]
    for read, target, tensor in zip(reads, targets, tensors, strict=True):
        read.wait()
        assert torch.equal(target, tensor)


def test_striping_over_three_directories_spreads_stripes_round_robin(engine: IOEngine, tmp_path: Path) -> None:
    dirs = [tmp_path / f"ssd{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    with SwapSpace(dirs, field="fuyou.nvme_paths") as space:
        paths = space.files("store")
        stripe = 64 << 10
        data = random_bytes(10 * stripe + 1234, seed=3)
        engine.write(data, paths, stripe_size=stripe).wait()
        # stripe k lives in file k % 3 at row k // 3
        raw = [Path(p).read_bytes() for p in paths]
        for k in range(11):
            chunk = data[k * stripe : (k + 1) * stripe].numpy().tobytes()
            row = k // 3
            assert raw[k % 3][row * stripe : row * stripe + len(chunk)] == chunk
        back = torch.empty_like(data)
        engine.read(back, paths, stripe_size=stripe).wait()
        assert torch.equal(back, data)
        # a range that starts mid-stripe and touches only some files
        part = torch.empty(stripe, dtype=torch.uint8)
        engine.read(part, paths, offset=stripe // 2, stripe_size=stripe).wait()
        assert torch.equal(part, data[stripe // 2 : stripe // 2 + stripe])


def test_engine_counts_bytes_moved(engine: IOEngine, tmp_path: Path) -> None:
    data = random_bytes(5_000_000)
    engine.write(data, tmp_path / "t").wait()
    engine.read(torch.empty_like(data), tmp_path / "t").wait()
    assert engine.bytes_written == engine.bytes_read == 5_000_000


def test_closing_an_engine_finishes_transfers_already_started(tmp_path: Path) -> None:
    eng = make_engine("aio")
    data = random_bytes(20 << 20)
    future = eng.write(data, tmp_path / "t")
    eng.close()
    assert future.done()
    future.wait()
    assert (tmp_path / "t").read_bytes() == data.numpy().tobytes()
    with pytest.raises(RuntimeError, match="closed"):
        eng.write(data, tmp_path / "t2")


@pytest.mark.parametrize("block_size", [64 << 10, 128 << 10])
def test_io_block_size_is_the_piece_a_file_is_striped_in_over_the_paths(block_size: int, tmp_path: Path) -> None:
    """`io.block_size` (no explicit stripe): piece k of the data lands in path k % 3 at row k // 3."""
    roots = [tmp_path / f"ssd{i}" for i in range(3)]
    for root in roots:
        root.mkdir()
    with make_engine("threads", block_size=block_size) as engine, SwapSpace(roots, field="fuyou.nvme_paths") as space:
        paths = space.files("store")
        data = random_bytes(7 * (64 << 10), seed=block_size)
        engine.write(data, paths).wait()
        raw = [Path(p).read_bytes() for p in paths]
        for k in range(-(-data.numel() // block_size)):
            piece = data[k * block_size : (k + 1) * block_size].numpy().tobytes()
            assert raw[k % 3][(k // 3) * block_size :][: len(piece)] == piece


@pytest.mark.parametrize("queue_depth", [1, 4])
def test_io_queue_depth_is_how_many_pieces_a_worker_keeps_in_flight(queue_depth: int, tmp_path: Path) -> None:
    """Memory that is not 4 KiB-aligned goes through one bounce block per piece in flight, so the bounce blocks a
    single worker allocates for a long misaligned write count the requests it keeps in flight at once."""
    block_size = 64 << 10
    with make_engine("aio", threads=1, queue_depth=queue_depth, block_size=block_size) as engine:
        data = page_aligned(random_bytes(32 * block_size + 1, seed=queue_depth))[1:]
        engine.write(data, tmp_path / "t").wait()
        assert engine.bounce_bytes == queue_depth * block_size
        back = torch.empty_like(data)
        engine.read(back, tmp_path / "t").wait()
        assert torch.equal(back, data)


@pytest.mark.parametrize("backend", ["aio", "threads"])
def test_io_threads_is_the_number_of_worker_threads_the_engine_starts(backend: str) -> None:
    def threads_now() -> int:
        return len(os.listdir("/proc/self/task"))

    started = {}
    for threads in (1, 4):
        before = threads_now()
        with make_engine(backend, threads=threads):
            started[threads] = threads_now() - before
    assert started[4] - started[1] == 3
