"""Freed heap leaves RSS after our ZeRO-3 optimizer's trim (or with glibc's threshold fixed), not by itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A freed 16 MiB block lifts glibc's mmap threshold to 16 MiB; 256 blocks of 1 MiB then come from the heap, and a
# small tensor allocated after them pins the heap's top, so freeing them returns nothing by itself.
PROGRAM = """
import sys

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
