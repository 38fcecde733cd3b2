"""The machine's rates the step-time model needs, measured once and cached: the SSDs, and the model's compute.

A step's time cannot be read off a config: it depends on how fast this machine's SSDs move bytes through our
engine, and how fast it runs this model's forward, backward and optimizer step (DeepSpeed's CPU Adam with stage 3's
bookkeeping). Each is measured with the code training runs: our `IOEngine` with the config's `io` options (a few
seconds), and the model's own layers at the configured micro-batch under DeepSpeed (`compute_rates`, half a minute
on 2 cores). Results are kept in a JSON cache (`$FUYOU_CACHE_DIR`, else `~/.cache/deepspeed-fuyou/rates.json`)
under a key that changes when what was measured would: the file systems of the paths and the I/O options; the
model's config (its depth aside: one measurement serves every depth), micro-batch, sequence length, dtype, device
and threads. Delete the file to measure again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepspeed_fuyou.errors import FuyouError
from deepspeed_fuyou.io import IOEngine, IOOptions, PinnedPool, SwapSpace

SSD_PROBE_BYTES = 256 << 20
"""Bytes each SSD probe moves per direction: many times the engine's requests in flight, so the queue is full for
most of the probe, and a fraction of a second on an NVMe SSD."""

SSD_SETTLE_ROUNDS = 8
"""Rounds of reading and writing `SSD_PROBE_BYTES` at once before the timed runs. Some disks serve a burst faster
than they sustain (cloud volumes spend a burst allowance, SSDs fill a write cache), and a training run moves many
GB per step for hours: timed on a fresh burst, the rates would promise the run a speed it never gets
(RESULTS.md, 2026-12-01 09:57: one such disk measured half its first probe's rates on the next)."""

PROBE_LAYERS = 8
"""Depth the model is cut to for the compute probe (its own, when it has fewer): enough layers that their time
dominates the step's and a layer's cost is measured over several, few enough that a large model's cut fits in host
memory beside ZeRO-Offload's fp32 copies."""

PROBE_RUNS = 2
"""Child processes the compute probe runs, their results averaged: on a shared machine noise comes in spells longer
than one run (RESULTS.md, 2026-12-07 12:10), and two runs halve what one spell adds."""

REPEATS = 3  # timed runs per SSD probe (the median)
COMPUTE_REPEATS = 5  # timed steps per compute probe run (the median, after a warm-up step)


@dataclass(frozen=True)
class SsdRates:
    """Bytes per second through our engine to the striped paths: reading alone, writing alone, and both at once
    (bytes of either direction, while the other one runs), which is how training's reads and writes meet.

    And the host CPU seconds the engine spends per byte it reads or writes (system calls, completions, checksums,
    bounce copies), measured as the process's CPU time over the probe: on DeepSpeed's CPU accelerator those cycles
    are taken from forward, backward and Adam, and on a GPU host from Adam."""

    read: float
    write: float
    mixed: float
    cpu_per_byte_read: float
    cpu_per_byte_written: float


@dataclass(frozen=True)
class ComputeRates:
    """Seconds of each phase of a training step with everything in host memory (ZeRO-Offload): forward and
    backward of one micro-step, and the optimizer step (CPU Adam and stage 3's bookkeeping around it), each as what
    one layer adds and the rest (embedding, final norm, head, loss). Fuyou's step is this work plus its SSD traffic."""

    forward_per_layer: float
    forward_rest: float
    backward_per_layer: float
    backward_rest: float
    step_per_layer: float
    step_rest: float

    def seconds(self, phase: str, layers: int) -> float:
        return getattr(self, f"{phase}_rest") + layers * getattr(self, f"{phase}_per_layer")


@dataclass(frozen=True)
class MachineRates:
    ssd: SsdRates
    compute: ComputeRates


def cache_path() -> Path:
    root = os.environ.get("FUYOU_CACHE_DIR") or Path.home() / ".cache" / "deepspeed-fuyou"
    return Path(root) / "rates.json"


def _cached(key: str, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """The cached measurement under `key`, else `measure()`'s, stored (under a lock: jobs may probe at once)."""
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            cache = json.loads(path.read_text())
        if key not in cache:
            cache[key] = measure()
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps(cache, indent=1, sort_keys=True))
            temporary.replace(path)
        return cache[key]


def _median_seconds(action: Callable[[], object]) -> tuple[float, float]:
    """Median wall and process CPU seconds of `action` over `REPEATS` runs."""
    walls, cpus = [], []
    for _ in range(REPEATS):
        wall, cpu = time.perf_counter(), time.process_time()
        action()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def ssd_rates(paths: Sequence[str], io: IOOptions) -> SsdRates:
    """`paths` through an engine with `io`'s options, measured on first use per file systems and options."""
    devices = sorted({os.stat(p).st_dev for p in paths})
    key = (
        f"ssd {devices} {len(paths)} paths {io.engine} {io.block_size} {io.queue_depth} {io.threads} "
        f"verify {io.verify} settled {SSD_SETTLE_ROUNDS}"
    )
    return SsdRates(**_cached(key, lambda: _probe_ssd(paths, io)))


def _probe_ssd(paths: Sequence[str], io: IOOptions) -> dict[str, float]:
    pool = PinnedPool(2 * SSD_PROBE_BYTES)
    with IOEngine(io) as engine, SwapSpace(list(paths), field="fuyou.nvme_paths") as space:
        first, second = pool.acquire(SSD_PROBE_BYTES), pool.acquire(SSD_PROBE_BYTES)
        first.fill_(1)
        second.fill_(2)
        files_a, files_b = space.files("probe-a"), space.files("probe-b")
        engine.write(first, files_a).wait()
        engine.write(second, files_b).wait()

        def both() -> None:
            writing = engine.write(second, files_b)
            engine.read(first, files_a).wait()
            writing.wait()

        for _ in range(SSD_SETTLE_ROUNDS):
            both()
        write, write_cpu = _median_seconds(lambda: engine.write(first, files_a).wait())
        read, read_cpu = _median_seconds(lambda: engine.read(first, files_a).wait())
        mixed, _ = _median_seconds(both)
    return {
        "read": SSD_PROBE_BYTES / read,
        "write": SSD_PROBE_BYTES / write,
        "mixed": 2 * SSD_PROBE_BYTES / mixed,
        "cpu_per_byte_read": read_cpu / SSD_PROBE_BYTES,
        "cpu_per_byte_written": write_cpu / SSD_PROBE_BYTES,
    }


def compute_rates(
    model_config: Any, micro_batch: int, seq_len: int, dtype: torch.dtype, device: str, zero: Mapping[str, int]
) -> ComputeRates:
    """The model's forward, backward and step under DeepSpeed's ZeRO-Offload on `device`, cut to `PROBE_LAYERS`
    layers (random weights and tokens), each phase timed as its layers' part and the rest's
    (`zero3_probe.split_step`); measured per model shape.

    DeepSpeed itself, not the bare model, because stage 3's gathers, partitioning and gradient reduction cost as much
    as the arithmetic on the CPU accelerator; with `zero` (the "zero_optimization" knobs fuyou trains with, its
    gather window and reduce bucket) because stock's 5e8-element reduce bucket makes backward a different, slower
    and noisier computation (RESULTS.md, 2026-12-02 09:16). It runs in child processes (`python -m
    deepspeed_fuyou.estimator.zero3_probe`): DeepSpeed's process group, accelerator choice and logs stay out of the
    caller.
    """
    shape = {name: value for name, value in model_config.to_diff_dict().items() if name != "num_hidden_layers"}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]
    knobs = " ".join(f"{name}={value}" for name, value in sorted(zero.items()))
    depth = _probe_depth(model_config.num_hidden_layers)
    key = (  # not the model's depth: the same cut model measures a model of any depth beyond it
        f"compute {digest} cut to {depth} layers {micro_batch}x{seq_len} {dtype} {device} "
        f"{torch.get_num_threads()} threads {knobs}"
    )
    return ComputeRates(**_cached(key, lambda: _probe_compute(model_config, micro_batch, seq_len, dtype, device, zero)))


