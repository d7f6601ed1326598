//! The Linux agent's blocking IO driver over [`AgentEngine`], and the echo
//! measurement behind `ztna-agent echo`.
//!
//! All agent logic (registration, relay sessions, direct paths, liveness, fallback,
//! path history) is the sans-IO engine in `ztna_core::agent`. [`Agent`] only owns the
//! UDP socket: it reads with the engine's next deadline as timeout, feeds datagrams
//! in, sends what comes out, and keeps the tunnel packets and events for callers
//! (tests and the echo tool) to look at.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use ztna_common::NackStatus;
use ztna_core::agent::{AgentConfig, AgentEngine};
pub use ztna_core::agent::{AgentEvent, PathChange, PathKind};
use ztna_core::data::DataConnection;
use ztna_core::packet;
use ztna_core::{ClientConfig, ClientError, ControlClient};

pub struct Agent {
    engine: AgentEngine,
    socket: UdpSocket,
    packets: VecDeque<Vec<u8>>,
    events: Vec<AgentEvent>,
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
    pub fn connect_with(cfg: ClientConfig, data_path: bool) -> anyhow::Result<Self> {
        let mut agent = AgentConfig::new(cfg);
        agent.data_path = data_path;
        Self::start(agent)
    }

    /// Binds a socket for the engine's server and starts the engine.
    pub fn start(cfg: AgentConfig) -> anyhow::Result<Self> {
        let bind: SocketAddr = match cfg.client.server {
            SocketAddr::V4(a) if a.ip().is_loopback() => "127.0.0.1:0".parse()?,
            SocketAddr::V4(_) => "0.0.0.0:0".parse()?,
            SocketAddr::V6(_) => "[::]:0".parse()?,
        };
        let socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
        let local = socket.local_addr()?;
        let engine = AgentEngine::new(cfg, local, crate::netif::interface_addrs(), Instant::now())?;
        let mut agent = Agent {
            engine,
            socket,
            packets: VecDeque::new(),
            events: Vec::new(),
            buf: vec![0u8; 65535],
            out: vec![0u8; 65535],
        };
        agent.flush();
        Ok(agent)
    }

    pub fn engine(&self) -> &AgentEngine {
        &self.engine
    }

    /// See [`AgentEngine::reconfigure`].
    pub fn reconfigure(
        &mut self,
        cfg: ztna_core::ClientConfig,
    ) -> Result<(), ztna_core::ClientError> {
        self.engine.reconfigure(cfg)?;
        self.flush();
        Ok(())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.engine.local_addr()
    }

    /// Turns hole punching on or off (on by default with the data path).
    pub fn set_p2p(&mut self, on: bool) {
        self.engine.set_p2p(on, Instant::now());
        self.flush();
    }

    /// Every path change so far, per service, with time since the agent started.
    pub fn timeline(&self) -> &[PathChange] {
        self.engine.timeline()
    }

    /// The direct data connection of `service`, if one is up.
    pub fn direct_connection(&self, service: &str) -> Option<&DataConnection> {
        self.engine.direct_connection(service)
    }

    /// The data connection of `service`, if any.
    pub fn data_connection(&self, service: &str) -> Option<&DataConnection> {
        self.engine.data_connection(service)
    }

    pub fn client(&self) -> &ControlClient {
        self.engine.client()
    }

    pub fn client_mut(&mut self) -> &mut ControlClient {
        self.engine.client_mut()
    }

    /// Every event seen so far.
    pub fn events(&self) -> &[AgentEvent] {
        &self.events
    }

    /// Handshake time of the most recent connection.
    pub fn handshake_time(&self) -> Option<Duration> {
        self.engine.handshake_time()
    }

    /// The path `service`'s packets take now.
    pub fn path(&self, service: &str) -> PathKind {
        self.engine.path(service)
    }

    /// Sends what the engine has to send, and collects its tunnel packets and
    /// events.
    fn flush(&mut self) {
        let now = Instant::now();
        while let Some((n, to)) = self.engine.poll_transmit(&mut self.out, now) {
            if let Err(e) = self.socket.send_to(&self.out[..n], to) {
                // Lost sends are QUIC's to recover; checks are retransmitted.
                tracing::debug!("send to {to}: {e}");
            }
        }
        while let Some(n) = self.engine.poll_tun(&mut self.buf) {
            self.packets.push_back(self.buf[..n].to_vec());
        }
        while let Some(ev) = self.engine.poll_event() {
            tracing::debug!("agent event: {ev:?}");
            self.events.push(ev);
        }
    }

    /// Runs IO until `deadline` or until something happened (an event or packet).
    pub fn drive(&mut self, deadline: Instant) -> io::Result<()> {
        let before = (self.events.len(), self.packets.len());
        loop {
            self.flush();
            let now = Instant::now();
            if (self.events.len(), self.packets.len()) != before || now >= deadline {
                return Ok(());
            }
            let wake = self
                .engine
                .poll_timeout()
                .map_or(deadline, |t| t.min(deadline));
            // A zero read timeout means "block forever" to the socket API.
            let wait = wake
                .saturating_duration_since(now)
                .max(Duration::from_micros(50));
            self.socket.set_read_timeout(Some(wait))?;
            // One blocking read, then whatever else is queued: the engine judges
            // liveness only after everything that arrived was fed.
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
                match r {
                    Ok((n, from)) => {
                        self.engine
                            .handle_udp(&mut self.buf[..n], from, Instant::now())
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::ConnectionRefused
                        ) =>
                    {
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            let now = Instant::now();
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                self.engine.handle_timeout(now);
            }
        }
    }

    /// Waits until every configured service is registered; fails on a NACK.
    pub fn wait_registered(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let services = self.client().config().services.clone();
        loop {
            if let Some(AgentEvent::Refused { service, status }) = self
                .events
                .iter()
                .rev()
                .find(|e| matches!(e, AgentEvent::Refused { .. }))
            {
                anyhow::bail!("registration for {service:?} refused: {status}");
            }
            if services.iter().all(|s| {
                self.engine
                    .relays()
                    .iter()
                    .any(|r| r.client.is_registered(s))
            }) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let last = self
                    .events
                    .iter()
                    .rev()
                    .find_map(|e| match e {
                        AgentEvent::Disconnected { reason, .. } => Some(reason.clone()),
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
                    AgentEvent::Refused { service: s, status } if s == service => {
                        return Ok(Some(*status));
                    }
                    AgentEvent::Registered(s) if s == service => return Ok(None),
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
        let r = self.engine.send_packet(service, packet, Instant::now());
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
        self.engine.max_packet_len(service)
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
    pub fn recv_packet(&mut self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
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
            let Some(pkt) = self.recv_packet(left)? else {
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
        self.engine.close();
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
            .map(|c| format!("{} at {} ms", c.path, c.at_ms))
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
