//! Privileged: P2P through real netfilter NATs in namespaces (see `ztna_netlab::p2p`).
//! `#[ignore]`d in plain `cargo test`; `cargo xtask test` runs them as root.

use ztna_netlab::p2p::{Nat, scenario};

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn cone_nats_on_both_sides_reach_the_direct_path_and_the_relay_goes_quiet() {
    let r = scenario(Nat::Cone, Nat::Cone, false).unwrap();
    assert_eq!(r.path, "direct", "{r:?}");
    assert!(r.time_to_direct_ms.is_some_and(|t| t < 6000), "{r:?}");
    assert_eq!(r.echoes_ok, r.echoes_sent, "{r:?}");
    assert!(r.echoes_sent > 50, "{r:?}");
    // Two seconds of echoes both ways (2 packets each); the relay forwarded only the
    // standby connection's keepalives (one per 5 s per side, plus their ACKs).
    let relayed = r.relay_packets_during_direct.unwrap();
    assert!(
        relayed <= 8 && relayed * 20 < r.echoes_sent * 2,
        "relay still forwarding: {r:?}"
    );
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn symmetric_nats_on_both_sides_stay_relayed_and_work() {
    let r = scenario(Nat::Symmetric, Nat::Symmetric, false).unwrap();
    assert!(r.path.starts_with("relay-"), "{r:?}");
    assert_eq!(r.time_to_direct_ms, None, "{r:?}");
    assert_eq!(r.echoes_ok, r.echoes_sent, "{r:?}");
    assert!(r.echoes_sent > 50, "{r:?}");
}

#[test]
#[ignore = "needs root: run by `cargo xtask test`"]
fn direct_path_cut_falls_back_to_the_relay_within_3s_and_comes_back() {
    let r = scenario(Nat::Cone, Nat::Cone, true).unwrap();
    assert_eq!(r.path, "direct", "{r:?}");
    let fallback = r.fallback_ms.expect("traffic resumed over the relay");
    assert!(fallback <= 3000, "fallback took {fallback} ms: {r:?}");
    assert!(
        r.direct_again_ms.is_some(),
        "direct path taken again after the restore: {r:?}"
    );
    // Everything outside the fallback window came back.
    assert_eq!(
        r.echoes_sent - r.echoes_ok,
        r.lost_during_fallback.unwrap(),
        "{r:?}"
    );
}
