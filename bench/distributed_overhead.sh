#!/usr/bin/env bash
# Overhead of the distributed path: the same documents through the embedded run (in-process
# queue, local output) and through RabbitMQ + S3 (`medbatch submit` with one `medbatch work`
# process, output on the local S3-compatible server), same model and pipeline. The documents
# are lab reports the deterministic parsers read (copies of the HL7 and pipe-table examples
# under distinct names), so the model is loaded but generates nothing and the wall times
# measure the framework: planning, publishing, delivery, reading, Parquet, storage, markers.
#
# Each path runs with a job per file (`--files-per-job 1`: the per-job overhead) and with
# small files grouped into jobs (the default), ROUNDS times each, embedded and distributed
# alternating (this machine is shared and noisy: the medians are reported, with every time).
# The embedded time includes starting the process and loading the model (also measured on
# its own: an embedded run of one document); the distributed one starts once the worker has
# loaded it. The worker's own metrics (scraped from --metrics-addr at the end) break a
# job's time down by S3 operation, and the CPU time of each process (worker, submit, the
# local S3 server, RabbitMQ) shows where the machine's two cores went.
#
#   bash bench/distributed_overhead.sh [DOCUMENTS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1000}"
rounds="${2:-3}"
export MEDBATCH_AMQP_NAMESPACE="overhead-$$"
source bench/distributed_env.sh
s3_pid="$(cat "${MEDBATCH_CACHE:-$HOME/.cache/medbatch}/s3s/s3s-fs-${MEDBATCH_S3_PORT:-9123}.pid")"
broker_pid="$(pgrep -o -x beam.smp || true)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
lab_reports "$work/docs" "$n"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

# CPU seconds (user + system) a process has used so far; 0 when there is none.
cpu() { [ -n "$1" ] && [ -r "/proc/$1/stat" ] && awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$1/stat" || echo 0; }

# embedded FILES_PER_JOB ROUND: one JSON object (wall time, rows, CPU time)
embedded() {
  local out="$work/local-$1-$2" t0 t1
  t0=$(date +%s.%N)
  cpu_seconds_of "$work/embedded-cpu" "$bin" run lab-report "$work/docs" --out "$out" --model demo \
    --run-id "overhead-$1" --workers 2 --files-per-job "$1" >"$work/embedded.txt" 2>/dev/null
  t1=$(date +%s.%N)
  rm -rf "$out"
  printf '{"wall_s": %.2f, "rows": %s, "cpu_s": %.2f}\n' "$(echo "$t1 - $t0" | bc)" \
    "$(grep -o 'lab_results: [0-9]*' "$work/embedded.txt" | grep -o '[0-9]*$')" \
    "$(cat "$work/embedded-cpu")"
}

# seconds of an embedded run over one document: the process and model's fixed cost
fixed() {
  local out="$work/fixed" t0 t1
  t0=$(date +%s.%N)
  "$bin" run lab-report "$work/docs/report-000001.txt" --out "$out" --model demo --run-id fixed >/dev/null 2>&1
  t1=$(date +%s.%N)
  rm -rf "$out"
  echo "$t1 - $t0" | bc
}

# distributed FILES_PER_JOB ROUND: one JSON object (wall time, jobs, rows, the worker's S3
# requests, each process's CPU time)
distributed() {
  local bucket="overhead-$$-$1-$2" t0 t1 addr s3_0 broker_0 worker_0
  mkdir -p "$s3_data/$bucket"
  "$bin" work --model demo --concurrency 2 --metrics-addr 127.0.0.1:0 2>"$work/worker.log" &
  worker=$!
  # This function runs in a subshell of its own (`$(distributed N R)`): its worker is stopped
  # here, whichever way it ends.
  trap 'kill "$worker" 2>/dev/null || true' EXIT
  # Timing starts once the worker has loaded its model and listens.
  for _ in $(seq 1 300); do grep -q "worker for model" "$work/worker.log" && break; sleep 0.1; done
  addr=$(grep -o 'metrics on http://[^/]*' "$work/worker.log" | sed 's|metrics on http://||')
  s3_0=$(cpu "$s3_pid"); broker_0=$(cpu "$broker_pid"); worker_0=$(cpu "$worker")
  t0=$(date +%s.%N)
  cpu_seconds_of "$work/submit-cpu" "$bin" submit lab-report "$work/docs" --out "s3://$bucket/run" \
    --model demo --run-id "overhead-$1" --files-per-job "$1" >"$work/submit.txt" 2>"$work/submit.log"
  t1=$(date +%s.%N)
  local cpus
  cpus="$(echo "$(cpu "$worker") - $worker_0" | bc) $(cat "$work/submit-cpu") $(echo "$(cpu "$s3_pid") - $s3_0" | bc) $(echo "$(cpu "$broker_pid") - $broker_0" | bc)"
  "$python" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())' \
    "http://$addr/metrics" >"$work/metrics.txt"
  kill -TERM "$worker"; wait "$worker" || true
  bash infra/s3-server.sh remove-bucket "$bucket"
  "$python" - "$work/metrics.txt" "$(echo "$t1 - $t0" | bc)" "$(grep -o 'rows  *[0-9]*' "$work/submit.txt" | grep -o '[0-9]*$')" $cpus <<'EOF'
import json, re, sys
text, wall, rows = open(sys.argv[1]).read(), float(sys.argv[2]), int(sys.argv[3])
worker, submit, s3, broker = (float(x) for x in sys.argv[4:8])
def value(name, labels=""):
    m = re.search(r"^%s%s (\S+)$" % (re.escape(name), re.escape(labels)), text, re.M)
    return float(m.group(1)) if m else 0.0
jobs = value("medbatch_jobs_done_total", '{pipeline="lab-report"}')
ops = {}
for op in ["head", "put", "get", "list", "delete"]:
    count = value("medbatch_s3_request_seconds_count", '{op="%s"}' % op)
    if count:
        ops[op] = {"requests_per_job": round(count / jobs, 2), "ms_each": round(1000 * value("medbatch_s3_request_seconds_sum", '{op="%s"}' % op) / count, 1)}
print(json.dumps({"wall_s": round(wall, 2), "jobs": int(jobs), "rows": rows, "ms_per_job": round(1000 * wall / jobs, 1),
                  "worker_s3": ops,
                  "cpu_s": {"worker": round(worker, 2), "submit": round(submit, 2), "s3_server": round(s3, 2), "rabbitmq": round(broker, 2)}}))
EOF
}

