//! The datagram relay (the original protocol: DATAGRAMs on the QUIC control
//! connections, decrypted and re-encrypted by the intermediate), driven by
//! in-process agents (the real agent code) against a connector whose service backend
//! is a recvmmsg receiver.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};

use crate::load::{bind, receive_loop};
use crate::window::{Acct, window};

use super::*;

/// One in-process agent: connects through the relay (datagram relay only),
/// registers, then sends tunneled UDP packets of PAYLOAD bytes until `stop`.
/// Returns how many sends the QUIC stack refused (DATAGRAM queue full).
fn dgram_agent(
    certs: PathBuf,
    idx: usize,
    rate: Option<f64>,
    ready: mpsc::Sender<Result<(), String>>,
    go: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    offered: Arc<AtomicU64>,
) -> anyhow::Result<u64> {
    use ztna_userspace::agent::{Agent, PathKind};
    let setup = || -> anyhow::Result<Agent> {
        let c = |f: &str| Some(certs.join(f).display().to_string());
        let mut cfg = ztna_core::ClientConfig::new(
            SocketAddr::V4(relay_addr()),
            ztna_core::Role::Agent,
            vec!["echo".into()],
        );
        cfg.ca_file = c("ca.pem");
        cfg.cert_file = c("agent.pem");
        cfg.key_file = c("agent.key");
        cfg.reconnect = false;
        let mut agent = Agent::connect_with(cfg, false)?;
        agent.set_p2p(false);
        agent.wait_registered(Duration::from_secs(10))?;
        if agent.path("echo") != PathKind::Datagram {
            bail!(
                "agent path is {:?}, not the datagram relay",
                agent.path("echo")
            );
        }
        Ok(agent)
    };
    let mut agent = match setup() {
        Ok(a) => {
            let _ = ready.send(Ok(()));
            a
        }
        Err(e) => {
            let _ = ready.send(Err(format!("{e:#}")));
            return Err(e);
        }
    };
    while !go.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
        agent.drive(Instant::now() + Duration::from_millis(1))?;
    }
    let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2 + idx as u8)), 40000);
    let dst: SocketAddr = "10.100.0.1:7".parse()?;
    let payload = vec![0x5a; PAYLOAD];
    let t0 = Instant::now();
    let (mut sent, mut refused) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        if let Some(r) = rate
            && ((t0.elapsed().as_secs_f64() * r) as u64) <= sent
        {
            agent.drive(Instant::now() + Duration::from_micros(100))?;
            continue;
        }
        match agent.send_udp("echo", src, dst, &payload) {
            Ok(()) => {
                sent += 1;
                offered.fetch_add(1, Ordering::Relaxed);
                // Read ACKs now and then, so the congestion window opens.
                if sent % 32 == 0 {
                    agent.drive(Instant::now() + Duration::from_micros(1))?;
                }
            }
            Err(_) => {
                // DATAGRAM queue full (congestion window closed): wait for ACKs.
                refused += 1;
                agent.drive(Instant::now() + Duration::from_micros(50))?;
            }
        }
    }
    agent.close();
    Ok(refused)
}

/// Runs DGRAM_AGENTS in-process agents against the datagram relay and measures one
/// window at the backend receiver. Returns the window and the refused sends.
fn dgram_measure(
    lab: &Lab,
    certs: &Path,
    backend: SocketAddrV4,
    rate: Option<u64>,
    len: Duration,
    acct: &Acct,
) -> anyhow::Result<(Window, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let go = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicU64::new(0));
    let offered = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = mpsc::channel();
    let (st, g, r) = (stop.clone(), got.clone(), ready_tx.clone());
    let receiver = ztna_netlab::spawn_in_netns(&lab.ns("c"), move || {
        let s = bind(backend, Some(8 << 20));
        let _ = r.send(s.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")));
        receive_loop(s?, st, g)
    });
    let mut agents = Vec::new();
    for i in 0..DGRAM_AGENTS {
        let (certs, ready, go, stop, offered) = (
            certs.to_path_buf(),
            ready_tx.clone(),
            go.clone(),
            stop.clone(),
            offered.clone(),
        );
        let per = rate.map(|r| r as f64 / DGRAM_AGENTS as f64);
        agents.push(ztna_netlab::spawn_in_netns(&lab.ns("a"), move || {
            dgram_agent(certs, i, per, ready, go, stop, offered)
        }));
    }
    let mut err = None;
    for _ in 0..=DGRAM_AGENTS {
        match ready_rx.recv_timeout(Duration::from_secs(15)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                err.get_or_insert(anyhow::anyhow!("{e}"));
            }
            Err(_) => {
                err.get_or_insert(anyhow::anyhow!("datagram-relay load did not start"));
            }
        }
    }
    let w = err.is_none().then(|| {
        go.store(true, Ordering::Relaxed);
        std::thread::sleep(WARMUP);
        window(&got, &offered, len, acct)
    });
    stop.store(true, Ordering::Relaxed);
    let mut refused = 0;
    for h in agents {
        match join(h) {
            Ok(n) => refused += n,
            Err(e) => {
                err.get_or_insert(e);
            }
        }
    }
    if let Err(e) = join(receiver) {
        err.get_or_insert(e);
    }
    match (err, w) {
        (None, Some(w)) => Ok((w, refused)),
        (Some(e), _) => Err(e.context(format!(
            "datagram relay; intermediate log:\n{}",
            lab.log("intermediate")
        ))),
        (None, None) => unreachable!("a window is measured when nothing failed"),
    }
}

