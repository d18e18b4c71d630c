#!/usr/bin/env bash
# Makes the Python environment the tests use to read Parquet back independently (pyarrow),
# to validate rows against JSON schemas independently (jsonschema), and for the DICOM test
# files that ship inside pydicom's wheel (pydicom) and the NIfTI examples inside nibabel's
# (nibabel, installed without its dependencies: only its data files are used), cached outside
# the repository. Prints the interpreter's path on stdout.
set -euo pipefail

CACHE="${MEDBATCH_CACHE:-$HOME/.cache/medbatch}"
VENV="$CACHE/pyenv"
PYARROW_VERSION=22.0.0
JSONSCHEMA_VERSION=4.25.1
PYDICOM_VERSION=3.0.2
NIBABEL_VERSION=5.4.2

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
echo "$VENV/bin/python"
