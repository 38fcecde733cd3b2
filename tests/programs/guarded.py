"""Runs a training script with one side's swap classes made unconstructible, to prove which side is in use.

    FORBID=stock|fuyou [GUARDED_SCRIPT=path] [GUARDED_REPORT=dir] python tests/programs/guarded.py <script arguments>

The script is `GUARDED_SCRIPT` (default: scripts/finetune.py, the main job). Settings come from the environment
because launchers put their own arguments first (the `deepspeed` launcher's `--local_rank`) and hand the environment
to every process they start (`deepspeed`, `torchrun`, `accelerate launch`).
- `FORBID=stock`: constructing DeepSpeed's parameter swapper or either of its optimizer swappers raises, so a run
  that completes used none of them. `FORBID=fuyou`: constructing our swap runtime, swappers or ZeRO optimizer
  raises, so a run without a `"fuyou"` block that completes is DeepSpeed's own path.
- `GUARDED_REPORT`: each process writes `<dir>/<pid>.json` when it exits: the fuyou classes it constructed and the
  bytes its swap runtimes read and wrote. Forbidding stock alone cannot tell a fuyou run from one that swapped
  nothing (a launcher that dropped the config, say); this can.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any

import deepspeed  # noqa: F401  (the installed import hook registers fuyou here, as for any user script)
from deepspeed.runtime.swap_tensor.partitioned_optimizer_swapper import PartitionedOptimizerSwapper
from deepspeed.runtime.swap_tensor.partitioned_param_swapper import AsyncPartitionedParameterSwapper
from deepspeed.runtime.swap_tensor.pipelined_optimizer_swapper import PipelinedOptimizerSwapper

from deepspeed_fuyou.integration.param_swapper import FuyouParamSwapper
from deepspeed_fuyou.integration.zero_optimizer import FuyouZeroOptimizer
from deepspeed_fuyou.swap.optimizer_swapper import FuyouOptimizerSwapper
from deepspeed_fuyou.swap.runtime import SwapRuntime

MAIN_JOB = Path(__file__).resolve().parents[2] / "scripts" / "finetune.py"
FUYOU_CLASSES = (SwapRuntime, FuyouParamSwapper, FuyouOptimizerSwapper, FuyouZeroOptimizer)
FORBIDDEN = {
    "stock": (AsyncPartitionedParameterSwapper, PartitionedOptimizerSwapper, PipelinedOptimizerSwapper),
    "fuyou": FUYOU_CLASSES,
}


def forbid(cls: type) -> None:
    def refuse(self: object, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"{cls.__module__}.{cls.__qualname__} was constructed")

    cls.__init__ = refuse


def report_to(directory: Path) -> None:
    """Records every fuyou class constructed and each swap runtime's counters, written out at exit."""
    constructed: set[str] = set()
    counters: list[Any] = []

    def recording(cls: type) -> None:
        init = cls.__init__

        def record(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            constructed.add(cls.__name__)
            if isinstance(self, SwapRuntime):
                counters.append(self.counters)  # the counters only: the runtime itself may be freed

        cls.__init__ = record

    def write() -> None:
        report = {
            "constructed": sorted(constructed),
            "bytes_read": sum(c.bytes_read for c in counters),
            "bytes_written": sum(c.bytes_written for c in counters),
        }
        (directory / f"{os.getpid()}.json").write_text(json.dumps(report))

    for cls in FUYOU_CLASSES:
        recording(cls)
    directory.mkdir(parents=True, exist_ok=True)
    atexit.register(write)


def main() -> None:
    side = os.environ.get("FORBID")
    if side not in FORBIDDEN:
        raise SystemExit(__doc__)
    for cls in FORBIDDEN[side]:
        forbid(cls)
    if "GUARDED_REPORT" in os.environ:
        report_to(Path(os.environ["GUARDED_REPORT"]))
    script = Path(os.environ.get("GUARDED_SCRIPT", MAIN_JOB)).resolve()
    sys.argv = [str(script), *sys.argv[1:]]
    sys.path.insert(0, str(script.parent))  # as `python <script>` has it: its neighbours import
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
