"""A launched job that stops early leaves nothing behind: its swap directories and DeepSpeed's 66 MiB `/dev/shm`
all-reduce buffer of each rank go, whether the job is stopped (Ctrl-C in its terminal, or SIGTERM from a scheduler:
either signal reaches every process of the job, launcher and ranks) or the script fails with an exception.

Signalling the `deepspeed` runner's process alone stops nothing: it dies at once and leaves its launcher and ranks
training on (DeepSpeed's behaviour, outside fuyou), so the signal goes to the job's process group here."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from benchlib import comparison_config  # scripts/, on pytest's pythonpath

from deepspeed_fuyou.distributed import free_port, shared_memory_buffers

pytestmark = pytest.mark.launches  # every test here starts processes (run_tests.sh --fast leaves them out)

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "tests" / "programs" / "stopped_job.py"
FUYOU_CONFIG = json.loads((ROOT / "configs" / "fuyou_cpu.json").read_text())
RANKS = 2
STOP_LIMIT_S = 120  # the launcher itself kills ranks still running 30 s after it passed the signal on
START_LIMIT_S = 600  # how long a rank may take to reach its first step before the test gives up (not a timing test)


def launch_job(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path, int]:
    """Starts the job on RANKS ranks with the `deepspeed` launcher, its output in `job.log` (a pipe nobody reads
    while it trains would fill and stall it); returns it, its swap root and its port."""
    swap = tmp_path / "ssd"
    swap.mkdir()
    config = comparison_config({**FUYOU_CONFIG, "train_micro_batch_size_per_gpu": 1}, "fuyou", [swap])
    (tmp_path / "ds.json").write_text(json.dumps(config))
    port = free_port()
    launcher = Path(sys.executable).parent / "deepspeed"
    command = [str(launcher), "--num_gpus", str(RANKS), "--master_port", str(port), str(JOB)]
    command += ["--deepspeed_config", "ds.json", "--out", str(tmp_path / "ready"), *args]
    environment = {**os.environ, "DS_ACCELERATOR": "cpu"}
    job = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=environment,
        stdout=(tmp_path / "job.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, as a job in a terminal or under a scheduler
    )
    return job, swap, port


def log(tmp_path: Path) -> str:
    return (tmp_path / "job.log").read_text(errors="replace")[-6000:]


def wait_until_every_rank_stepped(job: subprocess.Popen[bytes], tmp_path: Path) -> None:
    deadline = time.monotonic() + START_LIMIT_S
    while not all((tmp_path / f"ready.rank{rank}").exists() for rank in range(RANKS)):
        if job.poll() is not None:
            pytest.fail(f"the job ended before its first step:\n{log(tmp_path)}")
        if time.monotonic() > deadline:
            os.killpg(job.pid, signal.SIGKILL)
            pytest.fail("the job did not reach its first step")
        time.sleep(0.2)


def wait_for_the_whole_job(job: subprocess.Popen[bytes], limit_s: float) -> None:
    """Waits until no process of the job's group is left (its ranks may outlive the runner), then makes sure."""
    deadline = time.monotonic() + limit_s
    try:
        job.wait(timeout=limit_s)
        while time.monotonic() < deadline:
            os.killpg(job.pid, 0)  # raises once the group is empty
            time.sleep(0.2)
    except ProcessLookupError:
        return
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)  # nothing of a job that would not stop outlives the test
    pytest.fail(f"the job was still running {limit_s:g} s later")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_the_launcher_removes_every_ranks_swap_directory_and_shared_memory(
    tmp_path: Path, signum: int
) -> None:
    job, swap, port = launch_job(tmp_path)
    wait_until_every_rank_stepped(job, tmp_path)
    assert list(swap.iterdir()), "no swap directory while training"
    assert shared_memory_buffers(port), "DeepSpeed made no shared-memory buffer: nothing to check"
    os.killpg(job.pid, signum)
    wait_for_the_whole_job(job, STOP_LIMIT_S)
    assert job.returncode != 0
    assert not list(swap.iterdir()), f"swap directories left behind:\n{log(tmp_path)}"
    assert not shared_memory_buffers(port), f"shared memory left behind:\n{log(tmp_path)}"


def test_a_job_that_fails_with_an_exception_removes_its_swap_directory_and_shared_memory(tmp_path: Path) -> None:
    job, swap, port = launch_job(tmp_path, "--fail")
    wait_for_the_whole_job(job, START_LIMIT_S)
    assert job.returncode != 0
    assert "the job's own error" in log(tmp_path)
    assert not list(swap.iterdir()), f"swap directories left behind:\n{log(tmp_path)}"
    assert not shared_memory_buffers(port), f"shared memory left behind:\n{log(tmp_path)}"
