//! Reliable control frames: relay-session setup and teardown.
//!
//! They travel on QUIC unidirectional streams of the control connection: each side
//! opens one stream (client: stream 2, intermediate: stream 3) and writes frames back
//! to back for the life of the connection. Every frame is
//!
//! ```text
//! len[2 BE] | type[1] | body[len - 1]            len counts type + body, 1..=65535
//! ```
//!
//! Bodies (integers big-endian; `cid` is a relay CID of 8 bytes; `svc` is
//! `svc_len[1] | id[svc_len]` as in the DATAGRAM messages):
//!
//! ```text
//! 0x01 SESSION_REQUEST  agent → intermediate      request_id[4] | svc
//! 0x02 SESSION_OFFER    intermediate → connector  session_id[4] | agent_cid[8] | connector_cid[8] | svc
//! 0x03 SESSION_ACCEPT   connector → intermediate  session_id[4]
//! 0x04 SESSION_READY    intermediate → agent      request_id[4] | session_id[4] | agent_cid[8] | connector_cid[8]
//! 0x05 SESSION_REFUSED  intermediate → agent      request_id[4] | status[1]
//! 0x06 SESSION_CLOSE    any direction             session_id[4] | reason[1]
//! 0x07 CANDIDATES       endpoint → intermediate → the session's other endpoint
//!                       session_id[4] | password[16] | count[1] | count × candidate
//!                       candidate = kind[1] (1 host, 2 server-reflexive) | family[1] (4|6)
//!                                   | ip[4|16] | port[2]
//! 0x08 SESSION_PATH     intermediate → endpoints  session_id[4] | forwarding[1]
//!                       (1 XDP native, 2 XDP generic, 3 userspace forwarder)
//! 0x09 CAPABILITIES     client → intermediate, intermediate → client
//!                       flags[4] | instance[8] (optional) | ignored[..]
//!                       bit 0 (0x0000_0001) SERVICE_PACKETS, see below; other bits
//!                       are reserved: senders set them to 0, receivers ignore them,
//!                       and bytes after the fields a receiver knows are ignored
//!                       (room for later fields). `instance`: a connector's random
//!                       ID, the same at every relay (see "Connector affinity")
//! 0x0A SERVICE_PREFIXES connector → intermediate: the addresses a service answers on;
//!                       intermediate → agent: the same, for each service the agent
//!                       is registered (so authorized) for, after its ACK and
//!                       whenever they change (count 0: withdrawn)
//!                       svc | count[1] | count × prefix
//!                       prefix = family[1] (4|6) | ip[4|16] | prefix_len[1]
//! 0x0C TUNNEL_ADDRESS   intermediate → agent      ipv4[4] | ipv6[16]
//!                       the agent's own addresses inside the tunnel, unique in the
//!                       deployment, sent before its first ACK
//! 0x0D DRAINING         intermediate → client     drain_ms[4]
//!                       the intermediate is shutting down: it sets up no new relay
//!                       sessions and takes no new registrations, and forwards the
//!                       existing sessions for at most `drain_ms` more milliseconds
//!                       (then closes every connection); sent once, to clients that
//!                       sent CAPABILITIES
//! ```
//!
//! A prefix's host bits are zero and its length at most 32 (IPv4) or 128 (IPv6);
//! anything else is malformed. At most [`MAX_PREFIXES`] per frame.
//!
//! CAPABILITIES negotiates the DATAGRAM framing of tunneled packets, so that ztna
//! peers interoperate with the original system's, which never send stream frames:
//! a ztna client sends it once right after the handshake, and the intermediate answers
//! each one it receives with its own. Without it, a peer is assumed to be an original
//! one. `SERVICE_PACKETS` from a client means "send me tunneled packets as `0x2F`
//! (service-routed) DATAGRAMs where they fit; I read raw IP too"; without it the
//! intermediate sends that client only raw IP DATAGRAMs (0x4_/0x6_), as the original
//! intermediate does. `SERVICE_PACKETS` from the intermediate means "I accept `0x2F`
//! from you in your role"; the original intermediate accepts `0x2F` only from agents,
//! so a ztna connector that did not get it replies with raw IP.
//!
//! Connector affinity: with several relays and several connectors for a service,
//! an agent's relayed traffic must reach the same connector through whichever relay
//! carries it, or a kernel-mode connector that never saw a TCP connection answers
//! its next segment with a reset. A connector therefore announces one random
//! `instance` to every relay, and each relay picks a service's connector for an
//! agent by rendezvous hashing of the agent's certificate against those instances:
//! every relay computes the same connector while the set of live connectors is the
//! same, with no coordination between relays.
//!
//! DRAINING lets a client move before its relay goes: a ztna client sets up new
//! sessions (and registrations) on another relay and moves its sessions there within
//! `drain_ms`, keeping this control connection until then (closing it ends its
//! sessions here). Only clients that announced CAPABILITIES get it: the original
//! system's clients read no stream frames. Type `0x0B` is unassigned.
//!
//! CANDIDATES carry the sender's NAT-traversal candidates and its check password
//! (`ztna_core::p2p`). The intermediate passes them on only between the agent and
//! the connector of that session; from anyone else they are refused and counted.
//!
//! Setup: the agent asks for a session to a service it is registered for; the
//! intermediate allocates both relay CIDs, installs the forwarding entries and offers
//! the session to the service's connector; once the connector accepts, the agent gets
//! READY and opens a QUIC data connection to the connector through the relay's UDP
//! port with source CID `agent_cid` and initial DCID `connector_cid`. The connector
//! answers with source CID `connector_cid`. Unknown frame types are skipped (the
//! length says how far), so newer peers can add frames.

