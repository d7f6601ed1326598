//! The datagram relay's flow table (`ztna_userspace::flows`): a sequence of agents'
//! packets (outbound) and connectors' replies (inbound) drawn from the input. The
//! owner of a flow never changes while the flow lives: a reply is never routed to
//! an agent that did not send that flow.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use ztna_core::packet::{FlowKey, Proto};
use ztna_userspace::flows::FlowTable;

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut t = FlowTable::default();
    let mut owners: std::collections::HashMap<FlowKey, u64> = Default::default();
    for (i, c) in data.chunks_exact(4).enumerate() {
        let agent = u64::from(c[0] % 4) + 1;
        let port = u16::from_be_bytes([c[1], c[2] % 8]);
        let key = FlowKey {
            proto: if c[3] & 1 == 0 { Proto::Udp } else { Proto::Tcp },
            src: std::net::SocketAddr::from(([100, 64, 0, 2], port)),
            dst: std::net::SocketAddr::from(([10, 100, 0, 1], 7)),
        };
        let now = start + Duration::from_millis(i as u64);
        if c[3] & 2 == 0 {
            let r = t.outbound(agent, "echo", key, now);
            if let Some(wire) = r.wire() {
                owners.insert(wire, agent);
            }
        } else if let Some(inbound) = t.inbound("echo", &key.reversed(), now) {
            if let Some(owner) = owners.get(&key) {
                assert_eq!(inbound.agent, *owner, "a reply goes to the flow's owner");
            }
        }
    }
});
