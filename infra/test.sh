#!/usr/bin/env bash
# The test command: fetches or starts what the tests need (the demo model, pyarrow and
# jsonschema, a running RabbitMQ, a local S3 server), then runs every test of the workspace in the release
# profile (the same build as the binary).
set -euo pipefail
cd "$(dirname "$0")/.."

MEDBATCH_DEMO_GGUF="$(bash infra/fetch-demo-model.sh)"
MEDBATCH_PYTHON="$(bash infra/python-env.sh)"
# Real DICOM files nobody here wrote: the test files inside pydicom's wheel.
MEDBATCH_PYDICOM_DATA="$("$MEDBATCH_PYTHON" -c 'import pathlib, pydicom; print(pathlib.Path(pydicom.__file__).parent / "data" / "test_files")')"
# The queue tests talk to a real RabbitMQ (started here when it is down), the store tests to
# a local S3-compatible server (built once, started here), through the SDK's variables.
MEDBATCH_AMQP_URL="$(bash infra/rabbitmq.sh)"
bash infra/s3-server.sh start >/dev/null
eval "$(bash infra/s3-server.sh env | sed 's/^/export /')"
# nibabel is installed without numpy: its data folder is found without importing it.
MEDBATCH_NIBABEL_DATA="$("$MEDBATCH_PYTHON" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("nibabel").origin).parent / "tests" / "data")')"
# OpenSlide's sample slides (LGPL, fetched into the cache, never committed).
MEDBATCH_OPENSLIDE_DATA="$(MEDBATCH_PYTHON="$MEDBATCH_PYTHON" bash infra/openslide-samples.sh)"
export MEDBATCH_DEMO_GGUF MEDBATCH_PYTHON MEDBATCH_AMQP_URL MEDBATCH_PYDICOM_DATA MEDBATCH_NIBABEL_DATA MEDBATCH_OPENSLIDE_DATA
# Tests run concurrently (several test threads and binaries, each with a model): one compute
# thread each keeps 2-core machines from oversubscription, which slows candle's synchronized
# kernels several-fold.
export CANDLE_NUM_THREADS="${CANDLE_NUM_THREADS:-1}"

# The local S3 server's buckets before the tests: those the tests make (`medbatch-<test>-<pid>`)
# are removed after a passing run, with the server's files about their objects, which would
# otherwise pile up from run to run and slow the server down (a failing run keeps them to look at).
s3_data="${MEDBATCH_CACHE:-$HOME/.cache/medbatch}/s3s/data"
buckets_before="$(ls "$s3_data" 2>/dev/null || true)"

# Unit and integration tests (the crates have no doc tests), then one closing line with the
# totals over every test binary.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --release --workspace --lib --bins --tests "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -eq 0 ]; then
  for bucket in $(ls "$s3_data" 2>/dev/null || true); do
    case "$bucket" in
      medbatch-*) grep -qxF "$bucket" <<<"$buckets_before" || bash infra/s3-server.sh remove-bucket "$bucket" ;;
    esac
  done
fi
# The lab-report evaluation on both splits of its gold set (dev: tuned on; test: held out)
# with the demo model, printed for the record
# (tests/e2e_embedded.rs holds it to minimum scores).
if [ "$status" -eq 0 ]; then
  bin="${CARGO_TARGET_DIR:-target}/release/medbatch"
  for split in dev test; do
    eval_out="$(mktemp -d)"
    "$bin" run lab-report "pipelines/lab-report/eval/$split/reports" --out "$eval_out" --model "$MEDBATCH_DEMO_GGUF" --run-id eval >/dev/null 2>&1 \
      && echo "lab-report evaluation, $split split (demo model, pipelines/lab-report/eval/$split):" \
      && "$bin" eval lab-report --gold "$split" --pred "$eval_out" --run-id eval || echo "lab-report evaluation ($split) could not run"
    rm -rf "$eval_out"
  done
fi
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
