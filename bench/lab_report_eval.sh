#!/usr/bin/env bash
# The lab-report evaluation with the demo model: the demo run (examples/lab-reports) and both
# splits of the gold set (dev: tuned on; test: held out), each run through `medbatch run` and
# scored by `medbatch eval`, printing item precision / recall / F1, the exact-match rate and
# the run's documents/s.
#
# To compare with an earlier build side by side (this machine is shared and noisy), set
# BEFORE to that build's medbatch binary and BEFORE_PIPELINES to its pipelines/ folder
# (e.g. `git worktree add /tmp/old COMMIT`, build there, BEFORE=/tmp/old/target/release/medbatch
# BEFORE_PIPELINES=/tmp/old/pipelines): each run is then made by both, one after the other,
# and both are scored with this build's `medbatch eval` on this build's gold sets.
set -euo pipefail
cd "$(dirname "$0")/.."
model="$(bash infra/fetch-demo-model.sh)"
cargo build --release --quiet --bin medbatch
after="${CARGO_TARGET_DIR:-target}/release/medbatch"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

builds=("after|$after|lab-report")
if [ -n "${BEFORE:-}" ]; then
  builds=("before|$BEFORE|${BEFORE_PIPELINES:?set BEFORE_PIPELINES with BEFORE}/lab-report" "${builds[@]}")
fi

printf '%-7s %-5s %9s %7s %6s %6s %11s %12s\n' build input precision recall F1 exact rows docs/s
for input in demo dev test; do
  for b in "${builds[@]}"; do
    IFS='|' read -r name bin pipeline <<<"$b"
    case "$input" in
      demo) src=examples/lab-reports ;;
      *) src="pipelines/lab-report/eval/$input/reports" ;;
    esac
    out="$work/$name-$input"
    summary="$("$bin" run "$pipeline" "$src" --out "$out" --model "$model" --run-id eval 2>&1)"
    rate="$(sed -n 's/.*(\([0-9.]*\) documents\/s).*/\1/p' <<<"$summary")"
    rows="$(sed -n 's/^ *rows *lab_results: \([0-9]*\).*/\1/p' <<<"$summary")"
    if [ "$input" = demo ]; then
      printf '%-7s %-5s %9s %7s %6s %6s %11s %12s\n' "$name" "$input" - - - - "$rows" "$rate"
      continue
    fi
    "$after" eval lab-report --gold "$input" --pred "$out" --run-id eval --json >"$out.json"
    python3 - "$out.json" "$name" "$input" "$rows" "$rate" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
name, split, rows, rate = sys.argv[2:]
print(f"{name:<7} {split:<5} {r['item_precision']:9.3f} {r['item_recall']:7.3f} {r['item_f1']:6.3f} "
      f"{r['exact_match_rate']:6.3f} {rows:>11} {rate:>12}")
EOF
  done
done
