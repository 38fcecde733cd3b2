"""The install step that builds DeepSpeed's ops clears the locks that killed builds leave behind, and only those."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import build_deepspeed_ops
import pytest


def lock_in(cache: Path, op: str, age: float) -> Path:
    lock = cache / "py311_cpu" / op / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - age, time.time() - age))
    return lock


def test_an_old_lock_with_no_build_running_is_removed(tmp_path: Path) -> None:
    killed = lock_in(tmp_path, "cpu_adam", build_deepspeed_ops.STALE_LOCK_SECONDS + 60)
    build_deepspeed_ops.remove_stale_locks(tmp_path)
    assert not killed.exists()


def test_a_lock_just_taken_is_kept(tmp_path: Path) -> None:
    starting = lock_in(tmp_path, "cpu_adam", 0)
    build_deepspeed_ops.remove_stale_locks(tmp_path)
    assert starting.exists()


def test_an_old_lock_is_kept_while_a_process_works_in_the_ops_folder(tmp_path: Path) -> None:
    building = lock_in(tmp_path, "async_io", build_deepspeed_ops.STALE_LOCK_SECONDS + 60)
    compiler = subprocess.Popen(["sleep", "60"], cwd=building.parent)  # ninja and the compiler run there
    try:
        build_deepspeed_ops.remove_stale_locks(tmp_path)
        assert building.exists()
    finally:
        compiler.kill()
        compiler.wait()
    build_deepspeed_ops.remove_stale_locks(tmp_path)
    assert not building.exists()


def test_the_cache_is_where_torch_builds_extensions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build_deepspeed_ops.extension_cache() == tmp_path
