//! Batched UDP receive and send (recvmmsg/sendmmsg) for the intermediate's loop, so
//! the userspace forwarder pays one system call per batch rather than per packet.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

pub const BATCH: usize = 32;
const BUF: usize = 2048;

fn to_sockaddr(addr: &SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    // SAFETY: sockaddr_storage is large enough and suitably aligned for both.
    unsafe {
        match addr {
            SocketAddr::V4(a) => {
                let sin = &mut *(out as *mut _ as *mut libc::sockaddr_in);
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = a.port().to_be();
                sin.sin_addr = libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                };
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
            }
            SocketAddr::V6(a) => {
                let sin6 = &mut *(out as *mut _ as *mut libc::sockaddr_in6);
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr = libc::in6_addr {
                    s6_addr: a.ip().octets(),
                };
                sin6.sin6_flowinfo = a.flowinfo();
                sin6.sin6_scope_id = a.scope_id();
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
            }
        }
    }
}

fn from_sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    // SAFETY: the family field says which layout the kernel wrote.
    unsafe {
        match s.ss_family as i32 {
            libc::AF_INET => {
                let sin = &*(s as *const _ as *const libc::sockaddr_in);
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let sin6 = &*(s as *const _ as *const libc::sockaddr_in6);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// Buffers for one recvmmsg call. The iovecs and headers are built once and point
/// into `bufs` and `addrs`, whose heap storage never moves, so a receive allocates
/// nothing.
pub struct RecvBatch {
    bufs: Vec<[u8; BUF]>,
    addrs: Vec<libc::sockaddr_storage>,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    lens: Vec<usize>,
    n: usize,
    /// Datagrams dropped because they were larger than a buffer (`MSG_TRUNC`):
    /// their tail is gone, so handling the head as a whole packet would be wrong.
    pub truncated: u64,
}

// SAFETY: the raw pointers in `iov` and `msgs` point only into this struct's own
// heap buffers (`bufs`, `addrs`), which move with it and are never shared.
unsafe impl Send for RecvBatch {}

/// Marks a slot whose datagram was truncated.
const TRUNCATED: usize = usize::MAX;

impl Default for RecvBatch {
    fn default() -> Self {
        let mut bufs = vec![[0u8; BUF]; BATCH];
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut addrs: Vec<libc::sockaddr_storage> =
            vec![unsafe { MaybeUninit::zeroed().assume_init() }; BATCH];
        let mut iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: BUF,
            })
            .collect();
        // SAFETY: zeroed mmsghdr is valid; the pointers set below stay valid for
        // the struct's life (heap storage of Vecs that are never resized).
        let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
            .map(|_| unsafe { MaybeUninit::zeroed().assume_init() })
            .collect();
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_iov = &mut iov[i];
            m.msg_hdr.msg_iovlen = 1;
        }
        RecvBatch {
            bufs,
            addrs,
            iov,
            msgs,
            lens: vec![0; BATCH],
            n: 0,
            truncated: 0,
        }
    }
}

impl RecvBatch {
    /// Receives up to `BATCH` datagrams without blocking; returns how many slots
    /// were filled (truncated ones included; [`RecvBatch::get`] skips them).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        debug_assert_eq!(self.iov.len(), BATCH);
        for m in &mut self.msgs {
            // The kernel overwrites both on every call.
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            m.msg_hdr.msg_flags = 0;
        }
        // SAFETY: msgs holds BATCH valid headers pointing into live buffers.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            self.n = 0;
            return Err(io::Error::last_os_error());
        }
        self.n = n as usize;
        for (len, m) in self.lens.iter_mut().zip(&self.msgs).take(self.n) {
            *len = if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.truncated += 1;
                TRUNCATED
            } else {
                m.msg_len as usize
            };
        }
        Ok(self.n)
    }

    /// The i-th received datagram and its sender; `None` for a truncated one.
    pub fn get(&mut self, i: usize) -> Option<(&mut [u8], SocketAddr)> {
        if i >= self.n || self.lens[i] == TRUNCATED {
            return None;
        }
        let from = from_sockaddr(&self.addrs[i])?;
        Some((&mut self.bufs[i][..self.lens[i]], from))
    }
}

/// Datagrams queued for one sendmmsg call. The header arrays are kept between
/// flushes (cleared, capacity reused) so that a flush allocates nothing.
#[derive(Default)]
pub struct SendBatch {
    data: Vec<u8>,
    items: Vec<(usize, usize, SocketAddr)>,
    addrs: Vec<libc::sockaddr_storage>,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    /// Datagrams dropped because the socket's send buffer was full (`EAGAIN`):
    /// retrying at once would spin, and the endpoints' QUIC recovers them.
    pub dropped_would_block: u64,
    /// Datagrams the kernel refused for another reason (no route, ...).
    pub dropped_failed: u64,
}

