"""What the main job leaves for a person to look at: a short table at the end of the run, and two pictures next to
its checkpoint, `loss.png` (the loss per step) and `memory_io.png` (host memory, pinned buffers and SSD traffic per
step). The numbers come from the run's summary, the same dict `--metrics` writes as JSON."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from deepspeed_fuyou.cli import plotting
from deepspeed_fuyou.errors import FuyouConfigError

GiB = 1 << 30


def summary_table(summary: dict[str, Any]) -> str:
    """A few lines: steps run, first and last loss, step time and throughput, memory peaks, SSD traffic per step."""
    losses, seconds = summary["losses"], summary.get("step_seconds", [])
    steps = len(losses)
    rows = [
        ("steps", f"{summary['first_step'] + 1}-{summary['first_step'] + steps}" if steps else "none"),
        ("loss", f"{losses[0]:.4f} -> {losses[-1]:.4f}" if steps else "-"),
        ("step time", f"{statistics.median(seconds[1:] or seconds):.2f} s, median after the first" if seconds else "-"),
        ("tokens/s", f"{summary['tokens_per_s']:.0f}"),
        ("peak RSS", f"{summary['peak_rss_bytes'] / GiB:.2f} GiB"),
        ("pinned buffers", f"{summary['pinned_peak_bytes'] / GiB:.2f} GiB"),
    ]
    read, written = summary.get("ssd_read_per_step_bytes", []), summary.get("ssd_written_per_step_bytes", [])
    if read:
        median_read, median_written = statistics.median(read) / GiB, statistics.median(written) / GiB
        rows.append(("storage per step", f"{median_read:.2f} GiB read, {median_written:.2f} GiB written (median)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def write_pictures(summary: dict[str, Any], directory: Path) -> list[Path]:
    """Draws `loss.png` and, when the run recorded them per step, `memory_io.png` into `directory`; returns the files
    written (none without matplotlib, the `plot` extra)."""
    try:
        pyplot = plotting.pyplot("--output_dir", directory)
    except FuyouConfigError:
        return []
    from matplotlib.ticker import MaxNLocator

    directory.mkdir(parents=True, exist_ok=True)
    first = summary["first_step"] + 1
    steps = list(range(first, first + len(summary["losses"])))
    written = []
    figure, axis = pyplot.subplots(figsize=(6, 3.5))
    axis.plot(steps, summary["losses"], marker="o", markersize=3)
    axis.set(xlabel="step", ylabel="loss", title="training loss")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    plotting.save(figure, directory / "loss.png")
    written.append(directory / "loss.png")
    if "rss_per_step_bytes" in summary:
        figure, (memory, ssd) = pyplot.subplots(2, 1, figsize=(6, 5.5), sharex=True)
        memory.plot(steps, [b / GiB for b in summary["rss_per_step_bytes"]], marker="o", markersize=3, label="RSS")
        pinned = [b / GiB for b in summary["pinned_per_step_bytes"]]
        memory.plot(steps, pinned, marker="o", markersize=3, label="pinned buffers (most held so far)")
        memory.set(ylabel="GiB", title="host memory at the end of each step")
        memory.set_ylim(bottom=0)
        memory.legend()
        memory.grid(alpha=0.3)
        bars = ((-0.2, "ssd_read_per_step_bytes", "read"), (0.2, "ssd_written_per_step_bytes", "written"))
        for offset, key, label in bars:
            ssd.bar([s + offset for s in steps], [b / GiB for b in summary[key]], 0.4, label=label)
        ssd.set(xlabel="step", ylabel="GiB", title="storage traffic per step")
        ssd.xaxis.set_major_locator(MaxNLocator(integer=True))
        ssd.legend()
        ssd.grid(alpha=0.3, axis="y")
        plotting.save(figure, directory / "memory_io.png")
        written.append(directory / "memory_io.png")
    return written
