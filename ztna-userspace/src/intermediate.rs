//! The intermediate server: QUIC (quiche) on one UDP socket, driven by a mio loop.
//!
//! Per packet: parse the QUIC header; route by DCID to a connection; unknown DCIDs
//! get a version negotiation, a stateless retry (Initial without a valid token), a new
//! connection (Initial with a valid token) or a stateless reset (short header).
//! Per connection: require and check the client certificate, send QAD after the
//! handshake and whenever the client's address changes, answer registrations, relay
//! service packets between agents and the connector of their service.
//!
//! Framing of relayed packets: each client is answered in the framing it can read.
//! A client that announced `SERVICE_PACKETS` (CAPABILITIES frame, ztna clients) gets
//! `0x2F` where the wrapped packet fits its connection's DATAGRAM limit and raw IP
//! where it does not; every other client (the original system's agents and
//! connectors) gets raw IP only, the packet exactly as its sender tunneled it, as the
//! original intermediate relays. So a packet its sender could send always fits the
//! receiver's connection (same transport settings), whatever the service id's length.
//!
//! Stateless resets use a key derived from the server's private key, so a restarted
//! intermediate resets the connections of its previous incarnation and their clients
//! reconnect at once instead of waiting out the idle timeout.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use ztna_common::wire::{self, ControlMessage, NackStatus, WireError};
use ztna_core::packet::{self, PortField};
use ztna_core::{ALPN, MAX_UDP_PAYLOAD, app_error};

use ztna_common::frames::{self, Frame, RefusedStatus, close_reason};
use ztna_core::frame_io::{self, FrameIo};

use crate::batch::{RecvBatch, SendBatch};
use crate::flows::{ClientId, FlowTable};
use crate::identity::{PeerIdentity, Role};
use crate::relay::{ForwardResult, KernelTable, RelayTable, relay_cid_of};

/// Length of the intermediate's own connection IDs.
pub const LOCAL_CID_LEN: usize = 16;
/// First byte reserved for relay CIDs; the intermediate's own CIDs never start with it.
pub const RELAY_CID_MARKER: u8 = 0xA5;
const TOKEN_LIFETIME: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Debug)]
pub struct IntermediateConfig {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// CA that signs client certificates. Required unless `require_client_cert` is off.
    pub ca_file: Option<PathBuf>,
    pub require_client_cert: bool,
    pub idle_timeout: Duration,
    /// Stateless retry (address validation) before creating connection state.
    pub retry: bool,
    /// XDP fast path for relayed data connections.
    pub xdp: crate::xdp::XdpChoice,
    /// Interfaces to attach the XDP program to.
    pub xdp_interfaces: Vec<String>,
    /// Write counters as JSON here every second (and at exit).
    pub stats_file: Option<PathBuf>,
    /// Fixed relay sessions between address pairs (benchmarks, diagnostics).
    pub static_sessions: Vec<(SocketAddr, SocketAddr)>,
}

impl IntermediateConfig {
    pub fn new(listen: SocketAddr, cert: PathBuf, key: PathBuf, ca: Option<PathBuf>) -> Self {
        IntermediateConfig {
            listen,
            cert_file: cert,
            key_file: key,
            ca_file: ca,
            require_client_cert: true,
            idle_timeout: Duration::from_secs(30),
            retry: true,
            xdp: crate::xdp::XdpChoice::Off,
            xdp_interfaces: Vec::new(),
            stats_file: None,
            static_sessions: Vec::new(),
        }
    }
}

