"""The one place where fuyou hooks into DeepSpeed: `register()` replaces DeepSpeed's ZeRO-3 swapper and optimizer
with factories that build ours for configs with a `"fuyou"` block (`registration`), and the two classes they build
(`zero_optimizer`, `param_swapper`).

Importing this package patches nothing. With the import hook active (the default; `deepspeed_fuyou._hook`),
DeepSpeed is patched when it is imported; with `FUYOU_DISABLE=1`, `register()` or `initialize(...)` (a drop-in for
`deepspeed.initialize`) does it.
"""

# DeepSpeed first, before `registration`: where DeepSpeed is not imported yet, this line imports it, and the import
# hook then imports `registration` whole to register. Were `registration` the module importing DeepSpeed, the hook
# would find it half-executed.
import deepspeed  # noqa: F401  isort: skip

from deepspeed_fuyou.integration.registration import (
    REPLACED,
    STOCK_PARAM_SWAPPER,
    STOCK_STAGE3,
    check_deepspeed_internals,
    check_deepspeed_version,
    initialize,
    is_registered,
    parameter_swapper,
    register,
    unregister,
    zero3_optimizer,
)

__all__ = [
    "REPLACED",
    "STOCK_PARAM_SWAPPER",
    "STOCK_STAGE3",
    "check_deepspeed_internals",
    "check_deepspeed_version",
    "initialize",
    "is_registered",
    "parameter_swapper",
    "register",
    "unregister",
    "zero3_optimizer",
]
