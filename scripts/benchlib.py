"""What every scripts/bench_*.py shares: describing the machine and appending a run to benchmarks/RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "RESULTS.md"


def machine(paths: list[str] = ()) -> str:
    """CPU, cores, memory, GPU and the block devices under `paths`, in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    parts = [f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM"]
    try:
        import torch

        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name()}")
    except ImportError:
        pass
    for path in paths:
        df = subprocess.run(["df", "--output=source,fstype", path], capture_output=True, text=True).stdout.split()
        if len(df) >= 4:
            parts.append(f"{path} on {df[2]} ({df[3]})")
    return "; ".join(parts)


def append_result(title: str, paths: list[str], body: str) -> None:
    """Adds a dated section with the machine, the exact command and `body` (a table) to benchmarks/RESULTS.md."""
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = f"\n## {stamp} — {title}\n\n- machine: {machine(paths)}\n- command: `python {command}`\n\n{body}\n"
    RESULTS.parent.mkdir(exist_ok=True)
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by scripts/bench_*.py; newest last.\n")
    with RESULTS.open("a") as f:
        f.write(section)
