//! ztna-intermediate: the relay. See `ztna_userspace::intermediate`.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ztna_userspace::intermediate::{Intermediate, IntermediateConfig};

#[derive(Parser, Debug)]
#[command(version, about = "ztna intermediate server (relay, QAD, registration)")]
struct Args {
    /// UDP address to listen on.
    #[arg(long, default_value = "0.0.0.0:4433")]
    listen: SocketAddr,
    /// Server certificate chain (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Server private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// CA bundle that signs client certificates (PEM). Required unless
    /// --insecure-no-client-auth.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Accept clients without certificates and authorize every registration.
    /// For local experiments only; logs a warning at start.
    #[arg(long)]
    insecure_no_client_auth: bool,
    /// QUIC idle timeout in seconds.
    #[arg(long, default_value_t = 30)]
    idle_timeout_secs: u64,
    /// Skip stateless retry (address validation) before creating connection state.
    #[arg(long)]
    no_retry: bool,
    /// XDP fast path: off, auto (native, then generic, then off), generic or native.
    #[arg(long, value_enum, default_value = "off")]
    xdp: ztna_userspace::xdp::XdpChoice,
    /// Interface(s) to attach the XDP program to (repeatable).
    #[arg(long = "iface")]
    ifaces: Vec<String>,
    /// A fixed relay session between two UDP addresses, A=B (repeatable): the log
    /// and the stats file give its two relay CIDs. For benchmarks and for checking
    /// a relay path without agents.
    #[arg(long = "static-session", value_parser = parse_pair)]
    static_sessions: Vec<(SocketAddr, SocketAddr)>,
    /// Identity of this instance in its stateless-reset key (default: host name and
    /// UDP address). Give instances that share a server key different ones.
    #[arg(long)]
    instance_id: Option<String>,
    /// Write counters as JSON to this file every second.
    #[arg(long)]
    stats_file: Option<PathBuf>,
    /// Default log filter (RUST_LOG overrides).
    #[arg(long, default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ztna_userspace::logging::init(&args.log);
    let mut cfg = IntermediateConfig::new(args.listen, args.cert, args.key, args.ca);
    cfg.require_client_cert = !args.insecure_no_client_auth;
    cfg.idle_timeout = Duration::from_secs(args.idle_timeout_secs);
    cfg.retry = !args.no_retry;
    cfg.xdp = args.xdp;
    cfg.xdp_interfaces = args.ifaces;
    cfg.stats_file = args.stats_file;
    cfg.static_sessions = args.static_sessions;
    cfg.instance_id = args.instance_id;
    let server = Intermediate::bind(cfg)?;
    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, shutdown.clone()).context("installing signal handler")?;
    }
    server.run(&shutdown, &AtomicBool::new(false))
}

fn parse_pair(s: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (a, b) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected A=B"))?;
    let p = |x: &str| x.parse::<SocketAddr>().map_err(|e| format!("{x:?}: {e}"));
    Ok((p(a)?, p(b)?))
}
