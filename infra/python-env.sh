#!/usr/bin/env bash
# Makes the Python environment the tests use to read Parquet back independently (pyarrow),
# to validate rows against JSON schemas independently (jsonschema), and for the DICOM test
# files that ship inside pydicom's wheel (pydicom) and the NIfTI examples inside nibabel's
# (nibabel, installed without its dependencies: only its data files are used), and the
# whole-slide oracles (OpenSlide through openslide-python and openslide-bin, tifffile and
# imagecodecs to write test pyramids, with numpy), cached outside the repository. Prints the
# interpreter's path on stdout.
set -euo pipefail

CACHE="${MEDBATCH_CACHE:-$HOME/.cache/medbatch}"
VENV="$CACHE/pyenv"
PYARROW_VERSION=22.0.0
JSONSCHEMA_VERSION=4.25.1
PYDICOM_VERSION=3.0.2
NIBABEL_VERSION=5.4.2
# name==version of each whole-slide oracle package (wheels only).
WSI_PACKAGES="numpy==2.4.6 openslide-python==1.4.7 openslide-bin==4.0.1.2 tifffile==2026.3.3 imagecodecs==2026.3.6"

if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV" >&2
fi
if ! "$VENV/bin/python" -c "import pyarrow, sys; sys.exit(pyarrow.__version__ != '$PYARROW_VERSION')" 2>/dev/null; then
  echo "installing pyarrow==$PYARROW_VERSION into $VENV..." >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "pyarrow==$PYARROW_VERSION" >&2
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('jsonschema') != '$JSONSCHEMA_VERSION')" 2>/dev/null; then
  echo "installing jsonschema==$JSONSCHEMA_VERSION into $VENV..." >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "jsonschema==$JSONSCHEMA_VERSION" >&2
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('pydicom') != '$PYDICOM_VERSION')" 2>/dev/null; then
  echo "installing pydicom==$PYDICOM_VERSION into $VENV..." >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "pydicom==$PYDICOM_VERSION" >&2
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('nibabel') != '$NIBABEL_VERSION')" 2>/dev/null; then
  echo "installing nibabel==$NIBABEL_VERSION into $VENV..." >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "nibabel==$NIBABEL_VERSION" >&2
fi
for spec in $WSI_PACKAGES; do
  if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('${spec%%==*}') != '${spec#*==}')" 2>/dev/null; then
    echo "installing $WSI_PACKAGES into $VENV..." >&2
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary :all: $WSI_PACKAGES >&2
    break
  fi
done
echo "$VENV/bin/python"
