//! The deployment's checks in `cargo xtask test` (alone: `cargo xtask deploy`), and
//! `cargo xtask images`:
//!
//! - manifests: the base and every overlay of `deploy/k8s` rendered with `kubectl
//!   kustomize`, validated with `kubernetes-validate --strict` against Kubernetes
//!   1.32, and their security context checked (`manifests::security_findings`);
//! - images: the Containerfiles of `deploy/docker` built with podman on a Debian base
//!   made here (`podman.rs`), in storage private to `target/deploy/podman`;
//! - the run of those images as Kubernetes would run them (`podman kube play` of
//!   the rendered dev overlay, XDP attached, an agent's traffic relayed to the
//!   connector, each capability removed in turn) is the privileged test
//!   `ztna-netlab/tests/kube_play.rs`, given the images and the rendering through the
//!   environment `kube_play_env` returns. It is a netlab test, not a step here,
//!   because it needs the lab's namespaces, the real agent and the XDP topology the
//!   relay tests use, and xtask cannot depend on those crates (they need cmake and
//!   libclang, which xtask installs first).

pub mod manifests;
pub mod podman;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;

/// Passed, failed and skipped checks of the deploy steps.
#[derive(Default)]
pub struct Checks {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
}

impl Checks {
    fn record(&mut self, name: &str, result: anyhow::Result<String>) -> bool {
        match result {
            Ok(note) => {
                self.passed += 1;
                println!(
                    "deploy: {name} ... ok{}",
                    if note.is_empty() {
                        String::new()
                    } else {
                        format!(" ({note})")
                    }
                );
                true
            }
            Err(e) => {
                self.failed += 1;
                println!("deploy: {name} ... FAILED\n{e:#}");
                false
            }
        }
    }

    fn skip(&mut self, name: &str, why: &str) {
        self.skipped += 1;
        println!("deploy: {name} ... SKIPPED: {why}");
    }
}

/// Why `kubectl kustomize` cannot render the kustomizations, if it cannot: they use
/// `labels`, `components` and `patches`, kustomize 4 and later (kubectl 1.21 and
/// later; Debian bookworm's kubernetes-client is 1.20).
fn kustomize_missing() -> Option<String> {
    let out = Command::new("kubectl")
        .args(["version", "--client", "-o", "json"])
        .output();
    let Ok(out) = out else {
        return Some("no kubectl (as root, xtask installs Debian's kubernetes-client)".into());
    };
    let version: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let kustomize = version["kustomizeVersion"]
        .as_str()
        .unwrap_or("older than v4");
    let major: u32 = kustomize
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    (major < 4).then(|| {
        format!("kubectl's kustomize is {kustomize}; the kustomizations need v4 or later (kubectl 1.21+)")
    })
}

/// Renders, validates and checks every kustomization; writes the renderings to
/// `target/deploy/rendered/NAME.yaml`. Returns the directory of the renderings.
pub fn check_manifests(root: &Path, checks: &mut Checks) -> Option<PathBuf> {
    let dirs = match manifests::kustomizations(root) {
        Ok(d) => d,
        Err(e) => {
            checks.record("listing deploy/k8s", Err(e));
            return None;
        }
    };
    if let Some(why) = kustomize_missing() {
        for (name, _) in &dirs {
            checks.skip(&format!("k8s {name}"), &why);
        }
        return None;
    }
    let validator = match manifests::validator(root) {
        Ok(v) => v,
        Err(e) => {
            checks.record("installing kubernetes-validate", Err(e));
            return None;
        }
    };
    let out = root.join("target/deploy/rendered");
    if let Err(e) = std::fs::create_dir_all(&out) {
        checks.record("creating target/deploy/rendered", Err(e.into()));
        return None;
    }
    let mut all_ok = true;
    for (name, dir) in &dirs {
        let file = out.join(format!("{name}.yaml"));
        let result = (|| {
            let yaml = manifests::render(dir)?;
            std::fs::write(&file, &yaml)?;
            manifests::validate(&validator, &file)?;
            // The old-kernels overlay is privileged by design; nothing else may be.
            let docs = manifests::documents(&yaml)?;
            let findings = manifests::security_findings(&docs, name.contains("old-kernels"));
            if !findings.is_empty() {
                anyhow::bail!("security context: {}", findings.join("; "));
            }
            let findings = manifests::rollout_findings(&docs);
            if !findings.is_empty() {
                anyhow::bail!("drain and discovery: {}", findings.join("; "));
            }
            Ok(format!(
                "rendered, valid for Kubernetes {}, security context kept, relays drain one at a time",
                manifests::KUBERNETES_VERSION
            ))
        })();
        all_ok &= checks.record(&format!("k8s {name}"), result);
    }
    all_ok.then_some(out)
}

/// Builds the binaries and the images (base image first, cached). Returns the podman
/// configuration on success. `release`: from the release build (`cargo xtask images`);
/// the tests use the debug build they have already made, which runs the same code and
/// spares CI a second full build.
pub fn check_images(root: &Path, checks: &mut Checks, release: bool) -> Option<podman::Podman> {
    let mut podman_ready = None;
    let ok = checks.record("images", (|| {
        let started = Instant::now();
        let mut build = crate::cargo();
        build.args(["build", "--quiet", "-p", "ztna-userspace", "--bins"]);
        if release {
            build.arg("--release");
        }
        crate::run(&mut build)?;
        let built = started.elapsed().as_secs_f64();
        let podman = podman::Podman::setup(root)?;
        let started = Instant::now();
        let base = podman::ensure_base(&podman, root)?;
        let base_secs = started.elapsed().as_secs_f64();
        let started = Instant::now();
        podman::build_images(&podman, root, if release { "release" } else { "debug" })?;
        let images_secs = started.elapsed().as_secs_f64();
        podman_ready = Some(podman);
        Ok(format!(
            "{} binaries {built:.0} s; base {base} ({base_secs:.0} s); {} images {images_secs:.0} s",
            if release { "release" } else { "debug" },
            podman::IMAGES.len()
        ))
    })());
    if ok { podman_ready } else { None }
}

/// The environment of the privileged tests that lets `kube_play.rs` run the images:
/// podman's private configuration and the rendered dev overlay.
pub fn kube_play_env(podman: &podman::Podman, rendered: &Path) -> Vec<(String, PathBuf)> {
    let mut env: Vec<(String, PathBuf)> = podman
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    env.push(("ZTNA_DEPLOY_RENDERED".into(), rendered.join("dev.yaml")));
    env
}

/// `cargo xtask images [--out DIR]`: builds the images into the private storage;
/// with `--out`, also writes each as a docker-archive there.
pub fn images(root: &Path, out: Option<&Path>) -> anyhow::Result<()> {
    crate::prereqs::ensure_deploy_tools()?;
    crate::ebpf::build_ebpf(root)?;
    let mut checks = Checks::default();
    let podman = check_images(root, &mut checks, true).context("building the images")?;
    println!(
        "images in {} (CONTAINERS_STORAGE_CONF={})",
        podman.dir.display(),
        podman.dir.join("storage.conf").display()
    );
    if let Some(out) = out {
        for f in podman::save_images(&podman, out)? {
            println!("wrote {}", f.display());
        }
    }
    Ok(())
}
