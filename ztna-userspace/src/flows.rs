//! Return-path routing for the datagram relay.
//!
//! The connector answers with IP packets addressed to the agent's tunnel address and
//! port. Several agents may use the same tunnel address (every laptop defaults to the
//! same one) and even the same source port, so the reply's 5-tuple alone cannot name
//! the agent. The intermediate therefore remembers, per service, which agent sent each
//! flow; when a second agent opens a flow whose 5-tuple is already owned by another
//! agent, the intermediate translates that agent's source port (or ICMP identifier) to
//! a free one on the way in and back on the way out, like a NAT would.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use ztna_core::packet::{FlowKey, Proto};

/// Identifies a client connection inside the intermediate.
pub type ClientId = u64;

/// How long an unused flow is remembered.
pub const FLOW_IDLE: Duration = Duration::from_secs(180);

#[derive(Clone, Debug)]
struct Outbound {
    /// Key as it leaves towards the connector (source port possibly translated).
    wire: FlowKey,
    last_seen: Instant,
}

#[derive(Clone, Debug)]
pub struct Inbound {
    pub agent: ClientId,
    /// The agent's own key, to restore the translated port on the way back.
    pub original: FlowKey,
    last_seen: Instant,
}

impl Inbound {
    pub fn translated(&self, wire: &FlowKey) -> bool {
        self.original.src.port() != wire.src.port()
    }
}

#[derive(Default)]
pub struct FlowTable {
    out: HashMap<(ClientId, String, FlowKey), Outbound>,
    inb: HashMap<(String, FlowKey), Inbound>,
    /// Keys of each agent's entries in `out` and `inb`, so that forgetting an agent
    /// costs its own flows, not a scan of the table.
    by_agent: HashMap<ClientId, AgentFlows>,
    next_port: u16,
}

#[derive(Default)]
struct AgentFlows {
    /// (service, the agent's key) in `out`.
    out: HashSet<(String, FlowKey)>,
    /// (service, wire key) in `inb`.
    inb: HashSet<(String, FlowKey)>,
}

/// Outcome of registering an agent→connector packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboundRoute {
    pub wire: FlowKey,
    /// `Some(port)` when the packet's source port must be rewritten to `port`.
    pub rewrite_to: Option<u16>,
}

fn with_src_port(key: FlowKey, port: u16) -> FlowKey {
    let mut k = key;
    k.src.set_port(port);
    if matches!(k.proto, Proto::Icmp | Proto::Icmpv6) {
        // Echo flows use the identifier on both sides.
        k.dst.set_port(port);
    }
    k
}

impl FlowTable {
    pub fn len(&self) -> usize {
        self.inb.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inb.is_empty()
    }

    /// Records (or refreshes) a flow from `agent` and says how to send it on.
    pub fn outbound(
        &mut self,
        agent: ClientId,
        service: &str,
        key: FlowKey,
        now: Instant,
    ) -> OutboundRoute {
        let okey = (agent, service.to_string(), key);
        if let Some(o) = self.out.get_mut(&okey) {
            o.last_seen = now;
            let wire = o.wire;
            if let Some(i) = self.inb.get_mut(&(service.to_string(), wire)) {
                i.last_seen = now;
            }
            return OutboundRoute {
                wire,
                rewrite_to: (wire.src.port() != key.src.port()).then_some(wire.src.port()),
            };
        }
        let mut wire = key;
        let taken = |t: &Self, w: &FlowKey| t.inb.contains_key(&(service.to_string(), *w));
        if taken(self, &wire) {
            // Same 5-tuple owned by another agent: pick a free port.
            for _ in 0..16384 {
                self.next_port = if self.next_port < 49152 || self.next_port == u16::MAX {
                    49152
                } else {
                    self.next_port + 1
                };
                let candidate = with_src_port(key, self.next_port);
                if !taken(self, &candidate) {
                    wire = candidate;
                    break;
                }
            }
        }
        self.out.insert(
            okey,
            Outbound {
                wire,
                last_seen: now,
            },
        );
        let index = self.by_agent.entry(agent).or_default();
        index.out.insert((service.to_string(), key));
        index.inb.insert((service.to_string(), wire));
        self.inb.insert(
            (service.to_string(), wire),
            Inbound {
                agent,
                original: key,
                last_seen: now,
            },
        );
        OutboundRoute {
            wire,
            rewrite_to: (wire != key).then_some(wire.src.port()),
        }
    }

    /// Finds the agent for a connector→agent packet whose own key is `reply`.
    pub fn inbound(&mut self, service: &str, reply: &FlowKey, now: Instant) -> Option<&Inbound> {
        let wire = reply.reversed();
        let entry = self.inb.get_mut(&(service.to_string(), wire))?;
        entry.last_seen = now;
        Some(entry)
    }

