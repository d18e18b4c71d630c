#!/usr/bin/env bash
# GPU checks, for a machine with NVIDIA GPUs, a CUDA toolkit and NCCL (not run by CI: this
# repository's CI machines have no GPU). Everything it prints is also written to
# ${OUT:-/tmp}/gpu_check.log.
#
#   bash bench/gpu_check.sh            # from the repository root
#
# 1. builds medbatch with the `cuda` feature (and the CPU build, for reference logits);
# 2. parity: the multimodal fixture (tests/fixtures/hf/multimodal/mm_window) on device 0 as
#    one rank in f32 against the CPU build's last-position logits of both reference prompts
#    (max |Δlogit|, should be ~1e-5, bound 1e-4), then in bf16 (bound 12 × 2⁻⁸ × max |logit|,
#    as engine/tests/weight_dtype.rs allows on the CPU);
# 3. with two or more GPUs, the same split over devices 0 and 1 (NCCL);
# 4. decode step time of MedGemma 27B's text decoder shape with random bf16 weights at batch
#    1, 16 and 64 (context 256) against the HBM floor, the bytes a step reads on a rank
#    (weights + KV cache) over the card's bandwidth: on device 0, then split over devices 0
#    and 1. A card too small for the 54 GB of weights keeps fewer layers (--layers).
#
# HBM_GBPS overrides the bandwidth looked up from the card's name.
set -euo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-/tmp}/gpu_check.log"
exec > >(tee "$LOG") 2>&1
nvidia-smi --query-gpu=index,name,memory.total --format=csv
cargo build --release --features cuda
BIN=target/release/medbatch
CPU_TARGET="${CARGO_TARGET_DIR:-$HOME/.cache/medbatch/target}"
CPU="$CPU_TARGET/release/medbatch"
[ -x "$CPU" ] || cargo build --release --target-dir "$CPU_TARGET"
FIX=tests/fixtures/hf/multimodal/mm_window
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l || echo 0)

echo "== parity on the multimodal fixture"
for k in 0 1; do
  read -r tokens images < <(python3 - "$FIX" "$k" <<'PY'
import json, sys
r = json.load(open(sys.argv[1] + "/reference.json"))
p = r["prompts"][int(sys.argv[2])]
print(",".join(map(str, p["input_ids"])), " ".join("--image tests/fixtures/hf/" + i for i in p["images"]))
PY
)
  # shellcheck disable=SC2086
  "$CPU" debug logits --model "$FIX" --tokens "$tokens" $images > /tmp/medbatch-cpu.json
  runs=("--devices 0 --dtype f32" "--devices 0 --dtype bf16")
  [ "$ngpu" -ge 2 ] && runs+=("--devices 0,1 --dtype f32" "--devices 0,1 --dtype bf16")
  for opts in "${runs[@]}"; do
    # shellcheck disable=SC2086
    "$BIN" debug logits --model "$FIX" --tokens "$tokens" $images $opts > /tmp/medbatch-gpu.json
    python3 - "$k" "$opts" <<'PY'
import json, sys
a = json.load(open("/tmp/medbatch-cpu.json"))["logits"]
b = json.load(open("/tmp/medbatch-gpu.json"))["logits"]
d = max(abs(x - y) for x, y in zip(a, b))
bound = 1e-4 if sys.argv[2].endswith("f32") else 12 * 2**-8 * max(abs(x) for x in a)
print(f"prompt {sys.argv[1]} {sys.argv[2]}: max |dlogit| vs CPU f32 = {d:.2e} (bound {bound:.2e})", "ok" if d <= bound else "TOO LARGE")
PY
  done
done

echo "== decode step, MedGemma 27B text shape, random bf16 weights"
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
# 27B in bf16: 2.8 GB of embedding + 0.83 GB per layer (of 62); keep 15 % of the card for
# the KV cache of 64 × 276 tokens and activations.
fit_layers() { # $1: ranks sharing the weights
  awk -v m="$mem_mib" -v r="$1" 'BEGIN { n = int((m * 1.048576e-3 * 0.85 * r - 2.8) / 0.83); if (n > 62) n = 62; print n }'
}
for devs in 0 0,1; do
  ranks=$(tr ',' '\n' <<< "$devs" | wc -l)
  [ "$ranks" -le "$ngpu" ] || continue
  layers=$(fit_layers "$ranks")
  "$BIN" bench --decode-step "$CFG" --devices "$devs" --dtype bf16 --batches 1,16,64 --context 256 \
    --steps 16 --layers "$layers" ${bw:+--hbm-gbps "$bw"}
done