use crate::relay::RELAY_CID_LEN;
use crate::wire::WireError;

pub const FRAME_SESSION_REQUEST: u8 = 0x01;
pub const FRAME_SESSION_OFFER: u8 = 0x02;
pub const FRAME_SESSION_ACCEPT: u8 = 0x03;
pub const FRAME_SESSION_READY: u8 = 0x04;
pub const FRAME_SESSION_REFUSED: u8 = 0x05;
pub const FRAME_SESSION_CLOSE: u8 = 0x06;
pub const FRAME_CANDIDATES: u8 = 0x07;
pub const FRAME_SESSION_PATH: u8 = 0x08;
pub const FRAME_CAPABILITIES: u8 = 0x09;

/// CAPABILITIES flag bits.
pub mod capability {
    /// Bit 0: tunneled packets may be sent to the sender of this frame as `0x2F`
    /// DATAGRAMs (a client), or the sender accepts `0x2F` from the receiver (the
    /// intermediate). See the module documentation.
    pub const SERVICE_PACKETS: u32 = 0x0000_0001;
}

pub const FRAME_SERVICE_PREFIXES: u8 = 0x0A;
pub const FRAME_TUNNEL_ADDRESS: u8 = 0x0C;
pub const FRAME_DRAINING: u8 = 0x0D;

/// Most prefixes one SERVICE_PREFIXES frame may carry.
pub const MAX_PREFIXES: usize = 64;

/// SESSION_PATH values: how the intermediate forwards a session.
pub mod forwarding {
    pub const XDP_NATIVE: u8 = 1;
    pub const XDP_GENERIC: u8 = 2;
    pub const USERSPACE: u8 = 3;
}

/// Most candidates one CANDIDATES frame may carry.
pub const MAX_CANDIDATES: usize = 16;

/// Stream the client writes its frames on (client-initiated unidirectional).
pub const CLIENT_FRAME_STREAM: u64 = 2;
/// Stream the intermediate writes its frames on (server-initiated unidirectional).
pub const SERVER_FRAME_STREAM: u64 = 3;

pub type Cid = [u8; RELAY_CID_LEN];

/// Why a session request failed (SESSION_REFUSED status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusedStatus {
    /// 0x01: the agent is not registered (authorized) for the service.
    NotAuthorized,
    /// 0x02: no connector serves the service right now.
    NoConnector,
    /// 0x03: the connector did not accept in time.
    ConnectorTimeout,
    /// 0x04: the forwarding table is full.
    TableFull,
    /// 0x05: the agent already has as many relay sessions as one client may hold.
    TooManySessions,
    /// 0x06: the intermediate is draining (shutting down): ask another relay.
    Draining,
    Other(u8),
}

impl RefusedStatus {
    pub const fn to_byte(self) -> u8 {
        match self {
            RefusedStatus::NotAuthorized => 1,
            RefusedStatus::NoConnector => 2,
            RefusedStatus::ConnectorTimeout => 3,
            RefusedStatus::TableFull => 4,
            RefusedStatus::TooManySessions => 5,
            RefusedStatus::Draining => 6,
            RefusedStatus::Other(b) => b,
        }
    }
    pub const fn from_byte(b: u8) -> Self {
        match b {
            1 => RefusedStatus::NotAuthorized,
            2 => RefusedStatus::NoConnector,
            3 => RefusedStatus::ConnectorTimeout,
            4 => RefusedStatus::TableFull,
            5 => RefusedStatus::TooManySessions,
            6 => RefusedStatus::Draining,
            o => RefusedStatus::Other(o),
        }
    }
}

