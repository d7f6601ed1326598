import Foundation
import Network
import NetworkExtension
import os

/// The packet tunnel: drives the Rust agent (`ZtnaAgent`) with the system's I/O.
/// Everything happens on one serial queue, because the agent is not thread-safe:
///
/// - the UDP socket's datagrams go to `udpInput`; the tunnel's packets
///   (`packetFlow.readPackets`) go to `tunInput`; a `DispatchSourceTimer` re-armed
///   from `nextTimeoutMilliseconds` calls `onTimeout`; `NWPathMonitor` and wake
///   call `networkChanged`;
/// - with additional relays configured, `setRelays` gets every address of every
///   relay entry after the agent is created, and again when a periodic lookup
///   (off the queue: lookups block) or a network change finds them changed;
/// - after each of those, `drive` sends what `pollUDP` returns, writes what
///   `pollTun` returns with `packetFlow.writePackets`, re-arms the timer and applies
///   the tunnel settings when `routes` changed;
/// - the app asks for the status with `sendProviderMessage` (`handleAppMessage`).
///
/// The first settings (once the intermediate assigned our addresses) complete
/// `startTunnel`.
final class PacketTunnelProvider: NEPacketTunnelProvider {
    enum TunnelError: LocalizedError {
        case noConfiguration
        case noAddress(seconds: Int)
        case stopped

        var errorDescription: String? {
            switch self {
            case .noConfiguration:
                return "The VPN configuration has no ztna settings: configure it in the ZTNA app."
            case .noAddress(let seconds):
                return "The intermediate assigned no tunnel address within \(seconds) s."
            case .stopped:
                return "The tunnel was stopped while starting."
            }
        }
    }

    /// How long `startTunnel` waits for the tunnel addresses.
    private static let startTimeoutSeconds = 30
    /// Log lines kept for the app.
    private static let logCapacity = 200
    /// How often relay names are resolved again (as the Linux agent does).
    private static let relayRefreshSeconds = 10

    private let queue = DispatchQueue(label: "org.ztna.packet-tunnel")
    /// DNS lookups of the relays block: they run here, never on `queue`.
    private let resolverQueue = DispatchQueue(label: "org.ztna.packet-tunnel.resolver")
    private let logger = Logger(subsystem: "org.ztna.packet-tunnel", category: "agent")

    private var agent: ZtnaAgent?
    private var udp: UDPSocket?
    private var timer: DispatchSourceTimer?
    private var pathMonitor: NWPathMonitor?
    private var intermediate: SocketAddress?
    private var lastInterfaceAddresses: [SocketAddress] = []
    /// The intermediate and the additional relays, when there are additional ones
    /// (else empty: the agent keeps the one intermediate it was created with).
    private var relayEndpoints: [RelayEndpoint] = []
    /// The addresses last passed to `setRelays`.
    private var appliedRelays: [SocketAddress] = []
    private var relayRefresh: DispatchSourceTimer?
    /// The settings the system has (or is applying).
    private var appliedRoutes: TunnelRoutes?
    private var applyingSettings = false
    private var readingPackets = false
    /// Set while `startTunnel` waits for the first settings.
    private var startCompletion: ((Error?) -> Void)?
    private var logLines: [LogLine] = []
    private var nextLogID: UInt64 = 0

    // MARK: lifecycle

    override func startTunnel(options: [String: NSObject]?, completionHandler: @escaping (Error?) -> Void) {
        queue.async {
            do {
                try self.start(completionHandler)
            } catch {
                self.record(.error, "start failed: \(error.localizedDescription)")
                self.teardown()
                completionHandler(error)
            }
        }
    }

