//! NAT traversal: ICE-style connectivity checks between an agent and a connector,
//! sent from each side's one UDP socket (the one that also carries QUIC).
//!
//! Candidates (host addresses and the server-reflexive address from QAD) are
//! exchanged through the intermediate in `CANDIDATES` frames (`ztna_common::frames`),
//! each with the sender's random 16-byte check password. Both sides then check every
//! remote candidate at once (so both NATs open mappings), paced, retransmitted with
//! backoff; the controlling side (the agent) nominates the best pair that worked.
//!
//! Check packet (never confused with QUIC, whose first byte always has bit 0x40 set):
//!
//! ```text
//! 0x01 | "ZTNA" | kind[1] | session_id[4 BE] | txn[8] | flags[1] | family[1] | ip[16] | port[2 BE] | tag[16]
//! ```
//! `kind` 1 = request, 2 = response; `flags` bit 0 = nominate. A request carries the
//! address it is sent to, a response the address the request came from (what the
//! responder saw, like STUN's XOR-MAPPED-ADDRESS); IPv4 uses the first 4 bytes of
//! `ip`. `tag` = HMAC-SHA256(receiver-of-the-request's password, bytes before tag),
//! first 16 bytes; so only the two endpoints of the session can make valid checks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

pub const CHECK_LEN: usize = 1 + 4 + 1 + 4 + 8 + 1 + 1 + 16 + 2 + 16;
const MAGIC: &[u8; 5] = b"\x01ZTNA";
const KIND_REQUEST: u8 = 1;
const KIND_RESPONSE: u8 = 2;
const FLAG_NOMINATE: u8 = 1;

/// Pacing between new checks (RFC 8445 Ta).
pub const PACING: Duration = Duration::from_millis(20);
pub const FIRST_RTO: Duration = Duration::from_millis(100);
pub const MAX_TRIES: u32 = 7;

/// Peer-reflexive pairs one session may learn. Each costs up to [`MAX_TRIES`]
/// checks; without a cap every new source port of a valid request added one.
pub const MAX_PRFLX_PAIRS: usize = 4;

/// Remote candidates taken from one CANDIDATES frame (the wire allows 16). A
/// peer's candidates are addresses we send checks to: fewer targets, less that an
/// authorized peer can aim at someone else.
pub const MAX_REMOTE_CANDIDATES: usize = 8;

/// Least time between two accepted remote-candidate sets of one session. Each set
/// restarts every check, so without it a peer repeating CANDIDATES would have us
/// send checks to the addresses it names at the rate it sends frames.
pub const REMOTE_UPDATE_INTERVAL: Duration = Duration::from_secs(2);

/// Candidate types with RFC 8445 type preferences.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CandidateKind {
    Host = 1,
    ServerReflexive = 2,
    /// Learned from a check that arrived from an address the peer did not list
    /// (its NAT gave it a new mapping towards us). Never sent in CANDIDATES.
    PeerReflexive = 3,
}

