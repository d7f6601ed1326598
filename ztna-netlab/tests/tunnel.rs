//! Privileged: real applications' traffic through the tunnel. `ztna-agent up` on a
//! TUN device in the agent namespace, the connector in kernel mode (TUN + NAT)
//! beside an HTTP server, the UDP echo service and iperf3 (see
//! `ztna_netlab::tunnel`). curl, ping and iperf3 are the real programs.
//! Marked `#[ignore]`: `cargo xtask test` runs them (with `--ignored`) as root.

use std::time::{Duration, Instant};

use ztna_netlab::tunnel::{ECHO_VIP, HTTP_PORT, SECRET_VIP, WEB_VIP};
use ztna_netlab::{Lab, n};

const BLOB_MIB: usize = 50;

fn url() -> String {
    format!("http://{WEB_VIP}:{HTTP_PORT}/blob")
}

fn web_of(status: &serde_json::Value) -> Option<&serde_json::Value> {
    status["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == "web")
}

/// One 50 MiB download over the path the agent's `flags` lead to.
fn download_over(tag: &str, xdp: &str, flags: &[&str], path: &str) {
    let mut lab = Lab::relay_topology(tag).expect("topology");
    let stack = lab
        .start_tunnel_stack(xdp, "kernel", BLOB_MIB)
        .expect("stack");
    lab.start_agent_up(&stack.certs, flags, &[])
        .expect("agent up");
    lab.wait_agent_path("web", path, Duration::from_secs(15))
        .expect("path");
    let (sha, took) = lab.fetch(&url(), &[]).expect("download");
    assert_eq!(sha, stack.sha256, "the file arrived intact over {path}");
    let status = lab.wait_agent_status(Duration::from_secs(3), |s| {
        web_of(s).is_some_and(|w| n(&w["traffic"], "rx_bytes") > (BLOB_MIB as u64) << 20)
    });
    let web = web_of(&status).expect("web in the status").clone();
    assert_eq!(web["path"], path, "still on {path}: {web}");
    assert!(
        n(&web["traffic"], "rx_bytes") > (BLOB_MIB as u64) << 20,
        "the download went through the tunnel: {web}"
    );
    eprintln!(
        "{path}: {BLOB_MIB} MiB in {took:?} ({:.1} Mbit/s)",
        (BLOB_MIB as f64 * 8.0 * 1.048576) / took.as_secs_f64()
    );
}

#[test]
#[ignore = "needs root: network namespaces, TUN, nftables"]
fn curl_downloads_50_mib_intact_over_the_direct_path() {
    download_over("td", "native", &[], "direct");
}

#[test]
#[ignore = "needs root: network namespaces, TUN, nftables, XDP"]
fn curl_downloads_50_mib_intact_over_the_xdp_relay() {
    download_over("tx", "native", &["--no-p2p"], "relay-xdp");
}

#[test]
#[ignore = "needs root: network namespaces, TUN, nftables"]
fn curl_downloads_50_mib_intact_over_the_userspace_relay() {
    download_over("tu", "off", &["--no-p2p"], "relay-userspace");
}

#[test]
#[ignore = "needs root: network namespaces, TUN, nftables"]
fn curl_downloads_50_mib_intact_over_the_datagram_relay() {
    download_over("tg", "off", &["--datagram-only"], "datagram");
}

#[test]
#[ignore = "needs root: network namespaces, TUN, nftables"]
fn ping_iperf3_refused_ports_and_unauthorized_services() {
    let mut lab = Lab::relay_topology("tp").expect("topology");
    let stack = lab.start_tunnel_stack("off", "kernel", 1).expect("stack");
    // The agent also asks for "secret", which its certificate does not cover.
    lab.start_agent_up(&stack.certs, &[], &["secret"])
        .expect("agent up");
    let a = lab.ns("a");

    // ping of a service address is answered (by the backend host, through NAT).
    let out = lab
        .exec(&a, "ping", &["-c", "3", "-i", "0.2", "-W", "2", WEB_VIP])
        .expect("ping answered");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" 3 received"), "{text}");

    // iperf3 TCP and UDP runs complete.
    for udp in [false, true] {
        let mut args = vec!["-c", WEB_VIP, "-t", "2", "-J"];
        if udp {
            args.extend(["-u", "-b", "20M"]);
        }
        let out = lab.exec(&a, "iperf3", &args).expect("iperf3 run");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let end = &v["end"];
        let bytes = if udp {
            end["sum"]["bytes"].as_u64()
        } else {
            end["sum_received"]["bytes"].as_u64()
        };
        assert!(
            bytes.unwrap_or(0) > 1_000_000,
            "iperf3 {}: {end}",
            if udp { "UDP" } else { "TCP" }
        );
    }

    // UDP to a backend on the connector's own loopback (DNAT to 127.0.0.1).
    let py = format!(
        "import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(3);\
         s.sendto(b'over the tunnel',('{ECHO_VIP}',7));print(s.recvfrom(100)[0].decode())"
    );
    let out = lab
        .exec(&a, "python3", &["-c", &py])
        .expect("UDP echo answered");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "over the tunnel"
    );

    // A backend port nothing listens on: a prompt "connection refused".
    lab.assert_refused_promptly();

    // Not authorized for "secret": refused at registration, no route for it...
    lab.wait_log(
        "agent",
        "registration for \"secret\" refused",
        Duration::from_secs(5),
    )
    .expect("NACK logged");
    let route = lab.exec(&a, "ip", &["route", "get", SECRET_VIP]).unwrap();
    assert!(
        !String::from_utf8_lossy(&route.stdout).contains("ztna0"),
        "no route into the tunnel for an unauthorized service"
    );
    // ...and sent anyway (a route by hand), ICMP administratively prohibited.
    lab.exec(&a, "ip", &["route", "add", SECRET_VIP, "dev", "ztna0"])
        .unwrap();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{a}"))
        .args(["ping", "-c", "1", "-W", "2", SECRET_VIP])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Packet filtered"),
        "ICMP code 13 reported by ping: {text}"
    );
    let status = lab.wait_agent_status(Duration::from_secs(3), |s| n(s, "tun_no_route") >= 1);
    assert!(n(&status, "tun_no_route") >= 1, "{status}");
    // The connector never saw it.
    assert!(!lab.log("connector").contains(SECRET_VIP));
}

