"""deepspeed-fuyou: fast, memory-safe ZeRO-Infinity on one GPU, modest DRAM and NVMe SSDs.

Importing the package registers fuyou into DeepSpeed (now, or when `deepspeed` is imported; see `_hook`), unless
`FUYOU_DISABLE=1`. It imports neither torch nor DeepSpeed itself, because the installed `.pth` imports it in every
interpreter of the environment.
"""

from typing import Any

from deepspeed_fuyou import _hook
from deepspeed_fuyou.errors import FuyouConfigError, FuyouError, FuyouIOError

__all__ = ["FuyouConfigError", "FuyouError", "FuyouIOError", "initialize", "offload_activations"]
__version__ = "0.1.0"


def initialize(*args: Any, **kwargs: Any) -> Any:
    """Drop-in for `deepspeed.initialize` that registers fuyou first (also with FUYOU_DISABLE=1)."""
    from deepspeed_fuyou.integration import initialize as initialize_with_fuyou

    return initialize_with_fuyou(*args, **kwargs)


def offload_activations(model: Any, **settings: Any) -> Any:
    """Offload the activations of `model`'s forward passes run inside `with` (see `deepspeed_fuyou.activations`)."""
    from deepspeed_fuyou.activations import offload_activations as offload

    return offload(model, **settings)


_hook.install()
