#!/usr/bin/env bash
# The GPU proof in one command: every CUDA path of the project run once, its numbers recorded (issue 17).
#
#   bash scripts/gpu_check.sh [--dry-run] [--out DIR]
#
# Parts, each with its log in DIR (default: $OUT where the device machine sets it, else gpu-check/), run in order
# and continued past a failure; DIR/summary.json holds each part's exit status and seconds, and the script exits 1
# if any part failed:
#   setup              installs what the GPU machine lacks from prepared wheels (.whl/, made by the shared
#                      device-wheels.sh: DeepSpeed, its pure-Python dependencies, libaio), builds the extension
#                      (with CUDA where torch and a toolkit have it) and reports torch, the device and the build;
#   gpu-tests          pytest -m gpu (the DeviceTransfer round trip on CUDA, ..., and Lightning's DeepSpeedStrategy
#                      when its wheels were prepared too: device-wheels.sh lightning lightning-utilities
#                      torchmetrics; skipped without them);
#   bench-io           fuyou bench-io: SSD -> pinned -> GPU through DeviceTransfer against its two ceilings;
#   bench-step         scripts/bench_step.py in bf16 on a 1.2B-parameter Llama: stock ZeRO-Infinity, fuyou with
#                      everything on the SSD, fuyou with its DRAM tier, with the modelled bound (RESULTS.md);
#   bench-activations  scripts/bench_activations.py: no offload, recomputation, CPU and SSD tiers (RESULTS.md);
#   estimator          scripts/bench_estimate.py: the estimate against the measured peaks (RESULTS.md).
# Budget on one H100/H200-class GPU with 16 cores: under 8 minutes, bench-step the longest part.
#
# --dry-run runs every part that does not need CUDA, with tiny sizes, on this machine's CPU accelerator, recording
# nothing: the test suite runs it, so the GPU run cannot fail on a typo. It neither installs nor builds.
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
out_dir="${OUT:-gpu-check}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) out_dir="$2"; shift ;;
    *) echo "usage: bash scripts/gpu_check.sh [--dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"
python="${PYTHON:-python3}"
swap="$(mktemp -d "${SWAP_ROOT:-/tmp}/fuyou-gpu-check-XXXXXX")"
trap 'rm -rf "$swap"' EXIT
: > "$out_dir/parts.tsv"

# run_part NAME COMMAND...: runs COMMAND with its output in NAME.log; records its exit status and seconds.
run_part() {
  local name="$1"; shift
  local start=$SECONDS
  echo "[gpu_check] $name ..."
  "$@" > "$out_dir/$name.log" 2>&1
  local status=$?
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$out_dir/parts.tsv"
  echo "[gpu_check] $name: exit $status after $((SECONDS - start)) s (log: $out_dir/$name.log)"
}

setup() {
  if [[ $dry_run -eq 0 ]]; then
    if [[ -d .whl ]]; then
      "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return
      for deb in .whl/*.deb; do [[ -e "$deb" ]] && dpkg -x "$deb" /; done
      ldconfig
    fi
    "$python" setup.py build_ext --inplace || return
  fi
  "$python" - <<'EOF'
import torch
from deepspeed_fuyou.io import native
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory >> 30, "GiB")
print("extension built with CUDA:", native.cuda_compiled())
EOF
}

if [[ $dry_run -eq 0 ]]; then
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  device=cuda
  gpu_tests=(-m gpu)
  bench_io=(--size 4GiB --repeat 3 --device cuda)
  record=()
  step_shape=(--config configs/fuyou_gpu.json --layers 24 --hidden 2048 --seq-len 1024 --micro-batch 4 --steps 5
              --sides stock-nvme fuyou-ssd fuyou)
  activation_shape=(--layers 8 --hidden 2048 --seq-len 1024 --micro-batch 4 --steps 3)
  estimate_shape=(--layers 8 16 --hidden 2048 --seq-len 512 --micro-batch 2 --steps 3)
else
  export DS_ACCELERATOR=cpu
  device=cpu
  gpu_tests=(-m gpu --collect-only)
  bench_io=(--size 16MiB --repeat 1 --device cpu --no-deepspeed --no-fio)
  record=(--no-record)
  step_shape=(--layers 2 --hidden 64 --seq-len 16 --micro-batch 1 --steps 2 --sides fuyou-ssd)
  activation_shape=(--layers 2 --hidden 64 --seq-len 32 --micro-batch 1 --steps 2)
  estimate_shape=(--layers 2 --hidden 64 --seq-len 16 --micro-batch 1 --steps 2)
fi

run_part setup setup
run_part gpu-tests "$python" -m pytest -q -p no:cacheprovider "${gpu_tests[@]}" tests
run_part bench-io "$python" -m deepspeed_fuyou.cli.main bench-io --path "$swap" "${bench_io[@]}"
run_part bench-step "$python" scripts/bench_step.py --path "$swap" "${step_shape[@]}" "${record[@]}"
run_part bench-activations "$python" scripts/bench_activations.py --path "$swap" "${activation_shape[@]}" "${record[@]}"
run_part estimator "$python" scripts/bench_estimate.py --path "$swap" "${estimate_shape[@]}" "${record[@]}"

"$python" - "$out_dir" "$dry_run" "$device" <<'EOF'
import json, sys
from pathlib import Path
out, dry_run, device = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
parts = {}
for line in (out / "parts.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    parts[name] = {"exit_status": int(status), "seconds": int(seconds), "log": f"{name}.log"}
summary = {"dry_run": dry_run, "device": device, "passed": all(p["exit_status"] == 0 for p in parts.values()),
           "parts": parts}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
sys.exit(0 if summary["passed"] else 1)
EOF
