//! Relay benchmark: the same load through each relay path, side by side in one run.
//! Run with `cargo xtask bench relay --out FILE [-- ARGS]` (root; release binaries
//! from $ZTNA_BIN_DIR); ARGS: `--senders N` (default 2), `--scaling LIST` (default
//! 1,2,4,... up to the CPUs; `none` skips the step), `--only-capacity`.
//!
//! Paths, each in a fresh namespace lab (`Lab::relay_topology_queues`, N queues on
//! every veth, N = the senders):
//! - XDP native, XDP generic and the userspace forwarder (`--xdp off`, with
//!   `--forwarder-threads N`) serve static relay sessions (`--static-session A=B`, one
//!   per sender socket). Load: QUIC-short-header-shaped UDP payloads (0x40, the 8-byte
//!   relay CID, filler) sent with sendmmsg from N sender threads in the agent
//!   namespace to the relay, counted by recvmmsg receivers in the connector namespace;
//!   the flows' ports are picked so that each takes a queue (and a forwarder socket)
//!   of its own (`spread.rs`).
//! - The datagram relay (the original protocol: DATAGRAMs on the QUIC control
//!   connections, decrypted and re-encrypted by the intermediate), driven by an
//!   in-process load: `ztna_userspace::agent::Agent`s (the real agent code) sending
//!   tunneled UDP packets open-loop to a connector whose service backend is a
//!   recvmmsg receiver in the connector namespace.
//!
//! Steps, one module each: `capacity` (concurrent sessions), `paths` (per forwarded
//! path: delivered pps at saturation, relay CPU per packet at a fixed offered load
//! against the same load sent directly, RTT; the program's own cost under
//! BPF_PROG_TEST_RUN, `prog`), `datagram` (the datagram relay), `scaling` (delivered
//! pps per forwarded path for 1, 2, 4, ... senders, queues and forwarder threads).
//! Measurement windows and CPU accounting in `window`, the load in `load`, RTT in
//! `rtt`, the report (JSON to --out, an SVG next to it, a table on stdout) in
//! `report`. Fails (non-zero) if a path delivered nothing or a setup step failed; a
//! missed target is only reported.
//!
//! The host is shared (2 vCPUs, other work may run): every window records how much
//! CPU went to processes outside the lab, and a disturbed window is measured again.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};
use ztna_netlab::procstat::ncpu;
use ztna_netlab::xdp_run::{frame, quic_short};
use ztna_netlab::{Lab, RELAY_PORT};

use load::{join, measure};
use window::{Window, least_disturbed, round2, round3};

mod capacity;
mod datagram;
mod load;
mod paths;
mod prog;
mod report;
mod rtt;
mod scaling;
mod spread;
mod window;

/// Sender threads of the forwarded paths when `--senders` is not given.
const DEFAULT_SENDERS: usize = 2;
/// sendmmsg / recvmmsg batch.
const BATCH: usize = 64;
/// UDP payload of every generated packet.
const PAYLOAD: usize = 64;
/// Load runs this long before a measurement window opens.
const WARMUP: Duration = Duration::from_millis(500);
const SATURATION: Duration = Duration::from_secs(4);
/// Offered load of the CPU measurement (every path carries it).
const CPU_RATE_PPS: u64 = 50_000;
const CPU_WINDOW: Duration = Duration::from_secs(4);
/// Relay and direct-baseline CPU windows alternate this many times per path.
const CPU_ROUNDS: usize = 2;
/// A window in which processes outside the lab used more than this share of all
/// CPU time is measured again (up to the attempts below).
const EXTERNAL_MAX: f64 = 0.05;
const SATURATION_ATTEMPTS: usize = 2;
const CPU_ATTEMPTS: usize = 2;
const PINGS: usize = 2000;
/// In-process agents driving the datagram relay.
const DGRAM_AGENTS: usize = 2;
const TEST_RUN_REPEAT: u32 = 1_000_000;
const TEST_RUNS: usize = 7;

const RELAY: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const AGENT: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
const CONN: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 2);

/// Static session A (as text) → (relay CID A→B, relay CID B→A).
type Cids = ztna_netlab::StaticSessions;

fn relay_addr() -> SocketAddrV4 {
    SocketAddrV4::new(RELAY, RELAY_PORT)
}

/// The ping-pong pair of the RTT measurement.
fn rtt_addrs() -> (SocketAddrV4, SocketAddrV4) {
    (
        SocketAddrV4::new(AGENT, 6100),
        SocketAddrV4::new(CONN, 7100),
    )
}

