"""Checks the Kubernetes manifests: renders infra/k8s/base with `kubectl kustomize`, then
validates every resource strictly (unknown fields refused): built-in kinds against the
Kubernetes API's schemas that kubernetes-validate ships (Kubernetes 1.32), KEDA's
ScaledObject and TriggerAuthentication with @kubernetes-models/keda's validators (the KEDA
CRDs' schemas, from the npm registry, run with node), and RabbitmqCluster against
infra/k8s/schemas/rabbitmqcluster-v1beta1.json (the fields used). Prints one JSON line: the
kinds checked, and the command-line flags the manifests pass to medbatch, by command.

    python infra/k8s/check.py KEDA_MODELS_DIR [KUSTOMIZATION_DIR]
"""
import json
import pathlib
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

root = pathlib.Path(__file__).resolve().parents[2]
keda_dir = sys.argv[1]
base = sys.argv[2] if len(sys.argv) > 2 else str(root / "infra/k8s/base")
rendered = subprocess.run(["kubectl", "kustomize", base], check=True, capture_output=True, text=True).stdout
docs = [d for d in yaml.safe_load_all(rendered) if d]
checked, keda, flags = [], [], {}
rabbit = json.loads((root / "infra/k8s/schemas/rabbitmqcluster-v1beta1.json").read_text())
for d in docs:
    kind, name = d["kind"], d["metadata"]["name"]
    if d["apiVersion"].startswith("keda.sh/"):
        keda.append(d)
    elif kind == "RabbitmqCluster":
        jsonschema.validate(d, rabbit)
    else:
        kubernetes_validate.validate(d, "1.32.0", strict=True)
    checked.append(f"{kind}/{name}")
    # The medbatch commands and flags each container runs.
    spec = d.get("spec", {})
    for pod in [spec.get("template", {}).get("spec"), spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")]:
        for c in (pod or {}).get("containers", []):
            args = c.get("args", [])
            words = " ".join(args).split()
            if words and words[0] == "exec":
                words = words[1:]
            if words and words[0] == "medbatch":
                words = words[1:]
            if words:
                flags.setdefault(words[0], set()).update(w for w in words if w.startswith("--"))
script = """
import { readFileSync } from 'node:fs';
import { ScaledObject, TriggerAuthentication } from '@kubernetes-models/keda/keda.sh/v1alpha1';
const kinds = { ScaledObject, TriggerAuthentication };
for (const d of JSON.parse(readFileSync(0, 'utf8'))) {
  const K = kinds[d.kind];
  if (!K) throw new Error('no validator for ' + d.kind);
  new K(d).validate();
}
"""
subprocess.run(["node", "--input-type=module", "-e", script], input=json.dumps(keda), text=True, check=True, cwd=keda_dir)
print(json.dumps({"checked": checked, "flags": {k: sorted(v) for k, v in flags.items()}}))
