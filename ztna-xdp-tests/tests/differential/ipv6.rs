//! IPv6 frames for the differential test: relayed ones a state would forward, and
//! their mutations.

use std::net::{Ipv6Addr, SocketAddrV6};

use fastrand::Rng;
use ztna_common::relay::RELAY_CID_MARKER;
use ztna_xdp_tests::*;

use super::{State, get16, pick, quic_payload, random_mac, set16};

/// Where the IPv6 header's fields and the UDP header sit in a frame.
const IP: usize = 14;
const UDP: usize = IP + 40;
const QUIC: usize = UDP + 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mutation6 {
    Truncate,
    Padding,
    ExtensionHeader,
    NextHeader,
    IpVersion,
    Marker,
    OtherRelay,
    SenderAddress,
    SenderPort,
    UnknownCid,
    Destination,
    DestinationPort,
    UdpChecksumZero,
    UdpChecksumRandom,
    PayloadLengthShort,
    PayloadLengthLong,
    LongHeaderDcidLength,
    RandomByte,
}

pub const MUTATIONS6: [Mutation6; 18] = [
    Mutation6::Truncate,
    Mutation6::Padding,
    Mutation6::ExtensionHeader,
    Mutation6::NextHeader,
    Mutation6::IpVersion,
    Mutation6::Marker,
    Mutation6::OtherRelay,
    Mutation6::SenderAddress,
    Mutation6::SenderPort,
    Mutation6::UnknownCid,
    Mutation6::Destination,
    Mutation6::DestinationPort,
    Mutation6::UdpChecksumZero,
    Mutation6::UdpChecksumRandom,
    Mutation6::PayloadLengthShort,
    Mutation6::PayloadLengthLong,
    Mutation6::LongHeaderDcidLength,
    Mutation6::RandomByte,
];

/// An IPv6 relayed packet the state would forward (if its peer is reachable): a
/// `ZTNA_RELAY6` CID from its expected sender to a local IPv6 address and the relay
/// port. A valid UDP checksum, random hop limit, traffic class and flow label.
pub fn relayed6(rng: &mut Rng, state: &State) -> Vec<u8> {
    let (cid, e) = state.maps.entries6[rng.usize(..state.maps.entries6.len())];
    let dst_ip = if state.maps.local_addrs6.is_empty() {
        *RELAY6.ip()
    } else {
        state.maps.local_addrs6[rng.usize(..state.maps.local_addrs6.len())]
    };
    let port = if state.maps.port == 0 {
        RELAY6.port()
    } else {
        state.maps.port
    };
    let long = rng.u8(..4) == 0;
    let max_payload = state.max_frame - 62;
    let len = match rng.u8(..4) {
        0 => rng.usize(..=64),
        1 => rng.usize(..=max_payload),
        2 => rng.usize(max_payload.saturating_sub(64)..=max_payload),
        _ => rng.usize(..=1300.min(max_payload)),
    };
    let payload = quic_payload(rng, cid, long, len);
    let payload = &payload[..payload.len().min(max_payload)];
    let (hop_limit, class, label) = (rng.u8(..), rng.u8(..), rng.u32(..0x10_0000));
    udp6_frame_with(
        random_mac(rng),
        RELAY_MAC,
        e.expected_sender,
        SocketAddrV6::new(dst_ip, port, 0, 0),
        hop_limit,
        payload,
        |ip| {
            ip.traffic_class = class;
            ip.flow_label = etherparse::Ipv6FlowLabel::try_new(label).unwrap();
        },
    )
}

/// Offset of the DCID in a frame built by `relayed6`.
fn dcid_offset(f: &[u8]) -> usize {
    if f[QUIC] & 0x80 == 0 {
        QUIC + 1
    } else {
        QUIC + 6
    }
}

pub fn mutate6(rng: &mut Rng, state: &State, f: &mut Vec<u8>, m: Mutation6) {
    use Mutation6::*;
    match m {
        Truncate => {
            let cut = if rng.bool() {
                rng.usize(..f.len())
            } else {
                rng.usize(..f.len().min(80))
            };
            f.truncate(cut);
        }
        Padding => {
            let n = rng.usize(1..=46);
            for _ in 0..n {
                f.push(rng.u8(..));
            }
            f.truncate(state.max_frame);
        }
        ExtensionHeader => {
            f[IP + 6] = pick(rng, &[0, 43, 44, 60, 51, 135, 139, 140, 253, 254]);
        }
        NextHeader => {
            let any = rng.u8(..);
            f[IP + 6] = pick(rng, &[6, 58, 59, 50, 41, any]);
        }
        IpVersion => f[IP] = (rng.u8(..16) << 4) | (f[IP] & 0x0f),
        Marker => {
            let at = dcid_offset(f);
            f[at] = loop {
                let b = rng.u8(..);
                if b != RELAY_CID_MARKER {
                    break b;
                }
            };
        }
        OtherRelay => {
            let at = dcid_offset(f);
            let id = loop {
                let id = rng.u16(..);
                if id != state.maps.relay_id {
                    break id;
                }
            };
            set16(f, at + 1, id);
        }
        SenderAddress => {
            let a: Ipv6Addr = if rng.bool() {
                let mut a = RELAY6.ip().octets();
                a[15] = rng.u8(..);
                a.into()
            } else {
                rng.u128(..).into()
            };
            f[IP + 8..IP + 24].copy_from_slice(&a.octets());
        }
        SenderPort => set16(f, UDP, rng.u16(..)),
        UnknownCid => {
            let at = dcid_offset(f);
            f[at] = RELAY_CID_MARKER;
            set16(f, at + 1, state.maps.relay_id);
            rng.fill(&mut f[at + 3..at + 8]);
        }
        Destination => {
            let a: Ipv6Addr = match rng.u8(..3) {
                0 => *FAR_PEER6.ip(),
                1 => *PEER6.ip(),
                _ => rng.u128(..).into(),
            };
            f[IP + 24..IP + 40].copy_from_slice(&a.octets());
        }
        DestinationPort => {
            let any = rng.u16(..);
            let p = pick(rng, &[RELAY6.port(), 443, 0, any]);
            set16(f, UDP + 2, p);
        }
        UdpChecksumZero => set16(f, UDP + 6, 0),
        UdpChecksumRandom => {
            let c = if rng.bool() { 0xffff } else { rng.u16(1..) };
            set16(f, UDP + 6, c);
        }
        PayloadLengthShort => {
            let t = rng.u16(..=get16(f, IP + 4));
            set16(f, IP + 4, t);
        }
        PayloadLengthLong => {
            let t = get16(f, IP + 4);
            set16(f, IP + 4, t.saturating_add(rng.u16(1..=64)));
        }
        LongHeaderDcidLength => {
            f[QUIC] |= 0x80;
            if f.len() > QUIC + 5 {
                let any = rng.u8(..);
                f[QUIC + 5] = pick(rng, &[0, 1, 4, 7, 9, 16, 20, 8, any]);
            }
        }
        RandomByte => {
            let at = rng.usize(..f.len().min(80));
            f[at] = rng.u8(..);
        }
    }
}
