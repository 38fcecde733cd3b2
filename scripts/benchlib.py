"""What every scripts/bench_*.py shares: describing the machine, starting the main job, appending a run to
benchmarks/RESULTS.md."""

from __future__ import annotations

import copy
import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "RESULTS.md"
FINETUNE = Path(__file__).resolve().parent / "finetune.py"


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


def table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


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


def comparison_config(
    fuyou_config: dict[str, Any], kind: str, swap_dirs: list[Path], largest_partition: int = 10**6
) -> dict[str, Any]:
    """`fuyou_config` as one side of a comparison: "fuyou" (its block striped over `swap_dirs`), "stock-nvme" (stock
    ZeRO-Infinity on `swap_dirs[0]`) or "stock-cpu" (stock ZeRO-3 offloading to CPU memory). Same model, data,
    optimizer and batch on every side. Stock's parameter swap buffers must each hold `largest_partition` elements.
    """
    config = copy.deepcopy(fuyou_config)
    zero = config["zero_optimization"]
    if kind == "fuyou":
        config["fuyou"]["nvme_paths"] = [str(d) for d in swap_dirs]
        for offload in ("offload_param", "offload_optimizer"):
            zero[offload]["nvme_path"] = str(swap_dirs[0])
        return config
    del config["fuyou"]
    if kind == "stock-cpu":
        zero["offload_param"] = {"device": "cpu"}
        zero["offload_optimizer"] = {"device": "cpu"}
    elif kind == "stock-nvme":
        # stock's defaults (5 buffers of 1e8 elements) lock 2 GB and fail on small models ("not enough buffers")
        zero["offload_param"] = {"device": "nvme", "nvme_path": str(swap_dirs[0]), "buffer_count": 8}
        zero["offload_param"]["buffer_size"] = largest_partition
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": str(swap_dirs[0])}
    else:
        raise ValueError(f"unknown kind {kind!r}: fuyou, stock-nvme or stock-cpu")
    return config


def main_job_command(ds_config: Path | str, port: int, *args: str) -> list[str]:
    """The main job (scripts/finetune.py) on one rank with `ds_config`, started by the `deepspeed` launcher as a user
    starts it, meeting at rendezvous `port` (whose shared-memory buffers the caller removes if the job dies)."""
    launcher = Path(sys.executable).parent / "deepspeed"
    return [
        str(launcher),
        "--num_gpus",
        "1",
        "--master_port",
        str(port),
        str(FINETUNE),
        "--deepspeed_config",
        str(ds_config),
        *args,
    ]


def corrupt(path: Path | str, offset: int, data: bytes) -> None:
    """Changes bytes of `path` behind the engine's back, as a failing disk or another program would."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
