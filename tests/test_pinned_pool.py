"""One budget for every staging buffer: aligned, locked where permitted, counted, and never exceeded."""

from __future__ import annotations

import gc
import re
import threading
import time

import pytest
import torch

from deepspeed_fuyou.errors import FuyouConfigError, FuyouError
from deepspeed_fuyou.io import PinnedPool
from deepspeed_fuyou.plan.sizing import pinned_budget_error

MiB = 1 << 20


def test_buffers_are_4k_aligned_with_the_requested_size_and_counted_in_4k_units() -> None:
    pool = PinnedPool(8 * MiB)
    buffers = [pool.acquire(n) for n in (1, 4095, 4097, MiB + 1)]
    assert [b.numel() for b in buffers] == [1, 4095, 4097, MiB + 1]
    assert all(b.data_ptr() % 4096 == 0 for b in buffers)
    assert all(b.dtype == torch.uint8 and b.device.type == "cpu" for b in buffers)
    stats = pool.stats()
    assert stats.in_use == 4096 + 4096 + 8192 + MiB + 4096
    assert stats.reserved == stats.in_use == stats.peak_in_use
    assert stats.allocations == 4


def test_a_buffer_returns_to_the_pool_when_its_last_view_is_gone_and_is_reused() -> None:
    pool = PinnedPool(8 * MiB)
    buffer = pool.acquire(MiB)
    address = buffer.data_ptr()
    view = buffer[10:20]
    del buffer
    assert pool.stats().in_use == MiB  # the view still holds it
    del view
    gc.collect()
    assert pool.stats().in_use == 0
    assert pool.stats().reserved == MiB  # cached, still pinned
    again = pool.acquire(MiB - 100)
    assert again.data_ptr() == address
    assert pool.stats().allocations == 1


def test_memory_is_page_locked_where_permitted_and_the_counters_say_so() -> None:
    pool = PinnedPool(4 * MiB, lock="mlock")
    buffer = pool.acquire(2 * MiB)
    stats = pool.stats()
    assert stats.lock_mode == "mlock"
    assert stats.locked in (0, 2 * MiB)  # 0 only without CAP_IPC_LOCK beyond RLIMIT_MEMLOCK
    buffer.fill_(7)
    assert int(buffer.sum()) == 7 * 2 * MiB
    assert PinnedPool(MiB, lock="none").acquire(4096) is not None
    assert PinnedPool(MiB, lock="none").stats().locked == 0


def test_exhausted_budget_blocks_until_another_thread_releases_a_buffer() -> None:
    pool = PinnedPool(4 * MiB)
    held = [pool.acquire(2 * MiB), pool.acquire(2 * MiB)]

    def release_later() -> None:
        time.sleep(0.3)
        held.pop()

    releaser = threading.Thread(target=release_later)
    start = time.monotonic()
    releaser.start()
    third = pool.acquire(2 * MiB, timeout=10)
    waited = time.monotonic() - start
    releaser.join()
    assert waited >= 0.25
    assert third.numel() == 2 * MiB
    stats = pool.stats()
    assert stats.waits == 1
    assert stats.peak_reserved <= 4 * MiB


def test_exhausted_budget_raises_after_the_timeout_naming_the_budget_it_needs() -> None:
    pool = PinnedPool(4 * MiB)
    _held = pool.acquire(3 * MiB)
    with pytest.raises(FuyouError, match=r"at least 5.00 MiB"):  # what is in use plus what was asked
        pool.acquire(2 * MiB, timeout=0.2)


def test_the_owner_of_a_pool_names_the_setting_its_budget_came_from() -> None:
    pool = PinnedPool(4 * MiB, short_budget=pinned_budget_error("fuyou.pinned_memory", 8 * MiB, 0.5, "hold less"))
    _held = pool.acquire(3 * MiB)
    with pytest.raises(FuyouConfigError) as err:
        pool.acquire(2 * MiB, timeout=0.2)
    assert err.value.field == "fuyou.pinned_memory" and err.value.value == "8.00 MiB"  # the setting, not the share
    assert err.value.fix == "raise fuyou.pinned_memory to at least 10.00 MiB, or hold less"
    with pytest.raises(FuyouConfigError) as err:
        pool.acquire(5 * MiB)  # larger than the whole pool: no other fix
    assert err.value.fix == "raise fuyou.pinned_memory to at least 10.00 MiB"


def test_free_bytes_between_buffers_in_use_are_unmapped_so_that_a_larger_buffer_fits_at_once() -> None:
    """A layer's partitions differ in size: carved one after another out of freed ones, they leave free pieces
    between buffers still held. A buffer the budget has room for never waits on them."""
    pool = PinnedPool(4 * MiB)
    pool.acquire(4 * MiB)  # one slab, the whole budget, free again
    pieces = [pool.acquire(MiB) for _ in range(4)]
    del pieces[1], pieces[2]  # 2 MiB free, as two 1 MiB holes between the buffers still held
    assert pool.room_for(2 * MiB) == 1 and pool.room_for(MiB) == 2
    larger = pool.acquire(2 * MiB, timeout=0)
    stats = pool.stats()
    assert stats.pieces_unmapped == 2 and stats.allocations == 2 and stats.waits == 0
    assert stats.in_use == stats.reserved == 4 * MiB
    held = [*pieces, larger]
    for value, buffer in enumerate(held):  # the slab around the holes stays usable
        buffer.fill_(value)
    assert [int(buffer[-1]) for buffer in held] == [0, 1, 2]
    del pieces, larger, held, buffer
    assert pool.acquire(4 * MiB, timeout=0).numel() == 4 * MiB  # the remaining slabs unmapped in turn
    assert pool.stats().reserved == 4 * MiB


