"""Training-step benchmark: every way a user could run the same model, config and data, in one run.

Sides (`--sides`, default all): `no-offload` (ZeRO-3, everything on the device), `stock-cpu` (ZeRO-Offload),
`stock-nvme` (ZeRO-Infinity with DeepSpeed's defaults, which keep parameters in host memory up to `max_in_cpu`),
`stock-nvme-nocache` (the same with `max_in_cpu: 0`: parameters really on the SSD), `fuyou-ssd-off` and `fuyou-ssd`
(`placement.host_memory: 0`, the optimizer stepped after backward or with the default overlap; both with the default
`optimizer.read_ahead`, what the parameter window leaves of its half of the pinned budget), `fuyou-ssd-read-ahead`
(`fuyou-ssd` with `--read-ahead` more pinned memory, all of it `optimizer.read_ahead`), `fuyou-ssd-unverified`
(`fuyou-ssd` with `io.verify: false`: what the swap checksums cost; not in the default set), and `fuyou` (default
overlap; placement `--host-memory`, else the default). For each depth (`--layers`, at fixed width) it writes a
random-init Llama config and runs the main job (scripts/finetune.py, launched by `deepspeed`, no final checkpoint) once
per side and round; rounds interleave the sides (`--rounds`), so a noisy machine slows all of them alike. Reported per
side: step time (median over rounds of each run's median after its first two steps, `WARMUP_STEPS`, with the rounds'
spread), tokens/s, peak RSS of the whole process and of the training steps, pinned buffers, SSD bytes read/written
per step (/proc/self/io) and the ratio of the step time to stock ZeRO-Infinity's. For fuyou's sides also `fuyou
estimate`'s modelled step time and bound (from this machine's measured rates, `estimator.rates`) and the measured
step's ratio to each. A side that fails is reported with its error, not dropped.

    python scripts/bench_step.py --layers 32 --hidden 1024 --seq-len 64 --micro-batch 1 --path /mnt/nvme0
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from benchlib import append_result, comparison_config, main_job_command, table

from deepspeed_fuyou.cli.main import main as fuyou_cli
from deepspeed_fuyou.config.fuyou import FuyouConfig
from deepspeed_fuyou.config.sizes import format_size, parse_size
from deepspeed_fuyou.distributed import free_port, shared_memory_buffers
from deepspeed_fuyou.estimator.estimate import estimate, measured_rates
from deepspeed_fuyou.estimator.step_time import StepTime

ROOT = Path(__file__).resolve().parent.parent
SIDES = (
    "no-offload",
    "stock-cpu",
    "stock-nvme",
    "stock-nvme-nocache",
    "fuyou-ssd-off",
    "fuyou-ssd",
    "fuyou-ssd-read-ahead",
    "fuyou",
)
EXTRA_SIDES = ("fuyou-ssd-unverified",)  # on request only: a measurement of one of fuyou's costs
REFERENCE = "stock-nvme"
WARMUP_STEPS = 2
"""Steps left out of each run's steady state. The first has no optimizer step behind it to overlap. With an
overlapped optimizer the second carries the first optimizer step, which touches the optimizer's host memory for the
first time (a DRAM tier's states: page faults), a cost stock pays in its own first step; with only two steady steps
left after one warm-up step, such an outlier made the median the slower of the other two (RESULTS.md,
2026-12-07 21:58)."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument(
        "--gradient-clipping",
        type=float,
        help="instead of the config's (0: none, so that fuyou's default overlap steps during backward)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs per side, interleaved")
    parser.add_argument("--sides", nargs="+", choices=SIDES + EXTRA_SIDES, default=list(SIDES))
    parser.add_argument(
        "--read-ahead",
        type=lambda value: parse_size(value, "--read-ahead"),
        default=3 << 30,
        help="the side fuyou-ssd-read-ahead's optimizer.read_ahead, added to the config's pinned budget",
    )
    parser.add_argument(
        "--host-memory",
        type=lambda value: value if value == "auto" else parse_size(value, "--host-memory"),
        help="the side fuyou's placement.host_memory (a size or auto; default: fuyou's default)",
    )
    parser.add_argument("--config", type=Path, help="a fuyou config (default: configs/fuyou_gpu.json or _cpu.json)")
    parser.add_argument("--path", type=Path, default=Path(tempfile.gettempdir()), help="SSD directory to swap to")
    parser.add_argument(
        "--trace", action="store_true", help="draw one iteration of each fuyou side's timeline into benchmarks/"
    )
    parser.add_argument(
        "--offload-activations",
        choices=["cpu", "nvme"],
        help="fuyou also offloads activations to this tier (auto policy, tensors of 128 KiB and more); stock cannot",
    )
    parser.add_argument("--no-record", action="store_true")
    return parser.parse_args()


