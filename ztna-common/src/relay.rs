//! Relay CIDs and the forwarding table shared by the XDP program and userspace.
//!
//! A relay session has two relay CIDs of [`RELAY_CID_LEN`] bytes, one per side,
//! laid out in the spirit of QUIC-LB (draft-ietf-quic-load-balancers), so that
//! several relays behind one address (or one anycast name) can tell whose a
//! CID is:
//!
//! ```text
//!  byte 0        bytes 1..=2            bytes 3..=7
//! +-------------+----------------------+----------------------------------+
//! | 0xA5        | relay ID (u16, BE)   | nonce: 40 bits from a CSPRNG     |
//! +-------------+----------------------+----------------------------------+
//! ```
//!
//! Byte 0 is the first octet of QUIC-LB: its top three bits (`0b101`) are the
//! config rotation bits, which never take QUIC-LB's reserved value `0b111`
//! (unroutable); its low five bits (`0b00101`) complete [`RELAY_CID_MARKER`].
//! The whole octet is fixed, so telling a relay CID from any other stays one
//! compare (the XDP fast check), and the intermediate's own CIDs (16 bytes) never
//! start with it. The relay ID ([`relay_id_of`]) names the relay that made the CID
//! (`relay_id` in the intermediate's settings; [`RelayConfig::relay_id`] for the XDP
//! program): a packet to a relay CID of another relay is passed and counted
//! ([`Verdict::PassOtherRelay`]) by XDP and dropped and counted by the userspace
//! forwarder, never forwarded. The 40-bit nonce keeps CIDs unguessable: a relay
//! holds at most [`MAX_RELAY_ENTRIES`] of its 2^40.
//!
//! Map `ZTNA_RELAY` (hash, [`RelayKey`] → [`RelayEntry`]): a UDP packet to the relay
//! port whose QUIC DCID is a relay CID and whose source is `expected_src` is rewritten
//! to come from the relay's address and port (the packet's own destination) and to go
//! to `peer`. Map `ZTNA_SESSION_STATS` (per-CPU hash, same key →
//! [`SessionStats`]): packets, bytes, last seen, cached route. Map `ZTNA_STATS` (per-CPU array,
//! index [`Verdict`] → u64). Map `ZTNA_CONFIG` (array, index 0 → [`RelayConfig`]).
//! Map `ZTNA_LOCAL_ADDRS` (hash, at most [`MAX_LOCAL_ADDRS`] entries): key a u32, an
//! IPv4 address of the relay itself in network byte order (the 4 address bytes as
//! they appear in the IPv4 header); value a u8, [`LOCAL_ADDR_PRESENT`] (only the key
//! matters). A packet is forwarded only if its destination address is a key: the
//! relay's socket would only ever receive packets to its own addresses, so the
//! program must not forward what merely passes through the host (a router or a
//! bridge carrying a relay CID to someone else's port 4433), nor give a forwarded
//! packet a source address that is not the relay's. The loader fills it with the
//! intermediate's bound address, or with every IPv4 address of the attached
//! interfaces when it is bound to the wildcard address (and keeps those in step as
//! the interfaces' addresses change). An empty map means no
//! address is local: nothing is forwarded (every packet passes to userspace with
//! [`Verdict::PassNotLocalAddress`]), never "forward to anyone".
//!
//! IPv6 has maps of its own, so that an IPv4 entry stays 16 bytes (and its per-CPU
//! stats 56) at the table sizes a relay aims for: `ZTNA_RELAY6` ([`RelayKey`] →
//! [`RelayEntry6`], 40 bytes), `ZTNA_SESSION_STATS6` ([`SessionStats6`], with a
//! [`NextHop6`]) and `ZTNA_LOCAL_ADDRS6` (the 16 address bytes → [`LOCAL_ADDR_PRESENT`];
//! the relay's own IPv6 addresses, link-local ones excepted). An IPv6/UDP packet
//! is looked up in `ZTNA_RELAY6` only, an IPv4 one in `ZTNA_RELAY` only; a CID is in
//! at most one of them (userspace moves it when a client changes family), and an
//! entry's two addresses are always of one family (a session between an IPv4 and
//! an IPv6 endpoint stays in userspace).
//!
//! All addresses and ports in map values are in network byte order, exactly as they
//! appear in packet headers, so the XDP program compares and copies them without
//! swapping.

