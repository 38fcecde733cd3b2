"""`fuyou trace FILE -o step.png`: one training iteration of a recorded trace, drawn lane by lane.

An iteration runs from the start of one forward to the start of the next (the last one: to the end of the last span).
Each lane (a resource: compute phases, layers, Adam, waits of the training thread, SSD reads and writes) is drawn
as bars, and labelled with its busy share of the iteration: the union of its spans over the iteration's length, so
concurrent transfers count once. `--json` prints those shares instead of drawing.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from deepspeed_fuyou.cli import plotting
from deepspeed_fuyou.errors import FuyouError
from deepspeed_fuyou.trace import LANES

COLORS = {
    "phase": "#4c72b0",
    "layer": "#55a868",
    "adam": "#c44e52",
    "wait": "#8172b2",
    "ssd read": "#dd8452",
    "ssd write": "#937860",
}


@dataclass(frozen=True)
class Bar:
    lane: str
    name: str
    start: float  # milliseconds from the iteration's start
    end: float


def load(path: Path) -> list[Bar]:
    """The spans of a Chrome trace written by `deepspeed_fuyou.trace`, in milliseconds from the trace's origin."""
    try:
        events = json.loads(path.read_text())["traceEvents"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FuyouError(f"{path}: not a fuyou trace ({err}); record one with FUYOU_TRACE=FILE") from None
    return [
        Bar(event["cat"], event["name"], event["ts"] / 1000, (event["ts"] + event["dur"]) / 1000)
        for event in events
        if event.get("ph") == "X"
    ]


def iterations(bars: list[Bar]) -> list[tuple[float, float]]:
    """(start, end) of each iteration: forward to next forward."""
    starts = sorted(bar.start for bar in bars if bar.lane == "phase" and bar.name == "forward")
    if not starts:
        raise FuyouError("the trace has no forward: record at least one training step")
    last = max(bar.end for bar in bars)
    return list(zip(starts, [*starts[1:], last], strict=True))


def busy_share(bars: list[Bar], start: float, end: float) -> float:
    """The share of [start, end) covered by at least one bar."""
    covered, reach = 0.0, start
    for bar in sorted(bars, key=lambda b: b.start):
        lo, hi = max(bar.start, reach), min(bar.end, end)
        if hi > lo:
            covered += hi - lo
            reach = hi
    return covered / (end - start) if end > start else 0.0


def window(bars: list[Bar], start: float, end: float) -> list[Bar]:
    return [Bar(b.lane, b.name, b.start - start, b.end - start) for b in bars if b.end > start and b.start < end]


def shares(bars: list[Bar], start: float, end: float) -> dict[str, float]:
    lanes = [lane for lane in LANES if any(bar.lane == lane for bar in bars)]
    return {lane: busy_share([b for b in bars if b.lane == lane], start, end) for lane in lanes}


def draw(bars: list[Bar], length: float, busy: dict[str, float], title: str, output: Path) -> None:
    plt = plotting.pyplot("-o", output)
    lanes = list(busy)
    figure, axes = plt.subplots(figsize=(14, 0.6 * len(lanes) + 1.4))
    for row, lane in enumerate(lanes):
        spans = [(b.start, b.end - b.start) for b in bars if b.lane == lane]
        axes.broken_barh(spans, (row - 0.4, 0.8), facecolors=COLORS.get(lane, "#999999"), alpha=0.75)
    axes.set_yticks(range(len(lanes)), [f"{lane}  {busy[lane]:.0%}" for lane in lanes])
    axes.invert_yaxis()
    axes.set_xlim(0, length)
    axes.set_xlabel("milliseconds")
    axes.set_title(title)
    axes.grid(axis="x", alpha=0.3)
    plotting.save(figure, output, dpi=110)


def run(args: argparse.Namespace) -> int:
    bars = load(Path(args.file))
    spans = iterations(bars)
    index = args.iteration if args.iteration is not None else max(0, len(spans) - 2)  # the last complete one
    if not -len(spans) <= index < len(spans):
        raise FuyouError(f"--iteration {index}: the trace holds {len(spans)} iteration(s)")
    start, end = spans[index]
    busy = shares(bars, start, end)
    if args.json:
        print(json.dumps({"iteration": index, "milliseconds": end - start, "busy": busy}), file=args.stdout)
        return 0
    if args.output is None:
        raise FuyouError("fuyou trace: give -o FILE.png (or --json)")
    title = args.title or f"{Path(args.file).name}: iteration {index}, {end - start:.0f} ms"
    draw(window(bars, start, end), end - start, busy, title, Path(args.output))
    print(f"{args.output}: iteration {index}, {end - start:.0f} ms", file=sys.stderr)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("trace", help="draw one iteration of a fuyou trace (FUYOU_TRACE=FILE)")
    parser.add_argument("file", help="a trace written by FUYOU_TRACE / scripts/finetune.py --trace")
    parser.add_argument("-o", "--output", help="PNG to write")
    parser.add_argument("--iteration", type=int, help="which iteration (default: the last complete one)")
    parser.add_argument("--title", help="the picture's title")
    parser.add_argument("--json", action="store_true", help="print each lane's busy share instead of drawing")
    parser.set_defaults(run=run)
