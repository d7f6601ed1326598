//! ztna-intermediate: the relay. See `ztna_userspace::intermediate`; settings in
//! `ztna_userspace::settings` (flags, `ZTNA_*` variables, `--config FILE`).
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::Parser;
use ztna_userspace::config::{self, Layered};
use ztna_userspace::intermediate::{Intermediate, Reloader};
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
    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, shutdown.clone()).context("installing signal handler")?;
    }
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
    server.run_with(&shutdown, &AtomicBool::new(false), Some(reloader))
}
