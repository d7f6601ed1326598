//! Privileged: the container images run the way the Kubernetes manifests say. The
//! rendered dev overlay's DaemonSet and Deployment pod templates are played as Pods
//! with `podman kube play` (which skips DaemonSets silently) in the lab's namespaces:
//! the intermediate on the relay namespace's network (hostNetwork), with exactly
//! the DaemonSet's capabilities, seccomp profile and /sys/fs/bpf, attaches XDP, pins
//! its maps, serves /readyz and relays an agent's echoes to the connector, which
//! runs from its own image (the agent too, once, from its image). Then the intermediate again with each of its
//! capabilities removed in turn: it must stop, naming the one missing; and once
//! under the runtime's default seccomp profile, which refuses bpf(2).
//!
//! What the test changes in the pod templates, and why:
//! - Secret and ConfigMap volumes become host directories holding the lab's
//!   certificates and the overlay's configs with the lab's addresses (no API server
//!   holds them here);
//! - the connector gets hostNetwork: the lab's connector namespace stands for the
//!   cluster's pod network;
//! - restartPolicy Never, so a failing intermediate stays stopped with its log, and
//!   the init container kept after it ran, for its log;
//! - the seccomp profiles also as the annotations podman 4.3 reads (it ignores
//!   securityContext.seccompProfile);
//! - no probes and no `ports`: the test GETs /readyz and /healthz itself, as the
//!   kubelet would (podman 4.3 would run the probes as curl inside the image, which
//!   has none, and refuses `ports` on the host network).
//!
//! `cargo xtask test` builds the images and hands over the rendering and podman's
//! private configuration in the environment (ZTNA_DEPLOY_RENDERED, CONTAINERS_*);
//! without them this test prints SKIPPED and returns.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use ztna_netlab::{Lab, RELAY_IP, RELAY_PORT, n};

fn skip(reason: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED: kube_play: {reason}");
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendering"))
}

/// The TOML of the rendered ConfigMap whose name starts with `prefix`, with `set`
/// applied.
fn config(docs: &[Value], prefix: &str, file: &str, set: &[(&str, toml::Value)]) -> String {
    let cm = docs
        .iter()
        .find(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(prefix))
        })
        .unwrap_or_else(|| panic!("no ConfigMap {prefix}*"));
    let mut table: toml::Table = cm["data"][file]
        .as_str()
        .expect("config in the ConfigMap")
        .parse()
        .expect("the ConfigMap's TOML");
    for (k, v) in set {
        table.insert(k.to_string(), v.clone());
    }
    toml::to_string(&table).unwrap()
}

/// The pod template of `workload` as a Pod named `name`, its Secret and ConfigMap
/// volumes replaced by the host directories in `dirs` (volume name, directory).
fn pod(workload: &Value, name: &str, dirs: &[(&str, PathBuf)]) -> Value {
    let template = &workload["spec"]["template"];
    let mut spec = template["spec"].clone();
    for v in spec["volumes"].as_array_mut().expect("volumes") {
        let vname = v["name"].as_str().unwrap().to_string();
        if v.get("secret").is_some() || v.get("configMap").is_some() {
            let dir = dirs
                .iter()
                .find(|(n, _)| *n == vname)
                .unwrap_or_else(|| panic!("no directory for volume {vname}"))
                .1
                .clone();
            *v = json!({"name": vname, "hostPath": {"path": dir, "type": "Directory"}});
        }
    }
    // The kubelet's part, which this test plays instead: it probes (podman 4.3 would
    // turn an httpGet probe into a curl inside the image, which has none), and on the
    // host network `ports` only document (podman 4.3 refuses them there as port
    // mappings).
    for c in spec["containers"].as_array_mut().expect("containers") {
        let c = c.as_object_mut().unwrap();
        for k in ["ports", "readinessProbe", "livenessProbe"] {
            c.remove(k);
        }
    }
    spec["hostNetwork"] = true.into();
    spec["restartPolicy"] = "Never".into();
    let mut annotations = template["metadata"]["annotations"].clone();
    seccomp_annotations(&spec, &mut annotations);
    // Keep the init container after it ran (podman removes a "once" one), for its log.
    annotations["io.podman.annotations.init.container.type"] = "always".into();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": template["metadata"]["labels"],
            "annotations": annotations,
        },
        "spec": spec,
    })
}

