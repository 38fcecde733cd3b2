"""Swap files live in a private directory per SSD path that is ours alone and removed when we are done."""

from __future__ import annotations

import errno
import fcntl
import os
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepspeed_fuyou.errors import FuyouConfigError
from deepspeed_fuyou.io import IOEngine, SwapSpace


def test_each_root_gets_a_private_directory_with_files_readable_only_by_us(
    aio_engine: IOEngine, tmp_path: Path
) -> None:
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        root.mkdir()
    with SwapSpace(roots, field="fuyou.nvme_paths") as space:
        assert [d.parent for d in space.dirs] == roots
        assert all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in space.dirs)
        aio_engine.write(torch.randn(1 << 20), space.files("t")).wait()
        assert all(stat.S_IMODE(os.stat(p).st_mode) & 0o077 == 0 for p in space.files("t"))
        dirs = list(space.dirs)
    assert not any(d.exists() for d in dirs)
    assert all(root.exists() for root in roots)


def test_swap_directories_are_removed_at_interpreter_exit(tmp_path: Path) -> None:
    code = (
        f"from deepspeed_fuyou.io import SwapSpace; s = SwapSpace([{str(tmp_path)!r}], field='fuyou.nvme_paths'); "
        "open(s.files('x')[0], 'w').write('data'); print(s.dirs[0])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not Path(result.stdout.strip()).exists()


def test_directories_of_killed_processes_are_removed_by_the_next_swap_space(tmp_path: Path) -> None:
    code = (
        "import os; from deepspeed_fuyou.io import SwapSpace; "
        f"s = SwapSpace([{str(tmp_path)!r}], field='fuyou.nvme_paths'); "
        "print(s.dirs[0], flush=True); os._exit(0)"
    )  # no clean-up runs, like a kill
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    stale = Path(result.stdout.strip())
    assert stale.exists()
    with SwapSpace([tmp_path], field="fuyou.nvme_paths") as space:
        assert not stale.exists()
        assert space.dirs[0].exists()


def start_job_in_another_pid_namespace(root: Path) -> tuple[subprocess.Popen[str], Path]:
    """A process holding a SwapSpace on `root` from a new PID namespace, under a PID that is free here.

    Skips where this machine does not let us make a PID namespace (unshare needs root or user namespaces).
    """
    free_here = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1000
    while _alive(free_here):
        free_here -= 1
    job_code = (
        "import sys; from deepspeed_fuyou.io import SwapSpace; "
        f"s = SwapSpace([{str(root)!r}], field='fuyou.nvme_paths'); "
        "print(s.dirs[0], flush=True); sys.stdin.read()"
    )
    # The shell is PID 1 there; it sets the namespace's last PID, so Python gets `free_here`.
    python = f"{shlex.quote(sys.executable)} -c {shlex.quote(job_code)}"
    shell = f"echo {free_here - 1} > /proc/sys/kernel/ns_last_pid && {python}; :"
    command = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c", shell]
    job = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = job.stdout.readline().strip()
    if not line:
        job.kill()
        pytest.skip(f"no PID namespace here: {job.communicate()[1].strip()}")
    directory = Path(line)
    assert directory.name.startswith(f"fuyou-swap-{free_here}-")  # a PID that names no process here
    return job, directory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_live_job_in_another_pid_namespace_keeps_its_swap_directory(tmp_path: Path) -> None:
    job, theirs = start_job_in_another_pid_namespace(tmp_path)
    try:
        with SwapSpace([tmp_path], field="fuyou.nvme_paths") as ours:
            assert theirs.exists()
            assert ours.dirs[0] != theirs
    finally:
        job.communicate(timeout=120)  # closes its stdin: it ends and removes its own directory
    assert job.returncode == 0
    assert not theirs.exists()


def test_a_killed_job_of_another_pid_namespace_is_cleaned_up_by_the_next_swap_space(tmp_path: Path) -> None:
    job, theirs = start_job_in_another_pid_namespace(tmp_path)
    job.send_signal(signal.SIGKILL)  # unshare --kill-child takes the namespace down with it
    job.stdout.read()  # end of file once every process of the namespace is gone; its stdin stays open until then
    job.wait(timeout=120)
    job.stdin.close()
    assert theirs.exists()
    with SwapSpace([tmp_path], field="fuyou.nvme_paths"):
        assert not theirs.exists()


def test_missing_or_unusable_roots_are_config_errors_naming_the_entry(tmp_path: Path) -> None:
    with pytest.raises(FuyouConfigError) as err:
        SwapSpace([tmp_path, tmp_path / "missing"], field="fuyou.nvme_paths")
    assert err.value.field == "fuyou.nvme_paths[1]"
    assert "mkdir -p" in err.value.fix
    (tmp_path / "file").write_text("x")
    with pytest.raises(FuyouConfigError, match="not a directory"):
        SwapSpace([tmp_path / "file"], field="fuyou.nvme_paths")
    with pytest.raises(FuyouConfigError, match="no swap directory"):
        SwapSpace([], field="fuyou.nvme_paths")


def test_a_file_system_that_refuses_locks_is_a_config_error_and_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        root.mkdir()
    calls = iter([fcntl.flock, refuse])  # the first root locks, the second refuses
    monkeypatch.setattr(fcntl, "flock", lambda fd, operation: next(calls)(fd, operation))
    with pytest.raises(FuyouConfigError) as err:
        SwapSpace(roots, field="fuyou.nvme_paths")
    assert err.value.field == "fuyou.nvme_paths[1]" and "local file system" in err.value.fix
    assert not [entry for root in roots for entry in root.iterdir()]
