//! Return-path routing for the datagram relay.
//!
//! The connector answers with IP packets addressed to the agent's tunnel address and
//! port. Several agents may use the same tunnel address (every laptop defaults to the
//! same one) and even the same source port, so the reply's 5-tuple alone cannot name
//! the agent. The intermediate therefore remembers, per service, which agent sent each
//! flow; when a second agent opens a flow whose 5-tuple is already owned by another
//! agent, the intermediate translates that agent's source port (or ICMP identifier) to
//! a free one on the way in and back on the way out, like a NAT would.
//!
//! A service may have several connectors up at once (high availability). Each flow is
//! pinned to the connector that carried its first packet, so its replies and its
//! connector-side state (NAT entries, TCP connections) stay in one place; new flows
//! are spread over the live connectors in turn. When a flow's connector is no longer
//! live, its next packet pins it to a survivor.

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
    /// The connector the flow is pinned to.
    connector: ClientId,
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
    /// Per service, (agent, the agent's key) → the flow. Nested by service, like
    /// `inb`, so a known flow's packet is looked up without building a `String`.
    out: HashMap<String, HashMap<(ClientId, FlowKey), Outbound>>,
    /// Per service, wire key → owner. Nested by service so that probing candidate
    /// ports looks up a `FlowKey` in a borrowed map: no `String` is built per probe.
    inb: HashMap<String, HashMap<FlowKey, Inbound>>,
    /// Entries in `inb` over all services.
    inb_len: usize,
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
    /// The connector to send the packet to.
    pub connector: ClientId,
    /// `Some(port)` when the packet's source port must be rewritten to `port`.
    pub rewrite_to: Option<u16>,
}

/// Why a new flow was not recorded; the caller drops the packet and counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowRefused {
    /// The 5-tuple is owned by another agent and no translation port was free
    /// within [`MAX_PORT_PROBES`] tries. Sending it untranslated would overwrite the
    /// other agent's return route.
    NoFreePort,
    /// The agent already holds [`MAX_FLOWS_PER_AGENT`] flows.
    AgentLimit,
    /// The service has no live connector.
    NoConnector,
}

/// Flows one agent may hold at once (all services): one agent must not fill the
/// translation range (16384 ports per destination) or the table on its own.
pub const MAX_FLOWS_PER_AGENT: usize = 4096;

/// Candidate translation ports tried per new colliding flow. Bounds the work one
/// packet can cost when the range is (nearly) full; with the range 90% full the
/// chance of missing a free port is 0.9^64 ≈ 0.1%, and that packet is dropped.
pub const MAX_PORT_PROBES: usize = 64;

