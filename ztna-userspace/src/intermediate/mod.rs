//! The intermediate server: QUIC (quiche) on one UDP socket, driven by a mio loop.
//!
//! Per packet: parse the QUIC header; route by DCID to a connection; unknown DCIDs
//! get a version negotiation, a stateless retry (Initial without a valid token), a new
//! connection (Initial with a valid token) or a stateless reset (short header).
//! Per connection: require and check the client certificate, send QAD after the
//! handshake and whenever the client's address changes (after QUIC path validation of
//! the new address), answer registrations, relay service packets between agents and
//! the connectors of their service (several may serve one service side by side: see
//! `connector_set`).
//!
//! Framing of relayed packets: each client is answered in the framing it can read.
//! A client that announced `SERVICE_PACKETS` (CAPABILITIES frame, ztna clients) gets
//! `0x2F` where the wrapped packet fits its connection's DATAGRAM limit and raw IP
//! where it does not; every other client (the original system's agents and
//! connectors) gets raw IP only, the packet exactly as its sender tunneled it, as the
//! original intermediate relays. So a packet its sender could send always fits the
//! receiver's connection (same transport settings), whatever the service id's length.
//!
//! Stopping: SIGINT closes every connection at once; SIGTERM drains first (`drain.rs`:
//! new relay sessions and registrations refused, existing sessions forwarded until they
//! close or the drain timeout passes), see [`Stop`].
//!
//! Stateless resets use a key derived (HKDF) from the server's private key and the
//! instance's identity (host name and listening address, or `instance_id`), so a
//! restarted intermediate resets the connections of its previous incarnation and their
//! clients reconnect at once instead of waiting out the idle timeout, while two
//! instances sharing a key never share reset tokens (one cannot kill the other's
//! connections). Packets to relay CIDs are never answered with a reset.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
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

use crate::addressing::AddressPool;
use crate::batch::{RecvBatch, SendBatch};
use crate::connector_set::{self, ConnectorSet, Liveness, LivenessChange};
use crate::flows::{ClientId, FlowRefused, FlowTable};
use crate::identity::{PeerIdentity, Role};
use crate::intermediate_metrics::IntermediateGauges;
use crate::metrics::{Health, MetricsServer};
use crate::relay::{ForwardResult, KernelTable, RelayTable, relay_cid_of};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prometheus_client::metrics::histogram::Histogram;

mod datagrams;
mod drain;
mod forwarders;
mod operate;
mod sessions;
mod stats;

pub use stats::IntermediateStats;

/// Length of the intermediate's own connection IDs.
pub const LOCAL_CID_LEN: usize = 16;
/// First byte reserved for relay CIDs (defined with their layout in `ztna-common`);
/// the intermediate's own CIDs never start with it.
pub use ztna_common::relay::RELAY_CID_MARKER;
const TOKEN_LIFETIME: Duration = Duration::from_secs(10);
/// How stale the metrics' gauges (connections by role, sessions, XDP totals) may be.
const GAUGES_EVERY: Duration = Duration::from_millis(250);
/// RFC 9000 §14.1: smallest UDP payload that may carry a client Initial.
pub const MIN_INITIAL_DATAGRAM: usize = 1200;
/// After CONNECTION_CLOSE to every client, how long to wait for the closes to be
/// sent (and acknowledged) before exiting.
const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// How long a drain (SIGTERM) forwards existing relay sessions at most, unless
/// configured (`--drain-timeout`).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive batches per loop turn. Under sustained load the loop must still get to
/// timers, client processing and sends, or every control connection idles out.
const MAX_BATCHES_PER_TURN: usize = 8;
/// Stateless resets per second (token bucket; each costs an HMAC and a send, and a
/// flood of short-header packets to unknown CIDs must not buy them without limit).
pub const RESET_RATE: f64 = 500.0;
pub const RESET_BURST: f64 = 100.0;

