import NetworkExtension
import SwiftUI
import UniformTypeIdentifiers

/// One window: the intermediate, further relays and services, the PEM files,
/// connect/disconnect, the services' paths, relays and RTTs, every relay's state,
/// and the recent log lines.
struct ContentView: View {
    @EnvironmentObject private var tunnel: TunnelController
    @State private var pickerShown = false
    /// Which PEM the file picker imports (kept past the picker's dismissal, which
    /// may come before its completion).
    @State private var importTarget: PEMItem = .ca

    var body: some View {
        VStack(alignment: .leading, spacing: 16) {
            settings
            connection
            ServicesTable(services: tunnel.agentStatus?.services ?? [])
                .frame(minHeight: 120)
            RelaysTable(relays: tunnel.agentStatus?.relays ?? [])
                .frame(minHeight: 80)
            LogView(lines: tunnel.log)
                .frame(minHeight: 140)
        }
        .padding(20)
        .fileImporter(isPresented: $pickerShown, allowedContentTypes: [.item]) { result in
            switch result {
            case .success(let url):
                tunnel.importPEM(from: url, as: importTarget)
            case .failure(let error):
                tunnel.lastError = error.localizedDescription
            }
        }
    }

    private var settings: some View {
        Form {
            Section("Intermediate") {
                TextField("Address (host name or IP)", text: $tunnel.configuration.intermediateHost)
                TextField("UDP port", value: $tunnel.configuration.intermediatePort, format: IntegerFormatStyle<UInt16>())
                TextField("Certificate name", text: $tunnel.configuration.serverName)
                TextField("More relays (HOST:PORT, comma-separated; optional)", text: $tunnel.relaysText)
                TextField("Services (comma-separated)", text: $tunnel.servicesText)
                Toggle("Direct paths (hole punching)", isOn: $tunnel.configuration.directPaths)
            }
            .disabled(tunnel.isConnectedOrConnecting)
            Section("Identity (PEM files, kept in the keychain)") {
                ForEach(PEMItem.allCases) { item in
                    HStack {
                        Image(systemName: tunnel.imported.contains(item) ? "checkmark.seal.fill" : "xmark.seal")
                            .foregroundColor(tunnel.imported.contains(item) ? .green : .secondary)
                        Text(item.title)
                        Spacer()
                        Button("Import…") {
                            importTarget = item
                            pickerShown = true
                        }
                    }
                }
            }
        }
    }

    private var connection: some View {
        HStack(spacing: 12) {
            if tunnel.isConnectedOrConnecting {
                Button("Disconnect") {
                    tunnel.disconnect()
                }
            } else {
                Button("Connect") {
                    Task {
                        await tunnel.connect()
                    }
                }
                .keyboardShortcut(.defaultAction)
            }
            Text(Self.describe(tunnel.vpnStatus))
                .foregroundColor(.secondary)
            if let status = tunnel.agentStatus {
                Text(Self.summary(status))
                    .foregroundColor(.secondary)
                    .textSelection(.enabled)
            }
            Spacer()
            if let error = tunnel.lastError {
                Text(error)
                    .foregroundColor(.red)
                    .lineLimit(2)
            }
        }
    }

    static func describe(_ status: NEVPNStatus) -> String {
        switch status {
        case .invalid: return "Not configured"
        case .disconnected: return "Disconnected"
        case .connecting: return "Connecting…"
        case .connected: return "Connected"
        case .reasserting: return "Reconnecting…"
        case .disconnecting: return "Disconnecting…"
        @unknown default: return "Unknown"
        }
    }

    static func summary(_ status: AgentStatus) -> String {
        var parts: [String] = []
        if status.relays.count > 1 {
            let up = status.relays.filter(\.connected).count
            parts.append("\(up) of \(status.relays.count) relays up")
        } else {
            parts.append(status.connected ? "intermediate up" : "intermediate down")
        }
        if let v4 = status.tunnelIpv4 {
            parts.append("address \(v4)")
        }
        if let observed = status.observedAddress {
            parts.append("seen as \(observed)")
        }
        return parts.joined(separator: " · ")
    }
}

/// Per service: registered, path (direct or relay), RTT, the relay its sessions
/// use and the standby one, prefixes, traffic.
struct ServicesTable: View {
    let services: [ServiceStatus]

    var body: some View {
        Table(services) {
            TableColumn("Service", value: \.name)
            TableColumn("Path") { service in
                Label(
                    service.path.displayName,
                    systemImage: service.path.isDirect ? "arrow.left.and.right" : "arrow.triangle.branch")
            }
            TableColumn("RTT") { service in
                Text(service.rttMs.map { String(format: "%.1f ms", $0) } ?? "–")
                    .monospacedDigit()
            }
            TableColumn("Relay") { service in
                Text(service.relay ?? "–")
                    .monospacedDigit()
            }
            TableColumn("Standby") { service in
                Text(service.standby ?? "–")
                    .monospacedDigit()
                    .foregroundColor(.secondary)
            }
            TableColumn("Registered") { service in
                Text(service.registered ? "yes" : "no")
            }
            TableColumn("Prefixes") { service in
                Text(service.prefixes.joined(separator: ", "))
            }
            TableColumn("Sent / received") { service in
                Text(
                    "\(Self.bytes(service.traffic.txBytes)) / \(Self.bytes(service.traffic.rxBytes))"
                )
                .monospacedDigit()
            }
        }
    }

    static func bytes(_ count: UInt64) -> String {
        ByteCountFormatter.string(fromByteCount: Int64(clamping: count), countStyle: .binary)
    }
}

/// Every relay of the deployment: address, state and RTT of its control
/// connection.
struct RelaysTable: View {
    let relays: [RelayStatus]

    var body: some View {
        Table(relays) {
            TableColumn("Relay", value: \.address)
            TableColumn("State") { relay in
                Label(Self.state(relay), systemImage: relay.connected ? "circle.fill" : "circle")
                    .foregroundColor(relay.connected && !relay.draining ? .green : .secondary)
            }
            TableColumn("RTT") { relay in
                Text(relay.rttMs.map { String(format: "%.1f ms", $0) } ?? "–")
                    .monospacedDigit()
            }
        }
    }

    /// "up", "draining" (no new sessions go to it) or "down".
    static func state(_ relay: RelayStatus) -> String {
        guard relay.connected else { return "down" }
        return relay.draining ? "draining" : "up"
    }
}

/// The provider's recent log lines, newest at the bottom.
struct LogView: View {
    let lines: [LogLine]

    private static let time: DateFormatter = {
        let f = DateFormatter()
        f.dateFormat = "HH:mm:ss.SSS"
        return f
    }()

    var body: some View {
        ScrollViewReader { proxy in
            List(lines) { line in
                Text("\(Self.time.string(from: line.date))  \(line.level.label)  \(line.message)")
                    .font(.system(.caption, design: .monospaced))
                    .foregroundColor(line.level <= .warn ? .red : .primary)
                    .textSelection(.enabled)
                    .id(line.id)
            }
            .onChange(of: lines.last?.id) { last in
                if let last {
                    proxy.scrollTo(last, anchor: .bottom)
                }
            }
        }
    }
}
