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

/// Buffers for one recvmmsg call.
pub struct RecvBatch {
    bufs: Vec<[u8; BUF]>,
    addrs: Vec<libc::sockaddr_storage>,
    lens: Vec<usize>,
    n: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            bufs: vec![[0u8; BUF]; BATCH],
            // SAFETY: all-zero is a valid sockaddr_storage.
            addrs: vec![unsafe { MaybeUninit::zeroed().assume_init() }; BATCH],
            lens: vec![0; BATCH],
            n: 0,
        }
    }
}

impl RecvBatch {
    /// Receives up to `BATCH` datagrams without blocking; returns how many.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut iov: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: BUF,
            })
            .collect();
        // SAFETY: zeroed mmsghdr is valid; pointers below outlive the call.
        let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
            .map(|_| unsafe { MaybeUninit::zeroed().assume_init() })
            .collect();
        for i in 0..BATCH {
            msgs[i].msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            msgs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: msgs holds BATCH valid headers.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
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
        for (len, m) in self.lens.iter_mut().zip(&msgs).take(self.n) {
            *len = m.msg_len as usize;
        }
        Ok(self.n)
    }

    /// The i-th received datagram and its sender.
    pub fn get(&mut self, i: usize) -> Option<(&mut [u8], SocketAddr)> {
        if i >= self.n {
            return None;
        }
        let from = from_sockaddr(&self.addrs[i])?;
        Some((&mut self.bufs[i][..self.lens[i]], from))
    }
}

/// Datagrams queued for one sendmmsg call.
#[derive(Default)]
pub struct SendBatch {
    data: Vec<u8>,
    items: Vec<(usize, usize, SocketAddr)>,
}

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

    /// Sends everything queued; datagrams the socket refuses are dropped (the
    /// endpoints' QUIC recovers them). Returns how many were sent.
    pub fn flush(&mut self, fd: RawFd) -> usize {
        let mut sent = 0;
        for chunk in self.items.chunks(BATCH) {
            // SAFETY: all-zero is a valid sockaddr_storage / mmsghdr.
            let mut addrs: Vec<libc::sockaddr_storage> = (0..chunk.len())
                .map(|_| unsafe { MaybeUninit::zeroed().assume_init() })
                .collect();
            let mut iov: Vec<libc::iovec> = chunk
                .iter()
                .map(|(s, l, _)| libc::iovec {
                    iov_base: self.data[*s..].as_ptr() as *mut _,
                    iov_len: *l,
                })
                .collect();
            let mut msgs: Vec<libc::mmsghdr> = (0..chunk.len())
                .map(|_| unsafe { MaybeUninit::zeroed().assume_init() })
                .collect();
            for (i, (_, _, to)) in chunk.iter().enumerate() {
                let len = to_sockaddr(to, &mut addrs[i]);
                msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
                msgs[i].msg_hdr.msg_namelen = len;
                msgs[i].msg_hdr.msg_iov = &mut iov[i];
                msgs[i].msg_hdr.msg_iovlen = 1;
            }
            let mut off = 0;
            while off < msgs.len() {
                // SAFETY: msgs[off..] are valid headers pointing into live buffers.
                let n = unsafe {
                    libc::sendmmsg(fd, msgs[off..].as_mut_ptr(), (msgs.len() - off) as u32, 0)
                };
                if n <= 0 {
                    // Skip the datagram the kernel refused (e.g. no route) and go on.
                    off += 1;
                    continue;
                }
                sent += n as usize;
                off += n as usize;
            }
        }
        self.data.clear();
        self.items.clear();
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
}