/// `--static-session R=R` with R the relay itself: the packet relay → relay.
fn self_session() -> (SocketAddrV4, SocketAddrV4) {
    (relay_addr(), relay_addr())
}

/// `--static-session P=P` with P a routed peer: the packet P → P is rewritten onto
/// itself too, and P's route resolves (the relay's own address is a local route,
/// which bpf_fib_lookup does not forward to).
fn routed_session() -> (SocketAddrV4, SocketAddrV4) {
    let p = SocketAddrV4::new(CONN, RELAY_PORT);
    (p, p)
}

/// Where the labs' intermediates pin their maps (`--bpf-pin-dir`): this run's own
/// directory, as the default one (by port) is shared with every other intermediate on
/// the relay port of any lab on the machine, whose start or exit removes its pins.
fn pin_dir() -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/ztna-relay-bench-{}",
        std::process::id()
    ))
}

/// The forwarded paths: `--xdp` mode and JSON key.
const PATHS: [(&str, &str); 3] = [
    ("native", "xdp_native"),
    ("generic", "xdp_generic"),
    ("off", "userspace"),
];

fn path_key(mode: &str) -> &'static str {
    PATHS
        .iter()
        .find(|(m, _)| *m == mode)
        .map_or("userspace", |(_, k)| k)
}

/// Results of the whole run.
#[derive(Default)]
struct Results {
    out: Map<String, Value>,
    rtt: Map<String, Value>,
    skipped: Map<String, Value>,
    errors: Map<String, Value>,
    /// Path → (saturation window, CPU window, direct-baseline CPU window).
    windows: HashMap<&'static str, (Window, Window, Option<Window>)>,
    /// Sender threads (and queues, forwarder threads) of the forwarded paths.
    senders: usize,
}

/// The command line.
struct Args {
    out: PathBuf,
    /// The steps to run (`--only`); all when empty.
    only: Vec<String>,
    senders: usize,
    scaling: Vec<usize>,
}

const USAGE: &str = "relay-bench --out FILE [--senders N] [--scaling N,N,...|none] [--only STEP,...] [--only-capacity]   (root; ztna binaries from $ZTNA_BIN_DIR; steps: capacity, paths, datagram, scaling)";

const STEPS: [&str; 4] = ["capacity", "paths", "datagram", "scaling"];

/// 1, 2, 4, ... up to the CPUs, and the CPU count itself if it is not a power of 2.
fn default_scaling() -> Vec<usize> {
    let cpus = ncpu();
    let mut v: Vec<usize> = std::iter::successors(Some(1usize), |n| Some(n * 2))
        .take_while(|n| *n <= cpus)
        .collect();
    if v.last() != Some(&cpus) {
        v.push(cpus);
    }
    v
}

fn parse_args() -> anyhow::Result<Option<Args>> {
    let mut args = std::env::args().skip(1);
    let mut out = None;
    let mut only = Vec::new();
    let mut senders = DEFAULT_SENDERS;
    let mut scaling = default_scaling();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = args.next().map(PathBuf::from),
            "--only-capacity" => only = vec!["capacity".to_string()],
            "--only" => {
                let v = args.next().context("--only takes a list of steps")?;
                only = v.split(',').map(|s| s.trim().to_string()).collect();
                if let Some(s) = only.iter().find(|s| !STEPS.contains(&s.as_str())) {
                    bail!("--only: unknown step {s:?} (steps: {})", STEPS.join(", "));
                }
            }
            "--senders" => {
                senders = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n >= 1)
                    .context("--senders takes a number of at least 1")?;
            }
            "--scaling" => {
                let v = args.next().context("--scaling takes a list")?;
                scaling = if v == "none" {
                    Vec::new()
                } else {
                    v.split(',')
                        .map(|n| n.trim().parse::<usize>().ok().filter(|n| *n >= 1))
                        .collect::<Option<Vec<_>>>()
                        .with_context(|| format!("--scaling {v:?}: expected N,N,... or none"))?
                };
                if let Some(n) = scaling.iter().find(|n| **n > ncpu()) {
                    bail!(
                        "--scaling: {n} senders on {} CPUs (at most one per CPU)",
                        ncpu()
                    );
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?} (usage: {USAGE})"),
        }
    }
    Ok(Some(Args {
        out: out.context("--out FILE is required")?,
        only,
        senders,
        scaling,
    }))
}