/// Why a session ended (SESSION_CLOSE reason).
pub mod close_reason {
    pub const NORMAL: u8 = 0;
    pub const IDLE: u8 = 1;
    pub const PEER_GONE: u8 = 2;
    pub const REPLACED: u8 = 3;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    SessionRequest {
        request_id: u32,
        service: &'a str,
    },
    SessionOffer {
        session_id: u32,
        agent_cid: Cid,
        connector_cid: Cid,
        service: &'a str,
    },
    SessionAccept {
        session_id: u32,
    },
    SessionReady {
        request_id: u32,
        session_id: u32,
        agent_cid: Cid,
        connector_cid: Cid,
    },
    SessionRefused {
        request_id: u32,
        status: RefusedStatus,
    },
    SessionClose {
        session_id: u32,
        reason: u8,
    },
    /// `candidates` is `count` encoded candidates, already validated by `decode`;
    /// read them with [`candidates`].
    Candidates {
        session_id: u32,
        password: [u8; 16],
        count: u8,
        candidates: &'a [u8],
    },
    SessionPath {
        session_id: u32,
        forwarding: u8,
    },
    /// `prefixes` is `count` encoded prefixes, already validated by `decode`; read
    /// them with [`prefixes`].
    ServicePrefixes {
        service: &'a str,
        count: u8,
        prefixes: &'a [u8],
    },
    TunnelAddress {
        ipv4: core::net::Ipv4Addr,
        ipv6: core::net::Ipv6Addr,
    },
    /// Feature flags (`capability::*`) of the sender, and a connector's instance ID.
    Capabilities {
        flags: u32,
        instance: Option<u64>,
    },
    /// The intermediate is draining: existing sessions are forwarded for at most
    /// `drain_ms` more milliseconds.
    Draining {
        drain_ms: u32,
    },
    /// A frame type this version does not know; skipped.
    Unknown {
        frame_type: u8,
    },
}

struct Reader<'a> {
    buf: &'a [u8],
    total: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated {
                needed: self.total - self.buf.len() + n,
                have: self.total,
            });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn cid(&mut self) -> Result<Cid, WireError> {
        let mut c = [0u8; RELAY_CID_LEN];
        c.copy_from_slice(self.take(RELAY_CID_LEN)?);
        Ok(c)
    }
    fn service(&mut self) -> Result<&'a str, WireError> {
        let len = self.u8()? as usize;
        if len == 0 {
            return Err(WireError::LengthZero);
        }
        if len > self.buf.len() {
            return Err(WireError::LengthPastPayload {
                len,
                available: self.buf.len(),
            });
        }
        core::str::from_utf8(self.take(len)?).map_err(|_| WireError::BadUtf8)
    }
    /// `count[1] | count × item`, at most `max` items, each checked by `item`:
    /// (count, the items' bytes).
    fn list(
        &mut self,
        max: usize,
        item: impl Fn(&mut Self) -> Result<(), WireError>,
    ) -> Result<(u8, &'a [u8]), WireError> {
        let count = self.u8()?;
        if count as usize > max {
            return Err(WireError::LengthTooLong {
                len: count as usize,
            });
        }
        let start = self.buf;
        for _ in 0..count {
            item(self)?;
        }
        let used = start.len() - self.buf.len();
        Ok((count, &start[..used]))
    }

    fn end(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                extra: self.buf.len(),
            })
        }
    }
}