/// Length of every relay CID.
pub const RELAY_CID_LEN: usize = 8;
/// First byte of every relay CID (QUIC-LB config rotation bits `0b101` + marker).
pub const RELAY_CID_MARKER: u8 = 0xA5;
/// Where the relay ID sits in a relay CID: bytes 1 and 2, network order.
pub const RELAY_ID_OFFSET: usize = 1;
/// Where the random nonce starts; it runs to the end of the CID (40 bits).
pub const RELAY_NONCE_OFFSET: usize = 3;

/// The relay ID of a relay CID (bytes 1..=2, network order). The caller checked
/// the marker.
pub const fn relay_id_of(cid: &[u8; RELAY_CID_LEN]) -> u16 {
    u16::from_be_bytes([cid[RELAY_ID_OFFSET], cid[RELAY_ID_OFFSET + 1]])
}

/// A relay CID of relay `relay_id` with the given nonce (40 bits used).
pub const fn relay_cid(
    relay_id: u16,
    nonce: [u8; RELAY_CID_LEN - RELAY_NONCE_OFFSET],
) -> [u8; RELAY_CID_LEN] {
    let id = relay_id.to_be_bytes();
    [
        RELAY_CID_MARKER,
        id[0],
        id[1],
        nonce[0],
        nonce[1],
        nonce[2],
        nonce[3],
        nonce[4],
    ]
}

/// Names of the maps, also their pin names in an instance's pin directory (under
/// [`PIN_ROOT`]).
pub const MAP_RELAY: &str = "ZTNA_RELAY";
pub const MAP_SESSION_STATS: &str = "ZTNA_SESSION_STATS";
pub const MAP_STATS: &str = "ZTNA_STATS";
/// Per-CPU array like `ZTNA_STATS`, indexed by [`Verdict`]: bytes (whole frames, as
/// they arrived) of the packets given each verdict.
pub const MAP_STATS_BYTES: &str = "ZTNA_STATS_BYTES";
pub const MAP_CONFIG: &str = "ZTNA_CONFIG";
pub const MAP_LOCAL_ADDRS: &str = "ZTNA_LOCAL_ADDRS";
pub const MAP_RELAY6: &str = "ZTNA_RELAY6";
pub const MAP_SESSION_STATS6: &str = "ZTNA_SESSION_STATS6";
pub const MAP_LOCAL_ADDRS6: &str = "ZTNA_LOCAL_ADDRS6";
/// Capacity of `ZTNA_LOCAL_ADDRS`: the relay's own IPv4 addresses.
pub const MAX_LOCAL_ADDRS: u32 = 64;
/// The value stored with each key of `ZTNA_LOCAL_ADDRS`.
pub const LOCAL_ADDR_PRESENT: u8 = 1;
/// How long the program reuses a route lookup's result for a peer.
pub const NEXTHOP_CACHE_NS: u64 = 1_000_000_000;
/// Pins of each intermediate go to `PIN_ROOT/<its UDP port>` unless configured
/// otherwise (`--bpf-pin-dir`), so two instances on one host never share maps.
pub const PIN_ROOT: &str = "/sys/fs/bpf/ztna";
pub const PROGRAM_NAME: &str = "ztna_relay";
/// Capacity of the forwarding table (two entries per session).
pub const MAX_RELAY_ENTRIES: u32 = 65536;

/// Forwarding-table key: the relay CID as it appears in the DCID field.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RelayKey {
    pub cid: [u8; RELAY_CID_LEN],
}

/// Forwarding-table value. 16 bytes, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RelayEntry {
    /// Where to send: IPv4 address (network order).
    pub peer_addr: u32,
    /// Only packets from this IPv4 address and port are forwarded (network order).
    pub expected_src_addr: u32,
    pub peer_port: u16,
    pub expected_src_port: u16,
    /// The intermediate's id for the session (host order; for inspection).
    pub session_id: u32,
}

/// Per-session, per-CPU counters and route cache. Userspace sums the counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SessionStats {
    pub packets: u64,
    pub bytes: u64,
    /// `bpf_ktime_get_coarse_ns()` of the last forwarded packet (CLOCK_MONOTONIC, at
    /// tick resolution).
    pub last_seen_ns: u64,
    /// This CPU's cached route to the entry's peer.
    pub next_hop: NextHop,
}

