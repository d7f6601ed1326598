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
            println!("intermediate: {} {}", pki.server_cert.display(), pki.server_key.display());
            println!("agent:        {} {}", pki.agent_cert.display(), pki.agent_key.display());
            println!("connector:    {} {}", pki.connector_cert.display(), pki.connector_key.display());
            Ok(())
        }
        Cmd::EchoServer { listen } => {
            let socket = std::net::UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
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
