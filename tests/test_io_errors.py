"""Every failure of a transfer surfaces as FuyouIOError with path, offset, size and errno; nothing is truncated
silently, and the engine keeps working afterwards."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from deepspeed_fuyou.errors import FuyouConfigError, FuyouIOError
from deepspeed_fuyou.io import IOEngine, IOOptions, native
from tests.conftest import BACKENDS, make_engine, run_python

MiB = 1 << 20


def test_write_into_a_missing_directory_names_the_path_and_says_to_create_it(engine: IOEngine, tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "t"
    with pytest.raises(FuyouIOError) as err:
        engine.write(torch.ones(1000), target).wait()
    assert err.value.errno == errno.ENOENT
    assert err.value.path == str(target)
    assert err.value.nbytes == 4000
    assert "create the directory" in str(err.value)


def test_read_of_a_missing_file_raises_enoent(engine: IOEngine, tmp_path: Path) -> None:
    with pytest.raises(FuyouIOError) as err:
        engine.read(torch.empty(10), tmp_path / "never-written").wait()
    assert err.value.errno == errno.ENOENT


def test_read_of_a_file_shorter_than_the_tensor_is_a_short_read_at_the_right_offset(
    engine: IOEngine, tmp_path: Path
) -> None:
    (tmp_path / "t").write_bytes(os.urandom(3 * MiB + 100))
    with pytest.raises(FuyouIOError) as err:
        engine.read(torch.empty(5 * MiB, dtype=torch.uint8), tmp_path / "t").wait()
    assert err.value.errno == errno.EIO
    assert "short read" in err.value.reason
    assert err.value.offset + err.value.nbytes > 3 * MiB + 100  # a piece that reaches past the end of the file
    assert "3145828 bytes long" in err.value.reason


def test_read_entirely_past_the_end_of_a_file_raises_instead_of_crashing(engine: IOEngine, tmp_path: Path) -> None:
    (tmp_path / "t").write_bytes(os.urandom(4096))
    with pytest.raises(FuyouIOError, match="short read"):
        engine.read(torch.empty(MiB, dtype=torch.uint8), tmp_path / "t", offset=8 * MiB).wait()


def test_read_of_a_file_another_writer_truncated_raises_short_read(engine: IOEngine, tmp_path: Path) -> None:
    data = torch.randint(0, 256, (8 * MiB,), dtype=torch.uint8)
    engine.write(data, tmp_path / "t").wait()
    result = run_python(f"import os; os.truncate({str(tmp_path / 't')!r}, {MiB + 123})")
    assert result.returncode == 0, result.stderr
    with pytest.raises(FuyouIOError) as err:
        engine.read(torch.empty_like(data), tmp_path / "t").wait()
    assert err.value.path == str(tmp_path / "t")
    assert err.value.errno == errno.EIO


def test_truncation_racing_a_read_never_yields_silently_wrong_data(tmp_path: Path) -> None:
    eng = make_engine("threads", block_size=64 << 10, threads=1)
    data = torch.randint(0, 256, (32 * MiB,), dtype=torch.uint8)
    outcomes = set()
    for attempt in range(5):
        path = tmp_path / f"t{attempt}"
        eng.write(data, path).wait()
        target = torch.zeros_like(data)
        future = eng.read(target, path)
        cutter = threading.Thread(target=os.truncate, args=(path, 5 * MiB))
        cutter.start()
        cutter.join()
        try:
            future.wait()
            assert torch.equal(target, data)  # the read beat the truncation: then it is complete
            outcomes.add("complete")
        except FuyouIOError as err:
            assert "short read" in err.reason
            outcomes.add("error")
    assert outcomes  # every attempt ended in one of the two honest outcomes


def test_a_failed_request_does_not_poison_the_engine(engine: IOEngine, tmp_path: Path) -> None:
    with pytest.raises(FuyouIOError):
        engine.read(torch.empty(10), tmp_path / "missing").wait()
    data = torch.randn(1000)
    engine.write(data, tmp_path / "ok").wait()
    back = torch.empty_like(data)
    engine.read(back, tmp_path / "ok").wait()
    assert torch.equal(back, data)


_NOBODY = 65534


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_without_permission_raises_eacces(backend: str) -> None:
    make_engine(backend).close()  # skips where the backend is unavailable
    base = Path(tempfile.mkdtemp())
    try:
        os.chmod(base, 0o755)
        locked = base / "read-only-dir"
        locked.mkdir(mode=0o555)
        # root ignores permission bits: the child drops to nobody once everything is imported and started.
        code = f"""
import json, os, torch
from deepspeed_fuyou.errors import FuyouConfigError, FuyouIOError
from deepspeed_fuyou.io import IOEngine, IOOptions
engine = IOEngine(IOOptions(engine={backend!r}))
if os.geteuid() == 0:
    os.setgid({_NOBODY})
    os.setuid({_NOBODY})
try:
    engine.write(torch.ones(10), {str(locked / "f")!r}).wait()
    print(json.dumps(None))
except FuyouIOError as err:
    print(json.dumps([err.errno, err.path, str(err)]))
"""
        result = run_python(code)
        assert result.returncode == 0, result.stderr
        outcome = json.loads(result.stdout.strip().splitlines()[-1])
        assert outcome is not None, "a write into a read-only directory succeeded"
        assert outcome[0] == errno.EACCES
        assert outcome[1] == str(locked / "f")
        assert "writable" in outcome[2]
    finally:
        os.chmod(base / "read-only-dir", 0o755)
        shutil.rmtree(base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_size_limit_reached_mid_write_raises_efbig_with_the_failing_offset(backend: str, tmp_path: Path) -> None:
    make_engine(backend).close()
    code = f"""
