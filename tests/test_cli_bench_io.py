"""`fuyou bench-io` measures every engine in one run and reports them as JSON or as a table."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FUYOU = [sys.executable, "-m", "deepspeed_fuyou.cli.main"]
REPO = Path(__file__).parent.parent


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FUYOU, "bench-io", *args], capture_output=True, text=True, timeout=1200, cwd=REPO)


def test_json_report_has_every_engine_and_ratio(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    result = bench(
        "--path",
        str(tmp_path / "a"),
        "--path",
        str(tmp_path / "b"),
        "--size",
        "16MiB",
        "--repeat",
        "2",
        "--no-deepspeed",
        "--device",
        "cpu",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in (
        "fuyou_read_gbps",
        "fuyou_write_gbps",
        "deepspeed_read_gbps",
        "deepspeed_write_gbps",
        "buffered_read_gbps",
        "buffered_write_gbps",
        "fio_read_gbps",
        "fio_write_gbps",
    ):
        assert key in report
    assert report["fuyou_read_gbps"] > 0 and report["fuyou_write_gbps"] > 0
    assert report["fuyou_unverified_read_gbps"] > 0  # the same engine without checksums, for their cost
    assert report["fuyou_read_vs_fuyou_unverified"] == pytest.approx(
        report["fuyou_read_gbps"] / report["fuyou_unverified_read_gbps"]
    )
    assert report["buffered_read_gbps"] > 0 and report["buffered_write_gbps"] > 0
    assert report["deepspeed_read_gbps"] is None and report["deepspeed_unavailable_reason"] == "skipped"
    assert len(report["samples_gbps"]["fuyou"]["read"]) == 2
    assert report["device_load_gbps"] > 0 and report["device_load_vs_ceiling"] > 0
    if shutil.which("fio"):
        assert report["fio_read_gbps"] > 0
        assert report["fuyou_read_vs_fio"] == pytest.approx(report["fuyou_read_gbps"] / report["fio_read_gbps"])
    assert [list((tmp_path / d).iterdir()) for d in ("a", "b")] == [[], []]  # the swap directories are gone


@pytest.mark.slow
def test_deepspeed_aio_handle_is_measured_in_the_same_run(tmp_path: Path) -> None:
    result = bench("--path", str(tmp_path), "--size", "8MiB", "--repeat", "1", "--no-fio", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["deepspeed_unavailable_reason"] is None
    assert report["deepspeed_read_gbps"] > 0 and report["deepspeed_write_gbps"] > 0
    assert report["fuyou_read_vs_deepspeed"] > 0


def test_table_output_names_the_engines(tmp_path: Path) -> None:
    result = bench("--path", str(tmp_path), "--size", "4MiB", "--repeat", "1", "--no-deepspeed", "--no-fio")
    assert result.returncode == 0, result.stderr
    assert "fuyou" in result.stdout and "python buffered" in result.stdout and "write GB/s" in result.stdout


def test_a_missing_path_is_one_clear_message_and_exit_status_2(tmp_path: Path) -> None:
    result = bench("--path", str(tmp_path / "missing"), "--size", "4MiB", "--no-deepspeed", "--no-fio")
    assert result.returncode == 2
    assert "--path[0]" in result.stderr and "does not exist" in result.stderr  # the option the user gave
    assert "Traceback" not in result.stderr


def test_bench_script_prints_without_recording_when_asked(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "scripts/bench_io.py",
            "--path",
            str(tmp_path),
            "--size",
            "4MiB",
            "--repeat",
            "1",
            "--no-deepspeed",
            "--no-fio",
            "--no-record",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "fuyou" in result.stdout


class _ShortReads:
    """An unbuffered file whose every read() returns at most `most` bytes, as Linux does past 2 GiB - 4 KiB."""

    def __init__(self, data: bytes, most: int) -> None:
        self.data, self.most, self.at = data, most, 0

    def readinto(self, view: memoryview) -> int:
        got = self.data[self.at : self.at + min(self.most, len(view))]
        view[: len(got)] = got
        self.at += len(got)
        return len(got)


def test_buffered_baseline_reads_a_file_whole_across_short_reads() -> None:
    from deepspeed_fuyou.cli.bench_io import read_whole

    data = bytes(range(256)) * 40
    target = bytearray(len(data))
    read_whole(_ShortReads(data, 1000), memoryview(target), "f")
    assert bytes(target) == data


def test_buffered_baseline_names_the_file_that_ends_early() -> None:
    from deepspeed_fuyou.cli.bench_io import read_whole
    from deepspeed_fuyou.errors import FuyouIOError

    with pytest.raises(FuyouIOError, match=r"ended early: f \(offset 100, 28 bytes\)"):
        read_whole(_ShortReads(b"x" * 100, 64), memoryview(bytearray(128)), "f")
