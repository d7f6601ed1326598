//! Differential test: generated frames through the loaded XDP program
//! (BPF_PROG_TEST_RUN in the harness namespace) and through the plain-Rust model
//! (`ztna_xdp_tests::model`), comparing per frame the XDP action, the verdict counters
//! (exactly the model's one moves, by one), the output bytes, and per map state the
//! sessions' packet and byte counters.
//!
//! `ZTNA_XDP_DIFF_SEED` (u64, default fixed) picks the frames, `ZTNA_XDP_DIFF_CASES`
//! how many (default 120 000). A mismatch panics with the seed, the state, the case
//! index and hex dumps; rerun with that seed to reproduce it.
//!
//! The program caches each session's route per CPU for a second, without the
//! lookup's MTU check. The states keep the cache from changing the outcome: where
//! sessions have stats entries (so a cache), every frame's IP packet fits the 1500-byte
//! MTU, so a cached route and a fresh lookup agree; frames up to 1600 bytes go only
//! to the state without stats entries, where every packet is looked up. One state
//! changes entries' peers under a warm cache: the program must notice the new peer.
//!
//! IPv4 and IPv6 frames are generated for every state (the IPv6 ones and their
//! mutations in `differential/ipv6.rs`); the tables hold a CID of another relay
//! (forwarded only in the state configured with that relay's ID).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4, SocketAddrV6};
use std::time::Instant;

use aya::programs::ProgramError;
use fastrand::Rng;
use ztna_common::relay::{VERDICT_COUNT, Verdict};
use ztna_xdp_tests::model::{self, Expected, HarnessRoutes, ModelEntry, ModelEntry6, ModelMaps};
use ztna_xdp_tests::*;

#[path = "differential/ipv4.rs"]
mod ipv4;
#[path = "differential/ipv6.rs"]
mod ipv6;
use ipv4::{MUTATIONS, Mutation, mutate, relayed};
use ipv6::{MUTATIONS6, Mutation6, mutate6, relayed6};

const DEFAULT_SEED: u64 = 0x7a74_6e61_7864_7031;
const DEFAULT_CASES: usize = 120_000;

const CID_TX: [u8; 8] = cid(1);
const CID_REDIRECT: [u8; 8] = cid(2);
const CID_NO_ROUTE: [u8; 8] = cid(3);
const CID_NO_NEIGH: [u8; 8] = cid(4);
/// Its peer is the relay's own address: a local route, which is not forwarded.
const CID_TO_SELF: [u8; 8] = cid(5);
/// In the table, but made by another relay: forwarded only in the state that is
/// configured with that relay's ID.
const OTHER_RELAY_ID: u16 = RELAY_ID ^ 0x8001;
const CID_OTHER_RELAY: [u8; 8] = other_relay_cid(OTHER_RELAY_ID, 6);
const CID6_TX: [u8; 8] = cid(11);
const CID6_REDIRECT: [u8; 8] = cid(12);
const CID6_NO_ROUTE: [u8; 8] = cid(13);
const CID6_NO_NEIGH: [u8; 8] = cid(14);
const CID6_OTHER_RELAY: [u8; 8] = other_relay_cid(OTHER_RELAY_ID, 15);
/// A sender from off the subnet (the program does not route the sender).
const SENDER_B: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 7), 61000);
/// Not one of the relay's addresses (until state "three local addresses").
const OTHER_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 5);
/// r0's own address.
const FAR_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 250, 1, 1);
const NOT_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 50);
/// r0's own IPv6 address.
const FAR_LOCAL6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x251, 0, 0, 0, 0, 0, 1);

/// Longest frame in states whose sessions cache routes: its IP packet fits the MTU.
const FRAME_FITS_MTU: usize = 14 + 1500;
const FRAME_OVERSIZE: usize = 1600;

fn entry(peer: SocketAddrV4, sender: SocketAddrV4) -> ModelEntry {
    ModelEntry {
        peer,
        expected_sender: sender,
    }
}

fn entry6(peer: SocketAddrV6, sender: SocketAddrV6) -> ModelEntry6 {
    ModelEntry6 {
        peer,
        expected_sender: sender,
    }
}

/// A sender from off the IPv6 subnet.
const SENDER6_B: SocketAddrV6 = SocketAddrV6::new(
    std::net::Ipv6Addr::new(0x2001, 0xdb8, 7, 0, 0, 0, 0, 7),
    61000,
    0,
    0,
);