fn write_json(path: &std::path::Path, res: &Results) -> anyhow::Result<()> {
    std::fs::write(
        path,
        serde_json::to_string_pretty(&Value::Object(res.out.clone()))? + "\n",
    )
    .with_context(|| format!("writing {}", path.display()))
}

fn main() -> anyhow::Result<()> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    let out_path = args.out.clone();
    if !ztna_netlab::is_root() {
        bail!("relay-bench needs root (network namespaces, XDP, bpf(2))");
    }
    for bin in ["ztna", "ztna-intermediate", "ztna-connector"] {
        let p = ztna_netlab::bin_dir().join(bin);
        if !p.exists() {
            bail!(
                "{} missing (build with `cargo build --release -p ztna-userspace`, set ZTNA_BIN_DIR)",
                p.display()
            );
        }
    }
    let started = Instant::now();
    let mut res = Results {
        senders: args.senders,
        ..Default::default()
    };
    let have_ebpf = ztna_userspace::xdp::embedded_object().is_some();
    let runs = |step: &str| args.only.is_empty() || args.only.iter().any(|s| s == step);
    if !runs("capacity") {
        // Not asked for.
    } else if have_ebpf {
        eprintln!("relay-bench: capacity");
        if let Err(e) = capacity::capacity(&mut res) {
            res.errors
                .insert("capacity".into(), json!(format!("{e:#}")));
        }
    } else {
        res.skipped
            .insert("capacity".into(), json!("this build has no eBPF object"));
    }
    if args.only == ["capacity"] {
        res.out.insert(
            "duration_s".into(),
            json!(started.elapsed().as_secs_f64().round()),
        );
        write_json(&out_path, &res)?;
        println!("wrote {}", out_path.display());
        if !res.errors.is_empty() {
            bail!("capacity failed: {:?}", res.errors);
        }
        return Ok(());
    }
    for (mode, key) in PATHS.into_iter().filter(|_| runs("paths")) {
        if mode != "off" && !have_ebpf {
            res.skipped.insert(
                key.into(),
                json!("this build has no eBPF object (run `cargo xtask build-ebpf`, then rebuild ztna-userspace)"),
            );
            continue;
        }
        eprintln!("relay-bench: path {key}");
        if let Err(e) = paths::relay_path(mode, &mut res) {
            let msg = format!("{e:#}");
            eprintln!("relay-bench: {key} FAILED: {msg}");
            if msg.contains("no eBPF object") {
                res.skipped.insert(key.into(), json!(msg));
            } else {
                res.errors.insert(key.into(), json!(msg));
            }
        }
    }
    if runs("paths") && !res.out.contains_key("prog_test_run") {
        res.skipped.insert(
            "prog_test_run".into(),
            json!("runs in the XDP native lab, which did not run"),
        );
    }
    if runs("datagram") {
        eprintln!("relay-bench: path datagram_relay");
        if let Err(e) = datagram::datagram_relay(&mut res) {
            let msg = format!("{e:#}");
            eprintln!("relay-bench: datagram_relay FAILED: {msg}");
            res.errors.insert("datagram_relay".into(), json!(msg));
        }
    }
    if runs("scaling") && !args.scaling.is_empty() {
        scaling::scaling(&mut res, &args.scaling, have_ebpf);
    }
    // A path that ran but delivered nothing is a failure.
    for (k, (sat, cpu, _)) in &res.windows {
        if sat.delivered == 0 || cpu.delivered == 0 {
            res.errors.insert(
                format!("{k}_delivered"),
                json!(format!(
                    "delivered nothing (saturation {} / CPU run {} packets)",
                    sat.delivered, cpu.delivered
                )),
            );
        }
    }
    report::summarize(&mut res);
    res.out.insert(
        "duration_s".into(),
        json!(started.elapsed().as_secs_f64().round()),
    );
    write_json(&out_path, &res)?;
    let svg_path = out_path.with_extension("svg");
    std::fs::write(&svg_path, report::svg(&res))
        .with_context(|| format!("writing {}", svg_path.display()))?;
    report::print_table(&res);
    println!(
        "wrote {} and {} ({:.0} s)",
        out_path.display(),
        svg_path.display(),
        started.elapsed().as_secs_f64()
    );
    if !res.errors.is_empty() {
        bail!(
            "{} step(s) failed: {}",
            res.errors.len(),
            res.errors.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}
