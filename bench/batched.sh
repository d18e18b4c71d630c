#!/usr/bin/env bash
# Aggregate decode throughput with N sequences served together: medbatch's scheduler against
# llama.cpp with N parallel sequences in one context (../shared/bench/llamacpp_batched.py),
# one after the other on the same machine, then a table of the ratios.
#   bash bench/batched.sh [N,N,...]       (default 1,4,16,64; 64-token prompts, 64 new tokens)
# Needs llama-cpp-python 0.3.36 in ~/.cache/medbatch/refvenv (tests/fixtures/llamacpp/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PAR="${1:-1,4,16,64}"
GGUF="$(bash infra/fetch-demo-model.sh)"
PY="${REF_PYTHON:-$HOME/.cache/medbatch/refvenv/bin/python}"
cargo build --release --quiet --bin medbatch
bin="${CARGO_TARGET_DIR:-target}/release/medbatch"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
ours="$("$bin" bench --model "$GGUF" --parallel "$PAR" --prompt-tokens 64 --gen-tokens 64 --runs 3 2>/dev/null | grep '^{')"
theirs="$("$PY" ../shared/bench/llamacpp_batched.py "$GGUF" --parallel "$PAR" --prompt 64 --gen 64 --threads 2 --runs 2 2>/dev/null | grep '^{')"
python3 - "$ours" "$theirs" <<'PY'
import json, sys
ours = {r["parallel"]: r for r in map(json.loads, sys.argv[1].splitlines())}
theirs = {r["parallel"]: r for r in map(json.loads, sys.argv[2].splitlines())}
print("| N | llama.cpp prefill tok/s | medbatch prefill tok/s | llama.cpp decode tok/s | medbatch decode tok/s | medbatch / llama.cpp (decode) |")
print("|---|---|---|---|---|---|")
for n in sorted(ours):
    o, t = ours[n], theirs.get(n, {})
    ratio = o["decode_tok_s_aggregate"] / t["decode_tok_s_aggregate"] if t else float("nan")
    print(f"| {n} | {t.get('prefill_tok_s', '-')} | {o['prefill_tok_s']} | {t.get('decode_tok_s_aggregate', '-')} | {o['decode_tok_s_aggregate']} | {ratio:.2f} |")
PY
