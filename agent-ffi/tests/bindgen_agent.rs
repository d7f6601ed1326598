//! Drives a full agent through Rust bindings that bindgen generated from the
//! committed header (build.rs), not through the crate's Rust types: if the header
//! and the ABI disagree (a field order, a type, an enum value), this breaks. The
//! agent connects to a real intermediate and connector on loopback, registers,
//! learns its tunnel address and routes, and its tunnel packets (UDP to the echo
//! service, a TCP SYN to the web service) come back as the expected replies.
#![cfg(target_os = "linux")]

mod common;

use std::ffi::{CStr, CString, c_char, c_void};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use ztna_agent_ffi as _; // links the library whose symbols the bindings name

#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    dead_code,
    unsafe_op_in_unsafe_fn,
    clippy::all
)]
mod sys {
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}

use common::{ECHO_VIP, WEB_VIP};
use sys::*;

fn to_c(a: SocketAddr) -> ztna_sockaddr {
    let mut s = ztna_sockaddr {
        family: 0,
        _reserved: 0,
        port: a.port(),
        addr: [0; 16],
    };
    match a.ip() {
        IpAddr::V4(v4) => {
            s.family = 4;
            s.addr[..4].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            s.family = 6;
            s.addr = v6.octets();
        }
    }
    s
}

fn from_c(s: &ztna_sockaddr) -> SocketAddr {
    match s.family {
        4 => SocketAddr::from(([s.addr[0], s.addr[1], s.addr[2], s.addr[3]], s.port)),
        6 => SocketAddr::from((s.addr, s.port)),
        f => panic!("family {f}"),
    }
}

unsafe extern "C" fn log_cb(ctx: *mut c_void, _level: ztna_log_level, msg: *const c_char) {
    // SAFETY: ctx is the Vec<String> the test passed; msg is a C string.
    unsafe {
        let lines = &mut *ctx.cast::<Vec<String>>();
        lines.push(CStr::from_ptr(msg).to_string_lossy().into_owned());
    }
}

struct Harness {
    agent: *mut ztna_agent,
    sock: UdpSocket,
    /// Tunnel packets the agent produced, in order.
    tun: Vec<Vec<u8>>,
}

impl Harness {
    /// One turn of a driver loop: feed the socket, fire the timer, flush outputs.
    fn turn(&mut self) {
        let mut buf = [0u8; 65536];
        // Wait for a datagram at most until the agent's timer (and 5 ms).
        let mut ms = 0u64;
        // SAFETY: live handle, valid out pointer.
        let r = unsafe { ztna_agent_next_timeout_ms(self.agent, &mut ms) };
        let wait = if r == ZTNA_ERROR_OK {
            ms.clamp(1, 5)
        } else {
            5
        };
        self.sock
            .set_read_timeout(Some(Duration::from_millis(wait)))
            .unwrap();
        while let Ok((n, from)) = self.sock.recv_from(&mut buf) {
            let from = to_c(from);
            // SAFETY: valid buffer and address.
            let r = unsafe { ztna_agent_udp_input(self.agent, buf.as_ptr(), n, &from) };
            assert_eq!(r, ZTNA_ERROR_OK);
            self.sock.set_nonblocking(true).unwrap();
        }
        self.sock.set_nonblocking(false).unwrap();
        // SAFETY: live handle.
        assert_eq!(unsafe { ztna_agent_on_timeout(self.agent) }, ZTNA_ERROR_OK);
        self.flush();
    }

    fn flush(&mut self) {
        let mut out = vec![0u8; ZTNA_MAX_DATAGRAM as usize];
        loop {
            let mut len = 0usize;
            let mut to = to_c("0.0.0.0:0".parse().unwrap());
            // SAFETY: buffer of `out.len()` bytes, valid outputs.
            let r = unsafe {
                ztna_agent_poll_udp(self.agent, out.as_mut_ptr(), out.len(), &mut len, &mut to)
            };
            if r == ZTNA_ERROR_NOTHING {
                break;
            }
            assert_eq!(r, ZTNA_ERROR_OK);
            let _ = self.sock.send_to(&out[..len], from_c(&to));
        }
        loop {
            let mut len = 0usize;
            // SAFETY: as above.
            let r =
                unsafe { ztna_agent_poll_tun(self.agent, out.as_mut_ptr(), out.len(), &mut len) };
            if r == ZTNA_ERROR_NOTHING {
                break;
            }
            assert_eq!(r, ZTNA_ERROR_OK);
            self.tun.push(out[..len].to_vec());
        }
    }

