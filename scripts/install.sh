#!/usr/bin/env bash
# Installs deepspeed-fuyou and everything it needs into ./.venv on a Debian machine with Python 3.11: the system
# packages (libaio and liburing headers, fio, a C++ compiler, venv), torch pinned to 2.13.0 (a local CPU wheel
# here; an unpinned torch would pull gigabytes of CUDA), DeepSpeed, transformers, the test tools, and this package
# with its C++ extension. Re-running is cheap: what is already there is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for pkg in libaio-dev liburing-dev fio; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
command -v g++ >/dev/null 2>&1 || missing+=(g++)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "install.sh: installing system packages: ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
pip install -q torch==2.13.0

# The package (and its extension, ~2 minutes to compile on 2 cores) is rebuilt only when its sources changed.
stamp=.venv/.fuyou-build-stamp
sources_hash=$(cat setup.py pyproject.toml csrc/*.cpp csrc/fuyou/* | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$sources_hash" ] || ! .venv/bin/python -c 'import deepspeed_fuyou.io' 2>/dev/null; then
  echo "install.sh: building deepspeed-fuyou and its C++ extension"
  pip install -q --no-build-isolation -e '.[test]'
  echo "$sources_hash" > "$stamp"
fi

# The import hook that registers fuyou when `deepspeed` is imported: the install put it into site-packages (setup.py
# adds it to editable installs too). Without it an unchanged script would train stock DeepSpeed: stop here instead.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
if ! cmp -s deepspeed_fuyou-hook.pth "$site/deepspeed_fuyou-hook.pth"; then
  echo "install.sh: the import hook is missing from $site after the install" >&2
  exit 1
fi

# DeepSpeed's C++ ops (minutes on 2 cores), built now rather than by the first training run: a run killed while
# compiling leaves a lock that hangs every later one. Quick when they are built already.
log=.venv/build_deepspeed_ops.log
if .venv/bin/python scripts/build_deepspeed_ops.py >"$log" 2>&1; then
  grep '^build_deepspeed_ops' "$log"
else
  tail -40 "$log" >&2
  echo "install.sh: building DeepSpeed's ops failed (whole log: $log)" >&2
  exit 1
fi
