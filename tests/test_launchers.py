"""Every launcher users already have runs a config's `"fuyou"` block through fuyou, started as the README shows.

Each example under `examples/` runs under `tests/programs/guarded.py`: DeepSpeed's own swappers cannot be
constructed, and every process reports the fuyou classes it built and the bytes its swap runtimes moved. A run that
completes with fuyou's swappers built and bytes moved used fuyou, not DeepSpeed's swap path and not a run that
dropped the config on the way. The `deepspeed` launcher, `torchrun` and `accelerate launch` build the same model
under `zero.Init` from the same seed, so their losses must agree to the last digit.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepspeed_fuyou.distributed import free_port
from tests.conftest import launch_failure, run_deepspeed, run_launched

pytestmark = pytest.mark.launches  # every test here starts processes (run_tests.sh --fast leaves them out)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GUARDED = ROOT / "tests" / "programs" / "guarded.py"
BIN = Path(sys.executable).parent
FUYOU_CLASSES = ["FuyouOptimizerSwapper", "FuyouParamSwapper", "FuyouZeroOptimizer", "SwapRuntime"]
STEPS = 3


def ds_config(tmp_path: Path, shipped: str = "fuyou_cpu.json") -> Path:
    """The shipped config with its swap files under `tmp_path`."""
    config = json.loads((ROOT / "configs" / shipped).read_text())
    swap = tmp_path / "swap"
    swap.mkdir()
    config["fuyou"]["nvme_paths"] = [str(swap)]
    for offload in ("offload_param", "offload_optimizer"):
        config["zero_optimization"][offload]["nvme_path"] = str(swap)
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    return path


def guarded(example: str, workdir: Path) -> dict[str, str]:
    """The environment that makes `guarded.py` run `example` with DeepSpeed's swappers forbidden, reporting what
    each process built and moved under `workdir`."""
    workdir.mkdir(parents=True)
    return {"FORBID": "stock", "GUARDED_SCRIPT": str(EXAMPLES / example), "GUARDED_REPORT": str(workdir / "reports")}


def trained_through_fuyou(result: subprocess.CompletedProcess[str], workdir: Path) -> list[float]:
    """Checks that the run succeeded with fuyou doing the swapping (its one rank's report); the losses it printed."""
    assert result.returncode == 0, f"{workdir.name} failed:\n{launch_failure(result)}"
    [report] = [json.loads(path.read_text()) for path in (workdir / "reports").glob("*.json")]  # one rank
    assert report["constructed"] == FUYOU_CLASSES
    assert report["bytes_read"] > 0 and report["bytes_written"] > 0
    losses = [float(loss) for loss in re.findall(r"^step \d+ loss (\S+)$", result.stdout, re.MULTILINE)]
    assert len(losses) == STEPS, result.stdout[-4000:]
    return losses


def test_deepspeed_launcher_torchrun_and_accelerate_launch_all_train_through_fuyou_with_the_same_losses(
    tmp_path: Path,
) -> None:
    arguments = ("--deepspeed_config", str(ds_config(tmp_path)), "--steps", str(STEPS))
    losses = {}
    for launcher in ("deepspeed", "torchrun"):
        workdir = tmp_path / launcher
        environment = guarded("train_deepspeed.py", workdir)
        result = run_deepspeed(GUARDED, *arguments, cwd=workdir, launcher=launcher, **environment)
        losses[launcher] = trained_through_fuyou(result, workdir)

    shipped = (EXAMPLES / "accelerate_deepspeed.yaml").read_text()
    accelerate_config = tmp_path / "accelerate.yaml"
    accelerate_config.write_text(shipped.replace("configs/fuyou_cpu.json", arguments[1]))
    assert accelerate_config.read_text() != shipped
    workdir, port = tmp_path / "accelerate", free_port()
    command = [str(BIN / "accelerate"), "launch", "--main_process_port", str(port)]
    command += ["--config_file", str(accelerate_config), str(GUARDED), *arguments[2:]]
    result = run_launched(command, port, workdir, **guarded("train_accelerate.py", workdir))
    losses["accelerate"] = trained_through_fuyou(result, workdir)

    assert losses["torchrun"] == losses["deepspeed"] and losses["accelerate"] == losses["deepspeed"], losses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lightning_deepspeed_strategy_trains_through_fuyou(tmp_path: Path) -> None:
    """Lightning's `DeepSpeedStrategy` refuses every accelerator but CUDA, so this runs only where a GPU is."""
    pytest.importorskip("lightning")
    workdir, port = tmp_path / "lightning", free_port()
    config = ds_config(tmp_path, "fuyou_gpu.json")
    command = [sys.executable, str(GUARDED), "--deepspeed_config", str(config), "--steps", str(STEPS)]
    environment = {"DS_ACCELERATOR": "cuda", "MASTER_PORT": str(port), **guarded("train_lightning.py", workdir)}
    trained_through_fuyou(run_launched(command, port, workdir, **environment), workdir)
