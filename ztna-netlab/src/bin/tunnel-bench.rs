//! `cargo xtask bench tunnel --out FILE` (root): the same namespace pair (the relay
//! topology's agent and connector hosts), in one run, with no tunnel, with userspace
//! WireGuard (boringtun, the closest peer users would pick: this kernel has no
//! WireGuard module) and with ztna over each path. Per path: iperf3 TCP goodput with
//! 1 and 4 streams (10 s each), UDP packets per second (64-byte payloads, 5 s), ping
//! RTT p50/p99, CPU seconds per GB of the tunnel's processes during the 1-stream
//! run, and ztna's control handshake. JSON to FILE, a table on stdout.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use ztna_netlab::tunnel::WEB_VIP;
use ztna_netlab::{CONN_IP, Lab};

const TCP_SECS: &str = "10";
const UDP_SECS: &str = "5";
const WG_A: &str = "10.222.0.1";
const WG_C: &str = "10.222.0.2";

struct PathResult {
    tcp_mbps: f64,
    tcp4_mbps: f64,
    udp_pps: f64,
    rtt: (f64, f64),
    /// CPU seconds per GB: (agent side, connector side).
    cpu: Option<(f64, f64)>,
    handshake_ms: Option<f64>,
}

fn iperf(lab: &Lab, target: &str, extra: &[&str]) -> anyhow::Result<Value> {
    let mut args = vec!["-c", target, "-J"];
    args.extend_from_slice(extra);
    let out = lab.exec(&lab.ns("a"), "iperf3", &args)?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
}

