//! The data connection: QUIC end to end between an agent (client) and a connector
//! (server), mutually authenticated, carrying tunneled IP packets as DATAGRAMs (each
//! DATAGRAM payload is one raw IPv4/IPv6 packet; the connection belongs to one
//! service, so no service prefix is needed). ALPN `ztna-data-v1`.
//!
//! It runs over the forwarded relay: the agent sends to the intermediate's UDP port
//! with source CID = its relay CID and DCID = the connector's relay CID; the relay
//! rewrites only IP/UDP headers and never holds these keys. Both CIDs are fixed for
//! the connection's life: neither side issues further CIDs, since only the two
//! registered ones are in the relay's forwarding table.
//!
//! Sans-IO like [`crate::ControlClient`]: bytes in, bytes out, `now` passed in.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ztna_common::frames::Cid;

use crate::{ClientError, app_error};

pub const DATA_ALPN: &[u8] = b"ztna-data-v1";

/// TLS material and timers for data connections.
#[derive(Clone, Debug)]
pub struct DataConfig {
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
    pub idle_timeout: Duration,
    pub keepalive: Duration,
}

impl DataConfig {
    /// The TLS files and timers of a control-connection config; `None` without a
    /// CA, certificate and key (data connections need mutual authentication).
    pub fn from_client(cfg: &crate::ClientConfig) -> Option<Self> {
        Some(DataConfig {
            ca_file: cfg.ca_file.clone()?,
            cert_file: cfg.cert_file.clone()?,
            key_file: cfg.key_file.clone()?,
            idle_timeout: cfg.idle_timeout,
            keepalive: cfg.keepalive,
        })
    }
}

/// Builds the quiche config for data connections (client or server side).
pub fn quic_config(cfg: &DataConfig) -> Result<quiche::Config, ClientError> {
    let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
    c.set_application_protos(&[DATA_ALPN])?;
    use crate::tls_files::{PemKind, load};
    load(&mut c, PemKind::CaBundle, &cfg.ca_file)?;
    load(&mut c, PemKind::CertChain, &cfg.cert_file)?;
    load(&mut c, PemKind::PrivateKey, &cfg.key_file)?;
    // Both sides present and verify certificates; SANs are checked after the handshake.
    c.verify_peer(true);
    crate::apply_transport_defaults(&mut c, cfg.idle_timeout);
    // Only the registered relay CIDs are forwarded; a migration would need new ones.
    c.set_disable_active_migration(true);
    c.set_active_connection_id_limit(2);
    Ok(c)
}

pub struct DataConnection {
    conn: quiche::Connection,
    pub session_id: u32,
    pub service: String,
    /// Our relay CID (packets to us carry it as DCID).
    pub local_cid: Cid,
    pub peer_cid: Cid,
    local: SocketAddr,
    authorized: bool,
    started: Instant,
    handshake: Option<Duration>,
    last_send: Instant,
    last_recv: Instant,
    keepalive: Duration,
    dropped: u64,
}

