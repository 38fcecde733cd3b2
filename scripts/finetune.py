"""Fine-tunes a Hugging Face causal LM with DeepSpeed ZeRO-3 and the `"fuyou"` block: the project's main job.

    deepspeed scripts/finetune.py --deepspeed_config configs/fuyou_cpu.json [--model DIR] [--data FILE] [--steps N]

The script is an ordinary DeepSpeed training script: nothing in it is specific to fuyou, which registers itself when
`deepspeed` is imported (the installed import hook). The same script with a config without `"fuyou"` runs stock
DeepSpeed; the tests compare the two on identical seeds and data.

Model: a `config.json` directory (random init, seeded; the default is `configs/models/llama-tiny`) or a local model
directory with weights. Nothing is downloaded. Text: `data/corpus.txt` or a local file; without a tokenizer in the
model directory, bytes are the tokens (the shipped configs have a 256-entry vocabulary).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import deepspeed
import torch
from run_report import summary_table, write_pictures
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig

from deepspeed_fuyou.activations import ActivationStats
from deepspeed_fuyou.distributed import exit_distributed
from deepspeed_fuyou.swap.host_heap import reset_peak_rss, rss_bytes
from deepspeed_fuyou.swap.runtime import SWAP_FILE_KINDS, SwapRuntime
from deepspeed_fuyou.trace import ENVIRONMENT, TRACE

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "configs" / "models" / "llama-tiny")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "corpus.txt")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps to run in total")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--output-dir", type=Path, default=Path("checkpoints"), help="where checkpoints go")
    parser.add_argument("--save-at", type=int, action="append", default=[], help="also save after this step")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    parser.add_argument("--no-final-save", action="store_true", help="skip the checkpoint after the last step")
    parser.add_argument("--trainer", action="store_true", help="train through the Hugging Face Trainer instead")
    parser.add_argument("--metrics", type=Path, help="write losses and throughput as JSON here (rank 0)")
    parser.add_argument(
        "--trace", type=Path, help="record fuyou's timeline as a Chrome trace here (`fuyou trace FILE -o step.png`)"
    )
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


def build_model(model_dir: Path) -> torch.nn.Module:
    """Random init from config.json, or weights from a local model directory; partitioned as it is built.

    `HfDeepSpeedConfig` makes transformers construct the model under `zero.Init` (parameters go straight to their
    ZeRO-3 partitions, and with NVMe offload to the SSD) and gather them for its weight initialisation.
    """
    config = AutoConfig.from_pretrained(model_dir)
    has_weights = any(model_dir.glob("*.safetensors")) or any(model_dir.glob("pytorch_model*.bin"))
    if has_weights:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def tokenize(model_dir: Path, text: str, vocab_size: int) -> torch.Tensor:
    if (model_dir / "tokenizer_config.json").exists():
        return torch.tensor(AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"])
    if vocab_size < 256:
        raise SystemExit(f"{model_dir} has no tokenizer and a vocabulary of {vocab_size} < 256 bytes")
    return torch.tensor(list(text.encode()), dtype=torch.long)


class Windows:
    """Seeded random windows of the token stream: sample i is the same in every run, process and rank layout."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int) -> None:
        if tokens.numel() <= seq_len:
            raise SystemExit(f"the text has {tokens.numel()} tokens; --seq-len {seq_len} needs more")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    def __len__(self) -> int:
        return self.tokens.numel() - self.seq_len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + index)
        start = int(torch.randint(0, len(self), (), generator=generator))
        window = self.tokens[start : start + self.seq_len]
        return {"input_ids": window, "labels": window}

    def micro_batch(self, index: int, micro_batch: int, rank: int, world: int) -> torch.Tensor:
        """Rank `rank`'s share of global micro-batch `index`: deterministic, so a resumed run sees the same data."""
        first = (index * world + rank) * micro_batch
        return torch.stack([self[i]["input_ids"] for i in range(first, first + micro_batch)])