/// One map state and how frames for it are made.
pub(crate) struct State {
    name: &'static str,
    pub(crate) maps: ModelMaps,
    /// Whether the entries have stats entries (so the program caches routes).
    session_stats: bool,
    pub(crate) max_frame: usize,
}

fn states() -> Vec<State> {
    let entries = vec![
        (CID_TX, entry(PEER, SENDER)),
        (CID_REDIRECT, entry(FAR_PEER, SENDER_B)),
        (CID_NO_ROUTE, entry(NO_ROUTE_PEER, SENDER)),
        (CID_NO_NEIGH, entry(NO_NEIGH_PEER, SENDER_B)),
        (
            CID_TO_SELF,
            entry(SocketAddrV4::new(*RELAY.ip(), 9), SENDER),
        ),
        (CID_OTHER_RELAY, entry(PEER, SENDER)),
    ];
    let entries6 = vec![
        (CID6_TX, entry6(PEER6, SENDER6)),
        (CID6_REDIRECT, entry6(FAR_PEER6, SENDER6_B)),
        (CID6_NO_ROUTE, entry6(NO_ROUTE_PEER6, SENDER6)),
        (CID6_NO_NEIGH, entry6(NO_NEIGH_PEER6, SENDER6_B)),
        (CID6_OTHER_RELAY, entry6(FAR_PEER6, SENDER6)),
    ];
    let base = ModelMaps {
        port: RELAY.port(),
        relay_id: RELAY_ID,
        local_addrs: vec![*RELAY.ip()],
        local_addrs6: vec![*RELAY6.ip()],
        entries: entries.clone(),
        entries6,
    };
    // The TX and REDIRECT sessions swap peers (new ports too), with their caches warm.
    let mut swapped = base.clone();
    swapped.entries[0].1.peer = SocketAddrV4::new(*FAR_PEER.ip(), 6001);
    swapped.entries[1].1.peer = SocketAddrV4::new(*PEER.ip(), 5001);
    swapped.local_addrs = vec![*RELAY.ip(), OTHER_LOCAL, FAR_LOCAL];
    swapped.entries6[0].1.peer = SocketAddrV6::new(*FAR_PEER6.ip(), 6001, 0, 0);
    swapped.entries6[1].1.peer = SocketAddrV6::new(*PEER6.ip(), 5001, 0, 0);
    swapped.local_addrs6 = vec![*RELAY6.ip(), FAR_LOCAL6];
    let state = |name, maps, session_stats, max_frame| State {
        name,
        maps,
        session_stats,
        max_frame,
    };
    vec![
        state(
            "tx, redirect, no route, no neighbour",
            base.clone(),
            true,
            FRAME_FITS_MTU,
        ),
        state(
            "peers swapped under a warm route cache; three local addresses",
            swapped,
            true,
            FRAME_FITS_MTU,
        ),
        state(
            "no session stats (no route cache); frames past the MTU",
            base.clone(),
            false,
            FRAME_OVERSIZE,
        ),
        state(
            "configured with the other relay's ID",
            ModelMaps {
                relay_id: OTHER_RELAY_ID,
                ..base.clone()
            },
            true,
            FRAME_FITS_MTU,
        ),
        state(
            "no local address",
            ModelMaps {
                local_addrs: vec![],
                local_addrs6: vec![],
                ..base.clone()
            },
            true,
            FRAME_FITS_MTU,
        ),
        state(
            "not configured (port 0)",
            ModelMaps {
                port: 0,
                ..base.clone()
            },
            true,
            FRAME_FITS_MTU,
        ),
        state(
            "another relay port",
            ModelMaps { port: 443, ..base },
            true,
            FRAME_FITS_MTU,
        ),
    ]
}

