//! The connectors of one service, for high availability: every connector that
//! registers for a service serves it, side by side with the others.
//!
//! - **New work is spread**: relay sessions (one per agent and service) and new
//!   datagram-relay flows go to the live connectors in turn.
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
    /// Round-robin position for [`ConnectorSet::pick`].
    next: usize,
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

    /// The next live connector in turn, for new work.
    pub fn pick(&mut self) -> Option<ClientId> {
        if self.live.is_empty() {
            return None;
        }
        self.next = self.next.wrapping_add(1);
        Some(self.live[self.next % self.live.len()])
    }
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
    fn picks_rotate_over_live_connectors_in_registration_order() {
        let mut s = ConnectorSet::default();
        assert_eq!(s.pick(), None);
        assert!(s.add(1) && s.add(2) && s.add(3));
        assert!(!s.add(2));
        let picks: Vec<_> = (0..6).map(|_| s.pick().unwrap()).collect();
        for c in [1, 2, 3] {
            assert_eq!(picks.iter().filter(|&&p| p == c).count(), 2, "{picks:?}");
        }
        s.set_live(2, false);
        assert_eq!(s.live(), &[1, 3]);
        assert!((0..6).all(|_| s.pick() != Some(2)));
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
