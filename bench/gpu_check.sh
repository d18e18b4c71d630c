#!/usr/bin/env bash
# GPU checks, for a machine with NVIDIA GPUs, a CUDA toolkit, NCCL and a Rust toolchain (not
# run by CI: this repository's CI machines have no GPU). Everything it prints is also written
# to ${OUT:-/tmp}/gpu_check.log.
#
#   bash bench/gpu_check.sh            # from the repository root
#
# 1. builds medbatch with the `flash-attn` feature (candle-flash-attn's paged kernel; needs
#    CUTLASS headers: CUTLASS_DIR, or the `nvidia-cutlass` wheel in .whl/, since the build
#    cannot fetch them), falling back to `cuda` alone (attention then runs on the gathered
#    path) — and the CPU build, for reference logits. MEDBATCH_GPU_BIN skips the build and
#    uses a binary built elsewhere;
# 2. parity on every fixture (tests/fixtures/hf/models/*, tests/fixtures/hf/multimodal/*):
#    last-position logits on device 0 against the CPU build's f32 logits, in f32 (bound 1e-4)
#    and in bf16 (bound 12 × 2⁻⁸ × max |logit|, as engine/tests/weight_dtype.rs allows on the
#    CPU), then the same split over devices 0 and 1 (NCCL) when there are two;
# 3. the decode step of MedGemma 27B's text shape with random bf16 weights at batch 1, 16 and
#    64 with 2,048 tokens of context each, against the HBM floor (the bytes a step reads on
#    a rank — weights and the keys it attends to — over the card's bandwidth): on device 0,
#    then split over devices 0 and 1. A card too small for the 54 GB of weights keeps fewer
#    layers (--layers);
# 4. prefill tokens/s of the same shape at 8,192 tokens (one sequence);
# 5. SigLIP (MedSigLIP): the tiny fixture's image and text embeddings and logits on device 0
#    against the CPU build's (bound 1e-4), then images and texts per second of MedSigLIP-448's
#    shape with random f32 weights in batches of 1, 16 and 64.
#
# HBM_GBPS overrides the bandwidth looked up from the card's name.
set -euo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-/tmp}/gpu_check.log"
exec > >(tee "$LOG") 2>&1
nvidia-smi --query-gpu=index,name,memory.total --format=csv
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l || echo 0)

# CUTLASS for candle-flash-attn's build, offline: its builder looks for a checkout of the
# commit it pins under ~/.cudaforge and asks git for the checkout's commit; a checkout made
# from the headers answers with that commit.
setup_cutlass() {
  local dir="${CUTLASS_DIR:-}"
  if [ -z "$dir" ]; then
    local whl
    whl=$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -1 || true)
    [ -n "$whl" ] || return 1
    mkdir -p /tmp/cutlass-wheel && python3 -m zipfile -e "$whl" /tmp/cutlass-wheel >/dev/null
    dir=/tmp/cutlass-wheel/cutlass_library/source
  fi
  [ -d "$dir/include/cute" ] || return 1
  local commit
  commit=$(grep -o 'CUTLASS_COMMIT: &str = "[0-9a-f]*"' "$(cargo metadata --format-version 1 2>/dev/null \
    | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="candle-flash-attn"))' \
    | xargs dirname)/build.rs" | grep -o '[0-9a-f]\{40\}')
  local target="$HOME/.cudaforge/git/checkouts/cutlass-${commit:0:16}"
  mkdir -p "$target"
  cp -r "$dir/include" "$target/"
  mkdir -p "$target/tools/util" && cp -r "$dir/tools/util/include" "$target/tools/util/" 2>/dev/null || true
  mkdir -p /tmp/gitshim
  cat > /tmp/gitshim/git <<SHIM
#!/bin/sh
if [ "\$1" = rev-parse ] && [ "\$2" = HEAD ] && [ "\$(pwd)" = "$target" ]; then echo $commit; exit 0; fi
exec $(command -v git) "\$@"
SHIM
  chmod +x /tmp/gitshim/git
  export PATH="/tmp/gitshim:$PATH"
}

BIN="${MEDBATCH_GPU_BIN:-}"
if [ -z "$BIN" ]; then
  if setup_cutlass && cargo build --release --features flash-attn; then
    echo "built with flash-attn: bf16 attention runs candle-flash-attn's paged kernel"
  else
    echo "flash-attn did not build (no CUTLASS headers, or its kernels failed): building with cuda alone"
    cargo build --release --features cuda
  fi
  BIN=target/release/medbatch
fi
CPU_TARGET="${CARGO_TARGET_DIR:-$HOME/.cache/medbatch/target}"
CPU="$CPU_TARGET/release/medbatch"
[ -x "$CPU" ] || cargo build --release --target-dir "$CPU_TARGET"

