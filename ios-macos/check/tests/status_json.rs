//! The app decodes `ztna_agent_status_json` with Codable types
//! (`ios-macos/Shared/Common/AgentStatus.swift`). That JSON is serde's encoding of
//! `ztna_core::agent::AgentStatus`; this test encodes the engine's own types the same
//! way and checks the Swift side against it: every JSON key has a `CodingKeys` case
//! and no case names a key the JSON lacks, keys that can be `null` are optional in
//! Swift, each value's JSON kind fits the Swift type, and the path enum's raw values
//! are exactly the engine's path names. A renamed field or a new path on the Rust
//! side fails here, not on a Mac at run time.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use serde_json::Value;
use ztna_apple_check::apple_dir;
use ztna_apple_check::codable::{Model, models};
use ztna_core::agent::{
    AgentStatus, PathChange, PathKind, RelayStatus, ServiceStatus, TUN_MTU, Traffic,
};

/// Every path kind; the match makes a new variant a compile error here.
fn all_paths() -> Vec<PathKind> {
    let all = vec![
        PathKind::Direct,
        PathKind::RelayXdp,
        PathKind::RelayUserspace,
        PathKind::Datagram,
    ];
    for p in &all {
        match p {
            PathKind::Direct
            | PathKind::RelayXdp
            | PathKind::RelayUserspace
            | PathKind::Datagram => {}
        }
    }
    all
}

/// A status with every optional field set and one service with a path history.
fn full() -> AgentStatus {
    AgentStatus {
        connected: true,
        observed_address: Some(SocketAddr::from(([203, 0, 113, 7], 51820))),
        tunnel_ipv4: Some(Ipv4Addr::new(100, 64, 0, 9)),
        tunnel_ipv6: Some(Ipv6Addr::new(0xfd00, 1, 2, 0, 0, 0, 0, 9)),
        mtu: TUN_MTU,
        handshake_ms: Some(0.85),
        services: vec![ServiceStatus {
            name: "web".into(),
            registered: true,
            prefixes: vec!["10.100.0.2/32".parse().unwrap()],
            path: PathKind::Direct,
            rtt_ms: Some(1.5),
            relay: Some(SocketAddr::from(([198, 51, 100, 4], 4433))),
            standby: Some(SocketAddr::from(([198, 51, 100, 5], 4433))),
            traffic: Traffic {
                tx_packets: 3,
                tx_bytes: 300,
                rx_packets: 2,
                rx_bytes: 200,
            },
            history: vec![PathChange {
                service: "web".into(),
                at_ms: 12,
                path: PathKind::RelayXdp,
            }],
        }],
        relays: vec![RelayStatus {
            address: SocketAddr::from(([198, 51, 100, 4], 4433)),
            connected: true,
            draining: false,
            rtt_ms: Some(0.7),
        }],
        tun_no_route: 1,
        tun_too_big: 0,
        tun_send_failed: 0,
    }
}

/// A fresh agent's status: nothing known yet, so every optional field is null.
fn empty() -> AgentStatus {
    let mut s = full();
    s.connected = false;
    s.observed_address = None;
    s.tunnel_ipv4 = None;
    s.tunnel_ipv6 = None;
    s.handshake_ms = None;
    s.services[0].rtt_ms = None;
    s.services[0].relay = None;
    s.services[0].standby = None;
    s.relays[0].rtt_ms = None;
    s.services[0].registered = false;
    s.services[0].prefixes.clear();
    s.services[0].history.clear();
    s
}

fn swift_models() -> BTreeMap<String, Model> {
    let path = apple_dir().join("Shared/Common/AgentStatus.swift");
    let text = std::fs::read_to_string(&path).unwrap();
    models(&path, &text).unwrap()
}

/// Does a JSON value fit a Swift type as written? Objects must be the named model.
fn fits(value: &Value, swift_type: &str, object_model: &str) -> bool {
    let base = swift_type.trim_end_matches('?');
    match value {
        Value::Null => swift_type.ends_with('?'),
        Value::Bool(_) => base == "Bool",
        Value::String(_) => base == "String" || base == "ServicePath",
        Value::Number(n) if n.is_f64() => base == "Double",
        Value::Number(_) => ["UInt64", "UInt16", "UInt32", "Int", "Double"].contains(&base),
        Value::Array(_) => base.starts_with('[') && base.ends_with(']'),
        Value::Object(_) => base == object_model,
    }
}

/// One JSON object against one Swift model: same keys, fitting types.
fn compare(what: &str, json: &Value, model: &Model, nested: &BTreeMap<&str, &str>) -> Vec<String> {
    let mut problems = Vec::new();
    let object = json.as_object().expect("a JSON object");
    let json_keys: BTreeSet<&str> = object.keys().map(String::as_str).collect();
    let swift_keys: BTreeSet<&str> = model.coding_keys.values().map(String::as_str).collect();
    for k in json_keys.difference(&swift_keys) {
        problems.push(format!("{what}: JSON key {k} has no CodingKeys case"));
    }
    for k in swift_keys.difference(&json_keys) {
        problems.push(format!(
            "{what}: CodingKeys names {k}, which the JSON lacks"
        ));
    }
    for (k, v) in object {
        let Some(ty) = model.type_of_key(k) else {
            continue;
        };
        let object_model = nested.get(k.as_str()).copied().unwrap_or("");
        if !fits(v, ty, object_model) {
            problems.push(format!("{what}.{k}: JSON {v} does not fit Swift {ty}"));
        }
    }
    problems
}

fn check(status: &AgentStatus, models: &BTreeMap<String, Model>) -> Vec<String> {
    let json = serde_json::to_value(status).unwrap();
    let mut problems = compare(
        "AgentStatus",
        &json,
        &models["AgentStatus"],
        &BTreeMap::new(),
    );
    let service = &json["services"][0];
    problems.extend(compare(
        "ServiceStatus",
        service,
        &models["ServiceStatus"],
        &BTreeMap::from([("traffic", "ServiceTraffic")]),
    ));
    problems.extend(compare(
        "ServiceTraffic",
        &service["traffic"],
        &models["ServiceTraffic"],
        &BTreeMap::new(),
    ));
    if let Some(change) = service["history"].get(0) {
        problems.extend(compare(
            "PathChange",
            change,
            &models["PathChange"],
            &BTreeMap::new(),
        ));
    }
    problems
}

#[test]
fn swift_status_models_match_the_engine_json() {
    let models = swift_models();
    for name in [
        "AgentStatus",
        "ServiceStatus",
        "ServiceTraffic",
        "PathChange",
    ] {
        let m = models
            .get(name)
            .unwrap_or_else(|| panic!("no Swift {name}"));
        assert!(!m.coding_keys.is_empty(), "{name} has no CodingKeys");
    }
    let mut problems = check(&full(), &models);
    problems.extend(check(&empty(), &models));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn swift_path_names_are_the_engine_path_names() {
    let models = swift_models();
    let swift: BTreeSet<String> = models["ServicePath"].cases.values().cloned().collect();
    let engine: BTreeSet<String> = all_paths()
        .into_iter()
        .map(|p| {
            serde_json::to_value(p)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(swift, engine);
}

#[test]
fn the_comparison_catches_a_renamed_key_and_a_non_optional_null() {
    // The same check against a Swift model with one key renamed and one optional
    // made non-optional: both are reported.
    let src = std::fs::read_to_string(apple_dir().join("Shared/Common/AgentStatus.swift"))
        .unwrap()
        .replace("case rttMs = \"rtt_ms\"", "case rttMs = \"rtt\"")
        .replace(
            "public var handshakeMs: Double?",
            "public var handshakeMs: Double",
        );
    let models = models(std::path::Path::new("altered.swift"), &src).unwrap();
    let problems = check(&empty(), &models);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("rtt_ms has no CodingKeys case")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("handshake_ms") && p.contains("does not fit")),
        "{problems:?}"
    );
}