impl<'a> Frame<'a> {
    /// Decodes the frame at the start of `buf`. `Ok(None)` means more bytes are needed;
    /// `Ok(Some((frame, consumed)))` otherwise. A malformed body is an error, but the
    /// length prefix still tells the caller how far to skip (see [`frame_len`]).
    pub fn decode(buf: &'a [u8]) -> Result<Option<(Frame<'a>, usize)>, WireError> {
        let Some(total) = frame_len(buf)? else {
            return Ok(None);
        };
        let body = &buf[3..total];
        let mut r = Reader {
            buf: body,
            total: body.len(),
        };
        let frame = match buf[2] {
            FRAME_SESSION_REQUEST => Frame::SessionRequest {
                request_id: r.u32()?,
                service: r.service()?,
            },
            FRAME_SESSION_OFFER => Frame::SessionOffer {
                session_id: r.u32()?,
                agent_cid: r.cid()?,
                connector_cid: r.cid()?,
                service: r.service()?,
            },
            FRAME_SESSION_ACCEPT => Frame::SessionAccept {
                session_id: r.u32()?,
            },
            FRAME_SESSION_READY => Frame::SessionReady {
                request_id: r.u32()?,
                session_id: r.u32()?,
                agent_cid: r.cid()?,
                connector_cid: r.cid()?,
            },
            FRAME_SESSION_REFUSED => Frame::SessionRefused {
                request_id: r.u32()?,
                status: RefusedStatus::from_byte(r.u8()?),
            },
            FRAME_SESSION_CLOSE => Frame::SessionClose {
                session_id: r.u32()?,
                reason: r.u8()?,
            },
            FRAME_CANDIDATES => {
                let session_id = r.u32()?;
                let mut password = [0u8; 16];
                password.copy_from_slice(r.take(16)?);
                let (count, candidates) = r.list(MAX_CANDIDATES, |r| candidate(r).map(drop))?;
                Frame::Candidates {
                    session_id,
                    password,
                    count,
                    candidates,
                }
            }
            FRAME_SESSION_PATH => Frame::SessionPath {
                session_id: r.u32()?,
                forwarding: r.u8()?,
            },
            FRAME_SERVICE_PREFIXES => {
                let service = r.service()?;
                let (count, prefixes) = r.list(MAX_PREFIXES, |r| prefix(r).map(drop))?;
                Frame::ServicePrefixes {
                    service,
                    count,
                    prefixes,
                }
            }
            FRAME_TUNNEL_ADDRESS => {
                let b = r.take(4)?;
                let ipv4 = core::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]);
                let mut a = [0u8; 16];
                a.copy_from_slice(r.take(16)?);
                Frame::TunnelAddress {
                    ipv4,
                    ipv6: a.into(),
                }
            }
            FRAME_CAPABILITIES => {
                let flags = r.u32()?;
                let instance = match r.buf.len() {
                    8.. => Some(u64::from_be_bytes(r.take(8)?.try_into().expect("8 bytes"))),
                    _ => None,
                };
                // Later versions may append fields; this one reads no further.
                r.buf = &[];
                Frame::Capabilities { flags, instance }
            }
            FRAME_DRAINING => Frame::Draining { drain_ms: r.u32()? },
            t => {
                r.buf = &[];
                Frame::Unknown { frame_type: t }
            }
        };
        r.end()?;
        Ok(Some((frame, total)))
    }

    /// Encodes into `out`, returning the bytes written.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer { out, pos: 3 };
        let ty = match *self {
            Frame::SessionRequest {
                request_id,
                service,
            } => {
                w.put(&request_id.to_be_bytes())?;
                w.service(service)?;
                FRAME_SESSION_REQUEST
            }
            Frame::SessionOffer {
                session_id,
                agent_cid,
                connector_cid,
                service,
            } => {
                w.put(&session_id.to_be_bytes())?;
                w.put(&agent_cid)?;
                w.put(&connector_cid)?;
                w.service(service)?;
                FRAME_SESSION_OFFER
            }
            Frame::SessionAccept { session_id } => {
                w.put(&session_id.to_be_bytes())?;
                FRAME_SESSION_ACCEPT
            }
            Frame::SessionReady {
                request_id,
                session_id,
                agent_cid,
                connector_cid,
            } => {
                w.put(&request_id.to_be_bytes())?;
                w.put(&session_id.to_be_bytes())?;
                w.put(&agent_cid)?;
                w.put(&connector_cid)?;
                FRAME_SESSION_READY
            }
            Frame::SessionRefused { request_id, status } => {
                w.put(&request_id.to_be_bytes())?;
                w.put(&[status.to_byte()])?;
                FRAME_SESSION_REFUSED
            }
            Frame::SessionClose { session_id, reason } => {
                w.put(&session_id.to_be_bytes())?;
                w.put(&[reason])?;
                FRAME_SESSION_CLOSE
            }
            Frame::Candidates {
                session_id,
                password,
                count,
                candidates,
            } => {
                w.put(&session_id.to_be_bytes())?;
                w.put(&password)?;
                w.put(&[count])?;
                w.put(candidates)?;
                FRAME_CANDIDATES
            }
            Frame::SessionPath {
                session_id,
                forwarding,
            } => {
                w.put(&session_id.to_be_bytes())?;
                w.put(&[forwarding])?;
                FRAME_SESSION_PATH
            }
            Frame::ServicePrefixes {
                service,
                count,
                prefixes,
            } => {
                w.service(service)?;
                w.put(&[count])?;
                w.put(prefixes)?;
                FRAME_SERVICE_PREFIXES
            }
            Frame::TunnelAddress { ipv4, ipv6 } => {
                w.put(&ipv4.octets())?;
                w.put(&ipv6.octets())?;
                FRAME_TUNNEL_ADDRESS
            }
            Frame::Capabilities { flags, instance } => {
                w.put(&flags.to_be_bytes())?;
                if let Some(i) = instance {
                    w.put(&i.to_be_bytes())?;
                }
                FRAME_CAPABILITIES
            }
            Frame::Draining { drain_ms } => {
                w.put(&drain_ms.to_be_bytes())?;
                FRAME_DRAINING
            }
            Frame::Unknown { frame_type } => frame_type,
        };
        let n = w.pos;
        if w.out.len() < 3 {
            return Err(WireError::BufferTooSmall {
                needed: 3,
                have: w.out.len(),
            });
        }
        let len = (n - 2) as u16;
        w.out[..2].copy_from_slice(&len.to_be_bytes());
        w.out[2] = ty;
        Ok(n)
    }
}

