//! The agent engine: everything an agent does, as one sans-IO state machine.
//!
//! ```text
//!  UDP datagram + source ──► handle_udp ──┐                       ┌──► poll_transmit: UDP datagram + destination
//!  IP packet from the tunnel ► handle_tun ─┼─► control client,     ├──► poll_tun: IP packet for the tunnel device
//!  the time ───────────────► handle_timeout┘   relayed and direct  ├──► poll_timeout: when to call handle_timeout
//!                                              data connections,   └──► poll_event: registered, path changed, ...
//!                                              NAT-traversal checks
//! ```
//!
//! The engine owns no socket, no tunnel device, no thread and no clock: every input
//! carries `now`, and every output is polled into the caller's buffers. The Linux
//! agent (`ztna-agent`), its echo tool and the C ABI for the macOS app are drivers of
//! this one engine. A driver's loop, in the order that keeps liveness honest:
//!
//! 1. wait until the UDP socket or the tunnel device is readable, or `poll_timeout`;
//! 2. feed every datagram that is waiting (`handle_udp`) and every tunnel packet
//!    (`handle_tun`), then, if the deadline passed, `handle_timeout` — after the
//!    socket is drained, so that a direct path is never judged silent while its
//!    packets sit unread;
//! 3. write out `poll_tun` until `None`, send `poll_transmit` until `None`, and read
//!    `poll_event` until `None`.
//!
//! What it runs, per service: registration on the control connection; a relay
//! session and a QUIC data connection through the relay (forwarded by XDP or the
//! relay's userspace forwarder); ICE-style checks and a direct data connection;
//! keepalive, liveness and fallback to the relay; the datagram relay (DATAGRAMs on the
//! control connection) whenever no data connection is usable; and the path history.
//!
//! With several relays ([`AgentConfig::relays`]) it keeps a control connection to
//! each and registers everywhere; each service's session and datagram relay run on
//! the relay [`RelaySet::choose`] picks by RTT. A relay that goes silent for a second
//! (killed, node lost) or closes is left: its services move to the next one at once
//! (datagram relay first, a new relayed data connection a few RTTs later), while a
//! direct path, being peer to peer, carries on untouched. A relay that announces a
//! drain is left make-before-break: the new session's data connection is up before
//! the old one is closed.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use ztna_common::NackStatus;
use ztna_common::frames::forwarding;

use crate::client::{ClientConfig, ClientError, ControlClient, Liveness, Role};
use crate::data::{self, DataConfig, DataConnection};
use crate::p2p::{self, Checker};
use crate::packet;
use crate::relays::RelaySet;

mod direct;
mod relaying;
mod status;

use direct::direct_silence_limit;
use relaying::datagram_relay;

pub use status::{AgentStatus, PathChange, PathKind, RelayStatus, ServiceStatus, Traffic};

/// With several relays, the first registration waits this long for the others'
/// handshakes before a relay is chosen, so the choice sees every RTT.
const CHOOSE_GRACE: Duration = Duration::from_millis(300);
/// A data connection not usable after this long is given up (datagram relay used).
const DATA_SETUP_TIMEOUT: Duration = Duration::from_secs(3);
/// Wait before asking again for a relay session that failed.
const SESSION_RETRY: Duration = Duration::from_secs(2);
/// Keepalive on the direct path: silence for `DIRECT_DEAD` means the path is gone.
const DIRECT_KEEPALIVE: Duration = Duration::from_millis(200);
const DIRECT_DEAD: Duration = Duration::from_millis(1000);
/// With packets of ours unanswered, give up sooner: this many RTTs, at least
/// `DIRECT_DEAD_MIN`.
const DIRECT_DEAD_RTTS: u32 = 4;
const DIRECT_DEAD_MIN: Duration = Duration::from_millis(400);
/// Wait before trying the direct path again after it failed.
const DIRECT_RETRY: Duration = Duration::from_secs(5);
/// MTU of the tunnel device. Every path must carry a packet of this size in one
/// DATAGRAM: a data connection carries 1318 bytes (1350-byte UDP payload minus the
/// short header with an 8-byte CID, a 4-byte packet number, the 16-byte AEAD tag and
/// the DATAGRAM frame's 3 bytes), the datagram relay about 1293 (16-byte CIDs and
/// the `0x2F` service prefix). 1280 fits them all and is the least IPv6 allows.
/// A larger packet gets ICMP "packet too big" (see `handle_tun`).
pub const TUN_MTU: u16 = 1280;

/// Largest TCP MSS whose segments fit `TUN_MTU` (IPv4: 20 + 20 bytes of headers,
/// IPv6: 40 + 20).
fn max_mss(dst: IpAddr) -> u16 {
    TUN_MTU - if dst.is_ipv4() { 40 } else { 60 }
}

/// Packets for the tunnel that wait for `poll_tun` beyond this are dropped (counted):
/// a driver that stops reading must not make the engine grow without bound.
const TUN_QUEUE_MAX: usize = 1024;
/// Likewise for queued check packets.
const UDP_QUEUE_MAX: usize = 256;

