//! Wire compatibility with the original system's agents, connectors and intermediate
//! (issue 12).
//!
//! The original-style peers here are written from the original protocol's
//! documentation, byte for byte, on quiche directly: no ztna-core or ztna-common code
//! builds or reads their messages. Layouts (control connection, ALPN `ztna-v1`, one
//! message per DATAGRAM, dispatched on the first byte):
//!
//! ```text
//! 01 ip[4] port[2 BE]          QAD, observed IPv4 address (server → client)
//! 10 len id[len]               register as agent for a service
//! 11 len id[len]               register as connector
//! 12 00 len id[len]            registration accepted
//! 13 status len id[len]        registration refused; 01 invalid, 02 not authorized
//! 2F len id[len] ip-packet     IP packet routed to a service
//! 4_ / 6_                      raw IPv4 / IPv6 packet
//! ```
//!
//! Original QUIC settings: idle timeout 30 s, UDP payloads up to 1350 bytes, DATAGRAMs
//! on; the effective DATAGRAM limit is read from each connection, never assumed.
//! The original agent sends raw IP or `0x2F` and reads only raw IP; the original
//! connector reads and sends only raw IP; the original intermediate relays raw IP and
//! accepts `0x2F` from agents only. Everything runs on loopback with real quiche.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ztna_core::{ClientConfig, Role};
use ztna_userspace::agent::Agent;
use ztna_userspace::connector::{self, ServiceSpec};
use ztna_userspace::echo::EchoServer;
use ztna_userspace::identity::{self, DevPki};
use ztna_userspace::intermediate::{self, IntermediateConfig, IntermediateHandle};

/// 12 bytes, as in the issue: `0x2F` adds 14 bytes in front of a packet.
const SERVICE: &str = "echo-service";
const VIP: [u8; 4] = [10, 100, 0, 1];
const TUNNEL_IP: [u8; 4] = [100, 64, 0, 2];
const ALPN: &[u8] = b"ztna-v1";
const IPV4_UDP: usize = 20 + 8;

// ---------------------------------------------------------------------------------
// The original protocol, written out from its documentation.

fn register_agent(id: &[u8]) -> Vec<u8> {
    [&[0x10, id.len() as u8][..], id].concat()
}

fn register_connector(id: &[u8]) -> Vec<u8> {
    [&[0x11, id.len() as u8][..], id].concat()
}

fn ack(id: &[u8]) -> Vec<u8> {
    [&[0x12, 0x00, id.len() as u8][..], id].concat()
}

fn nack(status: u8, id: &[u8]) -> Vec<u8> {
    [&[0x13, status, id.len() as u8][..], id].concat()
}

fn service_packet(id: &[u8], packet: &[u8]) -> Vec<u8> {
    [&[0x2F, id.len() as u8][..], id, packet].concat()
}

fn qad_v4(addr: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(a) = addr else {
        panic!("IPv4 loopback expected")
    };
    [&[0x01][..], &a.ip().octets(), &a.port().to_be_bytes()].concat()
}

/// RFC 1071 one's-complement sum, folded and inverted.
fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn udp_checksum(src: [u8; 4], dst: [u8; 4], segment: &[u8]) -> u16 {
    let pseudo = [
        &src[..],
        &dst,
        &[0, 17],
        &(segment.len() as u16).to_be_bytes(),
        segment,
    ]
    .concat();
    inet_checksum(&pseudo)
}

/// An IPv4/UDP packet with valid header and UDP checksums, DF set, TTL 64.
fn ipv4_udp(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let total = IPV4_UDP + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.0);
    p[16..20].copy_from_slice(&dst.0);
    let h = inet_checksum(&p[..20]);
    p[10..12].copy_from_slice(&h.to_be_bytes());
    p[20..22].copy_from_slice(&src.1.to_be_bytes());
    p[22..24].copy_from_slice(&dst.1.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    let u = match udp_checksum(src.0, dst.0, &p[20..]) {
        0 => 0xffff,
        c => c,
    };
    p[26..28].copy_from_slice(&u.to_be_bytes());
    p
}

#[derive(Debug, PartialEq, Eq)]
struct Udp {
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    payload: Vec<u8>,
}

/// Parses an IPv4/UDP packet, checking lengths and both checksums.
fn parse_ipv4_udp(p: &[u8]) -> Result<Udp, String> {
    if p.len() < IPV4_UDP || p[0] != 0x45 {
        return Err(format!(
            "not a plain IPv4 packet: {:02x?}",
            &p[..p.len().min(4)]
        ));
    }
    if u16::from_be_bytes([p[2], p[3]]) as usize != p.len() {
        return Err("IPv4 total length does not match".into());
    }
    if p[9] != 17 {
        return Err(format!("protocol {} is not UDP", p[9]));
    }
    if inet_checksum(&p[..20]) != 0 {
        return Err("bad IPv4 header checksum".into());
    }
    if u16::from_be_bytes([p[24], p[25]]) as usize != p.len() - 20 {
        return Err("UDP length does not match".into());
    }
    let src: [u8; 4] = p[12..16].try_into().unwrap();
    let dst: [u8; 4] = p[16..20].try_into().unwrap();
    if u16::from_be_bytes([p[26], p[27]]) != 0 && udp_checksum(src, dst, &p[20..]) != 0 {
        return Err("bad UDP checksum".into());
    }
    Ok(Udp {
        src: (src, u16::from_be_bytes([p[20], p[21]])),
        dst: (dst, u16::from_be_bytes([p[22], p[23]])),
        payload: p[28..].to_vec(),
    })
}

