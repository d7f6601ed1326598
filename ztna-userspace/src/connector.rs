//! The app connector: registers services with the intermediate and forwards tunneled
//! traffic to them.
//!
//! One mio loop drives the control connection ([`ControlClient`]) on one UDP socket
//! plus one UDP socket per tunneled flow, connected to the service's backend. Replies
//! from the backend are wrapped into IP/UDP packets whose source is the address the
//! agent sent to (the service's virtual address), not the backend's, so the agent's
//! socket accepts them. ICMP echo requests to the virtual address are answered here.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use mio::net::UdpSocket;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use ztna_common::frames::{Cid, close_reason};
use ztna_core::client::Liveness;
use ztna_core::data::{self, DataConfig, DataConnection};
use ztna_core::p2p::{self, Checker};
use ztna_core::packet::{self, FlowKey, Proto};
use ztna_core::relays::RelaySet;
use ztna_core::{ClientConfig, ClientEvent, MAX_UDP_PAYLOAD};

use crate::identity::{Role, authorize};
use crate::kernel_nat::KernelNat;
use crate::relay_targets::RelayWatch;
pub use crate::service::{Backend, ServiceSpec, parse_prefix};
use crate::user_tcp::UserTcp;

const CONTROL: Token = Token(0);
/// The kernel mode's TUN device (flow sockets count up from 1).
const KERNEL: Token = Token(usize::MAX);
/// Device reads per loop turn.
const KERNEL_BURST: usize = 256;
/// Userspace TCP's backend streams use tokens from here up.
const USER_TCP_TOKENS: usize = 1 << 48;
const FLOW_IDLE: Duration = Duration::from_secs(120);

crate::counters!(ConnectorStats {
    connects,
    /// Configuration reloads (SIGHUP) applied, and refused (the running
    /// configuration stays).
    reloads,
    reloads_failed,
    registrations,
    refusals,
    packets_from_tunnel,
    udp_to_backend,
    udp_from_backend,
    icmp_echo_replies,
    dropped_unknown_service,
    dropped_wrong_destination,
    dropped_unsupported,
    dropped_malformed,
    dropped_send_failed,
    flows_opened,
    flows_expired,
    sessions_offered,
    data_connections,
    data_connections_refused,
    packets_from_data,
    packets_to_data,
    direct_connections,
    /// CANDIDATES for sessions this connector does not have.
    candidates_refused,
    /// CANDIDATES ignored: within `p2p::REMOTE_UPDATE_INTERVAL` of the session's
    /// last accepted set (each set restarts every check).
    candidates_rate_limited,
    /// Valid checks from new addresses not made peer-reflexive pairs: the session
    /// has `p2p::MAX_PRFLX_PAIRS` already.
    prflx_refused,
    /// Remote candidates beyond `p2p::MAX_REMOTE_CANDIDATES` in one CANDIDATES
    /// frame: not checked.
    candidates_dropped,
    /// Userspace mode: TCP packets from agents (terminated in the userspace stack).
    tcp_packets_from_agents,
    /// Userspace mode: new flows refused because the agent holds its cap.
    flows_over_limit,
    /// Kernel mode: packets written to the device, read from it, and read for an
    /// address no agent has (dropped).
    packets_to_kernel,
    packets_from_kernel,
    dropped_no_agent,
    /// UDP datagrams from an address that is no relay and matched no connection.
    udp_unknown_source,
});

/// Replies stop using a direct connection the agent has been silent on this long
/// (both sides send keepalives every 200 ms on it), and take the relay.
const DIRECT_REPLY_SILENCE: Duration = Duration::from_millis(600);
/// A direct data connection silent this long is dropped (the agent decides when to
/// fall back; this only frees the state).
const DIRECT_SILENCE: Duration = Duration::from_secs(3);
const DIRECT_KEEPALIVE: Duration = Duration::from_millis(200);

/// Connectivity checks of one session, answering the agent's.
struct CDirect {
    service: String,
    checker: Checker,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Which connection a flow's packets came in on, so replies go back the same way:
/// a relay's control connection (the datagram relay) or a data connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Control(SocketAddr),
    Data(Cid),
}

struct Offer {
    relay: SocketAddr,
    session_id: u32,
    service: String,
    agent_cid: Cid,
    at: Instant,
}

struct Flow {
    origin: Origin,
    service: String,
    /// Tunnel-side key: agent → virtual address.
    key: FlowKey,
    socket: UdpSocket,
    last_seen: Instant,
}

