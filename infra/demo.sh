#!/usr/bin/env bash
# The demo: fetches the demo model on first use, builds medbatch, and runs the lab-report
# pipeline over the bundled example reports. Prints where the Parquet went.
set -euo pipefail
cd "$(dirname "$0")/.."

bash infra/fetch-demo-model.sh >/dev/null
cargo build --release --quiet --bin medbatch
exec cargo run --release --quiet --bin medbatch -- \
  run lab-report examples/lab-reports --out "${MEDBATCH_OUT:-out/demo}" --model demo "$@"
