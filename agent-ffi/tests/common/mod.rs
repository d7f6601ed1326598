//! A real intermediate and connector on loopback, in-process, for the tests that
//! drive an agent through the C ABI: service `echo` (UDP echo server behind
//! 10.100.0.1) and service `web` (a TCP listener behind 10.100.0.2), certificates
//! from a throwaway dev CA.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ztna_core::{ClientConfig, Role};
use ztna_userspace::connector::{self, ConnectorHandle, ServiceSpec};
use ztna_userspace::echo::EchoServer;
use ztna_userspace::identity::{self, DevPki};
use ztna_userspace::intermediate::{self, IntermediateConfig, IntermediateHandle};

pub const ECHO: &str = "echo";
pub const WEB: &str = "web";
pub const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
pub const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);

pub struct Env {
    pub pki: DevPki,
    /// The first of `relays`.
    pub intermediate: SocketAddr,
    /// Every intermediate; the connector registered both services with each.
    pub relays: Vec<SocketAddr>,
    // Dropped in reverse order of start: connector before intermediates.
    pub connector: Option<ConnectorHandle>,
    pub echo: EchoServer,
    pub tcp: TcpListener,
    /// `None` once crashed.
    intermediates: Vec<Option<IntermediateHandle>>,
}

impl Env {
    /// Stops the intermediate at `addr` without a word (no CONNECTION_CLOSE), as a
    /// killed process or a lost node would.
    pub fn crash(&mut self, addr: SocketAddr) {
        let k = self.relays.iter().position(|a| *a == addr).unwrap();
        self.intermediates[k].take().unwrap().crash().unwrap();
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(c) = self.connector.take() {
            let _ = c.stop();
        }
        let _ = std::fs::remove_dir_all(&self.pki.dir);
    }
}

pub fn start(name: &str) -> Env {
    start_relays(name, 1)
}

/// [`start`] with `n` intermediates (relays of one deployment).
pub fn start_relays(name: &str, n: usize) -> Env {
    let dir: PathBuf = std::env::temp_dir().join(format!("ztna-ffi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pki = identity::generate_dev_pki(&dir, &[ECHO.to_string(), WEB.to_string()]).unwrap();
    let handles: Vec<IntermediateHandle> = (0..n)
        .map(|_| {
            intermediate::spawn(IntermediateConfig::new(
                "127.0.0.1:0".parse().unwrap(),
                pki.server_cert.clone(),
                pki.server_key.clone(),
                Some(pki.ca_cert.clone()),
            ))
            .unwrap()
        })
        .collect();
    let relays: Vec<SocketAddr> = handles.iter().map(|h| h.addr).collect();
    let addr = relays[0];
    let echo = EchoServer::spawn("127.0.0.1:0".parse().unwrap()).unwrap();
    // The kernel completes handshakes into the backlog: no accept loop needed for
    // the connector's dial to succeed.
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = ClientConfig::new(addr, Role::Connector, vec![ECHO.into(), WEB.into()]);
    cfg.ca_file = Some(pki.ca_cert.to_str().unwrap().into());
    cfg.cert_file = Some(pki.connector_cert.to_str().unwrap().into());
    cfg.key_file = Some(pki.connector_key.to_str().unwrap().into());
    cfg.backoff_initial = Duration::from_millis(50);
    let specs = vec![
        ServiceSpec {
            id: ECHO.into(),
            backend: echo.addr.into(),
            prefixes: vec![IpAddr::V4(ECHO_VIP).into()],
        },
        ServiceSpec {
            id: WEB.into(),
            backend: tcp.local_addr().unwrap().into(),
            prefixes: vec![IpAddr::V4(WEB_VIP).into()],
        },
    ];
    let c = connector::spawn_with_relays(cfg, specs, relays.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Both services with every intermediate.
    while c.stats.registrations.load(Ordering::Relaxed) < 2 * n as u64 {
        assert!(
            Instant::now() < deadline,
            "connector did not register both services with every intermediate"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Env {
        pki,
        intermediate: addr,
        relays,
        connector: Some(c),
        echo,
        tcp,
        intermediates: handles.into_iter().map(Some).collect(),
    }
}

/// An IPv4 TCP SYN with valid checksums (no options but MSS 1240).
pub fn tcp_syn(src: SocketAddr, dst: SocketAddr, seq: u32) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        panic!("IPv4 only")
    };
    let mut p = vec![0u8; 20 + 24];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&44u16.to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&s.ip().octets());
    p[16..20].copy_from_slice(&d.ip().octets());
    let c = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    {
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&s.port().to_be_bytes());
        t[2..4].copy_from_slice(&d.port().to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[12] = 6 << 4; // data offset: 6 words (MSS option)
        t[13] = 0x02; // SYN
        t[14..16].copy_from_slice(&65535u16.to_be_bytes());
        t[20..24].copy_from_slice(&[2, 4, 0x04, 0xd8]); // MSS 1240
    }
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&s.ip().octets());
    pseudo.extend_from_slice(&d.ip().octets());
    pseudo.extend_from_slice(&[0, 6, 0, 24]);
    let c = checksum(&p[20..], sum(&pseudo));
    p[36..38].copy_from_slice(&c.to_be_bytes());
    p
}

fn sum(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .sum()
}

fn checksum(b: &[u8], init: u32) -> u16 {
    let mut s = init + sum(b);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// (src, dst, flags, seq, ack) of an IPv4 TCP segment.
pub fn parse_tcp(p: &[u8]) -> Option<(SocketAddr, SocketAddr, u8, u32, u32)> {
    if p.len() < 40 || p[0] >> 4 != 4 || p[9] != 6 {
        return None;
    }
    let ihl = usize::from(p[0] & 0xf) * 4;
    let t = p.get(ihl..)?;
    let src = SocketAddr::from((
        [p[12], p[13], p[14], p[15]],
        u16::from_be_bytes([t[0], t[1]]),
    ));
    let dst = SocketAddr::from((
        [p[16], p[17], p[18], p[19]],
        u16::from_be_bytes([t[2], t[3]]),
    ));
    let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    let ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
    Some((src, dst, t[13], seq, ack))
}