pub fn datagram_relay(res: &mut Results) -> anyhow::Result<()> {
    let mut lab = Lab::relay_topology("bd")?;
    let certs = lab.certs()?;
    crate::paths::start_intermediate(&mut lab, &certs, "off", &[], &[])?;
    // The service backend is our receiver (no echo server: one-way, like the others).
    let backend = SocketAddrV4::new(CONN, 9100);
    let cn = lab.ns("c");
    let mut args = vec!["--server".into(), relay_addr().to_string()];
    args.extend(ztna_netlab::client_tls_args(&certs, "connector"));
    args.extend(["--service".into(), format!("echo={backend}@10.100.0.1")]);
    lab.spawn(&cn, "connector", "ztna-connector", &args)?;
    lab.wait_log(
        "connector",
        "registered as connector",
        Duration::from_secs(10),
    )?;
    let pid = lab.pid("intermediate");
    let lab_pids: Vec<u32> = ["intermediate", "connector"]
        .iter()
        .filter_map(|n| lab.pid(n))
        .collect();
    // QUIC packets into the relay from the agents (a0 tx) and from the relay to the
    // connector (c0 rx): one can carry several DATAGRAMs.
    let pkts = |ns: &str, dev: &str, dir: &str| {
        lab.link(&lab.ns(ns), dev, Some("-s")).ok()?["stats64"][dir]["packets"].as_u64()
    };
    let quic_pkts = || Some([pkts("a", "a0", "tx")?, pkts("c", "c0", "rx")?]);
    let s0 = lab.fresh_relay_stats()?;
    eprintln!("relay-bench: datagram_relay: saturation ({DGRAM_AGENTS} in-process agents)");
    let sat_acct = Acct {
        lab_pids: lab_pids.clone(),
        extra: Some(&quic_pkts),
        ..Default::default()
    };
    let ((sat, refused), sat_ext) =
        least_disturbed("datagram_relay saturation", SATURATION_ATTEMPTS, || {
            let r = dgram_measure(&lab, &certs, backend, None, SATURATION, &sat_acct)?;
            let e = r.0.external_share();
            Ok((r, e))
        })?;
    eprintln!(
        "relay-bench: datagram_relay: {:.0} pps delivered of {:.0} offered",
        sat.delivered_pps(),
        sat.offered_pps()
    );
    eprintln!("relay-bench: datagram_relay: CPU at {CPU_RATE_PPS} pps");
    let cpu_acct = Acct {
        relay_pid: pid,
        lab_pids,
        extra: Some(&quic_pkts),
        ..Default::default()
    };
    let ((cpu, _), cpu_ext) = least_disturbed("datagram_relay CPU", CPU_ATTEMPTS, || {
        let r = dgram_measure(
            &lab,
            &certs,
            backend,
            Some(CPU_RATE_PPS),
            CPU_WINDOW * CPU_ROUNDS as u32,
            &cpu_acct,
        )?;
        let e = r.0.external_share();
        Ok((r, e))
    })?;
    let s1 = lab.fresh_relay_stats()?;
    let d = |k: &str| {
        s1[k]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(s0[k].as_u64().unwrap_or(0))
    };
    let relay_pkts = |w: &Window| {
        w.extra.map(|[a, c]| {
            json!({
                "agents_to_relay_pps": (a as f64 / w.secs).round(),
                "relay_to_connector_pps": (c as f64 / w.secs).round(),
                "tunneled_packets_per_relay_to_connector_packet": round2(w.delivered as f64 / c.max(1) as f64),
            })
        })
    };
    res.out.insert(
        "datagram_relay_pps".into(),
        json!(sat.delivered_pps().round()),
    );
    res.out.insert(
        "path_datagram_relay".into(),
        json!({
            "saturation": sat.json(),
            "cpu_run": cpu.json(),
            "load": format!("{DGRAM_AGENTS} in-process ztna_userspace::agent::Agent (datagram-only: control connection, no data connection) sending {PAYLOAD}-byte UDP payloads open-loop through the tunnel to 10.100.0.1:7 (each send flushed at once; the congestion window paces it); the connector's service backend is a recvmmsg receiver at {backend}; datagram_relay_pps counts tunneled packets arriving there"),
            "quic_packets_saturation": relay_pkts(&sat),
            "quic_packets_cpu_run": relay_pkts(&cpu),
            "sends_refused_by_quic": refused,
            "external_cpu_share_per_attempt": {"saturation": sat_ext, "cpu": cpu_ext},
            "intermediate_relayed_to_connector": d("relayed_to_connector"),
            "intermediate_dropped_send_failed": d("dropped_send_failed"),
        }),
    );
    res.windows.insert("datagram_relay", (sat, cpu, None));
    Ok(())
}