    private func start(_ completion: @escaping (Error?) -> Void) throws {
        guard
            let proto = protocolConfiguration as? NETunnelProviderProtocol,
            let configuration = TunnelConfiguration(providerConfiguration: proto.providerConfiguration)
        else {
            throw TunnelError.noConfiguration
        }
        let keychain = try PEMKeychain.shared()
        let intermediate = try SocketAddress.resolve(
            host: configuration.intermediateHost, port: configuration.intermediatePort)
        let udp = try UDPSocket(queue: queue) { [weak self] datagrams in
            self?.received(datagrams)
        }
        var settings = ZtnaAgent.Configuration(
            intermediate: intermediate,
            serverName: configuration.serverName.isEmpty ? nil : configuration.serverName,
            caPEM: try keychain.load(.ca),
            certificatePEM: try keychain.load(.certificate),
            keyPEM: try keychain.load(.key),
            services: configuration.services
        )
        // The socket is bound to the unspecified address: the port is what the
        // engine advertises; the host addresses come with networkChanged below.
        let unspecified: SocketAddress.Host = intermediate.isIPv4 ? .ipv4(.any) : .ipv6(.any)
        settings.local = SocketAddress(host: unspecified, port: udp.localPort)
        settings.peerToPeer = configuration.directPaths
        let agent = try ZtnaAgent(configuration: settings) { [weak self] level, message in
            self?.record(level, message)
        }
        record(.info, "agent started: intermediate \(intermediate), UDP port \(udp.localPort)")
        self.agent = agent
        self.udp = udp
        self.intermediate = intermediate
        lastInterfaceAddresses = InterfaceAddresses.current()
        try agent.networkChanged(interfaceAddresses: lastInterfaceAddresses)
        if !configuration.additionalRelays.isEmpty {
            // Resolved here, as the intermediate was, so that the agent starts with
            // every relay; later lookups run off the queue.
            relayEndpoints = configuration.relayEndpoints
            applyRelays(Self.resolveRelays(relayEndpoints), initial: true)
            startRelayRefresh()
        }

        // From here on nothing throws: the first tunnel settings (or a failure)
        // complete the start.
        startCompletion = completion
        startTimer()
        startPathMonitor()
        queue.asyncAfter(deadline: .now() + .seconds(Self.startTimeoutSeconds)) { [weak self] in
            self?.failIfStillStarting()
        }
        drive()
    }

    override func stopTunnel(with reason: NEProviderStopReason, completionHandler: @escaping () -> Void) {
        queue.async {
            self.record(.info, "stopping (reason \(reason.rawValue))")
            if let agent = self.agent, let udp = self.udp {
                // A clean close: the CONNECTION_CLOSE datagrams go out before the
                // handle is freed.
                try? agent.close()
                while let out = try? agent.pollUDP() {
                    udp.send(out.datagram, to: out.destination)
                }
            }
            self.teardown()
            completionHandler()
        }
    }

    /// Releases everything; the agent's deinit calls `ztna_agent_free`.
    private func teardown() {
        timer?.cancel()
        timer = nil
        relayRefresh?.cancel()
        relayRefresh = nil
        relayEndpoints = []
        appliedRelays = []
        pathMonitor?.cancel()
        pathMonitor = nil
        udp?.close()
        udp = nil
        agent = nil
        appliedRoutes = nil
        if let completion = startCompletion {
            startCompletion = nil
            completion(TunnelError.stopped)
        }
    }

    /// An error the tunnel cannot go on after.
    private func fail(_ error: Error) {
        record(.error, "\(error.localizedDescription)")
        if let completion = startCompletion {
            startCompletion = nil
            teardown()
            completion(error)
        } else {
            cancelTunnelWithError(error)
        }
    }

    private func failIfStillStarting() {
        if startCompletion != nil {
            fail(TunnelError.noAddress(seconds: Self.startTimeoutSeconds))
        }
    }

    override func sleep(completionHandler: @escaping () -> Void) {
        completionHandler()
    }

    override func wake() {
        queue.async {
            self.networkChanged(force: true)
        }
    }

    // MARK: inputs

    private func received(_ datagrams: [(Data, SocketAddress)]) {
        guard let agent else { return }
        for (datagram, source) in datagrams {
            do {
                try agent.udpInput(datagram, from: source)
            } catch {
                record(.debug, "datagram from \(source) refused: \(error.localizedDescription)")
            }
        }
        drive()
    }

    private func readPackets() {
        packetFlow.readPackets { [weak self] packets, _ in
            guard let self else { return }
            self.queue.async {
                guard let agent = self.agent else { return }
                for packet in packets {
                    do {
                        try agent.tunInput(packet)
                    } catch {
                        self.record(.debug, "tunnel packet refused: \(error.localizedDescription)")
                    }
                }
                self.drive()
                self.readPackets()
            }
        }
    }

    private func startTimer() {
        let timer = DispatchSource.makeTimerSource(queue: queue)
        timer.setEventHandler { [weak self] in
            self?.timerFired()
        }
        timer.schedule(deadline: .distantFuture)
        timer.resume()
        self.timer = timer
    }

    private func timerFired() {
        guard let agent else { return }
        do {
            try agent.onTimeout()
        } catch {
            fail(error)
            return
        }
        drive()
    }

    private func startPathMonitor() {
        let monitor = NWPathMonitor()
        monitor.pathUpdateHandler = { [weak self] path in
            guard path.status == .satisfied else { return }
            self?.networkChanged(force: false)
        }
        monitor.start(queue: queue)
        pathMonitor = monitor
    }

