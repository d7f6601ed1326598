//! NAT traversal scenarios with real netfilter NATs in namespaces.
//!
//! ```text
//!  agent ns 10.202.1.2 ── natA ns ── 10.202.11.0/24 ──┐
//!                                                     inet ns (router) ── 10.202.10.0/24 ── relay ns 10.202.10.2
//!  conn ns  10.202.2.2 ── natC ns ── 10.202.12.0/24 ──┘
//! ```
//!
//! Each NAT namespace is a plain router (`None`), `MASQUERADE` (`Cone`: Linux keeps
//! the source port where it can, so one internal socket maps to one external port
//! for every destination) or `MASQUERADE --random-fully` (`Symmetric`: a new random
//! port per destination, so the address the relay saw is useless to the peer). The
//! NATs drop unsolicited inbound packets, as home routers do.
//! A cut drops everything the inet router would forward between the two sides.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use ztna_core::{ClientConfig, Role};
use ztna_userspace::agent::{Agent, PathKind};

use crate::{Lab, n};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Nat {
    None,
    Cone,
    Symmetric,
}

impl Nat {
    pub const ALL: [Nat; 3] = [Nat::None, Nat::Cone, Nat::Symmetric];
    pub fn name(self) -> &'static str {
        match self {
            Nat::None => "no-nat",
            Nat::Cone => "cone-like",
            Nat::Symmetric => "symmetric-like",
        }
    }
}

pub const RELAY: &str = "10.202.10.2:4433";
const A_OUT: &str = "10.202.11.2";
const C_OUT: &str = "10.202.12.2";

/// What one scenario measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScenarioResult {
    pub agent_nat: Option<Nat>,
    pub connector_nat: Option<Nat>,
    /// Path once checks settled: "direct", "relay-userspace", ...
    pub path: String,
    /// From the relayed data path being up to the direct path being up.
    pub time_to_direct_ms: Option<u64>,
    /// From the cut to traffic flowing over the relay again.
    pub fallback_ms: Option<u64>,
    /// Echoes lost between the cut and the relay carrying traffic.
    pub lost_during_fallback: Option<u64>,
    /// From the restore to the direct path being up again.
    pub direct_again_ms: Option<u64>,
    /// Relay packets forwarded while the direct path carried the echo stream (the
    /// idle relayed connection's keepalives, nothing of the stream).
    pub relay_packets_during_direct: Option<u64>,
    pub echoes_sent: u64,
    pub echoes_ok: u64,
}

