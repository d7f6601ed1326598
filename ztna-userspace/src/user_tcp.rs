//! TCP in the connector's userspace mode (no CAP_NET_ADMIN, e.g. an unprivileged
//! container): a userspace TCP/IP stack (smoltcp) terminates each agent's TCP
//! connection, and a real socket carries the bytes to the backend.
//!
//! ```text
//!  agent's SYN ──► dial the backend first ──refused──► RST to the agent (prompt "connection refused")
//!                        │ connected
//!                        ▼
//!  smoltcp socket listening on the service address:port takes the SYN ──► SYN-ACK ...
//!  smoltcp socket ◄──► bytes ◄──► backend TcpStream (mio)
//! ```
//!
//! The stack accepts packets for any address (`any_ip`): the connector has already
//! checked that the destination is a service prefix. Each agent may hold at most
//! `per_agent` connections (pending dials included); more SYNs are answered with
//! RST and counted. Packets the stack emits are returned to the caller, which sends
//! them to the agent owning the destination address.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant as StdInstant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};
use ztna_core::packet::{FlowKey, Proto};

/// Socket buffers per connection, each way.
const BUF: usize = 256 * 1024;
/// A backend that does not answer the dial within this gets the agent an RST.
const DIAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Default cap on one agent's TCP connections through a userspace connector.
pub const DEFAULT_PER_AGENT: usize = 256;

/// Packets in and out of the stack.
#[derive(Default)]
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0u8; len];
        let r = f(&mut b);
        self.0.push_back(b);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = usize::from(ztna_core::agent::TUN_MTU);
        c
    }
}

/// A dial in progress: the agent's SYN waits for the backend's answer.
struct Dial {
    stream: TcpStream,
    syn: Vec<u8>,
    key: FlowKey,
    started: StdInstant,
}

