//! Privileged: a deployment of three relays (XDP native), two connectors serving the
//! same services, four agents (`ztna-agent up`, relayed path) in network namespaces
//! (`ztna_netlab::multi_relay`). One relay is lost with traffic running, SIGKILL in
//! one test and a SIGTERM drain in the other: every agent's echo traffic is back
//! within 3 s on another relay, a running TCP download finishes intact, no relay
//! forwards on another relay's CIDs, and no map entry outlives its session.
//! Marked `#[ignore]`: `cargo xtask test` runs them (with `--ignored`) as root.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ztna_common::relay::relay_id_of;
use ztna_netlab::multi_relay::{agent_name, relay_id, relay_ip, relay_name};
use ztna_netlab::tunnel::{ECHO_VIP, HTTP_PORT, WEB_VIP};
use ztna_netlab::{Lab, RELAY_PORT, n, spawn_in_netns};

const RELAYS: usize = 3;
const AGENTS: usize = 4;
const SERVICES: [&str; 2] = ["echo", "web"];
const RECOVER_WITHIN: Duration = Duration::from_secs(3);
/// The download: this many MiB at the rate below, so it runs across the loss.
const BLOB_MIB: usize = 12;
const RATE: &str = "2M";
const PROBE_EVERY: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Loss {
    Kill,
    Drain,
}

fn relay_index(addr: SocketAddr) -> usize {
    (0..RELAYS)
        .find(|&k| addr == SocketAddr::new(relay_ip(k).parse().unwrap(), RELAY_PORT))
        .expect("one of the lab's relays")
}

/// Echoes through `ns`'s tunnel every `PROBE_EVERY` until `stop`: (sent at, came back).
fn probe(
    ns: &str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<Vec<(Instant, bool)>>> {
    spawn_in_netns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_millis(250)))?;
        let dst: SocketAddr = format!("{ECHO_VIP}:9000").parse()?;
        let mut log = Vec::new();
        let mut buf = [0u8; 64];
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let msg = n.to_be_bytes();
            let sent = Instant::now();
            let ok = s.send_to(&msg, dst).is_ok()
                && loop {
                    match s.recv_from(&mut buf) {
                        Ok((k, _)) if buf[..k] == msg => break true,
                        Ok(_) => continue, // a late answer to an earlier probe
                        Err(_) => break false,
                    }
                };
            log.push((sent, ok));
            if let Some(rest) = PROBE_EVERY.checked_sub(sent.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        Ok(log)
    })
}

/// The longest stretch after `from` without an answered probe.
fn longest_outage(log: &[(Instant, bool)], from: Instant) -> Duration {
    let mut last_ok = from;
    let mut worst = Duration::ZERO;
    for &(t, ok) in log.iter().filter(|(t, _)| *t >= from) {
        if ok {
            worst = worst.max(t.saturating_duration_since(last_ok));
            last_ok = t;
        }
    }
    if let Some(&(t, _)) = log.last() {
        worst = worst.max(t.saturating_duration_since(last_ok));
    }
    worst
}

