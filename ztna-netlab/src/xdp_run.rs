//! The XDP program under `BPF_PROG_TEST_RUN`, in a namespace of its own so that its
//! route lookups see a real interface, route and neighbour:
//!
//! ```text
//! ns: t0 10.250.0.1/24 (the relay's address; forwarding on)
//!     neighbour 10.250.0.2 = 02:00:00:00:00:02 (permanent): the peer
//! ```
//! Packets to the relay come "in" on t0 (ctx ingress_ifindex) from 10.250.0.9.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::Context;
use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use ztna_common::relay::{RelayConfig, RelayEntry, RelayKey, SessionStats, Verdict};

use crate::Lab;

pub const RELAY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 250, 0, 1), 4433);
pub const PEER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 250, 0, 2), 5555);
pub const SENDER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 250, 0, 9), 7777);
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const SENDER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x09];
/// The relay ID configured in `ZTNA_CONFIG` (the CIDs of [`quic_cid`] carry it).
pub const RELAY_ID: u16 = 0x0042;

pub struct XdpRun {
    pub lab: Lab,
    pub ebpf: Ebpf,
    pub ifindex: u32,
    pub relay_mac: [u8; 6],
    ns: String,
}

fn ne(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

impl XdpRun {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let mut lab = Lab::new(tag)?;
        let ns = lab.add_ns("t")?;
        lab.exec(
            &ns,
            "ip",
            &["link", "add", "t0", "type", "veth", "peer", "name", "t1"],
        )?;
        lab.exec(&ns, "ip", &["addr", "add", "10.250.0.1/24", "dev", "t0"])?;
        lab.exec(&ns, "ip", &["link", "set", "t0", "up"])?;
        lab.exec(&ns, "ip", &["link", "set", "t1", "up"])?;
        lab.exec(
            &ns,
            "ip",
            &[
                "neigh",
                "add",
                "10.250.0.2",
                "lladdr",
                "02:00:00:00:00:02",
                "dev",
                "t0",
                "nud",
                "permanent",
            ],
        )?;
        lab.exec(&ns, "sysctl", &["-qw", "net.ipv4.conf.t0.forwarding=1"])?;
        let link = lab.exec(&ns, "cat", &["/sys/class/net/t0/address"]);
        // /sys is the host's under nsenter; ask ip for the MAC instead.
        let _ = link;
        let out = lab.exec(&ns, "ip", &["-o", "link", "show", "t0"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mac_s = text
            .split("link/ether ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .context("t0 MAC")?;
        let mut relay_mac = [0u8; 6];
        for (i, b) in mac_s.split(':').enumerate().take(6) {
            relay_mac[i] = u8::from_str_radix(b, 16)?;
        }
        let idx = lab.exec(&ns, "ip", &["-o", "link", "show", "t0"])?;
        let ifindex: u32 = String::from_utf8_lossy(&idx.stdout)
            .split(':')
            .next()
            .context("ifindex")?
            .trim()
            .parse()?;
        let object = ztna_userspace::xdp::embedded_object()
            .context("no eBPF object in this build (cargo xtask build-ebpf)")?;
        let mut ebpf = Ebpf::load(object).context("loading the eBPF object")?;
        {
            let prog: &mut Xdp = ebpf
                .program_mut("ztna_relay")
                .context("ztna_relay")?
                .try_into()?;
            prog.load().context("verifier")?;
        }
        let mut run = XdpRun {
            lab,
            ebpf,
            ifindex,
            relay_mac,
            ns,
        };
        run.set_port(RELAY.port())?;
        // The relay's own address, as the loader writes it for a relay bound to it.
        let mut local: HashMap<&mut MapData, u32, u8> = HashMap::try_from(
            run.ebpf
                .map_mut(ztna_common::relay::MAP_LOCAL_ADDRS)
                .context("local addresses")?,
        )?;
        local.insert(ne(*RELAY.ip()), ztna_common::relay::LOCAL_ADDR_PRESENT, 0)?;
        Ok(run)
    }

    /// Sets the relay port (host order) with relay ID [`RELAY_ID`].
    pub fn set_port(&mut self, port: u16) -> anyhow::Result<()> {
        let mut c: Array<&mut MapData, RelayConfig> =
            Array::try_from(self.ebpf.map_mut("ZTNA_CONFIG").context("config")?)?;
        c.set(
            0,
            RelayConfig {
                port: port.to_be(),
                relay_id: RELAY_ID.to_be(),
                ..Default::default()
            },
            0,
        )?;
        Ok(())
    }

    /// Installs `cid` → send to `peer`, accept only from `expected`.
    pub fn insert(
        &mut self,
        cid: [u8; 8],
        peer: SocketAddrV4,
        expected: SocketAddrV4,
    ) -> anyhow::Result<()> {
        let key = RelayKey { cid };
        let mut relay: HashMap<&mut MapData, RelayKey, RelayEntry> =
            HashMap::try_from(self.ebpf.map_mut("ZTNA_RELAY").context("relay")?)?;
        relay.insert(
            key,
            RelayEntry {
                peer_addr: ne(*peer.ip()),
                expected_src_addr: ne(*expected.ip()),
                peer_port: peer.port().to_be(),
                expected_src_port: expected.port().to_be(),
                session_id: 1,
            },
            0,
        )?;
        let ncpu = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let mut st: PerCpuHashMap<&mut MapData, RelayKey, SessionStats> = PerCpuHashMap::try_from(
            self.ebpf
                .map_mut("ZTNA_SESSION_STATS")
                .context("session stats")?,
        )?;
        st.insert(
            key,
            PerCpuValues::try_from(vec![SessionStats::default(); ncpu])?,
            0,
        )?;
        Ok(())
    }

    /// Puts `hop` into every CPU's route cache of session `cid`.
    pub fn prime_nexthop(
        &mut self,
        cid: [u8; 8],
        hop: ztna_common::relay::NextHop,
    ) -> anyhow::Result<()> {
        self.set_nexthop(cid, hop)
    }

    /// Empties session `cid`'s route cache.
    pub fn flush_nexthop(&mut self, cid: [u8; 8]) -> anyhow::Result<()> {
        self.set_nexthop(cid, Default::default())
    }

    fn set_nexthop(
        &mut self,
        cid: [u8; 8],
        hop: ztna_common::relay::NextHop,
    ) -> anyhow::Result<()> {
        let ncpu = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let mut st: PerCpuHashMap<&mut MapData, RelayKey, SessionStats> = PerCpuHashMap::try_from(
            self.ebpf
                .map_mut("ZTNA_SESSION_STATS")
                .context("session stats")?,
        )?;
        let v = SessionStats {
            next_hop: hop,
            ..Default::default()
        };
        st.insert(RelayKey { cid }, PerCpuValues::try_from(vec![v; ncpu])?, 0)?;
        Ok(())
    }

    pub fn counter(&self, v: Verdict) -> anyhow::Result<u64> {
        let s: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("ZTNA_STATS").context("stats")?)?;
        Ok(s.get(&(v as u32), 0)?.iter().sum())
    }

    pub fn session(&self, cid: [u8; 8]) -> anyhow::Result<SessionStats> {
        let st: PerCpuHashMap<&MapData, RelayKey, SessionStats> = PerCpuHashMap::try_from(
            self.ebpf
                .map("ZTNA_SESSION_STATS")
                .context("session stats")?,
        )?;
        let mut sum = SessionStats::default();
        for s in st.get(&RelayKey { cid }, 0)?.iter() {
            sum.packets += s.packets;
            sum.bytes += s.bytes;
            sum.last_seen_ns = sum.last_seen_ns.max(s.last_seen_ns);
        }
        Ok(sum)
    }

    /// Runs the program on `pkt` (`repeat` times) inside the namespace; returns
    /// (XDP action, output packet, average duration per run).
    pub fn run(&mut self, pkt: &[u8], repeat: u32) -> anyhow::Result<(u32, Vec<u8>, Duration)> {
        let ns_name = self.ns.clone();
        let ifindex = self.ifindex;
        let prog: &mut Xdp = self
            .ebpf
            .program_mut("ztna_relay")
            .context("ztna_relay")?
            .try_into()?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(pkt.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; pkt.len() + 256];
        // The program looks up routes in the caller's namespace: run from a thread
        // that entered it.
        let result = std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<_> {
                crate::enter_netns(&ns_name)?;
                let mut opts = TestRunOptions::new();
                opts.data_in = Some(pkt);
                opts.data_out = Some(&mut out);
                opts.ctx_in = Some(&ctx);
                opts.repeat = repeat;
                Ok(prog.test_run(opts)?)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("test-run thread panicked"))?
        })?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out, result.duration))
    }
}

/// A QUIC-short-header-shaped UDP payload: first byte 0x40, the DCID, filler.
pub fn quic_short(cid: [u8; 8], len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len.max(9)];
    p[0] = 0x40;
    p[1..9].copy_from_slice(&cid);
    for (i, b) in p.iter_mut().enumerate().skip(9) {
        *b = i as u8;
    }
    p
}

/// Ethernet + IPv4 + UDP frame with valid checksums (etherparse).
pub fn frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ttl: u8,
    payload: &[u8],
) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.ip().octets(), dst.ip().octets(), ttl)
        .udp(src.port(), dst.port());
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("frame");
    out
}

/// A relay CID of relay [`RELAY_ID`] for tests and benchmarks, distinguished by `n`.
pub fn quic_cid(n: u8) -> [u8; 8] {
    ztna_common::relay::relay_cid(RELAY_ID, [n, 0, 0, 0, n])
}
