"""`fuyou bench-io`: sequential write and read throughput of our engine against DeepSpeed's `aio_handle`, plain
buffered Python file I/O and (where installed) fio's O_DIRECT ceiling, in one run, on the same directories. Ours
runs twice, with and without its checksums (`io.verify`), so that their cost is a ratio of the same run.

Each round writes and reads `--size` bytes per engine, spread over the `--path` directories (our engine stripes;
the others write one file per directory, concurrently where they can), engines interleaved so that a noisy
neighbour hurts all of them alike. Every read is checked byte for byte after it is timed. The median of the
rounds is reported; samples are in the JSON. With a CUDA device (or `--device`), the SSD -> device pipeline is
measured too, against the two ceilings it is made of: SSD -> pinned read and pinned -> device copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import torch

from deepspeed_fuyou.config.sizes import format_size, parse_size
from deepspeed_fuyou.errors import FuyouIOError
from deepspeed_fuyou.io import ALIGNMENT, DeviceTransfer, IOEngine, IOOptions, PinnedPool, SwapSpace

GB = 1e9


@dataclass
class BenchSettings:
    paths: list[str]
    size: int
    options: IOOptions
    repeat: int = 3
    deepspeed: bool = True
    fio: bool = True
    device: str | None = None  # "cuda", "cpu" (the pipeline's CPU stand-in) or None


@dataclass
class Samples:
    write: list[float] = field(default_factory=list)
    read: list[float] = field(default_factory=list)

    def median(self, kind: str) -> float | None:
        values = getattr(self, kind)
        return statistics.median(values) if values else None


def _throughput(action: Callable[[], float | None], nbytes: int) -> float:
    """GB/s of `action`: its own figure when it measures itself (fio), else `nbytes` over the wall time."""
    start = time.perf_counter()
    reported = action()
    return reported if reported is not None else nbytes / (time.perf_counter() - start) / GB


def _split(buffer: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """Equal, 4 KiB-aligned slices of `buffer`, one per directory."""
    per = buffer.numel() // parts // ALIGNMENT * ALIGNMENT
    return [buffer[i * per : (i + 1) * per] for i in range(parts)]


class _Fuyou:
    """Our engine; `name` "fuyou_unverified" for the one without checksums (`io.verify` off), to show their cost."""

    def __init__(self, engine: IOEngine, space: SwapSpace, buffer: torch.Tensor, name: str = "fuyou") -> None:
        self.name = name
        self.engine, self.paths, self.buffer = engine, space.files(f"{name}.bin"), buffer

    def write(self) -> None:
        self.engine.write(self.buffer, self.paths).wait()

    def read(self) -> None:
        self.engine.read(self.buffer, self.paths).wait()


class _DeepSpeed:
    """DeepSpeed's aio_handle as ZeRO-Infinity configures it, on buffers from its own locked allocator."""

    name = "deepspeed"

    def __init__(self, handle: object, space: SwapSpace, data: torch.Tensor) -> None:
        self.handle = handle
        self.paths = space.files("deepspeed.bin")
        self.buffer = handle.new_cpu_locked_tensor(data.numel(), data)
        self.buffer.copy_(data)
        self.parts = _split(self.buffer, len(self.paths))

    def write(self) -> None:
        for part, path in zip(self.parts, self.paths, strict=True):
            self.handle.async_pwrite(part, path)
        self.handle.wait()

    def read(self) -> None:
        for part, path in zip(self.parts, self.paths, strict=True):
            self.handle.async_pread(part, path)
        self.handle.wait()

    def close(self) -> None:
        self.handle.free_cpu_locked_tensor(self.buffer)


