//! The XDP relay program in this kernel under BPF_PROG_TEST_RUN, one test per row:
//! the XDP action, the verdict counter (exactly +1, no other counter moving), and for
//! forwarded packets the output bytes against a frame built independently with
//! etherparse. Root and `target/ztna-ebpf.o` are needed; otherwise each test prints
//! `SKIPPED: ...` and returns.

use std::net::SocketAddrV4;

use aya::programs::ProgramError;
use ztna_common::relay::Verdict;
use ztna_xdp_tests::*;

const CID: [u8; 8] = cid(1);

/// The fixture with CID → PEER, accepted from SENDER; skips the test if it must.
macro_rules! fixture {
    ($name:literal) => {{
        let Some(mut f) = Fixture::setup($name) else {
            return;
        };
        f.insert(CID, PEER, SENDER);
        f
    }};
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn short_header_known_cid_right_sender_is_rewritten_byte_for_byte() {
    let f = fixture!("short-tx");
    let payload = quic_short(CID, 200);
    let pkt = to_relay(&payload);
    assert_checksums_valid(&pkt);
    let out = f.expect(&pkt, XDP_TX, Verdict::Tx);
    // From the relay's own address and port to the peer, MACs from t0 and the
    // neighbour entry, TTL RELAY_TTL, both checksums computed from scratch.
    let want = from_relay(RELAY_MAC, PEER_MAC, PEER, &payload);
    assert_eq!(out, want);
    assert_checksums_valid(&out);
    let s = f.session(CID).expect("session stats");
    assert_eq!((s.packets, s.bytes), (1, pkt.len() as u64));
    assert!(s.last_seen_ns > 0);
    // The second packet takes this CPU's cached route and comes out the same.
    assert_eq!(f.expect(&pkt, XDP_TX, Verdict::Tx), want);
    let s = f.session(CID).expect("session stats");
    assert_eq!((s.packets, s.bytes), (2, 2 * pkt.len() as u64));
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn long_header_initial_with_relay_cid_is_forwarded() {
    let f = fixture!("long-tx");
    let payload = quic_long(1, &CID, 1200);
    let out = f.expect(&to_relay(&payload), XDP_TX, Verdict::Tx);
    assert_eq!(out, from_relay(RELAY_MAC, PEER_MAC, PEER, &payload));
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn peer_behind_another_interface_is_redirected() {
    let mut f = fixture!("redirect");
    let c = cid(2);
    f.insert(c, FAR_PEER, SENDER);
    let payload = quic_short(c, 300);
    let out = f.expect(&to_relay(&payload), XDP_REDIRECT, Verdict::Redirect);
    assert_eq!(out, from_relay(FAR_MAC, FAR_PEER_MAC, FAR_PEER, &payload));
    assert!(f.far_ifindex != f.ifindex);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn entry_without_session_stats_still_forwards() {
    let mut f = fixture!("no-stats");
    let c = cid(3);
    f.insert_entry(c, PEER, SENDER);
    let payload = quic_short(c, 64);
    let out = f.expect(&to_relay(&payload), XDP_TX, Verdict::Tx);
    assert_eq!(out, from_relay(RELAY_MAC, PEER_MAC, PEER, &payload));
    assert!(
        f.session(c).is_none(),
        "the program must not create stats entries"
    );
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn incremental_checksums_match_recomputed_ones() {
    // Many senders, peers' ports and payloads, so the one's-complement carries of
    // the incremental update land in many places.
    let mut f = fixture!("checksums");
    for i in 0u16..64 {
        let c = cid(100 + i as u8);
        let sender = SocketAddrV4::new(*SENDER.ip(), 1024 + i * 977);
        let peer = SocketAddrV4::new(*PEER.ip(), 65535 - i * 1031);
        f.insert(c, peer, sender);
        let mut payload = quic_short(c, 20 + usize::from(i) * 17);
        for (j, b) in payload.iter_mut().enumerate().skip(9) {
            *b = (j as u16).wrapping_mul(i + 3) as u8 ^ 0xa5;
        }
        let pkt = udp_frame(SENDER_MAC, RELAY_MAC, sender, RELAY, IN_TTL, &payload);
        let out = f.expect(&pkt, XDP_TX, Verdict::Tx);
        assert_eq!(
            out,
            from_relay(RELAY_MAC, PEER_MAC, peer, &payload),
            "row {i}"
        );
        assert_checksums_valid(&out);
    }
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn udp_checksum_zero_stays_zero() {
    let f = fixture!("csum0");
    let payload = quic_short(CID, 100);
    let mut pkt = to_relay(&payload);
    pkt[40..42].fill(0);
    let out = f.expect(&pkt, XDP_TX, Verdict::Tx);
    let mut want = from_relay(RELAY_MAC, PEER_MAC, PEER, &payload);
    want[40..42].fill(0);
    assert_eq!(out, want);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn destination_other_than_the_relays_own_address_passes() {
    // A valid relayed packet (known CID, right sender, routable peer) that is on its
    // way to another host's relay port: not the relay's to forward.
    let mut f = fixture!("not-local");
    let payload = quic_short(CID, 100);
    let elsewhere = SocketAddrV4::new([10, 250, 0, 50].into(), RELAY.port());
    let pkt = udp_frame(SENDER_MAC, RELAY_MAC, SENDER, elsewhere, IN_TTL, &payload);
    f.expect(&pkt, XDP_PASS, Verdict::PassNotLocalAddress);
    // The same packet to the relay's address is forwarded.
    let out = f.expect(&to_relay(&payload), XDP_TX, Verdict::Tx);
    assert_eq!(out, from_relay(RELAY_MAC, PEER_MAC, PEER, &payload));
    // Once that address is one of the relay's, it forwards from it.
    f.add_local_addr(*elsewhere.ip());
    let out = f.expect(&pkt, XDP_TX, Verdict::Tx);
    assert_eq!(
        out,
        udp_frame(RELAY_MAC, PEER_MAC, elsewhere, PEER, RELAY_TTL, &payload)
    );
    assert_checksums_valid(&out);
    // No local address at all: nothing is forwarded, not everything.
    f.remove_local_addr(*elsewhere.ip());
    f.remove_local_addr(*RELAY.ip());
    f.expect(&to_relay(&payload), XDP_PASS, Verdict::PassNotLocalAddress);
    f.expect(&pkt, XDP_PASS, Verdict::PassNotLocalAddress);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn unknown_cid_passes() {
    let f = fixture!("unknown");
    let pkt = to_relay(&quic_short(cid(9), 100));
    f.expect(&pkt, XDP_PASS, Verdict::PassUnknownCid);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn sender_address_mismatch_passes() {
    let f = fixture!("mismatch-addr");
    let from = SocketAddrV4::new([10, 250, 0, 8].into(), SENDER.port());
    let pkt = udp_frame(
        SENDER_MAC,
        RELAY_MAC,
        from,
        RELAY,
        IN_TTL,
        &quic_short(CID, 100),
    );
    f.expect(&pkt, XDP_PASS, Verdict::PassSenderMismatch);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn sender_port_mismatch_passes() {
    let f = fixture!("mismatch-port");
    let from = SocketAddrV4::new(*SENDER.ip(), SENDER.port() + 1);
    let pkt = udp_frame(
        SENDER_MAC,
        RELAY_MAC,
        from,
        RELAY,
        IN_TTL,
        &quic_short(CID, 100),
    );
    f.expect(&pkt, XDP_PASS, Verdict::PassSenderMismatch);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn tcp_passes() {
    let f = fixture!("tcp");
    let b = etherparse::PacketBuilder::ethernet2(SENDER_MAC, RELAY_MAC)
        .ipv4(SENDER.ip().octets(), RELAY.ip().octets(), IN_TTL)
        .tcp(SENDER.port(), RELAY.port(), 1, 1000);
    let mut pkt = Vec::new();
    b.write(&mut pkt, &quic_short(CID, 100)).unwrap();
    f.expect(&pkt, XDP_PASS, Verdict::PassNotUdp);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn other_port_passes() {
    let f = fixture!("other-port");
    let to = SocketAddrV4::new(*RELAY.ip(), RELAY.port() + 1);
    let pkt = udp_frame(
        SENDER_MAC,
        RELAY_MAC,
        SENDER,
        to,
        IN_TTL,
        &quic_short(CID, 100),
    );
    f.expect(&pkt, XDP_PASS, Verdict::PassOtherPort);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv4_options_pass() {
    let f = fixture!("options");
    let pkt = udp_frame_with(
        SENDER_MAC,
        RELAY_MAC,
        SENDER,
        RELAY,
        IN_TTL,
        &quic_short(CID, 100),
        |ip| ip.options = [1u8, 1, 1, 0].into(), // NOP NOP NOP EOL: IHL 6
    );
    assert_eq!(pkt[14], 0x46);
    f.expect(&pkt, XDP_PASS, Verdict::PassIpOptions);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn fragment_with_more_fragments_passes() {
    let f = fixture!("frag-mf");
    let pkt = udp_frame_with(
        SENDER_MAC,
        RELAY_MAC,
        SENDER,
        RELAY,
        IN_TTL,
        &quic_short(CID, 100),
        |ip| {
            ip.dont_fragment = false;
            ip.more_fragments = true;
        },
    );
    f.expect(&pkt, XDP_PASS, Verdict::PassFragment);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn fragment_with_offset_passes() {
    let f = fixture!("frag-off");
    // A last fragment (MF clear) whose bytes happen to look like UDP + a relay CID.
    let pkt = udp_frame_with(
        SENDER_MAC,
        RELAY_MAC,
        SENDER,
        RELAY,
        IN_TTL,
        &quic_short(CID, 100),
        |ip| {
            ip.dont_fragment = false;
            ip.fragment_offset = etherparse::IpFragOffset::try_new(185).unwrap();
        },
    );
    f.expect(&pkt, XDP_PASS, Verdict::PassFragment);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ipv6_to_an_address_not_the_relays_passes() {
    let f = fixture!("ipv6-not-local");
    let b = etherparse::PacketBuilder::ethernet2(SENDER_MAC, RELAY_MAC)
        .ipv6([0xfd; 16], [0xfe; 16], IN_TTL)
        .udp(SENDER.port(), RELAY.port());
    let mut pkt = Vec::new();
    b.write(&mut pkt, &quic_short(CID, 100)).unwrap();
    f.expect(&pkt, XDP_PASS, Verdict::PassNotLocalAddress);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn relay_cid_of_another_relay_passes_even_if_in_the_table() {
    let mut f = fixture!("other-relay");
    // Its entry exists: only the relay ID keeps it from being forwarded.
    let other = other_relay_cid(RELAY_ID ^ 0x0100, 1);
    f.insert(other, PEER, SENDER);
    f.expect(
        &to_relay(&quic_short(other, 100)),
        XDP_PASS,
        Verdict::PassOtherRelay,
    );
    f.expect(
        &to_relay(&quic_long(1, &other, 1200)),
        XDP_PASS,
        Verdict::PassOtherRelay,
    );
    // The same CID is forwarded once the relay is configured with its ID.
    f.set_config(RELAY.port(), RELAY_ID ^ 0x0100);
    f.expect(&to_relay(&quic_short(other, 100)), XDP_TX, Verdict::Tx);
    f.expect(
        &to_relay(&quic_short(CID, 100)),
        XDP_PASS,
        Verdict::PassOtherRelay,
    );
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn arp_passes() {
    let f = fixture!("arp");
    // Who has 10.250.0.1? Tell 10.250.0.9.
    let mut pkt = vec![0xff; 6];
    pkt.extend_from_slice(&SENDER_MAC);
    pkt.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    pkt.extend_from_slice(&SENDER_MAC);
    pkt.extend_from_slice(&SENDER.ip().octets());
    pkt.extend_from_slice(&[0; 6]);
    pkt.extend_from_slice(&RELAY.ip().octets());
    f.expect(&pkt, XDP_PASS, Verdict::PassNotIp);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn dcid_without_marker_passes() {
    let f = fixture!("no-marker");
    let mut own = CID;
    own[0] = 0x11;
    f.expect(
        &to_relay(&quic_short(own, 100)),
        XDP_PASS,
        Verdict::PassNotRelayCid,
    );
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn long_header_with_dcid_len_not_8_passes() {
    // Relay CIDs are exactly 8 bytes: a long header announcing another length
    // cannot carry one, even if its first 8 DCID bytes equal a table key.
    let f = fixture!("long-len");
    let mut dcid = CID.to_vec();
    dcid.extend_from_slice(&[0; 8]);
    f.expect(
        &to_relay(&quic_long(1, &dcid, 1200)),
        XDP_PASS,
        Verdict::PassNotRelayCid,
    );
    f.expect(
        &to_relay(&quic_long(1, &CID[..4], 1200)),
        XDP_PASS,
        Verdict::PassNotRelayCid,
    );
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn truncation_at_every_length_passes_untouched() {
    let f = fixture!("truncated");
    // 14 Ethernet + 20 IPv4 + 8 UDP + 1 + 8 DCID + 31 payload = 82 bytes.
    let full = to_relay(&quic_short(CID, 40));
    assert_eq!(full.len(), 82);
    for cut in 0..full.len() {
        let pkt = &full[..cut];
        let before = f.counters();
        if cut < 14 {
            // The kernel refuses test runs shorter than an Ethernet header (EINVAL)
            // before the program runs; a NIC never delivers such a frame either.
            match f.try_run(pkt) {
                Err(ProgramError::SyscallError(e)) => {
                    assert_eq!(e.io_error.raw_os_error(), Some(libc::EINVAL), "cut {cut}")
                }
                other => panic!("cut {cut}: expected EINVAL, got {other:?}"),
            }
            assert_eq!(f.counters(), before, "cut {cut}");
            continue;
        }
        // Cuts inside a header, and cuts after the whole DCID but before the end
        // that the IP total length announces: all handed to the kernel as they are.
        let (ret, out) = f.run(pkt);
        assert_eq!(ret, XDP_PASS, "cut {cut}");
        assert_eq!(out, pkt, "cut {cut}");
        let after = f.counters();
        for v in Verdict::ALL {
            let want = before[v as usize] + u64::from(v == Verdict::PassTruncated);
            assert_eq!(after[v as usize], want, "cut {cut}: counter {v:?}");
        }
    }
    assert_eq!(f.counters()[Verdict::PassTruncated as usize], 82 - 14);
    // The uncut frame still forwards: the cuts were the only reason.
    f.expect(&full, XDP_TX, Verdict::Tx);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ip_total_length_ending_before_the_dcid_passes() {
    // The UDP header and DCID are in the frame but past the IP packet's end (in
    // what would be Ethernet padding): the packet ends inside its headers.
    let f = fixture!("short-total");
    let payload = quic_short(CID, 40);
    let with_total = |frame: &[u8], total: u16| {
        let mut p = frame.to_vec();
        p[16..18].copy_from_slice(&total.to_be_bytes());
        if let Ok((ip, _)) = etherparse::Ipv4Header::from_slice(&p[14..]) {
            p[24..26].copy_from_slice(&ip.calc_header_checksum().to_be_bytes());
        }
        p
    };
    // 20 IPv4 + 8 UDP + 1 + 8 DCID = 37: the shortest IP packet that holds them.
    for total in [0u16, 11, 20, 28, 36] {
        f.expect(
            &with_total(&to_relay(&payload), total),
            XDP_PASS,
            Verdict::PassTruncated,
        );
    }
    // Just long enough: forwarded, the rest of the frame travelling as padding.
    let out = f.expect(&with_total(&to_relay(&payload), 37), XDP_TX, Verdict::Tx);
    assert_eq!(
        out,
        with_total(&from_relay(RELAY_MAC, PEER_MAC, PEER, &payload), 37)
    );
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn ethernet_padding_after_the_ip_packet_still_forwards() {
    // Frames under 60 bytes arrive padded: more bytes than the IP total length is
    // not truncation. The padding travels on unchanged.
    let f = fixture!("padding");
    let payload = quic_short(CID, 9);
    let mut pkt = to_relay(&payload);
    assert_eq!(pkt.len(), 51);
    pkt.resize(60, 0);
    let out = f.expect(&pkt, XDP_TX, Verdict::Tx);
    let mut want = from_relay(RELAY_MAC, PEER_MAC, PEER, &payload);
    want.resize(60, 0);
    assert_eq!(out, want);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn port_zero_in_config_is_not_configured() {
    let mut f = fixture!("port0");
    let pkt = to_relay(&quic_short(CID, 100));
    f.set_port(0);
    f.expect(&pkt, XDP_PASS, Verdict::PassNotConfigured);
    f.set_port(RELAY.port());
    f.expect(&pkt, XDP_TX, Verdict::Tx);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn peer_without_route_is_a_fib_miss() {
    let mut f = fixture!("no-route");
    let c = cid(4);
    f.insert(c, NO_ROUTE_PEER, SENDER);
    f.expect(
        &to_relay(&quic_short(c, 100)),
        XDP_PASS,
        Verdict::PassFibMiss,
    );
    let s = f.session(c).expect("session stats");
    assert_eq!(s.packets, 0, "only forwarded packets count for the session");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn peer_without_neighbour_is_a_fib_miss() {
    let mut f = fixture!("no-neigh");
    let c = cid(5);
    f.insert(c, NO_NEIGH_PEER, SENDER);
    f.expect(
        &to_relay(&quic_short(c, 100)),
        XDP_PASS,
        Verdict::PassFibMiss,
    );
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn nothing_aborts() {
    // Every row above that forwards or passes must leave Aborted at zero; here the
    // mixed sequence in one fixture, to catch state carried between packets.
    let mut f = fixture!("no-abort");
    f.insert(cid(6), NO_ROUTE_PEER, SENDER);
    for pkt in [
        to_relay(&quic_short(CID, 100)),
        to_relay(&quic_short(cid(6), 100)),
        to_relay(&quic_short(cid(9), 100)),
        to_relay(&quic_long(1, &CID, 1200)),
    ] {
        let (ret, _) = f.run(&pkt);
        assert_ne!(ret, XDP_ABORTED);
    }
    assert_eq!(f.counters()[Verdict::Aborted as usize], 0);
}
