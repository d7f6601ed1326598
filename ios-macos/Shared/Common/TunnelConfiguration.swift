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

    public init(
        intermediateHost: String,
        intermediatePort: UInt16,
        serverName: String,
        services: [String],
        directPaths: Bool
    ) {
        self.intermediateHost = intermediateHost
        self.intermediatePort = intermediatePort
        self.serverName = serverName
        self.services = services
        self.directPaths = directPaths
    }

    /// The fields' starting values in a fresh install.
    public static let initial = TunnelConfiguration(
        intermediateHost: "",
        intermediatePort: 4433,
        serverName: "intermediate.ztna",
        services: [],
        directPaths: true
    )

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
