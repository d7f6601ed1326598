//! The userspace forwarder on several threads (`forwarder_threads` = N > 1).
//!
//! The listening address is bound N times with SO_REUSEPORT; the kernel spreads
//! incoming datagrams over the sockets by a hash of their addresses, so one flow
//! always reaches one socket (no reordering within a flow). The loop (`mod.rs`)
//! serves the first socket as it does with N = 1; each further socket has a forwarder
//! thread of its own that:
//! - receives and sends in recvmmsg/sendmmsg batches (`crate::batch`), looking the
//!   batch's relay CIDs up in the forwarding map it shares with the loop's relay table
//!   under one read lock per batch ([`crate::relay::ForwardMap::lookup`]), counting
//!   into the same counters as the loop ([`forward_relay_packet`] is the decision of
//!   both; `userspace_forwarded_packets_threads` tells the threads' share);
//! - hands everything that is not a relay packet it can forward (QUIC control traffic
//!   that the hash put on its socket, relay packets from an unexpected sender, which
//!   only the loop can judge) to the loop through a queue, waking the loop's poll with
//!   a [`Waker`]. The loop takes them at every turn ([`Intermediate::take_handovers`])
//!   and handles them as if its own socket had received them; its replies leave from
//!   its own socket, which has the same address.
//!
//! Replies and relayed packets leave with the listening address as source whichever
//! socket sends them. Sockets join the reuseport group in order (the loop's first),
//! which is what decides where the kernel's hash puts a flow.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

use mio::Waker;

use super::*;
use crate::relay::{ForwardMap, Lookup};

/// The loop's poll token of the handover waker (its socket is `Token(0)`).
pub(super) const HANDOVER: Token = Token(1);
/// A forwarder thread's tokens: its socket, and the waker that stops it.
const SOCKET: Token = Token(0);
const STOP: Token = Token(1);
/// Packets waiting for the loop. Bounded, as a socket's receive buffer is: when the
/// loop cannot keep up, the newest are dropped and counted
/// (`forwarder_handovers_dropped`), and QUIC recovers them.
const HANDOVER_QUEUE: usize = 4096;

/// A datagram for the loop, as its socket would have received it.
pub(super) struct Handover {
    pub pkt: Vec<u8>,
    pub from: SocketAddr,
}

/// Binds the listening address `n` times (SO_REUSEPORT when `n` > 1; a port of 0 is
/// resolved by the first bind and used by the others). Returns the loop's socket and
/// those of the forwarder threads, in the order they joined the reuseport group.
pub(super) fn bind(
    listen: SocketAddr,
    n: usize,
) -> io::Result<(UdpSocket, Vec<std::net::UdpSocket>)> {
    if n <= 1 {
        return Ok((UdpSocket::bind(listen)?, Vec::new()));
    }
    let reuseport = |addr: SocketAddr| -> io::Result<std::net::UdpSocket> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        Ok(s.into())
    };
    let first = reuseport(listen)?;
    let local = first.local_addr()?;
    let rest = (1..n)
        .map(|_| reuseport(local))
        .collect::<io::Result<_>>()?;
    Ok((UdpSocket::from_std(first), rest))
}

/// What a forwarder thread shares with the loop.
#[derive(Clone)]
struct Shared {
    map: Arc<ForwardMap>,
    relay_id: u16,
    stats: Arc<IntermediateStats>,
    handovers: SyncSender<Handover>,
    wake_loop: Arc<Waker>,
    stop: Arc<AtomicBool>,
}

/// The forwarder threads of an intermediate; dropping it stops and joins them.
pub(super) struct Forwarders {
    threads: Vec<(Waker, JoinHandle<()>)>,
    stop: Arc<AtomicBool>,
    handovers: Receiver<Handover>,
}

impl Forwarders {
    /// Starts a thread per socket of `sockets`, waking `poll` (the loop's) with
    /// [`HANDOVER`] when it hands a packet over.
    pub(super) fn start(
        sockets: Vec<std::net::UdpSocket>,
        map: Arc<ForwardMap>,
        relay_id: u16,
        stats: Arc<IntermediateStats>,
        poll: &Poll,
    ) -> io::Result<Self> {
        let (tx, handovers) = std::sync::mpsc::sync_channel(HANDOVER_QUEUE);
        let shared = Shared {
            map,
            relay_id,
            stats,
            handovers: tx,
            wake_loop: Arc::new(Waker::new(poll.registry(), HANDOVER)?),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let mut me = Forwarders {
            threads: Vec::new(),
            stop: shared.stop.clone(),
            handovers,
        };
        for (i, sock) in sockets.into_iter().enumerate() {
            let mut sock = UdpSocket::from_std(sock);
            let thread_poll = Poll::new()?;
            thread_poll
                .registry()
                .register(&mut sock, SOCKET, Interest::READABLE)?;
            let stop = Waker::new(thread_poll.registry(), STOP)?;
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("forwarder-{}", i + 1))
                .spawn(move || serve(sock, thread_poll, shared))?;
            // Pushed as soon as it runs, so that a later failure still stops it.
            me.threads.push((stop, handle));
        }
        Ok(me)
    }
}