fn candidate(r: &mut Reader<'_>) -> Result<(u8, core::net::SocketAddr), WireError> {
    let kind = r.u8()?;
    if !(1..=2).contains(&kind) {
        return Err(WireError::UnknownType(kind));
    }
    let ip: core::net::IpAddr = match r.u8()? {
        4 => {
            let b = r.take(4)?;
            core::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()
        }
        6 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(r.take(16)?);
            core::net::Ipv6Addr::from(a).into()
        }
        f => return Err(WireError::UnknownType(f)),
    };
    let p = r.take(2)?;
    Ok((
        kind,
        core::net::SocketAddr::new(ip, u16::from_be_bytes([p[0], p[1]])),
    ))
}

/// One prefix: (network address, prefix length), checked as the module docs say.
fn prefix(r: &mut Reader<'_>) -> Result<(core::net::IpAddr, u8), WireError> {
    let (ip, max): (core::net::IpAddr, u8) = match r.u8()? {
        4 => {
            let b = r.take(4)?;
            (core::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).into(), 32)
        }
        6 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(r.take(16)?);
            (core::net::Ipv6Addr::from(a).into(), 128)
        }
        f => return Err(WireError::UnknownType(f)),
    };
    let len = r.u8()?;
    if len > max {
        return Err(WireError::BadPrefix);
    }
    let host_bits_zero = match ip {
        core::net::IpAddr::V4(a) => u32::from(a).checked_shl(u32::from(len)).unwrap_or(0) == 0,
        core::net::IpAddr::V6(a) => u128::from(a).checked_shl(u32::from(len)).unwrap_or(0) == 0,
    };
    if !host_bits_zero {
        return Err(WireError::BadPrefix);
    }
    Ok((ip, len))
}

/// The prefixes of a decoded SERVICE_PREFIXES frame: (network address, length).
pub fn prefixes(raw: &[u8]) -> impl Iterator<Item = (core::net::IpAddr, u8)> + '_ {
    items(raw, prefix)
}

/// The items of a list `decode` already validated, read one by one with `item`.
fn items<'a, T: 'a>(
    raw: &'a [u8],
    item: fn(&mut Reader<'a>) -> Result<T, WireError>,
) -> impl Iterator<Item = T> + 'a {
    let mut r = Reader {
        buf: raw,
        total: raw.len(),
    };
    core::iter::from_fn(move || {
        if r.buf.is_empty() {
            None
        } else {
            item(&mut r).ok()
        }
    })
}

/// Encodes up to [`MAX_PREFIXES`] prefixes (network address, length) into `raw`
/// for a SERVICE_PREFIXES frame: (count, bytes used).
pub fn encode_prefixes(
    prefixes: impl IntoIterator<Item = (core::net::IpAddr, u8)>,
    raw: &mut [u8],
) -> (u8, usize) {
    let (mut n, mut count) = (0, 0u8);
    for (ip, len) in prefixes.into_iter().take(MAX_PREFIXES) {
        if encode_prefix(ip, len, raw, &mut n) {
            count += 1;
        }
    }
    (count, n)
}

/// Appends one encoded prefix to `out` at `*pos`; returns false if it doesn't fit.
pub fn encode_prefix(ip: core::net::IpAddr, len: u8, out: &mut [u8], pos: &mut usize) -> bool {
    let need = match ip {
        core::net::IpAddr::V4(_) => 6,
        core::net::IpAddr::V6(_) => 18,
    };
    let Some(dst) = out.get_mut(*pos..*pos + need) else {
        return false;
    };
    match ip {
        core::net::IpAddr::V4(a) => {
            dst[0] = 4;
            dst[1..5].copy_from_slice(&a.octets());
        }
        core::net::IpAddr::V6(a) => {
            dst[0] = 6;
            dst[1..17].copy_from_slice(&a.octets());
        }
    }
    dst[need - 1] = len;
    *pos += need;
    true
}

