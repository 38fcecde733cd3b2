"""deepspeed-fuyou: fast, memory-safe ZeRO-Infinity on one GPU, modest DRAM and NVMe SSDs."""

from deepspeed_fuyou.errors import FuyouConfigError, FuyouError, FuyouIOError

__all__ = ["FuyouConfigError", "FuyouError", "FuyouIOError"]
__version__ = "0.1.0"