for files in 1 16; do
  for round in $(seq 1 "$rounds"); do
    echo "files per job $files, round $round" >&2
    echo "{\"files_per_job\": $files, \"embedded_one_document_s\": $(fixed), \"embedded\": $(embedded "$files" "$round"), \"distributed\": $(distributed "$files" "$round")}"
  done
done >"$work/rounds.jsonl"

"$python" - "$work/rounds.jsonl" "$n" <<'EOF'
# The medians, then every round on a line of its own.
import json, statistics, sys
rounds = [json.loads(line) for line in open(sys.argv[1])]
out = {"documents": int(sys.argv[2]), "rounds": len(rounds) // 2}
for files, name in [(1, "a job per file"), (16, "grouped (16 files per job)")]:
    rs = [r for r in rounds if r["files_per_job"] == files]
    emb = statistics.median(r["embedded"]["wall_s"] for r in rs)
    dist = statistics.median(r["distributed"]["wall_s"] for r in rs)
    one = statistics.median(r["embedded_one_document_s"] for r in rs)
    jobs = rs[0]["distributed"]["jobs"]
    # Per document: the embedded run without its fixed cost (process and model), against
    # the distributed run, whose worker had loaded its model before the clock started.
    docs = out["documents"]
    out[name] = {"embedded_s": emb, "distributed_s": dist, "ratio": round(dist / emb, 2),
                 "embedded_one_document_s": round(one, 2),
                 "ms_per_document": {"embedded_without_fixed_cost": round(1000 * (emb - one) / docs, 2),
                                     "distributed": round(1000 * dist / docs, 2)},
                 "jobs": jobs,
                 "rows": sorted({r["embedded"]["rows"] for r in rs} | {r["distributed"]["rows"] for r in rs})}
print(json.dumps(out, indent=1))
for r in rounds:
    print(json.dumps(r))
EOF