pub struct Connector {
    services: HashMap<String, ServiceSpec>,
    /// A control connection to every relay, each registering every service.
    relays: RelaySet,
    /// Re-resolves named relays; `None` when all are addresses.
    relay_watch: Option<Arc<RelayWatch>>,
    socket: UdpSocket,
    poll: Poll,
    flows: HashMap<Token, Flow>,
    by_key: HashMap<(String, FlowKey), Token>,
    next_token: usize,
    stats: Arc<ConnectorStats>,
    local: SocketAddr,
    /// Server-side config for data connections; `None` without a certificate.
    data_quic: Option<quiche::Config>,
    keepalive: Duration,
    offers: HashMap<Cid, Offer>,
    data: HashMap<Cid, DataConnection>,
    /// Relayed data connections' relays (session ids are each relay's own).
    data_relay: HashMap<Cid, SocketAddr>,
    /// (relay, session id) → its connectivity checks.
    direct: HashMap<(SocketAddr, u32), CDirect>,
    /// Local CIDs of direct (not relayed) data connections.
    direct_cids: std::collections::HashSet<Cid>,
    /// Initial DCID an agent chose for a direct connection → our CID for it.
    initial_dcids: HashMap<Cid, Cid>,
    /// Kernel mode (TUN + NAT), when on.
    kernel: Option<KernelNat>,
    /// Kernel mode: agent tunnel address → the connection its latest packet came in
    /// on and its service, where packets the kernel routes to it go.
    agents: HashMap<IpAddr, (Origin, String)>,
    /// The device had more to read than one turn takes.
    kernel_pending: bool,
    /// Reused buffers of `service_data`: packets, (connection, start, end), and
    /// the service of each connection that had packets.
    rx_arena: Vec<u8>,
    rx_items: Vec<(Cid, usize, usize)>,
    rx_services: HashMap<Cid, String>,
    /// Userspace mode: TCP terminated in a userspace stack, relayed to backends.
    user_tcp: UserTcp,
    /// Most concurrent flows (TCP connections, UDP flows) per agent.
    flows_per_agent: usize,
    gauges: Arc<crate::client_metrics::ConnectorGauges>,
    health: Arc<crate::metrics::Health>,
}

