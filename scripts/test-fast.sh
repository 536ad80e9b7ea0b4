#!/usr/bin/env bash
# The fast tier: the tests not marked slow (no service process, training, torchrun, browser, terminal,
# cluster or network namespace), for feedback in under a minute. ./scripts/test.sh runs everything (CI).
# Extra arguments go to pytest, e.g. ./scripts/test-fast.sh tests/test_slurm.py -k states
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || ./scripts/prepare-env.sh
. .venv/bin/activate
# Tests that read a tiny model use a build kept across runs; while there is none they are skipped, saying
# how to build one (minutes of CPU, once).
export TRL_TEST_MODELS_DIR=${TRL_TEST_MODELS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/trl-test-models}
# The slowest tests are listed at the end; conftest.py also names any unmarked test over 5 s.
exec python -m pytest -q -rs -m "not slow" --durations=10 --durations-min=1 "$@"
