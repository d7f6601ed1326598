//! `ztna-agent up`: the Linux agent on a TUN device, driving [`AgentEngine`].
//!
//! ```text
//!  apps ──► ztna0 (TUN, MTU 1280) ──► engine.handle_tun ──► poll_transmit ──► UDP socket ──► relay / connector
//!  apps ◄── ztna0 ◄────────────────── engine.poll_tun ◄──── handle_udp ◄───── UDP socket ◄──┘
//! ```
//!
//! One mio loop owns the UDP socket (recvmmsg/sendmmsg batches) and the TUN device
//! (read until it would block, at most `TUN_BURST` packets a turn); everything else
//! is the engine's. The device is created once the intermediate has assigned the
//! tunnel addresses; a route per service prefix points into it, and routes follow
//! the prefixes the intermediate sends. A thread with a small tokio runtime serves
//! the status socket (`ztna-agent status`) from a snapshot the loop refreshes.
//! SIGINT/SIGTERM close the connections, remove the routes and the device.

use std::collections::BTreeSet;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ipnet::IpNet;
use mio::net::UdpSocket;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use ztna_core::agent::{AgentConfig, AgentEngine, AgentEvent, TUN_MTU};

use crate::batch::{BATCH, RecvBatch, SendBatch};
use crate::netif::ip;

const UDP: Token = Token(0);
const TUN: Token = Token(1);
/// Receive batches per loop turn, so timers and the device get their turn under load.
const UDP_BATCHES_PER_TURN: usize = 8;
/// Device reads per loop turn.
const TUN_BURST: usize = 256;
/// Refresh of the status snapshot.
const STATUS_EVERY: Duration = Duration::from_millis(500);

pub struct UpConfig {
    pub agent: AgentConfig,
    /// TUN device name.
    pub tun_name: String,
    /// Unix socket for `ztna-agent status`.
    pub status_socket: PathBuf,
    /// Named relays, re-resolved: the engine follows the changes.
    pub relay_watch: Option<Arc<crate::relay_targets::RelayWatch>>,
}

/// Default path of the status socket.
pub fn default_status_socket() -> PathBuf {
    PathBuf::from("/run/ztna/agent.sock")
}

/// Fails with one line naming the capability when the process lacks
/// CAP_NET_ADMIN (bit 12 of CapEff in /proc/self/status).
pub fn check_net_admin(what: &str) -> anyhow::Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    let status = std::fs::read_to_string("/proc/self/status")
        .context("reading /proc/self/status to check capabilities")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    if eff & (1 << CAP_NET_ADMIN) == 0 {
        let exe = std::env::current_exe()
            .map_or_else(|_| "<binary>".to_string(), |p| p.display().to_string());
        bail!(
            "{what} needs CAP_NET_ADMIN to create a TUN device and routes: run it as root \
             or grant the capability (setcap cap_net_admin+ep {exe})"
        );
    }
    Ok(())
}

/// The TUN device with what we installed on it.
struct Tun {
    dev: tun_rs::SyncDevice,
    name: String,
    addrs: (Ipv4Addr, Ipv6Addr),
    routes: BTreeSet<IpNet>,
}

