import Foundation

// The agent's status as `ztna_agent_status_json` emits it: serde's JSON of
// `ztna_core::agent::AgentStatus` (ztna-core/src/agent/status.rs), field names as written
// there. Optional fields are `null` until known (no tunnel address yet, no RTT
// sample yet). Decoded by the app from the provider's reply; no field is computed
// here.

/// How a service's packets travel (`PathKind` in the engine, kebab-case in JSON).
public enum ServicePath: String, Codable, Equatable {
    /// QUIC data connection straight to the connector, after hole punching.
    case direct
    /// QUIC data connection through the relay, forwarded by its XDP program.
    case relayXdp = "relay-xdp"
    /// QUIC data connection through the relay's userspace forwarder.
    case relayUserspace = "relay-userspace"
    /// DATAGRAMs on the control connection, decrypted by the intermediate.
    case datagram

    /// What the app shows: "direct" or "relay (…)".
    public var displayName: String {
        switch self {
        case .direct: return "direct"
        case .relayXdp: return "relay (XDP)"
        case .relayUserspace: return "relay (userspace)"
        case .datagram: return "relay (datagram)"
        }
    }

    public var isDirect: Bool { self == .direct }
}

/// Per-service packet and byte counters.
public struct ServiceTraffic: Codable, Equatable {
    public var txPackets: UInt64
    public var txBytes: UInt64
    public var rxPackets: UInt64
    public var rxBytes: UInt64

    enum CodingKeys: String, CodingKey {
        case txPackets = "tx_packets"
        case txBytes = "tx_bytes"
        case rxPackets = "rx_packets"
        case rxBytes = "rx_bytes"
    }
}

/// One entry of a service's path history.
public struct PathChange: Codable, Equatable {
    public var service: String
    /// Milliseconds since the engine was created.
    public var atMs: UInt64
    public var path: ServicePath

    enum CodingKeys: String, CodingKey {
        case service
        case atMs = "at_ms"
        case path
    }
}

/// One configured service.
public struct ServiceStatus: Codable, Equatable, Identifiable {
    public var name: String
    public var registered: Bool
    /// Destination prefixes routed into the tunnel for it, as "10.100.0.1/32".
    public var prefixes: [String]
    public var path: ServicePath
    public var rttMs: Double?
    /// The relay its sessions use ("198.51.100.4:4433"), and the next choice.
    public var relay: String?
    public var standby: String?
    public var traffic: ServiceTraffic
    public var history: [PathChange]

    public var id: String { name }

    enum CodingKeys: String, CodingKey {
        case name
        case registered
        case prefixes
        case path
        case rttMs = "rtt_ms"
        case relay
        case standby
        case traffic
        case history
    }
}

/// One relay (intermediate) of the deployment.
public struct RelayStatus: Codable, Equatable, Identifiable {
    public var address: String
    public var connected: Bool
    /// It announced a drain: no new sessions go to it.
    public var draining: Bool
    public var rttMs: Double?

    public var id: String { address }

    enum CodingKeys: String, CodingKey {
        case address
        case connected
        case draining
        case rttMs = "rtt_ms"
    }
}

/// The whole agent.
public struct AgentStatus: Codable, Equatable {
    /// Some relay's control connection is up.
    public var connected: Bool
    /// Our address as the intermediate sees it ("203.0.113.7:51820").
    public var observedAddress: String?
    public var tunnelIpv4: String?
    public var tunnelIpv6: String?
    public var mtu: UInt16
    public var handshakeMs: Double?
    public var services: [ServiceStatus]
    public var relays: [RelayStatus]
    /// Tunnel packets to an address no service covers (answered with ICMP).
    public var tunNoRoute: UInt64
    /// Tunnel packets too big for their path (answered with ICMP).
    public var tunTooBig: UInt64
    /// Tunnel packets the path refused.
    public var tunSendFailed: UInt64

    enum CodingKeys: String, CodingKey {
        case connected
        case observedAddress = "observed_address"
        case tunnelIpv4 = "tunnel_ipv4"
        case tunnelIpv6 = "tunnel_ipv6"
        case mtu
        case handshakeMs = "handshake_ms"
        case services
        case relays
        case tunNoRoute = "tun_no_route"
        case tunTooBig = "tun_too_big"
        case tunSendFailed = "tun_send_failed"
    }

    /// Decodes the engine's JSON.
    public static func decode(_ json: Data) throws -> AgentStatus {
        try JSONDecoder().decode(AgentStatus.self, from: json)
    }
}