def test_room_for_counts_buffers_that_free_ranges_and_the_unmapped_budget_give_without_waiting() -> None:
    pool = PinnedPool(8 * MiB)
    pool.acquire(4 * MiB)  # one 4 MiB slab, free again; 4 MiB of the budget unmapped
    pieces = [pool.acquire(MiB) for _ in range(4)]
    del pieces[1], pieces[2]  # two 1 MiB holes between the buffers still held
    assert pool.room_for(MiB) == 2 + 4
    assert pool.room_for(3 * MiB) == 2  # the holes unmapped, their bytes with the budget's unmapped 4 MiB
    taken = [pool.try_acquire(3 * MiB) for _ in range(3)]
    assert [buffer is not None for buffer in taken] == [True, True, False]
    assert pool.room_for(MiB) == 0


def test_a_buffer_larger_than_the_whole_budget_fails_at_once() -> None:
    pool = PinnedPool(MiB, timeout=3600)
    start = time.monotonic()
    with pytest.raises(FuyouError, match=re.escape("at least 2.00 MiB")):
        pool.acquire(2 * MiB)
    assert time.monotonic() - start < 1


def test_cached_idle_buffers_are_dropped_to_make_room_instead_of_exceeding_the_budget() -> None:
    pool = PinnedPool(4 * MiB)
    for _ in range(3):
        pool.acquire(MiB)  # released at once, cached
    assert pool.stats().reserved == MiB
    small = [pool.acquire(MiB) for _ in range(3)]
    del small
    big = pool.acquire(3 * MiB)  # needs the cached 1 MiB blocks freed
    assert big.numel() == 3 * MiB
    assert pool.stats().reserved <= 4 * MiB
    assert pool.stats().peak_reserved <= 4 * MiB


def test_a_free_buffer_is_carved_for_smaller_requests_and_the_pieces_merge_back() -> None:
    pool = PinnedPool(8 * MiB)
    base = pool.acquire(4 * MiB).data_ptr()  # released at once: one free 4 MiB slab
    pieces = [pool.acquire(MiB) for _ in range(4)]
    assert sorted(p.data_ptr() for p in pieces) == [base + k * MiB for k in range(4)]
    del pieces[1], pieces[2]  # free pieces 1 and 3: not adjacent, so not yet one range
    assert pool.stats().reserved == 4 * MiB
    del pieces
    assert pool.acquire(4 * MiB).data_ptr() == base  # all four merged into the whole slab again
    assert pool.stats().allocations == 1 and pool.stats().reserved == 4 * MiB


def test_phases_of_different_buffer_sizes_share_slabs_so_the_reserve_stays_at_the_peak_in_use() -> None:
    """Forward/backward stage many small buffers, the optimizer step a few large ones. A cache of whole blocks
    held both phases' blocks (76 MiB here); carving holds only what one phase uses at most, and stops mapping."""
    pool = PinnedPool(256 * MiB)
    allocations_after_first_round = 0
    for round_ in range(4):
        small = [pool.acquire(MiB) for _ in range(40)]
        del small
        large = [pool.acquire(12 * MiB) for _ in range(3)]
        del large
        if round_ == 0:
            allocations_after_first_round = pool.stats().allocations
    stats = pool.stats()
    assert stats.peak_in_use == 40 * MiB
    assert stats.peak_reserved == stats.peak_in_use
    assert stats.allocations == allocations_after_first_round  # later rounds map nothing: no re-pinning churn
    assert stats.evictions > 0


def test_typed_buffers_view_the_pool_memory() -> None:
    pool = PinnedPool(MiB)
    tensor = pool.acquire_tensor((3, 5), torch.float32)
    assert tensor.shape == (3, 5) and tensor.dtype == torch.float32
    assert tensor.data_ptr() % 4096 == 0
    assert pool.stats().in_use == 4096


def test_trim_unmaps_free_slabs() -> None:
    pool = PinnedPool(MiB)
    pool.acquire(4096)
    assert pool.stats().reserved == 4096
    pool.trim()
    assert pool.stats().reserved == 0


def test_invalid_pool_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="positive budget"):
        PinnedPool(0)
    with pytest.raises(ValueError, match="lock"):
        PinnedPool(MiB, lock="sometimes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_free_bytes_between_cuda_registered_buffers_are_named_as_such_when_a_request_times_out() -> None:
    """A registration is undone only whole: the pieces of a registered slab stay, and only whole fits count."""
    pool = PinnedPool(4 * MiB, lock="cuda")
    pool.acquire(4 * MiB)  # one slab, the whole budget, free again
    pieces = [pool.acquire(MiB) for _ in range(4)]
    del pieces[1], pieces[2]  # 2 MiB free, as two 1 MiB holes between the buffers still held
    assert pool.room_for(2 * MiB) == 0 and pool.room_for(MiB) == 2
    with pytest.raises(FuyouError) as err:
        pool.acquire(2 * MiB, timeout=0.2)
    assert "2.00 MiB free in pieces too small" in str(err.value)
    assert "at least 6.00 MiB" in str(err.value)  # the slab it holds plus a new one of the size asked


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_pool_memory_is_cuda_registered_and_copies_to_the_device_asynchronously() -> None:
    pool = PinnedPool(4 * MiB, lock="cuda")
    buffer = pool.acquire(2 * MiB)
    stats = pool.stats()
    assert stats.lock_mode == "cuda" and stats.locked == 2 * MiB
    assert buffer.is_pinned()  # torch sees the registration: copies from it need no staging of their own
    values = buffer.view(torch.float32).copy_(torch.arange(MiB // 2, dtype=torch.float32))
    on_device = values.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_device.cpu(), values)
