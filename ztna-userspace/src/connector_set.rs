//! The connectors of one service, for high availability: every connector that
//! registers for a service serves it, side by side with the others.
//!
//! - **New work is spread, by agent**: an agent's relay sessions and new
//!   datagram-relay flows go to the live connector that rendezvous hashing of the
//!   agent's certificate against each connector's instance ID ranks first
//!   ([`ConnectorSet::pick_for`]). Connectors announce one instance ID to every
//!   relay, so every relay picks the same connector for an agent: when the agent's
//!   traffic moves to another relay, it still reaches the connector whose kernel
//!   holds its TCP connections. Agents spread over connectors; one agent's work
//!   stays together.
//! - **Existing work stays**: a session keeps its connector for its life; a flow
//!   stays pinned to its connector (`flows::FlowTable`) while that one is live.
//! - **A dead connector loses its work quickly**: the intermediate probes each
//!   connector that has been silent for [`PROBE_AFTER`] with an ack-eliciting
//!   packet, which a live QUIC peer acknowledges within its ACK delay (25 ms by
//!   default). A connector from which quiche has processed no packet for
//!   [`DEAD_AFTER`] is taken out of rotation: its relay sessions are closed (their
//!   agents fall back to the datagram relay and ask again, reaching a survivor) and its
//!   flows move to a survivor on their next packet. So a connector that crashes or
//!   loses its network is replaced within `DEAD_AFTER` plus one check interval, well
//!   inside the 3 seconds promised, while its QUIC connection may still be waiting
//!   out the 30 s idle timeout. A connector heard from again is put back in
//!   rotation; what moved away stays where it went.
//!
//! Liveness counts only packets quiche processed (its `recv` counter), so packets
//! injected with a connector's connection ID cannot keep a dead one in rotation.

use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::flows::ClientId;

/// Silence after which a connector is probed (and probed again, each check).
pub const PROBE_AFTER: Duration = Duration::from_millis(250);
/// Silence after which a connector is out of rotation.
pub const DEAD_AFTER: Duration = Duration::from_millis(1500);
/// How often the intermediate checks its connectors.
pub const CHECK_EVERY: Duration = Duration::from_millis(100);

/// One service's connectors and published prefixes.
#[derive(Default, Debug)]
pub struct ConnectorSet {
    /// Every registered connector, oldest first.
    all: Vec<ClientId>,
    /// Those in rotation (live), oldest first.
    live: Vec<ClientId>,
    /// Instance IDs connectors announced (CAPABILITIES); without one, a connector
    /// ranks by its client ID (stable at this relay only).
    instances: std::collections::HashMap<ClientId, u64>,
    /// The addresses the service answers on, as a connector last published them.
    /// Kept when every connector is gone: withdrawing the agents' routes would send
    /// their traffic for the service out of the tunnel.
    pub prefixes: Vec<IpNet>,
}

impl ConnectorSet {
    /// Adds a connector (live). Returns false if it was already registered.
    pub fn add(&mut self, id: ClientId) -> bool {
        if self.all.contains(&id) {
            return false;
        }
        self.all.push(id);
        self.live.push(id);
        true
    }

    pub fn remove(&mut self, id: ClientId) {
        self.all.retain(|&c| c != id);
        self.live.retain(|&c| c != id);
        self.instances.remove(&id);
    }

    /// Records the instance ID a registered connector announced.
    pub fn set_instance(&mut self, id: ClientId, instance: u64) {
        if self.all.contains(&id) {
            self.instances.insert(id, instance);
        }
    }

    /// Puts a registered connector in or out of rotation.
    pub fn set_live(&mut self, id: ClientId, live: bool) {
        if !self.all.contains(&id) {
            return;
        }
        let pos = self.live.iter().position(|&c| c == id);
        match (live, pos) {
            (true, None) => {
                // Keep registration order, so picks stay fair.
                self.live = self
                    .all
                    .iter()
                    .copied()
                    .filter(|c| *c == id || self.live.contains(c))
                    .collect();
            }
            (false, Some(i)) => {
                self.live.remove(i);
            }
            _ => {}
        }
    }

    pub fn contains(&self, id: ClientId) -> bool {
        self.all.contains(&id)
    }

    /// The connectors in rotation.
    pub fn live(&self) -> &[ClientId] {
        &self.live
    }

    pub fn all(&self) -> &[ClientId] {
        &self.all
    }

