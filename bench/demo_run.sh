#!/usr/bin/env bash
# Times the demo run: the lab-report pipeline over examples/lab-reports with the demo model.
# Prints medbatch's summary (documents, rows, tokens, documents/s, peak memory). Run on an
# otherwise idle machine; the output goes to a fresh temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/fetch-demo-model.sh >/dev/null
cargo build --release --quiet --bin medbatch
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo run --release --quiet --bin medbatch -- run lab-report examples/lab-reports --out "$out" --model demo "$@"