/// Puts `state` into the program's maps. Stats entries of sessions that stay are
/// kept (and so their route caches).
fn apply(f: &mut Fixture, previous: Option<&State>, state: &State) {
    if let Some(p) = previous {
        for (c, _) in &p.maps.entries {
            if !state.maps.entries.iter().any(|(k, _)| k == c) {
                f.remove(*c);
            }
        }
        for (c, _) in &p.maps.entries6 {
            if !state.maps.entries6.iter().any(|(k, _)| k == c) {
                f.remove6(*c);
            }
        }
        for a in &p.maps.local_addrs {
            f.remove_local_addr(*a);
        }
        for a in &p.maps.local_addrs6 {
            f.remove_local_addr6(*a);
        }
    } else {
        f.remove_local_addr(*RELAY.ip());
        f.remove_local_addr6(*RELAY6.ip());
    }
    f.set_config(state.maps.port, state.maps.relay_id);
    for a in &state.maps.local_addrs {
        f.add_local_addr(*a);
    }
    for a in &state.maps.local_addrs6 {
        f.add_local_addr6(*a);
    }
    for (c, e) in &state.maps.entries6 {
        let had_stats = f.session6(*c).is_some();
        if state.session_stats && !had_stats {
            f.insert6(*c, e.peer, e.expected_sender);
        } else {
            f.insert_entry6(*c, e.peer, e.expected_sender);
            if !state.session_stats {
                f.remove_session6(*c);
            }
        }
    }
    for (c, e) in &state.maps.entries {
        let had_stats = f.session(*c).is_some();
        if state.session_stats && !had_stats {
            f.insert(*c, e.peer, e.expected_sender);
        } else {
            f.insert_entry(*c, e.peer, e.expected_sender);
            if !state.session_stats {
                f.remove_session(*c);
            }
        }
    }
}

/// What a generated frame is, for the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Relayed,
    Mutated(Mutation),
    Relayed6,
    Mutated6(Mutation6),
    Junk,
}

pub(crate) fn random_mac(rng: &mut Rng) -> [u8; 6] {
    let mut m = [0; 6];
    rng.fill(&mut m);
    m
}

/// A QUIC payload with `dcid`: a short header, or a long header whose DCID length
/// byte says 8; the rest random, `len` bytes in all (at least the header).
pub(crate) fn quic_payload(rng: &mut Rng, dcid: [u8; 8], long: bool, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(len.max(24));
    if long {
        p.push(0x80 | rng.u8(..0x80));
        p.extend_from_slice(&rng.u32(..).to_be_bytes());
        p.push(8);
        p.extend_from_slice(&dcid);
        let scid_len = rng.u8(..=20);
        p.push(scid_len);
        p.extend((0..scid_len).map(|_| rng.u8(..)));
    } else {
        p.push(rng.u8(..0x80));
        p.extend_from_slice(&dcid);
    }
    while p.len() < len {
        p.push(rng.u8(..));
    }
    p
}

pub(crate) fn pick<T: Copy>(rng: &mut Rng, options: &[T]) -> T {
    options[rng.usize(..options.len())]
}

