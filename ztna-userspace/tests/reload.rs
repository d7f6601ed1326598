//! SIGHUP on the real `ztna-intermediate` binary: the certificate is renewed under
//! load (agents echoing on the datagram relay and through the forwarded relay, a
//! connector in between); no connection drops, new connections get the new
//! certificate; a broken configuration is refused and changes nothing.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ztna_userspace::identity::{self, DevPki};

mod common;
use common::*;

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Runs `bin --config config`, its log (stderr) going to `log`.
    fn start(bin: &str, config: &Path, log: PathBuf) -> Daemon {
        let child = Command::new(bin)
            .arg("--config")
            .arg(config)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log().matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} (x{count}) in the log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGHUP with a configuration that must be refused: the `nth` refusal is
    /// logged and names `reason`.
    fn reload_refused(&self, nth: usize, reason: &str) {
        self.signal(libc::SIGHUP);
        self.wait_log("reload refused", nth);
        assert!(
            self.log().contains(reason),
            "{reason:?} not in\n{}",
            self.log()
        );
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Completes a QUIC handshake with the intermediate as a fresh agent and returns
/// the certificate it presented (DER).
fn presented_certificate(server: SocketAddr, pki: &DevPki) -> Vec<u8> {
    let mut cfg = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
    cfg.set_application_protos(&[ztna_core::ALPN]).unwrap();
    cfg.load_verify_locations_from_file(pki.ca_cert.to_str().unwrap())
        .unwrap();
    cfg.verify_peer(true);
    cfg.load_cert_chain_from_pem_file(pki.agent_cert.to_str().unwrap())
        .unwrap();
    cfg.load_priv_key_from_pem_file(pki.agent_key.to_str().unwrap())
        .unwrap();
    ztna_core::apply_transport_defaults(&mut cfg, Duration::from_secs(5));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let local = sock.local_addr().unwrap();
    let scid = quiche::ConnectionId::from_ref(&[7u8; 16]);
    let mut conn =
        quiche::connect(Some("intermediate.ztna"), &scid, local, server, &mut cfg).unwrap();
    let (mut out, mut buf) = ([0u8; 1500], [0u8; 65535]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !conn.is_established() {
        assert!(Instant::now() < deadline, "handshake did not complete");
        while let Ok((n, info)) = conn.send(&mut out) {
            sock.send_to(&out[..n], info.to).unwrap();
        }
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = conn.recv(&mut buf[..n], quiche::RecvInfo { from, to: local });
        }
        conn.on_timeout();
    }
    // The client's Finished, so the server completes too.
    while let Ok((n, info)) = conn.send(&mut out) {
        sock.send_to(&out[..n], info.to).unwrap();
    }
    conn.peer_cert().expect("server certificate").to_vec()
}

/// Traffic running across a reload at `reloaded_at` never stalled for a second and
/// works at the end.
fn assert_held(log: &[(Instant, bool)], reloaded_at: Instant) {
    let outage = longest_outage(log, reloaded_at - Duration::from_millis(300));
    assert!(
        outage < Duration::from_secs(1),
        "traffic stalled for {outage:?}"
    );
    assert!(works_at_the_end(log), "traffic ends working: {log:?}");
}

fn der_of(pem_file: &Path) -> Vec<u8> {
    identity::pem_to_der(&std::fs::read(pem_file).unwrap()).unwrap()
}

fn scrape(port: u16) -> String {
    ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

#[test]
fn sighup_renews_the_certificate_under_load_without_dropping_a_connection() {
    let pki = pki("reload");
    let (port, metrics_port) = (free_port(), free_tcp_port());
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = pki.dir.join("intermediate.toml");
    let write_config = |extra: &str| {
        let mut f = std::fs::File::create(&config).unwrap();
        write!(
            f,
            "listen = \"{server}\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n{extra}",
            pki.server_cert.display(),
            pki.server_key.display(),
            pki.ca_cert.display()
        )
        .unwrap();
    };
    write_config("");
    let daemon = Daemon::start(
        env!("CARGO_BIN_EXE_ztna-intermediate"),
        &config,
        pki.dir.join("intermediate.log"),
    );
    daemon.wait_log("listening", 1);
    let old_cert = der_of(&pki.server_cert);
    assert_eq!(presented_certificate(server, &pki), old_cert);

    let echo = ztna_userspace::echo::EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = start_connector(&pki, server, echo.addr);
    let mut dgram = agent(&pki, server);
    dgram.wait_registered(Duration::from_secs(10)).unwrap();
    let mut relayed = agent_relay(&pki, server);
    relayed.wait_registered(Duration::from_secs(10)).unwrap();
    relayed
        .wait_relay_path(SERVICE, Duration::from_secs(10))
        .unwrap();
    let traffic = [
        Traffic::start(dgram, src(49000)),
        Traffic::start(relayed, src(49001)),
    ];
    std::thread::sleep(Duration::from_millis(300));

    // Renew: a new key and certificate from the same CA, written over the old files.
    identity::issue_leaf(
        &pki.ca_cert,
        &pki.ca_key,
        &pki.dir,
        "intermediate",
        &["intermediate.ztna".into(), "localhost".into()],
    )
    .unwrap();
    let new_cert = der_of(&pki.server_cert);
    assert_ne!(new_cert, old_cert);
    let reloaded_at = Instant::now();
    daemon.signal(libc::SIGHUP);
    daemon.wait_log("configuration reloaded", 1);
    assert_eq!(presented_certificate(server, &pki), new_cert);
    std::thread::sleep(Duration::from_millis(500));

    // A broken key: refused with the reason, the renewed certificate stays in use.
    std::fs::write(&pki.server_key, b"not a key").unwrap();
    daemon.reload_refused(
        1,
        &format!("private key {}: not PEM", pki.server_key.display()),
    );
    assert_eq!(presented_certificate(server, &pki), new_cert);
    // So is a config file with an unknown key.
    write_config("certificate = \"typo\"\n");
    daemon.reload_refused(2, "unknown field `certificate`");

    for t in traffic {
        let (agent, log) = t.finish_with_agent();
        assert_held(&log, reloaded_at);
        assert_eq!(agent.client().stats().connects, 1, "the agent reconnected");
    }
    assert_eq!(
        conn.stats.connects.load(Ordering::Relaxed),
        1,
        "the connector reconnected"
    );
    // The last probe's handshake completes on the server a moment after the probe's.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut metrics = scrape(metrics_port);
    while !metrics.contains("ztna_handshake_duration_seconds_count 6\n")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
        metrics = scrape(metrics_port);
    }
    assert!(
        metrics.contains("ztna_reloads_total{result=\"applied\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ztna_reloads_total{result=\"refused\"} 2\n"),
        "{metrics}"
    );
    // Nothing was closed: the agents, the connector and the three probes (which
    // simply went quiet) are all still there; six handshakes completed.
    assert!(
        metrics.contains("ztna_intermediate_connections_closed_total 0\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ztna_handshake_duration_seconds_count 6\n"),
        "{metrics}"
    );
}

#[test]
fn sighup_reloads_the_connectors_services_without_dropping_flows() {
    let dir = std::env::temp_dir().join(format!("ztna-reload-conn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pki =
        identity::generate_dev_pki(&dir, &[SERVICE.to_string(), "echo2".to_string()]).unwrap();
    let inter = start_intermediate(&pki, "127.0.0.1:0".parse().unwrap());
    let spawn_echo =
        || ztna_userspace::echo::EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
    let (first, second, other) = (spawn_echo(), spawn_echo(), spawn_echo());
    let metrics_port = free_tcp_port();
    let config = dir.join("connector.toml");
    let write_config = |services: &str| {
        std::fs::write(
            &config,
            format!(
                "server = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nmode = \"userspace\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n{services}",
                inter.addr,
                pki.ca_cert.display(),
                pki.connector_cert.display(),
                pki.connector_key.display()
            ),
        )
        .unwrap();
    };
    let echo_service = |backend: SocketAddr| {
        format!(
            "[[service]]\nid = \"echo\"\nbackend = \"{backend}\"\nprefixes = [\"10.100.0.1\"]\n"
        )
    };
    write_config(&echo_service(first.addr));
    let daemon = Daemon::start(
        env!("CARGO_BIN_EXE_ztna-connector"),
        &config,
        dir.join("connector.log"),
    );
    daemon.wait_log("registered as connector", 1);
    let mut a = agent(&pki, inter.addr);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    assert!(echo_until_ok(&mut a, src(49100), Duration::from_secs(5)).is_some());
    let traffic = Traffic::start(a, src(49100));
    std::thread::sleep(Duration::from_millis(300));

    // The echo service moves to a second backend; a second service appears.
    write_config(&format!(
        "{}[[service]]\nid = \"echo2\"\nbackend = \"{}\"\nprefixes = [\"10.100.0.2\"]\n",
        echo_service(second.addr),
        other.addr
    ));
    let reloaded_at = Instant::now();
    daemon.signal(libc::SIGHUP);
    daemon.wait_log("configuration reloaded", 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !scrape(metrics_port).contains("ztna_connector_services_registered 2\n") {
        assert!(
            Instant::now() < deadline,
            "echo2 not registered: {}",
            scrape(metrics_port)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The running flow stays on its backend; a new flow goes to the new one.
    let before = [&first, &second].map(|e| e.echoed.load(Ordering::SeqCst));
    let (a, log) = traffic.finish_with_agent();
    assert_held(&log, reloaded_at);
    assert!(first.echoed.load(Ordering::SeqCst) >= before[0]);
    let mut a = a;
    assert!(echo_until_ok(&mut a, src(49101), Duration::from_secs(5)).is_some());
    assert!(
        second.echoed.load(Ordering::SeqCst) > before[1],
        "a new flow reaches the new backend"
    );
    // An agent of the new service is answered by its backend.
    let mut cfg = client_cfg(
        &pki,
        inter.addr,
        ztna_core::Role::Agent,
        &pki.agent_cert,
        &pki.agent_key,
    );
    cfg.services = vec!["echo2".into()];
    let mut b = ztna_userspace::agent::Agent::connect_with(cfg, false).unwrap();
    b.wait_registered(Duration::from_secs(10)).unwrap();
    let to: SocketAddr = "10.100.0.2:7".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let reply = loop {
        assert!(Instant::now() < deadline, "no reply from echo2");
        b.send_udp("echo2", src(49200), to, b"second service")
            .unwrap();
        if let Some((from, _, payload)) = b.recv_udp(Duration::from_millis(300)).unwrap() {
            break (from, payload);
        }
    };
    assert_eq!(reply, (to, b"second service".to_vec()));
    assert!(other.echoed.load(Ordering::SeqCst) > 0);

    // A broken configuration is refused and changes nothing.
    write_config("[[service]]\nid = \"echo\"\nbackend = \"nowhere\"\n");
    daemon.reload_refused(1, "is not HOST:PORT, HOST or routed");
    assert!(echo_until_ok(&mut a, src(49102), Duration::from_secs(5)).is_some());
    let metrics = scrape(metrics_port);
    for line in [
        "ztna_connector_connects_total 1\n",
        "ztna_connector_reloads_total 1\n",
        "ztna_connector_reloads_failed_total 1\n",
        "ztna_connector_services_registered 2\n",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert_eq!(a.client().stats().connects, 1);
}

#[test]
fn an_agent_takes_new_services_and_drops_removed_ones_without_reconnecting() {
    let dir = std::env::temp_dir().join(format!("ztna-reload-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pki =
        identity::generate_dev_pki(&dir, &[SERVICE.to_string(), "echo2".to_string()]).unwrap();
    let inter = start_intermediate(&pki, "127.0.0.1:0".parse().unwrap());
    let echo = ztna_userspace::echo::EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
    let spec = |id: &str, vip: &str| ztna_userspace::connector::ServiceSpec {
        id: id.into(),
        backend: echo.addr.into(),
        prefixes: vec![vip.parse::<std::net::IpAddr>().unwrap().into()],
    };
    let ccfg = client_cfg(
        &pki,
        inter.addr,
        ztna_core::Role::Connector,
        &pki.connector_cert,
        &pki.connector_key,
    );
    let _conn = ztna_userspace::connector::spawn(
        ccfg,
        vec![spec(SERVICE, VIP), spec("echo2", "10.100.0.2")],
    )
    .unwrap();
    let mut a = agent_relay(&pki, inter.addr);
    a.wait_registered(Duration::from_secs(10)).unwrap();
    a.wait_relay_path(SERVICE, Duration::from_secs(10)).unwrap();
    let routes = |a: &ztna_userspace::agent::Agent| -> Vec<String> {
        let mut r: Vec<String> = a
            .engine()
            .routes()
            .iter()
            .map(|(p, s)| format!("{p}={s}"))
            .collect();
        r.sort();
        r
    };
    assert_eq!(routes(&a), vec!["10.100.0.1/32=echo"]);

    // Add echo2.
    let mut cfg = client_cfg(
        &pki,
        inter.addr,
        ztna_core::Role::Agent,
        &pki.agent_cert,
        &pki.agent_key,
    );
    cfg.services = vec![SERVICE.into(), "echo2".into()];
    a.reconfigure(cfg.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while routes(&a).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "echo2's route never came: {:?}",
            routes(&a)
        );
        let _ = a.recv_packet(Duration::from_millis(20));
    }
    assert_eq!(
        routes(&a),
        vec!["10.100.0.1/32=echo", "10.100.0.2/32=echo2"]
    );
    assert!(a.client().is_registered("echo2"));
    // Remove echo: its route and its relayed data connection go, echo2 stays.
    cfg.services = vec!["echo2".into()];
    a.reconfigure(cfg.clone()).unwrap();
    assert_eq!(routes(&a), vec!["10.100.0.2/32=echo2"]);
    assert!(a.data_connection(SERVICE).is_none());
    // A configuration that does not load changes nothing.
    cfg.key_file = Some("/nonexistent/agent.key".into());
    let e = a.reconfigure(cfg).unwrap_err().to_string();
    assert_eq!(
        e,
        "private key /nonexistent/agent.key: No such file or directory (os error 2)"
    );
    assert_eq!(routes(&a), vec!["10.100.0.2/32=echo2"]);
    assert_eq!(a.client().stats().connects, 1, "never reconnected");
}
