//! Many relays, as a deployment runs them: the relay topology plus more relay hosts,
//! a second connector host and more agent hosts, all behind the one router.
//!
//! ```text
//!  agents  a  10.201.1.2    a2 10.201.21.2   a3 10.201.22.2   a4 10.201.23.2
//!                    \            |               |              /
//!                                  router ns
//!                    /            |               |              \
//!  relays  x  10.201.0.1    x2 10.201.10.1   x3 10.201.11.1     (XDP native on each e0/x0)
//!  connectors  c 10.201.2.2 (HTTP, iperf3, echo)   c2 10.201.12.2 (echo)
//! ```
//!
//! Every relay runs `ztna-intermediate` with its own relay ID and pin directory;
//! both connectors (kernel mode) and every `ztna-agent up` are given all relays.
//! The services are those of [`crate::tunnel`]; the second connector serves echo
//! from its own loopback and web from the first host's HTTP server, through the
//! router.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::tunnel::{ECHO_VIP, SECRET_VIP, TunnelStack, WEB_VIP};
use crate::{CONN_IP, Lab, RELAY_IP, RELAY_PORT};

/// Relay `k`'s address (0-based; relay 0 is the relay topology's own).
pub fn relay_ip(k: usize) -> String {
    match k {
        0 => RELAY_IP.to_string(),
        k => format!("10.201.{}.1", 9 + k),
    }
}

/// Relay `k`'s relay ID (bytes 1–2 of its relay CIDs).
pub fn relay_id(k: usize) -> u16 {
    0x1111 * (k as u16 + 1)
}

/// Name of relay `k`'s process in the lab (its log: `<dir>/relay<k>.log`).
pub fn relay_name(k: usize) -> String {
    format!("relay{k}")
}

/// Name of agent `k`'s process (agent 0 runs in the topology's `a`).
pub fn agent_name(k: usize) -> String {
    format!("agent{k}")
}

impl Lab {
    /// A host namespace `short` linked to the router: `dev` with `ip`/24 on its
    /// side, `rdev` with `router_ip`/24 on the router's, default route through it.
    /// `xdp_peer`: the router end gets an XDP program, so that frames the host's
    /// XDP program sends back with XDP_TX are delivered.
    fn add_router_host(
        &mut self,
        short: &str,
        dev: &str,
        ip: &str,
        rdev: &str,
        router_ip: &str,
        xdp_peer: bool,
    ) -> anyhow::Result<String> {
        let ns = self.add_ns(short)?;
        let r = self.ns("r");
        self.veth(
            &ns,
            dev,
            &format!("{ip}/24"),
            &r,
            rdev,
            &format!("{router_ip}/24"),
        )?;
        self.exec(&ns, "ip", &["route", "add", "default", "via", router_ip])?;
        for (n, d) in [(&ns, dev), (&r, rdev)] {
            self.exec(n, "ethtool", &["-K", d, "tx", "off"])?;
        }
        if xdp_peer {
            self.attach_pass(&r, rdev)?;
        }
        self.exec(&ns, "ping", &["-c1", "-W1", router_ip])?;
        Ok(ns)
    }

    /// The topology of the module docs around `relay_topology`: `relays` relays in
    /// all, the second connector host, `agents` agent hosts in all.
    pub fn multi_relay_topology(tag: &str, relays: usize, agents: usize) -> anyhow::Result<Self> {
        let mut lab = Lab::relay_topology(tag)?;
        for k in 1..relays {
            let ip = relay_ip(k);
            let router = format!("10.201.{}.254", 9 + k);
            lab.add_router_host(
                &format!("x{k}"),
                "x0",
                &ip,
                &format!("rx{k}"),
                &router,
                true,
            )?;
        }
        lab.add_router_host("c2", "c0", "10.201.12.2", "rc2", "10.201.12.1", false)?;
        for k in 1..agents {
            let ip = format!("10.201.{}.2", 20 + k);
            let router = format!("10.201.{}.1", 20 + k);
            lab.add_router_host(
                &format!("a{k}"),
                "a0",
                &ip,
                &format!("ra{k}"),
                &router,
                false,
            )?;
        }
        Ok(lab)
    }

    /// The namespace of relay `k`.
    pub fn relay_ns(&self, k: usize) -> String {
        match k {
            0 => self.ns("x"),
            k => self.ns(&format!("x{k}")),
        }
    }

    /// The namespace of agent `k`.
    pub fn agent_ns(&self, k: usize) -> String {
        match k {
            0 => self.ns("a"),
            k => self.ns(&format!("a{k}")),
        }
    }

