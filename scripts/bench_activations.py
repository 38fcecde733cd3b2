"""Activation offload benchmark: memory and step time of no offload, full recomputation, the CPU and the SSD tier.

For one random-init Llama (`--layers` x `--hidden`) and each micro-batch size, every mode runs in a fresh process:
one warm-up training step (forward + backward), then `--steps` timed steps. Reported per mode:
  * step time (median) and its ratio to no offload;
  * saved bytes at their peak as the saved-tensor hooks track them (resident on the device: kept, not yet
    written, or read back); for no offload and recomputation the same hooks only count;
  * on a GPU, max memory allocated during a step above what the step started with; on the CPU, the peak RSS
    during the timed steps above the RSS they started with (VmHWM after resetting it with /proc/self/clear_refs).
Recomputation is transformers' activation checkpointing of every layer, reentrant (as DeepSpeed's), so the hooks
see what it saves. Appends the table to benchmarks/RESULTS.md (--no-record to only print).

    python scripts/bench_activations.py --layers 8 --hidden 512 --seq-len 512 --micro-batch 1 2 4 --path /mnt/nvme0
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_step import model_config
from benchlib import append_result, table
from transformers import AutoConfig, AutoModelForCausalLM

from deepspeed_fuyou.activations import make_offloader
from deepspeed_fuyou.config.sizes import format_size
from deepspeed_fuyou.swap.host_heap import reset_peak_rss, rss_bytes

MODES = ("none", "recompute", "cpu", "nvme")
COUNT_ONLY = 1 << 62
"""A min_tensor_size nothing reaches: the hooks count saved bytes and move none."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--offload", choices=["auto", "all"], default="auto")
    parser.add_argument("--min-tensor-size", default="256KiB", help="smallest storage moved (fuyou's default: 4MiB)")
    parser.add_argument("--path", type=Path, default=Path(tempfile.gettempdir()), help="SSD directory (nvme tier)")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "MICRO_BATCH"), help=argparse.SUPPRESS)
    return parser.parse_args()


def run_one(args: argparse.Namespace, mode: str, micro_batch: int) -> dict[str, Any]:
    """One mode at one micro-batch size, in this process."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    fields = model_config(args.layers, args.hidden)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).train()
    if mode == "recompute":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    ids = torch.randint(0, config.vocab_size, (micro_batch, args.seq_len), device=device)
    tier = mode if mode in ("cpu", "nvme") else "cpu"
    offloader = make_offloader(
        model,
        tier=tier,
        path=str(args.path),
        offload=args.offload,
        min_tensor_size=args.min_tensor_size if mode in ("cpu", "nvme") else COUNT_ONLY,
    )

    def step() -> float:
        started = time.perf_counter()
        model.zero_grad(set_to_none=False)
        with offloader:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    step()  # warm-up: gradients allocated, kernels chosen, the policy measured
    reset_peak_rss()
    rss_before = rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    allocated_before = torch.cuda.memory_allocated() if cuda else 0
    offloader.stats.peak_resident_bytes = offloader.stats.resident_bytes
    times = [step() for _ in range(args.steps)]
    result = {
        "mode": mode,
        "micro_batch": micro_batch,
        "step_seconds": statistics.median(times),
        "saved_peak_bytes": offloader.stats.peak_resident_bytes,
        "offloaded_bytes_per_step": offloader.stats.offloaded_bytes // (args.steps + 1),
        "kept_layers": offloader.stats.kept_layers,
        "waited_seconds_per_step": offloader.stats.waited_seconds / (args.steps + 1),
        "memory_peak_bytes": (
            torch.cuda.max_memory_allocated() - allocated_before if cuda else rss_bytes("VmHWM") - rss_before
        ),
    }
    offloader.close()
    return result


def run_isolated(args: argparse.Namespace, mode: str, micro_batch: int) -> dict[str, Any]:
    command = [sys.executable, __file__, *sys.argv[1:], "--one", mode, str(micro_batch)]
    print(f"  {mode}, micro-batch {micro_batch}", file=sys.stderr, flush=True)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    baseline = {r["micro_batch"]: r for r in results if r["mode"] == "none"}
    memory = "GPU max allocated" if torch.cuda.is_available() else "RSS peak"
    header = ["micro-batch", "mode", "step s", "x none", "saved peak", "x none", memory, "x none", "kept", "waited s"]
    rows = []
    for r in results:
        base = baseline[r["micro_batch"]]
        rows.append(
            [
                str(r["micro_batch"]),
                r["mode"],
                f"{r['step_seconds']:.3f}",
                f"{r['step_seconds'] / base['step_seconds']:.2f}",
                format_size(r["saved_peak_bytes"]),
                f"{r['saved_peak_bytes'] / max(base['saved_peak_bytes'], 1):.2f}",
                format_size(max(r["memory_peak_bytes"], 0)),
                f"{r['memory_peak_bytes'] / max(base['memory_peak_bytes'], 1):.2f}",
                str(r["kept_layers"]) if r["mode"] in ("cpu", "nvme") else "-",
                f"{r['waited_seconds_per_step']:.3f}" if r["mode"] == "nvme" else "-",
            ]
        )
    title = (
        f"Llama {args.layers} layers x {args.hidden}, seq {args.seq_len}, offload={args.offload}, "
        f"min_tensor_size={args.min_tensor_size}, median of {args.steps} steps"
    )
    return f"{title}\n{table(header, rows)}"


def main() -> None:
    args = parse_args()
    if args.one:
        print(json.dumps(run_one(args, args.one[0], int(args.one[1]))))
        return
    results = [run_isolated(args, mode, mb) for mb in args.micro_batch for mode in MODES]
    text = report(args, results)
    print(text)
    if not args.no_record:
        append_result("bench_activations: no offload vs recomputation vs CPU and SSD tiers", [str(args.path)], text)


if __name__ == "__main__":
    main()
