//! ztna-connector: the app connector. See `ztna_userspace::connector`; settings in
//! `ztna_userspace::settings` (flags, `ZTNA_*` variables, `--config FILE`).
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::Parser;
use ztna_core::Role;
use ztna_userspace::config::{self, ConfigError, Layered};
use ztna_userspace::connector::Connector;
use ztna_userspace::relay_targets::RelayWatch;
use ztna_userspace::settings::{ConnectorMode, ConnectorSettings, Listen};
use ztna_userspace::tun_agent::check_net_admin;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "ztna app connector: exposes private services through the intermediate"
)]
struct Args {
    /// TOML configuration file (example: deploy/config/connector.toml). Flags and
    /// ZTNA_* variables override its keys.
    #[arg(long, env = "ZTNA_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: ConnectorSettings,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Flags and the environment as given; the file is read again at each reload.
    let load = || -> anyhow::Result<ConnectorSettings> {
        let file = config::file_layer(args.config.as_deref())?;
        Ok(args.settings.clone().over(file))
    };
    let s = load()?;
    ztna_userspace::logging::init(s.log.as_deref().unwrap_or("info"));
    if s.service.is_empty() {
        return Err(ConfigError::Missing {
            what: "at least one service",
            flag: "service",
            env: "ZTNA_SERVICE",
            key: "[[service]]",
        }
        .into());
    }
    let cfg = s.client().client_config(Role::Connector, vec![])?;
    let bind = s.bind.unwrap_or(([0, 0, 0, 0], 0).into());
    let flows_per_agent = s
        .flows_per_agent
        .unwrap_or(ztna_userspace::kernel_nat::DEFAULT_FLOWS_PER_AGENT);
    let relays = s
        .client()
        .relay_addrs_waiting(std::time::Duration::from_secs(2));
    tracing::info!("relays: {relays:?}");
    let mut connector = Connector::with_relays(cfg, s.service.clone(), bind, relays.clone())?;
    connector.watch_relays(RelayWatch::spawn(
        s.client().relay_targets(),
        relays,
        ztna_userspace::relay_targets::REFRESH,
    ));
    let kernel = match s.mode.unwrap_or(ConnectorMode::Auto) {
        ConnectorMode::Kernel => {
            check_net_admin("ztna-connector --mode kernel")?;
            true
        }
        ConnectorMode::Userspace => false,
        ConnectorMode::Auto => match check_net_admin("the kernel mode") {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("{e:#}; using the userspace mode");
                false
            }
        },
    };
    if kernel {
        connector.enable_kernel_mode(s.tun.as_deref().unwrap_or("ztnac0"), flows_per_agent)?;
    } else {
        connector.set_flows_per_agent(flows_per_agent as usize);
        tracing::info!("userspace mode: TCP through a userspace stack, UDP sockets, ICMP echo");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handler")?;
    }
    let stats = connector.stats();
    let metrics_listen = s
        .metrics_listen
        .clone()
        .unwrap_or(Listen::At(([127, 0, 0, 1], 9091).into()));
    let _metrics = match metrics_listen.addr() {
        Some(addr) => Some(ztna_userspace::metrics::serve(
            addr,
            ztna_userspace::client_metrics::connector_registry(stats.clone(), connector.gauges()),
            connector.health(),
        )?),
        None => None,
    };
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())
        .context("installing the SIGHUP handler")?;
    let r = connector.run_reloading(&stop, &reload, || {
        tracing::info!("SIGHUP: reloading the configuration");
        let s = load()?;
        let cfg = s.client().client_config(Role::Connector, vec![])?;
        Ok((cfg, s.service))
    });
    tracing::info!("stopped; stats {}", stats.snapshot());
    r
}