pub struct ConnectorHandle {
    pub stats: Arc<ConnectorStats>,
    stop: Arc<AtomicBool>,
    crash: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl ConnectorHandle {
    /// Stops without telling anyone, as a crash or power loss would: the
    /// intermediate learns of it only from the silence.
    pub fn crash(mut self) -> anyhow::Result<()> {
        self.crash.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("connector panicked"))?,
            None => Ok(()),
        }
    }

    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("connector panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for ConnectorHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The control client's view of `services`: their ids and published prefixes.
fn with_services(cfg: &mut ClientConfig, services: &[ServiceSpec]) {
    cfg.role = ztna_core::Role::Connector;
    cfg.services = services.iter().map(|s| s.id.clone()).collect();
    cfg.service_prefixes = services
        .iter()
        .filter(|s| !s.prefixes.is_empty())
        .map(|s| (s.id.clone(), s.prefixes.clone()))
        .collect();
}

pub fn spawn(client: ClientConfig, services: Vec<ServiceSpec>) -> anyhow::Result<ConnectorHandle> {
    spawn_with_relays(client, services, Vec::new())
}

/// [`spawn`], registering with every relay of `relays`.
pub fn spawn_with_relays(
    client: ClientConfig,
    services: Vec<ServiceSpec>,
    relays: Vec<SocketAddr>,
) -> anyhow::Result<ConnectorHandle> {
    spawn_watching(client, services, relays, None)
}

/// [`spawn_with_relays`], following the relay lists `watch` hands over.
pub fn spawn_watching(
    client: ClientConfig,
    services: Vec<ServiceSpec>,
    relays: Vec<SocketAddr>,
    watch: Option<Arc<RelayWatch>>,
) -> anyhow::Result<ConnectorHandle> {
    let mut connector = Connector::with_relays(client, services, "0.0.0.0:0".parse()?, relays)?;
    connector.watch_relays(watch);
    let stats = connector.stats.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let crash = Arc::new(AtomicBool::new(false));
    let (s, c) = (stop.clone(), crash.clone());
    let thread = std::thread::Builder::new()
        .name("connector".into())
        .spawn(move || connector.run_until(&s, &c))?;
    Ok(ConnectorHandle {
        stats,
        stop,
        crash,
        thread: Some(thread),
    })
}

impl Connector {
    /// A connector registering `services` with `cfg.server`.
    pub fn new(
        cfg: ClientConfig,
        services: Vec<ServiceSpec>,
        bind: SocketAddr,
    ) -> anyhow::Result<Self> {
        Self::with_relays(cfg, services, bind, Vec::new())
    }

    /// A connector registering `services` with every relay of `relays` (empty:
    /// `cfg.server`).
    pub fn with_relays(
        mut cfg: ClientConfig,
        services: Vec<ServiceSpec>,
        bind: SocketAddr,
        relays: Vec<SocketAddr>,
    ) -> anyhow::Result<Self> {
        with_services(&mut cfg, &services);
        if let Some(first) = relays.first() {
            cfg.server = *first;
        }
        let bind = if bind.ip().is_unspecified() && cfg.server.ip().is_loopback() {
            SocketAddr::new(cfg.server.ip(), 0)
        } else if bind.ip().is_unspecified() && bind.is_ipv4() && cfg.server.is_ipv6() {
            // The IPv4 wildcard (the default) cannot reach an IPv6 server; the IPv6
            // one can (and, dual-stack, IPv4 backends' relays too).
            SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), bind.port())
        } else {
            bind
        };
        let mut socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
        let local = socket.local_addr()?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut socket, CONTROL, Interest::READABLE)?;
        let data_quic = match DataConfig::from_client(&cfg) {
            Some(d) => Some(data::quic_config(&d)?),
            None => {
                tracing::warn!("no CA/certificate/key: relayed data connections are disabled");
                None
            }
        };
        let keepalive = cfg.keepalive;
        // Connectors always judge their relays' liveness: replies sent through a
        // dead relay's datagram relay are lost until it is noticed.
        cfg.liveness.get_or_insert(Liveness::FAST);
        // One instance ID for every relay: they pick the same connector for an
        // agent by it (connector affinity).
        let mut instance = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut instance)
            .map_err(|_| anyhow::anyhow!("no randomness for the instance ID"))?;
        cfg.instance = Some(u64::from_be_bytes(instance));
        let seed = local.port().into();
        let relays = RelaySet::new(cfg, &relays, local, seed, Instant::now())?;
        Ok(Connector {
            relays,
            relay_watch: None,
            data_relay: HashMap::new(),
            local,
            data_quic,
            keepalive,
            offers: HashMap::new(),
            data: HashMap::new(),
            direct: HashMap::new(),
            direct_cids: Default::default(),
            initial_dcids: HashMap::new(),
            kernel: None,
            agents: HashMap::new(),
            kernel_pending: false,
            rx_arena: Vec::new(),
            rx_items: Vec::new(),
            rx_services: HashMap::new(),
            gauges: Arc::default(),
            health: Arc::default(),
            user_tcp: UserTcp::new(USER_TCP_TOKENS, crate::user_tcp::DEFAULT_PER_AGENT),
            flows_per_agent: crate::user_tcp::DEFAULT_PER_AGENT,
            services: services.into_iter().map(|s| (s.id.clone(), s)).collect(),
            socket,
            poll,
            flows: HashMap::new(),
            by_key: HashMap::new(),
            next_token: 1,
            stats: Arc::new(ConnectorStats::default()),
        })
    }

    /// Delivers agents' packets through a TUN device and the kernel's NAT instead
    /// of per-flow sockets: all of TCP, UDP and ICMP (see [`crate::kernel_nat`]).
    /// Most concurrent flows one agent may have (userspace mode; the kernel mode
    /// takes its own cap).
    pub fn set_flows_per_agent(&mut self, n: usize) {
        self.flows_per_agent = n;
        self.user_tcp = UserTcp::new(USER_TCP_TOKENS, n);
    }

    pub fn enable_kernel_mode(&mut self, device: &str, flows_per_agent: u32) -> anyhow::Result<()> {
        let specs: Vec<ServiceSpec> = self.services.values().cloned().collect();
        let nat = KernelNat::start(device, &specs, flows_per_agent)?;
        self.poll.registry().register(
            &mut SourceFd(&nat.dev.as_raw_fd()),
            KERNEL,
            Interest::READABLE,
        )?;
        self.kernel = Some(nat);
        Ok(())
    }

    pub fn stats(&self) -> Arc<ConnectorStats> {
        self.stats.clone()
    }

    /// Applies a reloaded configuration (SIGHUP) without dropping anything: the
    /// services (new ones registered, changed prefixes published, changed backends
    /// used by new flows; in kernel mode the NAT table is replaced in one
    /// transaction, established flows keep their bindings) and the TLS files (new
    /// data connections at once, the control connection at its next connect).
    /// Everything is checked before anything changes.
    pub fn reload(
        &mut self,
        mut cfg: ClientConfig,
        services: Vec<ServiceSpec>,
    ) -> anyhow::Result<()> {
        if services.is_empty() {
            anyhow::bail!("no services in the new configuration");
        }
        with_services(&mut cfg, &services);
        let data_quic = match DataConfig::from_client(&cfg) {
            Some(d) => Some(data::quic_config(&d)?),
            None => None,
        };
        let script = match &self.kernel {
            Some(k) => Some(k.script_for(&services)?),
            None => None,
        };
        let removed: Vec<String> = self
            .services
            .keys()
            .filter(|id| !services.iter().any(|s| &s.id == *id))
            .cloned()
            .collect();
        cfg.liveness.get_or_insert(Liveness::FAST);
        cfg.instance = self.relays.primary().config().instance;
        self.relays.reconfigure(cfg)?;
        if let (Some(k), Some(script)) = (self.kernel.as_mut(), script) {
            k.replace_table(&script, &services)?;
        }
        self.data_quic = data_quic;
        self.services = services.into_iter().map(|s| (s.id.clone(), s)).collect();
        if !removed.is_empty() {
            tracing::warn!(
                "reload: {removed:?} no longer served; the intermediate forgets them at the next reconnect"
            );
        }
        tracing::info!(
            "configuration reloaded: services {:?}",
            self.services.keys().collect::<Vec<_>>()
        );
        Ok(())
    }

    /// Follows named relays as they resolve again (see [`crate::relay_targets`]).
    pub fn watch_relays(&mut self, watch: Option<Arc<RelayWatch>>) {
        self.relay_watch = watch;
    }

    /// Registers with new relays, and leaves the ones no longer listed.
    pub fn set_relays(&mut self, addrs: &[SocketAddr]) -> anyhow::Result<()> {
        for gone in self.relays.set_addrs(addrs, Instant::now())? {
            self.leave_relay(gone);
        }
        Ok(())
    }

    /// The relays this connector is connected to and registered with.
    pub fn relay_addrs(&self) -> Vec<SocketAddr> {
        self.relays.iter().map(|r| r.addr()).collect()
    }

    /// `relay` is gone: its relayed data connections and checks go with it (direct
    /// connections stay: they are peer to peer), and replies that went through it
    /// take another relay.
    fn leave_relay(&mut self, relay: SocketAddr) {
        for (cid, r) in &self.data_relay {
            if *r == relay
                && let Some(d) = self.data.get_mut(cid)
            {
                d.close("relay lost");
            }
        }
        self.direct.retain(|(r, _), _| *r != relay);
        self.offers.retain(|_, o| o.relay != relay);
        let other = self.relays.iter().map(|r| r.addr()).find(|a| *a != relay);
        let moved = |o: &mut Origin| {
            if *o == Origin::Control(relay)
                && let Some(a) = other
            {
                *o = Origin::Control(a);
            }
        };
        self.flows.values_mut().for_each(|f| moved(&mut f.origin));
        self.agents.values_mut().for_each(|(o, _)| moved(o));
    }

    pub fn gauges(&self) -> Arc<crate::client_metrics::ConnectorGauges> {
        self.gauges.clone()
    }

    /// Ready once every service is registered with some relay.
    pub fn health(&self) -> Arc<crate::metrics::Health> {
        self.health.clone()
    }

    /// Readiness and gauges, every turn (a few lookups per service).
    fn update_health(&mut self) {
        self.health.tick();
        let total = self.services.len();
        let registered = self
            .services
            .keys()
            .filter(|s| self.relays.iter().any(|r| r.client.is_registered(s)))
            .count();
        let set = |a: &std::sync::atomic::AtomicU64, v: usize| a.store(v as u64, Ordering::Relaxed);
        set(&self.gauges.services, total);
        set(&self.gauges.services_registered, registered);
        set(
            &self.gauges.data_connections,
            self.data.len() + self.direct.len(),
        );
        if registered == total && total > 0 {
            self.health.set_ready();
        } else {
            self.health.set_not_ready(&format!(
                "{registered} of {total} services registered with the intermediate"
            ));
        }
    }

    pub fn run(self, stop: &AtomicBool) -> anyhow::Result<()> {
        self.run_until(stop, &AtomicBool::new(false))
    }

    /// [`Connector::run`], applying a new configuration from `reload` whenever its
    /// flag is set (SIGHUP); a configuration that does not load is refused and logged.
    pub fn run_reloading(
        self,
        stop: &AtomicBool,
        reload: &AtomicBool,
        mut source: impl FnMut() -> anyhow::Result<(ClientConfig, Vec<ServiceSpec>)>,
    ) -> anyhow::Result<()> {
        let mut hook = |c: &mut Connector| {
            if reload.swap(false, Ordering::SeqCst) {
                match source().and_then(|(cfg, services)| c.reload(cfg, services)) {
                    Ok(()) => inc(&c.stats.reloads),
                    Err(e) => {
                        inc(&c.stats.reloads_failed);
                        tracing::error!("reload refused, the running configuration stays: {e:#}");
                    }
                }
            }
        };
        self.run_inner(stop, &AtomicBool::new(false), &mut hook)
    }

    /// Runs until `stop` (closing the control connection first) or `crash` (leaving
    /// without a word; for tests).
    pub fn run_until(self, stop: &AtomicBool, crash: &AtomicBool) -> anyhow::Result<()> {
        self.run_inner(stop, crash, &mut |_| {})
    }

    /// The loop; `each_turn` runs at the start of every turn (reloads).
    fn run_inner(
        mut self,
        stop: &AtomicBool,
        crash: &AtomicBool,
        each_turn: &mut dyn FnMut(&mut Connector),
    ) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(256);
        let mut buf = vec![0u8; 65535];
        let mut out = vec![0u8; MAX_UDP_PAYLOAD];
        let mut last_sweep = Instant::now();
        loop {
            if crash.load(Ordering::SeqCst) {
                return Ok(());
            }
            each_turn(&mut self);
            if stop.load(Ordering::SeqCst) {
                self.relays.close("connector stopping");
                self.flush(&mut out);
                return Ok(());
            }
            let now = Instant::now();
            let next = self
                .data
                .values()
                .filter_map(|d| d.poll_timeout())
                .chain(
                    self.direct
                        .values()
                        .filter_map(|d| d.checker.poll_timeout()),
                )
                .chain(self.relays.poll_timeout())
                .chain(self.user_tcp.poll_delay().map(|d| now + d))
                .min();
            let timeout = if self.kernel_pending {
                Duration::ZERO
            } else {
                next.map_or(Duration::from_millis(100), |t| {
                    t.saturating_duration_since(now)
                        .min(Duration::from_millis(100))
                })
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                return Err(e.into());
            }
            let now = Instant::now();
            if std::mem::take(&mut self.kernel_pending) {
                self.read_kernel(&mut buf);
            }
            for ev in events.iter() {
                if ev.token() == CONTROL {
                    loop {
                        match self.socket.recv_from(&mut buf) {
                            Ok((n, from)) => self.recv_udp(&mut buf[..n], from, now),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => {
                                tracing::warn!("control socket: {e}");
                                break;
                            }
                        }
                    }
                } else if ev.token() == KERNEL {
                    self.read_kernel(&mut buf);
                } else if self.user_tcp.owns(ev.token()) {
                    self.user_tcp.ready(self.poll.registry(), ev.token());
                } else {
                    self.read_backend(ev.token(), &mut buf);
                }
            }
            self.relays.handle_timeout(now);
            if let Some(addrs) = self.relay_watch.as_ref().and_then(|w| w.take())
                && let Err(e) = self.set_relays(&addrs)
            {
                tracing::warn!("following relays {addrs:?}: {e:#}");
            }
            for d in self.data.values_mut() {
                if d.poll_timeout().is_some_and(|t| t <= now) {
                    d.handle_timeout(now);
                }
            }
            self.handle_events();
            self.service_data(now);
            self.poll_user_tcp();
            self.flush(&mut out);
            if now.duration_since(last_sweep) > Duration::from_secs(5) {
                self.expire(now);
                last_sweep = now;
            }
            self.update_health();
        }
    }

    fn flush(&mut self, out: &mut [u8]) {
        let now = Instant::now();
        while let Some((n, to)) = self.relays.poll_transmit(out, now) {
            if let Err(e) = self.socket.send_to(&out[..n], to) {
                tracing::debug!("send to {to}: {e}");
                break;
            }
        }
        for d in self.data.values_mut() {
            while let Some((n, to)) = d.poll_transmit(out, now) {
                if let Err(e) = self.socket.send_to(&out[..n], to) {
                    tracing::debug!("send to {to}: {e}");
                    break;
                }
            }
        }
        for d in self.direct.values_mut() {
            while let Some((pkt, to)) = d.checker.poll_transmit(now) {
                let _ = self.socket.send_to(&pkt, to);
            }
        }
    }

    /// Demultiplexes the one UDP socket: data connections by their relay CID,
    /// everything else to the control connection.
    fn recv_udp(&mut self, pkt: &mut [u8], from: SocketAddr, now: Instant) {
        if p2p::is_check(pkt) {
            let session = p2p::check_session(pkt);
            if let Some(d) = session.and_then(|s| {
                self.direct
                    .iter_mut()
                    .find(|((_, id), _)| *id == s)
                    .map(|(_, d)| d)
            }) {
                let refused = d.checker.prflx_refused;
                let resp = d.checker.handle(pkt, from, now);
                if d.checker.prflx_refused > refused {
                    inc(&self.stats.prflx_refused);
                }
                if let Some((resp, to)) = resp {
                    let _ = self.socket.send_to(&resp, to);
                }
            }
            return;
        }
        if let Some(dcid) = data::dcid_of(pkt) {
            let mut cid = [0u8; 8];
            cid.copy_from_slice(dcid);
            let cid = self.initial_dcids.get(&cid).copied().unwrap_or(cid);
            if let Some(d) = self.data.get_mut(&cid) {
                d.recv(pkt, from, now);
                return;
            }
            // A direct connection's first Initial: its DCID names the session, and
            // it comes from the address that session's checks chose.
            let session_id = data::session_of_direct_dcid(&cid);
            if pkt[0] & 0x80 != 0
                && let Some(service) = self
                    .direct
                    .iter()
                    .find(|((_, id), d)| *id == session_id && d.checker.selected() == Some(from))
                    .map(|(_, d)| d.service.clone())
                && let Some(quic) = self.data_quic.as_mut()
            {
                let ours = data::random_cid();
                match DataConnection::accept(
                    quic,
                    DIRECT_KEEPALIVE,
                    session_id,
                    &service,
                    ours,
                    [0; 8],
                    self.local,
                    from,
                    now,
                ) {
                    Ok(mut d) => {
                        tracing::info!("direct data connection for {service:?} from {from}");
                        d.recv(pkt, from, now);
                        self.initial_dcids.insert(cid, ours);
                        self.direct_cids.insert(ours);
                        self.data.insert(ours, d);
                    }
                    Err(e) => tracing::warn!("direct data connection from {from}: {e}"),
                }
                return;
            }
            if let Some(offer) = self.offers.remove(&cid) {
                let Some(quic) = self.data_quic.as_mut() else {
                    return;
                };
                match DataConnection::accept(
                    quic,
                    self.keepalive,
                    offer.session_id,
                    &offer.service,
                    cid,
                    offer.agent_cid,
                    self.local,
                    from,
                    now,
                ) {
                    Ok(mut d) => {
                        d.recv(pkt, from, now);
                        self.data.insert(cid, d);
                        self.data_relay.insert(cid, offer.relay);
                    }
                    Err(e) => tracing::warn!("data connection for {}: {e}", offer.service),
                }
                return;
            }
        }
        if !self.relays.recv(pkt, from, now) {
            inc(&self.stats.udp_unknown_source);
        }
    }

    /// Checks new data connections' peers, reads their packets, drops closed ones.
    fn service_data(&mut self, now: Instant) {
        // Received tunnel packets, back to back in one reused buffer: no allocation
        // per packet on the data path.
        let mut arena = std::mem::take(&mut self.rx_arena);
        let mut items = std::mem::take(&mut self.rx_items);
        arena.clear();
        items.clear();
        let mut closed = Vec::new();
        for (cid, d) in self.data.iter_mut() {
            let service = d.service.clone();
            if d.check_peer(now, |der| authorize(der, Role::Agent, &service)) {
                if self.direct_cids.contains(cid) {
                    inc(&self.stats.direct_connections);
                } else {
                    inc(&self.stats.data_connections);
                }
            }
            if self.direct_cids.contains(cid)
                && d.is_usable()
                && now.saturating_duration_since(d.last_recv()) > DIRECT_SILENCE
            {
                d.close("direct path silent");
            }
            let first = items.len();
            d.recv_packets(|p| {
                arena.extend_from_slice(p);
                items.push((*cid, arena.len() - p.len(), arena.len()));
            });
            if items.len() > first {
                self.rx_services.insert(*cid, service);
            }
            if d.is_closed() {
                if !d.is_usable() && d.handshake_time().is_none() {
                    inc(&self.stats.data_connections_refused);
                }
                tracing::info!(
                    "data connection for {:?} closed: {}",
                    d.service,
                    d.close_reason()
                );
                closed.push((*cid, d.session_id));
            }
        }
        let services = std::mem::take(&mut self.rx_services);
        for &(cid, start, end) in &items {
            inc(&self.stats.packets_from_data);
            let service = services.get(&cid).map(String::as_str);
            self.tunnel_in(Origin::Data(cid), service, &arena[start..end]);
        }
        self.rx_services = services;
        self.rx_services.clear();
        self.rx_arena = arena;
        self.rx_items = items;
        for (cid, session) in closed {
            self.data.remove(&cid);
            self.initial_dcids.retain(|_, v| *v != cid);
            let relay = self.data_relay.remove(&cid);
            if !self.direct_cids.remove(&cid)
                && let Some(relay) = relay
            {
                if let Some(c) = self.relays.get_mut(relay) {
                    let _ = c.close_session(session, close_reason::NORMAL);
                }
                self.direct.remove(&(relay, session));
            }
            let fallback = self.relays.iter().next().map(|r| r.addr());
            let back = relay.or(fallback);
            for f in self.flows.values_mut() {
                if f.origin == Origin::Data(cid)
                    && let Some(r) = back
                {
                    f.origin = Origin::Control(r);
                }
            }
        }
        self.offers
            .retain(|_, o| now.duration_since(o.at) < Duration::from_secs(10));
    }

    fn handle_events(&mut self) {
        while let Some((relay, ev)) = self.relays.poll_event() {
            match ev {
                ClientEvent::Connected { handshake } => {
                    inc(&self.stats.connects);
                    tracing::info!("connected to intermediate {relay} (handshake {handshake:?})");
                }
                ClientEvent::ObservedAddress(a) => {
                    tracing::info!("intermediate {relay} sees us at {a}")
                }
                ClientEvent::Registered(s) => {
                    inc(&self.stats.registrations);
                    tracing::info!("registered as connector for {s:?} at {relay}");
                }
                ClientEvent::Refused { service, status } => {
                    inc(&self.stats.refusals);
                    tracing::error!("registration for {service:?} refused: {status}");
                }
                ClientEvent::Disconnected { reason, retry_in } => {
                    tracing::warn!("disconnected from {relay}: {reason}; retry in {retry_in:?}");
                    self.leave_relay(relay);
                }
                ClientEvent::Packet { service, packet } => {
                    inc(&self.stats.packets_from_tunnel);
                    self.tunnel_in(Origin::Control(relay), service.as_deref(), &packet);
                }
                ClientEvent::SessionOffer {
                    session_id,
                    service,
                    agent_cid,
                    connector_cid,
                } => {
                    inc(&self.stats.sessions_offered);
                    if self.data_quic.is_none() || !self.services.contains_key(&service) {
                        continue;
                    }
                    if self
                        .relays
                        .get_mut(relay)
                        .is_some_and(|c| c.accept_session(session_id).is_ok())
                    {
                        self.offers.insert(
                            connector_cid,
                            Offer {
                                relay,
                                session_id,
                                service,
                                agent_cid,
                                at: Instant::now(),
                            },
                        );
                    }
                }
                ClientEvent::Candidates {
                    session_id,
                    password,
                    candidates,
                } => {
                    let relayed = self
                        .data
                        .iter()
                        .find(|(cid, d)| {
                            d.session_id == session_id && self.data_relay.get(*cid) == Some(&relay)
                        })
                        .map(|(_, d)| d.service.clone());
                    let Some(service) = relayed else {
                        inc(&self.stats.candidates_refused);
                        tracing::warn!("CANDIDATES for unknown session {session_id}: refused");
                        continue;
                    };
                    // The agent (re)starts checks: answer with fresh candidates. Not
                    // more often than a checker takes a new set: each restart sends
                    // checks to the addresses the agent names.
                    let now = Instant::now();
                    if self.direct.get(&(relay, session_id)).is_some_and(|d| {
                        now.saturating_duration_since(d.checker.started())
                            < p2p::REMOTE_UPDATE_INTERVAL
                    }) {
                        inc(&self.stats.candidates_rate_limited);
                        tracing::debug!("CANDIDATES for session {session_id}: too soon, ignored");
                        continue;
                    }
                    let cands =
                        crate::netif::candidates(self.local, self.relays.observed_address());
                    let mut checker = Checker::new(p2p::Role::Controlled, session_id, &cands, now);
                    checker.set_remote(password, &candidates, now);
                    self.stats
                        .candidates_dropped
                        .fetch_add(checker.remote_candidates_dropped, Ordering::Relaxed);
                    if self.relays.get_mut(relay).is_some_and(|c| {
                        c.send_candidates(session_id, checker.local_password(), &cands)
                            .is_ok()
                    }) {
                        self.direct
                            .insert((relay, session_id), CDirect { service, checker });
                    }
                }
                ClientEvent::SessionPath { .. } => {}
                ClientEvent::SessionClosed { session_id, .. } => {
                    self.direct.remove(&(relay, session_id));
                    self.offers
                        .retain(|_, o| (o.relay, o.session_id) != (relay, session_id));
                    // The relayed connection only: a direct one is peer to peer and
                    // ends on its own silence or the agent's close.
                    for (cid, d) in self.data.iter_mut() {
                        if d.session_id == session_id && self.data_relay.get(cid) == Some(&relay) {
                            d.close("session closed by the intermediate");
                        }
                    }
                }
                ClientEvent::SessionReady { .. }
                | ClientEvent::SessionRefused { .. }
                | ClientEvent::ServicePrefixes { .. }
                | ClientEvent::TunnelAddress { .. } => {}
                ClientEvent::Draining { within } => {
                    // Its sessions carry on until their agents move them; new ones
                    // come through the other relays.
                    tracing::info!("relay {relay} draining (forwarding for {within:?} more)");
                }
            }
        }
    }

    fn tunnel_in(&mut self, origin: Origin, service: Option<&str>, packet: &[u8]) {
        let raw_service;
        let service = match service {
            Some(s) => s,
            // Raw IP (an original intermediate, or a packet too big to wrap): the
            // service whose virtual address it goes to, else the only service.
            None => match self.service_of_raw(packet) {
                Some(s) => {
                    raw_service = s;
                    raw_service.as_str()
                }
                None => {
                    inc(&self.stats.dropped_unknown_service);
                    return;
                }
            },
        };
        let Some(backend) = self.services.get(service).map(|s| s.backend) else {
            inc(&self.stats.dropped_unknown_service);
            return;
        };
        let key = match packet::flow_key(packet) {
            Ok(k) => k,
            Err(e) => {
                inc(&self.stats.dropped_malformed);
                tracing::debug!("dropping tunneled packet: {e}");
                return;
            }
        };
        if !self.services[service].covers(key.dst.ip()) {
            inc(&self.stats.dropped_wrong_destination);
            tracing::debug!(
                "{service}: dropping packet to {} (not the service address)",
                key.dst
            );
            return;
        }
        self.note_agent(key.src.ip(), origin, service);
        if let Some(k) = self.kernel.as_mut() {
            k.learn_agent(key.src.ip());
            match k.dev.send(packet) {
                Ok(_) => inc(&self.stats.packets_to_kernel),
                Err(e) => {
                    inc(&self.stats.dropped_send_failed);
                    tracing::debug!("{service}: TUN write: {e}");
                }
            }
            return;
        }
        match key.proto {
            Proto::Icmp | Proto::Icmpv6 => match packet::icmp_echo_reply(packet) {
                Some(reply) => {
                    inc(&self.stats.icmp_echo_replies);
                    self.tunnel_out(origin, service, &reply);
                }
                None => inc(&self.stats.dropped_unsupported),
            },
            Proto::Udp => {
                let payload = match packet::parse_udp(packet) {
                    Ok((_, _, p)) => p.to_vec(),
                    Err(_) => {
                        inc(&self.stats.dropped_malformed);
                        return;
                    }
                };
                let backend = backend.target(key.dst);
                let Some(token) = self.flow_socket(service, key, backend) else {
                    return;
                };
                let flow = self.flows.get_mut(&token).expect("flow exists");
                flow.last_seen = Instant::now();
                flow.origin = origin;
                match flow.socket.send(&payload) {
                    Ok(_) => inc(&self.stats.udp_to_backend),
                    Err(e) => {
                        inc(&self.stats.dropped_send_failed);
                        tracing::debug!("{service}: send to backend {backend}: {e}");
                    }
                }
            }
            Proto::Tcp => {
                inc(&self.stats.tcp_packets_from_agents);
                let backend = backend.target(key.dst);
                self.user_tcp
                    .packet_in(self.poll.registry(), key, packet.to_vec(), backend);
            }
        }
    }

    /// Remembers the connection and service of an agent's latest packet: where
    /// packets for its address go.
    fn note_agent(&mut self, agent: IpAddr, origin: Origin, service: &str) {
        match self.agents.get_mut(&agent) {
            Some(entry) if entry.0 == origin && entry.1 == service => {}
            Some(entry) => *entry = (origin, service.to_string()),
            None => {
                self.agents.insert(agent, (origin, service.to_string()));
            }
        }
    }

    /// Userspace TCP: runs the stack and sends what it emits to the agents.
    fn poll_user_tcp(&mut self) {
        for p in self.user_tcp.poll(self.poll.registry()) {
            let Some(dst) = packet::destination(&p) else {
                continue;
            };
            let Some((origin, service)) = self.agents.get(&dst).cloned() else {
                inc(&self.stats.dropped_no_agent);
                continue;
            };
            self.tunnel_out(origin, &service, &p);
        }
    }

    /// The service a raw IP packet is for: the one whose prefix covers the
    /// packet's destination (the longest), else the only service there is.
    fn service_of_raw(&self, packet: &[u8]) -> Option<String> {
        if let Some(dst) = packet::destination(packet)
            && let Some(s) = self
                .services
                .values()
                .filter_map(|s| {
                    let best = s
                        .prefixes
                        .iter()
                        .filter(|p| p.contains(&dst))
                        .map(|p| p.prefix_len())
                        .max()?;
                    Some((best, s))
                })
                .max_by_key(|(len, _)| *len)
                .map(|(_, s)| s)
        {
            return Some(s.id.clone());
        }
        match self.services.len() {
            1 => self.services.keys().next().cloned(),
            _ => None,
        }
    }

    fn flow_socket(&mut self, service: &str, key: FlowKey, backend: SocketAddr) -> Option<Token> {
        if let Some(t) = self.by_key.get(&(service.to_string(), key)) {
            return Some(*t);
        }
        // One agent must not take every file descriptor (and with them every other
        // agent's service).
        let agent = key.src.ip();
        if self
            .by_key
            .keys()
            .filter(|(_, k)| k.src.ip() == agent)
            .count()
            >= self.flows_per_agent
        {
            inc(&self.stats.flows_over_limit);
            return None;
        }
        let bind: SocketAddr = if backend.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let socket = UdpSocket::bind(bind).and_then(|s| s.connect(backend).map(|_| s));
        let mut socket = match socket {
            Ok(s) => s,
            Err(e) => {
                inc(&self.stats.dropped_send_failed);
                tracing::warn!("{service}: socket to {backend}: {e}");
                return None;
            }
        };
        let token = Token(self.next_token);
        self.next_token += 1;
        if self
            .poll
            .registry()
            .register(&mut socket, token, Interest::READABLE)
            .is_err()
        {
            return None;
        }
        inc(&self.stats.flows_opened);
        self.by_key.insert((service.to_string(), key), token);
        self.flows.insert(
            token,
            Flow {
                origin: Origin::Control(self.relays.primary().server()),
                service: service.to_string(),
                key,
                socket,
                last_seen: Instant::now(),
            },
        );
        Some(token)
    }

    fn read_backend(&mut self, token: Token, buf: &mut [u8]) {
        loop {
            let Some(flow) = self.flows.get_mut(&token) else {
                return;
            };
            let n = match flow.socket.recv(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // e.g. ICMP port unreachable from a backend that is down.
                    tracing::debug!("{}: backend recv: {e}", flow.service);
                    return;
                }
            };
            flow.last_seen = Instant::now();
            inc(&self.stats.udp_from_backend);
            let (service, key, origin) = (flow.service.clone(), flow.key, flow.origin);
            // Reply as the address the agent sent to.
            match packet::build_udp(key.dst, key.src, &buf[..n]) {
                Ok(reply) => self.tunnel_out(origin, &service, &reply),
                Err(e) => {
                    inc(&self.stats.dropped_send_failed);
                    tracing::debug!("{service}: building reply: {e}");
                }
            }
        }
    }

    /// Kernel mode: packets the kernel routed into the device go to the agent
    /// whose address they are for, on the connection its latest packet used.
    fn read_kernel(&mut self, buf: &mut [u8]) {
        for _ in 0..KERNEL_BURST {
            let Some(k) = self.kernel.as_ref() else {
                return;
            };
            let n = match k.dev.recv(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("TUN read: {e}");
                    return;
                }
            };
            inc(&self.stats.packets_from_kernel);
            let Some(dst) = packet::destination(&buf[..n]) else {
                inc(&self.stats.dropped_malformed);
                continue;
            };
            let Some((origin, service)) = self.agents.get(&dst).cloned() else {
                inc(&self.stats.dropped_no_agent);
                continue;
            };
            self.tunnel_out(origin, &service, &buf[..n]);
        }
        // Left over: edge-triggered readiness will not report it again.
        self.kernel_pending = true;
    }

    /// The connection a reply to an agent goes on: the one its latest packet came
    /// in on, unless that is a direct connection the agent has gone silent on (it
    /// fell back to the relay, and a pure receiver may send nothing to tell us):
    /// then the session's relayed connection.
    fn reply_cid(&self, cid: Cid) -> Option<Cid> {
        let d = self.data.get(&cid)?;
        let direct_dead =
            self.direct_cids.contains(&cid) && d.last_recv().elapsed() > DIRECT_REPLY_SILENCE;
        if d.is_usable() && !direct_dead {
            return Some(cid);
        }
        self.data
            .iter()
            .find(|(c, r)| {
                r.session_id == d.session_id && !self.direct_cids.contains(*c) && r.is_usable()
            })
            .map(|(c, _)| *c)
    }

    fn tunnel_out(&mut self, origin: Origin, service: &str, packet: &[u8]) {
        if let Origin::Data(cid) = origin
            && let Some(cid) = self.reply_cid(cid)
            && let Some(d) = self.data.get_mut(&cid)
        {
            match d.send_packet(packet) {
                Ok(()) => {
                    inc(&self.stats.packets_to_data);
                    return;
                }
                Err(e) => tracing::debug!(
                    "{service}: data connection send: {e}; using the control connection"
                ),
            }
        }
        // The datagram relay: through the relay the agent's packet came by, else
        // any relay that has the service registered.
        let via = match origin {
            Origin::Control(r) if self.relays.get(r).is_some_and(|c| c.is_registered(service)) => {
                Some(r)
            }
            _ => self
                .relays
                .iter()
                .find(|r| r.client.is_registered(service))
                .map(|r| r.addr()),
        };
        let r = match via.and_then(|r| self.relays.get_mut(r)) {
            Some(c) => c.send_packet(service, packet),
            None => Err(ztna_core::ClientError::NotRegistered(service.to_string())),
        };
        if let Err(e) = r {
            inc(&self.stats.dropped_send_failed);
            tracing::debug!("{service}: reply not sent: {e}");
        }
    }

    fn expire(&mut self, now: Instant) {
        let old: Vec<Token> = self
            .flows
            .iter()
            .filter(|(_, f)| now.duration_since(f.last_seen) > FLOW_IDLE)
            .map(|(t, _)| *t)
            .collect();
        for t in old {
            if let Some(mut f) = self.flows.remove(&t) {
                let _ = self.poll.registry().deregister(&mut f.socket);
                self.by_key.remove(&(f.service, f.key));
                inc(&self.stats.flows_expired);
            }
        }
    }
}
