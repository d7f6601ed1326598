import Foundation
import Network
import ZtnaAgentFFI

// The Swift face of the Rust agent's C ABI (agent-ffi/include/ztna_agent.h). Every
// pointer, C string and C struct stays in this file; callers see Data, Swift
// structs and thrown errors. All logic (connections, paths, routes, status) is in
// the Rust engine: this type only moves bytes across.

/// A failure code from the library, with the library's own description.
public struct ZtnaAgentError: Error, Equatable, CustomStringConvertible, LocalizedError {
    /// The `ztna_error` value.
    public let code: UInt32
    public let message: String

    init(_ error: ztna_error) {
        code = error.rawValue
        message = String(cString: ztna_error_message(Int32(bitPattern: error.rawValue)))
    }

    public var description: String { "ztna error \(code): \(message)" }
    public var errorDescription: String? { description }
}

/// A destination prefix routed into the tunnel.
public struct IPPrefix: Hashable, CustomStringConvertible {
    public enum Address: Hashable {
        case ipv4(IPv4Address)
        case ipv6(IPv6Address)
    }

    /// The network address (host bits zero).
    public var address: Address
    public var length: Int

    public var description: String {
        switch address {
        case .ipv4(let a): return "\(a.debugDescription)/\(length)"
        case .ipv6(let a): return "\(a.debugDescription)/\(length)"
        }
    }

    /// The dotted IPv4 mask of `length` bits, for `NEIPv4Route`.
    public var ipv4SubnetMask: String {
        let bits = min(max(length, 0), 32)
        let mask: UInt32 = bits == 0 ? 0 : ~UInt32(0) << UInt32(32 - bits)
        return [24, 16, 8, 0].map { String((mask >> UInt32($0)) & 0xff) }.joined(separator: ".")
    }
}

/// The tunnel interface's settings from `ztna_agent_routes`.
public struct TunnelRoutes: Equatable {
    /// Our IPv4 address inside the tunnel (a /32), nil until assigned.
    public var ipv4: IPv4Address?
    /// Our IPv6 address inside the tunnel (a /128), nil until assigned.
    public var ipv6: IPv6Address?
    public var mtu: Int
    /// Every service's prefixes.
    public var prefixes: [IPPrefix]

    public var hasAddress: Bool { ipv4 != nil }
}

/// One agent: the Rust engine behind a handle. Not thread-safe: use one instance
/// from one serial queue (the library starts no threads and calls the log handler
/// only from inside these methods, on the caller's thread).
public final class ZtnaAgent {
    public struct Configuration {
        public var intermediate: SocketAddress
        /// Checked against the intermediate's certificate; nil: "intermediate.ztna".
        public var serverName: String?
        public var caPEM: Data
        public var certificatePEM: Data
        public var keyPEM: Data
        public var services: [String]
        /// The UDP socket's address; its port is advertised for hole punching.
        public var local: SocketAddress?
        /// End-to-end QUIC data connections (else the datagram relay only).
        public var dataPath = true
        /// Direct paths by hole punching (needs `dataPath`).
        public var peerToPeer = true
        /// 0: the library's defaults (5 s keepalive, 30 s idle timeout).
        public var keepaliveMilliseconds: UInt32 = 0
        public var idleTimeoutMilliseconds: UInt32 = 0
        public var logLevel: LogLevel = .info

        public init(
            intermediate: SocketAddress,
            serverName: String?,
            caPEM: Data,
            certificatePEM: Data,
            keyPEM: Data,
            services: [String]
        ) {
            self.intermediate = intermediate
            self.serverName = serverName
            self.caPEM = caPEM
            self.certificatePEM = certificatePEM
            self.keyPEM = keyPEM
            self.services = services
        }
    }

    public typealias LogHandler = (LogLevel, String) -> Void

    /// Holds the log handler for the C callback, which gets it back through its
    /// context pointer. The agent keeps it alive for as long as the handle.
    private final class LogSink {
        let handler: LogHandler

        init(_ handler: @escaping LogHandler) {
            self.handler = handler
        }
    }

    private let handle: OpaquePointer
    private let logSink: LogSink
    /// Output buffer for the polls, grown when the library reports a larger item.
    private var buffer = [UInt8](repeating: 0, count: Int(ZTNA_MAX_DATAGRAM))

