import Foundation

/// What the user configures in the app; stored in the VPN configuration's
/// `providerConfiguration` and read back by the packet tunnel provider. The
/// certificates and key are not here: they live in the keychain (`PEMKeychain`).
public struct TunnelConfiguration: Codable, Equatable {
    /// Host name or IP address of the intermediate.
    public var intermediateHost: String
    /// UDP port of the intermediate.
    public var intermediatePort: UInt16
    /// Name checked against the intermediate's certificate (and sent as SNI).
    public var serverName: String
    /// Service ids to register, as the agent's certificate authorizes them.
    public var services: [String]
    /// Try direct paths to connectors (hole punching); off: always through the relay.
    public var directPaths: Bool
    /// The deployment's other relays (intermediates), besides the one above; empty
    /// for a single relay. With any, the agent connects to all of them and picks a
    /// relay per service by RTT; every entry, the intermediate's too, then stands
    /// for all the addresses its name resolves to. They share `serverName`.
    public var additionalRelays: [RelayEndpoint]

    enum CodingKeys: String, CodingKey {
        case intermediateHost
        case intermediatePort
        case serverName
        case services
        case directPaths
        case additionalRelays
    }

    public init(
        intermediateHost: String,
        intermediatePort: UInt16,
        serverName: String,
        services: [String],
        directPaths: Bool,
        additionalRelays: [RelayEndpoint] = []
    ) {
        self.intermediateHost = intermediateHost
        self.intermediatePort = intermediatePort
        self.serverName = serverName
        self.services = services
        self.directPaths = directPaths
        self.additionalRelays = additionalRelays
    }

    /// Decodes what any version saved: configurations from before several relays
    /// have no `additionalRelays` (one relay).
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        intermediateHost = try c.decode(String.self, forKey: .intermediateHost)
        intermediatePort = try c.decode(UInt16.self, forKey: .intermediatePort)
        serverName = try c.decode(String.self, forKey: .serverName)
        services = try c.decode([String].self, forKey: .services)
        directPaths = try c.decode(Bool.self, forKey: .directPaths)
        additionalRelays = try c.decodeIfPresent([RelayEndpoint].self, forKey: .additionalRelays) ?? []
    }

    /// The fields' starting values in a fresh install.
    public static let initial = TunnelConfiguration(
        intermediateHost: "",
        intermediatePort: 4433,
        serverName: "intermediate.ztna",
        services: [],
        directPaths: true
    )

    /// The intermediate followed by the additional relays: the relay list the
    /// extension resolves when there are additional relays.
    public var relayEndpoints: [RelayEndpoint] {
        let host = intermediateHost.trimmingCharacters(in: CharacterSet.whitespaces.union(CharacterSet(charactersIn: "[]")))
        return [RelayEndpoint(host: host, port: intermediatePort)] + additionalRelays
    }

    /// Why a configuration cannot be used, or nil when it can.
    public var problem: String? {
        if intermediateHost.trimmingCharacters(in: .whitespaces).isEmpty {
            return "Enter the intermediate's address."
        }
        if intermediatePort == 0 {
            return "Enter the intermediate's UDP port."
        }
        if services.isEmpty {
            return "Enter at least one service."
        }
        return nil
    }

    /// Key of the encoded configuration in `providerConfiguration`.
    public static let providerConfigurationKey = "ztna.configuration"

    /// The value for `NETunnelProviderProtocol.providerConfiguration`.
    public func providerConfiguration() throws -> [String: Any] {
        let encoded = try JSONEncoder().encode(self)
        return [Self.providerConfigurationKey: encoded]
    }

    /// Reads a configuration written by `providerConfiguration()`.
    public init?(providerConfiguration: [String: Any]?) {
        guard
            let data = providerConfiguration?[Self.providerConfigurationKey] as? Data,
            let decoded = try? JSONDecoder().decode(TunnelConfiguration.self, from: data)
        else {
            return nil
        }
        self = decoded
    }
}