impl DataConnection {
    /// Agent side: connect through the relay at `relay`.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        quic: &mut quiche::Config,
        keepalive: Duration,
        session_id: u32,
        service: &str,
        agent_cid: Cid,
        connector_cid: Cid,
        local: SocketAddr,
        relay: SocketAddr,
        now: Instant,
    ) -> Result<Self, ClientError> {
        let scid = quiche::ConnectionId::from_ref(&agent_cid);
        let dcid = quiche::ConnectionId::from_ref(&connector_cid);
        // No server name: the connector's identity is checked from its SANs after the
        // handshake, since `connector.*.ztna` wildcards are not DNS-style wildcards.
        let conn = quiche::connect_with_dcid(None, &scid, &dcid, local, relay, quic)?;
        Ok(Self::new(
            conn,
            session_id,
            service,
            agent_cid,
            connector_cid,
            local,
            keepalive,
            now,
        ))
    }

    /// Connector side: accept the agent's first Initial (already known to carry
    /// `connector_cid` as DCID).
    #[allow(clippy::too_many_arguments)]
    pub fn accept(
        quic: &mut quiche::Config,
        keepalive: Duration,
        session_id: u32,
        service: &str,
        connector_cid: Cid,
        agent_cid: Cid,
        local: SocketAddr,
        from: SocketAddr,
        now: Instant,
    ) -> Result<Self, ClientError> {
        let scid = quiche::ConnectionId::from_ref(&connector_cid);
        let conn = quiche::accept(&scid, None, local, from, quic)?;
        Ok(Self::new(
            conn,
            session_id,
            service,
            connector_cid,
            agent_cid,
            local,
            keepalive,
            now,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        conn: quiche::Connection,
        session_id: u32,
        service: &str,
        local_cid: Cid,
        peer_cid: Cid,
        local: SocketAddr,
        keepalive: Duration,
        now: Instant,
    ) -> Self {
        DataConnection {
            conn,
            session_id,
            service: service.to_string(),
            local_cid,
            peer_cid,
            local,
            authorized: false,
            started: now,
            handshake: None,
            last_send: now,
            last_recv: now,
            keepalive,
            dropped: 0,
        }
    }

    pub fn recv(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant) {
        let info = quiche::RecvInfo {
            from,
            to: self.local,
        };
        let processed = self.conn.stats().recv;
        match self.conn.recv(buf, info) {
            // quiche returns Ok for packets it dropped (undecryptable, duplicate), so
            // only progress in its own receive counter shows that the peer spoke:
            // junk anyone can send with our CID must not keep a dead path alive.
            Ok(_) if self.conn.stats().recv > processed => self.last_recv = now,
            Ok(_) => self.dropped += 1,
            Err(e) => tracing::debug!("data connection recv: {e}"),
        }
    }

    /// Packets quiche accepted without processing (undecryptable, duplicates).
    pub fn dropped_packets(&self) -> u64 {
        self.dropped
    }

    /// When the last packet from the peer was processed (authenticated by quiche).
    pub fn last_recv(&self) -> Instant {
        self.last_recv
    }

    /// The peer's address on the active path.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.conn
            .path_stats()
            .find(|p| p.active)
            .map(|p| p.peer_addr)
    }

    /// Agent side, direct path: connect straight to the connector at `peer` with
    /// fresh random CIDs (the relay never sees this connection).
    pub fn connect_direct(
        quic: &mut quiche::Config,
        keepalive: Duration,
        session_id: u32,
        service: &str,
        local: SocketAddr,
        peer: SocketAddr,
        now: Instant,
    ) -> Result<Self, ClientError> {
        let (scid, dcid) = (random_cid(), direct_dcid(session_id));
        let conn = quiche::connect_with_dcid(
            None,
            &quiche::ConnectionId::from_ref(&scid),
            &quiche::ConnectionId::from_ref(&dcid),
            local,
            peer,
            quic,
        )?;
        Ok(Self::new(
            conn, session_id, service, scid, dcid, local, keepalive, now,
        ))
    }

    pub fn poll_transmit(&mut self, out: &mut [u8], now: Instant) -> Option<(usize, SocketAddr)> {
        match self.conn.send(out) {
            Ok((n, info)) => {
                self.last_send = now;
                Some((n, info.to))
            }
            Err(quiche::Error::Done) => None,
            Err(e) => {
                tracing::debug!("data connection send: {e}");
                let _ = self.conn.close(false, 0x1, b"send failure");
                None
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let quic = self.conn.timeout_instant();
        if self.authorized {
            let k = self.last_send + self.keepalive;
            Some(quic.map_or(k, |q| q.min(k)))
        } else {
            quic
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.conn.timeout_instant().is_some_and(|t| t <= now) {
            self.conn.on_timeout();
        }
        if self.authorized && now >= self.last_send + self.keepalive {
            let _ = self.conn.send_ack_eliciting();
        }
    }

    /// Once established, checks the peer's certificate with `authorize` (DER in,
    /// `Ok(name)` or `Err(reason)` out) and closes the connection if it fails.
    /// Returns true when the connection became usable by this call.
    pub fn check_peer(
        &mut self,
        now: Instant,
        authorize: impl FnOnce(Option<&[u8]>) -> Result<String, String>,
    ) -> bool {
        if self.authorized || !self.conn.is_established() || self.conn.is_closed() {
            return false;
        }
        match authorize(self.conn.peer_cert()) {
            Ok(name) => {
                tracing::info!("data connection for {:?} up with {name}", self.service);
                self.authorized = true;
                self.handshake = Some(now.saturating_duration_since(self.started));
                true
            }
            Err(reason) => {
                tracing::warn!("data connection for {:?} refused: {reason}", self.service);
                let _ = self
                    .conn
                    .close(true, app_error::NOT_AUTHORIZED, reason.as_bytes());
                false
            }
        }
    }

    /// Established and the peer's certificate checked.
    pub fn is_usable(&self) -> bool {
        self.authorized && !self.conn.is_closed() && !self.conn.is_draining()
    }

    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    pub fn is_established(&self) -> bool {
        self.conn.is_established()
    }

    pub fn handshake_time(&self) -> Option<Duration> {
        self.handshake
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn close_reason(&self) -> String {
        crate::client::close_reason(&self.conn)
    }

    pub fn max_packet_len(&self) -> Option<usize> {
        self.conn.dgram_max_writable_len()
    }

    pub fn send_packet(&mut self, packet: &[u8]) -> Result<(), ClientError> {
        if !self.is_usable() {
            return Err(ClientError::NotConnected);
        }
        match self.conn.dgram_send(packet) {
            Ok(()) => Ok(()),
            Err(quiche::Error::Done) => Err(ClientError::QueueFull),
            Err(quiche::Error::BufferTooShort) => Err(ClientError::PacketTooLarge {
                size: packet.len(),
                max: self.conn.dgram_max_writable_len().unwrap_or(0),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The next received tunneled packet, written into `out`: its length. Nothing
    /// before the peer's certificate was checked.
    pub fn recv_packet(&mut self, out: &mut [u8]) -> Option<usize> {
        if !self.authorized {
            return None;
        }
        self.conn.dgram_recv(out).ok()
    }

    /// Calls `f` with every received tunneled packet.
    pub fn recv_packets(&mut self, mut f: impl FnMut(&[u8])) {
        if !self.authorized {
            return;
        }
        let mut buf = [0u8; 2048];
        while let Ok(n) = self.conn.dgram_recv(&mut buf) {
            f(&buf[..n]);
        }
    }

    pub fn close(&mut self, reason: &str) {
        let _ = self
            .conn
            .close(true, app_error::CLIENT_CLOSING, reason.as_bytes());
    }

    /// Smoothed RTT of the active path.
    pub fn stats_rtt(&self) -> Option<Duration> {
        self.conn.path_stats().find(|p| p.active).map(|p| p.rtt)
    }

    /// When we last sent a packet.
    pub fn last_send_instant(&self) -> Instant {
        self.last_send
    }

    pub fn stats(&self) -> quiche::Stats {
        self.conn.stats()
    }
}

/// True if `pkt` (a received UDP payload) is a QUIC packet whose DCID is `cid`.
/// Short headers carry the DCID right after the first byte; long headers after the
/// version and a length byte.
pub fn dcid_is(pkt: &[u8], cid: &Cid) -> bool {
    dcid_of(pkt).is_some_and(|d| d == cid)
}

/// The 8-byte relay-CID-sized DCID of a packet, if it has one.
pub fn dcid_of(pkt: &[u8]) -> Option<&[u8]> {
    let first = *pkt.first()?;
    if first & 0x80 == 0 {
        pkt.get(1..9)
    } else {
        if *pkt.get(5)? as usize != ztna_common::relay::RELAY_CID_LEN {
            return None;
        }
        pkt.get(6..14)
    }
}

/// The first DCID of a direct data connection: `random[1] | session_id[4 BE] |
/// random[3]`, first byte never the relay-CID marker. The connector tells by it
/// which session (so which service) a direct connection belongs to: one agent's
/// sessions for several services all pick the same pair of addresses.
pub fn direct_dcid(session_id: u32) -> Cid {
    let mut c = random_cid();
    c[1..5].copy_from_slice(&session_id.to_be_bytes());
    c
}

/// The session a direct connection's first DCID names (see [`direct_dcid`]).
pub fn session_of_direct_dcid(dcid: &Cid) -> u32 {
    u32::from_be_bytes([dcid[1], dcid[2], dcid[3], dcid[4]])
}

/// A random 8-byte CID that is not a relay CID.
pub fn random_cid() -> Cid {
    use ring::rand::SecureRandom;
    let mut c = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut c);
    if c[0] == ztna_common::relay::RELAY_CID_MARKER {
        c[0] ^= 1;
    }
    c
}
