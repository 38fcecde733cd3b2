"""Shared fixtures: real engines on real files under pytest's temporary directory (an O_DIRECT-capable disk)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepspeed_fuyou.distributed import free_port, shared_memory_buffers
from deepspeed_fuyou.errors import FuyouConfigError
from deepspeed_fuyou.io import IOEngine, IOOptions, native

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's own ops are compared on the CPU accelerator

BACKENDS = ["aio", "io_uring", "threads"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """A DeepSpeed op build killed before this session left a lock on which every launch below would wait forever."""
    import build_deepspeed_ops  # scripts/, on pytest's pythonpath

    build_deepspeed_ops.remove_stale_locks(build_deepspeed_ops.extension_cache())


_current_test: pytest.Item | None = None


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Remembers the test being run (before its fixtures are set up), for `run_deepspeed`'s marker check."""
    global _current_test
    _current_test = item


def make_engine(backend: str, **options: int) -> IOEngine:
    """An engine on `backend`, or a skip where this machine's kernel or build cannot provide it."""
    if backend == "io_uring" and not native.io_uring_compiled():
        pytest.skip("built without liburing")
    try:
        return IOEngine(IOOptions(engine=backend, **options))
    except FuyouConfigError as err:
        pytest.skip(f"{backend} unavailable here: {err}")


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest) -> Iterator[IOEngine]:
    eng = make_engine(request.param)
    yield eng
    eng.close()


@pytest.fixture
def aio_engine() -> Iterator[IOEngine]:
    eng = make_engine("aio")
    yield eng
    eng.close()


def run_python(code: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Runs `code` in a fresh interpreter, for limits and crashes that must not reach the test process itself."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent.parent
    )


FAILURE_MARKS = ("Error", "error:", "terminate called", "Abort", "SIGABRT", "Fatal Python error", "corrupted", "free(")


def launch_failure(result: subprocess.CompletedProcess[str], tail: int = 6000) -> str:
    """What a failed launch said, for its assertion message: every line that names an error or an abort, first
    (a rank that dies first is pushed out of the end of the output by the others' tracebacks), then the end."""
    lines = [line for line in (result.stdout + result.stderr).splitlines() if any(m in line for m in FAILURE_MARKS)]
    return "\n".join(
        [
            "lines naming an error or abort:",
            *lines[:60],
            "end of the output:",
            result.stdout[-tail:],
            result.stderr[-tail:],
        ]
    )


def run_deepspeed(
    program: Path, *args: str, cwd: Path, ranks: int = 1, launcher: str = "torchrun", **env: str
) -> subprocess.CompletedProcess[str]:
    """Starts `program`, one process per rank, with `launcher` (see `run_launched`): "torchrun" by default, or
    "deepspeed" where the `deepspeed` launcher itself is part of what a test shows (the main job as a user starts
    it). Both start the same ranks with the same environment; the `deepspeed` launcher imports DeepSpeed twice
    before a rank starts, which costs each launch several seconds more on this machine (RESULTS.md)."""
    port = free_port()
    executable = str(Path(sys.executable).parent / launcher)
    ranks_option = {"torchrun": "--nproc_per_node", "deepspeed": "--num_gpus"}[launcher]
    command = [executable, ranks_option, str(ranks), "--master_port", str(port), str(program), *args]
    return run_launched(command, port, cwd, **env)


def run_launched(command: list[str], port: int, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs `command`, whose ranks meet at rendezvous `port`, on the CPU accelerator unless `env` says otherwise.

    A run that succeeds must also have removed DeepSpeed's shared-memory all-reduce buffers (`exit_distributed`):
    left behind, each holds 66 MiB of host memory until reboot. Those of a run that failed (some tests make it fail
    on purpose, or kill it) are removed here.
    """
    if _current_test is not None and _current_test.get_closest_marker("launches") is None:
        raise AssertionError(f"{_current_test.nodeid} starts a launcher: mark it @pytest.mark.launches")
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", **env}
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900)
    leaked = shared_memory_buffers(port)
    if result.returncode == 0:
        assert not leaked, f"{Path(command[0]).name} left DeepSpeed's shared-memory buffers behind: {leaked}"
    for buffer in leaked:
        buffer.unlink(missing_ok=True)
    return result


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[callable]:
    """Mounts a small file system of a given type under tmp_path, or skips where this machine forbids mounting."""
    mounts: list[Path] = []

    def mount(fstype: str, options: str = "") -> Path:
        target = tmp_path / f"mnt-{fstype}-{len(mounts)}"
        target.mkdir()
        cmd = ["mount", "-t", fstype, *(["-o", options] if options else []), "none", str(target)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount {fstype} here: {result.stderr.strip()}")
        mounts.append(target)
        return target

    yield mount
    for target in mounts:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)