impl CandidateKind {
    pub fn type_preference(self) -> u32 {
        match self {
            CandidateKind::Host => 126,
            CandidateKind::ServerReflexive => 100,
            CandidateKind::PeerReflexive => 110,
        }
    }
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(CandidateKind::Host),
            2 => Some(CandidateKind::ServerReflexive),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Candidate {
    pub kind: CandidateKind,
    pub addr: SocketAddr,
}

impl Candidate {
    /// RFC 8445 §5.1.2.1 with one component; IPv4 preferred slightly (local pref).
    pub fn priority(&self) -> u32 {
        let local_pref: u32 = if self.addr.is_ipv4() { 65535 } else { 65000 };
        (self.kind.type_preference() << 24) + (local_pref << 8) + (256 - 1)
    }
}

/// Our candidates for a socket bound to `local`: when it is bound to the
/// unspecified address, one host candidate per interface address of the same family
/// in `host_addrs` (the platform lists them; this crate reads no interfaces);
/// otherwise `local` itself. Then the server-reflexive address (QAD), unless it
/// repeats a host one.
pub fn candidates(
    local: SocketAddr,
    host_addrs: &[IpAddr],
    reflexive: Option<SocketAddr>,
) -> Vec<Candidate> {
    let mut c: Vec<Candidate> = if local.ip().is_unspecified() {
        host_addrs
            .iter()
            .filter(|ip| ip.is_ipv4() == local.is_ipv4())
            .map(|ip| Candidate {
                kind: CandidateKind::Host,
                addr: SocketAddr::new(*ip, local.port()),
            })
            .collect()
    } else {
        vec![Candidate {
            kind: CandidateKind::Host,
            addr: local,
        }]
    };
    if let Some(r) = reflexive
        && !c.iter().any(|x| x.addr == r)
    {
        c.push(Candidate {
            kind: CandidateKind::ServerReflexive,
            addr: r,
        });
    }
    c
}

/// RFC 8445 §6.1.2.3 pair priority; G = controlling side's candidate priority.
pub fn pair_priority(controlling: u32, controlled: u32) -> u64 {
    let (g, d) = (u64::from(controlling), u64::from(controlled));
    (1u64 << 32) * g.min(d) + 2 * g.max(d) + u64::from(g > d)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Controlling,
    Controlled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PairState {
    Waiting,
    InProgress {
        txn: [u8; 8],
        next: Instant,
        rto: Duration,
        tries: u32,
    },
    Succeeded,
    Failed,
}

#[derive(Clone, Debug)]
struct Pair {
    remote: Candidate,
    priority: u64,
    state: PairState,
    nominating: Option<[u8; 8]>,
    /// Controlled side: the peer nominated this pair before our own check of it
    /// succeeded; it is selected when (if) that check succeeds (RFC 8445 §7.3.1.5).
    peer_nominated: bool,
}

impl Pair {
    fn new(remote: Candidate, priority: u64) -> Self {
        Pair {
            remote,
            priority,
            state: PairState::Waiting,
            nominating: None,
            peer_nominated: false,
        }
    }
}

/// A parsed check packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Check {
    pub request: bool,
    pub session_id: u32,
    pub txn: [u8; 8],
    pub nominate: bool,
    pub addr: SocketAddr,
}

fn put_addr(out: &mut [u8], a: SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out[0] = 4;
            out[1..5].copy_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out[0] = 6;
            out[1..17].copy_from_slice(&ip.octets());
        }
    }
    out[17..19].copy_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> Option<SocketAddr> {
    let ip = match b[0] {
        4 => IpAddr::V4(Ipv4Addr::new(b[1], b[2], b[3], b[4])),
        6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&b[1..17]).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, u16::from_be_bytes([b[17], b[18]])))
}

/// True if a received UDP payload is a check packet (not QUIC).
pub fn is_check(pkt: &[u8]) -> bool {
    pkt.len() == CHECK_LEN && pkt.starts_with(MAGIC)
}

/// Builds a check signed with `key`.
pub fn encode_check(c: &Check, key: &[u8; 16]) -> Vec<u8> {
    let mut p = vec![0u8; CHECK_LEN];
    p[..5].copy_from_slice(MAGIC);
    p[5] = if c.request {
        KIND_REQUEST
    } else {
        KIND_RESPONSE
    };
    p[6..10].copy_from_slice(&c.session_id.to_be_bytes());
    p[10..18].copy_from_slice(&c.txn);
    p[18] = if c.nominate { FLAG_NOMINATE } else { 0 };
    put_addr(&mut p[19..38], c.addr);
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), &p[..38]);
    p[38..].copy_from_slice(&tag.as_ref()[..16]);
    p
}

/// Parses a check and verifies its tag with `key`.
pub fn decode_check(p: &[u8], key: &[u8; 16]) -> Option<Check> {
    if !is_check(p) {
        return None;
    }
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), &p[..38]);
    let ok = tag.as_ref()[..16]
        .iter()
        .zip(&p[38..])
        .fold(0u8, |a, (x, y)| a | (x ^ y))
        == 0;
    if !ok {
        return None;
    }
    Some(Check {
        request: match p[5] {
            KIND_REQUEST => true,
            KIND_RESPONSE => false,
            _ => return None,
        },
        session_id: u32::from_be_bytes(p[6..10].try_into().ok()?),
        txn: p[10..18].try_into().ok()?,
        nominate: p[18] & FLAG_NOMINATE != 0,
        addr: get_addr(&p[19..38])?,
    })
}

