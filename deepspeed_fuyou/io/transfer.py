"""Pipelined copies between files and device memory through pinned staging buffers.

A tensor is moved in chunks through `depth` pinned buffers taken once from the pool:
  * file -> device: the read of chunk k+1 (SSD -> pinned) runs while chunk k crosses PCIe (pinned -> GPU);
  * device -> file: the copy of chunk k+1 (GPU -> pinned) runs while chunk k is written (pinned -> SSD).
PCIe copies run on a dedicated CUDA stream per device, ordered after the caller's current stream and, for loads,
before it again, so the caller can use the tensor as soon as `load` returns without synchronizing the GPU.

Without CUDA the "device" is host memory and the copies are synchronous: the same pipeline, exercised in CI.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch

from deepspeed_fuyou.errors import FuyouIOError
from deepspeed_fuyou.io.engine import ALIGNMENT, IOEngine, IOFuture
from deepspeed_fuyou.io.pinned import PinnedPool

Paths = str | os.PathLike | Sequence[str | os.PathLike]


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_contiguous():
        raise ValueError("DeviceTransfer moves contiguous tensors: call .contiguous() first")
    return tensor.reshape(-1).view(torch.uint8)


def _drain(futures: Sequence[IOFuture | None]) -> None:
    """Waits for transfers still in flight so no staging buffer is reused under a running read or write."""
    for future in futures:
        if future is None:
            continue
        with contextlib.suppress(FuyouIOError):  # the first error is already propagating
            future.wait()


class SideStreams:
    """One side stream per CUDA device, made on first use: copies on it overlap the compute of the current stream."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def get(self, device: torch.device) -> torch.cuda.Stream | None:
        """The side stream of `device`; None for a host device, where copies are plain memcpys."""
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]


class DeviceTransfer:
    """Moves tensors between files and any device, `chunk_size` bytes at a time through `depth` pinned buffers."""

    def __init__(self, engine: IOEngine, pool: PinnedPool, chunk_size: int = 16 << 20, depth: int = 2) -> None:
        if chunk_size <= 0 or chunk_size % ALIGNMENT:
            raise ValueError(f"chunk_size must be a positive multiple of {ALIGNMENT}, got {chunk_size}")
        if depth < 2:
            raise ValueError("depth must be >= 2: with one buffer nothing overlaps")
        self.engine = engine
        self.chunk_size = chunk_size
        self._buffers = [pool.acquire(chunk_size) for _ in range(depth)]
        self._streams = SideStreams()

    def _chunks(self, nbytes: int) -> list[tuple[int, int]]:
        return [(lo, min(nbytes, lo + self.chunk_size)) for lo in range(0, nbytes, self.chunk_size)]

    def load(self, dst: torch.Tensor, path: Paths, offset: int = 0, stripe_size: int | None = None) -> None:
        """Fills `dst` (on any device) from `offset` of `path`; raises FuyouIOError if the file falls short."""
        dst_bytes = _as_bytes(dst)
        chunks = self._chunks(dst_bytes.numel())
        depth = len(self._buffers)
        stream = self._streams.get(dst.device)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(dst.device))  # earlier work on dst comes first
        copied: list[torch.cuda.Event | None] = [None] * depth
        reads: dict[int, IOFuture] = {}

        def start_read(k: int) -> None:
            slot = k % depth
            if copied[slot] is not None:
                copied[slot].synchronize()  # the PCIe copy of chunk k - depth has left this buffer
            lo, hi = chunks[k]
            reads[k] = self.engine.read(self._buffers[slot][: hi - lo], path, offset + lo, stripe_size)

        try:
            for k in range(min(depth, len(chunks))):
                start_read(k)
            for k, (lo, hi) in enumerate(chunks):
                reads.pop(k).wait()
                staged = self._buffers[k % depth][: hi - lo]
                if stream is None:
                    dst_bytes[lo:hi].copy_(staged)
                else:
                    with torch.cuda.stream(stream):
                        dst_bytes[lo:hi].copy_(staged, non_blocking=True)
                        copied[k % depth] = torch.cuda.Event()
                        copied[k % depth].record(stream)
                if k + depth < len(chunks):
                    start_read(k + depth)
        finally:
            _drain(list(reads.values()))
            if stream is not None:
                torch.cuda.current_stream(dst.device).wait_stream(stream)

    def store(self, src: torch.Tensor, path: Paths, offset: int = 0, stripe_size: int | None = None) -> None:
        """Writes `src` (on any device) at `offset` of `path`; returns once every byte is on the file."""
        src_bytes = _as_bytes(src)
        depth = len(self._buffers)
        stream = self._streams.get(src.device)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(src.device))  # src is complete before we copy it
        writes: list[IOFuture | None] = [None] * depth
        try:
            for k, (lo, hi) in enumerate(self._chunks(src_bytes.numel())):
                slot = k % depth
                if writes[slot] is not None:
                    writes[slot].wait()  # the write of chunk k - depth has left this buffer
                    writes[slot] = None
                staged = self._buffers[slot][: hi - lo]
                if stream is None:
                    staged.copy_(src_bytes[lo:hi])
                else:
                    with torch.cuda.stream(stream):
                        staged.copy_(src_bytes[lo:hi], non_blocking=True)
                    stream.synchronize()
                writes[slot] = self.engine.write(staged, path, offset + lo, stripe_size)
            for future in writes:
                if future is not None:
                    future.wait()
        finally:
            _drain(writes)
