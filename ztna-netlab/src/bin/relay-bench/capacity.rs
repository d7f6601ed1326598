//! Concurrent-session scale of the XDP relay: the native intermediate with its tables
//! sized to [`WANTED_ENTRIES`] (`--max-relay-entries`; halved until the kernel gives
//! them, the refusal kept as the reason), filled to the brim with synthetic entries,
//! then the program's forward cost measured as `prog_cost` measures it with a nearly
//! empty table. Alongside, the calibration program `ztna_minimal` (swap MACs,
//! `XDP_TX`) measured the same way in the same run, so that the forward cost can be
//! compared across machines as a ratio.
//!
//! JSON keys: `session_capacity` (relay entries held; two per session),
//! `map_bytes` (kernel memory of the forwarding maps at that size, bpftool's
//! `bytes_memlock`), `prog_ns_per_pkt_full_table`, `prog_ns_per_pkt_minimal`,
//! `prog_ns_per_pkt_full_table_over_minimal`, and `capacity` with the details.

use std::os::fd::AsFd;
use std::time::Instant;

use anyhow::Context;
use serde_json::{Value, json};
use ztna_common::relay::{
    MAP_RELAY, MAP_RELAY6, MAP_SESSION_STATS, MAP_SESSION_STATS6, RELAY_CID_MARKER, RelayEntry,
    RelayKey,
};
use ztna_netlab::Lab;

use super::{
    PAYLOAD, Results, TEST_RUN_REPEAT, TEST_RUNS, frame, join, quic_short, round2, routed_session,
    self_session,
};
use crate::paths::start_intermediate;
use crate::prog::{prog_cost, prog_map, test_run};

/// The goal: a million entries (half a million sessions).
const WANTED_ENTRIES: u32 = 1 << 20;
/// Below this the figure says nothing the default table does not.
const SMALLEST_TRY: u32 = 1 << 16;

/// Kernel memory (`bytes_memlock`) of the maps of program `prog_id` named in `names`.
fn map_bytes(prog_id: u32, names: &[&str]) -> anyhow::Result<u64> {
    let out = ztna_netlab::sh("bpftool", &["-j", "map", "show"])?;
    let maps: Value = serde_json::from_slice(&out.stdout)?;
    let prog = ztna_netlab::sh(
        "bpftool",
        &["-j", "prog", "show", "id", &prog_id.to_string()],
    )?;
    let prog: Value = serde_json::from_slice(&prog.stdout)?;
    let ids: Vec<u64> = prog["map_ids"]
        .as_array()
        .context("map_ids")?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    let mut total = 0;
    for m in maps.as_array().context("bpftool map show")? {
        let id = m["id"].as_u64().unwrap_or(0);
        let name = m["name"].as_str().unwrap_or("");
        // Kernel map names are cut to 15 bytes.
        if ids.contains(&id) && !name.is_empty() && names.iter().any(|n| n.starts_with(name)) {
            total += m["bytes_memlock"].as_u64().unwrap_or(0);
        }
    }
    Ok(total)
}

/// The best of `TEST_RUNS` runs of `prog` on `pkt`, in the relay namespace.
fn best_ns(
    lab: &Lab,
    prog: std::os::fd::OwnedFd,
    pkt: Vec<u8>,
    ifindex: u32,
) -> anyhow::Result<(u32, u32)> {
    join(ztna_netlab::spawn_in_netns(&lab.ns("x"), move || {
        let mut best = u32::MAX;
        let mut verdict = 0;
        for _ in 0..TEST_RUNS {
            let (ret, _, ns) = test_run(&prog, &pkt, ifindex, TEST_RUN_REPEAT)?;
            verdict = ret;
            best = best.min(ns);
        }
        Ok((verdict, best))
    }))
}