#[test]
#[ignore = "needs root: network namespaces, TUN, nftables, iptables"]
fn tcp_download_survives_a_cut_of_the_direct_path_and_its_restore() {
    let mut lab = Lab::relay_topology("tc").expect("topology");
    let stack = lab
        .start_tunnel_stack("native", "kernel", 40)
        .expect("stack");
    lab.start_agent_up(&stack.certs, &[], &[])
        .expect("agent up");
    lab.wait_agent_path("web", "direct", Duration::from_secs(15))
        .expect("direct first");
    let (a, r) = (lab.ns("a"), lab.ns("r"));
    let got = lab.dir.join("cut-download");
    let got_s = got.display().to_string();
    // 40 MiB at 4 MiB/s: about 10 s, long enough for a cut and a restore.
    lab.spawn_program(
        &a,
        "curl",
        "curl",
        &[
            "-sS",
            "--fail",
            "--limit-rate",
            "4M",
            "--max-time",
            "120",
            "-o",
            &got_s,
            &url(),
        ],
    )
    .unwrap();
    let size = || std::fs::metadata(&got).map_or(0, |m| m.len());
    let deadline = Instant::now() + Duration::from_secs(10);
    while size() < 4 << 20 {
        assert!(
            Instant::now() < deadline,
            "download started: {}",
            lab.log("curl")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Cut everything between the agent's and the connector's links in the router;
    // the relay stays reachable.
    let rule = |op: &str| {
        for (i, o) in [("a1", "c1"), ("c1", "a1")] {
            lab.exec(
                &r,
                "iptables",
                &[op, "FORWARD", "-i", i, "-o", o, "-j", "DROP"],
            )
            .unwrap();
        }
    };
    rule("-I");
    let cut_at = Instant::now();
    lab.wait_agent_path("web", "relay-xdp", Duration::from_secs(3))
        .expect("fell back to the relay within 3 s");
    let fallback = cut_at.elapsed();
    assert!(
        size() < 40 << 20,
        "still downloading when the path fell back"
    );
    rule("-D");
    lab.wait_agent_path("web", "direct", Duration::from_secs(10))
        .expect("direct again after the restore");
    let status = lab
        .wait_exit("curl", Duration::from_secs(60))
        .expect("curl ends");
    assert!(status.success(), "no reset, no error: {}", lab.log("curl"));
    assert_eq!(
        ztna_netlab::tunnel::sha256(&got).unwrap(),
        stack.sha256,
        "intact"
    );
    let s = lab.agent_status().unwrap();
    let history: Vec<&str> = web_of(&s).unwrap()["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["path"].as_str())
        .collect();
    let tail: Vec<&str> = history.iter().rev().take(3).rev().copied().collect();
    assert_eq!(tail, ["direct", "relay-xdp", "direct"], "{history:?}");
    eprintln!("fell back in {fallback:?}; history {history:?}");
}

#[test]
#[ignore = "needs root: network namespaces, TUN, setpriv"]
fn unprivileged_connector_serves_the_same_download_in_userspace_mode() {
    let mut lab = Lab::relay_topology("tn").expect("topology");
    let stack = lab
        .start_tunnel_stack("off", "unprivileged", BLOB_MIB)
        .expect("stack");
    let pid = lab.pid("connector").unwrap();
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        proc_status.contains("CapEff:\t0000000000000000"),
        "{proc_status}"
    );
    lab.wait_log(
        "connector",
        "using the userspace mode",
        Duration::from_secs(5),
    )
    .expect("the connector says why it chose the userspace mode");
    lab.start_agent_up(&stack.certs, &[], &[])
        .expect("agent up");
    lab.wait_agent_path("web", "direct", Duration::from_secs(15))
        .expect("direct");
    let (sha, took) = lab.fetch(&url(), &[]).expect("download");
    assert_eq!(sha, stack.sha256, "intact through the userspace TCP stack");
    eprintln!("userspace mode: {BLOB_MIB} MiB in {took:?}");
    // The connector dials the backend first: a closed port is a prompt refusal.
    let a = lab.ns("a");
    lab.assert_refused_promptly();
    // ping is answered by the connector itself.
    lab.exec(&a, "ping", &["-c", "2", "-i", "0.2", "-W", "2", WEB_VIP])
        .expect("ping answered");
}
