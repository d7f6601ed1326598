//! The relay side of the engine: the relays' events (registrations, sessions,
//! candidates, routes, tunnel addresses, drains, losses), the choice of a relay per
//! service and the relayed data connections, including leaving a lost or draining
//! relay.

use std::net::SocketAddr;
use std::time::Instant;

use ztna_common::frames::{RefusedStatus, close_reason};

use super::{
    AgentEngine, AgentEvent, CHOOSE_GRACE, DATA_SETUP_TIMEOUT, SESSION_RETRY, TUN_QUEUE_MAX,
    push_bounded,
};
use crate::client::{ClientError, ClientEvent, Role};
use crate::data::DataConnection;
use crate::identity::authorize;
use crate::relays::RelaySet;

impl AgentEngine {
    pub(super) fn take_client_events(&mut self, now: Instant) {
        while let Some((relay, ev)) = self.relays.poll_event() {
            match ev {
                ClientEvent::Packet { service, packet } => {
                    if let Some(s) = service.and_then(|s| self.services.get_mut(&s)) {
                        s.traffic.rx_packets += 1;
                        s.traffic.rx_bytes += packet.len() as u64;
                    }
                    if !push_bounded(&mut self.tun_queue, packet, TUN_QUEUE_MAX) {
                        self.stats.tun_queue_dropped += 1;
                    }
                }
                ClientEvent::Connected { handshake } => {
                    self.handshake.get_or_insert(handshake);
                    self.events.push_back(AgentEvent::Connected { handshake });
                }
                ClientEvent::ObservedAddress(a) => {
                    self.events.push_back(AgentEvent::ObservedAddress(a))
                }
                ClientEvent::Registered(service) => {
                    if self.data_quic.is_some()
                        && let Some(s) = self.services.get_mut(&service)
                        && s.requested.is_none()
                        && s.data.is_none()
                    {
                        // The first relay to register waits a moment for the others'
                        // handshakes, so the choice sees their RTTs.
                        let at = if s.relay == Some(relay) || self.relays.len() == 1 {
                            now
                        } else {
                            now + CHOOSE_GRACE
                        };
                        s.want_session = Some(s.want_session.map_or(at, |t| t.min(at)));
                    }
                    self.events.push_back(AgentEvent::Registered(service));
                }
                ClientEvent::Refused { service, status } => self
                    .events
                    .push_back(AgentEvent::Refused { service, status }),
                ClientEvent::SessionReady {
                    service,
                    session_id,
                    agent_cid,
                    connector_cid,
                    ..
                } => {
                    let Some(s) = self.services.get_mut(&service) else {
                        continue;
                    };
                    if s.requested != Some(relay) {
                        // A relay we gave up on answered late: end that session.
                        if let Some(c) = self.relays.get_mut(relay) {
                            let _ = c.close_session(session_id, close_reason::NORMAL);
                        }
                        continue;
                    }
                    s.requested = None;
                    let Some(quic) = self.data_quic.as_mut() else {
                        continue;
                    };
                    match DataConnection::connect(
                        quic,
                        self.keepalive,
                        session_id,
                        &service,
                        agent_cid,
                        connector_cid,
                        self.local,
                        relay,
                        now,
                    ) {
                        Ok(d) => {
                            // Moving off a draining relay: its connection carries on
                            // until this one is usable (then it is closed, and its
                            // session with it).
                            if let Some(old) = s.data.take() {
                                s.leaving = Some((s.relay.unwrap_or(relay), old));
                            }
                            s.relay = Some(relay);
                            s.data = Some(d);
                        }
                        Err(e) => {
                            tracing::warn!("data connection for {service:?}: {e}");
                            s.want_session = Some(now + SESSION_RETRY);
                        }
                    }
                }
                ClientEvent::SessionRefused {
                    service, status, ..
                } => {
                    tracing::info!(
                        "relay session for {service:?} at {relay} refused: {status:?}; using the datagram relay"
                    );
                    if let Some(s) = self.services.get_mut(&service)
                        && s.requested == Some(relay)
                    {
                        s.requested = None;
                        s.want_session = Some(now + SESSION_RETRY);
                        // What this relay lacks another may have (its connectors, room
                        // in its table, a future): ask there at once.
                        let elsewhere = matches!(
                            status,
                            RefusedStatus::NoConnector
                                | RefusedStatus::ConnectorTimeout
                                | RefusedStatus::TableFull
                                | RefusedStatus::Draining
                        );
                        if elsewhere
                            && s.data.is_none()
                            && let Some(other) = self.relays.choose(&service, Some(relay))
                        {
                            s.relay = Some(other);
                            s.want_session = Some(now);
                        }
                    }
                }
                ClientEvent::Candidates {
                    session_id,
                    password,
                    candidates,
                } => match self
                    .services
                    .values_mut()
                    .filter_map(|s| s.direct.as_mut())
                    .find(|d| d.relay == relay && d.session_id == session_id)
                {
                    Some(d) => {
                        tracing::debug!("remote candidates {candidates:?}");
                        let dropped = d.checker.remote_candidates_dropped;
                        if !d.checker.set_remote(password, &candidates, now) {
                            self.stats.candidates_rate_limited += 1;
                        }
                        self.stats.candidates_dropped +=
                            d.checker.remote_candidates_dropped - dropped;
                    }
                    None => {
                        self.stats.candidates_refused += 1;
                        tracing::warn!("CANDIDATES for unknown session {session_id}: refused");
                    }
                },
                ClientEvent::SessionPath {
                    session_id,
                    forwarding,
                } => {
                    self.forwarding.insert((relay, session_id), forwarding);
                }
                ClientEvent::SessionClosed { session_id, .. } => {
                    self.forwarding.remove(&(relay, session_id));
                    for s in self.services.values_mut() {
                        // A direct connection is peer to peer: it outlives the
                        // session that signalled it.
                        if s.direct.as_ref().is_some_and(|d| {
                            d.relay == relay
                                && d.session_id == session_id
                                && !d.conn.as_ref().is_some_and(|c| c.is_usable())
                        }) {
                            s.direct = None;
                        }
                        if s.relay == Some(relay)
                            && let Some(d) = s.data.as_mut()
                            && d.session_id == session_id
                        {
                            d.close("session closed by the intermediate");
                        }
                        if let Some((r, c)) = s.leaving.as_mut()
                            && *r == relay
                            && c.session_id == session_id
                        {
                            c.close("session closed by the intermediate");
                        }
                    }
                }
                ClientEvent::Disconnected { reason, retry_in } => {
                    self.leave_relay(relay, &reason, now);
                    self.events
                        .push_back(AgentEvent::Disconnected { reason, retry_in });
                }
                ClientEvent::ServicePrefixes { service, prefixes } => {
                    if !self.services.contains_key(&service) {
                        tracing::debug!("prefixes for unconfigured service {service:?} ignored");
                        continue;
                    }
                    tracing::info!("service {service:?}: prefixes {prefixes:?} (relay {relay})");
                    self.learned_routes.insert((service, relay), prefixes);
                    self.rebuild_routes();
                }
                ClientEvent::TunnelAddress { ipv4, ipv6 } => match self.tunnel_address {
                    None => {
                        tracing::info!("tunnel addresses {ipv4}, {ipv6}");
                        self.tunnel_address = Some((ipv4, ipv6));
                        self.events.push_back(AgentEvent::RoutesChanged);
                    }
                    Some(cur) if cur != (ipv4, ipv6) => {
                        // Relays assign from one hash of our identity, so they agree
                        // unless one had a collision; the address in use stays.
                        self.stats.tunnel_address_conflicts += 1;
                        tracing::warn!(
                            "relay {relay} assigned {ipv4}, {ipv6}; keeping {}, {}",
                            cur.0,
                            cur.1
                        );
                    }
                    Some(_) => {}
                },
                ClientEvent::SessionOffer { .. } => {
                    // Only connectors are offered sessions.
                    tracing::debug!("unexpected SESSION_OFFER to an agent");
                }
                ClientEvent::Draining { within } => {
                    // `service_relay` moves the services on it, make before break.
                    tracing::info!("relay {relay} draining (forwarding for {within:?} more)");
                }
            }
        }
    }

