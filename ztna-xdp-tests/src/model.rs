//! A plain-Rust model of the XDP relay's forwarding decision, written from its
//! documented behaviour (the pipeline in `ztna-ebpf/src/main.rs`'s header and the
//! README, the map layouts and `Verdict` in `ztna_common::relay`), not from its code:
//! a pure function of the frame, the maps' contents and the routing facts of the
//! harness namespace, for the differential test (`tests/xdp_differential.rs`).
//!
//! The documented pipeline, stage by stage; each stage needs its bytes in the frame,
//! and a frame that ends before them is `pass_truncated`:
//!
//! 1. Ethernet: ethertype 0x0800 (IPv4, below) or 0x86DD (IPv6, the list after
//!    this one), else `pass_not_ip`.
//! 2. IPv4: version 4 (else `pass_not_ip`), IHL 5 (else `pass_ip_options`), the
//!    20-byte header, not a fragment (MF or an offset: `pass_fragment`), protocol UDP
//!    (else `pass_not_udp`).
//! 3. UDP header; the relay port configured (`ZTNA_CONFIG` port 0:
//!    `pass_not_configured`) and the destination port equal to it (`pass_other_port`).
//! 4. The destination address one of the relay's own (`ZTNA_LOCAL_ADDRS`; an empty
//!    map holds none): else `pass_not_local_address`.
//! 5. QUIC DCID: short header (bit 0x80 clear) → the 8 bytes after the first byte;
//!    long header → the DCID length byte after the 4-byte version must be 8 (else
//!    `pass_not_relay_cid`) and the DCID follows it.
//! 6. The IP packet is whole: the frame holds its total length, and that length holds
//!    the headers parsed so far (UDP and the DCID), else `pass_truncated`
//!    ("the packet ends inside the ... UDP or QUIC header").
//! 7. The DCID starts with the relay-CID marker (else `pass_not_relay_cid`), its
//!    relay ID (bytes 1..=2) is the configured one (else `pass_other_relay`, even if
//!    the CID is in the table), it is a key of `ZTNA_RELAY` (else
//!    `pass_unknown_cid`), and the packet's source address and port are the entry's
//!    expected sender (else `pass_sender_mismatch`).
//! 8. A route and neighbour to the peer (`pass_fib_miss` if none), then the rewrite:
//!    MACs of the egress interface and the neighbour; source = the packet's
//!    destination address and port (the relay's); destination = the peer; TTL 64;
//!    IP and UDP checksums updated incrementally (RFC 1624), so a checksum that was
//!    wrong stays wrong by as much, a UDP checksum of 0 (none) stays 0 and a computed
//!    0 goes out as 0xffff (RFC 768). Nothing else changes, Ethernet padding
//!    included. Out of the ingress interface: `XDP_TX` (`tx`); out of another:
//!    `XDP_REDIRECT` (`redirect`).
//!
//! IPv6 (ethertype 0x86DD):
//!
//! 2. The fixed 40-byte header; version 6 (else `pass_not_ip`); next header UDP,
//!    else 44 `pass_fragment`, an extension header (0, 43, 60, 51, 135, 139, 140,
//!    253, 254) `pass_ip_options`, anything else `pass_not_udp`.
//! 3. and 4. as for IPv4, with `ZTNA_LOCAL_ADDRS6`.
//! 5. A UDP checksum of 0 (forbidden in IPv6): `pass_zero_udp_checksum`.
//! 6. and 7. as for IPv4 (the DCID after the UDP header at 54; the packet ends at
//!    54 + payload length), with `ZTNA_RELAY6`.
//! 8. Route for a packet of 40 + payload length bytes; the rewrite sets the hop
//!    limit to 64, the addresses and ports as for IPv4, and updates the UDP
//!    checksum incrementally, a computed 0 going out as 0xffff.
//!
//! Every packet that is not forwarded is passed unchanged.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use ztna_common::relay::{RELAY_CID_LEN, RELAY_CID_MARKER, Verdict, relay_id_of};

use crate::{
    FAR_MAC, FAR_PEER, FAR_PEER_MAC, FAR_PEER6, PEER, PEER_MAC, PEER6, RELAY_MAC, XDP_PASS,
    XDP_REDIRECT, XDP_TX,
};

