//! Draining (SIGTERM): the relay leaves without dropping the relay sessions it
//! forwards, so that a rolling upgrade or a scale-down costs no user its tunnel.
//!
//! When a drain starts the intermediate
//! - sends DRAINING (`drain_ms`: the time left) to every client that announced
//!   CAPABILITIES, now or when it does (original clients read no stream frames);
//! - answers `/readyz` with 503 `not ready: draining`, so the kubelet takes it out of
//!   the Service's endpoints (and DNS) and load balancers send no new clients, and
//!   sets the gauge `ztna_draining` to 1;
//! - refuses new relay sessions (SESSION_REFUSED status 6, `Draining`) and new
//!   registrations (NACK `0x03`), but keeps serving QAD, existing connections and
//!   the sessions' signalling (SESSION_ACCEPT of offers already made, CANDIDATES,
//!   SESSION_CLOSE);
//! - keeps forwarding every existing relay session, in XDP and in userspace.
//!
//! It ends when no relay session is left (the clients moved theirs to other relays,
//! or their connections closed) or when the drain timeout has passed, whichever
//! comes first; then every connection is closed with `0x100` (shutting down) as a
//! shutdown closes them, and the process exits 0, its XDP program detached and its
//! pins removed. Static sessions (`--static-session`) are owned by no client and
//! never close, so the drain does not wait for them.

use super::*;

/// A drain in progress.
pub(super) struct Drain {
    started: Instant,
    deadline: Instant,
    /// Static sessions: never closed, not waited for.
    static_sessions: usize,
}

impl Intermediate {
    pub(super) fn start_drain(&mut self, now: Instant) {
        let static_sessions = self.relay.sessions().filter(|s| s.is_static).count();
        let timeout = self.cfg.drain_timeout;
        self.drain = Some(Drain {
            started: now,
            deadline: now + timeout,
            static_sessions,
        });
        self.health.set_not_ready("draining");
        tracing::info!(
            "draining: {} relay sessions, {} connections; new relay sessions and \
             registrations are refused; stopping when no relay session is left, at the \
             latest in {timeout:?}",
            self.relay.len() - static_sessions,
            self.clients.len()
        );
        let ids: Vec<ClientId> = self.clients.keys().copied().collect();
        for id in ids {
            self.tell_draining(id, now);
        }
        self.update_gauges();
    }

    pub(super) fn is_draining(&self) -> bool {
        self.drain.is_some()
    }

    /// Sends DRAINING to client `id`, once, while a drain runs and if it announced
    /// CAPABILITIES; `drain_ms` is the time left until the deadline.
    pub(super) fn tell_draining(&mut self, id: ClientId, now: Instant) {
        let Some(d) = &self.drain else {
            return;
        };
        let left = d.deadline.saturating_duration_since(now);
        let drain_ms = u32::try_from(left.as_millis()).unwrap_or(u32::MAX);
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if !c.announced_capabilities || c.told_draining {
            return;
        }
        c.told_draining = true;
        inc(&self.stats.draining_sent);
        self.queue_frame(id, &Frame::Draining { drain_ms });
    }

    /// Whether the drain is over (it runs and no relay session is left, or its
    /// deadline passed); logs why when it is.
    pub(super) fn drain_over(&self, now: Instant) -> bool {
        let Some(d) = &self.drain else {
            return false;
        };
        let left = self.relay.len().saturating_sub(d.static_sessions);
        let took = now.saturating_duration_since(d.started);
        if left == 0 {
            tracing::info!(
                "drained: no relay session left after {:.1} s; closing {} connections",
                took.as_secs_f64(),
                self.clients.len()
            );
            true
        } else if now >= d.deadline {
            tracing::warn!(
                "drain timeout ({:?}) passed with {left} relay sessions still open; closing {} connections",
                self.cfg.drain_timeout,
                self.clients.len()
            );
            true
        } else {
            false
        }
    }

    /// CONNECTION_CLOSE (`0x100`, shutting down) to every client; the loop exits
    /// once they are gone.
    pub(super) fn close_all(&mut self, reason: &str) {
        tracing::info!("shutting down: closing {} connections", self.clients.len());
        for c in self.clients.values_mut() {
            let _ = c
                .conn
                .close(true, app_error::SHUTTING_DOWN, reason.as_bytes());
        }
        self.health.set_not_ready("shutting down");
    }
}