    /// Creates the agent; it starts connecting at once (the first datagrams come
    /// out of `pollUDP`). The PEM bytes are copied by the library.
    public init(configuration: Configuration, log: @escaping LogHandler) throws {
        let sink = LogSink(log)
        var config = ztna_agent_config()
        config.intermediate = configuration.intermediate.ztna
        config.local = configuration.local?.ztna ?? ztna_sockaddr()
        var options: UInt32 = 0
        if configuration.dataPath {
            options |= UInt32(ZTNA_OPT_DATA_PATH)
        }
        if configuration.peerToPeer {
            options |= UInt32(ZTNA_OPT_P2P)
        }
        config.options = options
        config.keepalive_ms = configuration.keepaliveMilliseconds
        config.idle_timeout_ms = configuration.idleTimeoutMilliseconds
        config.log_level = configuration.logLevel.rawValue
        config.log = { context, level, message in
            guard let context, let message else { return }
            let sink = Unmanaged<LogSink>.fromOpaque(context).takeUnretainedValue()
            sink.handler(LogLevel(rawValue: level.rawValue) ?? .trace, String(cString: message))
        }
        config.log_ctx = Unmanaged.passUnretained(sink).toOpaque()

        // C strings that live through the call.
        let services: [UnsafeMutablePointer<CChar>?] = configuration.services.map { strdup($0) }
        let serverName: UnsafeMutablePointer<CChar>? = configuration.serverName.flatMap { strdup($0) }
        defer {
            services.forEach { free($0) }
            free(serverName)
        }
        let servicePointers: [UnsafePointer<CChar>?] = services.map { UnsafePointer($0) }
        config.server_name = UnsafePointer(serverName)

        var out: OpaquePointer?
        let result: ztna_error = configuration.caPEM.withUnsafeBytes { ca in
            configuration.certificatePEM.withUnsafeBytes { cert in
                configuration.keyPEM.withUnsafeBytes { key in
                    servicePointers.withUnsafeBufferPointer { list -> ztna_error in
                        config.ca_pem = ca.bindMemory(to: UInt8.self).baseAddress
                        config.ca_pem_len = ca.count
                        config.cert_pem = cert.bindMemory(to: UInt8.self).baseAddress
                        config.cert_pem_len = cert.count
                        config.key_pem = key.bindMemory(to: UInt8.self).baseAddress
                        config.key_pem_len = key.count
                        config.services = list.baseAddress
                        config.services_len = list.count
                        return ztna_agent_new(&config, &out)
                    }
                }
            }
        }
        guard result == ZTNA_ERROR_OK, let created = out else {
            throw ZtnaAgentError(result)
        }
        handle = created
        logSink = sink
    }

    deinit {
        ztna_agent_free(handle)
    }

    // MARK: results

    /// Throws unless the call succeeded.
    private func ok(_ result: ztna_error) throws {
        guard result == ZTNA_ERROR_OK else {
            throw ZtnaAgentError(result)
        }
    }

    /// For polls: true with output, false for "nothing now", throws otherwise.
    private func polled(_ result: ztna_error) throws -> Bool {
        if result == ZTNA_ERROR_NOTHING {
            return false
        }
        try ok(result)
        return true
    }

    /// Runs a poll into `buffer`; when the library reports a larger item (it keeps
    /// the item), grows the buffer to the reported size and polls again.
    private func pollBytes(
        _ call: (UnsafeMutablePointer<UInt8>, Int, UnsafeMutablePointer<Int>) -> ztna_error
    ) throws -> Data? {
        for _ in 0..<2 {
            var length = 0
            let result = buffer.withUnsafeMutableBufferPointer { out in
                call(out.baseAddress!, out.count, &length)
            }
            if result == ZTNA_ERROR_BUFFER_TOO_SMALL, length > buffer.count {
                buffer = [UInt8](repeating: 0, count: length)
                continue
            }
            guard try polled(result) else { return nil }
            return Data(buffer[0..<length])
        }
        throw ZtnaAgentError(ZTNA_ERROR_BUFFER_TOO_SMALL)
    }

    // MARK: the driver's calls

    /// Closes every connection gracefully; send what `pollUDP` returns afterwards.
    public func close() throws {
        try ok(ztna_agent_close(handle))
    }

    /// A datagram received on the UDP socket.
    public func udpInput(_ datagram: Data, from source: SocketAddress) throws {
        var from = source.ztna
        try datagram.withUnsafeBytes { bytes in
            try ok(ztna_agent_udp_input(handle, bytes.bindMemory(to: UInt8.self).baseAddress, bytes.count, &from))
        }
    }

    /// An IP packet read from the tunnel (no utun header).
    public func tunInput(_ packet: Data) throws {
        try packet.withUnsafeBytes { bytes in
            try ok(ztna_agent_tun_input(handle, bytes.bindMemory(to: UInt8.self).baseAddress, bytes.count))
        }
    }

    /// The next datagram to send and its destination, or nil when there is none.
    public func pollUDP() throws -> (datagram: Data, destination: SocketAddress)? {
        var to = ztna_sockaddr()
        let datagram = try pollBytes { out, capacity, length in
            ztna_agent_poll_udp(handle, out, capacity, length, &to)
        }
        guard let datagram else { return nil }
        guard let destination = SocketAddress(to) else {
            throw ZtnaAgentError(ZTNA_ERROR_INVALID_ADDRESS)
        }
        return (datagram, destination)
    }

    /// The next IP packet for the tunnel, or nil when there is none.
    public func pollTun() throws -> Data? {
        try pollBytes { out, capacity, length in
            ztna_agent_poll_tun(handle, out, capacity, length)
        }
    }

