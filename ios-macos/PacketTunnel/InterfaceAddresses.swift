import Foundation
import Network

/// The machine's interface addresses, for `ztna_agent_network_changed`: the engine
/// offers them to connectors as host candidates for direct paths. `NWPathMonitor`
/// says when the network changed but not the addresses; `getifaddrs` does.
enum InterfaceAddresses {
    /// Addresses of interfaces that are up, except loopback, IPv6 link-local
    /// (unusable without a scope) and tunnels (`utun*`, `ipsec*`: this tunnel's own
    /// address and other VPNs' are no way to reach a connector directly).
    static func current() -> [SocketAddress] {
        var head: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&head) == 0, let first = head else {
            return []
        }
        defer { freeifaddrs(head) }
        var found: [SocketAddress] = []
        for entry in sequence(first: first, next: { $0.pointee.ifa_next }) {
            let flags = Int32(entry.pointee.ifa_flags)
            guard flags & IFF_UP != 0, flags & IFF_LOOPBACK == 0,
                let sa = entry.pointee.ifa_addr
            else {
                continue
            }
            let name = String(cString: entry.pointee.ifa_name)
            if name.hasPrefix("utun") || name.hasPrefix("ipsec") {
                continue
            }
            let family = Int32(sa.pointee.sa_family)
            guard family == AF_INET || family == AF_INET6 else {
                continue
            }
            var storage = sockaddr_storage()
            withUnsafeMutableBytes(of: &storage) { dst in
                dst.copyMemory(from: UnsafeRawBufferPointer(start: sa, count: Int(sa.pointee.sa_len)))
            }
            guard let address = SocketAddress(storage) else {
                continue
            }
            if case .ipv6(let a) = address.host, a.isLinkLocal {
                continue
            }
            if !found.contains(address) {
                found.append(address)
            }
        }
        return found
    }
}
