"""Training-step benchmark: stock ZeRO-Infinity (NVMe) against fuyou on the same model, config and data, in one run.

For each depth (`--layers`, at fixed width), writes a random-init Llama config, then runs the main job
(scripts/finetune.py, launched by `deepspeed`) once per side and reports step time (median after the first
step), tokens/s, peak RSS of the whole process and of the training steps alone (building the model and the final
checkpoint, which gathers the whole model with `stage3_gather_16bit_weights_on_model_save`, peak apart), pinned
swap buffers and SSD bytes read/written per step (/proc/self/io, so both sides are measured the same way), with
fuyou/stock ratios, and how each side's two RSS peaks grow from the smallest to the largest depth. Appends the table
to benchmarks/RESULTS.md (--no-record to only print).

    python scripts/bench_step.py --layers 8 32 --hidden 512 --steps 5 --path /mnt/nvme0
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from benchlib import append_result, comparison_config

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("stock-nvme", "fuyou")
RATIO = "fuyou/stock"
RSS = {"peak_rss_gib": "peak RSS (whole process)", "steps_rss_gib": "peak RSS of the training steps"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--config", type=Path, help="a fuyou config (default: configs/fuyou_gpu.json or _cpu.json)")
    parser.add_argument("--path", type=Path, default=Path(tempfile.gettempdir()), help="SSD directory to swap to")
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


def run_side(side: str, ds_config: dict[str, Any], model_dir: Path, workdir: Path, args: argparse.Namespace) -> dict:
    workdir.mkdir(parents=True)
    (workdir / "ds_config.json").write_text(json.dumps(ds_config))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(port)]
    command += [str(ROOT / "scripts" / "finetune.py"), "--deepspeed_config", str(workdir / "ds_config.json")]
    command += ["--model", str(model_dir), "--steps", str(args.steps), "--seq-len", str(args.seq_len)]
    command += ["--metrics", str(workdir / "metrics.json"), "--output-dir", str(workdir / "checkpoints")]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    print(f"  {side}: {model_dir.name}", file=sys.stderr, flush=True)
    result = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{side} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return json.loads((workdir / "metrics.json").read_text())


def summarize(metrics: dict[str, Any], tokens_per_step: int, steps: int) -> dict[str, float]:
    step = statistics.median(metrics["step_seconds"][1:] or metrics["step_seconds"])
    return {
        "step_s": step,
        "tokens_per_s": tokens_per_step / step,
        "peak_rss_gib": metrics["peak_rss_bytes"] / 2**30,
        "steps_rss_gib": metrics["steps_peak_rss_bytes"] / 2**30,
        "pinned_mib": metrics["pinned_peak_bytes"] / 2**20,
        "ssd_read_mib_per_step": metrics["ssd_bytes_read"] / steps / 2**20,
        "ssd_write_mib_per_step": metrics["ssd_bytes_written"] / steps / 2**20,
    }


COLUMNS = (
    ("step_s", "step s", "{:.3f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("peak_rss_gib", "peak RSS GiB", "{:.2f}"),
    ("steps_rss_gib", "steps RSS GiB", "{:.2f}"),
    ("pinned_mib", "pinned MiB", "{:.0f}"),
    ("ssd_read_mib_per_step", "SSD read MiB/step", "{:.0f}"),
    ("ssd_write_mib_per_step", "SSD write MiB/step", "{:.0f}"),
)


def format_table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    header = ["layers / params", "side", *(title for _, title, _ in COLUMNS)]
    lines = [header]
    for label, side, values in rows:
        cells = [f"{values[key]:.2f}x" if side == RATIO else fmt.format(values[key]) for key, _, fmt in COLUMNS]
        lines.append([label, side, *cells])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


def main() -> int:
    args = parse_args()
    default = "fuyou_gpu.json" if torch.cuda.is_available() else "fuyou_cpu.json"
    base = json.loads((args.config or ROOT / "configs" / default).read_text())
    base["train_micro_batch_size_per_gpu"] = args.micro_batch
    if args.offload_activations:
        activations = {"offload": "auto", "tier": args.offload_activations, "min_tensor_size": "128KiB"}
        base["fuyou"] = {**base["fuyou"], "activations": activations}
    tokens_per_step = args.micro_batch * args.seq_len * base.get("gradient_accumulation_steps", 1)
    rows: list[tuple[str, str, dict[str, float]]] = []
    rss: dict[tuple[str, str], list[float]] = {(side, key): [] for side in SIDES for key in RSS}
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
            label = f"{layers} / {params / 1e6:.0f}M"
            results = {}
            for side in SIDES:
                swap = Path(scratch) / f"{model_dir.name}-{side}-swap"
                swap.mkdir()
                ds_config = comparison_config(base, side, [swap], largest_partition=largest)
                metrics = run_side(side, ds_config, model_dir, Path(scratch) / f"{model_dir.name}-{side}", args)
                results[side] = summarize(metrics, tokens_per_step, args.steps)
                for key in RSS:
                    rss[side, key].append(results[side][key])
                rows.append((label, side, results[side]))
            stock, fuyou = results["stock-nvme"], results["fuyou"]
            rows.append((label, RATIO, {key: fuyou[key] / stock[key] if stock[key] else 0.0 for key in fuyou}))
    table = format_table(rows)
    growth = "\n".join(
        f"{RSS[key]} growth {args.layers[0]} -> {args.layers[-1]} layers, {side}: {100 * (r[-1] / r[0] - 1):+.1f}%"
        for (side, key), r in rss.items()
    )
    settings = f"width {args.hidden}, micro-batch {args.micro_batch}, seq {args.seq_len}, {args.steps} steps"
    if args.offload_activations:
        settings += f", fuyou offloads activations to {args.offload_activations}"
    report = f"{settings}; step time is the median after the first step\n{table}\n{growth}"
    print(report)
    if not args.no_record:
        append_result("bench_step: stock ZeRO-Infinity vs fuyou", [str(args.path)], f"```\n{report}\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
