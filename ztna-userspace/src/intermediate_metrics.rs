//! The intermediate's Prometheus metrics. Labels are low-cardinality only (role,
//! result, status, path, verdict): never a connection ID or a client address.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `ztna_connections` | gauge | `role` = agent, connector, unregistered |
//! | `ztna_relay_sessions` | gauge | |
//! | `ztna_datagram_flows` | gauge | |
//! | `ztna_registrations_total` | counter | `role`, `result` = accepted, refused |
//! | `ztna_registration_nacks_total` | counter | `status` = invalid_id, not_authorized, draining |
//! | `ztna_authorization_refusals_total` | counter | `what` = registration, relay_session, service_prefixes, candidates |
//! | `ztna_forwarded_packets_total`, `ztna_forwarded_bytes_total` | counter | `path` = xdp, userspace, datagram |
//! | `ztna_xdp_packets_total`, `ztna_xdp_bytes_total` | counter | `verdict` (`ztna_common::relay::Verdict` names) |
//! | `ztna_xdp_attached` | gauge | |
//! | `ztna_draining` | gauge | |
//! | `ztna_handshake_duration_seconds` | histogram | |
//! | `ztna_reloads_total` | counter | `result` = applied, refused |
//! | `ztna_intermediate_<counter>_total` | counter | every counter of `IntermediateStats` |

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use ztna_common::relay::{VERDICT_COUNT, Verdict};

use crate::intermediate::IntermediateStats;
use crate::metrics::{CountersCollector, encode_family};

/// Values the loop sets every second (gauges, and XDP totals read from the maps).
#[derive(Debug, Default)]
pub struct IntermediateGauges {
    pub agents: AtomicU64,
    pub connectors: AtomicU64,
    pub unregistered: AtomicU64,
    pub relay_sessions: AtomicU64,
    pub datagram_flows: AtomicU64,
    pub xdp_attached: AtomicU64,
    /// 1 while draining (SIGTERM).
    pub draining: AtomicU64,
    pub xdp_packets: [AtomicU64; VERDICT_COUNT as usize],
    pub xdp_bytes: [AtomicU64; VERDICT_COUNT as usize],
}

/// The handshake-duration histogram: 1 ms to about 4 s.
pub fn handshake_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 13))
}

/// A registry with every intermediate metric.
pub fn registry(
    stats: Arc<IntermediateStats>,
    gauges: Arc<IntermediateGauges>,
    handshake: Histogram,
) -> Registry {
    let mut r = Registry::default();
    r.register(
        "ztna_handshake_duration_seconds",
        "Time from a client's first Initial to its completed QUIC handshake",
        handshake,
    );
    r.register_collector(Box::new(Families {
        stats: stats.clone(),
        gauges,
    }));
    r.register_collector(Box::new(CountersCollector {
        prefix: "intermediate",
        counters: stats,
    }));
    r
}

