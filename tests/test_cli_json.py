"""Every `--json` of the `fuyou` command prints exactly one JSON document on stdout and nothing else: DeepSpeed's own
log lines (it logs to stdout, e.g. which accelerator it picked) go to stderr, so `fuyou ... --json | jq` works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import deepspeed_fuyou
from tests.test_trace import synthetic_trace

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "configs" / "models" / "llama-tiny"


def fuyou_command(*args: str) -> subprocess.CompletedProcess[str]:
    """The command in a fresh interpreter, with DeepSpeed left to pick its accelerator (and say so in its log)."""
    environment = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    command = [sys.executable, "-m", "deepspeed_fuyou.cli.main", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=ROOT, env=environment)


@pytest.mark.parametrize("subcommand", ["estimate", "estimate --auto", "estimate --time", "bench-io", "trace"])
def test_json_output_is_exactly_one_document_on_stdout(tmp_path: Path, subcommand: str) -> None:
    config = json.loads((ROOT / "configs" / "fuyou_cpu.json").read_text())
    config["fuyou"]["nvme_paths"] = [str(tmp_path)]
    (tmp_path / "ds.json").write_text(json.dumps(config))
    synthetic_trace(tmp_path / "trace.json")
    estimate = ["estimate", "--model", str(MODEL), "--config", str(tmp_path / "ds.json"), "--seq-len", "64"]
    arguments = {
        "estimate": estimate,
        "estimate --auto": [*estimate, "--auto"],
        "estimate --time": [*estimate, "--time"],
        "bench-io": ["bench-io", "--path", str(tmp_path), "--size", "8MiB", "--repeat", "1", "--no-fio"],
        "trace": ["trace", str(tmp_path / "trace.json")],
    }[subcommand]
    result = fuyou_command(*arguments, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(result.stdout)  # the whole of stdout, not its last line
    assert isinstance(document, dict) and document
    if subcommand.startswith("estimate"):
        assert "accelerator" in result.stderr.lower()  # DeepSpeed did log, to stderr


def test_human_output_still_goes_to_stdout() -> None:
    result = fuyou_command("validate", str(ROOT / "configs" / "fuyou_cpu.json"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("valid")


def test_estimate_plot_draws_each_devices_peak_and_version_answers(tmp_path: Path) -> None:
    config = json.loads((ROOT / "configs" / "fuyou_cpu.json").read_text())
    config["fuyou"]["nvme_paths"] = [str(tmp_path)]
    (tmp_path / "ds.json").write_text(json.dumps(config))
    picture = tmp_path / "estimate.png"
    arguments = ["--model", str(MODEL), "--config", str(tmp_path / "ds.json"), "--plot", str(picture)]
    result = fuyou_command("estimate", *arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {picture}" in result.stdout
    version = fuyou_command("--version")
    assert version.returncode == 0 and version.stdout.split() == ["deepspeed-fuyou", deepspeed_fuyou.__version__]
