//! The Kubernetes manifests of `deploy/k8s`: rendering with `kubectl kustomize`,
//! validating with kubernetes-validate (PyPI, in a venv under target/deploy), and the
//! security context every rendering must keep.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;

/// The Kubernetes version the manifests are validated against.
pub const KUBERNETES_VERSION: &str = "1.32.0";

/// The kubernetes-validate release whose schemas were checked here.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// The capabilities the intermediate's container adds: what attaching XDP and
/// pinning its maps takes. The kube-play test runs the intermediate with exactly the
/// rendered list, and with each one removed.
pub const INTERMEDIATE_CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "PERFMON"];

/// What the bpffs init step adds to enter the node's mount namespace and mount.
const MOUNT_BPFFS_CAPABILITIES: &[&str] = &["SYS_ADMIN", "SYS_CHROOT", "SYS_PTRACE"];

/// The directories under deploy/k8s to render: the base and every overlay.
pub fn kustomizations(root: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let k8s = root.join("deploy/k8s");
    let mut dirs = vec![("base".to_string(), k8s.join("base"))];
    let mut overlays: Vec<_> = std::fs::read_dir(k8s.join("overlays"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("kustomization.yaml").exists())
        .collect();
    overlays.sort();
    for p in overlays {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        dirs.push((name, p));
    }
    Ok(dirs)
}

pub fn render(dir: &Path) -> anyhow::Result<String> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .context("running kubectl kustomize")?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The kubernetes-validate command, installed into `target/deploy/venv` if absent.
pub fn validator(root: &Path) -> anyhow::Result<PathBuf> {
    let venv = root.join("target/deploy/venv");
    let bin = venv.join("bin/kubernetes-validate");
    if bin.exists() {
        return Ok(bin);
    }
    println!(
        "xtask: pip install {KUBERNETES_VALIDATE} (into {})",
        venv.display()
    );
    crate::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    let out = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", KUBERNETES_VALIDATE])
        .output()
        .context("running pip")?;
    if !out.status.success() {
        bail!(
            "pip install {KUBERNETES_VALIDATE}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(bin)
}

/// Validates a rendered file strictly (unknown fields are errors).
pub fn validate(validator: &Path, file: &Path) -> anyhow::Result<()> {
    let out = Command::new(validator)
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
        .arg(file)
        .output()
        .context("running kubernetes-validate")?;
    if !out.status.success() {
        bail!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The documents of a multi-document YAML stream.
pub fn documents(yaml: &str) -> anyhow::Result<Vec<Value>> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).context("parsing YAML"))
        .filter(|v| !matches!(v, Ok(Value::Null)))
        .collect()
}

/// The workload of `kind` named `name` (DaemonSet, Deployment).
pub fn workload<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers"]
        .into_iter()
        .flat_map(move |k| pod[k].as_array().into_iter().flatten())
}

/// What breaks the security context the deployment promises; empty if nothing.
/// `privileged_allowed`: the old-kernels overlay, privileged by design.
pub fn security_findings(docs: &[Value], privileged_allowed: bool) -> Vec<String> {
    let mut bad = Vec::new();
    for doc in docs {
        let pod = &doc["spec"]["template"]["spec"];
        for c in containers(pod) {
            if c["securityContext"]["privileged"] == true && !privileged_allowed {
                bad.push(format!(
                    "{} {}: container {} is privileged",
                    doc["kind"], doc["metadata"]["name"], c["name"]
                ));
            }
        }
    }
    match workload(docs, "DaemonSet", "ztna-intermediate") {
        None => bad.push("no DaemonSet ztna-intermediate".into()),
        Some(ds) => {
            let pod = &ds["spec"]["template"]["spec"];
            if pod["hostNetwork"] != true {
                bad.push("intermediate: hostNetwork is not true".into());
            }
            if pod["dnsPolicy"] != "ClusterFirstWithHostNet" {
                bad.push("intermediate: dnsPolicy is not ClusterFirstWithHostNet".into());
            }
            if pod["nodeSelector"]["kubernetes.io/os"] != "linux" {
                bad.push("intermediate: not restricted to Linux nodes".into());
            }
            for c in containers(pod) {
                let sc = &c["securityContext"];
                let name = c["name"].as_str().unwrap_or("?");
                let privileged = sc["privileged"] == true;
                if !privileged && strings(&sc["capabilities"]["drop"]) != ["ALL"] {
                    bad.push(format!(
                        "intermediate: {name} does not drop ALL capabilities"
                    ));
                }
                // bpf(2), setns(2) and mount(2) need a stated profile (README).
                if sc["seccompProfile"]["type"].is_null()
                    && pod["securityContext"]["seccompProfile"]["type"].is_null()
                {
                    bad.push(format!("intermediate: {name} states no seccomp profile"));
                }
                for k in ["requests", "limits"] {
                    if c["resources"][k]["memory"].is_null() {
                        bad.push(format!("intermediate: {name} has no memory {k}"));
                    }
                }
            }
            match pod["containers"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["name"] == "intermediate"))
            {
                None => bad.push("intermediate: no container named intermediate".into()),
                Some(c) => {
                    let sc = &c["securityContext"];
                    if sc["privileged"] != true {
                        let add = strings(&sc["capabilities"]["add"]);
                        if add != INTERMEDIATE_CAPABILITIES {
                            bad.push(format!(
                                "intermediate: adds {add:?}, not {INTERMEDIATE_CAPABILITIES:?}"
                            ));
                        }
                        if sc["allowPrivilegeEscalation"] != false {
                            bad.push("intermediate: allowPrivilegeEscalation is not false".into());
                        }
                    }
                    for (probe, path) in
                        [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]
                    {
                        if c[probe]["httpGet"]["path"] != path {
                            bad.push(format!("intermediate: {probe} is not GET {path}"));
                        }
                    }
                    let bpffs = c["volumeMounts"]
                        .as_array()
                        .and_then(|ms| ms.iter().find(|m| m["mountPath"] == "/sys/fs/bpf"))
                        .and_then(|m| {
                            pod["volumes"]
                                .as_array()?
                                .iter()
                                .find(|v| v["name"] == m["name"])
                        });
                    if bpffs.is_none_or(|v| v["hostPath"]["path"] != "/sys/fs/bpf") {
                        bad.push("intermediate: /sys/fs/bpf is not the node's (hostPath)".into());
                    }
                }
            }
            for c in pod["initContainers"].as_array().into_iter().flatten() {
                let add = strings(&c["securityContext"]["capabilities"]["add"]);
                if let Some(cap) = add.iter().find(|a| !MOUNT_BPFFS_CAPABILITIES.contains(a)) {
                    bad.push(format!(
                        "intermediate: init container {} adds {cap}",
                        c["name"]
                    ));
                }
            }
        }
    }
    match workload(docs, "Deployment", "ztna-connector") {
        None => bad.push("no Deployment ztna-connector".into()),
        Some(d) => {
            let pod = &d["spec"]["template"]["spec"];
            if pod["securityContext"]["runAsNonRoot"] != true {
                bad.push("connector: runAsNonRoot is not true".into());
            }
            for c in containers(pod) {
                let caps = &c["securityContext"]["capabilities"];
                if strings(&caps["drop"]) != ["ALL"] || !strings(&caps["add"]).is_empty() {
                    bad.push(format!(
                        "connector: {} does not drop every capability",
                        c["name"]
                    ));
                }
            }
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The base as written (kustomize only adds names, labels and the namespace).
    fn base() -> Vec<Value> {
        let dir = crate::root().join("deploy/k8s/base");
        ["intermediate.yaml", "connector.yaml"]
            .iter()
            .flat_map(|f| documents(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap())
            .collect()
    }

    fn intermediate(docs: &mut [Value]) -> &mut Value {
        docs.iter_mut()
            .find(|d| d["kind"] == "DaemonSet")
            .map(|d| &mut d["spec"]["template"]["spec"]["containers"][0])
            .unwrap()
    }

    #[test]
    fn base_keeps_the_security_context() {
        let docs = base();
        assert_eq!(security_findings(&docs, false), Vec::<String>::new());
        let raw = std::fs::read_to_string(crate::root().join("deploy/k8s/base/intermediate.yaml"))
            .unwrap();
        assert!(!raw.contains("privileged:"), "the base states privileged");
    }

    #[test]
    fn a_privileged_container_is_found() {
        let mut docs = base();
        intermediate(&mut docs)["securityContext"]["privileged"] = true.into();
        let found = security_findings(&docs, false);
        assert!(
            found.iter().any(|f| f.contains("is privileged")),
            "{found:?}"
        );
        assert!(security_findings(&docs, true).is_empty());
    }

    #[test]
    fn an_extra_capability_is_found() {
        let mut docs = base();
        intermediate(&mut docs)["securityContext"]["capabilities"]["add"] =
            serde_json::json!(["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]);
        let found = security_findings(&docs, false);
        assert!(found.iter().any(|f| f.contains("SYS_ADMIN")), "{found:?}");
    }

    #[test]
    fn a_missing_seccomp_profile_is_found() {
        let mut docs = base();
        intermediate(&mut docs)["securityContext"]
            .as_object_mut()
            .unwrap()
            .remove("seccompProfile");
        let found = security_findings(&docs, false);
        assert!(found.iter().any(|f| f.contains("seccomp")), "{found:?}");
    }
}
