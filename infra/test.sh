#!/usr/bin/env bash
# The test command: fetches what the tests need (the demo model, pyarrow), then runs every
# test of the workspace in the release profile (the same build as the binary).
set -euo pipefail
cd "$(dirname "$0")/.."

MEDBATCH_DEMO_GGUF="$(bash infra/fetch-demo-model.sh)"
MEDBATCH_PYTHON="$(bash infra/python-env.sh)"
export MEDBATCH_DEMO_GGUF MEDBATCH_PYTHON

cargo test --release --workspace "$@"