/// Cached result of `bpf_fib_lookup`, kept per CPU in the session's
/// [`SessionStats`]. A route lookup costs several times the rest of the forward
/// path, so the program does one per session per CPU per [`NEXTHOP_CACHE_NS`], and
/// again at once when the entry's peer changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop {
    pub ifindex: u32,
    /// The peer address the route was looked up for (network order).
    pub peer_addr: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub _pad: [u8; 4],
    /// `bpf_ktime_get_coarse_ns()` after which the route is looked up again.
    pub expires_ns: u64,
}

/// IPv6 forwarding-table value (`ZTNA_RELAY6`). 40 bytes, no padding:
///
/// ```text
/// 0           16                  32          34                  36           40
/// | peer_addr | expected_src_addr | peer_port | expected_src_port | session_id |
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RelayEntry6 {
    /// Where to send: the 16 IPv6 address bytes, as in the header.
    pub peer_addr: [u8; 16],
    /// Only packets from this address and port are forwarded.
    pub expected_src_addr: [u8; 16],
    /// Network order.
    pub peer_port: u16,
    pub expected_src_port: u16,
    /// The intermediate's id for the session (host order).
    pub session_id: u32,
}

/// [`NextHop`] for an IPv6 peer. 40 bytes, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop6 {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The peer address the route was looked up for.
    pub peer_addr: [u8; 16],
    pub expires_ns: u64,
}

/// [`SessionStats`] of an IPv6 entry (`ZTNA_SESSION_STATS6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SessionStats6 {
    pub packets: u64,
    pub bytes: u64,
    pub last_seen_ns: u64,
    pub next_hop: NextHop6,
}

/// Program configuration, index 0 of `ZTNA_CONFIG`. 8 bytes:
///
/// ```text
/// 0      2          4           8
/// | port | relay_id | _reserved |
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RelayConfig {
    /// The relay's UDP port (network order). 0 disables forwarding.
    pub port: u16,
    /// This relay's ID (network order, as in the CID's bytes 1..=2): relay CIDs
    /// with another one are passed ([`Verdict::PassOtherRelay`]).
    pub relay_id: u16,
    pub _reserved: u32,
}

/// What the program did with a packet; index into `ZTNA_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Rewritten and sent back out of the ingress interface (XDP_TX).
    Tx = 0,
    /// Rewritten and redirected to another interface (XDP_REDIRECT).
    Redirect = 1,
    /// XDP_PASS: neither IPv4 nor IPv6 (ARP, VLAN, ...), or an IP version field
    /// that does not match the ethertype.
    PassNotIp = 2,
    /// XDP_PASS: IPv4 or IPv6 but not UDP (for IPv6: a next header that is neither
    /// UDP nor an extension header).
    PassNotUdp = 3,
    /// XDP_PASS: UDP to another port than the relay's.
    PassOtherPort = 4,
    /// XDP_PASS: IPv4 header with options (IHL > 5), or a malformed one (IHL < 5);
    /// IPv6 header followed by an extension header (other than a fragment header):
    /// the program reads only the fixed 40-byte header.
    PassIpOptions = 5,
    /// XDP_PASS: IPv4 fragment, or IPv6 with a fragment header next.
    PassFragment = 6,
    /// XDP_PASS: packet ends inside the Ethernet, IP, UDP or QUIC header: the frame
    /// does, or the IPv4 total length (IPv6 payload length) does, or the frame ends
    /// before that length.
    PassTruncated = 7,
    /// XDP_PASS: DCID is not a relay CID (the intermediate's own traffic).
    PassNotRelayCid = 8,
    /// XDP_PASS: relay CID not in the table.
    PassUnknownCid = 9,
    /// XDP_PASS: sender differs from the entry's expected sender (NAT rebinding?).
    PassSenderMismatch = 10,
    /// XDP_PASS: no route or neighbour for the peer; userspace forwards.
    PassFibMiss = 11,
    /// XDP_PASS: relay not configured (port 0).
    PassNotConfigured = 12,
    /// XDP_ABORTED: a rewrite began and could not be completed.
    Aborted = 13,
    /// XDP_PASS: UDP to the relay port, but not to one of the relay's own addresses
    /// (`ZTNA_LOCAL_ADDRS`): traffic through this host, not to the relay.
    PassNotLocalAddress = 14,
    /// XDP_PASS: a relay CID with another relay's ID (bytes 1..=2): never
    /// forwarded here; userspace drops and counts it (`relay_other_relay_cid`).
    PassOtherRelay = 15,
    /// XDP_PASS: IPv6/UDP with checksum 0, which IPv6 forbids (RFC 8200 §8.1): the
    /// program updates checksums incrementally and cannot from a missing one; the
    /// kernel drops it.
    PassZeroUdpChecksum = 16,
}