macro_rules! stats {
    ($name:ident { $($(#[$m:meta])* $field:ident),* $(,)? }) => {
        /// Counters, readable while the server runs.
        #[derive(Debug, Default)]
        pub struct $name { $($(#[$m])* pub $field: AtomicU64,)* }
        impl $name {
            pub fn snapshot(&self) -> serde_json::Value {
                let mut m = serde_json::Map::new();
                $(m.insert(stringify!($field).into(), self.$field.load(Ordering::Relaxed).into());)*
                serde_json::Value::Object(m)
            }
        }
    };
}

stats!(IntermediateStats {
    /// UDP payloads that are not QUIC packets.
    garbage_packets,
    /// Short-header packets for connections we don't know.
    unknown_cid_packets,
    stateless_resets_sent,
    retries_sent,
    invalid_tokens,
    version_negotiations,
    connections_accepted,
    connections_closed,
    /// Clients refused for presenting no certificate.
    refused_no_certificate,
    qad_sent,
    registrations_accepted,
    registrations_refused,
    /// Connector registrations that replaced an earlier connector of the same service.
    connector_takeovers,
    datagrams_in,
    datagrams_unknown_type,
    datagrams_malformed,
    /// Well-formed messages a client must not send (ACK, QAD, ...).
    datagrams_unexpected,
    relayed_to_connector,
    relayed_to_agent,
    /// Relayed as raw IP to a client that reads `0x2F`, because wrapped it would not
    /// have fit that client's DATAGRAM limit.
    relayed_raw_to_fit,
    /// Malformed registrations (length 0, not UTF-8, trailing bytes, ...) answered
    /// with NACK 0x01; also counted in `datagrams_malformed` and
    /// `registrations_refused`.
    registrations_malformed,
    /// CAPABILITIES frames received.
    capabilities_received,
    port_translations,
    dropped_not_registered,
    dropped_no_connector,
    dropped_no_flow,
    dropped_bad_inner_packet,
    dropped_send_failed,
    /// Packets larger than the receiving client's DATAGRAM limit even as raw IP
    /// (its connection negotiated a smaller one than the sender's); also counted in
    /// `dropped_send_failed`.
    dropped_too_large,
    relay_sessions_created,
    relay_sessions_refused,
    relay_sessions_closed,
    /// Relayed data-connection packets forwarded by the userspace forwarder.
    userspace_forwarded_packets,
    userspace_forwarded_bytes,
    relay_unknown_cid,
    relay_sender_mismatch,
    /// Sender changes accepted because the client's control connection moved too.
    relay_sender_updated,
    bad_frames,
    candidates_forwarded,
    /// Clients whose address changed (NAT rebinding, migration).
    client_moves,
    /// CANDIDATES from a client that is not an endpoint of that session.
    candidates_refused,
});

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Client {
    conn: quiche::Connection,
    peer: SocketAddr,
    identity: Option<PeerIdentity>,
    checked: bool,
    qad_for: Option<SocketAddr>,
    agent_of: BTreeSet<String>,
    connector_of: BTreeSet<String>,
    frames: FrameIo,
    /// Announced `SERVICE_PACKETS`: may be sent `0x2F`. Off for original clients.
    reads_service_packets: bool,
}

#[derive(Default)]
struct Service {
    connector: Option<ClientId>,
}

pub struct Intermediate {
    cfg: IntermediateConfig,
    socket: UdpSocket,
    local: SocketAddr,
    poll: Poll,
    quic: quiche::Config,
    clients: HashMap<ClientId, Client>,
    cids: HashMap<quiche::ConnectionId<'static>, ClientId>,
    services: HashMap<String, Service>,
    flows: FlowTable,
    relay: RelayTable,
    next_id: ClientId,
    token_key: hmac::Key,
    reset_key: hmac::Key,
    rng: SystemRandom,
    stats: Arc<IntermediateStats>,
    last_expiry: Instant,
    xdp: Option<crate::xdp::XdpRelay>,
    /// Relayed packets waiting for one sendmmsg.
    forwarded: SendBatch,
}

/// A running intermediate on its own thread (tests, demo).
pub struct IntermediateHandle {
    pub addr: SocketAddr,
    pub stats: Arc<IntermediateStats>,
    shutdown: Arc<AtomicBool>,
    crash: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl IntermediateHandle {
    /// Graceful stop: CONNECTION_CLOSE to every client, drain, exit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.store(true, Ordering::SeqCst);
        self.join()
    }

    /// Stops without telling anyone, as a crash or power loss would.
    pub fn crash(mut self) -> anyhow::Result<()> {
        self.crash.store(true, Ordering::SeqCst);
        self.join()
    }

    fn join(&mut self) -> anyhow::Result<()> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("intermediate thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for IntermediateHandle {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        let _ = self.join();
    }
}

pub fn spawn(cfg: IntermediateConfig) -> anyhow::Result<IntermediateHandle> {
    let server = Intermediate::bind(cfg)?;
    let addr = server.local;
    let stats = server.stats.clone();
    let shutdown = Arc::new(AtomicBool::new(false));
    let crash = Arc::new(AtomicBool::new(false));
    let (s, c) = (shutdown.clone(), crash.clone());
    let thread = std::thread::Builder::new()
        .name("intermediate".into())
        .spawn(move || server.run(&s, &c))?;
    Ok(IntermediateHandle {
        addr,
        stats,
        shutdown,
        crash,
        thread: Some(thread),
    })
}

fn quic_config(cfg: &IntermediateConfig) -> anyhow::Result<quiche::Config> {
    let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
    c.set_application_protos(&[ALPN])?;
    c.load_cert_chain_from_pem_file(path_str(&cfg.cert_file)?)
        .with_context(|| format!("loading certificate chain {}", cfg.cert_file.display()))?;
    c.load_priv_key_from_pem_file(path_str(&cfg.key_file)?)
        .with_context(|| format!("loading private key {}", cfg.key_file.display()))?;
    match (&cfg.ca_file, cfg.require_client_cert) {
        (Some(ca), _) => {
            c.load_verify_locations_from_file(path_str(ca)?)
                .with_context(|| format!("loading client CA {}", ca.display()))?;
            c.verify_peer(true);
        }
        (None, true) => anyhow::bail!(
            "client authentication is required but no CA file was given (--ca); \
             pass --insecure-no-client-auth to run without it"
        ),
        (None, false) => c.verify_peer(false),
    }
    ztna_core::apply_transport_defaults(&mut c, cfg.idle_timeout);
    Ok(c)
}

fn path_str(p: &std::path::Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("path is not UTF-8: {}", p.display()))
}

/// A service id must be usable inside a DNS name (`agent.<id>.ztna`).
pub fn valid_service_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 255
        && !id.starts_with('.')
        && !id.ends_with('.')
        && !id.contains("..")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn encode(msg: &ControlMessage<'_>) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; msg.encoded_len()];
    msg.encode(&mut buf).ok()?;
    Some(buf)
}

fn qad_message(addr: SocketAddr) -> Vec<u8> {
    let msg = match addr {
        SocketAddr::V4(a) => ControlMessage::QadV4 {
            ip: a.ip().octets(),
            port: a.port(),
        },
        SocketAddr::V6(a) => ControlMessage::QadV6 {
            ip: a.ip().octets(),
            port: a.port(),
        },
    };
    encode(&msg).expect("QAD always encodes")
}

impl Intermediate {
    pub fn bind(cfg: IntermediateConfig) -> anyhow::Result<Self> {
        if !cfg.require_client_cert {
            tracing::warn!(
                "client authentication is DISABLED (--insecure-no-client-auth): any client \
                 can register for any service"
            );
        }
        let quic = quic_config(&cfg)?;
        let key_pem = std::fs::read(&cfg.key_file)
            .with_context(|| format!("reading {}", cfg.key_file.display()))?;
        let reset_key = hmac::Key::new(
            hmac::HMAC_SHA256,
            ring::digest::digest(
                &ring::digest::SHA256,
                &[b"ztna stateless reset".as_slice(), &key_pem].concat(),
            )
            .as_ref(),
        );
        let rng = SystemRandom::new();
        let token_key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| anyhow::anyhow!("generating the retry token key"))?;
        let mut socket =
            UdpSocket::bind(cfg.listen).with_context(|| format!("binding UDP {}", cfg.listen))?;
        let local = socket.local_addr()?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut socket, Token(0), Interest::READABLE)?;
        tracing::info!("intermediate listening on udp {local}");
        Ok(Intermediate {
            cfg,
            socket,
            local,
            poll,
            quic,
            clients: HashMap::new(),
            cids: HashMap::new(),
            services: HashMap::new(),
            flows: FlowTable::default(),
            relay: RelayTable::new(ztna_common::relay::MAX_RELAY_ENTRIES as usize),
            next_id: 1,
            token_key,
            reset_key,
            rng,
            stats: Arc::new(IntermediateStats::default()),
            last_expiry: Instant::now(),
            xdp: None,
            forwarded: SendBatch::default(),
        })
        .and_then(|mut server| {
            server.setup_xdp()?;
            for (a, b) in server.cfg.static_sessions.clone() {
                let s = server
                    .relay
                    .create_static(a, b, Instant::now())
                    .map_err(|e| anyhow::anyhow!("static session {a}={b}: {e:?}"))?;
                tracing::info!(
                    "static relay session {}: {a} -> {b} with DCID {}, {b} -> {a} with DCID {}",
                    s.id,
                    hex(&s.connector_cid),
                    hex(&s.agent_cid)
                );
            }
            Ok(server)
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn setup_xdp(&mut self) -> anyhow::Result<()> {
        use crate::xdp::XdpChoice;
        let choice = self.cfg.xdp;
        if choice == XdpChoice::Off {
            crate::xdp::remove_stale_pins();
            tracing::info!("XDP off: relayed packets are forwarded in userspace");
            return Ok(());
        }
        match crate::xdp::load(choice, &self.cfg.xdp_interfaces, self.local.port()) {
            Ok((relay, table)) => {
                self.relay.set_kernel(Box::new(table));
                self.xdp = Some(relay);
                Ok(())
            }
            Err(e) if choice == XdpChoice::Auto => {
                tracing::warn!("XDP off (auto): {e:#}; relayed packets are forwarded in userspace");
                Ok(())
            }
            Err(e) => Err(e.context(format!("--xdp {choice:?}"))),
        }
    }

    /// The XDP mode in use: "native", "generic" or "off".
    pub fn xdp_mode(&self) -> &'static str {
        self.xdp.as_ref().map_or("off", |x| x.mode)
    }

    fn write_stats_file(&self) {
        let Some(path) = &self.cfg.stats_file else {
            return;
        };
        let mut v = self.stats.snapshot();
        v["xdp_mode"] = self.xdp_mode().into();
        v["relay_sessions"] = self.relay.len().into();
        v["static_sessions"] = self
            .relay
            .sessions()
            .filter(|s| s.is_static)
            .map(|s| {
                let a = self.relay.entry(&s.agent_cid).map(|f| f.peer.to_string());
                let b = self.relay.entry(&s.connector_cid).map(|f| f.peer.to_string());
                serde_json::json!({ "a": a, "b": b, "dcid_a_to_b": hex(&s.connector_cid), "dcid_b_to_a": hex(&s.agent_cid) })
            })
            .collect::<Vec<_>>()
            .into();
        if self.xdp.is_some()
            && let Ok(counters) = crate::xdp::verdict_counters()
        {
            v["xdp_verdicts"] = counters
                .into_iter()
                .map(|(k, n)| (k.to_string(), serde_json::Value::from(n)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, v.to_string())
            .and_then(|_| std::fs::rename(&tmp, path))
            .is_err()
        {
            tracing::debug!("writing {}", path.display());
        }
    }

    /// Mirrors the forwarding table into the kernel (the XDP program's map).
    pub fn set_kernel_table(&mut self, kernel: Box<dyn KernelTable>) {
        self.relay.set_kernel(kernel);
    }

    pub fn stats(&self) -> Arc<IntermediateStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` (graceful) or `crash` (immediate, silent) is set.
    pub fn run(mut self, shutdown: &AtomicBool, crash: &AtomicBool) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(64);
        let mut batch = RecvBatch::default();
        let mut out = vec![0u8; MAX_UDP_PAYLOAD];
        let mut draining_since: Option<Instant> = None;
        loop {
            if crash.load(Ordering::SeqCst) {
                return Ok(());
            }
            if shutdown.load(Ordering::SeqCst) && draining_since.is_none() {
                tracing::info!("shutting down: closing {} connections", self.clients.len());
                for c in self.clients.values_mut() {
                    let _ = c.conn.close(
                        true,
                        app_error::SHUTTING_DOWN,
                        b"intermediate shutting down",
                    );
                }
                draining_since = Some(Instant::now());
            }
            if let Some(since) = draining_since
                && (self.clients.is_empty() || since.elapsed() > DRAIN_TIMEOUT)
            {
                self.flush(&mut out);
                self.write_stats_file();
                tracing::info!("stopped; stats {}", self.stats.snapshot());
                return Ok(());
            }
            // Wake at least every 100 ms to notice shutdown flags.
            let timeout = self
                .clients
                .values()
                .filter_map(|c| c.conn.timeout())
                .min()
                .map_or(Duration::from_millis(100), |t| {
                    t.min(Duration::from_millis(100))
                });
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                return Err(e.into());
            }
            let now = Instant::now();
            for c in self.clients.values_mut() {
                if c.conn.timeout_instant().is_some_and(|t| t <= now) {
                    c.conn.on_timeout();
                }
            }
            let fd = self.socket.as_raw_fd();
            loop {
                let n = match batch.recv(fd) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!("recv: {e}");
                        break;
                    }
                };
                for i in 0..n {
                    if let Some((pkt, from)) = batch.get(i) {
                        self.handle_packet(pkt, from, &mut out, draining_since.is_some());
                    }
                }
                self.forwarded.flush(fd);
                if n < crate::batch::BATCH {
                    break;
                }
            }
            let ids: Vec<ClientId> = self.clients.keys().copied().collect();
            for id in ids {
                self.process_client(id, now);
            }
            self.flush(&mut out);
            self.collect_closed();
            if now.duration_since(self.last_expiry) > Duration::from_secs(1) {
                self.flows.expire(now);
                self.expire_sessions(now);
                self.write_stats_file();
                self.last_expiry = now;
            }
        }
    }

    fn send_to(&self, buf: &[u8], to: SocketAddr) {
        if let Err(e) = self.socket.send_to(buf, to) {
            // Dropped sends are recovered by QUIC loss detection.
            tracing::debug!("send to {to}: {e}");
        }
    }

    fn flush(&mut self, out: &mut [u8]) {
        for c in self.clients.values_mut() {
            if c.conn.is_established() {
                c.frames.flush(&mut c.conn, frames::SERVER_FRAME_STREAM);
            }
            loop {
                match c.conn.send(out) {
                    Ok((n, info)) => {
                        if let Err(e) = self.socket.send_to(&out[..n], info.to) {
                            tracing::debug!("send to {}: {e}", info.to);
                            break;
                        }
                    }
                    Err(quiche::Error::Done) => break,
                    Err(e) => {
                        tracing::warn!("quic send: {e}");
                        let _ = c.conn.close(false, 0x1, b"send failure");
                        break;
                    }
                }
            }
        }
    }

    fn new_local_cid(&self) -> [u8; LOCAL_CID_LEN] {
        let mut cid = [0u8; LOCAL_CID_LEN];
        let _ = self.rng.fill(&mut cid);
        if cid[0] == RELAY_CID_MARKER {
            cid[0] ^= 0x01;
        }
        cid
    }

    fn reset_token(&self, cid: &[u8]) -> u128 {
        let tag = hmac::sign(&self.reset_key, cid);
        let mut t = [0u8; 16];
        t.copy_from_slice(&tag.as_ref()[..16]);
        u128::from_be_bytes(t)
    }

    /// Retry token: `issued_at[8 BE] | odcid_len[1] | odcid | tag[16]`, where the tag
    /// is HMAC-SHA256(process key, issued_at | peer address | odcid) cut to 16 bytes.
    fn mint_token(&self, peer: SocketAddr, odcid: &[u8]) -> Vec<u8> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut token = Vec::with_capacity(25 + odcid.len());
        token.extend_from_slice(&now.to_be_bytes());
        token.push(odcid.len() as u8);
        token.extend_from_slice(odcid);
        let tag = hmac::sign(&self.token_key, &token_mac_input(&token, peer));
        token.extend_from_slice(&tag.as_ref()[..16]);
        token
    }

    fn validate_token(&self, peer: SocketAddr, token: &[u8]) -> Option<Vec<u8>> {
        if token.len() < 9 + 16 {
            return None;
        }
        let odcid_len = token[8] as usize;
        if token.len() != 9 + odcid_len + 16 {
            return None;
        }
        let (body, tag) = token.split_at(9 + odcid_len);
        let expected = hmac::sign(&self.token_key, &token_mac_input(body, peer));
        if !constant_time_eq(&expected.as_ref()[..16], tag) {
            return None;
        }
        let issued = u64::from_be_bytes(body[..8].try_into().ok()?);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
        if now.saturating_sub(issued) > TOKEN_LIFETIME.as_secs() {
            return None;
        }
        Some(body[9..].to_vec())
    }

    fn handle_packet(&mut self, pkt: &mut [u8], from: SocketAddr, out: &mut [u8], draining: bool) {
        if let Some(cid) = relay_cid_of(pkt) {
            self.forward_relayed(&cid, pkt, from);
            return;
        }
        let hdr = match quiche::Header::from_slice(pkt, LOCAL_CID_LEN) {
            Ok(h) => h,
            Err(_) => {
                inc(&self.stats.garbage_packets);
                return;
            }
        };
        let id = self.cids.get(&hdr.dcid).copied();
        let id = match id {
            Some(id) => id,
            None => {
                if draining {
                    return;
                }
                match self.accept(&hdr, pkt.len(), from, out) {
                    Some(id) => id,
                    None => return,
                }
            }
        };
        let local = self.local;
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        if let Err(e) = client.conn.recv(pkt, quiche::RecvInfo { from, to: local }) {
            tracing::debug!("quic recv from {from}: {e}");
            return;
        }
        if client.peer != from {
            inc(&self.stats.client_moves);
            tracing::info!("client {id} moved {} -> {from}", client.peer);
            client.peer = from;
            self.relay.client_moved(id, from);
        }
    }

    /// The userspace forwarder: relayed data-connection packets, by DCID.
    fn forward_relayed(&mut self, cid: &frames::Cid, pkt: &[u8], from: SocketAddr) {
        let now = Instant::now();
        match self.relay.forward(cid, from, pkt.len(), now) {
            ForwardResult::Send(to) => {
                inc(&self.stats.userspace_forwarded_packets);
                self.stats
                    .userspace_forwarded_bytes
                    .fetch_add(pkt.len() as u64, Ordering::Relaxed);
                self.forwarded.push(pkt, to);
            }
            ForwardResult::Unknown => inc(&self.stats.relay_unknown_cid),
            ForwardResult::Mismatch { sender } => {
                // The relay cannot authenticate a data packet (it has no keys), so a
                // new sender address is only believed once the sender's control
                // connection, which QUIC path validation vouches for, comes from it.
                let moved = self.clients.get(&sender).is_some_and(|c| c.peer == from);
                if moved {
                    inc(&self.stats.relay_sender_updated);
                    self.relay.client_moved(sender, from);
                    if let ForwardResult::Send(to) = self.relay.forward(cid, from, pkt.len(), now) {
                        inc(&self.stats.userspace_forwarded_packets);
                        self.forwarded.push(pkt, to);
                    }
                } else {
                    inc(&self.stats.relay_sender_mismatch);
                }
            }
        }
    }

    /// Handles a packet for an unknown DCID; returns the new client if one was created.
    fn accept(
        &mut self,
        hdr: &quiche::Header<'_>,
        len: usize,
        from: SocketAddr,
        out: &mut [u8],
    ) -> Option<ClientId> {
        if hdr.ty == quiche::Type::Short {
            inc(&self.stats.unknown_cid_packets);
            self.send_stateless_reset(&hdr.dcid, len, from);
            return None;
        }
        if hdr.ty != quiche::Type::Initial {
            inc(&self.stats.unknown_cid_packets);
            return None;
        }
        if !quiche::version_is_supported(hdr.version) {
            inc(&self.stats.version_negotiations);
            if let Ok(n) = quiche::negotiate_version(&hdr.scid, &hdr.dcid, out) {
                self.send_to(&out[..n], from);
            }
            return None;
        }
        let scid: quiche::ConnectionId<'static>;
        let odcid: Option<Vec<u8>>;
        if self.cfg.retry {
            let token = hdr.token.as_deref().unwrap_or_default();
            if token.is_empty() {
                let new_scid = self.new_local_cid();
                let new_scid = quiche::ConnectionId::from_vec(new_scid.to_vec());
                let token = self.mint_token(from, &hdr.dcid);
                match quiche::retry(&hdr.scid, &hdr.dcid, &new_scid, &token, hdr.version, out) {
                    Ok(n) => {
                        inc(&self.stats.retries_sent);
                        self.send_to(&out[..n], from);
                    }
                    Err(e) => tracing::debug!("retry: {e}"),
                }
                return None;
            }
            match self.validate_token(from, token) {
                Some(o) => odcid = Some(o),
                None => {
                    inc(&self.stats.invalid_tokens);
                    return None;
                }
            }
            if hdr.dcid.len() != LOCAL_CID_LEN {
                inc(&self.stats.invalid_tokens);
                return None;
            }
            scid = hdr.dcid.clone().into_owned();
        } else {
            odcid = None;
            scid = quiche::ConnectionId::from_vec(self.new_local_cid().to_vec());
        }
        let token = self.reset_token(&scid);
        self.quic.set_stateless_reset_token(Some(token));
        let odcid_ref = odcid.as_ref().map(|o| quiche::ConnectionId::from_ref(o));
        let conn = match quiche::accept(&scid, odcid_ref.as_ref(), self.local, from, &mut self.quic)
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept from {from}: {e}");
                return None;
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        inc(&self.stats.connections_accepted);
        tracing::debug!("new connection {id} from {from}");
        self.cids.insert(scid, id);
        self.clients.insert(
            id,
            Client {
                conn,
                peer: from,
                identity: None,
                checked: false,
                qad_for: None,
                agent_of: BTreeSet::new(),
                connector_of: BTreeSet::new(),
                frames: FrameIo::default(),
                reads_service_packets: false,
            },
        );
        Some(id)
    }

    /// RFC 9000 §10.3: looks like a short-header packet, ends with the reset token.
    fn send_stateless_reset(&self, dcid: &[u8], received_len: usize, to: SocketAddr) {
        // Must be shorter than what triggered it (no loops) and at least 21 bytes.
        if received_len <= 22 {
            return;
        }
        let len = (received_len - 1).min(43);
        let mut pkt = vec![0u8; len];
        let _ = self.rng.fill(&mut pkt[..len - 16]);
        pkt[0] = 0x40 | (pkt[0] & 0x3f);
        pkt[len - 16..].copy_from_slice(&self.reset_token(dcid).to_be_bytes());
        inc(&self.stats.stateless_resets_sent);
        self.send_to(&pkt, to);
    }

    fn process_client(&mut self, id: ClientId, now: Instant) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        if client.conn.is_closed() || !client.conn.is_established() {
            return;
        }
        if !client.checked {
            client.checked = true;
            match client.conn.peer_cert() {
                Some(der) => match PeerIdentity::from_der(der) {
                    Ok(identity) => {
                        tracing::info!(
                            "client {id} connected from {} as {}",
                            client.peer,
                            identity.name()
                        );
                        client.identity = Some(identity);
                    }
                    Err(e) => {
                        tracing::warn!("client {id}: unreadable certificate: {e}");
                        let _ =
                            client
                                .conn
                                .close(true, app_error::BAD_CERTIFICATE, b"bad certificate");
                        return;
                    }
                },
                None if self.cfg.require_client_cert => {
                    tracing::warn!(
                        "client {id} from {} refused: no client certificate",
                        client.peer
                    );
                    inc(&self.stats.refused_no_certificate);
                    let _ = client.conn.close(
                        true,
                        app_error::CERTIFICATE_REQUIRED,
                        b"client certificate required",
                    );
                    return;
                }
                None => tracing::info!(
                    "client {id} connected from {} without certificate",
                    client.peer
                ),
            }
        }
        if client.qad_for != Some(client.peer) {
            let peer = client.peer;
            if client.conn.dgram_send(&qad_message(peer)).is_ok() {
                client.qad_for = Some(peer);
                inc(&self.stats.qad_sent);
            }
        }
        let mut buf = [0u8; 2048];
        loop {
            let Some(client) = self.clients.get_mut(&id) else {
                return;
            };
            let n = match client.conn.dgram_recv(&mut buf) {
                Ok(n) => n,
                Err(_) => break,
            };
            inc(&self.stats.datagrams_in);
            self.handle_datagram(id, &mut buf[..n], now);
        }
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let (raw, errors) = client
            .frames
            .read(&mut client.conn, frames::CLIENT_FRAME_STREAM);
        self.stats.bad_frames.fetch_add(errors, Ordering::Relaxed);
        for bytes in raw {
            match frame_io::decode(&bytes) {
                Ok(frame) => self.handle_frame(id, frame, now),
                Err(e) => {
                    inc(&self.stats.bad_frames);
                    tracing::debug!("client {id}: malformed frame: {e}");
                }
            }
        }
    }

    fn queue_frame(&mut self, id: ClientId, frame: &Frame<'_>) {
        if let Some(c) = self.clients.get_mut(&id)
            && c.frames.queue(frame).is_err()
        {
            inc(&self.stats.bad_frames);
        }
    }

    fn handle_frame(&mut self, id: ClientId, frame: Frame<'_>, now: Instant) {
        match frame {
            Frame::SessionRequest {
                request_id,
                service,
            } => {
                let refuse = |this: &mut Self, status: RefusedStatus| {
                    inc(&this.stats.relay_sessions_refused);
                    tracing::info!(
                        "client {id}: relay session for {service:?} refused: {status:?}"
                    );
                    this.queue_frame(id, &Frame::SessionRefused { request_id, status });
                };
                let Some(agent) = self.clients.get(&id) else {
                    return;
                };
                if !agent.agent_of.contains(service) {
                    return refuse(self, RefusedStatus::NotAuthorized);
                }
                let agent_addr = agent.peer;
                let Some(conn_id) = self.services.get(service).and_then(|s| s.connector) else {
                    return refuse(self, RefusedStatus::NoConnector);
                };
                let Some(connector_addr) = self.clients.get(&conn_id).map(|c| c.peer) else {
                    return refuse(self, RefusedStatus::NoConnector);
                };
                match self.relay.create(
                    id,
                    agent_addr,
                    conn_id,
                    connector_addr,
                    service,
                    request_id,
                    now,
                ) {
                    Ok(s) => {
                        inc(&self.stats.relay_sessions_created);
                        tracing::info!(
                            "relay session {} for {service:?}: agent {id} ({agent_addr}) <-> connector {conn_id} ({connector_addr})",
                            s.id
                        );
                        self.queue_frame(
                            conn_id,
                            &Frame::SessionOffer {
                                session_id: s.id,
                                agent_cid: s.agent_cid,
                                connector_cid: s.connector_cid,
                                service,
                            },
                        );
                    }
                    Err(status) => refuse(self, status),
                }
            }
            Frame::SessionAccept { session_id } => match self.relay.accept(id, session_id) {
                Some(s) => {
                    self.queue_frame(
                        s.agent,
                        &Frame::SessionReady {
                            request_id: s.request_id,
                            session_id,
                            agent_cid: s.agent_cid,
                            connector_cid: s.connector_cid,
                        },
                    );
                    let forwarding = self.forwarding_of(&s);
                    for c in [s.agent, s.connector] {
                        self.queue_frame(
                            c,
                            &Frame::SessionPath {
                                session_id,
                                forwarding,
                            },
                        );
                    }
                }
                None => inc(&self.stats.bad_frames),
            },
            Frame::Candidates {
                session_id,
                password,
                count,
                candidates,
            } => {
                let other = self
                    .relay
                    .sessions()
                    .find(|s| s.id == session_id && s.accepted)
                    .and_then(|s| {
                        if s.agent == id {
                            Some(s.connector)
                        } else if s.connector == id {
                            Some(s.agent)
                        } else {
                            None
                        }
                    });
                match other {
                    Some(other) => {
                        inc(&self.stats.candidates_forwarded);
                        self.queue_frame(
                            other,
                            &Frame::Candidates {
                                session_id,
                                password,
                                count,
                                candidates,
                            },
                        );
                    }
                    None => {
                        inc(&self.stats.candidates_refused);
                        tracing::warn!(
                            "client {id}: CANDIDATES for session {session_id} it is not part of: refused"
                        );
                    }
                }
            }
            Frame::SessionClose { session_id, reason } => {
                let owned = self
                    .relay
                    .sessions()
                    .any(|s| s.id == session_id && (s.agent == id || s.connector == id));
                if owned && let Some(s) = self.relay.close(session_id) {
                    inc(&self.stats.relay_sessions_closed);
                    let other = if s.agent == id { s.connector } else { s.agent };
                    self.queue_frame(other, &Frame::SessionClose { session_id, reason });
                }
            }
            Frame::Capabilities { flags } => {
                inc(&self.stats.capabilities_received);
                let Some(c) = self.clients.get_mut(&id) else {
                    return;
                };
                c.reads_service_packets = flags & frames::capability::SERVICE_PACKETS != 0;
                tracing::debug!("client {id}: capabilities 0x{flags:08x}");
                // We accept 0x2F from agents and connectors alike.
                self.queue_frame(
                    id,
                    &Frame::Capabilities {
                        flags: frames::capability::SERVICE_PACKETS,
                    },
                );
            }
            Frame::Unknown { .. } => {}
            _ => inc(&self.stats.bad_frames),
        }
    }

    /// How a session's packets are forwarded: XDP only handles IPv4 entries.
    fn forwarding_of(&self, s: &crate::relay::RelaySession) -> u8 {
        use ztna_common::frames::forwarding;
        let v4 = [s.agent_cid, s.connector_cid].iter().all(|c| {
            self.relay
                .entry(c)
                .is_some_and(|f| f.peer.is_ipv4() && f.expected.is_ipv4())
        });
        match (self.xdp_mode(), v4) {
            ("native", true) => forwarding::XDP_NATIVE,
            ("generic", true) => forwarding::XDP_GENERIC,
            _ => forwarding::USERSPACE,
        }
    }

    fn expire_sessions(&mut self, now: Instant) {
        let kernel_now = monotonic_ns();
        let (unaccepted, idle) = self.relay.expire(now, Some(kernel_now));
        for s in unaccepted {
            inc(&self.stats.relay_sessions_refused);
            tracing::info!("relay session {}: connector did not accept in time", s.id);
            self.queue_frame(
                s.agent,
                &Frame::SessionRefused {
                    request_id: s.request_id,
                    status: RefusedStatus::ConnectorTimeout,
                },
            );
            self.queue_frame(
                s.connector,
                &Frame::SessionClose {
                    session_id: s.id,
                    reason: close_reason::IDLE,
                },
            );
        }
        for s in idle {
            inc(&self.stats.relay_sessions_closed);
            tracing::info!("relay session {} idle: removed", s.id);
            for c in [s.agent, s.connector] {
                self.queue_frame(
                    c,
                    &Frame::SessionClose {
                        session_id: s.id,
                        reason: close_reason::IDLE,
                    },
                );
            }
        }
    }

    fn reply(&mut self, id: ClientId, msg: &ControlMessage<'_>) {
        if let Some(bytes) = encode(msg) {
            self.send_datagram(id, &bytes);
        }
    }

    fn send_datagram(&mut self, id: ClientId, bytes: &[u8]) {
        if let Some(c) = self.clients.get_mut(&id)
            && c.conn.dgram_send(bytes).is_err()
        {
            inc(&self.stats.dropped_send_failed);
        }
    }

    fn handle_datagram(&mut self, id: ClientId, dgram: &mut [u8], now: Instant) {
        let msg = match ControlMessage::decode(dgram) {
            Ok(m) => m,
            Err(WireError::UnknownType(t)) => {
                inc(&self.stats.datagrams_unknown_type);
                tracing::debug!("client {id}: ignoring DATAGRAM type 0x{t:02x}");
                return;
            }
            Err(e) => {
                inc(&self.stats.datagrams_malformed);
                if let Some(echo) = wire::registration_id_bytes(dgram) {
                    // Tell the client why, echoing its id bytes so it can match the
                    // answer to its request (the original NACKs some of these too).
                    inc(&self.stats.registrations_malformed);
                    inc(&self.stats.registrations_refused);
                    tracing::warn!("client {id}: registration refused: malformed: {e}");
                    let mut buf = [0u8; 3 + wire::MAX_SERVICE_ID_LEN];
                    if let Ok(n) = wire::encode_nack_bytes(NackStatus::InvalidId, echo, &mut buf) {
                        self.send_datagram(id, &buf[..n]);
                    }
                    return;
                }
                tracing::debug!("client {id}: ignoring malformed DATAGRAM: {e}");
                return;
            }
        };
        match msg {
            ControlMessage::RegisterAgent { service } => {
                let service = service.to_string();
                self.register(id, Role::Agent, &service);
            }
            ControlMessage::RegisterConnector { service } => {
                let service = service.to_string();
                self.register(id, Role::Connector, &service);
            }
            ControlMessage::ServicePacket { service, .. } => {
                let service = service.to_string();
                let start = 2 + service.len();
                self.relay(id, Some(&service), &mut dgram[start..], now);
            }
            ControlMessage::RawIp { .. } => self.relay(id, None, dgram, now),
            _ => inc(&self.stats.datagrams_unexpected),
        }
    }

    fn register(&mut self, id: ClientId, role: Role, service: &str) {
        if !valid_service_id(service) {
            inc(&self.stats.registrations_refused);
            tracing::warn!("client {id}: registration refused: invalid service id {service:?}");
            self.reply(
                id,
                &ControlMessage::RegisterNack {
                    status: NackStatus::InvalidId,
                    service,
                },
            );
            return;
        }
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let name = client
            .identity
            .as_ref()
            .map_or_else(|| "<no certificate>".to_string(), |i| i.name());
        let allowed = match &client.identity {
            Some(identity) => identity.authorizes(role, service),
            None => !self.cfg.require_client_cert,
        };
        let role_name = match role {
            Role::Agent => "agent",
            Role::Connector => "connector",
        };
        if !allowed {
            inc(&self.stats.registrations_refused);
            tracing::warn!(
                "registration refused: identity {name} is not authorized as {role_name} for service {service:?}"
            );
            self.reply(
                id,
                &ControlMessage::RegisterNack {
                    status: NackStatus::NotAuthorized,
                    service,
                },
            );
            return;
        }
        match role {
            Role::Agent => {
                client.agent_of.insert(service.to_string());
            }
            Role::Connector => {
                client.connector_of.insert(service.to_string());
                let entry = self.services.entry(service.to_string()).or_default();
                // Newest wins: a restarted connector must not wait for its previous
                // connection to time out, and both are vouched for by the same CA.
                if let Some(old) = entry.connector.replace(id)
                    && old != id
                {
                    inc(&self.stats.connector_takeovers);
                    tracing::warn!(
                        "service {service:?}: connector {id} ({name}) replaces connector {old}"
                    );
                    if let Some(o) = self.clients.get_mut(&old) {
                        o.connector_of.remove(service);
                    }
                }
            }
        }
        inc(&self.stats.registrations_accepted);
        tracing::info!("client {id} ({name}) registered as {role_name} for {service:?}");
        self.reply(id, &ControlMessage::RegisterAck { service });
    }

    /// Relays one tunneled IP packet. `service` is `None` for raw datagrams.
    fn relay(&mut self, from: ClientId, service: Option<&str>, ip: &mut [u8], now: Instant) {
        let stats = self.stats.clone();
        let Some(client) = self.clients.get(&from) else {
            return;
        };
        let key = match packet::flow_key(ip) {
            Ok(k) => k,
            Err(e) => {
                inc(&self.stats.dropped_bad_inner_packet);
                tracing::debug!("client {from}: dropping inner packet: {e}");
                return;
            }
        };
        // Connector → agent?
        let as_connector = match service {
            Some(s) => client.connector_of.contains(s).then(|| {
                self.flows
                    .inbound(s, &key, now)
                    .map(|i| (s.to_string(), i.clone()))
            }),
            None if !client.connector_of.is_empty() => {
                let services: Vec<String> = client.connector_of.iter().cloned().collect();
                Some(self.flows.inbound_any(services.iter(), &key, now))
            }
            None => None,
        };
        if let Some(found) = as_connector {
            let Some((service, inbound)) = found else {
                inc(&self.stats.dropped_no_flow);
                return;
            };
            if inbound.translated(&key.reversed()) {
                let _ = packet::rewrite_port(ip, PortField::Dst, inbound.original.src.port());
            }
            self.forward(inbound.agent, &service, ip, &stats.relayed_to_agent);
            return;
        }
        // Agent → connector.
        let service = match service {
            Some(s) => s.to_string(),
            // The original protocol's raw packets go to the agent's first service.
            None => match client.agent_of.iter().next() {
                Some(s) => s.clone(),
                None => {
                    inc(&self.stats.dropped_not_registered);
                    return;
                }
            },
        };
        if !client.agent_of.contains(&service) {
            inc(&self.stats.dropped_not_registered);
            return;
        }
        let Some(connector) = self.services.get(&service).and_then(|s| s.connector) else {
            inc(&self.stats.dropped_no_connector);
            return;
        };
        let route = self.flows.outbound(from, &service, key, now);
        if let Some(port) = route.rewrite_to {
            inc(&self.stats.port_translations);
            if packet::rewrite_port(ip, PortField::Src, port).is_err() {
                inc(&self.stats.dropped_bad_inner_packet);
                return;
            }
        }
        self.forward(connector, &service, ip, &stats.relayed_to_connector);
    }

    /// Sends one tunneled IP packet to client `to` in the framing it reads: `0x2F`
    /// if it announced `SERVICE_PACKETS` and the wrapped packet fits its DATAGRAM
    /// limit, else the raw packet unchanged (which every client reads).
    fn forward(&mut self, to: ClientId, service: &str, ip: &[u8], counter: &AtomicU64) {
        let Some(c) = self.clients.get_mut(&to) else {
            inc(&self.stats.dropped_send_failed);
            return;
        };
        let max = c.conn.dgram_max_writable_len().unwrap_or(0);
        let wrapped_len = wire::service_packet_overhead(service) + ip.len();
        let msg = if c.reads_service_packets && wrapped_len <= max {
            ControlMessage::ServicePacket {
                service,
                packet: ip,
            }
        } else {
            if c.reads_service_packets {
                inc(&self.stats.relayed_raw_to_fit);
            }
            ControlMessage::RawIp { packet: ip }
        };
        if msg.encoded_len() > max {
            inc(&self.stats.dropped_too_large);
            inc(&self.stats.dropped_send_failed);
            tracing::debug!(
                "client {to}: {} byte packet exceeds its DATAGRAM limit of {max}",
                ip.len()
            );
            return;
        }
        match encode(&msg).map(|b| c.conn.dgram_send(&b)) {
            Some(Ok(())) => inc(counter),
            _ => inc(&self.stats.dropped_send_failed),
        }
    }

    fn collect_closed(&mut self) {
        let closed: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.conn.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in closed {
            let Some(c) = self.clients.remove(&id) else {
                continue;
            };
            inc(&self.stats.connections_closed);
            tracing::info!(
                "client {id} ({}) gone: {}",
                c.identity.as_ref().map_or_else(|| "-".into(), |i| i.name()),
                ztna_core::client::close_reason(&c.conn)
            );
            self.cids.retain(|_, v| *v != id);
            self.flows.remove_client(id);
            for s in self.relay.remove_client(id) {
                inc(&self.stats.relay_sessions_closed);
                let other = if s.agent == id { s.connector } else { s.agent };
                self.queue_frame(
                    other,
                    &Frame::SessionClose {
                        session_id: s.id,
                        reason: close_reason::PEER_GONE,
                    },
                );
            }
            for s in &c.connector_of {
                if let Some(entry) = self.services.get_mut(s)
                    && entry.connector == Some(id)
                {
                    entry.connector = None;
                }
            }
        }
    }
}

fn token_mac_input(body: &[u8], peer: SocketAddr) -> Vec<u8> {
    let mut v = body.to_vec();
    match peer {
        SocketAddr::V4(a) => v.extend_from_slice(&a.ip().octets()),
        SocketAddr::V6(a) => v.extend_from_slice(&a.ip().octets()),
    }
    v.extend_from_slice(&peer.port().to_be_bytes());
    v
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