    /// Tells the engine the interface addresses when they changed (or always, on
    /// wake: the NAT mappings may be gone even where the addresses are not).
    private func networkChanged(force: Bool) {
        guard let agent else { return }
        let addresses = InterfaceAddresses.current()
        guard force || addresses != lastInterfaceAddresses else { return }
        lastInterfaceAddresses = addresses
        let shown = addresses.map { $0.description }.joined(separator: ", ")
        record(.info, "network changed: \(addresses.count) interface address(es) \(shown)")
        do {
            try agent.networkChanged(interfaceAddresses: addresses)
        } catch {
            record(.warn, "network change refused: \(error.localizedDescription)")
        }
        // Another network may have another resolver, with other answers.
        refreshRelays()
        drive()
    }

    // MARK: relays

    /// Every address of every entry, in order, without repeats; and the entries
    /// that did not resolve. Blocks while resolving.
    private static func resolveRelays(
        _ endpoints: [RelayEndpoint]
    ) -> (addresses: [SocketAddress], failures: [String]) {
        var addresses: [SocketAddress] = []
        var failures: [String] = []
        for endpoint in endpoints {
            do {
                for address in try SocketAddress.resolveAll(host: endpoint.host, port: endpoint.port)
                where !addresses.contains(address) {
                    addresses.append(address)
                }
            } catch {
                failures.append("relay \(endpoint): \(error.localizedDescription)")
            }
        }
        return (addresses, failures)
    }

    /// Hands a resolved relay list to the agent when it differs from the one it
    /// has. A lookup that failed for some entry keeps the relays we have (a
    /// resolver hiccup is no reason to drop one), except for the first list, which
    /// takes what did resolve: later lookups add the rest.
    private func applyRelays(_ resolved: (addresses: [SocketAddress], failures: [String]), initial: Bool) {
        guard let agent else { return }
        for failure in resolved.failures {
            record(.warn, failure)
        }
        guard initial || resolved.failures.isEmpty else { return }
        guard !resolved.addresses.isEmpty, resolved.addresses != appliedRelays else { return }
        do {
            // The library logs the new list.
            try agent.setRelays(resolved.addresses)
            appliedRelays = resolved.addresses
        } catch {
            record(.warn, "relay list refused: \(error.localizedDescription)")
        }
    }

    /// Resolves the relay names again every `relayRefreshSeconds`, as long as some
    /// entry is a name (addresses do not change).
    private func startRelayRefresh() {
        guard relayEndpoints.contains(where: { SocketAddress(ipLiteral: $0.host, port: $0.port) == nil }) else {
            return
        }
        let timer = DispatchSource.makeTimerSource(queue: queue)
        timer.setEventHandler { [weak self] in
            self?.refreshRelays()
        }
        let every = DispatchTimeInterval.seconds(Self.relayRefreshSeconds)
        timer.schedule(deadline: .now() + every, repeating: every)
        timer.resume()
        relayRefresh = timer
    }

    /// Looks the relays up on the resolver queue, then applies the answer here.
    private func refreshRelays() {
        guard relayRefresh != nil else { return }
        let endpoints = relayEndpoints
        resolverQueue.async { [weak self] in
            let resolved = PacketTunnelProvider.resolveRelays(endpoints)
            guard let self else { return }
            self.queue.async {
                // Stopped meanwhile: nothing to apply to.
                guard self.relayRefresh != nil else { return }
                self.applyRelays(resolved, initial: false)
                self.drive()
            }
        }
    }

    // MARK: outputs

    /// Sends and writes what the engine has ready, re-arms the timer and applies
    /// new tunnel settings. Called after every input.
    private func drive() {
        guard let agent, let udp else { return }
        do {
            while let out = try agent.pollUDP() {
                udp.send(out.datagram, to: out.destination)
            }
            var packets: [Data] = []
            var protocols: [NSNumber] = []
            while let packet = try agent.pollTun() {
                packets.append(packet)
                protocols.append(Self.protocolFamily(of: packet))
            }
            if !packets.isEmpty {
                packetFlow.writePackets(packets, withProtocols: protocols)
            }
            applySettingsIfChanged(try agent.routes())
            rearm(try agent.nextTimeoutMilliseconds())
        } catch {
            fail(error)
        }
    }

