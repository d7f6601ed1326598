//! End-to-end tests on loopback: a real intermediate, connector, UDP echo service and
//! agents, all over real QUIC (quiche) with certificates from a throwaway dev CA.
//! Components run in-process on their own threads so the tests can stop, crash and
//! restart them and read their counters.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use std::sync::{Arc, Mutex};

use ztna_common::NackStatus;
use ztna_common::frames::Cid;
use ztna_core::packet;
use ztna_core::{ClientConfig, ClientError, ClientEvent, Role, app_error};
use ztna_userspace::agent::{Agent, AgentEvent, EchoOptions, Pattern, run_echo};
use ztna_userspace::connector::{self, ServiceSpec};
use ztna_userspace::echo::EchoServer;
use ztna_userspace::identity::{self, DevPki};
use ztna_userspace::intermediate::{self, IntermediateConfig, IntermediateHandle};
use ztna_userspace::relay::KernelTable;

mod common;
use common::*;

/// The kernel side of the forwarding table as the intermediate drives it: every
/// insert it would make into the XDP map, in order (the program itself is not loaded).
#[derive(Clone, Default)]
struct RecordingKernel {
    inserts: Arc<Mutex<Vec<(Cid, SocketAddr, SocketAddr)>>>,
    /// What the kernel map would hold now: inserts minus removals.
    live: Arc<Mutex<HashMap<Cid, (SocketAddr, SocketAddr)>>>,
    /// While set, inserts fail (like a full or vanished BPF map).
    fail: Arc<AtomicBool>,
}

impl RecordingKernel {
    fn inserts(&self) -> Vec<(Cid, SocketAddr, SocketAddr)> {
        self.inserts.lock().unwrap().clone()
    }
    fn live(&self) -> HashMap<Cid, (SocketAddr, SocketAddr)> {
        self.live.lock().unwrap().clone()
    }
}

impl KernelTable for RecordingKernel {
    fn insert(
        &mut self,
        cid: &Cid,
        peer: SocketAddr,
        expected: SocketAddr,
        _session: u32,
    ) -> Result<(), String> {
        if self.fail.load(Ordering::SeqCst) {
            return Err("injected failure".into());
        }
        self.inserts.lock().unwrap().push((*cid, peer, expected));
        self.live.lock().unwrap().insert(*cid, (peer, expected));
        Ok(())
    }
    fn remove(&mut self, cid: &Cid) {
        self.live.lock().unwrap().remove(cid);
    }
    fn stats(&self, _cid: &Cid) -> Option<(u64, u64, u64)> {
        None
    }
}

struct World {
    pki: DevPki,
    echo: EchoServer,
    inter: Option<IntermediateHandle>,
    conn: Option<connector::ConnectorHandle>,
    server: SocketAddr,
}

fn world(name: &str) -> World {
    world_with(name, None)
}

/// A world whose intermediate mirrors its forwarding table into `kernel`.
fn world_with(name: &str, kernel: Option<RecordingKernel>) -> World {
    if std::env::var_os("ZTNA_TEST_LOG").is_some() {
        ztna_userspace::logging::init("info");
    }
    let pki = pki(name);
    let echo = EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut cfg = IntermediateConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        pki.server_cert.clone(),
        pki.server_key.clone(),
        Some(pki.ca_cert.clone()),
    );
    cfg.relay_id = Some(WORLD_RELAY_ID);
    let inter = intermediate::spawn_with_kernel_table(
        cfg,
        kernel.map(|k| Box::new(k) as Box<dyn KernelTable>),
    )
    .unwrap();
    let server = inter.addr;
    let conn = start_connector(&pki, server, echo.addr);
    World {
        pki,
        echo,
        inter: Some(inter),
        conn: Some(conn),
        server,
    }
}

/// The relay ID of a world's intermediate (its relay CIDs' bytes 1..=2).
const WORLD_RELAY_ID: u16 = 0x4444;

fn stat(
    w: &World,
    f: impl Fn(&intermediate::IntermediateStats) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    f(&w.inter.as_ref().unwrap().stats).load(Ordering::Relaxed)
}

