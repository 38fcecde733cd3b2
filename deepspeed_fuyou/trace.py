"""Where a training step's time goes: a timeline of compute, optimizer work, waits and SSD transfers.

Off unless asked for (`FUYOU_TRACE=step.json` in the environment, `scripts/finetune.py --trace FILE`, or `start()`),
and then cheap: each span is two clock readings and one append. The file is a Chrome trace (open it in
ui.perfetto.dev or chrome://tracing); `fuyou trace FILE -o step.png` draws one iteration of it with the busy share
of each resource.

Lanes are resources, not threads: `phase` (forward, backward, optimizer step, as the training loop sees them),
`layer` (each layer's forward and backward), `adam` (the optimizer's arithmetic per sub-group, on whichever thread
runs it), `wait` (the training thread blocked on data: parameters it is about to compute with, optimizer state it is
about to step), and `ssd read` / `ssd write` (each transfer from submission to its last byte, so their overlap is the
queue). Times are CLOCK_MONOTONIC nanoseconds, the clock the native engine stamps its requests with.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ENVIRONMENT = "FUYOU_TRACE"
MAX_SPANS = 1_000_000
"""Spans kept (the newest): about 100 MB of memory at most, whatever the length of the run."""

LANES = ("phase", "layer", "adam", "wait", "ssd read", "ssd write")
"""The resources a trace can show, top to bottom."""


@dataclass(frozen=True)
class Span:
    lane: str
    name: str
    start_ns: int
    end_ns: int
    nbytes: int = 0


def now_ns() -> int:
    return time.monotonic_ns()


class Tracer:
    """Collects spans from every thread of the process; `save()` writes them as a Chrome trace."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self._spans: collections.deque[Span] = collections.deque(maxlen=MAX_SPANS)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def start(self, path: str | os.PathLike[str]) -> None:
        """Records from now on; the trace goes to `path` at `save()` or at exit."""
        first = self.path is None
        self.path = Path(path)
        if first:
            atexit.register(self.save)

    def stop(self) -> None:
        """Stops recording and forgets what was recorded (tests)."""
        self.path = None
        with self._lock:
            self._spans.clear()

    def record(self, lane: str, name: str, start_ns: int, end_ns: int, nbytes: int = 0) -> None:
        if self.path is not None:
            with self._lock:
                self._spans.append(Span(lane, name, start_ns, end_ns, nbytes))

    @contextmanager
    def span(self, lane: str, name: str, nbytes: int = 0) -> Iterator[None]:
        if self.path is None:
            yield
            return
        start = now_ns()
        try:
            yield
        finally:
            self.record(lane, name, start, now_ns(), nbytes)

    @contextmanager
    def wait(self, name: str) -> Iterator[None]:
        """A `wait` span, recorded only on the training thread: a background thread's waits stall no compute."""
        if self.path is None or getattr(_thread, "background", False):
            yield
            return
        with self.span("wait", name):
            yield

    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def save(self, path: str | os.PathLike[str] | None = None) -> Path | None:
        """Writes the spans recorded so far (to `path`, else where `start` said); returns the file written."""
        target = Path(path) if path is not None else self.path
        if target is None:
            return None
        spans = self.spans()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(chrome_trace(spans)))
        return target


def chrome_trace(spans: list[Span]) -> dict:
    """Spans as Chrome trace events: one process, one track per lane, and a numbered track per concurrent transfer
    (events on one track must nest, and transfers in flight together do not)."""
    origin = min((span.start_ns for span in spans), default=0)
    events: list[dict] = []
    tracks: dict[tuple[str, int], int] = {}
    busy_until: dict[str, list[int]] = collections.defaultdict(list)
    for span in sorted(spans, key=lambda s: s.start_ns):
        rows = busy_until[span.lane]
        row = next((i for i, end in enumerate(rows) if end <= span.start_ns), len(rows))
        if row == len(rows):
            rows.append(0)
        rows[row] = span.end_ns
        track = tracks.setdefault((span.lane, row), len(tracks))
        event = {
            "name": span.name,
            "cat": span.lane,
            "ph": "X",
            "ts": (span.start_ns - origin) / 1000,
            "dur": max(span.end_ns - span.start_ns, 0) / 1000,
            "pid": 0,
            "tid": track,
        }
        if span.nbytes:
            event["args"] = {"bytes": span.nbytes}
        events.append(event)
    order = {lane: i for i, lane in enumerate(LANES)}
    for (lane, row), track in tracks.items():
        label = lane if row == 0 else f"{lane} {row}"
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": track, "args": {"name": label}})
        sort = order.get(lane, len(order)) * 1000 + row
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": track, "args": {"sort_index": sort}})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"origin_monotonic_ns": origin}}


_thread = threading.local()


def mark_background_thread() -> None:
    """The calling thread works behind the training thread (the optimizer's step thread): its waits are no stall."""
    _thread.background = True


TRACE = Tracer()
"""The process's tracer: every component records into it."""


def start_from_environment(rank: int = 0) -> None:
    """Starts `TRACE` if `FUYOU_TRACE` names a file; ranks other than 0 write next to it with their rank."""
    path = os.environ.get(ENVIRONMENT)
    if path and not TRACE.enabled:
        target = Path(path)
        if rank:
            target = target.with_name(f"{target.stem}.rank{rank}{target.suffix}")
        TRACE.start(target)
