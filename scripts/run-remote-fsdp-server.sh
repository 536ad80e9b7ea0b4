#!/usr/bin/env bash
# Start the FSDP training service (default http://127.0.0.1:8322). Flags go to `trl-fsdp-service`:
#   --host --port --data-dir --api-token-file --node-token-file --model-dir --allowed-model-root
#   --allowed-checkpoint-root --max-concurrent-jobs --nproc-per-node (see --help)
# Environment: TRL_FSDP_HOST, TRL_FSDP_PORT, TRL_FSDP_DATA_DIR, TRL_FSDP_API_TOKEN, TRL_FSDP_NODE_TOKEN,
# TRL_FSDP_ALLOWED_MODEL_ROOTS, NODE_RANK, MASTER_ADDR, NNODES. A non-loopback --host needs a token.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && . .venv/bin/activate
exec python -m providers.remote_fsdp.service.app "$@"