/// What the driver (or its user) should know, in order of occurrence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentEvent {
    /// A control connection (to one relay) is up; `handshake` from its first Initial.
    Connected {
        handshake: Duration,
    },
    /// QAD: the address the intermediate sees us at.
    ObservedAddress(SocketAddr),
    Registered(String),
    /// The intermediate refused the registration (NACK).
    Refused {
        service: String,
        status: NackStatus,
    },
    /// A control connection closed; `retry_in` is `None` when the engine will not
    /// reconnect.
    Disconnected {
        reason: String,
        retry_in: Option<Duration>,
    },
    /// A service's packets now take `path`.
    PathChanged(PathChange),
    /// The routes (service prefixes) changed: the driver re-reads `routes()`.
    RoutesChanged,
}

/// What the engine needs beyond the control connection's settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub client: ClientConfig,
    /// Open end-to-end data connections (relayed, then direct). Off keeps every
    /// service on the datagram relay. Data connections need a CA, certificate and
    /// key in `client`.
    pub data_path: bool,
    /// Hole punching and direct data connections (needs `data_path`).
    pub p2p: bool,
    /// Static routes: destination prefix → service. Packets from the tunnel to any
    /// other address are refused with ICMP "administratively prohibited".
    pub routes: Vec<(IpNet, String)>,
    /// The deployment's relays. Empty: `client.server` alone. With more than one,
    /// each control connection judges its relay alive with [`Liveness::FAST`].
    pub relays: Vec<SocketAddr>,
}

impl AgentConfig {
    pub fn new(mut client: ClientConfig) -> Self {
        client.role = Role::Agent;
        AgentConfig {
            client,
            data_path: true,
            p2p: true,
            routes: Vec::new(),
            relays: Vec::new(),
        }
    }
}

/// Counters of the engine's own decisions (the control client keeps its own).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Tunnel packets to an address no route covers; answered with ICMP.
    pub tun_no_route: u64,
    /// Tunnel packets to multicast, broadcast or link-local addresses: dropped.
    pub tun_local_dropped: u64,
    /// Tunnel packets that are not IPv4/IPv6 or too short to route.
    pub tun_malformed: u64,
    /// Tunnel packets that could not be sent (service not registered yet, queue
    /// full).
    pub tun_send_failed: u64,
    /// Tunnel packets larger than their path carries; answered with ICMP.
    pub tun_too_big: u64,
    /// Packets for the tunnel dropped because the driver did not read them.
    pub tun_queue_dropped: u64,
    /// CANDIDATES frames for sessions we do not have.
    pub candidates_refused: u64,
    /// CANDIDATES frames ignored: within `p2p::REMOTE_UPDATE_INTERVAL` of the
    /// session's last accepted set.
    pub candidates_rate_limited: u64,
    /// Remote candidates beyond `p2p::MAX_REMOTE_CANDIDATES` in one CANDIDATES
    /// frame: not checked.
    pub candidates_dropped: u64,
    /// UDP datagrams from an address that is no relay and matched no connection.
    pub udp_unknown_source: u64,
    /// Services moved to another relay because theirs was lost or drained.
    pub relay_moves: u64,
    /// A relay assigned a tunnel address other than the one in use: kept the one in
    /// use (changing it would break every open connection).
    pub tunnel_address_conflicts: u64,
}

/// The direct path of one service: connectivity checks, then a data connection.
struct Direct {
    /// The relay session whose signalling set it up (the connection itself is
    /// peer to peer and outlives that session).
    relay: SocketAddr,
    session_id: u32,
    checker: Checker,
    conn: Option<DataConnection>,
    retry_at: Option<Instant>,
}

/// Everything the engine keeps per configured service.
#[derive(Default)]
struct Service {
    /// The relay its sessions and datagram relay use.
    relay: Option<SocketAddr>,
    /// The relayed data connection (through `relay`).
    data: Option<DataConnection>,
    /// Leaving a draining relay: its data connection, carrying traffic until the
    /// new one is usable.
    leaving: Option<(SocketAddr, DataConnection)>,
    direct: Option<Direct>,
    /// Earliest time to ask for a relay session.
    want_session: Option<Instant>,
    /// A session request is in flight to this relay.
    requested: Option<SocketAddr>,
    path: Option<PathKind>,
    traffic: Traffic,
}

impl Service {
    fn direct_usable(&self) -> Option<&DataConnection> {
        self.direct
            .as_ref()?
            .conn
            .as_ref()
            .filter(|c| c.is_usable())
    }

    fn connections_mut(&mut self) -> impl Iterator<Item = &mut DataConnection> {
        self.data
            .iter_mut()
            .chain(self.leaving.iter_mut().map(|(_, c)| c))
            .chain(self.direct.iter_mut().filter_map(|d| d.conn.as_mut()))
    }

    fn connections(&self) -> impl Iterator<Item = &DataConnection> {
        self.data
            .iter()
            .chain(self.leaving.iter().map(|(_, c)| c))
            .chain(self.direct.iter().filter_map(|d| d.conn.as_ref()))
    }

