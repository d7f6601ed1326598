//! IPv4 frames for the differential test: relayed ones a state would forward, and
//! their mutations.

use std::net::SocketAddrV4;

use etherparse::Ipv4Header;
use fastrand::Rng;
use ztna_common::relay::RELAY_CID_MARKER;
use ztna_xdp_tests::*;

use super::{
    FAR_LOCAL, NOT_LOCAL, OTHER_LOCAL, OTHER_RELAY_ID, State, get16, pick, quic_payload,
    random_mac, set16,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mutation {
    Truncate,
    Padding,
    IpOptions,
    BadIhl,
    MoreFragments,
    FragmentOffset,
    Marker,
    OtherRelay,
    SenderAddress,
    SenderPort,
    UnknownCid,
    Destination,
    Ethertype,
    IpVersion,
    Protocol,
    DestinationPort,
    UdpChecksumZero,
    UdpChecksumRandom,
    IpChecksumRandom,
    TotalLengthShort,
    TotalLengthLong,
    LongHeaderDcidLength,
    RandomByte,
}

pub const MUTATIONS: [Mutation; 23] = [
    Mutation::Truncate,
    Mutation::Padding,
    Mutation::IpOptions,
    Mutation::BadIhl,
    Mutation::MoreFragments,
    Mutation::FragmentOffset,
    Mutation::Marker,
    Mutation::OtherRelay,
    Mutation::SenderAddress,
    Mutation::SenderPort,
    Mutation::UnknownCid,
    Mutation::Destination,
    Mutation::Ethertype,
    Mutation::IpVersion,
    Mutation::Protocol,
    Mutation::DestinationPort,
    Mutation::UdpChecksumZero,
    Mutation::UdpChecksumRandom,
    Mutation::IpChecksumRandom,
    Mutation::TotalLengthShort,
    Mutation::TotalLengthLong,
    Mutation::LongHeaderDcidLength,
    Mutation::RandomByte,
];

/// A relayed packet the state would forward (if its peer is reachable): a table
/// CID from its expected sender to a local address and the relay port. Valid
/// checksums, random TTL, TOS, ID and DF.
pub fn relayed(rng: &mut Rng, state: &State) -> Vec<u8> {
    let (cid, e) = state.maps.entries[rng.usize(..state.maps.entries.len())];
    let dst_ip = if state.maps.local_addrs.is_empty() {
        *RELAY.ip()
    } else {
        state.maps.local_addrs[rng.usize(..state.maps.local_addrs.len())]
    };
    let port = if state.maps.port == 0 {
        RELAY.port()
    } else {
        state.maps.port
    };
    let long = rng.u8(..4) == 0;
    // Short and odd lengths often, up to what the state's frames may hold.
    let max_payload = state.max_frame - 42;
    let len = match rng.u8(..4) {
        0 => rng.usize(..=64),
        1 => rng.usize(..=max_payload),
        2 => rng.usize(max_payload.saturating_sub(64)..=max_payload),
        _ => rng.usize(..=1300.min(max_payload)),
    };
    let payload = quic_payload(rng, cid, long, len);
    let payload = &payload[..payload.len().min(max_payload)];
    let (ttl, tos, id, df) = (rng.u8(..), rng.u8(..), rng.u16(..), rng.bool());
    udp_frame_with(
        random_mac(rng),
        RELAY_MAC,
        e.expected_sender,
        SocketAddrV4::new(dst_ip, port),
        ttl,
        payload,
        |ip| {
            ip.dscp = etherparse::IpDscp::try_new(tos >> 2).unwrap();
            ip.ecn = etherparse::IpEcn::try_new(tos & 3).unwrap();
            ip.identification = id;
            ip.dont_fragment = df;
        },
    )
}

/// Recomputes the IPv4 header checksum (after a mutation of the header), so that
/// the mutation is the only thing wrong.
fn fix_ip_checksum(f: &mut [u8]) {
    let ihl = usize::from(f[14] & 0x0f) * 4;
    if ihl < 20 || f.len() < 14 + ihl {
        return;
    }
    if let Ok((h, _)) = Ipv4Header::from_slice(&f[14..]) {
        set16(f, 24, h.calc_header_checksum());
    }
}

/// Offset of the DCID in a frame built by `relayed`.
fn dcid_offset(f: &[u8]) -> usize {
    if f[42] & 0x80 == 0 { 43 } else { 48 }
}

pub fn mutate(rng: &mut Rng, state: &State, f: &mut Vec<u8>, m: Mutation) {
    use Mutation::*;
    match m {
        Truncate => {
            // Every length from nothing to one short, the header boundaries often.
            let cut = if rng.bool() {
                rng.usize(..f.len())
            } else {
                rng.usize(..f.len().min(60))
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
        IpOptions => {
            // A real options header (NOPs and EOL), IHL 6..=15.
            let words = rng.usize(1..=10);
            let mut hdr = Ipv4Header::from_slice(&f[14..]).unwrap().0;
            let opts: Vec<u8> = (0..words * 4)
                .map(|i| if i + 1 == words * 4 { 0 } else { 1 })
                .collect();
            hdr.options = opts.as_slice().try_into().unwrap();
            hdr.total_len += (words * 4) as u16;
            hdr.header_checksum = hdr.calc_header_checksum();
            let mut out = f[..14].to_vec();
            hdr.write(&mut out).unwrap();
            out.extend_from_slice(&f[34..]);
            out.truncate(state.max_frame);
            *f = out;
        }
        BadIhl => {
            let ihl = rng.u8(..16);
            f[14] = 0x40 | ihl;
            fix_ip_checksum(f);
        }
        MoreFragments => {
            f[20] |= 0x20;
            fix_ip_checksum(f);
        }
        FragmentOffset => {
            let off = rng.u16(1..0x2000);
            let flags = get16(f, 20) & 0xe000;
            set16(f, 20, flags | off);
            fix_ip_checksum(f);
        }
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
                let id = if rng.bool() {
                    OTHER_RELAY_ID
                } else {
                    rng.u16(..)
                };
                if id != state.maps.relay_id {
                    break id;
                }
            };
            set16(f, at + 1, id);
        }
        SenderAddress => {
            let a = if rng.bool() {
                [10, 250, 0, rng.u8(..)]
            } else {
                rng.u32(..).to_be_bytes()
            };
            f[26..30].copy_from_slice(&a);
            fix_ip_checksum(f);
        }
        SenderPort => set16(f, 34, rng.u16(..)),
        UnknownCid => {
            let at = dcid_offset(f);
            f[at] = RELAY_CID_MARKER;
            set16(f, at + 1, state.maps.relay_id);
            rng.fill(&mut f[at + 3..at + 8]);
        }
        Destination => {
            let a = match rng.u8(..4) {
                0 => NOT_LOCAL,
                1 => OTHER_LOCAL,
                2 => FAR_LOCAL,
                _ => rng.u32(..).into(),
            };
            f[30..34].copy_from_slice(&a.octets());
            fix_ip_checksum(f);
        }
        Ethertype => {
            let any = rng.u16(..);
            let t = pick(rng, &[0x86dd, 0x0806, 0x8100, 0x88a8, 0x0801, 0x0008, any]);
            set16(f, 12, t);
        }
        IpVersion => {
            f[14] = (rng.u8(..16) << 4) | 5;
            fix_ip_checksum(f);
        }
        Protocol => {
            let any = rng.u8(..);
            f[23] = pick(rng, &[6, 1, 0, 41, 136, any]);
            fix_ip_checksum(f);
        }
        DestinationPort => {
            let any = rng.u16(..);
            let p = pick(rng, &[RELAY.port(), 443, 0, any]);
            set16(f, 36, p);
        }
        UdpChecksumZero => set16(f, 40, 0),
        UdpChecksumRandom => {
            let c = if rng.bool() { 0xffff } else { rng.u16(..) };
            set16(f, 40, c);
        }
        IpChecksumRandom => set16(f, 24, rng.u16(..)),
        TotalLengthShort => {
            let t = rng.u16(..=get16(f, 16));
            set16(f, 16, t);
            fix_ip_checksum(f);
        }
        TotalLengthLong => {
            let t = get16(f, 16);
            set16(f, 16, t.saturating_add(rng.u16(1..=64)));
            fix_ip_checksum(f);
        }
        LongHeaderDcidLength => {
            // Make it a long header with another DCID length (8 sometimes, too).
            f[42] |= 0x80;
            if f.len() > 47 {
                let any = rng.u8(..);
                f[47] = pick(rng, &[0, 1, 4, 7, 9, 16, 20, 8, any]);
            }
        }
        RandomByte => {
            let at = rng.usize(..f.len().min(64));
            f[at] = rng.u8(..);
        }
    }
}
