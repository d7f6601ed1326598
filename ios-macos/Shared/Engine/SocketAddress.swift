import Foundation
import Network

/// An IP address and a UDP port, as the agent's datagrams are addressed.
public struct SocketAddress: Hashable, CustomStringConvertible {
    public enum Host: Hashable {
        case ipv4(IPv4Address)
        case ipv6(IPv6Address)
    }

    public var host: Host
    public var port: UInt16

    public init(host: Host, port: UInt16) {
        self.host = host
        self.port = port
    }

    /// "192.0.2.1:4433" or "[2001:db8::1]:4433".
    public var description: String {
        switch host {
        case .ipv4(let a): return "\(a.debugDescription):\(port)"
        case .ipv6(let a): return "[\(a.debugDescription)]:\(port)"
        }
    }

    /// The host's address bytes, network byte order (4 or 16).
    public var addressBytes: Data {
        switch host {
        case .ipv4(let a): return a.rawValue
        case .ipv6(let a): return a.rawValue
        }
    }

    public var isIPv4: Bool {
        if case .ipv4 = host {
            return true
        }
        return false
    }

    /// An IP literal and a port; nil when `text` is not an IP literal.
    public init?(ipLiteral text: String, port: UInt16) {
        if let a = IPv4Address(text) {
            self.init(host: .ipv4(a), port: port)
        } else if let a = IPv6Address(text) {
            self.init(host: .ipv6(a), port: port)
        } else {
            return nil
        }
    }

    /// `host` as an IP literal, or else resolved with the system resolver (the
    /// first IPv4 answer, else the first IPv6 one). Blocks while resolving.
    public static func resolve(host: String, port: UInt16) throws -> SocketAddress {
        let found = try lookup(host: host, port: port)
        guard let best = found.first(where: { $0.isIPv4 }) ?? found.first else {
            throw ResolveError(host: host, message: "no address")
        }
        return best
    }

    /// Every address of `host` (an IP literal is itself), IPv4 first, each family
    /// in address order: the resolver's order varies between calls, and a stable
    /// one keeps a relay list from looking changed when it is not. Blocks while
    /// resolving.
    public static func resolveAll(host: String, port: UInt16) throws -> [SocketAddress] {
        try lookup(host: host, port: port).sorted { a, b in
            if a.isIPv4 != b.isIPv4 {
                return a.isIPv4
            }
            return [UInt8](a.addressBytes).lexicographicallyPrecedes([UInt8](b.addressBytes))
        }
    }

    /// The resolver's answers for `host`, in its order, without repeats.
    private static func lookup(host: String, port: UInt16) throws -> [SocketAddress] {
        let trimmed = host.trimmingCharacters(in: .whitespaces)
            .trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
        if let literal = SocketAddress(ipLiteral: trimmed, port: port) {
            return [literal]
        }
        var hints = addrinfo()
        hints.ai_socktype = SOCK_DGRAM
        hints.ai_family = AF_UNSPEC
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(trimmed, nil, &hints, &list)
        guard rc == 0, let first = list else {
            throw ResolveError(host: trimmed, message: String(cString: gai_strerror(rc)))
        }
        defer { freeaddrinfo(list) }
        var found: [SocketAddress] = []
        for entry in sequence(first: first, next: { $0.pointee.ai_next }) {
            guard let sa = entry.pointee.ai_addr else { continue }
            var storage = sockaddr_storage()
            withUnsafeMutableBytes(of: &storage) { dst in
                dst.copyMemory(from: UnsafeRawBufferPointer(start: sa, count: Int(entry.pointee.ai_addrlen)))
            }
            if var address = SocketAddress(storage) {
                address.port = port
                if !found.contains(address) {
                    found.append(address)
                }
            }
        }
        guard !found.isEmpty else {
            throw ResolveError(host: trimmed, message: "no address")
        }
        return found
    }

    public struct ResolveError: LocalizedError {
        public var host: String
        public var message: String

        public var errorDescription: String? { "Cannot resolve \(host): \(message)" }
    }
}

// BSD socket addresses, for the extension's UDP socket.
extension SocketAddress {
    /// From a `sockaddr_in` / `sockaddr_in6` in `storage`; an IPv4-mapped IPv6
    /// address (an IPv4 peer on a dual-stack socket) becomes IPv4.
    public init?(_ storage: sockaddr_storage) {
        switch Int32(storage.ss_family) {
        case AF_INET:
            let sin = withUnsafeBytes(of: storage) { $0.load(as: sockaddr_in.self) }
            let raw = withUnsafeBytes(of: sin.sin_addr) { Data($0) }
            guard let a = IPv4Address(raw) else { return nil }
            self.init(host: .ipv4(a), port: UInt16(bigEndian: sin.sin_port))
        case AF_INET6:
            let sin6 = withUnsafeBytes(of: storage) { $0.load(as: sockaddr_in6.self) }
            let raw = withUnsafeBytes(of: sin6.sin6_addr) { Data($0) }
            guard let a = IPv6Address(raw) else { return nil }
            let port = UInt16(bigEndian: sin6.sin6_port)
            if a.isIPv4Mapped, let v4 = a.asIPv4 {
                self.init(host: .ipv4(v4), port: port)
            } else {
                self.init(host: .ipv6(a), port: port)
            }
        default:
            return nil
        }
    }

    /// As a destination on a dual-stack IPv6 socket: IPv4 as `::ffff:a.b.c.d`.
    public var sockaddrIn6: sockaddr_in6 {
        var sin6 = sockaddr_in6()
        sin6.sin6_len = UInt8(MemoryLayout<sockaddr_in6>.size)
        sin6.sin6_family = sa_family_t(AF_INET6)
        sin6.sin6_port = port.bigEndian
        var bytes = [UInt8](repeating: 0, count: 16)
        switch host {
        case .ipv4(let a):
            bytes[10] = 0xff
            bytes[11] = 0xff
            bytes.replaceSubrange(12..<16, with: a.rawValue)
        case .ipv6(let a):
            bytes = [UInt8](a.rawValue)
        }
        withUnsafeMutableBytes(of: &sin6.sin6_addr) { $0.copyBytes(from: bytes) }
        return sin6
    }
}
