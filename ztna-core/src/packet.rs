//! IP packet helpers for the tunnel data path.
//!
//! Tunneled packets are raw IPv4/IPv6 packets (no link layer). Parsing and
//! building go through etherparse; the only checksum arithmetic done here is
//! the RFC 1624 incremental update used when rewriting a single 16-bit field,
//! which avoids re-summing the whole payload on every NATed packet.

use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};

use etherparse::{Icmpv4Type, Icmpv6Type, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Udp,
    Tcp,
    /// ICMPv4 echo request/reply.
    Icmp,
    /// ICMPv6 echo request/reply.
    Icmpv6,
}

/// 5-tuple of a flow as seen in a packet: for ICMP echo, src_port = dst_port = identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub proto: Proto,
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl FlowKey {
    /// The key of the return direction of this flow.
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("unsupported packet: {0}")]
    Unsupported(&'static str),
    #[error("packet too large: {size} bytes (max {max})")]
    TooLarge { size: usize, max: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortField {
    Src,
    Dst,
}

const TTL: u8 = 64;
const IPV4_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
/// UDP and ICMP echo headers are both 8 bytes.
const UDP_HEADER_LEN: usize = 8;

/// Largest transport payload that still fits the 16-bit IPv4 total length
/// (no options) or IPv6 payload length (no jumbograms) after an 8-byte
/// UDP/ICMP header.
fn max_payload(v4: bool) -> usize {
    if v4 {
        usize::from(u16::MAX) - IPV4_HEADER_LEN - UDP_HEADER_LEN
    } else {
        usize::from(u16::MAX) - UDP_HEADER_LEN
    }
}

fn check_payload_len(v4: bool, len: usize) -> Result<(), PacketError> {
    let max = max_payload(v4);
    if len > max {
        // Report the would-be IP packet size so the number is comparable
        // with an MTU.
        let overhead = if v4 { IPV4_HEADER_LEN } else { IPV6_HEADER_LEN } + UDP_HEADER_LEN;
        return Err(PacketError::TooLarge {
            size: len + overhead,
            max: max + overhead,
        });
    }
    Ok(())
}

/// A parsed, unfragmented IP packet with a transport layer etherparse knows.
struct View<'a> {
    src: IpAddr,
    dst: IpAddr,
    transport: TransportSlice<'a>,
    /// Offset of the transport header from the start of the packet, needed
    /// to patch fields in place after parsing the immutable view.
    l4_offset: usize,
}

fn view(packet: &[u8]) -> Result<View<'_>, PacketError> {
    let sliced =
        SlicedPacket::from_ip(packet).map_err(|e| PacketError::Malformed(e.to_string()))?;
    let (src, dst, payload) = match &sliced.net {
        Some(NetSlice::Ipv4(v4)) => (
            IpAddr::V4(v4.header().source_addr()),
            IpAddr::V4(v4.header().destination_addr()),
            v4.payload(),
        ),
        Some(NetSlice::Ipv6(v6)) => (
            IpAddr::V6(v6.header().source_addr()),
            IpAddr::V6(v6.header().destination_addr()),
            v6.payload(),
        ),
        Some(NetSlice::Arp(_)) | None => return Err(PacketError::Unsupported("not an IP packet")),
    };
    // etherparse stops before the transport layer for fragments, so without
    // this check they would surface as "unsupported protocol" instead.
    if payload.fragmented {
        return Err(PacketError::Unsupported("fragmented IP packet"));
    }
    // Address arithmetic only (no dereference): the payload is a subslice of
    // `packet`, so this cannot underflow.
    let l4_offset = payload.payload.as_ptr().addr() - packet.as_ptr().addr();
    let is_v4 = src.is_ipv4();
    let transport = match sliced.transport {
        Some(t @ (TransportSlice::Udp(_) | TransportSlice::Tcp(_))) => t,
        // etherparse dispatches on the protocol number alone, so ICMPv4 in
        // IPv6 (or ICMPv6 in IPv4) would otherwise be accepted.
        Some(t @ TransportSlice::Icmpv4(_)) if is_v4 => t,
        Some(t @ TransportSlice::Icmpv6(_)) if !is_v4 => t,
        Some(TransportSlice::Icmpv4(_) | TransportSlice::Icmpv6(_)) => {
            return Err(PacketError::Unsupported(
                "ICMP version does not match IP version",
            ));
        }
        Some(TransportSlice::Igmp(_)) | None => {
            return Err(PacketError::Unsupported("transport protocol"));
        }
    };
    Ok(View {
        src,
        dst,
        transport,
        l4_offset,
    })
}

/// Echo identifier of an ICMP echo request/reply, `None` for other ICMP types.
fn icmp_echo_id(transport: &TransportSlice<'_>) -> Option<u16> {
    match transport {
        TransportSlice::Icmpv4(icmp) => match icmp.icmp_type() {
            Icmpv4Type::EchoRequest(h) | Icmpv4Type::EchoReply(h) => Some(h.id),
            _ => None,
        },
        TransportSlice::Icmpv6(icmp) => match icmp.icmp_type() {
            Icmpv6Type::EchoRequest(h) | Icmpv6Type::EchoReply(h) => Some(h.id),
            _ => None,
        },
        _ => None,
    }
}

fn socket_addr(ip: IpAddr, port: u16) -> SocketAddr {
    match ip {
        IpAddr::V4(ip) => SocketAddr::V4(SocketAddrV4::new(ip, port)),
        IpAddr::V6(ip) => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
    }
}