/// TTL of forwarded packets (a new packet from the relay, as its userspace
/// forwarder's socket sends).
pub const MODEL_RELAY_TTL: u8 = 64;
/// Shortest frame BPF_PROG_TEST_RUN accepts for XDP (an Ethernet header); shorter
/// ones are refused with EINVAL before the program runs.
pub const MIN_TEST_RUN_FRAME: usize = 14;

/// One `ZTNA_RELAY` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelEntry {
    pub peer: SocketAddrV4,
    pub expected_sender: SocketAddrV4,
}

/// One `ZTNA_RELAY6` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelEntry6 {
    pub peer: SocketAddrV6,
    pub expected_sender: SocketAddrV6,
}

/// What the maps hold.
#[derive(Clone, Debug, Default)]
pub struct ModelMaps {
    /// `ZTNA_CONFIG`'s relay port (host order); 0 is "not configured".
    pub port: u16,
    /// `ZTNA_CONFIG`'s relay ID (host order).
    pub relay_id: u16,
    /// `ZTNA_LOCAL_ADDRS`.
    pub local_addrs: Vec<Ipv4Addr>,
    /// `ZTNA_LOCAL_ADDRS6`.
    pub local_addrs6: Vec<Ipv6Addr>,
    /// `ZTNA_RELAY`: relay CID → entry.
    pub entries: Vec<([u8; RELAY_CID_LEN], ModelEntry)>,
    /// `ZTNA_RELAY6`.
    pub entries6: Vec<([u8; RELAY_CID_LEN], ModelEntry6)>,
}

impl ModelMaps {
    fn entry(&self, cid: &[u8]) -> Option<ModelEntry> {
        self.entries
            .iter()
            .find(|(k, _)| k.as_slice() == cid)
            .map(|(_, e)| *e)
    }

    fn entry6(&self, cid: &[u8]) -> Option<ModelEntry6> {
        self.entries6
            .iter()
            .find(|(k, _)| k.as_slice() == cid)
            .map(|(_, e)| *e)
    }
}

/// Where a route leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelHop {
    /// Out of the interface the packet came in on (else another one).
    pub out_ingress: bool,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// The routing facts the program's route lookup sees.
pub trait RoutingFacts {
    /// The next hop towards `dst` for a packet of `ip_total_len` bytes, if the route
    /// exists, has a neighbour entry, and the packet fits the egress MTU.
    fn next_hop(&self, dst: Ipv4Addr, ip_total_len: u16) -> Option<ModelHop>;
    /// The same for IPv6 (`ip_len`: header and payload).
    fn next_hop6(&self, dst: Ipv6Addr, ip_len: u16) -> Option<ModelHop>;
}

/// The harness namespace of `lib.rs`: t0 (ingress) 10.250.0.0/24 with neighbour PEER,
/// r0 10.250.1.0/24 with neighbour FAR_PEER, no other routes, MTU 1500 on both
/// (veth's default). Other addresses on the two subnets have no neighbour.
#[derive(Clone, Copy, Debug, Default)]
pub struct HarnessRoutes;

/// veth's default MTU: the route lookup refuses bigger packets (it would fragment).
pub const HARNESS_MTU: u16 = 1500;

impl RoutingFacts for HarnessRoutes {
    fn next_hop(&self, dst: Ipv4Addr, ip_total_len: u16) -> Option<ModelHop> {
        if ip_total_len > HARNESS_MTU {
            return None;
        }
        if dst == *PEER.ip() {
            Some(ModelHop {
                out_ingress: true,
                src_mac: RELAY_MAC,
                dst_mac: PEER_MAC,
            })
        } else if dst == *FAR_PEER.ip() {
            Some(ModelHop {
                out_ingress: false,
                src_mac: FAR_MAC,
                dst_mac: FAR_PEER_MAC,
            })
        } else {
            None
        }
    }

