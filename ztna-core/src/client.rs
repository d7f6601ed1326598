//! Sans-IO control-connection client: the part of an agent or connector that talks
//! to the intermediate. No sockets and no clock of its own: the caller feeds received
//! UDP payloads in, takes payloads to send out, and passes `now` for the client's own
//! timers (reconnect backoff, keepalive). quiche keeps its own loss/idle timers; their
//! deadline is folded into [`ControlClient::poll_timeout`].
//!
//! Lifecycle: `new` starts a QUIC handshake. Once established the client registers
//! every configured service (0x10 for agents, 0x11 for connectors). When the connection
//! closes for any reason the client reports `Disconnected`, waits an exponential
//! backoff and starts a new handshake with fresh connection IDs, then registers again.
//!
//! Framing of tunneled packets (`ztna_common::frames` CAPABILITIES): right after the
//! handshake the client announces that it reads `0x2F` DATAGRAMs. An agent always sends
//! `0x2F` (every intermediate, the original one too, accepts it from agents). A
//! connector sends `0x2F` only when the intermediate answered with `SERVICE_PACKETS`
//! and the packet fits that way; otherwise raw IP, which every intermediate routes back
//! by flow, so a ztna connector works behind the original intermediate.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use ring::rand::{SecureRandom, SystemRandom};
use ztna_common::frames::{self, Cid, Frame, RefusedStatus};
use ztna_common::wire::{self, ControlMessage, NackStatus, WireError};

use crate::frame_io::{self, FrameIo};
use crate::{ALPN, app_error};

/// What the client registers as.
pub use crate::identity::Role;

#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub server: SocketAddr,
    /// Name checked against the intermediate's certificate (and sent as SNI).
    pub server_name: String,
    /// CA bundle that signed the intermediate's certificate. `None` skips server
    /// verification, which only dev setups should do.
    pub ca_file: Option<String>,
    /// Client certificate and key (PEM). Without them the intermediate refuses the
    /// connection unless it runs with client authentication disabled.
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub role: Role,
    pub services: Vec<String>,
    pub idle_timeout: Duration,
    /// ACK-eliciting packet sent after this much silence, so NAT mappings and the
    /// intermediate's idle timer stay alive.
    pub keepalive: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Reconnect after a lost connection. Off for one-shot tools.
    pub reconnect: bool,
    /// Connector: the addresses each service answers on, published to the
    /// intermediate (SERVICE_PREFIXES) once the registration is ACKed.
    pub service_prefixes: BTreeMap<String, Vec<IpNet>>,
    /// Judge the intermediate dead on silence (see [`Liveness`]); `None` leaves it
    /// to QUIC's idle timeout.
    pub liveness: Option<Liveness>,
    /// Connector: this process's instance ID, announced in CAPABILITIES to every
    /// relay (connector affinity, `ztna_common::frames`).
    pub instance: Option<u64>,
}

/// How fast a client notices that its intermediate is gone (killed, node lost):
/// after `probe_after` without a packet from it, an ACK-eliciting probe (repeated
/// each `probe_after`); after `dead_after` without one, and with probes unanswered
/// for `dead_after - probe_after` (so a client that was not scheduled for a while
/// probes before it judges), the connection is dropped at once (`Disconnected`,
/// then the usual reconnect backoff). QUIC's idle timeout
/// (30 s) is far too slow to move a user's tunnel to another relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    pub probe_after: Duration,
    pub dead_after: Duration,
}

impl Liveness {
    /// What agents with several relays and every connector use: a probe after
    /// 250 ms of silence, dead after 1 s (probes unanswered for 750 ms).
    pub const FAST: Liveness = Liveness {
        probe_after: Duration::from_millis(250),
        dead_after: Duration::from_millis(1000),
    };
}

