//! Flows spread over the lab's queues and the forwarder's sockets. With N senders on
//! N-queue veth pairs each sender should fill a queue of its own (and with the
//! userspace forwarder on N threads, a socket of its own), or two would share one and
//! the window would show that queue's limit rather than the path's.
//!
//! Queues: the lab maps them to CPUs (XPS, see `ztna_netlab`'s module docs: the
//! router does not spread forwarded flows over veth queues by their ports), so N
//! senders busy on N CPUs take N queues whatever their ports.
//!
//! Sockets: SO_REUSEPORT picks one by a hash of the flow's addresses and ports (under
//! a per-boot secret) and the group's order. So for the userspace forwarder the
//! agent-side ports are tried before the intermediate starts, against N sockets bound
//! in the relay namespace as the intermediate binds them (same address, same order):
//! sender i gets a port that reaches socket i.
//!
//! What the flows really took is read back around each window ([`QueueCounters`];
//! for the forwarder, the threads' share of the packets).

use std::net::{SocketAddrV4, UdpSocket};

use super::*;

/// First agent-side and connector-side ports (the RTT pair uses 6100/7100).
const SRC_BASE: u16 = 10_000;
const DST_BASE: u16 = 20_000;
/// Ports tried per socket before giving up (a socket no port reaches in 64 tries
/// means the hash does not spread, not bad luck: (1 - 1/N)^(64 N) < e^-64).
const TRIES_PER_SOCKET: usize = 64;

/// The senders' flows and how their ports were picked.
pub struct Spread {
    /// (agent side, connector side) per sender.
    pub flows: Vec<(SocketAddrV4, SocketAddrV4)>,
    pub how: Value,
}

/// Picks `n` flows for `mode` (see the module docs). Call before the intermediate
/// binds the relay port.
pub fn spread_flows(lab: &Lab, mode: &str, n: usize) -> anyhow::Result<Spread> {
    let dst = |i: usize| SocketAddrV4::new(CONN, DST_BASE + i as u16);
    if mode != "off" || n == 1 {
        return Ok(Spread {
            flows: (0..n)
                .map(|i| (SocketAddrV4::new(AGENT, SRC_BASE + i as u16), dst(i)))
                .collect(),
            how: json!(format!(
                "{n} flow(s), agent-side ports from {SRC_BASE}; queues by CPU (XPS on every veth: CPU c transmits on queue c mod {n})"
            )),
        });
    }
    let group = reuseport_group(lab, n)?;
    let mut chosen: Vec<Option<u16>> = vec![None; n];
    for port in (SRC_BASE..).take(TRIES_PER_SOCKET * n) {
        if let Some(c @ None) = chosen.get_mut(socket_of(lab, &group, port)?) {
            *c = Some(port);
        }
        if chosen.iter().all(Option::is_some) {
            break;
        }
    }
    let src: Vec<u16> = chosen.iter().flatten().copied().collect();
    if src.len() < n {
        bail!("ports from {SRC_BASE} reached only sockets {chosen:?} of {n}");
    }
    Ok(Spread {
        flows: src
            .iter()
            .enumerate()
            .map(|(i, p)| (SocketAddrV4::new(AGENT, *p), dst(i)))
            .collect(),
        how: json!(format!(
            "agent-side ports {src:?}: sender i reaches forwarder socket i of {n} SO_REUSEPORT sockets bound like the intermediate's; queues by CPU (XPS on every veth: CPU c transmits on queue c mod {n})"
        )),
    })
}

/// `n` sockets on the relay's address, joined to one SO_REUSEPORT group in order, as
/// the intermediate with `--forwarder-threads n` binds them.
fn reuseport_group(lab: &Lab, n: usize) -> anyhow::Result<Vec<UdpSocket>> {
    ztna_netlab::in_netns(&lab.ns("x"), move || {
        (0..n)
            .map(|_| {
                let s = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::DGRAM,
                    Some(socket2::Protocol::UDP),
                )?;
                s.set_reuse_port(true)?;
                s.bind(&relay_addr().into())?;
                let s: UdpSocket = s.into();
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .collect()
    })
}

/// Which socket of `group` a datagram from AGENT:`port` reaches.
fn socket_of(lab: &Lab, group: &[UdpSocket], port: u16) -> anyhow::Result<usize> {
    let from = SocketAddrV4::new(AGENT, port);
    let sender = ztna_netlab::in_netns(&lab.ns("a"), move || load::bind(from, None))?;
    sender.send_to(b"probe", relay_addr())?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        for (i, s) in group.iter().enumerate() {
            if s.recv_from(&mut buf).is_ok() {
                return Ok(i);
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    bail!("a probe from {from} reached none of the relay's sockets")
}

/// Per-queue packet counters of the veths whose queues the relay's traffic crosses:
/// r1 (the way back, always) and x0 (the way in, counted in native mode only).
pub struct QueueCounters {
    x0: Option<Vec<u64>>,
    r1: Vec<u64>,
}

impl QueueCounters {
    pub fn read(lab: &Lab, mode: &str) -> anyhow::Result<Self> {
        Ok(QueueCounters {
            x0: (mode == "native")
                .then(|| lab.rx_queue_packets(&lab.ns("x"), "x0"))
                .transpose()?,
            r1: lab.rx_queue_packets(&lab.ns("r"), "r1")?,
        })
    }

    /// Packets per queue since `before`, and how many queues had traffic.
    pub fn since(&self, before: &QueueCounters) -> Value {
        let d = |a: &[u64], b: &[u64]| -> Vec<u64> {
            a.iter().zip(b).map(|(a, b)| a.saturating_sub(*b)).collect()
        };
        let busy = |v: &[u64]| {
            let total: u64 = v.iter().sum();
            // A queue carrying under 1% of the packets only saw strays (ICMP, ARP).
            v.iter().filter(|p| **p * 100 > total).count()
        };
        let r1 = d(&self.r1, &before.r1);
        let mut v = json!({"r1_rx_queue_packets": r1, "r1_queues_with_traffic": busy(&r1)});
        if let (Some(a), Some(b)) = (&self.x0, &before.x0) {
            let x0 = d(a, b);
            v["x0_queues_with_traffic"] = json!(busy(&x0));
            v["x0_rx_queue_packets"] = json!(x0);
        }
        v
    }
}
