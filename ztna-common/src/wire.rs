//! Control-connection DATAGRAM messages (ALPN `ztna-v1`).
//!
//! Every DATAGRAM payload on a control connection is dispatched on its first byte.
//! Byte layouts (multi-byte integers big-endian; `len` is one byte, 1..=255;
//! `id` is a UTF-8 service id of `len` bytes):
//!
//! ```text
//! 0x01 QAD IPv4       01 | ip[4]  | port[2]                      exactly 7 bytes
//! 0x02 QAD IPv6       02 | ip[16] | port[2]                      exactly 19 bytes
//! 0x10 register agent       10 | len | id[len]                   nothing after id
//! 0x11 register connector   11 | len | id[len]                   nothing after id
//! 0x12 registration ACK     12 | 00 | len | id[len]              second byte is always 00
//! 0x13 registration NACK    13 | status | len | id[len]          status 01 invalid id, 02 not authorized,
//!                                                                03 draining (ztna)
//! 0x2F service-routed IP    2F | len | id[len] | ip-packet       packet may be empty
//! 0x4_ raw IPv4 packet      the packet itself (first nibble 4)
//! 0x6_ raw IPv6 packet      the packet itself (first nibble 6)
//! ```
//!
//! Whether tunneled packets are sent to a peer as `0x2F` or as raw IP is negotiated
//! with the CAPABILITIES stream frame ([`crate::frames`]): the original system's
//! clients never send it and read only raw IP (its connectors also send only raw IP),
//! so they are sent raw IP.
//!
//! A `0x10`/`0x11` registration that does not decode (length byte missing or 0, id
//! running past the payload, id not UTF-8, bytes after the id) is answered with a NACK
//! of status 01 whose id is the id bytes as received, cut to the payload (so possibly
//! empty, `13 01 00`, or not UTF-8): the client learns why and can match the answer to
//! its request byte for byte. ztna clients never send such registrations, and their
//! decoder treats such a NACK as malformed (see [`encode_nack_bytes`]).
//!
//! Decoding borrows from the input and never allocates, so the same code runs in
//! `no_std` contexts. Every malformed class has its own [`WireError`] variant so the
//! receiver can count each class separately.

use core::fmt;

pub const TYPE_QAD_V4: u8 = 0x01;
pub const TYPE_QAD_V6: u8 = 0x02;
pub const TYPE_REGISTER_AGENT: u8 = 0x10;
pub const TYPE_REGISTER_CONNECTOR: u8 = 0x11;
pub const TYPE_REGISTER_ACK: u8 = 0x12;
pub const TYPE_REGISTER_NACK: u8 = 0x13;
pub const TYPE_SERVICE_PACKET: u8 = 0x2F;

/// Longest service id the one-byte length prefix can carry.
pub const MAX_SERVICE_ID_LEN: usize = 255;

/// Why a registration was refused (second byte of a `0x13` NACK).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NackStatus {
    /// 0x01: the service id is not acceptable (empty, too long, bad characters).
    InvalidId,
    /// 0x02: the client's certificate does not cover this role and service.
    NotAuthorized,
    /// 0x03: the intermediate is draining (shutting down) and takes no new
    /// registrations: register with another relay. A ztna addition; the original
    /// system's clients see an unknown status, a refusal all the same.
    Draining,
    /// Any other status byte: kept so that newer servers' NACKs still decode.
    Other(u8),
}

impl NackStatus {
    pub const fn to_byte(self) -> u8 {
        match self {
            NackStatus::InvalidId => 0x01,
            NackStatus::NotAuthorized => 0x02,
            NackStatus::Draining => 0x03,
            NackStatus::Other(b) => b,
        }
    }

    pub const fn from_byte(b: u8) -> Self {
        match b {
            0x01 => NackStatus::InvalidId,
            0x02 => NackStatus::NotAuthorized,
            0x03 => NackStatus::Draining,
            other => NackStatus::Other(other),
        }
    }
}

impl fmt::Display for NackStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NackStatus::InvalidId => f.write_str("invalid service id (0x01)"),
            NackStatus::NotAuthorized => f.write_str("not authorized (0x02)"),
            NackStatus::Draining => f.write_str("intermediate draining (0x03)"),
            NackStatus::Other(b) => write!(f, "status 0x{b:02x}"),
        }
    }
}