    /// Milliseconds until `onTimeout` is due (0: now), nil when no timer is set.
    public func nextTimeoutMilliseconds() throws -> UInt64? {
        var ms: UInt64 = 0
        return try polled(ztna_agent_next_timeout_ms(handle, &ms)) ? ms : nil
    }

    /// The timer fired.
    public func onTimeout() throws {
        try ok(ztna_agent_on_timeout(handle))
    }

    /// The network changed: the interface addresses now (ports ignored).
    public func networkChanged(interfaceAddresses: [SocketAddress]) throws {
        let addresses = interfaceAddresses.map(\.ztna)
        try addresses.withUnsafeBufferPointer { list in
            try ok(ztna_agent_network_changed(handle, list.baseAddress, list.count))
        }
    }

    /// The deployment's relays, all of them (the configuration's intermediate too,
    /// if it is still one): the agent connects to each, registers everywhere and
    /// picks a relay per service by RTT; relays not listed are closed. Call after
    /// creating the agent and whenever the list changes. An empty list throws
    /// (`ZTNA_ERROR_INVALID_LENGTH`) and changes nothing.
    public func setRelays(_ addresses: [SocketAddress]) throws {
        let relays = addresses.map(\.ztna)
        try relays.withUnsafeBufferPointer { list in
            try ok(ztna_agent_set_relays(handle, list.baseAddress, list.count))
        }
    }

    /// Tunnel addresses, MTU and every service's prefixes.
    public func routes() throws -> TunnelRoutes {
        var info = ztna_tunnel_info()
        var prefixes: [ztna_prefix] = []
        for _ in 0..<3 {
            var count = 0
            let result = prefixes.withUnsafeMutableBufferPointer { out in
                ztna_agent_routes(handle, &info, out.baseAddress, out.count, &count)
            }
            if result == ZTNA_ERROR_BUFFER_TOO_SMALL {
                prefixes = [ztna_prefix](repeating: ztna_prefix(), count: count)
                continue
            }
            try ok(result)
            return TunnelRoutes(info: info, prefixes: prefixes.prefix(count).compactMap { IPPrefix($0) })
        }
        throw ZtnaAgentError(ZTNA_ERROR_BUFFER_TOO_SMALL)
    }

    /// The status JSON, as the library writes it.
    public func statusJSON() throws -> Data {
        var text = [CChar](repeating: 0, count: 4096)
        for _ in 0..<3 {
            var length = 0
            let result = text.withUnsafeMutableBufferPointer { out in
                ztna_agent_status_json(handle, out.baseAddress, out.count, &length)
            }
            if result == ZTNA_ERROR_BUFFER_TOO_SMALL {
                text = [CChar](repeating: 0, count: length + 1)
                continue
            }
            try ok(result)
            return Data(text[0..<length].map { UInt8(bitPattern: $0) })
        }
        throw ZtnaAgentError(ZTNA_ERROR_BUFFER_TOO_SMALL)
    }

    /// The status, decoded.
    public func status() throws -> AgentStatus {
        try AgentStatus.decode(statusJSON())
    }
}

// MARK: C struct conversions

extension SocketAddress {
    /// As `ztna_sockaddr`: family 4 or 6, port in host order, address bytes in
    /// network order (IPv4 in the first four).
    var ztna: ztna_sockaddr {
        var address = ztna_sockaddr()
        address.family = isIPv4 ? 4 : 6
        address.port = port
        let bytes = addressBytes
        withUnsafeMutableBytes(of: &address.addr) { $0.copyBytes(from: bytes) }
        return address
    }

    init?(_ address: ztna_sockaddr) {
        let bytes = withUnsafeBytes(of: address.addr) { Data($0) }
        switch address.family {
        case 4:
            guard let a = IPv4Address(Data(bytes.prefix(4))) else { return nil }
            self.init(host: .ipv4(a), port: address.port)
        case 6:
            guard let a = IPv6Address(bytes) else { return nil }
            self.init(host: .ipv6(a), port: address.port)
        default:
            return nil
        }
    }
}

extension IPPrefix {
    init?(_ prefix: ztna_prefix) {
        let bytes = withUnsafeBytes(of: prefix.addr) { Data($0) }
        switch prefix.family {
        case 4:
            guard let a = IPv4Address(Data(bytes.prefix(4))) else { return nil }
            self.init(address: .ipv4(a), length: Int(prefix.prefix_len))
        case 6:
            guard let a = IPv6Address(bytes) else { return nil }
            self.init(address: .ipv6(a), length: Int(prefix.prefix_len))
        default:
            return nil
        }
    }
}

extension TunnelRoutes {
    init(info: ztna_tunnel_info, prefixes: [IPPrefix]) {
        if info.has_address != 0 {
            ipv4 = IPv4Address(withUnsafeBytes(of: info.ipv4) { Data($0) })
            ipv6 = IPv6Address(withUnsafeBytes(of: info.ipv6) { Data($0) })
        } else {
            ipv4 = nil
            ipv6 = nil
        }
        mtu = Int(info.mtu)
        self.prefixes = prefixes
    }
}