/// CANDIDATES one endpoint may send per session (token bucket: a burst of 2, then
/// one per 2 s). Each frame makes the other endpoint restart its checks towards the
/// addresses it names; an endpoint sends one per (re)start of the checks.
const CANDIDATES_RATE: f64 = 0.5;
const CANDIDATES_BURST: f64 = 2.0;

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
    /// Pool of agents' IPv4 tunnel addresses.
    pub tunnel_ipv4: Ipv4Net,
    /// Pool of agents' IPv6 tunnel addresses; `None` derives a /48 ULA prefix from
    /// the CA certificate (the server certificate without one).
    pub tunnel_ipv6: Option<Ipv6Net>,
    /// Identity of this instance in its stateless-reset key; must differ between
    /// instances that share a server key and stay the same across restarts. Default:
    /// host name and bound UDP address.
    pub instance_id: Option<String>,
    /// Where the XDP program's maps are pinned; `None`: `/sys/fs/bpf/ztna/<port>`.
    pub bpf_pin_dir: Option<PathBuf>,
    /// This relay's ID in its relay CIDs (bytes 1..=2, see `ztna_common::relay`).
    /// `None`: derived from the instance identity ([`default_relay_id`]), so it
    /// stays the same across restarts and differs between instances (up to the
    /// 1-in-65536 chance of two identities hashing alike: give relays that share
    /// an address explicit, distinct IDs).
    pub relay_id: Option<u16>,
    /// Serve /metrics, /healthz and /readyz over HTTP here.
    pub metrics_listen: Option<SocketAddr>,
    /// Forwarding entries (two per relay session), in userspace and in each of the
    /// XDP program's tables.
    pub max_relay_entries: usize,
    /// How long a drain (SIGTERM) forwards the existing relay sessions at most
    /// before closing every connection; zero: none, SIGTERM closes at once.
    pub drain_timeout: Duration,
    /// UDP sockets on the listening address (SO_REUSEPORT when more than one), each
    /// served by a thread: the loop serves the first, forwarder threads the others
    /// (see `forwarders.rs`). 1: the loop alone.
    pub forwarder_threads: usize,
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
            tunnel_ipv4: crate::addressing::DEFAULT_IPV4_POOL
                .parse()
                .expect("valid default pool"),
            tunnel_ipv6: None,
            instance_id: None,
            bpf_pin_dir: None,
            relay_id: None,
            metrics_listen: None,
            max_relay_entries: ztna_common::relay::MAX_RELAY_ENTRIES as usize,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            forwarder_threads: 1,
        }
    }
}

/// The relay ID of an instance without a configured one: the first two bytes of
/// SHA-256 of its identity (`instance_id`, or host name and bound address).
pub fn default_relay_id(instance: &str) -> u16 {
    let d = ring::digest::digest(&ring::digest::SHA256, instance.as_bytes());
    u16::from_be_bytes([d.as_ref()[0], d.as_ref()[1]])
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Client {
    conn: quiche::Connection,
    /// Our CID of this connection (its key in `cids`); quiche issues no others.
    scid: quiche::ConnectionId<'static>,
    peer: SocketAddr,
    identity: Option<PeerIdentity>,
    checked: bool,
    qad_for: Option<SocketAddr>,
    agent_of: BTreeSet<String>,
    connector_of: BTreeSet<String>,
    frames: FrameIo,
    /// Tunnel addresses, assigned at the client's first agent registration.
    tunnel: Option<(Ipv4Addr, Ipv6Addr)>,
    /// Announced `SERVICE_PACKETS`: may be sent `0x2F`. Off for original clients.
    reads_service_packets: bool,
    /// Sent CAPABILITIES (a ztna client): reads our stream frames, such as DRAINING.
    announced_capabilities: bool,
    /// Sent DRAINING (once per connection).
    told_draining: bool,
    /// Its key in `initial_dcids` (no Retry).
    initial_dcid: Option<quiche::ConnectionId<'static>>,
    /// Set at its first connector registration.
    liveness: Option<Liveness>,
    /// Agent: what ranks connectors for it (`ConnectorSet::pick_for`): its
    /// certificate's SHA-256, so every relay ranks alike; its client ID without one.
    affinity: u64,
    /// Connector: the instance ID it announced (CAPABILITIES).
    instance: Option<u64>,
    /// When its first Initial arrived (for the handshake-duration histogram).
    created: Instant,
}

pub struct Intermediate {
    cfg: IntermediateConfig,
    socket: UdpSocket,
    local: SocketAddr,
    poll: Poll,
    quic: quiche::Config,
    clients: HashMap<ClientId, Client>,
    cids: HashMap<quiche::ConnectionId<'static>, ClientId>,
    /// Without Retry: the DCID each client chose for its first Initial, so that a
    /// retransmission of that Initial (it carries the same DCID, not yet ours)
    /// reaches the connection it created instead of creating a second one.
    initial_dcids: HashMap<quiche::ConnectionId<'static>, ClientId>,
    services: HashMap<String, ConnectorSet>,
    flows: FlowTable,
    relay: RelayTable,
    next_id: ClientId,
    token_key: hmac::Key,
    reset_key: hmac::Key,
    rng: SystemRandom,
    stats: Arc<IntermediateStats>,
    last_expiry: Instant,
    last_connector_check: Instant,
    last_gauges: Instant,
    /// Token bucket of stateless resets: tokens and when it was last refilled.
    reset_budget: (f64, Instant),
    /// CANDIDATES buckets per (session, sending client); entries of gone sessions
    /// are dropped in `expire_sessions`.
    candidates_budget: HashMap<(u32, ClientId), (f64, Instant)>,
    /// Receive batches per loop turn ([`MAX_BATCHES_PER_TURN`]; tests lower it).
    batches_per_turn: usize,
    xdp: Option<crate::xdp::XdpRelay>,
    /// Relayed packets waiting for one sendmmsg.
    forwarded: SendBatch,
    /// The threads serving the further sockets (`forwarder_threads` > 1).
    forwarders: Option<forwarders::Forwarders>,
    addresses: AddressPool,
    gauges: Arc<IntermediateGauges>,
    handshake: Histogram,
    health: Arc<Health>,
    /// A drain in progress (SIGTERM), see `drain.rs`.
    drain: Option<drain::Drain>,
    /// The HTTP endpoints; stop with the intermediate.
    _metrics: Option<MetricsServer>,
}

/// Where a reload (SIGHUP) takes the new configuration from.
pub struct Reloader<'a> {
    /// Set by the signal handler; the loop clears it when it reloads.
    pub requested: &'a AtomicBool,
    /// Builds the new configuration (re-reading the config file).
    pub source: Box<dyn FnMut() -> anyhow::Result<IntermediateConfig> + 'a>,
}

