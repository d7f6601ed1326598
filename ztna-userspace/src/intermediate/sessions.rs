//! The intermediate's stream frames: relay sessions (request, offer, accept, path,
//! close, expiry), NAT-traversal candidates, service prefixes, capabilities; and the
//! connectors' liveness (see `connector_set`).

use super::*;

impl Intermediate {
    /// Probes silent connectors and takes those silent for too long out of rotation
    /// (closing their relay sessions, so their agents go to a survivor), or puts
    /// them back when heard from again. See `connector_set`.
    pub(super) fn check_connectors(&mut self, now: Instant) {
        let mut changes = Vec::new();
        for (&id, c) in self.clients.iter_mut() {
            let Some(l) = c.liveness.as_mut() else {
                continue;
            };
            if c.conn.is_closed() || c.conn.is_draining() {
                continue;
            }
            if let Some(change) = l.observe(c.conn.stats().recv, now) {
                changes.push((id, change));
            }
            if l.wants_probe(now) {
                // The peer acknowledges it; that ACK is our proof of life.
                let _ = c.conn.send_ack_eliciting();
            }
        }
        for (id, change) in changes {
            let Some(c) = self.clients.get(&id) else {
                continue;
            };
            let live = change == LivenessChange::Back;
            for s in &c.connector_of {
                if let Some(set) = self.services.get_mut(s) {
                    set.set_live(id, live);
                }
            }
            if live {
                inc(&self.stats.connectors_back);
                tracing::info!("connector {id} heard from again: back in rotation");
                continue;
            }
            inc(&self.stats.connectors_lost);
            tracing::warn!(
                "connector {id} silent for {:?}: out of rotation, its sessions and flows move to other connectors",
                connector_set::DEAD_AFTER
            );
            for s in self.relay.remove_client(id) {
                inc(&self.stats.relay_sessions_closed);
                inc(&self.stats.relay_sessions_closed_connector_lost);
                for to in [s.agent, s.connector] {
                    self.queue_frame(
                        to,
                        &Frame::SessionClose {
                            session_id: s.id,
                            reason: close_reason::PEER_GONE,
                        },
                    );
                }
            }
        }
    }

