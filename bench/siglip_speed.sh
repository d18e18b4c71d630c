#!/usr/bin/env bash
# MedSigLIP-shaped embedding speed on the CPU, medbatch beside transformers in one run
# (random weights of MedSigLIP-448's shape, f32, 2 threads each; images at 448 px and texts
# of 64 tokens, one at a time).
#
#   bash bench/siglip_speed.sh [RUNS]
#
# transformers runs in the fixture environment (torch 2.15.0, transformers 5.23.0; see
# tests/fixtures/siglip/make_fixture.py), created here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
CACHE="${MEDBATCH_CACHE:-$HOME/.cache/medbatch}"
VENV="$CACHE/hfvenv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet torch==2.15.0 transformers==5.23.0 safetensors numpy
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
cargo build --release --quiet --bin medbatch
echo "== medbatch"
CANDLE_NUM_THREADS=2 "$CARGO_TARGET_DIR/release/medbatch" bench siglip --runs "$RUNS"
echo "== transformers"
"$VENV/bin/python" bench/siglip_speed.py --runs "$RUNS" --threads 2
