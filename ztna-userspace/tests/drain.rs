//! SIGTERM on the real `ztna-intermediate` binary (userspace forwarder, loopback):
//! the relay drains. Clients are told (DRAINING), new relay sessions and
//! registrations are refused with the draining status, /readyz answers 503, a
//! relayed session goes on forwarding, and the process exits 0 once the last
//! session has closed, or at the drain deadline with one still open; a second
//! SIGTERM stops it at once. (XDP, and its pins, in `ztna-netlab/tests/drain.rs`.)

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ztna_common::NackStatus;
use ztna_common::frames::RefusedStatus;
use ztna_core::{ClientEvent, Role};
use ztna_userspace::agent::{Agent, PathKind};
use ztna_userspace::identity::DevPki;

mod common;
use common::*;

/// The intermediate binary on loopback, its log in a file.
struct Relay {
    child: Child,
    log: PathBuf,
    addr: SocketAddr,
    metrics: u16,
}

impl Relay {
    fn start(pki: &DevPki, drain_timeout_secs: u64) -> Relay {
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = pki.dir.join(format!("intermediate-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_ztna-intermediate"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--cert")
            .arg(&pki.server_cert)
            .arg("--key")
            .arg(&pki.server_key)
            .arg("--ca")
            .arg(&pki.ca_cert)
            .args(["--xdp", "off", "--metrics-listen"])
            .arg(format!("127.0.0.1:{metrics}"))
            .arg("--drain-timeout")
            .arg(drain_timeout_secs.to_string())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let relay = Relay {
            child,
            log,
            addr,
            metrics,
        };
        relay.wait_log("listening");
        relay
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sigterm(&self) {
        // SAFETY: kill(2) on our own child.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) },
            0
        );
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running {timeout:?} later:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET `path` on the metrics listener: (status, body).
    fn get(&self, path: &str) -> (u16, String) {
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut r = http
            .get(&format!("http://127.0.0.1:{}{path}", self.metrics))
            .call()
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    }

    /// The value of the sample `series` (name and labels) in /metrics.
    fn sample(&self, series: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics");
        body.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent on a relayed data connection through `relay`.
fn relayed_agent(pki: &DevPki, relay: &Relay) -> Agent {
    let mut a = agent_relay(pki, relay.addr);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    a.wait_relay_path(SERVICE, Duration::from_secs(10)).unwrap();
    a
}

fn probe(pki: &DevPki, relay: &Relay) -> ControlProbe {
    Probe::connect(client_cfg(
        pki,
        relay.addr,
        Role::Agent,
        &pki.agent_cert,
        &pki.agent_key,
    ))
}

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn sigterm_drains_until_the_last_relayed_session_closes() {
    let pki = pki("drain-last");
    let mut relay = Relay::start(&pki, 60);
    let echo = ztna_userspace::echo::EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
    let _connector = start_connector(&pki, relay.addr, echo.addr);
    let agent = relayed_agent(&pki, &relay);
    let mut early = probe(&pki, &relay);
    assert!(
        early
            .wait_for(WAIT, |e| matches!(e, ClientEvent::Registered(_)))
            .is_some()
    );
    assert_eq!(relay.get("/readyz"), (200, "ready\n".into()));
    let userspace = r#"ztna_forwarded_packets_total{path="userspace"}"#;
    let traffic = Traffic::start(agent, src(49300));
    std::thread::sleep(Duration::from_millis(300));

    let sigterm_at = Instant::now();
    let forwarded_before = relay.sample(userspace).unwrap();
    relay.sigterm();
    // A client that announced CAPABILITIES is told, with the time left.
    let Some(ClientEvent::Draining { within }) =
        early.wait_for(WAIT, |e| matches!(e, ClientEvent::Draining { .. }))
    else {
        panic!("no DRAINING:\n{}", relay.log())
    };
    assert!(
        within > Duration::from_secs(50) && within <= Duration::from_secs(60),
        "{within:?}"
    );
    assert!(early.client.is_draining());
    // No new session on a relay that is leaving, with a status that says why.
    let request = early.request_session(SERVICE).unwrap();
    let refused = early.wait_for(WAIT, |e| matches!(e, ClientEvent::SessionRefused { .. }));
    assert_eq!(
        refused,
        Some(ClientEvent::SessionRefused {
            request_id: request,
            service: SERVICE.into(),
            status: RefusedStatus::Draining
        })
    );
    // Out of the load balancers' rotation.
    assert_eq!(relay.get("/readyz"), (503, "not ready: draining\n".into()));
    assert_eq!(relay.sample("ztna_draining"), Some(1.0));
    assert_eq!(
        relay.sample("ztna_intermediate_relay_sessions_refused_draining_total"),
        Some(1.0)
    );
    // A client that connects now: its registration is refused, and it is told.
    let mut late = probe(&pki, &relay);
    let nack = late.wait_for(WAIT, |e| matches!(e, ClientEvent::Refused { .. }));
    assert_eq!(
        nack,
        Some(ClientEvent::Refused {
            service: SERVICE.into(),
            status: NackStatus::Draining
        })
    );
    assert!(
        late.client.is_draining()
            || late
                .wait_for(WAIT, |e| matches!(e, ClientEvent::Draining { .. }))
                .is_some()
    );
    assert_eq!(
        relay.sample(r#"ztna_registration_nacks_total{status="draining"}"#),
        Some(1.0)
    );

    // The relayed session goes on forwarding, through the relay's forwarder (not
    // the datagram relay: its packets are counted apart): twenty more echoes.
    let deadline = Instant::now() + WAIT;
    while relay.sample(userspace).unwrap() < forwarded_before + 40.0 {
        assert!(
            Instant::now() < deadline,
            "forwarding stopped:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (mut agent, log) = traffic.finish_with_agent();
    let outage = longest_outage(&log, sigterm_at - Duration::from_millis(300));
    assert!(
        outage < Duration::from_secs(1),
        "traffic stalled for {outage:?}"
    );
    assert!(works_at_the_end(&log), "{log:?}");
    assert_eq!(agent.path(SERVICE), PathKind::RelayUserspace);
    let echoes_after = log.iter().filter(|(t, ok)| *ok && *t > sigterm_at).count();
    assert!(echoes_after >= 5, "{echoes_after} echoes after SIGTERM");
    let forwarded = relay.sample(userspace).unwrap() - forwarded_before;
    assert!(
        forwarded >= 2.0 * echoes_after as f64,
        "{forwarded} packets forwarded for {echoes_after} echoes"
    );
    assert!(agent.client().is_draining(), "the agent's client was told");
    assert!(relay.running(), "a session is open: the drain goes on");

    // The last session closes with its agent: the relay exits, 0, long before its
    // deadline.
    agent.close();
    drop(agent);
    assert!(relay.wait_exit(Duration::from_secs(20)).success());
    assert!(sigterm_at.elapsed() < Duration::from_secs(60));
    let log = relay.log();
    assert!(log.contains("drained: no relay session left"), "{log}");
}

#[test]
fn the_drain_deadline_closes_a_session_still_open() {
    let pki = pki("drain-deadline");
    let mut relay = Relay::start(&pki, 2);
    let echo = ztna_userspace::echo::EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
    let _connector = start_connector(&pki, relay.addr, echo.addr);
    let agent = relayed_agent(&pki, &relay);
    let traffic = Traffic::start(agent, src(49400));
    std::thread::sleep(Duration::from_millis(300));
    let sigterm_at = Instant::now();
    relay.sigterm();
    assert!(relay.wait_exit(Duration::from_secs(20)).success());
    let exited_after = sigterm_at.elapsed();
    let log = relay.log();
    assert!(
        log.contains("drain timeout (2s) passed with 1 relay sessions still open"),
        "{log}"
    );
    // Forwarded up to the deadline: echoes came back for a second after SIGTERM.
    let log_echoes = traffic.finish();
    let last_ok = log_echoes
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(t, _)| t.saturating_duration_since(sigterm_at))
        .max()
        .unwrap();
    assert!(
        last_ok >= Duration::from_secs(1) && exited_after >= Duration::from_secs(2),
        "last echo {last_ok:?} after SIGTERM, exit {exited_after:?} after"
    );
}

#[test]
fn a_second_sigterm_stops_a_drain_at_once() {
    let pki = pki("drain-twice");
    let mut relay = Relay::start(&pki, 600);
    let echo = ztna_userspace::echo::EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
    let _connector = start_connector(&pki, relay.addr, echo.addr);
    let _agent = relayed_agent(&pki, &relay);
    relay.sigterm();
    relay.wait_log("draining: 1 relay sessions");
    assert!(relay.running());
    relay.sigterm();
    assert!(relay.wait_exit(Duration::from_secs(20)).success());
    assert!(
        relay
            .log()
            .contains("SIGTERM again while draining: stopping now"),
        "{}",
        relay.log()
    );
}

#[test]
fn an_in_process_intermediate_drains_on_start_drain() {
    // What in-process tests of clients use (`IntermediateHandle::start_drain`).
    let pki = pki("drain-handle");
    let inter = start_intermediate(&pki, "127.0.0.1:0".parse().unwrap());
    let echo = ztna_userspace::echo::EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
    let _connector = start_connector(&pki, inter.addr, echo.addr);
    let mut agent = agent_relay(&pki, inter.addr);
    agent.wait_registered(WAIT).unwrap();
    agent.wait_relay_path(SERVICE, WAIT).unwrap();
    inter.start_drain();
    let deadline = Instant::now() + WAIT;
    while !agent.client().is_draining() {
        assert!(Instant::now() < deadline, "the agent was not told");
        let _ = agent.recv_packet(Duration::from_millis(20));
    }
    assert!(!inter.is_finished(), "its session is still open");
    agent.close();
    let deadline = Instant::now() + WAIT;
    while !inter.is_finished() {
        assert!(Instant::now() < deadline, "still draining");
        std::thread::sleep(Duration::from_millis(20));
    }
    inter.stop().unwrap();
}
