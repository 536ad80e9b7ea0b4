#!/usr/bin/env bash
# Prepare the Python environment: .venv with the local CPU torch wheel first (otherwise pip fetches a
# multi-GB CUDA build), then this package with its test extras, pinned to the tested set. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>/dev/null || true
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "torch==2.13.0"
fi
# constraints.txt pins the tested set (pip freeze of the environment the suite passed in); regenerate it
# with `pip freeze --exclude-editable > constraints.txt` after changing dependencies and re-running the tests.
pip install -q -c constraints.txt -e ".[test,ray]"  # ray: the Ray launcher's end-to-end test (tests/test_ray_e2e.py)
python -c "import torch, trl, transformers, peft, llama_stack; print(f'env ready: torch {torch.__version__}, trl {trl.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
