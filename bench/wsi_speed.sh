#!/usr/bin/env bash
# Whole-slide reading speed, medbatch beside OpenSlide on the same slide in one run: the
# header, 400 level-0 tiles, tissue patch selection (Google's recipe: mask at 1.25x, 896-px
# patches at 10x, up to 125) and reading the patches; bytes and requests against the slide's
# size; peak memory. Then medbatch again on the same slide served by the local S3 server
# (s3s-fs, uploaded with a PUT so that the server keeps its ETag instead of hashing the
# file on every request), every read a ranged GET.
#
#   bash bench/wsi_speed.sh [SLIDE]
#
# Without SLIDE, a synthetic 60,000 x 45,000 JPEG pyramid (about 1.2 GB) is written once
# into the cache by bench/make_slide.py (about 15 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${MEDBATCH_CACHE:-$HOME/.cache/medbatch}"
PY="$(bash infra/python-env.sh)"
SLIDE="${1:-$CACHE/bench/synthetic-60000x45000.tiff}"
if [ ! -f "$SLIDE" ]; then
  mkdir -p "$(dirname "$SLIDE")"
  echo "writing $SLIDE..." >&2
  "$PY" bench/make_slide.py "$SLIDE.partial" --width 60000 --height 45000 >&2
  mv "$SLIDE.partial" "$SLIDE"
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
cargo build --release --quiet --bin medbatch
BIN="$CARGO_TARGET_DIR/release/medbatch"

echo "== medbatch, local file"
"$BIN" bench wsi "$SLIDE"
echo "== OpenSlide, local file"
"$PY" bench/openslide_speed.py "$SLIDE"

echo "== medbatch, from the local S3 server"
bash infra/s3-server.sh start >/dev/null
eval "$(bash infra/s3-server.sh env | sed 's/^/export /')"
"$PY" -c "import boto3" 2>/dev/null || "$PY" -m pip install --quiet --disable-pip-version-check "boto3==1.42.6" >&2
KEY="$(basename "$SLIDE")"
"$PY" - "$SLIDE" "$KEY" <<'PY'
import os, sys, boto3
from boto3.s3.transfer import TransferConfig
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
try:
    s3.create_bucket(Bucket="medbatch-bench")
except s3.exceptions.ClientError:
    pass
size = os.path.getsize(sys.argv[1])
try:
    if s3.head_object(Bucket="medbatch-bench", Key=sys.argv[2])["ContentLength"] == size:
        sys.exit(0)
except s3.exceptions.ClientError:
    pass
s3.upload_file(sys.argv[1], "medbatch-bench", sys.argv[2], Config=TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20))
PY
"$BIN" bench wsi "s3://medbatch-bench/$KEY"