    /// One token from the CANDIDATES bucket of `sender` in `session`, if there is one.
    pub(super) fn take_candidates_token(&mut self, session: u32, sender: ClientId) -> bool {
        let now = Instant::now();
        let (tokens, last) = self
            .candidates_budget
            .entry((session, sender))
            .or_insert((CANDIDATES_BURST, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * CANDIDATES_RATE;
        *tokens = (*tokens + refill).min(CANDIDATES_BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    pub(super) fn queue_frame(&mut self, id: ClientId, frame: &Frame<'_>) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if c.conn.local_error().is_some() {
            // Already closing (perhaps for this very reason): nothing more to say.
            return;
        }
        match c.frames.queue(frame) {
            Ok(()) => {}
            Err(frame_io::QueueError::Full { queued }) => {
                inc(&self.stats.frame_queue_overflows);
                tracing::warn!(
                    "client {id}: {queued} bytes of control frames unread (no stream credit): closing"
                );
                let _ = c.conn.close(
                    true,
                    app_error::FRAME_QUEUE_FULL,
                    b"control frame queue full: no stream credit",
                );
            }
            Err(frame_io::QueueError::Encode(_)) => inc(&self.stats.bad_frames),
        }
    }

    pub(super) fn handle_frame(&mut self, id: ClientId, frame: Frame<'_>, now: Instant) {
        match frame {
            Frame::SessionRequest {
                request_id,
                service,
            } => {
                let refuse = |this: &mut Self, status: RefusedStatus| {
                    inc(&this.stats.relay_sessions_refused);
                    if status == RefusedStatus::TooManySessions {
                        inc(&this.stats.relay_sessions_refused_client_limit);
                    }
                    if status == RefusedStatus::NotAuthorized {
                        inc(&this.stats.relay_sessions_refused_not_authorized);
                    }
                    if status == RefusedStatus::Draining {
                        inc(&this.stats.relay_sessions_refused_draining);
                    }
                    tracing::info!(
                        "client {id}: relay session for {service:?} refused: {status:?}"
                    );
                    this.queue_frame(id, &Frame::SessionRefused { request_id, status });
                };
                let Some(agent) = self.clients.get(&id) else {
                    return;
                };
                if !agent.agent_of.contains(service) {
                    return refuse(self, RefusedStatus::NotAuthorized);
                }
                if self.is_draining() {
                    return refuse(self, RefusedStatus::Draining);
                }
                let agent_addr = agent.peer;
                // The agent's connector: the same one at every relay (connector
                // affinity in `ztna_common::frames`).
                let affinity = agent.affinity;
                let Some(conn_id) = self
                    .services
                    .get(service)
                    .and_then(|s| s.pick_for(affinity))
                else {
                    return refuse(self, RefusedStatus::NoConnector);
                };
                let Some(connector_addr) = self.clients.get(&conn_id).map(|c| c.peer) else {
                    return refuse(self, RefusedStatus::NoConnector);
                };
                match self.relay.create(
                    id,
                    agent_addr,
                    conn_id,
                    connector_addr,
                    service,
                    request_id,
                    now,
                ) {
                    Ok(s) => {
                        inc(&self.stats.relay_sessions_created);
                        tracing::info!(
                            "relay session {} for {service:?}: agent {id} ({agent_addr}) <-> connector {conn_id} ({connector_addr})",
                            s.id
                        );
                        self.queue_frame(
                            conn_id,
                            &Frame::SessionOffer {
                                session_id: s.id,
                                agent_cid: s.agent_cid,
                                connector_cid: s.connector_cid,
                                service,
                            },
                        );
                    }
                    Err(status) => refuse(self, status),
                }
            }
            Frame::SessionAccept { session_id } => match self.relay.accept(id, session_id) {
                Some(s) => {
                    self.queue_frame(
                        s.agent,
                        &Frame::SessionReady {
                            request_id: s.request_id,
                            session_id,
                            agent_cid: s.agent_cid,
                            connector_cid: s.connector_cid,
                        },
                    );
                    let forwarding = self.forwarding_of(&s);
                    for c in [s.agent, s.connector] {
                        self.queue_frame(
                            c,
                            &Frame::SessionPath {
                                session_id,
                                forwarding,
                            },
                        );
                    }
                }
                None => inc(&self.stats.bad_frames),
            },
            Frame::Candidates {
                session_id,
                password,
                count,
                candidates,
            } => {
                let other = self
                    .relay
                    .session(session_id)
                    .filter(|s| s.accepted)
                    .and_then(|s| {
                        if s.agent == id {
                            Some(s.connector)
                        } else if s.connector == id {
                            Some(s.agent)
                        } else {
                            None
                        }
                    });
                // Only endpoints of a live session get a bucket, so refused frames
                // with made-up session ids add no state.
                let allowed = other.is_none() || self.take_candidates_token(session_id, id);
                match other {
                    Some(_) if !allowed => {
                        inc(&self.stats.candidates_rate_limited);
                        tracing::debug!(
                            "client {id}: CANDIDATES for session {session_id} over the rate limit: dropped"
                        );
                    }
                    Some(other) => {
                        inc(&self.stats.candidates_forwarded);
                        self.queue_frame(
                            other,
                            &Frame::Candidates {
                                session_id,
                                password,
                                count,
                                candidates,
                            },
                        );
                    }
                    None => {
                        inc(&self.stats.candidates_refused);
                        tracing::warn!(
                            "client {id}: CANDIDATES for session {session_id} it is not part of: refused"
                        );
                    }
                }
            }
            Frame::SessionClose { session_id, reason } => {
                let owned = self
                    .relay
                    .session(session_id)
                    .is_some_and(|s| s.agent == id || s.connector == id);
                if owned && let Some(s) = self.relay.close(session_id) {
                    inc(&self.stats.relay_sessions_closed);
                    let other = if s.agent == id { s.connector } else { s.agent };
                    self.queue_frame(other, &Frame::SessionClose { session_id, reason });
                }
            }
            Frame::ServicePrefixes {
                service, prefixes, ..
            } => {
                let is_connector = self
                    .clients
                    .get(&id)
                    .is_some_and(|c| c.connector_of.contains(service))
                    && self.services.get(service).is_some_and(|s| s.contains(id));
                if !is_connector {
                    inc(&self.stats.service_prefixes_refused);
                    tracing::warn!(
                        "client {id}: SERVICE_PREFIXES for {service:?} refused: not its connector"
                    );
                    return;
                }
                let prefixes: Vec<IpNet> = frames::prefixes(prefixes)
                    .filter_map(|(ip, len)| IpNet::new(ip, len).ok())
                    .collect();
                inc(&self.stats.service_prefixes_published);
                tracing::info!("service {service:?}: prefixes {prefixes:?}");
                let agents: Vec<ClientId> = self
                    .clients
                    .iter()
                    .filter(|(_, c)| c.agent_of.contains(service))
                    .map(|(a, _)| *a)
                    .collect();
                if let Some(s) = self.services.get_mut(service) {
                    if s.prefixes == prefixes {
                        return;
                    }
                    if !s.prefixes.is_empty() && s.all().len() > 1 {
                        tracing::warn!(
                            "service {service:?}: connector {id} publishes prefixes {prefixes:?}, \
                             another connector of the service published {:?}; the newest apply",
                            s.prefixes
                        );
                    }
                    s.prefixes = prefixes.clone();
                }
                for a in agents {
                    self.send_prefixes(a, service, &prefixes);
                }
            }
            Frame::Capabilities { flags, instance } => {
                inc(&self.stats.capabilities_received);
                let Some(c) = self.clients.get_mut(&id) else {
                    return;
                };
                c.reads_service_packets = flags & frames::capability::SERVICE_PACKETS != 0;
                c.announced_capabilities = true;
                if let Some(i) = instance {
                    c.instance = Some(i);
                    for s in &c.connector_of {
                        if let Some(set) = self.services.get_mut(s) {
                            set.set_instance(id, i);
                        }
                    }
                }
                tracing::debug!("client {id}: capabilities 0x{flags:08x}");
                // We accept 0x2F from agents and connectors alike.
                self.queue_frame(
                    id,
                    &Frame::Capabilities {
                        flags: frames::capability::SERVICE_PACKETS,
                        instance: None,
                    },
                );
                // A client that connected during a drain learns of it now.
                self.tell_draining(id, now);
            }
            Frame::Unknown { .. } => {}
            _ => inc(&self.stats.bad_frames),
        }
    }

    /// How a session's packets are forwarded (SESSION_PATH): XDP when attached and
    /// both entries are in its maps.
    pub(super) fn forwarding_of(&self, s: &crate::relay::RelaySession) -> u8 {
        use ztna_common::frames::forwarding;
        // The XDP program forwards an entry whose peer and expected sender are of one
        // family (IPv4-mapped IPv6 addresses count as IPv4, as the kernel table
        // stores them); mixed entries stay in userspace.
        let kernel = [s.agent_cid, s.connector_cid].iter().all(|c| {
            self.relay
                .entry(c)
                .is_some_and(|f| same_family(f.peer, f.expected))
        });
        match (self.xdp_mode(), kernel) {
            ("native", true) => forwarding::XDP_NATIVE,
            ("generic", true) => forwarding::XDP_GENERIC,
            _ => forwarding::USERSPACE,
        }
    }

    pub(super) fn expire_sessions(&mut self, now: Instant) {
        let relay = &self.relay;
        self.candidates_budget
            .retain(|(session, _), _| relay.session(*session).is_some());
        let kernel_now = monotonic_ns();
        let (unaccepted, idle) = self.relay.expire(now, Some(kernel_now));
        for s in unaccepted {
            inc(&self.stats.relay_sessions_refused);
            tracing::info!("relay session {}: connector did not accept in time", s.id);
            self.queue_frame(
                s.agent,
                &Frame::SessionRefused {
                    request_id: s.request_id,
                    status: RefusedStatus::ConnectorTimeout,
                },
            );
            self.queue_frame(
                s.connector,
                &Frame::SessionClose {
                    session_id: s.id,
                    reason: close_reason::IDLE,
                },
            );
        }
        for s in idle {
            inc(&self.stats.relay_sessions_closed);
            tracing::info!("relay session {} idle: removed", s.id);
            for c in [s.agent, s.connector] {
                self.queue_frame(
                    c,
                    &Frame::SessionClose {
                        session_id: s.id,
                        reason: close_reason::IDLE,
                    },
                );
            }
        }
    }
}
