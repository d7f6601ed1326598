//! The kernel half of the relay table: `ZTNA_RELAY`/`ZTNA_SESSION_STATS` (IPv4)
//! and `ZTNA_RELAY6`/`ZTNA_SESSION_STATS6` (IPv6), opened from their pins.

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::Path;

use anyhow::Context;
use aya::maps::{HashMap, MapData, PerCpuHashMap, PerCpuValues};
use ztna_common::frames::Cid;
use ztna_common::relay::{
    MAP_RELAY, MAP_RELAY6, MAP_SESSION_STATS, MAP_SESSION_STATS6, RelayEntry, RelayEntry6,
    RelayKey, SessionStats, SessionStats6,
};

use super::pin_path;
use crate::relay::KernelTable;

/// The forwarding and session-stats maps (IPv4 and IPv6), opened from their pins.
pub struct XdpTable {
    relay: HashMap<MapData, RelayKey, RelayEntry>,
    sessions: PerCpuHashMap<MapData, RelayKey, SessionStats>,
    relay6: HashMap<MapData, RelayKey, RelayEntry6>,
    sessions6: PerCpuHashMap<MapData, RelayKey, SessionStats6>,
    ncpu: usize,
}

/// One kernel forwarding entry with its counters summed over CPUs (for `ztna
/// sessions`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelEntry {
    pub cid: Cid,
    pub session_id: u32,
    pub peer: SocketAddr,
    pub expected: SocketAddr,
    pub packets: u64,
    pub bytes: u64,
    /// CLOCK_MONOTONIC ns of the last forwarded packet; 0: none yet.
    pub last_seen_ns: u64,
}

pub(super) fn open_pinned(dir: &Path, name: &str) -> anyhow::Result<aya::maps::Map> {
    let path = pin_path(dir, name);
    let data =
        MapData::from_pin(&path).with_context(|| format!("opening pinned {}", path.display()))?;
    Ok(aya::maps::Map::from_map_data(data)?)
}

impl XdpTable {
    /// Opens the maps pinned in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        Ok(XdpTable {
            relay: HashMap::try_from(open_pinned(dir, MAP_RELAY)?)?,
            sessions: PerCpuHashMap::try_from(open_pinned(dir, MAP_SESSION_STATS)?)?,
            relay6: HashMap::try_from(open_pinned(dir, MAP_RELAY6)?)?,
            sessions6: PerCpuHashMap::try_from(open_pinned(dir, MAP_SESSION_STATS6)?)?,
            ncpu: aya::util::nr_cpus().map_err(|(_, e)| e)?,
        })
    }

    /// Every entry, IPv4 and IPv6, with its summed counters.
    pub fn entries(&self) -> Vec<KernelEntry> {
        let mut out = Vec::new();
        for (k, e) in self.relay.iter().flatten() {
            let (packets, bytes, last_seen_ns) = self.stats(&k.cid).unwrap_or_default();
            let addr = |a: u32, p: u16| {
                SocketAddr::V4(SocketAddrV4::new(a.to_ne_bytes().into(), u16::from_be(p)))
            };
            out.push(KernelEntry {
                cid: k.cid,
                session_id: e.session_id,
                peer: addr(e.peer_addr, e.peer_port),
                expected: addr(e.expected_src_addr, e.expected_src_port),
                packets,
                bytes,
                last_seen_ns,
            });
        }
        for (k, e) in self.relay6.iter().flatten() {
            let (packets, bytes, last_seen_ns) = self.stats(&k.cid).unwrap_or_default();
            let addr = |a: [u8; 16], p: u16| {
                SocketAddr::V6(SocketAddrV6::new(a.into(), u16::from_be(p), 0, 0))
            };
            out.push(KernelEntry {
                cid: k.cid,
                session_id: e.session_id,
                peer: addr(e.peer_addr, e.peer_port),
                expected: addr(e.expected_src_addr, e.expected_src_port),
                packets,
                bytes,
                last_seen_ns,
            });
        }
        out
    }

    fn insert4(
        &mut self,
        key: RelayKey,
        (pa, pp): (u32, u16),
        (ea, ep): (u32, u16),
        session: u32,
    ) -> Result<(), String> {
        zeroed_stats(&mut self.sessions, key, self.ncpu)?;
        let entry = RelayEntry {
            peer_addr: pa,
            expected_src_addr: ea,
            peer_port: pp,
            expected_src_port: ep,
            session_id: session,
        };
        self.relay.insert(key, entry, 0).map_err(|e| e.to_string())
    }

    fn insert6(
        &mut self,
        key: RelayKey,
        peer: SocketAddrV6,
        expected: SocketAddrV6,
        session: u32,
    ) -> Result<(), String> {
        zeroed_stats(&mut self.sessions6, key, self.ncpu)?;
        let entry = RelayEntry6 {
            peer_addr: peer.ip().octets(),
            expected_src_addr: expected.ip().octets(),
            peer_port: peer.port().to_be(),
            expected_src_port: expected.port().to_be(),
            session_id: session,
        };
        self.relay6.insert(key, entry, 0).map_err(|e| e.to_string())
    }
}

