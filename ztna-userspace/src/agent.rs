//! The Linux agent's IO driver and the echo measurement behind `ztna-agent echo`.
//!
//! [`Agent`] drives a [`ControlClient`] over one blocking UDP socket whose read
//! timeout is the client's next deadline. Tunneled packets that arrive are queued for
//! [`Agent::recv_packet`]; every other event is kept in [`Agent::events`] for callers
//! that want to see them (tests check QAD and NACKs there).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use ztna_common::NackStatus;
use ztna_core::data::{self, DataConfig, DataConnection};
use ztna_core::p2p::{self, Checker};
use ztna_core::packet;
use ztna_core::{ClientConfig, ClientError, ClientEvent, ControlClient, MAX_UDP_PAYLOAD, Role};

use crate::connector::authorize;

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

/// How a service's packets currently travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
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
}

/// The direct path of one service: connectivity checks, then a data connection.
struct Direct {
    session_id: u32,
    checker: Checker,
    conn: Option<DataConnection>,
    retry_at: Option<Instant>,
}

/// One entry of the path timeline.
#[derive(Clone, Debug, Serialize)]
pub struct PathChange {
    pub service: String,
    pub at_ms: u64,
    pub path: PathKind,
}

pub struct Agent {
    client: ControlClient,
    data_quic: Option<quiche::Config>,
    keepalive: Duration,
    /// service → its data connection.
    data: HashMap<String, DataConnection>,
    /// service → earliest time to ask for a relay session.
    want_session: HashMap<String, Instant>,
    /// services with a session request in flight.
    requested: std::collections::HashSet<String>,
    path_changes: u64,
    /// Judge direct-path liveness in this pass (only right after reading the socket).
    liveness: bool,
    /// Hole punching and direct data connections (on unless disabled).
    p2p: bool,
    direct: HashMap<String, Direct>,
    /// session id → `frames::forwarding` value from SESSION_PATH.
    forwarding: HashMap<u32, u8>,
    /// CANDIDATES for sessions we don't have.
    pub candidates_refused: u64,
    last_path: HashMap<String, PathKind>,
    timeline: Vec<PathChange>,
    created: Instant,
    socket: UdpSocket,
    packets: VecDeque<(Option<String>, Vec<u8>)>,
    events: Vec<ClientEvent>,
    connected_at: Option<Instant>,
    handshake: Option<Duration>,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl Agent {
    /// Binds a socket and starts connecting, with relayed data connections.
    pub fn connect(cfg: ClientConfig) -> anyhow::Result<Self> {
        Self::connect_with(cfg, true)
    }

    /// Like `connect`; `data_path: false` keeps to the datagram relay.
    /// Loopback servers get a loopback socket.
    pub fn connect_with(mut cfg: ClientConfig, data_path: bool) -> anyhow::Result<Self> {
        cfg.role = Role::Agent;
        let bind: SocketAddr = match cfg.server {
            SocketAddr::V4(a) if a.ip().is_loopback() => "127.0.0.1:0".parse()?,
            SocketAddr::V4(_) => "0.0.0.0:0".parse()?,
            SocketAddr::V6(_) => "[::]:0".parse()?,
        };
        let socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
        let local = socket.local_addr()?;
        let data_quic = match DataConfig::from_client(&cfg) {
            Some(d) if data_path => Some(data::quic_config(&d)?),
            _ => None,
        };
        let keepalive = cfg.keepalive;
        let client = ControlClient::new(cfg, local, Instant::now())?;
        let mut agent = Agent {
            client,
            data_quic,
            keepalive,
            data: HashMap::new(),
            want_session: HashMap::new(),
            requested: Default::default(),
            path_changes: 0,
            liveness: true,
            p2p: true,
            direct: HashMap::new(),
            forwarding: HashMap::new(),
            candidates_refused: 0,
            last_path: HashMap::new(),
            timeline: Vec::new(),
            created: Instant::now(),
            socket,
            packets: VecDeque::new(),
            events: Vec::new(),
            connected_at: None,
            handshake: None,
            buf: vec![0u8; 65535],
            out: vec![0u8; MAX_UDP_PAYLOAD],
        };
        agent.flush();
        Ok(agent)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("bound socket")
    }

    /// Turns hole punching on or off (on by default with the data path).
    pub fn set_p2p(&mut self, on: bool) {
        self.p2p = on;
        if !on {
            for d in self.direct.values_mut() {
                if let Some(c) = d.conn.as_mut() {
                    c.close("p2p disabled");
                }
            }
        }
    }

    /// Every path change so far, per service, with time since the agent started.
    pub fn timeline(&self) -> &[PathChange] {
        &self.timeline
    }

    /// The direct data connection of `service`, if one is up.
    pub fn direct_connection(&self, service: &str) -> Option<&DataConnection> {
        self.direct
            .get(service)?
            .conn
            .as_ref()
            .filter(|c| c.is_usable())
    }

    pub fn client(&self) -> &ControlClient {
        &self.client
    }

    pub fn client_mut(&mut self) -> &mut ControlClient {
        &mut self.client
    }

    /// Every non-packet event seen so far.
    pub fn events(&self) -> &[ClientEvent] {
        &self.events
    }

    /// Handshake time of the most recent connection.
    pub fn handshake_time(&self) -> Option<Duration> {
        self.handshake
    }

    fn flush(&mut self) {
        let now = Instant::now();
        while let Some((n, to)) = self.client.poll_transmit(&mut self.out, now) {
            if let Err(e) = self.socket.send_to(&self.out[..n], to) {
                tracing::debug!("send to {to}: {e}");
                break;
            }
        }
        for d in self
            .data
            .values_mut()
            .chain(self.direct.values_mut().filter_map(|d| d.conn.as_mut()))
        {
            while let Some((n, to)) = d.poll_transmit(&mut self.out, now) {
                if let Err(e) = self.socket.send_to(&self.out[..n], to) {
                    tracing::debug!("send to {to}: {e}");
                    break;
                }
            }
        }
        for d in self.direct.values_mut() {
            while let Some((pkt, to)) = d.checker.poll_transmit(now) {
                tracing::debug!("check to {to}");
                let _ = self.socket.send_to(&pkt, to);
            }
        }
    }

    /// The path `service`'s packets take now.
    pub fn path(&self, service: &str) -> PathKind {
        if self.direct_connection(service).is_some() {
            return PathKind::Direct;
        }
        match self.data.get(service) {
            Some(d) if d.is_usable() => match self.forwarding.get(&d.session_id) {
                Some(&ztna_common::frames::forwarding::XDP_NATIVE)
                | Some(&ztna_common::frames::forwarding::XDP_GENERIC) => PathKind::RelayXdp,
                _ => PathKind::RelayUserspace,
            },
            _ => PathKind::Datagram,
        }
    }

    fn record_paths(&mut self) {
        let services: Vec<String> = self.client.config().services.clone();
        for s in services {
            let p = self.path(&s);
            if self.last_path.get(&s) != Some(&p) {
                tracing::info!("service {s:?}: path is now {p:?}");
                self.last_path.insert(s.clone(), p);
                self.timeline.push(PathChange {
                    service: s,
                    at_ms: self.created.elapsed().as_millis() as u64,
                    path: p,
                });
                self.path_changes += 1;
            }
        }
    }

    /// Starts, runs and retires the direct paths.
    fn service_direct(&mut self, now: Instant) {
        if !self.p2p || self.data_quic.is_none() {
            return;
        }
        // A usable relayed data connection is the anchor for hole punching.
        let relays: Vec<(String, u32)> = self
            .data
            .iter()
            .filter(|(_, d)| d.is_usable())
            .map(|(s, d)| (s.clone(), d.session_id))
            .collect();
        let local = self.socket.local_addr().expect("bound");
        let observed = self.client.observed_address();
        for (service, session_id) in &relays {
            let fresh = match self.direct.get(service) {
                None => true,
                Some(d) => d.session_id != *session_id || d.retry_at.is_some_and(|t| t <= now),
            };
            if fresh {
                let cands = crate::netif::candidates(local, observed);
                let checker = Checker::new(p2p::Role::Controlling, *session_id, &cands, now);
                if self
                    .client
                    .send_candidates(*session_id, checker.local_password(), &cands)
                    .is_ok()
                {
                    tracing::debug!(
                        "service {service:?}: checking direct path, candidates {cands:?}"
                    );
                    if let Some(old) = self.direct.get_mut(service).and_then(|d| d.conn.as_mut()) {
                        old.close("retrying");
                    }
                    self.direct.insert(
                        service.clone(),
                        Direct {
                            session_id: *session_id,
                            checker,
                            conn: None,
                            retry_at: None,
                        },
                    );
                }
            }
        }
        self.direct
            .retain(|s, _| relays.iter().any(|(r, _)| r == s));
        for (service, d) in self.direct.iter_mut() {
            if d.retry_at.is_some() {
                continue;
            }
            if d.conn.is_none()
                && let Some(peer) = d.checker.selected()
                && let Some(quic) = self.data_quic.as_mut()
            {
                match DataConnection::connect_direct(
                    quic,
                    DIRECT_KEEPALIVE,
                    d.session_id,
                    service,
                    local,
                    peer,
                    now,
                ) {
                    Ok(c) => {
                        tracing::info!(
                            "service {service:?}: direct path to {peer} selected, connecting"
                        );
                        d.conn = Some(c);
                    }
                    Err(e) => tracing::warn!("direct connection to {peer}: {e}"),
                }
            }
            if d.checker.failed() {
                tracing::info!(
                    "service {service:?}: no direct path (all checks failed); staying relayed"
                );
                d.retry_at = Some(now + DIRECT_RETRY);
                continue;
            }
            let Some(c) = d.conn.as_mut() else { continue };
            c.check_peer(now, |der| {
                authorize(der, crate::identity::Role::Connector, service)
            });
            let q = &mut self.packets;
            c.recv_packets(|p| q.push_back((Some(service.clone()), p.to_vec())));
            let silence = now.saturating_duration_since(c.last_recv());
            let rtt = c.stats_rtt().unwrap_or(Duration::from_millis(100));
            let unanswered = c.last_send_instant() > c.last_recv() + rtt;
            let dead = self.liveness
                && c.is_usable()
                && (silence > DIRECT_DEAD
                    || unanswered && silence > (rtt * DIRECT_DEAD_RTTS).max(DIRECT_DEAD_MIN));
            let stuck =
                !c.is_usable() && now.saturating_duration_since(c.started()) > DATA_SETUP_TIMEOUT;
            if dead || stuck || c.is_closed() {
                tracing::info!(
                    "service {service:?}: direct path lost ({}); back to the relay",
                    if dead {
                        format!("silent for {silence:?}")
                    } else if stuck {
                        "setup timed out".into()
                    } else {
                        c.close_reason()
                    }
                );
                c.close("direct path lost");
                d.retry_at = Some(now + DIRECT_RETRY);
            }
        }
        for d in self.direct.values_mut() {
            if d.retry_at.is_some()
                && d.conn
                    .as_ref()
                    .is_some_and(|c| c.is_closed() || !c.is_usable())
            {
                d.conn = None;
            }
        }
    }

    /// The data connection of `service`, if any.
    pub fn data_connection(&self, service: &str) -> Option<&DataConnection> {
        self.data.get(service)
    }

    /// Asks for relay sessions that are due, opens data connections, reads them,
    /// and drops the ones that failed.
    fn service_data(&mut self, now: Instant) {
        self.service_relay(now);
        self.service_direct(now);
        self.record_paths();
    }

    /// Asks for relay sessions that are due, opens relayed data connections, reads
    /// them, and drops the ones that failed.
    fn service_relay(&mut self, now: Instant) {
        if self.data_quic.is_none() {
            return;
        }
        let due: Vec<String> = self
            .want_session
            .iter()
            .filter(|(s, t)| {
                **t <= now && !self.requested.contains(*s) && !self.data.contains_key(*s)
            })
            .map(|(s, _)| s.clone())
            .collect();
        for service in due {
            let r = self.client.request_session(&service);
            tracing::debug!("relay session request for {service:?}: {r:?}");
            if r.is_ok() {
                self.requested.insert(service);
            }
        }
        let mut closed = Vec::new();
        for (service, d) in self.data.iter_mut() {
            if d.check_peer(now, |der| {
                authorize(der, crate::identity::Role::Connector, service)
            }) {
                self.path_changes += 1;
            }
            let q = &mut self.packets;
            d.recv_packets(|p| q.push_back((Some(service.clone()), p.to_vec())));
            if !d.is_usable() && now.duration_since(d.started()) > DATA_SETUP_TIMEOUT {
                d.close("setup timed out");
            }
            if d.is_closed() {
                tracing::info!(
                    "data connection for {service:?} closed: {}",
                    d.close_reason()
                );
                closed.push((service.clone(), d.session_id));
            }
        }
        for (service, session) in closed {
            self.data.remove(&service);
            self.path_changes += 1;
            let _ = self
                .client
                .close_session(session, ztna_common::frames::close_reason::NORMAL);
            self.want_session.insert(service, now + SESSION_RETRY);
        }
    }

    fn take_events(&mut self) {
        let now = Instant::now();
        while let Some(ev) = self.client.poll_event() {
            match ev {
                ClientEvent::Packet { service, packet } => {
                    self.packets.push_back((service, packet))
                }
                ClientEvent::Registered(s) if self.data_quic.is_some() => {
                    self.want_session.insert(s.clone(), now);
                    self.events.push(ClientEvent::Registered(s));
                }
                ClientEvent::SessionReady {
                    service,
                    session_id,
                    agent_cid,
                    connector_cid,
                    ..
                } => {
                    self.requested.remove(&service);
                    let Some(quic) = self.data_quic.as_mut() else {
                        continue;
                    };
                    let local = self.socket.local_addr().expect("bound");
                    match DataConnection::connect(
                        quic,
                        self.keepalive,
                        session_id,
                        &service,
                        agent_cid,
                        connector_cid,
                        local,
                        self.client.server(),
                        now,
                    ) {
                        Ok(d) => {
                            self.data.insert(service, d);
                        }
                        Err(e) => {
                            tracing::warn!("data connection for {service:?}: {e}");
                            self.want_session.insert(service, now + SESSION_RETRY);
                        }
                    }
                }
                ClientEvent::SessionRefused {
                    service, status, ..
                } => {
                    tracing::info!(
                        "relay session for {service:?} refused: {status:?}; using the datagram relay"
                    );
                    self.requested.remove(&service);
                    self.want_session.insert(service, now + SESSION_RETRY);
                }
                ClientEvent::Candidates {
                    session_id,
                    password,
                    candidates,
                } => {
                    match self
                        .direct
                        .values_mut()
                        .find(|d| d.session_id == session_id)
                    {
                        Some(d) => {
                            tracing::debug!("remote candidates {candidates:?}");
                            d.checker.set_remote(password, &candidates, now)
                        }
                        None => {
                            self.candidates_refused += 1;
                            tracing::warn!("CANDIDATES for unknown session {session_id}: refused");
                        }
                    }
                }
                ClientEvent::SessionPath {
                    session_id,
                    forwarding,
                } => {
                    self.forwarding.insert(session_id, forwarding);
                }
                ClientEvent::SessionClosed { session_id, .. } => {
                    self.direct.retain(|_, d| d.session_id != session_id);
                    for d in self.data.values_mut() {
                        if d.session_id == session_id {
                            d.close("session closed by the intermediate");
                        }
                    }
                }
                ClientEvent::Disconnected { .. } => {
                    // Sessions die with the control connection; ask again once it is back.
                    self.requested.clear();
                    for d in self.data.values_mut() {
                        d.close("control connection lost");
                    }
                    self.events.push(ev);
                }
                ev => {
                    if let ClientEvent::Connected { handshake } = &ev {
                        self.handshake = Some(*handshake);
                        self.connected_at = Some(Instant::now());
                    }
                    tracing::debug!("agent event: {ev:?}");
                    self.events.push(ev);
                }
            }
        }
    }

    /// Runs IO until `deadline` or until something happened (an event or packet).
    pub fn drive(&mut self, deadline: Instant) -> io::Result<()> {
        let before = (self.events.len(), self.packets.len(), self.path_changes);
        loop {
            self.liveness = false;
            self.service_data(Instant::now());
            self.liveness = true;
            self.flush();
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            let wake = self
                .data
                .values()
                .chain(self.direct.values().filter_map(|d| d.conn.as_ref()))
                .filter_map(|d| d.poll_timeout())
                .chain(
                    self.direct
                        .values()
                        .filter_map(|d| d.checker.poll_timeout()),
                )
                .chain(self.direct.values().filter_map(|d| d.retry_at))
                .chain(self.direct.values().filter_map(|d| {
                    d.conn
                        .as_ref()
                        .filter(|c| c.is_usable())
                        .map(|c| c.last_recv() + DIRECT_DEAD_MIN)
                }))
                .chain(self.client.poll_timeout())
                .chain(self.want_session.values().copied().filter(|t| *t > now))
                .fold(deadline, |a, b| a.min(b));
            let wait = wake
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            self.socket.set_read_timeout(Some(wait))?;
            // One blocking read, then whatever else is queued, so that liveness is
            // judged on everything that arrived.
            let mut first = true;
            loop {
                if !first {
                    self.socket.set_nonblocking(true)?;
                }
                let r = self.socket.recv_from(&mut self.buf);
                if !first {
                    self.socket.set_nonblocking(false)?;
                }
                first = false;
                let (n, from) = match r {
                    Ok(v) => v,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                    Err(e) => return Err(e),
                };
                {
                    let now = Instant::now();
                    let pkt = &mut self.buf[..n];
                    if p2p::is_check(pkt) {
                        let session = p2p::check_session(pkt);
                        tracing::debug!("check from {from} for session {session:?}");
                        if let Some(d) = self
                            .direct
                            .values_mut()
                            .find(|d| Some(d.session_id) == session)
                            && let Some((resp, to)) = d.checker.handle(pkt, from, now)
                        {
                            let _ = self.socket.send_to(&resp, to);
                        }
                    } else {
                        let direct = self.direct.values_mut().filter_map(|d| d.conn.as_mut());
                        match self
                            .data
                            .values_mut()
                            .chain(direct)
                            .find(|d| data::dcid_is(pkt, &d.local_cid))
                        {
                            Some(d) => d.recv(pkt, from, now),
                            None => self.client.recv(pkt, from, now),
                        }
                    }
                }
            }
            let now = Instant::now();
            if self.client.poll_timeout().is_some_and(|t| t <= now) {
                self.client.handle_timeout(now);
            }
            for d in self
                .data
                .values_mut()
                .chain(self.direct.values_mut().filter_map(|d| d.conn.as_mut()))
            {
                if d.poll_timeout().is_some_and(|t| t <= now) {
                    d.handle_timeout(now);
                }
            }
            self.take_events();
            self.service_data(now);
            self.flush();
            if (self.events.len(), self.packets.len(), self.path_changes) != before {
                return Ok(());
            }
        }
    }

    /// Waits until every configured service is registered; fails on a NACK.
    pub fn wait_registered(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let services = self.client.config().services.clone();
        loop {
            if let Some(ClientEvent::Refused { service, status }) = self
                .events
                .iter()
                .rev()
                .find(|e| matches!(e, ClientEvent::Refused { .. }))
            {
                anyhow::bail!("registration for {service:?} refused: {status}");
            }
            if services.iter().all(|s| self.client.is_registered(s)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let last = self
                    .events
                    .iter()
                    .rev()
                    .find_map(|e| match e {
                        ClientEvent::Disconnected { reason, .. } => Some(reason.clone()),
                        _ => None,
                    })
                    .unwrap_or_else(|| "no answer".into());
                anyhow::bail!("not registered after {timeout:?}: {last}");
            }
            self.drive(deadline)?;
        }
    }

    /// Waits for a NACK or ACK of `service`; returns the NACK status if refused.
    pub fn wait_registration_result(
        &mut self,
        service: &str,
        timeout: Duration,
    ) -> anyhow::Result<Option<NackStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            for e in &self.events {
                match e {
                    ClientEvent::Refused { service: s, status } if s == service => {
                        return Ok(Some(*status));
                    }
                    ClientEvent::Registered(s) if s == service => return Ok(None),
                    _ => {}
                }
            }
            if Instant::now() >= deadline {
                anyhow::bail!("no registration answer for {service:?} within {timeout:?}");
            }
            self.drive(deadline)?;
        }
    }

    /// Sends an IP packet to `service`: over its data connection when that is up,
    /// else as a DATAGRAM on the control connection.
    pub fn send_packet(&mut self, service: &str, packet: &[u8]) -> Result<(), ClientError> {
        let direct = self
            .direct
            .get_mut(service)
            .and_then(|d| d.conn.as_mut())
            .filter(|c| c.is_usable());
        let r = match (direct, self.data.get_mut(service)) {
            (Some(c), _) => c.send_packet(packet),
            (None, Some(d)) if d.is_usable() => d.send_packet(packet),
            _ => self.client.send_packet(service, packet),
        };
        self.flush();
        r
    }

    /// Builds and sends a UDP packet through the tunnel.
    pub fn send_udp(
        &mut self,
        service: &str,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        let pkt = packet::build_udp(src, dst, payload)?;
        self.send_packet(service, &pkt)?;
        Ok(())
    }

    /// Largest UDP payload that fits one tunneled packet to `service` on its
    /// current path.
    pub fn max_udp_payload(&self, service: &str, ipv6: bool) -> Option<usize> {
        let ip_udp = if ipv6 { 40 + 8 } else { 20 + 8 };
        self.max_packet_len(service)?.checked_sub(ip_udp)
    }

    /// Largest IP packet to `service` on its current path.
    pub fn max_packet_len(&self, service: &str) -> Option<usize> {
        if let Some(c) = self.direct_connection(service) {
            return c.max_packet_len();
        }
        match self.data.get(service) {
            Some(d) if d.is_usable() => d.max_packet_len(),
            _ => self.client.max_packet_len(service),
        }
    }

    /// Waits until `service` runs over a data connection (relayed or direct).
    pub fn wait_relay_path(&mut self, service: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !(self.path(service).is_relay() || self.path(service) == PathKind::Direct) {
            if Instant::now() >= deadline {
                anyhow::bail!("no relayed data connection for {service:?} within {timeout:?}");
            }
            self.drive(deadline)?;
        }
        Ok(())
    }

    /// Next tunneled packet, waiting up to `timeout`.
    pub fn recv_packet(
        &mut self,
        timeout: Duration,
    ) -> io::Result<Option<(Option<String>, Vec<u8>)>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.packets.pop_front() {
                return Ok(Some(p));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            self.drive(deadline)?;
        }
    }

    /// Next tunneled UDP packet: (source, destination, payload).
    pub fn recv_udp(
        &mut self,
        timeout: Duration,
    ) -> io::Result<Option<(SocketAddr, SocketAddr, Vec<u8>)>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some((_, pkt)) = self.recv_packet(left)? else {
                return Ok(None);
            };
            if let Ok((src, dst, payload)) = packet::parse_udp(&pkt) {
                return Ok(Some((src, dst, payload.to_vec())));
            }
        }
    }

    /// Waits until `service`'s path is `want`.
    pub fn wait_path(
        &mut self,
        service: &str,
        want: PathKind,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let deadline = start + timeout;
        while self.path(service) != want {
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{service:?} not on {want:?} within {timeout:?} (now {:?})",
                    self.path(service)
                );
            }
            self.drive(deadline)?;
        }
        Ok(start.elapsed())
    }

    pub fn close(&mut self) {
        for d in self.direct.values_mut().filter_map(|d| d.conn.as_mut()) {
            d.close("agent exiting");
        }
        for d in self.data.values_mut() {
            d.close("agent exiting");
        }
        self.client.close("agent exiting");
        self.flush();
    }
}

