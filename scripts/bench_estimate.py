"""How close `fuyou estimate` comes to the real thing, next to DeepSpeed's and accelerate's own estimators.

Three tables, appended to benchmarks/RESULTS.md (--no-record to only print):
1. activations: the estimate (one fake forward) against the saved-tensor bytes of a real CPU forward, per family,
   micro-batch and sequence length;
2. model states of real architectures (built on fake tensors) per rank with ZeRO-3 offloading params and optimizer
   to CPU: ours next to DeepSpeed's `estimate_zero3_model_states_mem_needs` formula and accelerate's
   `estimate-memory` (model size, and 4x for Adam training);
3. a real run of the main job on this machine (stock ZeRO-Infinity and fuyou, CPU accelerator): estimated pinned
   bytes against the pinned buffers actually held (fuyou: the pool's own peak counter), and the estimated host
   total against the process's peak RSS.

    python scripts/bench_estimate.py [--layers 8 16 --hidden 512] [--path /mnt/nvme0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from bench_step import model_config, run_side
from benchlib import append_result, comparison_config, table
from transformers import AutoConfig, AutoModelForCausalLM

from deepspeed_fuyou.estimator.activations import saved_tensors
from deepspeed_fuyou.estimator.estimate import estimate
from deepspeed_fuyou.estimator.model import build_fake_model

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
GB = 1e9

ACTIVATION_FAMILIES = {
    "gpt2": {"model_type": "gpt2", "n_embd": 512, "n_layer": 4, "n_head": 8, "vocab_size": 8192, "n_positions": 1024},
    "llama": {
        "model_type": "llama",
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 8192,
    },
    "opt": {
        "model_type": "opt",
        "hidden_size": 512,
        "ffn_dim": 2048,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "vocab_size": 8192,
        "word_embed_proj_dim": 512,
        "max_position_embeddings": 1024,
    },
    "gpt_neox": {
        "model_type": "gpt_neox",
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "vocab_size": 8192,
    },
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 8192,
    },
}
SHAPES = [(1, 256), (4, 256), (2, 1024)]

# Published architectures, by their config fields (nothing is downloaded).
ARCHITECTURES = {
    "Llama-2-7B": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "vocab_size": 32000,
    },
    "Mistral-7B": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
    },
    "GPT2-XL": {"model_type": "gpt2", "n_embd": 1600, "n_layer": 48, "n_head": 25, "vocab_size": 50257},
    "OPT-1.3B": {
        "model_type": "opt",
        "hidden_size": 2048,
        "ffn_dim": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "vocab_size": 50272,
        "word_embed_proj_dim": 2048,
    },
    "Pythia-1.4B": {
        "model_type": "gpt_neox",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "vocab_size": 50304,
    },
    "Qwen2-1.5B": {
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
    },
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16], help="depths of the real-run model")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--path", type=Path, default=Path(tempfile.gettempdir()), help="SSD directory to swap to")
    parser.add_argument("--no-record", action="store_true")
    parser.set_defaults(trace=False)  # bench_step's run_side, which runs the jobs here, draws no timeline
    return parser.parse_args()


def transformers_config(fields: dict[str, Any]):
    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def activation_rows() -> list[list[str]]:
    rows = []
    for family, fields in ACTIVATION_FAMILIES.items():
        config = transformers_config(fields)
        for dtype in (torch.float32, torch.bfloat16):
            fake = build_fake_model(config, dtype)
            torch.manual_seed(0)
            real = AutoModelForCausalLM.from_config(config, dtype=dtype).train()
            params = sum(p.numel for p in fake.params)
            for micro_batch, seq_len in SHAPES:
                estimated = fake.saved_tensors(micro_batch, seq_len).nbytes
                ids = torch.randint(0, config.vocab_size, (micro_batch, seq_len))
                measured = saved_tensors(real, ids).nbytes
                error = 100 * (estimated - measured) / measured
                rows.append(
                    [
                        family,
                        f"{params / 1e6:.1f}M",
                        f"{micro_batch}x{seq_len}",
                        str(dtype)[6:],
                        f"{estimated / MIB:.2f}",
                        f"{measured / MIB:.2f}",
                        f"{error:+.2f}%",
                    ]
                )
            del real
    return rows


def model_state_rows() -> list[list[str]]:
    from accelerate.commands.estimate import calculate_maximum_sizes
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}},
    }
    rows = []
    for name, fields in ARCHITECTURES.items():
        result = estimate(transformers_config(fields), config, seq_len=1)
        plan = result.stock
        host = sum(
            getattr(plan.pinned_host, c) + getattr(plan.pageable_host, c)
            for c in ("parameters", "gradients", "optimizer_states")
        )
        gpu = plan.gpu.parameters + plan.gpu.gradients + plan.gpu.optimizer_states
        fake = build_fake_model(transformers_config(fields), torch.bfloat16)
        largest_leaf = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in fake.module.modules())
        ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(result.inputs["parameters"], largest_leaf)
        accelerate_size, _ = calculate_maximum_sizes(fake.module)
        rows.append(
            [
                name,
                f"{result.inputs['parameters'] / 1e9:.2f}B",
                f"{host / GB:.1f}",
                f"{gpu / GB:.2f}",
                f"{ds_cpu / GB:.1f}",
                f"{ds_gpu / GB:.2f}",
                f"{accelerate_size / GB:.1f}",
                f"{4 * accelerate_size / GB:.1f}",
            ]
        )
    return rows


def real_run_rows(args: argparse.Namespace) -> list[list[str]]:
    base = json.loads((ROOT / "configs" / "fuyou_cpu.json").read_text())
    base["train_micro_batch_size_per_gpu"] = args.micro_batch
    rows = []
    with tempfile.TemporaryDirectory(dir=args.path, prefix="fuyou-bench-estimate-") as scratch:
        for layers in args.layers:
            model_dir = Path(scratch) / f"llama-{layers}x{args.hidden}"
            model_dir.mkdir()
            (model_dir / "config.json").write_text(json.dumps(model_config(layers, args.hidden)))
            fake = build_fake_model(AutoConfig.from_pretrained(model_dir))
            largest = max(p.numel for p in fake.params)
            for side in ("stock-nvme", "fuyou"):
                swap = Path(scratch) / f"{model_dir.name}-{side}-swap"
                swap.mkdir()
                ds_config = comparison_config(base, side, [swap], largest_partition=largest)
                predicted = estimate(model_dir, ds_config, seq_len=args.seq_len).chosen
                metrics = run_side(side, ds_config, model_dir, Path(scratch) / f"{model_dir.name}-{side}", args)
                host = predicted.gpu.total + predicted.pinned_host.total + predicted.pageable_host.total
                rss, pinned = metrics["peak_rss_bytes"], metrics["pinned_peak_bytes"]
                rows.append(
                    [
                        f"{layers} / {sum(p.numel for p in fake.params) / 1e6:.0f}M",
                        side,
                        f"{predicted.pinned_host.buffers / MIB:.0f}",
                        f"{pinned / MIB:.0f}",
                        f"{host / MIB:.0f}",
                        f"{rss / MIB:.0f}",
                        f"{100 * (host - rss) / rss:+.1f}%",
                    ]
                )
    return rows


def main() -> int:
    args = parse_args()
    activations = table(
        ["family", "params", "mb x seq", "dtype", "estimated MiB", "measured MiB", "error"], activation_rows()
    )
    states = table(
        [
            "model",
            "params",
            "ours host GB",
            "ours accel GB",
            "DS cpu GB",
            "DS gpu GB",
            "accelerate size GB",
            "accelerate Adam GB",
        ],
        model_state_rows(),
    )
    real = table(
        [
            "layers / params",
            "side",
            "est. pinned buffers MiB",
            "pinned held MiB",
            "est. host MiB",
            "peak RSS MiB",
            "host error",
        ],
        real_run_rows(args),
    )
    report = (
        "activations (saved for backward, distinct non-parameter storages): fake-tensor estimate vs real CPU forward\n"
        f"```\n{activations}\n```\n"
        "model states per rank, bf16, ZeRO-3 offloading params and optimizer to CPU, 1 rank; DeepSpeed's formula "
        "includes its 1.5x buffer factor\n"
        f"```\n{states}\n```\n"
        f"real run of scripts/finetune.py on the CPU accelerator (micro-batch {args.micro_batch} x {args.seq_len} "
        f"tokens, {args.steps} steps): estimate vs what the process held\n"
        f"```\n{real}\n```"
    )
    print(report)
    if not args.no_record:
        append_result("bench_estimate: fuyou estimate vs measured", [str(args.path)], report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