/// First port of the translation range (the IANA dynamic range, 49152..=65535).
const TRANSLATION_FIRST: u16 = 49152;

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
        self.inb_len
    }

    pub fn is_empty(&self) -> bool {
        self.inb_len == 0
    }

    /// Records (or refreshes) a flow from `agent` and says how to send it on, or
    /// refuses a new flow that cannot be routed back to this agent alone.
    /// `connectors` are the service's live connectors: a known flow stays on its
    /// connector while that one is among them; a new flow, or one whose connector
    /// is gone, goes to `pick` (the agent's connector, see `ConnectorSet::pick_for`).
    pub fn outbound(
        &mut self,
        agent: ClientId,
        service: &str,
        key: FlowKey,
        now: Instant,
        connectors: &[ClientId],
        pick: ClientId,
    ) -> Result<OutboundRoute, FlowRefused> {
        if connectors.is_empty() {
            return Err(FlowRefused::NoConnector);
        }
        if let Some(o) = self
            .out
            .get_mut(service)
            .and_then(|m| m.get_mut(&(agent, key)))
        {
            o.last_seen = now;
            if !connectors.contains(&o.connector) {
                o.connector = pick;
            }
            let wire = o.wire;
            if let Some(i) = self.inb.get_mut(service).and_then(|m| m.get_mut(&wire)) {
                i.last_seen = now;
            }
            return Ok(OutboundRoute {
                wire,
                connector: o.connector,
                rewrite_to: (wire.src.port() != key.src.port()).then_some(wire.src.port()),
            });
        }
        if self
            .by_agent
            .get(&agent)
            .is_some_and(|a| a.out.len() >= MAX_FLOWS_PER_AGENT)
        {
            return Err(FlowRefused::AgentLimit);
        }
        let mut wire = key;
        if let Some(owned) = self.inb.get(service)
            && owned.contains_key(&wire)
        {
            // Same 5-tuple owned by another agent: pick a free port, or refuse.
            // Falling back to the agent's own key would overwrite the owner's
            // return route and hand it this agent's replies.
            let mut found = None;
            for _ in 0..MAX_PORT_PROBES {
                self.next_port = if self.next_port < TRANSLATION_FIRST || self.next_port == u16::MAX
                {
                    TRANSLATION_FIRST
                } else {
                    self.next_port + 1
                };
                let candidate = with_src_port(key, self.next_port);
                if !owned.contains_key(&candidate) {
                    found = Some(candidate);
                    break;
                }
            }
            wire = found.ok_or(FlowRefused::NoFreePort)?;
        }
        let connector = pick;
        self.out.entry(service.to_string()).or_default().insert(
            (agent, key),
            Outbound {
                wire,
                connector,
                last_seen: now,
            },
        );
        let index = self.by_agent.entry(agent).or_default();
        index.out.insert((service.to_string(), key));
        index.inb.insert((service.to_string(), wire));
        let previous = self.inb.entry(service.to_string()).or_default().insert(
            wire,
            Inbound {
                agent,
                original: key,
                last_seen: now,
            },
        );
        debug_assert!(previous.is_none(), "a wire key has one owner");
        self.inb_len += 1;
        Ok(OutboundRoute {
            wire,
            connector,
            rewrite_to: (wire != key).then_some(wire.src.port()),
        })
    }

    /// Finds the agent for a connector→agent packet whose own key is `reply`.
    pub fn inbound(&mut self, service: &str, reply: &FlowKey, now: Instant) -> Option<&Inbound> {
        let wire = reply.reversed();
        let entry = self.inb.get_mut(service)?.get_mut(&wire)?;
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
            if let Some(m) = self.out.get_mut(&service) {
                m.remove(&(agent, key));
                if m.is_empty() {
                    self.out.remove(&service);
                }
            }
        }
        for (service, wire) in index.inb {
            if let Some(m) = self.inb.get_mut(&service)
                && m.get(&wire).is_some_and(|i| i.agent == agent)
            {
                m.remove(&wire);
                self.inb_len -= 1;
                if m.is_empty() {
                    self.inb.remove(&service);
                }
            }
        }
    }

    pub fn expire(&mut self, now: Instant) {
        let by_agent = &mut self.by_agent;
        self.out.retain(|service, m| {
            m.retain(|(agent, key), o| {
                let keep = now.saturating_duration_since(o.last_seen) < FLOW_IDLE;
                if !keep && let Some(i) = by_agent.get_mut(agent) {
                    i.out.remove(&(service.clone(), *key));
                }
                keep
            });
            !m.is_empty()
        });
        let mut removed = 0;
        self.inb.retain(|service, m| {
            m.retain(|wire, i| {
                let keep = now.saturating_duration_since(i.last_seen) < FLOW_IDLE;
                if !keep {
                    removed += 1;
                    if let Some(a) = by_agent.get_mut(&i.agent) {
                        a.inb.remove(&(service.clone(), *wire));
                    }
                }
                keep
            });
            !m.is_empty()
        });
        self.inb_len -= removed;
        by_agent.retain(|_, a| !a.out.is_empty() || !a.inb.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One live connector.
    const C: &[ClientId] = &[100];

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
        assert_eq!(
            t.outbound(1, "echo", a, now, C, 100).unwrap().rewrite_to,
            None
        );
        assert_eq!(
            t.outbound(2, "echo", b, now, C, 100).unwrap().rewrite_to,
            None
        );
        assert_eq!(t.inbound("echo", &a.reversed(), now).unwrap().agent, 1);
        assert_eq!(t.inbound("echo", &b.reversed(), now).unwrap().agent, 2);
        assert!(t.inbound("other", &a.reversed(), now).is_none());
    }

    #[test]
    fn colliding_flow_gets_a_translated_port_and_keeps_it() {
        let now = Instant::now();
        let mut t = FlowTable::default();
        let k = key("100.64.0.2:5000", "10.100.0.1:7");
        assert_eq!(
            t.outbound(1, "echo", k, now, C, 100).unwrap().rewrite_to,
            None
        );
        let r = t.outbound(2, "echo", k, now, C, 100).unwrap();
        let port = r.rewrite_to.expect("second agent must be translated");
        assert_ne!(port, 5000);
        assert_eq!(r.wire.src.port(), port);
        // the same agent's next packet reuses the translation
        assert_eq!(
            t.outbound(2, "echo", k, now, C, 100).unwrap().rewrite_to,
            Some(port)
        );
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
                C,
                100,
            )
            .unwrap();
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
        t.outbound(1, "echo", k, now, C, 100).unwrap();
        let later = now + FLOW_IDLE - Duration::from_secs(1);
        // Agent 2 uses the same 5-tuple (translated) later.
        let r = t.outbound(2, "echo", k, later, C, 100).unwrap();
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
        t.outbound(1, "echo", k, now, C, 100).unwrap();
        t.remove_client(1);
        assert!(t.inbound("echo", &k.reversed(), now).is_none());
        t.outbound(1, "echo", k, now, C, 100).unwrap();
        t.expire(now + FLOW_IDLE + Duration::from_secs(1));
        assert!(t.is_empty());
    }

    /// Fills the translation range for one 5-tuple: agent 1 owns it untranslated,
    /// agents 2.. hold every port of 49152..=65535 for it.
    fn exhausted(now: Instant) -> (FlowTable, FlowKey) {
        let mut t = FlowTable::default();
        let k = key("100.64.0.2:5000", "10.100.0.1:7");
        t.outbound(1, "echo", k, now, C, 100).unwrap();
        let range = (u16::MAX - TRANSLATION_FIRST) as u64 + 1;
        for agent in 2..2 + range {
            let r = t.outbound(agent, "echo", k, now, C, 100).unwrap();
            assert!(r.rewrite_to.is_some());
        }
        (t, k)
    }

    #[test]
    fn exhausted_range_refuses_instead_of_stealing_the_owners_route() {
        let now = Instant::now();
        let (mut t, k) = exhausted(now);
        let before = t.len();
        assert_eq!(
            t.outbound(1_000_000, "echo", k, now, C, 100),
            Err(FlowRefused::NoFreePort)
        );
        assert_eq!(t.len(), before, "a refused flow records nothing");
        // The owner's replies still go to the owner, not to the refused agent.
        let back = t.inbound("echo", &k.reversed(), now).unwrap();
        assert_eq!(back.agent, 1);
        assert!(!t.by_agent.contains_key(&1_000_000));
        // Once translations are freed (every other port here), the next colliding
        // flow gets one.
        let range = (u16::MAX - TRANSLATION_FIRST) as u64 + 1;
        for agent in (2..2 + range).step_by(2) {
            t.remove_client(agent);
        }
        let r = t.outbound(1_000_000, "echo", k, now, C, 100);
        assert!(r.is_ok_and(|r| r.rewrite_to.is_some()), "{r:?}");
    }

    #[test]
    fn refusals_on_an_exhausted_range_cost_bounded_work() {
        let now = Instant::now();
        let (mut t, k) = exhausted(now);
        // Before the bound each refusal probed all 16384 ports, building a String
        // per probe: 2000 packets took seconds. Now each costs MAX_PORT_PROBES.
        let start = Instant::now();
        for agent in 0..2000u64 {
            assert_eq!(
                t.outbound(2_000_000 + agent, "echo", k, now, C, 100),
                Err(FlowRefused::NoFreePort)
            );
        }
        let took = start.elapsed();
        assert!(
            took < Duration::from_millis(500),
            "2000 refusals took {took:?}"
        );
    }

    #[test]
    fn one_agent_holds_at_most_max_flows() {
        let now = Instant::now();
        let mut t = FlowTable::default();
        let flow = |i: usize| {
            key(
                &format!("100.64.0.2:{}", 1024 + i % 60_000),
                &format!("10.100.{}.1:7", i / 60_000),
            )
        };
        for i in 0..MAX_FLOWS_PER_AGENT {
            t.outbound(1, "echo", flow(i), now, C, 100).unwrap();
        }
        assert_eq!(
            t.outbound(1, "echo", flow(MAX_FLOWS_PER_AGENT), now, C, 100),
            Err(FlowRefused::AgentLimit)
        );
        // Its existing flows still pass, and other agents are unaffected.
        assert!(t.outbound(1, "echo", flow(0), now, C, 100).is_ok());
        assert!(
            t.outbound(2, "echo", flow(MAX_FLOWS_PER_AGENT), now, C, 100)
                .is_ok()
        );
        // Expired flows free the agent's quota.
        t.expire(now + FLOW_IDLE + Duration::from_secs(1));
        assert!(
            t.outbound(
                1,
                "echo",
                flow(MAX_FLOWS_PER_AGENT),
                now + FLOW_IDLE,
                C,
                100
            )
            .is_ok()
        );
    }

    #[test]
    fn new_flows_take_the_pick_and_stay_until_their_connector_is_gone() {
        let now = Instant::now();
        let mut t = FlowTable::default();
        let both = [7, 8];
        let flow = |p: u16| key(&format!("100.64.0.2:{p}"), "10.100.0.1:7");
        // The agent's connector (picked by the caller) takes its new flows.
        for p in 0..5 {
            let r = t
                .outbound(1, "echo", flow(5000 + p), now, &both, 7)
                .unwrap();
            assert_eq!(r.connector, 7);
        }
        // Known flows keep their connector even if the pick changes while it lives.
        for p in 0..5 {
            let r = t
                .outbound(1, "echo", flow(5000 + p), now, &both, 8)
                .unwrap();
            assert_eq!(r.connector, 7);
        }
        // Connector 7 is gone: its flows move to the new pick.
        for p in 0..5u16 {
            let r = t.outbound(1, "echo", flow(5000 + p), now, &[8], 8).unwrap();
            assert_eq!(r.connector, 8);
        }
        // 7 is back: the moved flows stay on 8 (no flapping).
        for p in 0..5u16 {
            let r = t
                .outbound(1, "echo", flow(5000 + p), now, &both, 7)
                .unwrap();
            assert_eq!(r.connector, 8);
        }
    }
}