    /// t0 fd00:250::/64 with neighbour PEER6, r0 fd00:251::/64 with FAR_PEER6.
    fn next_hop6(&self, dst: Ipv6Addr, ip_len: u16) -> Option<ModelHop> {
        if ip_len > HARNESS_MTU {
            return None;
        }
        if dst == *PEER6.ip() {
            Some(ModelHop {
                out_ingress: true,
                src_mac: RELAY_MAC,
                dst_mac: PEER_MAC,
            })
        } else if dst == *FAR_PEER6.ip() {
            Some(ModelHop {
                out_ingress: false,
                src_mac: FAR_MAC,
                dst_mac: FAR_PEER_MAC,
            })
        } else {
            None
        }
    }
}

/// What the program must do with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// BPF_PROG_TEST_RUN refuses the frame (EINVAL); no counter moves.
    Refused,
    Ran(Outcome),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// XDP action.
    pub action: u32,
    /// The one `ZTNA_STATS` counter that moves by one.
    pub verdict: Verdict,
    /// The frame as the program leaves it.
    pub output: Vec<u8>,
    /// The session whose packet and byte counters move (forwarded packets only).
    pub forwarded: Option<[u8; RELAY_CID_LEN]>,
}

fn pass(frame: &[u8], verdict: Verdict) -> Expected {
    Expected::Ran(Outcome {
        action: XDP_PASS,
        verdict,
        output: frame.to_vec(),
        forwarded: None,
    })
}

const ETH_LEN: usize = 14;
const IP_OFF: usize = ETH_LEN;
const IP_LEN: usize = 20;
const UDP_OFF: usize = IP_OFF + IP_LEN;
const UDP_LEN: usize = 8;
const QUIC_OFF: usize = UDP_OFF + UDP_LEN;
const IP6_LEN: usize = 40;
const UDP6_OFF: usize = IP_OFF + IP6_LEN;
const QUIC6_OFF: usize = UDP6_OFF + UDP_LEN;
/// IPv6 extension headers other than the fragment header (44).
const IPV6_EXTENSION_HEADERS: [u8; 9] = [0, 43, 60, 51, 135, 139, 140, 253, 254];

/// The model: what the program does with `frame` arriving on the ingress interface.
pub fn decide(frame: &[u8], maps: &ModelMaps, routes: &impl RoutingFacts) -> Expected {
    use Verdict::*;
    if frame.len() < MIN_TEST_RUN_FRAME {
        return Expected::Refused;
    }
    let has = |end: usize| frame.len() >= end;
    let be16 = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    let ipv4_at = |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);

    // 1. Ethernet.
    if be16(12) == 0x86dd {
        return decide6(frame, maps, routes);
    }
    if be16(12) != 0x0800 {
        return pass(frame, PassNotIp);
    }
    // 2. IPv4.
    if !has(IP_OFF + 1) {
        return pass(frame, PassTruncated);
    }
    let (version, ihl) = (frame[IP_OFF] >> 4, frame[IP_OFF] & 0x0f);
    if version != 4 {
        return pass(frame, PassNotIp);
    }
    if ihl != 5 {
        return pass(frame, PassIpOptions);
    }
    if !has(IP_OFF + IP_LEN) {
        return pass(frame, PassTruncated);
    }
    let more_fragments = frame[IP_OFF + 6] & 0x20 != 0;
    let fragment_offset = be16(IP_OFF + 6) & 0x1fff;
    if more_fragments || fragment_offset != 0 {
        return pass(frame, PassFragment);
    }
    if frame[IP_OFF + 9] != 17 {
        return pass(frame, PassNotUdp);
    }
    let total_len = usize::from(be16(IP_OFF + 2));
    let src = SocketAddrV4::new(ipv4_at(IP_OFF + 12), 0);
    let dst_addr = ipv4_at(IP_OFF + 16);
    // 3. UDP to the relay port.
    if !has(UDP_OFF + UDP_LEN) {
        return pass(frame, PassTruncated);
    }
    if maps.port == 0 {
        return pass(frame, PassNotConfigured);
    }
    let (src_port, dst_port) = (be16(UDP_OFF), be16(UDP_OFF + 2));
    if dst_port != maps.port {
        return pass(frame, PassOtherPort);
    }
    // 4. To the relay itself.
    if !maps.local_addrs.contains(&dst_addr) {
        return pass(frame, PassNotLocalAddress);
    }
    // 5.-7. The DCID, the whole IP packet, a relay CID of this relay.
    let dcid = match relay_dcid(frame, QUIC_OFF, IP_OFF + total_len, maps) {
        Ok(d) => d,
        Err(v) => return pass(frame, v),
    };
    let dcid = &dcid[..];
    let Some(entry) = maps.entry(dcid) else {
        return pass(frame, PassUnknownCid);
    };
    let sender = SocketAddrV4::new(*src.ip(), src_port);
    if sender != entry.expected_sender {
        return pass(frame, PassSenderMismatch);
    }
    // 8. Route, rewrite, out.
    let Some(hop) = routes.next_hop(*entry.peer.ip(), total_len as u16) else {
        return pass(frame, PassFibMiss);
    };
    let relay = SocketAddrV4::new(dst_addr, dst_port);
    let output = rewrite(frame, hop, relay, entry.peer);
    let (action, verdict) = if hop.out_ingress {
        (XDP_TX, Tx)
    } else {
        (XDP_REDIRECT, Redirect)
    };
    Expected::Ran(Outcome {
        action,
        verdict,
        output,
        forwarded: Some(dcid.try_into().expect("8 bytes")),
    })
}

