#!/usr/bin/env bash
# Set up the environment and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/prepare-env.sh
. .venv/bin/activate
# Two workers (pytest-xdist): each module is one unit, the cluster modules one unit together (tests/conftest.py);
# TEST_WORKERS=0 runs everything in this process.
exec python -m pytest -q -n "${TEST_WORKERS:-2}" "$@"