    /// The relayed data connection that carries traffic: the new one once usable,
    /// else the one on a draining relay.
    fn relayed_usable_mut(&mut self) -> Option<&mut DataConnection> {
        match self.data.as_mut() {
            Some(d) if d.is_usable() => Some(d),
            _ => self
                .leaving
                .as_mut()
                .map(|(_, c)| c)
                .filter(|c| c.is_usable()),
        }
    }

    fn relayed_usable(&self) -> Option<&DataConnection> {
        match self.data.as_ref() {
            Some(d) if d.is_usable() => Some(d),
            _ => self
                .leaving
                .as_ref()
                .map(|(_, c)| c)
                .filter(|c| c.is_usable()),
        }
    }
}

pub struct AgentEngine {
    relays: RelaySet,
    data_quic: Option<quiche::Config>,
    keepalive: Duration,
    p2p: bool,
    local: SocketAddr,
    host_addrs: Vec<IpAddr>,
    services: BTreeMap<String, Service>,
    /// (relay, session id) → `frames::forwarding` value from SESSION_PATH.
    forwarding: BTreeMap<(SocketAddr, u32), u8>,
    /// Routes from the configuration, then the ones the relays sent (each relay's
    /// latest per service; a connector gone from one relay only is still reached
    /// through the others).
    static_routes: Vec<(IpNet, String)>,
    learned_routes: BTreeMap<(String, SocketAddr), Vec<IpNet>>,
    /// Both of the above, as `route` looks them up.
    routes: Vec<(IpNet, String)>,
    tunnel_address: Option<(Ipv4Addr, Ipv6Addr)>,
    created: Instant,
    handshake: Option<Duration>,
    timeline: Vec<PathChange>,
    events: VecDeque<AgentEvent>,
    /// Packets for the tunnel that did not come from a data connection (datagram
    /// relay, ICMP errors we make); data-connection packets go straight from quiche
    /// into the caller's buffer.
    tun_queue: VecDeque<Vec<u8>>,
    /// Check packets waiting for `poll_transmit`.
    udp_queue: VecDeque<(Vec<u8>, SocketAddr)>,
    stats: AgentStats,
}