import json, resource, signal, torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of returning EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, ({MiB + 1000}, {MiB + 1000}))
from deepspeed_fuyou.errors import FuyouConfigError, FuyouIOError
from deepspeed_fuyou.io import IOEngine, IOOptions
try:
    engine = IOEngine(IOOptions(engine={backend!r}))
    engine.write(torch.ones({4 * MiB}, dtype=torch.uint8), {str(tmp_path / "f")!r}).wait()
    print(json.dumps(None))
except FuyouIOError as err:
    print(json.dumps([err.errno, err.path, err.offset, err.nbytes]))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome is not None, "a write past RLIMIT_FSIZE reported success"
    err_no, path, offset, nbytes = outcome
    assert err_no == errno.EFBIG
    assert path == str(tmp_path / "f")
    assert offset + nbytes > MiB + 1000  # a piece that reaches past the limit


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_disk_raises_enospc(backend: str, mounted) -> None:
    eng = make_engine(backend)
    tiny = mounted("tmpfs", "size=1m")
    with pytest.raises(FuyouIOError) as err:
        eng.write(torch.ones(4 * MiB, dtype=torch.uint8), tiny / "f").wait()
    assert err.value.errno == errno.ENOSPC
    assert "free space" in str(err.value)


def test_auto_engine_falls_back_to_buffered_io_where_o_direct_is_refused_and_says_so_once(
    mounted, caplog: pytest.LogCaptureFixture
) -> None:
    ramfs = mounted("ramfs")
    eng = IOEngine(IOOptions(engine="auto"))
    data = torch.randint(0, 256, (3 * MiB + 5,), dtype=torch.uint8)
    with caplog.at_level(logging.WARNING, logger="deepspeed_fuyou"):
        for name in ("a", "b"):
            eng.write(data, ramfs / name).wait()
            back = torch.empty_like(data)
            eng.read(back, ramfs / name).wait()
            assert torch.equal(back, data)
    announcements = [r for r in caplog.records if "does not support O_DIRECT" in r.getMessage()]
    assert len(announcements) == 1
    assert str(ramfs) in announcements[0].getMessage()


def test_explicit_aio_engine_reports_a_file_system_without_o_direct(mounted) -> None:
    ramfs = mounted("ramfs")
    eng = make_engine("aio")
    with pytest.raises(FuyouIOError) as err:
        eng.write(torch.ones(10), ramfs / "f").wait()
    assert err.value.errno == errno.EINVAL
    assert "threads" in err.value.fix


def test_auto_engine_uses_threads_and_says_so_when_the_kernel_refuses_aio(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    real_engine = native.Engine

    def engine_without_aio(backend: str, *args: object, **kwargs: object) -> native.Engine:
        if backend == "aio":
            raise RuntimeError("io_setup(32) failed: Resource temporarily unavailable (errno 11)")
        return real_engine(backend, *args, **kwargs)

    monkeypatch.setattr(native, "Engine", engine_without_aio)
    with caplog.at_level(logging.WARNING, logger="deepspeed_fuyou"):
        eng = IOEngine(IOOptions(engine="auto"))
    assert eng.backend == "threads"
    assert any("Linux AIO is unavailable" in r.getMessage() for r in caplog.records)
    data = torch.randn(12345)
    eng.write(data, tmp_path / "t").wait()
    back = torch.empty_like(data)
    eng.read(back, tmp_path / "t").wait()
    assert torch.equal(back, data)


def test_wait_with_a_timeout_raises_timeout_error_while_io_is_still_running(tmp_path: Path) -> None:
    eng = make_engine("threads", threads=1, block_size=4096)
    future = eng.write(torch.zeros(64 * MiB, dtype=torch.uint8), tmp_path / "t")
    with pytest.raises(TimeoutError):
        future.wait(timeout=0.0)
    assert future.wait() == 64 * MiB


def test_unknown_engine_names_the_field() -> None:
    from deepspeed_fuyou.errors import FuyouConfigError

    with pytest.raises(FuyouConfigError, match=re.escape("fuyou.io.engine")):
        IOOptions(engine="spdk")
    with pytest.raises(FuyouConfigError, match=re.escape("fuyou.io.block_size")):
        IOOptions(block_size="3KiB")
    with pytest.raises(FuyouConfigError, match=re.escape("fuyou.io.queue_depth")):
        IOOptions(queue_depth=0)


@pytest.mark.parametrize(
    ("engine", "backend"), [("auto", "aio"), ("aio", "aio"), ("io_uring", "io_uring"), ("threads", "threads")]
)
def test_io_engine_runs_the_backend_it_names_and_auto_prefers_aio(engine: str, backend: str, tmp_path: Path) -> None:
    with make_engine(engine) as eng:
        assert eng.backend == backend
        data = torch.randn(12345)
        eng.write(data, tmp_path / "t").wait()
        back = torch.empty_like(data)
        eng.read(back, tmp_path / "t").wait()
        assert torch.equal(back, data)


def test_io_uring_on_a_build_without_liburing_is_refused_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "io_uring_compiled", lambda: False)
    with pytest.raises(FuyouConfigError, match=r"fuyou\.io\.engine.*io_uring.*liburing"):
        IOEngine(IOOptions(engine="io_uring"))