/// A nominating request to `to`, signed with the receiver's password.
fn nomination(
    session_id: u32,
    txn: [u8; 8],
    to: SocketAddr,
    key: &[u8; 16],
) -> (Vec<u8>, SocketAddr) {
    let c = Check {
        request: true,
        session_id,
        txn,
        nominate: true,
        addr: to,
    };
    (encode_check(&c, key), to)
}

/// Session id of a check packet, before its tag is verified (to find its checker).
pub fn check_session(p: &[u8]) -> Option<u32> {
    is_check(p).then(|| u32::from_be_bytes([p[6], p[7], p[8], p[9]]))
}

/// One side's connectivity checks for one session.
pub struct Checker {
    pub role: Role,
    pub session_id: u32,
    local_password: [u8; 16],
    remote_password: Option<[u8; 16]>,
    local_best: u32,
    pairs: Vec<Pair>,
    next_check: Instant,
    selected: Option<SocketAddr>,
    rng: SystemRandom,
    started: Instant,
    /// Checks that failed verification or came for pairs we don't have.
    pub rejected: u64,
    /// Valid requests from new addresses not made pairs: the session has
    /// [`MAX_PRFLX_PAIRS`] peer-reflexive pairs already.
    pub prflx_refused: u64,
    /// Remote-candidate sets ignored: within [`REMOTE_UPDATE_INTERVAL`] of the last.
    pub remote_updates_refused: u64,
    /// Remote candidates dropped beyond [`MAX_REMOTE_CANDIDATES`] per set.
    pub remote_candidates_dropped: u64,
    /// When the last remote-candidate set was accepted.
    remote_at: Option<Instant>,
    /// Sources of valid requests that arrived before the remote candidates did.
    early_prflx: Vec<SocketAddr>,
}

impl Checker {
    pub fn new(role: Role, session_id: u32, local: &[Candidate], now: Instant) -> Self {
        let rng = SystemRandom::new();
        let mut pw = [0u8; 16];
        let _ = rng.fill(&mut pw);
        Checker {
            role,
            session_id,
            local_password: pw,
            remote_password: None,
            local_best: local.iter().map(|c| c.priority()).max().unwrap_or(0),
            pairs: Vec::new(),
            next_check: now,
            selected: None,
            rng,
            started: now,
            rejected: 0,
            prflx_refused: 0,
            remote_updates_refused: 0,
            remote_candidates_dropped: 0,
            remote_at: None,
            early_prflx: Vec::new(),
        }
    }

