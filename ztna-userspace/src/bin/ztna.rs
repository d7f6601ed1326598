//! ztna: operator tools: dev certificates, a UDP echo service.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(version, about = "ztna operator tools")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Generate a throwaway dev CA and certificates for the intermediate, an agent
    /// and a connector.
    GenCerts {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Services the agent and connector certificates cover (repeatable).
        #[arg(long = "service", default_value = "echo")]
        services: Vec<String>,
    },
    /// List relay sessions from an intermediate's pinned XDP maps: CIDs, peers,
    /// packets, bytes, last seen; and the per-verdict counters.
    Sessions {
        #[arg(long)]
        json: bool,
        /// The intermediate's pin directory (its --bpf-pin-dir) [default: the one
        /// instance under /sys/fs/bpf/ztna/].
        #[arg(long, env = "ZTNA_BPF_PIN_DIR")]
        bpf_pin_dir: Option<PathBuf>,
    },
    /// Run a UDP echo service.
    EchoServer {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ztna_userspace::logging::init("info");
    match args.cmd {
        Cmd::GenCerts { out, services } => {
            let pki = ztna_userspace::identity::generate_dev_pki(&out, &services)
                .with_context(|| format!("generating certificates in {}", out.display()))?;
            println!("CA:           {}", pki.ca_cert.display());
            println!(
                "intermediate: {} {}",
                pki.server_cert.display(),
                pki.server_key.display()
            );
            println!(
                "agent:        {} {}",
                pki.agent_cert.display(),
                pki.agent_key.display()
            );
            println!(
                "connector:    {} {}",
                pki.connector_cert.display(),
                pki.connector_key.display()
            );
            Ok(())
        }
        Cmd::Sessions { json, bpf_pin_dir } => sessions(json, bpf_pin_dir),
        Cmd::EchoServer { listen } => {
            let socket =
                std::net::UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
            socket.set_read_timeout(Some(std::time::Duration::from_millis(100)))?;
            eprintln!("echo service on udp {}", socket.local_addr()?);
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, stop.clone())?;
            }
            ztna_userspace::echo::serve(&socket, &AtomicU64::new(0), &stop);
            Ok(())
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The pin directory to read: the one given, or the only instance's.
fn pin_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(d) = given {
        return Ok(d);
    }
    let mut found = ztna_userspace::xdp::instance_pin_dirs();
    match found.len() {
        0 => anyhow::bail!(
            "no pinned relay maps under {} (is an intermediate running with --xdp?)",
            ztna_common::relay::PIN_ROOT
        ),
        1 => Ok(found.remove(0)),
        _ => anyhow::bail!(
            "several intermediates have pinned maps; choose one with --bpf-pin-dir: {}",
            found
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn sessions(json: bool, bpf_pin_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = pin_dir(bpf_pin_dir)?;
    let table = ztna_userspace::xdp::XdpTable::open(&dir).with_context(|| {
        format!(
            "no pinned relay maps in {} (is the intermediate running with --xdp?)",
            dir.display()
        )
    })?;
    let now = monotonic_ns();
    let mut rows = Vec::new();
    for e in table.entries() {
        let last = (e.last_seen_ns > 0).then(|| now.saturating_sub(e.last_seen_ns) as f64 / 1e9);
        rows.push(serde_json::json!({
            "session": e.session_id, "cid": hex(&e.cid), "from": e.expected.to_string(), "to": e.peer.to_string(),
            "packets": e.packets, "bytes": e.bytes, "last_seen_secs_ago": last,
        }));
    }
    rows.sort_by_key(|r| (r["session"].as_u64(), r["cid"].as_str().map(String::from)));
    let verdicts = ztna_userspace::xdp::verdict_counters(&dir)?;
    if json {
        let v: serde_json::Map<_, _> = verdicts
            .iter()
            .map(|(k, n)| (k.to_string(), (*n).into()))
            .collect();
        println!("{}", serde_json::json!({ "entries": rows, "verdicts": v }));
        return Ok(());
    }
    println!(
        "{:>8}  {:16}  {:21}  {:21}  {:>10}  {:>12}  {:>10}",
        "session", "relay cid", "from", "to", "packets", "bytes", "last seen"
    );
    for r in &rows {
        println!(
            "{:>8}  {:16}  {:21}  {:21}  {:>10}  {:>12}  {:>10}",
            r["session"],
            r["cid"].as_str().unwrap_or(""),
            r["from"].as_str().unwrap_or(""),
            r["to"].as_str().unwrap_or(""),
            r["packets"],
            r["bytes"],
            r["last_seen_secs_ago"]
                .as_f64()
                .map_or("never".into(), |s| format!("{s:.1}s ago")),
        );
    }
    println!(
        "\nverdicts: {}",
        verdicts
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