/// podman 4.3 reads a seccomp profile only from the annotations Kubernetes used
/// before securityContext.seccompProfile: the same settings, in that form.
fn seccomp_annotations(spec: &Value, annotations: &mut Value) {
    let form = |profile: &Value| match profile["type"].as_str() {
        Some("Unconfined") => Some("unconfined"),
        Some("RuntimeDefault") => Some("runtime/default"),
        Some(other) => panic!("seccomp profile {other}: not translated for podman"),
        None => None,
    };
    if !annotations.is_object() {
        *annotations = json!({});
    }
    if let Some(f) = form(&spec["securityContext"]["seccompProfile"]) {
        annotations["seccomp.security.alpha.kubernetes.io/pod"] = f.into();
    }
    for c in ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[k].as_array().into_iter().flatten())
    {
        if let Some(f) = form(&c["securityContext"]["seccompProfile"]) {
            let key = format!(
                "container.seccomp.security.alpha.kubernetes.io/{}",
                c["name"].as_str().unwrap()
            );
            annotations[key] = f.into();
        }
    }
}

/// The HTTP probes of `container` in `workload`'s pod template: (port, path), the
/// named port resolved.
fn http_probes(workload: &Value, container: &str) -> Vec<(u16, String)> {
    let c = workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == container)
        .unwrap_or_else(|| panic!("no container {container}"));
    ["readinessProbe", "livenessProbe"]
        .iter()
        .map(|p| {
            let get = &c[p]["httpGet"];
            let port = match &get["port"] {
                Value::String(name) => c["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["name"] == *name)
                    .and_then(|p| p["containerPort"].as_u64())
                    .unwrap_or_else(|| panic!("{container}: no port {name}")),
                v => v.as_u64().expect("probe port"),
            };
            (
                port as u16,
                get["path"].as_str().expect("probe path").to_string(),
            )
        })
        .collect()
}

fn container<'a>(pod: &'a mut Value, name: &str) -> &'a mut Value {
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args(args)
        .output()
        .expect("running podman")
}

/// A pod played in a network namespace; taken down (and its containers removed)
/// when dropped.
struct Played {
    file: PathBuf,
    name: String,
}

impl Played {
    fn play(lab: &Lab, ns: &str, pod: &Value) -> Played {
        let name = pod["metadata"]["name"].as_str().unwrap().to_string();
        let file = lab.dir.join(format!("{name}.json"));
        // podman reads YAML, and JSON is YAML.
        std::fs::write(&file, serde_json::to_vec_pretty(pod).unwrap()).unwrap();
        let played = Played { file, name };
        let out = lab
            .command(ns, Path::new("/usr/bin/podman"))
            .args(["kube", "play"])
            .arg(&played.file)
            .output()
            .expect("running podman kube play");
        assert!(
            out.status.success(),
            "podman kube play {}: {}",
            played.name,
            String::from_utf8_lossy(&out.stderr)
        );
        played
    }

    fn ctr(&self, container: &str) -> String {
        format!("{}-{container}", self.name)
    }

