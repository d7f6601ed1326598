//! The relays (intermediates) of one deployment, as an agent or connector sees them:
//! one control connection to each, on the caller's one UDP socket.
//!
//! - **Connectors** register every service with every relay, so whichever relay an
//!   agent picks can set up a session to them.
//! - **Agents** register with every relay too (that is what keeps a second one warm:
//!   connected, authorized, its RTT measured), and run each service's relay session
//!   and datagram relay on one of them, chosen by [`RelaySet::choose`].
//!
//! **Relay choice** (after Firezone, which hands clients a few nearby relays and
//! picks by measured RTT): among relays that are connected, registered for the
//! service and not draining, those within [`RTT_TOLERANCE`] of the fastest are
//! equivalent, and a hash of a per-client random seed and the service picks one of
//! them, so load spreads over near-equal relays instead of piling onto whichever
//! measured a millisecond less. The choice is sticky: a service moves only when its
//! relay is lost or drains.
//!
//! Addresses come from the configuration (a list, or a DNS name resolved to every
//! relay and re-resolved by the driver); [`RelaySet::set_addrs`] follows them as
//! relays appear and disappear. Each client judges its relay alive with
//! [`crate::client::Liveness`], so a killed relay is noticed in about a second.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::client::{ClientConfig, ClientError, ClientEvent, ControlClient};

/// Relays whose RTT is within this much of the fastest one's (or within 20% of it,
/// whichever is more) count as equally fast.
pub const RTT_TOLERANCE: Duration = Duration::from_millis(10);

/// One relay: its control connection.
pub struct Relay {
    pub client: ControlClient,
}

impl Relay {
    pub fn addr(&self) -> SocketAddr {
        self.client.server()
    }

    /// Connected and not draining.
    pub fn is_usable(&self) -> bool {
        self.client.is_established() && !self.client.is_draining()
    }

    /// It announced a drain (DRAINING): no new sessions go to it.
    pub fn is_draining(&self) -> bool {
        self.client.is_draining()
    }
}

pub struct RelaySet {
    /// Every client's configuration but its `server`.
    template: ClientConfig,
    local: SocketAddr,
    /// In configuration order; the first is the "primary" older single-relay
    /// callers see.
    relays: Vec<Relay>,
    seed: u64,
    /// Where `poll_transmit` starts, so one busy relay cannot starve the others.
    next_tx: usize,
    /// Relays removed from the list, closing: kept until their CONNECTION_CLOSE is
    /// out, so the relay frees their state at once instead of at its idle timeout.
    leaving: Vec<ControlClient>,
}

impl RelaySet {
    /// Starts a handshake to each of `addrs` (at least one: with none, `template`'s
    /// `server`). `seed` spreads choices among equally fast relays: give each
    /// client a random one.
    pub fn new(
        template: ClientConfig,
        addrs: &[SocketAddr],
        local: SocketAddr,
        seed: u64,
        now: Instant,
    ) -> Result<Self, ClientError> {
        let mut set = RelaySet {
            template,
            local,
            relays: Vec::new(),
            seed,
            next_tx: 0,
            leaving: Vec::new(),
        };
        let addrs = if addrs.is_empty() {
            vec![set.template.server]
        } else {
            addrs.to_vec()
        };
        set.set_addrs(&addrs, now)?;
        Ok(set)
    }

    /// Follows the deployment's relays: connects to new addresses, closes and forgets
    /// the ones no longer listed. Returns the removed addresses (their sessions are
    /// gone). An empty list is ignored (a failed DNS lookup must not drop every relay).
    pub fn set_addrs(
        &mut self,
        addrs: &[SocketAddr],
        now: Instant,
    ) -> Result<Vec<SocketAddr>, ClientError> {
        if addrs.is_empty() {
            return Ok(Vec::new());
        }
        let mut removed = Vec::new();
        for r in std::mem::take(&mut self.relays) {
            if addrs.contains(&r.addr()) {
                self.relays.push(r);
            } else {
                let mut c = r.client;
                c.close("relay removed from the deployment");
                tracing::info!("relay {}: removed from the deployment", c.server());
                removed.push(c.server());
                self.leaving.push(c);
            }
        }
        for &addr in addrs {
            if self.get(addr).is_none() {
                let mut cfg = self.template.clone();
                cfg.server = addr;
                let client = ControlClient::new(cfg, self.local, now)?;
                tracing::info!("relay {addr}: connecting");
                self.relays.push(Relay { client });
            }
        }
        Ok(removed)
    }

    /// A reloaded configuration for every client (each keeps its address).
    pub fn reconfigure(&mut self, cfg: ClientConfig) -> Result<(), ClientError> {
        for r in &mut self.relays {
            let mut c = cfg.clone();
            c.server = r.addr();
            r.client.reconfigure(c)?;
        }
        self.template = cfg;
        Ok(())
    }

    /// The liveness judgement of every client, present and future.
    pub fn set_liveness(&mut self, l: Option<crate::client::Liveness>) {
        self.template.liveness = l;
        for r in &mut self.relays {
            r.client.set_liveness(l);
        }
    }

    pub fn len(&self) -> usize {
        self.relays.len()
    }