/// Stages 5 to 7 up to the table: the DCID of the QUIC header at `quic_off`, in
/// an IP packet ending at `ip_end`, if it is a relay CID with the configured
/// relay ID.
fn relay_dcid(
    frame: &[u8],
    quic_off: usize,
    ip_end: usize,
    maps: &ModelMaps,
) -> Result<[u8; RELAY_CID_LEN], Verdict> {
    use Verdict::*;
    let has = |end: usize| frame.len() >= end;
    if !has(quic_off + 1) {
        return Err(PassTruncated);
    }
    let dcid_off = if frame[quic_off] & 0x80 == 0 {
        quic_off + 1
    } else {
        if !has(quic_off + 6) {
            return Err(PassTruncated);
        }
        if usize::from(frame[quic_off + 5]) != RELAY_CID_LEN {
            return Err(PassNotRelayCid);
        }
        quic_off + 6
    };
    let dcid_end = dcid_off + RELAY_CID_LEN;
    if !has(dcid_end) {
        return Err(PassTruncated);
    }
    // The whole IP packet, holding what was parsed.
    if ip_end > frame.len() || ip_end < dcid_end {
        return Err(PassTruncated);
    }
    let dcid: [u8; RELAY_CID_LEN] = frame[dcid_off..dcid_end].try_into().expect("8 bytes");
    if dcid[0] != RELAY_CID_MARKER {
        return Err(PassNotRelayCid);
    }
    if relay_id_of(&dcid) != maps.relay_id {
        return Err(PassOtherRelay);
    }
    Ok(dcid)
}

