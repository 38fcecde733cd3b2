"""The GPU proof's script runs end to end here, without CUDA (`--dry-run`): a GPU run never fails on a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.launches  # every test here starts processes (run_tests.sh --fast leaves them out)

ROOT = Path(__file__).resolve().parent.parent
PARTS = ["setup", "gpu-tests", "bench-io", "bench-step", "bench-activations", "estimator"]


def test_the_gpu_check_dry_run_passes_every_part_and_writes_its_summary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    environment = {**os.environ, "PYTHON": sys.executable, "SWAP_ROOT": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = json.loads((out / "summary.json").read_text())
    failed = {
        name: (out / part["log"]).read_text()[-3000:] for name, part in summary["parts"].items() if part["exit_status"]
    }
    assert result.returncode == 0 and not failed, failed
    assert list(summary["parts"]) == PARTS
    assert summary["dry_run"] is True and summary["passed"] is True
    assert "fuyou-ssd" in (out / "bench-step.log").read_text()  # the benchmark ran, not just started
    assert not list(tmp_path.glob("fuyou-gpu-check-*")), "the swap directory was left behind"


def test_the_gpu_check_refuses_an_unknown_option() -> None:
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--fast"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr
