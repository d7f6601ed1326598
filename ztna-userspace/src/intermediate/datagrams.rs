//! The intermediate's DATAGRAM side: registration (ACK/NACK, tunnel addresses and
//! prefixes for agents) and the datagram relay between agents and connectors.

use super::*;

impl Intermediate {
    pub(super) fn reply(&mut self, id: ClientId, msg: &ControlMessage<'_>) {
        if let ControlMessage::RegisterNack { status, .. } = msg {
            inc(match status {
                NackStatus::NotAuthorized => &self.stats.nacks_not_authorized,
                NackStatus::Draining => &self.stats.nacks_draining,
                NackStatus::InvalidId | NackStatus::Other(_) => &self.stats.nacks_invalid_id,
            });
        }
        if let Some(bytes) = encode(msg) {
            self.send_datagram(id, &bytes);
        }
    }

    pub(super) fn send_datagram(&mut self, id: ClientId, bytes: &[u8]) {
        if let Some(c) = self.clients.get_mut(&id)
            && c.conn.dgram_send(bytes).is_err()
        {
            inc(&self.stats.dropped_send_failed);
        }
    }

    pub(super) fn handle_datagram(&mut self, id: ClientId, dgram: &mut [u8], now: Instant) {
        let msg = match ControlMessage::decode(dgram) {
            Ok(m) => m,
            Err(WireError::UnknownType(t)) => {
                inc(&self.stats.datagrams_unknown_type);
                tracing::debug!("client {id}: ignoring DATAGRAM type 0x{t:02x}");
                return;
            }
            Err(e) => {
                inc(&self.stats.datagrams_malformed);
                if let Some(echo) = wire::registration_id_bytes(dgram) {
                    // Tell the client why, echoing its id bytes so it can match the
                    // answer to its request (the original NACKs some of these too).
                    inc(&self.stats.registrations_malformed);
                    inc(&self.stats.registrations_refused);
                    tracing::warn!("client {id}: registration refused: malformed: {e}");
                    let mut buf = [0u8; 3 + wire::MAX_SERVICE_ID_LEN];
                    if let Ok(n) = wire::encode_nack_bytes(NackStatus::InvalidId, echo, &mut buf) {
                        self.send_datagram(id, &buf[..n]);
                    }
                    return;
                }
                tracing::debug!("client {id}: ignoring malformed DATAGRAM: {e}");
                return;
            }
        };
        match msg {
            ControlMessage::RegisterAgent { service } => {
                let service = service.to_string();
                self.register(id, Role::Agent, &service);
            }
            ControlMessage::RegisterConnector { service } => {
                let service = service.to_string();
                self.register(id, Role::Connector, &service);
            }
            ControlMessage::ServicePacket { service, .. } => {
                let service = service.to_string();
                let start = 2 + service.len();
                self.relay(id, Some(&service), &mut dgram[start..], now);
            }
            ControlMessage::RawIp { .. } => self.relay(id, None, dgram, now),
            _ => inc(&self.stats.datagrams_unexpected),
        }
    }

