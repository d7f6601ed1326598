//! The datagram relay's flow table (`ztna_userspace::flows`): a sequence of agents'
//! packets (outbound) and connectors' replies (inbound) drawn from the input, with
//! few ports so that agents collide and translation runs out. A flow's wire key,
//! once an agent's, is never handed to another while it lives, and a reply is only
//! ever routed to that owner. Each packet sees one of three sets of live connectors:
//! its route always names a live one.
#![no_main]
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use ztna_core::packet::{FlowKey, Proto};
use ztna_userspace::flows::FlowTable;

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut t = FlowTable::default();
    let mut owners: HashMap<FlowKey, u64> = HashMap::new();
    for (i, c) in data.chunks_exact(4).enumerate() {
        let agent = u64::from(c[0] % 4) + 1;
        let port = u16::from_be_bytes([c[1] % 4, c[2]]);
        let key = FlowKey {
            proto: if c[3] & 1 == 0 { Proto::Udp } else { Proto::Tcp },
            src: SocketAddr::from(([100, 64, 0, 2], port)),
            dst: SocketAddr::from(([10, 100, 0, 1], 7)),
        };
        // Milliseconds apart: nothing expires within one input.
        let now = start + Duration::from_millis(i as u64);
        if c[3] & 2 == 0 {
            let live: &[u64] = match (c[3] >> 2) & 3 {
                0 => &[10],
                1 => &[11],
                _ => &[10, 11],
            };
            // The agent's pick (rendezvous hashing in the intermediate): a live one.
            let pick = live[usize::from(c[2]) % live.len()];
            if let Ok(r) = t.outbound(agent, "echo", key, now, live, pick) {
                assert!(live.contains(&r.connector), "routed to a connector that is not live");
                let owner = *owners.entry(r.wire).or_insert(agent);
                assert_eq!(owner, agent, "wire key {:?} taken from its owner", r.wire);
            }
        } else if let Some((wire, owner)) = owners.iter().nth(usize::from(c[1]) % owners.len().max(1)) {
            if let Some(inbound) = t.inbound("echo", &wire.reversed(), now) {
                assert_eq!(inbound.agent, *owner, "a reply goes to the flow's owner");
            }
        }
    }
});
