#!/usr/bin/env bash
# A load test within one machine: a distributed run of many small jobs (default 20,000, a job
# per file) with four `medbatch work` processes over the local RabbitMQ, output on the local
# S3-compatible server, and the chaos of tests/e2e_chaos.rs while it runs: a worker killed
# with SIGKILL (and replaced), the S3 server restarted, every broker connection closed, and
# `submit` killed and started again with the same run id. The documents are lab reports the
# deterministic parsers read, so the times measure the framework. Afterwards the output is
# checked for exactly-once (pyarrow, from the stored objects): the manifest lists every job
# once, every stored part is in the manifest with the digest of its bytes, no job's rows are
# in two parts, and the rows are those the documents give. Prints the rates: publishing
# (submit's own figure), jobs done per second between the first and the last job, and the
# commit (from the last job's end to the manifest).
#
#   bash bench/load_test.sh [JOBS]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20000}"
export MEDBATCH_AMQP_NAMESPACE="load-$$"
source bench/distributed_env.sh
bucket="load-$$"
run=load

work="$(mktemp -d)"
workers=()
cleanup() {
  for w in "${workers[@]}" "${submitter:-}"; do [ -n "$w" ] && kill "$w" 2>/dev/null || true; done
  rm -rf "$work"
  bash infra/s3-server.sh remove-bucket "$bucket"
}
trap cleanup EXIT
mkdir "$s3_data/$bucket"
lab_reports "$work/docs" "$n"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

start_worker() {
  "$bin" work --model demo --concurrency 2 2>>"$work/worker-$1.log" &
  workers+=($!)
}
for k in 1 2 3 4; do start_worker "$k"; done
for _ in $(seq 1 600); do [ "$(grep -l "worker for model" "$work"/worker-*.log 2>/dev/null | wc -l)" -eq 4 ] && break; sleep 0.1; done

start_submit() {
  "$bin" submit lab-report "$work/docs" --out "s3://$bucket/out" --model demo --run-id "$run" \
    --files-per-job 1 >"$work/submit.out" 2>>"$work/submit.err" &
  submitter=$!
}
done_jobs() { find "$s3_data/$bucket/out/_runs/$run/done" -type f 2>/dev/null | wc -l; }
wait_for() { while [ "$(done_jobs)" -lt "$1" ]; do sleep 0.5; done; }

t0=$(date +%s.%N)
start_submit
# The chaos, each once the run has got this far.
wait_for $((n / 5))
kill -9 "${workers[0]}"; echo "chaos: worker 1 killed at $(done_jobs) jobs" >&2; start_worker 5
wait_for $((n * 2 / 5))
bash infra/s3-server.sh restart >/dev/null; echo "chaos: S3 server restarted at $(done_jobs) jobs" >&2
wait_for $((n * 3 / 5))
rabbitmqctl close_all_connections "load test" >/dev/null; echo "chaos: broker connections closed at $(done_jobs) jobs" >&2
wait_for $((n * 4 / 5))
kill -9 "$submitter"; wait "$submitter" 2>/dev/null || true; echo "chaos: submit killed at $(done_jobs) jobs" >&2
start_submit
wait "$submitter"
t1=$(date +%s.%N)
for w in "${workers[@]}"; do kill -TERM "$w" 2>/dev/null || true; done
for w in "${workers[@]}"; do wait "$w" 2>/dev/null || true; done
workers=()

# The rows each kind of document gives, from an embedded run over the two originals.
"$bin" run lab-report examples/lab-reports/hl7-oru.txt examples/lab-reports/liver-pipe-table.txt \
  --out "$work/ref" --model demo --run-id ref >/dev/null 2>&1

"$python" - "$s3_data/$bucket/out" "$run" "$n" "$(echo "$t1 - $t0" | bc)" "$work/submit.err" "$work/ref" <<'EOF'
import collections, datetime, glob, hashlib, json, os, re, sys
import pyarrow.parquet as pq
out, run, n, wall, err, ref = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6]
per_file = collections.Counter()
for f in glob.glob(f"{ref}/lab_results/run_id=ref/*.parquet"):
    for u in pq.ParquetFile(f).read(columns=["source_uri"]).column("source_uri").to_pylist():
        per_file[os.path.basename(u)] += 1
want = (n // 2) * per_file["hl7-oru.txt"] + (n - n // 2) * per_file["liver-pipe-table.txt"]
m = json.load(open(f"{out}/_runs/{run}/manifest.json"))
keys = [p["key"] for p in m["parts"]]
assert m["jobs"] == n, (m["jobs"], n)
assert len(keys) == len(set(keys)), "a part listed twice"
stored = set()
for t in ["lab_results", "_errors", "_documents"]:
    stored |= {os.path.relpath(f, out) for f in glob.glob(f"{out}/{t}/run_id={run}/*.parquet")}
listed = {k for k in keys if not k.startswith("_inputs/")}
assert stored == listed, ("stored parts differ from the manifest's", len(stored), len(listed))
rows, parts_of_job = collections.Counter(), collections.Counter()
for p in m["parts"]:
    data = open(f"{out}/{p['key']}", "rb").read()
    assert hashlib.sha256(data).hexdigest() == p["sha256"].split(":")[-1], p["key"]
    if p["table"] == "_inputs":
        continue
    t = pq.ParquetFile(f"{out}/{p['key']}").read(columns=["job_id"])
    for j in set(t.column("job_id").to_pylist()):
        parts_of_job[(p["table"], j)] += 1
    rows[p["table"]] += t.num_rows
assert all(c == 1 for c in parts_of_job.values()), "a job's rows in two parts"
assert rows["lab_results"] == want, (rows["lab_results"], want)
# Each pair of documents (an HL7 report and a pipe table) gives the rows of one embedded pair.
done = [json.load(open(f)) for f in glob.glob(f"{out}/_runs/{run}/done/*.json")]
ends = sorted(datetime.datetime.fromisoformat(c["finished_at"].replace("Z", "+00:00")) for c in done)
starts = sorted(
    datetime.datetime.fromisoformat(c["finished_at"].replace("Z", "+00:00")) - datetime.timedelta(milliseconds=c["wall_ms"])
    for c in done
)
span = (ends[-1] - starts[0]).total_seconds()
created = datetime.datetime.fromisoformat(m["created_at"].replace("Z", "+00:00"))
published = [float(x) for x in re.findall(r"published in ([0-9.]+) s", open(err).read())]
first_publish = re.findall(r"\(([0-9]+) published in ([0-9.]+) s", open(err).read())[0]
print(json.dumps({
    "jobs": n, "wall_s": round(wall, 1), "rows": dict(rows), "parts": len(keys),
    "publish_jobs_per_s": round(int(first_publish[0]) / max(float(first_publish[1]), 1e-3)),
    "jobs_done_per_s": round(n / span, 1), "jobs_span_s": round(span, 1),
    "commit_s_after_last_job": round((created - ends[-1]).total_seconds(), 1),
    "submits": len(published), "exactly_once": True,
}))
EOF