/// Every relay in `alive` forwards only on its own relay ID, and holds exactly two
/// kernel entries per live session (the stats file's `relay_sessions`).
fn assert_maps_match_sessions(lab: &Lab, alive: &[usize]) {
    for &k in alive {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let entries = lab.relay_map_entries(k).expect("maps");
            for e in &entries {
                assert_eq!(
                    relay_id_of(&e.cid),
                    relay_id(k),
                    "relay {k} holds a CID of another relay: {e:?}"
                );
            }
            let sessions = n(&lab.relay_k_stats(k).unwrap_or_default(), "relay_sessions");
            if entries.len() as u64 == 2 * sessions {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "relay {k}: {} map entries for {sessions} sessions",
                entries.len()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn lose_a_relay(tag: &str, how: Loss) {
    let mut lab = Lab::multi_relay_topology(tag, RELAYS, AGENTS).expect("topology");
    let stack = lab
        .start_multi_relay_stack(RELAYS, "native", BLOB_MIB)
        .expect("stack");
    for k in 0..AGENTS {
        lab.start_agent_k(k, &stack.certs, RELAYS, &["--no-p2p"])
            .expect("agent up");
    }
    // Every agent's services on the XDP relay, somewhere.
    let mut placed = Vec::new();
    for k in 0..AGENTS {
        for svc in SERVICES {
            let deadline = Instant::now() + Duration::from_secs(20);
            let relay = loop {
                match lab.agent_k_relay(k, svc) {
                    Some((r, p)) if p == "relay-xdp" => break r,
                    other => assert!(
                        Instant::now() < deadline,
                        "agent {k} {svc}: {other:?}\n{}",
                        lab.log(&agent_name(k))
                    ),
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            placed.push((k, svc, relay_index(relay)));
        }
    }
    let used: BTreeSet<usize> = placed.iter().map(|p| p.2).collect();
    // Eight choices among three near-equal relays all landing on one: 1 in 2187.
    assert!(used.len() >= 2, "sessions spread over relays: {placed:?}");
    assert_maps_match_sessions(&lab, &[0, 1, 2]);

    // Traffic: echo probes from every agent, a rate-limited download on agent 0.
    let stop = Arc::new(AtomicBool::new(false));
    let probes: Vec<_> = (0..AGENTS)
        .map(|k| probe(&lab.agent_ns(k), stop.clone()))
        .collect();
    // The relay to lose: one carrying both an echo and a web session, so that the
    // loss hits UDP echoes and a running download alike (one always exists unless
    // every echo landed apart from every web session: then the busiest relay).
    let on = |k: usize, svc: &str| placed.iter().filter(|p| p.2 == k && p.1 == svc).count();
    let victim = (0..RELAYS)
        .max_by_key(|&k| {
            (
                on(k, "echo").min(1) + on(k, "web").min(1),
                on(k, "echo") + on(k, "web"),
            )
        })
        .unwrap();
    eprintln!("{how:?}: losing relay {victim}; placements {placed:?}");
    // A download from every agent whose web session is on it.
    let downloads: Vec<_> = placed
        .iter()
        .filter(|p| p.1 == "web" && p.2 == victim)
        .map(|&(k, _, _)| {
            let ns = lab.agent_ns(k);
            let out = lab.dir.join(format!("fetched{k}"));
            let o = out.display().to_string();
            let curl = std::thread::spawn(move || {
                std::process::Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{ns}"))
                    .args(["curl", "-sS", "--fail", "--max-time", "120"])
                    .args(["--limit-rate", RATE, "-o", &o])
                    .arg(format!("http://{WEB_VIP}:{HTTP_PORT}/blob"))
                    .output()
            });
            (k, out, curl)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));

    let lost_at = Instant::now();
    let exit = lab
        .signal(
            &relay_name(victim),
            match how {
                Loss::Kill => libc::SIGKILL,
                Loss::Drain => libc::SIGTERM,
            },
        )
        .expect("relay exits");
    if how == Loss::Drain {
        assert!(exit.success(), "a drained relay exits cleanly: {exit:?}");
    }
    let survivors: Vec<usize> = (0..RELAYS).filter(|&k| k != victim).collect();
    // Everyone moved off the lost relay, onto the XDP path of another.
    for &(k, svc, relay) in &placed {
        let deadline = lost_at + Duration::from_secs(10);
        loop {
            match lab.agent_k_relay(k, svc) {
                Some((r, p)) if p == "relay-xdp" && relay_index(r) != victim => break,
                other => assert!(
                    Instant::now() < deadline,
                    "agent {k} {svc} (was on relay {relay}) did not move: {other:?}\n{}",
                    lab.log(&agent_name(k))
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Every service has moved: three more seconds of probes on the new relays (a
    // window for the traffic to run, not an assertion; the probes are judged below).
    let settled = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for (k, p) in probes.into_iter().enumerate() {
        let log = p.join().unwrap().expect("probe");
        let outage = longest_outage(&log, lost_at);
        eprintln!("{how:?}: agent {k} longest echo outage {outage:?}");
        assert!(
            outage < RECOVER_WITHIN,
            "agent {k}: echoes stopped for {outage:?}\n{}",
            lab.log(&agent_name(k))
        );
        let failed_after: Vec<u128> = log
            .iter()
            .filter(|(t, ok)| !ok && *t >= lost_at)
            .map(|(t, _)| t.duration_since(lost_at).as_millis())
            .collect();
        eprintln!("{how:?}: agent {k} probes lost at ms after the loss: {failed_after:?}");
        // Steady once moved: of the probes sent from a second after every service
        // was back on the XDP path, at most one in ten lost. The downloads catch up
        // after the gap (curl's rate limit is an average), and on a 2-core host
        // running four agents, three relays and two connectors in debug builds a
        // reply may then come after the probe's 250 ms wait; a broken path loses
        // them all.
        let steady: Vec<bool> = log
            .iter()
            .filter(|(t, _)| *t >= settled + Duration::from_secs(1))
            .map(|(_, ok)| *ok)
            .collect();
        let steady_lost = steady.iter().filter(|ok| !**ok).count();
        assert!(
            steady.len() >= 10 && steady_lost * 10 <= steady.len(),
            "agent {k} after the move: {steady_lost} of {} probes lost",
            steady.len()
        );
    }
    for (k, out, curl) in downloads {
        let fetched = curl.join().unwrap().expect("curl ran");
        assert!(
            fetched.status.success(),
            "agent {k}'s download survived: {}",
            String::from_utf8_lossy(&fetched.stderr)
        );
        assert_eq!(
            ztna_netlab::tunnel::sha256(&out).unwrap(),
            stack.sha256,
            "agent {k}'s file arrived intact"
        );
    }
    assert_maps_match_sessions(&lab, &survivors);

    // A restarted relay starts from empty maps: nothing of its last run forwards.
    lab.start_relay(victim, &stack.certs, "native")
        .expect("restart");
    assert!(
        lab.relay_map_entries(victim).unwrap().len()
            <= 2 * n(
                &lab.relay_k_stats(victim).unwrap_or_default(),
                "relay_sessions"
            ) as usize,
        "stale entries survived the restart"
    );

    // Agents leave: every session ends, and every entry with it.
    for k in 0..AGENTS {
        lab.stop(&agent_name(k));
    }
    for k in 0..RELAYS {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lab.relay_map_entries(k).unwrap().is_empty() {
            assert!(
                Instant::now() < deadline,
                "relay {k} kept entries after every agent left: {:?}",
                lab.relay_map_entries(k).unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
#[ignore = "needs root: network namespaces, TUN, nftables, XDP"]
fn three_relays_one_killed_with_traffic_running() {
    lose_a_relay("mk", Loss::Kill);
}

#[test]
#[ignore = "needs root: network namespaces, TUN, nftables, XDP"]
fn three_relays_one_drained_with_traffic_running() {
    lose_a_relay("md", Loss::Drain);
}