impl Tun {
    fn create(name: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> anyhow::Result<Self> {
        let dev = tun_rs::DeviceBuilder::new()
            .name(name)
            .ipv4(v4, 32u8, None)
            .ipv6(v6, 128u8)
            .mtu(TUN_MTU)
            .build_sync()
            .with_context(|| format!("creating TUN device {name}"))?;
        dev.set_nonblocking(true)?;
        let name = dev.name().unwrap_or_else(|_| name.to_string());
        tracing::info!("TUN device {name} up: {v4}, {v6}, MTU {TUN_MTU}");
        Ok(Tun {
            dev,
            name,
            addrs: (v4, v6),
            routes: BTreeSet::new(),
        })
    }

    /// Makes the device's routes exactly `want`.
    fn sync_routes(&mut self, want: &BTreeSet<IpNet>) {
        for old in self.routes.difference(want) {
            let r = ip(&["route", "del", &old.to_string(), "dev", &self.name]);
            match r {
                Ok(()) => tracing::info!("route {old} removed"),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        for new in want.difference(&self.routes) {
            match ip(&["route", "replace", &new.to_string(), "dev", &self.name]) {
                Ok(()) => tracing::info!("route {new} via {}", self.name),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        self.routes = want.clone();
    }

    fn remove(mut self) {
        self.sync_routes(&BTreeSet::new());
        tracing::info!("removing TUN device {}", self.name);
        // Dropping the (non-persistent) device deletes it.
        drop(self.dev);
    }
}

pub struct Up {
    engine: AgentEngine,
    socket: UdpSocket,
    poll: Poll,
    tun: Option<Tun>,
    tun_name: String,
    recv: RecvBatch,
    send: SendBatch,
    status: Arc<Mutex<String>>,
    last_status: Instant,
    tun_write_dropped: u64,
    health: Arc<crate::metrics::Health>,
    relay_watch: Option<Arc<crate::relay_targets::RelayWatch>>,
}

impl Up {
    pub fn new(cfg: UpConfig) -> anyhow::Result<(Self, Arc<Mutex<String>>)> {
        check_net_admin("ztna-agent up")?;
        let server = cfg.agent.client.server;
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let mut socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
        let local = socket.local_addr()?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut socket, UDP, Interest::READABLE)?;
        let engine = AgentEngine::new(
            cfg.agent,
            local,
            crate::netif::interface_addrs(),
            Instant::now(),
        )?;
        let status = Arc::new(Mutex::new(String::from("{}")));
        Ok((
            Up {
                engine,
                socket,
                poll,
                tun: None,
                tun_name: cfg.tun_name,
                recv: RecvBatch::default(),
                send: SendBatch::default(),
                status: status.clone(),
                last_status: Instant::now(),
                tun_write_dropped: 0,
                health: Arc::default(),
                relay_watch: cfg.relay_watch,
            },
            status,
        ))
    }

    pub fn engine(&self) -> &AgentEngine {
        &self.engine
    }

    /// Ready while connected with every service registered.
    pub fn health(&self) -> Arc<crate::metrics::Health> {
        self.health.clone()
    }

    /// Runs until `stop` is set, then tears down.
    pub fn run(self, stop: &AtomicBool) -> anyhow::Result<()> {
        self.run_reloading(stop, &AtomicBool::new(false), || {
            anyhow::bail!("no configuration to reload from")
        })
    }

    /// [`Up::run`], applying a new client configuration from `source` whenever
    /// `reload` is set (SIGHUP): see [`AgentEngine::reconfigure`]. A configuration
    /// that does not load is refused and logged; the running one stays.
    pub fn run_reloading(
        mut self,
        stop: &AtomicBool,
        reload: &AtomicBool,
        mut source: impl FnMut() -> anyhow::Result<ztna_core::ClientConfig>,
    ) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(64);
        let mut buf = vec![0u8; 65535];
        let mut out = vec![0u8; 65535];
        // The first Initial goes out now, not after the first wait.
        self.flush(&mut buf, &mut out)?;
        // Edge-triggered readiness: when a turn leaves input behind, the next poll
        // must not wait for a new edge.
        let mut more = false;
        while !stop.load(Ordering::Relaxed) {
            self.health.tick();
            if reload.swap(false, Ordering::SeqCst) {
                match source().and_then(|cfg| Ok(self.engine.reconfigure(cfg)?)) {
                    Ok(()) => tracing::info!(
                        "configuration reloaded: services {:?}",
                        self.engine.services().collect::<Vec<_>>()
                    ),
                    Err(e) => {
                        tracing::error!("reload refused, the running configuration stays: {e:#}")
                    }
                }
            }
            let now = Instant::now();
            if let Some(addrs) = self.relay_watch.as_ref().and_then(|w| w.take())
                && let Err(e) = self.engine.set_relays(&addrs, now)
            {
                tracing::warn!("following relays {addrs:?}: {e}");
            }
            let timeout = if more {
                Duration::ZERO
            } else {
                self.engine
                    .poll_timeout()
                    .map_or(Duration::from_millis(100), |t| {
                        t.saturating_duration_since(now)
                    })
                    .min(Duration::from_millis(100))
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                return Err(e.into());
            }
            more = false;
            let fd = self.socket.as_raw_fd();
            for _ in 0..UDP_BATCHES_PER_TURN {
                let n = match self.recv.recv(fd) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!("udp recv: {e}");
                        break;
                    }
                };
                let now = Instant::now();
                for i in 0..n {
                    if let Some((pkt, from)) = self.recv.get(i) {
                        self.engine.handle_udp(pkt, from, now);
                    }
                }
                if n < BATCH {
                    break;
                }
                more = true;
            }
            if let Some(tun) = &self.tun {
                let now = Instant::now();
                let mut read = 0;
                loop {
                    if read == TUN_BURST {
                        more = true;
                        break;
                    }
                    match tun.dev.recv(&mut buf) {
                        Ok(n) => self.engine.handle_tun(&mut buf[..n], now),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::warn!("TUN read: {e}");
                            break;
                        }
                    }
                    read += 1;
                }
            }
            let now = Instant::now();
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                self.engine.handle_timeout(now);
            }
            self.flush(&mut buf, &mut out)?;
        }
        self.shutdown(&mut buf, &mut out);
        Ok(())
    }

    /// Writes the engine's packets to the device, sends its datagrams, and acts on
    /// its events.
    fn flush(&mut self, buf: &mut [u8], out: &mut [u8]) -> anyhow::Result<()> {
        while let Some(n) = self.engine.poll_tun(buf) {
            match &self.tun {
                Some(t) => {
                    if t.dev.send(&buf[..n]).is_err() {
                        // The kernel's queue is full: drop, as a router would.
                        self.tun_write_dropped += 1;
                    }
                }
                None => self.tun_write_dropped += 1,
            }
        }
        let now = Instant::now();
        let fd = self.socket.as_raw_fd();
        while let Some((n, to)) = self.engine.poll_transmit(out, now) {
            self.send.push(&out[..n], to);
            if self.send.len() >= BATCH {
                self.send.flush(fd);
            }
        }
        if !self.send.is_empty() {
            self.send.flush(fd);
        }
        let mut refresh = false;
        while let Some(ev) = self.engine.poll_event() {
            refresh = true;
            match ev {
                AgentEvent::RoutesChanged => self.sync_tun()?,
                AgentEvent::PathChanged(c) => {
                    tracing::info!("service {:?}: path {}", c.service, c.path)
                }
                AgentEvent::Refused { service, status } => {
                    tracing::warn!("registration for {service:?} refused: {status}")
                }
                AgentEvent::Disconnected { reason, retry_in } => {
                    tracing::warn!("disconnected: {reason}; retry in {retry_in:?}")
                }
                other => tracing::debug!("{other:?}"),
            }
        }
        if refresh || now.duration_since(self.last_status) >= STATUS_EVERY {
            self.publish_status();
            self.last_status = now;
        }
        Ok(())
    }

    /// Creates the device once the tunnel addresses are known (again if they
    /// changed) and makes its routes match the engine's.
    fn sync_tun(&mut self) -> anyhow::Result<()> {
        let Some(addrs) = self.engine.tunnel_address() else {
            return Ok(());
        };
        if self.tun.as_ref().is_some_and(|t| t.addrs != addrs)
            && let Some(mut old) = self.tun.take()
        {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&old.dev.as_raw_fd()));
            old.sync_routes(&BTreeSet::new());
            drop(old);
        }
        if self.tun.is_none() {
            let tun = Tun::create(&self.tun_name, addrs.0, addrs.1)?;
            self.poll.registry().register(
                &mut SourceFd(&tun.dev.as_raw_fd()),
                TUN,
                Interest::READABLE,
            )?;
            self.tun = Some(tun);
        }
        let want: BTreeSet<IpNet> = self.engine.routes().iter().map(|(p, _)| *p).collect();
        if let Some(t) = self.tun.as_mut() {
            t.sync_routes(&want);
        }
        Ok(())
    }

    fn publish_status(&mut self) {
        let status = self.engine.status();
        let registered = status.services.iter().filter(|s| s.registered).count();
        if status.connected && registered == status.services.len() {
            self.health.set_ready();
        } else if !status.connected {
            self.health
                .set_not_ready("not connected to the intermediate");
        } else {
            self.health.set_not_ready(&format!(
                "{registered} of {} services registered",
                status.services.len()
            ));
        }
        let mut v = serde_json::to_value(status).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "tun".into(),
                self.tun
                    .as_ref()
                    .map_or(serde_json::Value::Null, |t| t.name.clone().into()),
            );
            obj.insert("tun_write_dropped".into(), self.tun_write_dropped.into());
        }
        if let Ok(mut s) = self.status.lock() {
            *s = v.to_string();
        }
    }

    fn shutdown(mut self, buf: &mut [u8], out: &mut [u8]) {
        tracing::info!("shutting down");
        self.engine.close();
        let _ = self.flush(buf, out);
        if let Some(t) = self.tun.take() {
            t.remove();
        }
    }
}

