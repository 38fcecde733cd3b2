#!/usr/bin/env bash
# Installs everything (scripts/install.sh), then runs the main job. Until the ZeRO integration lands, the main job
# is the SSD benchmark: our O_DIRECT engine against DeepSpeed's aio_handle, buffered Python I/O and fio, in one run.
# FUYOU_BENCH_PATH chooses the directory (default: a temporary one on /tmp's disk, removed afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python scripts/bench_io.py --path "${FUYOU_BENCH_PATH:-${TMPDIR:-/tmp}}" --size "${FUYOU_BENCH_SIZE:-1GiB}"
