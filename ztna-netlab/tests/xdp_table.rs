//! Privileged: the XDP program in this kernel under BPF_PROG_TEST_RUN, one packet per
//! row: verdict, output bytes, and the verdict's counter.

use std::net::SocketAddrV4;

use ztna_common::relay::Verdict;
use ztna_netlab::xdp_run::{
    PEER, PEER_MAC, RELAY, RELAY_ID, SENDER, SENDER_MAC, XdpRun, frame, quic_short,
};

const XDP_ABORTED: u32 = 0;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const CID: [u8; 8] = ztna_common::relay::relay_cid(RELAY_ID, [3, 4, 5, 6, 7]);

fn fixture(tag: &str) -> XdpRun {
    let mut x = XdpRun::new(tag).expect("fixture");
    x.insert(CID, PEER, SENDER).unwrap();
    x
}

fn to_relay(relay_mac: [u8; 6], payload: &[u8]) -> Vec<u8> {
    frame(SENDER_MAC, relay_mac, SENDER, RELAY, 64, payload)
}

/// Runs one packet; checks the action and that exactly `verdict`'s counter moved.
fn expect(x: &mut XdpRun, pkt: &[u8], action: u32, verdict: Verdict) -> Vec<u8> {
    let before: Vec<u64> = Verdict::ALL
        .iter()
        .map(|v| x.counter(*v).unwrap())
        .collect();
    let (ret, out, _) = x.run(pkt, 1).unwrap();
    assert_eq!(ret, action, "{verdict:?}");
    for (i, v) in Verdict::ALL.iter().enumerate() {
        let want = before[i] + u64::from(*v == verdict);
        assert_eq!(
            x.counter(*v).unwrap(),
            want,
            "counter {v:?} while expecting {verdict:?}"
        );
    }
    if action == XDP_PASS {
        assert_eq!(out, pkt, "{verdict:?}: a passed packet is not modified");
    }
    out
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn known_cid_short_header_is_rewritten_byte_for_byte() {
    let mut x = fixture("q");
    let mac = x.relay_mac;
    let payload = quic_short(CID, 200);
    let out = expect(&mut x, &to_relay(mac, &payload), XDP_TX, Verdict::Tx);
    // Built independently: from the relay's address and port, to the peer, TTL 64
    // (the relay sends it anew), MACs from the neighbour table, both checksums
    // computed from scratch.
    let want = frame(mac, PEER_MAC, RELAY, PEER, 64, &payload);
    assert_eq!(out, want);
    let s = x.session(CID).unwrap();
    assert_eq!((s.packets, s.bytes), (1, want.len() as u64));
    assert!(s.last_seen_ns > 0);
    // The second packet takes the cached route and comes out the same.
    let again = expect(&mut x, &to_relay(mac, &payload), XDP_TX, Verdict::Tx);
    assert_eq!(again, want);
    // Whatever TTL arrives, the relay sends with 64.
    let low = frame(SENDER_MAC, mac, SENDER, RELAY, 1, &payload);
    assert_eq!(expect(&mut x, &low, XDP_TX, Verdict::Tx), want);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn long_header_initial_with_a_relay_cid_is_forwarded() {
    let mut x = fixture("l");
    let mac = x.relay_mac;
    let mut p = vec![0xc0u8, 0, 0, 0, 1, 8];
    p.extend_from_slice(&CID);
    p.extend_from_slice(&[8; 8]); // SCID length + ...
    p.resize(1200, 0);
    let out = expect(&mut x, &to_relay(mac, &p), XDP_TX, Verdict::Tx);
    assert_eq!(out, frame(mac, PEER_MAC, RELAY, PEER, 64, &p));
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn everything_that_is_not_ours_passes_untouched_with_its_counter() {
    let mut x = fixture("p");
    let mac = x.relay_mac;
    let good = quic_short(CID, 100);
    // unknown CID
    let mut unknown = CID;
    unknown[7] ^= 0xff;
    expect(
        &mut x,
        &to_relay(mac, &quic_short(unknown, 100)),
        XDP_PASS,
        Verdict::PassUnknownCid,
    );
    // sender mismatch: address, then port
    let other_addr = SocketAddrV4::new([10, 250, 0, 8].into(), SENDER.port());
    let other_port = SocketAddrV4::new(*SENDER.ip(), 7778);
    for from in [other_addr, other_port] {
        let p = frame(SENDER_MAC, mac, from, RELAY, 64, &good);
        expect(&mut x, &p, XDP_PASS, Verdict::PassSenderMismatch);
    }
    // not UDP: the same bytes as TCP
    let tcp = {
        let b = etherparse::PacketBuilder::ethernet2(SENDER_MAC, mac)
            .ipv4(SENDER.ip().octets(), RELAY.ip().octets(), 64)
            .tcp(SENDER.port(), RELAY.port(), 1, 1000);
        let mut v = Vec::new();
        b.write(&mut v, &good).unwrap();
        v
    };
    expect(&mut x, &tcp, XDP_PASS, Verdict::PassNotUdp);
    // other port
    let p = frame(
        SENDER_MAC,
        mac,
        SENDER,
        SocketAddrV4::new(*RELAY.ip(), 4434),
        64,
        &good,
    );
    expect(&mut x, &p, XDP_PASS, Verdict::PassOtherPort);
    // the relay port of another host (not one of the relay's addresses)
    let p = frame(
        SENDER_MAC,
        mac,
        SENDER,
        SocketAddrV4::new([10, 250, 0, 50].into(), RELAY.port()),
        64,
        &good,
    );
    expect(&mut x, &p, XDP_PASS, Verdict::PassNotLocalAddress);
    // IPv4 options: IHL 6 with a NOP option word
    let mut opt = to_relay(mac, &good);
    opt.splice(34..34, [1u8, 1, 1, 0]);
    opt[14] = 0x46;
    let total = u16::from_be_bytes([opt[16], opt[17]]) + 4;
    opt[16..18].copy_from_slice(&total.to_be_bytes());
    expect(&mut x, &opt, XDP_PASS, Verdict::PassIpOptions);
    // fragments: more-fragments flag, then an offset
    for frag in [0x2000u16, 0x0010] {
        let mut f = to_relay(mac, &good);
        f[20..22].copy_from_slice(&frag.to_be_bytes());
        expect(&mut x, &f, XDP_PASS, Verdict::PassFragment);
    }
    // IPv6 and ARP
    let v6 = {
        let b = etherparse::PacketBuilder::ethernet2(SENDER_MAC, mac)
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .udp(SENDER.port(), RELAY.port());
        let mut v = Vec::new();
        b.write(&mut v, &good).unwrap();
        v
    };
    // IPv6 to an address that is not the relay's (the fixture has no IPv6 one)
    expect(&mut x, &v6, XDP_PASS, Verdict::PassNotLocalAddress);
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&SENDER_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    expect(&mut x, &arp, XDP_PASS, Verdict::PassNotIp);
    // DCID without the marker; long header whose DCID is not 8 bytes
    let mut plain = CID;
    plain[0] = 0x11;
    expect(
        &mut x,
        &to_relay(mac, &quic_short(plain, 100)),
        XDP_PASS,
        Verdict::PassNotRelayCid,
    );
    let mut long16 = vec![0xc0u8, 0, 0, 0, 1, 16];
    long16.extend_from_slice(&CID);
    long16.resize(100, 0);
    expect(
        &mut x,
        &to_relay(mac, &long16),
        XDP_PASS,
        Verdict::PassNotRelayCid,
    );
    // a relay CID of another relay, even with an entry: passed, never forwarded
    let mut other = CID;
    other[2] ^= 0x01;
    x.insert(other, PEER, SENDER).unwrap();
    expect(
        &mut x,
        &to_relay(mac, &quic_short(other, 100)),
        XDP_PASS,
        Verdict::PassOtherRelay,
    );
    // peer with no route or neighbour: userspace forwards it
    let unroutable = SocketAddrV4::new([10, 250, 0, 77].into(), 9);
    let mut cid2 = CID;
    cid2[5] = 0x99;
    x.insert(cid2, unroutable, SENDER).unwrap();
    expect(
        &mut x,
        &to_relay(mac, &quic_short(cid2, 100)),
        XDP_PASS,
        Verdict::PassFibMiss,
    );
    // port 0 in the config: not configured
    x.set_port(0).unwrap();
    expect(
        &mut x,
        &to_relay(mac, &good),
        XDP_PASS,
        Verdict::PassNotConfigured,
    );
    x.set_port(RELAY.port()).unwrap();
    expect(&mut x, &to_relay(mac, &good), XDP_TX, Verdict::Tx);
    assert_eq!(x.counter(Verdict::Aborted).unwrap(), 0);
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn truncation_at_every_header_boundary_passes() {
    let mut x = fixture("t");
    let mac = x.relay_mac;
    let full = to_relay(mac, &quic_short(CID, 9));
    // 14 Ethernet + 20 IPv4 + 8 UDP + 1 + 8 DCID = 51 bytes: every cut short of the
    // DCID's end leaves a header incomplete.
    assert_eq!(full.len(), 51);
    for cut in 0..full.len() {
        let pkt = &full[..cut];
        let (ret, out, _) = x
            .run(pkt, 1)
            .unwrap_or((u32::MAX, vec![], Default::default()));
        if cut < 14 {
            // The kernel refuses test runs shorter than an Ethernet header.
            assert!(ret == XDP_PASS || ret == u32::MAX, "cut {cut}: {ret}");
            continue;
        }
        assert_eq!(ret, XDP_PASS, "cut {cut}");
        assert_eq!(out, pkt, "cut {cut}");
    }
    // The IP/UDP length fields still say 51 bytes: only the headers count here,
    // and a frame cut inside the payload but with a whole DCID is forwarded.
    assert!(x.counter(Verdict::PassTruncated).unwrap() >= 30);
    assert_eq!(x.counter(Verdict::Tx).unwrap(), 0);
    assert_eq!(x.counter(Verdict::Aborted).unwrap(), 0);
    let _ = XDP_ABORTED;
}
