"""The install step that builds DeepSpeed's ops clears the locks that killed builds leave behind, and only those."""

from __future__ import annotations

import os
import time
from pathlib import Path

import build_deepspeed_ops
import pytest


def test_a_lock_older_than_any_build_is_removed_and_a_fresh_one_is_kept(tmp_path: Path) -> None:
    killed, building = tmp_path / "py311_cpu" / "cpu_adam" / "lock", tmp_path / "py311_cpu" / "async_io" / "lock"
    for lock in (killed, building):
        lock.parent.mkdir(parents=True)
        lock.touch()
    long_ago = time.time() - build_deepspeed_ops.STALE_LOCK_SECONDS - 60
    os.utime(killed, (long_ago, long_ago))
    build_deepspeed_ops.remove_stale_locks(tmp_path)
    assert not killed.exists()
    assert building.exists()


def test_the_cache_is_where_torch_builds_extensions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build_deepspeed_ops.extension_cache() == tmp_path