    pub fn is_empty(&self) -> bool {
        self.relays.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Relay> {
        self.relays.iter()
    }

    pub fn get(&self, addr: SocketAddr) -> Option<&ControlClient> {
        self.relays
            .iter()
            .find(|r| r.addr() == addr)
            .map(|r| &r.client)
    }

    pub fn get_mut(&mut self, addr: SocketAddr) -> Option<&mut ControlClient> {
        self.relays
            .iter_mut()
            .find(|r| r.addr() == addr)
            .map(|r| &mut r.client)
    }

    /// The first relay of the configuration.
    pub fn primary(&self) -> &ControlClient {
        &self.relays[0].client
    }

    pub fn primary_mut(&mut self) -> &mut ControlClient {
        &mut self.relays[0].client
    }

    /// Whether `addr` is a relay that is connected and not draining.
    pub fn is_usable(&self, addr: SocketAddr) -> bool {
        self.relays
            .iter()
            .any(|r| r.addr() == addr && r.is_usable())
    }

    /// Some relay is connected.
    pub fn any_established(&self) -> bool {
        self.relays.iter().any(|r| r.client.is_established())
    }

    /// The address the first connected relay sees us at (QAD).
    pub fn observed_address(&self) -> Option<SocketAddr> {
        self.relays
            .iter()
            .filter(|r| r.client.is_established())
            .find_map(|r| r.client.observed_address())
            .or_else(|| self.relays.iter().find_map(|r| r.client.observed_address()))
    }

    /// Feeds a datagram from `from` to that relay's client; false if no relay is
    /// at `from`.
    pub fn recv(&mut self, buf: &mut [u8], from: SocketAddr, now: Instant) -> bool {
        let client = match self.relays.iter_mut().find(|r| r.addr() == from) {
            Some(r) => &mut r.client,
            None => match self.leaving.iter_mut().find(|c| c.server() == from) {
                Some(c) => c,
                None => return false,
            },
        };
        client.recv(buf, from, now);
        true
    }

    pub fn poll_transmit(&mut self, out: &mut [u8], now: Instant) -> Option<(usize, SocketAddr)> {
        if let Some(t) = self
            .leaving
            .iter_mut()
            .find_map(|c| c.poll_transmit(out, now))
        {
            return Some(t);
        }
        let n = self.relays.len();
        for i in 0..n {
            let k = (self.next_tx + i) % n;
            if let Some(t) = self.relays[k].client.poll_transmit(out, now) {
                self.next_tx = (k + 1) % n;
                return Some(t);
            }
        }
        None
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.relays
            .iter()
            .map(|r| &r.client)
            .chain(&self.leaving)
            .filter_map(|c| c.poll_timeout())
            .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for c in self
            .relays
            .iter_mut()
            .map(|r| &mut r.client)
            .chain(&mut self.leaving)
        {
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
        }
        // Their events concern nobody any more.
        for c in &mut self.leaving {
            while c.poll_event().is_some() {}
        }
        self.leaving.retain(|c| !c.is_stopped());
    }

    /// The next event of any relay, with its address.
    pub fn poll_event(&mut self) -> Option<(SocketAddr, ClientEvent)> {
        self.relays
            .iter_mut()
            .find_map(|r| Some((r.addr(), r.client.poll_event()?)))
    }

    /// Relays `service` can use, fastest first: connected, registered for it, not
    /// draining; with their RTTs.
    pub fn ranked(&self, service: &str) -> Vec<(SocketAddr, Duration)> {
        let mut v: Vec<(SocketAddr, Duration)> = self
            .relays
            .iter()
            .filter(|r| r.is_usable() && r.client.is_registered(service))
            .filter_map(|r| Some((r.addr(), r.client.rtt()?)))
            .collect();
        v.sort_by_key(|&(a, rtt)| (rtt, a));
        v
    }

    /// The relay for `service`'s next session, other than `avoid`: among the usable
    /// relays within the tolerance of the fastest, the one a hash of the seed and
    /// the service picks.
    pub fn choose(&self, service: &str, avoid: Option<SocketAddr>) -> Option<SocketAddr> {
        let ranked: Vec<_> = self
            .ranked(service)
            .into_iter()
            .filter(|(a, _)| Some(*a) != avoid)
            .collect();
        let fastest = ranked.first()?.1;
        let limit = fastest + RTT_TOLERANCE.max(fastest / 5);
        let near: Vec<SocketAddr> = ranked
            .iter()
            .filter(|(_, rtt)| *rtt <= limit)
            .map(|(a, _)| *a)
            .collect();
        let pick = (fnv1a(self.seed, service.as_bytes()) % near.len() as u64) as usize;
        Some(near[pick])
    }

    /// Closes every connection for good.
    pub fn close(&mut self, reason: &str) {
        for r in &mut self.relays {
            r.client.close(reason);
        }
    }

    /// Every connection closed for good and nothing left to send.
    pub fn is_stopped(&self) -> bool {
        self.relays.iter().all(|r| r.client.is_stopped())
    }
}

/// FNV-1a over the seed's bytes and `data`: a stable spread, not a secret.
fn fnv1a(seed: u64, data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().iter().chain(data) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_spreads_services_and_seeds() {
        let picks: std::collections::BTreeSet<u64> =
            (0..64u64).map(|seed| fnv1a(seed, b"db") % 3).collect();
        assert_eq!(
            picks.len(),
            3,
            "64 seeds reach all of three near-equal relays"
        );
        assert_eq!(fnv1a(7, b"db"), fnv1a(7, b"db"), "stable for one client");
    }
}
