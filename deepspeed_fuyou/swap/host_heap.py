"""Keeping host RSS near what is live (free heap returned to the kernel after set-up and each step), and reading it.

glibc serves blocks of at least its mmap threshold with their own mapping, returned to the kernel on free, and the
rest from the heap, whose freed pages it keeps. The threshold starts at 128 KiB but rises to the size of every
mapped block freed, up to 32 MiB. After the first large free (a sub-group's fp32 master built at set-up, a
gathered layer), gathered parameters, full-size gradients and activations of the CPU accelerator all come from the
heap, and RSS then follows the largest heap the run ever needed rather than what it holds.

Our ZeRO-3 optimizer trims the heap (`malloc_trim`) after set-up and after every step: a few milliseconds, and a
32-layer Llama (width 512) on the CPU accelerator peaks at 1.69 instead of 2.00 GiB. What stays is the heap
a single step needs. Setting `MALLOC_MMAP_THRESHOLD_=131072` in the environment keeps the threshold from rising,
so freed blocks leave RSS at once (0.98 instead of 1.58 GiB with activations offloaded), at a price in page faults
that on the CPU accelerator made steps up to 1.9x slower (benchmarks/RESULTS.md); on a GPU machine those blocks
are device memory, and the knob matters little.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

_LIBC = ctypes.CDLL(None)  # the process's own symbols, glibc's among them (no library search at import)


def release_free_heap() -> None:
    """Returns the heap's free pages to the kernel (`malloc_trim`); does nothing without glibc."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def rss_bytes(field: str = "VmRSS") -> int:
    """A memory field of /proc/self/status in bytes: `VmRSS` now, `VmHWM` its peak since start or `reset_peak_rss`."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status[field].split()[0]) << 10


def reset_peak_rss() -> None:
    """Sets the kernel's RSS high-water mark (VmHWM) to the current RSS, so a phase's own peak can be read after."""
    Path("/proc/self/clear_refs").write_text("5")