/// Gives `key` zeroed per-CPU session counters unless it has some (a re-inserted
/// entry, e.g. after a sender moved, keeps its counts).
fn zeroed_stats<V: aya::Pod + Default + Clone>(
    map: &mut PerCpuHashMap<MapData, RelayKey, V>,
    key: RelayKey,
    ncpu: usize,
) -> Result<(), String> {
    if map.get(&key, 0).is_ok() {
        return Ok(());
    }
    let zero = PerCpuValues::try_from(vec![V::default(); ncpu]).map_err(|e| e.to_string())?;
    map.insert(key, zero, 0).map_err(|e| e.to_string())
}

/// An IPv4 socket address (or an IPv4-mapped IPv6 one) as the maps hold it.
fn v4(a: SocketAddr) -> Option<(u32, u16)> {
    match a {
        SocketAddr::V4(a) => Some((u32::from_ne_bytes(a.ip().octets()), a.port().to_be())),
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .map(|ip| (u32::from_ne_bytes(ip.octets()), a.port().to_be())),
    }
}

/// A genuine IPv6 socket address (not IPv4-mapped).
fn v6(a: SocketAddr) -> Option<SocketAddrV6> {
    match a {
        SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_none() => Some(a),
        _ => None,
    }
}

impl KernelTable for XdpTable {
    fn insert(
        &mut self,
        cid: &Cid,
        peer: SocketAddr,
        expected: SocketAddr,
        session: u32,
    ) -> Result<(), String> {
        let key = RelayKey { cid: *cid };
        // A CID lives in the map of its entry's family only: a client that changed
        // family leaves nothing behind in the other one.
        if let (Some(p), Some(e)) = (v4(peer), v4(expected)) {
            let _ = self.relay6.remove(&key);
            let _ = self.sessions6.remove(&key);
            return self.insert4(key, p, e, session);
        }
        if let (Some(p), Some(e)) = (v6(peer), v6(expected)) {
            let _ = self.relay.remove(&key);
            let _ = self.sessions.remove(&key);
            return self.insert6(key, p, e, session);
        }
        Err(format!(
            "{peer} and {expected} are of different address families: the entry stays in userspace"
        ))
    }

    fn remove(&mut self, cid: &Cid) {
        let key = RelayKey { cid: *cid };
        let _ = self.relay.remove(&key);
        let _ = self.sessions.remove(&key);
        let _ = self.relay6.remove(&key);
        let _ = self.sessions6.remove(&key);
    }

    fn stats(&self, cid: &Cid) -> Option<(u64, u64, u64)> {
        let key = RelayKey { cid: *cid };
        if let Ok(per_cpu) = self.sessions.get(&key, 0) {
            return Some(per_cpu.iter().fold((0, 0, 0), |(p, b, l), s| {
                (p + s.packets, b + s.bytes, l.max(s.last_seen_ns))
            }));
        }
        let per_cpu = self.sessions6.get(&key, 0).ok()?;
        Some(per_cpu.iter().fold((0, 0, 0), |(p, b, l), s| {
            (p + s.packets, b + s.bytes, l.max(s.last_seen_ns))
        }))
    }
}