impl ClientConfig {
    pub fn new(server: SocketAddr, role: Role, services: Vec<String>) -> Self {
        ClientConfig {
            server,
            server_name: "intermediate.ztna".into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            role,
            services,
            idle_timeout: Duration::from_secs(30),
            keepalive: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            reconnect: true,
            service_prefixes: BTreeMap::new(),
            liveness: None,
            instance: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("QUIC: {0}")]
    Quic(#[from] quiche::Error),
    #[error(transparent)]
    TlsFile(#[from] crate::tls_files::TlsFileError),
    #[error("service id {service:?}: {source}")]
    ServiceId { service: String, source: WireError },
    #[error("not connected to the intermediate")]
    NotConnected,
    #[error("service {0:?} is not registered")]
    NotRegistered(String),
    #[error("packet of {size} bytes exceeds the maximum of {max} bytes for this tunnel")]
    PacketTooLarge { size: usize, max: usize },
    #[error("DATAGRAM send queue is full; packet dropped")]
    QueueFull,
    #[error(
        "control frame queue full ({queued} bytes unsent): the intermediate grants no stream credit"
    )]
    FrameQueueFull { queued: usize },
}

/// Something the caller should know about, in order of occurrence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// Handshake completed; `handshake` is the time from the first Initial.
    Connected {
        handshake: Duration,
    },
    /// QAD: the address the intermediate sees us at.
    ObservedAddress(SocketAddr),
    Registered(String),
    Refused {
        service: String,
        status: NackStatus,
    },
    /// A tunneled IP packet; `service` is `None` for raw (0x4_/0x6_) datagrams.
    Packet {
        service: Option<String>,
        packet: Vec<u8>,
    },
    /// The connection closed. `retry_in` is `None` when the client will not reconnect.
    Disconnected {
        reason: String,
        retry_in: Option<Duration>,
    },
    /// Agent: the relay session asked for with `request_session` is set up.
    SessionReady {
        request_id: u32,
        service: String,
        session_id: u32,
        agent_cid: Cid,
        connector_cid: Cid,
    },
    /// Agent: the relay session could not be set up.
    SessionRefused {
        request_id: u32,
        service: String,
        status: RefusedStatus,
    },
    /// Connector: an agent's data connection will arrive with DCID `connector_cid`.
    SessionOffer {
        session_id: u32,
        service: String,
        agent_cid: Cid,
        connector_cid: Cid,
    },
    /// Either side: the intermediate ended a relay session.
    SessionClosed {
        session_id: u32,
        reason: u8,
    },
    /// Either side: the other endpoint's NAT-traversal candidates.
    Candidates {
        session_id: u32,
        password: [u8; 16],
        candidates: Vec<crate::p2p::Candidate>,
    },
    /// Either side: how the intermediate forwards the session (`frames::forwarding`).
    SessionPath {
        session_id: u32,
        forwarding: u8,
    },
    /// Agent: the addresses `service` answers on (empty: withdrawn).
    ServicePrefixes {
        service: String,
        prefixes: Vec<IpNet>,
    },
    /// Agent: our own addresses inside the tunnel, assigned by the intermediate.
    TunnelAddress {
        ipv4: std::net::Ipv4Addr,
        ipv6: std::net::Ipv6Addr,
    },
    /// Either side: the intermediate is draining (DRAINING frame). It refuses new
    /// relay sessions and registrations, forwards the existing sessions for at most
    /// `within`, then closes the connection. Move to another relay before then.
    Draining {
        within: Duration,
    },
}

/// Counters of what the client received and could not use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    pub connects: u64,
    /// Connects made without verifying the intermediate's certificate (no CA file,
    /// `--insecure-skip-server-verify`); each one is also warned about.
    pub unverified_connects: u64,
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub malformed: u64,
    pub unknown_type: u64,
    pub unexpected: u64,
    pub bad_frames: u64,
    /// Tunneled packets received as `0x2F` (service-routed) and as raw IP.
    pub service_packets_in: u64,
    pub raw_packets_in: u64,
    /// Connections dropped because the intermediate went silent (see [`Liveness`]).
    pub silent_intermediate: u64,
}

enum State {
    /// `started`: when the first Initial left (`poll_transmit`), so the reported
    /// handshake time is the handshake's, not the caller's set-up before it.
    Connecting {
        started: Option<Instant>,
    },
    Established,
    Backoff {
        until: Instant,
    },
    /// Closed for good (`reconnect` off, or `close` called).
    Stopped,
}

pub struct ControlClient {
    cfg: ClientConfig,
    quic: quiche::Config,
    local: SocketAddr,
    conn: Option<quiche::Connection>,
    state: State,
    backoff: Duration,
    events: VecDeque<ClientEvent>,
    /// service → registered (ACKed) on the current connection.
    registered: BTreeMap<String, bool>,
    observed: Option<SocketAddr>,
    last_send: Instant,
    /// When quiche last accepted a packet from the intermediate, and when we last
    /// probed it (liveness).
    last_recv: Instant,
    last_probe: Instant,
    /// When the first probe since the last packet went out: a connection is judged
    /// dead only after its probes went unanswered that long, so a process that was
    /// not scheduled for a while (a loaded host) does not drop a healthy relay.
    probing_since: Option<Instant>,
    stats: ClientStats,
    rng: SystemRandom,
    frames: FrameIo,
    next_request: u32,
    /// request id → service, for relay-session requests in flight.
    requests: BTreeMap<u32, String>,
    /// CAPABILITIES flags the intermediate sent on the current connection; `None`
    /// until it does (an original intermediate never does).
    server_caps: Option<u32>,
    /// The intermediate of the current connection said it is draining.
    draining: bool,
}

use crate::tls_files::{self, PemKind};

/// Sends one registration DATAGRAM for `service` in `role`.
fn send_registration(conn: &mut quiche::Connection, role: Role, service: &str) {
    let msg = match role {
        Role::Agent => ControlMessage::RegisterAgent { service },
        Role::Connector => ControlMessage::RegisterConnector { service },
    };
    let mut buf = [0u8; 2 + wire::MAX_SERVICE_ID_LEN];
    if let Ok(n) = msg.encode(&mut buf)
        && let Err(e) = conn.dgram_send(&buf[..n])
    {
        tracing::warn!("registering {service}: {e}");
    }
}

/// Queues SERVICE_PREFIXES for `service` if the configuration gives it prefixes.
fn queue_prefixes(frames: &mut FrameIo, cfg: &ClientConfig, service: &str) {
    let Some(prefixes) = cfg.service_prefixes.get(service) else {
        return;
    };
    let mut raw = [0u8; frames::MAX_PREFIXES * 18];
    let (count, n) = frames::encode_prefixes(
        prefixes.iter().map(|p| (p.network(), p.prefix_len())),
        &mut raw,
    );
    let frame = Frame::ServicePrefixes {
        service,
        count,
        prefixes: &raw[..n],
    };
    if let Err(e) = frames.queue(&frame) {
        tracing::warn!("publishing prefixes of {service:?}: {e}");
    }
}