/// The IPv6 half of [`decide`], from stage 2 on.
fn decide6(frame: &[u8], maps: &ModelMaps, routes: &impl RoutingFacts) -> Expected {
    use Verdict::*;
    let has = |end: usize| frame.len() >= end;
    let be16 = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    let ipv6_at = |at: usize| {
        let b: [u8; 16] = frame[at..at + 16].try_into().expect("16 bytes");
        Ipv6Addr::from(b)
    };
    // 2. IPv6, fixed header.
    if !has(IP_OFF + IP6_LEN) {
        return pass(frame, PassTruncated);
    }
    if frame[IP_OFF] >> 4 != 6 {
        return pass(frame, PassNotIp);
    }
    match frame[IP_OFF + 6] {
        17 => {}
        44 => return pass(frame, PassFragment),
        n if IPV6_EXTENSION_HEADERS.contains(&n) => return pass(frame, PassIpOptions),
        _ => return pass(frame, PassNotUdp),
    }
    let payload_len = usize::from(be16(IP_OFF + 4));
    let src = ipv6_at(IP_OFF + 8);
    let dst_addr = ipv6_at(IP_OFF + 24);
    // 3. UDP to the relay port.
    if !has(UDP6_OFF + UDP_LEN) {
        return pass(frame, PassTruncated);
    }
    if maps.port == 0 {
        return pass(frame, PassNotConfigured);
    }
    let (src_port, dst_port) = (be16(UDP6_OFF), be16(UDP6_OFF + 2));
    if dst_port != maps.port {
        return pass(frame, PassOtherPort);
    }
    // 4. To the relay itself.
    if !maps.local_addrs6.contains(&dst_addr) {
        return pass(frame, PassNotLocalAddress);
    }
    // 5. A checksum to update.
    if be16(UDP6_OFF + 6) == 0 {
        return pass(frame, PassZeroUdpChecksum);
    }
    // 6. and 7.
    let dcid = match relay_dcid(frame, QUIC6_OFF, UDP6_OFF + payload_len, maps) {
        Ok(d) => d,
        Err(v) => return pass(frame, v),
    };
    let Some(entry) = maps.entry6(&dcid) else {
        return pass(frame, PassUnknownCid);
    };
    if SocketAddrV6::new(src, src_port, 0, 0) != entry.expected_sender {
        return pass(frame, PassSenderMismatch);
    }
    // 8. Route, rewrite, out.
    let Some(hop) = routes.next_hop6(*entry.peer.ip(), (IP6_LEN + payload_len) as u16) else {
        return pass(frame, PassFibMiss);
    };
    let relay = SocketAddrV6::new(dst_addr, dst_port, 0, 0);
    let output = rewrite6(frame, hop, relay, entry.peer);
    let (action, verdict) = if hop.out_ingress {
        (XDP_TX, Tx)
    } else {
        (XDP_REDIRECT, Redirect)
    };
    Expected::Ran(Outcome {
        action,
        verdict,
        output,
        forwarded: Some(dcid),
    })
}

/// The rewritten IPv6 frame: MACs, hop limit, addresses, ports and the UDP checksum
/// change; the rest is copied.
fn rewrite6(frame: &[u8], hop: ModelHop, relay: SocketAddrV6, peer: SocketAddrV6) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[0..6].copy_from_slice(&hop.dst_mac);
    out[6..12].copy_from_slice(&hop.src_mac);
    out[IP_OFF + 7] = MODEL_RELAY_TTL;
    out[IP_OFF + 8..IP_OFF + 24].copy_from_slice(&relay.ip().octets());
    out[IP_OFF + 24..IP_OFF + 40].copy_from_slice(&peer.ip().octets());
    out[UDP6_OFF..UDP6_OFF + 2].copy_from_slice(&relay.port().to_be_bytes());
    out[UDP6_OFF + 2..UDP6_OFF + 4].copy_from_slice(&peer.port().to_be_bytes());
    // The pseudo-header's addresses and the ports are what changed under the sum.
    let covered = |f: &[u8]| {
        let mut words = Vec::with_capacity(36);
        words.extend_from_slice(&f[IP_OFF + 8..IP_OFF + 40]);
        words.extend_from_slice(&f[UDP6_OFF..UDP6_OFF + 4]);
        ones_sum(&words)
    };
    let old_check = u16::from_be_bytes([frame[UDP6_OFF + 6], frame[UDP6_OFF + 7]]);
    let c = carried_checksum(old_check, covered(frame), covered(&out));
    let c = if c == 0 { 0xffff } else { c };
    out[UDP6_OFF + 6..UDP6_OFF + 8].copy_from_slice(&c.to_be_bytes());
    out
}

