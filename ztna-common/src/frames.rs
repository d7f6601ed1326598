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
//! ```
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
    Other(u8),
}

impl RefusedStatus {
    pub const fn to_byte(self) -> u8 {
        match self {
            RefusedStatus::NotAuthorized => 1,
            RefusedStatus::NoConnector => 2,
            RefusedStatus::ConnectorTimeout => 3,
            RefusedStatus::TableFull => 4,
            RefusedStatus::Other(b) => b,
        }
    }
    pub const fn from_byte(b: u8) -> Self {
        match b {
            1 => RefusedStatus::NotAuthorized,
            2 => RefusedStatus::NoConnector,
            3 => RefusedStatus::ConnectorTimeout,
            4 => RefusedStatus::TableFull,
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
    SessionRequest { request_id: u32, service: &'a str },
    SessionOffer { session_id: u32, agent_cid: Cid, connector_cid: Cid, service: &'a str },
    SessionAccept { session_id: u32 },
    SessionReady { request_id: u32, session_id: u32, agent_cid: Cid, connector_cid: Cid },
    SessionRefused { request_id: u32, status: RefusedStatus },
    SessionClose { session_id: u32, reason: u8 },
    /// A frame type this version does not know; skipped.
    Unknown { frame_type: u8 },
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
            Frame::SessionRequest { request_id, service } => {
                w.put(&request_id.to_be_bytes())?;
                w.service(service)?;
                FRAME_SESSION_REQUEST
            }
            Frame::SessionOffer { session_id, agent_cid, connector_cid, service } => {
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
            Frame::SessionReady { request_id, session_id, agent_cid, connector_cid } => {
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
            Frame::Unknown { frame_type } => frame_type,
        };
        let n = w.pos;
        if w.out.len() < 3 {
            return Err(WireError::BufferTooSmall { needed: 3, have: w.out.len() });
        }
        let len = (n - 2) as u16;
        w.out[..2].copy_from_slice(&len.to_be_bytes());
        w.out[2] = ty;
        Ok(n)
    }
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
            return Err(WireError::BufferTooSmall { needed: end, have: self.out.len() });
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

    fn rt(f: Frame<'_>) {
        let mut buf = [0u8; 400];
        let n = f.encode(&mut buf).unwrap();
        assert_eq!(Frame::decode(&buf[..n]), Ok(Some((f, n))));
        // every strict prefix asks for more bytes or is an error, never a wrong frame
        for cut in 0..n {
            assert!(!matches!(Frame::decode(&buf[..cut]), Ok(Some(_))), "cut {cut}");
        }
    }

    #[test]
    fn round_trips() {
        let a = [0xA5, 1, 2, 3, 4, 5, 6, 7];
        let c = [0xA5, 9, 9, 9, 9, 9, 9, 9];
        rt(Frame::SessionRequest { request_id: 7, service: "echo" });
        rt(Frame::SessionOffer { session_id: 1, agent_cid: a, connector_cid: c, service: "db" });
        rt(Frame::SessionAccept { session_id: 0xdead_beef });
        rt(Frame::SessionReady { request_id: 7, session_id: 1, agent_cid: a, connector_cid: c });
        rt(Frame::SessionRefused { request_id: 7, status: RefusedStatus::NoConnector });
        rt(Frame::SessionClose { session_id: 1, reason: close_reason::IDLE });
    }

    #[test]
    fn known_bytes() {
        let mut buf = [0u8; 64];
        let n = Frame::SessionRequest { request_id: 1, service: "ab" }.encode(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[0, 8, 1, 0, 0, 0, 1, 2, b'a', b'b']);
        let n = Frame::SessionClose { session_id: 2, reason: 1 }.encode(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[0, 6, 6, 0, 0, 0, 2, 1]);
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
            Err(WireError::LengthPastPayload { len: 3, available: 1 })
        );
        assert_eq!(
            Frame::decode(&[0, 7, FRAME_SESSION_REQUEST, 0, 0, 0, 1, 1, 0xff]),
            Err(WireError::BadUtf8)
        );
        assert_eq!(
            Frame::decode(&[0, 6, FRAME_SESSION_REQUEST, 0, 0, 0, 1, 0]),
            Err(WireError::LengthZero)
        );
        assert_eq!(Frame::decode(&[0, 3, 0x77, 1, 2, 0xee]), Ok(Some((Frame::Unknown { frame_type: 0x77 }, 5))));
        assert_eq!(Frame::decode(&[0]), Ok(None));
    }
}