/// One relay as the user entered it: a host name or IP address, and a UDP port.
public struct RelayEndpoint: Codable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: UInt16

    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }

    /// "relay2.example.com:4433", "192.0.2.2:4433" or "[2001:db8::2]:4433".
    public var description: String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    /// Reads "HOST:PORT", "[IPv6]:PORT", or a host alone (a name, an IPv4 address,
    /// an IPv6 address with or without brackets) with `defaultPort`. Nil when
    /// malformed: an empty host, a space or bracket in it, a port that is not
    /// 1-65535.
    public init?(parsing text: String, defaultPort: UInt16) {
        let entry = text.trimmingCharacters(in: .whitespaces)
        var host = Substring(entry)
        var portText: Substring?
        if entry.hasPrefix("[") {
            guard let close = entry.firstIndex(of: "]") else { return nil }
            host = entry[entry.index(after: entry.startIndex)..<close]
            let rest = entry[entry.index(after: close)...]
            if !rest.isEmpty {
                guard rest.hasPrefix(":") else { return nil }
                portText = rest.dropFirst()
            }
        } else if entry.filter({ $0 == ":" }).count == 1, let colon = entry.firstIndex(of: ":") {
            // One colon: HOST:PORT. More: a bare IPv6 address.
            host = entry[..<colon]
            portText = entry[entry.index(after: colon)...]
        }
        guard !host.isEmpty, !host.contains(where: { $0 == " " || $0 == "[" || $0 == "]" }) else {
            return nil
        }
        var port = defaultPort
        if let portText {
            guard let parsed = UInt16(portText), parsed != 0 else { return nil }
            port = parsed
        }
        self.init(host: String(host), port: port)
    }

    /// A list typed in the settings: entries separated by commas or spaces, each as
    /// `init(parsing:defaultPort:)` reads it. Throws naming the first bad entry.
    public static func parseList(_ text: String, defaultPort: UInt16) throws -> [RelayEndpoint] {
        var relays: [RelayEndpoint] = []
        for entry in text.split(whereSeparator: { $0 == "," || $0 == " " }) {
            guard let relay = RelayEndpoint(parsing: String(entry), defaultPort: defaultPort) else {
                throw InvalidEntry(entry: String(entry))
            }
            if !relays.contains(relay) {
                relays.append(relay)
            }
        }
        return relays
    }

    public struct InvalidEntry: LocalizedError, Equatable {
        public var entry: String

        public var errorDescription: String? {
            "Relay \"\(entry)\": expected HOST:PORT, HOST, or [IPv6]:PORT."
        }
    }
}

/// Severity of a log line; the raw values are the C ABI's `ztna_log_level`.
public enum LogLevel: UInt32, Codable, Comparable, CaseIterable {
    case error = 1
    case warn = 2
    case info = 3
    case debug = 4
    case trace = 5

    public static func < (lhs: LogLevel, rhs: LogLevel) -> Bool {
        lhs.rawValue < rhs.rawValue
    }

    public var label: String {
        switch self {
        case .error: return "error"
        case .warn: return "warn"
        case .info: return "info"
        case .debug: return "debug"
        case .trace: return "trace"
        }
    }
}

/// One line of the agent's log, as the provider keeps it for the app.
public struct LogLine: Codable, Equatable, Identifiable {
    /// Increasing per provider run; the app uses it to keep its list stable.
    public var id: UInt64
    public var date: Date
    public var level: LogLevel
    public var message: String

    public init(id: UInt64, date: Date, level: LogLevel, message: String) {
        self.id = id
        self.date = date
        self.level = level
        self.message = message
    }
}

/// A message from the app to the provider (`sendProviderMessage`), JSON-encoded.
public struct ProviderRequest: Codable, Equatable {
    public enum Kind: String, Codable {
        /// The agent's status and the recent log lines.
        case status
    }

    public var kind: Kind

    public init(kind: Kind) {
        self.kind = kind
    }
}

/// The provider's reply to a `ProviderRequest`, JSON-encoded.
public struct ProviderResponse: Codable, Equatable {
    /// Nil before the agent exists or when reading it failed (then `error` says why).
    public var status: AgentStatus?
    /// The most recent log lines, oldest first.
    public var log: [LogLine]
    public var error: String?

    public init(status: AgentStatus?, log: [LogLine], error: String?) {
        self.status = status
        self.log = log
        self.error = error
    }
}
