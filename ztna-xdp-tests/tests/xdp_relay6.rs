//! The XDP relay program's IPv6 path under BPF_PROG_TEST_RUN, one test per row, as
//! `xdp_relay.rs` does for IPv4: action, verdict counter (exactly +1), and for
//! forwarded packets the output bytes against a frame built independently with
//! etherparse (UDP checksum from scratch: IPv6 requires one). Root and
//! `target/ztna-ebpf.o` are needed; otherwise each test prints `SKIPPED: ...`.

use std::net::SocketAddrV6;

use ztna_common::relay::Verdict;
use ztna_xdp_tests::*;

const CID: [u8; 8] = cid(1);

/// The fixture with CID → PEER6 in ZTNA_RELAY6, accepted from SENDER6.
macro_rules! fixture {
    ($name:literal) => {{
        let Some(mut f) = Fixture::setup($name) else {
            return;
        };
        f.insert6(CID, PEER6, SENDER6);
        f
    }};
}

fn with_port(a: SocketAddrV6, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(*a.ip(), port, 0, 0)
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn short_header_over_ipv6_is_rewritten_byte_for_byte() {
    let f = fixture!("v6-short-tx");
    let payload = quic_short(CID, 200);
    let pkt = to_relay6(&payload);
    assert_checksum6_valid(&pkt);
    let out = f.expect(&pkt, XDP_TX, Verdict::Tx);
    // From the relay's address and port to the peer, MACs of t0 and the neighbour,
    // hop limit RELAY_TTL, the UDP checksum as computed from scratch.
    let want = from_relay6(RELAY_MAC, PEER_MAC, PEER6, &payload);
    assert_eq!(out, want);
    assert_checksum6_valid(&out);
    let s = f.session6(CID).expect("session stats");
    assert_eq!((s.packets, s.bytes), (1, pkt.len() as u64));
    assert!(s.last_seen_ns > 0);
    // The cached route gives the same frame.
    assert_eq!(f.expect(&pkt, XDP_TX, Verdict::Tx), want);
    assert_eq!(f.session6(CID).expect("session stats").packets, 2);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn long_header_over_ipv6_is_forwarded() {
    let f = fixture!("v6-long-tx");
    let payload = quic_long(1, &CID, 1200);
    let out = f.expect(&to_relay6(&payload), XDP_TX, Verdict::Tx);
    assert_eq!(out, from_relay6(RELAY_MAC, PEER_MAC, PEER6, &payload));
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_peer_behind_another_interface_is_redirected() {
    let mut f = fixture!("v6-redirect");
    let c = cid(2);
    f.insert6(c, FAR_PEER6, SENDER6);
    let payload = quic_short(c, 300);
    let out = f.expect(&to_relay6(&payload), XDP_REDIRECT, Verdict::Redirect);
    assert_eq!(out, from_relay6(FAR_MAC, FAR_PEER_MAC, FAR_PEER6, &payload));
    assert_checksum6_valid(&out);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_incremental_checksums_match_recomputed_ones_and_are_never_zero() {
    let mut f = fixture!("v6-checksums");
    for i in 0u16..64 {
        let c = cid(100 + i as u8);
        let sender = with_port(SENDER6, 1024 + i * 977);
        let peer = with_port(PEER6, 65535 - i * 1031);
        f.insert6(c, peer, sender);
        let mut payload = quic_short(c, 20 + usize::from(i) * 17);
        for (j, b) in payload.iter_mut().enumerate().skip(9) {
            *b = (j as u16).wrapping_mul(i + 3) as u8 ^ 0xa5;
        }
        let pkt = udp6_frame(SENDER_MAC, RELAY_MAC, sender, RELAY6, IN_TTL, &payload);
        let out = f.expect(&pkt, XDP_TX, Verdict::Tx);
        assert_eq!(
            out,
            from_relay6(RELAY_MAC, PEER_MAC, peer, &payload),
            "row {i}"
        );
        assert_checksum6_valid(&out);
    }
    // A payload whose forwarded checksum sums to zero: it must go out as 0xffff.
    let c = cid(200);
    f.insert6(c, PEER6, SENDER6);
    let mut payload = quic_short(c, 64);
    let want = from_relay6(RELAY_MAC, PEER_MAC, PEER6, &payload);
    // Add the forwarded frame's checksum C = ~S to one payload word: the covered
    // sum becomes S + ~S = 0xffff (ones' complement zero), whose checksum computes
    // to 0 and so goes out as 0xffff.
    let adjust = u16::from_be_bytes([want[14 + 40 + 6], want[14 + 40 + 7]]);
    let at = 20;
    let old = u16::from_be_bytes([payload[at], payload[at + 1]]);
    let sum = u32::from(old) + u32::from(adjust);
    let new = ((sum & 0xffff) + (sum >> 16)) as u16;
    payload[at..at + 2].copy_from_slice(&new.to_be_bytes());
    let want = from_relay6(RELAY_MAC, PEER_MAC, PEER6, &payload);
    assert_eq!(
        u16::from_be_bytes([want[60], want[61]]),
        0xffff,
        "the crafted payload sums to zero"
    );
    let out = f.expect(
        &udp6_frame(SENDER_MAC, RELAY_MAC, SENDER6, RELAY6, IN_TTL, &payload),
        XDP_TX,
        Verdict::Tx,
    );
    assert_eq!(out, want);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_udp_checksum_zero_passes() {
    let f = fixture!("v6-csum0");
    let mut pkt = to_relay6(&quic_short(CID, 100));
    pkt[60..62].fill(0);
    f.expect(&pkt, XDP_PASS, Verdict::PassZeroUdpChecksum);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_extension_headers_fragments_and_other_protocols_pass() {
    let f = fixture!("v6-next-header");
    let pkt = to_relay6(&quic_short(CID, 100));
    for (next, verdict) in [
        (0u8, Verdict::PassIpOptions), // hop-by-hop options
        (43, Verdict::PassIpOptions),  // routing
        (60, Verdict::PassIpOptions),  // destination options
        (44, Verdict::PassFragment),
        (6, Verdict::PassNotUdp),  // TCP
        (58, Verdict::PassNotUdp), // ICMPv6
    ] {
        let mut p = pkt.clone();
        p[14 + 6] = next;
        f.expect(&p, XDP_PASS, verdict);
    }
    // The ethertype says IPv6, the version field does not.
    let mut p = pkt.clone();
    p[14] = 0x45;
    f.expect(&p, XDP_PASS, Verdict::PassNotIp);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_truncation_at_every_length_passes_untouched() {
    let f = fixture!("v6-truncated");
    let pkt = to_relay6(&quic_short(CID, 40));
    // 14..=71: every prefix ends inside the IPv6 header, UDP header or the DCID, or
    // before the payload length; BPF_PROG_TEST_RUN wants at least the Ethernet header.
    for len in 14..pkt.len() {
        f.expect(&pkt[..len], XDP_PASS, Verdict::PassTruncated);
    }
    // The payload length ends inside the DCID (the rest is "padding").
    let mut short = pkt.clone();
    short[18..20].copy_from_slice(&(8u16 + 1 + 4).to_be_bytes());
    f.expect(&short, XDP_PASS, Verdict::PassTruncated);
    // Jumbogram marker (payload length 0).
    let mut zero = pkt;
    zero[18..20].fill(0);
    f.expect(&zero, XDP_PASS, Verdict::PassTruncated);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_cid_of_another_relay_passes() {
    let mut f = fixture!("v6-other-relay");
    let other = other_relay_cid(RELAY_ID.wrapping_add(1), 1);
    f.insert6(other, PEER6, SENDER6);
    f.expect(
        &to_relay6(&quic_short(other, 100)),
        XDP_PASS,
        Verdict::PassOtherRelay,
    );
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_wrong_destination_sender_or_cid_passes() {
    let mut f = fixture!("v6-pass");
    let payload = quic_short(CID, 100);
    // Not one of the relay's IPv6 addresses (until it is).
    let other_dst = with_port(FAR_PEER6, RELAY6.port());
    let to_other = udp6_frame(SENDER_MAC, RELAY_MAC, SENDER6, other_dst, IN_TTL, &payload);
    f.expect(&to_other, XDP_PASS, Verdict::PassNotLocalAddress);
    f.add_local_addr6(*other_dst.ip());
    f.expect(&to_other, XDP_TX, Verdict::Tx);
    f.remove_local_addr6(*RELAY6.ip());
    f.expect(&to_relay6(&payload), XDP_PASS, Verdict::PassNotLocalAddress);
    f.add_local_addr6(*RELAY6.ip());
    // Another port of the relay.
    let to_port = udp6_frame(
        SENDER_MAC,
        RELAY_MAC,
        SENDER6,
        with_port(RELAY6, 443),
        IN_TTL,
        &payload,
    );
    f.expect(&to_port, XDP_PASS, Verdict::PassOtherPort);
    // Sender address, then port, not the expected one.
    for sender in [
        with_port(NO_NEIGH_PEER6, SENDER6.port()),
        with_port(SENDER6, 1),
    ] {
        let p = udp6_frame(SENDER_MAC, RELAY_MAC, sender, RELAY6, IN_TTL, &payload);
        f.expect(&p, XDP_PASS, Verdict::PassSenderMismatch);
    }
    // An IPv4 entry is not looked up for IPv6 packets.
    let v4_only = cid(9);
    f.insert(v4_only, PEER, SENDER);
    f.expect(
        &to_relay6(&quic_short(v4_only, 100)),
        XDP_PASS,
        Verdict::PassUnknownCid,
    );
    // No neighbour, no route.
    for (n, peer) in [(10, NO_NEIGH_PEER6), (11, NO_ROUTE_PEER6)] {
        let c = cid(n);
        f.insert6(c, peer, SENDER6);
        f.expect(
            &to_relay6(&quic_short(c, 100)),
            XDP_PASS,
            Verdict::PassFibMiss,
        );
    }
    // Removed: unknown again.
    f.remove6(CID);
    f.expect(&to_relay6(&payload), XDP_PASS, Verdict::PassUnknownCid);
}