impl AgentEngine {
    /// Starts connecting. `local` is the address of the caller's UDP socket (its port
    /// matters for candidates); `host_addrs` are this machine's interface addresses,
    /// used as host candidates when the socket is bound to the unspecified address.
    pub fn new(
        cfg: AgentConfig,
        local: SocketAddr,
        host_addrs: Vec<IpAddr>,
        now: Instant,
    ) -> Result<Self, ClientError> {
        let mut client_cfg = cfg.client;
        client_cfg.role = Role::Agent;
        let data_quic = match DataConfig::from_client(&client_cfg) {
            Some(d) if cfg.data_path => Some(data::quic_config(&d)?),
            _ => None,
        };
        let services = client_cfg
            .services
            .iter()
            .map(|s| (s.clone(), Service::default()))
            .collect();
        let keepalive = client_cfg.keepalive;
        if cfg.relays.len() > 1 {
            client_cfg.liveness.get_or_insert(Liveness::FAST);
        }
        let mut seed = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| quiche::Error::CryptoFail)?;
        let relays = RelaySet::new(
            client_cfg,
            &cfg.relays,
            local,
            u64::from_le_bytes(seed),
            now,
        )?;
        Ok(AgentEngine {
            relays,
            data_quic,
            keepalive,
            p2p: cfg.p2p,
            local,
            host_addrs,
            services,
            forwarding: BTreeMap::new(),
            static_routes: cfg.routes.clone(),
            learned_routes: BTreeMap::new(),
            routes: cfg.routes,
            tunnel_address: None,
            created: now,
            handshake: None,
            timeline: Vec::new(),
            events: VecDeque::new(),
            tun_queue: VecDeque::new(),
            udp_queue: VecDeque::new(),
            stats: AgentStats::default(),
        })
    }

    /// Takes a reloaded configuration (SIGHUP, or the app's settings changed)
    /// without dropping what runs: TLS files apply to new connections (data
    /// connections at once, the control connection at its next connect); new
    /// services are registered now; removed ones have their data connections closed
    /// and their routes withdrawn (`RoutesChanged`). Nothing changes if the new
    /// configuration does not load.
    pub fn reconfigure(&mut self, mut cfg: ClientConfig) -> Result<(), ClientError> {
        cfg.role = Role::Agent;
        let data_quic = match DataConfig::from_client(&cfg) {
            Some(d) if self.data_quic.is_some() => Some(data::quic_config(&d)?),
            _ => None,
        };
        let services = cfg.services.clone();
        if self.relays.len() > 1 {
            cfg.liveness.get_or_insert(Liveness::FAST);
        }
        self.relays.reconfigure(cfg)?;
        if self.data_quic.is_some() {
            self.data_quic = data_quic;
        }
        let removed: Vec<String> = self
            .services
            .keys()
            .filter(|s| !services.contains(s))
            .cloned()
            .collect();
        for name in removed {
            if let Some(mut s) = self.services.remove(&name) {
                if let (Some(d), Some(relay)) = (s.data.as_mut(), s.relay) {
                    d.close("service removed from the configuration");
                    // The relay session goes too (the data connection's own close
                    // may not get out before it is dropped).
                    if let Some(c) = self.relays.get_mut(relay) {
                        let _ = c
                            .close_session(d.session_id, ztna_common::frames::close_reason::NORMAL);
                    }
                }
                if let Some(c) = s.direct.as_mut().and_then(|d| d.conn.as_mut()) {
                    c.close("service removed from the configuration");
                }
            }
            self.learned_routes.retain(|(s, _), _| *s != name);
            self.static_routes.retain(|(_, s)| *s != name);
        }
        for name in services {
            self.services.entry(name).or_default();
        }
        self.rebuild_routes();
        Ok(())
    }

    /// Follows the deployment's relays (a re-resolved DNS name, a changed list):
    /// connects to new ones; services on a removed one move as if it were lost.
    /// An empty list is ignored.
    pub fn set_relays(&mut self, addrs: &[SocketAddr], now: Instant) -> Result<(), ClientError> {
        for gone in self.relays.set_addrs(addrs, now)? {
            self.leave_relay(gone, "relay removed from the deployment", now);
        }
        // Somewhere to move to: notice a lost relay in a second, not in QUIC's 30 s.
        if self.relays.len() > 1 {
            self.relays.set_liveness(Some(Liveness::FAST));
        }
        self.process(now, false);
        Ok(())
    }

    // ---- inputs -------------------------------------------------------------

    /// One UDP datagram that arrived on the socket from `from`. `buf` may be
    /// modified (QUIC decrypts in place).
    pub fn handle_udp(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant) {
        if p2p::is_check(buf) {
            let session = p2p::check_session(buf);
            if let Some(d) = self
                .services
                .values_mut()
                .filter_map(|s| s.direct.as_mut())
                .find(|d| Some(d.session_id) == session)
                && let Some(resp) = d.checker.handle(buf, from, now)
            {
                push_bounded(&mut self.udp_queue, resp, UDP_QUEUE_MAX);
            }
            self.process(now, false);
            return;
        }
        let conn = self
            .services
            .values_mut()
            .flat_map(|s| s.connections_mut())
            .find(|d| data::dcid_is(buf, &d.local_cid));
        match conn {
            Some(d) => {
                d.recv(buf, from, now);
                // Established data connections take the lean way: their packets
                // wait in quiche for `poll_tun`. Only handshakes and closes need the
                // orchestration below.
                if !d.is_usable() {
                    self.process(now, false);
                }
            }
            None => {
                if !self.relays.recv(buf, from, now) {
                    self.stats.udp_unknown_source += 1;
                    return;
                }
                self.process(now, false);
            }
        }
    }

    /// One IP packet read from the tunnel device: sent to the service whose prefix
    /// covers its destination (longest prefix wins), on that service's best path.
    /// TCP SYNs have their MSS clamped to fit [`TUN_MTU`] (hence `&mut`).
    /// A destination no route covers is answered with ICMP "administratively
    /// prohibited", a packet larger than the path carries with ICMP "packet too
    /// big" (read them with `poll_tun`); both are counted, nothing is forwarded.
    pub fn handle_tun(&mut self, packet: &mut [u8], now: Instant) {
        let Some(dst) = packet::destination(packet) else {
            self.stats.tun_malformed += 1;
            return;
        };
        let Some(service) = self.route(dst).map(str::to_owned) else {
            // The OS's own chatter on the device (router solicitations, mDNS): no
            // error for multicast or link-local destinations (RFC 4443 §2.4 (e)).
            if is_local_scope(dst) {
                self.stats.tun_local_dropped += 1;
                return;
            }
            self.stats.tun_no_route += 1;
            self.icmp_to_tun(packet, packet::IcmpError::Prohibited);
            return;
        };
        packet::clamp_mss(packet, max_mss(dst));
        match self.send_packet(&service, packet, now) {
            Ok(()) => {}
            Err(ClientError::PacketTooLarge { max, .. }) => {
                self.stats.tun_too_big += 1;
                let mtu = u16::try_from(max).unwrap_or(u16::MAX);
                self.icmp_to_tun(packet, packet::IcmpError::TooBig { mtu });
            }
            Err(e) => {
                self.stats.tun_send_failed += 1;
                tracing::trace!("tunnel packet for {service:?} not sent: {e}");
            }
        }
    }

    fn icmp_to_tun(&mut self, packet: &[u8], kind: packet::IcmpError) {
        if let Some(icmp) = packet::icmp_error(packet, kind)
            && !push_bounded(&mut self.tun_queue, icmp, TUN_QUEUE_MAX)
        {
            self.stats.tun_queue_dropped += 1;
        }
    }

    /// Sends an IP packet to `service` on its best path: the direct data connection,
    /// else the relayed one, else a DATAGRAM on the control connection.
    pub fn send_packet(
        &mut self,
        service: &str,
        packet: &[u8],
        _now: Instant,
    ) -> Result<(), ClientError> {
        let Some(s) = self.services.get_mut(service) else {
            return Err(ClientError::NotRegistered(service.to_string()));
        };
        let direct = s
            .direct
            .as_mut()
            .and_then(|d| d.conn.as_mut())
            .filter(|c| c.is_usable());
        let r = match direct {
            Some(c) => c.send_packet(packet),
            None => match s.relayed_usable_mut() {
                Some(d) => d.send_packet(packet),
                None => match datagram_relay(&self.relays, s.relay, service) {
                    Some(addr) => self
                        .relays
                        .get_mut(addr)
                        .expect("datagram_relay names a relay of the set")
                        .send_packet(service, packet),
                    None => Err(ClientError::NotRegistered(service.to_string())),
                },
            },
        };
        if r.is_ok() {
            s.traffic.tx_packets += 1;
            s.traffic.tx_bytes += packet.len() as u64;
        }
        r
    }

    /// Runs the timers that are due. Call it once `poll_timeout` has passed, after
    /// feeding every datagram that was waiting on the socket.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.relays.handle_timeout(now);
        for s in self.services.values_mut() {
            for d in s.connections_mut() {
                if d.poll_timeout().is_some_and(|t| t <= now) {
                    d.handle_timeout(now);
                }
            }
        }
        self.process(now, true);
    }

    /// The machine's network changed (interfaces, Wi-Fi ↔ cellular, wake from
    /// sleep): new host addresses; direct paths are dropped and checked again at
    /// once, the relayed ones carry the traffic meanwhile.
    pub fn network_changed(&mut self, host_addrs: Vec<IpAddr>, now: Instant) {
        self.host_addrs = host_addrs;
        for s in self.services.values_mut() {
            if let Some(d) = s.direct.as_mut() {
                if let Some(c) = d.conn.as_mut() {
                    c.close("network changed");
                }
                d.retry_at = Some(now);
            }
        }
        self.process(now, false);
    }

    /// Turns hole punching on or off.
    pub fn set_p2p(&mut self, on: bool, now: Instant) {
        self.p2p = on;
        if !on {
            for s in self.services.values_mut() {
                if let Some(c) = s.direct.as_mut().and_then(|d| d.conn.as_mut()) {
                    c.close("p2p disabled");
                }
            }
        }
        self.process(now, false);
    }

    /// Closes every connection; what is left to send comes out of `poll_transmit`.
    pub fn close(&mut self) {
        for s in self.services.values_mut() {
            for d in s.connections_mut() {
                d.close("agent exiting");
            }
        }
        self.relays.close("agent exiting");
    }

    // ---- outputs ------------------------------------------------------------

    /// Next UDP datagram to send, written into `out` (at least
    /// [`crate::MAX_UDP_PAYLOAD`] bytes): (length, destination).
    pub fn poll_transmit(&mut self, out: &mut [u8], now: Instant) -> Option<(usize, SocketAddr)> {
        if let Some((p, to)) = self.udp_queue.pop_front() {
            out[..p.len()].copy_from_slice(&p);
            return Some((p.len(), to));
        }
        if let Some(t) = self.relays.poll_transmit(out, now) {
            return Some(t);
        }
        for s in self.services.values_mut() {
            for d in s.connections_mut() {
                if let Some(t) = d.poll_transmit(out, now) {
                    return Some(t);
                }
            }
            if let Some(d) = s.direct.as_mut()
                && let Some((p, to)) = d.checker.poll_transmit(now)
            {
                out[..p.len()].copy_from_slice(&p);
                return Some((p.len(), to));
            }
        }
        None
    }

    /// Next IP packet for the tunnel device, written into `out` (at least
    /// [`crate::MAX_UDP_PAYLOAD`] bytes): its length.
    pub fn poll_tun(&mut self, out: &mut [u8]) -> Option<usize> {
        if let Some(p) = self.tun_queue.pop_front() {
            let n = p.len().min(out.len());
            out[..n].copy_from_slice(&p[..n]);
            return Some(n);
        }
        for s in self.services.values_mut() {
            let mut got = None;
            for d in s.connections_mut() {
                if let Some(n) = d.recv_packet(out) {
                    got = Some(n);
                    break;
                }
            }
            if let Some(n) = got {
                s.traffic.rx_packets += 1;
                s.traffic.rx_bytes += n as u64;
                if let Some(src) = packet::destination(&out[..n]) {
                    packet::clamp_mss(&mut out[..n], max_mss(src));
                }
                return Some(n);
            }
        }
        None
    }

    /// When `handle_timeout` must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.relays.poll_timeout();
        let mut at = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        for s in self.services.values() {
            for d in s.connections() {
                at(d.poll_timeout());
            }
            if s.data.as_ref().is_some_and(|d| !d.is_usable()) {
                at(s.data.as_ref().map(|d| d.started() + DATA_SETUP_TIMEOUT));
            }
            at(s.want_session);
            if let Some(d) = &s.direct {
                at(d.checker.poll_timeout());
                at(d.retry_at);
                if let Some(c) = d.conn.as_ref() {
                    if c.is_usable() {
                        // Judged with the same limit in `service_direct`, so reaching
                        // this deadline either finds the path dead or finds newer
                        // packets: no wake-up repeats.
                        at(Some(c.last_recv() + direct_silence_limit(c)));
                    } else {
                        at(Some(c.started() + DATA_SETUP_TIMEOUT));
                    }
                }
            }
        }
        t
    }

    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }

    // ---- state --------------------------------------------------------------

    /// The path `service`'s packets take now.
    pub fn path(&self, service: &str) -> PathKind {
        let Some(s) = self.services.get(service) else {
            return PathKind::Datagram;
        };
        if s.direct_usable().is_some() {
            return PathKind::Direct;
        }
        let relayed = match (&s.data, s.relay, &s.leaving) {
            (Some(d), Some(r), _) if d.is_usable() => Some((r, d.session_id)),
            (_, _, Some((r, c))) if c.is_usable() => Some((*r, c.session_id)),
            _ => None,
        };
        match relayed {
            Some(key) => match self.forwarding.get(&key) {
                Some(&forwarding::XDP_NATIVE) | Some(&forwarding::XDP_GENERIC) => {
                    PathKind::RelayXdp
                }
                _ => PathKind::RelayUserspace,
            },
            None => PathKind::Datagram,
        }
    }

    /// The configured services, in order.
    pub fn services(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    /// Packets and bytes sent to and received from `service`.
    pub fn traffic(&self, service: &str) -> Traffic {
        self.services
            .get(service)
            .map(|s| s.traffic)
            .unwrap_or_default()
    }

    /// Smoothed RTT of `service`'s current data connection (none on the datagram
    /// relay).
    pub fn rtt(&self, service: &str) -> Option<Duration> {
        let s = self.services.get(service)?;
        s.direct_usable()
            .or(s.relayed_usable())
            .and_then(|d| d.stats_rtt())
    }

    /// Everything a status display shows, as of now.
    pub fn status(&self) -> AgentStatus {
        let services = self
            .services
            .iter()
            .map(|(name, s)| ServiceStatus {
                name: name.clone(),
                registered: self.relays.iter().any(|r| r.client.is_registered(name)),
                prefixes: self
                    .routes
                    .iter()
                    .filter(|(_, svc)| svc == name)
                    .map(|(p, _)| *p)
                    .collect(),
                path: self.path(name),
                rtt_ms: self.rtt(name).map(|d| d.as_secs_f64() * 1000.0),
                relay: s.relay,
                standby: self.relays.choose(name, s.relay),
                traffic: s.traffic,
                history: self
                    .timeline
                    .iter()
                    .filter(|c| &c.service == name)
                    .cloned()
                    .collect(),
            })
            .collect();
        let relays = self
            .relays
            .iter()
            .map(|r| RelayStatus {
                address: r.addr(),
                connected: r.client.is_established(),
                draining: r.is_draining(),
                rtt_ms: r.client.rtt().map(|d| d.as_secs_f64() * 1000.0),
            })
            .collect();
        AgentStatus {
            connected: self.relays.any_established(),
            observed_address: self.relays.observed_address(),
            tunnel_ipv4: self.tunnel_address.map(|a| a.0),
            tunnel_ipv6: self.tunnel_address.map(|a| a.1),
            mtu: TUN_MTU,
            handshake_ms: self.handshake.map(|d| d.as_secs_f64() * 1000.0),
            services,
            relays,
            tun_no_route: self.stats.tun_no_route,
            tun_too_big: self.stats.tun_too_big,
            tun_send_failed: self.stats.tun_send_failed,
        }
    }

    /// Every path change so far, in order.
    pub fn timeline(&self) -> &[PathChange] {
        &self.timeline
    }

    /// The service whose prefix covers `dst` (the longest prefix wins).
    pub fn route(&self, dst: IpAddr) -> Option<&str> {
        self.routes
            .iter()
            .filter(|(net, _)| net.contains(&dst))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, s)| s.as_str())
    }

    /// The routes: destination prefix → service.
    pub fn routes(&self) -> &[(IpNet, String)] {
        &self.routes
    }

    /// Our addresses inside the tunnel, once the intermediate assigned them.
    pub fn tunnel_address(&self) -> Option<(Ipv4Addr, Ipv6Addr)> {
        self.tunnel_address
    }

    fn rebuild_routes(&mut self) {
        let mut routes = self.static_routes.clone();
        for ((service, _), prefixes) in &self.learned_routes {
            for p in prefixes {
                if !routes.iter().any(|(q, _)| q == p) {
                    routes.push((*p, service.clone()));
                }
            }
        }
        if routes != self.routes {
            self.routes = routes;
            self.events.push_back(AgentEvent::RoutesChanged);
        }
    }

    /// The relayed data connection of `service`, if any.
    pub fn data_connection(&self, service: &str) -> Option<&DataConnection> {
        self.services.get(service)?.data.as_ref()
    }

    /// The direct data connection of `service`, if one is up.
    pub fn direct_connection(&self, service: &str) -> Option<&DataConnection> {
        self.services.get(service)?.direct_usable()
    }

    /// Largest IP packet to `service` on its current path.
    pub fn max_packet_len(&self, service: &str) -> Option<usize> {
        let s = self.services.get(service)?;
        if let Some(c) = s.direct_usable() {
            return c.max_packet_len();
        }
        match s.relayed_usable() {
            Some(d) => d.max_packet_len(),
            None => self
                .relays
                .get(datagram_relay(&self.relays, s.relay, service)?)?
                .max_packet_len(service),
        }
    }

    /// Control-connection handshake time of the most recent connection.
    pub fn handshake_time(&self) -> Option<Duration> {
        self.handshake
    }

    /// The first relay's control connection (the only one, configured with one).
    pub fn client(&self) -> &ControlClient {
        self.relays.primary()
    }

    pub fn client_mut(&mut self) -> &mut ControlClient {
        self.relays.primary_mut()
    }

    /// Every relay's control connection.
    pub fn relays(&self) -> &RelaySet {
        &self.relays
    }

    /// The relay `service`'s sessions and datagram relay use now.
    pub fn relay_of(&self, service: &str) -> Option<SocketAddr> {
        self.services.get(service)?.relay
    }

    pub fn stats(&self) -> &AgentStats {
        &self.stats
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The control connection is closed for good and nothing is left to send.
    pub fn is_stopped(&self) -> bool {
        self.relays.is_stopped()
    }

    // ---- orchestration ------------------------------------------------------

    /// Takes the control client's events, moves relay sessions and direct paths
    /// along, and records path changes. `judge_liveness` only where every datagram
    /// that arrived has been fed (see the module docs).
    fn process(&mut self, now: Instant, judge_liveness: bool) {
        self.take_client_events(now);
        self.service_relay(now);
        self.service_direct(now, judge_liveness);
        self.record_paths(now);
    }

    fn record_paths(&mut self, now: Instant) {
        let changed: Vec<(String, PathKind)> = self
            .services
            .iter()
            .filter_map(|(name, s)| {
                let p = self.path(name);
                (s.path != Some(p)).then(|| (name.clone(), p))
            })
            .collect();
        for (service, path) in changed {
            tracing::info!("service {service:?}: path is now {path}");
            if let Some(s) = self.services.get_mut(&service) {
                s.path = Some(path);
            }
            let change = PathChange {
                service,
                at_ms: now.saturating_duration_since(self.created).as_millis() as u64,
                path,
            };
            self.timeline.push(change.clone());
            self.events.push_back(AgentEvent::PathChanged(change));
        }
    }
}