/// What stops the loop; set by signal handlers or another thread.
pub struct Stop<'a> {
    /// Close every connection now and exit (SIGINT).
    pub shutdown: &'a AtomicBool,
    /// Start a drain (SIGTERM; see `drain.rs`). Set again while draining: close
    /// every connection now, as `shutdown`.
    pub drain: &'a AtomicBool,
    /// Exit at once without telling anyone, as a crash would (tests).
    pub crash: &'a AtomicBool,
}

/// What the loop keeps between turns.
struct LoopState {
    events: Events,
    batch: RecvBatch,
    out: Vec<u8>,
    /// When every connection was closed (shutdown, or the drain's end): the loop
    /// exits once they are gone or [`CLOSE_WAIT`] later.
    closing_since: Option<Instant>,
    /// A second SIGTERM came during the drain.
    stop_now: bool,
    /// The last turn left packets in the socket: poll without waiting (mio is
    /// edge-triggered, no new event would come for them).
    backlog: bool,
}

impl Default for LoopState {
    fn default() -> Self {
        LoopState {
            events: Events::with_capacity(64),
            batch: RecvBatch::default(),
            out: vec![0u8; MAX_UDP_PAYLOAD],
            closing_since: None,
            stop_now: false,
            backlog: false,
        }
    }
}

/// A running intermediate on its own thread (tests, demo).
pub struct IntermediateHandle {
    pub addr: SocketAddr,
    pub stats: Arc<IntermediateStats>,
    shutdown: Arc<AtomicBool>,
    drain: Arc<AtomicBool>,
    crash: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl IntermediateHandle {
    /// Graceful stop: CONNECTION_CLOSE to every client, drain, exit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.store(true, Ordering::SeqCst);
        self.join()
    }

    /// Starts a drain, as SIGTERM does to the daemon; the thread ends with it.
    pub fn start_drain(&self) {
        self.drain.store(true, Ordering::SeqCst);
    }

    /// Whether the intermediate's thread has ended (a drain is over).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
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
    spawn_with_kernel_table(cfg, None)
}

/// Like [`spawn`], mirroring the forwarding table into `kernel` (tests observe what
/// would reach the XDP map without loading the program).
pub fn spawn_with_kernel_table(
    cfg: IntermediateConfig,
    kernel: Option<Box<dyn KernelTable>>,
) -> anyhow::Result<IntermediateHandle> {
    let mut server = Intermediate::bind(cfg)?;
    if let Some(k) = kernel {
        server.set_kernel_table(k);
    }
    let addr = server.local;
    let stats = server.stats.clone();
    let shutdown = Arc::new(AtomicBool::new(false));
    let drain = Arc::new(AtomicBool::new(false));
    let crash = Arc::new(AtomicBool::new(false));
    let (s, d, c) = (shutdown.clone(), drain.clone(), crash.clone());
    let thread = std::thread::Builder::new()
        .name("intermediate".into())
        .spawn(move || {
            let stop = Stop {
                shutdown: &s,
                drain: &d,
                crash: &c,
            };
            server.run_with(&stop, None)
        })?;
    Ok(IntermediateHandle {
        addr,
        stats,
        shutdown,
        drain,
        crash,
        thread: Some(thread),
    })
}

