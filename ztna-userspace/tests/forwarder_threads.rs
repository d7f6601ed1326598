//! The userspace forwarder on two threads (`forwarder_threads = 2`: the relay port
//! bound twice with SO_REUSEPORT), on loopback with the real intermediate and real
//! quiche clients: relayed packets are forwarded from both sockets, and QUIC control
//! traffic that the kernel puts on the forwarder thread's socket still reaches the
//! loop (handshakes, registrations, relay sessions all complete).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ztna_userspace::intermediate::{self, IntermediateConfig, IntermediateStats};

mod common;
use common::*;

fn stat(s: &IntermediateStats, f: impl Fn(&IntermediateStats) -> &AtomicU64) -> u64 {
    f(s).load(Ordering::Relaxed)
}

fn hex_cid(s: &str) -> [u8; 8] {
    let mut c = [0u8; 8];
    for (i, b) in c.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    c
}

/// A QUIC-short-header-shaped datagram to relay CID `cid`, numbered `n`.
fn packet(cid: [u8; 8], n: u32) -> Vec<u8> {
    let mut p = vec![0x40];
    p.extend_from_slice(&cid);
    p.extend_from_slice(&n.to_be_bytes());
    p.resize(64, 0x5a);
    p
}

/// Static sessions' relay CIDs from the stats file: A (as text) → (A→B, B→A).
fn static_cids(path: &std::path::Path, want: usize) -> Vec<(String, [u8; 8], [u8; 8])> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(list) = v["static_sessions"].as_array()
            && list.len() == want
        {
            assert_eq!(v["forwarder_threads"], 2, "{v}");
            return list
                .iter()
                .map(|s| {
                    (
                        s["a"].as_str().unwrap().to_string(),
                        hex_cid(s["dcid_a_to_b"].as_str().unwrap()),
                        hex_cid(s["dcid_b_to_a"].as_str().unwrap()),
                    )
                })
                .collect();
        }
        assert!(Instant::now() < deadline, "no stats file at {path:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Receives on `s` until `want` datagrams came or `within` passed; returns how many.
fn receive(s: &UdpSocket, want: usize, within: Duration) -> usize {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 2048];
    let mut got = 0;
    while got < want && Instant::now() < deadline {
        if s.recv_from(&mut buf).is_ok() {
            got += 1;
        }
    }
    got
}

#[test]
fn two_forwarder_threads_forward_static_sessions_from_both_sockets() {
    const FLOWS: usize = 16;
    const PACKETS: u32 = 50;
    let pki = pki("fwdthreads-static");
    let pairs: Vec<(UdpSocket, UdpSocket)> = (0..FLOWS)
        .map(|_| {
            (
                UdpSocket::bind("127.0.0.1:0").unwrap(),
                UdpSocket::bind("127.0.0.1:0").unwrap(),
            )
        })
        .collect();
    let mut cfg = IntermediateConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        pki.server_cert.clone(),
        pki.server_key.clone(),
        Some(pki.ca_cert.clone()),
    );
    cfg.forwarder_threads = 2;
    let stats_file = temp_dir("fwdthreads-stats").join("stats.json");
    cfg.stats_file = Some(stats_file.clone());
    cfg.static_sessions = pairs
        .iter()
        .map(|(a, b)| (a.local_addr().unwrap(), b.local_addr().unwrap()))
        .collect();
    let inter = intermediate::spawn(cfg).unwrap();
    let relay = inter.addr;
    let cids = static_cids(&stats_file, FLOWS);
    let cid_of = |a: &UdpSocket| {
        let a = a.local_addr().unwrap().to_string();
        let (_, ab, ba) = cids.iter().find(|(x, _, _)| *x == a).unwrap();
        (*ab, *ba)
    };
    // A → B on every session, one session at a time (all at once would overflow
    // the relay sockets' receive buffers before the threads read them), then B → A.
    for (a, b) in &pairs {
        let (ab, _) = cid_of(a);
        for n in 0..PACKETS {
            a.send_to(&packet(ab, n), relay).unwrap();
        }
        assert_eq!(
            receive(b, PACKETS as usize, Duration::from_secs(5)),
            PACKETS as usize,
            "session from {:?}",
            a.local_addr()
        );
    }
    for (a, b) in &pairs {
        let (_, ba) = cid_of(a);
        b.send_to(&packet(ba, 0), relay).unwrap();
        assert_eq!(receive(a, 1, Duration::from_secs(5)), 1);
    }
    let s = &inter.stats;
    let total = FLOWS as u64 * (PACKETS as u64 + 1);
    assert_eq!(stat(s, |s| &s.userspace_forwarded_packets), total);
    assert_eq!(stat(s, |s| &s.userspace_forwarded_bytes), total * 64);
    // The kernel spread the 32 flows over both sockets (all on one: 2 in 2^32).
    let threads = stat(s, |s| &s.userspace_forwarded_packets_threads);
    assert!(threads > 0 && threads < total, "{threads} of {total}");
    // Relay packets from their expected senders are never handed to the loop.
    assert_eq!(stat(s, |s| &s.forwarder_handovers), 0);
    assert_eq!(stat(s, |s| &s.relay_unknown_cid), 0);
    inter.stop().unwrap();
}

#[test]
fn control_traffic_on_the_forwarder_threads_socket_still_completes_handshakes() {
    let pki = pki("fwdthreads-quic");
    let echo = ztna_userspace::echo::EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut cfg = IntermediateConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        pki.server_cert.clone(),
        pki.server_key.clone(),
        Some(pki.ca_cert.clone()),
    );
    cfg.forwarder_threads = 2;
    let inter = intermediate::spawn(cfg).unwrap();
    let server: SocketAddr = inter.addr;
    let _conn = start_connector(&pki, server, echo.addr);
    let s = &inter.stats;
    // Agents (each its own UDP socket, so its own place in the kernel's hash) until
    // one's traffic landed on the forwarder thread's socket: its Initials, Retry
    // answer, handshake, registration and relay session all went through the
    // handover, and its relayed data connection through the thread's forwarding.
    let mut agents = Vec::new();
    for i in 0..24u16 {
        let mut a = agent_relay(&pki, server);
        a.wait_registered(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("agent {i}: {e}"));
        a.wait_relay_path(SERVICE, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("agent {i}: {e}"));
        assert!(
            echo_until_ok(&mut a, src(47000 + i), Duration::from_secs(5)).is_some(),
            "agent {i}: no echo through the relayed data connection"
        );
        agents.push(a);
        if stat(s, |s| &s.forwarder_handovers) > 0
            && stat(s, |s| &s.userspace_forwarded_packets_threads) > 0
        {
            break;
        }
    }
    assert!(
        stat(s, |s| &s.forwarder_handovers) > 0,
        "no client's traffic reached the second socket in {} agents",
        agents.len()
    );
    assert!(stat(s, |s| &s.userspace_forwarded_packets_threads) > 0);
    assert_eq!(stat(s, |s| &s.forwarder_handovers_dropped), 0);
    // Every client connected once: nothing was lost on the way to the loop.
    assert_eq!(
        stat(s, |s| &s.connections_accepted),
        agents.len() as u64 + 1
    );
    assert_eq!(stat(s, |s| &s.relay_sessions_created), agents.len() as u64);
    for mut a in agents {
        a.close();
    }
    inter.stop().unwrap();
}
