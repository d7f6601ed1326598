import Foundation
import Security

/// The three PEM blobs the agent needs.
public enum PEMItem: String, CaseIterable, Codable, Identifiable {
    /// The deployment's CA certificate (signs the intermediate's and connectors').
    case ca
    /// This agent's certificate (chain); its SANs say which services it may use.
    case certificate
    /// This agent's private key.
    case key

    public var id: String { rawValue }

    public var title: String {
        switch self {
        case .ca: return "CA certificate"
        case .certificate: return "Agent certificate"
        case .key: return "Agent private key"
        }
    }

    /// A label the PEM must contain: a certificate for the first two, a private key
    /// ("PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY") for the last. The Rust
    /// side parses and validates the contents; this only catches a swapped file.
    var expectedLabel: String {
        switch self {
        case .ca, .certificate: return "CERTIFICATE-----"
        case .key: return "PRIVATE KEY-----"
        }
    }
}

public enum PEMKeychainError: LocalizedError, Equatable {
    case notPEM(PEMItem)
    case notFound(PEMItem)
    case noAppGroup
    case keychain(OSStatus)

    public var errorDescription: String? {
        switch self {
        case .notPEM(let item):
            return "That file is not a PEM \(item.title.lowercased()) (no \"\(item.expectedLabel)\" block)."
        case .notFound(let item):
            return "No \(item.title.lowercased()) in the keychain: import it in the app."
        case .noAppGroup:
            return "The bundle's Info.plist has no ZtnaAppGroup (see ios-macos/README.md)."
        case .keychain(let status):
            let text = SecCopyErrorMessageString(status, nil) as String? ?? "unknown"
            return "Keychain error \(status): \(text)"
        }
    }
}

/// The agent's PEM files in the data-protection keychain, shared by the app (which
/// imports them) and the packet tunnel extension (which reads them) through the App
/// Group, which is also a keychain access group. They are generic-password items:
/// the engine takes PEM bytes, and keeping the bytes avoids re-encoding a key that
/// `SecKey` would hold in another format.
public struct PEMKeychain {
    /// The keychain access group: the App Group both targets are entitled to.
    public let accessGroup: String

    static let service = "org.ztna.agent.pem"

    public init(accessGroup: String) {
        self.accessGroup = accessGroup
    }

    /// The group named by the bundle's `ZtnaAppGroup` Info.plist key (set from the
    /// team and bundle prefix at build time, as in the entitlements).
    public static func shared(bundle: Bundle = .main) throws -> PEMKeychain {
        guard
            let group = bundle.object(forInfoDictionaryKey: "ZtnaAppGroup") as? String,
            !group.isEmpty, !group.hasPrefix("$(")
        else {
            throw PEMKeychainError.noAppGroup
        }
        return PEMKeychain(accessGroup: group)
    }

    private func query(_ item: PEMItem) -> [String: Any] {
        [
            kSecClass as String: kSecClassGenericPassword,
            kSecAttrService as String: Self.service,
            kSecAttrAccount as String: item.rawValue,
            kSecAttrAccessGroup as String: accessGroup,
            kSecUseDataProtectionKeychain as String: true,
        ]
    }

    /// Stores (or replaces) one PEM blob after checking it holds the right kind of
    /// block. Readable after the first unlock so an on-demand tunnel can start,
    /// never synced off this device.
    public func store(_ pem: Data, as item: PEMItem) throws {
        guard let text = String(data: pem, encoding: .utf8),
            text.contains("-----BEGIN "), text.contains(item.expectedLabel)
        else {
            throw PEMKeychainError.notPEM(item)
        }
        try remove(item)
        var attributes = query(item)
        attributes[kSecValueData as String] = pem
        attributes[kSecAttrAccessible as String] = kSecAttrAccessibleAfterFirstUnlockThisDeviceOnly
        attributes[kSecAttrLabel as String] = "ztna \(item.title)"
        let status = SecItemAdd(attributes as CFDictionary, nil)
        guard status == errSecSuccess else {
            throw PEMKeychainError.keychain(status)
        }
    }

    /// The stored PEM bytes of one item.
    public func load(_ item: PEMItem) throws -> Data {
        var q = query(item)
        q[kSecReturnData as String] = true
        q[kSecMatchLimit as String] = kSecMatchLimitOne
        var result: CFTypeRef?
        let status = SecItemCopyMatching(q as CFDictionary, &result)
        if status == errSecItemNotFound {
            throw PEMKeychainError.notFound(item)
        }
        guard status == errSecSuccess, let data = result as? Data else {
            throw PEMKeychainError.keychain(status)
        }
        return data
    }

    public func contains(_ item: PEMItem) -> Bool {
        (try? load(item)) != nil
    }

    /// Removes one item; removing an absent item is not an error.
    public func remove(_ item: PEMItem) throws {
        let status = SecItemDelete(query(item) as CFDictionary)
        guard status == errSecSuccess || status == errSecItemNotFound else {
            throw PEMKeychainError.keychain(status)
        }
    }
}
