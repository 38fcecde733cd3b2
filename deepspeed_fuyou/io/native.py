"""The compiled core, `deepspeed_fuyou._C`, with a clear message when it has not been built."""

import torch  # noqa: F401  (loads libtorch/libc10, which the extension links against)

from deepspeed_fuyou.config.io_options import ALIGNMENT

try:
    from deepspeed_fuyou import _C
except ImportError as err:  # pragma: no cover - only on a broken install
    raise ImportError(
        "deepspeed_fuyou._C is not built: run scripts/install.sh, or "
        "'pip install --no-build-isolation -e .' with libaio-dev installed"
    ) from err

if _C.ALIGNMENT != ALIGNMENT:  # pragma: no cover - only if csrc/fuyou/common.h changes alone
    raise ImportError(f"deepspeed_fuyou._C aligns to {_C.ALIGNMENT} bytes, the Python side to {ALIGNMENT}: rebuild")

BOUNCE_BLOCKS_PER_WORKER: int = _C.BOUNCE_BLOCKS_PER_WORKER
Engine = _C.Engine
Request = _C.Request
PinnedPool = _C.PinnedPool
io_uring_compiled = _C.io_uring_compiled
cuda_compiled = _C.cuda_compiled
crc32c = _C.crc32c
install_host_allocator = _C.install_host_allocator
host_allocator_installed = _C.host_allocator_installed
host_cache_stats = _C.host_cache_stats
host_cache_size_class = _C.host_cache_size_class