/// An established relay between a smoltcp socket and a backend stream.
struct Conn {
    stream: TcpStream,
    handle: SocketHandle,
    key: FlowKey,
    /// Bytes from the agent not yet written to the backend.
    to_backend: Vec<u8>,
    backend_eof: bool,
    agent_eof_sent: bool,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct TcpStats {
    pub dials: u64,
    pub refused: u64,
    pub over_limit: u64,
    pub established: u64,
    pub closed: u64,
}

pub struct UserTcp {
    iface: Interface,
    dev: Queues,
    sockets: SocketSet<'static>,
    epoch: StdInstant,
    /// Flow (agent → service address) → token of its dial or connection.
    flows: HashMap<FlowKey, Token>,
    dials: HashMap<Token, Dial>,
    conns: HashMap<Token, Conn>,
    per_agent: usize,
    next_token: usize,
    token_base: usize,
    pub stats: TcpStats,
}

impl UserTcp {
    /// Tokens are `token_base + n`; the caller routes their events to `ready`.
    pub fn new(token_base: usize, per_agent: usize) -> Self {
        let mut dev = Queues::default();
        let epoch = StdInstant::now();
        let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut dev, Instant::ZERO);
        iface.set_any_ip(true);
        // Prefixes of length 0: every destination is on-link (Medium::Ip needs no
        // neighbours); the connector already checked which ones are services.
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::v4(192, 0, 2, 1), 0));
            let _ = a.push(IpCidr::new(IpAddress::v6(0xfd00, 0, 0, 0, 0, 0, 0, 1), 0));
        });
        UserTcp {
            iface,
            dev,
            sockets: SocketSet::new(vec![]),
            epoch,
            flows: HashMap::new(),
            dials: HashMap::new(),
            conns: HashMap::new(),
            per_agent,
            next_token: 0,
            token_base,
            stats: TcpStats::default(),
        }
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    pub fn owns(&self, token: Token) -> bool {
        token.0 >= self.token_base
    }

    /// One TCP packet from an agent; `backend` is where the service's traffic goes.
    pub fn packet_in(
        &mut self,
        registry: &Registry,
        key: FlowKey,
        packet: Vec<u8>,
        backend: SocketAddr,
    ) {
        debug_assert_eq!(key.proto, Proto::Tcp);
        if self.flows.contains_key(&key) {
            if let Some(t) = self.flows.get(&key)
                && let Some(d) = self.dials.get_mut(t)
            {
                // A retransmitted SYN while we dial: keep the latest.
                d.syn = packet;
                return;
            }
            self.dev.rx.push_back(packet);
            return;
        }
        let flags = tcp_flags(&packet);
        let syn_only = flags & 0x12 == 0x02;
        if !syn_only {
            // Not ours (a connection from before a restart): the stack answers RST.
            self.dev.rx.push_back(packet);
            return;
        }
        let agent = key.src.ip();
        if self.flows.keys().filter(|k| k.src.ip() == agent).count() >= self.per_agent {
            self.stats.over_limit += 1;
            self.reset(&packet);
            return;
        }
        let mut stream = match TcpStream::connect(backend) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("dial {backend}: {e}");
                self.stats.refused += 1;
                self.reset(&packet);
                return;
            }
        };
        let token = Token(self.token_base + self.next_token);
        self.next_token += 1;
        if registry
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .is_err()
        {
            self.reset(&packet);
            return;
        }
        self.stats.dials += 1;
        self.flows.insert(key, token);
        self.dials.insert(
            token,
            Dial {
                stream,
                syn: packet,
                key,
                started: StdInstant::now(),
            },
        );
    }

    /// Readiness of one of our streams.
    pub fn ready(&mut self, registry: &Registry, token: Token) {
        if let Some(d) = self.dials.get(&token) {
            // A non-blocking connect is done when the socket is writable: either
            // with a peer (connected) or with an error (refused, unreachable).
            let connected = match d.stream.take_error() {
                Ok(None) => match d.stream.peer_addr() {
                    Ok(_) => Some(true),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => None,
                    Err(_) => Some(false),
                },
                _ => Some(false),
            };
            match connected {
                None => return,
                Some(false) => {
                    let d = self.dials.remove(&token).expect("present");
                    self.flows.remove(&d.key);
                    self.stats.refused += 1;
                    self.reset(&d.syn);
                    return;
                }
                Some(true) => {
                    let d = self.dials.remove(&token).expect("present");
                    self.accept(token, d);
                }
            }
        }
        let _ = registry;
        self.pump(token);
    }

    /// The backend answered: a listening socket takes the agent's SYN.
    fn accept(&mut self, token: Token, d: Dial) {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; BUF]),
            tcp::SocketBuffer::new(vec![0; BUF]),
        );
        s.set_nagle_enabled(false);
        s.set_ack_delay(None);
        let local = (IpAddress::from(d.key.dst.ip()), d.key.dst.port());
        if s.listen(local).is_err() {
            self.flows.remove(&d.key);
            self.reset(&d.syn);
            return;
        }
        let handle = self.sockets.add(s);
        self.stats.established += 1;
        self.dev.rx.push_back(d.syn);
        self.conns.insert(
            token,
            Conn {
                stream: d.stream,
                handle,
                key: d.key,
                to_backend: Vec::new(),
                backend_eof: false,
                agent_eof_sent: false,
            },
        );
    }

    /// Moves bytes both ways for one connection.
    fn pump(&mut self, token: Token) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
        let mut buf = [0u8; 16 * 1024];
        // Agent → backend.
        loop {
            if !c.to_backend.is_empty() {
                match c.stream.write(&c.to_backend) {
                    Ok(n) => {
                        c.to_backend.drain(..n);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        s.abort();
                        break;
                    }
                }
            }
            match s.recv_slice(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => c.to_backend.extend_from_slice(&buf[..n]),
            }
        }
        // The agent sent FIN and every byte before it reached the backend.
        let agent_done = matches!(
            s.state(),
            tcp::State::CloseWait
                | tcp::State::LastAck
                | tcp::State::Closing
                | tcp::State::TimeWait
                | tcp::State::Closed
        ) && !s.can_recv();
        if c.to_backend.is_empty() && agent_done && !c.agent_eof_sent {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
            c.agent_eof_sent = true;
        }
        // Backend → agent, as far as the socket has room.
        while !c.backend_eof && s.can_send() {
            let room = s.send_capacity() - s.send_queue();
            let want = room.min(buf.len());
            if want == 0 {
                break;
            }
            match c.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    c.backend_eof = true;
                    s.close();
                }
                Ok(n) => {
                    let _ = s.send_slice(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    s.abort();
                    c.backend_eof = true;
                }
            }
        }
    }

    /// Runs the stack: timers, packets in, packets out. Returns the packets for
    /// agents, and closes what is done.
    pub fn poll(&mut self, registry: &Registry) -> Vec<Vec<u8>> {
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        for t in &tokens {
            self.pump(*t);
        }
        // Dials that never finished.
        let stale: Vec<Token> = self
            .dials
            .iter()
            .filter(|(_, d)| d.started.elapsed() > DIAL_TIMEOUT)
            .map(|(t, _)| *t)
            .collect();
        for t in stale {
            if let Some(mut d) = self.dials.remove(&t) {
                let _ = registry.deregister(&mut d.stream);
                self.flows.remove(&d.key);
                self.stats.refused += 1;
                self.reset(&d.syn);
            }
        }
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        // Finished connections.
        let done: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                let s = self.sockets.get::<tcp::Socket>(c.handle);
                matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait)
            })
            .map(|(t, _)| *t)
            .collect();
        for t in done {
            if let Some(mut c) = self.conns.remove(&t) {
                let _ = registry.deregister(&mut c.stream);
                self.sockets.remove(c.handle);
                self.flows.remove(&c.key);
                self.stats.closed += 1;
            }
        }
        self.dev.tx.drain(..).collect()
    }

    /// When `poll` must run next, if sooner than any IO.
    pub fn poll_delay(&mut self) -> Option<std::time::Duration> {
        let now = self.now();
        self.iface
            .poll_delay(now, &self.sockets)
            .map(|d: Duration| std::time::Duration::from_micros(d.total_micros()))
    }

    /// An RST that refuses the agent's SYN, from the service address.
    fn reset(&mut self, syn: &[u8]) {
        if let Some(rst) = rst_for(syn) {
            self.dev.tx.push_back(rst);
        }
    }
}

