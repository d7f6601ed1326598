//! Harness for running the real XDP object (`target/ztna-ebpf.o`) in this kernel with
//! `BPF_PROG_TEST_RUN`, inside a network namespace of its own so that the program's
//! `bpf_fib_lookup` sees a real route and neighbour:
//!
//! ```text
//! ns ztna-xdp-t<pid>-<test>:
//!   t0 02:00:00:00:00:01 10.250.0.1/24  (the relay; packets come "in" here)
//!      neighbour 10.250.0.2 = 02:00:00:00:00:02 (permanent): PEER
//!   r0 02:00:00:00:01:01 10.250.1.1/24  (a second interface, for XDP_REDIRECT)
//!      neighbour 10.250.1.2 = 02:00:00:00:01:02 (permanent): FAR_PEER
//!   forwarding on (bpf_fib_lookup answers FWD_DISABLED otherwise)
//!   and the same over IPv6 (addresses without duplicate address detection, so
//!   they are usable at once; IPv6 forwarding on both):
//!   t0 fd00:250::1/64, neighbour fd00:250::2 = PEER_MAC: PEER6
//!   r0 fd00:251::1/64, neighbour fd00:251::2 = FAR_PEER_MAC: FAR_PEER6
//! ```
//!
//! Every test loads its own copy of the object, so its maps (and counters) are its
//! own, and tests run in parallel. Without root or without the object a test prints
//! `SKIPPED: <reason>` on stderr (past the test harness's capture) and returns.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp};
use etherparse::{IpHeaders, Ipv4Header, PacketBuilder};
use ztna_common::relay::{
    LOCAL_ADDR_PRESENT, MAP_CONFIG, MAP_LOCAL_ADDRS, MAP_RELAY, MAP_SESSION_STATS, MAP_STATS,
    PROGRAM_NAME, RELAY_CID_MARKER, RelayConfig, RelayEntry, RelayKey, SessionStats, VERDICT_COUNT,
    Verdict,
};

pub mod ipv6;
pub mod model;

pub use ipv6::*;

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

pub const XDP_ABORTED: u32 = 0;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub const RELAY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 250, 0, 1), 4433);
pub const RELAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const PEER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 250, 0, 2), 5555);
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const SENDER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 250, 0, 9), 7777);
pub const SENDER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x09];
pub const FAR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
pub const FAR_PEER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 250, 1, 2), 6666);
pub const FAR_PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
/// On t0's subnet but without a neighbour entry.
pub const NO_NEIGH_PEER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 250, 0, 77), 5555);
/// TEST-NET-1: the namespace has no default route, so no route at all.
pub const NO_ROUTE_PEER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 5555);

/// TTL of the packets the tests send to the relay.
pub const IN_TTL: u8 = 17;
/// TTL the program gives forwarded packets: it sends them anew as their source,
/// like the userspace forwarder's socket (see ztna-ebpf/src/main.rs, `RELAY_TTL`).
pub const RELAY_TTL: u8 = 64;

/// The relay ID the fixture configures (`RelayConfig::relay_id`).
pub const RELAY_ID: u16 = 0x5e1d;

/// A relay CID of this relay (bytes 1..=2: [`RELAY_ID`]) distinguished by `n`.
pub const fn cid(n: u8) -> [u8; 8] {
    let id = RELAY_ID.to_be_bytes();
    [RELAY_CID_MARKER, id[0], id[1], n, 2, 3, 4, n]
}

/// `cid(n)` of another relay: the same nonce, relay ID `relay_id`.
pub const fn other_relay_cid(relay_id: u16, n: u8) -> [u8; 8] {
    let mut c = cid(n);
    let id = relay_id.to_be_bytes();
    c[1] = id[0];
    c[2] = id[1];
    c
}

/// The object under test: `$ZTNA_EBPF_OBJ`, else `<workspace>/target/ztna-ebpf.o`.
pub fn object_path() -> PathBuf {
    std::env::var_os("ZTNA_EBPF_OBJ").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/ztna-ebpf.o"
            ))
        },
        PathBuf::from,
    )
}

