"""The `"fuyou"` block as DeepSpeed hands it to us: defaults, cross-checks, and errors that name the field and fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deepspeed_fuyou.config.fuyou import FuyouConfig
from deepspeed_fuyou.errors import FuyouConfigError

ROOT = Path(__file__).resolve().parent.parent


def ds_config(block: dict[str, Any] | None = None, **zero: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "nvme", "nvme_path": "/tmp/a"},
            "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp/b"},
            **zero,
        },
    }
    if block is not None:
        config["fuyou"] = block
    return config


def test_without_a_block_there_is_no_fuyou_config() -> None:
    assert FuyouConfig.from_ds_config(ds_config()) is None


def test_empty_block_takes_the_offload_paths_and_working_defaults() -> None:
    config = FuyouConfig.from_ds_config(ds_config({}))
    assert config.nvme_paths == (Path("/tmp/a"), Path("/tmp/b"))
    assert 0 < config.pinned_memory <= 8 << 30
    assert config.params.prefetch_layers == 2
    assert config.optimizer.pipelined


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("fuyou_*.json")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    assert FuyouConfig.from_ds_config(json.loads(path.read_text())) is not None


@pytest.mark.parametrize(
    ("config", "field", "hint"),
    [
        (ds_config({"pinned_memroy": "1GiB"}), "fuyou.pinned_memroy", "did you mean 'pinned_memory'"),
        (ds_config({"io": {"queue_dept": 8}}), "fuyou.io.queue_dept", "did you mean 'queue_depth'"),
        (ds_config({"params": {"prefetch": 2}}), "fuyou.params.prefetch", "prefetch_layers"),
        (ds_config({}, stage=2), "zero_optimization.stage", "stage"),
        (
            ds_config({}, offload_param={"device": "cpu"}, offload_optimizer={"device": "cpu"}),
            "zero_optimization.offload_param.device",
            "nvme",
        ),
        (
            ds_config({}, offload_optimizer={"device": "nvme", "nvme_path": "/tmp", "fast_init": True}),
            "zero_optimization.offload_optimizer.fast_init",
            "remove fast_init",
        ),
        (ds_config({"pinned_memory": "64TiB"}), "fuyou.pinned_memory", "lower it"),
        (ds_config({"pinned_memory": "lots"}), "fuyou.pinned_memory", "not a size"),
        (ds_config({"optimizer": {"overlap": "always"}}), "fuyou.optimizer.overlap", "auto"),
        (ds_config({"params": {"prefetch_layers": -1}}), "fuyou.params.prefetch_layers", "integer >= 0"),
        (ds_config({"nvme_paths": "/tmp"}), "fuyou.nvme_paths", "list"),
        (ds_config({"io": "fast"}), "fuyou.io", "JSON object"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_block_is_rejected_naming_the_field_and_the_fix(config: dict[str, Any], field: str, hint: str) -> None:
    with pytest.raises(FuyouConfigError) as caught:
        FuyouConfig.from_ds_config(config)
    assert caught.value.field == field
    assert hint in str(caught.value)


def test_a_misspelt_key_stops_an_unchanged_script_before_training(tmp_path: Path) -> None:
    config = json.loads((ROOT / "configs" / "fuyou_cpu.json").read_text())
    config["fuyou"]["pinned_memroy"] = config["fuyou"].pop("pinned_memory")
    config_path = tmp_path / "ds_config.json"
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
    command = [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--deepspeed_config", str(config_path)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "FuyouConfigError: fuyou.pinned_memroy" in result.stderr and "did you mean 'pinned_memory'" in result.stderr
    assert "fine-tune" not in result.stderr  # the progress bar never started
    assert not (tmp_path / "checkpoints").exists()