/// The rewritten frame: everything but the MACs, TTL, addresses, ports and the two
/// checksums is copied.
fn rewrite(frame: &[u8], hop: ModelHop, relay: SocketAddrV4, peer: SocketAddrV4) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[0..6].copy_from_slice(&hop.dst_mac);
    out[6..12].copy_from_slice(&hop.src_mac);

    let old_ip = &frame[IP_OFF..IP_OFF + IP_LEN];
    let ip = &mut out[IP_OFF..IP_OFF + IP_LEN];
    ip[8] = MODEL_RELAY_TTL;
    ip[12..16].copy_from_slice(&relay.ip().octets());
    ip[16..20].copy_from_slice(&peer.ip().octets());
    let old_check = u16::from_be_bytes([old_ip[10], old_ip[11]]);
    let new_check = carried_checksum(
        old_check,
        sum_except_checksum(old_ip, 10),
        sum_except_checksum(ip, 10),
    );
    ip[10..12].copy_from_slice(&new_check.to_be_bytes());

    let old_udp_check = u16::from_be_bytes([frame[UDP_OFF + 6], frame[UDP_OFF + 7]]);
    out[UDP_OFF..UDP_OFF + 2].copy_from_slice(&relay.port().to_be_bytes());
    out[UDP_OFF + 2..UDP_OFF + 4].copy_from_slice(&peer.port().to_be_bytes());
    if old_udp_check != 0 {
        // The words the rewrite changes that the UDP checksum covers: the
        // pseudo-header's addresses and the ports (the rest cancels out).
        let covered = |f: &[u8]| {
            let mut words = Vec::with_capacity(12);
            words.extend_from_slice(&f[IP_OFF + 12..IP_OFF + 20]);
            words.extend_from_slice(&f[UDP_OFF..UDP_OFF + 4]);
            ones_sum(&words)
        };
        let c = carried_checksum(old_udp_check, covered(frame), covered(&out));
        let c = if c == 0 { 0xffff } else { c };
        out[UDP_OFF + 6..UDP_OFF + 8].copy_from_slice(&c.to_be_bytes());
    }
    out
}

/// The ones'-complement sum of big-endian 16-bit words, reduced mod 0xffff (so +0
/// and −0 are the same value, 0).
fn ones_sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum::<u32>()
        % 0xffff
}

fn sum_except_checksum(header: &[u8], checksum_at: usize) -> u32 {
    let mut h = header.to_vec();
    h[checksum_at..checksum_at + 2].fill(0);
    ones_sum(&h)
}

