//! The direct path of each service: connectivity checks signalled through the
//! service's relay session, then a data connection straight to the connector, its
//! liveness and the fallback to the relay. A direct connection is peer to peer: it
//! outlives the relay session that set it up.

use std::time::{Duration, Instant};

use super::{
    AgentEngine, DATA_SETUP_TIMEOUT, DIRECT_DEAD, DIRECT_DEAD_MIN, DIRECT_DEAD_RTTS,
    DIRECT_KEEPALIVE, DIRECT_RETRY, Direct,
};
use crate::client::Role;
use crate::data::DataConnection;
use crate::identity::authorize;
use crate::p2p::{self, Checker};

impl AgentEngine {
    /// Starts, runs and retires the direct paths.
    pub(super) fn service_direct(&mut self, now: Instant, judge_liveness: bool) {
        let Some(quic) = self.data_quic.as_mut() else {
            return;
        };
        if !self.p2p {
            return;
        }
        let observed = self.relays.observed_address();
        for (service, s) in self.services.iter_mut() {
            // A usable relayed data connection is the anchor for hole punching; a
            // direct connection already up needs none (it survives its relay).
            let anchor = s
                .data
                .as_ref()
                .filter(|d| d.is_usable())
                .and_then(|d| Some((s.relay?, d.session_id)));
            let direct_up = s.direct_usable().is_some();
            let fresh = match (&s.direct, anchor) {
                (_, None) => {
                    if !direct_up {
                        s.direct = None;
                        continue;
                    }
                    false
                }
                (None, Some(_)) => true,
                (Some(d), Some(a)) => {
                    ((d.relay, d.session_id) != a && !direct_up)
                        || d.retry_at.is_some_and(|t| t <= now)
                }
            };
            if fresh && let Some((relay, session_id)) = anchor {
                let cands = p2p::candidates(self.local, &self.host_addrs, observed);
                let checker = Checker::new(p2p::Role::Controlling, session_id, &cands, now);
                let sent = self.relays.get_mut(relay).is_some_and(|c| {
                    c.send_candidates(session_id, checker.local_password(), &cands)
                        .is_ok()
                });
                if sent {
                    tracing::debug!(
                        "service {service:?}: checking direct path, candidates {cands:?}"
                    );
                    if let Some(old) = s.direct.as_mut().and_then(|d| d.conn.as_mut()) {
                        old.close("retrying");
                    }
                    s.direct = Some(Direct {
                        relay,
                        session_id,
                        checker,
                        conn: None,
                        retry_at: None,
                    });
                } else if let Some(d) = s.direct.as_mut() {
                    d.retry_at = Some(now + DIRECT_RETRY);
                }
            }
            let Some(d) = s.direct.as_mut() else { continue };
            if d.retry_at.is_some() {
                if d.conn
                    .as_ref()
                    .is_some_and(|c| c.is_closed() || !c.is_usable())
                {
                    d.conn = None;
                }
                continue;
            }
            if d.conn.is_none()
                && let Some(peer) = d.checker.selected()
            {
                match DataConnection::connect_direct(
                    quic,
                    DIRECT_KEEPALIVE,
                    d.session_id,
                    service,
                    self.local,
                    peer,
                    now,
                ) {
                    Ok(c) => {
                        tracing::info!(
                            "service {service:?}: direct path to {peer} selected, connecting"
                        );
                        d.conn = Some(c);
                    }
                    Err(e) => tracing::warn!("direct connection to {peer}: {e}"),
                }
            }
            if d.checker.failed() {
                tracing::info!(
                    "service {service:?}: no direct path (all checks failed); staying relayed"
                );
                d.retry_at = Some(now + DIRECT_RETRY);
                continue;
            }
            let Some(c) = d.conn.as_mut() else { continue };
            c.check_peer(now, |der| authorize(der, Role::Connector, service));
            let silence = now.saturating_duration_since(c.last_recv());
            let dead = judge_liveness && c.is_usable() && silence >= direct_silence_limit(c);
            let stuck =
                !c.is_usable() && now.saturating_duration_since(c.started()) >= DATA_SETUP_TIMEOUT;
            if dead || stuck || c.is_closed() {
                tracing::info!(
                    "service {service:?}: direct path lost ({}); back to the relay",
                    if dead {
                        format!("silent for {silence:?}")
                    } else if stuck {
                        "setup timed out".into()
                    } else {
                        c.close_reason()
                    }
                );
                c.close("direct path lost");
                d.retry_at = Some(now + DIRECT_RETRY);
                if c.is_closed() || !c.is_usable() {
                    d.conn = None;
                }
            }
        }
    }
}

/// Silence after which a usable direct path counts as dead: `DIRECT_DEAD`, or
/// `DIRECT_DEAD_RTTS` RTTs (at least `DIRECT_DEAD_MIN`) when packets of ours went
/// unanswered.
pub(super) fn direct_silence_limit(c: &DataConnection) -> Duration {
    let rtt = c.stats_rtt().unwrap_or(Duration::from_millis(100));
    let unanswered = c.last_send_instant() > c.last_recv() + rtt;
    if unanswered {
        (rtt * DIRECT_DEAD_RTTS).max(DIRECT_DEAD_MIN)
    } else {
        DIRECT_DEAD
    }
}