    /// Finds the service of a raw reply from a connector that serves `services`.
    pub fn inbound_any<'a>(
        &mut self,
        services: impl Iterator<Item = &'a String>,
        reply: &FlowKey,
        now: Instant,
    ) -> Option<(String, Inbound)> {
        for s in services {
            if let Some(i) = self.inbound(s, reply, now) {
                return Some((s.clone(), i.clone()));
            }
        }
        None
    }

    /// Forgets every flow of a client that went away.
    pub fn remove_client(&mut self, agent: ClientId) {
        let Some(index) = self.by_agent.remove(&agent) else {
            return;
        };
        for (service, key) in index.out {
            self.out.remove(&(agent, service, key));
        }
        for k in index.inb {
            if self.inb.get(&k).is_some_and(|i| i.agent == agent) {
                self.inb.remove(&k);
            }
        }
    }

    pub fn expire(&mut self, now: Instant) {
        let by_agent = &mut self.by_agent;
        self.out.retain(|(agent, service, key), o| {
            let keep = now.saturating_duration_since(o.last_seen) < FLOW_IDLE;
            if !keep && let Some(i) = by_agent.get_mut(agent) {
                i.out.remove(&(service.clone(), *key));
            }
            keep
        });
        self.inb.retain(|k, i| {
            let keep = now.saturating_duration_since(i.last_seen) < FLOW_IDLE;
            if !keep && let Some(a) = by_agent.get_mut(&i.agent) {
                a.inb.remove(k);
            }
            keep
        });
        by_agent.retain(|_, a| !a.out.is_empty() || !a.inb.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src: &str, dst: &str) -> FlowKey {
        FlowKey {
            proto: Proto::Udp,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
        }
    }

    #[test]
    fn distinct_flows_pass_untranslated_and_route_back() {
        let now = Instant::now();
        let mut t = FlowTable::default();
        let a = key("100.64.0.2:5000", "10.100.0.1:7");
        let b = key("100.64.0.2:5001", "10.100.0.1:7");
        assert_eq!(t.outbound(1, "echo", a, now).rewrite_to, None);
        assert_eq!(t.outbound(2, "echo", b, now).rewrite_to, None);
        assert_eq!(t.inbound("echo", &a.reversed(), now).unwrap().agent, 1);
        assert_eq!(t.inbound("echo", &b.reversed(), now).unwrap().agent, 2);
        assert!(t.inbound("other", &a.reversed(), now).is_none());
    }

    #[test]
    fn colliding_flow_gets_a_translated_port_and_keeps_it() {
        let now = Instant::now();
        let mut t = FlowTable::default();
        let k = key("100.64.0.2:5000", "10.100.0.1:7");
        assert_eq!(t.outbound(1, "echo", k, now).rewrite_to, None);
        let r = t.outbound(2, "echo", k, now);
        let port = r.rewrite_to.expect("second agent must be translated");
        assert_ne!(port, 5000);
        assert_eq!(r.wire.src.port(), port);
        // the same agent's next packet reuses the translation
        assert_eq!(t.outbound(2, "echo", k, now).rewrite_to, Some(port));
        let back = t.inbound("echo", &r.wire.reversed(), now).unwrap();
        assert_eq!(back.agent, 2);
        assert_eq!(back.original, k);
        assert!(back.translated(&r.wire));
        assert_eq!(t.inbound("echo", &k.reversed(), now).unwrap().agent, 1);
    }

    #[test]
    fn removing_agents_costs_their_own_flows_not_a_table_scan() {
        let now = Instant::now();
        let mut t = FlowTable::default();
        let n = 30_000u64;
        for agent in 1..=n {
            let port = 1024 + (agent % 60_000) as u16;
            t.outbound(
                agent,
                "echo",
                key(&format!("100.64.0.2:{port}"), "10.100.0.1:7"),
                now,
            );
        }
        let start = Instant::now();
        for agent in 1..=n {
            t.remove_client(agent);
        }
        let took = start.elapsed();
        assert!(t.is_empty() && t.out.is_empty() && t.by_agent.is_empty());
        assert!(
            took < Duration::from_secs(2),
            "removing {n} agents took {took:?}"
        );
    }

    #[test]
    fn index_follows_expiry_and_keeps_other_agents_flows() {
        let now = Instant::now();
        let mut t = FlowTable::default();
        let k = key("100.64.0.2:5000", "10.100.0.1:7");
        t.outbound(1, "echo", k, now);
        let later = now + FLOW_IDLE - Duration::from_secs(1);
        // Agent 2 uses the same 5-tuple (translated) later.
        let r = t.outbound(2, "echo", k, later);
        t.expire(now + FLOW_IDLE + Duration::from_millis(1));
        assert!(
            !t.by_agent.contains_key(&1),
            "expired flows leave the index"
        );
        t.remove_client(1);
        assert_eq!(
            t.inbound("echo", &r.wire.reversed(), later).unwrap().agent,
            2
        );
        t.remove_client(2);
        assert!(t.is_empty() && t.out.is_empty());
    }

    #[test]
    fn removal_and_expiry() {
        let now = Instant::now();
        let mut t = FlowTable::default();
        let k = key("100.64.0.2:5000", "10.100.0.1:7");
        t.outbound(1, "echo", k, now);
        t.remove_client(1);
        assert!(t.inbound("echo", &k.reversed(), now).is_none());
        t.outbound(1, "echo", k, now);
        t.expire(now + FLOW_IDLE + Duration::from_secs(1));
        assert!(t.is_empty());
    }
}
