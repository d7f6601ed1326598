//! The Kubernetes manifests of `deploy/k8s`: rendering with `kubectl kustomize`,
//! validating with kubernetes-validate (PyPI, in a venv under target/deploy), the
//! security context every rendering must keep, and what a relay's clean drain and
//! its discovery need (grace period, rolling update, the headless Service).

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

/// The intermediate's drain timeout when its config sets none
/// (`DEFAULT_DRAIN_TIMEOUT` in ztna-userspace/src/intermediate/mod.rs).
const DEFAULT_DRAIN_SECS: u64 = 10;

/// How long the intermediate waits for its connections to close after a drain
/// (`CLOSE_WAIT` there): the grace period must cover the drain and this.
const CLOSE_WAIT_SECS: u64 = 3;

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

/// `drain_timeout` of the intermediate's configuration: the TOML in the ConfigMap
/// the DaemonSet mounts (default [`DEFAULT_DRAIN_SECS`]).
fn drain_timeout(docs: &[Value], ds: &Value) -> Result<u64, String> {
    let volumes = ds["spec"]["template"]["spec"]["volumes"].as_array();
    let Some(config) = volumes
        .into_iter()
        .flatten()
        .find_map(|v| v["configMap"]["name"].as_str())
    else {
        return Ok(DEFAULT_DRAIN_SECS);
    };
    let toml = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == config)
        .and_then(|d| d["data"]["intermediate.toml"].as_str())
        .unwrap_or_default();
    let line = toml.lines().find_map(|l| {
        let (key, value) = l.split_once('=')?;
        (key.trim() == "drain_timeout").then(|| value.split('#').next().unwrap_or("").trim())
    });
    match line {
        None => Ok(DEFAULT_DRAIN_SECS),
        Some(v) => v
            .parse()
            .map_err(|_| format!("intermediate: drain_timeout {v:?} in {config} is not seconds")),
    }
}

/// What breaks a relay's clean drain (SIGTERM) or its discovery; empty if nothing:
/// the grace period must exceed the drain timeout and the close that follows, a
/// rolling update must replace one relay at a time, and the headless Service must
/// list exactly the ready relays at their QUIC port.
pub fn rollout_findings(docs: &[Value]) -> Vec<String> {
    let Some(ds) = workload(docs, "DaemonSet", "ztna-intermediate") else {
        return vec!["no DaemonSet ztna-intermediate".into()];
    };
    let mut bad = Vec::new();
    let update = &ds["spec"]["updateStrategy"];
    if update["type"] != "RollingUpdate"
        || update["rollingUpdate"]["maxUnavailable"] != 1
        || !(update["rollingUpdate"]["maxSurge"].is_null()
            || update["rollingUpdate"]["maxSurge"] == 0)
    {
        bad.push(format!(
            "intermediate: updateStrategy {update} does not replace one relay at a time (RollingUpdate, maxUnavailable 1, no surge)"
        ));
    }
    let pod = &ds["spec"]["template"]["spec"];
    // Kubernetes' default grace period.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    match drain_timeout(docs, ds) {
        Err(e) => bad.push(e),
        Ok(drain) if grace <= drain + CLOSE_WAIT_SECS => bad.push(format!(
            "intermediate: terminationGracePeriodSeconds {grace} does not exceed drain_timeout {drain} + {CLOSE_WAIT_SECS} s: SIGKILL would cut the drain short"
        )),
        Ok(_) => {}
    }
    let Some(svc) = docs
        .iter()
        .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "ztna-intermediate")
    else {
        bad.push("no Service ztna-intermediate (the relays' discovery)".into());
        return bad;
    };
    let spec = &svc["spec"];
    if spec["clusterIP"] != "None" {
        bad.push("Service ztna-intermediate is not headless (clusterIP: None)".into());
    }
    if spec["publishNotReadyAddresses"] == true {
        bad.push("Service ztna-intermediate lists relays that are not ready (draining)".into());
    }
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    let selects = spec["selector"]
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k] == *v));
    if !selects {
        bad.push(format!(
            "Service ztna-intermediate's selector {} does not select the DaemonSet's pods",
            spec["selector"]
        ));
    }
    let quic = pod["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .find(|p| p["name"] == "quic");
    let serves = quic.is_some_and(|q| {
        spec["ports"].as_array().into_iter().flatten().any(|p| {
            p["protocol"] == "UDP"
                && p["port"] == q["containerPort"]
                && (p["targetPort"] == "quic" || p["targetPort"] == q["containerPort"])
        })
    });
    if !serves {
        bad.push("Service ztna-intermediate does not name the relays' UDP port quic".into());
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The base as written (kustomize only adds names, labels and the namespace).
    fn base() -> Vec<Value> {
        let dir = crate::root().join("deploy/k8s/base");
        [
            "intermediate.yaml",
            "intermediate-service.yaml",
            "connector.yaml",
        ]
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

    fn daemonset(docs: &mut [Value]) -> &mut Value {
        docs.iter_mut().find(|d| d["kind"] == "DaemonSet").unwrap()
    }

    fn service(docs: &mut [Value]) -> &mut Value {
        docs.iter_mut().find(|d| d["kind"] == "Service").unwrap()
    }

    #[test]
    fn base_drains_one_relay_at_a_time_and_lists_the_ready_ones() {
        assert_eq!(rollout_findings(&base()), Vec::<String>::new());
    }

    #[test]
    fn a_grace_period_the_drain_does_not_fit_in_is_found() {
        let mut docs = base();
        daemonset(&mut docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] =
            13.into();
        let found = rollout_findings(&docs);
        assert!(
            found.iter().any(|f| f.contains("drain_timeout 10 + 3")),
            "{found:?}"
        );
        // A config that drains longer needs a longer grace period.
        let mut docs = base();
        let volumes = &daemonset(&mut docs)["spec"]["template"]["spec"]["volumes"];
        let config = volumes
            .as_array()
            .unwrap()
            .iter()
            .find_map(|v| v["configMap"]["name"].as_str())
            .unwrap()
            .to_string();
        docs.push(serde_json::json!({
            "kind": "ConfigMap",
            "metadata": {"name": config},
            "data": {"intermediate.toml": "listen = \"0.0.0.0:4433\"\ndrain_timeout = 40 # s\n"},
        }));
        let found = rollout_findings(&docs);
        assert!(
            found.iter().any(|f| f.contains("drain_timeout 40 + 3")),
            "{found:?}"
        );
    }

    #[test]
    fn a_service_that_lists_draining_relays_or_misses_them_is_found() {
        let mut docs = base();
        service(&mut docs)["spec"]["publishNotReadyAddresses"] = true.into();
        service(&mut docs)["spec"]["clusterIP"] = "10.96.0.9".into();
        service(&mut docs)["spec"]["selector"] = serde_json::json!({"app": "other"});
        let found = rollout_findings(&docs).join("\n");
        for what in ["not headless", "not ready", "does not select"] {
            assert!(found.contains(what), "{what}: {found}");
        }
        let mut docs = base();
        daemonset(&mut docs)["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] =
            "50%".into();
        assert!(rollout_findings(&docs)[0].contains("one relay at a time"));
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