    /// The live connector for the agent whose certificate hashes to `agent`:
    /// the highest rendezvous score of (connector instance, agent). While the live
    /// set is the same, every relay returns the same one; when one goes, only its
    /// agents move.
    pub fn pick_for(&self, agent: u64) -> Option<ClientId> {
        self.live.iter().copied().max_by_key(|id| {
            let instance = self.instances.get(id).copied().unwrap_or(*id);
            (mix(instance ^ mix(agent)), *id)
        })
    }
}

/// SplitMix64's finalizer: a cheap, well-spread 64-bit mix (not a secret).
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What the intermediate knows of one connector's liveness.
#[derive(Debug, Clone)]
pub struct Liveness {
    /// When quiche last processed a packet from it.
    heard: Instant,
    /// quiche's `recv` counter at `heard`.
    recv_seen: usize,
    live: bool,
}

/// A change in a connector's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LivenessChange {
    Lost,
    Back,
}

impl Liveness {
    pub fn new(now: Instant, recv: usize) -> Self {
        Liveness {
            heard: now,
            recv_seen: recv,
            live: true,
        }
    }

    pub fn is_live(&self) -> bool {
        self.live
    }

    /// Takes quiche's packets-processed counter at `now`; says whether the connector
    /// just went out of or came back into rotation.
    pub fn observe(&mut self, recv: usize, now: Instant) -> Option<LivenessChange> {
        if recv != self.recv_seen {
            self.recv_seen = recv;
            self.heard = now;
            if !self.live {
                self.live = true;
                return Some(LivenessChange::Back);
            }
        } else if self.live && now.saturating_duration_since(self.heard) >= DEAD_AFTER {
            self.live = false;
            return Some(LivenessChange::Lost);
        }
        None
    }

    /// Whether to send it an ack-eliciting packet now.
    pub fn wants_probe(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.heard) >= PROBE_AFTER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_spread_over_connectors_and_every_relay_picks_alike() {
        let mut s = ConnectorSet::default();
        assert_eq!(s.pick_for(7), None);
        assert!(s.add(1) && s.add(2) && s.add(3));
        assert!(!s.add(2));
        for (id, inst) in [(1, 0xaaaa), (2, 0xbbbb), (3, 0xcccc)] {
            s.set_instance(id, inst);
        }
        let picks: Vec<_> = (0..300u64).map(|a| s.pick_for(a).unwrap()).collect();
        for c in [1, 2, 3] {
            let n = picks.iter().filter(|&&p| p == c).count();
            assert!((60..=140).contains(&n), "connector {c}: {n} of 300 agents");
        }
        // Another relay knows the same connectors under other client IDs, in
        // another order: it picks the same instance for every agent.
        let mut other = ConnectorSet::default();
        for (id, inst) in [(30, 0xcccc), (10, 0xaaaa), (20, 0xbbbb)] {
            other.add(id);
            other.set_instance(id, inst);
        }
        for a in 0..300u64 {
            assert_eq!(other.pick_for(a).unwrap(), s.pick_for(a).unwrap() * 10);
        }
        // A lost connector's agents move; the others' stay.
        s.set_live(2, false);
        assert_eq!(s.live(), &[1, 3]);
        for (a, &p) in picks.iter().enumerate() {
            let now = s.pick_for(a as u64).unwrap();
            assert_ne!(now, 2);
            if p != 2 {
                assert_eq!(now, p, "agent {a} kept its connector");
            }
        }
        s.set_live(2, true);
        assert_eq!(s.live(), &[1, 2, 3], "back in its place");
        s.set_live(9, true);
        assert_eq!(s.live(), &[1, 2, 3], "an unregistered id is not added");
        s.remove(1);
        assert_eq!((s.all(), s.live()), (&[2, 3][..], &[2, 3][..]));
        assert!(!s.contains(1) && s.contains(3));
    }

    #[test]
    fn silence_takes_a_connector_out_and_processed_packets_bring_it_back() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, 10);
        assert!(!l.wants_probe(t0));
        assert!(l.wants_probe(t0 + PROBE_AFTER));
        assert_eq!(l.observe(11, t0 + Duration::from_millis(500)), None);
        // Silence is measured from the last progress, not from creation.
        assert_eq!(l.observe(11, t0 + Duration::from_millis(1900)), None);
        assert_eq!(
            l.observe(11, t0 + Duration::from_millis(500) + DEAD_AFTER),
            Some(LivenessChange::Lost)
        );
        assert!(!l.is_live());
        assert_eq!(
            l.observe(11, t0 + Duration::from_secs(10)),
            None,
            "lost once"
        );
        assert_eq!(
            l.observe(12, t0 + Duration::from_secs(11)),
            Some(LivenessChange::Back)
        );
        assert!(l.is_live());
    }
}