fn quic_config(cfg: &ClientConfig) -> Result<quiche::Config, ClientError> {
    let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
    c.set_application_protos(&[ALPN])?;
    if let Some(ca) = &cfg.ca_file {
        tls_files::load(&mut c, PemKind::CaBundle, ca)?;
        c.verify_peer(true);
    } else {
        c.verify_peer(false);
    }
    if let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) {
        tls_files::load(&mut c, PemKind::CertChain, cert)?;
        tls_files::load(&mut c, PemKind::PrivateKey, key)?;
    }
    crate::apply_transport_defaults(&mut c, cfg.idle_timeout);
    c.set_disable_active_migration(true);
    Ok(c)
}

impl ControlClient {
    /// Creates the client and starts the first handshake. `local` is the address of
    /// the caller's UDP socket.
    pub fn new(cfg: ClientConfig, local: SocketAddr, now: Instant) -> Result<Self, ClientError> {
        for s in &cfg.services {
            wire::check_service_id(s).map_err(|source| ClientError::ServiceId {
                service: s.clone(),
                source,
            })?;
        }
        let quic = quic_config(&cfg)?;
        let registered = cfg.services.iter().map(|s| (s.clone(), false)).collect();
        let mut client = ControlClient {
            backoff: cfg.backoff_initial,
            cfg,
            quic,
            local,
            conn: None,
            state: State::Stopped,
            events: VecDeque::new(),
            registered,
            observed: None,
            last_send: now,
            last_recv: now,
            last_probe: now,
            probing_since: None,
            stats: ClientStats::default(),
            rng: SystemRandom::new(),
            frames: FrameIo::default(),
            next_request: 1,
            requests: BTreeMap::new(),
            server_caps: None,
            draining: false,
        };
        client.start_connect()?;
        Ok(client)
    }

    fn start_connect(&mut self) -> Result<(), ClientError> {
        let mut scid = [0u8; 16];
        self.rng
            .fill(&mut scid)
            .map_err(|_| quiche::Error::CryptoFail)?;
        let scid = quiche::ConnectionId::from_ref(&scid);
        let conn = quiche::connect(
            Some(&self.cfg.server_name),
            &scid,
            self.local,
            self.cfg.server,
            &mut self.quic,
        )?;
        self.conn = Some(conn);
        self.state = State::Connecting { started: None };
        self.stats.connects += 1;
        if self.cfg.ca_file.is_none() {
            // Every connect, not once at start: a reconnect hours later is just as
            // open to an impostor, and that is when someone reads the log.
            self.stats.unverified_connects += 1;
            tracing::warn!(
                "connecting to {} WITHOUT verifying its certificate \
                 (--insecure-skip-server-verify): anyone on the path can impersonate it",
                self.cfg.server
            );
        }
        self.frames.reset();
        self.requests.clear();
        self.server_caps = None;
        self.draining = false;
        for v in self.registered.values_mut() {
            *v = false;
        }
        Ok(())
    }