echo "== parity on the fixtures (last-position logits against the CPU's f32)"
work=$(mktemp -d)
for fix in tests/fixtures/hf/models/* tests/fixtures/hf/multimodal/*; do
  [ -f "$fix/config.json" ] || continue
  dir="$work/$(basename "$fix")"
  mkdir -p "$dir" && cp "$fix"/* "$dir"/
  [ -f "$dir/tokenizer.json" ] || cp tests/fixtures/hf/tokenizer/* "$dir"/
  n=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["prompts"]))' "$fix/reference.json")
  for k in $(seq 0 $((n - 1))); do
    read -r tokens images < <(python3 - "$fix" "$k" <<'PY'
import json, sys
r = json.load(open(sys.argv[1] + "/reference.json"))
p = r["prompts"][int(sys.argv[2])]
print(",".join(map(str, p["input_ids"])), " ".join("--image tests/fixtures/hf/" + i for i in p.get("images", [])))
PY
)
    # shellcheck disable=SC2086
    "$CPU" debug logits --model "$dir" --tokens "$tokens" $images > /tmp/medbatch-cpu.json
    runs=("--devices 0 --dtype f32" "--devices 0 --dtype bf16")
    [ "$ngpu" -ge 2 ] && runs+=("--devices 0,1 --dtype f32" "--devices 0,1 --dtype bf16")
    for opts in "${runs[@]}"; do
      # shellcheck disable=SC2086
      if ! "$BIN" debug logits --model "$dir" --tokens "$tokens" $images $opts > /tmp/medbatch-gpu.json; then
        echo "$(basename "$fix") prompt $k $opts: FAILED to run"; continue
      fi
      python3 - "$(basename "$fix")" "$k" "$opts" <<'PY'
import json, sys
a = json.load(open("/tmp/medbatch-cpu.json"))["logits"]
b = json.load(open("/tmp/medbatch-gpu.json"))["logits"]
d = max(abs(x - y) for x, y in zip(a, b))
bound = 1e-4 if sys.argv[3].endswith("f32") else 12 * 2**-8 * max(abs(x) for x in a)
print(f"{sys.argv[1]} prompt {sys.argv[2]} {sys.argv[3]}: max |dlogit| vs CPU f32 = {d:.2e} (bound {bound:.2e})", "ok" if d <= bound else "TOO LARGE")
PY
    done
  done
done
rm -rf "$work"

name=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0)
mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0)
case "$name" in
  *H200*) bw=4800 ;;
  *H100*PCIe*) bw=2000 ;;
  *H100*) bw=3350 ;;
  *A100*80GB*PCIe*) bw=1935 ;;
  *A100*80GB*) bw=2039 ;;
  *A100*) bw=1555 ;;
  *L40S*) bw=864 ;;
  *) bw="" ;;
esac
bw=${HBM_GBPS:-$bw}
CFG=tests/fixtures/medgemma/medgemma-27b-text-it
# 27B in bf16: 2.8 GB of embedding + 0.83 GB per layer (of 62); keep 25 % of the card for the
# KV pool of 64 × 2,070 tokens and activations.
fit_layers() { # $1: ranks sharing the weights
  awk -v m="$mem_mib" -v r="$1" 'BEGIN { n = int((m * 1.048576e-3 * 0.75 * r - 2.8) / 0.83); if (n > 62) n = 62; print n }'
}
echo "== decode step, MedGemma 27B text shape, random bf16 weights, 2,048 tokens of context"
for devs in 0 0,1; do
  ranks=$(tr ',' '\n' <<< "$devs" | wc -l)
  [ "$ranks" -le "$ngpu" ] || continue
  layers=$(fit_layers "$ranks")
  "$BIN" bench --decode-step "$CFG" --devices "$devs" --dtype bf16 --batches 1,16,64 --context 2048 \
    --steps 16 --layers "$layers" ${bw:+--hbm-gbps "$bw"}
done

echo "== prefill, MedGemma 27B text shape, 8,192 tokens"
for devs in 0 0,1; do
  ranks=$(tr ',' '\n' <<< "$devs" | wc -l)
  [ "$ranks" -le "$ngpu" ] || continue
  "$BIN" bench --decode-step "$CFG" --devices "$devs" --dtype bf16 --batches 1 --context 8192 --steps 2 \
    --layers "$(fit_layers "$ranks")" | grep -o '"prefill_tok_s":[0-9.]*' | sed "s/^/devices $devs: /"
done

echo "== SigLIP (MedSigLIP): the tiny fixture's embeddings on device 0 against the CPU's, then speed"
fix=tests/fixtures/siglip/tiny
texts=(--text "a chest x-ray with a pleural effusion" --text "a pathology image of tumor tissue")
"$CPU" debug embed --model "$fix" --image "$fix/picture.png" "${texts[@]}" --json > /tmp/medbatch-siglip-cpu.json
if "$BIN" debug embed --model "$fix" --image "$fix/picture.png" "${texts[@]}" --devices 0 --json > /tmp/medbatch-siglip-gpu.json; then
  python3 - <<'PY'
import json
a = json.load(open("/tmp/medbatch-siglip-cpu.json"))
b = json.load(open("/tmp/medbatch-siglip-gpu.json"))
for k in ("image_embeds", "text_embeds", "logits_per_image"):
    d = max(abs(x - y) for ra, rb in zip(a[k], b[k]) for x, y in zip(ra, rb))
    print(f"siglip {k}: max |d| vs CPU = {d:.2e} (bound 1e-4)", "ok" if d <= 1e-4 else "TOO LARGE")
PY
else
  echo "siglip debug embed on device 0: FAILED to run"
fi
# MedSigLIP-448's shape, random f32 weights: images (448 px, through the bicubic resize) and
# texts (64 tokens) per second in batches.
"$BIN" bench siglip --devices 0 --runs 5 --batches 1,16,64