def model_config(layers: int, hidden: int) -> dict[str, Any]:
    """The shipped llama-tiny family at another depth and width (byte vocabulary: the corpus needs no tokenizer)."""
    config = json.loads((ROOT / "configs" / "models" / "llama-tiny" / "config.json").read_text())
    intermediate = 256 * -(-int(hidden * 8 / 3) // 256)  # Llama's 8/3 h, rounded up to 256
    heads = max(1, hidden // 64)
    config.update(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )
    return config


def side_config(
    base: dict[str, Any],
    side: str,
    swap: Path,
    largest_partition: int,
    read_ahead: int,
    host_memory: int | str | None = None,
) -> dict[str, Any]:
    """`base` (a fuyou config) as one side: the same model, data, optimizer, clipping and batch on every side;
    `host_memory` is the side `fuyou`'s budget (None: fuyou's default)."""
    if side.startswith("fuyou"):
        config = comparison_config(base, "fuyou", [swap])
        if side != "fuyou":
            config["fuyou"]["placement"] = {"host_memory": 0}
        elif host_memory is not None:
            config["fuyou"]["placement"] = {"host_memory": host_memory}
        else:
            config["fuyou"].pop("placement", None)  # the default
        if side == "fuyou-ssd-off":
            config["fuyou"]["optimizer"] = {"overlap": "off"}
        if side == "fuyou-ssd-read-ahead":
            pinned = FuyouConfig.parse(config["fuyou"]).pinned_memory
            config["fuyou"]["pinned_memory"] = pinned + read_ahead
            config["fuyou"]["optimizer"] = {**config["fuyou"].get("optimizer", {}), "read_ahead": read_ahead}
        if side == "fuyou-ssd-unverified":
            config["fuyou"]["io"] = {**config["fuyou"].get("io", {}), "verify": False}
        return config
    if side == "no-offload":
        config = copy.deepcopy(base)
        del config["fuyou"]
        config["zero_optimization"].pop("offload_param")
        config["zero_optimization"].pop("offload_optimizer")
        return config
    config = comparison_config(base, "stock-cpu" if side == "stock-cpu" else "stock-nvme", [swap], largest_partition)
    if side == "stock-nvme-nocache":
        config["zero_optimization"]["offload_param"]["max_in_cpu"] = 0
    return config


def run_side(
    side: str, ds_config: dict[str, Any], model_dir: Path, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """One run of the main job; its metrics, or {"error": ...} when it failed."""
    workdir.mkdir(parents=True)
    (workdir / "ds_config.json").write_text(json.dumps(ds_config))
    port = free_port()
    command = main_job_command(workdir / "ds_config.json", port, "--model", str(model_dir), "--steps", str(args.steps))
    command += ["--seq-len", str(args.seq_len)]
    command += ["--metrics", str(workdir / "metrics.json"), "--output-dir", str(workdir / "out"), "--no-final-save"]
    if args.trace and side.startswith("fuyou"):
        command += ["--trace", str(workdir / "trace.json")]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    print(f"  {side}: {model_dir.name}", file=sys.stderr, flush=True)
    result = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True)
    for buffer in shared_memory_buffers(port):  # those of a side that failed (stock-nvme-nocache always does)
        buffer.unlink(missing_ok=True)
    if result.returncode != 0:
        lines = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
        return {"error": (lines[-1] if lines else f"exit status {result.returncode}").strip()[-160:]}
    return json.loads((workdir / "metrics.json").read_text())


def summarize(runs: list[dict[str, Any]], tokens_per_step: int) -> dict[str, Any]:
    """Medians over the rounds that succeeded; the step time's spread over them; the error of a failed round."""
    good = [run for run in runs if "error" not in run]
    if not good:
        return {"error": runs[0]["error"]}
    failed = [run["error"] for run in runs if "error" in run]

    def steady(run: dict[str, Any], key: str) -> float:
        """A run's median of a per-step series after its `WARMUP_STEPS` (all of it in a run that short)."""
        return statistics.median(run[key][WARMUP_STEPS:] or run[key])

    step_times = [steady(run, "step_seconds") for run in good]
    step = statistics.median(step_times)

    def median(key: str, scale: float) -> float:
        return statistics.median(run[key] for run in good) / scale

    def per_step(key: str) -> float:
        """GiB per step, taken as the step time is: median over rounds of `steady`."""
        return statistics.median(steady(run, key) for run in good) / 2**30

    return {
        "step_s": step,
        "spread_s": max(step_times) - min(step_times),
        "tokens_per_s": tokens_per_step / step,
        "peak_rss_gib": median("peak_rss_bytes", 2**30),
        "steps_rss_gib": median("steps_peak_rss_bytes", 2**30),
        "pinned_mib": median("pinned_peak_bytes", 2**20),
        "ssd_read_gib_per_step": per_step("ssd_read_per_step_bytes"),
        "ssd_write_gib_per_step": per_step("ssd_written_per_step_bytes"),
        **({"failed_rounds": f"{len(failed)} of {len(runs)} rounds failed: {failed[0]}"} if failed else {}),
    }


COLUMNS = (
    ("step_s", "step s", "{:.2f}"),
    ("spread_s", "spread s", "{:.2f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("peak_rss_gib", "peak RSS GiB", "{:.2f}"),
    ("steps_rss_gib", "steps RSS GiB", "{:.2f}"),
    ("pinned_mib", "pinned MiB", "{:.0f}"),
    ("ssd_read_gib_per_step", "SSD read GiB/step", "{:.2f}"),
    ("ssd_write_gib_per_step", "SSD write GiB/step", "{:.2f}"),
)


def model_side(model_dir: Path, ds_config: dict[str, Any], seq_len: int) -> StepTime:
    """`fuyou estimate`'s modelled step of one side (the machine's rates are measured once, then cached)."""
    result = estimate(model_dir, ds_config, seq_len=seq_len, rates=measured_rates)
    assert result.step_time is not None
    return result.step_time


def rows_for(label: str, results: dict[str, dict[str, Any]]) -> list[list[str]]:
    reference = results.get(REFERENCE, {}).get("step_s")
    rows = []
    for side, values in results.items():
        if "error" in values:
            rows.append([label, side, "-", "-", *["-"] * (len(COLUMNS) - 1), f"failed: {values['error']}"])
            continue
        speedup = f"{reference / values['step_s']:.2f}x" if reference else "-"
        model = "-"
        if "model_s" in values:
            model = (
                f"{values['model_s']:.2f} / {values['bound_s']:.2f} ({values['bottleneck']}): "
                f"{values['step_s'] / values['model_s']:.2f}x / {values['step_s'] / values['bound_s']:.2f}x"
            )
        cells = [fmt.format(values[key]) for key, _, fmt in COLUMNS]
        if "failed_rounds" in values:  # the medians are of the other rounds
            cells[-1] += f" ({values['failed_rounds']})"
        rows.append([label, side, speedup, model, *cells])
    return rows


def main() -> int:
    args = parse_args()
    default = "fuyou_gpu.json" if torch.cuda.is_available() else "fuyou_cpu.json"
    base = json.loads((args.config or ROOT / "configs" / default).read_text())
    base["train_micro_batch_size_per_gpu"] = args.micro_batch
    if args.gradient_clipping is not None:
        base["gradient_clipping"] = args.gradient_clipping
    if args.offload_activations:
        activations = {"offload": "auto", "tier": args.offload_activations, "min_tensor_size": "128KiB"}
        base["fuyou"] = {**base["fuyou"], "activations": activations}
    tokens_per_step = args.micro_batch * args.seq_len * base.get("gradient_accumulation_steps", 1)
    header = ["layers / params", "side", f"speed-up vs {REFERENCE}", "model / bound s: step's ratio to each"]
    header += [title for _, title, _ in COLUMNS]
    header[-1] += " (or why the side failed)"
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(dir=args.path, prefix="fuyou-bench-step-") as scratch:
        for layers in args.layers:
            config = model_config(layers, args.hidden)
            model_dir = Path(scratch) / f"llama-{layers}x{args.hidden}"
            model_dir.mkdir()
            (model_dir / "config.json").write_text(json.dumps(config))
            with torch.device("meta"):
                from transformers import AutoConfig, AutoModelForCausalLM

                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
            params = sum(p.numel() for p in model.parameters())
            largest = max(p.numel() for p in model.parameters())
            runs: dict[str, list[dict[str, Any]]] = {side: [] for side in args.sides}
            modelled: dict[str, StepTime] = {}
            for round_ in range(args.rounds):
                for side in args.sides:
                    swap = Path(scratch) / f"{model_dir.name}-{side}-{round_}-swap"
                    swap.mkdir()
                    ds_config = side_config(base, side, swap, largest, args.read_ahead, args.host_memory)
                    if side.startswith("fuyou") and side not in modelled:
                        modelled[side] = model_side(model_dir, ds_config, args.seq_len)
                    workdir = Path(scratch) / f"{model_dir.name}-{side}-{round_}"
                    runs[side].append(run_side(side, ds_config, model_dir, workdir, args))
                    if args.trace and round_ == 0 and (workdir / "trace.json").exists():
                        picture = ROOT / "benchmarks" / f"trace-{layers}x{args.hidden}-{side}.png"
                        fuyou_cli(["trace", str(workdir / "trace.json"), "-o", str(picture), "--title", side])
            results = {side: summarize(r, tokens_per_step) for side, r in runs.items()}
            for side, step in modelled.items():
                results[side].update(model_s=step.seconds, bound_s=step.bound_seconds, bottleneck=step.bottleneck)
            rows += rows_for(f"{layers} / {params / 1e6:.0f}M", results)
    settings = (
        f"width {args.hidden}, micro-batch {args.micro_batch}, seq {args.seq_len}, "
        f"gradient clipping {base.get('gradient_clipping', 0)}, {args.steps} steps, "
        f"{args.rounds} round(s) interleaved; step time is each run's median after its first {WARMUP_STEPS} steps, "
        "median over rounds"
    )
    if args.offload_activations:
        settings += f", fuyou offloads activations to {args.offload_activations}"
    if args.host_memory is not None and "fuyou" in args.sides:
        budget = args.host_memory if args.host_memory == "auto" else format_size(args.host_memory)
        settings += f", side fuyou with placement.host_memory {budget}"
    report = f"{settings}\n{table(header, rows)}"
    print(report)
    if not args.no_record:
        append_result("bench_step: every side, one run", [str(args.path)], f"```\n{report}\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
