#!/usr/bin/env bash
# Overhead of the distributed path: the same documents through the embedded run (in-process
# queue, local output) and through RabbitMQ + S3 (`medbatch submit` with one `medbatch work`
# process, output on the local S3-compatible server), same model and pipeline. The documents
# are lab reports the deterministic parsers read (copies of the HL7 and pipe-table examples
# under distinct names), so the model is loaded but generates nothing and the wall times
# measure the framework: planning, publishing, delivery, reading, Parquet, storage, markers.
#
# Each path runs twice: with a job per file (`--files-per-job 1`: the per-job overhead) and
# with small files grouped into jobs (the default). The worker's own metrics (scraped from
# --metrics-addr at the end) break a job's time down: S3 requests by operation, and the rest.
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
python="$(bash infra/python-env.sh)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir "$work/docs"
for i in $(seq 1 "$n"); do
  if [ $((i % 2)) -eq 0 ]; then src=examples/lab-reports/hl7-oru.txt; else src=examples/lab-reports/liver-pipe-table.txt; fi
  cp "$src" "$work/docs/report-$(printf %05d "$i").txt"
done
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

# embedded FILES_PER_JOB: seconds, then rows
embedded() {
  local t0 t1
  t0=$(date +%s.%N)
  "$bin" run lab-report "$work/docs" --out "$work/local-$1" --model demo --run-id "overhead-$1" --workers 2 \
    --files-per-job "$1" >"$work/embedded-$1.txt" 2>/dev/null
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc
  grep -o 'lab_results: [0-9]*' "$work/embedded-$1.txt" | grep -o '[0-9]*$'
}

# distributed FILES_PER_JOB: one JSON object (wall time, jobs, rows, the worker's breakdown)
distributed() {
  local bucket="overhead-$$-$1" t0 t1
  mkdir -p "${MEDBATCH_CACHE:-$HOME/.cache/medbatch}/s3s/data/$bucket"
  "$bin" work --model demo --concurrency 2 --metrics-addr 127.0.0.1:0 2>"$work/worker-$1.log" &
  worker=$!
  # This function runs in a subshell of its own (`$(distributed N)`): its worker is stopped
  # here, whichever way it ends.
  trap 'kill "$worker" 2>/dev/null || true' EXIT
  # Timing starts once the worker has loaded its model and listens.
  for _ in $(seq 1 300); do grep -q "worker for model" "$work/worker-$1.log" && break; sleep 0.1; done
  local addr
  addr=$(grep -o 'metrics on http://[^/]*' "$work/worker-$1.log" | sed 's|metrics on http://||')
  t0=$(date +%s.%N)
  "$bin" submit lab-report "$work/docs" --out "s3://$bucket/run" --model demo --run-id "overhead-$1" \
    --files-per-job "$1" >"$work/submit-$1.txt" 2>"$work/submit-$1.log"
  t1=$(date +%s.%N)
  "$python" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())' \
    "http://$addr/metrics" >"$work/metrics-$1.txt"
  kill -TERM "$worker"; wait "$worker" || true
  bash infra/s3-server.sh remove-bucket "$bucket"
  "$python" - "$work/metrics-$1.txt" "$(echo "$t1 - $t0" | bc)" "$(grep -o 'rows  *[0-9]*' "$work/submit-$1.txt" | grep -o '[0-9]*$')" <<'EOF'
import json, re, sys
text, wall, rows = open(sys.argv[1]).read(), float(sys.argv[2]), int(sys.argv[3])
def value(name, labels=""):
    m = re.search(r"^%s%s (\S+)$" % (re.escape(name), re.escape(labels)), text, re.M)
    return float(m.group(1)) if m else 0.0
jobs = value("medbatch_jobs_done_total", '{pipeline="lab-report"}')
s3 = {}
for op in ["head", "put", "get", "list", "delete"]:
    n = value("medbatch_s3_request_seconds_count", '{op="%s"}' % op)
    if n:
        s3[op] = {"requests_per_job": round(n / jobs, 2), "ms_each": round(1000 * value("medbatch_s3_request_seconds_sum", '{op="%s"}' % op) / n, 1)}
s3_ms = sum(v["requests_per_job"] * v["ms_each"] for v in s3.values())
print(json.dumps({"wall_s": round(wall, 1), "jobs": int(jobs), "rows": rows,
                  "ms_per_job": round(1000 * wall / jobs, 1), "s3_ms_per_job": round(s3_ms, 1), "s3": s3}))
EOF
}

mapfile -t e1 < <(embedded 1)
mapfile -t eg < <(embedded 16)
d1=$(distributed 1)
dg=$(distributed 16)
printf '{"documents": %d, "a job per file": {"embedded_s": %.1f, "rows": %s, "distributed": %s}, "grouped (16 files per job)": {"embedded_s": %.1f, "rows": %s, "distributed": %s}}\n' \
  "$n" "${e1[0]}" "${e1[1]}" "$d1" "${eg[0]}" "${eg[1]}" "$dg"
