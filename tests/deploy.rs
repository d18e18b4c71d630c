//! The deployment files. The Dockerfiles (infra/docker) pass hadolint; no container engine
//! runs on the test machines, so the images are linted, not built. The Kubernetes base
//! (infra/k8s/base) renders with `kubectl kustomize` and every resource validates strictly
//! (infra/k8s/check.py: the API's schemas, KEDA's validators, the RabbitmqCluster fields); a
//! resource with a misspelt or mistyped field fails the check; and every flag the manifests
//! pass to medbatch is one of the command's.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// The Python tools' folder and the npm package's (infra/ops-tools.sh).
fn tools() -> (String, String) {
    let o = Command::new("bash").arg(repo_root().join("infra/ops-tools.sh")).output().unwrap();
    assert!(o.status.success(), "infra/ops-tools.sh: {}", text(&o.stderr));
    let out = text(&o.stdout);
    let mut lines = out.lines();
    (lines.next().unwrap().to_string(), lines.next().unwrap().to_string())
}

fn check(base: &Path) -> std::process::Output {
    let (bin, node) = tools();
    Command::new(format!("{bin}/python"))
        .arg(repo_root().join("infra/k8s/check.py"))
        .arg(node)
        .arg(base)
        .output()
        .unwrap()
}

#[test]
fn the_dockerfiles_pass_hadolint() {
    let (bin, _) = tools();
    for f in ["infra/docker/Dockerfile.cpu", "infra/docker/Dockerfile.cuda"] {
        let o = Command::new(format!("{bin}/hadolint")).arg(repo_root().join(f)).output().unwrap();
        assert!(o.status.success(), "{f}: {}{}", text(&o.stdout), text(&o.stderr));
        let t = std::fs::read_to_string(repo_root().join(f)).unwrap();
        assert!(t.contains("USER 10001") && t.matches("FROM ").count() == 2, "{f}: multi-stage, non-root");
        let copied = t.lines().filter(|l| l.starts_with("COPY") || l.starts_with("ADD"));
        for l in copied {
            assert!(![".gguf", ".safetensors", "model"].iter().any(|m| l.contains(m)), "{f}: a model baked in: {l}");
        }
    }
}

#[test]
fn the_kubernetes_manifests_render_and_validate() {
    let base = repo_root().join("infra/k8s/base");
    let o = check(&base);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let checked: Vec<&str> = got["checked"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    for kind in
        ["Deployment/", "Job/", "CronJob/", "ScaledObject/", "TriggerAuthentication/", "RabbitmqCluster/", "ConfigMap/"]
    {
        assert!(checked.iter().any(|c| c.starts_with(kind)), "no {kind} in {checked:?}");
    }
    // Every flag the containers pass is one of the command's.
    for (cmd, flags) in got["flags"].as_object().unwrap() {
        let help = text(&medbatch(&[cmd, "--help"]).stdout);
        for f in flags.as_array().unwrap().iter().filter_map(|f| f.as_str()) {
            assert!(help.contains(f), "medbatch {cmd} has no {f}");
        }
    }
    // The worker's probes are the paths `work` serves, on the port its --metrics-addr names.
    let worker = std::fs::read_to_string(base.join("worker.yaml")).unwrap();
    for p in ["path: /healthz", "path: /readyz", "0.0.0.0:9090", "containerPort: 9090", "terminationGracePeriodSeconds"]
    {
        assert!(worker.contains(p), "worker.yaml: no {p}");
    }

    // A misspelt field of a Deployment, a mistyped one of a ScaledObject, a misspelt one of
    // the RabbitmqCluster: each fails.
    for (file, from, to) in [
        ("worker.yaml", "      terminationGracePeriodSeconds: 1800", "      terminationGracePeriod: 1800"),
        ("keda-scaledobject.yaml", "  minReplicaCount: 0", "  minReplicaCount: none"),
        ("rabbitmq-cluster.yaml", "  replicas: 3", "  replica: 3"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(&base).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
        let t = std::fs::read_to_string(dir.path().join(file)).unwrap();
        assert!(t.contains(from), "{file}: no {from:?}");
        std::fs::write(dir.path().join(file), t.replacen(from, to, 1)).unwrap();
        let o = check(dir.path());
        assert!(!o.status.success(), "{file} with {to:?} passed the check");
    }
}
