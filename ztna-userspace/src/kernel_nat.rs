//! The connector's kernel mode: agents' packets go into a TUN device and the
//! kernel delivers them, as Firezone's gateway and Tailscale's subnet router do.
//!
//! ```text
//!  agent ──tunnel──► connector ──write──► ztnac0 ──► prerouting: DNAT service address → backend
//!                                                  ──► forward (or input, for a local backend)
//!                                                  ──► postrouting: masquerade ──► backend
//!  agent ◄─tunnel─── connector ◄──read─── ztnac0 ◄── conntrack reverses both NATs ◄── backend's reply
//! ```
//!
//! TCP, UDP and ICMP all work with the kernel's own stacks: a backend that is down
//! answers a SYN with RST, so the agent's application gets a prompt "connection
//! refused". Everything this mode installs is its own and goes on exit: the device,
//! one nftables table (`inet ztna_<device>`), a /32 or /128 route per agent address
//! seen, and the forwarding sysctls it turned on (restored to what they were).
//!
//! The table: DNAT per service address (see [`crate::service`] for the backend
//! forms), masquerade of everything from the device, a per-agent cap on concurrent
//! flows (`ct count`, with a counter), and TCP MSS clamped to the route's MTU.

use std::collections::HashSet;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use ipnet::IpNet;

use crate::netif::ip;
use crate::service::{Backend, ServiceSpec};

/// MTU of the connector's device: the agents' tunnel MTU, so what the kernel
/// sends towards an agent fits one DATAGRAM on every path.
pub const DEVICE_MTU: u16 = ztna_core::agent::TUN_MTU;

/// Default cap on one agent's concurrent flows through this connector.
pub const DEFAULT_FLOWS_PER_AGENT: u32 = 1024;

pub struct KernelNat {
    pub dev: tun_rs::SyncDevice,
    pub name: String,
    table: String,
    /// Agent addresses with a route through the device.
    routes: HashSet<IpAddr>,
    /// Sysctls we changed: (path, previous value).
    restore: Vec<(String, String)>,
    flows_per_agent: u32,
}

fn sysctl_path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

