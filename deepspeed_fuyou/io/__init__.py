"""SSD <-> host <-> device data path: the native I/O engine, the pinned buffer pool, swap directories and the
pipelined device transfer built on them."""

from deepspeed_fuyou.io.engine import ALIGNMENT, IOEngine, IOFuture, IOOptions
from deepspeed_fuyou.io.pinned import PinnedPool, PoolStats
from deepspeed_fuyou.io.swap_space import SwapSpace
from deepspeed_fuyou.io.transfer import DeviceTransfer

__all__ = [
    "ALIGNMENT",
    "DeviceTransfer",
    "IOEngine",
    "IOFuture",
    "IOOptions",
    "PinnedPool",
    "PoolStats",
    "SwapSpace",
]
