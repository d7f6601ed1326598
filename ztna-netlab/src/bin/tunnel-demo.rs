//! The demo's real-TCP part (root): `ztna-agent up` on a TUN device in one network
//! namespace fetches a file over HTTP from a server beside a kernel-mode connector
//! in another, through the relay topology; prints the path, the time and whether
//! the SHA-256 matches. Exits non-zero unless it does.

use std::time::Duration;

use anyhow::{Context, bail};
use ztna_netlab::Lab;
use ztna_netlab::tunnel::{HTTP_PORT, WEB_VIP};

const MIB: usize = 20;

fn main() -> anyhow::Result<()> {
    let mut lab = Lab::relay_topology("demo").context("building the namespaces")?;
    let xdp = std::env::args().nth(1).unwrap_or_else(|| "off".into());
    let stack = lab.start_tunnel_stack(&xdp, "kernel", MIB)?;
    lab.start_agent_up(&stack.certs, &[], &[])?;
    lab.wait_agent_path("web", "direct", Duration::from_secs(15))?;
    let url = format!("http://{WEB_VIP}:{HTTP_PORT}/blob");
    let (sha, took) = lab.fetch(&url, &[])?;
    let ok = sha == stack.sha256;
    let ping = lab.exec(&lab.ns("a"), "ping", &["-c", "5", "-i", "0.2", WEB_VIP])?;
    let ping = String::from_utf8_lossy(&ping.stdout);
    let rtt = ping
        .lines()
        .find(|l| l.starts_with("rtt"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .unwrap_or("-")
        .to_string();
    let status = lab.agent_status()?;
    println!(
        "    GET {url}: {MIB} MiB in {:.3} s ({:.0} Mbit/s), SHA-256 {}",
        took.as_secs_f64(),
        (MIB as f64 * 8.0 * 1.048_576) / took.as_secs_f64(),
        if ok { "matches" } else { "DIFFERS" }
    );
    println!("    ping {WEB_VIP}: RTT avg {rtt} ms");
    println!("    ztna-agent status:");
    for line in ztna_userspace::tun_agent::format_status(&status).lines() {
        println!("      {line}");
    }
    if !ok {
        bail!("the file did not arrive intact");
    }
    Ok(())
}