    pub fn local_password(&self) -> [u8; 16] {
        self.local_password
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Remote candidates and password arrived (through the intermediate). Returns
    /// false (and counts it) when the set is ignored: it came within
    /// [`REMOTE_UPDATE_INTERVAL`] of the last accepted one.
    pub fn set_remote(&mut self, password: [u8; 16], remote: &[Candidate], now: Instant) -> bool {
        if self
            .remote_at
            .is_some_and(|at| now.saturating_duration_since(at) < REMOTE_UPDATE_INTERVAL)
        {
            self.remote_updates_refused += 1;
            return false;
        }
        self.remote_at = Some(now);
        self.remote_password = Some(password);
        let mut seen: Vec<SocketAddr> = Vec::with_capacity(MAX_REMOTE_CANDIDATES);
        self.pairs.clear();
        for r in remote
            .iter()
            .filter(|r| r.kind != CandidateKind::PeerReflexive)
        {
            if seen.contains(&r.addr) {
                continue;
            }
            if seen.len() == MAX_REMOTE_CANDIDATES {
                self.remote_candidates_dropped += 1;
                continue;
            }
            seen.push(r.addr);
            let (g, d) = match self.role {
                Role::Controlling => (self.local_best, r.priority()),
                Role::Controlled => (r.priority(), self.local_best),
            };
            self.pairs.push(Pair::new(*r, pair_priority(g, d)));
        }
        self.pairs.sort_by_key(|p| std::cmp::Reverse(p.priority));
        // Requests that beat the candidates here (the peer got ours first) still
        // name an address its NAT opened towards us: check it like any prflx.
        for from in std::mem::take(&mut self.early_prflx) {
            self.add_prflx(from);
        }
        self.next_check = now;
        true
    }

    fn add_prflx(&mut self, from: SocketAddr) {
        if self.pairs.iter().any(|p| p.remote.addr == from) {
            return;
        }
        let prflx = self
            .pairs
            .iter()
            .filter(|p| p.remote.kind == CandidateKind::PeerReflexive)
            .count();
        if prflx >= MAX_PRFLX_PAIRS {
            self.prflx_refused += 1;
            return;
        }
        let remote = Candidate {
            kind: CandidateKind::PeerReflexive,
            addr: from,
        };
        let (g, d) = match self.role {
            Role::Controlling => (self.local_best, remote.priority()),
            Role::Controlled => (remote.priority(), self.local_best),
        };
        self.pairs.push(Pair::new(remote, pair_priority(g, d)));
        self.pairs.sort_by_key(|p| std::cmp::Reverse(p.priority));
    }

    pub fn has_remote(&self) -> bool {
        self.remote_password.is_some()
    }

    /// The nominated remote address once both sides agreed.
    pub fn selected(&self) -> Option<SocketAddr> {
        self.selected
    }

    /// Every pair failed (or there were none).
    pub fn failed(&self) -> bool {
        self.remote_password.is_some()
            && self.selected.is_none()
            && self.pairs.iter().all(|p| p.state == PairState::Failed)
    }

    fn txn(&self) -> [u8; 8] {
        let mut t = [0u8; 8];
        let _ = self.rng.fill(&mut t);
        t
    }

    /// Next check to send: (packet, destination).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(Vec<u8>, SocketAddr)> {
        let key = self.remote_password?;
        if now < self.next_check || self.selected.is_some() {
            return None;
        }
        // Nomination first (controlling side), then retransmissions, then new checks.
        let txn = self.txn();
        let session_id = self.session_id;
        if self.role == Role::Controlling && self.selected.is_none() {
            let best = self
                .pairs
                .iter_mut()
                .find(|p| p.state == PairState::Succeeded);
            if let Some(p) = best
                && p.nominating.is_none()
            {
                p.nominating = Some(txn);
                self.next_check = now + PACING;
                return Some(nomination(session_id, txn, p.remote.addr, &key));
            }
        }
        let mut chosen = None;
        for (i, p) in self.pairs.iter_mut().enumerate() {
            match p.state {
                PairState::InProgress {
                    next, rto, tries, ..
                } if next <= now => {
                    if tries >= MAX_TRIES {
                        p.state = PairState::Failed;
                        continue;
                    }
                    p.state = PairState::InProgress {
                        txn,
                        next: now + rto * 2,
                        rto: rto * 2,
                        tries: tries + 1,
                    };
                    chosen = Some(i);
                    break;
                }
                _ => {}
            }
        }
        if chosen.is_none()
            && let Some(i) = self
                .pairs
                .iter()
                .position(|p| p.state == PairState::Waiting)
        {
            self.pairs[i].state = PairState::InProgress {
                txn,
                next: now + FIRST_RTO,
                rto: FIRST_RTO,
                tries: 1,
            };
            chosen = Some(i);
        }
        // Keep nominations alive until answered.
        if chosen.is_none()
            && self.role == Role::Controlling
            && self.selected.is_none()
            && let Some(p) = self.pairs.iter_mut().find(|p| p.nominating.is_some())
        {
            p.nominating = Some(txn);
            self.next_check = now + FIRST_RTO;
            return Some(nomination(session_id, txn, p.remote.addr, &key));
        }
        let i = chosen?;
        self.next_check = now + PACING;
        let to = self.pairs[i].remote.addr;
        let c = Check {
            request: true,
            session_id,
            txn,
            nominate: false,
            addr: to,
        };
        Some((encode_check(&c, &key), to))
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.remote_password.is_none() || self.selected.is_some() {
            return None;
        }
        let retx = self
            .pairs
            .iter()
            .filter_map(|p| match p.state {
                PairState::InProgress { next, .. } => Some(next),
                PairState::Waiting => Some(self.next_check),
                _ => None,
            })
            .min();
        // The controlling side nominates (and re-nominates) on the pacing timer.
        let nominate = (self.role == Role::Controlling
            && self.pairs.iter().any(|p| p.state == PairState::Succeeded))
        .then_some(self.next_check);
        retx.into_iter()
            .chain(nominate)
            .min()
            .map(|t| t.max(self.next_check))
    }

