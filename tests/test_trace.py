"""The step timeline: spans recorded from real transfers, written as a Chrome trace, and drawn by `fuyou trace`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from deepspeed_fuyou.cli.main import main as fuyou
from deepspeed_fuyou.io import IOEngine
from deepspeed_fuyou.trace import TRACE, Span, chrome_trace

MS = 1_000_000  # nanoseconds


@pytest.fixture
def tracing(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "trace.json"
    TRACE.start(path)
    yield path
    TRACE.stop()


def test_transfers_are_recorded_with_their_native_start_end_and_bytes(tracing: Path, tmp_path: Path) -> None:
    engine = IOEngine()
    data = torch.arange(1 << 20, dtype=torch.float32)
    writes = [engine.write(data, str(tmp_path / f"f{k}")) for k in range(2)]  # in flight together
    for future in writes:
        future.wait()
    engine.read(torch.empty_like(data), str(tmp_path / "f0")).wait()
    engine.close()
    spans = TRACE.spans()
    assert sorted(span.lane for span in spans) == ["ssd read", "ssd write", "ssd write"]
    assert all(span.nbytes == 4 << 20 and span.end_ns >= span.start_ns > 0 for span in spans)
    events = json.loads(TRACE.save().read_text())["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    write_tracks = {e["tid"] for e in events if e.get("cat") == "ssd write"}
    first, second = sorted((span for span in spans if span.lane == "ssd write"), key=lambda span: span.start_ns)
    overlapping = first.end_ns > second.start_ns
    assert len(write_tracks) == (2 if overlapping else 1)  # transfers in flight together get a track each
    assert {names[t] for t in write_tracks} <= {"ssd write", "ssd write 1"}


def test_nothing_is_recorded_unless_a_trace_was_asked_for(tmp_path: Path) -> None:
    engine = IOEngine()
    engine.write(torch.zeros(1024), str(tmp_path / "f")).wait()
    engine.close()
    assert TRACE.spans() == [] and not TRACE.enabled


def synthetic_trace(path: Path) -> None:
    """Two iterations of 100 ms: forward 0-30, backward 30-80, step 80-100; reads busy 10-20 and 15-40 (overlapping:
    counted once, 30 ms); Adam 85-95."""
    spans = []
    for start in (0, 100):
        spans += [
            Span("phase", "forward", (start + 0) * MS, (start + 30) * MS),
            Span("phase", "backward", (start + 30) * MS, (start + 80) * MS),
            Span("phase", "optimizer step", (start + 80) * MS, (start + 100) * MS),
            Span("ssd read", "param-1", (start + 10) * MS, (start + 20) * MS, 1 << 20),
            Span("ssd read", "param-2", (start + 15) * MS, (start + 40) * MS, 1 << 20),
            Span("adam", "sub-group 0", (start + 85) * MS, (start + 95) * MS),
        ]
    path.write_text(json.dumps(chrome_trace(spans)))


def test_fuyou_trace_reports_each_lanes_busy_share_of_an_iteration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    synthetic_trace(tmp_path / "t.json")
    assert fuyou(["trace", str(tmp_path / "t.json"), "--iteration", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["milliseconds"] == pytest.approx(100)
    assert report["busy"] == pytest.approx({"phase": 1.0, "adam": 0.1, "ssd read": 0.3})


def test_fuyou_trace_draws_the_last_complete_iteration_as_a_png(tmp_path: Path) -> None:
    synthetic_trace(tmp_path / "t.json")
    assert fuyou(["trace", str(tmp_path / "t.json"), "-o", str(tmp_path / "step.png")]) == 0
    assert (tmp_path / "step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_drawing_without_matplotlib_is_one_clear_error_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    synthetic_trace(tmp_path / "t.json")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` finds where it is not installed
    assert fuyou(["trace", str(tmp_path / "t.json"), "-o", str(tmp_path / "step.png")]) == 2
    assert "-o" in (err := capsys.readouterr().err) and "deepspeed-fuyou[plot]" in err
    assert not (tmp_path / "step.png").exists()


def test_a_file_that_is_not_a_trace_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "t.json").write_text("{}")
    assert fuyou(["trace", str(tmp_path / "t.json"), "--json"]) == 2
    assert "not a fuyou trace" in capsys.readouterr().err
