//! ztna-agent: the Linux agent. `up` runs it on a TUN device; `status` asks a
//! running one; `echo` sends UDP through the tunnel and reports.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use ztna_core::Role;
use ztna_core::agent::AgentConfig;
use ztna_userspace::agent::{Agent, EchoOptions, Pattern, run_echo};
use ztna_userspace::config::{self, ConfigError, Layered};
use ztna_userspace::relay_targets::{REFRESH, RelayWatch};
use ztna_userspace::settings::AgentSettings;
use ztna_userspace::tun_agent::{Up, UpConfig, serve_status};

#[derive(Parser, Debug)]
#[command(version, about = "ztna agent")]
struct Args {
    /// TOML configuration file (example: deploy/config/agent.toml). Flags and
    /// ZTNA_* variables override its keys.
    #[arg(long, env = "ZTNA_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: AgentSettings,
    #[command(flatten)]
    waits: EchoWaits,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How long `echo` waits for better paths before sending (flags only).
#[derive(clap::Args, Debug)]
struct EchoWaits {
    /// Wait this long for a direct path before sending, in milliseconds (0: don't).
    #[arg(long, global = true, default_value_t = 0)]
    direct_wait_ms: u64,
    /// How long to wait for the relayed data connection before using the datagram
    /// relay, in milliseconds.
    #[arg(long, global = true, default_value_t = 3000)]
    data_wait_ms: u64,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the agent on a TUN device until SIGINT/SIGTERM: routes for the services'
    /// prefixes, traffic on each service's best path.
    Up,
    /// Show a running agent's services, paths, RTT and traffic.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send UDP payloads to a service through the tunnel and check the echoes.
    Echo {
        /// Service address to send to (the connector's virtual address).
        #[arg(long)]
        dst: SocketAddr,
        /// This agent's tunnel address.
        #[arg(long, default_value = "100.64.0.2")]
        tunnel_ip: IpAddr,
        /// Source port inside the tunnel.
        #[arg(long, default_value_t = 40000)]
        src_port: u16,
        /// UDP payload size in bytes ("max" for the largest that fits).
        #[arg(long, default_value = "64")]
        size: String,
        #[arg(long, value_enum, default_value = "seq")]
        pattern: Pattern,
        /// Number of packets.
        #[arg(long, default_value_t = 10)]
        count: u32,
        /// Packets sent back to back before waiting for their echoes.
        #[arg(long, default_value_t = 1)]
        burst: u32,
        /// Pause between bursts, in milliseconds.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        /// Wait for the echoes of one burst, in milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Fail (exit 1) unless every echo came back byte-exact.
        #[arg(long)]
        verify: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let file = config::file_layer(args.config.as_deref())?;
    let s = args.settings.clone().over(file);
    let status_socket = s
        .status_socket
        .clone()
        .unwrap_or_else(ztna_userspace::tun_agent::default_status_socket);
    if let Cmd::Status { json } = &args.cmd {
        let v = ztna_userspace::tun_agent::read_status(&status_socket)?;
        if *json {
            println!("{v}");
        } else {
            print!("{}", ztna_userspace::tun_agent::format_status(&v));
        }
        return Ok(());
    }
    let default_log = if matches!(args.cmd, Cmd::Up) {
        "info"
    } else {
        "warn"
    };
    ztna_userspace::logging::init(s.log.as_deref().unwrap_or(default_log));
    if s.service.is_empty() {
        return Err(ConfigError::Missing {
            what: "at least one service",
            flag: "service",
            env: "ZTNA_SERVICE",
            key: "service",
        }
        .into());
    }
    let mut cfg = s.client().client_config(Role::Agent, s.service.clone())?;
    let datagram_only = s.datagram_only.unwrap_or(false);
    let no_p2p = s.no_p2p.unwrap_or(false);
    match args.cmd {
        Cmd::Status { .. } => unreachable!("handled above"),
        Cmd::Up => {
            let relays = s.client().relay_addrs_waiting(Duration::from_secs(2));
            cfg.server = relays[0];
            let mut agent = AgentConfig::new(cfg);
            agent.data_path = !datagram_only;
            agent.p2p = !no_p2p;
            agent.relays = relays.clone();
            let (up, status) = Up::new(UpConfig {
                agent,
                tun_name: s.tun.clone().unwrap_or_else(|| "ztna0".into()),
                status_socket: status_socket.clone(),
                relay_watch: RelayWatch::spawn(s.client().relay_targets(), relays, REFRESH),
            })?;
            let _metrics = match s.metrics_listen.as_ref().and_then(|l| l.addr()) {
                Some(addr) => Some(ztna_userspace::metrics::serve(
                    addr,
                    ztna_userspace::client_metrics::agent_registry(status.clone()),
                    up.health(),
                )?),
                None => None,
            };
            serve_status(status_socket, status)?;
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, stop.clone())?;
            }
            let reload = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())?;
            up.run_reloading(&stop, &reload, || {
                tracing::info!("SIGHUP: reloading the configuration");
                let file = config::file_layer(args.config.as_deref())?;
                let s = args.settings.clone().over(file);
                Ok(s.client().client_config(Role::Agent, s.service.clone())?)
            })
        }
        Cmd::Echo {
            dst,
            tunnel_ip,
            src_port,
            size,
            pattern,
            count,
            burst,
            interval_ms,
            timeout_ms,
            verify,
            json,
        } => {
            cfg.reconnect = false;
            cfg.server = s.client().relay_addrs_waiting(Duration::from_secs(2))[0];
            let start = Instant::now();
            let mut agent = Agent::connect_with(cfg, !datagram_only)?;
            agent.set_p2p(!no_p2p);
            agent.wait_registered(Duration::from_secs(10))?;
            let service = s.service[0].clone();
            if !datagram_only
                && let Err(e) =
                    agent.wait_relay_path(&service, Duration::from_millis(args.waits.data_wait_ms))
            {
                eprintln!("warning: {e}; using the datagram relay");
            }
            if args.waits.direct_wait_ms > 0
                && let Err(e) = agent.wait_path(
                    &service,
                    ztna_userspace::agent::PathKind::Direct,
                    Duration::from_millis(args.waits.direct_wait_ms),
                )
            {
                eprintln!("warning: {e}");
            }
            let max = agent
                .max_udp_payload(&service, tunnel_ip.is_ipv6())
                .ok_or_else(|| anyhow::anyhow!("connection lost before sending"))?;
            let size = if size == "max" {
                max
            } else {
                size.parse::<usize>()
                    .map_err(|e| anyhow::anyhow!("--size {size:?}: {e}"))?
            };
            if size > max {
                anyhow::bail!(
                    "--size {size} exceeds the maximum UDP payload of {max} bytes for this tunnel"
                );
            }
            let opts = EchoOptions {
                service,
                src: SocketAddr::new(tunnel_ip, src_port),
                dst,
                size,
                pattern,
                count,
                burst,
                interval: Duration::from_millis(interval_ms),
                timeout: Duration::from_millis(timeout_ms),
            };
            let report = run_echo(&mut agent, &opts)?;
            agent.close();
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", report.summary());
                println!("total {:.3} s", start.elapsed().as_secs_f64());
            }
            if verify && !report.ok() {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
