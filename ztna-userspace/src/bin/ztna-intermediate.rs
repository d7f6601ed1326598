//! ztna-intermediate: the relay. See `ztna_userspace::intermediate`; settings in
//! `ztna_userspace::settings` (flags, `ZTNA_*` variables, `--config FILE`).
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::Parser;
use ztna_userspace::config::{self, Layered};
use ztna_userspace::intermediate::Intermediate;
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
    let file = config::file_layer(args.config.as_deref())?;
    let settings = args.settings.over(file).resolve()?;
    ztna_userspace::logging::init(&settings.log);
    let server = Intermediate::bind(settings.cfg)?;
    let shutdown = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, shutdown.clone()).context("installing signal handler")?;
    }
    server.run(&shutdown, &AtomicBool::new(false))
}