/// One control DATAGRAM, borrowing from the buffer it was decoded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlMessage<'a> {
    QadV4 {
        ip: [u8; 4],
        port: u16,
    },
    QadV6 {
        ip: [u8; 16],
        port: u16,
    },
    RegisterAgent {
        service: &'a str,
    },
    RegisterConnector {
        service: &'a str,
    },
    RegisterAck {
        service: &'a str,
    },
    RegisterNack {
        status: NackStatus,
        service: &'a str,
    },
    ServicePacket {
        service: &'a str,
        packet: &'a [u8],
    },
    /// A raw IPv4 or IPv6 packet (datagram relay of the original protocol).
    RawIp {
        packet: &'a [u8],
    },
}

/// Malformed-input classes. Each is distinct so receivers can count them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// Zero-length DATAGRAM.
    Empty,
    /// Fewer bytes than the fixed part of this message type needs.
    Truncated { needed: usize, have: usize },
    /// The length byte points past the end of the payload.
    LengthPastPayload { len: usize, available: usize },
    /// A service id length of 0.
    LengthZero,
    /// Encoding a service id longer than 255 bytes (cannot be expressed on the wire).
    LengthTooLong { len: usize },
    /// The service id is not valid UTF-8.
    BadUtf8,
    /// The first byte is not a known message type.
    UnknownType(u8),
    /// Bytes after the end of a fixed-size or id-terminated message.
    TrailingBytes { extra: usize },
    /// A `0x12` ACK whose second byte is not 00.
    BadAckStatus(u8),
    /// The output buffer given to `encode` is too small.
    BufferTooSmall { needed: usize, have: usize },
    /// An address prefix longer than its family allows, or with host bits set.
    BadPrefix,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WireError::Empty => f.write_str("empty datagram"),
            WireError::Truncated { needed, have } => {
                write!(f, "truncated message: need {needed} bytes, have {have}")
            }
            WireError::LengthPastPayload { len, available } => write!(
                f,
                "service id length {len} runs past the payload ({available} bytes left)"
            ),
            WireError::LengthZero => f.write_str("service id length is 0"),
            WireError::LengthTooLong { len } => {
                write!(f, "service id is {len} bytes, the maximum is 255")
            }
            WireError::BadUtf8 => f.write_str("service id is not valid UTF-8"),
            WireError::UnknownType(t) => write!(f, "unknown message type 0x{t:02x}"),
            WireError::TrailingBytes { extra } => {
                write!(f, "{extra} unexpected bytes after the message")
            }
            WireError::BadAckStatus(b) => write!(f, "ACK status byte is 0x{b:02x}, expected 00"),
            WireError::BufferTooSmall { needed, have } => {
                write!(f, "output buffer too small: need {needed}, have {have}")
            }
            WireError::BadPrefix => {
                f.write_str("address prefix too long for its family or with host bits set")
            }
        }
    }
}

impl core::error::Error for WireError {}

/// Reads `len | id[len]` at `buf[0..]`, returning the id and the bytes after it.
fn take_service_id(buf: &[u8]) -> Result<(&str, &[u8]), WireError> {
    let (&len, rest) = buf
        .split_first()
        .ok_or(WireError::Truncated { needed: 1, have: 0 })?;
    let len = len as usize;
    if len == 0 {
        return Err(WireError::LengthZero);
    }
    if len > rest.len() {
        return Err(WireError::LengthPastPayload {
            len,
            available: rest.len(),
        });
    }
    let (id, rest) = rest.split_at(len);
    let id = core::str::from_utf8(id).map_err(|_| WireError::BadUtf8)?;
    Ok((id, rest))
}

fn no_trailing(rest: &[u8]) -> Result<(), WireError> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(WireError::TrailingBytes { extra: rest.len() })
    }
}

/// Checks a service id for encoding: 1..=255 bytes.
pub fn check_service_id(id: &str) -> Result<(), WireError> {
    match id.len() {
        0 => Err(WireError::LengthZero),
        n if n > MAX_SERVICE_ID_LEN => Err(WireError::LengthTooLong { len: n }),
        _ => Ok(()),
    }
}