#[derive(Debug)]
struct Families {
    stats: Arc<IntermediateStats>,
    gauges: Arc<IntermediateGauges>,
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Collector for Families {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (s, g) = (&*self.stats, &*self.gauges);
        encode_family(
            &mut e,
            "ztna_connections",
            "Client connections by role (unregistered: no registration yet)",
            true,
            &[
                ([("role", "agent")], get(&g.agents)),
                ([("role", "connector")], get(&g.connectors)),
                ([("role", "unregistered")], get(&g.unregistered)),
            ],
        )?;
        encode_family::<0>(
            &mut e,
            "ztna_relay_sessions",
            "Relay sessions (agent-connector pairs forwarded by connection ID)",
            true,
            &[([], get(&g.relay_sessions))],
        )?;
        encode_family::<0>(
            &mut e,
            "ztna_datagram_flows",
            "Flows remembered by the datagram relay",
            true,
            &[([], get(&g.datagram_flows))],
        )?;
        encode_family::<0>(
            &mut e,
            "ztna_xdp_attached",
            "1 if the XDP program is attached",
            true,
            &[([], get(&g.xdp_attached))],
        )?;
        encode_family::<0>(
            &mut e,
            "ztna_draining",
            "1 while the intermediate drains (SIGTERM): it refuses new relay sessions and registrations and forwards the existing sessions until they close or the drain timeout passes",
            true,
            &[([], get(&g.draining))],
        )?;
        let refused = get(&s.registrations_refused);
        let (nack_invalid, nack_auth) = (get(&s.nacks_invalid_id), get(&s.nacks_not_authorized));
        encode_family(
            &mut e,
            "ztna_registrations",
            "Registrations by role and result (refused ones are not counted by role)",
            false,
            &[
                (
                    [("role", "agent"), ("result", "accepted")],
                    get(&s.registrations_agent),
                ),
                (
                    [("role", "connector"), ("result", "accepted")],
                    get(&s.registrations_connector),
                ),
                ([("role", "any"), ("result", "refused")], refused),
            ],
        )?;
        encode_family(
            &mut e,
            "ztna_registration_nacks",
            "Registration NACKs sent, by status",
            false,
            &[
                ([("status", "invalid_id")], nack_invalid),
                ([("status", "not_authorized")], nack_auth),
                ([("status", "draining")], get(&s.nacks_draining)),
            ],
        )?;
        encode_family(
            &mut e,
            "ztna_authorization_refusals",
            "Requests refused because the client's certificate does not allow them",
            false,
            &[
                ([("what", "registration")], nack_auth),
                (
                    [("what", "relay_session")],
                    get(&s.relay_sessions_refused_not_authorized),
                ),
                (
                    [("what", "service_prefixes")],
                    get(&s.service_prefixes_refused),
                ),
                ([("what", "candidates")], get(&s.candidates_refused)),
            ],
        )?;
        let xdp_fwd = |a: &[AtomicU64; VERDICT_COUNT as usize]| {
            get(&a[Verdict::Tx as usize]) + get(&a[Verdict::Redirect as usize])
        };
        encode_family(
            &mut e,
            "ztna_forwarded_packets",
            "Relayed packets by path: XDP (in the kernel), the userspace forwarder, the datagram relay",
            false,
            &[
                ([("path", "xdp")], xdp_fwd(&g.xdp_packets)),
                ([("path", "userspace")], get(&s.userspace_forwarded_packets)),
                (
                    [("path", "datagram")],
                    get(&s.relayed_to_agent) + get(&s.relayed_to_connector),
                ),
            ],
        )?;
        encode_family(
            &mut e,
            "ztna_forwarded_bytes",
            "Relayed bytes by path (XDP: whole frames; userspace: UDP payloads; datagram: inner IP packets)",
            false,
            &[
                ([("path", "xdp")], xdp_fwd(&g.xdp_bytes)),
                ([("path", "userspace")], get(&s.userspace_forwarded_bytes)),
                ([("path", "datagram")], get(&s.relayed_bytes)),
            ],
        )?;
        let per_verdict = |a: &[AtomicU64; VERDICT_COUNT as usize]| {
            Verdict::ALL
                .iter()
                .map(|v| ([("verdict", v.name())], get(&a[*v as usize])))
                .collect::<Vec<_>>()
        };
        encode_family(
            &mut e,
            "ztna_xdp_packets",
            "Packets seen by the XDP program, by its verdict",
            false,
            &per_verdict(&g.xdp_packets),
        )?;
        encode_family(
            &mut e,
            "ztna_xdp_bytes",
            "Bytes (whole frames) seen by the XDP program, by its verdict",
            false,
            &per_verdict(&g.xdp_bytes),
        )?;
        encode_family(
            &mut e,
            "ztna_reloads",
            "Configuration reloads (SIGHUP) by result",
            false,
            &[
                ([("result", "applied")], get(&s.reloads)),
                ([("result", "refused")], get(&s.reloads_failed)),
            ],
        )?;
        Ok(())
    }
}