/// Multicast, broadcast and link-local destinations never leave the machine.
fn is_local_scope(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_multicast() || a.is_broadcast() || a.is_link_local(),
        IpAddr::V6(a) => a.is_multicast() || a.is_unicast_link_local(),
    }
}

/// Appends unless the queue is full; false when it dropped the item.
fn push_bounded<T>(q: &mut VecDeque<T>, item: T, max: usize) -> bool {
    if q.len() >= max {
        return false;
    }
    q.push_back(item);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{Icmpv4Type, Icmpv6Type, SlicedPacket, TransportSlice};

    const SERVER: &str = "127.0.0.1:4433";

    fn engine(routes: &[(&str, &str)]) -> AgentEngine {
        let client = ClientConfig::new(
            SERVER.parse().unwrap(),
            Role::Agent,
            vec!["a".into(), "b".into()],
        );
        let mut cfg = AgentConfig::new(client);
        cfg.routes = routes
            .iter()
            .map(|(net, s)| (net.parse().unwrap(), s.to_string()))
            .collect();
        let local = "127.0.0.1:50000".parse().unwrap();
        AgentEngine::new(cfg, local, vec![], Instant::now()).unwrap()
    }

    fn drain_udp(e: &mut AgentEngine, now: Instant) -> Vec<(usize, SocketAddr)> {
        let mut out = vec![0u8; 65535];
        std::iter::from_fn(|| e.poll_transmit(&mut out, now)).collect()
    }

    #[test]
    fn starts_a_handshake_without_any_io() {
        let now = Instant::now();
        let mut e = engine(&[]);
        let sent = drain_udp(&mut e, now);
        assert!(!sent.is_empty(), "the first Initial is ready to send");
        for (n, to) in &sent {
            assert_eq!(*to, SERVER.parse().unwrap());
            assert!(*n >= 1200, "client Initials are padded to 1200 bytes: {n}");
        }
        let t = e.poll_timeout().expect("a retransmission timer");
        assert!(t > now);
        assert_eq!(e.path("a"), PathKind::Datagram);
        assert!(e.poll_event().is_none());
    }

    #[test]
    fn longest_prefix_wins() {
        let e = engine(&[
            ("10.0.0.0/8", "a"),
            ("10.100.0.0/24", "b"),
            ("fd00::/64", "a"),
        ]);
        assert_eq!(e.route("10.100.0.7".parse().unwrap()), Some("b"));
        assert_eq!(e.route("10.101.0.7".parse().unwrap()), Some("a"));
        assert_eq!(e.route("fd00::5".parse().unwrap()), Some("a"));
        assert_eq!(e.route("192.0.2.1".parse().unwrap()), None);
    }

    #[test]
    fn unrouted_ipv4_gets_icmp_administratively_prohibited() {
        let now = Instant::now();
        let mut e = engine(&[("10.100.0.0/24", "a")]);
        let before = drain_udp(&mut e, now).len();
        let pkt = packet::build_udp(
            "100.64.0.2:40000".parse().unwrap(),
            "10.200.0.1:53".parse().unwrap(),
            b"not for you, with more than eight bytes",
        )
        .unwrap();
        e.handle_tun(&mut pkt.clone(), now);
        assert_eq!(e.stats().tun_no_route, 1);
        assert_eq!(
            drain_udp(&mut e, now).len(),
            0,
            "nothing forwarded (had {before})"
        );
        let mut out = vec![0u8; 2048];
        let n = e.poll_tun(&mut out).expect("an ICMP error for the tunnel");
        let reply = out[..n].to_vec();
        let icmp = SlicedPacket::from_ip(&reply).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &icmp.net else {
            panic!("IPv4 expected")
        };
        assert_eq!(ip.header().source_addr().to_string(), "10.200.0.1");
        assert_eq!(ip.header().destination_addr().to_string(), "100.64.0.2");
        let Some(TransportSlice::Icmpv4(m)) = &icmp.transport else {
            panic!("ICMPv4 expected")
        };
        assert_eq!(
            m.icmp_type(),
            Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FilterProhibited
            )
        );
        assert_eq!(m.code_u8(), 13);
        // RFC 792: the offending header plus the first 8 bytes of its payload.
        assert_eq!(m.payload(), &pkt[..28]);
        let mut check = reply.clone();
        assert!(etherparse::Ipv4HeaderSlice::from_slice(&check).is_ok());
        // A valid ICMP checksum sums to zero over the message.
        let sum = check
            .split_off(20)
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum::<u32>();
        let folded = (sum & 0xffff) + (sum >> 16);
        assert_eq!((folded & 0xffff) + (folded >> 16), 0xffff);
        assert!(e.poll_tun(&mut out).is_none());
    }

    #[test]
    fn unrouted_ipv6_gets_icmpv6_prohibited_and_errors_get_none() {
        let now = Instant::now();
        let mut e = engine(&[("fd00:1::/64", "a")]);
        let pkt = packet::build_udp(
            "[fd00:64::2]:40000".parse().unwrap(),
            "[fd00:2::1]:53".parse().unwrap(),
            &[7u8; 1400],
        )
        .unwrap();
        e.handle_tun(&mut pkt.clone(), now);
        let mut out = vec![0u8; 2048];
        let n = e.poll_tun(&mut out).expect("an ICMPv6 error");
        assert!(n <= 1280, "ICMPv6 errors fit the minimum MTU: {n}");
        let reply = out[..n].to_vec();
        let icmp = SlicedPacket::from_ip(&reply).unwrap();
        let Some(TransportSlice::Icmpv6(m)) = &icmp.transport else {
            panic!("ICMPv6 expected")
        };
        assert_eq!(
            m.icmp_type(),
            Icmpv6Type::DestinationUnreachable(etherparse::icmpv6::DestUnreachableCode::Prohibited)
        );
        assert_eq!(m.payload(), &pkt[..1280 - 48]);
        // The OS's router solicitations and mDNS get no error, only a count.
        let rs = packet::build_udp(
            "[fe80::1]:5353".parse().unwrap(),
            "[ff02::fb]:5353".parse().unwrap(),
            b"mdns",
        )
        .unwrap();
        e.handle_tun(&mut rs.clone(), now);
        assert_eq!(e.stats().tun_local_dropped, 1);
        assert_eq!(e.stats().tun_no_route, 1);
        // An ICMP error about our ICMP error is never made (RFC 4443 §2.4).
        e.handle_tun(&mut reply.clone(), now);
        assert_eq!(e.stats().tun_no_route, 2);
        assert!(e.poll_tun(&mut out).is_none());
    }

    #[test]
    fn routed_packets_before_registration_are_counted_not_lost_silently() {
        let now = Instant::now();
        let mut e = engine(&[("10.100.0.0/24", "a")]);
        let pkt = packet::build_udp(
            "100.64.0.2:40000".parse().unwrap(),
            "10.100.0.5:7".parse().unwrap(),
            b"hello",
        )
        .unwrap();
        e.handle_tun(&mut pkt.clone(), now);
        assert_eq!(e.stats().tun_send_failed, 1);
        assert_eq!(e.stats().tun_no_route, 0);
        assert_eq!(e.traffic("a"), Traffic::default());
        let mut out = vec![0u8; 2048];
        assert!(e.poll_tun(&mut out).is_none());
        e.handle_tun(&mut [0x45, 0, 0], now);
        e.handle_tun(&mut [], now);
        assert_eq!(e.stats().tun_malformed, 2);
    }
}