/// Payload of `n` bytes, different for every `n`.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (n * 31 + i * 7) as u8).collect()
}

/// Request asking the original-style connector for a reply of `n` payload bytes.
fn reply_size_request(n: usize) -> Vec<u8> {
    [&b"R"[..], &(n as u16).to_be_bytes()].concat()
}

// ---------------------------------------------------------------------------------
// Original-style QUIC client: agent or connector.

fn original_client_config(cert: &Path, key: &Path, ca: &Path) -> quiche::Config {
    let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
    c.set_application_protos(&[ALPN]).unwrap();
    c.load_cert_chain_from_pem_file(cert.to_str().unwrap())
        .unwrap();
    c.load_priv_key_from_pem_file(key.to_str().unwrap())
        .unwrap();
    c.load_verify_locations_from_file(ca.to_str().unwrap())
        .unwrap();
    c.verify_peer(true);
    original_transport(&mut c);
    c
}

/// The original's transport settings. It opens no streams and allows none.
fn original_transport(c: &mut quiche::Config) {
    c.set_max_idle_timeout(30_000);
    c.set_max_recv_udp_payload_size(1350);
    c.set_max_send_udp_payload_size(1350);
    c.set_initial_max_data(10_000_000);
    c.enable_dgram(true, 4096, 4096);
}

