//! Helpers shared by the loopback end-to-end tests (`e2e.rs`, `ha.rs`): a throwaway
//! PKI, an in-process intermediate and connectors, agents on each path, and echoes.
#![allow(dead_code)] // each test file uses its own subset

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ztna_core::{ClientConfig, Role};
use ztna_userspace::agent::Agent;
use ztna_userspace::connector::{self, ServiceSpec};
use ztna_userspace::identity::{self, DevPki};
use ztna_userspace::intermediate::{self, IntermediateConfig, IntermediateHandle};
pub use ztna_userspace::probe::ControlProbe;

pub const SERVICE: &str = "echo";
pub const VIP: &str = "10.100.0.1";

pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ztna-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn pki(name: &str) -> DevPki {
    identity::generate_dev_pki(&temp_dir(name), &[SERVICE.to_string()]).unwrap()
}

pub fn start_intermediate(pki: &DevPki, addr: SocketAddr) -> IntermediateHandle {
    let cfg = IntermediateConfig::new(
        addr,
        pki.server_cert.clone(),
        pki.server_key.clone(),
        Some(pki.ca_cert.clone()),
    );
    intermediate::spawn(cfg).unwrap()
}

pub fn client_cfg(
    pki: &DevPki,
    server: SocketAddr,
    role: Role,
    cert: &Path,
    key: &Path,
) -> ClientConfig {
    let mut c = ClientConfig::new(server, role, vec![SERVICE.to_string()]);
    c.server_name = "intermediate.ztna".into();
    c.ca_file = Some(pki.ca_cert.to_str().unwrap().into());
    c.cert_file = Some(cert.to_str().unwrap().into());
    c.key_file = Some(key.to_str().unwrap().into());
    c.backoff_initial = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(500);
    // An idle connector learns of a crashed intermediate at its next keepalive.
    c.keepalive = Duration::from_secs(1);
    c
}

/// The echo service at `VIP`, served by `backend`.
pub fn echo_spec(backend: SocketAddr) -> ServiceSpec {
    ServiceSpec {
        id: SERVICE.into(),
        backend: backend.into(),
        prefixes: vec![VIP.parse::<IpAddr>().unwrap().into()],
    }
}

/// The connector's client configuration for `server`.
pub fn connector_cfg(pki: &DevPki, server: SocketAddr) -> ClientConfig {
    client_cfg(
        pki,
        server,
        Role::Connector,
        &pki.connector_cert,
        &pki.connector_key,
    )
}

/// Starts a connector and waits until the intermediate has ACKed its registration.
pub fn start_connector(
    pki: &DevPki,
    server: SocketAddr,
    backend: SocketAddr,
) -> connector::ConnectorHandle {
    let c = connector::spawn(connector_cfg(pki, server), vec![echo_spec(backend)]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.stats.registrations.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "connector did not register");
        std::thread::sleep(Duration::from_millis(5));
    }
    c
}

/// A certificate and key of its own for agent number `n` (SAN agent.echo.ztna):
/// relays spread agents over connectors by certificate.
pub fn agent_identity(pki: &DevPki, n: usize) -> (PathBuf, PathBuf) {
    identity::issue_leaf(
        &pki.ca_cert,
        &pki.ca_key,
        &pki.dir.join(format!("agent{n}")),
        &format!("agent{n}"),
        &[format!("agent.{SERVICE}.ztna")],
    )
    .unwrap()
}

/// Agent number `n` with its own certificate: on the datagram relay, or (`relay`)
/// with a relayed data connection and no hole punching.
pub fn agent_n(pki: &DevPki, server: SocketAddr, n: usize, relay: bool) -> Agent {
    let (cert, key) = agent_identity(pki, n);
    let cfg = client_cfg(pki, server, Role::Agent, &cert, &key);
    let mut a = Agent::connect_with(cfg, relay).unwrap();
    a.set_p2p(false);
    a
}

/// An agent on the datagram relay (the original protocol's path).
pub fn agent(pki: &DevPki, server: SocketAddr) -> Agent {
    Agent::connect_with(
        client_cfg(pki, server, Role::Agent, &pki.agent_cert, &pki.agent_key),
        false,
    )
    .unwrap()
}

