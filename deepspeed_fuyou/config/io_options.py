"""The `"fuyou".io` block: how the I/O engine (`deepspeed_fuyou.io`) moves bytes, as a typed schema.

It lives with the rest of the schema, below the engine that reads it, so that parsing a config never loads the
compiled core. `ALIGNMENT` is the engine's unit of transfer; the compiled core is built with the same value and
`io.native` refuses to load if the two ever differ.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, StrictBool, StrictInt, field_validator

from deepspeed_fuyou.config.schema import FuyouModel, Size, invalid

ALIGNMENT = 4096
"""Bytes every O_DIRECT offset, length and buffer address is a multiple of (a page; csrc/fuyou/common.h kAlign)."""

MAX_BLOCK_SIZE = 64 << 20
MAX_QUEUE_DEPTH = 1024
MAX_THREADS = 64


class IOOptions(FuyouModel):
    """The `"fuyou".io` block: which kernel interface moves the bytes, and how much is in flight."""

    json_path: ClassVar[str] = "fuyou.io"

    engine: Literal["auto", "aio", "io_uring", "threads"] = "auto"
    """`auto`: Linux AIO with O_DIRECT, falling back to the pread/pwrite threads where AIO or O_DIRECT is missing;
    `aio`, `io_uring`: that kernel interface or an error at start-up; `threads`: pread/pwrite on worker threads."""
    block_size: Size = Field(1 << 20, examples=["1MiB"])
    """Size, a power of two from 4KiB to 64MiB: the largest piece one request moves; a file is striped over
    `nvme_paths` in pieces of this size."""
    # Upper bounds: past them nothing gets faster, and the engine would try to allocate what no machine has (a
    # queue slot per request in flight, a bounce buffer of `block_size` per unaligned transfer) or start threads by
    # the thousand.
    queue_depth: StrictInt = Field(32, ge=1, le=MAX_QUEUE_DEPTH, examples=[32])
    """Integer from 1 to 1024: requests each worker keeps in flight."""
    threads: StrictInt = Field(4, ge=1, le=MAX_THREADS, examples=[4])
    """Integer from 1 to 64: the engine's worker threads, each with its own queue."""
    verify: StrictBool = Field(True, examples=[True])
    """`true`: a CRC32C of every 4 KiB the engine writes, checked on every read of it, so a byte the SSD (or anyone)
    changed fails the read that would have trained on it; `false`: no checksums (to measure what they cost)."""

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, block: int) -> int:
        if block < ALIGNMENT or block & (block - 1):
            raise invalid(f"must be a power of two of at least {ALIGNMENT} bytes", 'use e.g. "1MiB"')
        if block > MAX_BLOCK_SIZE:
            raise invalid(f"is larger than {MAX_BLOCK_SIZE >> 20} MiB, which no SSD needs", 'use e.g. "1MiB"')
        return block