def pinned_bytes(engine: deepspeed.DeepSpeedEngine) -> int:
    """Page-locked host bytes held for swapping: fuyou's pool peak, or the buffers stock DeepSpeed locked."""
    runtimes = list(SwapRuntime._instances.values())
    if runtimes:
        return sum(runtime.pinned_peak_reserved() for runtime in runtimes)
    locked = 0
    optimizer_swapper = getattr(engine.optimizer, "optimizer_swapper", None)
    if optimizer_swapper is not None:
        locked += sum(b.numel() * b.element_size() for b in optimizer_swapper.swap_buffer_manager.all_buffers)
    param_swapper = next((p.nvme_swapper for p in engine.module.parameters() if p.nvme_swapper), None)
    if param_swapper is not None:
        locked += param_swapper.buffers.numel() * param_swapper.buffers.element_size()
    return locked


def storage_io() -> dict[str, int]:
    """Bytes this process read from and wrote to storage (/proc/self/io): what reached the SSD, for either side."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"ssd_bytes_read": int(fields["read_bytes"]), "ssd_bytes_written": int(fields["write_bytes"])}


def io_since(start: dict[str, int]) -> dict[str, int]:
    return {key: value - start[key] for key, value in storage_io().items()}


def swap_traffic() -> dict[str, int]:
    """Bytes fuyou's swap runtimes have moved so far, by direction and what the files hold (none under stock)."""
    runtimes = list(SwapRuntime._instances.values())
    return {
        f"{kind}_{direction}": sum(getattr(runtime.counters, direction)[kind] for runtime in runtimes)
        for kind in SWAP_FILE_KINDS
        for direction in ("read", "written")
    }


def gradient_buffer_bytes(engine: deepspeed.DeepSpeedEngine) -> int:
    """Stage 3's whole-model gradient buffer (host memory when the optimizer is offloaded; fuyou streams instead)."""
    buffer = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)
    return 0 if buffer is None else buffer.numel() * buffer.element_size()


def memory_report(engine: deepspeed.DeepSpeedEngine) -> dict[str, int]:
    """Peak RSS, pinned swap buffers, and the bytes fuyou's own swap runtimes moved (0 under stock DeepSpeed)."""
    runtimes = list(SwapRuntime._instances.values())
    return {
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "pinned_peak_bytes": pinned_bytes(engine),
        "pinned_forward_backward_peak_bytes": sum(r.pool.stats().peak_reserved for r in runtimes),
        # below its reserved peak by the free pieces between buffers in use (fragmentation)
        "pinned_forward_backward_peak_in_use_bytes": sum(r.pool.stats().peak_in_use for r in runtimes),
        "pinned_step_peak_bytes": sum(r.step_pool.stats().peak_reserved for r in runtimes),
        "pinned_forward_backward_budget_bytes": sum(r.pool.budget for r in runtimes),
        "pinned_read_ahead_budget_bytes": sum(r.read_ahead_budget for r in runtimes),
        "pinned_read_ahead_peak_in_use_bytes": sum(
            r.read_ahead_pool.stats().peak_in_use for r in runtimes if r.read_ahead_pool is not None
        ),
        "fuyou_bytes_read": sum(runtime.counters.bytes_read for runtime in runtimes),
        "fuyou_bytes_written": sum(runtime.counters.bytes_written for runtime in runtimes),
        # updated parameters the step handed over to the next forward: taken from memory, or pushed out unread
        "hand_over_taken_bytes": sum(runtime.updates.taken_bytes for runtime in runtimes),
        "hand_over_pushed_out_bytes": sum(runtime.updates.pushed_out_bytes for runtime in runtimes),
        # parameter partitions a fetch found kept in memory since their release, instead of reading them
        "parameter_reads_saved_bytes": sum(runtime.counters.reads_saved for runtime in runtimes),
        "host_gradient_buffer_bytes": gradient_buffer_bytes(engine),
        **activation_report(engine),
    }


def activation_report(engine: deepspeed.DeepSpeedEngine) -> dict[str, int]:
    """What activation offload moved (`"fuyou".activations`), all zero when it is off."""
    offloader = getattr(engine.optimizer, "activation_offloader", None)
    stats = offloader.stats if offloader is not None else ActivationStats()
    return {
        "activation_offloaded_bytes": stats.offloaded_bytes,
        "activation_read_bytes": stats.read_bytes,
        "activation_peak_resident_bytes": stats.peak_resident_bytes,
    }