/// Serves the latest status snapshot to every connection on `path` (a Unix
/// socket), from a thread with a single-threaded tokio runtime: control-plane IO
/// stays off the packet loop.
pub fn serve_status(path: PathBuf, status: Arc<Mutex<String>>) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A stale socket of an earlier run.
    let _ = std::fs::remove_file(&path);
    let std_listener = std::os::unix::net::UnixListener::bind(&path)
        .with_context(|| format!("binding the status socket {}", path.display()))?;
    std_listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("status".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::warn!("status socket: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::UnixListener::from_std(std_listener) else {
                    return;
                };
                loop {
                    let Ok((mut conn, _)) = listener.accept().await else {
                        continue;
                    };
                    let snapshot = status.lock().map(|s| s.clone()).unwrap_or_default();
                    tokio::spawn(async move {
                        use tokio::io::AsyncWriteExt;
                        let _ = conn.write_all(snapshot.as_bytes()).await;
                        let _ = conn.shutdown().await;
                    });
                }
            });
        })?;
    Ok(())
}

/// Reads the status snapshot of a running `ztna-agent up`.
pub fn read_status(path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    use std::io::Read;
    let mut conn = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to {} (is `ztna-agent up` running?)",
            path.display()
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut s = String::new();
    conn.read_to_string(&mut s)
        .with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&s).with_context(|| format!("parsing the status from {}", path.display()))
}