    fn until(&mut self, what: &str, secs: u64, mut done: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.turn();
        }
    }

    fn routes(&self) -> (ztna_tunnel_info, Vec<ztna_prefix>) {
        // SAFETY: zeroed plain-old-data.
        let mut info: ztna_tunnel_info = unsafe { std::mem::zeroed() };
        let mut count = 0usize;
        // SAFETY: asking for the count with a null array of capacity 0.
        let r = unsafe {
            ztna_agent_routes(self.agent, &mut info, std::ptr::null_mut(), 0, &mut count)
        };
        if count == 0 {
            assert_eq!(r, ZTNA_ERROR_OK);
            return (info, Vec::new());
        }
        assert_eq!(r, ZTNA_ERROR_BUFFER_TOO_SMALL);
        // SAFETY: as above.
        let mut v = vec![unsafe { std::mem::zeroed::<ztna_prefix>() }; count];
        // SAFETY: `count` entries.
        let r =
            unsafe { ztna_agent_routes(self.agent, &mut info, v.as_mut_ptr(), count, &mut count) };
        assert_eq!(r, ZTNA_ERROR_OK);
        v.truncate(count);
        (info, v)
    }

    fn status(&self) -> serde_json::Value {
        let mut len = 0usize;
        // SAFETY: asking for the length.
        let r = unsafe { ztna_agent_status_json(self.agent, std::ptr::null_mut(), 0, &mut len) };
        assert_eq!(r, ZTNA_ERROR_BUFFER_TOO_SMALL);
        let mut buf = vec![0 as c_char; len + 1];
        // SAFETY: `len + 1` bytes.
        let r =
            unsafe { ztna_agent_status_json(self.agent, buf.as_mut_ptr(), buf.len(), &mut len) };
        assert_eq!(r, ZTNA_ERROR_OK);
        // SAFETY: NUL-terminated by contract.
        let s = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap();
        assert_eq!(s.len(), len);
        serde_json::from_str(s).unwrap()
    }

    fn send_tun(&mut self, p: &[u8]) {
        // SAFETY: valid buffer.
        let r = unsafe { ztna_agent_tun_input(self.agent, p.as_ptr(), p.len()) };
        assert_eq!(r, ZTNA_ERROR_OK);
        self.flush();
    }
}

struct Config {
    _strings: Vec<CString>,
    _ptrs: Vec<*const c_char>,
    _pem: [Vec<u8>; 3],
    c: ztna_agent_config,
}

fn config(env: &common::Env, local: SocketAddr, logs: *mut Vec<String>) -> Box<Config> {
    let pem = [
        std::fs::read(&env.pki.ca_cert).unwrap(),
        std::fs::read(&env.pki.agent_cert).unwrap(),
        std::fs::read(&env.pki.agent_key).unwrap(),
    ];
    let strings = vec![
        CString::new("intermediate.ztna").unwrap(),
        CString::new(common::ECHO).unwrap(),
        CString::new(common::WEB).unwrap(),
    ];
    let ptrs = vec![strings[1].as_ptr(), strings[2].as_ptr()];
    let c = ztna_agent_config {
        intermediate: to_c(env.intermediate),
        server_name: strings[0].as_ptr(),
        ca_pem: pem[0].as_ptr(),
        ca_pem_len: pem[0].len(),
        cert_pem: pem[1].as_ptr(),
        cert_pem_len: pem[1].len(),
        key_pem: pem[2].as_ptr(),
        key_pem_len: pem[2].len(),
        services: ptrs.as_ptr(),
        services_len: ptrs.len(),
        local: to_c(local),
        options: ZTNA_OPT_DATA_PATH | ZTNA_OPT_P2P,
        keepalive_ms: 1000,
        idle_timeout_ms: 0,
        log_level: ZTNA_LOG_LEVEL_INFO,
        log: Some(log_cb),
        log_ctx: logs.cast(),
    };
    Box::new(Config {
        _strings: strings,
        _ptrs: ptrs,
        _pem: pem,
        c,
    })
}

