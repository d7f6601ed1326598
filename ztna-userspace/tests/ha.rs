//! Connector high availability on loopback: two connectors serve one service side by
//! side, each in front of its own echo server, so which echo server answers tells
//! which connector carried a flow. Real intermediate, connectors and agents over real
//! QUIC; a "crash" stops a connector without a word, as a power loss would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ztna_userspace::agent::Agent;
use ztna_userspace::connector::ConnectorHandle;
use ztna_userspace::echo::EchoServer;
use ztna_userspace::identity::DevPki;
use ztna_userspace::intermediate::{IntermediateHandle, IntermediateStats};

mod common;
use common::*;

/// What the issue promises: a dead connector's work moves within this.
const FAILOVER_WITHIN: Duration = Duration::from_secs(3);

struct Ha {
    pki: DevPki,
    inter: IntermediateHandle,
    echoes: [EchoServer; 2],
    conns: [Option<ConnectorHandle>; 2],
}

impl Ha {
    fn new(name: &str) -> Ha {
        let pki = pki(name);
        let inter = start_intermediate(&pki, "127.0.0.1:0".parse().unwrap());
        let echoes = [0, 1].map(|_| EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap());
        let conns = [0, 1].map(|i| Some(start_connector(&pki, inter.addr, echoes[i].addr)));
        Ha {
            pki,
            inter,
            echoes,
            conns,
        }
    }

    fn stat(&self, f: impl Fn(&IntermediateStats) -> &AtomicU64) -> u64 {
        f(&self.inter.stats).load(Ordering::Relaxed)
    }

    fn echoed(&self) -> [u64; 2] {
        [0, 1].map(|i| self.echoes[i].echoed.load(Ordering::SeqCst))
    }

    /// Which connector (by its echo server) answers one echo of `a` from `from`.
    fn served_by(&self, a: &mut Agent, from: SocketAddr) -> usize {
        let before = self.echoed();
        assert!(
            echo_until_ok(a, from, Duration::from_secs(5)).is_some(),
            "echo from {from}"
        );
        let after = self.echoed();
        let grew: Vec<usize> = (0..2).filter(|&i| after[i] > before[i]).collect();
        assert_eq!(
            grew.len(),
            1,
            "one connector serves a flow: {before:?} -> {after:?}"
        );
        grew[0]
    }
}

/// Agents with certificates of their own, made until one is served by each
/// connector: (agent, its source, its connector). Relays pick an agent's connector
/// by its certificate, so which agent lands where is a coin toss per agent.
fn one_agent_per_connector(ha: &Ha, relay: bool, first: usize) -> Vec<(Agent, SocketAddr, usize)> {
    let mut found: Vec<Option<(Agent, SocketAddr, usize)>> = vec![None, None];
    for n in first..first + 24 {
        let mut a = agent_n(&ha.pki, ha.inter.addr, n, relay);
        a.wait_registered(Duration::from_secs(10)).unwrap();
        if relay {
            a.wait_relay_path(SERVICE, Duration::from_secs(10)).unwrap();
        }
        let from = src(48000 + n as u16);
        let on = ha.served_by(&mut a, from);
        if found[on].is_none() {
            found[on] = Some((a, from, on));
        }
        if found.iter().all(Option::is_some) {
            return found.into_iter().flatten().collect();
        }
    }
    panic!("24 agents all on one connector");
}

#[test]
fn connectors_of_one_service_share_agents_and_each_agent_keeps_its_connector() {
    let ha = Ha::new("ha-share");
    assert_eq!(ha.stat(|s| &s.connectors_joined), 1);

    // Datagram relay: agents spread over the connectors, and all of an agent's
    // flows, new or old, stay on its connector.
    for (mut a, _, c) in one_agent_per_connector(&ha, false, 0) {
        for p in 0..6 {
            assert_eq!(ha.served_by(&mut a, src(48500 + p)), c, "flow {p}");
        }
    }

    // Relay sessions: likewise, and an agent's session and flows share the
    // connector it was given.
    let relayed = one_agent_per_connector(&ha, true, 100);
    let sessions_on = |i: usize| {
        ha.conns[i]
            .as_ref()
            .unwrap()
            .stats
            .data_connections
            .load(Ordering::Relaxed)
    };
    // The connector counts a data connection once its side of the handshake is
    // done, which may be just after the agent's.
    let deadline = Instant::now() + Duration::from_secs(5);
    while (sessions_on(0) == 0 || sessions_on(1) == 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        sessions_on(0) >= 1 && sessions_on(1) >= 1,
        "a session on each connector"
    );
    assert_ne!(relayed[0].2, relayed[1].2);
}

#[test]
fn a_dead_connectors_flows_and_sessions_move_to_a_survivor_within_3_s_with_traffic_running() {
    let mut ha = Ha::new("ha-failover");
    // Datagram-relay flows and relay sessions, one agent of each on each connector.
    let flows = one_agent_per_connector(&ha, false, 0);
    let sessions = one_agent_per_connector(&ha, true, 100);

    let mut on = Vec::new();
    let mut traffic = Vec::new();
    for (a, from, c) in flows.into_iter().chain(sessions) {
        on.push(c);
        traffic.push(Traffic::start(a, from));
    }
    std::thread::sleep(Duration::from_millis(500));
    let crashed_at = Instant::now();
    ha.conns[0].take().unwrap().crash().unwrap();
    // Run through the failover and a while on the survivor (a wait for traffic to
    // flow, not an assertion: the logs are checked below).
    std::thread::sleep(FAILOVER_WITHIN + Duration::from_secs(2));
    let logs: Vec<Vec<(Instant, bool)>> = traffic.into_iter().map(Traffic::finish).collect();

    assert_eq!(ha.stat(|s| &s.connectors_lost), 1);
    // At least the kept agent's (agents dropped while searching may have left theirs).
    assert!(ha.stat(|s| &s.relay_sessions_closed_connector_lost) >= 1);
    for (i, log) in logs.iter().enumerate() {
        let outage = longest_outage(log, crashed_at - Duration::from_millis(500));
        let ok_after = log.iter().filter(|(t, ok)| *ok && *t > crashed_at).count();
        eprintln!(
            "traffic {i} (connector {}): {} echoes, {ok_after} ok after the crash, longest outage {outage:?}",
            on[i],
            log.len(),
        );
        assert!(
            works_at_the_end(log),
            "traffic {i} works at the end: {log:?}"
        );
        if on[i] == 0 {
            assert!(
                outage < FAILOVER_WITHIN,
                "traffic {i} moved to the survivor after {outage:?}"
            );
        } else {
            assert!(
                outage < Duration::from_secs(1),
                "traffic {i} on the survivor stalled for {outage:?}"
            );
        }
    }
}