    /// `relay` is gone (silent, closed, removed): its sessions are over. Services on
    /// it move to another relay now (the datagram relay there at once, a session as
    /// soon as it is set up); direct connections carry on.
    pub(super) fn leave_relay(&mut self, relay: SocketAddr, reason: &str, now: Instant) {
        self.forwarding.retain(|(r, _), _| *r != relay);
        for (name, s) in self.services.iter_mut() {
            if s.leaving.as_ref().is_some_and(|(r, _)| *r == relay) {
                s.leaving = None;
            }
            if s.requested == Some(relay) {
                s.requested = None;
            }
            if s.relay != Some(relay) {
                continue;
            }
            if let Some(d) = s.data.as_mut() {
                d.close("relay lost");
            }
            s.data = None;
            s.relay = None;
            if self.relays.len() > 1 {
                self.stats.relay_moves += 1;
                tracing::info!("service {name:?}: relay {relay} lost ({reason}); moving");
            }
            s.want_session = Some(now);
        }
    }

    /// Asks for relay sessions that are due (choosing the relay), moves services off
    /// draining relays, checks relayed data connections' peers, and retires the ones
    /// that failed.
    pub(super) fn service_relay(&mut self, now: Instant) {
        if self.data_quic.is_none() {
            return;
        }
        for (service, s) in self.services.iter_mut() {
            let draining = s.relay.is_some_and(|r| {
                !self.relays.is_usable(r) && self.relays.get(r).is_some_and(|c| c.is_established())
            });
            if draining
                && s.requested.is_none()
                && s.leaving.is_none()
                && s.want_session.is_none_or(|t| t <= now)
            {
                // Make before break: a session elsewhere first.
                if let Some(to) = self.relays.choose(service, s.relay)
                    && let Some(c) = self.relays.get_mut(to)
                    && c.request_session(service).is_ok()
                {
                    tracing::info!(
                        "service {service:?}: relay {} draining; moving to {to}",
                        s.relay.map_or_else(String::new, |r| r.to_string())
                    );
                    self.stats.relay_moves += 1;
                    s.requested = Some(to);
                }
            }
            if s.want_session.is_some_and(|t| t <= now) && s.requested.is_none() && s.data.is_none()
            {
                let relay = s
                    .relay
                    .filter(|&r| self.relays.is_usable(r))
                    .or_else(|| self.relays.choose(service, None));
                let r = match relay.and_then(|r| self.relays.get_mut(r).map(|c| (r, c))) {
                    Some((addr, c)) => c.request_session(service).map(|_| addr),
                    None => Err(ClientError::NotRegistered(service.clone())),
                };
                tracing::debug!("relay session request for {service:?}: {r:?}");
                match r {
                    Ok(addr) => {
                        s.relay = Some(addr);
                        s.requested = Some(addr);
                        s.want_session = None;
                    }
                    // No relay has registered the service yet: a Registered event
                    // brings the request forward.
                    Err(_) => s.want_session = Some(now + SESSION_RETRY),
                }
            }
            if let Some((_, c)) = s.leaving.as_mut() {
                if s.data.as_ref().is_some_and(|d| d.is_usable()) {
                    c.close("moved to another relay");
                }
                c.check_peer(now, |der| authorize(der, Role::Connector, service));
            }
            if let Some((r, c)) = s.leaving.take_if(|(_, c)| c.is_closed()) {
                if let Some(client) = self.relays.get_mut(r) {
                    let _ = client.close_session(c.session_id, close_reason::NORMAL);
                }
                self.forwarding.remove(&(r, c.session_id));
            }
            let Some(d) = s.data.as_mut() else { continue };
            d.check_peer(now, |der| authorize(der, Role::Connector, service));
            if !d.is_usable() && now.saturating_duration_since(d.started()) >= DATA_SETUP_TIMEOUT {
                d.close("setup timed out");
            }
            if d.is_closed() {
                tracing::info!(
                    "data connection for {service:?} closed: {}",
                    d.close_reason()
                );
                let session = d.session_id;
                s.data = None;
                if s.direct_usable().is_none() {
                    s.direct = None;
                }
                if let Some(relay) = s.relay
                    && let Some(c) = self.relays.get_mut(relay)
                {
                    let _ = c.close_session(session, close_reason::NORMAL);
                    self.forwarding.remove(&(relay, session));
                    if c.is_registered(service) {
                        s.want_session = Some(now + SESSION_RETRY);
                    }
                }
            }
        }
    }
}

/// The relay `service`'s datagram relay uses: its chosen relay while that one has
/// it registered and is not draining, else the first relay that qualifies, else any
/// that has it registered.
pub(super) fn datagram_relay(
    relays: &RelaySet,
    chosen: Option<SocketAddr>,
    service: &str,
) -> Option<SocketAddr> {
    let registered = |r: &crate::relays::Relay| r.client.is_registered(service);
    chosen
        .filter(|&c| {
            relays
                .iter()
                .any(|r| r.addr() == c && r.is_usable() && registered(r))
        })
        .or_else(|| {
            relays
                .iter()
                .find(|r| r.is_usable() && registered(r))
                .map(|r| r.addr())
        })
        .or_else(|| relays.iter().find(|r| registered(r)).map(|r| r.addr()))
}
