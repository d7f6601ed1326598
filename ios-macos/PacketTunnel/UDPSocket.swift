import Foundation

/// The agent's one UDP socket: a dual-stack BSD socket bound once to [::]:0, so
/// every connection (control, relayed and direct data, connectivity checks) leaves
/// from the same port, which is what the intermediate observes and what hole
/// punching relies on. An `NWConnection` is tied to one remote endpoint; the engine
/// sends to several (the intermediate, connectors on direct paths).
///
/// Reads run on `queue` (a `DispatchSourceRead`); `send` must be called there too.
final class UDPSocket {
    struct SocketError: LocalizedError {
        var call: String
        var code: Int32

        var errorDescription: String? { "\(call): \(String(cString: strerror(code)))" }
    }

    /// The bound port (the address is unspecified).
    let localPort: UInt16

    private let fd: Int32
    private let readSource: DispatchSourceRead
    private let onDatagrams: ([(Data, SocketAddress)]) -> Void
    private var buffer = [UInt8](repeating: 0, count: 65536)

    /// Opens and binds the socket; `onDatagrams` gets each batch of datagrams that
    /// were ready together, on `queue`.
    init(queue: DispatchQueue, onDatagrams: @escaping ([(Data, SocketAddress)]) -> Void) throws {
        let fd = socket(AF_INET6, SOCK_DGRAM, IPPROTO_UDP)
        guard fd >= 0 else {
            throw SocketError(call: "socket", code: errno)
        }
        func fail(_ call: String) -> SocketError {
            let code = errno
            Darwin.close(fd)
            return SocketError(call: call, code: code)
        }
        // IPv4 peers arrive as ::ffff:a.b.c.d on the same socket.
        var off: Int32 = 0
        guard setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, socklen_t(MemoryLayout<Int32>.size)) == 0 else {
            throw fail("setsockopt(IPV6_V6ONLY)")
        }
        var addr = sockaddr_in6()
        addr.sin6_len = UInt8(MemoryLayout<sockaddr_in6>.size)
        addr.sin6_family = sa_family_t(AF_INET6)
        addr.sin6_addr = in6addr_any
        addr.sin6_port = 0
        let size = socklen_t(MemoryLayout<sockaddr_in6>.size)
        let bound = withUnsafePointer(to: &addr) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, size) }
        }
        guard bound == 0 else {
            throw fail("bind")
        }
        var local = sockaddr_in6()
        var localSize = size
        let named = withUnsafeMutablePointer(to: &local) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &localSize) }
        }
        guard named == 0 else {
            throw fail("getsockname")
        }
        guard fcntl(fd, F_SETFL, O_NONBLOCK) == 0 else {
            throw fail("fcntl(O_NONBLOCK)")
        }
        self.fd = fd
        localPort = UInt16(bigEndian: local.sin6_port)
        self.onDatagrams = onDatagrams
        readSource = DispatchSource.makeReadSource(fileDescriptor: fd, queue: queue)
        readSource.setEventHandler { [weak self] in
            self?.drain()
        }
        readSource.setCancelHandler {
            Darwin.close(fd)
        }
        readSource.resume()
    }

    deinit {
        readSource.cancel()
    }

    /// Stops reading and closes the socket.
    func close() {
        readSource.cancel()
    }

    /// Sends one datagram; false when the kernel refused it (no route, buffer
    /// full): QUIC retransmits, so a lost datagram is not an error here.
    @discardableResult
    func send(_ datagram: Data, to destination: SocketAddress) -> Bool {
        var sin6 = destination.sockaddrIn6
        let size = socklen_t(MemoryLayout<sockaddr_in6>.size)
        let sent = datagram.withUnsafeBytes { bytes in
            withUnsafePointer(to: &sin6) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(fd, bytes.baseAddress, bytes.count, 0, $0, size)
                }
            }
        }
        return sent == datagram.count
    }

    /// Reads every datagram that is ready, then hands them over in one batch.
    private func drain() {
        var batch: [(Data, SocketAddress)] = []
        while true {
            var storage = sockaddr_storage()
            var storageSize = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let received = buffer.withUnsafeMutableBytes { bytes in
                withUnsafeMutablePointer(to: &storage) { pointer in
                    pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        recvfrom(fd, bytes.baseAddress, bytes.count, 0, $0, &storageSize)
                    }
                }
            }
            if received < 0 {
                if errno == EINTR {
                    continue
                }
                break  // EAGAIN: drained; anything else: the next event retries
            }
            if let from = SocketAddress(storage) {
                batch.append((Data(buffer[0..<received]), from))
            }
        }
        if !batch.isEmpty {
            onDatagrams(batch)
        }
    }
}
