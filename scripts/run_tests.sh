#!/usr/bin/env bash
# Installs everything (scripts/install.sh), then lints and runs the whole test suite. Extra arguments go to pytest.
#   --fast (first): leaves out the tests that start training runs, launchers or package builds in child processes
#   (marked `launches`), for quick iteration; the full suite is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
select=()
if [[ "${1:-}" == "--fast" ]]; then
  shift
  select=(-m "not launches")
fi
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "${select[@]}" "$@"