pub(crate) fn set16(f: &mut [u8], at: usize, v: u16) {
    f[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

pub(crate) fn get16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

/// Anything at all: random bytes behind a plausible or random Ethernet header.
fn junk(rng: &mut Rng, state: &State) -> Vec<u8> {
    let len = rng.usize(14..=state.max_frame.min(300));
    let mut f: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
    if rng.bool() {
        set16(&mut f, 12, 0x0800);
        if len > 14 && rng.bool() {
            f[14] = 0x45;
        }
    }
    f
}

fn generate(rng: &mut Rng, state: &State) -> (Kind, Vec<u8>) {
    // A third of the frames are IPv6.
    if rng.u8(..3) == 0 {
        return if rng.u8(..10) < 3 {
            (Kind::Relayed6, relayed6(rng, state))
        } else {
            let mut f = relayed6(rng, state);
            let m = MUTATIONS6[rng.usize(..MUTATIONS6.len())];
            mutate6(rng, state, &mut f, m);
            (Kind::Mutated6(m), f)
        };
    }
    match rng.u8(..10) {
        0..=2 => (Kind::Relayed, relayed(rng, state)),
        3..=8 => {
            let mut f = relayed(rng, state);
            let first = MUTATIONS[rng.usize(..MUTATIONS.len())];
            mutate(rng, state, &mut f, first);
            // Sometimes a second one, unless the first cut the frame.
            if rng.u8(..4) == 0 && f.len() >= 60 && first != Mutation::Truncate {
                let m = MUTATIONS[rng.usize(..MUTATIONS.len())];
                if m != Mutation::IpOptions || f[14] == 0x45 {
                    mutate(rng, state, &mut f, m);
                }
            }
            (Kind::Mutated(first), f)
        }
        _ => (Kind::Junk, junk(rng, state)),
    }
}

/// A short-header and a long-header relayed frame cut at every length, from
/// nothing to one byte short.
fn truncation_sweep(rng: &mut Rng, state: &State) -> Vec<(Kind, Vec<u8>)> {
    let mut out = Vec::new();
    for long in [false, true] {
        let (cid, e) = state.maps.entries[0];
        let payload = quic_payload(rng, cid, long, 40);
        let full = udp_frame(
            SENDER_MAC,
            RELAY_MAC,
            e.expected_sender,
            SocketAddrV4::new(state.maps.local_addrs[0], state.maps.port),
            IN_TTL,
            &payload,
        );
        for cut in 0..full.len() {
            out.push((Kind::Mutated(Mutation::Truncate), full[..cut].to_vec()));
        }
        out.push((Kind::Relayed, full));
        let (cid, e) = state.maps.entries6[0];
        let payload = quic_payload(rng, cid, long, 40);
        let full = udp6_frame(
            SENDER_MAC,
            RELAY_MAC,
            e.expected_sender,
            SocketAddrV6::new(state.maps.local_addrs6[0], state.maps.port, 0, 0),
            IN_TTL,
            &payload,
        );
        for cut in 0..full.len() {
            out.push((Kind::Mutated6(Mutation6::Truncate), full[..cut].to_vec()));
        }
        out.push((Kind::Relayed6, full));
    }
    out
}

fn hex_dump(bytes: &[u8]) -> String {
    let mut s = String::new();
    for (i, chunk) in bytes.chunks(16).enumerate() {
        s.push_str(&format!("  {:04x}:", i * 16));
        for b in chunk {
            s.push_str(&format!(" {b:02x}"));
        }
        s.push('\n');
    }
    s
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim();
            let parsed = v
                .strip_prefix("0x")
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .and_then(|n| n.to_string().parse().ok())
                .or_else(|| v.parse().ok());
            parsed.unwrap_or_else(|| panic!("{name}={v}: not a number"))
        }
        Err(_) => default,
    }
}

struct Mismatch<'a> {
    seed: u64,
    state: &'a str,
    index: usize,
    kind: Kind,
    frame: &'a [u8],
}