/// The checksum after the covered data's sum went from `old_sum` to `new_sum`, with
/// the old checksum's error carried over: in ones'-complement arithmetic
/// checksum + sum is unchanged. Written as 0x0000 for zero, never 0xffff: what RFC
/// 1624's eqn. 3 gives when some new word is non-zero, as every rewritten field is
/// here (and what a checksum computed from scratch gives).
fn carried_checksum(old_check: u16, old_sum: u32, new_sum: u32) -> u16 {
    let v = (u32::from(old_check) % 0xffff + old_sum + 0xffff - new_sum) % 0xffff;
    v as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        IN_TTL, RELAY, RELAY_TTL, SENDER, SENDER_MAC, cid, from_relay, quic_short, to_relay,
    };

    fn maps() -> ModelMaps {
        ModelMaps {
            port: RELAY.port(),
            relay_id: crate::RELAY_ID,
            local_addrs: vec![*RELAY.ip()],
            local_addrs6: vec![*crate::RELAY6.ip()],
            entries: vec![(
                cid(1),
                ModelEntry {
                    peer: PEER,
                    expected_sender: SENDER,
                },
            )],
            entries6: vec![(
                cid(2),
                ModelEntry6 {
                    peer: PEER6,
                    expected_sender: crate::SENDER6,
                },
            )],
        }
    }

    #[test]
    fn an_ipv6_packet_is_rewritten_as_built_from_scratch() {
        for len in [9, 100, 1001] {
            let payload = quic_short(cid(2), len);
            let o = ran(decide(&crate::to_relay6(&payload), &maps(), &HarnessRoutes));
            assert_eq!((o.action, o.verdict), (XDP_TX, Verdict::Tx));
            assert_eq!(
                o.output,
                crate::from_relay6(RELAY_MAC, PEER_MAC, PEER6, &payload)
            );
        }
        // The IPv4 entry is not an IPv6 one, nor the other way round.
        let v = |f: &[u8]| ran(decide(f, &maps(), &HarnessRoutes)).verdict;
        assert_eq!(
            v(&crate::to_relay6(&quic_short(cid(1), 50))),
            Verdict::PassUnknownCid
        );
        assert_eq!(
            v(&to_relay(&quic_short(cid(2), 50))),
            Verdict::PassUnknownCid
        );
        let other = crate::other_relay_cid(crate::RELAY_ID ^ 1, 1);
        assert_eq!(
            v(&to_relay(&quic_short(other, 50))),
            Verdict::PassOtherRelay
        );
        assert_eq!(
            v(&crate::to_relay6(&quic_short(other, 50))),
            Verdict::PassOtherRelay
        );
    }

    fn ran(e: Expected) -> Outcome {
        match e {
            Expected::Ran(o) => o,
            Expected::Refused => panic!("refused"),
        }
    }

    #[test]
    fn a_valid_packet_is_rewritten_as_built_from_scratch() {
        assert_eq!(RELAY_TTL, MODEL_RELAY_TTL);
        for len in [9, 10, 100, 1001] {
            let payload = quic_short(cid(1), len);
            let o = ran(decide(&to_relay(&payload), &maps(), &HarnessRoutes));
            assert_eq!((o.action, o.verdict), (XDP_TX, Verdict::Tx));
            assert_eq!(o.output, from_relay(RELAY_MAC, PEER_MAC, PEER, &payload));
            assert_eq!(o.forwarded, Some(cid(1)));
        }
    }

    #[test]
    fn a_wrong_checksum_stays_wrong_by_as_much() {
        let payload = quic_short(cid(1), 77);
        let mut pkt = to_relay(&payload);
        let want = from_relay(RELAY_MAC, PEER_MAC, PEER, &payload);
        // +1 on the IP checksum, -2 on the UDP one (ones'-complement: wrong by 1, 2).
        let ip = u16::from_be_bytes([pkt[24], pkt[25]]);
        pkt[24..26].copy_from_slice(&(ip.wrapping_add(1)).to_be_bytes());
        let udp = u16::from_be_bytes([pkt[40], pkt[41]]);
        pkt[40..42].copy_from_slice(&(udp.wrapping_sub(2)).to_be_bytes());
        let o = ran(decide(&pkt, &maps(), &HarnessRoutes));
        let ip_out = u16::from_be_bytes([o.output[24], o.output[25]]);
        let ip_want = u16::from_be_bytes([want[24], want[25]]);
        assert_eq!(
            (u32::from(ip_out) + 0xffff - u32::from(ip_want)) % 0xffff,
            1
        );
        let udp_out = u16::from_be_bytes([o.output[40], o.output[41]]);
        let udp_want = u16::from_be_bytes([want[40], want[41]]);
        assert_eq!(
            (u32::from(udp_want) + 0xffff - u32::from(udp_out)) % 0xffff,
            2
        );
        assert_eq!(o.output[..24], want[..24]);
        assert_eq!(o.output[26..40], want[26..40]);
        assert_eq!(o.output[42..], want[42..]);
    }

    #[test]
    fn stages_in_order() {
        let m = maps();
        let good = to_relay(&quic_short(cid(1), 40));
        let v = |f: &[u8], m: &ModelMaps| ran(decide(f, m, &HarnessRoutes)).verdict;
        assert_eq!(decide(&good[..13], &m, &HarnessRoutes), Expected::Refused);
        assert_eq!(v(&good[..14], &m), Verdict::PassTruncated);
        let mut not_local = m.clone();
        not_local.local_addrs.clear();
        assert_eq!(v(&good, &not_local), Verdict::PassNotLocalAddress);
        let mut unconfigured = m.clone();
        unconfigured.port = 0;
        assert_eq!(v(&good, &unconfigured), Verdict::PassNotConfigured);
        let mut short_total = good.clone();
        short_total[17] = 20 + 8 + 8; // ends inside the DCID
        assert_eq!(v(&short_total, &m), Verdict::PassTruncated);
        let other_sender = crate::udp_frame(
            SENDER_MAC,
            RELAY_MAC,
            SocketAddrV4::new(*SENDER.ip(), 1),
            RELAY,
            IN_TTL,
            &quic_short(cid(1), 40),
        );
        assert_eq!(v(&other_sender, &m), Verdict::PassSenderMismatch);
        let mut far = m.clone();
        far.entries[0].1.peer = crate::NO_ROUTE_PEER;
        assert_eq!(v(&good, &far), Verdict::PassFibMiss);
    }
}
