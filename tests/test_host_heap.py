"""Freed heap leaves RSS after our ZeRO-3 optimizer's trim (or with glibc's threshold fixed), not by itself; large
tensors from fuyou's host cache keep RSS within the peak they held at once, and reuse their mappings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepspeed_fuyou.io import native

# A freed 16 MiB block lifts glibc's mmap threshold to 16 MiB; 256 blocks of 1 MiB then come from the heap, and a
# small tensor allocated after them pins the heap's top, so freeing them returns nothing by itself.
PROGRAM = """
import sys
from pathlib import Path

import torch

from deepspeed_fuyou.swap.host_heap import release_free_heap, rss_bytes

big = torch.ones(16 << 20, dtype=torch.uint8)
del big
before = rss_bytes()
blocks = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(256)]
top = torch.ones(64, dtype=torch.uint8)
del blocks
if sys.argv[1] == "trim":
    release_free_heap()
print((rss_bytes() - before) >> 20)
"""


def retained_mib(mode: str, **env: str) -> int:
    environment = {**os.environ, **env}
    command = [sys.executable, "-c", PROGRAM, mode]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap policy")
def test_freed_blocks_stay_in_rss_under_glibcs_rising_threshold_until_trimmed_or_with_the_threshold_fixed() -> None:
    assert retained_mib("default") >= 200  # the behaviour that made fuyou's RSS grow with depth
    assert retained_mib("trim") <= 16
    assert retained_mib("default", MALLOC_MMAP_THRESHOLD_="131072") <= 16  # the opt-in the README describes


# Rounds of 1 MiB-and-up blocks, each round a size class larger, with a small tensor kept after every block: glibc
# cannot merge the freed holes nor fit the next round's larger blocks in them, so its heap grows by every round
# (by 154 to 249 MiB in runs here, depending on where the small tensors land; a trim returns the holes only
# afterwards). The cache maps each round only after unmapping the previous one's idle blocks.
ROUNDS = """
import sys
from pathlib import Path

import torch

from deepspeed_fuyou.swap.host_heap import host_cache_stats, install_host_cache, reset_peak_rss, rss_bytes

if sys.argv[1] == "cache":
    install_host_cache()
big = torch.ones(16 << 20, dtype=torch.uint8)
del big
before = rss_bytes()
reset_peak_rss()
kept = []
for step in range(4):
    size = (1 << 20) + step * (128 << 10)
    blocks = []
    for i in range(96):
        blocks.append(torch.full((size,), i % 251, dtype=torch.uint8))
        kept.append(torch.ones(64, dtype=torch.uint8))
    assert all(int(block[-1]) == i % 251 for i, block in enumerate(blocks))  # reused memory holds its own data
    del blocks
stats = host_cache_stats()
print((rss_bytes("VmHWM") - before) >> 20, stats.get("peak_in_use", 0) >> 20, stats.get("reuses", 0))
"""


def rounds(mode: str) -> tuple[int, int, int]:
    """Peak RSS growth over the rounds, the cache's peak in use and its reuses (MiB, MiB, count)."""
    command = [sys.executable, "-c", ROUNDS, mode]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    grown, peak, reuses = map(int, result.stdout.split()[-3:])
    return grown, peak, reuses


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap policy")
def test_the_host_cache_keeps_rss_within_the_peak_in_use_when_sizes_change_between_rounds() -> None:
    cached, peak, reuses = rounds("cache")
    largest_round = 96 * ((1 << 20) + 3 * (128 << 10)) >> 20  # 132 MiB; the four rounds together: 480 MiB
    assert peak <= largest_round * 9 // 8 + 1  # size classes round up by at most an eighth
    assert cached <= peak + 8
    assert reuses == 0  # every round is a new class: each maps afresh, after the last round's blocks went


def test_the_host_cache_reuses_a_freed_block_for_the_same_size_class() -> None:
    command = [
        sys.executable,
        "-c",
        "import torch\n"
        "from deepspeed_fuyou.swap.host_heap import host_cache_stats, install_host_cache\n"
        "install_host_cache()\n"
        "for _ in range(10):\n"
        "    (torch.randn(512, 512) @ torch.randn(512, 512)).sum()\n"
        "stats = host_cache_stats()\n"
        "print(stats['mappings'], stats['reuses'], stats['in_use'])\n",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    mappings, reuses, in_use = map(int, result.stdout.split())
    assert mappings <= 3  # the two operands and the product, once
    assert reuses >= 27
    assert in_use == 0


@pytest.mark.parametrize("nbytes", [128 << 10, (128 << 10) + 1, 1 << 20, (1 << 20) + 1, 3_000_000, 1 << 30])
def test_size_classes_are_whole_pages_at_most_an_eighth_above_the_request(nbytes: int) -> None:
    size = native.host_cache_size_class(nbytes)
    assert size % 4096 == 0
    assert nbytes <= size <= nbytes + nbytes // 8 + 4096


@pytest.mark.parametrize("host_cache", [True, False])
def test_the_swap_runtime_installs_the_host_cache_unless_the_config_turns_it_off(
    host_cache: bool, tmp_path: Path
) -> None:
    program = (
        "import sys\n"
        "from deepspeed_fuyou.config.fuyou import FuyouConfig\n"
        "from deepspeed_fuyou.io import native\n"
        "from deepspeed_fuyou.swap.runtime import SwapRuntime\n"
        "assert not native.host_allocator_installed()\n"
        "config = FuyouConfig(nvme_paths=(sys.argv[1],), pinned_memory=64 << 20, host_cache=sys.argv[2] == 'True')\n"
        "SwapRuntime(config).close()\n"
        "print(native.host_allocator_installed())\n"
    )
    command = [sys.executable, "-c", program, str(tmp_path), str(host_cache)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == str(host_cache)
