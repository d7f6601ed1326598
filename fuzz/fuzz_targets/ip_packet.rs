//! Tunneled IP packets (`ztna_core::packet`): every helper the agent, connector and
//! intermediate apply to packets from the network, on arbitrary bytes. Checks that
//! rewrites keep the packet length and that what they build parses.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ztna_core::packet::{self, IcmpError, PortField};

fuzz_target!(|data: &[u8]| {
    let _ = packet::destination(data);
    let key = packet::flow_key(data);
    let _ = packet::parse_udp(data);
    if let Some(reply) = packet::icmp_echo_reply(data) {
        assert!(packet::flow_key(&reply).is_ok(), "an echo reply parses");
    }
    for kind in [IcmpError::Prohibited, IcmpError::TooBig { mtu: 1280 }] {
        if let Some(e) = packet::icmp_error(data, kind) {
            assert!(e.len() <= 1280, "ICMP errors fit the minimum MTU");
            assert!(packet::destination(&e).is_some());
        }
    }
    let mut copy = data.to_vec();
    packet::clamp_mss(&mut copy, 1240);
    assert_eq!(copy.len(), data.len());
    if key.is_ok() {
        let mut copy = data.to_vec();
        let _ = packet::rewrite_port(&mut copy, PortField::Src, 40000);
        assert_eq!(copy.len(), data.len());
    }
});
