//! Privileged: a relay draining on SIGTERM with XDP attached, in the relay topology.
//! An agent echoes through a relay session the XDP program forwards; SIGTERM makes
//! the intermediate tell its clients (the connector binary logs it; a probe client
//! in the agent's namespace gets DRAINING and has a new session refused with the
//! draining status), answer /readyz with 503, and go on forwarding the session in
//! XDP; it exits 0 once the agent is done (well before its drain timeout) or at the
//! timeout with the session still open, and both times takes its pins with it.
//! Marked `#[ignore]`: `cargo xtask test` runs them as root.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ztna_common::frames::RefusedStatus;
use ztna_core::{ClientConfig, ClientEvent, Role};
use ztna_netlab::{Lab, RELAY_IP, RELAY_PORT, n};
use ztna_userspace::probe::ControlProbe;

/// A relay stack whose intermediate pins its maps in a directory of this test (pin
/// directories are global to the machine) and drains for `drain_secs`.
fn stack(lab: &mut Lab, xdp: &str, drain_secs: u64) -> (PathBuf, PathBuf) {
    let pins = Path::new("/sys/fs/bpf/ztna").join(format!("drain-{}", lab.prefix));
    let relay = format!("{RELAY_IP}:{RELAY_PORT}");
    let certs = lab
        .start_relay_stack_with(
            xdp,
            &relay,
            &relay,
            &[
                "--bpf-pin-dir",
                pins.to_str().unwrap(),
                "--drain-timeout",
                &drain_secs.to_string(),
            ],
        )
        .expect("stack");
    lab.wait_log(
        "intermediate",
        "XDP relay attached",
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(
        pins.join("ZTNA_RELAY").exists(),
        "no pins in {}",
        pins.display()
    );
    (certs, pins)
}

/// `ztna-agent echo` through the relay, one packet every 20 ms, in the background.
fn echoing_agent(lab: &Lab, certs: &Path, count: u32) -> Child {
    lab.agent_echo_command(
        certs,
        &[
            "--count",
            &count.to_string(),
            "--interval-ms",
            "20",
            "--size",
            "500",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("ztna-agent")
}

/// Waits until the intermediate's stats file shows a relay session that XDP
/// forwards packets of; returns those stats.
fn wait_forwarding(lab: &Lab) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = lab.fresh_relay_stats().unwrap();
        if n(&s, "relay_sessions") == 1 && xdp_tx(&s) > 0 {
            return s;
        }
        assert!(Instant::now() < deadline, "no forwarded session: {s}");
    }
}

fn xdp_tx(stats: &serde_json::Value) -> u64 {
    stats["xdp_verdicts"]["tx"].as_u64().unwrap_or(0)
}

fn sigterm(lab: &Lab) {
    let pid = lab.pid("intermediate").expect("intermediate running");
    // SAFETY: kill(2) on the lab's own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
}

/// GET `url` with curl inside `ns`: (status, body).
fn curl(lab: &Lab, ns: &str, url: &str) -> (u16, String) {
    let out = lab
        .exec(ns, "curl", &["-s", "-w", "\n%{http_code}", url])
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("status"), body.to_string())
}

/// What a probe client saw of the drain: DRAINING's time left, and the status its
/// session request was refused with.
#[derive(Debug)]
struct Seen {
    within: Duration,
    refused: Option<RefusedStatus>,
}

