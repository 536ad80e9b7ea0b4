#!/usr/bin/env bash
# Set up the environment and run the demo: real training jobs through Llama Stack's post-training API
# on locally built tiny models (inline TRL provider, then the remote FSDP service with 2 processes).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/prepare-env.sh
. .venv/bin/activate
exec python scripts/demo.py "$@"
