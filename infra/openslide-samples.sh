#!/usr/bin/env bash
# OpenSlide's small sample slides (boxes.tiff, small.svs, boxes_0.dcm, boxes_1.dcm and two
# broken ones), the test fixtures inside openslide-python's source package. They are
# LGPL-2.1: fetched here through pip into the cache, never committed. Prints the folder.
set -euo pipefail

CACHE="${MEDBATCH_CACHE:-$HOME/.cache/medbatch}"
VERSION=1.4.3
DIR="$CACHE/openslide-samples-$VERSION"
PYTHON="${MEDBATCH_PYTHON:-$(bash "$(dirname "$0")/python-env.sh")}"

if [ ! -f "$DIR/fixtures/small.svs" ]; then
  echo "fetching openslide-python $VERSION's sample slides..." >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    "openslide-python==$VERSION" -d "$tmp" >&2
  tar -xzf "$tmp/openslide_python-$VERSION.tar.gz" -C "$tmp"
  mkdir -p "$DIR"
  rm -rf "$DIR/fixtures"
  cp -r "$tmp/openslide_python-$VERSION/tests/fixtures" "$DIR/fixtures"
  cp "$tmp/openslide_python-$VERSION/COPYING.LESSER" "$DIR/" 2>/dev/null || true
fi
echo "$DIR/fixtures"