    /// AF_INET or AF_INET6 from the IP version nibble, as `writePackets` wants.
    private static func protocolFamily(of packet: Data) -> NSNumber {
        let version = (packet.first ?? 0) >> 4
        return NSNumber(value: version == 6 ? AF_INET6 : AF_INET)
    }

    private func rearm(_ milliseconds: UInt64?) {
        guard let timer else { return }
        guard let milliseconds else {
            timer.schedule(deadline: .distantFuture)
            return
        }
        // The library rounds up, so the timer never fires before the deadline.
        let capped = Int(min(milliseconds, 3_600_000))
        timer.schedule(deadline: .now() + .milliseconds(capped), leeway: .milliseconds(1))
    }

    private func applySettingsIfChanged(_ routes: TunnelRoutes) {
        guard routes.hasAddress, routes != appliedRoutes, !applyingSettings else { return }
        applyingSettings = true
        appliedRoutes = routes
        let shown = routes.prefixes.map { $0.description }.joined(separator: ", ")
        record(.info, "tunnel settings: \(routes.ipv4?.debugDescription ?? "-"), routes \(shown)")
        setTunnelNetworkSettings(networkSettings(for: routes)) { [weak self] error in
            guard let self else { return }
            self.queue.async {
                self.settingsApplied(error)
            }
        }
    }

    private func settingsApplied(_ error: Error?) {
        applyingSettings = false
        guard agent != nil else { return }  // stopped meanwhile
        if let error {
            appliedRoutes = nil
            fail(error)
            return
        }
        if let completion = startCompletion {
            startCompletion = nil
            record(.info, "tunnel up")
            completion(nil)
        }
        if !readingPackets {
            readingPackets = true
            readPackets()
        }
        // The routes may have changed again while the system applied these.
        drive()
    }

    private func networkSettings(for routes: TunnelRoutes) -> NEPacketTunnelNetworkSettings {
        let remote = intermediate.map { address -> String in
            switch address.host {
            case .ipv4(let a): return a.debugDescription
            case .ipv6(let a): return a.debugDescription
            }
        }
        let settings = NEPacketTunnelNetworkSettings(tunnelRemoteAddress: remote ?? "127.0.0.1")
        if let ipv4 = routes.ipv4 {
            let v4 = NEIPv4Settings(addresses: [ipv4.debugDescription], subnetMasks: ["255.255.255.255"])
            v4.includedRoutes = routes.prefixes.compactMap { prefix -> NEIPv4Route? in
                guard case .ipv4(let network) = prefix.address else { return nil }
                return NEIPv4Route(destinationAddress: network.debugDescription, subnetMask: prefix.ipv4SubnetMask)
            }
            settings.ipv4Settings = v4
        }
        if let ipv6 = routes.ipv6 {
            let v6 = NEIPv6Settings(addresses: [ipv6.debugDescription], networkPrefixLengths: [128])
            v6.includedRoutes = routes.prefixes.compactMap { prefix -> NEIPv6Route? in
                guard case .ipv6(let network) = prefix.address else { return nil }
                return NEIPv6Route(
                    destinationAddress: network.debugDescription,
                    networkPrefixLength: NSNumber(value: prefix.length))
            }
            settings.ipv6Settings = v6
        }
        settings.mtu = NSNumber(value: routes.mtu)
        return settings
    }

    // MARK: the app

    override func handleAppMessage(_ messageData: Data, completionHandler: ((Data?) -> Void)?) {
        queue.async {
            let response = self.respond(to: messageData)
            completionHandler?(try? JSONEncoder().encode(response))
        }
    }

    private func respond(to messageData: Data) -> ProviderResponse {
        do {
            let request = try JSONDecoder().decode(ProviderRequest.self, from: messageData)
            switch request.kind {
            case .status:
                return ProviderResponse(status: try agent?.status(), log: logLines, error: nil)
            }
        } catch {
            return ProviderResponse(status: nil, log: logLines, error: error.localizedDescription)
        }
    }

    // MARK: log

    /// Keeps a line for the app and sends it to the unified log. Called on the
    /// queue (the engine calls its log handler only from inside our calls).
    private func record(_ level: LogLevel, _ message: String) {
        logLines.append(LogLine(id: nextLogID, date: Date(), level: level, message: message))
        nextLogID += 1
        if logLines.count > Self.logCapacity {
            logLines.removeFirst(logLines.count - Self.logCapacity)
        }
        let type: OSLogType
        switch level {
        case .error: type = .error
        case .warn: type = .default
        case .info: type = .info
        case .debug, .trace: type = .debug
        }
        logger.log(level: type, "\(message, privacy: .public)")
    }
}