#[test]
fn qad_reports_the_clients_real_address_and_registration_is_acked() {
    let w = world("qad");
    let mut a = agent(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    let observed = a
        .events()
        .iter()
        .find_map(|e| match e {
            AgentEvent::ObservedAddress(addr) => Some(*addr),
            _ => None,
        })
        .or_else(|| a.client().observed_address())
        .expect("QAD received");
    assert_eq!(observed, a.local_addr());
    assert!(a.events().contains(&AgentEvent::Registered(SERVICE.into())));
    assert!(
        stat(&w, |s| &s.qad_sent) >= 2,
        "agent and connector each get QAD"
    );
    assert!(stat(&w, |s| &s.registrations_accepted) >= 2);
}

#[test]
fn echo_is_byte_exact_at_0_1_100_and_max_and_max_plus_one_is_refused() {
    let w = world("sizes");
    let mut a = agent(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    let max_dgram = a.client().max_datagram_payload().unwrap();
    // 1350-byte UDP payloads, not quiche's 1200 default.
    assert!(max_dgram > 1250, "max DATAGRAM {max_dgram}");
    let max = a.max_udp_payload(SERVICE, false).unwrap();
    assert_eq!(max, max_dgram - 2 - SERVICE.len() - 28);
    for size in [0usize, 1, 100, max] {
        let opts = EchoOptions {
            service: SERVICE.into(),
            src: src(40000),
            dst: dst(),
            size,
            pattern: Pattern::Random,
            count: 3,
            burst: 1,
            interval: Duration::ZERO,
            timeout: Duration::from_secs(3),
        };
        let r = run_echo(&mut a, &opts).unwrap();
        assert_eq!(
            (r.sent, r.echoed_exact, r.corrupted, r.lost),
            (3, 3, 0, 0),
            "size {size}: {r:?}"
        );
    }
    let too_big = vec![7u8; max + 1];
    let err = a
        .send_udp(SERVICE, src(40000), dst(), &too_big)
        .unwrap_err();
    let err = err.downcast::<ClientError>().unwrap();
    assert!(
        matches!(err, ClientError::PacketTooLarge { size, max: m } if size == max + 1 + 28 && m == max + 28),
        "{err}"
    );
    assert!(err.to_string().contains("exceeds the maximum"));
}

#[test]
fn burst_of_echoes_all_return() {
    let w = world("burst");
    let mut a = agent(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    let opts = EchoOptions {
        service: SERVICE.into(),
        src: src(40001),
        dst: dst(),
        size: 500,
        pattern: Pattern::Seq,
        count: 200,
        burst: 20,
        interval: Duration::ZERO,
        timeout: Duration::from_secs(3),
    };
    let r = run_echo(&mut a, &opts).unwrap();
    assert_eq!(r.echoed_exact, 200, "{r:?}");
    assert!(r.rtt_p50_us.is_some());
    assert!(w.echo.echoed.load(Ordering::Relaxed) >= 200);
}

#[test]
fn nack_not_authorized_for_uncovered_san_and_invalid_id() {
    let w = world("nack");
    let dir = w.pki.dir.clone();
    // An agent certificate for another service.
    let (cert, key) = identity::issue_leaf(
        &w.pki.ca_cert,
        &w.pki.ca_key,
        &dir,
        "other",
        &["agent.other.ztna".into()],
    )
    .unwrap();
    let mut a = Agent::connect_with(
        client_cfg(&w.pki, w.server, Role::Agent, &cert, &key),
        false,
    )
    .unwrap();
    assert_eq!(
        a.wait_registration_result(SERVICE, Duration::from_secs(10))
            .unwrap(),
        Some(NackStatus::NotAuthorized)
    );
    // The agent certificate cannot register as the connector of its own service.
    let mut cfg = client_cfg(
        &w.pki,
        w.server,
        Role::Connector,
        &w.pki.agent_cert,
        &w.pki.agent_key,
    );
    cfg.role = Role::Connector;
    let mut c =
        ztna_core::ControlClient::new(cfg, "127.0.0.1:0".parse().unwrap(), Instant::now()).unwrap();
    let _ = &mut c; // registration by role is covered below through the agent driver
    // Invalid id: characters that cannot appear in a SAN.
    let mut cfg = client_cfg(
        &w.pki,
        w.server,
        Role::Agent,
        &w.pki.agent_cert,
        &w.pki.agent_key,
    );
    cfg.services = vec!["bad id!".into()];
    let mut b = Agent::connect(cfg).unwrap();
    assert_eq!(
        b.wait_registration_result("bad id!", Duration::from_secs(10))
            .unwrap(),
        Some(NackStatus::InvalidId)
    );
    assert!(stat(&w, |s| &s.registrations_refused) >= 2);
    // A refused agent cannot send into the service.
    let pkt = packet::build_udp(src(1), dst(), b"x").unwrap();
    assert!(matches!(
        a.send_packet(SERVICE, &pkt),
        Err(ClientError::NotRegistered(_))
    ));
}

#[test]
fn agent_certificate_cannot_register_as_connector() {
    let w = world("role");
    let mut cfg = client_cfg(
        &w.pki,
        w.server,
        Role::Agent,
        &w.pki.agent_cert,
        &w.pki.agent_key,
    );
    cfg.role = Role::Connector;
    // Drive a connector-role client by hand: the Agent driver forces Role::Agent.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut c =
        ztna_core::ControlClient::new(cfg, socket.local_addr().unwrap(), Instant::now()).unwrap();
    let mut buf = vec![0u8; 65535];
    let mut out = vec![0u8; 1500];
    let deadline = Instant::now() + Duration::from_secs(10);
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut refused = None;
    while Instant::now() < deadline && refused.is_none() {
        while let Some((n, to)) = c.poll_transmit(&mut out, Instant::now()) {
            socket.send_to(&out[..n], to).unwrap();
        }
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            c.recv(&mut buf[..n], from, Instant::now());
        }
        c.handle_timeout(Instant::now());
        while let Some(ev) = c.poll_event() {
            if let ClientEvent::Refused { status, .. } = ev {
                refused = Some(status);
            }
        }
    }
    assert_eq!(refused, Some(NackStatus::NotAuthorized));
}

#[test]
fn client_without_certificate_is_refused() {
    let w = world("nocert");
    let mut cfg = ClientConfig::new(w.server, Role::Agent, vec![SERVICE.into()]);
    cfg.ca_file = Some(w.pki.ca_cert.to_str().unwrap().into());
    cfg.reconnect = false;
    let mut a = Agent::connect(cfg).unwrap();
    let err = a
        .wait_registered(Duration::from_secs(10))
        .unwrap_err()
        .to_string();
    assert!(err.contains("client certificate required"), "{err}");
    assert!(a.events().iter().any(|e| matches!(e,
        AgentEvent::Disconnected { reason, .. } if reason.contains(&format!("0x{:x}", app_error::CERTIFICATE_REQUIRED)))));
    assert_eq!(stat(&w, |s| &s.refused_no_certificate), 1);
    assert_eq!(
        stat(&w, |s| &s.registrations_accepted),
        1,
        "only the connector registered"
    );
}

#[test]
fn certificate_from_another_ca_fails_the_handshake() {
    let w = world("otherca");
    let other = pki("otherca-2");
    let mut cfg = client_cfg(
        &w.pki,
        w.server,
        Role::Agent,
        &other.agent_cert,
        &other.agent_key,
    );
    cfg.reconnect = false;
    let mut a = Agent::connect(cfg).unwrap();
    assert!(a.wait_registered(Duration::from_secs(10)).is_err());
    assert!(!a.client().is_registered(SERVICE));
}

#[test]
fn two_agents_same_tunnel_address_and_port_each_get_only_their_replies() {
    let w = world("twoagents");
    let mut a = agent(&w.pki, w.server);
    let mut b = agent(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    b.wait_registered(Duration::from_secs(10)).unwrap();
    let same = src(45000);
    for round in 0..20u32 {
        let pa = format!("from-a-{round}").into_bytes();
        let pb = format!("from-b-{round}").into_bytes();
        a.send_udp(SERVICE, same, dst(), &pa).unwrap();
        b.send_udp(SERVICE, same, dst(), &pb).unwrap();
        let ra = a
            .recv_udp(Duration::from_secs(3))
            .unwrap()
            .expect("a got a reply");
        let rb = b
            .recv_udp(Duration::from_secs(3))
            .unwrap()
            .expect("b got a reply");
        assert_eq!(ra, (dst(), same, pa.clone()), "round {round}");
        assert_eq!(rb, (dst(), same, pb.clone()), "round {round}");
    }
    // Nothing else is waiting for either of them.
    assert!(a.recv_udp(Duration::from_millis(200)).unwrap().is_none());
    assert!(b.recv_udp(Duration::from_millis(200)).unwrap().is_none());
    assert!(
        stat(&w, |s| &s.port_translations) >= 20,
        "the second agent's flow was translated"
    );
}

#[test]
fn icmp_echo_to_the_service_address_is_answered() {
    let w = world("icmp");
    let mut a = agent(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    let me: IpAddr = "100.64.0.2".parse().unwrap();
    let req =
        packet::build_icmp_echo_request(me, VIP.parse().unwrap(), 0x1234, 1, b"ping!").unwrap();
    a.send_packet(SERVICE, &req).unwrap();
    let reply = a
        .recv_packet(Duration::from_secs(3))
        .unwrap()
        .expect("echo reply");
    let key = packet::flow_key(&reply).unwrap();
    assert_eq!(key.src.ip(), VIP.parse::<IpAddr>().unwrap());
    assert_eq!(key.dst.ip(), me);
    assert_eq!(
        packet::icmp_echo_reply(&reply),
        None,
        "it is a reply, not a request"
    );
    assert!(reply.ends_with(b"ping!"));
}

#[test]
fn connector_restart_resumes_agent_traffic_without_restarting_the_agent() {
    let mut w = world("connrestart");
    let mut a = agent(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    assert!(echo_until_ok(&mut a, src(41000), Duration::from_secs(5)).is_some());
    w.conn.take().unwrap().stop().unwrap();
    assert_eq!(
        echo_once(
            &mut a,
            src(41000),
            b"while down",
            Duration::from_millis(500)
        ),
        None
    );
    w.conn = Some(start_connector(&w.pki, w.server, w.echo.addr));
    let took = echo_until_ok(&mut a, src(41000), Duration::from_secs(10));
    assert!(
        took.is_some(),
        "traffic resumed after the connector restarted"
    );
    assert_eq!(
        a.client().stats().connects,
        1,
        "the agent never reconnected"
    );
}

fn restart_intermediate(crash: bool) {
    let mut w = world(if crash { "intercrash" } else { "interrestart" });
    let mut a = agent(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    assert!(echo_until_ok(&mut a, src(42000), Duration::from_secs(5)).is_some());
    let old = w.inter.take().unwrap();
    if crash {
        old.crash().unwrap();
    } else {
        old.stop().unwrap();
    }
    w.inter = Some(start_intermediate(&w.pki, w.server));
    // A crashed intermediate's clients learn of the restart by stateless reset,
    // a stopped one's by CONNECTION_CLOSE; both well inside 10 s.
    let took = echo_until_ok(&mut a, src(42000), Duration::from_secs(10));
    assert!(
        took.is_some(),
        "traffic resumed after the intermediate restarted: {:?} {}",
        a.events(),
        w.inter.as_ref().unwrap().stats.snapshot()
    );
    assert!(a.client().stats().connects >= 2, "the agent reconnected");
    assert!(
        stat(&w, |s| &s.registrations_accepted) >= 2,
        "both sides registered again"
    );
    if crash {
        assert!(stat(&w, |s| &s.stateless_resets_sent) >= 1);
    }
}

/// A `tracing` writer into a shared buffer, to read what was logged.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn skipping_server_verification_warns_at_every_connect() {
    let mut w = world("insecureverify");
    let log = LogBuf::default();
    let sub = tracing_subscriber::fmt()
        .with_writer({
            let log = log.clone();
            move || log.clone()
        })
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    // The agent runs on this thread: its connects log to `log`.
    tracing::subscriber::with_default(sub, || {
        let mut cfg = client_cfg(
            &w.pki,
            w.server,
            Role::Agent,
            &w.pki.agent_cert,
            &w.pki.agent_key,
        );
        cfg.ca_file = None;
        let mut a = Agent::connect_with(cfg, false).unwrap();
        a.wait_registered(Duration::from_secs(10)).unwrap();
        w.inter.take().unwrap().stop().unwrap();
        w.inter = Some(start_intermediate(&w.pki, w.server));
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.client().stats().connects < 2 && Instant::now() < deadline {
            let _ = a.recv_packet(Duration::from_millis(50));
        }
        let stats = a.client().stats().clone();
        assert!(stats.connects >= 2, "reconnected: {stats:?}");
        assert_eq!(stats.unverified_connects, stats.connects);
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        let warnings = text.matches("WITHOUT verifying its certificate").count();
        assert_eq!(warnings as u64, stats.connects, "{text}");
    });
}

#[test]
fn intermediate_graceful_restart_both_sides_reconnect() {
    restart_intermediate(false);
}

#[test]
fn intermediate_crash_restart_both_sides_reconnect_via_stateless_reset() {
    restart_intermediate(true);
}

#[test]
fn unknown_types_and_garbage_are_counted_and_ignored() {
    let w = world("garbage");
    let mut a = agent(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    let garbage: &[&[u8]] = &[
        &[0x00],
        &[0x7f, 1, 2, 3],
        &[0xff; 40],
        &[0x10],                                     // truncated
        &[0x10, 9, b'a'],                            // length past payload
        &[0x11, 0],                                  // length 0
        &[0x2F, 2, 0xff, 0xfe, 0x45],                // bad UTF-8
        &[0x45, 0, 0],                               // raw IPv4 that is not a packet
        &[0x2F, 4, b'e', b'c', b'h', b'o', 1, 2, 3], // service packet with garbage inside
        &[0x12, 0, 1, b'x'],                         // an ACK from a client makes no sense
    ];
    for g in garbage {
        a.client_mut().send_datagram(g).unwrap();
    }
    // Plain UDP junk at the QUIC port.
    let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..5 {
        junk.send_to(b"\x00not quic at all", w.server).unwrap();
    }
    junk.send_to(&[0x40; 60], w.server).unwrap(); // short header, unknown CID
    assert!(
        echo_until_ok(&mut a, src(43000), Duration::from_secs(5)).is_some(),
        "still serving"
    );
    assert_eq!(stat(&w, |s| &s.datagrams_unknown_type), 3);
    assert_eq!(stat(&w, |s| &s.datagrams_malformed), 4);
    assert_eq!(stat(&w, |s| &s.dropped_bad_inner_packet), 2);
    assert_eq!(stat(&w, |s| &s.datagrams_unexpected), 1);
    assert!(stat(&w, |s| &s.garbage_packets) + stat(&w, |s| &s.unknown_cid_packets) >= 6);
    assert!(stat(&w, |s| &s.relayed_to_agent) >= 1);
}

#[test]
fn relayed_data_connection_carries_echo_end_to_end_through_the_userspace_forwarder() {
    let w = world("datapath");
    let mut a = agent_relay(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    a.wait_relay_path(SERVICE, Duration::from_secs(10)).unwrap();
    let d = a.data_connection(SERVICE).unwrap();
    assert!(d.handshake_time().is_some());
    assert_eq!(d.local_cid[0], ztna_common::relay::RELAY_CID_MARKER);
    // The intermediate's relay ID, as configured.
    assert_eq!(
        u16::from_be_bytes([d.local_cid[1], d.local_cid[2]]),
        WORLD_RELAY_ID
    );
    let max = a.max_udp_payload(SERVICE, false).unwrap();
    assert!(max > 1200, "data path max UDP payload {max}");
    let relayed_before = stat(&w, |s| &s.relayed_to_connector);
    let opts = EchoOptions {
        service: SERVICE.into(),
        src: src(46000),
        dst: dst(),
        size: max,
        pattern: Pattern::Seq,
        count: 100,
        burst: 10,
        interval: Duration::ZERO,
        timeout: Duration::from_secs(3),
    };
    let r = run_echo(&mut a, &opts).unwrap();
    assert_eq!((r.echoed_exact, r.corrupted, r.lost), (100, 0, 0), "{r:?}");
    assert_eq!(stat(&w, |s| &s.relay_sessions_created), 1);
    // Every echo crossed the forwarder, none was decrypted by the intermediate.
    assert!(stat(&w, |s| &s.userspace_forwarded_packets) >= 200);
    assert_eq!(stat(&w, |s| &s.relayed_to_connector), relayed_before);
    let cs = &w.conn.as_ref().unwrap().stats;
    assert_eq!(cs.data_connections.load(Ordering::Relaxed), 1);
    assert!(cs.packets_to_data.load(Ordering::Relaxed) >= 100);
}

#[test]
fn relay_session_falls_back_to_datagrams_without_a_connector_and_recovers() {
    let mut w = world("datafallback");
    w.conn.take().unwrap().stop().unwrap();
    let mut a = agent_relay(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    // No connector: the session is refused, traffic has nowhere to go yet.
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(&w, |s| &s.relay_sessions_refused) == 0 && Instant::now() < deadline {
        let _ = a.recv_packet(Duration::from_millis(50));
    }
    assert!(stat(&w, |s| &s.relay_sessions_refused) >= 1);
    assert_eq!(a.path(SERVICE), ztna_userspace::agent::PathKind::Datagram);
    w.conn = Some(start_connector(&w.pki, w.server, w.echo.addr));
    // Datagram relay works at once; the data connection follows on the next request.
    assert!(echo_until_ok(&mut a, src(47000), Duration::from_secs(5)).is_some());
    a.wait_relay_path(SERVICE, Duration::from_secs(10)).unwrap();
    assert!(echo_until_ok(&mut a, src(47001), Duration::from_secs(5)).is_some());
    assert!(stat(&w, |s| &s.userspace_forwarded_packets) > 0);
}

#[test]
fn relay_session_is_removed_when_the_connector_goes_away() {
    let mut w = world("datateardown");
    let mut a = agent_relay(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    a.wait_relay_path(SERVICE, Duration::from_secs(10)).unwrap();
    assert_eq!(stat(&w, |s| &s.relay_sessions_created), 1);
    w.conn.take().unwrap().stop().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(&w, |s| &s.relay_sessions_closed) == 0 && Instant::now() < deadline {
        let _ = a.recv_packet(Duration::from_millis(50));
    }
    assert_eq!(stat(&w, |s| &s.relay_sessions_closed), 1);
    // The agent notices and drops to the datagram path.
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.path(SERVICE) != ztna_userspace::agent::PathKind::Datagram && Instant::now() < deadline
    {
        let _ = a.recv_packet(Duration::from_millis(50));
    }
    assert_eq!(a.path(SERVICE), ztna_userspace::agent::PathKind::Datagram);
    // A new connector brings the relayed path back.
    w.conn = Some(start_connector(&w.pki, w.server, w.echo.addr));
    a.wait_relay_path(SERVICE, Duration::from_secs(10)).unwrap();
    assert!(echo_until_ok(&mut a, src(48000), Duration::from_secs(5)).is_some());
}

#[test]
fn direct_path_on_loopback_carries_both_directions_and_the_relay_goes_quiet() {
    use ztna_userspace::agent::PathKind;
    let w = world("p2p");
    let mut a = agent_p2p(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    let took = a
        .wait_path(SERVICE, PathKind::Direct, Duration::from_secs(10))
        .unwrap();
    assert!(took < Duration::from_secs(5), "direct after {took:?}");
    let path: Vec<PathKind> = a.timeline().iter().map(|c| c.path).collect();
    assert!(
        path.contains(&PathKind::RelayUserspace),
        "relayed first: {path:?}"
    );
    let relayed = stat(&w, |s| &s.userspace_forwarded_packets);
    let opts = EchoOptions {
        service: SERVICE.into(),
        src: src(49000),
        dst: dst(),
        size: 800,
        pattern: Pattern::Seq,
        count: 200,
        burst: 10,
        interval: Duration::ZERO,
        timeout: Duration::from_secs(3),
    };
    let r = run_echo(&mut a, &opts).unwrap();
    assert_eq!((r.echoed_exact, r.corrupted, r.lost), (200, 0, 0), "{r:?}");
    assert_eq!(r.path, Some(PathKind::Direct));
    // Neither direction touched the relay: its forwarder saw at most keepalives.
    let after = stat(&w, |s| &s.userspace_forwarded_packets);
    assert!(
        after - relayed < 20,
        "relay forwarded {} packets during the direct echo",
        after - relayed
    );
    let cs = &w.conn.as_ref().unwrap().stats;
    assert_eq!(cs.direct_connections.load(Ordering::Relaxed), 1);
    assert!(
        stat(&w, |s| &s.candidates_forwarded) >= 2,
        "candidates went both ways"
    );
    assert_eq!(a.engine().stats().candidates_refused, 0);
}

#[test]
fn candidates_for_a_session_the_sender_is_not_part_of_are_refused() {
    let w = world("candref");
    let mut a = agent_p2p(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    a.wait_relay_path(SERVICE, Duration::from_secs(10)).unwrap();
    // A second agent sends candidates for the first agent's session.
    let mut b = agent_relay(&w.pki, w.server);
    b.wait_registered(Duration::from_secs(10)).unwrap();
    let session = a.data_connection(SERVICE).unwrap().session_id;
    let cand = [ztna_core::p2p::Candidate {
        kind: ztna_core::p2p::CandidateKind::Host,
        addr: "127.0.0.1:9".parse().unwrap(),
    }];
    b.client_mut()
        .send_candidates(session, [1; 16], &cand)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(&w, |s| &s.candidates_refused) == 0 && Instant::now() < deadline {
        let _ = b.recv_packet(Duration::from_millis(50));
    }
    assert_eq!(stat(&w, |s| &s.candidates_refused), 1);
}

#[test]
fn candidates_are_rate_limited_per_session_at_the_intermediate() {
    let w = world("candrate");
    let mut a = agent_p2p(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    a.wait_relay_path(SERVICE, Duration::from_secs(10)).unwrap();
    let session = a.data_connection(SERVICE).unwrap().session_id;
    let forwarded0 = stat(&w, |s| &s.candidates_forwarded);
    let limited0 = stat(&w, |s| &s.candidates_rate_limited);
    // An authorized agent repeats CANDIDATES naming an address that is not its own:
    // each forwarded one would restart the connector's checks towards it.
    let cand = [ztna_core::p2p::Candidate {
        kind: ztna_core::p2p::CandidateKind::Host,
        addr: "127.0.0.1:9".parse().unwrap(),
    }];
    for _ in 0..20 {
        a.client_mut()
            .send_candidates(session, [1; 16], &cand)
            .unwrap();
    }
    let limited = |w: &World| stat(w, |s| &s.candidates_rate_limited) - limited0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while limited(&w) < 18 && Instant::now() < deadline {
        let _ = a.recv_packet(Duration::from_millis(50));
    }
    // A burst of 2 per session and endpoint, then one per 2 s: at most 2 of the
    // agent's frames get through (fewer if its own first CANDIDATES used a token),
    // plus the connector's answers to them from its own bucket.
    assert!(limited(&w) >= 18, "rate-limited {} of 20", limited(&w));
    let forwarded = stat(&w, |s| &s.candidates_forwarded) - forwarded0;
    assert!(forwarded <= 4, "forwarded {forwarded}");
    // The agent's session still works on the relay.
    assert!(echo_until_ok(&mut a, src(49500), Duration::from_secs(5)).is_some());
}

#[test]
fn the_connector_checks_at_most_max_remote_candidates_of_a_frame() {
    let w = world("candcap");
    let mut a = agent_relay(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    a.wait_relay_path(SERVICE, Duration::from_secs(10)).unwrap();
    let session = a.data_connection(SERVICE).unwrap().session_id;
    // Sixteen addresses (the most a frame carries) that are not the agent's.
    let cands: Vec<ztna_core::p2p::Candidate> = (0..16u16)
        .map(|i| ztna_core::p2p::Candidate {
            kind: ztna_core::p2p::CandidateKind::Host,
            addr: SocketAddr::new("127.0.0.1".parse().unwrap(), 9000 + i),
        })
        .collect();
    a.client_mut()
        .send_candidates(session, [1; 16], &cands)
        .unwrap();
    let cs = &w.conn.as_ref().unwrap().stats;
    let deadline = Instant::now() + Duration::from_secs(5);
    while cs.candidates_dropped.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        let _ = a.recv_packet(Duration::from_millis(50));
    }
    assert_eq!(
        cs.candidates_dropped.load(Ordering::Relaxed),
        (16 - ztna_core::p2p::MAX_REMOTE_CANDIDATES) as u64
    );
}

/// A one-client UDP NAT on loopback: the agent talks to it, it talks to the
/// intermediate from an outside socket that `rebind` replaces (a NAT rebinding).
struct LoopNat {
    addr: SocketAddr,
    /// DCID of the latest short-header packet the client sent on its control
    /// connection (the intermediate's 16-byte CIDs; relay CIDs are 8 bytes, 0xA5...).
    control_dcid: Arc<Mutex<Option<Vec<u8>>>>,
    rebind: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LoopNat {
    fn new(server: SocketAddr) -> Self {
        use std::net::UdpSocket;
        let inside = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = inside.local_addr().unwrap();
        inside.set_nonblocking(true).unwrap();
        let rebind = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, st) = (rebind.clone(), stop.clone());
        let control_dcid = Arc::new(Mutex::new(None));
        let dcid = control_dcid.clone();
        let thread = std::thread::spawn(move || {
            let mut outside = UdpSocket::bind("127.0.0.1:0").unwrap();
            outside.set_nonblocking(true).unwrap();
            let mut client: Option<SocketAddr> = None;
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::SeqCst) {
                if r.swap(false, Ordering::SeqCst) {
                    outside = UdpSocket::bind("127.0.0.1:0").unwrap();
                    outside.set_nonblocking(true).unwrap();
                }
                let mut idle = true;
                while let Ok((n, from)) = inside.recv_from(&mut buf) {
                    client = Some(from);
                    let pkt = &buf[..n];
                    if n > 17
                        && pkt[0] & 0x80 == 0
                        && pkt[1] != ztna_common::relay::RELAY_CID_MARKER
                    {
                        *dcid.lock().unwrap() = Some(pkt[1..17].to_vec());
                    }
                    let _ = outside.send_to(pkt, server);
                    idle = false;
                }
                while let Ok((n, _)) = outside.recv_from(&mut buf) {
                    if let Some(c) = client {
                        let _ = inside.send_to(&buf[..n], c);
                    }
                    idle = false;
                }
                if idle {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        LoopNat {
            addr,
            control_dcid,
            rebind,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for LoopNat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn nat_rebinding_moves_the_relay_entry_after_the_control_connection_proves_it() {
    let kernel = RecordingKernel::default();
    let w = world_with("rebind", Some(kernel.clone()));
    let nat = LoopNat::new(w.server);
    let mut a = agent_relay(&w.pki, nat.addr);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    a.wait_relay_path(SERVICE, Duration::from_secs(10)).unwrap();
    assert!(echo_until_ok(&mut a, src(50000), Duration::from_secs(5)).is_some());
    let forwarded = stat(&w, |s| &s.userspace_forwarded_packets);
    let inserts = kernel.inserts();
    nat.rebind.store(true, Ordering::SeqCst);
    // Same session, new outside address: traffic resumes without a new session.
    let took = echo_until_ok(&mut a, src(50000), Duration::from_secs(10)).expect("traffic resumed");
    assert!(took < Duration::from_secs(5), "resumed after {took:?}");
    assert!(a.path(SERVICE).is_relay());
    assert_eq!(stat(&w, |s| &s.relay_sessions_created), 1);
    assert!(stat(&w, |s| &s.client_moves) >= 1);
    assert!(stat(&w, |s| &s.userspace_forwarded_packets) > forwarded);
    // The validated move reached the kernel table: the agent's entries now name the
    // NAT's new outside address, which none of the entries before named.
    let old_addrs: Vec<SocketAddr> = inserts.iter().flat_map(|i| [i.1, i.2]).collect();
    let after = kernel.inserts();
    assert!(
        after[inserts.len()..]
            .iter()
            .any(|i| !old_addrs.contains(&i.1) || !old_addrs.contains(&i.2)),
        "no kernel entry moved: {after:?}"
    );
    // The observed address was reported again (QAD on change).
    let qads = a
        .events()
        .iter()
        .filter(|e| matches!(e, AgentEvent::ObservedAddress(_)))
        .count();
    assert!(qads >= 2, "QAD after the rebinding: {qads}");
}

#[test]
fn a_failed_kernel_update_after_a_move_removes_the_stale_kernel_entry() {
    let kernel = RecordingKernel::default();
    let w = world_with("rebindfail", Some(kernel.clone()));
    let nat = LoopNat::new(w.server);
    let mut a = agent_relay(&w.pki, nat.addr);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    a.wait_relay_path(SERVICE, Duration::from_secs(10)).unwrap();
    assert!(echo_until_ok(&mut a, src(50100), Duration::from_secs(5)).is_some());
    let before = kernel.live();
    assert_eq!(before.len(), 2, "both entries of the session: {before:?}");
    // The map refuses updates from now on; the agent's NAT rebinds.
    kernel.fail.store(true, Ordering::SeqCst);
    nat.rebind.store(true, Ordering::SeqCst);
    let took = echo_until_ok(&mut a, src(50100), Duration::from_secs(10)).expect("traffic resumed");
    assert!(took < Duration::from_secs(5), "resumed after {took:?}");
    assert!(stat(&w, |s| &s.client_moves) >= 1);
    // Both entries name the agent's old outside address (one as peer, one as
    // expected sender): neither may stay behind for the XDP program to follow.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !kernel.live().is_empty() && Instant::now() < deadline {
        let _ = a.recv_packet(Duration::from_millis(50));
    }
    assert!(
        kernel.live().is_empty(),
        "stale kernel entries: {:?}",
        kernel.live()
    );
    assert!(stat(&w, |s| &s.kernel_update_failures) >= 2);
}

/// Drives `a` until `cond` holds; false after `within`.
fn drive_until(a: &mut Agent, within: Duration, cond: impl Fn(&Agent) -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !cond(a) {
        if Instant::now() >= deadline {
            return false;
        }
        a.drive((Instant::now() + Duration::from_millis(50)).min(deadline))
            .unwrap();
    }
    true
}

#[test]
fn agents_learn_prefixes_of_authorized_services_only_and_get_unique_tunnel_addresses() {
    let w = world("prefixes");
    let dir = w.pki.dir.clone();
    // A second service, "other", with a connector of its own; the agent's
    // certificate does not cover it.
    let (ccert, ckey) = identity::issue_leaf(
        &w.pki.ca_cert,
        &w.pki.ca_key,
        &dir,
        "connector-other",
        &["connector.other.ztna".into()],
    )
    .unwrap();
    let mut ccfg = client_cfg(&w.pki, w.server, Role::Connector, &ccert, &ckey);
    ccfg.services = vec!["other".into()];
    let other = connector::spawn(
        ccfg,
        vec![ServiceSpec {
            id: "other".into(),
            backend: w.echo.addr.into(),
            prefixes: vec!["10.200.0.0/24".parse().unwrap()],
        }],
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stat(&w, |s| &s.service_prefixes_published) < 2 {
        assert!(
            Instant::now() < deadline,
            "both connectors publish prefixes"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    let mut cfg = client_cfg(
        &w.pki,
        w.server,
        Role::Agent,
        &w.pki.agent_cert,
        &w.pki.agent_key,
    );
    cfg.services = vec![SERVICE.into(), "other".into()];
    let mut a = Agent::connect_with(cfg, false).unwrap();
    assert_eq!(
        a.wait_registration_result(SERVICE, Duration::from_secs(10))
            .unwrap(),
        None
    );
    assert_eq!(
        a.wait_registration_result("other", Duration::from_secs(10))
            .unwrap(),
        Some(NackStatus::NotAuthorized)
    );
    let vip: IpAddr = VIP.parse().unwrap();
    assert!(
        drive_until(&mut a, Duration::from_secs(5), |a| {
            a.engine().route(vip) == Some(SERVICE) && a.engine().tunnel_address().is_some()
        }),
        "routes {:?}, tunnel {:?}",
        a.engine().routes(),
        a.engine().tunnel_address()
    );
    assert!(a.events().contains(&AgentEvent::RoutesChanged));
    let (v4, v6) = a.engine().tunnel_address().unwrap();
    assert!(
        "100.64.0.0/10"
            .parse::<ipnet::Ipv4Net>()
            .unwrap()
            .contains(&v4),
        "{v4}"
    );
    assert_eq!(v6.octets()[0], 0xfd, "{v6}: a ULA address");
    // Whatever else arrives, the unauthorized service's prefix never becomes a route.
    drive_until(&mut a, Duration::from_millis(300), |_| false);
    assert_eq!(a.engine().route("10.200.0.9".parse().unwrap()), None);
    assert_eq!(a.engine().routes().len(), 1, "{:?}", a.engine().routes());

    // A second agent with the same certificate gets other addresses.
    let mut b = agent(&w.pki, w.server);
    b.wait_registered(Duration::from_secs(10)).unwrap();
    assert!(drive_until(&mut b, Duration::from_secs(5), |b| b
        .engine()
        .tunnel_address()
        .is_some()));
    let (b4, b6) = b.engine().tunnel_address().unwrap();
    assert_ne!(b4, v4);
    assert_ne!(b6, v6);
    assert_eq!(stat(&w, |s| &s.tunnel_addresses_assigned), 2);

    // An agent cannot publish prefixes for a service.
    let mut cfg = client_cfg(
        &w.pki,
        w.server,
        Role::Agent,
        &w.pki.agent_cert,
        &w.pki.agent_key,
    );
    cfg.service_prefixes
        .insert(SERVICE.into(), vec!["192.0.2.0/24".parse().unwrap()]);
    let mut c = Agent::connect_with(cfg, false).unwrap();
    c.wait_registered(Duration::from_secs(10)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(&w, |s| &s.service_prefixes_refused) == 0 {
        assert!(
            Instant::now() < deadline,
            "the agent's SERVICE_PREFIXES is refused"
        );
        c.drive(Instant::now() + Duration::from_millis(20)).unwrap();
    }
    drive_until(&mut a, Duration::from_millis(200), |_| false);
    assert_eq!(a.engine().route("192.0.2.1".parse().unwrap()), None);
    drop(other);
}

#[test]
fn junk_with_a_live_clients_connection_id_from_another_address_moves_nothing() {
    let kernel = RecordingKernel::default();
    let w = world_with("junkcid", Some(kernel.clone()));
    let nat = LoopNat::new(w.server);
    let mut a = agent_relay(&w.pki, nat.addr);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    a.wait_relay_path(SERVICE, Duration::from_secs(10)).unwrap();
    assert!(echo_until_ok(&mut a, src(51000), Duration::from_secs(5)).is_some());
    let dcid = nat
        .control_dcid
        .lock()
        .unwrap()
        .clone()
        .expect("control DCID seen");
    assert_eq!(dcid.len(), 16);
    let (moves, qads, inserts) = (
        stat(&w, |s| &s.client_moves),
        stat(&w, |s| &s.qad_sent),
        kernel.inserts().len(),
    );
    assert!(
        inserts >= 2,
        "the session's entries reached the kernel table"
    );
    let dropped = stat(&w, |s| &s.quic_packets_dropped);
    // The victim: a socket the attacker wants the agent's traffic reflected to. It
    // sends undecryptable short-header packets carrying the agent's control CID.
    let victim = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let victim_addr = victim.local_addr().unwrap();
    for i in 0..20u8 {
        let mut junk = vec![0x40 | (i & 0x3f)];
        junk.extend_from_slice(&dcid);
        junk.extend((0..100).map(|j: u8| j.wrapping_mul(31) ^ i));
        victim.send_to(&junk, w.server).unwrap();
    }
    // quiche drops every one of them (and the intermediate counts that).
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(&w, |s| &s.quic_packets_dropped) < dropped + 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(stat(&w, |s| &s.quic_packets_dropped) >= dropped + 20);
    // Traffic still flows to the agent, through the relay, and nothing reached the victim.
    assert!(echo_until_ok(&mut a, src(51000), Duration::from_secs(5)).is_some());
    assert!(a.path(SERVICE).is_relay());
    assert_eq!(stat(&w, |s| &s.client_moves), moves, "client moved by junk");
    assert_eq!(stat(&w, |s| &s.qad_sent), qads, "QAD sent because of junk");
    let moved: Vec<_> = kernel.inserts().into_iter().skip(inserts).collect();
    assert!(moved.is_empty(), "kernel entries rewritten: {moved:?}");
    victim.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 2048];
    assert!(
        victim.recv_from(&mut buf).is_err(),
        "the victim {victim_addr} received reflected traffic"
    );
}

/// Moves packets between two sans-IO data connections until neither has any.
fn pump(
    a: &mut ztna_core::data::DataConnection,
    a_addr: SocketAddr,
    b: &mut ztna_core::data::DataConnection,
    b_addr: SocketAddr,
    now: Instant,
) {
    let mut buf = [0u8; 2048];
    loop {
        let mut moved = false;
        while let Some((n, _)) = a.poll_transmit(&mut buf, now) {
            b.recv(&mut buf[..n], a_addr, now);
            moved = true;
        }
        while let Some((n, _)) = b.poll_transmit(&mut buf, now) {
            a.recv(&mut buf[..n], b_addr, now);
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

#[test]
fn junk_with_a_data_connections_cid_does_not_count_as_liveness() {
    use ztna_core::data::{self, DataConfig, DataConnection};
    let pki = pki("liveness");
    let cfg = |cert: &Path, key: &Path| DataConfig {
        ca_file: pki.ca_cert.to_str().unwrap().into(),
        cert_file: cert.to_str().unwrap().into(),
        key_file: key.to_str().unwrap().into(),
        idle_timeout: Duration::from_secs(30),
        keepalive: Duration::from_millis(200),
    };
    let mut qa = data::quic_config(&cfg(&pki.agent_cert, &pki.agent_key)).unwrap();
    let mut qc = data::quic_config(&cfg(&pki.connector_cert, &pki.connector_key)).unwrap();
    let (a_addr, c_addr): (SocketAddr, SocketAddr) = (
        "127.0.0.1:40001".parse().unwrap(),
        "127.0.0.1:40002".parse().unwrap(),
    );
    let t0 = Instant::now();
    let keepalive = Duration::from_millis(200);
    let mut agent =
        DataConnection::connect_direct(&mut qa, keepalive, 1, SERVICE, a_addr, c_addr, t0).unwrap();
    let mut buf = [0u8; 2048];
    let (n, to) = agent.poll_transmit(&mut buf, t0).unwrap();
    assert_eq!(to, c_addr);
    let mut conn = DataConnection::accept(
        &mut qc,
        keepalive,
        1,
        SERVICE,
        agent.peer_cid,
        agent.local_cid,
        c_addr,
        a_addr,
        t0,
    )
    .unwrap();
    conn.recv(&mut buf[..n], a_addr, t0);
    pump(&mut agent, a_addr, &mut conn, c_addr, t0);
    assert!(agent.is_established() && conn.is_established());
    assert_eq!(agent.last_recv(), t0);
    // Later, the connector has gone silent; junk carrying the agent's CID arrives
    // (from the connector's address, as a spoofer would send it).
    let t1 = t0 + Duration::from_secs(1);
    for i in 0..5u8 {
        let mut junk = vec![0x40 | i];
        junk.extend_from_slice(&agent.local_cid);
        junk.extend((0..60).map(|j: u8| j ^ i));
        agent.recv(&mut junk, c_addr, t1);
    }
    assert_eq!(agent.last_recv(), t0, "junk counted as a sign of life");
    assert_eq!(agent.dropped_packets(), 5);
    assert!(!agent.is_closed(), "junk is dropped, not fatal");
    // A real packet from the connector does count.
    assert!(conn.check_peer(t1, |_| Ok("agent".into())));
    conn.send_packet(b"alive").unwrap();
    pump(&mut agent, a_addr, &mut conn, c_addr, t1);
    assert_eq!(agent.last_recv(), t1, "a real packet is liveness");
}

/// A client Initial's long header (version `version`, DCID, SCID, `token`) padded
/// with junk to `len` bytes: enough for the intermediate's stateless answers, which
/// look at the header only.
fn initial(version: u32, dcid: &[u8], scid: &[u8], token: &[u8], len: usize) -> Vec<u8> {
    let mut p = vec![0xc0];
    p.extend_from_slice(&version.to_be_bytes());
    p.push(dcid.len() as u8);
    p.extend_from_slice(dcid);
    p.push(scid.len() as u8);
    p.extend_from_slice(scid);
    // Token length and packet length as 2-byte varints.
    p.extend_from_slice(&(0x4000u16 | token.len() as u16).to_be_bytes());
    p.extend_from_slice(token);
    let rest = len.saturating_sub(p.len() + 2);
    p.extend_from_slice(&(0x4000u16 | rest as u16).to_be_bytes());
    p.resize(len, 0x5a);
    p
}

/// Receives datagrams on `sock` until one whose DCID (long header) is `dcid`; returns
/// it and every datagram seen before it.
fn recv_until_dcid(sock: &std::net::UdpSocket, dcid: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut before = Vec::new();
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            let p = buf[..n].to_vec();
            let d = p.get(6..6 + *p.get(5).unwrap_or(&0) as usize);
            if d == Some(dcid) {
                return (p, before);
            }
            before.push(p);
        }
    }
    panic!("no answer for DCID {dcid:02x?}; got {before:02x?}");
}

#[test]
fn tiny_initials_get_no_retry_or_version_negotiation_and_tokens_bind_the_retry_cid() {
    let w = world("tinyinit");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let odcid = [0x11u8; 8];
    // Retry: a 100-byte Initial goes unanswered, a 1200-byte one is answered. The
    // server reads its socket in order, so the answer to the second comes after any
    // answer to the first would have.
    sock.send_to(&initial(1, &odcid, &[1; 8], &[], 100), w.server)
        .unwrap();
    sock.send_to(&initial(1, &odcid, &[2; 8], &[], 1199), w.server)
        .unwrap();
    sock.send_to(&initial(1, &odcid, &[3; 8], &[], 1200), w.server)
        .unwrap();
    let (retry, before) = recv_until_dcid(&sock, &[3; 8]);
    assert!(before.is_empty(), "tiny Initials answered: {before:02x?}");
    assert_eq!(retry[0] & 0xf0, 0xf0, "a Retry");
    assert_eq!(stat(&w, |s| &s.dropped_short_initials), 2);
    // Version negotiation: the same for an unknown version.
    sock.send_to(&initial(0x1a2a3a4a, &odcid, &[4; 8], &[], 60), w.server)
        .unwrap();
    sock.send_to(&initial(0x1a2a3a4a, &odcid, &[5; 8], &[], 1200), w.server)
        .unwrap();
    let (vn, before) = recv_until_dcid(&sock, &[5; 8]);
    assert!(before.is_empty(), "tiny Initial got VN: {before:02x?}");
    assert_eq!(&vn[1..5], &[0, 0, 0, 0], "a Version Negotiation");
    assert_eq!(stat(&w, |s| &s.dropped_short_initials), 3);
    assert_eq!(stat(&w, |s| &s.version_negotiations), 1);
    // The Retry's token is only good with the Retry's own source CID as DCID.
    let scid_len = retry[6 + 8] as usize;
    let retry_scid = retry[15..15 + scid_len].to_vec();
    let token = retry[15 + scid_len..retry.len() - 16].to_vec();
    let accepted = stat(&w, |s| &s.connections_accepted);
    let invalid = stat(&w, |s| &s.invalid_tokens);
    let mut chosen = [0x42u8; 16];
    chosen[0] = ztna_common::relay::RELAY_CID_MARKER;
    for dcid in [[0x42u8; 16], chosen] {
        sock.send_to(&initial(1, &dcid, &[3; 8], &token, 1200), w.server)
            .unwrap();
    }
    // And with it, the server takes the Initial as a new connection attempt.
    sock.send_to(&initial(1, &retry_scid, &[3; 8], &token, 1200), w.server)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(&w, |s| &s.connections_accepted) == accepted && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(stat(&w, |s| &s.connections_accepted), accepted + 1);
    assert_eq!(stat(&w, |s| &s.invalid_tokens), invalid + 2);
}

#[test]
fn without_retry_a_retransmitted_first_initial_reaches_the_same_connection() {
    let pki = pki("noretry");
    let mut cfg = IntermediateConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        pki.server_cert.clone(),
        pki.server_key.clone(),
        Some(pki.ca_cert.clone()),
    );
    cfg.retry = false;
    let inter = intermediate::spawn(cfg).unwrap();
    let stat = |f: fn(&intermediate::IntermediateStats) -> &std::sync::atomic::AtomicU64| {
        f(&inter.stats).load(Ordering::Relaxed)
    };
    // A real quiche client's first flight, sent twice: the second copy is what the
    // client's loss recovery sends when the server's answer is lost.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut qc = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
    qc.set_application_protos(&[ztna_core::ALPN]).unwrap();
    qc.verify_peer(false);
    let scid = quiche::ConnectionId::from_ref(&[0x31; 16]);
    let mut conn = quiche::connect(
        Some("intermediate.ztna"),
        &scid,
        sock.local_addr().unwrap(),
        inter.addr,
        &mut qc,
    )
    .unwrap();
    let mut first = vec![0u8; 1500];
    let (n, _) = conn.send(&mut first).unwrap();
    first.truncate(n);
    assert!(n >= 1200, "client Initials are padded: {n}");
    sock.send_to(&first, inter.addr).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(|s| &s.connections_accepted) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(stat(|s| &s.connections_accepted), 1);
    sock.send_to(&first, inter.addr).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(|s| &s.initials_to_existing_connection) == 0
        && stat(|s| &s.connections_accepted) == 1
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(stat(|s| &s.connections_accepted), 1, "a second connection");
    assert_eq!(stat(|s| &s.initials_to_existing_connection), 1);
}

/// Sends a short-header packet with `dcid` to `server` and returns the stateless
/// reset token of the answer (its last 16 bytes).
fn reset_token_of(sock: &std::net::UdpSocket, server: SocketAddr, dcid: &[u8]) -> [u8; 16] {
    let mut p = vec![0x41];
    p.extend_from_slice(dcid);
    p.resize(60, 0x33);
    sock.send_to(&p, server).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if let Ok((n, from)) = sock.recv_from(&mut buf)
            && from == server
        {
            assert!((21..60).contains(&n), "a stateless reset: {n} bytes");
            return buf[n - 16..n].try_into().unwrap();
        }
    }
    panic!("no stateless reset from {server}");
}

#[test]
fn instances_sharing_a_key_do_not_share_reset_tokens_and_relay_cids_get_no_reset() {
    let w = world("resetkey");
    // A second instance with the same certificate and key on another port.
    let other = start_intermediate(&w.pki, "127.0.0.1:0".parse().unwrap());
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dcid = [0x17u8; 16];
    // Short-header packets to an unknown relay CID of this relay, and to one of
    // another relay, are not answered: the reset that follows for an ordinary CID is
    // the first thing to arrive.
    let own = ztna_common::relay::relay_cid(WORLD_RELAY_ID, [0x44; 5]);
    let foreign = ztna_common::relay::relay_cid(WORLD_RELAY_ID ^ 1, [0x44; 5]);
    for cid in [own, foreign] {
        let mut relay = vec![0x41];
        relay.extend_from_slice(&cid);
        relay.resize(60, 0x44);
        sock.send_to(&relay, w.server).unwrap();
    }
    let a = reset_token_of(&sock, w.server, &dcid);
    assert_eq!(stat(&w, |s| &s.stateless_resets_sent), 1);
    assert_eq!(stat(&w, |s| &s.relay_unknown_cid), 1);
    assert_eq!(stat(&w, |s| &s.relay_other_relay_cid), 1);
    let b = reset_token_of(&sock, other.addr, &dcid);
    assert_ne!(a, b, "two instances with one key share reset tokens");
    // The same instance restarted on its address keeps its tokens (its predecessor's
    // clients get resets they accept).
    let addr = other.addr;
    other.crash().unwrap();
    let again = start_intermediate(&w.pki, addr);
    assert_eq!(reset_token_of(&sock, addr, &dcid), b);
    drop(again);
}

#[test]
fn a_flood_of_unknown_cid_packets_gets_rate_limited_resets_and_does_not_starve_clients() {
    let w = world("flood");
    let mut a = agent(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    assert!(echo_until_ok(&mut a, src(52000), Duration::from_secs(5)).is_some());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Two senders of short-header packets to ever new unknown CIDs: each would cost
    // the intermediate an HMAC and a stateless reset.
    let floods: Vec<_> = (0..2u8)
        .map(|t| {
            let (stop, sent, server) = (stop.clone(), sent.clone(), w.server);
            std::thread::spawn(move || {
                let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                let mut p = [0x41u8; 60];
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    p[1] = t;
                    p[2..10].copy_from_slice(&i.to_be_bytes());
                    if sock.send_to(&p, server).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    // Once the flood is at full strength (the intermediate has seen thousands of it)...
    let seen =
        || stat(&w, |s| &s.stateless_resets_sent) + stat(&w, |s| &s.stateless_resets_rate_limited);
    while seen() < 2000 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(seen() >= 2000, "the flood did not reach the intermediate");
    // ...it keeps serving its clients.
    let took = echo_until_ok(&mut a, src(52001), Duration::from_secs(5));
    let echo_ok = took.is_some();
    while start.elapsed() < Duration::from_secs(1) {
        let _ = a.recv_packet(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for f in floods {
        f.join().unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let resets = stat(&w, |s| &s.stateless_resets_sent);
    let limited = stat(&w, |s| &s.stateless_resets_rate_limited);
    let sent = sent.load(Ordering::Relaxed);
    assert!(
        echo_ok,
        "clients starved during the flood ({sent} packets sent)"
    );
    assert!(
        limited > 0,
        "no reset was rate-limited ({sent} sent, {resets} resets)"
    );
    // 500 per second plus a burst of 100.
    assert!(
        (resets as f64) <= 100.0 + 500.0 * (elapsed + 0.5),
        "{resets} resets in {elapsed:.1} s"
    );
    assert!(echo_until_ok(&mut a, src(52002), Duration::from_secs(5)).is_some());
}

/// A control-connection client built straight on quiche with the agent's
/// certificate, granting the intermediate `server_stream_credit` bytes on its frame
/// stream and never reading it.
struct RawClient {
    sock: std::net::UdpSocket,
    conn: quiche::Connection,
}

impl RawClient {
    fn connect(pki: &DevPki, server: SocketAddr, server_stream_credit: u64) -> Self {
        let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
        c.set_application_protos(&[ztna_core::ALPN]).unwrap();
        c.load_cert_chain_from_pem_file(pki.agent_cert.to_str().unwrap())
            .unwrap();
        c.load_priv_key_from_pem_file(pki.agent_key.to_str().unwrap())
            .unwrap();
        c.load_verify_locations_from_file(pki.ca_cert.to_str().unwrap())
            .unwrap();
        c.verify_peer(true);
        ztna_core::apply_transport_defaults(&mut c, Duration::from_secs(30));
        c.set_initial_max_stream_data_uni(server_stream_credit);
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let scid = quiche::ConnectionId::from_vec(vec![7u8; 16]);
        let conn = quiche::connect(
            Some("intermediate.ztna"),
            &scid,
            sock.local_addr().unwrap(),
            server,
            &mut c,
        )
        .unwrap();
        let mut rc = RawClient { sock, conn };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !rc.conn.is_established() {
            assert!(Instant::now() < deadline, "raw client handshake");
            rc.io();
        }
        rc
    }

    /// Sends what quiche has, then receives for up to 20 ms.
    fn io(&mut self) {
        let mut buf = [0u8; 2048];
        while let Ok((n, info)) = self.conn.send(&mut buf) {
            self.sock.send_to(&buf[..n], info.to).unwrap();
        }
        if let Ok((n, from)) = self.sock.recv_from(&mut buf) {
            let to = self.sock.local_addr().unwrap();
            let _ = self.conn.recv(&mut buf[..n], quiche::RecvInfo { from, to });
        }
        if self.conn.timeout().is_some_and(|t| t.is_zero()) {
            self.conn.on_timeout();
        }
    }

    /// SESSION_REQUEST frames for `SERVICE` with ids `0..n`, back to back.
    fn session_requests(n: u32) -> Vec<u8> {
        use ztna_common::frames::Frame;
        let mut bytes = Vec::new();
        for request_id in 0..n {
            let mut buf = [0u8; 64];
            let len = Frame::SessionRequest {
                request_id,
                service: SERVICE,
            }
            .encode(&mut buf)
            .unwrap();
            bytes.extend_from_slice(&buf[..len]);
        }
        bytes
    }

    /// Writes `bytes` on our frame stream as flow control allows, driving IO until
    /// `done` holds; `what` names the wait in the failure message.
    fn push_frames_until(
        &mut self,
        bytes: &[u8],
        within: Duration,
        mut done: impl FnMut(&Self) -> bool,
        what: impl Fn() -> String,
    ) {
        let mut off = 0;
        let deadline = Instant::now() + within;
        while !done(self) {
            assert!(Instant::now() < deadline, "{}", what());
            if off < bytes.len()
                && let Ok(n) = self.conn.stream_send(
                    ztna_common::frames::CLIENT_FRAME_STREAM,
                    &bytes[off..],
                    false,
                )
            {
                off += n;
            }
            self.io();
        }
    }
}

#[test]
fn a_client_that_grants_no_stream_credit_is_closed_when_its_frame_queue_is_full() {
    let w = world("framequeue");
    // 64 bytes of credit on the intermediate's frame stream, never extended.
    let mut rc = RawClient::connect(&w.pki, w.server, 64);
    // Every SESSION_REQUEST from an unregistered agent is answered with a
    // SESSION_REFUSED frame: 20000 of them are far more than the queue holds.
    let bytes = RawClient::session_requests(20_000);
    rc.push_frames_until(
        &bytes,
        Duration::from_secs(20),
        |rc| rc.conn.is_closed() || rc.conn.peer_error().is_some(),
        || format!("not closed; {}", w.inter.as_ref().unwrap().stats.snapshot()),
    );
    let e = rc.conn.peer_error().expect("closed by the intermediate");
    assert!(e.is_app);
    assert_eq!(e.error_code, app_error::FRAME_QUEUE_FULL);
    assert_eq!(stat(&w, |s| &s.frame_queue_overflows), 1);
    assert!(stat(&w, |s| &s.relay_sessions_refused) > 1000);
    // The intermediate serves everyone else as before.
    let mut a = agent(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    assert!(echo_until_ok(&mut a, src(53000), Duration::from_secs(5)).is_some());
}

#[test]
fn one_agent_gets_at_most_its_share_of_relay_sessions() {
    let w = world("sessioncap");
    let mut rc = RawClient::connect(&w.pki, w.server, 1_000_000);
    let msg = ztna_common::wire::ControlMessage::RegisterAgent { service: SERVICE };
    let mut reg = vec![0u8; msg.encoded_len()];
    msg.encode(&mut reg).unwrap();
    rc.conn.dgram_send(&reg).unwrap();
    let before = stat(&w, |s| &s.registrations_accepted);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(&w, |s| &s.registrations_accepted) == before {
        assert!(Instant::now() < deadline, "raw agent did not register");
        rc.io();
    }
    let cap = ztna_userspace::relay::MAX_SESSIONS_PER_AGENT as u32;
    let bytes = RawClient::session_requests(cap + 6);
    rc.push_frames_until(
        &bytes,
        Duration::from_secs(10),
        |_| stat(&w, |s| &s.relay_sessions_refused_client_limit) >= 6,
        || w.inter.as_ref().unwrap().stats.snapshot().to_string(),
    );
    assert_eq!(stat(&w, |s| &s.relay_sessions_created), cap as u64);
    assert_eq!(stat(&w, |s| &s.relay_sessions_refused_client_limit), 6);
    // Another agent still gets its relayed path.
    let mut a = agent_relay(&w.pki, w.server);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    a.wait_relay_path(SERVICE, Duration::from_secs(10)).unwrap();
}