    /// Relay `k`'s pin directory (one per relay: bpffs is shared by every
    /// namespace).
    pub fn relay_pin_dir(&self, k: usize) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/ztna-lab/{}-relay{k}", self.prefix))
    }

    /// Relay `k`'s stats file.
    pub fn relay_stats_file(&self, k: usize) -> PathBuf {
        self.dir.join(format!("relay{k}-stats.json"))
    }

    /// Starts `ztna-intermediate` for relay `k` (XDP `xdp` on its one interface).
    pub fn start_relay(&mut self, k: usize, certs: &Path, xdp: &str) -> anyhow::Result<()> {
        let ip = relay_ip(k);
        let mut args = crate::intermediate_args(certs, &format!("{ip}:{RELAY_PORT}"));
        args.extend([
            "--relay-id".into(),
            relay_id(k).to_string(),
            "--bpf-pin-dir".into(),
            self.relay_pin_dir(k).display().to_string(),
            "--stats-file".into(),
            self.relay_stats_file(k).display().to_string(),
            "--metrics-listen".into(),
            format!("{ip}:9090"),
            "--xdp".into(),
            xdp.into(),
        ]);
        if xdp != "off" {
            args.extend(["--iface".into(), "x0".into()]);
        }
        let name = relay_name(k);
        // A restarted relay logs to a fresh file: `wait_log` must see this run.
        let _ = std::fs::remove_file(self.dir.join(format!("{name}.log")));
        let ns = self.relay_ns(k);
        self.spawn(&ns, &name, "ztna-intermediate", &args)?;
        let ready = if xdp == "off" {
            "listening"
        } else {
            "XDP relay attached"
        };
        self.wait_log(&name, ready, Duration::from_secs(10))
    }

    /// Every relay's `ADDR:PORT`, as `--server` flags.
    pub fn relay_server_flags(relays: usize) -> Vec<String> {
        (0..relays)
            .flat_map(|k| {
                [
                    "--server".to_string(),
                    format!("{}:{RELAY_PORT}", relay_ip(k)),
                ]
            })
            .collect()
    }

    /// The relays, both connectors (kernel mode) and the tunnel services.
    pub fn start_multi_relay_stack(
        &mut self,
        relays: usize,
        xdp: &str,
        blob_mib: usize,
    ) -> anyhow::Result<TunnelStack> {
        let stack = self.start_tunnel_services(blob_mib)?;
        for k in 0..relays {
            self.start_relay(k, &stack.certs, xdp)?;
        }
        let c2 = self.ns("c2");
        self.spawn(
            &c2,
            "echo2",
            "ztna",
            &[
                "echo-server".into(),
                "--listen".into(),
                "127.0.0.1:9000".into(),
            ],
        )?;
        for (name, ns) in [("connector", self.ns("c")), ("connector2", c2)] {
            let mut args = crate::client_tls_args(&stack.certs, "connector");
            args.extend([
                "--mode".into(),
                "kernel".into(),
                "--service".into(),
                format!("echo=127.0.0.1:9000@{ECHO_VIP}"),
                "--service".into(),
                format!("web={CONN_IP}@{WEB_VIP}"),
                "--service".into(),
                format!("secret={CONN_IP}@{SECRET_VIP}"),
            ]);
            args.extend(Self::relay_server_flags(relays));
            self.spawn(&ns, name, "ztna-connector", &args)?;
        }
        for name in ["connector", "connector2"] {
            let deadline = Instant::now() + Duration::from_secs(15);
            // Three services at every relay.
            while self
                .log(name)
                .matches("registered as connector for")
                .count()
                < 3 * relays
            {
                if Instant::now() > deadline {
                    bail!("{name} did not register everywhere:\n{}", self.log(name));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(stack)
    }

    /// `ztna-agent up` on agent host `k` for echo and web, given every relay.
    pub fn start_agent_k(
        &mut self,
        k: usize,
        certs: &Path,
        relays: usize,
        flags: &[&str],
    ) -> anyhow::Result<()> {
        let mut servers = Self::relay_server_flags(relays);
        servers.extend(flags.iter().map(|s| s.to_string()));
        let socket = self.agent_socket(k);
        // A certificate of its own: relays spread agents over connectors by it.
        let identity = format!("agent{k}");
        let (cert, key) = ztna_userspace::identity::issue_leaf(
            &certs.join("ca.pem"),
            &certs.join("ca.key"),
            certs,
            &identity,
            &["agent.echo.ztna".into(), "agent.web.ztna".into()],
        )?;
        std::fs::rename(cert, certs.join(format!("{identity}.pem")))?;
        std::fs::rename(key, certs.join(format!("{identity}.key")))?;
        self.start_agent_up_as(
            &agent_name(k),
            &self.agent_ns(k),
            certs,
            &identity,
            &servers,
            &socket,
        )
    }

    pub fn agent_socket(&self, k: usize) -> PathBuf {
        self.dir.join(format!("agent{k}.sock"))
    }

    /// Agent `k`'s status (`ztna-agent status --json`).
    pub fn agent_k_status(&self, k: usize) -> anyhow::Result<serde_json::Value> {
        ztna_userspace::tun_agent::read_status(&self.agent_socket(k))
    }

    /// The relay and path agent `k` uses for `service`, from its status.
    pub fn agent_k_relay(&self, k: usize, service: &str) -> Option<(SocketAddr, String)> {
        let s = self.agent_k_status(k).ok()?;
        let svc = s["services"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == service)?
            .clone();
        let relay = svc["relay"].as_str()?.parse().ok()?;
        Some((relay, svc["path"].as_str()?.to_string()))
    }

    /// Relay `k`'s forwarding entries (both families), from its pins.
    pub fn relay_map_entries(
        &self,
        k: usize,
    ) -> anyhow::Result<Vec<ztna_userspace::xdp::KernelEntry>> {
        let dir = self.relay_pin_dir(k);
        Ok(ztna_userspace::xdp::XdpTable::open(&dir)
            .with_context(|| format!("relay {k}'s maps"))?
            .entries())
    }

    /// Relay `k`'s stats file (written every second).
    pub fn relay_k_stats(&self, k: usize) -> anyhow::Result<serde_json::Value> {
        let p = self.relay_stats_file(k);
        let s = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(serde_json::from_str(&s)?)
    }

    /// Sends `sig` to a started process and waits for it to exit.
    pub fn signal(&mut self, name: &str, sig: i32) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self
            .pid(name)
            .with_context(|| format!("no process {name}"))?;
        // SAFETY: kill(2) on our own child (nsenter execs the binary: same pid).
        unsafe { libc::kill(pid as i32, sig) };
        self.wait_exit(name, Duration::from_secs(30))
    }
}