/// The status as a table for people.
pub fn format_status(v: &serde_json::Value) -> String {
    let mut s = String::new();
    let str_of = |v: &serde_json::Value| match v {
        serde_json::Value::String(x) => x.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    s.push_str(&format!(
        "tunnel {} ({}, {}), MTU {}, relays {}\n",
        str_of(&v["tun"]),
        str_of(&v["tunnel_ipv4"]),
        str_of(&v["tunnel_ipv6"]),
        str_of(&v["mtu"]),
        if v["connected"].as_bool() == Some(true) {
            "up"
        } else {
            "down"
        }
    ));
    s.push_str(&format!(
        "{:<16} {:<16} {:<28} {:>9} {:>10} {:>12} {:>10} {:>12}\n",
        "SERVICE", "PATH", "PREFIXES", "RTT ms", "TX pkts", "TX bytes", "RX pkts", "RX bytes"
    ));
    for svc in v["services"].as_array().into_iter().flatten() {
        let prefixes: Vec<String> = svc["prefixes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(str_of)
            .collect();
        let t = &svc["traffic"];
        s.push_str(&format!(
            "{:<16} {:<16} {:<28} {:>9} {:>10} {:>12} {:>10} {:>12}\n",
            str_of(&svc["name"]),
            str_of(&svc["path"]),
            prefixes.join(","),
            svc["rtt_ms"]
                .as_f64()
                .map_or("-".into(), |r| format!("{r:.2}")),
            str_of(&t["tx_packets"]),
            str_of(&t["tx_bytes"]),
            str_of(&t["rx_packets"]),
            str_of(&t["rx_bytes"]),
        ));
        let history: Vec<String> = svc["history"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| format!("{} at {} ms", str_of(&c["path"]), str_of(&c["at_ms"])))
            .collect();
        if !history.is_empty() {
            s.push_str(&format!("  history: {}\n", history.join(" -> ")));
        }
        if !svc["relay"].is_null() {
            s.push_str(&format!(
                "  relay {}, standby {}\n",
                str_of(&svc["relay"]),
                str_of(&svc["standby"])
            ));
        }
    }
    let relays = v["relays"].as_array().into_iter().flatten();
    for r in relays {
        s.push_str(&format!(
            "relay {:<24} {:<5} {}{}\n",
            str_of(&r["address"]),
            if r["connected"].as_bool() == Some(true) {
                "up"
            } else {
                "down"
            },
            r["rtt_ms"]
                .as_f64()
                .map_or("-".into(), |x| format!("RTT {x:.2} ms")),
            if r["draining"].as_bool() == Some(true) {
                ", draining"
            } else {
                ""
            },
        ));
    }
    s
}
