"""Every launcher users already have runs a config's `"fuyou"` block through fuyou, started as the README shows.

Each example under `examples/` runs under `tests/programs/guarded.py`: DeepSpeed's own swappers cannot be
constructed, and every process reports the fuyou classes it built and the bytes its swap runtimes moved. A run that
completes with fuyou's swappers built and bytes moved used fuyou, not DeepSpeed's swap path and not a run that
dropped the config on the way. The `deepspeed` launcher, `torchrun` and `accelerate launch` build the same model
under `zero.Init` from the same seed, so their losses must agree to the last digit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepspeed_fuyou.distributed import free_port, shared_memory_buffers

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


def run_example(command: list[str], example: str, port: int, tmp_path: Path, **env: str) -> list[float]:
    """Runs `command` (a launcher, ending where it takes the program) on `guarded.py` running `example`, on the
    CPU accelerator unless `env` says otherwise; checks that fuyou did the swapping and that the run left no shared
    memory behind; returns the losses it printed."""
    tmp_path.mkdir(parents=True)
    reports = tmp_path / "reports"
    environment = {
        **os.environ,
        "FORBID": "stock",
        "GUARDED_SCRIPT": str(EXAMPLES / example),
        "GUARDED_REPORT": str(reports),
        "DS_ACCELERATOR": "cpu",
        **env,
    }
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    leaked = shared_memory_buffers(port)
    for buffer in leaked:
        buffer.unlink(missing_ok=True)
    assert result.returncode == 0, f"{example} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert not leaked, f"{example} left DeepSpeed's shared-memory buffers behind: {leaked}"
    [report] = [json.loads(path.read_text()) for path in reports.glob("*.json")]  # one rank
    assert report["constructed"] == FUYOU_CLASSES
    assert report["bytes_read"] > 0 and report["bytes_written"] > 0
    losses = [float(loss) for loss in re.findall(r"^step \d+ loss (\S+)$", result.stdout, re.MULTILINE)]
    assert len(losses) == STEPS, result.stdout[-4000:]
    return losses


def test_deepspeed_launcher_torchrun_and_accelerate_launch_all_train_through_fuyou_with_the_same_losses(
    tmp_path: Path,
) -> None:
    config = ds_config(tmp_path)
    steps = ["--steps", str(STEPS)]
    losses = {}

    port = free_port()
    launcher = [str(BIN / "deepspeed"), "--num_gpus", "1", "--master_port", str(port), str(GUARDED)]
    losses["deepspeed"] = run_example(
        [*launcher, "--deepspeed_config", str(config), *steps], "train_deepspeed.py", port, tmp_path / "deepspeed"
    )

    port = free_port()
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "1", "--master_port", str(port), str(GUARDED)]
    losses["torchrun"] = run_example(
        [*launcher, "--deepspeed_config", str(config), *steps], "train_deepspeed.py", port, tmp_path / "torchrun"
    )

    port = free_port()
    shipped = (EXAMPLES / "accelerate_deepspeed.yaml").read_text()
    accelerate_config = tmp_path / "accelerate.yaml"
    accelerate_config.write_text(shipped.replace("configs/fuyou_cpu.json", str(config)))
    assert accelerate_config.read_text() != shipped
    launcher = [str(BIN / "accelerate"), "launch", "--main_process_port", str(port)]
    launcher += ["--config_file", str(accelerate_config), str(GUARDED)]
    losses["accelerate"] = run_example([*launcher, *steps], "train_accelerate.py", port, tmp_path / "accelerate")

    assert losses["torchrun"] == losses["deepspeed"] and losses["accelerate"] == losses["deepspeed"], losses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lightning_deepspeed_strategy_trains_through_fuyou(tmp_path: Path) -> None:
    """Lightning's `DeepSpeedStrategy` refuses every accelerator but CUDA, so this runs only where a GPU is."""
    pytest.importorskip("lightning")
    port = free_port()
    command = [sys.executable, str(GUARDED), "--deepspeed_config", str(ds_config(tmp_path, "fuyou_gpu.json"))]
    environment = {"DS_ACCELERATOR": "cuda", "MASTER_PORT": str(port)}
    run_example([*command, "--steps", str(STEPS)], "train_lightning.py", port, tmp_path / "lightning", **environment)