/// The candidates of a decoded CANDIDATES frame: (kind, address).
pub fn candidates(raw: &[u8]) -> impl Iterator<Item = (u8, core::net::SocketAddr)> + '_ {
    items(raw, candidate)
}

/// Appends one encoded candidate to `out` at `*pos`; returns false if it doesn't fit.
pub fn encode_candidate(
    kind: u8,
    addr: core::net::SocketAddr,
    out: &mut [u8],
    pos: &mut usize,
) -> bool {
    let need = match addr {
        core::net::SocketAddr::V4(_) => 8,
        core::net::SocketAddr::V6(_) => 20,
    };
    if out.len() < *pos + need {
        return false;
    }
    let o = &mut out[*pos..*pos + need];
    o[0] = kind;
    match addr.ip() {
        core::net::IpAddr::V4(ip) => {
            o[1] = 4;
            o[2..6].copy_from_slice(&ip.octets());
        }
        core::net::IpAddr::V6(ip) => {
            o[1] = 6;
            o[2..18].copy_from_slice(&ip.octets());
        }
    }
    o[need - 2..].copy_from_slice(&addr.port().to_be_bytes());
    *pos += need;
    true
}

/// Total length (prefix included) of the frame at the start of `buf`, or `None` if
/// the buffer does not hold all of it yet.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
    if len == 0 {
        return Err(WireError::LengthZero);
    }
    if buf.len() < 2 + len {
        return Ok(None);
    }
    Ok(Some(2 + len))
}

