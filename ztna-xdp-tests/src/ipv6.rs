//! The IPv6 half of the harness: addresses of the namespace's IPv6 side, the
//! fixture's IPv6 maps (`ZTNA_RELAY6`, `ZTNA_SESSION_STATS6`, `ZTNA_LOCAL_ADDRS6`)
//! and Ethernet/IPv6/UDP frames.

use std::net::{Ipv6Addr, SocketAddrV6};

use aya::maps::{HashMap, MapData, PerCpuHashMap, PerCpuValues};
use etherparse::{Ipv6Header, PacketBuilder};
use ztna_common::relay::{
    LOCAL_ADDR_PRESENT, MAP_LOCAL_ADDRS6, MAP_RELAY6, MAP_SESSION_STATS6, RelayEntry6, RelayKey,
    SessionStats6,
};

use crate::{Fixture, IN_TTL, RELAY_MAC, RELAY_TTL, SENDER_MAC};

const fn v6(segments: [u16; 8], port: u16) -> SocketAddrV6 {
    let [a, b, c, d, e, f, g, h] = segments;
    SocketAddrV6::new(Ipv6Addr::new(a, b, c, d, e, f, g, h), port, 0, 0)
}

/// t0's IPv6 address: the relay.
pub const RELAY6: SocketAddrV6 = v6([0xfd00, 0x250, 0, 0, 0, 0, 0, 1], 4433);
/// t0's IPv6 neighbour (MAC `PEER_MAC`).
pub const PEER6: SocketAddrV6 = v6([0xfd00, 0x250, 0, 0, 0, 0, 0, 2], 5555);
pub const SENDER6: SocketAddrV6 = v6([0xfd00, 0x250, 0, 0, 0, 0, 0, 9], 7777);
/// r0's IPv6 neighbour (MAC `FAR_PEER_MAC`).
pub const FAR_PEER6: SocketAddrV6 = v6([0xfd00, 0x251, 0, 0, 0, 0, 0, 2], 6666);
/// On t0's subnet, without a neighbour entry.
pub const NO_NEIGH_PEER6: SocketAddrV6 = v6([0xfd00, 0x250, 0, 0, 0, 0, 0, 0x77], 5555);
/// Documentation prefix: no route in the namespace.
pub const NO_ROUTE_PEER6: SocketAddrV6 = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], 5555);

impl Fixture {
    /// Adds `addr` to ZTNA_LOCAL_ADDRS6 (the fixture starts with RELAY6's).
    pub fn add_local_addr6(&mut self, addr: Ipv6Addr) {
        let mut m: HashMap<&mut MapData, [u8; 16], u8> =
            HashMap::try_from(self.ebpf.map_mut(MAP_LOCAL_ADDRS6).expect(MAP_LOCAL_ADDRS6))
                .unwrap();
        m.insert(addr.octets(), LOCAL_ADDR_PRESENT, 0).unwrap();
    }

    /// Removes `addr` from ZTNA_LOCAL_ADDRS6.
    pub fn remove_local_addr6(&mut self, addr: Ipv6Addr) {
        let mut m: HashMap<&mut MapData, [u8; 16], u8> =
            HashMap::try_from(self.ebpf.map_mut(MAP_LOCAL_ADDRS6).expect(MAP_LOCAL_ADDRS6))
                .unwrap();
        m.remove(&addr.octets()).unwrap();
    }

    /// An IPv6 forwarding entry only: `cid` → `peer`, accepted only from `expected`.
    pub fn insert_entry6(&mut self, cid: [u8; 8], peer: SocketAddrV6, expected: SocketAddrV6) {
        let mut relay: HashMap<&mut MapData, RelayKey, RelayEntry6> =
            HashMap::try_from(self.ebpf.map_mut(MAP_RELAY6).expect(MAP_RELAY6)).unwrap();
        relay
            .insert(
                RelayKey { cid },
                RelayEntry6 {
                    peer_addr: peer.ip().octets(),
                    expected_src_addr: expected.ip().octets(),
                    peer_port: peer.port().to_be(),
                    expected_src_port: expected.port().to_be(),
                    session_id: 7,
                },
                0,
            )
            .unwrap();
    }

