//! ztna-connector: the app connector. See `ztna_userspace::connector`.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ztna_core::{ClientConfig, Role};
use ztna_userspace::connector::{Connector, ServiceSpec};
use ztna_userspace::tun_agent::check_net_admin;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "ztna app connector: exposes private services through the intermediate"
)]
struct Args {
    /// Intermediate address.
    #[arg(long, default_value = "127.0.0.1:4433")]
    server: SocketAddr,
    /// Name expected in the intermediate's certificate.
    #[arg(long, default_value = "intermediate.ztna")]
    server_name: String,
    /// CA that signed the intermediate's certificate.
    #[arg(long)]
    ca: Option<String>,
    /// Skip verifying the intermediate's certificate (dev only).
    #[arg(long)]
    insecure_skip_server_verify: bool,
    /// Client certificate (SAN connector.<service>.ztna).
    #[arg(long)]
    cert: Option<String>,
    #[arg(long)]
    key: Option<String>,
    /// Service to provide, repeatable: ID=BACKEND[@PREFIX[,PREFIX...]], where
    /// BACKEND is HOST:PORT, HOST (every port) or `routed` (the prefixes are a
    /// subnet this host routes to) and a PREFIX an address or CIDR block agents
    /// reach the service at, e.g. db=10.0.3.2:5432@10.100.0.5.
    #[arg(long = "service", required = true)]
    services: Vec<ServiceSpec>,
    /// How agents' packets reach the services: `kernel` (a TUN device and the
    /// kernel's NAT: TCP, UDP, ICMP; needs CAP_NET_ADMIN), `userspace` (UDP and
    /// ICMP echo from this process, TCP through a userspace TCP/IP stack;
    /// unprivileged), `auto` (kernel when permitted).
    #[arg(long, value_enum, default_value = "auto")]
    mode: Mode,
    /// TUN device of the kernel mode.
    #[arg(long, default_value = "ztnac0")]
    tun: String,
    /// Most concurrent flows (TCP connections, UDP flows) one agent may have
    /// through this connector; more are refused and counted.
    #[arg(long, default_value_t = ztna_userspace::kernel_nat::DEFAULT_FLOWS_PER_AGENT)]
    flows_per_agent: u32,
    /// Local UDP address for the connection to the intermediate.
    #[arg(long, default_value = "0.0.0.0:0")]
    bind: SocketAddr,
    /// Longest wait between reconnect attempts, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    max_backoff_ms: u64,
    #[arg(long, default_value = "info")]
    log: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Auto,
    Kernel,
    Userspace,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ztna_userspace::logging::init(&args.log);
    if args.ca.is_none() && !args.insecure_skip_server_verify {
        anyhow::bail!(
            "--ca is required to verify the intermediate (or --insecure-skip-server-verify)"
        );
    }
    let mut cfg = ClientConfig::new(args.server, Role::Connector, vec![]);
    cfg.server_name = args.server_name;
    cfg.ca_file = args.ca;
    cfg.cert_file = args.cert;
    cfg.key_file = args.key;
    cfg.backoff_max = Duration::from_millis(args.max_backoff_ms);
    let mut connector = Connector::new(cfg, args.services, args.bind)?;
    let kernel = match args.mode {
        Mode::Kernel => {
            check_net_admin("ztna-connector --mode kernel")?;
            true
        }
        Mode::Userspace => false,
        Mode::Auto => match check_net_admin("the kernel mode") {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("{e:#}; using the userspace mode");
                false
            }
        },
    };
    if kernel {
        connector.enable_kernel_mode(&args.tun, args.flows_per_agent)?;
    } else {
        connector.set_flows_per_agent(args.flows_per_agent as usize);
        tracing::info!("userspace mode: TCP through a userspace stack, UDP sockets, ICMP echo");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handler")?;
    }
    let stats = connector.stats();
    let r = connector.run(&stop);
    tracing::info!("stopped; stats {}", stats.snapshot());
    r
}