def _probe_compute(
    model_config: Any, micro_batch: int, seq_len: int, dtype: torch.dtype, device: str, zero: Mapping[str, int]
) -> dict[str, float]:
    depth = _probe_depth(model_config.num_hidden_layers)
    runs = [_zero3_seconds(model_config, depth, micro_batch, seq_len, dtype, device, zero) for _ in range(PROBE_RUNS)]
    return {field: statistics.fmean(run[field] for run in runs) for field in runs[0]}


def _probe_depth(layers: int) -> int:
    return max(1, min(PROBE_LAYERS, layers))


def _zero3_seconds(
    model_config: Any,
    layers: int,
    micro_batch: int,
    seq_len: int,
    dtype: torch.dtype,
    device: str,
    zero: Mapping[str, int],
) -> dict[str, float]:
    """`ComputeRates`'s fields for the model cut to `layers` layers, from one child process."""
    config = model_config.to_dict()
    config["num_hidden_layers"] = layers
    with tempfile.TemporaryDirectory(prefix="fuyou-compute-probe-") as scratch:
        request = Path(scratch) / "request.json"
        request.write_text(
            json.dumps(
                {
                    "model_config": config,
                    "micro_batch": micro_batch,
                    "seq_len": seq_len,
                    "dtype": str(dtype).removeprefix("torch."),
                    "zero": dict(zero),
                    "repeats": COMPUTE_REPEATS,
                }
            )
        )
        env = dict(os.environ)
        if not device.startswith("cuda"):
            env["DS_ACCELERATOR"] = "cpu"
            # One local rank, as DeepSpeed's launcher says; unset, the CPU accelerator counts its devices by
            # running `numactl` in a subprocess at every gradient bucket, and forking a process of this size
            # costs more than the bucket's arithmetic.
            env["LOCAL_SIZE"] = "1"
        command = [sys.executable, "-m", "deepspeed_fuyou.estimator.zero3_probe", str(request)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=scratch)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise FuyouError(
                f"measuring the model's step under ZeRO-Offload (python -m deepspeed_fuyou.estimator.zero3_probe) "
                f"failed: {last}. It needs DeepSpeed's CPU Adam op (scripts/install.sh builds it); without --time "
                "the estimate needs no measurement"
            )
        return json.loads((Path(scratch) / "answer.json").read_text())