pub fn capacity(res: &mut Results) -> anyhow::Result<()> {
    let mut lab = Lab::relay_topology("bk")?;
    let certs = lab.certs()?;
    let sessions = vec![self_session(), routed_session()];
    let mut entries = WANTED_ENTRIES;
    let mut refused = Vec::new();
    let cids = loop {
        let extra = ["--max-relay-entries".to_string(), entries.to_string()];
        match start_intermediate(&mut lab, &certs, "native", &sessions, &extra) {
            Ok(c) => break c,
            Err(e) if entries > SMALLEST_TRY => {
                refused.push(json!({"entries": entries, "error": format!("{e:#}")}));
                lab.stop("intermediate");
                entries /= 2;
            }
            Err(e) => return Err(e),
        }
    };
    let prog_id = lab.xdp_prog_id(&lab.ns("x"), "x0")?;
    let bytes = map_bytes(
        prog_id,
        &[MAP_RELAY, MAP_SESSION_STATS, MAP_RELAY6, MAP_SESSION_STATS6],
    )?;
    let empty = prog_cost(&lab, prog_id, &cids)?;

    // Fill ZTNA_RELAY to capacity: CIDs no client will send (nonce bytes 0xff...),
    // peers that exist nowhere; the static sessions' entries stay.
    let mut relay: aya::maps::HashMap<_, RelayKey, RelayEntry> =
        aya::maps::HashMap::try_from(prog_map(MAP_RELAY)?)?;
    let held_before = relay.keys().count() as u32;
    let started = Instant::now();
    let mut filled = 0u32;
    let mut stopped_by = None;
    for i in 0..entries.saturating_sub(held_before) {
        let mut cid = [0xffu8; 8];
        cid[0] = RELAY_CID_MARKER;
        cid[4..8].copy_from_slice(&i.to_be_bytes());
        let entry = RelayEntry {
            peer_addr: u32::from_ne_bytes([192, 0, 2, (i % 250) as u8 + 1]),
            expected_src_addr: u32::from_ne_bytes([198, 51, 100, (i % 250) as u8 + 1]),
            peer_port: 4433u16.to_be(),
            expected_src_port: ((i % 60000) as u16 + 1024).to_be(),
            session_id: i,
        };
        if let Err(e) = relay.insert(RelayKey { cid }, entry, 0) {
            stopped_by = Some(format!("insert {i}: {e}"));
            break;
        }
        filled += 1;
    }
    let fill_secs = started.elapsed().as_secs_f64();
    let held = held_before + filled;
    let full = prog_cost(&lab, prog_id, &cids)?;
    let routed_ns =
        |v: &Value| v["routed_self_mapping_packet"]["repeats"]["ns_per_run_min"].as_u64();
    let (empty_ns, full_ns) = (routed_ns(&empty), routed_ns(&full));

    // The calibration program, on the same packet, from the same namespace.
    let object = ztna_userspace::xdp::embedded_object().context("no eBPF object")?;
    let mut ebpf = aya::Ebpf::load(object).context("loading the eBPF object")?;
    let minimal: &mut aya::programs::Xdp = ebpf
        .program_mut("ztna_minimal")
        .context("program ztna_minimal missing")?
        .try_into()?;
    minimal.load()?;
    let prog_fd = minimal.fd()?.as_fd().try_clone_to_owned()?;
    let (x0_mac, ifindex) = lab.mac_ifindex(&lab.ns("x"), "x0")?;
    let (r1_mac, _) = lab.mac_ifindex(&lab.ns("r"), "r1")?;
    let (p, _) = routed_session();
    let routed_cid = cids.get(&p.to_string()).context("routed static session")?.0;
    let pkt = frame(x0_mac, r1_mac, p, p, 64, &quic_short(routed_cid, PAYLOAD));
    let (min_verdict, minimal_ns) = best_ns(&lab, prog_fd, pkt, ifindex)?;
    drop(ebpf);

    res.out.insert("session_capacity".into(), json!(held));
    res.out.insert("map_bytes".into(), json!(bytes));
    res.out
        .insert("prog_ns_per_pkt_full_table".into(), json!(full_ns));
    res.out
        .insert("prog_ns_per_pkt_minimal".into(), json!(minimal_ns));
    if let (Some(f), true) = (full_ns, minimal_ns > 0) {
        res.out.insert(
            "prog_ns_per_pkt_full_table_over_minimal".into(),
            json!(round2(f as f64 / minimal_ns as f64)),
        );
    }
    res.out.insert(
        "capacity".into(),
        json!({
            "tables_sized_entries": entries,
            "wanted_entries": WANTED_ENTRIES,
            "refused_sizes": refused,
            "entries_held": held,
            "sessions_held": held / 2,
            "filled_by_bench": filled,
            "fill_stopped_by": stopped_by,
            "fill_secs": round2(fill_secs),
            "inserts_per_sec": if fill_secs > 0.0 { (filled as f64 / fill_secs).round() } else { 0.0 },
            "map_bytes_counts": "bytes_memlock of ZTNA_RELAY, ZTNA_SESSION_STATS, ZTNA_RELAY6, ZTNA_SESSION_STATS6 (preallocated at the configured size)",
            "prog_ns_per_pkt_empty_table": empty_ns,
            "prog_ns_per_pkt_full_table": full_ns,
            "minimal_program": {"name": "ztna_minimal", "what": "swap Ethernet addresses, XDP_TX", "verdict": min_verdict, "ns_per_run_min": minimal_ns},
            "method": format!("BPF_PROG_TEST_RUN, repeat={TEST_RUN_REPEAT}, best of {TEST_RUNS} runs, the routed self-mapping packet of prog_test_run (every repeat takes the whole forward path); the same packet for ztna_minimal"),
            "prog_test_run_full_table": full,
        }),
    );
    Ok(())
}