struct Writer<'o> {
    out: &'o mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, b: &[u8]) -> Result<(), WireError> {
        let end = self.pos + b.len();
        if end > self.out.len() {
            return Err(WireError::BufferTooSmall {
                needed: end,
                have: self.out.len(),
            });
        }
        self.out[self.pos..end].copy_from_slice(b);
        self.pos = end;
        Ok(())
    }
    fn service(&mut self, s: &str) -> Result<(), WireError> {
        crate::wire::check_service_id(s)?;
        self.put(&[s.len() as u8])?;
        self.put(s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_statuses_round_trip() {
        for b in 0..=255u8 {
            assert_eq!(RefusedStatus::from_byte(b).to_byte(), b);
        }
        assert_eq!(RefusedStatus::from_byte(5), RefusedStatus::TooManySessions);
        assert_eq!(RefusedStatus::from_byte(6), RefusedStatus::Draining);
        assert_eq!(RefusedStatus::Draining.to_byte(), 6);
    }

    fn rt(f: Frame<'_>) {
        let mut buf = [0u8; 400];
        let n = f.encode(&mut buf).unwrap();
        assert_eq!(Frame::decode(&buf[..n]), Ok(Some((f, n))));
        // every strict prefix asks for more bytes or is an error, never a wrong frame
        for cut in 0..n {
            assert!(
                !matches!(Frame::decode(&buf[..cut]), Ok(Some(_))),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn round_trips() {
        let a = [0xA5, 1, 2, 3, 4, 5, 6, 7];
        let c = [0xA5, 9, 9, 9, 9, 9, 9, 9];
        rt(Frame::SessionRequest {
            request_id: 7,
            service: "echo",
        });
        rt(Frame::SessionOffer {
            session_id: 1,
            agent_cid: a,
            connector_cid: c,
            service: "db",
        });
        rt(Frame::SessionAccept {
            session_id: 0xdead_beef,
        });
        rt(Frame::SessionReady {
            request_id: 7,
            session_id: 1,
            agent_cid: a,
            connector_cid: c,
        });
        rt(Frame::SessionRefused {
            request_id: 7,
            status: RefusedStatus::NoConnector,
        });
        rt(Frame::SessionClose {
            session_id: 1,
            reason: close_reason::IDLE,
        });
        rt(Frame::SessionPath {
            session_id: 1,
            forwarding: forwarding::XDP_NATIVE,
        });
        rt(Frame::Capabilities {
            flags: capability::SERVICE_PACKETS,
            instance: None,
        });
        rt(Frame::Capabilities {
            flags: capability::SERVICE_PACKETS,
            instance: Some(0x0102_0304_0506_0708),
        });
        rt(Frame::Draining { drain_ms: 0 });
        rt(Frame::Draining { drain_ms: u32::MAX });
        let mut raw = [0u8; 64];
        let mut n = 0;
        assert!(encode_candidate(
            1,
            "10.0.0.1:5".parse().unwrap(),
            &mut raw,
            &mut n
        ));
        assert!(encode_candidate(
            2,
            "[2001:db8::1]:6".parse().unwrap(),
            &mut raw,
            &mut n
        ));
        let f = Frame::Candidates {
            session_id: 3,
            password: [9; 16],
            count: 2,
            candidates: &raw[..n],
        };
        rt(f);
        let got: heapless_list::List = candidates(&raw[..n]).collect();
        assert_eq!(got.0[0], Some((1, "10.0.0.1:5".parse().unwrap())));
        assert_eq!(got.0[1], Some((2, "[2001:db8::1]:6".parse().unwrap())));
    }

    #[test]
    fn service_prefixes_and_tunnel_address() {
        let mut raw = [0u8; 64];
        let mut n = 0;
        let v4: core::net::IpAddr = "10.20.0.0".parse().unwrap();
        let v6: core::net::IpAddr = "fd00:5::".parse().unwrap();
        assert!(encode_prefix(v4, 24, &mut raw, &mut n));
        assert!(encode_prefix(v6, 64, &mut raw, &mut n));
        assert_eq!(n, 6 + 18);
        rt(Frame::ServicePrefixes {
            service: "db",
            count: 2,
            prefixes: &raw[..n],
        });
        let mut it = prefixes(&raw[..n]);
        assert_eq!(it.next(), Some((v4, 24)));
        assert_eq!(it.next(), Some((v6, 64)));
        assert_eq!(it.next(), None);
        // Withdrawn: no prefixes.
        rt(Frame::ServicePrefixes {
            service: "db",
            count: 0,
            prefixes: &[],
        });
        rt(Frame::TunnelAddress {
            ipv4: "100.64.0.7".parse().unwrap(),
            ipv6: "fd7a:7a7a::7".parse().unwrap(),
        });
        let mut buf = [0u8; 64];
        let len = Frame::TunnelAddress {
            ipv4: "100.64.0.7".parse().unwrap(),
            ipv6: core::net::Ipv6Addr::LOCALHOST,
        }
        .encode(&mut buf)
        .unwrap();
        assert_eq!(
            &buf[..len],
            &[
                0,
                21,
                FRAME_TUNNEL_ADDRESS,
                100,
                64,
                0,
                7,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                1
            ]
        );
    }

    #[test]
    fn service_prefixes_malformed() {
        let mut buf = [0u8; 64];
        let bad = |raw: &[u8], count: u8, buf: &mut [u8]| {
            let len = Frame::ServicePrefixes {
                service: "db",
                count,
                prefixes: raw,
            }
            .encode(buf)
            .unwrap();
            Frame::decode(&buf[..len]).map(|f| f.map(|(_, n)| n))
        };
        // Host bits set.
        assert_eq!(
            bad(&[4, 10, 20, 0, 1, 24], 1, &mut buf),
            Err(WireError::BadPrefix)
        );
        // Longer than the family allows.
        assert_eq!(
            bad(&[4, 10, 20, 0, 0, 33], 1, &mut buf),
            Err(WireError::BadPrefix)
        );
        // A /32 and a /0 are fine.
        assert!(bad(&[4, 10, 20, 0, 1, 32], 1, &mut buf).is_ok());
        assert!(bad(&[4, 0, 0, 0, 0, 0], 1, &mut buf).is_ok());
        // Unknown family; count past the prefixes present.
        assert_eq!(
            bad(&[5, 10, 20, 0, 0, 24], 1, &mut buf),
            Err(WireError::UnknownType(5))
        );
        assert!(matches!(
            bad(&[4, 10, 20, 0, 0, 24], 2, &mut buf),
            Err(WireError::Truncated { .. })
        ));
        assert_eq!(
            bad(&[], MAX_PREFIXES as u8 + 1, &mut buf),
            Err(WireError::LengthTooLong {
                len: MAX_PREFIXES + 1
            })
        );
    }

    #[test]
    fn candidates_malformed() {
        // count says 2, only one candidate present
        let mut buf = [0u8; 64];
        let mut raw = [0u8; 16];
        let mut n = 0;
        encode_candidate(1, "10.0.0.1:5".parse().unwrap(), &mut raw, &mut n);
        let len = Frame::Candidates {
            session_id: 1,
            password: [0; 16],
            count: 2,
            candidates: &raw[..n],
        }
        .encode(&mut buf)
        .unwrap();
        assert!(matches!(
            Frame::decode(&buf[..len]),
            Err(WireError::Truncated { .. })
        ));
        // unknown family
        raw[1] = 5;
        let len = Frame::Candidates {
            session_id: 1,
            password: [0; 16],
            count: 1,
            candidates: &raw[..n],
        }
        .encode(&mut buf)
        .unwrap();
        assert_eq!(Frame::decode(&buf[..len]), Err(WireError::UnknownType(5)));
    }

    mod heapless_list {
        pub struct List(pub [Option<(u8, core::net::SocketAddr)>; 4]);
        impl FromIterator<(u8, core::net::SocketAddr)> for List {
            fn from_iter<I: IntoIterator<Item = (u8, core::net::SocketAddr)>>(it: I) -> Self {
                let mut l = List([None; 4]);
                for (i, x) in it.into_iter().take(4).enumerate() {
                    l.0[i] = Some(x);
                }
                l
            }
        }
    }

    #[test]
    fn known_bytes() {
        let mut buf = [0u8; 64];
        let n = Frame::SessionRequest {
            request_id: 1,
            service: "ab",
        }
        .encode(&mut buf)
        .unwrap();
        assert_eq!(&buf[..n], &[0, 8, 1, 0, 0, 0, 1, 2, b'a', b'b']);
        let n = Frame::SessionClose {
            session_id: 2,
            reason: 1,
        }
        .encode(&mut buf)
        .unwrap();
        assert_eq!(&buf[..n], &[0, 6, 6, 0, 0, 0, 2, 1]);
        let n = Frame::Capabilities {
            flags: capability::SERVICE_PACKETS,
            instance: None,
        }
        .encode(&mut buf)
        .unwrap();
        assert_eq!(&buf[..n], &[0, 5, 9, 0, 0, 0, 1]);
        let n = Frame::Draining { drain_ms: 10_000 }
            .encode(&mut buf)
            .unwrap();
        assert_eq!(&buf[..n], &[0, 5, 0x0D, 0, 0, 0x27, 0x10]);
    }

    #[test]
    fn draining_needs_exactly_its_four_bytes() {
        assert_eq!(
            Frame::decode(&[0, 3, FRAME_DRAINING, 0, 1]),
            Err(WireError::Truncated { needed: 4, have: 2 })
        );
        assert_eq!(
            Frame::decode(&[0, 6, FRAME_DRAINING, 0, 0, 0, 1, 9]),
            Err(WireError::TrailingBytes { extra: 1 })
        );
        assert_eq!(
            Frame::decode(&[0, 5, FRAME_DRAINING, 0, 0, 0x13, 0x88]),
            Ok(Some((Frame::Draining { drain_ms: 5000 }, 7)))
        );
    }

    #[test]
    fn capabilities_ignore_later_fields_but_need_the_flags() {
        assert_eq!(
            Frame::decode(&[0, 7, FRAME_CAPABILITIES, 0x80, 0, 0, 1, 0xaa, 0xbb]),
            Ok(Some((
                Frame::Capabilities {
                    flags: 0x8000_0001,
                    instance: None
                },
                9
            )))
        );
        let f = [
            0,
            16,
            FRAME_CAPABILITIES,
            0,
            0,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            7,
            0xaa,
            0xbb,
            0xcc,
        ];
        assert_eq!(
            Frame::decode(&f),
            Ok(Some((
                Frame::Capabilities {
                    flags: 1,
                    instance: Some(7)
                },
                18
            )))
        );
        assert_eq!(
            Frame::decode(&[0, 3, FRAME_CAPABILITIES, 0, 1]),
            Err(WireError::Truncated { needed: 4, have: 2 })
        );
    }

    #[test]
    fn malformed() {
        assert_eq!(Frame::decode(&[0, 0]), Err(WireError::LengthZero));
        assert_eq!(
            Frame::decode(&[0, 3, FRAME_SESSION_ACCEPT, 0, 0]),
            Err(WireError::Truncated { needed: 4, have: 2 })
        );
        assert_eq!(
            Frame::decode(&[0, 6, FRAME_SESSION_ACCEPT, 0, 0, 0, 1, 9]),
            Err(WireError::TrailingBytes { extra: 1 })
        );
        assert_eq!(
            Frame::decode(&[0, 7, FRAME_SESSION_REQUEST, 0, 0, 0, 1, 3, b'a']),
            Err(WireError::LengthPastPayload {
                len: 3,
                available: 1
            })
        );
        assert_eq!(
            Frame::decode(&[0, 7, FRAME_SESSION_REQUEST, 0, 0, 0, 1, 1, 0xff]),
            Err(WireError::BadUtf8)
        );
        assert_eq!(
            Frame::decode(&[0, 6, FRAME_SESSION_REQUEST, 0, 0, 0, 1, 0]),
            Err(WireError::LengthZero)
        );
        assert_eq!(
            Frame::decode(&[0, 3, 0x77, 1, 2, 0xee]),
            Ok(Some((Frame::Unknown { frame_type: 0x77 }, 5)))
        );
        assert_eq!(Frame::decode(&[0]), Ok(None));
    }
}
