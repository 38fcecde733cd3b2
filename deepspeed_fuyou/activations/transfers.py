"""How the bytes of one saved storage travel between device memory, host memory and the SSD.

Every copy that involves a GPU runs on a side stream of its own, ordered after the compute that produced the data
and before the compute that consumes it, so offload and prefetch overlap the forward and backward kernels. Without
CUDA the device *is* host memory: copies are plain memcpys and the SSD is read and written straight from and into
the tensors' memory (the I/O engine aligns what is not), which is the path CI exercises.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from deepspeed_fuyou.io.engine import ALIGNMENT, IOEngine
from deepspeed_fuyou.io.swap_space import SwapSpace
from deepspeed_fuyou.io.transfer import SideStreams

BANDWIDTH_PROBE_BYTES = 16 << 20
"""The fewest bytes a bandwidth probe moves: fewer would time the request, not the bandwidth."""


def storage_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """The whole storage as a flat uint8 tensor (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),), (1,))


def aligned_host_bytes(nbytes: int) -> tuple[torch.Tensor, int]:
    """A flat uint8 host tensor of `nbytes` whose first byte is ALIGNMENT-aligned, and its byte offset in its storage.

    Reads land in it with O_DIRECT and no bounce copy; the offset is a multiple of 16 (malloc's alignment), so every
    dtype's element offset stays whole when views are rebuilt on the storage.
    """
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8)
    delta = -raw.data_ptr() % ALIGNMENT
    return raw[delta : delta + nbytes], delta


class DeviceCopies:
    """Device <-> host copies on one side stream per GPU; events tell when each copy is done."""

    def __init__(self) -> None:
        self._streams = SideStreams()

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        assert stream is not None, "only copies that involve a GPU run on a side stream"
        return stream

    def to_host(self, src: torch.Tensor, dst: torch.Tensor) -> torch.cuda.Event | None:
        """Starts copying device bytes `src` into host bytes `dst`; returns the copy's event (None: already done)."""
        if src.device.type == "cpu":
            dst.copy_(src)
            return None
        stream = self._stream(src.device)
        stream.wait_stream(torch.cuda.current_stream(src.device))  # the producing kernels come first
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            src.record_stream(stream)  # the allocator must not hand src's memory out before the copy has read it
            event = torch.cuda.Event()
            event.record(stream)
        return event

    def to_device(self, src: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Starts copying host bytes `src` into new memory on `device`; returns it and the copy's event."""
        stream = self._stream(device)
        with torch.cuda.stream(stream):
            dst = torch.empty(src.numel(), dtype=torch.uint8, device=device)
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return dst, event

    @staticmethod
    def use_on_current_stream(tensor: torch.Tensor, event: torch.cuda.Event | None) -> None:
        """Makes the consumer's stream wait for the copy that filled `tensor`, without blocking the host."""
        if event is None or tensor.device.type != "cuda":
            return
        current = torch.cuda.current_stream(tensor.device)
        current.wait_event(event)
        tensor.record_stream(current)


def tier_bandwidth(tier: str, engine: IOEngine | None, space: SwapSpace | None, nbytes: int) -> tuple[float, float]:
    """Write and read bytes per second of the tier, probed with `nbytes` (at least `BANDWIDTH_PROBE_BYTES`): a
    host copy for the cpu tier, a write and a read through the engine for the nvme tier."""
    nbytes = max(nbytes, BANDWIDTH_PROBE_BYTES)
    probe, _ = aligned_host_bytes(nbytes)
    if tier == "cpu":
        started = time.perf_counter()
        torch.empty_like(probe).copy_(probe)
        seconds = time.perf_counter() - started
        return nbytes / seconds, nbytes / seconds
    assert engine is not None and space is not None
    files = space.files(f"activations-probe-{os.getpid()}")
    try:
        started = time.perf_counter()
        engine.write(probe, files).wait()
        written = time.perf_counter()
        engine.read(probe, files).wait()
        done = time.perf_counter()
    finally:
        remove_files(files)
    return nbytes / (written - started), nbytes / (done - written)


def remove_files(paths: list[str]) -> None:
    """Removes the stripe members of a file; a member never written (a short file) does not exist."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