    /// Handles a received check; returns a response to send, if any.
    pub fn handle(
        &mut self,
        pkt: &[u8],
        from: SocketAddr,
        _now: Instant,
    ) -> Option<(Vec<u8>, SocketAddr)> {
        // Both messages of one transaction are signed with the password of the
        // request's receiver: requests to us with ours, responses to our requests
        // with the remote one.
        if let Some(c) = decode_check(pkt, &self.local_password).filter(|c| c.request) {
            if c.session_id != self.session_id {
                self.rejected += 1;
                return None;
            }
            // RFC 8445 §7.3.1.3: a request from an unknown address is a peer-reflexive
            // candidate; check it too (behind a symmetric NAT it is the only way in).
            if self.remote_password.is_some() {
                self.add_prflx(from);
            } else if !self.early_prflx.contains(&from) && self.early_prflx.len() < MAX_PRFLX_PAIRS
            {
                self.early_prflx.push(from);
            }
            // RFC 8445 §7.3.1.5: a nomination selects the pair only once our own
            // check of it succeeded (proof that `from` answers, not merely that a
            // request came from it); until then it is remembered.
            if c.nominate
                && self.role == Role::Controlled
                && let Some(p) = self.pairs.iter_mut().find(|p| p.remote.addr == from)
            {
                if p.state == PairState::Succeeded {
                    self.selected = Some(from);
                } else {
                    p.peer_nominated = true;
                    if p.state == PairState::Failed {
                        p.state = PairState::Waiting;
                    }
                }
            }
            let resp = Check {
                request: false,
                session_id: c.session_id,
                txn: c.txn,
                nominate: c.nominate,
                addr: from,
            };
            return Some((encode_check(&resp, &self.local_password), from));
        }
        let key = self.remote_password?;
        let Some(c) = decode_check(pkt, &key).filter(|c| !c.request) else {
            self.rejected += 1;
            return None;
        };
        for p in self.pairs.iter_mut() {
            if let PairState::InProgress { txn, .. } = p.state
                && txn == c.txn
                && p.remote.addr == from
            {
                p.state = PairState::Succeeded;
                if p.peer_nominated && self.role == Role::Controlled {
                    self.selected = Some(from);
                }
            }
            if p.nominating == Some(c.txn) && p.remote.addr == from {
                p.state = PairState::Succeeded;
                self.selected = Some(from);
            }
        }
        None
    }