// SAFETY: the raw pointers in `iov` and `msgs` are written and used only inside
// `flush` and point into this struct's own buffers; they are never shared.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub fn push(&mut self, payload: &[u8], to: SocketAddr) {
        let start = self.data.len();
        self.data.extend_from_slice(payload);
        self.items.push((start, payload.len(), to));
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Sends everything queued. `EINTR` is retried; on `EAGAIN` the rest of the
    /// queue is dropped and counted in `dropped_would_block`; a datagram refused for
    /// another reason is skipped and counted in `dropped_failed`. Returns how many
    /// were sent.
    pub fn flush(&mut self, fd: RawFd) -> usize {
        let total = self.items.len();
        // SAFETY: all-zero is a valid sockaddr_storage / mmsghdr.
        self.addrs
            .resize(total, unsafe { MaybeUninit::zeroed().assume_init() });
        self.iov.clear();
        self.iov
            .extend(self.items.iter().map(|(s, l, _)| libc::iovec {
                iov_base: self.data[*s..].as_ptr() as *mut _,
                iov_len: *l,
            }));
        self.msgs
            .resize(total, unsafe { MaybeUninit::zeroed().assume_init() });
        for (i, (_, _, to)) in self.items.iter().enumerate() {
            let len = to_sockaddr(to, &mut self.addrs[i]);
            let m = &mut self.msgs[i];
            m.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen = len;
            m.msg_hdr.msg_iov = &mut self.iov[i];
            m.msg_hdr.msg_iovlen = 1;
        }
        let mut sent = 0;
        let mut off = 0;
        while off < total {
            let count = (total - off).min(BATCH);
            // SAFETY: msgs[off..off + count] are valid headers pointing into live
            // buffers (`data`, `addrs`, `iov` are not touched until the loop ends).
            let n = unsafe { libc::sendmmsg(fd, self.msgs[off..].as_mut_ptr(), count as u32, 0) };
            if n > 0 {
                sent += n as usize;
                off += n as usize;
                continue;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    self.dropped_would_block += (total - off) as u64;
                    break;
                }
                _ => {
                    // Skip the datagram the kernel refused (e.g. no route) and go on.
                    self.dropped_failed += 1;
                    off += 1;
                }
            }
        }
        self.data.clear();
        self.items.clear();
        // The headers point into `data`; drop them with it (capacity is kept). The
        // addresses go too, so the next flush starts from zeroed sockaddrs.
        self.iov.clear();
        self.msgs.clear();
        self.addrs.clear();
        sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn batches_round_trip_over_loopback() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = b.local_addr().unwrap();
        let mut s = SendBatch::default();
        for i in 0..50u8 {
            s.push(&[i; 10], to);
        }
        assert_eq!(s.flush(a.as_raw_fd()), 50);
        assert!(s.is_empty());
        let mut r = RecvBatch::default();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while got.len() < 50 && std::time::Instant::now() < deadline {
            let n = r.recv(b.as_raw_fd()).unwrap_or(0);
            for i in 0..n {
                let (p, from) = r.get(i).unwrap();
                assert_eq!(from, a.local_addr().unwrap());
                got.push(p.to_vec());
            }
        }
        assert_eq!(got.len(), 50);
        assert!(got.iter().enumerate().all(|(i, p)| p == &vec![i as u8; 10]));
    }

    #[test]
    fn truncated_datagrams_are_dropped_and_counted() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = b.local_addr().unwrap();
        // Larger than a receive buffer: the kernel hands over its first BUF bytes
        // and sets MSG_TRUNC.
        a.send_to(&[7u8; BUF + 500], to).unwrap();
        a.send_to(&[9u8; 100], to).unwrap();
        let mut r = RecvBatch::default();
        let mut got = Vec::new();
        let mut slots = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while slots < 2 && std::time::Instant::now() < deadline {
            let n = r.recv(b.as_raw_fd()).unwrap_or(0);
            slots += n;
            for i in 0..n {
                if let Some((p, _)) = r.get(i) {
                    got.push(p.to_vec());
                }
            }
        }
        assert_eq!(slots, 2);
        assert_eq!(
            got,
            vec![vec![9u8; 100]],
            "only the whole datagram is handed on"
        );
        assert_eq!(r.truncated, 1);
    }

    #[test]
    fn refused_datagrams_are_counted_and_the_rest_sent() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = b.local_addr().unwrap();
        let mut s = SendBatch::default();
        for i in 0..40u8 {
            if i == 5 || i == 35 {
                // An IPv6 destination on an IPv4 socket: the kernel refuses it.
                s.push(&[i; 10], "[::1]:9".parse().unwrap());
            } else {
                s.push(&[i; 10], to);
            }
        }
        assert_eq!(s.flush(a.as_raw_fd()), 38);
        assert_eq!(s.dropped_failed, 2);
        assert_eq!(s.dropped_would_block, 0);
        let mut r = RecvBatch::default();
        let mut got = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while got < 38 && std::time::Instant::now() < deadline {
            got += r.recv(b.as_raw_fd()).unwrap_or(0);
        }
        assert_eq!(got, 38);
        // The kept header arrays are reused: a second flush works the same.
        s.push(&[1; 10], to);
        assert_eq!(s.flush(a.as_raw_fd()), 1);
    }

    #[test]
    fn a_full_send_buffer_drops_the_rest_counted() {
        // A socket whose send buffer really fills: a loopback TCP connection whose
        // peer never reads (UDP on loopback frees its buffer at once). sendmmsg
        // works on it like on the relay's socket; TCP ignores the address.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_peer, _) = listener.accept().unwrap();
        tcp.set_nonblocking(true).unwrap();
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut s = SendBatch::default();
        let total = 20_000;
        for _ in 0..total {
            s.push(&[0x5a; 1400], to);
        }
        let sent = s.flush(tcp.as_raw_fd());
        assert!(sent < total, "the buffer never filled");
        assert!(s.dropped_would_block > 0);
        assert_eq!(
            sent as u64 + s.dropped_would_block + s.dropped_failed,
            total as u64
        );
        assert_eq!(s.dropped_failed, 0);
        assert!(s.is_empty());
    }
}
