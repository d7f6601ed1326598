import Foundation
import NetworkExtension

/// The app's side of the tunnel: the VPN configuration (`NETunnelProviderManager`),
/// connect and disconnect, the PEM files in the keychain, and the provider's status
/// and log lines, polled once a second with `sendProviderMessage` while connected.
@MainActor
final class TunnelController: ObservableObject {
    @Published var configuration = TunnelConfiguration.initial
    @Published private(set) var vpnStatus: NEVPNStatus = .invalid
    @Published private(set) var agentStatus: AgentStatus?
    @Published private(set) var log: [LogLine] = []
    @Published private(set) var imported: Set<PEMItem> = []
    @Published var lastError: String?

    private var manager: NETunnelProviderManager?
    private var statusObserver: NSObjectProtocol?
    private var pollTimer: Timer?

    /// The extension's bundle id, from the app's Info.plist (set at build time).
    private var extensionBundleIdentifier: String {
        Bundle.main.object(forInfoDictionaryKey: "ZtnaTunnelBundleIdentifier") as? String
            ?? (Bundle.main.bundleIdentifier ?? "org.ztna.app") + ".tunnel"
    }

    /// The services field, comma- or space-separated; parsed on connect (parsing
    /// while typing would eat the separator just typed).
    @Published var servicesText = ""
    /// The additional relays field, HOST[:PORT] entries separated by commas or
    /// spaces; parsed on connect too.
    @Published var relaysText = ""

    var isConnectedOrConnecting: Bool {
        switch vpnStatus {
        case .connected, .connecting, .reasserting: return true
        default: return false
        }
    }

    // MARK: configuration

    /// Loads the saved VPN configuration, if any, and what the keychain holds.
    func load() async {
        refreshImported()
        do {
            let managers = try await NETunnelProviderManager.loadAllFromPreferences()
            guard let existing = managers.first else { return }
            manager = existing
            if let proto = existing.protocolConfiguration as? NETunnelProviderProtocol,
                let saved = TunnelConfiguration(providerConfiguration: proto.providerConfiguration)
            {
                configuration = saved
                servicesText = saved.services.joined(separator: ", ")
                relaysText = saved.additionalRelays.map(\.description).joined(separator: ", ")
            }
            observe(existing)
        } catch {
            lastError = "Loading the VPN configuration: \(error.localizedDescription)"
        }
    }

    /// Saves the configuration into the system's VPN preferences (the first save
    /// asks the user to allow the VPN configuration).
    private func save() async throws -> NETunnelProviderManager {
        let target = manager ?? NETunnelProviderManager()
        let proto = (target.protocolConfiguration as? NETunnelProviderProtocol) ?? NETunnelProviderProtocol()
        proto.providerBundleIdentifier = extensionBundleIdentifier
        proto.serverAddress = "\(configuration.intermediateHost):\(configuration.intermediatePort)"
        proto.providerConfiguration = try configuration.providerConfiguration()
        target.protocolConfiguration = proto
        target.localizedDescription = "ZTNA"
        target.isEnabled = true
        try await target.saveToPreferences()
        // A saved manager must be reloaded before it can start.
        try await target.loadFromPreferences()
        manager = target
        observe(target)
        return target
    }

    // MARK: connect

    func connect() async {
        lastError = nil
        configuration.services = servicesText
            .split(whereSeparator: { $0 == "," || $0 == " " })
            .map(String.init)
        do {
            // An entry without a port takes the intermediate's.
            configuration.additionalRelays = try RelayEndpoint.parseList(
                relaysText, defaultPort: configuration.intermediatePort)
        } catch {
            lastError = error.localizedDescription
            return
        }
        if let problem = configuration.problem {
            lastError = problem
            return
        }
        let missing = PEMItem.allCases.filter { !imported.contains($0) }
        if !missing.isEmpty {
            lastError = "Import first: " + missing.map(\.title).joined(separator: ", ")
            return
        }
        do {
            let target = try await save()
            try target.connection.startVPNTunnel()
        } catch {
            lastError = "Connecting: \(error.localizedDescription)"
        }
    }

    func disconnect() {
        manager?.connection.stopVPNTunnel()
    }

    private func observe(_ target: NETunnelProviderManager) {
        if let statusObserver {
            NotificationCenter.default.removeObserver(statusObserver)
        }
        statusObserver = NotificationCenter.default.addObserver(
            forName: .NEVPNStatusDidChange, object: target.connection, queue: .main
        ) { [weak self] _ in
            Task { @MainActor in
                self?.statusChanged()
            }
        }
        statusChanged()
    }

    private func statusChanged() {
        vpnStatus = manager?.connection.status ?? .invalid
        if isConnectedOrConnecting {
            startPolling()
        } else {
            stopPolling()
        }
    }

    // MARK: status from the provider

    private func startPolling() {
        guard pollTimer == nil else { return }
        pollTimer = Timer.scheduledTimer(withTimeInterval: 1, repeats: true) { [weak self] _ in
            Task { @MainActor in
                self?.poll()
            }
        }
        poll()
    }

    private func stopPolling() {
        pollTimer?.invalidate()
        pollTimer = nil
        agentStatus = nil
    }

    private func poll() {
        guard let session = manager?.connection as? NETunnelProviderSession else { return }
        do {
            let request = try JSONEncoder().encode(ProviderRequest(kind: .status))
            try session.sendProviderMessage(request) { [weak self] reply in
                Task { @MainActor in
                    self?.received(reply)
                }
            }
        } catch {
            lastError = "Asking the tunnel for its status: \(error.localizedDescription)"
        }
    }

    private func received(_ reply: Data?) {
        guard let reply, let response = try? JSONDecoder().decode(ProviderResponse.self, from: reply) else {
            return
        }
        agentStatus = response.status
        log = response.log
        if let error = response.error {
            lastError = "Tunnel: \(error)"
        }
    }

    // MARK: PEM files

    func refreshImported() {
        guard let keychain = try? PEMKeychain.shared() else {
            imported = []
            return
        }
        imported = Set(PEMItem.allCases.filter { keychain.contains($0) })
    }

    /// Reads a PEM file the user picked and stores it in the shared keychain.
    func importPEM(from url: URL, as item: PEMItem) {
        let scoped = url.startAccessingSecurityScopedResource()
        defer {
            if scoped {
                url.stopAccessingSecurityScopedResource()
            }
        }
        do {
            let pem = try Data(contentsOf: url)
            try PEMKeychain.shared().store(pem, as: item)
            lastError = nil
        } catch {
            lastError = "Importing \(url.lastPathComponent): \(error.localizedDescription)"
        }
        refreshImported()
    }
}
