//! ztna-intermediate: the relay. See `ztna_userspace::intermediate`; settings in
//! `ztna_userspace::settings` (flags, `ZTNA_*` variables, `--config FILE`).
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::Parser;
use ztna_userspace::config::{self, Layered};
use ztna_userspace::intermediate::{Intermediate, Reloader, Stop};
use ztna_userspace::settings::IntermediateSettings;

#[derive(Parser, Debug)]
#[command(version, about = "ztna intermediate server (relay, QAD, registration)")]
struct Args {
    /// TOML configuration file (example: deploy/config/intermediate.toml). Flags
    /// and ZTNA_* variables override its keys.
    #[arg(long, env = "ZTNA_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: IntermediateSettings,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Flags and the environment as given; the file is read again at each reload.
    let load = || -> anyhow::Result<_> {
        let file = config::file_layer(args.config.as_deref())?;
        Ok(args.settings.clone().over(file).resolve()?)
    };
    let settings = load()?;
    ztna_userspace::logging::init(&settings.log);
    let server = Intermediate::bind(settings.cfg)?;
    // SIGTERM (the kubelet's, systemd's) drains: existing relay sessions go on until
    // they close or --drain-timeout passes; a second SIGTERM or a SIGINT stops now.
    let shutdown = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, shutdown.clone())
        .context("installing the SIGINT handler")?;
    let drain = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, drain.clone())
        .context("installing the SIGTERM handler")?;
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())
        .context("installing the SIGHUP handler")?;
    let reloader = Reloader {
        requested: &reload,
        source: Box::new(|| {
            tracing::info!("SIGHUP: reloading the configuration");
            Ok(load()?.cfg)
        }),
    };
    let stop = Stop {
        shutdown: &shutdown,
        drain: &drain,
        crash: &AtomicBool::new(false),
    };
    server.run_with(&stop, Some(reloader))
}