fn tcp_flags(packet: &[u8]) -> u8 {
    let l4 = match packet.first().map(|b| b >> 4) {
        Some(4) => usize::from(packet[0] & 0x0f) * 4,
        Some(6) => 40,
        _ => return 0,
    };
    packet.get(l4 + 13).copied().unwrap_or(0)
}

/// RST+ACK answering a SYN (RFC 9293 §3.10.7.1: seq 0, ack = SYN's seq + 1).
fn rst_for(syn: &[u8]) -> Option<Vec<u8>> {
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
    let p = SlicedPacket::from_ip(syn).ok()?;
    let Some(TransportSlice::Tcp(t)) = p.transport else {
        return None;
    };
    let (src, dst): (IpAddr, IpAddr) = match p.net? {
        etherparse::NetSlice::Ipv4(v4) => (
            v4.header().source_addr().into(),
            v4.header().destination_addr().into(),
        ),
        etherparse::NetSlice::Ipv6(v6) => (
            v6.header().source_addr().into(),
            v6.header().destination_addr().into(),
        ),
        _ => return None,
    };
    let b = match (dst, src) {
        (IpAddr::V4(d), IpAddr::V4(s)) => PacketBuilder::ipv4(d.octets(), s.octets(), 64),
        (IpAddr::V6(d), IpAddr::V6(s)) => PacketBuilder::ipv6(d.octets(), s.octets(), 64),
        _ => return None,
    };
    let mut out = Vec::new();
    b.tcp(t.destination_port(), t.source_port(), 0, 0)
        .rst()
        .ack(t.sequence_number().wrapping_add(1))
        .write(&mut out, &[])
        .ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
    use mio::{Events, Poll};

    const AGENT: &str = "100.64.0.2:40000";
    const VIP: &str = "10.100.0.1:80";

    fn tcp(seq: u32, ack: Option<u32>, syn: bool, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut b =
            PacketBuilder::ipv4([100, 64, 0, 2], [10, 100, 0, 1], 64).tcp(40000, 80, seq, 64000);
        if syn {
            b = b.syn();
        }
        if let Some(a) = ack {
            b = b.ack(a);
        }
        if fin {
            b = b.fin();
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn key() -> FlowKey {
        FlowKey {
            proto: Proto::Tcp,
            src: AGENT.parse().unwrap(),
            dst: VIP.parse().unwrap(),
        }
    }

    /// (flags, seq, ack, payload) of a packet the stack sent to the agent.
    fn parse(p: &[u8]) -> (bool, bool, bool, u32, u32, Vec<u8>) {
        let s = SlicedPacket::from_ip(p).unwrap();
        let Some(TransportSlice::Tcp(t)) = s.transport else {
            panic!("tcp")
        };
        (
            t.syn(),
            t.rst(),
            t.fin(),
            t.sequence_number(),
            t.acknowledgment_number(),
            t.payload().to_vec(),
        )
    }

    /// Runs the stack and mio until `want` holds of the packets sent so far.
    fn drive(
        t: &mut UserTcp,
        poll: &mut Poll,
        out: &mut Vec<Vec<u8>>,
        want: impl Fn(&[Vec<u8>]) -> bool,
    ) {
        let deadline = StdInstant::now() + std::time::Duration::from_secs(5);
        let mut events = Events::with_capacity(16);
        while !want(out) {
            assert!(
                StdInstant::now() < deadline,
                "timed out; sent {} packets",
                out.len()
            );
            poll.poll(&mut events, Some(std::time::Duration::from_millis(10)))
                .unwrap();
            for ev in events.iter() {
                t.ready(poll.registry(), ev.token());
            }
            out.extend(t.poll(poll.registry()));
        }
    }

    #[test]
    fn a_connection_is_relayed_to_the_backend_and_closed_cleanly() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let backend = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"hello");
            s.write_all(b"world!").unwrap();
        });
        let mut poll = Poll::new().unwrap();
        let mut t = UserTcp::new(1000, 8);
        let mut out = Vec::new();
        t.packet_in(
            poll.registry(),
            key(),
            tcp(1000, None, true, false, &[]),
            backend,
        );
        drive(&mut t, &mut poll, &mut out, |o| !o.is_empty());
        let (syn, rst, _, server_seq, ack, _) = parse(&out[0]);
        assert!(syn && !rst, "SYN-ACK once the backend answered");
        assert_eq!(ack, 1001);
        let s1 = server_seq.wrapping_add(1);
        t.packet_in(
            poll.registry(),
            key(),
            tcp(1001, Some(s1), false, false, &[]),
            backend,
        );
        t.packet_in(
            poll.registry(),
            key(),
            tcp(1001, Some(s1), false, false, b"hello"),
            backend,
        );
        drive(&mut t, &mut poll, &mut out, |o| {
            o.iter().any(|p| parse(p).5 == b"world!")
        });
        // The backend closed after its reply: a FIN follows.
        drive(&mut t, &mut poll, &mut out, |o| {
            o.iter().any(|p| parse(p).2)
        });
        server.join().unwrap();
        assert_eq!(t.stats.established, 1);
    }

    #[test]
    fn a_refused_dial_answers_the_syn_with_rst() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut poll = Poll::new().unwrap();
        let mut t = UserTcp::new(1000, 8);
        let mut out = Vec::new();
        t.packet_in(
            poll.registry(),
            key(),
            tcp(5000, None, true, false, &[]),
            closed,
        );
        drive(&mut t, &mut poll, &mut out, |o| !o.is_empty());
        let (syn, rst, _, _, ack, _) = parse(&out[0]);
        assert!(rst && !syn);
        assert_eq!(ack, 5001, "the RST acknowledges the SYN");
        assert_eq!(t.stats.refused, 1);
    }

    #[test]
    fn an_agent_over_its_cap_gets_rst_without_a_dial() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let backend = listener.local_addr().unwrap();
        let poll = Poll::new().unwrap();
        let mut t = UserTcp::new(1000, 1);
        t.packet_in(
            poll.registry(),
            key(),
            tcp(1, None, true, false, &[]),
            backend,
        );
        let mut other = key();
        other.src.set_port(40001);
        let mut syn = tcp(1, None, true, false, &[]);
        syn[20..22].copy_from_slice(&40001u16.to_be_bytes());
        t.packet_in(poll.registry(), other, syn, backend);
        assert_eq!(t.stats.over_limit, 1);
        assert_eq!(t.stats.dials, 1);
    }
}
