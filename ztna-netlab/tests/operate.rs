//! Privileged: operating a relay as a user would. The relay stack of the relay
//! topology (XDP native) is scraped over HTTP with curl inside its namespaces and the
//! expositions are checked with `promtool check metrics` (Debian's prometheus
//! package); two intermediates on one host keep their BPF pins apart. Marked
//! `#[ignore]`: `cargo xtask test` runs them as root.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ztna_netlab::{Lab, RELAY_PORT, bin_dir, n};

/// GET `url` with curl inside `ns`: (status, body).
fn curl(lab: &Lab, ns: &str, url: &str) -> (u16, String) {
    let out = lab
        .exec(ns, "curl", &["-s", "-w", "\n%{http_code}", url])
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("status"), body.to_string())
}

/// `promtool check metrics` on an exposition: Ok or its complaints.
fn promtool(exposition: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; cargo xtask test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The value of the sample whose line starts with `series` (name and labels).
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_running_relay_serves_metrics_promtool_accepts_health_and_readiness() {
    let mut lab = Lab::relay_topology("m").expect("topology");
    let certs = lab.start_relay_stack("native").expect("stack");
    let (x, c) = (lab.ns("x"), lab.ns("c"));
    // Defaults: the intermediate on 127.0.0.1:9090, the connector on :9091, each in
    // its own namespace.
    let inter = "http://127.0.0.1:9090";
    let conn = "http://127.0.0.1:9091";
    assert_eq!(
        curl(&lab, &x, &format!("{inter}/healthz")),
        (200, "ok\n".into())
    );
    assert_eq!(
        curl(&lab, &x, &format!("{inter}/readyz")),
        (200, "ready\n".into())
    );
    assert_eq!(
        curl(&lab, &c, &format!("{conn}/readyz")),
        (200, "ready\n".into())
    );
    // Two runs: the first sets up neighbour entries, the second is all XDP.
    for _ in 0..2 {
        let r = lab
            .agent_echo(
                &certs,
                &["--count", "50", "--burst", "10", "--size", "1000"],
            )
            .unwrap();
        assert_eq!(n(&r, "echoed_exact"), 50, "{r}");
    }
    // Gauges refresh every 250 ms; counters are exact at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let (status, body) = curl(&lab, &x, &format!("{inter}/metrics"));
        assert_eq!(status, 200);
        if sample(&body, "ztna_forwarded_packets_total{path=\"xdp\"}").unwrap_or(0.0) >= 100.0
            || Instant::now() > deadline
        {
            break body;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    promtool(&metrics).unwrap_or_else(|e| panic!("promtool: {e}\n{metrics}"));
    let at = |s: &str| sample(&metrics, s).unwrap_or_else(|| panic!("{s} missing:\n{metrics}"));
    assert!(at("ztna_forwarded_packets_total{path=\"xdp\"}") >= 100.0);
    assert!(at("ztna_forwarded_bytes_total{path=\"xdp\"}") >= 100.0 * 1000.0);
    assert!(at("ztna_xdp_packets_total{verdict=\"tx\"}") >= 100.0);
    assert_eq!(at("ztna_xdp_attached"), 1.0);
    assert_eq!(at("ztna_connections{role=\"connector\"}"), 1.0);
    assert_eq!(
        at("ztna_registrations_total{role=\"agent\",result=\"accepted\"}"),
        2.0
    );
    assert!(at("ztna_handshake_duration_seconds_count") >= 3.0);
    // Every line is a comment or a `ztna_` sample; no CID or address in any label.
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.starts_with("ztna_"), "{line}");
        assert!(!line.contains("10.201."), "an address in a label: {line}");
    }
    let (status, conn_metrics) = curl(&lab, &c, &format!("{conn}/metrics"));
    assert_eq!(status, 200);
    promtool(&conn_metrics).unwrap_or_else(|e| panic!("promtool: {e}\n{conn_metrics}"));
    assert_eq!(
        sample(&conn_metrics, "ztna_connector_services_registered"),
        Some(1.0)
    );
    assert!(
        sample(&conn_metrics, "ztna_connector_packets_from_data_total").unwrap_or(0.0) >= 100.0
    );
    // The connector stops: the intermediate sees it go (the gauge), and the
    // connector's endpoint goes with it.
    lab.stop("connector");
    let deadline = Instant::now() + Duration::from_secs(5);
    while sample(
        &curl(&lab, &x, &format!("{inter}/metrics")).1,
        "ztna_connections{role=\"connector\"}",
    ) != Some(0.0)
    {
        assert!(Instant::now() < deadline, "connector gauge stayed up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let gone = lab.exec(
        &c,
        "curl",
        &["-s", "-o", "/dev/null", &format!("{conn}/readyz")],
    );
    assert!(gone.is_err(), "the connector's endpoint is gone with it");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn two_intermediates_on_one_host_keep_their_own_pins_and_counters() {
    let mut lab = Lab::relay_topology("p").expect("topology");
    let certs = lab.start_relay_stack("native").expect("stack");
    let x = lab.ns("x");
    // A second interface and a second intermediate on it, another port.
    lab.exec(
        &x,
        "ip",
        &["link", "add", "x1", "type", "veth", "peer", "name", "x1p"],
    )
    .unwrap();
    lab.exec(&x, "ip", &["addr", "add", "10.201.9.1/24", "dev", "x1"])
        .unwrap();
    for dev in ["x1", "x1p"] {
        lab.exec(&x, "ip", &["link", "set", dev, "up"]).unwrap();
    }
    let port2 = RELAY_PORT + 1;
    let c = |f: &str| certs.join(f).display().to_string();
    lab.spawn(
        &x,
        "intermediate2",
        "ztna-intermediate",
        &[
            "--listen".into(),
            format!("10.201.9.1:{port2}"),
            "--cert".into(),
            c("intermediate.pem"),
            "--key".into(),
            c("intermediate.key"),
            "--ca".into(),
            c("ca.pem"),
            "--xdp".into(),
            "generic".into(),
            "--iface".into(),
            "x1".into(),
            "--metrics-listen".into(),
            "127.0.0.1:9092".into(),
            "--max-relay-entries".into(),
            "1024".into(),
        ],
    )
    .unwrap();
    lab.wait_log(
        "intermediate2",
        "XDP relay attached",
        Duration::from_secs(10),
    )
    .unwrap();
    let dir1 = Path::new("/sys/fs/bpf/ztna").join(RELAY_PORT.to_string());
    let dir2 = Path::new("/sys/fs/bpf/ztna").join(port2.to_string());
    // Each instance's ZTNA_CONFIG holds its own port.
    for (dir, port) in [(&dir1, RELAY_PORT), (&dir2, port2)] {
        let out = ztna_netlab::sh(
            "bpftool",
            &[
                "-j",
                "map",
                "dump",
                "pinned",
                dir.join("ZTNA_CONFIG").to_str().unwrap(),
            ],
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let pinned_port = v[0]["formatted"]["value"]["port"].as_u64().unwrap() as u16;
        assert_eq!(u16::from_be(pinned_port), port, "{v}");
    }
    // The second's tables are sized as configured, the first's at the default.
    for (dir, entries) in [(&dir1, 65536), (&dir2, 1024)] {
        for map in ["ZTNA_RELAY", "ZTNA_SESSION_STATS", "ZTNA_RELAY6"] {
            let out = ztna_netlab::sh(
                "bpftool",
                &[
                    "-j",
                    "map",
                    "show",
                    "pinned",
                    dir.join(map).to_str().unwrap(),
                ],
            )
            .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["max_entries"].as_u64(), Some(entries), "{map}: {v}");
        }
    }
    // Traffic through the first leaves the second's counters alone.
    let r = lab
        .agent_echo(&certs, &["--count", "40", "--burst", "10", "--size", "500"])
        .unwrap();
    assert_eq!(n(&r, "echoed_exact"), 40, "{r}");
    let ztna = bin_dir().join("ztna");
    let sessions = |dir: Option<&Path>| {
        let mut cmd = Command::new(&ztna);
        cmd.args(["sessions", "--json"]);
        if let Some(d) = dir {
            cmd.arg("--bpf-pin-dir").arg(d);
        }
        cmd.output().unwrap()
    };
    let parse = |o: std::process::Output| -> serde_json::Value {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let s1 = parse(sessions(Some(&dir1)));
    let s2 = parse(sessions(Some(&dir2)));
    assert!(s1["verdicts"]["tx"].as_u64().unwrap() > 0, "{s1}");
    assert_eq!(s2["verdicts"]["tx"].as_u64(), Some(0), "{s2}");
    assert_eq!(s2["entries"].as_array().map(Vec::len), Some(0), "{s2}");
    // Without the flag, two instances are ambiguous.
    let o = sessions(None);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("several intermediates") && err.contains("--bpf-pin-dir"),
        "{err}"
    );
    // The second one stops: its pins go, the first's stay and keep forwarding.
    lab.stop("intermediate2");
    assert!(!dir2.exists(), "{} left behind", dir2.display());
    assert!(dir1.join("ZTNA_RELAY").exists());
    let r = lab
        .agent_echo(&certs, &["--count", "20", "--burst", "10", "--size", "500"])
        .unwrap();
    assert_eq!(n(&r, "echoed_exact"), 20, "{r}");
    let s1b = parse(sessions(None));
    assert!(
        s1b["verdicts"]["tx"].as_u64().unwrap() > s1["verdicts"]["tx"].as_u64().unwrap(),
        "{s1b}"
    );
}
