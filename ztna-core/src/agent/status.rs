//! What the engine reports: paths, path changes, traffic and the status snapshot
//! (JSON with the `serde` feature, read by `ztna-agent status` and the macOS app).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// How a service's packets currently travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "kebab-case")
)]
pub enum PathKind {
    /// QUIC data connection straight to the connector (after hole punching).
    Direct,
    /// QUIC data connection through the relay, forwarded by its XDP program.
    RelayXdp,
    /// QUIC data connection through the relay's userspace forwarder.
    RelayUserspace,
    /// DATAGRAMs on the control connection, decrypted by the intermediate.
    Datagram,
}

impl PathKind {
    /// Either forwarded-relay kind.
    pub fn is_relay(self) -> bool {
        matches!(self, PathKind::RelayXdp | PathKind::RelayUserspace)
    }

    /// The name used in status output and JSON: `direct`, `relay-xdp`,
    /// `relay-userspace`, `datagram`.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::RelayXdp => "relay-xdp",
            PathKind::RelayUserspace => "relay-userspace",
            PathKind::Datagram => "datagram",
        }
    }
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of a service's path history.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PathChange {
    pub service: String,
    /// Milliseconds since the engine was created.
    pub at_ms: u64,
    pub path: PathKind,
}

/// Per-service traffic counters, as the status output shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Traffic {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

/// A snapshot of the engine for status displays (`ztna-agent status`, the macOS
/// app): JSON with the `serde` feature.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct AgentStatus {
    /// Some relay's control connection is up.
    pub connected: bool,
    pub observed_address: Option<SocketAddr>,
    pub tunnel_ipv4: Option<Ipv4Addr>,
    pub tunnel_ipv6: Option<Ipv6Addr>,
    pub mtu: u16,
    pub handshake_ms: Option<f64>,
    pub services: Vec<ServiceStatus>,
    /// Every relay, in configuration order.
    pub relays: Vec<RelayStatus>,
    pub tun_no_route: u64,
    pub tun_too_big: u64,
    pub tun_send_failed: u64,
}

#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ServiceStatus {
    pub name: String,
    pub registered: bool,
    pub prefixes: Vec<IpNet>,
    pub path: PathKind,
    pub rtt_ms: Option<f64>,
    /// The relay its sessions and datagram relay use, and the next choice should
    /// that one go.
    pub relay: Option<SocketAddr>,
    pub standby: Option<SocketAddr>,
    pub traffic: Traffic,
    pub history: Vec<PathChange>,
}

#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct RelayStatus {
    pub address: SocketAddr,
    pub connected: bool,
    pub draining: bool,
    pub rtt_ms: Option<f64>,
}