/// Everything for one path: `pids` are the processes whose CPU counts
/// (agent side, connector side).
fn measure(
    lab: &Lab,
    target: &str,
    pids: Option<(Vec<u32>, Vec<u32>)>,
) -> anyhow::Result<PathResult> {
    let a = lab.ns("a");
    // Warm up (neighbours, NAT state, congestion window).
    lab.exec(&a, "ping", &["-c", "3", "-i", "0.05", target])?;
    let before = pids.as_ref().map(|(x, y)| {
        (
            x.iter()
                .map(|p| ztna_netlab::procstat::proc_cpu_s(*p))
                .sum::<f64>(),
            y.iter()
                .map(|p| ztna_netlab::procstat::proc_cpu_s(*p))
                .sum::<f64>(),
        )
    });
    let tcp = iperf(lab, target, &["-t", TCP_SECS])?;
    let after = pids.as_ref().map(|(x, y)| {
        (
            x.iter()
                .map(|p| ztna_netlab::procstat::proc_cpu_s(*p))
                .sum::<f64>(),
            y.iter()
                .map(|p| ztna_netlab::procstat::proc_cpu_s(*p))
                .sum::<f64>(),
        )
    });
    let bytes = tcp["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let gb = bytes / 1e9;
    let cpu = match (before, after) {
        (Some(b), Some(a)) if gb > 0.0 => Some(((a.0 - b.0) / gb, (a.1 - b.1) / gb)),
        _ => None,
    };
    let mbps = |v: &Value| {
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e6
    };
    let tcp4 = iperf(lab, target, &["-t", TCP_SECS, "-P", "4"])?;
    let udp = iperf(lab, target, &["-u", "-b", "0", "-l", "64", "-t", UDP_SECS])?;
    let s = &udp["end"]["sum"];
    let received = s["packets"].as_f64().unwrap_or(0.0) - s["lost_packets"].as_f64().unwrap_or(0.0);
    let udp_pps = received / s["seconds"].as_f64().unwrap_or(1.0).max(0.001);
    let out = lab.exec(&a, "ping", &["-c", "200", "-i", "0.01", target])?;
    let mut rtts: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split("time=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map(|ms| ms * 1000.0)
        .collect();
    let rtt = (percentile(&mut rtts, 50.0), percentile(&mut rtts, 99.0));
    Ok(PathResult {
        tcp_mbps: mbps(&tcp),
        tcp4_mbps: mbps(&tcp4),
        udp_pps,
        rtt,
        cpu,
        handshake_ms: None,
    })
}

fn no_tunnel() -> anyhow::Result<PathResult> {
    let mut lab = Lab::relay_topology("bn")?;
    let c = lab.ns("c");
    lab.spawn_program(&c, "iperf3", "iperf3", &["-s", "-B", CONN_IP])?;
    lab.wait_tcp(&c, format!("{CONN_IP}:5201").parse()?)?;
    measure(&lab, CONN_IP, None)
}

fn boringtun() -> anyhow::Result<PathResult> {
    let mut lab = Lab::relay_topology("bw")?;
    let (a, c) = (lab.ns("a"), lab.ns("c"));
    let keys = |tag: &str| -> anyhow::Result<(String, String)> {
        let private = ztna_netlab::sh("wg", &["genkey"])?;
        let private = String::from_utf8_lossy(&private.stdout).trim().to_string();
        let path = lab.dir.join(format!("{tag}.key"));
        std::fs::write(&path, &private)?;
        let out = std::process::Command::new("wg")
            .arg("pubkey")
            .stdin(std::fs::File::open(&path)?)
            .output()?;
        Ok((
            path.display().to_string(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    };
    let (ka, pa) = keys("a")?;
    let (kc, pc) = keys("c")?;
    let bt = which("boringtun-cli")?;
    for (ns, dev, name) in [(&a, "wga", "bt-agent"), (&c, "wgc", "bt-connector")] {
        let log = lab.dir.join(format!("{name}.out")).display().to_string();
        lab.spawn_program(
            ns,
            name,
            &bt,
            &[
                "--foreground",
                "--disable-drop-privileges",
                "--log",
                &log,
                dev,
            ],
        )?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(PathBuf::from("/var/run/wireguard/wga.sock").exists()
        && PathBuf::from("/var/run/wireguard/wgc.sock").exists())
    {
        if std::time::Instant::now() > deadline {
            bail!("boringtun did not create its UAPI sockets");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // `wg` talks to boringtun over its UAPI socket (no kernel module here).
    let setup = |ns: &str,
                 dev: &str,
                 key: &str,
                 port: &str,
                 peer: &str,
                 ip: &str,
                 endpoint: &str,
                 allowed: &str|
     -> anyhow::Result<()> {
        lab.exec(
            ns,
            "wg",
            &[
                "set",
                dev,
                "private-key",
                key,
                "listen-port",
                port,
                "peer",
                peer,
                "allowed-ips",
                allowed,
                "endpoint",
                endpoint,
            ],
        )?;
        lab.exec(ns, "ip", &["addr", "add", &format!("{ip}/24"), "dev", dev])?;
        lab.exec(ns, "ip", &["link", "set", dev, "mtu", "1420", "up"])?;
        Ok(())
    };
    setup(
        &a,
        "wga",
        &ka,
        "51820",
        &pc,
        WG_A,
        &format!("{CONN_IP}:51820"),
        &format!("{WG_C}/32"),
    )?;
    setup(
        &c,
        "wgc",
        &kc,
        "51820",
        &pa,
        WG_C,
        &format!("{}:51820", ztna_netlab::AGENT_IP),
        &format!("{WG_A}/32"),
    )?;
    lab.spawn_program(&c, "iperf3", "iperf3", &["-s", "-B", WG_C])?;
    lab.wait_tcp(&c, format!("{WG_C}:5201").parse()?)?;
    let pids = (
        vec![lab.pid("bt-agent").unwrap_or(0)],
        vec![lab.pid("bt-connector").unwrap_or(0)],
    );
    measure(&lab, WG_C, Some(pids))
}

fn which(bin: &str) -> anyhow::Result<String> {
    let out = ztna_netlab::sh("sh", &["-c", &format!("command -v {bin}")])
        .with_context(|| format!("{bin} not found: cargo install boringtun-cli"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// ztna with the agent's `flags` and the intermediate's `xdp`, expecting `path`.
fn ztna(tag: &str, xdp: &str, flags: &[&str], path: &str) -> anyhow::Result<PathResult> {
    let mut lab = Lab::relay_topology(tag)?;
    let stack = lab.start_tunnel_stack(xdp, "kernel", 1)?;
    lab.start_agent_up(&stack.certs, flags, &[])?;
    lab.wait_agent_path("web", path, Duration::from_secs(15))?;
    let pids = (
        vec![lab.pid("agent").unwrap_or(0)],
        vec![lab.pid("connector").unwrap_or(0)],
    );
    let mut r = measure(&lab, WEB_VIP, Some(pids))?;
    let now = lab.agent_path("web");
    if now.as_deref() != Some(path) {
        bail!("{path}: the agent moved to {now:?} during the run");
    }
    r.handshake_ms = lab.agent_status()?["handshake_ms"].as_f64();
    Ok(r)
}

/// One measured configuration.
type Run = Box<dyn Fn() -> anyhow::Result<PathResult>>;

fn main() -> anyhow::Result<()> {
    let out = std::env::args()
        .skip_while(|a| a != "--out")
        .nth(1)
        .context("usage: tunnel-bench --out FILE")?;
    let runs: Vec<(&str, Run)> = vec![
        ("no_tunnel", Box::new(no_tunnel)),
        ("boringtun", Box::new(boringtun)),
        ("direct", Box::new(|| ztna("bd", "native", &[], "direct"))),
        (
            "relay_xdp",
            Box::new(|| ztna("bx", "native", &["--no-p2p"], "relay-xdp")),
        ),
        (
            "relay_userspace",
            Box::new(|| ztna("bu", "off", &["--no-p2p"], "relay-userspace")),
        ),
        (
            "datagram",
            Box::new(|| ztna("bg", "off", &["--datagram-only"], "datagram")),
        ),
    ];
    let mut results: BTreeMap<&str, PathResult> = BTreeMap::new();
    for (name, run) in &runs {
        eprintln!("tunnel-bench: {name} ...");
        match run() {
            Ok(r) => {
                results.insert(name, r);
            }
            Err(e) => eprintln!("tunnel-bench: {name} failed: {e:#}"),
        }
    }
    let obj = |f: &dyn Fn(&PathResult) -> Value| -> Value {
        Value::Object(
            runs.iter()
                .map(|(n, _)| (n.to_string(), results.get(n).map_or(Value::Null, f)))
                .collect(),
        )
    };
    let round = |x: f64| {
        if x.is_finite() {
            json!((x * 100.0).round() / 100.0)
        } else {
            Value::Null
        }
    };
    let ztna_cpu = |side: usize| -> Value {
        Value::Object(
            ["direct", "relay_xdp", "relay_userspace", "datagram"]
                .iter()
                .filter_map(|p| {
                    let c = results.get(p)?.cpu?;
                    Some((p.to_string(), round(if side == 0 { c.0 } else { c.1 })))
                })
                .collect(),
        )
    };
    let report = json!({
        "tcp_mbps": obj(&|r| round(r.tcp_mbps)),
        "tcp4_mbps": obj(&|r| round(r.tcp4_mbps)),
        "udp_pps": obj(&|r| round(r.udp_pps)),
        "rtt_us": obj(&|r| json!({"p50": round(r.rtt.0), "p99": round(r.rtt.1)})),
        "cpu_s_per_gb": {
            "agent": ztna_cpu(0),
            "connector": ztna_cpu(1),
            "boringtun": results.get("boringtun").and_then(|r| r.cpu).map_or(Value::Null, |c| json!({"agent_side": round(c.0), "connector_side": round(c.1)})),
        },
        "handshake_ms": obj(&|r| r.handshake_ms.map_or(Value::Null, round)),
        "method": {
            "topology": "agent ns -- router ns -- connector ns (the relay ns on the router for relayed paths); veth, 2 vCPUs shared by everything",
            "tcp": format!("iperf3 -t {TCP_SECS}, 1 stream and -P 4; goodput = receiver bits per second"),
            "udp": format!("iperf3 -u -b 0 -l 64 -t {UDP_SECS}; received packets per second"),
            "rtt": "ping -i 0.01, 200 probes",
            "cpu": "utime+stime of the tunnel's processes during the 1-stream TCP run, per GB received",
            "boringtun": "boringtun-cli 0.7 on both hosts, configured with wg over its UAPI socket, MTU 1420",
            "ztna": "ztna-agent up (TUN, MTU 1280) and the connector in kernel mode (TUN + NAT), release build",
        },
    });
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!(
        "{:<16} {:>10} {:>10} {:>10} {:>9} {:>9} {:>12} {:>12}",
        "path",
        "TCP Mbit/s",
        "TCP x4",
        "UDP pps",
        "RTT p50",
        "RTT p99",
        "CPU s/GB ag",
        "CPU s/GB co"
    );
    for (name, _) in &runs {
        let Some(r) = results.get(name) else {
            println!("{name:<16} failed");
            continue;
        };
        let cpu = |i: usize| {
            r.cpu.map_or("-".into(), |c| {
                format!("{:.2}", if i == 0 { c.0 } else { c.1 })
            })
        };
        println!(
            "{name:<16} {:>10.0} {:>10.0} {:>10.0} {:>7.0}µs {:>7.0}µs {:>12} {:>12}",
            r.tcp_mbps,
            r.tcp4_mbps,
            r.udp_pps,
            r.rtt.0,
            r.rtt.1,
            cpu(0),
            cpu(1)
        );
    }
    let ratio = |a: &str, b: &str| -> Option<f64> {
        Some(results.get(a)?.tcp_mbps / results.get(b)?.tcp_mbps)
    };
    if let Some(x) = ratio("direct", "boringtun") {
        println!("ztna direct / boringtun TCP goodput: {x:.2} (aim: >= 1.00)");
    }
    if let Some(x) = ratio("relay_xdp", "direct") {
        println!("relay-xdp / direct TCP goodput: {x:.2} (aim: >= 0.90)");
    }
    println!("JSON: {out}");
    Ok(())
}