    fn logs(&self, container: &str) -> String {
        let out = podman(&["logs", &self.ctr(container)]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn state(&self, container: &str) -> (String, i64) {
        let out = podman(&[
            "inspect",
            "--format",
            "{{.State.Status}} {{.State.ExitCode}}",
            &self.ctr(container),
        ]);
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let (status, code) = s.split_once(' ').unwrap_or((&s, "-1"));
        (status.to_string(), code.parse().unwrap_or(-1))
    }

    /// Waits until `container`'s log contains `needle`.
    fn wait_log(&self, container: &str, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.logs(container).contains(needle) {
                return;
            }
            if self.state(container).0 == "exited" {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{} did not log {needle:?} (within 30 s, or before it stopped):\n{}",
            self.ctr(container),
            self.logs(container)
        );
    }

    /// Waits until `container` has exited; returns its exit code.
    /// Waits until the intermediate has stopped; returns its exit code. Fails at
    /// once if it attached XDP after all: `why` says what that means.
    fn wait_failed_start(&self, why: &str) -> i64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let (status, code) = self.state("intermediate");
            if status == "exited" {
                return code;
            }
            let log = self.logs("intermediate");
            assert!(!log.contains("XDP relay attached"), "{why}:\n{log}");
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{} still running after 30 s", self.ctr("intermediate"));
    }
}

impl Played {
    /// `podman pod stop`: SIGTERM, SIGKILL after `grace` seconds.
    fn stop(&self, grace: u64) {
        let out = podman(&["pod", "stop", "-t", &grace.to_string(), &self.name]);
        assert!(
            out.status.success(),
            "podman pod stop {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A pin directory of this test, removed with whatever a failed run left in it.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn grace_period(workload: &Value) -> u64 {
    workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30)
}

impl Drop for Played {
    fn drop(&mut self) {
        // Gracefully first, as the kubelet would: `--down` alone kills at once.
        let _ = podman(&["pod", "stop", "-t", "10", &self.name]);
        let out = podman(&["kube", "play", "--down", &self.file.display().to_string()]);
        if !out.status.success() {
            eprintln!(
                "podman kube play --down {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
            let _ = podman(&["pod", "rm", "-f", &self.name]);
        }
    }
}

/// GET `path` on 127.0.0.1:`port` inside `ns`; the HTTP status (0 if none).
fn http_status(lab: &Lab, ns: &str, port: u16, path: &str) -> u16 {
    let out = lab
        .command(ns, Path::new("/usr/bin/curl"))
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "2",
        ])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("running curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn wait_http_ok(lab: &Lab, ns: &str, port: u16, path: &str, what: &Played, ctr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if http_status(lab, ns, port, path) == 200 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "GET {path} on port {port} not 200 within 30 s:\n{}",
        what.logs(ctr)
    );
}

/// The lab's certificates as a Secret volume holds them (tls.crt, tls.key, ca.crt),
/// owned by `uid`.
fn secret_dir(lab: &Lab, certs: &Path, who: &str, uid: u32) -> PathBuf {
    let dir = lab.dir.join(format!("secret-{who}"));
    std::fs::create_dir_all(&dir).unwrap();
    for (from, to) in [
        (format!("{who}.pem"), "tls.crt"),
        (format!("{who}.key"), "tls.key"),
        ("ca.pem".to_string(), "ca.crt"),
    ] {
        std::fs::copy(certs.join(from), dir.join(to)).unwrap();
        std::os::unix::fs::chown(dir.join(to), Some(uid), Some(uid)).unwrap();
    }
    dir
}

fn config_dir(lab: &Lab, who: &str, file: &str, toml: &str) -> PathBuf {
    let dir = lab.dir.join(format!("config-{who}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(file), toml).unwrap();
    dir
}

fn capability_names(pod: &mut Value) -> Vec<String> {
    container(pod, "intermediate")["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn images_run_as_the_manifests_say() {
    let Some(rendered) = std::env::var_os("ZTNA_DEPLOY_RENDERED") else {
        skip("no images (`cargo xtask test` builds them and sets ZTNA_DEPLOY_RENDERED)");
        return;
    };
    let docs = documents(&std::fs::read_to_string(&rendered).unwrap());
    let daemonset = find(&docs, "DaemonSet", "ztna-intermediate");
    let deployment = find(&docs, "Deployment", "ztna-connector");

    let lab = Lab::relay_topology("k").expect("topology");
    let (x, c) = (lab.ns("x"), lab.ns("c"));
    let certs = lab.certs().unwrap();
    // As on a Kubernetes node (the kubelet requires it): the container cannot turn
    // it on, /proc/sys is read-only there.
    lab.exec(&x, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    // Pins of this run only: other tests pin under the default directory. Removed
    // at the end whatever happens (declared before the pods, so dropped after them).
    let pins = PinDir(PathBuf::from(format!("/sys/fs/bpf/{}", lab.prefix)));
    let pin_dir = pins.0.clone();
    let intermediate_toml = config(
        &docs,
        "ztna-intermediate",
        "intermediate.toml",
        &[
            ("iface", toml::Value::Array(vec!["x0".into()])),
            ("bpf_pin_dir", pin_dir.display().to_string().into()),
        ],
    );
    let connector_toml = config(
        &docs,
        "ztna-connector",
        "connector.toml",
        &[("server", format!("{RELAY_IP}:{RELAY_PORT}").into())],
    );
    let intermediate_dirs = [
        (
            "config",
            config_dir(
                &lab,
                "intermediate",
                "intermediate.toml",
                &intermediate_toml,
            ),
        ),
        ("tls", secret_dir(&lab, &certs, "intermediate", 0)),
    ];
    let connector_uid = deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
        .as_u64()
        .expect("the connector's runAsUser") as u32;
    let connector_dirs = [
        (
            "config",
            config_dir(&lab, "connector", "connector.toml", &connector_toml),
        ),
        ("tls", secret_dir(&lab, &certs, "connector", connector_uid)),
    ];

    let mut relay_pod = pod(
        daemonset,
        &format!("{}-relay", lab.prefix),
        &intermediate_dirs,
    );
    let capabilities = capability_names(&mut relay_pod);
    {
        // Exactly the DaemonSet's security context: nothing here adds to it.
        let sc = &container(&mut relay_pod, "intermediate")["securityContext"];
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{sc}");
        assert_eq!(sc["seccompProfile"]["type"], "Unconfined", "{sc}");
        assert!(sc.get("privileged").is_none(), "{sc}");
    }

    {
        let relay = Played::play(&lab, &x, &relay_pod);
        relay.wait_log("intermediate", "XDP relay attached in generic mode to x0");
        for (port, path) in http_probes(daemonset, "intermediate") {
            wait_http_ok(&lab, &x, port, &path, &relay, "intermediate");
        }
        assert!(
            relay
                .logs("mount-bpffs")
                .contains("bpffs is mounted on /sys/fs/bpf"),
            "{}",
            relay.logs("mount-bpffs")
        );
        let relay_map = pin_dir.join("ZTNA_RELAY");
        assert!(relay_map.exists(), "no pin {}", relay_map.display());
        // The README's inspection command, inside the pod.
        let out = podman(&[
            "exec",
            &relay.ctr("intermediate"),
            "bpftool",
            "map",
            "show",
            "pinned",
            &relay_map.display().to_string(),
        ]);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ZTNA_RELAY"),
            "bpftool in the pod: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let connector_pod = pod(deployment, &format!("{}-conn", lab.prefix), &connector_dirs);
        let connector = Played::play(&lab, &c, &connector_pod);
        connector.wait_log("connector", "registered as connector");
        let out = podman(&["exec", &connector.ctr("connector"), "id", "-u"]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            connector_uid.to_string(),
            "the connector is not running as its non-root user"
        );
        for (port, path) in http_probes(deployment, "connector") {
            wait_http_ok(&lab, &c, port, &path, &connector, "connector");
        }

        let echo = |count: u64| {
            let report = lab
                .agent_echo(
                    &certs,
                    &[
                        "--count",
                        &count.to_string(),
                        "--burst",
                        "10",
                        "--size",
                        "1000",
                    ],
                )
                .unwrap_or_else(|e| panic!("agent: {e:#}\n{}", relay.logs("intermediate")));
            assert_eq!(n(&report, "sent"), count, "{report}");
            assert_eq!(n(&report, "echoed_exact"), count, "{report}");
            assert_eq!(n(&report, "corrupted"), 0, "{report}");
            assert!(
                report["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("relay-")),
                "{report}"
            );
        };
        // First run: sets up the neighbour entries the fib lookups need; the second
        // is a new session, forwarded in XDP.
        echo(20);
        echo(200);
        // The README's `ztna sessions`, inside the pod: the second run's packets
        // went out through XDP.
        let out = podman(&[
            "exec",
            &relay.ctr("intermediate"),
            "ztna",
            "sessions",
            "--json",
            "--bpf-pin-dir",
            &pin_dir.display().to_string(),
        ]);
        assert!(
            out.status.success(),
            "ztna sessions in the pod: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sessions: Value = serde_json::from_slice(&out.stdout).unwrap();
        let tx = sessions["verdicts"]["tx"].as_u64().unwrap_or(0);
        assert!(tx >= 400, "XDP forwarded {tx} packets: {sessions}");
        // Where the pod template's scrape annotations point, Prometheus finds the
        // same packets.
        let annotations = &daemonset["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        let url = format!(
            "http://127.0.0.1:{}{}",
            annotations["prometheus.io/port"].as_str().unwrap(),
            annotations["prometheus.io/path"].as_str().unwrap()
        );
        // The intermediate brings these counters up to date periodically: poll.
        let scrape_xdp_packets = || {
            let out = lab.exec(&x, "curl", &["-sf", &url]).expect("scraping");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let packets = text
                .lines()
                .find_map(|l| l.strip_prefix("ztna_forwarded_packets_total{path=\"xdp\"} "))
                .and_then(|v| v.trim().parse::<u64>().ok());
            (packets, text)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (packets, text) = scrape_xdp_packets();
            if packets.is_some_and(|p| p >= 400) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{url}: XDP packets {packets:?} after 10 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }

        // The README's certificate rotation: a new key and certificate from the same
        // CA in the Secret's files, then SIGHUP to the daemon (PID 1 of its
        // container) through exec. It takes the new one; agents still connect.
        let renewed = lab.dir.join("renewed");
        ztna_userspace::identity::issue_leaf(
            &certs.join("ca.pem"),
            &certs.join("ca.key"),
            &renewed,
            "intermediate",
            &["intermediate.ztna".into(), "localhost".into()],
        )
        .unwrap();
        let tls = &intermediate_dirs
            .iter()
            .find(|(n, _)| *n == "tls")
            .unwrap()
            .1;
        std::fs::copy(renewed.join("intermediate.pem"), tls.join("tls.crt")).unwrap();
        std::fs::copy(renewed.join("intermediate.key"), tls.join("tls.key")).unwrap();
        let out = podman(&[
            "exec",
            &relay.ctr("intermediate"),
            "sh",
            "-c",
            "kill -HUP 1",
        ]);
        assert!(
            out.status.success(),
            "kill -HUP 1 in the pod: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        relay.wait_log("intermediate", "configuration reloaded");
        let pem = std::fs::read(renewed.join("intermediate.pem")).unwrap();
        let digest = ring::digest::digest(&ring::digest::SHA256, &pem);
        let fingerprint: String = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(
            relay.logs("intermediate").contains(&fingerprint),
            "not reloaded with the new certificate {fingerprint}:\n{}",
            relay.logs("intermediate")
        );
        echo(20);

        // The agent's image too, on the agent namespace's network: `echo` needs no
        // capability, and the image runs as root only for `up`.
        let agents_certs = format!("{}:/certs:ro", certs.display());
        let out = Command::new("podman")
            .args(["run", "--rm", "--pull=never", "--cap-drop=all"])
            .arg(format!("--network=ns:/run/netns/{}", lab.ns("a")))
            .args(["-v", &agents_certs, "localhost/ztna-agent:latest"])
            .args(["--server", &format!("{RELAY_IP}:{RELAY_PORT}")])
            .args(["--ca", "/certs/ca.pem", "--cert", "/certs/agent.pem"])
            .args(["--key", "/certs/agent.key", "--service", "echo", "--no-p2p"])
            .args(["echo", "--dst", "10.100.0.1:7", "--count", "20", "--json"])
            .env("NO_COLOR", "1")
            .output()
            .expect("podman run ztna-agent");
        assert!(
            out.status.success(),
            "the agent's image: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(n(&report, "echoed_exact"), 20, "{report}");

        // Stopped as the kubelet stops a pod (SIGTERM, then the grace period): the
        // intermediate exits cleanly and takes its pins with it.
        relay.stop(grace_period(daemonset));
        assert_eq!(relay.state("intermediate"), ("exited".to_string(), 0));
        assert!(
            !pin_dir.join("ZTNA_RELAY").exists(),
            "pins left in {}:\n{}",
            pin_dir.display(),
            relay.logs("intermediate")
        );
    }

    // Each capability removed in turn: the intermediate stops and names it.
    for missing in &capabilities {
        let mut lacking = pod(
            daemonset,
            &format!(
                "{}-no-{}",
                lab.prefix,
                missing.to_lowercase().replace('_', "")
            ),
            &intermediate_dirs,
        );
        container(&mut lacking, "intermediate")["securityContext"]["capabilities"]["add"] = json!(
            capabilities
                .iter()
                .filter(|c| *c != missing)
                .collect::<Vec<_>>()
        );
        let relay = Played::play(&lab, &x, &lacking);
        let code = relay.wait_failed_start(&format!(
            "XDP attached without {missing}: the intermediate does not need it, so the \
             DaemonSet must not add it"
        ));
        let log = relay.logs("intermediate");
        assert_ne!(code, 0, "ran without {missing}:\n{log}");
        assert!(
            log.contains(&format!("missing: CAP_{missing}")),
            "without {missing}, the log does not name it:\n{log}"
        );
    }

    // Why the manifests state a seccomp profile: under the runtime's default one,
    // bpf(2) without CAP_SYS_ADMIN is refused although every capability is there.
    let mut confined = pod(
        daemonset,
        &format!("{}-seccomp", lab.prefix),
        &intermediate_dirs,
    );
    container(&mut confined, "intermediate")["securityContext"]["seccompProfile"] =
        json!({"type": "RuntimeDefault"});
    seccomp_annotations(
        &confined["spec"].clone(),
        &mut confined["metadata"]["annotations"],
    );
    let relay = Played::play(&lab, &x, &confined);
    let code = relay.wait_failed_start(
        "XDP attached under the default seccomp profile: stating Unconfined is not needed",
    );
    let log = relay.logs("intermediate");
    assert_ne!(
        code, 0,
        "loaded XDP under the default seccomp profile:\n{log}"
    );
    assert!(
        log.contains("Operation not permitted") && !log.contains("missing: CAP_"),
        "{log}"
    );
    drop(relay);
    drop(pins);
}