/// Number of [`Verdict`] values (size of `ZTNA_STATS`).
pub const VERDICT_COUNT: u32 = 17;

impl Verdict {
    pub const ALL: [Verdict; VERDICT_COUNT as usize] = [
        Verdict::Tx,
        Verdict::Redirect,
        Verdict::PassNotIp,
        Verdict::PassNotUdp,
        Verdict::PassOtherPort,
        Verdict::PassIpOptions,
        Verdict::PassFragment,
        Verdict::PassTruncated,
        Verdict::PassNotRelayCid,
        Verdict::PassUnknownCid,
        Verdict::PassSenderMismatch,
        Verdict::PassFibMiss,
        Verdict::PassNotConfigured,
        Verdict::Aborted,
        Verdict::PassNotLocalAddress,
        Verdict::PassOtherRelay,
        Verdict::PassZeroUdpChecksum,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Tx => "tx",
            Verdict::Redirect => "redirect",
            Verdict::PassNotIp => "pass_not_ip",
            Verdict::PassNotUdp => "pass_not_udp",
            Verdict::PassOtherPort => "pass_other_port",
            Verdict::PassIpOptions => "pass_ip_options",
            Verdict::PassFragment => "pass_fragment",
            Verdict::PassTruncated => "pass_truncated",
            Verdict::PassNotRelayCid => "pass_not_relay_cid",
            Verdict::PassUnknownCid => "pass_unknown_cid",
            Verdict::PassSenderMismatch => "pass_sender_mismatch",
            Verdict::PassFibMiss => "pass_fib_miss",
            Verdict::PassNotConfigured => "pass_not_configured",
            Verdict::Aborted => "aborted",
            Verdict::PassNotLocalAddress => "pass_not_local_address",
            Verdict::PassOtherRelay => "pass_other_relay",
            Verdict::PassZeroUdpChecksum => "pass_zero_udp_checksum",
        }
    }
}

/// True if `dcid` (at least 8 bytes) is a relay CID (of any relay).
pub fn is_relay_cid(dcid: &[u8]) -> bool {
    dcid.len() >= RELAY_CID_LEN && dcid[0] == RELAY_CID_MARKER
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), made of integers and byte arrays, without padding
    // (checked by the size assertions below), so every bit pattern is valid.
    unsafe impl aya::Pod for super::RelayKey {}
    unsafe impl aya::Pod for super::RelayEntry {}
    unsafe impl aya::Pod for super::SessionStats {}
    unsafe impl aya::Pod for super::RelayConfig {}
    unsafe impl aya::Pod for super::NextHop {}
    unsafe impl aya::Pod for super::RelayEntry6 {}
    unsafe impl aya::Pod for super::SessionStats6 {}
}

const _: () = assert!(core::mem::size_of::<RelayKey>() == 8);
const _: () = assert!(core::mem::size_of::<RelayEntry>() == 16);
const _: () = assert!(core::mem::size_of::<SessionStats>() == 56);
const _: () = assert!(core::mem::size_of::<RelayConfig>() == 8);
const _: () = assert!(core::mem::size_of::<NextHop>() == 32);
const _: () = assert!(core::mem::size_of::<RelayEntry6>() == 40);
const _: () = assert!(core::mem::size_of::<NextHop6>() == 40);
const _: () = assert!(core::mem::size_of::<SessionStats6>() == 64);

// `Verdict::ALL[i]` is the verdict with index `i`: consumers read `ZTNA_STATS` by it.
const _: () = {
    let mut i = 0;
    while i < Verdict::ALL.len() {
        assert!(Verdict::ALL[i] as usize == i);
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_cid_layout_puts_marker_id_and_nonce_where_documented() {
        let cid = relay_cid(0x1234, [1, 2, 3, 4, 5]);
        assert_eq!(cid, [0xA5, 0x12, 0x34, 1, 2, 3, 4, 5]);
        assert!(is_relay_cid(&cid));
        assert_eq!(relay_id_of(&cid), 0x1234);
        // QUIC-LB: the config rotation bits never take the reserved value 0b111.
        assert_ne!(RELAY_CID_MARKER >> 5, 0b111);
        let mut other = cid;
        other[0] = 0xA4;
        assert!(!is_relay_cid(&other));
    }
}
