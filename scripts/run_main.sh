#!/usr/bin/env bash
# Installs everything (scripts/install.sh), then runs the main job: a short fine-tune of a small Llama-style model
# (random init from configs/models/llama-tiny, text from data/corpus.txt) with ZeRO-3, parameters and optimizer
# states on NVMe through fuyou, launched by the `deepspeed` launcher exactly as a user would. Without a GPU it runs
# on DeepSpeed's CPU accelerator with configs/fuyou_cpu.json; with one, configs/fuyou_gpu.json (bf16).
# Extra arguments go to scripts/finetune.py (e.g. --steps 50, --model DIR, --data FILE, --trainer).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    config=configs/fuyou_gpu.json
else
    export DS_ACCELERATOR=cpu
    config=configs/fuyou_cpu.json
fi
.venv/bin/deepspeed --num_gpus 1 scripts/finetune.py --deepspeed_config "$config" \
    --output-dir "checkpoints/run-$(date +%Y%m%d-%H%M%S)" "$@"