impl<'a> ControlMessage<'a> {
    /// Decodes one DATAGRAM payload.
    pub fn decode(buf: &'a [u8]) -> Result<Self, WireError> {
        let (&ty, body) = buf.split_first().ok_or(WireError::Empty)?;
        match ty {
            TYPE_QAD_V4 => {
                if body.len() < 6 {
                    return Err(WireError::Truncated {
                        needed: 7,
                        have: buf.len(),
                    });
                }
                no_trailing(&body[6..])?;
                let mut ip = [0u8; 4];
                ip.copy_from_slice(&body[..4]);
                Ok(ControlMessage::QadV4 {
                    ip,
                    port: u16::from_be_bytes([body[4], body[5]]),
                })
            }
            TYPE_QAD_V6 => {
                if body.len() < 18 {
                    return Err(WireError::Truncated {
                        needed: 19,
                        have: buf.len(),
                    });
                }
                no_trailing(&body[18..])?;
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&body[..16]);
                Ok(ControlMessage::QadV6 {
                    ip,
                    port: u16::from_be_bytes([body[16], body[17]]),
                })
            }
            TYPE_REGISTER_AGENT | TYPE_REGISTER_CONNECTOR => {
                let (service, rest) = take_service_id(body)?;
                no_trailing(rest)?;
                Ok(if ty == TYPE_REGISTER_AGENT {
                    ControlMessage::RegisterAgent { service }
                } else {
                    ControlMessage::RegisterConnector { service }
                })
            }
            TYPE_REGISTER_ACK => {
                let (&status, rest) = body.split_first().ok_or(WireError::Truncated {
                    needed: 3,
                    have: buf.len(),
                })?;
                if status != 0 {
                    return Err(WireError::BadAckStatus(status));
                }
                let (service, rest) = take_service_id(rest)?;
                no_trailing(rest)?;
                Ok(ControlMessage::RegisterAck { service })
            }
            TYPE_REGISTER_NACK => {
                let (&status, rest) = body.split_first().ok_or(WireError::Truncated {
                    needed: 3,
                    have: buf.len(),
                })?;
                let (service, rest) = take_service_id(rest)?;
                no_trailing(rest)?;
                Ok(ControlMessage::RegisterNack {
                    status: NackStatus::from_byte(status),
                    service,
                })
            }
            TYPE_SERVICE_PACKET => {
                let (service, packet) = take_service_id(body)?;
                Ok(ControlMessage::ServicePacket { service, packet })
            }
            t if t >> 4 == 4 || t >> 4 == 6 => Ok(ControlMessage::RawIp { packet: buf }),
            t => Err(WireError::UnknownType(t)),
        }
    }

    /// Number of bytes `encode` writes.
    pub fn encoded_len(&self) -> usize {
        match self {
            ControlMessage::QadV4 { .. } => 7,
            ControlMessage::QadV6 { .. } => 19,
            ControlMessage::RegisterAgent { service }
            | ControlMessage::RegisterConnector { service } => 2 + service.len(),
            ControlMessage::RegisterAck { service }
            | ControlMessage::RegisterNack { service, .. } => 3 + service.len(),
            ControlMessage::ServicePacket { service, packet } => 2 + service.len() + packet.len(),
            ControlMessage::RawIp { packet } => packet.len(),
        }
    }

    /// Encodes into `out`, returning the number of bytes written.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        match self {
            ControlMessage::RegisterAgent { service }
            | ControlMessage::RegisterConnector { service }
            | ControlMessage::RegisterAck { service }
            | ControlMessage::RegisterNack { service, .. }
            | ControlMessage::ServicePacket { service, .. } => check_service_id(service)?,
            ControlMessage::RawIp { packet } => match packet.first() {
                Some(b) if b >> 4 == 4 || b >> 4 == 6 => {}
                Some(&b) => return Err(WireError::UnknownType(b)),
                None => return Err(WireError::Empty),
            },
            _ => {}
        }
        let needed = self.encoded_len();
        if out.len() < needed {
            return Err(WireError::BufferTooSmall {
                needed,
                have: out.len(),
            });
        }
        let out = &mut out[..needed];
        let put_id = |out: &mut [u8], id: &str| {
            out[0] = id.len() as u8;
            out[1..1 + id.len()].copy_from_slice(id.as_bytes());
        };
        match *self {
            ControlMessage::QadV4 { ip, port } => {
                out[0] = TYPE_QAD_V4;
                out[1..5].copy_from_slice(&ip);
                out[5..7].copy_from_slice(&port.to_be_bytes());
            }
            ControlMessage::QadV6 { ip, port } => {
                out[0] = TYPE_QAD_V6;
                out[1..17].copy_from_slice(&ip);
                out[17..19].copy_from_slice(&port.to_be_bytes());
            }
            ControlMessage::RegisterAgent { service } => {
                out[0] = TYPE_REGISTER_AGENT;
                put_id(&mut out[1..], service);
            }
            ControlMessage::RegisterConnector { service } => {
                out[0] = TYPE_REGISTER_CONNECTOR;
                put_id(&mut out[1..], service);
            }
            ControlMessage::RegisterAck { service } => {
                out[0] = TYPE_REGISTER_ACK;
                out[1] = 0;
                put_id(&mut out[2..], service);
            }
            ControlMessage::RegisterNack { status, service } => {
                out[0] = TYPE_REGISTER_NACK;
                out[1] = status.to_byte();
                put_id(&mut out[2..], service);
            }
            ControlMessage::ServicePacket { service, packet } => {
                out[0] = TYPE_SERVICE_PACKET;
                put_id(&mut out[1..], service);
                out[2 + service.len()..].copy_from_slice(packet);
            }
            ControlMessage::RawIp { packet } => out.copy_from_slice(packet),
        }
        Ok(needed)
    }
}

