#!/usr/bin/env bash
# Prepare the Python environment: .venv with the local CPU torch wheel first (otherwise pip fetches a
# multi-GB CUDA build), then this package with its test extras, pinned to the tested set. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
step() { echo "[set-up] $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  step "creating .venv ($("$PYTHON" --version))"
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
# This kind of machine's pip config names local index folders that may be absent; pip warns about each
# one on every install, a warning no user can act on. Every other line of pip's output passes through.
# Also: pytablewriter (lm-evaluation-harness, test extras) asks for mbstrdecoder[all], an extra that release dropped.
quiet_pip() { { pip "$@" 2>&1 1>&3 | sed -e '/is ignored: it is neither a file nor a directory/d' \
  -e "/mbstrdecoder [0-9.]* does not provide the extra 'all'/d" >&2; } 3>&1; }
# Installed once per tested set: the marker names the hash of the files that decide it.
marker=".venv/.installed-$(cat constraints.txt pyproject.toml | sha256sum | cut -c1-16)"
[ -e "$marker" ] || python -m pip install -q --upgrade pip 2>/dev/null || true
if ! python -c "import torch" 2>/dev/null; then
  step "installing torch 2.13.0, the CPU wheel (about a minute)"
  quiet_pip install -q "torch==2.13.0"
fi
# constraints.txt pins the tested set: plain name==version pins a registry serves. After changing
# dependencies and re-running the tests, regenerate it with scripts/freeze-constraints.sh (never a raw
# `pip freeze`: it writes `name @ file:///...` for local wheels); scripts/check-install.sh checks it.
if [ ! -e "$marker" ]; then
  step "installing this package and its tested set from constraints.txt (a few minutes the first time)"
  quiet_pip install -q -c constraints.txt -e ".[test,ray]"  # ray: the Ray launcher's end-to-end test (tests/test_ray_e2e.py)
  rm -f .venv/.installed-*
  touch "$marker"
fi
python -c "from importlib.metadata import version as v; print(f'env ready: torch {v(\"torch\")}, trl {v(\"trl\")}, transformers {v(\"transformers\")}, peft {v(\"peft\")}, llama-stack {v(\"llama-stack\")}')"
