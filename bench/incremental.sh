#!/usr/bin/env bash
# Nightly incremental runs at scale, with the demo model and cohort-facts-sections: night 1
# over NOTES small notes (one JSONL file each, of NOTES/4 patients, one in ten with facts to
# copy); then NEW notes arrive and CHANGED existing notes are corrected, and night 2 (with
# --incremental) must process exactly NEW + CHANGED inputs. Prints each night's planning
# time, jobs, skipped and superseded inputs, wall time, and checks the patient table of
# night 2: every current note counted once (NOTES + NEW notes in all, no document twice: a
# corrected note counts in its new content only).
#
#   bash bench/incremental.sh [NOTES] [NEW] [CHANGED] [WORKERS]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-10000}"
new="${2:-100}"
changed="${3:-10}"
workers="${4:-8}"
model="$(bash infra/fetch-demo-model.sh)"
py="$(bash infra/python-env.sh)"
cargo build --release --quiet --bin medbatch
bin="${CARGO_TARGET_DIR:-target}/release/medbatch"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir "$work/inbox"
# Notes: telephone and follow-up one-liners; every tenth carries a diagnosis, a medication
# or an LVEF to copy. Patient i%(n/4); dates spread over 2025.
"$py" - "$work/inbox" "$n" <<'PY'
import json, sys
inbox, n = sys.argv[1], int(sys.argv[2])
patients = max(1, n // 4)
facts = ["PMH: HTN, T2DM.", "Meds: metformin 500 mg BID.", "Echo: LVEF 35%.", "Social: former smoker.", "A/P: COPD."]
plain = ["Seen today, no changes.", "Called to confirm the appointment.", "Follow-up in 3 months.", "Refill sent to the pharmacy."]
for i in range(n):
    text = facts[i // 10 % len(facts)] if i % 10 == 0 else plain[i % len(plain)]
    rec = {"id": f"n{i:06d}", "patient_id": f"P{i % patients:05d}",
           "note_date": f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}", "text": text + "\n"}
    open(f"{inbox}/n{i:06d}.jsonl", "w").write(json.dumps(rec) + "\n")
PY
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
night() {
  local run="$1"
  local t0 t1
  t0=$(date +%s.%N)
  "$bin" run cohort-facts-sections "$work/inbox" --out "$work/out" --model "$model" --run-id "$run" \
    --workers "$workers" --incremental > "$work/$run.out" 2> "$work/$run.err"
  t1=$(date +%s.%N)
  local planned
  planned="$(grep -o 'planned in [0-9.]* s' "$work/$run.err" | head -1)"
  echo "$run: $(grep -o '[0-9]* input files, [0-9]* jobs' "$work/$run.err" | head -1); $planned; $(grep -o 'incremental: .*' "$work/$run.err" | head -1); wall $(echo "$t1 - $t0" | bc) s"
  grep -E '^  (documents|rows|patients|wall time)' "$work/$run.out" | sed 's/^/  /'
}
night night-1
# A day later: NEW notes arrive, CHANGED notes are corrected (their facts change).
"$py" - "$work/inbox" "$new" "$n" <<'PY'
import json, sys
inbox, k, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
patients = max(1, start // 4)
for i in range(start, start + k):
    rec = {"id": f"n{i:06d}", "patient_id": f"P{i % patients:05d}", "note_date": "2026-01-02", "text": "Seen today, no changes.\n"}
    open(f"{inbox}/n{i:06d}.jsonl", "w").write(json.dumps(rec) + "\n")
PY
for i in $(seq 0 $((changed - 1))); do
  f="$work/inbox/n$(printf %06d $((i * 10))).jsonl"
  "$py" -c 'import json,sys; p=sys.argv[1]; r=json.loads(open(p).read()); r["text"]="Echo: LVEF 25%. Corrected.\n"; open(p,"w").write(json.dumps(r)+"\n")' "$f"
done
night night-2
"$py" - "$work/out" "$n" "$new" "$changed" <<'PY'
import glob, json, sys
out, n, new, changed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = json.load(open(f"{out}/_runs/night-2/manifest.json"))
import pyarrow.parquet as pq
rows = [r for f in glob.glob(f"{out}/patient_facts/run_id=night-2/*.parquet") for r in pq.ParquetFile(f).read().to_pylist()]
docs = [d for r in rows for d in r["document_ids"]]
counted = sum(r["notes"] for r in rows)
print(f"night-2 manifest: {m['jobs']} jobs, {len(m.get('skipped', []))} skipped, {len(m.get('superseded', []))} superseded")
print(f"patient_facts (night-2): {len(rows)} patients, {counted} notes counted, {len(docs) - len(set(docs))} counted twice"
      f" (expected {n + new} notes, 0 twice)")
assert m["jobs"] == new + changed and len(m.get("skipped", [])) == n - changed and len(m.get("superseded", [])) == changed
assert counted == n + new and len(docs) == len(set(docs))
PY
