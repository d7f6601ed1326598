//! The UDP load: sendmmsg senders in the agent namespace (as fast as they go, or at
//! a rate), recvmmsg receivers in the connector namespace, and one measurement
//! window of it ([`measure`]).

use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use super::*;
use crate::window::{Acct, window};

pub fn join<T>(h: JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    h.join().map_err(|_| anyhow::anyhow!("thread panicked"))?
}

/// A UDP socket bound to `addr`, with a receive buffer of `rcvbuf` bytes if given.
pub fn bind(addr: SocketAddrV4, rcvbuf: Option<usize>) -> anyhow::Result<UdpSocket> {
    let s = UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
    if let Some(size) = rcvbuf {
        let v = size as libc::c_int;
        // SAFETY: setsockopt with a pointer to a c_int that outlives the call.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&v as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
    }
    Ok(s)
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data; all-zero is valid.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as u16;
    sa.sin_port = a.port().to_be();
    sa.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
    sa
}

/// Sends `pkt` to `to` with sendmmsg (batches of BATCH) until `until`; at `rate`
/// packets per second if given. Adds sent packets to `sent`.
pub fn send_loop(
    sock: UdpSocket,
    pkt: Vec<u8>,
    to: SocketAddrV4,
    until: Instant,
    rate: Option<f64>,
    sent: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut sa = sockaddr(to);
    let mut iov = libc::iovec {
        iov_base: pkt.as_ptr() as *mut libc::c_void,
        iov_len: pkt.len(),
    };
    // SAFETY: mmsghdr is plain data; all-zero is valid.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for m in msgs.iter_mut() {
        m.msg_hdr.msg_name = (&mut sa as *mut libc::sockaddr_in).cast();
        m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let t0 = Instant::now();
    let mut mine = 0u64;
    loop {
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        let n = match rate {
            None => BATCH,
            Some(r) => {
                let due = ((now - t0).as_secs_f64() * r) as u64;
                if due <= mine {
                    std::thread::sleep(Duration::from_micros(100));
                    continue;
                }
                ((due - mine) as usize).min(BATCH)
            }
        };
        // SAFETY: msgs point at sa, iov and pkt, all alive for the call.
        let r = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
        if r > 0 {
            mine += r as u64;
            sent.fetch_add(r as u64, Ordering::Relaxed);
        } else {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => std::thread::yield_now(),
                _ => bail!("sendmmsg to {to}: {e}"),
            }
        }
    }
}

/// Counts datagrams arriving on `sock` (recvmmsg) until `stop`.
pub fn receive_loop(
    sock: UdpSocket,
    stop: Arc<AtomicBool>,
    got: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut bufs = vec![[0u8; 2048]; BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain data; all-zero is valid.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, v) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: the headers point into iovs/bufs, which outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            got.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    Ok(())
}

pub struct Flow {
    /// Sender's address (agent namespace).
    pub src: SocketAddrV4,
    /// Receiver's address (connector namespace).
    pub dst: SocketAddrV4,
    /// Where the sender sends: the relay, or `dst` for the direct baseline.
    pub to: SocketAddrV4,
    pub payload: Vec<u8>,
}

/// Runs the UDP load of `flows` (at `rate` pps in total, or as fast as the senders
/// go) and measures one window after WARMUP.
pub fn measure(
    lab: &Lab,
    flows: &[Flow],
    rate: Option<u64>,
    len: Duration,
    acct: &Acct,
) -> anyhow::Result<Window> {
    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicU64::new(0));
    let offered = Arc::new(AtomicU64::new(0));
    let mut receivers = Vec::new();
    let (ready_tx, ready_rx) = mpsc::channel();
    for f in flows {
        let (dst, stop, got, ready) = (f.dst, stop.clone(), got.clone(), ready_tx.clone());
        receivers.push(ztna_netlab::spawn_in_netns(&lab.ns("c"), move || {
            let s = bind(dst, Some(8 << 20));
            let _ = ready.send(s.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")));
            receive_loop(s?, stop, got)
        }));
    }
    for _ in flows {
        let r = ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("receiver did not start");
        if let Err(e) = r.and_then(|r| r.map_err(|e| anyhow::anyhow!("receiver: {e}"))) {
            stop.store(true, Ordering::Relaxed);
            return Err(e);
        }
    }
    let until = Instant::now() + WARMUP + len + Duration::from_millis(200);
    let mut senders = Vec::new();
    for f in flows {
        let (src, to, payload, offered) = (f.src, f.to, f.payload.clone(), offered.clone());
        let per_flow = rate.map(|r| r as f64 / flows.len() as f64);
        senders.push(ztna_netlab::spawn_in_netns(&lab.ns("a"), move || {
            send_loop(bind(src, None)?, payload, to, until, per_flow, offered)
        }));
    }
    std::thread::sleep(WARMUP);
    let w = window(&got, &offered, len, acct);
    let mut err = None;
    for h in senders {
        if let Err(e) = join(h) {
            err.get_or_insert(e);
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    for h in receivers {
        if let Err(e) = join(h) {
            err.get_or_insert(e);
        }
    }
    match err {
        Some(e) => Err(e),
        None => Ok(w),
    }
}