/// How to fill echo payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Sequence number (4 bytes BE) then bytes counting up from it: every packet unique.
    Seq,
    Zeros,
    /// Pseudo-random bytes (seeded by the sequence number).
    Random,
}

pub fn make_payload(pattern: Pattern, size: usize, seq: u32) -> Vec<u8> {
    let mut p = vec![0u8; size];
    match pattern {
        Pattern::Zeros => {}
        Pattern::Seq => {
            for (i, b) in p.iter_mut().enumerate() {
                *b = (seq as usize).wrapping_add(i) as u8;
            }
            let s = seq.to_be_bytes();
            let n = size.min(4);
            p[..n].copy_from_slice(&s[..n]);
        }
        Pattern::Random => {
            let mut x = u64::from(seq).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for b in p.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
    }
    p
}

#[derive(Clone, Debug)]
pub struct EchoOptions {
    pub service: String,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub size: usize,
    pub pattern: Pattern,
    pub count: u32,
    pub burst: u32,
    pub interval: Duration,
    /// How long to wait for the replies of one burst.
    pub timeout: Duration,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct EchoReport {
    pub service: String,
    /// Path the echoes took: "relay" (end-to-end QUIC data connection through the
    /// forwarded relay) or "datagram" (DATAGRAMs on the control connection).
    pub path: Option<PathKind>,
    /// Control connection handshake.
    pub handshake_ms: Option<f64>,
    /// Data connection handshake (agent ↔ connector through the relay).
    pub data_handshake_ms: Option<f64>,
    pub max_datagram: Option<usize>,
    pub max_udp_payload: Option<usize>,
    pub payload_size: usize,
    pub sent: u32,
    pub echoed_exact: u32,
    pub corrupted: u32,
    pub lost: u32,
    pub rtt_p50_us: Option<u64>,
    pub rtt_p99_us: Option<u64>,
    pub rtt_min_us: Option<u64>,
    pub rtt_max_us: Option<u64>,
    /// Every path change of this service since the agent started (status history).
    pub path_timeline: Vec<PathChange>,
}

impl EchoReport {
    pub fn ok(&self) -> bool {
        self.sent > 0 && self.echoed_exact == self.sent && self.corrupted == 0
    }

    pub fn summary(&self) -> String {
        let history: Vec<String> = self
            .path_timeline
            .iter()
            .map(|c| {
                format!(
                    "{} at {} ms",
                    serde_json::to_value(c.path)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default(),
                    c.at_ms
                )
            })
            .collect();
        let ms =
            |us: Option<u64>| us.map_or("-".into(), |u| format!("{:.3} ms", u as f64 / 1000.0));
        let text = format!(
            "service {} over {}: handshake {} (data connection {}), max DATAGRAM {} B, max UDP payload {} B\n\
             sent {} x {} B, echoed byte-exact {}, corrupted {}, lost {}\n\
             RTT p50 {}, p99 {}, min {}, max {}",
            self.service,
            match self.path {
                Some(PathKind::Direct) => "the direct path",
                Some(PathKind::RelayXdp) => "the forwarded relay (XDP)",
                Some(PathKind::RelayUserspace) => "the forwarded relay (userspace)",
                _ => "the datagram relay",
            },
            self.handshake_ms
                .map_or("-".into(), |h| format!("{h:.3} ms")),
            self.data_handshake_ms
                .map_or("-".into(), |h| format!("{h:.3} ms")),
            self.max_datagram.map_or("-".into(), |v| v.to_string()),
            self.max_udp_payload.map_or("-".into(), |v| v.to_string()),
            self.sent,
            self.payload_size,
            self.echoed_exact,
            self.corrupted,
            self.lost,
            ms(self.rtt_p50_us),
            ms(self.rtt_p99_us),
            ms(self.rtt_min_us),
            ms(self.rtt_max_us),
        );
        if history.is_empty() {
            text
        } else {
            format!("{text}\npath history: {}", history.join(" -> "))
        }
    }
}

pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    Some(sorted[idx.min(sorted.len() - 1)])
}

/// Sends `count` echo requests in bursts and matches replies byte for byte.
pub fn run_echo(agent: &mut Agent, opts: &EchoOptions) -> anyhow::Result<EchoReport> {
    let mut report = EchoReport {
        service: opts.service.clone(),
        path: Some(agent.path(&opts.service)),
        handshake_ms: agent.handshake_time().map(|d| d.as_secs_f64() * 1000.0),
        data_handshake_ms: agent
            .data_connection(&opts.service)
            .and_then(|d| d.handshake_time())
            .map(|d| d.as_secs_f64() * 1000.0),
        max_datagram: match agent.path(&opts.service) {
            PathKind::Direct | PathKind::RelayXdp | PathKind::RelayUserspace => {
                agent.max_packet_len(&opts.service)
            }
            PathKind::Datagram => agent.client().max_datagram_payload(),
        },
        max_udp_payload: agent.max_udp_payload(&opts.service, opts.src.is_ipv6()),
        payload_size: opts.size,
        ..Default::default()
    };
    let mut rtts = Vec::new();
    let mut seq = 0u32;
    let burst = opts.burst.max(1);
    while seq < opts.count {
        // payload → send times of copies still in flight
        let mut outstanding: HashMap<Vec<u8>, VecDeque<Instant>> = HashMap::new();
        let mut in_flight = 0u32;
        for _ in 0..burst.min(opts.count - seq) {
            let payload = make_payload(opts.pattern, opts.size, seq);
            seq += 1;
            agent
                .send_udp(&opts.service, opts.src, opts.dst, &payload)
                .with_context(|| format!("sending echo {seq} of {} bytes", opts.size))?;
            report.sent += 1;
            in_flight += 1;
            outstanding
                .entry(payload)
                .or_default()
                .push_back(Instant::now());
        }
        let deadline = Instant::now() + opts.timeout;
        while in_flight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Some((src, dst, payload)) = agent.recv_udp(left)? else {
                break;
            };
            if src != opts.dst || dst != opts.src {
                // Not ours (a reply addressed elsewhere would be a routing bug).
                report.corrupted += 1;
                in_flight -= 1;
                continue;
            }
            match outstanding.get_mut(&payload).and_then(|q| q.pop_front()) {
                Some(sent_at) => {
                    rtts.push(sent_at.elapsed().as_micros() as u64);
                    report.echoed_exact += 1;
                }
                None => report.corrupted += 1,
            }
            in_flight -= 1;
        }
        report.lost += in_flight;
        if seq < opts.count && !opts.interval.is_zero() {
            let _ = agent.recv_packet(opts.interval)?;
        }
    }
    rtts.sort_unstable();
    report.rtt_p50_us = percentile(&rtts, 50.0);
    report.rtt_p99_us = percentile(&rtts, 99.0);
    report.rtt_min_us = rtts.first().copied();
    report.rtt_max_us = rtts.last().copied();
    report.path = Some(agent.path(&opts.service));
    report.path_timeline = agent
        .timeline()
        .iter()
        .filter(|c| c.service == opts.service)
        .cloned()
        .collect();
    Ok(report)
}
