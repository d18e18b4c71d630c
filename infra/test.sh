#!/usr/bin/env bash
# The test command: fetches what the tests need (the demo model, pyarrow), then runs every
# test of the workspace in the release profile (the same build as the binary).
set -euo pipefail
cd "$(dirname "$0")/.."

MEDBATCH_DEMO_GGUF="$(bash infra/fetch-demo-model.sh)"
MEDBATCH_PYTHON="$(bash infra/python-env.sh)"
export MEDBATCH_DEMO_GGUF MEDBATCH_PYTHON
# Tests run concurrently (several test threads and binaries, each with a model): one compute
# thread each keeps 2-core machines from oversubscription, which slows candle's synchronized
# kernels several-fold.
export CANDLE_NUM_THREADS="${CANDLE_NUM_THREADS:-1}"

cargo test --release --workspace "$@"