/// For a `0x10`/`0x11` DATAGRAM: the id bytes it carries, as far as the payload goes
/// (`len` bytes if present, fewer if the payload ends first, none if the length byte is
/// missing or 0). `None` for other message types. Used to answer a malformed
/// registration with a NACK that echoes what the client sent.
pub fn registration_id_bytes(buf: &[u8]) -> Option<&[u8]> {
    match buf.first() {
        Some(&TYPE_REGISTER_AGENT | &TYPE_REGISTER_CONNECTOR) => {}
        _ => return None,
    }
    let len = buf.get(1).copied().unwrap_or(0) as usize;
    let id = buf.get(2..).unwrap_or(&[]);
    Some(&id[..len.min(id.len())])
}

/// Encodes a NACK `13 | status | len | id[len]` from raw id bytes, which may be empty
/// or not UTF-8 (the answer to a malformed registration). Returns the bytes written.
pub fn encode_nack_bytes(
    status: NackStatus,
    id: &[u8],
    out: &mut [u8],
) -> Result<usize, WireError> {
    if id.len() > MAX_SERVICE_ID_LEN {
        return Err(WireError::LengthTooLong { len: id.len() });
    }
    let needed = 3 + id.len();
    if out.len() < needed {
        return Err(WireError::BufferTooSmall {
            needed,
            have: out.len(),
        });
    }
    out[0] = TYPE_REGISTER_NACK;
    out[1] = status.to_byte();
    out[2] = id.len() as u8;
    out[3..needed].copy_from_slice(id);
    Ok(needed)
}