class _Buffered:
    """What a plain Python program does: write()+fsync and read() through the page cache, one file at a time.
    The page cache is dropped for the file before each read, so reads come from the disk."""

    name = "buffered"

    def __init__(self, space: SwapSpace, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.paths = space.files("buffered.bin")
        self.views = [memoryview(part.numpy()) for part in _split(buffer, len(self.paths))]

    def write(self) -> None:
        for view, path in zip(self.views, self.paths, strict=True):
            with open(path, "wb") as f:
                f.write(view)
                f.flush()
                os.fsync(f.fileno())

    def read(self) -> None:
        for path in self.paths:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        for view, path in zip(self.views, self.paths, strict=True):
            with open(path, "rb", buffering=0) as f:
                read_whole(f, view, str(path))


def read_whole(file: BinaryIO, view: memoryview, path: str) -> None:
    """Fills `view` from an unbuffered file: one read() returns at most 2 GiB - 4 KiB on Linux, fewer on a signal."""
    done = 0
    while done < len(view):
        got = file.readinto(view[done:])
        if not got:
            raise FuyouIOError(path, done, len(view) - done, None, "the file ended early")
        done += got


def _wrong_bytes(reader: str, space: SwapSpace) -> FuyouIOError:
    """What a read that returned other bytes than were written says: the device, not the benchmark, is suspect."""
    return FuyouIOError(
        str(space.dirs[0]),
        0,
        0,
        None,
        f"{reader} read back other bytes than it wrote",
        "check the device (dmesg, SMART)",
    )


def _deepspeed_handle(options: IOOptions) -> tuple[object | None, str | None]:
    """DeepSpeed's aio_handle (JIT-built on first use), or why it cannot be had."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        builder = AsyncIOBuilder()
        if not builder.is_compatible(verbose=False):
            return None, "DeepSpeed's async_io op is not compatible with this machine (libaio-dev missing?)"
        module = builder.load(verbose=False)
        return module.aio_handle(options.block_size, options.queue_depth, False, True, options.threads), None
    except Exception as err:  # any failure to build or load is reported, not fatal
        return None, f"{type(err).__name__}: {err}"


class _Fio:
    """fio's sequential O_DIRECT libaio throughput on the same directories: the ceiling to compare against. One job
    per directory at our block size and queue depth; fio reports its own bandwidth, excluding its start-up."""

    name = "fio"

    def __init__(self, space: SwapSpace, size: int, options: IOOptions) -> None:
        self.base = [
            "fio",
            "--output-format=json",
            "--group_reporting",
            "--ioengine=libaio",
            "--direct=1",
            f"--bs={options.block_size}",
            f"--iodepth={options.queue_depth}",
        ]
        for i, directory in enumerate(space.dirs):
            self.base += [
                f"--name=job{i}",
                f"--directory={directory}",
                f"--size={size // len(space.dirs)}",
                "--filename=fio.bin",
            ]

    def _run(self, kind: str) -> float:
        run = subprocess.run([*self.base, f"--rw={kind}"], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"fio failed: {run.stderr.strip()[-500:]}")
        report = json.loads(run.stdout[run.stdout.index("{") :])
        return sum(job[kind]["bw_bytes"] for job in report["jobs"]) / GB

    def write(self) -> float:
        return self._run("write")

    def read(self) -> float:
        return self._run("read")


def _device_pipeline(
    settings: BenchSettings,
    engine: IOEngine,
    space: SwapSpace,
    pool: PinnedPool,
    staged: torch.Tensor,
    data: torch.Tensor,
) -> dict[str, float]:
    """SSD -> device through DeviceTransfer, and its two ceilings measured the same way in the same run."""
    device = torch.device(settings.device)
    size = data.numel()
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    paths = space.files("fuyou.bin")
    engine.write(data, paths).wait()
    target = torch.empty(size, dtype=torch.uint8, device=device)
    transfer = DeviceTransfer(engine, pool, chunk_size=min(64 << 20, size))

    def ssd_read() -> None:
        engine.read(staged, paths).wait()

    def h2d() -> None:
        target.copy_(staged, non_blocking=True)
        synchronize()

    def load() -> None:
        transfer.load(target, paths)
        synchronize()

    steps = {"ssd_read": ssd_read, "h2d": h2d, "load": load}
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(settings.repeat):
        for name, step in steps.items():
            samples[name].append(_throughput(step, size))
    if not torch.equal(target.cpu(), data):
        raise _wrong_bytes("the SSD -> device pipeline", space)
    ssd, h2d, load = (statistics.median(samples[k]) for k in ("ssd_read", "h2d", "load"))
    return {
        "device": str(device),
        "device_ssd_read_gbps": ssd,
        "device_h2d_gbps": h2d,
        "device_load_gbps": load,
        "device_load_vs_ceiling": load / min(ssd, h2d),
    }


def run(settings: BenchSettings) -> dict[str, object]:
    """Measures every engine and returns the report (see the module docstring)."""
    size = settings.size // (ALIGNMENT * len(settings.paths)) * ALIGNMENT * len(settings.paths)
    if size <= 0:
        raise ValueError(f"--size must be at least {format_size(ALIGNMENT * len(settings.paths))}")
    report: dict[str, object] = {
        "size_bytes": size,
        "paths": settings.paths,
        "block_size": settings.options.block_size,
        "queue_depth": settings.options.queue_depth,
        "threads": settings.options.threads,
        "repeat": settings.repeat,
    }
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pool = PinnedPool(size + 2 * (64 << 20) + (1 << 20))
    staged = pool.acquire(size)
    unverified_options = settings.options.model_copy(update={"verify": False})
    with (
        IOEngine(settings.options.model_copy(update={"verify": True})) as engine,
        IOEngine(unverified_options) as unverified,
        SwapSpace(settings.paths, field="--path") as space,
    ):
        report["engine"] = engine.backend
        benches: list[object] = [
            _Fuyou(engine, space, staged),
            _Fuyou(unverified, space, staged, "fuyou_unverified"),
            _Buffered(space, staged),
        ]
        handle, reason = _deepspeed_handle(settings.options) if settings.deepspeed else (None, "skipped")
        report["deepspeed_unavailable_reason"] = reason
        if handle is not None:
            benches.insert(1, _DeepSpeed(handle, space, data))
        reason = "skipped" if not settings.fio else None if shutil.which("fio") else "fio is not installed"
        report["fio_unavailable_reason"] = reason
        if reason is None:
            benches.insert(0, _Fio(space, size, settings.options))
        samples = {bench.name: Samples() for bench in benches}
        for _ in range(settings.repeat):
            for bench in benches:
                buffer = getattr(bench, "buffer", None)
                if buffer is not None:
                    buffer.copy_(data)
                samples[bench.name].write.append(_throughput(bench.write, size))
                if buffer is not None:
                    buffer.zero_()
                samples[bench.name].read.append(_throughput(bench.read, size))
                if buffer is not None and not torch.equal(buffer, data):
                    raise _wrong_bytes(bench.name, space)
        for bench in benches:
            if isinstance(bench, _DeepSpeed):
                bench.close()
        for name in ("fio", "fuyou", "fuyou_unverified", "deepspeed", "buffered"):
            for kind in ("write", "read"):
                report[f"{name}_{kind}_gbps"] = samples[name].median(kind) if name in samples else None
        report["samples_gbps"] = {name: {"write": s.write, "read": s.read} for name, s in samples.items()}
        if settings.device:
            report.update(_device_pipeline(settings, engine, space, pool, staged, data))
    for kind in ("write", "read"):
        ours = report[f"fuyou_{kind}_gbps"]
        for other in ("fio", "deepspeed", "fuyou_unverified"):
            theirs = report[f"{other}_{kind}_gbps"]
            report[f"fuyou_{kind}_vs_{other}"] = ours / theirs if theirs else None
    return report


def format_table(report: dict[str, object]) -> str:
    """The report as a readable table."""

    def cell(value: object, fmt: str = "{:.2f}") -> str:
        return "n/a" if value is None else fmt.format(value)

    lines = [
        f"bench-io: {format_size(report['size_bytes'])} over {len(report['paths'])} path(s) "
        f"{', '.join(report['paths'])}; engine {report['engine']}, block {format_size(report['block_size'])}, "
        f"queue depth {report['queue_depth']}, {report['threads']} threads; median of {report['repeat']}",
        f"{'engine':<22}{'write GB/s':>12}{'read GB/s':>12}",
    ]
    for name, label in (
        ("fio", "fio O_DIRECT ceiling"),
        ("fuyou", "fuyou"),
        ("fuyou_unverified", "fuyou, io.verify off"),
        ("deepspeed", "deepspeed aio_handle"),
        ("buffered", "python buffered"),
    ):
        lines.append(f"{label:<22}{cell(report[f'{name}_write_gbps']):>12}{cell(report[f'{name}_read_gbps']):>12}")
    for other, label in (("fio", "fio"), ("deepspeed", "deepspeed"), ("fuyou_unverified", "no checksums")):
        lines.append(
            f"{'fuyou / ' + label:<22}{cell(report[f'fuyou_write_vs_{other}'], '{:.2f}x'):>12}"
            f"{cell(report[f'fuyou_read_vs_{other}'], '{:.2f}x'):>12}"
        )
    for name in ("deepspeed", "fio"):
        if report[f"{name}_unavailable_reason"] not in (None, "skipped"):
            lines.append(f"{name} unavailable: {report[f'{name}_unavailable_reason']}")
    if "device_load_gbps" in report:
        lines.append(
            f"SSD -> {report['device']}: {report['device_load_gbps']:.2f} GB/s through the pipeline; ceilings: SSD "
            f"read {report['device_ssd_read_gbps']:.2f}, pinned copy {report['device_h2d_gbps']:.2f} GB/s "
            f"({report['device_load_vs_ceiling']:.0%} of the lower)"
        )
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench-io",
        help="measure SSD throughput: ours vs DeepSpeed aio vs buffered vs fio",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--path",
        action="append",
        required=True,
        help="a directory on an SSD; repeat for several (ours stripes over them)",
    )
    parser.add_argument("--size", default="1GiB", help="bytes per engine per round (default 1GiB)")
    parser.add_argument("--engine", default="auto", choices=["auto", "aio", "io_uring", "threads"])
    parser.add_argument("--block-size", default="1MiB")
    parser.add_argument("--queue-depth", type=int, default=32)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else None,
        help="also measure SSD -> device through the pinned pipeline (default: cuda when present)",
    )
    parser.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed's aio_handle")
    parser.add_argument("--no-fio", action="store_true", help="skip fio")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(run=main)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        paths=args.path,
        size=parse_size(args.size, "--size"),
        options=IOOptions(
            engine=args.engine,
            block_size=parse_size(args.block_size, "--block-size"),
            queue_depth=args.queue_depth,
            threads=args.threads,
        ),
        repeat=args.repeat,
        deepspeed=not args.no_deepspeed,
        fio=not args.no_fio,
        device=args.device,
    )


def main(args: argparse.Namespace) -> int:
    report = run(settings_from_args(args))
    print(json.dumps(report) if args.json else format_table(report), file=args.stdout)
    return 0