/// Parse the flow key of an IPv4 or IPv6 packet (UDP, TCP, ICMP echo
/// request/reply, ICMPv6 echo request/reply). Fragments -> Unsupported.
pub fn flow_key(packet: &[u8]) -> Result<FlowKey, PacketError> {
    let v = view(packet)?;
    let (proto, sport, dport) = match &v.transport {
        TransportSlice::Udp(u) => (Proto::Udp, u.source_port(), u.destination_port()),
        TransportSlice::Tcp(t) => (Proto::Tcp, t.source_port(), t.destination_port()),
        t @ (TransportSlice::Icmpv4(_) | TransportSlice::Icmpv6(_)) => {
            let id = icmp_echo_id(t).ok_or(PacketError::Unsupported("non-echo ICMP"))?;
            let proto = if matches!(t, TransportSlice::Icmpv4(_)) {
                Proto::Icmp
            } else {
                Proto::Icmpv6
            };
            (proto, id, id)
        }
        TransportSlice::Igmp(_) => return Err(PacketError::Unsupported("transport protocol")),
    };
    Ok(FlowKey {
        proto,
        src: socket_addr(v.src, sport),
        dst: socket_addr(v.dst, dport),
    })
}

fn build_err(e: impl std::fmt::Display) -> PacketError {
    // Only reachable if the size pre-checks above are wrong; keep the message.
    PacketError::Malformed(e.to_string())
}

/// Build an IPv4 (if both addrs v4) or IPv6 UDP packet with valid IP and UDP
/// checksums, TTL/hop limit 64. Mixed address families -> Unsupported.
pub fn build_udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Result<Vec<u8>, PacketError> {
    let builder = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            check_payload_len(true, payload.len())?;
            PacketBuilder::ipv4(s.ip().octets(), d.ip().octets(), TTL).udp(s.port(), d.port())
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            check_payload_len(false, payload.len())?;
            PacketBuilder::ipv6(s.ip().octets(), d.ip().octets(), TTL).udp(s.port(), d.port())
        }
        _ => return Err(PacketError::Unsupported("mixed IPv4/IPv6 addresses")),
    };
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).map_err(build_err)?;
    Ok(out)
}

/// Parsed UDP packet view: (src, dst, payload) of an unfragmented IPv4/IPv6
/// UDP packet.
///
/// etherparse rejects a UDP length larger than the IP payload or in 1..8 and
/// trims the payload to the UDP length; a UDP length of 0 (which etherparse
/// treats as "use the IP payload length", for jumbograms) is rejected here
/// because the tunnel never carries jumbograms.
pub fn parse_udp(packet: &[u8]) -> Result<(SocketAddr, SocketAddr, &[u8]), PacketError> {
    let v = view(packet)?;
    let TransportSlice::Udp(udp) = v.transport else {
        return Err(PacketError::Unsupported("not UDP"));
    };
    if udp.length() == 0 {
        return Err(PacketError::Malformed("UDP length 0".into()));
    }
    Ok((
        socket_addr(v.src, udp.source_port()),
        socket_addr(v.dst, udp.destination_port()),
        udp.payload(),
    ))
}

/// If `packet` is an ICMPv4 echo request (or ICMPv6 echo request), build the
/// echo reply: addresses swapped, same id/seq/payload, valid checksums, fresh
/// TTL/hop limit of 64 (IPv4 options are not copied). Otherwise `None`.
pub fn icmp_echo_reply(packet: &[u8]) -> Option<Vec<u8>> {
    let v = view(packet).ok()?;
    let mut out = Vec::new();
    match (&v.transport, v.src, v.dst) {
        (TransportSlice::Icmpv4(icmp), IpAddr::V4(src), IpAddr::V4(dst)) => {
            let Icmpv4Type::EchoRequest(echo) = icmp.icmp_type() else {
                return None;
            };
            PacketBuilder::ipv4(dst.octets(), src.octets(), TTL)
                .icmpv4_echo_reply(echo.id, echo.seq)
                .write(&mut out, icmp.payload())
                .ok()?;
        }
        (TransportSlice::Icmpv6(icmp), IpAddr::V6(src), IpAddr::V6(dst)) => {
            let Icmpv6Type::EchoRequest(echo) = icmp.icmp_type() else {
                return None;
            };
            PacketBuilder::ipv6(dst.octets(), src.octets(), TTL)
                .icmpv6_echo_reply(echo.id, echo.seq)
                .write(&mut out, icmp.payload())
                .ok()?;
        }
        _ => return None,
    }
    Some(out)
}

/// The destination address of a raw IPv4/IPv6 packet, read from the fixed header
/// (the tunnel hot path needs nothing more to pick a route); `None` when the packet
/// is too short or neither version.
pub fn destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let b: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        6 => {
            let b: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

/// Build an ICMPv4/ICMPv6 echo request (for tests and the agent CLI `ping`).
pub fn build_icmp_echo_request(
    src: IpAddr,
    dst: IpAddr,
    id: u16,
    seq: u16,
    payload: &[u8],
) -> Result<Vec<u8>, PacketError> {
    let mut out = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            check_payload_len(true, payload.len())?;
            PacketBuilder::ipv4(s.octets(), d.octets(), TTL)
                .icmpv4_echo_request(id, seq)
                .write(&mut out, payload)
                .map_err(build_err)?;
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            check_payload_len(false, payload.len())?;
            PacketBuilder::ipv6(s.octets(), d.octets(), TTL)
                .icmpv6_echo_request(id, seq)
                .write(&mut out, payload)
                .map_err(build_err)?;
        }
        _ => return Err(PacketError::Unsupported("mixed IPv4/IPv6 addresses")),
    }
    Ok(out)
}

