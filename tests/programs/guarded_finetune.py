"""Runs scripts/finetune.py with one side's swap classes made unconstructible, to prove which side is in use.

    FORBID=stock|fuyou python tests/programs/guarded_finetune.py <finetune arguments>

(an environment variable, because the `deepspeed` launcher puts its own `--local_rank` first on the command line).
`FORBID=stock`: constructing DeepSpeed's parameter swapper or either of its optimizer swappers raises, so a run
that completes used none of them. `--forbid fuyou`: constructing our swap runtime, swappers or ZeRO optimizer
raises, so a run without a `"fuyou"` block that completes is DeepSpeed's own path. Works under the `deepspeed`
launcher, which starts this file once per rank.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import deepspeed  # noqa: F401  (the installed import hook registers fuyou here, as for any user script)
from deepspeed.runtime.swap_tensor.partitioned_optimizer_swapper import PartitionedOptimizerSwapper
from deepspeed.runtime.swap_tensor.partitioned_param_swapper import AsyncPartitionedParameterSwapper
from deepspeed.runtime.swap_tensor.pipelined_optimizer_swapper import PipelinedOptimizerSwapper

from deepspeed_fuyou.swap.optimizer_swapper import FuyouOptimizerSwapper
from deepspeed_fuyou.swap.param_swapper import FuyouParamSwapper
from deepspeed_fuyou.swap.runtime import SwapRuntime
from deepspeed_fuyou.swap.zero_optimizer import FuyouZeroOptimizer

FORBIDDEN = {
    "stock": (AsyncPartitionedParameterSwapper, PartitionedOptimizerSwapper, PipelinedOptimizerSwapper),
    "fuyou": (SwapRuntime, FuyouParamSwapper, FuyouOptimizerSwapper, FuyouZeroOptimizer),
}


def forbid(cls: type) -> None:
    def refuse(self: object, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"{cls.__module__}.{cls.__qualname__} was constructed")

    cls.__init__ = refuse


def main() -> None:
    side = os.environ.get("FORBID")
    if side not in FORBIDDEN:
        raise SystemExit(__doc__)
    for cls in FORBIDDEN[side]:
        forbid(cls)
    script = Path(__file__).resolve().parents[2] / "scripts" / "finetune.py"
    sys.argv = [str(script), *sys.argv[1:]]
    sys.path.insert(0, str(script.parent))  # as `python scripts/finetune.py` has it: its neighbours import
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
