//! Several relays on loopback: three real intermediates, connectors registered with
//! every one, agents choosing a relay per service by RTT. A "crash" stops an
//! intermediate without a word (its socket closes, nothing is sent), as a killed
//! pod or a lost node would. The namespace version with XDP, SIGKILL, SIGTERM and a
//! TCP download is `ztna-netlab/tests/multi_relay.rs`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ztna_core::Role;
use ztna_core::agent::{AgentConfig, PathKind};
use ztna_userspace::agent::Agent;
use ztna_userspace::connector::{self, ConnectorHandle};
use ztna_userspace::echo::EchoServer;
use ztna_userspace::identity::DevPki;
use ztna_userspace::intermediate::IntermediateHandle;

mod common;
use common::*;

/// What the issue promises: the relayed path is back through another relay within.
const RECOVER_WITHIN: Duration = Duration::from_secs(3);

struct Relays {
    pki: DevPki,
    inters: Vec<Option<IntermediateHandle>>,
    addrs: Vec<SocketAddr>,
    _echo: EchoServer,
    _conns: Vec<ConnectorHandle>,
}

impl Relays {
    /// `n` intermediates and `connectors` connectors, each registered with all.
    fn new(name: &str, n: usize, connectors: usize) -> Relays {
        if std::env::var_os("ZTNA_TEST_LOG").is_some() {
            ztna_userspace::logging::init("info");
        }
        let pki = pki(name);
        let inters: Vec<IntermediateHandle> = (0..n)
            .map(|_| start_intermediate(&pki, "127.0.0.1:0".parse().unwrap()))
            .collect();
        let addrs: Vec<SocketAddr> = inters.iter().map(|i| i.addr).collect();
        let echo = EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
        let conns = (0..connectors)
            .map(|_| {
                let cfg = connector_cfg(&pki, addrs[0]);
                connector::spawn_with_relays(cfg, vec![echo_spec(echo.addr)], addrs.clone())
                    .unwrap()
            })
            .collect();
        let r = Relays {
            pki,
            inters: inters.into_iter().map(Some).collect(),
            addrs,
            _echo: echo,
            _conns: conns,
        };
        // Every connector registered with every relay.
        let deadline = Instant::now() + Duration::from_secs(10);
        for c in &r._conns {
            while c.stats.registrations.load(Ordering::Relaxed) < n as u64 {
                assert!(
                    Instant::now() < deadline,
                    "a connector did not register everywhere"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        r
    }

    fn agent(&self, p2p: bool) -> Agent {
        let mut cfg = AgentConfig::new(client_cfg(
            &self.pki,
            self.addrs[0],
            Role::Agent,
            &self.pki.agent_cert,
            &self.pki.agent_key,
        ));
        cfg.relays = self.addrs.clone();
        cfg.p2p = p2p;
        let mut a = Agent::start(cfg).unwrap();
        a.wait_registered(Duration::from_secs(10)).unwrap();
        a
    }

    fn crash(&mut self, addr: SocketAddr) {
        let k = self.addrs.iter().position(|a| *a == addr).unwrap();
        self.inters[k].take().unwrap().crash().unwrap();
    }
}

/// Drives `a` until `service`'s path satisfies `ok` (returns the time it took).
fn wait_path(a: &mut Agent, ok: impl Fn(PathKind) -> bool, within: Duration) -> Duration {
    let start = Instant::now();
    while !ok(a.path(SERVICE)) {
        assert!(
            start.elapsed() < within,
            "path still {} after {within:?}",
            a.path(SERVICE)
        );
        let _ = a.recv_packet(Duration::from_millis(20));
    }
    start.elapsed()
}

#[test]
fn sessions_spread_over_near_equal_relays_and_connectors_register_with_each() {
    let r = Relays::new("multi-spread", 3, 2);
    let mut agents: Vec<Agent> = (0..8).map(|_| r.agent(false)).collect();
    let mut used = std::collections::BTreeMap::new();
    for a in &mut agents {
        wait_path(a, PathKind::is_relay, Duration::from_secs(10));
        let relay = a
            .engine()
            .relay_of(SERVICE)
            .expect("a relay carries the session");
        assert!(r.addrs.contains(&relay));
        *used.entry(relay).or_insert(0) += 1;
        // The second choice is warm: another relay, connected and registered.
        let status = a.engine().status();
        let standby = status.services[0].standby.expect("a warm standby relay");
        assert_ne!(standby, relay);
        assert!(
            status
                .relays
                .iter()
                .all(|s| s.connected && s.rtt_ms.is_some())
        );
    }
    // Loopback RTTs are all within the tolerance: each agent's random seed picks.
    // Eight agents on one relay of three would be a 1-in-2187 coincidence.
    assert!(used.len() >= 2, "sessions spread over relays: {used:?}");
    for i in r.inters.iter().flatten() {
        // The second connector joins the first at each relay.
        assert_eq!(
            i.stats.connectors_joined.load(Ordering::Relaxed),
            1,
            "{}",
            i.addr
        );
    }
}

#[test]
fn a_crashed_relay_moves_its_agents_to_another_within_3_s() {
    let mut r = Relays::new("multi-crash", 3, 1);
    let mut a = r.agent(false);
    wait_path(&mut a, PathKind::is_relay, Duration::from_secs(10));
    let first = a.engine().relay_of(SERVICE).unwrap();
    let from = src(47100);
    assert!(echo_until_ok(&mut a, from, Duration::from_secs(5)).is_some());
    let traffic = Traffic::start(a, from);
    std::thread::sleep(Duration::from_millis(500));
    let crashed_at = Instant::now();
    r.crash(first);
    // Long enough to see the move and steady traffic after it.
    std::thread::sleep(RECOVER_WITHIN + Duration::from_secs(2));
    let (mut a, log) = traffic.finish_with_agent();
    let outage = longest_outage(&log, crashed_at);
    assert!(outage < RECOVER_WITHIN, "echoes stopped for {outage:?}");
    assert!(works_at_the_end(&log), "echoes work after the move");
    let now_on = a.engine().relay_of(SERVICE).unwrap();
    assert_ne!(now_on, first, "the service left the crashed relay");
    wait_path(&mut a, PathKind::is_relay, RECOVER_WITHIN);
    assert!(a.engine().stats().relay_moves >= 1);
    assert!(
        a.engine()
            .relays()
            .iter()
            .any(|x| x.addr() == first && !x.client.is_established()),
        "the crashed relay is known to be down"
    );
    println!("outage {outage:?}, moved {first} -> {now_on}");
}

#[test]
fn a_direct_path_carries_on_when_its_relay_is_lost() {
    let mut r = Relays::new("multi-direct", 2, 1);
    let mut a = r.agent(true);
    wait_path(&mut a, |p| p == PathKind::Direct, Duration::from_secs(15));
    let first = a.engine().relay_of(SERVICE).unwrap();
    let from = src(47200);
    assert!(echo_until_ok(&mut a, from, Duration::from_secs(5)).is_some());
    let changes_before = a.engine().timeline().len();
    let traffic = Traffic::start(a, from);
    std::thread::sleep(Duration::from_millis(500));
    let crashed_at = Instant::now();
    r.crash(first);
    std::thread::sleep(RECOVER_WITHIN);
    let (a, log) = traffic.finish_with_agent();
    let outage = longest_outage(&log, crashed_at);
    let failed = log.iter().filter(|(t, ok)| *t >= crashed_at && !ok).count();
    assert_eq!(
        failed, 0,
        "no echo lost on the direct path (outage {outage:?})"
    );
    assert_eq!(a.path(SERVICE), PathKind::Direct);
    assert_eq!(
        a.engine().timeline().len(),
        changes_before,
        "the path never changed: {:?}",
        a.engine().timeline()
    );
    // Its fallback moved: a relayed session on the survivor.
    assert_ne!(a.engine().relay_of(SERVICE), Some(first));
}

#[test]
fn registrations_follow_relays_that_appear_and_disappear() {
    let pki = pki("multi-follow");
    let a = start_intermediate(&pki, "127.0.0.1:0".parse().unwrap());
    let b = start_intermediate(&pki, "127.0.0.1:0".parse().unwrap());
    let echo = EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
    // What a re-resolved DNS name would hand over.
    let watch = ztna_userspace::relay_targets::RelayWatch::manual();
    let _conn = connector::spawn_watching(
        connector_cfg(&pki, a.addr),
        vec![echo_spec(echo.addr)],
        vec![a.addr],
        Some(watch.clone()),
    )
    .unwrap();
    let registered =
        |i: &IntermediateHandle| i.stats.registrations_connector.load(Ordering::Relaxed);
    let connected = |i: &IntermediateHandle| i.stats.connections_closed.load(Ordering::Relaxed);
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait("registered at A", &|| registered(&a) == 1);
    assert_eq!(registered(&b), 0);
    // B appears: the connector registers there too.
    watch.publish(vec![a.addr, b.addr]);
    wait("registered at B", &|| registered(&b) == 1);
    // A disappears from the list: the connector leaves it (closing its
    // connection), and stays at B.
    let closed_before = connected(&a);
    watch.publish(vec![b.addr]);
    wait("left A", &|| connected(&a) > closed_before);
    // An agent given only A now finds no connector there; one given B does.
    let mut at_b = agent(&pki, b.addr);
    assert!(echo_until_ok(&mut at_b, src(47300), Duration::from_secs(5)).is_some());
}

#[test]
fn a_draining_relay_is_left_make_before_break_and_exits_early() {
    let r = Relays::new("multi-drain", 2, 1);
    let mut a = r.agent(false);
    wait_path(&mut a, PathKind::is_relay, Duration::from_secs(10));
    let first = a.engine().relay_of(SERVICE).unwrap();
    let from = src(47400);
    assert!(echo_until_ok(&mut a, from, Duration::from_secs(5)).is_some());
    let traffic = Traffic::start(a, from);
    std::thread::sleep(Duration::from_millis(500));
    let drained_at = Instant::now();
    let k = r.addrs.iter().position(|x| *x == first).unwrap();
    let relay = r.inters[k].as_ref().unwrap();
    relay.start_drain();
    // The drain ends when its last session is gone: the agent closes it once its
    // session on the other relay is up, long before the 10 s deadline.
    let deadline = drained_at + Duration::from_secs(8);
    while !relay.is_finished() {
        assert!(Instant::now() < deadline, "the drained relay still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
    let exited_after = drained_at.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let (a, log) = traffic.finish_with_agent();
    let lost = log.iter().filter(|(t, ok)| *t >= drained_at && !ok).count();
    let outage = longest_outage(&log, drained_at);
    println!("drain: exited after {exited_after:?}, {lost} echoes lost, longest gap {outage:?}");
    // Make before break: the new data connection was up before the old one went.
    assert!(
        lost <= 1,
        "{lost} echoes lost during the drain (longest gap {outage:?})"
    );
    assert!(works_at_the_end(&log));
    assert_ne!(a.engine().relay_of(SERVICE), Some(first));
    assert!(
        a.path(SERVICE).is_relay(),
        "on the other relay's data connection"
    );
}

#[test]
fn a_relay_without_a_connector_for_the_service_sends_the_agent_to_one_with() {
    let pki = pki("multi-noconn");
    let bare = start_intermediate(&pki, "127.0.0.1:0".parse().unwrap());
    let served = start_intermediate(&pki, "127.0.0.1:0".parse().unwrap());
    let echo = EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
    let _conn = start_connector(&pki, served.addr, echo.addr);
    // Whichever the agent picks first, it ends up where the connector is; agents
    // come until one has picked the bare relay first and been refused there.
    let refused = || bare.stats.relay_sessions_refused.load(Ordering::Relaxed);
    for n in 0.. {
        assert!(n < 16, "16 agents and none tried the bare relay first");
        if n > 0 && refused() > 0 {
            break;
        }
        let mut cfg = AgentConfig::new(client_cfg(
            &pki,
            bare.addr,
            Role::Agent,
            &pki.agent_cert,
            &pki.agent_key,
        ));
        cfg.relays = vec![bare.addr, served.addr];
        cfg.p2p = false;
        let mut a = Agent::start(cfg).unwrap();
        a.wait_registered(Duration::from_secs(10)).unwrap();
        wait_path(&mut a, PathKind::is_relay, Duration::from_secs(5));
        assert_eq!(a.engine().relay_of(SERVICE), Some(served.addr));
    }
}