struct Peer {
    socket: UdpSocket,
    conn: quiche::Connection,
    local: SocketAddr,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl Peer {
    fn connect(server: SocketAddr, cert: &Path, key: &Path, ca: &Path) -> Peer {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let local = socket.local_addr().unwrap();
        let mut cfg = original_client_config(cert, key, ca);
        let mut scid = [0u8; 16];
        let seed = std::process::id() as u64 ^ local.port() as u64;
        for (i, b) in scid.iter_mut().enumerate() {
            *b = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (i % 8 * 8)) as u8 ^ i as u8;
        }
        let scid = quiche::ConnectionId::from_ref(&scid);
        let conn =
            quiche::connect(Some("intermediate.ztna"), &scid, local, server, &mut cfg).unwrap();
        let mut p = Peer {
            socket,
            conn,
            local,
            buf: vec![0u8; 65535],
            out: vec![0u8; 1350],
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !p.conn.is_established() {
            assert!(
                Instant::now() < deadline && !p.conn.is_closed(),
                "original-style client: no handshake ({:?})",
                p.conn.peer_error()
            );
            p.pump(Duration::from_millis(50));
        }
        p
    }

    fn flush(&mut self) {
        loop {
            match self.conn.send(&mut self.out) {
                Ok((n, info)) => {
                    let _ = self.socket.send_to(&self.out[..n], info.to);
                }
                Err(quiche::Error::Done) => break,
                Err(e) => panic!("quic send: {e}"),
            }
        }
    }

    /// Sends what is due, then waits up to `wait` for packets and reads all there are.
    fn pump(&mut self, wait: Duration) {
        self.flush();
        let wait = self
            .conn
            .timeout()
            .map_or(wait, |t| t.min(wait))
            .max(Duration::from_millis(1));
        self.socket.set_read_timeout(Some(wait)).unwrap();
        let mut first = true;
        loop {
            if !first {
                self.socket.set_nonblocking(true).unwrap();
            }
            let r = self.socket.recv_from(&mut self.buf);
            if !first {
                self.socket.set_nonblocking(false).unwrap();
            }
            first = false;
            let Ok((n, from)) = r else { break };
            let info = quiche::RecvInfo {
                from,
                to: self.local,
            };
            let _ = self.conn.recv(&mut self.buf[..n], info);
        }
        if self
            .conn
            .timeout_instant()
            .is_some_and(|t| t <= Instant::now())
        {
            self.conn.on_timeout();
        }
        self.flush();
    }

    fn send(&mut self, dgram: &[u8]) {
        self.conn
            .dgram_send(dgram)
            .unwrap_or_else(|e| panic!("DATAGRAM of {} bytes: {e}", dgram.len()));
        self.flush();
    }

    fn max_dgram(&self) -> usize {
        self.conn.dgram_max_writable_len().expect("DATAGRAMs on")
    }

    /// Next DATAGRAM, or `None` at `deadline`.
    fn next_dgram(&mut self, deadline: Instant) -> Option<Vec<u8>> {
        let mut b = [0u8; 2048];
        loop {
            if let Ok(n) = self.conn.dgram_recv(&mut b) {
                return Some(b[..n].to_vec());
            }
            assert!(!self.conn.is_closed(), "connection closed");
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            self.pump(deadline - now);
        }
    }

    /// Next DATAGRAM that is not a QAD (which the server may repeat at any time).
    fn next_non_qad(&mut self, deadline: Instant) -> Option<Vec<u8>> {
        loop {
            let d = self.next_dgram(deadline)?;
            if !matches!(d.first(), Some(0x01 | 0x02)) {
                return Some(d);
            }
        }
    }

    /// Sends a registration and returns the answer.
    fn register(&mut self, msg: &[u8]) -> Vec<u8> {
        self.send(msg);
        self.next_non_qad(Instant::now() + Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no answer to registration {msg:02x?}"))
    }
}

/// An original-style agent: sends raw IP or `0x2F`, reads only raw IP.
struct OriginalAgent {
    peer: Peer,
    wrap: bool,
    sport: u16,
}

// ---------------------------------------------------------------------------------
// Original-style connector: registers with `11`, reads raw IP only ("non-IPv4 packet,
// dropping" otherwise), answers UDP by echo (or, for `R n`, with n bytes) as raw IP.

#[derive(Default)]
struct OriginalConnectorStats {
    registered: AtomicBool,
    /// Its connection's DATAGRAM limit, once connected.
    max_dgram: AtomicU64,
    received_ip: AtomicU64,
    /// Anything that is not a raw IPv4 packet (e.g. a `0x2F` frame).
    received_non_ip: AtomicU64,
    replied: AtomicU64,
    send_failed: AtomicU64,
}

struct OriginalConnector {
    stats: Arc<OriginalConnectorStats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl OriginalConnector {
    fn spawn(server: SocketAddr, pki: &DevPki) -> OriginalConnector {
        let stats = Arc::new(OriginalConnectorStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (stats.clone(), stop.clone());
        let (cert, key, ca) = (
            pki.connector_cert.clone(),
            pki.connector_key.clone(),
            pki.ca_cert.clone(),
        );
        let thread = std::thread::spawn(move || {
            let mut peer = Peer::connect(server, &cert, &key, &ca);
            s.max_dgram.store(peer.max_dgram() as u64, Ordering::SeqCst);
            peer.send(&register_connector(SERVICE.as_bytes()));
            while !st.load(Ordering::SeqCst) {
                let Some(d) = peer.next_dgram(Instant::now() + Duration::from_millis(20)) else {
                    continue;
                };
                if d == ack(SERVICE.as_bytes()) {
                    s.registered.store(true, Ordering::SeqCst);
                    continue;
                }
                if d[0] == 0x01 {
                    continue;
                }
                let Ok(req) = parse_ipv4_udp(&d) else {
                    s.received_non_ip.fetch_add(1, Ordering::SeqCst);
                    continue;
                };
                s.received_ip.fetch_add(1, Ordering::SeqCst);
                let payload = match req.payload.as_slice() {
                    [b'R', hi, lo] => pattern(u16::from_be_bytes([*hi, *lo]) as usize),
                    p => p.to_vec(),
                };
                let reply = ipv4_udp(req.dst, req.src, &payload);
                match peer.conn.dgram_send(&reply) {
                    Ok(()) => s.replied.fetch_add(1, Ordering::SeqCst),
                    Err(_) => s.send_failed.fetch_add(1, Ordering::SeqCst),
                };
                peer.flush();
            }
            let _ = peer.conn.close(true, 0, b"bye");
            peer.flush();
        });
        let c = OriginalConnector {
            stats,
            stop,
            thread: Some(thread),
        };
        poll_until(
            "original-style connector registered",
            Duration::from_secs(10),
            || c.stats.registered.load(Ordering::SeqCst),
        );
        c
    }
}

impl Drop for OriginalConnector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------
// Original-style intermediate, minimal: QAD, registration (every well-formed one is
// accepted: authorization is not what it stands in for), and the relay as the
// original does it: raw IP to connectors and agents, `0x2F` accepted from agents
// only; replies go to the agent whose flow they answer.

#[derive(Default)]
struct OriginalIntermediateStats {
    relayed_to_connector: AtomicU64,
    relayed_to_agent: AtomicU64,
    /// `0x2F` from a connector: the original does not accept it.
    dropped_service_packet_from_connector: AtomicU64,
    dropped_other: AtomicU64,
}

struct OriginalIntermediate {
    addr: SocketAddr,
    stats: Arc<OriginalIntermediateStats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct ServerConn {
    conn: quiche::Connection,
    peer: SocketAddr,
    qad_sent: bool,
    agent_of: Vec<Vec<u8>>,
    connector_of: Vec<Vec<u8>>,
}

type FlowKey = ([u8; 4], u16, [u8; 4], u16);

impl OriginalIntermediate {
    fn spawn(pki: &DevPki) -> OriginalIntermediate {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let mut cfg = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
        cfg.set_application_protos(&[ALPN]).unwrap();
        cfg.load_cert_chain_from_pem_file(pki.server_cert.to_str().unwrap())
            .unwrap();
        cfg.load_priv_key_from_pem_file(pki.server_key.to_str().unwrap())
            .unwrap();
        cfg.load_verify_locations_from_file(pki.ca_cert.to_str().unwrap())
            .unwrap();
        cfg.verify_peer(true);
        original_transport(&mut cfg);
        let stats = Arc::new(OriginalIntermediateStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (stats.clone(), stop.clone());
        let thread = std::thread::spawn(move || original_intermediate(socket, cfg, &s, &st));
        OriginalIntermediate {
            addr,
            stats,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for OriginalIntermediate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn udp_key(p: &[u8]) -> Option<FlowKey> {
    let ihl = usize::from(p.first()? & 0x0f) * 4;
    if p.first()? >> 4 != 4 || p.len() < ihl + 8 || p[9] != 17 {
        return None;
    }
    Some((
        p[12..16].try_into().ok()?,
        u16::from_be_bytes([p[ihl], p[ihl + 1]]),
        p[16..20].try_into().ok()?,
        u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]),
    ))
}

fn original_intermediate(
    socket: UdpSocket,
    mut cfg: quiche::Config,
    stats: &OriginalIntermediateStats,
    stop: &AtomicBool,
) {
    let local = socket.local_addr().unwrap();
    let mut conns: HashMap<usize, ServerConn> = HashMap::new();
    let mut ids: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut connectors: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut flows: HashMap<FlowKey, usize> = HashMap::new();
    let mut next = 1usize;
    let mut buf = vec![0u8; 65535];
    let mut out = vec![0u8; 1350];
    while !stop.load(Ordering::SeqCst) {
        let wait = conns
            .values()
            .filter_map(|c| c.conn.timeout())
            .min()
            .unwrap_or(Duration::from_millis(20))
            .clamp(Duration::from_millis(1), Duration::from_millis(20));
        socket.set_read_timeout(Some(wait)).unwrap();
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let pkt = &mut buf[..n];
            if let Ok(hdr) = quiche::Header::from_slice(pkt, 16) {
                let id = match ids.get(hdr.dcid.as_ref()) {
                    Some(&id) => Some(id),
                    None if hdr.ty == quiche::Type::Initial => {
                        let mut scid = [0x0bu8; 16];
                        scid[..8].copy_from_slice(&(next as u64).to_be_bytes());
                        let scid_ref = quiche::ConnectionId::from_ref(&scid);
                        match quiche::accept(&scid_ref, None, local, from, &mut cfg) {
                            Ok(conn) => {
                                ids.insert(scid.to_vec(), next);
                                ids.insert(hdr.dcid.as_ref().to_vec(), next);
                                conns.insert(
                                    next,
                                    ServerConn {
                                        conn,
                                        peer: from,
                                        qad_sent: false,
                                        agent_of: Vec::new(),
                                        connector_of: Vec::new(),
                                    },
                                );
                                next += 1;
                                Some(next - 1)
                            }
                            Err(_) => None,
                        }
                    }
                    None => None,
                };
                if let Some(c) = id.and_then(|id| conns.get_mut(&id)) {
                    let _ = c.conn.recv(pkt, quiche::RecvInfo { from, to: local });
                }
            }
        }
        let now = Instant::now();
        let keys: Vec<usize> = conns.keys().copied().collect();
        for id in keys {
            let c = conns.get_mut(&id).unwrap();
            if c.conn.timeout_instant().is_some_and(|t| t <= now) {
                c.conn.on_timeout();
            }
            if !c.conn.is_established() {
                continue;
            }
            if !c.qad_sent && c.conn.dgram_send(&qad_v4(c.peer)).is_ok() {
                c.qad_sent = true;
            }
            let mut d = [0u8; 2048];
            let mut got = Vec::new();
            while let Ok(n) = c.conn.dgram_recv(&mut d) {
                got.push(d[..n].to_vec());
            }
            for d in got {
                original_relay(id, &d, &mut conns, &mut connectors, &mut flows, stats);
            }
        }
        for c in conns.values_mut() {
            while let Ok((n, info)) = c.conn.send(&mut out) {
                let _ = socket.send_to(&out[..n], info.to);
            }
        }
        conns.retain(|_, c| !c.conn.is_closed());
    }
}

fn original_relay(
    from: usize,
    d: &[u8],
    conns: &mut HashMap<usize, ServerConn>,
    connectors: &mut HashMap<Vec<u8>, usize>,
    flows: &mut HashMap<FlowKey, usize>,
    stats: &OriginalIntermediateStats,
) {
    let drop_it = || {
        stats.dropped_other.fetch_add(1, Ordering::SeqCst);
    };
    let Some(&ty) = d.first() else {
        drop_it();
        return;
    };
    let c = conns.get_mut(&from).unwrap();
    match ty {
        0x10 | 0x11 => {
            let len = usize::from(*d.get(1).unwrap_or(&0));
            if len == 0 || d.len() != 2 + len {
                let _ = c.conn.dgram_send(&nack(0x01, &d[2.min(d.len())..]));
                return;
            }
            let id = d[2..].to_vec();
            if ty == 0x10 {
                c.agent_of.push(id.clone());
            } else {
                c.connector_of.push(id.clone());
                connectors.insert(id.clone(), from);
            }
            let _ = c.conn.dgram_send(&ack(&id));
        }
        0x2F => {
            if !c.connector_of.is_empty() {
                stats
                    .dropped_service_packet_from_connector
                    .fetch_add(1, Ordering::SeqCst);
                return;
            }
            let len = usize::from(*d.get(1).unwrap_or(&0));
            if len == 0 || d.len() < 2 + len {
                drop_it();
                return;
            }
            let id = d[2..2 + len].to_vec();
            if !c.agent_of.contains(&id) {
                drop_it();
                return;
            }
            to_connector(from, &id, &d[2 + len..], conns, connectors, flows, stats);
        }
        t if t >> 4 == 4 || t >> 4 == 6 => {
            if let Some(id) = c.agent_of.first().cloned() {
                to_connector(from, &id, d, conns, connectors, flows, stats);
            } else if !c.connector_of.is_empty() {
                let agent = udp_key(d).and_then(|(s, sp, dst, dp)| flows.get(&(dst, dp, s, sp)));
                let sent = agent
                    .and_then(|a| conns.get_mut(a))
                    .is_some_and(|a| a.conn.dgram_send(d).is_ok());
                if sent {
                    stats.relayed_to_agent.fetch_add(1, Ordering::SeqCst);
                } else {
                    drop_it();
                }
            } else {
                drop_it();
            }
        }
        _ => drop_it(),
    }
}

fn to_connector(
    agent: usize,
    service: &[u8],
    ip: &[u8],
    conns: &mut HashMap<usize, ServerConn>,
    connectors: &HashMap<Vec<u8>, usize>,
    flows: &mut HashMap<FlowKey, usize>,
    stats: &OriginalIntermediateStats,
) {
    if let Some(k) = udp_key(ip) {
        flows.insert(k, agent);
    }
    let sent = connectors
        .get(service)
        .and_then(|c| conns.get_mut(c))
        .is_some_and(|c| c.conn.dgram_send(ip).is_ok());
    if sent {
        stats.relayed_to_connector.fetch_add(1, Ordering::SeqCst);
    } else {
        stats.dropped_other.fetch_add(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------
// ztna side.

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ztna-compat-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pki(name: &str) -> DevPki {
    if std::env::var_os("ZTNA_TEST_LOG").is_some() {
        ztna_userspace::logging::init("info");
    }
    identity::generate_dev_pki(&temp_dir(name), &[SERVICE.to_string()]).unwrap()
}

fn ztna_intermediate(pki: &DevPki) -> IntermediateHandle {
    let cfg = IntermediateConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        pki.server_cert.clone(),
        pki.server_key.clone(),
        Some(pki.ca_cert.clone()),
    );
    intermediate::spawn(cfg).unwrap()
}

fn client_cfg(pki: &DevPki, server: SocketAddr, role: Role) -> ClientConfig {
    let (cert, key) = match role {
        Role::Agent => (&pki.agent_cert, &pki.agent_key),
        Role::Connector => (&pki.connector_cert, &pki.connector_key),
    };
    let mut c = ClientConfig::new(server, role, vec![SERVICE.to_string()]);
    c.ca_file = Some(pki.ca_cert.to_str().unwrap().into());
    c.cert_file = Some(cert.to_str().unwrap().into());
    c.key_file = Some(key.to_str().unwrap().into());
    c
}

fn ztna_connector(
    pki: &DevPki,
    server: SocketAddr,
    backend: SocketAddr,
) -> connector::ConnectorHandle {
    let spec = ServiceSpec {
        id: SERVICE.into(),
        backend: backend.into(),
        prefixes: vec![std::net::IpAddr::from(VIP).into()],
    };
    let c = connector::spawn(client_cfg(pki, server, Role::Connector), vec![spec]).unwrap();
    poll_until("ztna connector registered", Duration::from_secs(10), || {
        c.stats.registrations.load(Ordering::Relaxed) > 0
    });
    c
}

/// A ztna agent on the datagram relay (no data connections).
fn ztna_agent(pki: &DevPki, server: SocketAddr) -> Agent {
    let mut a = Agent::connect_with(client_cfg(pki, server, Role::Agent), false).unwrap();
    a.wait_registered(Duration::from_secs(10)).unwrap();
    a
}

fn poll_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}

// ---------------------------------------------------------------------------------
// Pipelined exchange over every size.

trait Tunnel {
    /// Sends one UDP payload from the tunnel address to the service address.
    fn send_payload(&mut self, payload: &[u8]);
    /// The next reply's UDP payload (framing and addresses checked), or `None` at
    /// `deadline`.
    fn recv_payload(&mut self, deadline: Instant) -> Option<Vec<u8>>;
}

impl Tunnel for OriginalAgent {
    fn send_payload(&mut self, payload: &[u8]) {
        let ip = ipv4_udp((TUNNEL_IP, self.sport), (VIP, 7), payload);
        let dgram = if self.wrap {
            service_packet(SERVICE.as_bytes(), &ip)
        } else {
            ip
        };
        self.peer.send(&dgram);
    }

    fn recv_payload(&mut self, deadline: Instant) -> Option<Vec<u8>> {
        let d = self.peer.next_non_qad(deadline)?;
        // The original agent's packet tunnel takes only raw IP (first nibble 4 or 6).
        assert!(
            d[0] >> 4 == 4 || d[0] >> 4 == 6,
            "original-style agent got a DATAGRAM starting 0x{:02x} ({} bytes): it reads only raw IP",
            d[0],
            d.len()
        );
        let udp = parse_ipv4_udp(&d).unwrap();
        assert_eq!(udp.src, (VIP, 7), "reply source");
        assert_eq!(udp.dst, (TUNNEL_IP, self.sport), "reply destination");
        Some(udp.payload)
    }
}

/// A ztna agent; counts how replies were framed.
struct ZtnaAgent {
    agent: Agent,
    sport: u16,
    wrapped: u64,
    raw: u64,
}

impl Tunnel for ZtnaAgent {
    fn send_payload(&mut self, payload: &[u8]) {
        let ip = ipv4_udp((TUNNEL_IP, self.sport), (VIP, 7), payload);
        self.agent.send_packet(SERVICE, &ip).unwrap();
    }

    fn recv_payload(&mut self, deadline: Instant) -> Option<Vec<u8>> {
        let left = deadline.saturating_duration_since(Instant::now());
        let pkt = self.agent.recv_packet(left).unwrap()?;
        let stats = self.agent.client().stats();
        self.wrapped = stats.service_packets_in;
        self.raw = stats.raw_packets_in;
        let udp = parse_ipv4_udp(&pkt).unwrap();
        assert_eq!(udp.src, (VIP, 7), "reply source");
        assert_eq!(udp.dst, (TUNNEL_IP, self.sport), "reply destination");
        Some(udp.payload)
    }
}

/// For every `n` in `sizes`, sends `request(n)` and waits for a reply whose payload
/// is `pattern`-exact and `reply_len(n)` long. A few requests are in flight at once;
/// a request without a reply after a second is sent again (DATAGRAMs are unreliable),
/// at most 5 times, so a packet that is always dropped fails the test.
fn exchange_sizes(
    t: &mut dyn Tunnel,
    sizes: std::ops::RangeInclusive<usize>,
    request: impl Fn(usize) -> Vec<u8>,
    expected_reply: impl Fn(usize) -> Vec<u8>,
) {
    const WINDOW: usize = 16;
    // reply length → (size, sent at, attempts)
    let mut pending: BTreeMap<usize, (usize, Instant, u32)> = BTreeMap::new();
    let mut next = *sizes.start();
    let end = *sizes.end();
    while next <= end || !pending.is_empty() {
        while pending.len() < WINDOW && next <= end {
            t.send_payload(&request(next));
            pending.insert(expected_reply(next).len(), (next, Instant::now(), 1));
            next += 1;
        }
        let mut again = Vec::new();
        for (_, (n, at, tries)) in pending.iter_mut() {
            if at.elapsed() > Duration::from_secs(1) {
                assert!(*tries < 5, "size {n}: no reply after {tries} attempts");
                *tries += 1;
                *at = Instant::now();
                again.push(*n);
            }
        }
        for n in again {
            t.send_payload(&request(n));
        }
        if let Some(reply) = t.recv_payload(Instant::now() + Duration::from_millis(50))
            && let Some(&(n, _, _)) = pending.get(&reply.len())
        {
            assert_eq!(reply, expected_reply(n), "size {n}: reply not byte-exact");
            pending.remove(&reply.len());
        }
    }
}

fn echo_sizes(t: &mut dyn Tunnel, sizes: std::ops::RangeInclusive<usize>) {
    exchange_sizes(t, sizes, pattern, pattern);
}

// ---------------------------------------------------------------------------------
// Tests.

#[test]
fn original_agent_registration_edge_cases_get_the_documented_answers() {
    let pki = pki("registration");
    let inter = ztna_intermediate(&pki);
    let mut p = Peer::connect(inter.addr, &pki.agent_cert, &pki.agent_key, &pki.ca_cert);
    // QAD first: 01 ip port, the address the intermediate sees.
    let qad = p
        .next_dgram(Instant::now() + Duration::from_secs(5))
        .expect("QAD");
    assert_eq!(qad, qad_v4(p.local));

    let id = SERVICE.as_bytes();
    let long = [b'a'; 255];
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("length 0", vec![0x10, 0x00], nack(0x01, b"")),
        ("no length byte", vec![0x10], nack(0x01, b"")),
        (
            "invalid UTF-8",
            vec![0x10, 2, 0xff, 0xfe],
            nack(0x01, &[0xff, 0xfe]),
        ),
        ("truncated UTF-8", vec![0x10, 1, 0xc3], nack(0x01, &[0xc3])),
        (
            "trailing byte",
            [register_agent(id), vec![0x00]].concat(),
            nack(0x01, id),
        ),
        ("length past the end", vec![0x10, 9, b'a'], nack(0x01, b"a")),
        (
            "bad characters",
            register_agent(b"bad id!"),
            nack(0x01, b"bad id!"),
        ),
        // 255 bytes is the longest id; the certificate does not cover it.
        ("255-byte id", register_agent(&long), nack(0x02, &long)),
        (
            "agent certificate as connector",
            register_connector(id),
            nack(0x02, id),
        ),
        ("valid", register_agent(id), ack(id)),
    ];
    for (what, msg, want) in &cases {
        let got = p.register(msg);
        assert_eq!(&got, want, "{what}: sent {msg:02x?}");
    }
    // The connection survived all of it.
    assert!(!p.conn.is_closed());

    // A 255-byte id is accepted where the certificate covers it (`agent.*.ztna`).
    let (cert, key) = identity::issue_leaf(
        &pki.ca_cert,
        &pki.ca_key,
        &pki.dir,
        "any-service-agent",
        &["agent.*.ztna".into()],
    )
    .unwrap();
    let mut any = Peer::connect(inter.addr, &cert, &key, &pki.ca_cert);
    assert_eq!(any.register(&register_agent(&long)), ack(&long));
    assert_eq!(any.register(&register_connector(&long)), nack(0x02, &long));

    let s = &inter.stats;
    assert_eq!(get(&s.registrations_malformed), 6);
    assert_eq!(get(&s.registrations_refused), 10);
    assert_eq!(get(&s.registrations_accepted), 2);
}

#[test]
fn original_agent_with_ztna_connector_every_size_both_framings() {
    let pki = pki("orig-agent");
    let echo = EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
    let inter = ztna_intermediate(&pki);
    let _conn = ztna_connector(&pki, inter.addr, echo.addr);
    let mut peer = Peer::connect(inter.addr, &pki.agent_cert, &pki.agent_key, &pki.ca_cert);
    assert_eq!(
        peer.register(&register_agent(SERVICE.as_bytes())),
        ack(SERVICE.as_bytes())
    );
    let max = peer.max_dgram();
    assert!(max > 1250, "DATAGRAM limit {max}");
    // The original agent sends nothing bigger than its connection takes.
    assert!(peer.conn.dgram_send(&vec![0x45; max + 1]).is_err());
    let mut agent = OriginalAgent {
        peer,
        wrap: false,
        sport: 40000,
    };
    // Raw IP up to the full DATAGRAM: the intermediate must not grow it by 14 bytes.
    echo_sizes(&mut agent, 0..=max - IPV4_UDP);
    // 0x2F up to the full DATAGRAM; replies come back raw.
    agent.wrap = true;
    agent.sport = 40001;
    echo_sizes(&mut agent, 0..=max - IPV4_UDP - 2 - SERVICE.len());
    let s = &inter.stats;
    assert_eq!(get(&s.dropped_send_failed), 0);
    assert_eq!(get(&s.dropped_too_large), 0);
    let n = (2 * (max - IPV4_UDP) - 2 - SERVICE.len() + 2) as u64;
    assert!(get(&s.relayed_to_agent) >= n, "{}", s.snapshot());
    // ztna's connector negotiated 0x2F; the packets too big for it came raw.
    assert_eq!(get(&s.capabilities_received), 1);
    assert!(get(&s.relayed_raw_to_fit) >= (2 + SERVICE.len()) as u64);
}

#[test]
fn original_agent_with_original_connector_through_ztna_every_size() {
    let pki = pki("orig-both");
    let inter = ztna_intermediate(&pki);
    let conn = OriginalConnector::spawn(inter.addr, &pki);
    let mut peer = Peer::connect(inter.addr, &pki.agent_cert, &pki.agent_key, &pki.ca_cert);
    assert_eq!(
        peer.register(&register_agent(SERVICE.as_bytes())),
        ack(SERVICE.as_bytes())
    );
    let max = peer.max_dgram();
    let mut agent = OriginalAgent {
        peer,
        wrap: false,
        sport: 40010,
    };
    echo_sizes(&mut agent, 0..=max - IPV4_UDP);
    agent.wrap = true;
    agent.sport = 40011;
    echo_sizes(&mut agent, 0..=max - IPV4_UDP - 2 - SERVICE.len());
    // The original connector saw raw IPv4 only, never a 0x2F frame.
    assert_eq!(get(&conn.stats.received_non_ip), 0);
    assert!(get(&conn.stats.received_ip) >= (2 * (max - IPV4_UDP) - SERVICE.len()) as u64);
    assert_eq!(get(&conn.stats.send_failed), 0);
    assert_eq!(get(&inter.stats.dropped_send_failed), 0);
}

#[test]
fn ztna_agent_with_original_connector_both_directions_up_to_the_limit() {
    let pki = pki("ztna-agent-orig-conn");
    let inter = ztna_intermediate(&pki);
    let conn = OriginalConnector::spawn(inter.addr, &pki);
    let agent = ztna_agent(&pki, inter.addr);
    let agent_max = agent.max_udp_payload(SERVICE, false).unwrap();
    let mut a = ZtnaAgent {
        agent,
        sport: 40020,
        wrapped: 0,
        raw: 0,
    };
    // Agent → connector at every size the agent can send (it sends 0x2F).
    echo_sizes(&mut a, 0..=agent_max);
    assert_eq!(
        get(&conn.stats.received_non_ip),
        0,
        "the original connector got 0x2F"
    );
    // The ztna agent negotiated 0x2F, so replies that fit come wrapped.
    assert_eq!(a.raw, 0);
    assert!(a.wrapped > agent_max as u64);
    // Connector → agent up to the connector's own limit: what does not fit 0x2F
    // towards the agent comes raw instead of being dropped.
    let conn_max = get(&conn.stats.max_dgram) as usize - IPV4_UDP;
    assert!(conn_max > agent_max);
    exchange_sizes(
        &mut a,
        agent_max - 16..=conn_max,
        reply_size_request,
        pattern,
    );
    assert_eq!(
        a.agent.client().server_capabilities(),
        Some(0x0000_0001),
        "ztna's intermediate answers CAPABILITIES with SERVICE_PACKETS"
    );
    assert!(a.raw > 0, "the largest replies came raw");
    assert!(get(&inter.stats.relayed_raw_to_fit) >= a.raw);
    assert_eq!(get(&conn.stats.send_failed), 0);
    assert_eq!(get(&inter.stats.dropped_send_failed), 0);
}

#[test]
fn ztna_connector_behind_original_intermediate_replies_raw() {
    let pki = pki("orig-inter");
    let echo = EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
    let inter = OriginalIntermediate::spawn(&pki);
    let conn = ztna_connector(&pki, inter.addr, echo.addr);
    // The original agent, both framings, every size.
    let mut peer = Peer::connect(inter.addr, &pki.agent_cert, &pki.agent_key, &pki.ca_cert);
    assert_eq!(
        peer.register(&register_agent(SERVICE.as_bytes())),
        ack(SERVICE.as_bytes())
    );
    let max = peer.max_dgram();
    let mut agent = OriginalAgent {
        peer,
        wrap: false,
        sport: 40030,
    };
    echo_sizes(&mut agent, 0..=max - IPV4_UDP);
    agent.wrap = true;
    agent.sport = 40031;
    echo_sizes(&mut agent, 0..=max - IPV4_UDP - 2 - SERVICE.len());
    // ztna's agent through the original intermediate, to ztna's connector. Its data
    // path is on: the session request it sends is never answered, so it stays on the
    // datagram relay.
    let mut full = Agent::connect(client_cfg(&pki, inter.addr, Role::Agent)).unwrap();
    full.wait_registered(Duration::from_secs(10)).unwrap();
    let mut a = ZtnaAgent {
        agent: full,
        sport: 40032,
        wrapped: 0,
        raw: 0,
    };
    let agent_max = a.agent.max_udp_payload(SERVICE, false).unwrap();
    echo_sizes(&mut a, agent_max - 16..=agent_max);
    echo_sizes(&mut a, 0..=8);
    assert_eq!(a.wrapped, 0, "the original intermediate relays raw IP");
    assert_eq!(a.agent.client().server_capabilities(), None);
    assert_eq!(
        a.agent.path(SERVICE),
        ztna_userspace::agent::PathKind::Datagram
    );
    let s = &inter.stats;
    assert_eq!(
        get(&s.dropped_service_packet_from_connector),
        0,
        "ztna's connector sent 0x2F, which the original accepts from agents only"
    );
    assert_eq!(get(&s.dropped_other), 0);
    assert_eq!(get(&conn.stats.dropped_send_failed), 0);
}

#[test]
fn ztna_agent_and_ztna_connector_negotiate_service_packets() {
    let pki = pki("ztna-pair");
    let echo = EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
    let inter = ztna_intermediate(&pki);
    let _conn = ztna_connector(&pki, inter.addr, echo.addr);
    let agent = ztna_agent(&pki, inter.addr);
    let agent_max = agent.max_udp_payload(SERVICE, false).unwrap();
    let mut a = ZtnaAgent {
        agent,
        sport: 40040,
        wrapped: 0,
        raw: 0,
    };
    echo_sizes(&mut a, 0..=agent_max);
    // Both sides announced SERVICE_PACKETS: everything fits wrapped, so nothing is raw.
    assert_eq!(a.raw, 0);
    assert!(a.wrapped > agent_max as u64);
    let s = &inter.stats;
    assert_eq!(get(&s.capabilities_received), 2);
    assert_eq!(get(&s.relayed_raw_to_fit), 0);
    assert_eq!(get(&s.dropped_send_failed), 0);
}

#[test]
fn ztna_connector_behind_original_intermediate_routes_raw_ip_by_virtual_address() {
    const OTHER: &str = "other-service";
    const OTHER_VIP: [u8; 4] = [10, 100, 0, 2];
    let pki = pki("orig-inter-two");
    let echo_a = EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
    let echo_b = EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
    let inter = OriginalIntermediate::spawn(&pki);
    let specs = vec![
        ServiceSpec {
            id: SERVICE.into(),
            backend: echo_a.addr.into(),
            prefixes: vec![std::net::IpAddr::from(VIP).into()],
        },
        ServiceSpec {
            id: OTHER.into(),
            backend: echo_b.addr.into(),
            prefixes: vec![std::net::IpAddr::from(OTHER_VIP).into()],
        },
    ];
    let conn = connector::spawn(client_cfg(&pki, inter.addr, Role::Connector), specs).unwrap();
    poll_until("both services registered", Duration::from_secs(10), || {
        conn.stats.registrations.load(Ordering::Relaxed) >= 2
    });
    let mut p = Peer::connect(inter.addr, &pki.agent_cert, &pki.agent_key, &pki.ca_cert);
    for id in [SERVICE, OTHER] {
        assert_eq!(
            p.register(&register_agent(id.as_bytes())),
            ack(id.as_bytes())
        );
    }
    // The original intermediate strips 0x2F: the connector sees raw IP and must pick
    // the service by destination address.
    for (id, vip, echo) in [(OTHER, OTHER_VIP, &echo_b), (SERVICE, VIP, &echo_a)] {
        let before = get(&echo.echoed);
        let ip = ipv4_udp((TUNNEL_IP, 40050), (vip, 7), b"which service?");
        let mut reply = None;
        for _ in 0..5 {
            p.send(&service_packet(id.as_bytes(), &ip));
            reply = p.next_non_qad(Instant::now() + Duration::from_secs(1));
            if reply.is_some() {
                break;
            }
        }
        let udp = parse_ipv4_udp(&reply.expect("reply")).unwrap();
        assert_eq!(udp.src, (vip, 7));
        assert_eq!(udp.payload, b"which service?");
        assert!(get(&echo.echoed) > before, "{id} reached its own backend");
    }
    assert_eq!(get(&conn.stats.dropped_unknown_service), 0);
    assert_eq!(get(&inter.stats.dropped_service_packet_from_connector), 0);
}

#[test]
fn ztna_agent_behind_original_intermediate_with_original_connector() {
    let pki = pki("orig-inter-orig-conn");
    let inter = OriginalIntermediate::spawn(&pki);
    let conn = OriginalConnector::spawn(inter.addr, &pki);
    let mut a = ZtnaAgent {
        agent: ztna_agent(&pki, inter.addr),
        sport: 40060,
        wrapped: 0,
        raw: 0,
    };
    let agent_max = a.agent.max_udp_payload(SERVICE, false).unwrap();
    echo_sizes(&mut a, 0..=8);
    echo_sizes(&mut a, agent_max - 16..=agent_max);
    // Replies up to the original connector's limit, raw all the way.
    let conn_max = get(&conn.stats.max_dgram) as usize - IPV4_UDP;
    exchange_sizes(
        &mut a,
        conn_max - 16..=conn_max,
        reply_size_request,
        pattern,
    );
    assert_eq!(a.wrapped, 0);
    assert_eq!(get(&conn.stats.received_non_ip), 0);
    assert_eq!(get(&inter.stats.dropped_other), 0);
}