impl KernelNat {
    /// Creates the device and installs the NAT table for `services`.
    pub fn start(
        name: &str,
        services: &[ServiceSpec],
        flows_per_agent: u32,
    ) -> anyhow::Result<Self> {
        let dev = tun_rs::DeviceBuilder::new()
            .name(name)
            .mtu(DEVICE_MTU)
            .build_sync()
            .with_context(|| format!("creating TUN device {name}"))?;
        dev.set_nonblocking(true)?;
        let name = dev.name().unwrap_or_else(|_| name.to_string());
        let table = format!(
            "ztna_{}",
            name.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        );
        let mut nat = KernelNat {
            dev,
            name,
            table,
            routes: HashSet::new(),
            restore: Vec::new(),
            flows_per_agent,
        };
        let v6 = services
            .iter()
            .flat_map(|s| &s.prefixes)
            .any(|p| matches!(p, IpNet::V6(_)));
        nat.set_sysctl("net.ipv4.ip_forward", "1")?;
        if v6 {
            nat.set_sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        // Backends on the connector's own loopback (a database on 127.0.0.1) are
        // reached by DNAT to 127.0.0.1, which the kernel allows only with this.
        nat.set_sysctl(&format!("net.ipv4.conf.{}.route_localnet", nat.name), "1")?;
        // Agents' source addresses are routed back through the device (routes are
        // added per agent as they appear), so strict reverse-path filtering holds.
        let script = nft_script(&nat.table, &nat.name, services, flows_per_agent)?;
        nft(&format!(
            "table inet {} {{}}\ndelete table inet {}\n",
            nat.table, nat.table
        ))?;
        nft(&script).context("installing the connector's nftables table")?;
        tracing::info!(
            "kernel mode: device {} (MTU {DEVICE_MTU}), nftables table inet {}",
            nat.name,
            nat.table
        );
        Ok(nat)
    }

    /// The table for `services` (checked, not installed): for a reload, which
    /// validates everything before it changes anything.
    pub fn script_for(&self, services: &[ServiceSpec]) -> anyhow::Result<String> {
        nft_script(&self.table, &self.name, services, self.flows_per_agent)
    }

    /// Replaces the table with `script` in one nftables transaction. Established
    /// flows keep their NAT bindings (they live in conntrack, not in the rules).
    pub fn replace_table(&mut self, script: &str, services: &[ServiceSpec]) -> anyhow::Result<()> {
        if services
            .iter()
            .flat_map(|s| &s.prefixes)
            .any(|p| matches!(p, IpNet::V6(_)))
        {
            self.set_sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        nft(&format!(
            "table inet {t} {{}}\ndelete table inet {t}\n{script}",
            t = self.table
        ))
        .context("replacing the connector's nftables table")
    }

    fn set_sysctl(&mut self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = sysctl_path(key);
        let old = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {path}"))?
            .trim()
            .to_string();
        if old != value {
            std::fs::write(&path, value).with_context(|| format!("writing {path}"))?;
            tracing::info!("{key} = {value} (was {old}; restored on exit)");
            self.restore.push((path, old));
        }
        Ok(())
    }

    /// Makes sure replies to `agent` are routed into the device. Called for the
    /// first packet from each agent address.
    pub fn learn_agent(&mut self, agent: IpAddr) {
        if self.routes.contains(&agent) {
            return;
        }
        let prefix = IpNet::from(agent).to_string();
        match ip(&["route", "replace", &prefix, "dev", &self.name]) {
            Ok(()) => {
                tracing::debug!("route {prefix} via {}", self.name);
                self.routes.insert(agent);
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }

    /// How many agents' flows the per-agent cap refused (the table's counters).
    pub fn flow_limit_hits(&self) -> u64 {
        let Ok(out) = Command::new("nft")
            .args(["list", "table", "inet", &self.table])
            .output()
        else {
            return 0;
        };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("ct count over"))
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                w.find(|x| *x == "packets")?;
                w.next()?.parse::<u64>().ok()
            })
            .sum()
    }
}

impl Drop for KernelNat {
    fn drop(&mut self) {
        if let Err(e) = nft(&format!("delete table inet {}\n", self.table)) {
            tracing::warn!("removing nftables table {}: {e:#}", self.table);
        }
        for (path, old) in self.restore.drain(..).rev() {
            if let Err(e) = std::fs::write(&path, &old) {
                tracing::warn!("restoring {path} to {old}: {e}");
            }
        }
        // Routes through the device go with it.
        tracing::info!(
            "kernel mode: removed table inet {} and device {}",
            self.table,
            self.name
        );
    }
}

/// The table for `services`, in nft's own syntax.
fn nft_script(
    table: &str,
    dev: &str,
    services: &[ServiceSpec],
    flows_per_agent: u32,
) -> anyhow::Result<String> {
    let mut dnat = String::new();
    for s in services {
        for p in &s.prefixes {
            let (fam, daddr) = match p {
                IpNet::V4(_) => ("ip", format!("ip daddr {p}")),
                IpNet::V6(_) => ("ip6", format!("ip6 daddr {p}")),
            };
            let same_family = |a: IpAddr| a.is_ipv4() == matches!(p, IpNet::V4(_));
            match s.backend {
                Backend::Routed => {}
                Backend::Addr(a) => {
                    if !same_family(a.ip()) {
                        bail!(
                            "service {:?}: prefix {p} and backend {a} are of different IP families",
                            s.id
                        );
                    }
                    let host = match a.ip() {
                        IpAddr::V4(v) => v.to_string(),
                        IpAddr::V6(v) => format!("[{v}]"),
                    };
                    dnat += &format!(
                        "    iifname \"{dev}\" {daddr} meta l4proto {{ tcp, udp }} dnat {fam} to {host}:{}\n",
                        a.port()
                    );
                    dnat += &format!("    iifname \"{dev}\" {daddr} dnat {fam} to {}\n", a.ip());
                }
                Backend::Host(h) => {
                    if !same_family(h) {
                        bail!(
                            "service {:?}: prefix {p} and backend {h} are of different IP families",
                            s.id
                        );
                    }
                    dnat += &format!("    iifname \"{dev}\" {daddr} dnat {fam} to {h}\n");
                }
            }
        }
    }
    Ok(format!(
        "table inet {table} {{
  set agents4 {{ type ipv4_addr; flags dynamic; }}
  set agents6 {{ type ipv6_addr; flags dynamic; }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
{dnat}  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    iifname \"{dev}\" oifname != \"{dev}\" masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname \"{dev}\" ct state new add @agents4 {{ ip saddr ct count over {flows_per_agent} }} counter drop
    iifname \"{dev}\" ct state new add @agents6 {{ ip6 saddr ct count over {flows_per_agent} }} counter drop
    oifname \"{dev}\" tcp flags syn tcp option maxseg size set rt mtu
    iifname \"{dev}\" tcp flags syn tcp option maxseg size set rt mtu
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"{dev}\" ct state new add @agents4 {{ ip saddr ct count over {flows_per_agent} }} counter drop
    iifname \"{dev}\" ct state new add @agents6 {{ ip6 saddr ct count over {flows_per_agent} }} counter drop
  }}
}}
"
    ))
}

/// Runs `nft -f -` with `script`.
fn nft(script: &str) -> anyhow::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running `nft` (Debian package nftables)")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_dnats_each_backend_form_and_refuses_mixed_families() {
        let specs: Vec<ServiceSpec> = [
            "db=10.0.3.2:5432@10.100.0.5",
            "web=10.0.3.3@10.100.0.6",
            "lan=routed@10.20.0.0/24",
            "v6=[fd00:3::2]:80@fd00::7",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let t = nft_script("ztna_t", "ztnac0", &specs, 100).unwrap();
        assert!(
            t.contains("ip daddr 10.100.0.5/32 meta l4proto { tcp, udp } dnat ip to 10.0.3.2:5432"),
            "{t}"
        );
        assert!(
            t.contains("ip daddr 10.100.0.5/32 dnat ip to 10.0.3.2\n"),
            "{t}"
        );
        assert!(
            t.contains("ip daddr 10.100.0.6/32 dnat ip to 10.0.3.3\n"),
            "{t}"
        );
        assert!(
            !t.contains("10.20.0.0/24"),
            "routed prefixes are not DNATed: {t}"
        );
        assert!(
            t.contains(
                "ip6 daddr fd00::7/128 meta l4proto { tcp, udp } dnat ip6 to [fd00:3::2]:80"
            ),
            "{t}"
        );
        assert!(t.contains("ct count over 100"), "{t}");
        let mixed: ServiceSpec = "x=10.0.0.1:80@fd00::1".parse().unwrap();
        let e = nft_script("t", "d", &[mixed], 1).unwrap_err().to_string();
        assert!(e.contains("different IP families"), "{e}");
    }
}