/// An agent that sets up a relayed data connection, without hole punching.
pub fn agent_relay(pki: &DevPki, server: SocketAddr) -> Agent {
    let mut a = Agent::connect(client_cfg(
        pki,
        server,
        Role::Agent,
        &pki.agent_cert,
        &pki.agent_key,
    ))
    .unwrap();
    a.set_p2p(false);
    a
}

/// An agent with everything on: relayed data connection, then the direct path.
pub fn agent_p2p(pki: &DevPki, server: SocketAddr) -> Agent {
    Agent::connect(client_cfg(
        pki,
        server,
        Role::Agent,
        &pki.agent_cert,
        &pki.agent_key,
    ))
    .unwrap()
}

pub fn dst() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), 7)
}

pub fn src(port: u16) -> SocketAddr {
    SocketAddr::new("100.64.0.2".parse().unwrap(), port)
}

/// Sends one echo and returns the payload that came back, if any.
pub fn echo_once(
    a: &mut Agent,
    from: SocketAddr,
    payload: &[u8],
    wait: Duration,
) -> Option<Vec<u8>> {
    a.send_udp(SERVICE, from, dst(), payload).ok()?;
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let left = deadline - Instant::now();
        match a.recv_udp(left).unwrap() {
            Some((s, d, p)) if s == dst() && d == from => return Some(p),
            Some(_) => continue,
            None => return None,
        }
    }
    None
}

/// Retries echoes until one comes back byte-exact or `within` runs out.
pub fn echo_until_ok(a: &mut Agent, from: SocketAddr, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < within {
        n += 1;
        let payload = format!("probe {n}").into_bytes();
        if !a.client().is_registered(SERVICE) {
            let _ = a.recv_packet(Duration::from_millis(100));
            continue;
        }
        if echo_once(a, from, &payload, Duration::from_millis(300)).as_deref() == Some(&payload[..])
        {
            return Some(start.elapsed());
        }
    }
    None
}

/// An agent echoing once per `EVERY` on its own thread until told to stop, logging
/// when each echo was sent and whether it came back byte-exact.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(Agent, Vec<(Instant, bool)>)>,
}

pub const EVERY: Duration = Duration::from_millis(50);

impl Traffic {
    pub fn start(mut a: Agent, from: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut log = Vec::new();
            let mut n = 0u64;
            while !s.load(Ordering::SeqCst) {
                n += 1;
                let payload = format!("ha {from} {n}").into_bytes();
                let sent = Instant::now();
                let back = echo_once(&mut a, from, &payload, Duration::from_millis(250));
                log.push((sent, back.as_deref() == Some(&payload[..])));
                if let Some(rest) = EVERY.checked_sub(sent.elapsed()) {
                    // Keep the agent's timers running between echoes.
                    let _ = a.recv_packet(rest);
                }
            }
            (a, log)
        });
        Traffic { stop, thread }
    }

    pub fn finish(self) -> Vec<(Instant, bool)> {
        self.finish_with_agent().1
    }

    /// Stops and returns the agent too (its counters: did it reconnect?).
    pub fn finish_with_agent(self) -> (Agent, Vec<(Instant, bool)>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// The longest stretch after `from` without a returned echo: from the last success
/// before it (or `from`) to the next success.
pub fn longest_outage(log: &[(Instant, bool)], from: Instant) -> Duration {
    let mut last_ok = from;
    let mut worst = Duration::ZERO;
    for &(t, ok) in log.iter().filter(|(t, _)| *t >= from) {
        if ok {
            worst = worst.max(t.saturating_duration_since(last_ok));
            last_ok = t;
        }
    }
    worst
}

/// Whether the traffic works at the end of `log`: of its last 20 echoes (at least 5),
/// at most one in ten (and at least one allowed) did not come back. On a loaded 2-core
/// machine one echo may come back after its 250 ms wait and count against the next.
pub fn works_at_the_end(log: &[(Instant, bool)]) -> bool {
    let last = &log[log.len().saturating_sub(20)..];
    let failed = last.iter().filter(|(_, ok)| !*ok).count();
    last.len() >= 5 && failed <= (last.len() / 10).max(1)
}

/// A bare control client on loopback (see `ztna_userspace::probe`).
pub struct Probe;

impl Probe {
    pub fn connect(cfg: ClientConfig) -> ControlProbe {
        ControlProbe::connect(cfg, "127.0.0.1:0".parse().unwrap()).unwrap()
    }
}
