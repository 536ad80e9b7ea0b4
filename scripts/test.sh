#!/usr/bin/env bash
# Set up the environment and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/prepare-env.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