    pub(super) fn register(&mut self, id: ClientId, role: Role, service: &str) {
        if !valid_service_id(service) {
            inc(&self.stats.registrations_refused);
            tracing::warn!("client {id}: registration refused: invalid service id {service:?}");
            self.reply(
                id,
                &ControlMessage::RegisterNack {
                    status: NackStatus::InvalidId,
                    service,
                },
            );
            return;
        }
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let name = client
            .identity
            .as_ref()
            .map_or_else(|| "<no certificate>".to_string(), |i| i.name());
        let allowed = match &client.identity {
            Some(identity) => identity.authorizes(role, service),
            None => !self.cfg.require_client_cert,
        };
        let role_name = match role {
            Role::Agent => "agent",
            Role::Connector => "connector",
        };
        if !allowed {
            inc(&self.stats.registrations_refused);
            tracing::warn!(
                "registration refused: identity {name} is not authorized as {role_name} for service {service:?}"
            );
            self.reply(
                id,
                &ControlMessage::RegisterNack {
                    status: NackStatus::NotAuthorized,
                    service,
                },
            );
            return;
        }
        let held = match role {
            Role::Agent => client.agent_of.contains(service),
            Role::Connector => client.connector_of.contains(service),
        };
        // A registration it holds already is answered as before (an ACK): only new
        // ones would tie new work to a relay that is leaving.
        if self.drain.is_some() && !held {
            inc(&self.stats.registrations_refused);
            tracing::info!(
                "client {id} ({name}): registration as {role_name} for {service:?} refused: draining"
            );
            self.reply(
                id,
                &ControlMessage::RegisterNack {
                    status: NackStatus::Draining,
                    service,
                },
            );
            return;
        }
        inc(match role {
            Role::Agent => &self.stats.registrations_agent,
            Role::Connector => &self.stats.registrations_connector,
        });
        match role {
            Role::Agent => {
                client.agent_of.insert(service.to_string());
            }
            Role::Connector => {
                client.connector_of.insert(service.to_string());
                if client.liveness.is_none() {
                    client.liveness = Some(Liveness::new(Instant::now(), client.conn.stats().recv));
                }
                // Every connector of a service serves it (high availability). A
                // restarted connector's previous connection leaves the rotation once
                // its silence is noticed (`connector_set::DEAD_AFTER`).
                let entry = self.services.entry(service.to_string()).or_default();
                let added = entry.add(id);
                if let Some(i) = client.instance {
                    entry.set_instance(id, i);
                }
                if added && entry.all().len() > 1 {
                    inc(&self.stats.connectors_joined);
                    tracing::info!(
                        "service {service:?}: connector {id} ({name}) joins {} other connector(s)",
                        entry.all().len() - 1
                    );
                }
            }
        }
        inc(&self.stats.registrations_accepted);
        tracing::info!("client {id} ({name}) registered as {role_name} for {service:?}");
        if role == Role::Agent {
            self.tell_agent(id, &name, service);
        }
        self.reply(id, &ControlMessage::RegisterAck { service });
    }

