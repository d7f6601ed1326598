//! Privileged: full echoes agent ns → relay ns → connector ns through the forwarded
//! relay, with the XDP program attached (native and generic) and with `--xdp off`.
//! Marked `#[ignore]`: `cargo xtask test` runs them (with `--ignored`) when root and
//! reports them as skipped otherwise.

use std::time::{Duration, Instant};

use ztna_netlab::{Lab, n};

fn echo_ok(report: &serde_json::Value, count: u64) {
    assert!(
        report["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("relay-")),
        "{report}"
    );
    assert_eq!(n(report, "sent"), count, "{report}");
    assert_eq!(n(report, "echoed_exact"), count, "{report}");
    assert_eq!(n(report, "corrupted"), 0, "{report}");
}

fn xdp(stats: &serde_json::Value, verdict: &str) -> u64 {
    stats["xdp_verdicts"][verdict].as_u64().unwrap_or(0)
}

fn relay_through_xdp(mode: &str) {
    let mut lab = Lab::relay_topology(&mode[..1]).expect("topology");
    let certs = lab.start_relay_stack(mode).expect("stack");
    assert!(
        lab.log("intermediate")
            .contains(&format!("XDP relay attached in {mode} mode")),
        "{}",
        lab.log("intermediate")
    );
    // First run: sets up the neighbour entries the fib lookups need.
    let r = lab
        .agent_echo(
            &certs,
            &["--count", "20", "--burst", "10", "--size", "1000"],
        )
        .unwrap();
    echo_ok(&r, 20);
    let s1 = lab.fresh_relay_stats().unwrap();
    assert_eq!(s1["xdp_mode"], mode);
    assert!(xdp(&s1, "tx") >= 40, "{s1}");
    // Second run: a new session, every packet of it forwarded in XDP.
    let r = lab
        .agent_echo(
            &certs,
            &["--count", "300", "--burst", "20", "--size", "1000"],
        )
        .unwrap();
    echo_ok(&r, 300);
    let s2 = lab.fresh_relay_stats().unwrap();
    let tx = xdp(&s2, "tx") - xdp(&s1, "tx");
    assert!(tx >= 600, "XDP forwarded only {tx} packets: {s2}");
    assert_eq!(
        n(&s2, "userspace_forwarded_packets"),
        n(&s1, "userspace_forwarded_packets"),
        "the userspace forwarder saw packets after setup: {s2}"
    );
    assert_eq!(n(&s2, "relay_sessions_created"), 2);
    // The intermediate never decrypted the data: its datagram relay is idle.
    assert_eq!(n(&s2, "relayed_to_connector"), 0, "{s2}");
    assert_eq!(xdp(&s2, "aborted"), 0);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn echo_through_xdp_native_relay() {
    relay_through_xdp("native");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn echo_through_xdp_generic_relay() {
    relay_through_xdp("generic");
}

/// ZTNA_LOCAL_ADDRS of the running intermediate, as addresses.
fn local_addrs() -> Vec<std::net::Ipv4Addr> {
    let out = ztna_netlab::sh(
        "bpftool",
        &[
            "-j",
            "map",
            "dump",
            "pinned",
            &format!(
                "/sys/fs/bpf/ztna/{}/ZTNA_LOCAL_ADDRS",
                ztna_netlab::RELAY_PORT
            ),
        ],
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut addrs: Vec<std::net::Ipv4Addr> = v
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|e| {
            let k = e["formatted"]["key"]
                .as_u64()
                .unwrap_or_else(|| panic!("{v}"));
            std::net::Ipv4Addr::from((k as u32).to_ne_bytes())
        })
        .collect();
    addrs.sort();
    addrs
}

/// Polls `local_addrs()` until it equals `want` (5 s).
fn wait_local_addrs(want: &[&str]) {
    let want: Vec<std::net::Ipv4Addr> = want.iter().map(|a| a.parse().unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = local_addrs();
    while now != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        now = local_addrs();
    }
    assert_eq!(now, want, "ZTNA_LOCAL_ADDRS");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn wildcard_bound_relay_forwards_to_its_interface_addresses_as_they_change() {
    let mut lab = Lab::relay_topology("w").expect("topology");
    let certs = lab
        .start_relay_stack_on("generic", "0.0.0.0")
        .expect("stack");
    // Bound to 0.0.0.0: the program's own addresses are x0's.
    wait_local_addrs(&[ztna_netlab::RELAY_IP]);
    let r = lab
        .agent_echo(
            &certs,
            &["--count", "20", "--burst", "10", "--size", "1000"],
        )
        .unwrap();
    echo_ok(&r, 20);
    let s = lab.fresh_relay_stats().unwrap();
    assert!(xdp(&s, "tx") >= 40, "{s}");
    assert_eq!(xdp(&s, "pass_not_local_address"), 0, "{s}");
    // Addresses added to and removed from x0 follow within a second or two.
    let x = lab.ns("x");
    lab.exec(&x, "ip", &["addr", "add", "10.201.0.77/24", "dev", "x0"])
        .unwrap();
    wait_local_addrs(&[ztna_netlab::RELAY_IP, "10.201.0.77"]);
    lab.exec(&x, "ip", &["addr", "del", "10.201.0.77/24", "dev", "x0"])
        .unwrap();
    wait_local_addrs(&[ztna_netlab::RELAY_IP]);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn echo_through_userspace_forwarder_with_xdp_off() {
    let mut lab = Lab::relay_topology("o").expect("topology");
    let certs = lab.start_relay_stack("off").expect("stack");
    let r = lab
        .agent_echo(
            &certs,
            &["--count", "200", "--burst", "20", "--size", "1000"],
        )
        .unwrap();
    echo_ok(&r, 200);
    let s = lab.fresh_relay_stats().unwrap();
    assert_eq!(s["xdp_mode"], "off");
    assert!(s.get("xdp_verdicts").is_none());
    assert!(n(&s, "userspace_forwarded_packets") >= 400, "{s}");
    assert_eq!(n(&s, "relayed_to_connector"), 0, "{s}");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn bpftool_dumps_entries_by_field_name_and_sessions_lists_them() {
    let mut lab = Lab::relay_topology("b").expect("topology");
    let certs = lab.start_relay_stack("generic").expect("stack");
    // A long-running agent keeps one session open while we look.
    let c = |f: &str| certs.join(f).display().to_string();
    let agent = ztna_netlab::bin_dir().join("ztna-agent");
    let mut child = lab
        .command(&lab.ns("a"), &agent)
        .args([
            "--server",
            &format!("{}:{}", ztna_netlab::RELAY_IP, ztna_netlab::RELAY_PORT),
        ])
        .args([
            "--ca",
            &c("ca.pem"),
            "--cert",
            &c("agent.pem"),
            "--key",
            &c("agent.key"),
        ])
        .args([
            "--service",
            "echo",
            "echo",
            "--dst",
            "10.100.0.1:7",
            "--count",
            "400",
            "--interval-ms",
            "20",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut dump = String::new();
    while Instant::now() < deadline {
        let out = ztna_netlab::sh(
            "bpftool",
            &[
                "map",
                "dump",
                "pinned",
                &format!("/sys/fs/bpf/ztna/{}/ZTNA_RELAY", ztna_netlab::RELAY_PORT),
            ],
        );
        if let Ok(o) = out {
            dump = String::from_utf8_lossy(&o.stdout).to_string();
            if dump.contains("peer_addr") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for field in [
        "cid",
        "peer_addr",
        "expected_src_addr",
        "peer_port",
        "expected_src_port",
        "session_id",
    ] {
        assert!(
            dump.contains(field),
            "bpftool output lacks {field}:\n{dump}"
        );
    }
    // The loader wrote the relay's bound address, and only that, as its own.
    assert_eq!(
        local_addrs(),
        [ztna_netlab::RELAY_IP.parse::<std::net::Ipv4Addr>().unwrap()]
    );
    // List the sessions until the XDP counters show forwarded packets.
    let sessions = ztna_netlab::bin_dir().join("ztna");
    let list = || -> serde_json::Value {
        let out = std::process::Command::new(&sessions)
            .args(["sessions", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut v = list();
    while !v["entries"]
        .as_array()
        .is_some_and(|e| e.iter().any(|e| n(e, "packets") > 0))
        && Instant::now() < deadline
    {
        v = list();
    }
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{v}");
    assert!(
        entries
            .iter()
            .all(|e| e["cid"].as_str().unwrap().starts_with("a5")),
        "{v}"
    );
    assert!(entries.iter().any(|e| n(e, "packets") > 0), "{v}");
    assert!(
        entries
            .iter()
            .any(|e| e["to"].as_str().unwrap().starts_with(ztna_netlab::AGENT_IP)),
        "{v}"
    );
    assert!(v["verdicts"]["tx"].as_u64().unwrap() > 0, "{v}");
    let text = std::process::Command::new(&sessions)
        .arg("sessions")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("relay cid") && text.contains("packets"),
        "{text}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn echo_over_ipv6_through_xdp_native_relay() {
    use ztna_netlab::{RELAY_IP6, RELAY_PORT};
    let mut lab = Lab::relay_topology("6").expect("topology");
    lab.add_ipv6().expect("IPv6 addresses");
    // Bound to the IPv6 wildcard (dual-stack): its IPv6 address comes from x0's.
    let server = format!("[{RELAY_IP6}]:{RELAY_PORT}");
    let certs = lab
        .start_relay_stack_at("native", &format!("[::]:{RELAY_PORT}"), &server)
        .expect("stack");
    assert!(
        lab.log("intermediate")
            .contains("XDP relay attached in native mode"),
        "{}",
        lab.log("intermediate")
    );
    let echo = |count: &str| {
        ztna_netlab::echo_report(
            lab.agent_echo_command_to(
                &certs,
                &server,
                &["--count", count, "--burst", "10", "--size", "1000"],
            )
            .output()
            .unwrap(),
        )
        .unwrap()
    };
    // First run: neighbour entries for the route lookups.
    echo_ok(&echo("20"), 20);
    let s1 = lab.fresh_relay_stats().unwrap();
    assert_eq!(s1["xdp_mode"], "native");
    // Both endpoints reached the relay over IPv6 (the agent from its IPv6 address),
    // so the session's entries went to the kernel's IPv6 table.
    let log = lab.log("intermediate");
    assert!(log.contains(ztna_netlab::AGENT_IP6), "{log}");
    assert_eq!(n(&s1, "kernel_mixed_family_entries"), 0, "{s1}");
    // Second run: a new session, every packet of it forwarded in XDP, and the agent
    // told so (SESSION_PATH).
    let r2 = echo("300");
    echo_ok(&r2, 300);
    assert_eq!(r2["path"], "relay-xdp", "{r2}");
    let s2 = lab.fresh_relay_stats().unwrap();
    let tx = xdp(&s2, "tx") - xdp(&s1, "tx");
    assert!(tx >= 600, "XDP forwarded only {tx} IPv6 packets: {s2}");
    assert_eq!(
        n(&s2, "userspace_forwarded_packets"),
        n(&s1, "userspace_forwarded_packets"),
        "the userspace forwarder saw packets after setup: {s2}"
    );
    assert_eq!(n(&s2, "relay_sessions_created"), 2);
    assert_eq!(n(&s2, "relayed_to_connector"), 0, "{s2}");
    assert_eq!(xdp(&s2, "aborted"), 0);
    assert_eq!(xdp(&s2, "pass_zero_udp_checksum"), 0);
}

/// `Lab::relay_topology_queues`: queues follow CPUs (XPS on every veth end), so what
/// two CPUs send to the relay arrives on two receive queues of x0 (veth counts them
/// while a program is attached in native mode).
#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn a_two_queue_lab_takes_a_queue_per_cpu() {
    if ztna_netlab::procstat::ncpu() < 2 {
        eprintln!("SKIPPED: a_two_queue_lab_takes_a_queue_per_cpu: needs 2 CPUs");
        return;
    }
    let mut lab = Lab::relay_topology_queues("q", 2).expect("topology");
    let (x, a) = (lab.ns("x"), lab.ns("a"));
    lab.attach_pass(&x, "x0").unwrap();
    let before = lab.rx_queue_packets(&x, "x0").unwrap();
    assert_eq!(before.len(), 2, "{before:?}");
    for cpu in [0usize, 1] {
        ztna_netlab::in_netns(&a, move || {
            // SAFETY: cpu_set_t is plain data; sched_setaffinity(0 = this thread).
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                assert_eq!(
                    libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
                    0
                );
            }
            let s = std::net::UdpSocket::bind((ztna_netlab::AGENT_IP, 0))?;
            for _ in 0..100 {
                s.send_to(b"queue", (ztna_netlab::RELAY_IP, ztna_netlab::RELAY_PORT))?;
            }
            Ok(())
        })
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = lab.rx_queue_packets(&x, "x0").unwrap();
        let grew: Vec<u64> = now.iter().zip(&before).map(|(n, b)| n - b).collect();
        if grew.iter().all(|g| *g >= 100) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "x0 receive queues grew by {grew:?}, not 100 each"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