impl Drop for Forwarders {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for (stop, _) in &self.threads {
            let _ = stop.wake();
        }
        for (_, t) in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A forwarder thread: forwards what its socket receives until stopped.
fn serve(sock: UdpSocket, mut poll: Poll, shared: Shared) {
    let fd = sock.as_raw_fd();
    let mut events = Events::with_capacity(8);
    let mut recv = RecvBatch::default();
    let mut send = SendBatch::default();
    while !shared.stop.load(Ordering::Relaxed) {
        if let Err(e) = poll.poll(&mut events, None)
            && e.kind() != io::ErrorKind::Interrupted
        {
            tracing::error!("forwarder thread: poll: {e}");
            return;
        }
        // Edge-triggered: read until the socket is empty (or we are told to stop).
        while !shared.stop.load(Ordering::Relaxed) {
            let n = match recv.recv(fd) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("forwarder thread: recv: {e}");
                    break;
                }
            };
            let handed = forward_batch(&shared, &mut recv, n, &mut send);
            send.flush(fd);
            count_batches(&shared.stats, &mut recv.truncated, &mut send);
            if handed {
                let _ = shared.wake_loop.wake();
            }
            if n < crate::batch::BATCH {
                break;
            }
        }
    }
}

/// Forwards the `n` datagrams of `recv` that are relay packets for known sessions
/// from their expected senders (into `send`), hands the rest over to the loop;
/// returns whether it handed any over.
fn forward_batch(shared: &Shared, recv: &mut RecvBatch, n: usize, send: &mut SendBatch) -> bool {
    let now = Instant::now();
    let mut handed = false;
    let map = shared.map.lookup();
    for i in 0..n {
        let Some((pkt, from)) = recv.get(i) else {
            continue;
        };
        if let Some(cid) = relay_cid_of(pkt) {
            let stats = &shared.stats;
            match forward_relay_packet(stats, &map, shared.relay_id, &cid, pkt, from, now, send) {
                Relayed::Forwarded => {
                    inc(&stats.userspace_forwarded_packets_threads);
                    continue;
                }
                Relayed::Dropped => continue,
                // The loop knows whether the sender's control connection moved there.
                Relayed::Mismatch { .. } => {}
            }
        }
        handed = true;
        inc(&shared.stats.forwarder_handovers);
        let h = Handover {
            pkt: pkt.to_vec(),
            from,
        };
        match shared.handovers.try_send(h) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => inc(&shared.stats.forwarder_handovers_dropped),
            // The loop is gone (shutting down): nobody to take it.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
    handed
}

/// What became of a packet to a relay CID.
pub(super) enum Relayed {
    /// Queued for sending.
    Forwarded,
    /// Another relay's CID, or an unknown one.
    Dropped,
    /// From another address than the entry expects; `sender` is the client that
    /// should own it. Not counted yet: the loop decides.
    Mismatch { sender: ClientId },
}

/// The userspace forwarder's decision for a packet to relay CID `cid`, shared by the
/// loop and the forwarder threads: another relay's CID is dropped (never forwarded,
/// never answered with a reset), an unknown one dropped, one from its expected
/// sender counted and queued in `out`.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_relay_packet(
    stats: &IntermediateStats,
    map: &Lookup<'_>,
    relay_id: u16,
    cid: &frames::Cid,
    pkt: &[u8],
    from: SocketAddr,
    now: Instant,
    out: &mut SendBatch,
) -> Relayed {
    // Another relay's session (an address shared by several relays, or a client
    // that moved between them): not ours to forward, and a reset would be forged
    // from the endpoints' point of view.
    if ztna_common::relay::relay_id_of(cid) != relay_id {
        inc(&stats.relay_other_relay_cid);
        return Relayed::Dropped;
    }
    match map.forward(cid, from, pkt.len(), now) {
        ForwardResult::Send(to) => {
            inc(&stats.userspace_forwarded_packets);
            stats
                .userspace_forwarded_bytes
                .fetch_add(pkt.len() as u64, Ordering::Relaxed);
            out.push(pkt, to);
            Relayed::Forwarded
        }
        ForwardResult::Unknown => {
            inc(&stats.relay_unknown_cid);
            Relayed::Dropped
        }
        ForwardResult::Mismatch { sender } => Relayed::Mismatch { sender },
    }
}

/// Moves a receive batch's truncation count and a send batch's drop counts into the
/// shared counters (several threads add to them).
pub(super) fn count_batches(stats: &IntermediateStats, truncated: &mut u64, send: &mut SendBatch) {
    let add = |c: &AtomicU64, v: &mut u64| {
        if *v > 0 {
            c.fetch_add(std::mem::take(v), Ordering::Relaxed);
        }
    };
    add(&stats.recv_truncated, truncated);
    add(
        &stats.relay_send_dropped_would_block,
        &mut send.dropped_would_block,
    );
    add(&stats.relay_send_dropped_failed, &mut send.dropped_failed);
}

impl Intermediate {
    /// Handles the packets the forwarder threads handed over (at most a turn's
    /// budget of them); returns whether some may be left.
    pub(super) fn take_handovers(&mut self, out: &mut [u8], draining: bool) -> bool {
        let Some(f) = &self.forwarders else {
            return false;
        };
        let budget = self.batches_per_turn * crate::batch::BATCH;
        let taken: Vec<Handover> = f.handovers.try_iter().take(budget).collect();
        let n = taken.len();
        if n == 0 {
            return false;
        }
        for mut h in taken {
            self.handle_packet(&mut h.pkt, h.from, out, draining);
        }
        self.forwarded.flush(self.socket.as_raw_fd());
        count_batches(&self.stats, &mut 0, &mut self.forwarded);
        n == budget
    }
}