/// Rewrite in place the source port (`Src`) or destination port (`Dst`) of a
/// UDP/TCP packet, or the ICMP echo identifier (either `which`), updating the
/// transport checksum incrementally. Returns the old value.
///
/// A UDP checksum of 0 ("not computed") is left at 0 for both IPv4 and IPv6:
/// for IPv6 that is only legal under RFC 6936, and patching it would turn a
/// deliberate zero into a wrong non-zero checksum. A computed UDP checksum
/// that comes out as 0 is sent as 0xffff (RFC 768). The IPv4 header checksum
/// does not cover ports, so it is untouched.
pub fn rewrite_port(
    packet: &mut [u8],
    which: PortField,
    new_port: u16,
) -> Result<u16, PacketError> {
    let (field, csum, is_udp) = {
        let v = view(packet)?;
        let port = match which {
            PortField::Src => 0,
            PortField::Dst => 2,
        };
        let off = v.l4_offset;
        match &v.transport {
            TransportSlice::Udp(_) => (off + port, off + 6, true),
            TransportSlice::Tcp(_) => (off + port, off + 16, false),
            t @ (TransportSlice::Icmpv4(_) | TransportSlice::Icmpv6(_)) => {
                icmp_echo_id(t).ok_or(PacketError::Unsupported("non-echo ICMP"))?;
                (off + 4, off + 2, false)
            }
            TransportSlice::Igmp(_) => return Err(PacketError::Unsupported("transport protocol")),
        }
    };
    let old = read_u16(packet, field);
    if old == new_port {
        return Ok(old);
    }
    write_u16(packet, field, new_port);
    let old_csum = read_u16(packet, csum);
    if !(is_udp && old_csum == 0) {
        let mut new_csum = checksum_adjust(old_csum, old, new_port);
        if is_udp && new_csum == 0 {
            new_csum = 0xffff;
        }
        write_u16(packet, csum, new_csum);
    }
    Ok(old)
}

/// Lowers the MSS option of a TCP SYN (or SYN-ACK) to `max_mss` if it is larger,
/// fixing the TCP checksum incrementally; returns true if it changed the packet.
/// Both ends of a TCP connection through the tunnel then send segments that fit
/// the tunnel's MTU, whatever their own interfaces' MTUs (as `iptables ... TCPMSS
/// --clamp-mss-to-pmtu` does on routers). Anything else is left alone.
pub fn clamp_mss(packet: &mut [u8], max_mss: u16) -> bool {
    let Some(&first) = packet.first() else {
        return false;
    };
    let l4 = match first >> 4 {
        // IPv4, TCP, not a fragment (offset 0; MF may be set on a first fragment,
        // whose TCP header is still whole).
        4 if packet.len() >= 20 && packet[9] == 6 && read_u16(packet, 6) & 0x1fff == 0 => {
            usize::from(first & 0x0f) * 4
        }
        // IPv6 with TCP as the next header (no extension headers).
        6 if packet.len() >= 40 && packet[6] == 6 => 40,
        _ => return false,
    };
    let Some(tcp) = packet.get(l4..l4 + 20) else {
        return false;
    };
    let data_offset = usize::from(tcp[12] >> 4) * 4;
    let syn = tcp[13] & 0x02 != 0;
    if !syn || data_offset < 20 || packet.len() < l4 + data_offset {
        return false;
    }
    let mut i = l4 + 20;
    let end = l4 + data_offset;
    while i < end {
        match packet[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let Some(&len) = packet.get(i + 1) else {
                    return false;
                };
                let len = usize::from(len);
                if len < 2 || i + len > end {
                    return false;
                }
                if kind == 2 && len == 4 {
                    let mss = read_u16(packet, i + 2);
                    if mss <= max_mss {
                        return false;
                    }
                    write_u16(packet, i + 2, max_mss);
                    let csum = l4 + 16;
                    // Options need not be 16-bit aligned; an odd-aligned field adds
                    // to the one's-complement sum with its bytes swapped.
                    let (old, new) = if (i + 2 - l4) % 2 == 0 {
                        (mss, max_mss)
                    } else {
                        (mss.swap_bytes(), max_mss.swap_bytes())
                    };
                    let c = checksum_adjust(read_u16(packet, csum), old, new);
                    write_u16(packet, csum, c);
                    return true;
                }
                i += len;
            }
        }
    }
    false
}

/// An ICMP error the tunnel answers a packet with, as a router would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpError {
    /// No route for the destination: ICMPv4 destination unreachable code 13
    /// (communication administratively prohibited), ICMPv6 destination unreachable
    /// code 1 (administratively prohibited).
    Prohibited,
    /// Larger than the tunnel carries: ICMPv4 "fragmentation needed" (type 3 code
    /// 4) with this next-hop MTU, for IPv4 packets that forbid fragmentation;
    /// ICMPv6 "packet too big". The sender's kernel lowers its path MTU.
    TooBig { mtu: u16 },
}

/// The ICMP error `kind` about `packet`, from the packet's destination to its
/// source, quoting it as RFC 792 / RFC 4443 §3.1 ask (IPv4: header + 8 bytes; IPv6:
/// as much as fits in 1280 bytes). `None` where no error is due: malformed packets,
/// ICMP errors themselves (RFC 1122 §3.2.2, RFC 4443 §2.4), and IPv4 packets too
/// big but fragmentable.
pub fn icmp_error(packet: &[u8], kind: IcmpError) -> Option<Vec<u8>> {
    let v = view(packet).ok()?;
    if is_icmp_error(&v.transport) {
        return None;
    }
    let mut out = Vec::new();
    match (v.src, v.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let header = match kind {
                IcmpError::Prohibited => {
                    etherparse::icmpv4::DestUnreachableHeader::FilterProhibited
                }
                IcmpError::TooBig { mtu } => {
                    if read_u16(packet, 6) & 0x4000 == 0 {
                        return None;
                    }
                    etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                        next_hop_mtu: mtu,
                    }
                }
            };
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let quote = &packet[..packet.len().min(ihl + 8)];
            PacketBuilder::ipv4(dst.octets(), src.octets(), TTL)
                .icmpv4(Icmpv4Type::DestinationUnreachable(header))
                .write(&mut out, quote)
                .ok()?;
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let icmp = match kind {
                IcmpError::Prohibited => Icmpv6Type::DestinationUnreachable(
                    etherparse::icmpv6::DestUnreachableCode::Prohibited,
                ),
                IcmpError::TooBig { mtu } => Icmpv6Type::PacketTooBig {
                    mtu: u32::from(mtu),
                },
            };
            // 1280 minimum MTU - 40 (IPv6) - 8 (ICMPv6 header).
            let quote = &packet[..packet.len().min(1280 - 48)];
            PacketBuilder::ipv6(dst.octets(), src.octets(), TTL)
                .icmpv6(icmp)
                .write(&mut out, quote)
                .ok()?;
        }
        _ => return None,
    }
    Some(out)
}

