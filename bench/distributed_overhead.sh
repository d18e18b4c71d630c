#!/usr/bin/env bash
# Overhead of the distributed path: the same 1,000 documents through the embedded run
# (in-process queue, local output) and through RabbitMQ + S3 (`medbatch submit` with one
# `medbatch work` process, output on the local S3-compatible server), same model and
# pipeline. The documents are lab reports the deterministic parsers read (copies of the HL7
# and pipe-table examples under distinct names), so the model is loaded but generates nothing and the wall times
# measure the framework: planning, publishing, delivery, reading, Parquet, storage, markers.
#
#   bash bench/distributed_overhead.sh [DOCUMENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1000}"
bash infra/fetch-demo-model.sh >/dev/null
export MEDBATCH_AMQP_URL="$(bash infra/rabbitmq.sh)"
bash infra/s3-server.sh start >/dev/null
eval "$(bash infra/s3-server.sh env | sed 's/^/export /')"
export MEDBATCH_AMQP_NAMESPACE="overhead-$$"
cargo build --release --quiet --bin medbatch
bin="${CARGO_TARGET_DIR:-target}/release/medbatch"

work="$(mktemp -d)"
trap 'kill "${worker:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir "$work/docs"
for i in $(seq 1 "$n"); do
  if [ $((i % 2)) -eq 0 ]; then src=examples/lab-reports/hl7-oru.txt; else src=examples/lab-reports/liver-pipe-table.txt; fi
  cp "$src" "$work/docs/report-$(printf %05d "$i").txt"
done
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

t0=$(date +%s.%N)
"$bin" run lab-report "$work/docs" --out "$work/local" --model demo --run-id overhead --workers 2 >"$work/embedded.txt" 2>/dev/null
t1=$(date +%s.%N)
embedded=$(echo "$t1 - $t0" | bc)

bucket="overhead-$$"
mkdir -p "${MEDBATCH_CACHE:-$HOME/.cache/medbatch}/s3s/data/$bucket"
"$bin" work --model demo --concurrency 2 2>"$work/worker.log" &
worker=$!
# Timing starts once the worker has loaded its model and listens.
for _ in $(seq 1 300); do grep -q "worker for model" "$work/worker.log" && break; sleep 0.1; done
t0=$(date +%s.%N)
"$bin" submit lab-report "$work/docs" --out "s3://$bucket/run" --model demo --run-id overhead >"$work/submit.txt" 2>"$work/submit.log"
t1=$(date +%s.%N)
distributed=$(echo "$t1 - $t0" | bc)
kill -TERM "$worker"; wait "$worker" || true

rows_local=$(grep -o 'lab_results: [0-9]*' "$work/embedded.txt" | grep -o '[0-9]*$')
rows_dist=$(grep -o 'rows  *[0-9]*' "$work/submit.txt" | grep -o '[0-9]*$')
rm -rf "${MEDBATCH_CACHE:-$HOME/.cache/medbatch}/s3s/data/$bucket"
printf '{"documents": %d, "embedded_s": %.1f, "distributed_s": %.1f, "rows_embedded": %s, "rows_distributed": %s}\n' \
  "$n" "$embedded" "$distributed" "$rows_local" "$rows_dist"
