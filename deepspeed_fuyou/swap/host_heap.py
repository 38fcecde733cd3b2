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

What fuyou does instead (with a `"fuyou"` block, unless `"host_cache": false`): tensors of at least 128 KiB come
from its own CPU allocator (`csrc/fuyou/host_allocator.cpp`), one mapping each, kept after free in one of eight size
classes per power of two for the next step's identical request. A miss first unmaps idle blocks while the bytes
mapped would exceed the peak of bytes in use, so RSS follows the peak that large tensors ever needed at once (not a
fragmented heap), and a step reuses its mappings without page faults. The same 32-layer model then peaks at 1.16 GiB
(1.0 GiB with the pinned pool carving its slabs too). Smaller tensors still come from glibc, whose heap the trim
keeps lean.
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


def install_host_cache() -> None:
    """Makes fuyou's caching allocator torch's CPU allocator for the rest of the process (idempotent).

    Tensors allocated before keep their own deleters; there is no uninstall, as tensors from the cache may outlive
    any scope that would undo it.
    """
    from deepspeed_fuyou.io import native  # the compiled core only where the cache is wanted, not to read RSS

    native.install_host_allocator()


def host_cache_stats() -> dict[str, int]:
    """The cache's counters (bytes in use, idle, peak in use; mappings, reuses, evictions); empty if not installed."""
    from deepspeed_fuyou.io import native

    return dict(native.host_cache_stats())


def rss_bytes(field: str = "VmRSS") -> int:
    """A memory field of /proc/self/status in bytes: `VmRSS` now, `VmHWM` its peak since start or `reset_peak_rss`."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status[field].split()[0]) << 10


def reset_peak_rss() -> None:
    """Sets the kernel's RSS high-water mark (VmHWM) to the current RSS, so a phase's own peak can be read after."""
    Path("/proc/self/clear_refs").write_text("5")
