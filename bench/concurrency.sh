#!/usr/bin/env bash
# Aggregate generated tokens/s of the demo run at several engine concurrencies
# (`--max-sequences`): the lab-report pipeline over examples/lab-reports with the demo model.
# Prints one line per concurrency with tokens/s, wall time and peak memory from the summary,
# and the engine's line (steps, tokens per step, KV pages, prefix-cache hit rate,
# preemptions).
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/fetch-demo-model.sh >/dev/null
cargo build --release --quiet --bin medbatch
bin="${CARGO_TARGET_DIR:-target}/release/medbatch"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for n in ${CONCURRENCY:-1 4 16 64}; do
  out="$(mktemp -d)"
  summary="$("$bin" run lab-report examples/lab-reports --out "$out" --model demo --workers 4 --max-sequences "$n" 2>/dev/null)"
  rm -rf "$out"
  tokens="$(grep -o '([0-9.]* generated tokens/s)' <<<"$summary" | tr -d '()')"
  wall="$(grep -o 'wall time  [0-9.]* s' <<<"$summary" | awk '{print $3}')"
  mem="$(grep -o 'peak memory [0-9]* MiB' <<<"$summary" | awk '{print $3}')"
  rows="$(grep -o 'lab_results: [0-9]*' <<<"$summary" | awk '{print $2}')"
  engine="$(grep -o 'engine .*' <<<"$summary" | sed 's/^engine *//')"
  echo "max-sequences $n: $tokens, wall $wall s, rows $rows, peak memory $mem MiB"
  echo "  engine: $engine"
done
