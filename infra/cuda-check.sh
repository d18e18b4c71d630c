#!/usr/bin/env bash
# Compile-checks the `cuda` feature (candle's CUDA backend, NCCL through cudarc, medbatch's GPU
# ranks) on a machine without a GPU: `cargo check`, not a build — linking needs the CUDA driver
# libraries, which are not installed here. The CUDA 13.5 compiler comes from the Python
# package index (nvcc, cicc, headers), cached outside the repository; cudarc 0.19 knows CUDA
# versions up to 13.4, so it is told 13.4. The first run builds candle's kernels (~10 min).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${MEDBATCH_CACHE:-$HOME/.cache/medbatch}"
VENV="$CACHE/cudavenv"
CUDA_VERSION=13.5.37
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV" >&2
fi
CU="$(find "$VENV" -path '*/nvidia/cu13' -type d 2>/dev/null | head -1)"
if [ -z "$CU" ] || [ ! -x "$CU/bin/nvcc" ] || [ ! -x "$CU/nvvm/bin/cicc" ]; then
  echo "installing the CUDA $CUDA_VERSION compiler into $VENV..." >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==$CUDA_VERSION" "nvidia-nvvm==$CUDA_VERSION" "nvidia-cuda-crt==$CUDA_VERSION" \
    "nvidia-cuda-runtime==$CUDA_VERSION" nvidia-cuda-cccl >&2
  CU="$(find "$VENV" -path '*/nvidia/cu13' -type d | head -1)"
fi
export CUDARC_CUDA_VERSION=13040 CUDA_COMPUTE_CAP=80 PATH="$CU/bin:$PATH" CUDA_PATH="$CU" CUDA_HOME="$CU" CUDA_ROOT="$CU"
# Its own target folder: the feature changes candle's build.
export CARGO_TARGET_DIR="${MEDBATCH_CUDA_TARGET_DIR:-$CACHE/target-cuda}"
cargo check -p medbatch --features cuda
echo "cuda feature: cargo check passed"