/// ICMP messages other than echo: errors about them must not be sent.
fn is_icmp_error(t: &TransportSlice<'_>) -> bool {
    match t {
        TransportSlice::Icmpv4(icmp) => !matches!(
            icmp.icmp_type(),
            Icmpv4Type::EchoRequest(_) | Icmpv4Type::EchoReply(_)
        ),
        TransportSlice::Icmpv6(icmp) => !matches!(
            icmp.icmp_type(),
            Icmpv6Type::EchoRequest(_) | Icmpv6Type::EchoReply(_)
        ),
        _ => false,
    }
}

fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn write_u16(buf: &mut [u8], at: usize, value: u16) {
    buf[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

/// Incremental checksum update (RFC 1624 eqn 3): HC' = ~(~HC + ~m + m'), for
/// a 16-bit field change from `old` (m) to `new` (m').
///
/// Eqn 3 rather than eqn 2 because eqn 2 can yield 0xffff where a full
/// recomputation yields 0x0000.
pub fn checksum_adjust(checksum: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!checksum) + u32::from(!old) + u32::from(new);
    // Two folds suffice: three 16-bit terms carry at most 2 out of 16 bits,
    // and the first fold can carry at most once more.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{Ipv6FragmentHeader, Ipv6Header, ip_number};
    use std::net::{Ipv4Addr, Ipv6Addr};

    const V4A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const V4B: Ipv4Addr = Ipv4Addr::new(192, 168, 7, 9);
    const V6A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    const V6B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0xdead, 0xbeef, 0, 2);

    fn sa4(ip: Ipv4Addr, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(ip, port))
    }

    fn sa6(ip: Ipv6Addr, port: u16) -> SocketAddr {
        SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
    }

    fn sliced(pkt: &[u8]) -> SlicedPacket<'_> {
        SlicedPacket::from_ip(pkt).expect("etherparse parses packet")
    }

    /// Asserts the IPv4 header checksum (if any) and the transport checksum
    /// in `pkt` equal the ones etherparse computes from scratch.
    fn assert_checksums_valid(pkt: &[u8]) {
        let s = sliced(pkt);
        let (src, dst) = match s.net.as_ref().unwrap() {
            NetSlice::Ipv4(v4) => {
                let h = v4.header();
                assert_eq!(
                    h.header_checksum(),
                    h.to_header().calc_header_checksum(),
                    "IPv4 header checksum"
                );
                (
                    IpAddr::V4(h.source_addr()),
                    IpAddr::V4(h.destination_addr()),
                )
            }
            NetSlice::Ipv6(v6) => (
                IpAddr::V6(v6.header().source_addr()),
                IpAddr::V6(v6.header().destination_addr()),
            ),
            NetSlice::Arp(_) => panic!("arp"),
        };
        match (s.transport.as_ref().unwrap(), src, dst) {
            (TransportSlice::Udp(u), IpAddr::V4(a), IpAddr::V4(b)) => {
                let want = u
                    .to_header()
                    .calc_checksum_ipv4_raw(a.octets(), b.octets(), u.payload())
                    .unwrap();
                assert_eq!(u.checksum(), want, "UDP/IPv4 checksum");
            }
            (TransportSlice::Udp(u), IpAddr::V6(a), IpAddr::V6(b)) => {
                let want = u
                    .to_header()
                    .calc_checksum_ipv6_raw(a.octets(), b.octets(), u.payload())
                    .unwrap();
                assert_eq!(u.checksum(), want, "UDP/IPv6 checksum");
            }
            (TransportSlice::Tcp(t), IpAddr::V4(a), IpAddr::V4(b)) => {
                let want = t.calc_checksum_ipv4(a.octets(), b.octets()).unwrap();
                assert_eq!(t.checksum(), want, "TCP/IPv4 checksum");
            }
            (TransportSlice::Tcp(t), IpAddr::V6(a), IpAddr::V6(b)) => {
                let want = t.calc_checksum_ipv6(a.octets(), b.octets()).unwrap();
                assert_eq!(t.checksum(), want, "TCP/IPv6 checksum");
            }
            (TransportSlice::Icmpv4(i), _, _) => {
                let want = i.icmp_type().calc_checksum(i.payload());
                assert_eq!(i.checksum(), want, "ICMPv4 checksum");
            }
            (TransportSlice::Icmpv6(i), IpAddr::V6(a), IpAddr::V6(b)) => {
                let want = i
                    .icmp_type()
                    .calc_checksum(a.octets(), b.octets(), i.payload())
                    .unwrap();
                assert_eq!(i.checksum(), want, "ICMPv6 checksum");
                assert!(i.is_checksum_valid(a.octets(), b.octets()));
            }
            other => panic!("unexpected transport {other:?}"),
        }
    }

    fn build_tcp_v4(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4(V4A.octets(), V4B.octets(), 64)
            .tcp(sport, dport, 0x1234_5678, 4096)
            .syn();
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn build_tcp_v6(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv6(V6A.octets(), V6B.octets(), 64)
            .tcp(sport, dport, 7, 1024)
            .ack(99);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn udp_v4_round_trip() {
        let (src, dst) = (sa4(V4A, 40000), sa4(V4B, 53));
        let pkt = build_udp(src, dst, b"hello v4").unwrap();
        assert_eq!(pkt.len(), 20 + 8 + 8);
        assert_eq!(pkt[0] >> 4, 4);
        assert_eq!(pkt[8], 64, "TTL");
        let (s, d, p) = parse_udp(&pkt).unwrap();
        assert_eq!((s, d, p), (src, dst, &b"hello v4"[..]));
        let key = flow_key(&pkt).unwrap();
        assert_eq!(
            key,
            FlowKey {
                proto: Proto::Udp,
                src,
                dst
            }
        );
        assert_eq!(
            key.reversed(),
            FlowKey {
                proto: Proto::Udp,
                src: dst,
                dst: src
            }
        );
        assert_checksums_valid(&pkt);
        assert_ne!(read_u16(&pkt, 26), 0, "UDP checksum must be computed");
    }

    #[test]
    fn udp_v6_round_trip() {
        let (src, dst) = (sa6(V6A, 5555), sa6(V6B, 443));
        let payload: Vec<u8> = (0..=255u8).collect();
        let pkt = build_udp(src, dst, &payload).unwrap();
        assert_eq!(pkt.len(), 40 + 8 + 256);
        assert_eq!(pkt[0] >> 4, 6);
        assert_eq!(pkt[7], 64, "hop limit");
        let (s, d, p) = parse_udp(&pkt).unwrap();
        assert_eq!((s, d, p), (src, dst, &payload[..]));
        assert_eq!(
            flow_key(&pkt).unwrap(),
            FlowKey {
                proto: Proto::Udp,
                src,
                dst
            }
        );
        assert_checksums_valid(&pkt);
    }

    #[test]
    fn udp_empty_payload_and_limits() {
        let pkt = build_udp(sa4(V4A, 1), sa4(V4B, 2), &[]).unwrap();
        assert_eq!(parse_udp(&pkt).unwrap().2, &[] as &[u8]);
        assert_checksums_valid(&pkt);

        let max4 = 65535 - 28;
        assert!(build_udp(sa4(V4A, 1), sa4(V4B, 2), &vec![0; max4]).is_ok());
        assert_eq!(
            build_udp(sa4(V4A, 1), sa4(V4B, 2), &vec![0; max4 + 1]),
            Err(PacketError::TooLarge {
                size: 65536,
                max: 65535
            })
        );
        let max6 = 65535 - 8;
        assert!(build_udp(sa6(V6A, 1), sa6(V6B, 2), &vec![0; max6]).is_ok());
        assert!(matches!(
            build_udp(sa6(V6A, 1), sa6(V6B, 2), &vec![0; max6 + 1]),
            Err(PacketError::TooLarge { .. })
        ));
    }

    #[test]
    fn mixed_families_unsupported() {
        assert!(matches!(
            build_udp(sa4(V4A, 1), sa6(V6B, 2), b"x"),
            Err(PacketError::Unsupported(_))
        ));
        assert!(matches!(
            build_icmp_echo_request(V6A.into(), V4B.into(), 1, 1, b"x"),
            Err(PacketError::Unsupported(_))
        ));
    }

    #[test]
    fn parse_udp_rejects_other_protocols_and_zero_length() {
        let tcp = build_tcp_v4(1, 2, b"x");
        assert_eq!(parse_udp(&tcp), Err(PacketError::Unsupported("not UDP")));

        let mut pkt = build_udp(sa4(V4A, 1), sa4(V4B, 2), b"abc").unwrap();
        pkt[24..26].copy_from_slice(&[0, 0]);
        assert!(matches!(parse_udp(&pkt), Err(PacketError::Malformed(_))));

        // UDP length claiming more than the IP payload holds.
        let mut pkt = build_udp(sa4(V4A, 1), sa4(V4B, 2), b"abc").unwrap();
        pkt[24..26].copy_from_slice(&12u16.to_be_bytes());
        assert!(matches!(parse_udp(&pkt), Err(PacketError::Malformed(_))));
    }

    #[test]
    fn flow_key_tcp_and_icmp() {
        let tcp = build_tcp_v6(1234, 22, b"");
        assert_eq!(
            flow_key(&tcp).unwrap(),
            FlowKey {
                proto: Proto::Tcp,
                src: sa6(V6A, 1234),
                dst: sa6(V6B, 22)
            }
        );
        let ping = build_icmp_echo_request(V4A.into(), V4B.into(), 0xbeef, 3, b"p").unwrap();
        assert_eq!(
            flow_key(&ping).unwrap(),
            FlowKey {
                proto: Proto::Icmp,
                src: sa4(V4A, 0xbeef),
                dst: sa4(V4B, 0xbeef)
            }
        );
        let ping6 = build_icmp_echo_request(V6A.into(), V6B.into(), 77, 3, b"p").unwrap();
        assert_eq!(
            flow_key(&ping6).unwrap(),
            FlowKey {
                proto: Proto::Icmpv6,
                src: sa6(V6A, 77),
                dst: sa6(V6B, 77)
            }
        );
        // The reply belongs to the reversed flow.
        let reply = icmp_echo_reply(&ping6).unwrap();
        assert_eq!(
            flow_key(&reply).unwrap(),
            flow_key(&ping6).unwrap().reversed()
        );
    }

    #[test]
    fn flow_key_rejects_non_echo_icmp() {
        let mut out = Vec::new();
        PacketBuilder::ipv4(V4A.octets(), V4B.octets(), 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut out, &[0; 28])
            .unwrap();
        assert_eq!(
            flow_key(&out),
            Err(PacketError::Unsupported("non-echo ICMP"))
        );
        assert_eq!(icmp_echo_reply(&out), None);
        assert!(rewrite_port(&mut out, PortField::Src, 1).is_err());
    }

    #[test]
    fn icmpv4_in_ipv6_rejected() {
        // ICMPv4 (protocol 1) carried in IPv6 is not a valid echo.
        let ping = build_icmp_echo_request(V4A.into(), V4B.into(), 1, 1, b"abcd").unwrap();
        let icmp = &ping[20..];
        let hdr = Ipv6Header {
            traffic_class: 0,
            flow_label: Default::default(),
            payload_length: icmp.len() as u16,
            next_header: ip_number::ICMP,
            hop_limit: 64,
            source: V6A.octets(),
            destination: V6B.octets(),
        };
        let mut pkt = hdr.to_bytes().to_vec();
        pkt.extend_from_slice(icmp);
        assert!(matches!(flow_key(&pkt), Err(PacketError::Unsupported(_))));
        assert_eq!(icmp_echo_reply(&pkt), None);
    }

    fn check_rewrite(mut pkt: Vec<u8>, which: PortField, new: u16) {
        let before = flow_key(&pkt).unwrap();
        let old = rewrite_port(&mut pkt, which, new).unwrap();
        let after = flow_key(&pkt).unwrap();
        let expect = match (before.proto, which) {
            (Proto::Icmp | Proto::Icmpv6, _) => {
                assert_eq!(old, before.src.port());
                let mut k = before;
                k.src.set_port(new);
                k.dst.set_port(new);
                k
            }
            (_, PortField::Src) => {
                assert_eq!(old, before.src.port());
                let mut k = before;
                k.src.set_port(new);
                k
            }
            (_, PortField::Dst) => {
                assert_eq!(old, before.dst.port());
                let mut k = before;
                k.dst.set_port(new);
                k
            }
        };
        assert_eq!(after, expect);
        assert_checksums_valid(&pkt);
    }

    #[test]
    fn rewrite_port_udp_v4() {
        for new in [0, 1, 53, 0x8000, 0xfffe, 0xffff] {
            let pkt = build_udp(sa4(V4A, 40000), sa4(V4B, 53), b"payload!").unwrap();
            check_rewrite(pkt.clone(), PortField::Src, new);
            check_rewrite(pkt, PortField::Dst, new);
        }
    }

    #[test]
    fn rewrite_port_udp_v6() {
        for new in [0, 2, 443, 0xabcd, 0xffff] {
            let pkt = build_udp(sa6(V6A, 12345), sa6(V6B, 443), b"odd").unwrap();
            check_rewrite(pkt.clone(), PortField::Src, new);
            check_rewrite(pkt, PortField::Dst, new);
        }
    }

    #[test]
    fn rewrite_port_tcp() {
        for new in [0, 80, 0x7fff, 0xffff] {
            check_rewrite(build_tcp_v4(50000, 443, b"GET /"), PortField::Src, new);
            check_rewrite(build_tcp_v4(50000, 443, b"GET /"), PortField::Dst, new);
            check_rewrite(build_tcp_v6(50000, 443, b""), PortField::Src, new);
            check_rewrite(build_tcp_v6(50000, 443, b""), PortField::Dst, new);
        }
    }

    #[test]
    fn rewrite_port_icmp_echo() {
        for new in [0, 1, 0x1234, 0xffff] {
            let v4 = build_icmp_echo_request(V4A.into(), V4B.into(), 0x4242, 9, b"ping!").unwrap();
            check_rewrite(v4.clone(), PortField::Src, new);
            check_rewrite(v4.clone(), PortField::Dst, new);
            check_rewrite(icmp_echo_reply(&v4).unwrap(), PortField::Dst, new);
            let v6 = build_icmp_echo_request(V6A.into(), V6B.into(), 0x4242, 9, b"ping6").unwrap();
            check_rewrite(v6.clone(), PortField::Src, new);
            check_rewrite(icmp_echo_reply(&v6).unwrap(), PortField::Src, new);
        }
    }

    #[test]
    fn rewrite_port_udp_v4_zero_checksum_stays_zero() {
        let mut pkt = build_udp(sa4(V4A, 1000), sa4(V4B, 2000), b"nocsum").unwrap();
        pkt[26..28].copy_from_slice(&[0, 0]);
        assert_eq!(rewrite_port(&mut pkt, PortField::Src, 3000), Ok(1000));
        assert_eq!(&pkt[26..28], &[0, 0]);
        assert_eq!(flow_key(&pkt).unwrap().src.port(), 3000);
    }

    #[test]
    fn rewrite_port_udp_zero_result_becomes_ffff() {
        // Search for a rewrite whose incremental result is 0, which UDP must
        // send as 0xffff; the fresh computation (which maps 0 to 0xffff too)
        // must agree.
        let pkt = build_udp(sa4(V4A, 1000), sa4(V4B, 2000), b"zz").unwrap();
        let csum = read_u16(&pkt, 26);
        let new = (0..=u16::MAX)
            .find(|&p| checksum_adjust(csum, 1000, p) == 0)
            .expect("some port zeroes the checksum");
        let mut pkt2 = pkt.clone();
        rewrite_port(&mut pkt2, PortField::Src, new).unwrap();
        assert_eq!(read_u16(&pkt2, 26), 0xffff);
        assert_checksums_valid(&pkt2);
    }

    #[test]
    fn echo_reply_v4() {
        let payload = b"abcdefghijklmnopqrstuvwabcdefghi";
        let req = build_icmp_echo_request(V4A.into(), V4B.into(), 0x1234, 42, payload).unwrap();
        assert_checksums_valid(&req);
        let reply = icmp_echo_reply(&req).unwrap();
        assert_checksums_valid(&reply);
        let s = sliced(&reply);
        let Some(NetSlice::Ipv4(ip)) = &s.net else {
            panic!("not v4")
        };
        assert_eq!(ip.header().source_addr(), V4B);
        assert_eq!(ip.header().destination_addr(), V4A);
        let Some(TransportSlice::Icmpv4(icmp)) = &s.transport else {
            panic!("not icmp")
        };
        let Icmpv4Type::EchoReply(echo) = icmp.icmp_type() else {
            panic!("not reply")
        };
        assert_eq!((echo.id, echo.seq), (0x1234, 42));
        assert_eq!(icmp.payload(), payload);
        // A reply is not answered again.
        assert_eq!(icmp_echo_reply(&reply), None);
    }

    #[test]
    fn echo_reply_v6() {
        let payload: Vec<u8> = (0..100).collect();
        let req = build_icmp_echo_request(V6A.into(), V6B.into(), 7, 0xffff, &payload).unwrap();
        assert_checksums_valid(&req);
        let reply = icmp_echo_reply(&req).unwrap();
        assert_checksums_valid(&reply);
        let s = sliced(&reply);
        let Some(NetSlice::Ipv6(ip)) = &s.net else {
            panic!("not v6")
        };
        assert_eq!(ip.header().source_addr(), V6B);
        assert_eq!(ip.header().destination_addr(), V6A);
        let Some(TransportSlice::Icmpv6(icmp)) = &s.transport else {
            panic!("not icmpv6")
        };
        let Icmpv6Type::EchoReply(echo) = icmp.icmp_type() else {
            panic!("not reply")
        };
        assert_eq!((echo.id, echo.seq), (7, 0xffff));
        assert_eq!(icmp.payload(), &payload[..]);
        assert_eq!(icmp_echo_reply(&reply), None);
    }

    #[test]
    fn echo_reply_none_for_udp() {
        let pkt = build_udp(sa4(V4A, 1), sa4(V4B, 2), b"x").unwrap();
        assert_eq!(icmp_echo_reply(&pkt), None);
    }

    #[test]
    fn truncated_packets_error_without_panic() {
        let packets = vec![
            build_udp(sa4(V4A, 1), sa4(V4B, 2), b"some udp payload").unwrap(),
            build_udp(sa6(V6A, 1), sa6(V6B, 2), b"some udp payload").unwrap(),
            build_tcp_v4(1, 2, b"tcp data"),
            build_tcp_v6(1, 2, b"tcp data"),
            build_icmp_echo_request(V4A.into(), V4B.into(), 1, 2, b"ping").unwrap(),
            build_icmp_echo_request(V6A.into(), V6B.into(), 1, 2, b"ping").unwrap(),
        ];
        for full in packets {
            assert!(flow_key(&full).is_ok());
            for n in 0..full.len() {
                let cut = &full[..n];
                assert!(flow_key(cut).is_err(), "flow_key ok at len {n}");
                assert!(parse_udp(cut).is_err(), "parse_udp ok at len {n}");
                assert_eq!(icmp_echo_reply(cut), None, "echo reply at len {n}");
                let mut copy = cut.to_vec();
                assert!(rewrite_port(&mut copy, PortField::Src, 9).is_err());
                assert_eq!(copy, cut, "truncated packet modified at len {n}");
            }
        }
    }

    #[test]
    fn garbage_does_not_panic() {
        // Not asserting errors (some byte strings are valid packets), only
        // that arbitrary input never panics.
        let mut x: u32 = 0x1234_5678;
        for len in 0..200 {
            let mut buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            if let Some(b) = buf.first_mut() {
                *b = if len % 2 == 0 { 0x45 } else { 0x60 };
            }
            let _ = flow_key(&buf);
            let _ = parse_udp(&buf);
            let _ = icmp_echo_reply(&buf);
            let _ = rewrite_port(&mut buf, PortField::Dst, 1);
        }
    }

    #[test]
    fn ipv4_fragments_unsupported() {
        let base = build_udp(sa4(V4A, 1), sa4(V4B, 2), b"fragment me").unwrap();
        // More-fragments flag set, offset 0 (first fragment).
        let mut first = base.clone();
        first[6] |= 0x20;
        // Offset 8 bytes (1 unit), no more fragments (last fragment).
        let mut last = base.clone();
        last[6] = 0;
        last[7] = 1;
        for pkt in [first, last] {
            let mut pkt = pkt;
            assert_eq!(
                flow_key(&pkt),
                Err(PacketError::Unsupported("fragmented IP packet"))
            );
            assert_eq!(
                parse_udp(&pkt),
                Err(PacketError::Unsupported("fragmented IP packet"))
            );
            let before = pkt.clone();
            assert!(rewrite_port(&mut pkt, PortField::Src, 5).is_err());
            assert_eq!(pkt, before);
        }
        let mut ping = build_icmp_echo_request(V4A.into(), V4B.into(), 1, 1, b"x").unwrap();
        ping[6] |= 0x20;
        assert_eq!(icmp_echo_reply(&ping), None);
    }

    #[test]
    fn ipv6_fragment_unsupported() {
        let udp = build_udp(sa6(V6A, 1), sa6(V6B, 2), b"frag").unwrap();
        let l4 = &udp[40..];
        let frag = Ipv6FragmentHeader::new(ip_number::UDP, 0.try_into().unwrap(), true, 0xabcd);
        let hdr = Ipv6Header {
            traffic_class: 0,
            flow_label: Default::default(),
            payload_length: (8 + l4.len()) as u16,
            next_header: ip_number::IPV6_FRAGMENTATION_HEADER,
            hop_limit: 64,
            source: V6A.octets(),
            destination: V6B.octets(),
        };
        let mut pkt = hdr.to_bytes().to_vec();
        pkt.extend_from_slice(&frag.to_bytes());
        pkt.extend_from_slice(l4);
        assert_eq!(
            flow_key(&pkt),
            Err(PacketError::Unsupported("fragmented IP packet"))
        );
        assert_eq!(
            parse_udp(&pkt),
            Err(PacketError::Unsupported("fragmented IP packet"))
        );

        // An atomic fragment (offset 0, no more fragments) is a whole packet.
        let atomic = Ipv6FragmentHeader::new(ip_number::UDP, 0.try_into().unwrap(), false, 1);
        let mut pkt = hdr.to_bytes().to_vec();
        pkt.extend_from_slice(&atomic.to_bytes());
        pkt.extend_from_slice(l4);
        assert_eq!(parse_udp(&pkt).unwrap().2, b"frag");
        // rewrite_port must find the UDP header behind the extension header.
        rewrite_port(&mut pkt, PortField::Dst, 4242).unwrap();
        assert_eq!(flow_key(&pkt).unwrap().dst.port(), 4242);
        assert_checksums_valid(&pkt);
    }

    #[test]
    fn checksum_adjust_rfc1624_example() {
        // RFC 1624 section 4: HC = 0xDD2F, m = 0x5555, m' = 0x3285. Eqn 2
        // gives 0xFFFF; eqn 3 gives the correct 0x0000.
        assert_eq!(checksum_adjust(0xdd2f, 0x5555, 0x3285), 0x0000);
        // Changing a field and changing it back restores the checksum.
        let c = checksum_adjust(0x1c46, 0x1234, 0xabcd);
        assert_eq!(checksum_adjust(c, 0xabcd, 0x1234), 0x1c46);
        // Worked by hand: ~0x1c46 = 0xe3b9, ~0x1234 = 0xedcb;
        // 0xe3b9 + 0xedcb + 0xabcd = 0x27d51 -> 0x7d53, ~ = 0x82ac.
        assert_eq!(c, 0x82ac);
    }

    #[test]
    fn checksum_adjust_matches_full_recompute() {
        // IPv4 header example from RFC 1071 / Wikipedia: checksum 0xb861.
        let mut hdr = [
            0x45u8, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        let h = etherparse::Ipv4HeaderSlice::from_slice(&hdr)
            .unwrap()
            .to_header();
        assert_eq!(h.calc_header_checksum(), 0xb861);
        for new_id in [1u16, 0x4000, 0xffff, 0x1234] {
            let old_id = read_u16(&hdr, 4);
            let adjusted = checksum_adjust(read_u16(&hdr, 10), old_id, new_id);
            write_u16(&mut hdr, 4, new_id);
            let fresh = etherparse::Ipv4HeaderSlice::from_slice(&hdr)
                .unwrap()
                .to_header()
                .calc_header_checksum();
            assert_eq!(adjusted, fresh, "id {new_id:#x}");
            write_u16(&mut hdr, 10, fresh);
        }
    }

    /// A SYN (or SYN-ACK) whose MSS option sits at an odd offset (`ack`: after
    /// other options) or an even one (first).
    fn tcp_syn(src: SocketAddr, dst: SocketAddr, mss: u16, ack: bool) -> Vec<u8> {
        use etherparse::TcpOptionElement::{
            MaximumSegmentSize, Noop, SelectiveAcknowledgementPermitted, WindowScale,
        };
        let b = match (src, dst) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                PacketBuilder::ipv4(s.ip().octets(), d.ip().octets(), 64)
            }
            (SocketAddr::V6(s), SocketAddr::V6(d)) => {
                PacketBuilder::ipv6(s.ip().octets(), d.ip().octets(), 64)
            }
            _ => unreachable!(),
        };
        let mut b = b.tcp(src.port(), dst.port(), 1000, 64240).syn();
        if ack {
            b = b.ack(7);
        }
        let odd = [
            Noop,
            WindowScale(7),
            SelectiveAcknowledgementPermitted,
            Noop,
            MaximumSegmentSize(mss),
        ];
        let even = [MaximumSegmentSize(mss), Noop, WindowScale(7)];
        let b = b.options(if ack { &odd[..] } else { &even[..] }).unwrap();
        let mut out = Vec::new();
        b.write(&mut out, &[]).unwrap();
        out
    }

    fn mss_of(pkt: &[u8]) -> u16 {
        let TransportSlice::Tcp(tcp) = sliced(pkt).transport.unwrap() else {
            panic!("tcp")
        };
        tcp.options_iterator()
            .find_map(|o| match o {
                Ok(etherparse::TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
                _ => None,
            })
            .expect("an MSS option")
    }

    #[test]
    fn clamp_mss_lowers_large_mss_only_and_keeps_checksums_valid() {
        for (src, dst, clamp) in [
            (sa4(V4A, 40000), sa4(V4B, 80), 1240),
            (sa6(V6A, 40000), sa6(V6B, 443), 1220),
        ] {
            for ack in [false, true] {
                let mut p = tcp_syn(src, dst, 1460, ack);
                assert!(clamp_mss(&mut p, clamp));
                assert_eq!(mss_of(&p), clamp);
                assert_checksums_valid(&p);
                // Already small enough: untouched.
                let mut q = tcp_syn(src, dst, 1000, ack);
                let before = q.clone();
                assert!(!clamp_mss(&mut q, clamp));
                assert_eq!(q, before);
            }
        }
        // Not a SYN: untouched, even with an MSS-looking option.
        let mut p = build_udp(sa4(V4A, 1), sa4(V4B, 2), &[2, 4, 0xff, 0xff]).unwrap();
        let before = p.clone();
        assert!(!clamp_mss(&mut p, 1240));
        assert_eq!(p, before);
        // Truncated and garbage input never panics.
        let syn = tcp_syn(sa4(V4A, 1), sa4(V4B, 2), 1460, false);
        for cut in 0..syn.len() {
            let mut t = syn[..cut].to_vec();
            clamp_mss(&mut t, 1240);
        }
    }

    #[test]
    fn too_big_errors_carry_the_mtu_and_respect_df() {
        let big = build_udp(sa4(V4A, 1), sa4(V4B, 2), &[1u8; 1400]).unwrap();
        // etherparse sets DF on the packets it builds.
        assert_ne!(read_u16(&big, 6) & 0x4000, 0);
        let e = icmp_error(&big, IcmpError::TooBig { mtu: 1280 }).expect("an ICMP error");
        let TransportSlice::Icmpv4(icmp) = sliced(&e).transport.unwrap() else {
            panic!("icmpv4")
        };
        assert_eq!(
            icmp.icmp_type(),
            Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1280
                }
            )
        );
        assert_checksums_valid(&e);
        // Without DF the packet may be fragmented: no error.
        let mut frag_ok = big.clone();
        frag_ok[6] &= !0x40;
        assert_eq!(icmp_error(&frag_ok, IcmpError::TooBig { mtu: 1280 }), None);
        let big6 = build_udp(sa6(V6A, 1), sa6(V6B, 2), &[1u8; 1400]).unwrap();
        let e6 = icmp_error(&big6, IcmpError::TooBig { mtu: 1280 }).unwrap();
        let TransportSlice::Icmpv6(icmp) = sliced(&e6).transport.unwrap() else {
            panic!("icmpv6")
        };
        assert_eq!(icmp.icmp_type(), Icmpv6Type::PacketTooBig { mtu: 1280 });
        assert!(e6.len() <= 1280);
        assert_checksums_valid(&e6);
    }
}