fn quic_config(cfg: &IntermediateConfig) -> anyhow::Result<quiche::Config> {
    let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
    c.set_application_protos(&[ALPN])?;
    use ztna_core::tls_files::{PemKind, load};
    load(&mut c, PemKind::CertChain, path_str(&cfg.cert_file)?)?;
    load(&mut c, PemKind::PrivateKey, path_str(&cfg.key_file)?)?;
    match (&cfg.ca_file, cfg.require_client_cert) {
        (Some(ca), _) => {
            load(&mut c, PemKind::CaBundle, path_str(ca)?)?;
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
        let max_relay_entries = cfg.max_relay_entries;
        if !cfg.require_client_cert {
            tracing::warn!(
                "client authentication is DISABLED (--insecure-no-client-auth): any client \
                 can register for any service"
            );
        }
        let quic = quic_config(&cfg)?;
        let tunnel_ipv6 = match cfg.tunnel_ipv6 {
            Some(net) => net,
            None => {
                let seed_file = cfg.ca_file.as_ref().unwrap_or(&cfg.cert_file);
                let seed = std::fs::read(seed_file)
                    .with_context(|| format!("reading {}", seed_file.display()))?;
                crate::addressing::ula_from(&seed)
            }
        };
        let addresses = AddressPool::new(cfg.tunnel_ipv4, tunnel_ipv6)?;
        tracing::info!(
            "agents' tunnel addresses from {} and {tunnel_ipv6}",
            cfg.tunnel_ipv4
        );
        let key_pem = std::fs::read(&cfg.key_file)
            .with_context(|| format!("reading {}", cfg.key_file.display()))?;
        let rng = SystemRandom::new();
        let token_key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| anyhow::anyhow!("generating the retry token key"))?;
        let (mut socket, forwarder_sockets) =
            forwarders::bind(cfg.listen, cfg.forwarder_threads)
                .with_context(|| format!("binding UDP {}", cfg.listen))?;
        let local = socket.local_addr()?;
        let instance = cfg
            .instance_id
            .clone()
            .unwrap_or_else(|| format!("{}/{local}", hostname()));
        let reset_key = reset_key(&key_pem, instance.as_bytes());
        let relay_id = cfg.relay_id.unwrap_or_else(|| default_relay_id(&instance));
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut socket, Token(0), Interest::READABLE)?;
        tracing::info!("intermediate listening on udp {local}, relay ID {relay_id:#06x}");
        let relay = RelayTable::new(max_relay_entries, relay_id);
        let stats = Arc::new(IntermediateStats::default());
        let forwarders = (!forwarder_sockets.is_empty())
            .then(|| {
                forwarders::Forwarders::start(
                    forwarder_sockets,
                    relay.forward_map().clone(),
                    relay_id,
                    stats.clone(),
                    &poll,
                )
            })
            .transpose()
            .context("starting the forwarder threads")?;
        Ok(Intermediate {
            cfg,
            socket,
            local,
            poll,
            quic,
            clients: HashMap::new(),
            cids: HashMap::new(),
            initial_dcids: HashMap::new(),
            services: HashMap::new(),
            flows: FlowTable::default(),
            relay,
            next_id: 1,
            token_key,
            reset_key,
            rng,
            stats,
            last_expiry: Instant::now(),
            last_connector_check: Instant::now(),
            last_gauges: Instant::now(),
            reset_budget: (RESET_BURST, Instant::now()),
            candidates_budget: HashMap::new(),
            batches_per_turn: MAX_BATCHES_PER_TURN,
            xdp: None,
            forwarded: SendBatch::default(),
            forwarders,
            addresses,
            gauges: Arc::new(IntermediateGauges::default()),
            handshake: crate::intermediate_metrics::handshake_histogram(),
            health: Arc::new(Health::default()),
            drain: None,
            _metrics: None,
        })
        .and_then(|mut server| {
            server.setup_xdp()?;
            server.update_gauges();
            if let Some(addr) = server.cfg.metrics_listen {
                let registry = crate::intermediate_metrics::registry(
                    server.stats.clone(),
                    server.gauges.clone(),
                    server.handshake.clone(),
                );
                server._metrics = Some(crate::metrics::serve(
                    addr,
                    registry,
                    server.health.clone(),
                )?);
            }
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
        let pin_dir = self
            .cfg
            .bpf_pin_dir
            .clone()
            .unwrap_or_else(|| crate::xdp::default_pin_dir(self.local.port()));
        if choice == XdpChoice::Off {
            crate::xdp::remove_stale_pins(&pin_dir);
            tracing::info!("XDP off: relayed packets are forwarded in userspace");
            return Ok(());
        }
        match crate::xdp::load(
            choice,
            &self.cfg.xdp_interfaces,
            self.local,
            self.relay.relay_id(),
            &pin_dir,
            self.cfg.max_relay_entries as u32,
        ) {
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

    /// Mirrors the forwarding table into the kernel (the XDP program's map).
    pub fn set_kernel_table(&mut self, kernel: Box<dyn KernelTable>) {
        self.relay.set_kernel(kernel);
    }

    pub fn stats(&self) -> Arc<IntermediateStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` (graceful) or `crash` (immediate, silent) is set.
    pub fn run(self, shutdown: &AtomicBool, crash: &AtomicBool) -> anyhow::Result<()> {
        let stop = Stop {
            shutdown,
            drain: &AtomicBool::new(false),
            crash,
        };
        self.run_with(&stop, None)
    }

    /// Runs until `stop` says so (see [`Stop`]); applies a new configuration from
    /// `reload` whenever its flag is set (SIGHUP).
    pub fn run_with(
        mut self,
        stop: &Stop<'_>,
        mut reload: Option<Reloader<'_>>,
    ) -> anyhow::Result<()> {
        let mut st = LoopState::default();
        // Bound, and with XDP requested the program attached (bind fails otherwise,
        // but for `auto`, which may fall back to userspace).
        self.health.set_ready();
        loop {
            self.health.tick();
            if stop.crash.load(Ordering::SeqCst) {
                return Ok(());
            }
            if let Some(r) = reload.as_mut()
                && r.requested.swap(false, Ordering::SeqCst)
            {
                match (r.source)().and_then(|cfg| self.reload(cfg)) {
                    Ok(()) => inc(&self.stats.reloads),
                    Err(e) => {
                        inc(&self.stats.reloads_failed);
                        tracing::error!("reload refused, the running configuration stays: {e:#}");
                    }
                }
            }
            if stop.drain.swap(false, Ordering::SeqCst) && st.closing_since.is_none() {
                if self.drain.is_none() {
                    self.start_drain(Instant::now());
                } else {
                    tracing::info!("SIGTERM again while draining: stopping now");
                    st.stop_now = true;
                }
            }
            if st.closing_since.is_none() {
                let reason = if stop.shutdown.load(Ordering::SeqCst) || st.stop_now {
                    Some("intermediate shutting down")
                } else if self.drain_over(Instant::now()) {
                    Some("intermediate drained: reconnect to another relay")
                } else {
                    None
                };
                if let Some(reason) = reason {
                    self.close_all(reason);
                    st.closing_since = Some(Instant::now());
                }
            }
            if let Some(since) = st.closing_since
                && (self.clients.is_empty() || since.elapsed() > CLOSE_WAIT)
            {
                self.flush(&mut st.out);
                self.write_stats_file();
                tracing::info!("stopped; stats {}", self.stats.snapshot());
                return Ok(());
            }
            self.turn(&mut st)?;
        }
    }

    /// One turn of the loop: wait for packets or the next timer, then a bounded
    /// amount of receiving, then timers, clients and sends.
    fn turn(&mut self, st: &mut LoopState) -> anyhow::Result<()> {
        // Wake at least every 100 ms to notice shutdown flags.
        let timeout = if st.backlog {
            Duration::ZERO
        } else {
            self.clients
                .values()
                .filter_map(|c| c.conn.timeout())
                .min()
                .map_or(Duration::from_millis(100), |t| {
                    t.min(Duration::from_millis(100))
                })
        };
        if let Err(e) = self.poll.poll(&mut st.events, Some(timeout))
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
        let mut batches = 0;
        st.backlog = loop {
            let n = match st.batch.recv(fd) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(e) => {
                    tracing::warn!("recv: {e}");
                    break false;
                }
            };
            for i in 0..n {
                if let Some((pkt, from)) = st.batch.get(i) {
                    self.handle_packet(pkt, from, &mut st.out, st.closing_since.is_some());
                }
            }
            self.forwarded.flush(fd);
            forwarders::count_batches(&self.stats, &mut st.batch.truncated, &mut self.forwarded);
            if n < crate::batch::BATCH {
                break false;
            }
            batches += 1;
            if batches >= self.batches_per_turn {
                inc(&self.stats.recv_budget_exhausted);
                break true;
            }
        };
        // What the forwarder threads' sockets received for the loop.
        st.backlog |= self.take_handovers(&mut st.out, st.closing_since.is_some());
        let ids: Vec<ClientId> = self.clients.keys().copied().collect();
        for id in ids {
            self.process_client(id, now);
        }
        if now.duration_since(self.last_connector_check) >= connector_set::CHECK_EVERY {
            self.check_connectors(now);
            self.last_connector_check = now;
        }
        self.flush(&mut st.out);
        self.collect_closed();
        if now.duration_since(self.last_expiry) > Duration::from_secs(1) {
            self.flows.expire(now);
            self.expire_sessions(now);
            if let Some(xdp) = &mut self.xdp
                && let Err(e) = xdp.refresh_local_addrs()
            {
                tracing::warn!("XDP: updating the local addresses: {e:#}");
            }
            self.write_stats_file();
            self.last_expiry = now;
        }
        if now.duration_since(self.last_gauges) >= GAUGES_EVERY {
            self.update_gauges();
            self.last_gauges = now;
        }
        Ok(())
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
    /// is HMAC-SHA256(process key, issued_at | odcid | peer address | retry SCID) cut
    /// to 16 bytes. Binding the Retry's source CID means the token is only good for an
    /// Initial addressed to the CID the Retry chose, so a client cannot pick the
    /// server CID its connection is routed by.
    fn mint_token(&self, peer: SocketAddr, odcid: &[u8], retry_scid: &[u8]) -> Vec<u8> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut token = Vec::with_capacity(25 + odcid.len());
        token.extend_from_slice(&now.to_be_bytes());
        token.push(odcid.len() as u8);
        token.extend_from_slice(odcid);
        let tag = hmac::sign(&self.token_key, &token_mac_input(&token, peer, retry_scid));
        token.extend_from_slice(&tag.as_ref()[..16]);
        token
    }

    /// The original DCID if `token` was minted for `peer` by a Retry whose source CID
    /// is `dcid` (the DCID of the Initial carrying the token), and has not expired.
    fn validate_token(&self, peer: SocketAddr, token: &[u8], dcid: &[u8]) -> Option<Vec<u8>> {
        if token.len() < 9 + 16 {
            return None;
        }
        let odcid_len = token[8] as usize;
        if token.len() != 9 + odcid_len + 16 {
            return None;
        }
        let (body, tag) = token.split_at(9 + odcid_len);
        let expected = hmac::sign(&self.token_key, &token_mac_input(body, peer, dcid));
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

    /// `closing`: every connection is being closed; new ones are not accepted.
    fn handle_packet(&mut self, pkt: &mut [u8], from: SocketAddr, out: &mut [u8], closing: bool) {
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
        let id = self.cids.get(&hdr.dcid).copied().or_else(|| {
            let id = (hdr.ty == quiche::Type::Initial)
                .then(|| self.initial_dcids.get(&hdr.dcid).copied())
                .flatten();
            if id.is_some() {
                inc(&self.stats.initials_to_existing_connection);
            }
            id
        });
        let id = match id {
            Some(id) => id,
            None => {
                if closing {
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
        let received = client.conn.stats().recv;
        if let Err(e) = client.conn.recv(pkt, quiche::RecvInfo { from, to: local }) {
            tracing::debug!("quic recv from {from}: {e}");
            return;
        }
        // quiche returns Ok for packets it dropped (undecryptable, duplicate, ...);
        // only its own counter says whether the packet was processed. A dropped one
        // proves nothing, least of all about the address it came from.
        if client.conn.stats().recv == received {
            inc(&self.stats.quic_packets_dropped);
        }
        // No address handling here: even an authenticated packet from a new address is
        // not proof that the client is there (it may be replayed or forged by someone
        // on the path). The client moves when quiche has validated the new path, in
        // `path_events`.
    }

    /// Acts on quiche's path events: a client's address changes only once quiche has
    /// migrated it to a path it validated (PATH_CHALLENGE answered from there). Only
    /// then are its relay entries (and the XDP map) moved and a QAD sent.
    fn path_events(&mut self, id: ClientId) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let mut moved_to = None;
        while let Some(ev) = client.conn.path_event_next() {
            match ev {
                quiche::PathEvent::PeerMigrated(local, peer)
                    if client.conn.is_path_validated(local, peer).unwrap_or(false) =>
                {
                    moved_to = Some(peer);
                }
                quiche::PathEvent::FailedValidation(_, peer) => {
                    inc(&self.stats.path_validations_failed);
                    tracing::info!("client {id}: path to {peer} failed validation");
                }
                _ => {}
            }
        }
        if let Some(to) = moved_to
            && to != client.peer
        {
            inc(&self.stats.client_moves);
            tracing::info!("client {id} moved {} -> {to} (path validated)", client.peer);
            client.peer = to;
            self.relay.client_moved(id, to);
            self.stats
                .kernel_update_failures
                .store(self.relay.kernel_update_failures, Ordering::Relaxed);
        }
    }

    /// The userspace forwarder: relayed data-connection packets, by DCID.
    fn forward_relayed(&mut self, cid: &frames::Cid, pkt: &[u8], from: SocketAddr) {
        let now = Instant::now();
        let map = self.relay.forward_map().lookup();
        let relayed = forwarders::forward_relay_packet(
            &self.stats,
            &map,
            self.relay.relay_id(),
            cid,
            pkt,
            from,
            now,
            &mut self.forwarded,
        );
        drop(map);
        match relayed {
            forwarders::Relayed::Forwarded | forwarders::Relayed::Dropped => {}
            forwarders::Relayed::Mismatch { sender } => {
                // The relay cannot authenticate a data packet (it has no keys), so a
                // new sender address is only believed once the sender's control
                // connection, which QUIC path validation vouches for, comes from it.
                let moved = self.clients.get(&sender).is_some_and(|c| c.peer == from);
                if moved {
                    inc(&self.stats.relay_sender_updated);
                    self.relay.client_moved(sender, from);
                    self.stats
                        .kernel_update_failures
                        .store(self.relay.kernel_update_failures, Ordering::Relaxed);
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
        // RFC 9000 §14.1: a server drops client Initials in datagrams under 1200
        // bytes. Answering them (Retry, Version Negotiation) would let a spoofed
        // small packet elicit a larger one: an amplification vector.
        if len < MIN_INITIAL_DATAGRAM {
            inc(&self.stats.dropped_short_initials);
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
                let token = self.mint_token(from, &hdr.dcid, &new_scid);
                match quiche::retry(&hdr.scid, &hdr.dcid, &new_scid, &token, hdr.version, out) {
                    Ok(n) => {
                        inc(&self.stats.retries_sent);
                        self.send_to(&out[..n], from);
                    }
                    Err(e) => tracing::debug!("retry: {e}"),
                }
                return None;
            }
            match self.validate_token(from, token, &hdr.dcid) {
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
            // Our CIDs never carry the relay marker (packets to it go to the
            // forwarder, not to the connection). The token binding already rules a
            // client-chosen one out; this keeps it so if the token format changes.
            if hdr.dcid[0] == RELAY_CID_MARKER {
                inc(&self.stats.refused_relay_marker_cids);
                return None;
            }
            scid = hdr.dcid.clone().into_owned();
        } else {
            odcid = None;
            scid = quiche::ConnectionId::from_vec(self.new_local_cid().to_vec());
        }
        // Without Retry the client's first DCID is its own choice and not ours:
        // remember it for retransmissions of this Initial (see `initial_dcids`).
        let initial_dcid = (!self.cfg.retry).then(|| hdr.dcid.clone().into_owned());
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
        self.cids.insert(scid.clone(), id);
        if let Some(d) = &initial_dcid {
            self.initial_dcids.insert(d.clone(), id);
        }
        self.clients.insert(
            id,
            Client {
                conn,
                scid,
                peer: from,
                identity: None,
                checked: false,
                qad_for: None,
                agent_of: BTreeSet::new(),
                connector_of: BTreeSet::new(),
                frames: FrameIo::default(),
                tunnel: None,
                reads_service_packets: false,
                announced_capabilities: false,
                told_draining: false,
                initial_dcid,
                liveness: None,
                affinity: id,
                instance: None,
                created: Instant::now(),
            },
        );
        Some(id)
    }

    /// RFC 9000 §10.3: looks like a short-header packet, ends with the reset token.
    fn send_stateless_reset(&mut self, dcid: &[u8], received_len: usize, to: SocketAddr) {
        // Relay CIDs belong to data connections between agents and connectors, whose
        // resets are theirs to send; ours would be forged from their point of view and
        // a free reflector for spoofed packets. (The forwarder takes those packets
        // before they get here; this keeps it so.)
        if ztna_common::relay::is_relay_cid(dcid) {
            inc(&self.stats.relay_cid_resets_refused);
            return;
        }
        // Must be shorter than what triggered it (no loops) and at least 21 bytes.
        if received_len <= 22 {
            return;
        }
        if !self.take_reset_token(Instant::now()) {
            inc(&self.stats.stateless_resets_rate_limited);
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

    /// One token from the stateless-reset bucket, if there is one.
    fn take_reset_token(&mut self, now: Instant) -> bool {
        let (tokens, last) = &mut self.reset_budget;
        let refill = now.saturating_duration_since(*last).as_secs_f64() * RESET_RATE;
        *tokens = (*tokens + refill).min(RESET_BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn process_client(&mut self, id: ClientId, now: Instant) {
        self.path_events(id);
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        if client.conn.is_closed() || !client.conn.is_established() {
            return;
        }
        if !client.checked {
            client.checked = true;
            self.handshake
                .observe(now.saturating_duration_since(client.created).as_secs_f64());
            if let Some(der) = client.conn.peer_cert() {
                let d = ring::digest::digest(&ring::digest::SHA256, der);
                client.affinity = u64::from_be_bytes(d.as_ref()[..8].try_into().expect("8 bytes"));
            }
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
            // By key, not a scan of every client's CIDs: many clients closing at once
            // must not cost quadratic time.
            self.cids.remove(&c.scid);
            if let Some(d) = &c.initial_dcid
                && self.initial_dcids.get(d) == Some(&id)
            {
                self.initial_dcids.remove(d);
            }
            self.addresses.release(id);
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
                if let Some(entry) = self.services.get_mut(s) {
                    entry.remove(id);
                }
            }
        }
    }
}

/// Whether `a` and `b` are of one IP family once IPv4-mapped addresses are unmapped.
fn same_family(a: SocketAddr, b: SocketAddr) -> bool {
    let v4 = |x: SocketAddr| match x {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v) => v.ip().to_ipv4_mapped().is_some(),
    };
    v4(a) == v4(b)
}

fn token_mac_input(body: &[u8], peer: SocketAddr, retry_scid: &[u8]) -> Vec<u8> {
    let mut v = body.to_vec();
    match peer {
        SocketAddr::V4(a) => v.extend_from_slice(&a.ip().octets()),
        SocketAddr::V6(a) => v.extend_from_slice(&a.ip().octets()),
    }
    v.extend_from_slice(&peer.port().to_be_bytes());
    v.push(retry_scid.len() as u8);
    v.extend_from_slice(retry_scid);
    v
}

/// The stateless-reset key: HKDF-SHA256 with the server's private key as input key
/// material and the instance identity as info. Same key and identity (a restart) give
/// the same tokens; another identity gives unrelated ones.
fn reset_key(secret: &[u8], instance: &[u8]) -> hmac::Key {
    let prk =
        ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"ztna stateless reset v1").extract(secret);
    let info = [instance];
    let okm = prk
        .expand(&info, hmac::HMAC_SHA256)
        .expect("HKDF output of one hash length");
    hmac::Key::from(okm)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer we own.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return String::new();
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str) -> Intermediate {
        let dir = std::env::temp_dir().join(format!("ztna-inter-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = crate::identity::generate_dev_pki(&dir, &["echo".to_string()]).unwrap();
        let cfg = IntermediateConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            pki.server_cert,
            pki.server_key,
            Some(pki.ca_cert),
        );
        Intermediate::bind(cfg).unwrap()
    }

    #[test]
    fn the_default_relay_id_is_a_function_of_the_instance_identity() {
        let a = default_relay_id("relay-a/192.0.2.1:4433");
        assert_eq!(a, default_relay_id("relay-a/192.0.2.1:4433"));
        // SHA-256("relay-a/192.0.2.1:4433")'s first two bytes: fixed across
        // releases, or a restart would change the instance's CIDs' ID.
        let d = ring::digest::digest(&ring::digest::SHA256, b"relay-a/192.0.2.1:4433");
        assert_eq!(a.to_be_bytes(), d.as_ref()[..2]);
        assert_ne!(a, default_relay_id("relay-b/192.0.2.1:4433"));
        let i = server("relayid");
        assert_eq!(
            i.relay.relay_id(),
            default_relay_id(&format!("{}/{}", hostname(), i.local))
        );
    }

    #[test]
    fn a_turn_reads_a_bounded_number_of_batches_and_the_next_turn_does_not_wait() {
        let mut s = server("bound");
        s.batches_per_turn = 2;
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Loopback delivers into the server's receive queue during send_to.
        for _ in 0..150 {
            sock.send_to(b"\x00not quic", s.local).unwrap();
        }
        let garbage = |s: &Intermediate| s.stats.garbage_packets.load(Ordering::Relaxed);
        let mut st = LoopState::default();
        s.turn(&mut st).unwrap();
        assert_eq!(garbage(&s), 2 * crate::batch::BATCH as u64);
        assert!(st.backlog, "packets left for the next turn");
        assert_eq!(s.stats.recv_budget_exhausted.load(Ordering::Relaxed), 1);
        s.turn(&mut st).unwrap();
        assert_eq!(garbage(&s), 4 * crate::batch::BATCH as u64);
        s.turn(&mut st).unwrap();
        assert_eq!(garbage(&s), 150);
        assert!(!st.backlog);
    }

    #[test]
    fn stateless_resets_are_rate_limited_by_a_token_bucket() {
        let mut s = server("resetrate");
        let t0 = Instant::now();
        s.reset_budget = (RESET_BURST, t0);
        let granted = (0..1000).filter(|_| s.take_reset_token(t0)).count();
        assert_eq!(granted, RESET_BURST as usize);
        // 10 ms at 500 per second: 5 more.
        let t1 = t0 + Duration::from_millis(10);
        let granted = (0..1000).filter(|_| s.take_reset_token(t1)).count();
        assert_eq!(granted, 5);
        // Refills up to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        let granted = (0..1000).filter(|_| s.take_reset_token(t2)).count();
        assert_eq!(granted, RESET_BURST as usize);
    }
}