impl Mismatch<'_> {
    fn fail(&self, what: &str) -> ! {
        panic!(
            "model and program disagree: {what}\nseed {:#x} (ZTNA_XDP_DIFF_SEED), state \"{}\", case {} ({:?}), frame of {} bytes:\n{}",
            self.seed,
            self.state,
            self.index,
            self.kind,
            self.frame.len(),
            hex_dump(self.frame)
        )
    }
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn program_matches_the_model_on_generated_frames() {
    let Some(mut f) = Fixture::setup("diff") else {
        return;
    };
    let seed: u64 = env_or("ZTNA_XDP_DIFF_SEED", DEFAULT_SEED);
    let cases: usize = env_or("ZTNA_XDP_DIFF_CASES", DEFAULT_CASES);
    let mut rng = Rng::with_seed(seed);
    let started = Instant::now();
    let states = states();
    let per_state = cases.div_ceil(states.len());
    let mut verdicts = [0usize; VERDICT_COUNT as usize];
    let mut kinds: HashMap<Kind, usize> = HashMap::new();
    // Frames the model forwarded, by kind.
    let mut forwarded_kinds: HashMap<Kind, usize> = HashMap::new();
    let mut index = 0;
    for (i, state) in states.iter().enumerate() {
        apply(&mut f, i.checked_sub(1).map(|p| &states[p]), state);
        let sessions_before: Vec<_> = state
            .maps
            .entries
            .iter()
            .map(|(c, _)| f.session(*c).map(|s| (s.packets, s.bytes)))
            .chain(
                state
                    .maps
                    .entries6
                    .iter()
                    .map(|(c, _)| f.session6(*c).map(|s| (s.packets, s.bytes))),
            )
            .collect();
        let mut forwarded: HashMap<[u8; 8], (u64, u64)> = HashMap::new();
        let mut frames: Vec<(Kind, Vec<u8>)> = Vec::with_capacity(per_state);
        if i == 0 {
            frames.extend(truncation_sweep(&mut rng, state));
        }
        while frames.len() < per_state {
            frames.push(generate(&mut rng, state));
        }
        f.in_namespace(|| {
            let mut counters = f.counters();
            for (kind, frame) in &frames {
                let mismatch = Mismatch {
                    seed,
                    state: state.name,
                    index,
                    kind: *kind,
                    frame,
                };
                let expected = model::decide(frame, &state.maps, &HarnessRoutes);
                let got = f.run_here(frame);
                let after = f.counters();
                match (&expected, got) {
                    (Expected::Refused, Err(ProgramError::SyscallError(e)))
                        if e.io_error.raw_os_error() == Some(libc::EINVAL) => {}
                    (Expected::Refused, other) => {
                        mismatch.fail(&format!("expected EINVAL, got {other:?}"))
                    }
                    (Expected::Ran(_), Err(e)) => mismatch.fail(&format!("test run failed: {e}")),
                    (Expected::Ran(want), Ok((action, out))) => {
                        if action != want.action || out != want.output {
                            mismatch.fail(&format!(
                                "action {action} (model {} for {:?}); output {} bytes:\n{}model's output:\n{}",
                                want.action,
                                want.verdict,
                                out.len(),
                                hex_dump(&out),
                                hex_dump(&want.output)
                            ));
                        }
                        verdicts[want.verdict as usize] += 1;
                        if let Some(c) = want.forwarded {
                            *forwarded_kinds.entry(*kind).or_default() += 1;
                            let s = forwarded.entry(c).or_default();
                            s.0 += 1;
                            s.1 += frame.len() as u64;
                        }
                    }
                }
                let want_verdict = match &expected {
                    Expected::Ran(o) => Some(o.verdict),
                    Expected::Refused => None,
                };
                for v in Verdict::ALL {
                    let delta = after[v as usize] - counters[v as usize];
                    if delta != u64::from(Some(v) == want_verdict) {
                        mismatch.fail(&format!(
                            "counter {v:?} moved by {delta}; the model's verdict is {want_verdict:?}"
                        ));
                    }
                }
                counters = after;
                *kinds.entry(*kind).or_default() += 1;
                index += 1;
            }
        });
        // The sessions' counters moved by what the model forwarded for them.
        let sessions_now = state
            .maps
            .entries
            .iter()
            .map(|(c, _)| (*c, f.session(*c).map(|s| (s.packets, s.bytes))))
            .chain(
                state
                    .maps
                    .entries6
                    .iter()
                    .map(|(c, _)| (*c, f.session6(*c).map(|s| (s.packets, s.bytes)))),
            );
        for ((c, now), before) in sessions_now.zip(sessions_before) {
            let want = forwarded.get(&c).copied().unwrap_or_default();
            match (state.session_stats, now) {
                (true, Some(now)) => {
                    let before = before.unwrap_or_default();
                    assert_eq!(
                        (now.0 - before.0, now.1 - before.1),
                        want,
                        "state \"{}\": session {c:02x?} packets and bytes (seed {seed:#x})",
                        state.name
                    );
                }
                (false, None) => {}
                (stats, now) => panic!(
                    "state \"{}\": session {c:02x?} stats entry {now:?}, expected one: {stats}",
                    state.name
                ),
            }
        }
    }
    let elapsed = started.elapsed();
    // Every verdict but Aborted (no frame can make a rewrite fail) was reached.
    for v in Verdict::ALL {
        if v != Verdict::Aborted {
            assert!(
                verdicts[v as usize] > 0 || cases < 10_000,
                "no generated frame reached {v:?}: {verdicts:?}"
            );
        }
    }
    // The checksum and padding variants reached the rewrite, not only the verdicts.
    for kind in [
        Kind::Mutated(Mutation::UdpChecksumZero),
        Kind::Mutated(Mutation::UdpChecksumRandom),
        Kind::Mutated(Mutation::IpChecksumRandom),
        Kind::Mutated(Mutation::Padding),
        Kind::Relayed6,
        Kind::Mutated6(Mutation6::UdpChecksumRandom),
        Kind::Mutated6(Mutation6::Padding),
    ] {
        assert!(
            forwarded_kinds.contains_key(&kind) || cases < 10_000,
            "no {kind:?} frame was forwarded: {forwarded_kinds:?}"
        );
    }
    let tally: Vec<_> = Verdict::ALL
        .iter()
        .map(|v| (v.name(), verdicts[*v as usize]))
        .collect();
    eprintln!(
        "xdp differential: {index} frames (seed {seed:#x}) in {:.1} s; verdicts {tally:?}; {} kinds of frame",
        elapsed.as_secs_f64(),
        kinds.len()
    );
}