impl Lab {
    /// The NAT topology of the module docs.
    pub fn nat_topology(tag: &str, agent_nat: Nat, conn_nat: Nat) -> anyhow::Result<Self> {
        let mut lab = Lab::new(tag)?;
        let inet = lab.add_ns("i")?;
        let relay = lab.add_ns("x")?;
        let agent = lab.add_ns("a")?;
        let conn = lab.add_ns("c")?;
        lab.exec(&inet, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        lab.veth(
            &relay,
            "x0",
            "10.202.10.2/24",
            &inet,
            "ix",
            "10.202.10.1/24",
        )?;
        lab.exec(
            &relay,
            "ip",
            &["route", "add", "default", "via", "10.202.10.1"],
        )?;
        let na = lab.add_ns("na")?;
        let nc = lab.add_ns("nc")?;
        lab.veth(&na, "out0", "10.202.11.2/24", &inet, "ia", "10.202.11.1/24")?;
        lab.veth(&nc, "out0", "10.202.12.2/24", &inet, "ic", "10.202.12.1/24")?;
        lab.veth(&agent, "a0", "10.202.1.2/24", &na, "in0", "10.202.1.1/24")?;
        lab.veth(&conn, "c0", "10.202.2.2/24", &nc, "in0", "10.202.2.1/24")?;
        lab.exec(
            &agent,
            "ip",
            &["route", "add", "default", "via", "10.202.1.1"],
        )?;
        lab.exec(
            &conn,
            "ip",
            &["route", "add", "default", "via", "10.202.2.1"],
        )?;
        for (ns, nat, gw, inside, out) in [
            (&na, agent_nat, "10.202.11.1", "10.202.1.0/24", A_OUT),
            (&nc, conn_nat, "10.202.12.1", "10.202.2.0/24", C_OUT),
        ] {
            lab.exec(ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
            lab.exec(ns, "ip", &["route", "add", "default", "via", gw])?;
            let mut rule = vec![
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "out0",
                "-j",
                "MASQUERADE",
            ];
            match nat {
                // Without NAT the inside network is routable from outside.
                Nat::None => {
                    lab.exec(&inet, "ip", &["route", "add", inside, "via", out])?;
                    continue;
                }
                Nat::Cone => {}
                Nat::Symmetric => rule.push("--random-fully"),
            }
            lab.exec(ns, "iptables", &rule)?;
            // Like a home router, drop unsolicited inbound packets. This also keeps
            // them from leaving a conntrack entry that would make the NAT pick
            // another port for the inside host's own packets to that peer (entries
            // of dropped packets are never confirmed).
            lab.exec(
                ns,
                "iptables",
                &[
                    "-A",
                    "INPUT",
                    "-i",
                    "out0",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "NEW,INVALID",
                    "-j",
                    "DROP",
                ],
            )?;
        }
        Ok(lab)
    }

    /// Echo service, intermediate (XDP off: counters come from the userspace
    /// forwarder) and connector in the NAT topology.
    pub fn start_nat_stack(&mut self) -> anyhow::Result<std::path::PathBuf> {
        let certs = self.certs()?;
        let (cn, x) = (self.ns("c"), self.ns("x"));
        self.spawn(
            &cn,
            "echo",
            "ztna",
            &[
                "echo-server".into(),
                "--listen".into(),
                "10.202.2.2:9000".into(),
            ],
        )?;
        let stats = self.dir.join("intermediate-stats.json");
        self.spawn(
            &x,
            "intermediate",
            "ztna-intermediate",
            &[
                crate::intermediate_args(&certs, RELAY),
                vec!["--stats-file".into(), stats.display().to_string()],
            ]
            .concat(),
        )?;
        self.wait_log("intermediate", "listening", Duration::from_secs(10))?;
        self.spawn(
            &cn,
            "connector",
            "ztna-connector",
            &[
                vec!["--server".into(), RELAY.into()],
                crate::client_tls_args(&certs, "connector"),
                vec!["--service".into(), "echo=10.202.2.2:9000@10.100.0.1".into()],
            ]
            .concat(),
        )?;
        self.wait_log(
            "connector",
            "registered as connector",
            Duration::from_secs(10),
        )?;
        Ok(certs)
    }
}

const SERVICE: &str = "echo";

fn echo_once(a: &mut Agent, seq: u32, wait: Duration) -> bool {
    let src: SocketAddr = "100.64.0.2:40000".parse().unwrap();
    let dst: SocketAddr = "10.100.0.1:7".parse().unwrap();
    let payload = format!("echo {seq:08}").into_bytes();
    if a.send_udp(SERVICE, src, dst, &payload).is_err() {
        let _ = a.recv_packet(wait);
        return false;
    }
    let deadline = Instant::now() + wait;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match a.recv_udp(left) {
            Ok(Some((_, _, p))) if p == payload => return true,
            Ok(Some(_)) => continue,
            _ => return false,
        }
    }
    false
}

/// Agent in its namespace: waits for the paths, streams echoes, optionally cuts and
/// restores the direct path, and reports timings.
pub fn run_scenario(
    lab: &Lab,
    certs: &std::path::Path,
    agent_nat: Nat,
    conn_nat: Nat,
    cut: bool,
) -> anyhow::Result<ScenarioResult> {
    let mut cfg = ClientConfig::new(RELAY.parse()?, Role::Agent, vec![SERVICE.into()]);
    cfg.ca_file = Some(certs.join("ca.pem").display().to_string());
    cfg.cert_file = Some(certs.join("agent.pem").display().to_string());
    cfg.key_file = Some(certs.join("agent.key").display().to_string());
    let inet = lab.ns("i");
    let stats_path = lab.dir.join("intermediate-stats.json");
    let agent_ns = lab.ns("a");
    crate::in_netns(&agent_ns, move || {
        // Waits for the next rewrite of the stats file (once a second) and reads it.
        let relay_forwarded = |a: &mut Agent| -> u64 {
            let mtime = || {
                std::fs::metadata(&stats_path)
                    .and_then(|m| m.modified())
                    .ok()
            };
            let before = mtime();
            let deadline = Instant::now() + Duration::from_secs(3);
            while mtime() == before && Instant::now() < deadline {
                // Keep the agent's IO going while we wait.
                let _ = a.recv_packet(Duration::from_millis(20));
            }
            std::fs::read_to_string(&stats_path)
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .map_or(0, |v| n(&v, "userspace_forwarded_packets"))
        };
        // Everything between the two sides' links in the inet router, whatever the
        // addresses (with no NAT the direct path uses the inside ones).
        let cut_fn = |restore: bool| -> anyhow::Result<()> {
            let op = if restore { "-D" } else { "-I" };
            for (i, o) in [("ia", "ic"), ("ic", "ia")] {
                crate::sh(
                    "nsenter",
                    &[
                        &format!("--net=/run/netns/{inet}"),
                        "iptables",
                        op,
                        "FORWARD",
                        "-i",
                        i,
                        "-o",
                        o,
                        "-j",
                        "DROP",
                    ],
                )?;
            }
            Ok(())
        };
        let mut r = ScenarioResult {
            agent_nat: Some(agent_nat),
            connector_nat: Some(conn_nat),
            ..Default::default()
        };
        let mut a = Agent::connect(cfg)?;
        a.wait_registered(Duration::from_secs(10))?;
        a.wait_relay_path(SERVICE, Duration::from_secs(10))?;
        let relayed_at = Instant::now();
        // Checks run alongside traffic; give them a few seconds.
        let direct = a.wait_path(SERVICE, PathKind::Direct, Duration::from_secs(6));
        if direct.is_ok() {
            r.time_to_direct_ms = Some(relayed_at.elapsed().as_millis() as u64);
        }
        r.path = serde_json::to_value(a.path(SERVICE))?
            .as_str()
            .unwrap_or("")
            .to_string();
        // Two seconds of echoes every 10 ms on the settled path.
        let before = relay_forwarded(&mut a);
        let mut seq = 0u32;
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(2) {
            seq += 1;
            r.echoes_sent += 1;
            r.echoes_ok += u64::from(echo_once(&mut a, seq, Duration::from_millis(200)));
            let _ = a.recv_packet(Duration::from_millis(10));
        }
        if a.path(SERVICE) == PathKind::Direct {
            r.relay_packets_during_direct = Some(relay_forwarded(&mut a).saturating_sub(before));
        }
        if cut && a.path(SERVICE) == PathKind::Direct {
            cut_fn(false)?;
            let cut_at = Instant::now();
            let mut lost = 0u64;
            // Keep the stream going until an echo succeeds over the relay again.
            while cut_at.elapsed() < Duration::from_secs(10) {
                seq += 1;
                r.echoes_sent += 1;
                let ok = echo_once(&mut a, seq, Duration::from_millis(100));
                r.echoes_ok += u64::from(ok);
                if ok && a.path(SERVICE).is_relay() {
                    r.fallback_ms = Some(cut_at.elapsed().as_millis() as u64);
                    break;
                }
                if !ok {
                    lost += 1;
                }
            }
            r.lost_during_fallback = Some(lost);
            cut_fn(true)?;
            let restored = Instant::now();
            if a.wait_path(SERVICE, PathKind::Direct, Duration::from_secs(15))
                .is_ok()
            {
                r.direct_again_ms = Some(restored.elapsed().as_millis() as u64);
                seq += 1;
                r.echoes_sent += 1;
                r.echoes_ok += u64::from(echo_once(&mut a, seq, Duration::from_millis(500)));
            }
        }
        a.close();
        Ok(r)
    })
}

/// Builds the topology, runs one scenario, tears it down.
pub fn scenario(agent_nat: Nat, conn_nat: Nat, cut: bool) -> anyhow::Result<ScenarioResult> {
    let tag = format!("{}{}", &agent_nat.name()[..1], &conn_nat.name()[..1]);
    let mut lab = Lab::nat_topology(&tag, agent_nat, conn_nat)?;
    let certs = lab.start_nat_stack()?;
    run_scenario(&lab, &certs, agent_nat, conn_nat, cut)
}