    /// Takes a reloaded configuration. TLS files and the intermediate's address
    /// apply from the next connect (the established connection keeps its session);
    /// services apply now: new ones are registered on the current connection, changed
    /// prefixes are published again, removed ones are no longer registered after the
    /// next connect (the protocol has no unregistration). Nothing changes if the new
    /// configuration does not load.
    pub fn reconfigure(&mut self, new: ClientConfig) -> Result<(), ClientError> {
        for s in &new.services {
            wire::check_service_id(s).map_err(|source| ClientError::ServiceId {
                service: s.clone(),
                source,
            })?;
        }
        let quic = quic_config(&new)?;
        let old = std::mem::replace(&mut self.cfg, new);
        self.quic = quic;
        self.registered.retain(|s, _| self.cfg.services.contains(s));
        let established = matches!(self.state, State::Established);
        for service in self.cfg.services.clone() {
            if !self.registered.contains_key(&service) {
                self.registered.insert(service.clone(), false);
                if established && let Some(conn) = self.conn.as_mut() {
                    send_registration(conn, self.cfg.role, &service);
                }
            } else if self.registered.get(&service) == Some(&true)
                && old.service_prefixes.get(&service) != self.cfg.service_prefixes.get(&service)
            {
                queue_prefixes(&mut self.frames, &self.cfg, &service);
            }
        }
        Ok(())
    }

    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established)
    }

    pub fn is_registered(&self, service: &str) -> bool {
        self.registered.get(service).copied().unwrap_or(false)
    }

    /// Whether the intermediate of the current connection announced that it is
    /// draining ([`ClientEvent::Draining`]); false again after a reconnect.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// The address the intermediate last reported for us (QAD).
    pub fn observed_address(&self) -> Option<SocketAddr> {
        self.observed
    }

    /// Largest DATAGRAM payload the current connection can carry, as negotiated.
    pub fn max_datagram_payload(&self) -> Option<usize> {
        self.conn.as_ref()?.dgram_max_writable_len()
    }

    /// CAPABILITIES flags of the intermediate on the current connection, `None` until
    /// they arrive (never, from the original intermediate).
    pub fn server_capabilities(&self) -> Option<u32> {
        self.server_caps
    }

    /// Whether `send_packet` may use `0x2F`: agents always may; connectors only when
    /// the intermediate negotiated it.
    fn may_send_service_packets(&self) -> bool {
        self.cfg.role == Role::Agent
            || self
                .server_caps
                .is_some_and(|f| f & frames::capability::SERVICE_PACKETS != 0)
    }

    /// Largest IP packet `send_packet` takes for `service`: for an agent what fits a
    /// `0x2F` message; for a connector, which falls back to raw IP when `0x2F` does
    /// not fit, the whole DATAGRAM.
    pub fn max_packet_len(&self, service: &str) -> Option<usize> {
        let max = self.max_datagram_payload()?;
        match self.cfg.role {
            Role::Agent => max.checked_sub(wire::service_packet_overhead(service)),
            Role::Connector => Some(max),
        }
    }

    /// Feeds one received UDP payload.
    pub fn recv(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let info = quiche::RecvInfo {
            from,
            to: self.local,
        };
        match conn.recv(buf, info) {
            Ok(_) => {
                self.last_recv = now;
                self.probing_since = None;
            }
            Err(e) => tracing::debug!("quic recv: {e}"),
        }
        self.process(now);
    }

    /// Next UDP payload to send, written into `out`: (length, destination).
    pub fn poll_transmit(&mut self, out: &mut [u8], now: Instant) -> Option<(usize, SocketAddr)> {
        let conn = self.conn.as_mut()?;
        if conn.is_established() {
            self.frames.flush(conn, frames::CLIENT_FRAME_STREAM);
        }
        match conn.send(out) {
            Ok((n, info)) => {
                self.last_send = now;
                if let State::Connecting { started: None } = self.state {
                    self.state = State::Connecting { started: Some(now) };
                }
                Some((n, info.to))
            }
            Err(quiche::Error::Done) => None,
            Err(e) => {
                tracing::warn!("quic send: {e}");
                let _ = conn.close(false, 0x1, b"send failure");
                None
            }
        }
    }

    /// When `handle_timeout` must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Backoff { until } => Some(until),
            State::Stopped => None,
            State::Established => {
                let mut t = self.last_send + self.cfg.keepalive;
                if let Some(q) = self.conn.as_ref().and_then(|c| c.timeout_instant()) {
                    t = t.min(q);
                }
                if let Some(l) = self.cfg.liveness {
                    t = t.min(self.last_recv.max(self.last_probe) + l.probe_after);
                    if let Some(dead) = dead_at(self.last_recv, self.probing_since, l) {
                        t = t.min(dead);
                    }
                }
                Some(t)
            }
            State::Connecting { .. } => self.conn.as_ref().and_then(|c| c.timeout_instant()),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Backoff { until } if now >= until => {
                if let Err(e) = self.start_connect() {
                    tracing::warn!("reconnect failed: {e}");
                    self.schedule_reconnect(now, e.to_string());
                }
                return;
            }
            State::Backoff { .. } | State::Stopped => return,
            _ => {}
        }
        if let Some(conn) = self.conn.as_mut() {
            if conn.timeout_instant().is_some_and(|t| t <= now) {
                conn.on_timeout();
            }
            if matches!(self.state, State::Established) {
                if let Some(l) = self.cfg.liveness {
                    let silent = now.saturating_duration_since(self.last_recv);
                    if dead_at(self.last_recv, self.probing_since, l).is_some_and(|t| now >= t) {
                        self.stats.silent_intermediate += 1;
                        tracing::warn!(
                            "intermediate {} silent for {silent:?}: dropping the connection",
                            self.cfg.server
                        );
                        // No CONNECTION_CLOSE: nobody is there to read it, and
                        // quiche's draining period would only delay the move.
                        self.schedule_reconnect(
                            now,
                            format!("intermediate silent for {} ms", silent.as_millis()),
                        );
                        return;
                    }
                    if now >= self.last_recv.max(self.last_probe) + l.probe_after {
                        self.last_probe = now;
                        self.probing_since.get_or_insert(now);
                        let _ = conn.send_ack_eliciting();
                    }
                }
                if now >= self.last_send + self.cfg.keepalive {
                    let _ = conn.send_ack_eliciting();
                }
            }
        }
        self.process(now);
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Queues an IP packet for `service`: as a `0x2F` DATAGRAM where allowed and it
    /// fits (see the module documentation), else (connectors only) as raw IP.
    pub fn send_packet(&mut self, service: &str, packet: &[u8]) -> Result<(), ClientError> {
        if !self.is_registered(service) {
            return Err(if self.is_established() {
                ClientError::NotRegistered(service.to_string())
            } else {
                ClientError::NotConnected
            });
        }
        let max = self
            .max_packet_len(service)
            .ok_or(ClientError::NotConnected)?;
        if packet.len() > max {
            return Err(ClientError::PacketTooLarge {
                size: packet.len(),
                max,
            });
        }
        let wrapped_fits = self
            .max_datagram_payload()
            .is_some_and(|m| packet.len() + wire::service_packet_overhead(service) <= m);
        if !(self.may_send_service_packets() && wrapped_fits) {
            // Only a connector gets here: the intermediate routes raw replies by flow.
            return self.send_raw(packet);
        }
        let msg = ControlMessage::ServicePacket { service, packet };
        let mut buf = vec![0u8; msg.encoded_len()];
        msg.encode(&mut buf)
            .map_err(|source| ClientError::ServiceId {
                service: service.to_string(),
                source,
            })?;
        self.send_datagram(&buf)
    }

    /// Queues a raw IP packet (original datagram-relay format).
    pub fn send_raw(&mut self, packet: &[u8]) -> Result<(), ClientError> {
        if !self.is_established() {
            return Err(ClientError::NotConnected);
        }
        let max = self
            .max_datagram_payload()
            .ok_or(ClientError::NotConnected)?;
        if packet.len() > max {
            return Err(ClientError::PacketTooLarge {
                size: packet.len(),
                max,
            });
        }
        self.send_datagram(packet)
    }

    /// Queues any DATAGRAM payload as is (tests use this to send garbage).
    pub fn send_datagram(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        let conn = self.conn.as_mut().ok_or(ClientError::NotConnected)?;
        match conn.dgram_send(payload) {
            Ok(()) => {
                self.stats.datagrams_out += 1;
                Ok(())
            }
            Err(quiche::Error::Done) => Err(ClientError::QueueFull),
            Err(quiche::Error::BufferTooShort) => Err(ClientError::PacketTooLarge {
                size: payload.len(),
                max: conn.dgram_max_writable_len().unwrap_or(0),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Agent: asks the intermediate for a relay session to `service`; the answer
    /// comes as `SessionReady` or `SessionRefused` with the returned request id.
    pub fn request_session(&mut self, service: &str) -> Result<u32, ClientError> {
        if !self.is_registered(service) {
            return Err(ClientError::NotRegistered(service.to_string()));
        }
        let request_id = self.next_request;
        self.next_request = self.next_request.wrapping_add(1);
        self.send_frame(&Frame::SessionRequest {
            request_id,
            service,
        })?;
        self.requests.insert(request_id, service.to_string());
        Ok(request_id)
    }

    /// Connector: accepts an offered session.
    pub fn accept_session(&mut self, session_id: u32) -> Result<(), ClientError> {
        self.send_frame(&Frame::SessionAccept { session_id })
    }

    /// Either side: tells the intermediate a session is over.
    pub fn close_session(&mut self, session_id: u32, reason: u8) -> Result<(), ClientError> {
        self.send_frame(&Frame::SessionClose { session_id, reason })
    }

    /// Either side: sends our candidates for `session_id` to the other endpoint.
    pub fn send_candidates(
        &mut self,
        session_id: u32,
        password: [u8; 16],
        candidates: &[crate::p2p::Candidate],
    ) -> Result<(), ClientError> {
        let mut raw = [0u8; frames::MAX_CANDIDATES * 20];
        let mut n = 0;
        let mut count = 0u8;
        for c in candidates.iter().take(frames::MAX_CANDIDATES) {
            if frames::encode_candidate(c.kind as u8, c.addr, &mut raw, &mut n) {
                count += 1;
            }
        }
        self.send_frame(&Frame::Candidates {
            session_id,
            password,
            count,
            candidates: &raw[..n],
        })
    }

    fn send_frame(&mut self, frame: &Frame<'_>) -> Result<(), ClientError> {
        if !self.is_established() {
            return Err(ClientError::NotConnected);
        }
        self.frames.queue(frame).map_err(|e| match e {
            frame_io::QueueError::Encode(source) => ClientError::ServiceId {
                service: String::new(),
                source,
            },
            frame_io::QueueError::Full { queued } => ClientError::FrameQueueFull { queued },
        })
    }

    /// The intermediate's address (where relayed data connections go too).
    pub fn server(&self) -> SocketAddr {
        self.cfg.server
    }

    /// Smoothed RTT to the intermediate on the established connection.
    pub fn rtt(&self) -> Option<Duration> {
        if !self.is_established() {
            return None;
        }
        self.conn
            .as_ref()?
            .path_stats()
            .find(|p| p.active)
            .map(|p| p.rtt)
    }

    /// Turns the liveness judgement on or off (see [`Liveness`]).
    pub fn set_liveness(&mut self, l: Option<Liveness>) {
        self.cfg.liveness = l;
        self.probing_since = None;
    }

    /// When the intermediate was last heard from (a packet quiche accepted).
    pub fn last_recv(&self) -> Instant {
        self.last_recv
    }

    /// Closes the connection for good; no reconnect follows.
    pub fn close(&mut self, reason: &str) {
        if let Some(conn) = self.conn.as_mut() {
            let _ = conn.close(true, app_error::CLIENT_CLOSING, reason.as_bytes());
        }
        self.cfg.reconnect = false;
    }

    pub fn is_stopped(&self) -> bool {
        matches!(self.state, State::Stopped)
    }

    fn schedule_reconnect(&mut self, now: Instant, reason: String) {
        self.conn = None;
        for v in self.registered.values_mut() {
            *v = false;
        }
        if self.cfg.reconnect {
            let wait = self.backoff;
            self.backoff = (self.backoff * 2).min(self.cfg.backoff_max);
            self.state = State::Backoff { until: now + wait };
            self.events.push_back(ClientEvent::Disconnected {
                reason,
                retry_in: Some(wait),
            });
        } else {
            self.state = State::Stopped;
            self.events.push_back(ClientEvent::Disconnected {
                reason,
                retry_in: None,
            });
        }
    }

    fn process(&mut self, now: Instant) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if conn.is_closed() {
            let reason = close_reason(conn);
            tracing::info!("control connection closed: {reason}");
            self.schedule_reconnect(now, reason);
            return;
        }
        if let State::Connecting { started } = self.state
            && conn.is_established()
        {
            self.state = State::Established;
            self.last_recv = now;
            self.last_probe = now;
            self.probing_since = None;
            self.events.push_back(ClientEvent::Connected {
                handshake: started.map_or(Duration::ZERO, |s| now.saturating_duration_since(s)),
            });
            // Announce that we read 0x2F; an original intermediate ignores the stream.
            let _ = self.frames.queue(&Frame::Capabilities {
                flags: frames::capability::SERVICE_PACKETS,
                instance: self.cfg.instance,
            });
            let services: Vec<String> = self.registered.keys().cloned().collect();
            for service in services {
                send_registration(conn, self.cfg.role, &service);
            }
        }
        let mut buf = [0u8; 2048];
        loop {
            let n = match conn.dgram_recv(&mut buf) {
                Ok(n) => n,
                Err(quiche::Error::Done) => break,
                Err(e) => {
                    tracing::debug!("dgram_recv: {e}");
                    break;
                }
            };
            self.stats.datagrams_in += 1;
            match ControlMessage::decode(&buf[..n]) {
                Ok(ControlMessage::QadV4 { ip, port }) => {
                    let addr = SocketAddr::from((ip, port));
                    self.observed = Some(addr);
                    self.events.push_back(ClientEvent::ObservedAddress(addr));
                }
                Ok(ControlMessage::QadV6 { ip, port }) => {
                    let addr = SocketAddr::from((ip, port));
                    self.observed = Some(addr);
                    self.events.push_back(ClientEvent::ObservedAddress(addr));
                }
                Ok(ControlMessage::RegisterAck { service }) => {
                    if let Some(v) = self.registered.get_mut(service) {
                        *v = true;
                        queue_prefixes(&mut self.frames, &self.cfg, service);
                        // A working registration ends the backoff escalation.
                        self.backoff = self.cfg.backoff_initial;
                        self.events
                            .push_back(ClientEvent::Registered(service.to_string()));
                    } else {
                        self.stats.unexpected += 1;
                    }
                }
                Ok(ControlMessage::RegisterNack { status, service }) => {
                    self.events.push_back(ClientEvent::Refused {
                        service: service.to_string(),
                        status,
                    });
                }
                Ok(ControlMessage::ServicePacket { service, packet }) => {
                    self.stats.service_packets_in += 1;
                    self.events.push_back(ClientEvent::Packet {
                        service: Some(service.to_string()),
                        packet: packet.to_vec(),
                    });
                }
                Ok(ControlMessage::RawIp { packet }) => {
                    self.stats.raw_packets_in += 1;
                    self.events.push_back(ClientEvent::Packet {
                        service: None,
                        packet: packet.to_vec(),
                    });
                }
                Ok(
                    ControlMessage::RegisterAgent { .. } | ControlMessage::RegisterConnector { .. },
                ) => {
                    self.stats.unexpected += 1;
                }
                Err(WireError::UnknownType(t)) => {
                    self.stats.unknown_type += 1;
                    tracing::debug!("ignoring DATAGRAM of unknown type 0x{t:02x}");
                }
                Err(e) => {
                    self.stats.malformed += 1;
                    tracing::debug!("ignoring malformed DATAGRAM: {e}");
                }
            }
        }
        let (raw, errors) = self.frames.read(conn, frames::SERVER_FRAME_STREAM);
        self.stats.bad_frames += errors;
        for bytes in raw {
            match frame_io::decode(&bytes) {
                Ok(Frame::SessionReady {
                    request_id,
                    session_id,
                    agent_cid,
                    connector_cid,
                }) => {
                    let service = self.requests.remove(&request_id).unwrap_or_default();
                    self.events.push_back(ClientEvent::SessionReady {
                        request_id,
                        service,
                        session_id,
                        agent_cid,
                        connector_cid,
                    });
                }
                Ok(Frame::SessionRefused { request_id, status }) => {
                    let service = self.requests.remove(&request_id).unwrap_or_default();
                    self.events.push_back(ClientEvent::SessionRefused {
                        request_id,
                        service,
                        status,
                    });
                }
                Ok(Frame::SessionOffer {
                    session_id,
                    agent_cid,
                    connector_cid,
                    service,
                }) => {
                    self.events.push_back(ClientEvent::SessionOffer {
                        session_id,
                        service: service.to_string(),
                        agent_cid,
                        connector_cid,
                    });
                }
                Ok(Frame::SessionClose { session_id, reason }) => {
                    self.events
                        .push_back(ClientEvent::SessionClosed { session_id, reason });
                }
                Ok(Frame::Candidates {
                    session_id,
                    password,
                    candidates,
                    ..
                }) => {
                    let candidates = frames::candidates(candidates)
                        .filter_map(|(k, addr)| {
                            Some(crate::p2p::Candidate {
                                kind: crate::p2p::CandidateKind::from_byte(k)?,
                                addr,
                            })
                        })
                        .collect();
                    self.events.push_back(ClientEvent::Candidates {
                        session_id,
                        password,
                        candidates,
                    });
                }
                Ok(Frame::SessionPath {
                    session_id,
                    forwarding,
                }) => {
                    self.events.push_back(ClientEvent::SessionPath {
                        session_id,
                        forwarding,
                    });
                }
                Ok(Frame::ServicePrefixes {
                    service, prefixes, ..
                }) if self.cfg.role == Role::Agent => {
                    let prefixes = frames::prefixes(prefixes)
                        .filter_map(|(ip, len)| IpNet::new(ip, len).ok())
                        .collect();
                    self.events.push_back(ClientEvent::ServicePrefixes {
                        service: service.to_string(),
                        prefixes,
                    });
                }
                Ok(Frame::TunnelAddress { ipv4, ipv6 }) if self.cfg.role == Role::Agent => {
                    self.events
                        .push_back(ClientEvent::TunnelAddress { ipv4, ipv6 });
                }
                Ok(Frame::Capabilities { flags, .. }) => {
                    tracing::debug!("intermediate capabilities 0x{flags:08x}");
                    self.server_caps = Some(flags);
                }
                Ok(Frame::Draining { drain_ms }) => {
                    let within = Duration::from_millis(u64::from(drain_ms));
                    tracing::info!(
                        "the intermediate {} is draining: sessions end within {within:?}",
                        self.cfg.server
                    );
                    self.draining = true;
                    self.events.push_back(ClientEvent::Draining { within });
                }
                Ok(Frame::Unknown { .. }) => {}
                Ok(_) => self.stats.unexpected += 1,
                Err(e) => {
                    self.stats.bad_frames += 1;
                    tracing::debug!("ignoring malformed frame: {e}");
                }
            }
        }
    }
}

/// When a connection counts as dead if nothing arrives: `dead_after` of silence,
/// with probes unanswered for `dead_after - probe_after`.
fn dead_at(last_recv: Instant, probing_since: Option<Instant>, l: Liveness) -> Option<Instant> {
    let probing = probing_since?;
    Some((last_recv + l.dead_after).max(probing + (l.dead_after - l.probe_after)))
}

/// Human-readable reason for a closed connection, naming ztna's application codes.
pub fn close_reason(conn: &quiche::Connection) -> String {
    if conn.is_timed_out() {
        return "idle timeout".into();
    }
    let describe = |who: &str, e: &quiche::ConnectionError| {
        let reason = String::from_utf8_lossy(&e.reason);
        if e.is_app {
            format!(
                "closed by {who}: {} (application error 0x{:x}) {reason}",
                app_error::name(e.error_code),
                e.error_code
            )
        } else {
            format!(
                "closed by {who}: transport error 0x{:x} {reason}",
                e.error_code
            )
        }
    };
    if let Some(e) = conn.peer_error() {
        return describe("peer", e);
    }
    if let Some(e) = conn.local_error() {
        return describe("us", e);
    }
    "connection closed (stateless reset or handshake failure)".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &str = "192.0.2.1:40000";
    const SERVER: &str = "192.0.2.2:4433";

    /// A quiche server config with a fresh self-signed certificate (the client runs
    /// without verification, so any certificate does).
    fn server_config(name: &str) -> quiche::Config {
        let dir = std::env::temp_dir().join(format!("ztna-core-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["intermediate.ztna".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
        c.load_cert_chain_from_pem_file(cert_file.to_str().unwrap())
            .unwrap();
        c.load_priv_key_from_pem_file(key_file.to_str().unwrap())
            .unwrap();
        c.set_application_protos(&[ALPN]).unwrap();
        c.verify_peer(false);
        crate::apply_transport_defaults(&mut c, Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&dir);
        c
    }

    /// The server side of one control connection, packets handed over in memory.
    struct Server {
        quic: quiche::Config,
        conn: Option<quiche::Connection>,
    }

    impl Server {
        /// Moves packets both ways until neither side has anything to send.
        fn pump(&mut self, client: &mut ControlClient, now: Instant) {
            let (caddr, saddr) = (CLIENT.parse().unwrap(), SERVER.parse().unwrap());
            let mut out = [0u8; 2048];
            loop {
                let mut moved = false;
                while let Some((n, to)) = client.poll_transmit(&mut out, now) {
                    assert_eq!(to, saddr);
                    moved = true;
                    if self.conn.is_none() {
                        let scid = quiche::ConnectionId::from_ref(&[9; 16]);
                        let conn = quiche::accept(&scid, None, saddr, caddr, &mut self.quic);
                        self.conn = Some(conn.unwrap());
                    }
                    let info = quiche::RecvInfo {
                        from: caddr,
                        to: saddr,
                    };
                    let _ = self.conn.as_mut().unwrap().recv(&mut out[..n], info);
                }
                if let Some(conn) = self.conn.as_mut() {
                    while let Ok((n, info)) = conn.send(&mut out) {
                        moved = true;
                        client.recv(&mut out[..n], info.from, now);
                    }
                }
                if !moved {
                    return;
                }
            }
        }

        fn send_frame(&mut self, frame: &Frame<'_>) {
            let mut buf = [0u8; 64];
            let n = frame.encode(&mut buf).unwrap();
            let conn = self.conn.as_mut().unwrap();
            assert_eq!(
                conn.stream_send(frames::SERVER_FRAME_STREAM, &buf[..n], false),
                Ok(n)
            );
        }
    }

    fn events(client: &mut ControlClient) -> Vec<ClientEvent> {
        std::iter::from_fn(|| client.poll_event()).collect()
    }

    #[test]
    fn a_draining_frame_is_an_event_and_a_state_until_the_next_connect() {
        let mut cfg = ClientConfig::new(SERVER.parse().unwrap(), Role::Agent, vec!["echo".into()]);
        cfg.backoff_initial = Duration::from_millis(10);
        let now = Instant::now();
        let mut client = ControlClient::new(cfg, CLIENT.parse().unwrap(), now).unwrap();
        let mut server = Server {
            quic: server_config("draining"),
            conn: None,
        };
        server.pump(&mut client, now);
        assert!(client.is_established());
        assert!(!client.is_draining());
        assert!(
            !events(&mut client)
                .iter()
                .any(|e| matches!(e, ClientEvent::Draining { .. }))
        );

        server.send_frame(&Frame::Draining { drain_ms: 2500 });
        server.pump(&mut client, now);
        assert!(client.is_draining());
        assert_eq!(
            events(&mut client),
            vec![ClientEvent::Draining {
                within: Duration::from_millis(2500)
            }]
        );
        // The connection stays up: the intermediate closes it when the drain ends.
        assert!(client.is_established());

        // It closes; the client reconnects to a relay that is not draining (as far as
        // it knows).
        server
            .conn
            .as_mut()
            .unwrap()
            .close(true, app_error::SHUTTING_DOWN, b"drained")
            .unwrap();
        server.pump(&mut client, now);
        // quiche ends its draining period (3 PTO) on its own clock.
        let deadline = Instant::now() + Duration::from_secs(5);
        let retry_in = loop {
            client.handle_timeout(Instant::now());
            if let Some(ClientEvent::Disconnected { retry_in, reason }) = client.poll_event() {
                assert!(reason.contains("shutting down"), "{reason}");
                break retry_in.expect("reconnects");
            }
            assert!(Instant::now() < deadline, "the close was not noticed");
            std::thread::sleep(Duration::from_millis(5));
        };
        client.handle_timeout(Instant::now() + retry_in);
        assert_eq!(client.stats().connects, 2);
        assert!(!client.is_draining(), "reset by the new connect");
    }

    /// Connected with `Liveness::FAST` to an in-memory server at `now`.
    fn live_client(name: &str, now: Instant) -> (ControlClient, Server) {
        let mut cfg = ClientConfig::new(SERVER.parse().unwrap(), Role::Agent, vec!["echo".into()]);
        cfg.liveness = Some(Liveness::FAST);
        let mut client = ControlClient::new(cfg, CLIENT.parse().unwrap(), now).unwrap();
        let mut server = Server {
            quic: server_config(name),
            conn: None,
        };
        server.pump(&mut client, now);
        assert!(client.is_established());
        let _ = events(&mut client);
        (client, server)
    }

    /// Runs the client's timers at `at` and returns how many datagrams it sent
    /// (delivered nowhere: the relay is gone).
    fn tick(client: &mut ControlClient, at: Instant) -> usize {
        client.handle_timeout(at);
        let mut out = [0u8; 2048];
        std::iter::from_fn(|| client.poll_transmit(&mut out, at)).count()
    }

    #[test]
    fn a_silent_relay_is_probed_then_dropped_after_a_second() {
        let t0 = Instant::now();
        let (mut client, _server) = live_client("live-silent", t0);
        let ms = |n: u64| t0 + Duration::from_millis(n);
        assert!(
            client.poll_timeout().unwrap() <= ms(250),
            "the first probe is due"
        );
        assert!(tick(&mut client, ms(260)) >= 1, "a probe goes out");
        assert!(tick(&mut client, ms(520)) >= 1, "and again");
        tick(&mut client, ms(900));
        assert!(client.is_established(), "not dead before a second");
        assert!(events(&mut client).is_empty());
        tick(&mut client, ms(1020));
        match events(&mut client).as_slice() {
            [ClientEvent::Disconnected { reason, retry_in }] => {
                assert!(reason.contains("silent"), "{reason}");
                assert!(retry_in.is_some(), "it reconnects");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(client.stats().silent_intermediate, 1);
    }

    #[test]
    fn a_client_that_was_not_scheduled_probes_before_it_judges() {
        let t0 = Instant::now();
        let (mut client, mut server) = live_client("live-starved", t0);
        // Five seconds without a turn (a loaded host): no verdict yet, a probe first.
        let late = t0 + Duration::from_secs(5);
        client.handle_timeout(late);
        assert!(client.is_established(), "{:?}", events(&mut client));
        // The relay answers the probe: alive.
        server.pump(&mut client, late + Duration::from_millis(100));
        tick(&mut client, late + Duration::from_millis(900));
        assert!(client.is_established());
        assert_eq!(client.stats().silent_intermediate, 0);
    }
}