    /// An agent registered for `service`: its tunnel addresses (at its first
    /// registration) and the service's prefixes, if the connector published them.
    pub(super) fn tell_agent(&mut self, id: ClientId, identity: &str, service: &str) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        if client.tunnel.is_none() {
            match self.addresses.assign(id, identity) {
                Ok((ipv4, ipv6)) => {
                    client.tunnel = Some((ipv4, ipv6));
                    inc(&self.stats.tunnel_addresses_assigned);
                    tracing::info!("client {id} ({identity}): tunnel addresses {ipv4}, {ipv6}");
                    self.queue_frame(id, &Frame::TunnelAddress { ipv4, ipv6 });
                }
                Err(e) => {
                    inc(&self.stats.tunnel_addresses_exhausted);
                    tracing::warn!("client {id} ({identity}): no tunnel address: {e}");
                }
            }
        }
        let prefixes = self
            .services
            .get(service)
            .map(|s| s.prefixes.clone())
            .unwrap_or_default();
        if !prefixes.is_empty() {
            self.send_prefixes(id, service, &prefixes);
        }
    }

    pub(super) fn send_prefixes(&mut self, id: ClientId, service: &str, prefixes: &[IpNet]) {
        let mut raw = [0u8; frames::MAX_PREFIXES * 18];
        let (count, n) = frames::encode_prefixes(
            prefixes.iter().map(|p| (p.network(), p.prefix_len())),
            &mut raw,
        );
        self.queue_frame(
            id,
            &Frame::ServicePrefixes {
                service,
                count,
                prefixes: &raw[..n],
            },
        );
    }

    /// Relays one tunneled IP packet. `service` is `None` for raw datagrams.
    pub(super) fn relay(
        &mut self,
        from: ClientId,
        service: Option<&str>,
        ip: &mut [u8],
        now: Instant,
    ) {
        let stats = self.stats.clone();
        let Some(client) = self.clients.get(&from) else {
            return;
        };
        let key = match packet::flow_key(ip) {
            Ok(k) => k,
            Err(e) => {
                inc(&self.stats.dropped_bad_inner_packet);
                tracing::debug!("client {from}: dropping inner packet: {e}");
                return;
            }
        };
        // Connector → agent?
        let as_connector = match service {
            Some(s) => client.connector_of.contains(s).then(|| {
                self.flows
                    .inbound(s, &key, now)
                    .map(|i| (s.to_string(), i.clone()))
            }),
            None if !client.connector_of.is_empty() => {
                let services: Vec<String> = client.connector_of.iter().cloned().collect();
                Some(self.flows.inbound_any(services.iter(), &key, now))
            }
            None => None,
        };
        if let Some(found) = as_connector {
            let Some((service, inbound)) = found else {
                // No flow from an agent seen here (it went over a data connection
                // that is gone): route by destination, the agent's tunnel address.
                if let Some((agent, svc)) = self.agent_by_address(from, key.dst.ip(), service) {
                    inc(&self.stats.relayed_by_address);
                    self.forward(agent, &svc, ip, &stats.relayed_to_agent);
                    return;
                }
                inc(&self.stats.dropped_no_flow);
                return;
            };
            if inbound.translated(&key.reversed()) {
                let _ = packet::rewrite_port(ip, PortField::Dst, inbound.original.src.port());
            }
            self.forward(inbound.agent, &service, ip, &stats.relayed_to_agent);
            return;
        }
        // Agent → connector.
        let service = match service {
            Some(s) => s.to_string(),
            // The original protocol's raw packets go to the agent's first service.
            None => match client.agent_of.iter().next() {
                Some(s) => s.clone(),
                None => {
                    inc(&self.stats.dropped_not_registered);
                    return;
                }
            },
        };
        if !client.agent_of.contains(&service) {
            inc(&self.stats.dropped_not_registered);
            return;
        }
        let set = self.services.get(&service);
        let live = set.map_or(&[][..], |s| s.live());
        let pick = set
            .and_then(|s| s.pick_for(client.affinity))
            .unwrap_or_default();
        let route = match self.flows.outbound(from, &service, key, now, live, pick) {
            Ok(route) => route,
            Err(FlowRefused::NoConnector) => {
                inc(&self.stats.dropped_no_connector);
                return;
            }
            Err(FlowRefused::NoFreePort) => {
                inc(&self.stats.dropped_no_free_port);
                return;
            }
            Err(FlowRefused::AgentLimit) => {
                inc(&self.stats.dropped_agent_flow_limit);
                return;
            }
        };
        if let Some(port) = route.rewrite_to {
            inc(&self.stats.port_translations);
            if packet::rewrite_port(ip, PortField::Src, port).is_err() {
                inc(&self.stats.dropped_bad_inner_packet);
                return;
            }
        }
        self.forward(route.connector, &service, ip, &stats.relayed_to_connector);
    }

    /// The agent that holds tunnel address `dst`, if it is registered for a service
    /// (`service`, or any of the connector's) that `connector` serves.
    pub(super) fn agent_by_address(
        &self,
        connector: ClientId,
        dst: std::net::IpAddr,
        service: Option<&str>,
    ) -> Option<(ClientId, String)> {
        let agent = match dst {
            std::net::IpAddr::V4(a) => self.addresses.owner_v4(a),
            std::net::IpAddr::V6(a) => self.addresses.owner_v6(a),
        }?;
        let agent_of = &self.clients.get(&agent)?.agent_of;
        let connector_of = &self.clients.get(&connector)?.connector_of;
        connector_of
            .iter()
            .filter(|s| service.is_none_or(|want| want == s.as_str()))
            .find(|s| {
                agent_of.contains(*s)
                    && self
                        .services
                        .get(*s)
                        .is_some_and(|svc| svc.contains(connector))
            })
            .map(|s| (agent, s.clone()))
    }

    /// Sends one tunneled IP packet to client `to` in the framing it reads: `0x2F`
    /// if it announced `SERVICE_PACKETS` and the wrapped packet fits its DATAGRAM
    /// limit, else the raw packet unchanged (which every client reads).
    pub(super) fn forward(&mut self, to: ClientId, service: &str, ip: &[u8], counter: &AtomicU64) {
        let Some(c) = self.clients.get_mut(&to) else {
            inc(&self.stats.dropped_send_failed);
            return;
        };
        let max = c.conn.dgram_max_writable_len().unwrap_or(0);
        let wrapped_len = wire::service_packet_overhead(service) + ip.len();
        let msg = if c.reads_service_packets && wrapped_len <= max {
            ControlMessage::ServicePacket {
                service,
                packet: ip,
            }
        } else {
            if c.reads_service_packets {
                inc(&self.stats.relayed_raw_to_fit);
            }
            ControlMessage::RawIp { packet: ip }
        };
        if msg.encoded_len() > max {
            inc(&self.stats.dropped_too_large);
            inc(&self.stats.dropped_send_failed);
            tracing::debug!(
                "client {to}: {} byte packet exceeds its DATAGRAM limit of {max}",
                ip.len()
            );
            return;
        }
        match encode(&msg).map(|b| c.conn.dgram_send(&b)) {
            Some(Ok(())) => {
                inc(counter);
                self.stats
                    .relayed_bytes
                    .fetch_add(ip.len() as u64, Ordering::Relaxed);
            }
            _ => inc(&self.stats.dropped_send_failed),
        }
    }
}
