//! Relay sessions and the forwarding table of the intermediate.
//!
//! A session joins one agent and one connector of a service through two relay CIDs
//! (`ztna_common::relay`). Each CID has a forwarding entry: packets whose DCID is the
//! connector's CID come from the agent and go to the connector, and the other way
//! round. The table lives here in userspace (the userspace forwarder serves it) and,
//! when XDP is attached, is mirrored into the kernel map through [`KernelTable`].
//!
//! Addresses are those of the endpoints' control connections: agents and connectors
//! use one UDP socket for everything, so the NAT mapping the intermediate observed on
//! the control connection is the one relayed packets use.
//!
//! The entries themselves live in a [`ForwardMap`] that the table shares with the
//! intermediate's forwarder threads (`forwarder_threads` > 1): the table (the
//! intermediate's loop) adds, moves and removes entries under its write lock; a
//! forwarder looks entries up under its read lock, once per receive batch
//! ([`ForwardMap::lookup`]), and counts into the entries' atomics.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};
use ztna_common::frames::{Cid, RefusedStatus};
use ztna_common::relay::{RELAY_CID_LEN, RELAY_CID_MARKER, RELAY_NONCE_OFFSET, relay_cid};

use crate::flows::ClientId;

/// A connector has this long to accept an offered session.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(3);
/// A session with no forwarded packet for this long is removed. Data connections
/// send keepalives well within it.
pub const SESSION_IDLE: Duration = Duration::from_secs(60);
/// Relay sessions one agent may hold at once, so one client cannot fill the global
/// table (an agent needs one per service it uses).
pub const MAX_SESSIONS_PER_AGENT: usize = 64;

/// The kernel side of the forwarding table (the XDP program's map).
pub trait KernelTable: Send {
    /// Installs or replaces the entry for `cid`. `peer` and `expected` are of one
    /// address family (IPv4-mapped IPv6 addresses count as IPv4): the relay table
    /// keeps entries that mix families in userspace and never offers them.
    fn insert(
        &mut self,
        cid: &Cid,
        peer: SocketAddr,
        expected: SocketAddr,
        session: u32,
    ) -> Result<(), String>;
    fn remove(&mut self, cid: &Cid);
    /// (packets, bytes, last seen as CLOCK_MONOTONIC ns) summed over CPUs.
    fn stats(&self, cid: &Cid) -> Option<(u64, u64, u64)>;
}

#[derive(Clone, Debug)]
pub struct RelaySession {
    pub id: u32,
    pub service: String,
    pub agent: ClientId,
    pub connector: ClientId,
    pub request_id: u32,
    pub agent_cid: Cid,
    pub connector_cid: Cid,
    pub accepted: bool,
    pub created: Instant,
    /// Configured with `--static-session`: never expires, owned by no client.
    pub is_static: bool,
}

/// Client id of static sessions' endpoints (real clients start at 1).
pub const STATIC_CLIENT: ClientId = 0;

/// A forwarding entry as [`RelayTable::entry`] returns it (a copy).
#[derive(Clone, Debug)]
pub struct Forward {
    pub peer: SocketAddr,
    pub expected: SocketAddr,
    pub session: u32,
    /// Client whose packets carry this CID as DCID.
    pub sender: ClientId,
    /// Client the packets go to.
    pub receiver: ClientId,
    /// Forwarded in userspace.
    pub packets: u64,
    pub bytes: u64,
    pub last_seen: Instant,
}

/// A forwarding entry in the shared map. Addresses change only under the map's write
/// lock; the counters are atomics, so forwarders count under the read lock.
#[derive(Debug)]
struct Entry {
    peer: SocketAddr,
    expected: SocketAddr,
    session: u32,
    sender: ClientId,
    receiver: ClientId,
    packets: AtomicU64,
    bytes: AtomicU64,
    /// The last forwarded packet (or the entry's creation), ns after the map's epoch.
    last_seen_ns: AtomicU64,
}

/// The forwarding entries by relay CID, shared by the [`RelayTable`] and the
/// forwarder threads (see the module docs).
#[derive(Debug)]
pub struct ForwardMap {
    entries: RwLock<HashMap<Cid, Entry>>,
    /// Origin of the entries' `last_seen_ns`.
    epoch: Instant,
}