/// Why this process cannot run the program, if it cannot.
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (BPF_PROG_TEST_RUN and network namespaces need it)".into());
    }
    let obj = object_path();
    if !obj.exists() {
        return Some(format!(
            "no eBPF object at {} (run `cargo xtask build-ebpf` or set ZTNA_EBPF_OBJ)",
            obj.display()
        ));
    }
    None
}

/// Writes straight to fd 2: `eprintln!` would be swallowed by the test harness for a
/// test that returns normally, and a skip must never look like a silent pass.
pub fn report_skip(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {reason}");
}

fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Serialises `ip netns add/del`: concurrent first uses of /run/netns race on its
/// bind mount.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// A network namespace that is deleted when dropped (also on a failed assertion).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Result<Self> {
        let _g = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // A namespace left by a killed run of the same pid and test.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run_cmd(Command::new("ip").args(["netns", "add", &name]))?;
        Ok(Netns { name })
    }

    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_cmd(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    pub fn sysctl(&self, setting: &str) -> Result<()> {
        run_cmd(Command::new("ip").args(["netns", "exec", &self.name, "sysctl", "-qw", setting]))
            .map(drop)
    }

    pub fn ifindex(&self, dev: &str) -> Result<u32> {
        let out = self.ip(&["-o", "link", "show", "dev", dev])?;
        Ok(out
            .split(':')
            .next()
            .ok_or("ip link output")?
            .trim()
            .parse()?)
    }

    /// Runs `f` on a thread that entered this namespace: the program's route lookups
    /// happen in the namespace of the task that calls BPF_PROG_TEST_RUN.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.name))?;
        std::thread::scope(|s| {
            s.spawn(|| -> Result<T> {
                // SAFETY: setns affects only this short-lived thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(format!("setns: {}", std::io::Error::last_os_error()).into());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| Error::from("test-run thread panicked"))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _g = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ne(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// The loaded program with its own maps, and its namespace.
pub struct Fixture {
    // Declared first: the program and maps go before the namespace.
    ebpf: Ebpf,
    pub ns: Netns,
    /// t0's ifindex, the ingress interface of every test packet.
    pub ifindex: u32,
    /// r0's ifindex, the egress interface towards FAR_PEER.
    pub far_ifindex: u32,
}

impl Fixture {
    /// The fixture for `test`, or `None` after printing why the test is skipped.
    /// Panics if the environment is there but setting up fails: that is a failure.
    pub fn setup(test: &str) -> Option<Fixture> {
        if let Some(reason) = skip_reason() {
            report_skip(test, &reason);
            return None;
        }
        Some(Fixture::new(test).unwrap_or_else(|e| panic!("{test}: setup: {e}")))
    }

    fn new(test: &str) -> Result<Fixture> {
        let ns = Netns::new(format!("ztna-xdp-t{}-{test}", std::process::id()))?;
        for (dev, peer, mac, addr, neigh, neigh_mac) in [
            ("t0", "t1", RELAY_MAC, "10.250.0.1/24", *PEER.ip(), PEER_MAC),
            (
                "r0",
                "r1",
                FAR_MAC,
                "10.250.1.1/24",
                *FAR_PEER.ip(),
                FAR_PEER_MAC,
            ),
        ] {
            let mac = mac_str(mac);
            ns.ip(&[
                "link", "add", dev, "address", &mac, "type", "veth", "peer", "name", peer,
            ])?;
            ns.ip(&["addr", "add", addr, "dev", dev])?;
            ns.ip(&["link", "set", dev, "up"])?;
            ns.ip(&["link", "set", peer, "up"])?;
            let neigh = neigh.to_string();
            let neigh_mac = mac_str(neigh_mac);
            ns.ip(&[
                "neigh",
                "add",
                &neigh,
                "lladdr",
                &neigh_mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
            ns.sysctl(&format!("net.ipv4.conf.{dev}.forwarding=1"))?;
        }
        for (dev, addr, neigh, neigh_mac) in [
            ("t0", "fd00:250::1/64", *PEER6.ip(), PEER_MAC),
            ("r0", "fd00:251::1/64", *FAR_PEER6.ip(), FAR_PEER_MAC),
        ] {
            ns.sysctl(&format!("net.ipv6.conf.{dev}.forwarding=1"))?;
            ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"])?;
            ns.ip(&[
                "-6",
                "neigh",
                "replace",
                &neigh.to_string(),
                "lladdr",
                &mac_str(neigh_mac),
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
        }
        let ifindex = ns.ifindex("t0")?;
        let far_ifindex = ns.ifindex("r0")?;
        let path = object_path();
        let mut ebpf =
            Ebpf::load_file(&path).map_err(|e| format!("loading {}: {e}", path.display()))?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or("no program ztna_relay in the object")?
            .try_into()?;
        prog.load().map_err(|e| format!("verifier: {e:?}"))?;
        let mut f = Fixture {
            ebpf,
            ns,
            ifindex,
            far_ifindex,
        };
        f.set_port(RELAY.port());
        f.add_local_addr(*RELAY.ip());
        f.add_local_addr6(*RELAY6.ip());
        Ok(f)
    }

    /// Adds `addr` to ZTNA_LOCAL_ADDRS, the relay's own addresses (the fixture starts
    /// with RELAY's, as the loader would for a relay bound to it).
    pub fn add_local_addr(&mut self, addr: Ipv4Addr) {
        let mut m: HashMap<&mut MapData, u32, u8> =
            HashMap::try_from(self.ebpf.map_mut(MAP_LOCAL_ADDRS).expect(MAP_LOCAL_ADDRS)).unwrap();
        m.insert(ne(addr), LOCAL_ADDR_PRESENT, 0).unwrap();
    }

    /// Removes forwarding entry `cid` and its stats entry, if they exist.
    pub fn remove(&mut self, cid: [u8; 8]) {
        let mut relay: HashMap<&mut MapData, RelayKey, RelayEntry> =
            HashMap::try_from(self.ebpf.map_mut(MAP_RELAY).expect(MAP_RELAY)).unwrap();
        let _ = relay.remove(&RelayKey { cid });
        self.remove_session(cid);
    }

    /// Removes session `cid`'s stats entry (and so its route cache), if it exists.
    pub fn remove_session(&mut self, cid: [u8; 8]) {
        let mut st: PerCpuHashMap<&mut MapData, RelayKey, SessionStats> = PerCpuHashMap::try_from(
            self.ebpf
                .map_mut(MAP_SESSION_STATS)
                .expect(MAP_SESSION_STATS),
        )
        .unwrap();
        let _ = st.remove(&RelayKey { cid });
    }

    /// Removes `addr` from ZTNA_LOCAL_ADDRS.
    pub fn remove_local_addr(&mut self, addr: Ipv4Addr) {
        let mut m: HashMap<&mut MapData, u32, u8> =
            HashMap::try_from(self.ebpf.map_mut(MAP_LOCAL_ADDRS).expect(MAP_LOCAL_ADDRS)).unwrap();
        m.remove(&ne(addr)).unwrap();
    }

    /// Sets the relay port of ZTNA_CONFIG (host order here; stored in network
    /// order), with relay ID [`RELAY_ID`].
    pub fn set_port(&mut self, port: u16) {
        self.set_config(port, RELAY_ID);
    }

    /// Sets ZTNA_CONFIG: relay port and relay ID (host order here; stored in
    /// network order).
    pub fn set_config(&mut self, port: u16, relay_id: u16) {
        let mut c: Array<&mut MapData, RelayConfig> =
            Array::try_from(self.ebpf.map_mut(MAP_CONFIG).expect(MAP_CONFIG)).unwrap();
        c.set(
            0,
            RelayConfig {
                port: port.to_be(),
                relay_id: relay_id.to_be(),
                ..Default::default()
            },
            0,
        )
        .unwrap();
    }

    /// A forwarding entry only: `cid` → `peer`, accepted only from `expected`.
    pub fn insert_entry(&mut self, cid: [u8; 8], peer: SocketAddrV4, expected: SocketAddrV4) {
        let mut relay: HashMap<&mut MapData, RelayKey, RelayEntry> =
            HashMap::try_from(self.ebpf.map_mut(MAP_RELAY).expect(MAP_RELAY)).unwrap();
        relay
            .insert(
                RelayKey { cid },
                RelayEntry {
                    peer_addr: ne(*peer.ip()),
                    expected_src_addr: ne(*expected.ip()),
                    peer_port: peer.port().to_be(),
                    expected_src_port: expected.port().to_be(),
                    session_id: 7,
                },
                0,
            )
            .unwrap();
    }

    /// A forwarding entry and its (zeroed) per-session stats entry, as userspace
    /// creates them.
    pub fn insert(&mut self, cid: [u8; 8], peer: SocketAddrV4, expected: SocketAddrV4) {
        self.insert_entry(cid, peer, expected);
        let ncpu = aya::util::nr_cpus().expect("nr_cpus");
        let mut st: PerCpuHashMap<&mut MapData, RelayKey, SessionStats> = PerCpuHashMap::try_from(
            self.ebpf
                .map_mut(MAP_SESSION_STATS)
                .expect(MAP_SESSION_STATS),
        )
        .unwrap();
        st.insert(
            RelayKey { cid },
            PerCpuValues::try_from(vec![SessionStats::default(); ncpu]).unwrap(),
            0,
        )
        .unwrap();
    }

    /// ZTNA_STATS summed over CPUs, indexed by verdict.
    pub fn counters(&self) -> [u64; VERDICT_COUNT as usize] {
        let s: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map(MAP_STATS).expect(MAP_STATS)).unwrap();
        let mut out = [0; VERDICT_COUNT as usize];
        for (i, o) in out.iter_mut().enumerate() {
            *o = s.get(&(i as u32), 0).unwrap().iter().sum();
        }
        out
    }

    /// Session `cid`'s counters summed over CPUs (latest last_seen), if it exists.
    pub fn session(&self, cid: [u8; 8]) -> Option<SessionStats> {
        let st: PerCpuHashMap<&MapData, RelayKey, SessionStats> =
            PerCpuHashMap::try_from(self.ebpf.map(MAP_SESSION_STATS).expect(MAP_SESSION_STATS))
                .unwrap();
        let per_cpu = st.get(&RelayKey { cid }, 0).ok()?;
        let mut sum = SessionStats::default();
        for s in per_cpu.iter() {
            sum.packets += s.packets;
            sum.bytes += s.bytes;
            sum.last_seen_ns = sum.last_seen_ns.max(s.last_seen_ns);
        }
        Some(sum)
    }

    /// One BPF_PROG_TEST_RUN of `pkt` arriving on t0: (XDP action, output frame).
    pub fn try_run(&self, pkt: &[u8]) -> std::result::Result<(u32, Vec<u8>), ProgramError> {
        self.in_namespace(|| self.run_here(pkt))
    }

    /// Runs `f` on a thread inside the fixture's namespace, where [`Fixture::run_here`]
    /// may be called (many runs for one thread switch).
    pub fn in_namespace<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.ns.run_in(f).expect("entering the namespace")
    }

    /// [`Fixture::try_run`] on the calling thread, which must be in the fixture's
    /// namespace ([`Fixture::in_namespace`]): the program's route lookups happen in
    /// the caller's.
    pub fn run_here(&self, pkt: &[u8]) -> std::result::Result<(u32, Vec<u8>), ProgramError> {
        let prog: &Xdp = self
            .ebpf
            .program(PROGRAM_NAME)
            .expect(PROGRAM_NAME)
            .try_into()
            .unwrap();
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex }: the kernel wants data_end == the input length.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(pkt.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&self.ifindex.to_ne_bytes());
        let mut out = vec![0u8; pkt.len() + 256];
        let res = prog.test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        })?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    pub fn run(&self, pkt: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(pkt).expect("BPF_PROG_TEST_RUN")
    }

    /// Runs `pkt` and asserts the action, that `verdict`'s counter moved by exactly
    /// one and no other counter moved, and that a passed packet is untouched.
    /// Returns the output frame.
    pub fn expect(&self, pkt: &[u8], action: u32, verdict: Verdict) -> Vec<u8> {
        let before = self.counters();
        let (ret, out) = self.run(pkt);
        let after = self.counters();
        assert_eq!(ret, action, "XDP action (expected verdict {verdict:?})");
        for v in Verdict::ALL {
            let i = v as usize;
            let want = before[i] + u64::from(v == verdict);
            assert_eq!(
                after[i], want,
                "counter {v:?} while expecting {verdict:?}: {} -> {}",
                before[i], after[i]
            );
        }
        if action == XDP_PASS {
            assert_eq!(
                out, pkt,
                "{verdict:?}: a passed packet must not be modified"
            );
        }
        out
    }
}

/// A QUIC short-header-shaped UDP payload: first byte 0x40, the DCID, filler.
pub fn quic_short(dcid: [u8; 8], len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len.max(9)];
    p[0] = 0x40;
    p[1..9].copy_from_slice(&dcid);
    for (i, b) in p.iter_mut().enumerate().skip(9) {
        *b = (i as u8).wrapping_mul(31);
    }
    p
}

/// A QUIC long-header Initial: 0xc0, `version`, DCID length and DCID, SCID, filler.
pub fn quic_long(version: u32, dcid: &[u8], len: usize) -> Vec<u8> {
    let mut p = vec![0xc0];
    p.extend_from_slice(&version.to_be_bytes());
    p.push(dcid.len() as u8);
    p.extend_from_slice(dcid);
    p.push(8);
    p.extend_from_slice(&[0x3c; 8]);
    p.push(0); // token length
    p.resize(len.max(p.len()), 0);
    p
}

/// Ethernet + IPv4 (as `tweak` leaves it) + UDP, lengths and both checksums computed
/// by etherparse.
pub fn udp_frame_with(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ttl: u8,
    payload: &[u8],
    tweak: impl FnOnce(&mut Ipv4Header),
) -> Vec<u8> {
    let mut ip = Ipv4Header::new(
        0,
        ttl,
        etherparse::IpNumber::UDP,
        src.ip().octets(),
        dst.ip().octets(),
    )
    .expect("ipv4 header");
    tweak(&mut ip);
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .udp(src.port(), dst.port());
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("frame");
    out
}

pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ttl: u8,
    payload: &[u8],
) -> Vec<u8> {
    udp_frame_with(src_mac, dst_mac, src, dst, ttl, payload, |_| {})
}

/// What the sender puts on the wire towards the relay.
pub fn to_relay(payload: &[u8]) -> Vec<u8> {
    udp_frame(SENDER_MAC, RELAY_MAC, SENDER, RELAY, IN_TTL, payload)
}

/// What the relay must put on the wire towards `peer`, built from scratch.
pub fn from_relay(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    peer: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    udp_frame(src_mac, dst_mac, RELAY, peer, RELAY_TTL, payload)
}

/// Checks both checksums of an Ethernet/IPv4/UDP frame from first principles.
pub fn assert_checksums_valid(frame: &[u8]) {
    let (ip, rest) = Ipv4Header::from_slice(&frame[14..]).expect("IPv4 header");
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let (udp, payload) = etherparse::UdpHeader::from_slice(rest).expect("UDP header");
    if udp.checksum != 0 {
        assert_eq!(
            udp.checksum,
            udp.calc_checksum_ipv4(&ip, payload).unwrap(),
            "UDP checksum"
        );
    }
}
