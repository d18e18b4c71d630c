#!/usr/bin/env bash
# Makes the Python environment the tests use to read Parquet back independently (pyarrow),
# cached outside the repository. Prints the interpreter's path on stdout.
set -euo pipefail

CACHE="${MEDBATCH_CACHE:-$HOME/.cache/medbatch}"
VENV="$CACHE/pyenv"
PYARROW_VERSION=22.0.0

if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV" >&2
fi
if ! "$VENV/bin/python" -c "import pyarrow, sys; sys.exit(pyarrow.__version__ != '$PYARROW_VERSION')" 2>/dev/null; then
  echo "installing pyarrow==$PYARROW_VERSION into $VENV..." >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "pyarrow==$PYARROW_VERSION" >&2
fi
echo "$VENV/bin/python"