    /// Starts over (after the direct path failed): all pairs back to waiting.
    pub fn restart(&mut self, now: Instant) {
        self.selected = None;
        for p in self.pairs.iter_mut() {
            p.state = PairState::Waiting;
            p.nominating = None;
            p.peer_nominated = false;
        }
        self.next_check = now;
        self.started = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(kind: CandidateKind, a: &str) -> Candidate {
        Candidate {
            kind,
            addr: a.parse().unwrap(),
        }
    }

    #[test]
    fn check_round_trip_and_tamper() {
        let key = [7u8; 16];
        let c = Check {
            request: true,
            session_id: 9,
            txn: [1; 8],
            nominate: true,
            addr: "192.0.2.1:5000".parse().unwrap(),
        };
        let mut p = encode_check(&c, &key);
        assert_eq!(p.len(), CHECK_LEN);
        assert!(p[0] & 0x40 == 0, "never looks like QUIC");
        assert_eq!(decode_check(&p, &key), Some(c));
        assert_eq!(decode_check(&p, &[8u8; 16]), None);
        p[12] ^= 1;
        assert_eq!(decode_check(&p, &key), None);
        assert_eq!(check_session(&p), Some(9));
    }

    #[test]
    fn priorities_follow_rfc8445() {
        let h = cand(CandidateKind::Host, "10.0.0.1:1");
        let s = cand(CandidateKind::ServerReflexive, "203.0.113.1:1");
        assert!(h.priority() > s.priority());
        assert_eq!(pair_priority(10, 20), (1 << 32) * 10 + 40);
        assert_eq!(pair_priority(20, 10), (1 << 32) * 10 + 40 + 1);
    }

    /// Two checkers talking over a lossless "network": both sides select.
    #[test]
    fn both_sides_select_the_working_pair() {
        let now = Instant::now();
        let a_addr: SocketAddr = "198.51.100.1:1000".parse().unwrap();
        let b_addr: SocketAddr = "203.0.113.2:2000".parse().unwrap();
        let dead: SocketAddr = "10.9.9.9:9".parse().unwrap();
        let la = [cand(CandidateKind::ServerReflexive, "198.51.100.1:1000")];
        let lb = [cand(CandidateKind::ServerReflexive, "203.0.113.2:2000")];
        let mut a = Checker::new(Role::Controlling, 1, &la, now);
        let mut b = Checker::new(Role::Controlled, 1, &lb, now);
        a.set_remote(
            b.local_password(),
            &[cand(CandidateKind::Host, "10.9.9.9:9"), lb[0]],
            now,
        );
        b.set_remote(a.local_password(), &la, now);
        let mut t = now;
        for _ in 0..200 {
            t += Duration::from_millis(10);
            let mut wire = Vec::new();
            while let Some((p, to)) = a.poll_transmit(t) {
                wire.push((p, a_addr, to));
            }
            while let Some((p, to)) = b.poll_transmit(t) {
                wire.push((p, b_addr, to));
            }
            while let Some((p, from, to)) = wire.pop() {
                if to == dead {
                    continue;
                }
                let target = if to == a_addr { &mut a } else { &mut b };
                if let Some((r, rto)) = target.handle(&p, from, t) {
                    wire.push((r, to, rto));
                }
            }
            if a.selected().is_some() && b.selected().is_some() {
                break;
            }
        }
        assert_eq!(a.selected(), Some(b_addr));
        assert_eq!(b.selected(), Some(a_addr));
    }

    #[test]
    fn a_succeeded_pair_schedules_its_nomination() {
        let now = Instant::now();
        let peer: SocketAddr = "203.0.113.2:2000".parse().unwrap();
        let mut a = Checker::new(Role::Controlling, 1, &[], now);
        let mut b = Checker::new(Role::Controlled, 1, &[], now);
        a.set_remote(
            b.local_password(),
            &[cand(CandidateKind::Host, "203.0.113.2:2000")],
            now,
        );
        b.set_remote(a.local_password(), &[], now);
        let (req, _) = a.poll_transmit(now).unwrap();
        let (resp, _) = b
            .handle(&req, "198.51.100.1:1000".parse().unwrap(), now)
            .unwrap();
        assert!(a.handle(&resp, peer, now).is_none());
        let t = a.poll_timeout().expect("a nomination is due");
        assert!(t <= now + PACING);
        let (nom, to) = a.poll_transmit(t).unwrap();
        assert_eq!(to, peer);
        assert!(decode_check(&nom, &b.local_password()).unwrap().nominate);
    }

    #[test]
    fn a_request_from_an_unlisted_address_becomes_a_peer_reflexive_pair() {
        let now = Instant::now();
        let mut a = Checker::new(Role::Controlling, 1, &[], now);
        let b_pw = [5u8; 16];
        a.set_remote(
            b_pw,
            &[cand(CandidateKind::ServerReflexive, "203.0.113.2:2000")],
            now,
        );
        let prflx: SocketAddr = "203.0.113.2:31337".parse().unwrap();
        let req = encode_check(
            &Check {
                request: true,
                session_id: 1,
                txn: [2; 8],
                nominate: false,
                addr: "198.51.100.1:1".parse().unwrap(),
            },
            &a.local_password(),
        );
        assert!(a.handle(&req, prflx, now).is_some(), "answered");
        let mut sent_to = Vec::new();
        let mut t = now;
        for _ in 0..10 {
            t += PACING;
            while let Some((_, to)) = a.poll_transmit(t) {
                sent_to.push(to);
            }
        }
        assert!(
            sent_to.contains(&prflx),
            "checked the peer-reflexive address: {sent_to:?}"
        );
    }

    #[test]
    fn a_request_before_the_candidates_is_checked_once_they_arrive() {
        let now = Instant::now();
        let mut a = Checker::new(Role::Controlling, 1, &[], now);
        let prflx: SocketAddr = "203.0.113.2:31337".parse().unwrap();
        let req = encode_check(
            &Check {
                request: true,
                session_id: 1,
                txn: [2; 8],
                nominate: false,
                addr: "198.51.100.1:1".parse().unwrap(),
            },
            &a.local_password(),
        );
        assert!(
            a.handle(&req, prflx, now).is_some(),
            "answered even before the candidates"
        );
        a.set_remote(
            [5; 16],
            &[cand(CandidateKind::ServerReflexive, "203.0.113.2:2000")],
            now,
        );
        let mut sent_to = Vec::new();
        let mut t = now;
        for _ in 0..10 {
            t += PACING;
            while let Some((_, to)) = a.poll_transmit(t) {
                sent_to.push(to);
            }
        }
        assert!(sent_to.contains(&prflx), "{sent_to:?}");
    }

    #[test]
    fn all_pairs_fail_when_nothing_answers() {
        let now = Instant::now();
        let mut a = Checker::new(Role::Controlling, 1, &[], now);
        a.set_remote([0; 16], &[cand(CandidateKind::Host, "10.9.9.9:9")], now);
        let mut t = now;
        for _ in 0..2000 {
            t += Duration::from_millis(10);
            while a.poll_transmit(t).is_some() {}
        }
        assert!(a.failed());
    }

    #[test]
    fn checks_from_strangers_are_rejected() {
        let now = Instant::now();
        let mut a = Checker::new(Role::Controlled, 1, &[], now);
        a.set_remote([3; 16], &[], now);
        let forged = encode_check(
            &Check {
                request: false,
                session_id: 1,
                txn: [0; 8],
                nominate: false,
                addr: "10.0.0.1:1".parse().unwrap(),
            },
            &[9; 16],
        );
        assert!(
            a.handle(&forged, "10.0.0.2:2".parse().unwrap(), now)
                .is_none()
        );
        assert_eq!(a.rejected, 1);
    }

    fn request_to(checker: &Checker, nominate: bool, txn: u8) -> Vec<u8> {
        encode_check(
            &Check {
                request: true,
                session_id: checker.session_id,
                txn: [txn; 8],
                nominate,
                addr: "198.51.100.1:1".parse().unwrap(),
            },
            &checker.local_password(),
        )
    }

    /// Every destination `c` sends checks to until nothing is left to send.
    fn check_targets(c: &mut Checker, now: Instant) -> Vec<SocketAddr> {
        let mut to = Vec::new();
        let mut t = now;
        for _ in 0..3000 {
            t += Duration::from_millis(10);
            while let Some((_, d)) = c.poll_transmit(t) {
                if !to.contains(&d) {
                    to.push(d);
                }
            }
        }
        to
    }

    #[test]
    fn peer_reflexive_pairs_are_capped_per_session() {
        let now = Instant::now();
        let mut a = Checker::new(Role::Controlled, 1, &[], now);
        a.set_remote(
            [5; 16],
            &[cand(CandidateKind::Host, "203.0.113.2:2000")],
            now,
        );
        for port in 0..20u16 {
            let from = SocketAddr::new("203.0.113.2".parse().unwrap(), 40000 + port);
            // Every valid request is still answered...
            assert!(
                a.handle(&request_to(&a, false, port as u8), from, now)
                    .is_some()
            );
        }
        // ...but only MAX_PRFLX_PAIRS sources became pairs that we check.
        let targets = check_targets(&mut a, now);
        assert_eq!(targets.len(), 1 + MAX_PRFLX_PAIRS, "{targets:?}");
        assert_eq!(a.prflx_refused, (20 - MAX_PRFLX_PAIRS) as u64);
    }

    #[test]
    fn the_controlled_side_selects_a_nominated_pair_only_after_its_check_succeeded() {
        let now = Instant::now();
        let peer: SocketAddr = "203.0.113.2:2000".parse().unwrap();
        let a_pw = [5u8; 16];
        let mut b = Checker::new(Role::Controlled, 1, &[], now);
        b.set_remote(a_pw, &[cand(CandidateKind::Host, "203.0.113.2:2000")], now);
        // A nomination from an address our checks have not confirmed.
        assert!(b.handle(&request_to(&b, true, 1), peer, now).is_some());
        assert_eq!(b.selected(), None, "nominated before any check succeeded");
        // A nomination from a source we refuse as a new pair never selects.
        let mut c = Checker::new(Role::Controlled, 1, &[], now);
        c.set_remote(a_pw, &[], now);
        for port in 0..MAX_PRFLX_PAIRS as u16 {
            let from = SocketAddr::new("203.0.113.9".parse().unwrap(), 1000 + port);
            c.handle(&request_to(&c, false, 2), from, now);
        }
        let stranger: SocketAddr = "192.0.2.66:6666".parse().unwrap();
        assert!(c.handle(&request_to(&c, true, 3), stranger, now).is_some());
        assert_eq!(c.selected(), None);
        // Our own check of the nominated pair succeeds: now it is selected.
        let (req, to) = b.poll_transmit(now).unwrap();
        assert_eq!(to, peer);
        let req = decode_check(&req, &a_pw).unwrap();
        let resp = encode_check(
            &Check {
                request: false,
                addr: "198.51.100.1:1".parse().unwrap(),
                ..req
            },
            &a_pw,
        );
        b.handle(&resp, peer, now);
        assert_eq!(b.selected(), Some(peer));
    }

    #[test]
    fn remote_candidate_sets_are_capped_and_rate_limited() {
        let now = Instant::now();
        let mut a = Checker::new(Role::Controlling, 1, &[], now);
        let many: Vec<Candidate> = (0..16u16)
            .map(|i| Candidate {
                kind: CandidateKind::Host,
                addr: SocketAddr::new("192.0.2.1".parse().unwrap(), 1000 + i),
            })
            .collect();
        assert!(a.set_remote([5; 16], &many, now));
        assert_eq!(
            a.remote_candidates_dropped,
            16 - MAX_REMOTE_CANDIDATES as u64
        );
        // Another set at once would restart every check: ignored.
        let other = [cand(CandidateKind::Host, "192.0.2.99:9")];
        assert!(!a.set_remote([5; 16], &other, now + Duration::from_millis(100)));
        assert_eq!(a.remote_updates_refused, 1);
        let targets = check_targets(&mut a, now);
        assert_eq!(targets.len(), MAX_REMOTE_CANDIDATES, "{targets:?}");
        assert!(!targets.contains(&other[0].addr));
        // Each pair is checked at most MAX_TRIES times: the checks one set buys are
        // bounded, and the next set is accepted only after the interval.
        assert!(a.failed());
        let later = now + REMOTE_UPDATE_INTERVAL;
        assert!(a.set_remote([5; 16], &other, later));
        assert_eq!(check_targets(&mut a, later), vec![other[0].addr]);
    }
}