/// Read access to a [`ForwardMap`] for a batch of lookups (one lock for the batch;
/// drop it before sending, so that the loop's changes do not wait for the send).
pub struct Lookup<'a> {
    entries: RwLockReadGuard<'a, HashMap<Cid, Entry>>,
    epoch: Instant,
}

impl ForwardMap {
    fn new() -> Self {
        // An epoch in the past, so that times callers took just before the map was
        // made (tests do) still count from it rather than saturate to it.
        let now = Instant::now();
        ForwardMap {
            entries: RwLock::new(HashMap::new()),
            epoch: now.checked_sub(Duration::from_secs(60)).unwrap_or(now),
        }
    }

    /// Lookups under one read lock. A forwarder that panicked holding the lock left
    /// the map consistent (it only counts), so poisoning is ignored.
    pub fn lookup(&self) -> Lookup<'_> {
        Lookup {
            entries: self.entries.read().unwrap_or_else(PoisonError::into_inner),
            epoch: self.epoch,
        }
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<Cid, Entry>> {
        self.entries.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn ns_since_epoch(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

impl Lookup<'_> {
    /// Userspace forwarding decision for one packet; counts it into its entry when
    /// it is to be sent.
    pub fn forward(&self, cid: &Cid, from: SocketAddr, len: usize, now: Instant) -> ForwardResult {
        let Some(f) = self.entries.get(cid) else {
            return ForwardResult::Unknown;
        };
        if f.expected != from {
            return ForwardResult::Mismatch { sender: f.sender };
        }
        f.packets.fetch_add(1, Ordering::Relaxed);
        f.bytes.fetch_add(len as u64, Ordering::Relaxed);
        let ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        f.last_seen_ns.fetch_max(ns, Ordering::Relaxed);
        ForwardResult::Send(f.peer)
    }

    fn snapshot(&self, cid: &Cid) -> Option<Forward> {
        let f = self.entries.get(cid)?;
        Some(Forward {
            peer: f.peer,
            expected: f.expected,
            session: f.session,
            sender: f.sender,
            receiver: f.receiver,
            packets: f.packets.load(Ordering::Relaxed),
            bytes: f.bytes.load(Ordering::Relaxed),
            last_seen: self.epoch + Duration::from_nanos(f.last_seen_ns.load(Ordering::Relaxed)),
        })
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum ForwardResult {
    Send(SocketAddr),
    Unknown,
    /// From another address than expected; `sender` is the client that should own it.
    Mismatch {
        sender: ClientId,
    },
}

pub struct RelayTable {
    sessions: HashMap<u32, RelaySession>,
    fwd: Arc<ForwardMap>,
    /// Sessions of each client (agent or connector side), so that removing a client
    /// or moving it costs its own sessions, not a scan of the table.
    by_client: HashMap<ClientId, HashSet<u32>>,
    kernel: Option<Box<dyn KernelTable>>,
    /// Kernel entries removed because updating them after a move failed.
    pub kernel_update_failures: u64,
    /// Entries kept from the kernel table because their peer and expected sender
    /// are of different address families (an IPv4 and an IPv6 client).
    pub kernel_mixed_family: u64,
    /// This relay's ID, bytes 1..=2 of every relay CID it makes.
    relay_id: u16,
    next_session: u32,
    max_entries: usize,
    rng: SystemRandom,
}

impl RelayTable {
    /// A table whose relay CIDs carry `relay_id`.
    pub fn new(max_entries: usize, relay_id: u16) -> Self {
        RelayTable {
            sessions: HashMap::new(),
            fwd: Arc::new(ForwardMap::new()),
            by_client: HashMap::new(),
            kernel: None,
            kernel_update_failures: 0,
            kernel_mixed_family: 0,
            relay_id,
            next_session: 1,
            max_entries,
            rng: SystemRandom::new(),
        }
    }

    /// This relay's ID (in its CIDs' bytes 1..=2).
    pub fn relay_id(&self) -> u16 {
        self.relay_id
    }

    /// The forwarding entries, for forwarder threads.
    pub fn forward_map(&self) -> &Arc<ForwardMap> {
        &self.fwd
    }

    pub fn set_kernel(&mut self, kernel: Box<dyn KernelTable>) {
        // Entries made before attaching must reach the kernel too.
        let mut k = kernel;
        for (cid, f) in self.fwd.lookup().entries.iter() {
            if !same_family(f.peer, f.expected) {
                self.kernel_mixed_family += 1;
                continue;
            }
            if let Err(e) = k.insert(cid, f.peer, f.expected, f.session) {
                tracing::debug!("kernel table: {e}");
            }
        }
        self.kernel = Some(k);
    }

    pub fn has_kernel(&self) -> bool {
        self.kernel.is_some()
    }

    pub fn sessions(&self) -> impl Iterator<Item = &RelaySession> {
        self.sessions.values()
    }

    pub fn session(&self, id: u32) -> Option<&RelaySession> {
        self.sessions.get(&id)
    }

    pub fn entry(&self, cid: &Cid) -> Option<Forward> {
        self.fwd.lookup().snapshot(cid)
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// A new relay CID: marker, this relay's ID, 40 bits from the CSPRNG (see
    /// `ztna_common::relay` for the layout).
    fn new_cid(&self) -> Cid {
        loop {
            let mut nonce = [0u8; RELAY_CID_LEN - RELAY_NONCE_OFFSET];
            let _ = self.rng.fill(&mut nonce);
            let c = relay_cid(self.relay_id, nonce);
            if !self.fwd.lookup().entries.contains_key(&c) {
                return c;
            }
        }
    }

    fn install(&mut self, cid: Cid, f: Entry) {
        if let Some(k) = self.kernel.as_mut() {
            if !same_family(f.peer, f.expected) {
                self.kernel_mixed_family += 1;
            } else if let Err(e) = k.insert(&cid, f.peer, f.expected, f.session) {
                tracing::debug!("kernel table: {e}");
            }
        }
        self.fwd.write().insert(cid, f);
    }

    /// Allocates a session and installs both forwarding entries.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &mut self,
        agent: ClientId,
        agent_addr: SocketAddr,
        connector: ClientId,
        connector_addr: SocketAddr,
        service: &str,
        request_id: u32,
        now: Instant,
    ) -> Result<RelaySession, RefusedStatus> {
        if self.fwd.lookup().entries.len() + 2 > self.max_entries {
            return Err(RefusedStatus::TableFull);
        }
        if agent != STATIC_CLIENT
            && self
                .client_sessions(agent)
                .filter(|s| s.agent == agent)
                .count()
                >= MAX_SESSIONS_PER_AGENT
        {
            return Err(RefusedStatus::TooManySessions);
        }
        // The counter wraps (u32, 0 skipped); an id still in use is skipped, or the
        // new session would replace a live one and orphan its kernel entries. The
        // table holds far fewer sessions than ids, so the search ends quickly.
        let id = loop {
            let id = self.next_session;
            self.next_session = self.next_session.wrapping_add(1).max(1);
            if !self.sessions.contains_key(&id) {
                break id;
            }
        };
        let agent_cid = self.new_cid();
        let connector_cid = loop {
            let c = self.new_cid();
            if c != agent_cid {
                break c;
            }
        };
        let created_ns = self.fwd.ns_since_epoch(now);
        let entry = |peer, expected, sender, receiver| Entry {
            peer,
            expected,
            session: id,
            sender,
            receiver,
            packets: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            last_seen_ns: AtomicU64::new(created_ns),
        };
        self.install(
            connector_cid,
            entry(connector_addr, agent_addr, agent, connector),
        );
        self.install(
            agent_cid,
            entry(agent_addr, connector_addr, connector, agent),
        );
        let s = RelaySession {
            id,
            service: service.to_string(),
            agent,
            connector,
            request_id,
            agent_cid,
            connector_cid,
            accepted: false,
            created: now,
            is_static: false,
        };
        self.sessions.insert(id, s.clone());
        for c in [agent, connector] {
            self.by_client.entry(c).or_default().insert(id);
        }
        Ok(s)
    }

    /// A session between two fixed addresses, for benchmarks and path diagnostics:
    /// packets from `a` with DCID `connector_cid` go to `b`, packets from `b` with
    /// DCID `agent_cid` go to `a`.
    pub fn create_static(
        &mut self,
        a: SocketAddr,
        b: SocketAddr,
        now: Instant,
    ) -> Result<RelaySession, RefusedStatus> {
        let mut s = self.create(STATIC_CLIENT, a, STATIC_CLIENT, b, "static", 0, now)?;
        s.accepted = true;
        s.is_static = true;
        self.sessions.insert(s.id, s.clone());
        Ok(s)
    }

    /// The connector accepted; returns the session for the READY answer.
    pub fn accept(&mut self, connector: ClientId, session_id: u32) -> Option<RelaySession> {
        let s = self.sessions.get_mut(&session_id)?;
        if s.connector != connector || s.accepted {
            return None;
        }
        s.accepted = true;
        Some(s.clone())
    }

    pub fn close(&mut self, session_id: u32) -> Option<RelaySession> {
        let s = self.sessions.remove(&session_id)?;
        for c in [s.agent, s.connector] {
            if let Some(set) = self.by_client.get_mut(&c) {
                set.remove(&session_id);
                if set.is_empty() {
                    self.by_client.remove(&c);
                }
            }
        }
        for cid in [s.agent_cid, s.connector_cid] {
            self.fwd.write().remove(&cid);
            if let Some(k) = self.kernel.as_mut() {
                k.remove(&cid);
            }
        }
        Some(s)
    }

    /// Removes every session of a client that went away.
    pub fn remove_client(&mut self, id: ClientId) -> Vec<RelaySession> {
        let ids: Vec<u32> = self
            .client_sessions(id)
            .filter(|s| !s.is_static)
            .map(|s| s.id)
            .collect();
        ids.into_iter().filter_map(|i| self.close(i)).collect()
    }

    /// The sessions `id` is an endpoint of.
    pub fn client_sessions(&self, id: ClientId) -> impl Iterator<Item = &RelaySession> {
        self.by_client
            .get(&id)
            .into_iter()
            .flatten()
            .filter_map(|sid| self.sessions.get(sid))
    }

    /// A client's control connection now comes from `addr`: its relayed packets will
    /// too, and packets for it must go there.
    pub fn client_moved(&mut self, id: ClientId, addr: SocketAddr) {
        let cids: Vec<Cid> = self
            .client_sessions(id)
            .flat_map(|s| [s.agent_cid, s.connector_cid])
            .collect();
        // The new addresses, for the kernel table after the lock is released.
        let mut changed = Vec::new();
        {
            let mut fwd = self.fwd.write();
            for cid in cids {
                let Some(f) = fwd.get_mut(&cid) else {
                    continue;
                };
                let mut moved = false;
                if f.receiver == id && f.peer != addr {
                    f.peer = addr;
                    moved = true;
                }
                if f.sender == id && f.expected != addr {
                    f.expected = addr;
                    moved = true;
                }
                if moved {
                    changed.push((cid, f.peer, f.expected, f.session));
                }
            }
        }
        let Some(k) = self.kernel.as_mut() else {
            return;
        };
        for (cid, peer, expected, session) in changed {
            if !same_family(peer, expected) {
                // One side moved to the other family: userspace forwards from now
                // on, and the kernel entry (naming the old addresses) must go.
                k.remove(&cid);
                self.kernel_mixed_family += 1;
                continue;
            }
            if let Err(e) = k.insert(&cid, peer, expected, session) {
                // The kernel entry still names the old addresses: left there, the
                // XDP program would go on sending this session's packets to where
                // the client was, and accept them from there. Without it the packets
                // reach userspace, which has the new addresses.
                k.remove(&cid);
                self.kernel_update_failures += 1;
                tracing::warn!(
                    "kernel table: updating moved entry of session {session} failed ({e}); removed it, userspace forwards"
                );
            }
        }
    }

    /// Userspace forwarding decision for one packet (see [`Lookup::forward`]).
    pub fn forward(&self, cid: &Cid, from: SocketAddr, len: usize, now: Instant) -> ForwardResult {
        self.fwd.lookup().forward(cid, from, len, now)
    }

    /// Expires offers nobody accepted and sessions nothing used.
    /// Returns (unaccepted offers, idle sessions).
    pub fn expire(
        &mut self,
        now: Instant,
        kernel_now_ns: Option<u64>,
    ) -> (Vec<RelaySession>, Vec<RelaySession>) {
        let mut unaccepted = Vec::new();
        let mut idle = Vec::new();
        let ids: Vec<u32> = self.sessions.keys().copied().collect();
        for id in ids {
            let s = &self.sessions[&id];
            if s.is_static {
                continue;
            }
            if !s.accepted {
                if now.saturating_duration_since(s.created) > ACCEPT_TIMEOUT {
                    unaccepted.extend(self.close(id));
                }
                continue;
            }
            let idle_for = [s.agent_cid, s.connector_cid]
                .iter()
                .map(|cid| self.idle_for(cid, now, kernel_now_ns))
                .min()
                .unwrap_or_default();
            if idle_for > SESSION_IDLE {
                idle.extend(self.close(id));
            }
        }
        (unaccepted, idle)
    }

    fn idle_for(&self, cid: &Cid, now: Instant, kernel_now_ns: Option<u64>) -> Duration {
        let user = self.entry(cid).map_or(Duration::MAX, |f| {
            now.saturating_duration_since(f.last_seen)
        });
        let kernel = match (
            self.kernel.as_ref().and_then(|k| k.stats(cid)),
            kernel_now_ns,
        ) {
            (Some((p, _, last)), Some(know)) if p > 0 => {
                Duration::from_nanos(know.saturating_sub(last))
            }
            _ => Duration::MAX,
        };
        user.min(kernel)
    }

    /// Counters of a forwarding entry: userspace and kernel, summed.
    pub fn counters(&self, cid: &Cid) -> (u64, u64, u64, u64) {
        let f = self.entry(cid);
        let (kp, kb) = self
            .kernel
            .as_ref()
            .and_then(|k| k.stats(cid))
            .map_or((0, 0), |(p, b, _)| (p, b));
        (
            f.as_ref().map_or(0, |f| f.packets),
            f.as_ref().map_or(0, |f| f.bytes),
            kp,
            kb,
        )
    }
}

/// Whether `a` and `b` are of one address family, IPv4-mapped IPv6 addresses
/// counting as IPv4 (a dual-stack socket reports IPv4 peers that way).
pub fn same_family(a: SocketAddr, b: SocketAddr) -> bool {
    let is_v4 = |s: SocketAddr| match s.ip() {
        std::net::IpAddr::V4(_) => true,
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
    };
    is_v4(a) == is_v4(b)
}

/// The relay CID of a received packet, if its DCID is one (of any relay: the
/// caller compares its relay ID).
pub fn relay_cid_of(pkt: &[u8]) -> Option<Cid> {
    let d = ztna_core::data::dcid_of(pkt)?;
    if d[0] != RELAY_CID_MARKER {
        return None;
    }
    let mut c = [0u8; RELAY_CID_LEN];
    c.copy_from_slice(d);
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn create_forward_mismatch_move_close() {
        let now = Instant::now();
        let mut t = RelayTable::new(100, 0x0102);
        let s = t
            .create(
                1,
                a("192.0.2.1:1000"),
                2,
                a("198.51.100.1:2000"),
                "echo",
                7,
                now,
            )
            .unwrap();
        assert_eq!(s.agent_cid[0], RELAY_CID_MARKER);
        // Both CIDs carry the table's relay ID in bytes 1..=2.
        for c in [s.agent_cid, s.connector_cid] {
            assert_eq!(ztna_common::relay::relay_id_of(&c), 0x0102);
        }
        assert_ne!(s.agent_cid, s.connector_cid);
        // agent → connector
        assert_eq!(
            t.forward(&s.connector_cid, a("192.0.2.1:1000"), 100, now),
            ForwardResult::Send(a("198.51.100.1:2000"))
        );
        // connector → agent
        assert_eq!(
            t.forward(&s.agent_cid, a("198.51.100.1:2000"), 100, now),
            ForwardResult::Send(a("192.0.2.1:1000"))
        );
        assert_eq!(
            t.forward(&s.connector_cid, a("192.0.2.9:1000"), 100, now),
            ForwardResult::Mismatch { sender: 1 }
        );
        t.client_moved(1, a("192.0.2.9:1000"));
        assert_eq!(
            t.forward(&s.connector_cid, a("192.0.2.9:1000"), 100, now),
            ForwardResult::Send(a("198.51.100.1:2000"))
        );
        assert_eq!(
            t.forward(&s.agent_cid, a("198.51.100.1:2000"), 100, now),
            ForwardResult::Send(a("192.0.2.9:1000"))
        );
        assert_eq!(t.counters(&s.connector_cid).0, 2);
        assert!(
            t.accept(3, s.id).is_none(),
            "only the offered connector accepts"
        );
        assert!(t.accept(2, s.id).is_some());
        assert_eq!(t.remove_client(2).len(), 1);
        assert_eq!(
            t.forward(&s.agent_cid, a("198.51.100.1:2000"), 1, now),
            ForwardResult::Unknown
        );
    }

    #[test]
    fn unaccepted_offers_and_idle_sessions_expire() {
        let now = Instant::now();
        let mut t = RelayTable::new(100, 0x0102);
        let s1 = t
            .create(1, a("192.0.2.1:1"), 2, a("192.0.2.2:2"), "x", 1, now)
            .unwrap();
        let s2 = t
            .create(1, a("192.0.2.1:1"), 2, a("192.0.2.2:2"), "x", 2, now)
            .unwrap();
        t.accept(2, s2.id).unwrap();
        let (un, idle) = t.expire(now + ACCEPT_TIMEOUT + Duration::from_millis(1), None);
        assert_eq!(un.iter().map(|s| s.id).collect::<Vec<_>>(), vec![s1.id]);
        assert!(idle.is_empty());
        let (_, idle) = t.expire(now + SESSION_IDLE + Duration::from_secs(1), None);
        assert_eq!(idle.len(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn removing_clients_costs_their_own_sessions_not_a_table_scan() {
        let now = Instant::now();
        let n = 30_000u64;
        let mut t = RelayTable::new(2 * n as usize, 0x0102);
        for i in 0..n {
            let (agent, connector) = (2 * i + 1, 2 * i + 2);
            t.create(
                agent,
                a("192.0.2.1:1"),
                connector,
                a("192.0.2.2:2"),
                "x",
                1,
                now,
            )
            .unwrap();
        }
        // Quadratic cleanup (a scan of the table per client) takes seconds here even
        // with optimizations; per-client cost takes milliseconds.
        let start = Instant::now();
        t.client_moved(1, a("192.0.2.9:9"));
        for i in 0..n {
            assert_eq!(t.remove_client(2 * i + 1).len(), 1);
            assert!(t.remove_client(2 * i + 2).is_empty());
        }
        let took = start.elapsed();
        assert!(t.is_empty() && t.fwd.lookup().entries.is_empty() && t.by_client.is_empty());
        assert!(
            took < Duration::from_secs(2),
            "removing {n} clients took {took:?}"
        );
    }

    #[test]
    fn session_ids_wrap_around_live_sessions() {
        let now = Instant::now();
        let mut t = RelayTable::new(100, 0x0102);
        let s1 = t
            .create(1, a("192.0.2.1:1"), 2, a("192.0.2.2:2"), "x", 1, now)
            .unwrap();
        assert_eq!(s1.id, 1);
        t.next_session = u32::MAX;
        let last = t
            .create(1, a("192.0.2.1:1"), 2, a("192.0.2.2:2"), "x", 2, now)
            .unwrap();
        assert_eq!(last.id, u32::MAX);
        // The counter wraps past 0 to 1, which is live: the next free id is 2.
        let wrapped = t
            .create(1, a("192.0.2.1:1"), 2, a("192.0.2.2:2"), "x", 3, now)
            .unwrap();
        assert_eq!(wrapped.id, 2);
        assert_eq!(t.len(), 3);
        assert_eq!(t.session(1).unwrap().agent_cid, s1.agent_cid);
        // The first session's entries still name it, and closing it removes them.
        assert_eq!(t.entry(&s1.agent_cid).unwrap().session, 1);
        t.close(1).unwrap();
        assert!(t.entry(&s1.agent_cid).is_none() && t.entry(&s1.connector_cid).is_none());
        assert!(t.entry(&wrapped.agent_cid).is_some());
    }

    #[test]
    fn one_agent_cannot_fill_the_table() {
        let now = Instant::now();
        let mut t = RelayTable::new(10_000, 0x0102);
        let mut ids = Vec::new();
        for i in 0..MAX_SESSIONS_PER_AGENT as u32 {
            ids.push(
                t.create(1, a("192.0.2.1:1"), 2, a("192.0.2.2:2"), "x", i, now)
                    .unwrap()
                    .id,
            );
        }
        assert_eq!(
            t.create(1, a("192.0.2.1:1"), 2, a("192.0.2.2:2"), "x", 99, now)
                .unwrap_err(),
            RefusedStatus::TooManySessions
        );
        // Other agents (of the same connector) are not affected...
        t.create(3, a("192.0.2.3:3"), 2, a("192.0.2.2:2"), "x", 1, now)
            .unwrap();
        // ...and a closed session frees a place.
        t.close(ids[0]).unwrap();
        t.create(1, a("192.0.2.1:1"), 2, a("192.0.2.2:2"), "x", 100, now)
            .unwrap();
    }

    #[test]
    fn table_full() {
        let now = Instant::now();
        let mut t = RelayTable::new(2, 0x0102);
        t.create(1, a("192.0.2.1:1"), 2, a("192.0.2.2:2"), "x", 1, now)
            .unwrap();
        assert_eq!(
            t.create(1, a("192.0.2.1:1"), 2, a("192.0.2.2:2"), "x", 2, now)
                .unwrap_err(),
            RefusedStatus::TableFull
        );
    }

    #[test]
    fn relay_cid_detection() {
        let mut short = vec![0x40u8, RELAY_CID_MARKER, 1, 2, 3, 4, 5, 6, 7, 0, 0];
        assert_eq!(
            relay_cid_of(&short),
            Some([RELAY_CID_MARKER, 1, 2, 3, 4, 5, 6, 7])
        );
        short[1] = 0;
        assert_eq!(relay_cid_of(&short), None);
        let long = [
            0xc0u8,
            0,
            0,
            0,
            1,
            8,
            RELAY_CID_MARKER,
            1,
            2,
            3,
            4,
            5,
            6,
            7,
            0,
        ];
        assert!(relay_cid_of(&long).is_some());
        let long16 = [
            0xc0u8,
            0,
            0,
            0,
            1,
            16,
            RELAY_CID_MARKER,
            1,
            2,
            3,
            4,
            5,
            6,
            7,
            0,
        ];
        assert_eq!(relay_cid_of(&long16), None);
        assert_eq!(relay_cid_of(&[0x40, RELAY_CID_MARKER]), None);
    }

    /// Records what reaches the kernel table.
    #[derive(Default)]
    struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<Cid>>>);

    impl KernelTable for Recorder {
        fn insert(
            &mut self,
            cid: &Cid,
            _: SocketAddr,
            _: SocketAddr,
            _: u32,
        ) -> Result<(), String> {
            self.0.lock().unwrap().push(*cid);
            Ok(())
        }
        fn remove(&mut self, cid: &Cid) {
            self.0.lock().unwrap().retain(|c| c != cid);
        }
        fn stats(&self, _: &Cid) -> Option<(u64, u64, u64)> {
            None
        }
    }

    #[test]
    fn entries_mixing_address_families_stay_in_userspace() {
        let now = Instant::now();
        let mut t = RelayTable::new(100, 7);
        let live = Recorder::default();
        let seen = live.0.clone();
        t.set_kernel(Box::new(live));
        let v6 = t
            .create(
                1,
                a("[2001:db8::1]:1000"),
                2,
                a("[2001:db8::2]:2000"),
                "echo",
                1,
                now,
            )
            .unwrap();
        assert_eq!(seen.lock().unwrap().len(), 2, "IPv6 pairs go to the kernel");
        // A mapped IPv4 address and a plain one are one family.
        t.create(
            3,
            a("[::ffff:192.0.2.1]:1000"),
            4,
            a("192.0.2.2:2000"),
            "echo",
            2,
            now,
        )
        .unwrap();
        assert_eq!(seen.lock().unwrap().len(), 4);
        assert_eq!(t.kernel_mixed_family, 0);
        let mixed = t
            .create(
                5,
                a("192.0.2.5:1000"),
                6,
                a("[2001:db8::6]:2000"),
                "echo",
                3,
                now,
            )
            .unwrap();
        assert_eq!(
            seen.lock().unwrap().len(),
            4,
            "mixed entries stay in userspace"
        );
        assert_eq!(t.kernel_mixed_family, 2);
        assert_eq!(
            t.forward(&mixed.connector_cid, a("192.0.2.5:1000"), 10, now),
            ForwardResult::Send(a("[2001:db8::6]:2000"))
        );
        // The IPv6 agent moves to IPv4: its entries leave the kernel.
        t.client_moved(1, a("192.0.2.1:1000"));
        assert!(!seen.lock().unwrap().contains(&v6.agent_cid));
        assert!(!seen.lock().unwrap().contains(&v6.connector_cid));
        assert_eq!(t.kernel_mixed_family, 4);
    }
}