/// A bare control client (agent role) in the agent's namespace: once registered it
/// says so on `ready`, waits for DRAINING, then asks for a relay session.
fn probe(
    lab: &Lab,
    certs: &Path,
    ready: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<anyhow::Result<Seen>> {
    let c = |f: &str| certs.join(f).display().to_string();
    let mut cfg = ClientConfig::new(
        format!("{RELAY_IP}:{RELAY_PORT}").parse().unwrap(),
        Role::Agent,
        vec!["echo".into()],
    );
    cfg.ca_file = Some(c("ca.pem"));
    cfg.cert_file = Some(c("agent.pem"));
    cfg.key_file = Some(c("agent.key"));
    ztna_netlab::spawn_in_netns(&lab.ns("a"), move || {
        let mut p = ControlProbe::connect(cfg, "0.0.0.0:0".parse()?)?;
        let wait = Duration::from_secs(15);
        p.wait_for(wait, |e| matches!(e, ClientEvent::Registered(_)))
            .ok_or_else(|| anyhow::anyhow!("not registered"))?;
        ready.send(())?;
        let Some(ClientEvent::Draining { within }) =
            p.wait_for(wait, |e| matches!(e, ClientEvent::Draining { .. }))
        else {
            anyhow::bail!("no DRAINING");
        };
        p.request_session("echo")?;
        let refused = match p.wait_for(wait, |e| matches!(e, ClientEvent::SessionRefused { .. })) {
            Some(ClientEvent::SessionRefused { status, .. }) => Some(status),
            _ => None,
        };
        Ok(Seen { within, refused })
    })
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn sigterm_drains_an_xdp_relay_until_its_last_session_closes() {
    let mut lab = Lab::relay_topology("dn").expect("topology");
    let (certs, pins) = stack(&mut lab, "native", 60);
    let x = lab.ns("x");
    let metrics = "http://127.0.0.1:9090";
    // Neighbour entries for XDP's route lookups, as the relay tests do.
    let r = lab
        .agent_echo(&certs, &["--count", "10", "--burst", "10"])
        .unwrap();
    assert_eq!(n(&r, "echoed_exact"), 10, "{r}");
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let probe = probe(&lab, &certs, ready_tx);
    ready
        .recv_timeout(Duration::from_secs(20))
        .expect("probe registered");
    // 300 echoes, 20 ms apart: about 6 s, most of them during the drain.
    let agent = echoing_agent(&lab, &certs, 300);
    let before = wait_forwarding(&lab);
    assert_eq!(before["draining"], false);
    assert_eq!(
        curl(&lab, &x, &format!("{metrics}/readyz")),
        (200, "ready\n".into())
    );

    let sigterm_at = Instant::now();
    sigterm(&lab);
    let seen = probe.join().unwrap().unwrap();
    assert!(
        seen.within > Duration::from_secs(50) && seen.within <= Duration::from_secs(60),
        "{seen:?}"
    );
    assert_eq!(seen.refused, Some(RefusedStatus::Draining), "{seen:?}");
    assert_eq!(
        curl(&lab, &x, &format!("{metrics}/readyz")),
        (503, "not ready: draining\n".into())
    );
    let (_, exposition) = curl(&lab, &x, &format!("{metrics}/metrics"));
    assert!(exposition.contains("\nztna_draining 1\n"), "{exposition}");
    // The connector binary was told too.
    lab.wait_log("connector", "is draining", Duration::from_secs(5))
        .unwrap();
    let during = lab.fresh_relay_stats().unwrap();
    assert_eq!(during["draining"], true, "{during}");

    // Every echo came back through the relay session, in XDP, drain or not.
    let out = agent.wait_with_output().unwrap();
    let report = ztna_netlab::echo_report(out).unwrap();
    assert_eq!(n(&report, "echoed_exact"), 300, "{report}");
    assert_eq!(report["path"], "relay-xdp", "{report}");

    // The agent closed its connection and with it the last session: the relay exits
    // at once, 0, long before its 60 s, and its pins go with it.
    let status = lab
        .wait_exit("intermediate", Duration::from_secs(20))
        .unwrap();
    assert!(status.success(), "{status}: {}", lab.log("intermediate"));
    assert!(sigterm_at.elapsed() < Duration::from_secs(60));
    assert!(
        lab.log("intermediate")
            .contains("drained: no relay session left"),
        "{}",
        lab.log("intermediate")
    );
    assert!(!pins.exists(), "pins left in {}", pins.display());
    // The stats written at exit: XDP forwarded the session's packets after SIGTERM.
    let last = lab.relay_stats().unwrap();
    assert!(
        xdp_tx(&last) >= xdp_tx(&during) + 100,
        "XDP forwarded {} packets during the drain: {last}",
        xdp_tx(&last) - xdp_tx(&during)
    );
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn the_drain_timeout_ends_a_drain_with_a_session_still_open() {
    let mut lab = Lab::relay_topology("dt").expect("topology");
    let (certs, pins) = stack(&mut lab, "generic", 2);
    // About 20 s of echoes: the session outlives the 2 s drain.
    let mut agent = echoing_agent(&lab, &certs, 1000);
    wait_forwarding(&lab);
    sigterm(&lab);
    let status = lab
        .wait_exit("intermediate", Duration::from_secs(20))
        .unwrap();
    let log = lab.log("intermediate");
    assert!(status.success(), "{status}: {log}");
    assert!(
        log.contains("drain timeout (2s) passed with 1 relay sessions still open"),
        "{log}"
    );
    assert!(!pins.exists(), "pins left in {}", pins.display());
    let _ = agent.kill();
    let _ = agent.wait();
}