def train_with_engine(
    args: argparse.Namespace, ds_config: dict, rank: int, world: int
) -> tuple[dict, deepspeed.DeepSpeedEngine]:
    """The plain DeepSpeed loop: forward, `engine.backward`, `engine.step`, checkpoints with `save_checkpoint`."""
    hf_deepspeed = HfDeepSpeedConfig(ds_config)  # noqa: F841  (must stay alive while the model is built)
    model = build_model(args.model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

    windows = Windows(tokenize(args.model, args.data.read_text(), model.config.vocab_size), args.seq_len, args.seed)
    micro_batch = engine.train_micro_batch_size_per_gpu()
    accumulation = engine.gradient_accumulation_steps()

    first_step = 0
    if args.resume:
        loaded, client_state = engine.load_checkpoint(str(args.output_dir))
        if loaded is None:  # DeepSpeed found no `latest`: no save ever completed there
            raise SystemExit(
                f"--resume: no complete checkpoint in {args.output_dir} (a save cut off before its end leaves none); "
                "run without --resume to start over"
            )
        first_step = client_state["step"]

    losses: list[float] = []
    step_seconds: list[float] = []
    tokens_per_step = args.seq_len * micro_batch * accumulation * world
    progress = tqdm(range(first_step, args.steps), disable=rank != 0, desc="fine-tune", unit="step")
    start, io_start = time.perf_counter(), storage_io()
    traffic_per_step: list[dict[str, int]] = []
    per_step: dict[str, list[int]] = {
        "rss_per_step_bytes": [],
        "pinned_per_step_bytes": [],
        "ssd_read_per_step_bytes": [],
        "ssd_written_per_step_bytes": [],
    }
    storage_start = io_start
    # Each step's window of swap traffic starts where the last one ended: an optimizer step behind the next forward
    # moves bytes between two windows, and they must count for one of them.
    traffic_start = swap_traffic()
    reset_peak_rss()  # the steps' own peak, apart from building the model and saving checkpoints
    for step in progress:
        step_start = time.perf_counter()
        step_loss = 0.0
        for micro in range(accumulation):
            input_ids = windows.micro_batch(step * accumulation + micro, micro_batch, rank, world).to(engine.device)
            loss = engine(input_ids=input_ids, labels=input_ids).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / accumulation
        losses.append(step_loss)
        step_seconds.append(time.perf_counter() - step_start)
        traffic_end = swap_traffic()
        traffic_per_step.append({key: value - traffic_start[key] for key, value in traffic_end.items()})
        traffic_start = traffic_end
        storage_end = storage_io()
        per_step["ssd_read_per_step_bytes"].append(storage_end["ssd_bytes_read"] - storage_start["ssd_bytes_read"])
        per_step["ssd_written_per_step_bytes"].append(
            storage_end["ssd_bytes_written"] - storage_start["ssd_bytes_written"]
        )
        storage_start = storage_end
        per_step["rss_per_step_bytes"].append(rss_bytes("VmRSS"))
        per_step["pinned_per_step_bytes"].append(pinned_bytes(engine))
        elapsed = time.perf_counter() - start
        memory = memory_report(engine)
        progress.set_postfix(
            loss=f"{step_loss:.4f}",
            tok_s=f"{tokens_per_step * len(losses) / elapsed:.0f}",
            rss=f"{memory['peak_rss_bytes'] / 2**30:.2f}GiB",
            pinned=f"{memory['pinned_peak_bytes'] / 2**20:.0f}MiB",
        )
        if step + 1 in args.save_at and step + 1 != args.steps:
            engine.save_checkpoint(str(args.output_dir), tag=f"step{step + 1}", client_state={"step": step + 1})
    tokens_per_s = tokens_per_step * len(losses) / (time.perf_counter() - start) if losses else 0.0
    summary = {"first_step": first_step, "losses": losses, "tokens_per_s": tokens_per_s, "step_seconds": step_seconds}
    summary["swap_traffic_per_step"] = traffic_per_step  # what fuyou moved while each step ran
    summary.update(per_step)  # what the end-of-run pictures draw
    summary["steps_peak_rss_bytes"] = rss_bytes("VmHWM")  # before the final checkpoint, which gathers the model
    summary.update(io_since(io_start))  # the steps' swap traffic, not the checkpoint below
    if not args.no_final_save:
        engine.save_checkpoint(str(args.output_dir), tag=f"step{args.steps}", client_state={"step": args.steps})
    return summary, engine


def train_with_trainer(args: argparse.Namespace, ds_config: dict) -> tuple[dict, deepspeed.DeepSpeedEngine]:
    """The same job through the Hugging Face `Trainer`, configured only by `TrainingArguments(deepspeed=...)`.

    The Trainer insists that the DeepSpeed config and its own arguments agree, so they are read from the config.
    It also builds its own learning-rate scheduler (constant here, like the engine loop without a scheduler).
    """
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    optimizer = ds_config.get("optimizer", {}).get("params", {})
    beta1, beta2 = optimizer.get("betas", (0.9, 0.999))
    training_args = TrainingArguments(  # before the model: it turns on zero.Init for the model's construction
        output_dir=str(args.output_dir),
        deepspeed=ds_config,
        per_device_train_batch_size=ds_config["train_micro_batch_size_per_gpu"],
        gradient_accumulation_steps=ds_config.get("gradient_accumulation_steps", 1),
        max_grad_norm=ds_config.get("gradient_clipping", 0.0),
        learning_rate=optimizer.get("lr", 1e-3),
        adam_beta1=beta1,
        adam_beta2=beta2,
        adam_epsilon=optimizer.get("eps", 1e-8),
        weight_decay=optimizer.get("weight_decay", 0.0),
        lr_scheduler_type="constant",
        max_steps=args.steps,
        save_steps=min(args.save_at or [args.steps]),
        logging_steps=1,
        seed=args.seed,
        report_to=[],
        disable_tqdm=False,
    )
    model = build_model(args.model)
    windows = Windows(tokenize(args.model, args.data.read_text(), model.config.vocab_size), args.seq_len, args.seed)
    trainer = Trainer(model=model, args=training_args, train_dataset=windows)
    first_step = 0
    if args.resume:
        first_step = int(get_last_checkpoint(str(args.output_dir)).rsplit("-", 1)[1])
    start, io_start = time.perf_counter(), storage_io()
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    # a resumed Trainer's history also holds the losses logged before the checkpoint
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry and entry["step"] > first_step]
    tokens = args.seq_len * training_args.per_device_train_batch_size * training_args.world_size
    tokens *= training_args.gradient_accumulation_steps * len(losses)
    summary = {"first_step": first_step, "losses": losses, "tokens_per_s": tokens / (time.perf_counter() - start)}
    summary.update(io_since(io_start))  # including the Trainer's checkpoints
    return summary, trainer.model_wrapped


def main() -> None:
    args = parse_args()
    if args.trace:
        os.environ[ENVIRONMENT] = str(args.trace.resolve())  # read when fuyou's swap runtime starts
    final = args.output_dir / (f"checkpoint-{args.steps}" if args.trainer else f"step{args.steps}")
    if final.exists() and not args.resume:
        raise SystemExit(f"{final} exists already: choose another --output-dir, or --resume to continue that run")
    ds_config = json.loads(Path(args.deepspeed_config).read_text())
    deepspeed.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(args.seed)
    if args.trainer:
        summary, engine = train_with_trainer(args, ds_config)
    else:
        summary, engine = train_with_engine(args, ds_config, rank, world)
    if rank == 0:
        summary.update(memory_report(engine))
        if args.metrics:
            args.metrics.write_text(json.dumps(summary))
        print(summary_table(summary))
        pictures = write_pictures(summary, args.output_dir)
        print("pictures: " + (", ".join(map(str, pictures)) or "none (pip install matplotlib to draw them)"))
    TRACE.save()
    exit_distributed()


if __name__ == "__main__":
    main()