    /// An IPv6 forwarding entry and its zeroed stats entry, as userspace makes them.
    pub fn insert6(&mut self, cid: [u8; 8], peer: SocketAddrV6, expected: SocketAddrV6) {
        self.insert_entry6(cid, peer, expected);
        let ncpu = aya::util::nr_cpus().expect("nr_cpus");
        let mut st: PerCpuHashMap<&mut MapData, RelayKey, SessionStats6> = PerCpuHashMap::try_from(
            self.ebpf
                .map_mut(MAP_SESSION_STATS6)
                .expect(MAP_SESSION_STATS6),
        )
        .unwrap();
        st.insert(
            RelayKey { cid },
            PerCpuValues::try_from(vec![SessionStats6::default(); ncpu]).unwrap(),
            0,
        )
        .unwrap();
    }

    /// Removes IPv6 entry `cid` and its stats entry, if they exist.
    pub fn remove6(&mut self, cid: [u8; 8]) {
        let mut relay: HashMap<&mut MapData, RelayKey, RelayEntry6> =
            HashMap::try_from(self.ebpf.map_mut(MAP_RELAY6).expect(MAP_RELAY6)).unwrap();
        let _ = relay.remove(&RelayKey { cid });
        self.remove_session6(cid);
    }

    /// Removes IPv6 session `cid`'s stats entry (and its route cache), if it exists.
    pub fn remove_session6(&mut self, cid: [u8; 8]) {
        let mut st: PerCpuHashMap<&mut MapData, RelayKey, SessionStats6> = PerCpuHashMap::try_from(
            self.ebpf
                .map_mut(MAP_SESSION_STATS6)
                .expect(MAP_SESSION_STATS6),
        )
        .unwrap();
        let _ = st.remove(&RelayKey { cid });
    }

    /// IPv6 session `cid`'s counters summed over CPUs, if it exists.
    pub fn session6(&self, cid: [u8; 8]) -> Option<SessionStats6> {
        let st: PerCpuHashMap<&MapData, RelayKey, SessionStats6> =
            PerCpuHashMap::try_from(self.ebpf.map(MAP_SESSION_STATS6).expect(MAP_SESSION_STATS6))
                .unwrap();
        let per_cpu = st.get(&RelayKey { cid }, 0).ok()?;
        let mut sum = SessionStats6::default();
        for s in per_cpu.iter() {
            sum.packets += s.packets;
            sum.bytes += s.bytes;
            sum.last_seen_ns = sum.last_seen_ns.max(s.last_seen_ns);
        }
        Some(sum)
    }
}

/// Ethernet + IPv6 (as `tweak` leaves it; no extension headers) + UDP, lengths and
/// the UDP checksum computed by etherparse.
pub fn udp6_frame_with(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV6,
    dst: SocketAddrV6,
    hop_limit: u8,
    payload: &[u8],
    tweak: impl FnOnce(&mut Ipv6Header),
) -> Vec<u8> {
    let mut ip = Ipv6Header {
        hop_limit,
        source: src.ip().octets(),
        destination: dst.ip().octets(),
        next_header: etherparse::IpNumber::UDP,
        ..Default::default()
    };
    tweak(&mut ip);
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ip(etherparse::IpHeaders::Ipv6(ip, Default::default()))
        .udp(src.port(), dst.port());
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("frame");
    out
}

pub fn udp6_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV6,
    dst: SocketAddrV6,
    hop_limit: u8,
    payload: &[u8],
) -> Vec<u8> {
    udp6_frame_with(src_mac, dst_mac, src, dst, hop_limit, payload, |_| {})
}

/// What SENDER6 puts on the wire towards the relay.
pub fn to_relay6(payload: &[u8]) -> Vec<u8> {
    udp6_frame(SENDER_MAC, RELAY_MAC, SENDER6, RELAY6, IN_TTL, payload)
}

/// What the relay must put on the wire towards `peer` over IPv6, from scratch.
pub fn from_relay6(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    peer: SocketAddrV6,
    payload: &[u8],
) -> Vec<u8> {
    udp6_frame(src_mac, dst_mac, RELAY6, peer, RELAY_TTL, payload)
}

/// Checks the UDP checksum of an Ethernet/IPv6/UDP frame from first principles;
/// it must not be 0 (IPv6 requires one).
pub fn assert_checksum6_valid(frame: &[u8]) {
    let (ip, rest) = Ipv6Header::from_slice(&frame[14..]).expect("IPv6 header");
    let (udp, payload) = etherparse::UdpHeader::from_slice(rest).expect("UDP header");
    assert_ne!(udp.checksum, 0, "IPv6 UDP checksum 0");
    assert_eq!(
        udp.checksum,
        udp.calc_checksum_ipv6(&ip, payload).unwrap(),
        "UDP checksum"
    );
}
