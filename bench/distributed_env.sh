# Sourced by the distributed benchmarks (bench/distributed_overhead.sh, bench/load_test.sh),
# from the repository root: fetches or starts what they need — the demo model, the local
# RabbitMQ and S3-compatible server, with the variables that point at them (the caller sets
# MEDBATCH_AMQP_NAMESPACE first) — builds the binary, and sets `bin`, `python` and `s3_data`
# (the S3 server's folder of buckets).
bash infra/fetch-demo-model.sh >/dev/null
MEDBATCH_AMQP_URL="$(bash infra/rabbitmq.sh)"
export MEDBATCH_AMQP_URL
bash infra/s3-server.sh start >/dev/null
eval "$(bash infra/s3-server.sh env | sed 's/^/export /')"
cargo build --release --quiet --bin medbatch
bin="${CARGO_TARGET_DIR:-target}/release/medbatch"
python="$(bash infra/python-env.sh)"
s3_data="${MEDBATCH_CACHE:-$HOME/.cache/medbatch}/s3s/data"

# lab_reports DIR N: N lab reports the deterministic parsers read (copies of the HL7 and
# pipe-table examples under distinct names, report-000001.txt on), so a run's model is loaded
# but generates nothing and the times measure the framework.
lab_reports() {
  local i src
  mkdir -p "$1"
  for i in $(seq 1 "$2"); do
    if [ $((i % 2)) -eq 0 ]; then src=examples/lab-reports/hl7-oru.txt; else src=examples/lab-reports/liver-pipe-table.txt; fi
    cp "$src" "$1/report-$(printf %06d "$i").txt"
  done
}

# cpu_seconds_of FILE COMMAND...: runs the command (its output goes where the caller's
# redirections say) and writes the CPU seconds it used, user and system, into FILE.
cpu_seconds_of() {
  local into="$1"
  shift
  (
    "$@"
    status=$?
    # `times`' second line: the children's user and system time, as `XmY.YYYs` (run here,
    # not in a pipeline, whose subshell would have no children).
    times >"$into.times"
    awk 'NR == 2 { n = 0; for (i = 1; i <= 2; i++) { split($i, t, "m"); sub("s", "", t[2]); n += t[1] * 60 + t[2] } printf "%.2f\n", n }' "$into.times" >"$into"
    rm -f "$into.times"
    exit "$status"
  )
}
