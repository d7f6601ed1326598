//! The intermediate's counters (the stats file, `/metrics`).

crate::counters!(IntermediateStats {
    /// UDP payloads that are not QUIC packets.
    garbage_packets,
    /// Short-header packets for connections we don't know.
    unknown_cid_packets,
    stateless_resets_sent,
    /// Stateless resets not sent because the rate limit was reached.
    stateless_resets_rate_limited,
    /// Loop turns that stopped reading with packets still queued (load), so that
    /// timers and clients are served.
    recv_budget_exhausted,
    /// Datagrams larger than a receive buffer (`MSG_TRUNC`): dropped, their tail
    /// is lost.
    recv_truncated,
    /// Relayed datagrams dropped because the socket's send buffer was full.
    relay_send_dropped_would_block,
    /// Relayed datagrams the kernel refused for another reason (no route, ...).
    relay_send_dropped_failed,
    /// Kernel relay entries removed because updating them after a client moved
    /// failed (the userspace forwarder takes the session's packets instead).
    kernel_update_failures,
    /// Unknown short-header packets to relay CIDs: never answered with a reset.
    relay_cid_resets_refused,
    /// Relay-session entries kept out of the kernel (XDP) table because their two
    /// endpoints use different address families: the userspace forwarder serves
    /// them.
    kernel_mixed_family_entries,
    /// Packets to a relay CID of another relay (its relay ID is not ours): dropped,
    /// never forwarded and never answered with a reset.
    relay_other_relay_cid,
    retries_sent,
    /// Tokens that fail the MAC (forged, for another address or another Retry's
    /// CID) or expired.
    invalid_tokens,
    version_negotiations,
    /// Initials (or unknown-version long headers) in datagrams under 1200 bytes:
    /// dropped unanswered (RFC 9000 §14.1, no amplification).
    dropped_short_initials,
    /// Initials with a valid token whose DCID carries the relay-CID marker.
    refused_relay_marker_cids,
    connections_accepted,
    /// Without Retry: Initials to a DCID a client chose for a connection that
    /// exists (retransmissions), passed to that connection rather than accepted anew.
    initials_to_existing_connection,
    connections_closed,
    /// Clients refused for presenting no certificate.
    refused_no_certificate,
    qad_sent,
    registrations_accepted,
    registrations_refused,
    /// Registrations accepted, by role.
    registrations_agent,
    registrations_connector,
    /// NACKs sent, by status: 0x01 (invalid or malformed service id) and 0x02 (the
    /// certificate does not cover the role and service).
    nacks_invalid_id,
    nacks_not_authorized,
    /// NACKs 0x03: registrations refused during a drain (SIGTERM).
    nacks_draining,
    /// DRAINING frames sent (one per ztna client during a drain).
    draining_sent,
    /// Configuration reloads (SIGHUP) applied, and refused (the running
    /// configuration stays).
    reloads,
    reloads_failed,
    /// Connector registrations for a service that already had a connector: both
    /// serve it (high availability).
    connectors_joined,
    /// Connectors taken out of rotation for silence (crashed, unreachable), and
    /// connectors heard from again and put back.
    connectors_lost,
    connectors_back,
    /// Relay sessions closed because their connector was taken out of rotation.
    relay_sessions_closed_connector_lost,
    datagrams_in,
    datagrams_unknown_type,
    datagrams_malformed,
    /// Well-formed messages a client must not send (ACK, QAD, ...).
    datagrams_unexpected,
    relayed_to_connector,
    relayed_to_agent,
    /// Bytes of the inner IP packets relayed on the datagram relay.
    relayed_bytes,
    /// Relayed as raw IP to a client that reads `0x2F`, because wrapped it would not
    /// have fit that client's DATAGRAM limit.
    relayed_raw_to_fit,
    /// Malformed registrations (length 0, not UTF-8, trailing bytes, ...) answered
    /// with NACK 0x01; also counted in `datagrams_malformed` and
    /// `registrations_refused`.
    registrations_malformed,
    /// CAPABILITIES frames received.
    capabilities_received,
    port_translations,
    /// New flows whose 5-tuple another agent owns, with no translation port free:
    /// dropped rather than sent untranslated (which would take the owner's replies).
    dropped_no_free_port,
    /// New flows from an agent that holds `flows::MAX_FLOWS_PER_AGENT` already.
    dropped_agent_flow_limit,
    dropped_not_registered,
    dropped_no_connector,
    dropped_no_flow,
    dropped_bad_inner_packet,
    dropped_send_failed,
    /// Packets larger than the receiving client's DATAGRAM limit even as raw IP
    /// (its connection negotiated a smaller one than the sender's); also counted in
    /// `dropped_send_failed`.
    dropped_too_large,
    relay_sessions_created,
    relay_sessions_refused,
    /// Of those, refused because the agent holds the most sessions one client may.
    relay_sessions_refused_client_limit,
    /// Of those, refused because the agent is not registered (authorized) for the
    /// service.
    relay_sessions_refused_not_authorized,
    /// Of those, refused because the intermediate is draining (SIGTERM).
    relay_sessions_refused_draining,
    relay_sessions_closed,
    /// Relayed data-connection packets forwarded by the userspace forwarder.
    userspace_forwarded_packets,
    userspace_forwarded_bytes,
    /// Of `userspace_forwarded_packets`, those the forwarder threads forwarded
    /// (`forwarder_threads` > 1; the rest, the loop's own socket).
    userspace_forwarded_packets_threads,
    /// Datagrams a forwarder thread's socket received that were not its to forward
    /// (QUIC control traffic the kernel's reuseport hash put there, relay packets
    /// from an unexpected sender), handed to the loop.
    forwarder_handovers,
    /// Of those, dropped because the loop's handover queue was full.
    forwarder_handovers_dropped,
    relay_unknown_cid,
    relay_sender_mismatch,
    /// Sender changes accepted because the client's control connection moved too.
    relay_sender_updated,
    bad_frames,
    /// Clients closed for leaving too many control frames unread (no stream credit).
    frame_queue_overflows,
    candidates_forwarded,
    /// Clients whose address changed (NAT rebinding, migration), after quiche
    /// validated the new path.
    client_moves,
    /// Packets for a known connection that quiche dropped (undecryptable, duplicate).
    quic_packets_dropped,
    /// New paths whose validation failed (spoofed or vanished addresses).
    path_validations_failed,
    /// CANDIDATES from a client that is not an endpoint of that session.
    candidates_refused,
    /// CANDIDATES from an endpoint over its per-session rate (`CANDIDATES_RATE`):
    /// dropped, not forwarded.
    candidates_rate_limited,
    /// SERVICE_PREFIXES accepted from a service's connector.
    service_prefixes_published,
    /// SERVICE_PREFIXES from a client that is not the service's connector.
    service_prefixes_refused,
    /// Tunnel addresses handed to agents, and agents refused one (pool exhausted).
    tunnel_addresses_assigned,
    tunnel_addresses_exhausted,
    /// Connector → agent packets of no known flow, routed by the agent's address.
    relayed_by_address,
});