/// Bytes a `0x2F` message adds in front of the IP packet for `service`.
pub const fn service_packet_overhead(service: &str) -> usize {
    2 + service.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(msg: ControlMessage<'_>) {
        let mut buf = [0u8; 600];
        let n = msg.encode(&mut buf).expect("encode");
        assert_eq!(n, msg.encoded_len());
        assert_eq!(ControlMessage::decode(&buf[..n]), Ok(msg));
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(ControlMessage::QadV4 {
            ip: [192, 0, 2, 7],
            port: 51234,
        });
        round_trip(ControlMessage::QadV6 {
            ip: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            port: 4433,
        });
        round_trip(ControlMessage::RegisterAgent { service: "echo" });
        round_trip(ControlMessage::RegisterConnector { service: "db.prod" });
        round_trip(ControlMessage::RegisterAck { service: "echo" });
        round_trip(ControlMessage::RegisterNack {
            status: NackStatus::NotAuthorized,
            service: "echo",
        });
        round_trip(ControlMessage::RegisterNack {
            status: NackStatus::InvalidId,
            service: "x",
        });
        round_trip(ControlMessage::ServicePacket {
            service: "échø",
            packet: &[0x45, 0, 0, 20],
        });
        round_trip(ControlMessage::ServicePacket {
            service: "s",
            packet: &[],
        });
        round_trip(ControlMessage::RawIp {
            packet: &[0x45, 1, 2, 3],
        });
        round_trip(ControlMessage::RawIp {
            packet: &[0x60, 1, 2, 3],
        });
        let long = core::str::from_utf8(&[b'a'; 255]).unwrap();
        round_trip(ControlMessage::RegisterAgent { service: long });
    }

    #[test]
    fn known_bytes() {
        let mut buf = [0u8; 32];
        let n = ControlMessage::QadV4 {
            ip: [127, 0, 0, 1],
            port: 0x1151,
        }
        .encode(&mut buf)
        .unwrap();
        assert_eq!(&buf[..n], &[1, 127, 0, 0, 1, 0x11, 0x51]);
        let n = ControlMessage::RegisterAck { service: "ab" }
            .encode(&mut buf)
            .unwrap();
        assert_eq!(&buf[..n], &[0x12, 0, 2, b'a', b'b']);
        let n = ControlMessage::RegisterNack {
            status: NackStatus::NotAuthorized,
            service: "ab",
        }
        .encode(&mut buf)
        .unwrap();
        assert_eq!(&buf[..n], &[0x13, 2, 2, b'a', b'b']);
        let n = ControlMessage::ServicePacket {
            service: "ab",
            packet: &[0x45, 9],
        }
        .encode(&mut buf)
        .unwrap();
        assert_eq!(&buf[..n], &[0x2F, 2, b'a', b'b', 0x45, 9]);
    }

    #[test]
    fn empty() {
        assert_eq!(ControlMessage::decode(&[]), Err(WireError::Empty));
    }

    #[test]
    fn truncated() {
        assert_eq!(
            ControlMessage::decode(&[1, 127, 0, 0, 1, 0]),
            Err(WireError::Truncated { needed: 7, have: 6 })
        );
        assert_eq!(
            ControlMessage::decode(&[2; 18]),
            Err(WireError::Truncated {
                needed: 19,
                have: 18
            })
        );
        assert_eq!(
            ControlMessage::decode(&[0x10]),
            Err(WireError::Truncated { needed: 1, have: 0 })
        );
        assert_eq!(
            ControlMessage::decode(&[0x12]),
            Err(WireError::Truncated { needed: 3, have: 1 })
        );
        assert_eq!(
            ControlMessage::decode(&[0x13]),
            Err(WireError::Truncated { needed: 3, have: 1 })
        );
        assert_eq!(
            ControlMessage::decode(&[0x2F]),
            Err(WireError::Truncated { needed: 1, have: 0 })
        );
    }

    #[test]
    fn length_past_payload() {
        for msg in [
            &[0x10, 5, b'a', b'b'][..],
            &[0x11, 3, b'a'][..],
            &[0x12, 0, 9, b'a'][..],
            &[0x13, 2, 2, b'a'][..],
            &[0x2F, 200, b'a', b'b', b'c'][..],
        ] {
            assert!(
                matches!(
                    ControlMessage::decode(msg),
                    Err(WireError::LengthPastPayload { .. })
                ),
                "{msg:?}"
            );
        }
        assert_eq!(
            ControlMessage::decode(&[0x10, 5, b'a', b'b']),
            Err(WireError::LengthPastPayload {
                len: 5,
                available: 2
            })
        );
    }

    #[test]
    fn length_zero() {
        for msg in [
            &[0x10, 0][..],
            &[0x11, 0][..],
            &[0x12, 0, 0][..],
            &[0x13, 1, 0][..],
            &[0x2F, 0, 0x45][..],
        ] {
            assert_eq!(
                ControlMessage::decode(msg),
                Err(WireError::LengthZero),
                "{msg:?}"
            );
        }
    }

    #[test]
    fn length_over_255_cannot_be_encoded() {
        let long = core::str::from_utf8(&[b'a'; 256]).unwrap();
        let mut buf = [0u8; 600];
        for msg in [
            ControlMessage::RegisterAgent { service: long },
            ControlMessage::RegisterConnector { service: long },
            ControlMessage::RegisterAck { service: long },
            ControlMessage::RegisterNack {
                status: NackStatus::InvalidId,
                service: long,
            },
            ControlMessage::ServicePacket {
                service: long,
                packet: &[],
            },
        ] {
            assert_eq!(
                msg.encode(&mut buf),
                Err(WireError::LengthTooLong { len: 256 })
            );
        }
        assert_eq!(check_service_id(""), Err(WireError::LengthZero));
    }

    #[test]
    fn bad_utf8() {
        for msg in [
            &[0x10, 2, 0xff, 0xfe][..],
            &[0x12, 0, 1, 0x80][..],
            &[0x13, 2, 1, 0xc3][..],
            &[0x2F, 1, 0xff, 0x45][..],
        ] {
            assert_eq!(
                ControlMessage::decode(msg),
                Err(WireError::BadUtf8),
                "{msg:?}"
            );
        }
    }

    #[test]
    fn unknown_type() {
        for t in [0x00u8, 0x03, 0x14, 0x2E, 0x30, 0x50, 0x7F, 0xFF] {
            assert_eq!(
                ControlMessage::decode(&[t, 1, 2, 3]),
                Err(WireError::UnknownType(t))
            );
        }
        // every first byte either decodes or yields a typed error; none panics
        for t in 0..=255u8 {
            let _ = ControlMessage::decode(&[t]);
        }
    }

    #[test]
    fn trailing_bytes_and_ack_status() {
        assert_eq!(
            ControlMessage::decode(&[1, 1, 2, 3, 4, 0, 1, 9]),
            Err(WireError::TrailingBytes { extra: 1 })
        );
        assert_eq!(
            ControlMessage::decode(&[0x10, 1, b'a', b'b']),
            Err(WireError::TrailingBytes { extra: 1 })
        );
        assert_eq!(
            ControlMessage::decode(&[0x12, 7, 1, b'a']),
            Err(WireError::BadAckStatus(7))
        );
        assert_eq!(
            ControlMessage::decode(&[0x13, 9, 1, b'a']),
            Ok(ControlMessage::RegisterNack {
                status: NackStatus::Other(9),
                service: "a"
            })
        );
        assert_eq!(
            ControlMessage::decode(&[0x13, 3, 1, b'a']),
            Ok(ControlMessage::RegisterNack {
                status: NackStatus::Draining,
                service: "a"
            })
        );
        for b in 0..=255u8 {
            assert_eq!(NackStatus::from_byte(b).to_byte(), b);
        }
    }

    #[test]
    fn malformed_registrations_echo_their_id_bytes() {
        assert_eq!(registration_id_bytes(&[0x10]), Some(&[][..]));
        assert_eq!(registration_id_bytes(&[0x11, 0]), Some(&[][..]));
        assert_eq!(
            registration_id_bytes(&[0x10, 2, 0xff, 0xfe]),
            Some(&[0xff, 0xfe][..])
        );
        assert_eq!(
            registration_id_bytes(&[0x10, 1, b'a', b'b']),
            Some(&b"a"[..])
        );
        assert_eq!(registration_id_bytes(&[0x10, 9, b'a']), Some(&b"a"[..]));
        assert_eq!(registration_id_bytes(&[0x2F, 1, b'a']), None);
        assert_eq!(registration_id_bytes(&[]), None);
        let mut buf = [0u8; 8];
        let n = encode_nack_bytes(NackStatus::InvalidId, &[], &mut buf).unwrap();
        assert_eq!(&buf[..n], &[0x13, 1, 0]);
        let n = encode_nack_bytes(NackStatus::InvalidId, &[0xff, 0xfe], &mut buf).unwrap();
        assert_eq!(&buf[..n], &[0x13, 1, 2, 0xff, 0xfe]);
        assert_eq!(
            encode_nack_bytes(NackStatus::InvalidId, &[0; 6], &mut buf),
            Err(WireError::BufferTooSmall { needed: 9, have: 8 })
        );
    }

    #[test]
    fn buffer_too_small() {
        let mut buf = [0u8; 3];
        assert_eq!(
            ControlMessage::RegisterAgent { service: "echo" }.encode(&mut buf),
            Err(WireError::BufferTooSmall { needed: 6, have: 3 })
        );
    }

    #[test]
    fn every_prefix_of_valid_messages_is_handled() {
        let mut buf = [0u8; 64];
        let n = ControlMessage::RegisterNack {
            status: NackStatus::NotAuthorized,
            service: "service",
        }
        .encode(&mut buf)
        .unwrap();
        for cut in 0..n {
            assert!(ControlMessage::decode(&buf[..cut]).is_err(), "cut {cut}");
        }
    }
}