#[test]
fn agent_through_bindgen_bindings_registers_and_carries_udp_and_tcp() {
    let env = common::start("bindgen");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut logs: Box<Vec<String>> = Box::default();
    let cfg = config(&env, sock.local_addr().unwrap(), &mut *logs);

    let mut agent: *mut ztna_agent = std::ptr::null_mut();
    // SAFETY: valid config and out pointer.
    let r = unsafe { ztna_agent_new(&cfg.c, &mut agent) };
    assert_eq!(r, ZTNA_ERROR_OK, "{:?}", logs);
    assert!(!agent.is_null());
    let mut h = Harness {
        agent,
        sock,
        tun: Vec::new(),
    };

    // A datagram kept back for a larger buffer: too small reports the size needed
    // (the first Initial is padded to 1350 bytes), and the next call gets it.
    let mut small = [0u8; 16];
    let (mut len, mut to) = (0usize, to_c("0.0.0.0:0".parse().unwrap()));
    // SAFETY: 16-byte buffer, valid outputs.
    let r =
        unsafe { ztna_agent_poll_udp(agent, small.as_mut_ptr(), small.len(), &mut len, &mut to) };
    assert_eq!(r, ZTNA_ERROR_BUFFER_TOO_SMALL);
    assert!(
        len > small.len() && len <= ZTNA_MAX_DATAGRAM as usize,
        "{len}"
    );
    let needed = len;
    let mut big = vec![0u8; needed];
    // SAFETY: `needed` bytes.
    let r = unsafe { ztna_agent_poll_udp(agent, big.as_mut_ptr(), big.len(), &mut len, &mut to) };
    assert_eq!(r, ZTNA_ERROR_OK);
    assert_eq!(len, needed);
    assert_eq!(from_c(&to), env.intermediate);
    h.sock.send_to(&big[..len], env.intermediate).unwrap();

    // Registered, with a tunnel address and both services' prefixes.
    h.until("tunnel address and routes", 30, |h| {
        let (info, prefixes) = h.routes();
        info.has_address == 1 && prefixes.len() == 2
    });
    let (info, prefixes) = h.routes();
    assert_eq!(info.mtu, 1280);
    let mut got: Vec<(u8, u8, [u8; 4])> = prefixes
        .iter()
        .map(|p| {
            (
                p.family,
                p.prefix_len,
                [p.addr[0], p.addr[1], p.addr[2], p.addr[3]],
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![(4, 32, ECHO_VIP.octets()), (4, 32, WEB_VIP.octets())]
    );
    let me = Ipv4Addr::from(info.ipv4);
    assert!(!me.is_unspecified());
    let status = h.status();
    assert_eq!(status["connected"], true, "{status}");
    assert_eq!(status["tunnel_ipv4"], me.to_string(), "{status}");
    let services = status["services"].as_array().unwrap();
    assert_eq!(services.len(), 2);
    assert!(services.iter().all(|s| s["registered"] == true), "{status}");
    assert!(logs.iter().any(|l| l == "registered echo"), "{logs:?}");
    // The engine's own tracing lines reach the callback too, with their target.
    assert!(
        logs.iter()
            .any(|l| l.starts_with("ztna_core::agent") && l.contains(": tunnel addresses")),
        "{logs:?}"
    );

    // UDP through the tunnel to the echo service: the reply comes back byte for
    // byte, from the service address to ours.
    let src = SocketAddr::from((me, 40000));
    let dst = SocketAddr::from((ECHO_VIP, 7));
    for (i, payload) in [&b"hello through the C ABI"[..], &[0xa5; 1000][..]]
        .into_iter()
        .enumerate()
    {
        let pkt = ztna_core::packet::build_udp(src, dst, payload).unwrap();
        h.tun.clear();
        h.send_tun(&pkt);
        h.until(&format!("echo reply {i}"), 20, |h| {
            h.tun
                .iter()
                .any(|p| ztna_core::packet::parse_udp(p).is_ok())
        });
        let reply = h
            .tun
            .iter()
            .find_map(|p| ztna_core::packet::parse_udp(p).ok())
            .unwrap();
        assert_eq!((reply.0, reply.1), (dst, src));
        assert_eq!(reply.2, payload);
    }

    // A TCP handshake to the web service: the SYN gets a SYN-ACK from the service
    // address acknowledging our sequence number.
    let src = SocketAddr::from((me, 40001));
    let dst = SocketAddr::from((WEB_VIP, 80));
    h.tun.clear();
    h.send_tun(&common::tcp_syn(src, dst, 1000));
    h.until("SYN-ACK", 20, |h| {
        h.tun.iter().any(|p| common::parse_tcp(p).is_some())
    });
    let (s, d, flags, _, ack) = h.tun.iter().find_map(|p| common::parse_tcp(p)).unwrap();
    assert_eq!((s, d), (dst, src));
    assert_eq!(flags & 0x12, 0x12, "flags {flags:#x}");
    assert_eq!(ack, 1001);

    // Network change (wake from sleep): accepted, and the tunnel still works.
    let addrs = [to_c("127.0.0.1:0".parse().unwrap())];
    // SAFETY: one address.
    let r = unsafe { ztna_agent_network_changed(agent, addrs.as_ptr(), addrs.len()) };
    assert_eq!(r, ZTNA_ERROR_OK);
    let pkt = ztna_core::packet::build_udp(
        SocketAddr::from((me, 40002)),
        SocketAddr::from((ECHO_VIP, 7)),
        b"after wake",
    )
    .unwrap();
    h.tun.clear();
    h.send_tun(&pkt);
    h.until("echo after network change", 20, |h| {
        h.tun
            .iter()
            .filter_map(|p| ztna_core::packet::parse_udp(p).ok())
            .any(|r| r.2 == b"after wake")
    });

    // Clean close: a CONNECTION_CLOSE comes out, then the handle is freed and its
    // PEM directory is gone.
    // SAFETY: live handle.
    assert_eq!(unsafe { ztna_agent_close(agent) }, ZTNA_ERROR_OK);
    let mut out = vec![0u8; ZTNA_MAX_DATAGRAM as usize];
    // SAFETY: valid buffer and outputs.
    let r = unsafe { ztna_agent_poll_udp(agent, out.as_mut_ptr(), out.len(), &mut len, &mut to) };
    assert_eq!(r, ZTNA_ERROR_OK, "close sends something");
    // SAFETY: live handle, freed once.
    unsafe { ztna_agent_free(agent) };
}

/// Two relays: the agent starts with the first (the configuration's intermediate),
/// is told about both, connects to the second too and puts each service on one of
/// them with the other as standby; the status lists both relays with an RTT. When
/// the echo service's relay crashes, the service moves to the other one within
/// seconds (the relays' liveness probes, not QUIC's 30 s idle timeout). Told the
/// survivor alone, the agent forgets the crashed one, and the tunnel carries on.
#[test]
fn set_relays_connects_to_each_and_services_follow_the_list() {
    let mut env = common::start_relays("bindgen-relays", 2);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut logs: Box<Vec<String>> = Box::default();
    let cfg = config(&env, sock.local_addr().unwrap(), &mut *logs);
    let mut agent: *mut ztna_agent = std::ptr::null_mut();
    // SAFETY: valid config and out pointer.
    let r = unsafe { ztna_agent_new(&cfg.c, &mut agent) };
    assert_eq!(r, ZTNA_ERROR_OK, "{:?}", logs);
    let mut h = Harness {
        agent,
        sock,
        tun: Vec::new(),
    };
    let relays: Vec<ztna_sockaddr> = env.relays.iter().map(|a| to_c(*a)).collect();
    // SAFETY: live handle, `relays.len()` addresses.
    let r = unsafe { ztna_agent_set_relays(agent, relays.as_ptr(), relays.len()) };
    assert_eq!(r, ZTNA_ERROR_OK);
    let names: Vec<String> = env.relays.iter().map(|a| a.to_string()).collect();
    assert!(
        logs.iter()
            .any(|l| *l == format!("relays: {}", names.join(", "))),
        "{logs:?}"
    );

    // Both relays up with an RTT sample; every service on one, the other standing by.
    h.until("both relays connected, services placed", 30, |h| {
        let s = h.status();
        let relays = s["relays"].as_array().unwrap();
        relays.len() == 2
            && relays
                .iter()
                .all(|r| r["connected"] == true && r["rtt_ms"].is_number())
            && s["services"].as_array().unwrap().iter().all(|svc| {
                svc["registered"] == true && !svc["relay"].is_null() && !svc["standby"].is_null()
            })
    });
    let status = h.status();
    let listed: Vec<&str> = status["relays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["address"].as_str().unwrap())
        .collect();
    assert_eq!(listed, names, "{status}");
    for svc in status["services"].as_array().unwrap() {
        let (relay, standby) = (
            svc["relay"].as_str().unwrap(),
            svc["standby"].as_str().unwrap(),
        );
        assert!(names.iter().any(|n| n == relay), "{status}");
        assert!(
            names.iter().any(|n| n == standby) && standby != relay,
            "{status}"
        );
    }
    let (info, _) = h.routes();
    let me = Ipv4Addr::from(info.ipv4);
    assert!(!me.is_unspecified());
    let echo_relay = |s: &serde_json::Value| {
        s["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|svc| svc["name"] == common::ECHO)
            .map(|svc| svc["relay"].clone())
            .unwrap()
    };

    // The echo service's relay crashes: echo moves to the other one. 10 s is
    // generous for the 1 s liveness limit and far below QUIC's 30 s idle timeout,
    // which is all a relay added after creation would get without it.
    let crashed = echo_relay(&status).as_str().unwrap().to_string();
    let survivor = names.iter().find(|n| **n != crashed).unwrap().clone();
    env.crash(crashed.parse().unwrap());
    h.until("echo on the surviving relay", 10, |h| {
        echo_relay(&h.status()) == survivor.as_str()
    });
    let src = SocketAddr::from((me, 40010));
    let dst = SocketAddr::from((ECHO_VIP, 7));
    let echo = |h: &mut Harness, payload: &[u8]| {
        let pkt = ztna_core::packet::build_udp(src, dst, payload).unwrap();
        h.tun.clear();
        h.send_tun(&pkt);
        h.until("echo reply", 20, |h| {
            h.tun
                .iter()
                .filter_map(|p| ztna_core::packet::parse_udp(p).ok())
                .any(|r| r.2 == payload)
        });
    };
    echo(&mut h, b"after the crash");

    // The survivor alone: the crashed relay leaves the status, every service is on
    // the survivor with no standby, and the tunnel still works.
    let only = [to_c(survivor.parse().unwrap())];
    // SAFETY: live handle, one address.
    let r = unsafe { ztna_agent_set_relays(agent, only.as_ptr(), 1) };
    assert_eq!(r, ZTNA_ERROR_OK);
    h.until("every service on the survivor", 30, |h| {
        let s = h.status();
        s["relays"].as_array().unwrap().len() == 1
            && s["services"]
                .as_array()
                .unwrap()
                .iter()
                .all(|svc| svc["relay"] == survivor.as_str() && svc["standby"].is_null())
    });
    let status = h.status();
    assert_eq!(
        status["relays"][0]["address"],
        survivor.as_str(),
        "{status}"
    );
    echo(&mut h, b"with one relay listed");

    // SAFETY: live handle, freed once.
    unsafe {
        assert_eq!(ztna_agent_close(agent), ZTNA_ERROR_OK);
        ztna_agent_free(agent);
    }
}

/// The header's types, as bindgen read them, have the size, alignment and field
/// offsets of the crate's own `#[repr(C)]` types.
#[test]
fn header_types_match_the_rust_types() {
    use std::mem::{align_of, offset_of, size_of};
    use ztna_agent_ffi as ffi;
    macro_rules! same {
        ($c:ty, $r:ty, $($f:ident / $g:ident),*) => {
            assert_eq!(size_of::<$c>(), size_of::<$r>(), stringify!($c));
            assert_eq!(align_of::<$c>(), align_of::<$r>(), stringify!($c));
            $(assert_eq!(offset_of!($c, $f), offset_of!($r, $g), stringify!($c.$f));)*
        };
    }
    same!(
        ztna_sockaddr,
        ffi::ZtnaSockaddr,
        family / family,
        port / port,
        addr / addr
    );
    same!(
        ztna_prefix,
        ffi::ZtnaPrefix,
        family / family,
        prefix_len / prefix_len,
        addr / addr
    );
    same!(
        ztna_tunnel_info,
        ffi::ZtnaTunnelInfo,
        has_address / has_address,
        ipv4 / ipv4,
        ipv6 / ipv6,
        mtu / mtu
    );
    same!(
        ztna_agent_config,
        ffi::ZtnaAgentConfig,
        intermediate / intermediate,
        server_name / server_name,
        ca_pem / ca_pem,
        ca_pem_len / ca_pem_len,
        cert_pem / cert_pem,
        cert_pem_len / cert_pem_len,
        key_pem / key_pem,
        key_pem_len / key_pem_len,
        services / services,
        services_len / services_len,
        local / local,
        options / options,
        keepalive_ms / keepalive_ms,
        idle_timeout_ms / idle_timeout_ms,
        log_level / log_level,
        log / log,
        log_ctx / log_ctx
    );
    assert_eq!(size_of::<ztna_error>(), size_of::<ffi::ZtnaError>());
    assert_eq!(ZTNA_ERROR_POISONED, ffi::ZtnaError::Poisoned as ztna_error);
    assert_eq!(
        ZTNA_ERROR_BUFFER_TOO_SMALL,
        ffi::ZtnaError::BufferTooSmall as ztna_error
    );
    assert_eq!(ZTNA_MAX_DATAGRAM as usize, ffi::ZTNA_MAX_DATAGRAM);
    assert_eq!(ZTNA_OPT_P2P, ffi::ZTNA_OPT_P2P);
}

#[test]
fn bad_input_gets_error_codes() {
    let mut logs: Box<Vec<String>> = Box::default();
    let mut agent: *mut ztna_agent = std::ptr::null_mut();
    let mut len = 0usize;
    let mut buf = [0u8; 64];
    let mut to = to_c("0.0.0.0:0".parse().unwrap());
    // SAFETY: every call below passes null or valid pointers, as the header allows.
    unsafe {
        assert_eq!(
            ztna_agent_new(std::ptr::null(), &mut agent),
            ZTNA_ERROR_NULL_POINTER
        );
        assert_eq!(
            ztna_agent_udp_input(std::ptr::null_mut(), buf.as_ptr(), 1, &to),
            ZTNA_ERROR_NULL_POINTER
        );
        assert_eq!(
            ztna_agent_poll_udp(
                std::ptr::null_mut(),
                buf.as_mut_ptr(),
                64,
                &mut len,
                &mut to
            ),
            ZTNA_ERROR_NULL_POINTER
        );
        assert_eq!(
            ztna_agent_on_timeout(std::ptr::null_mut()),
            ZTNA_ERROR_NULL_POINTER
        );
        assert_eq!(
            ztna_agent_set_relays(std::ptr::null_mut(), &to, 1),
            ZTNA_ERROR_NULL_POINTER
        );
        ztna_agent_free(std::ptr::null_mut());
        for code in 0..=11 {
            let m = CStr::from_ptr(ztna_error_message(code)).to_str().unwrap();
            assert!(!m.is_empty() && m != "unknown error code", "{code}");
        }
        assert_eq!(
            CStr::from_ptr(ztna_error_message(-7)).to_str().unwrap(),
            "unknown error code"
        );
    }

    // A config that is valid but for one field at a time. No intermediate is
    // needed: creating the agent only sends an Initial.
    let env_dir = std::env::temp_dir().join(format!("ztna-ffi-bad-{}", std::process::id()));
    let pki = ztna_userspace::identity::generate_dev_pki(&env_dir, &["echo".into()]).unwrap();
    let pem = [
        std::fs::read(&pki.ca_cert).unwrap(),
        std::fs::read(&pki.agent_cert).unwrap(),
        std::fs::read(&pki.agent_key).unwrap(),
    ];
    let echo = CString::new("echo").unwrap();
    let bad_utf8 = CString::new(vec![b'e', 0xff, b'x']).unwrap();
    let mut services = [echo.as_ptr()];
    let logs_ptr: *mut Vec<String> = &mut *logs;
    let good = || ztna_agent_config {
        intermediate: to_c("127.0.0.1:9".parse().unwrap()),
        server_name: std::ptr::null(),
        ca_pem: pem[0].as_ptr(),
        ca_pem_len: pem[0].len(),
        cert_pem: pem[1].as_ptr(),
        cert_pem_len: pem[1].len(),
        key_pem: pem[2].as_ptr(),
        key_pem_len: pem[2].len(),
        services: std::ptr::null(),
        services_len: 1,
        local: to_c("127.0.0.1:0".parse().unwrap()),
        options: ZTNA_OPT_DATA_PATH,
        keepalive_ms: 0,
        idle_timeout_ms: 0,
        log_level: ZTNA_LOG_LEVEL_ERROR,
        log: Some(log_cb),
        log_ctx: logs_ptr.cast(),
    };
    let try_new = |c: &ztna_agent_config| {
        // Non-null, so the test sees `out` nulled on failure.
        let mut a: *mut ztna_agent = std::ptr::dangling_mut();
        // SAFETY: valid config pointers.
        let r = unsafe { ztna_agent_new(c, &mut a) };
        if r == ZTNA_ERROR_OK {
            // SAFETY: live handle.
            unsafe { ztna_agent_free(a) };
        } else {
            assert!(a.is_null(), "out is nulled on failure");
        }
        r
    };
    let mut c = good();
    assert_eq!(try_new(&c), ZTNA_ERROR_NULL_POINTER, "null services");
    c.services = services.as_ptr();
    assert_eq!(try_new(&c), ZTNA_ERROR_OK);
    c.services_len = 0;
    assert_eq!(try_new(&c), ZTNA_ERROR_INVALID_CONFIG, "no services");
    c.services_len = 1;
    services[0] = bad_utf8.as_ptr();
    c.services = services.as_ptr();
    assert_eq!(try_new(&c), ZTNA_ERROR_INVALID_UTF8);
    services[0] = echo.as_ptr();
    c.services = services.as_ptr();
    c.server_name = bad_utf8.as_ptr();
    assert_eq!(try_new(&c), ZTNA_ERROR_INVALID_UTF8);
    c.server_name = std::ptr::null();
    c.intermediate.family = 9;
    assert_eq!(try_new(&c), ZTNA_ERROR_INVALID_ADDRESS);
    c.intermediate.family = 4;
    c.options = 0x80;
    assert_eq!(try_new(&c), ZTNA_ERROR_INVALID_CONFIG, "unknown option bit");
    c.options = ZTNA_OPT_DATA_PATH;
    c.key_pem = std::ptr::null();
    assert_eq!(try_new(&c), ZTNA_ERROR_NULL_POINTER);
    c.key_pem = b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n".as_ptr();
    c.key_pem_len = 60;
    assert_eq!(try_new(&c), ZTNA_ERROR_TLS, "a key quiche refuses");
    assert!(
        logs.iter().any(|l| l.contains("starting the agent")),
        "the failure is logged: {logs:?}"
    );
    c.key_pem = pem[2].as_ptr();
    c.key_pem_len = pem[2].len();

    // On a live handle: null buffers, bad lengths, bad addresses, small buffers.
    let mut a: *mut ztna_agent = std::ptr::null_mut();
    // SAFETY: valid config, and afterwards a live handle with the pointers named.
    unsafe {
        assert_eq!(ztna_agent_new(&c, &mut a), ZTNA_ERROR_OK);
        assert_eq!(
            ztna_agent_udp_input(a, std::ptr::null(), 10, &to),
            ZTNA_ERROR_NULL_POINTER
        );
        assert_eq!(
            ztna_agent_udp_input(a, buf.as_ptr(), 0, &to),
            ZTNA_ERROR_INVALID_LENGTH
        );
        let mut bad = to;
        bad.family = 5;
        assert_eq!(
            ztna_agent_udp_input(a, buf.as_ptr(), 10, &bad),
            ZTNA_ERROR_INVALID_ADDRESS
        );
        assert_eq!(
            ztna_agent_tun_input(a, std::ptr::null(), 10),
            ZTNA_ERROR_NULL_POINTER
        );
        assert_eq!(
            ztna_agent_tun_input(a, buf.as_ptr(), 0),
            ZTNA_ERROR_INVALID_LENGTH
        );
        // Garbage from the tunnel is counted and dropped, not an error.
        assert_eq!(ztna_agent_tun_input(a, buf.as_ptr(), 20), ZTNA_ERROR_OK);
        assert_eq!(
            ztna_agent_poll_tun(a, std::ptr::null_mut(), 10, &mut len),
            ZTNA_ERROR_NULL_POINTER
        );
        let mut ms = 0u64;
        assert_eq!(
            ztna_agent_next_timeout_ms(a, std::ptr::null_mut()),
            ZTNA_ERROR_NULL_POINTER
        );
        // Once the first Initial is out, a retransmission timer is armed.
        let mut dgram = vec![0u8; ZTNA_MAX_DATAGRAM as usize];
        assert_eq!(
            ztna_agent_poll_udp(a, dgram.as_mut_ptr(), dgram.len(), &mut len, &mut to),
            ZTNA_ERROR_OK
        );
        assert_eq!(ztna_agent_next_timeout_ms(a, &mut ms), ZTNA_ERROR_OK);
        assert!(ms <= 60_000, "{ms}");
        assert_eq!(
            ztna_agent_network_changed(a, std::ptr::null(), 1),
            ZTNA_ERROR_NULL_POINTER
        );
        assert_eq!(
            ztna_agent_network_changed(a, &bad, 1),
            ZTNA_ERROR_INVALID_ADDRESS
        );
        assert_eq!(
            ztna_agent_network_changed(a, std::ptr::null(), 0),
            ZTNA_ERROR_OK
        );
        // Relays: an empty list is refused (a failed lookup must not drop them
        // all), null with a length, and an unknown family.
        assert_eq!(
            ztna_agent_set_relays(a, std::ptr::null(), 0),
            ZTNA_ERROR_INVALID_LENGTH
        );
        assert_eq!(ztna_agent_set_relays(a, &to, 0), ZTNA_ERROR_INVALID_LENGTH);
        assert_eq!(
            ztna_agent_set_relays(a, std::ptr::null(), 2),
            ZTNA_ERROR_NULL_POINTER
        );
        let relays = [to_c("127.0.0.1:9".parse().unwrap()), bad];
        assert_eq!(
            ztna_agent_set_relays(a, relays.as_ptr(), 2),
            ZTNA_ERROR_INVALID_ADDRESS
        );
        // None of those changed anything: one relay, and every service has the
        // relay and standby keys (null while nothing is connected).
        let mut json = vec![0 as c_char; 8192];
        assert_eq!(
            ztna_agent_status_json(a, json.as_mut_ptr(), json.len(), &mut len),
            ZTNA_ERROR_OK
        );
        let status: serde_json::Value =
            serde_json::from_str(CStr::from_ptr(json.as_ptr()).to_str().unwrap()).unwrap();
        assert_eq!(status["relays"].as_array().unwrap().len(), 1, "{status}");
        assert_eq!(status["relays"][0]["address"], "127.0.0.1:9", "{status}");
        for svc in status["services"].as_array().unwrap() {
            let svc = svc.as_object().unwrap();
            for key in ["relay", "standby"] {
                assert!(
                    svc.get(key).is_some_and(serde_json::Value::is_null),
                    "{key}: {svc:?}"
                );
            }
        }
        // Two relays: both listed, in order.
        assert_eq!(ztna_agent_set_relays(a, relays.as_ptr(), 1), ZTNA_ERROR_OK);
        let two = [relays[0], to_c("127.0.0.1:10".parse().unwrap())];
        assert_eq!(ztna_agent_set_relays(a, two.as_ptr(), 2), ZTNA_ERROR_OK);
        assert_eq!(
            ztna_agent_status_json(a, json.as_mut_ptr(), json.len(), &mut len),
            ZTNA_ERROR_OK
        );
        let status: serde_json::Value =
            serde_json::from_str(CStr::from_ptr(json.as_ptr()).to_str().unwrap()).unwrap();
        let listed: Vec<&str> = status["relays"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["address"].as_str().unwrap())
            .collect();
        assert_eq!(listed, ["127.0.0.1:9", "127.0.0.1:10"], "{status}");
        let mut small = [0 as c_char; 4];
        assert_eq!(
            ztna_agent_status_json(a, small.as_mut_ptr(), small.len(), &mut len),
            ZTNA_ERROR_BUFFER_TOO_SMALL
        );
        assert!(len > small.len());
        assert_eq!(small, [0; 4], "nothing written into a too-small buffer");
        ztna_agent_free(a);
    }
    let _ = std::fs::remove_dir_all(&env_dir);
}
