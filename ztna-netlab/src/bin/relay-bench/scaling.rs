//! Scaling across cores, side by side: delivered pps at saturation of each forwarded
//! path for N = 1, 2, 4, ... senders (`--scaling`), each N in a lab of its own with
//! N transmit and receive queues on every veth, N flows spread over the queues
//! (`spread`), and for the userspace forwarder N threads (`--forwarder-threads N`,
//! SO_REUSEPORT), so every path gets the same parallelism.
//!
//! JSON: `scaling` (path → [{senders, offered_pps, delivered_pps}]), `scaling_ratios`
//! (XDP over userspace delivered pps per N), `scaling_detail` (per path and N: the
//! flows, packets per queue, the forwarder threads' share, the window),
//! `scaling_method`.

use crate::paths::{forwarded_lab, saturation};
use crate::window::Acct;

use super::*;

pub fn scaling(res: &mut Results, list: &[usize], have_ebpf: bool) {
    let mut table = Map::new();
    let mut detail = Map::new();
    for (mode, key) in PATHS {
        if mode != "off" && !have_ebpf {
            res.skipped.insert(
                format!("scaling_{key}"),
                json!("this build has no eBPF object"),
            );
            continue;
        }
        let (mut rows, mut details) = (Vec::new(), Vec::new());
        for &n in list {
            eprintln!("relay-bench: scaling: {key}, {n} sender(s)");
            match point(mode, key, n) {
                Ok((row, d)) => {
                    eprintln!(
                        "relay-bench: scaling: {key}, {n}: {} pps delivered of {} offered",
                        row["delivered_pps"], row["offered_pps"]
                    );
                    rows.push(row);
                    details.push(d);
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    eprintln!("relay-bench: scaling {key} {n} FAILED: {msg}");
                    res.errors.insert(format!("scaling_{key}_{n}"), json!(msg));
                }
            }
        }
        table.insert(key.into(), Value::Array(rows));
        detail.insert(key.into(), Value::Array(details));
    }
    let delivered = |key: &str, n: usize| {
        table.get(key)?.as_array()?.iter().find_map(|r| {
            (r["senders"].as_u64() == Some(n as u64))
                .then(|| r["delivered_pps"].as_f64())
                .flatten()
        })
    };
    let mut ratios = Map::new();
    for xdp in ["xdp_native", "xdp_generic"] {
        let per_n: Vec<Value> = list
            .iter()
            .filter_map(|&n| {
                let (x, u) = (delivered(xdp, n)?, delivered("userspace", n)?);
                (u > 0.0).then(|| json!({"senders": n, "ratio": round2(x / u)}))
            })
            .collect();
        ratios.insert(format!("{xdp}_over_userspace"), Value::Array(per_n));
    }
    res.out.insert("scaling".into(), Value::Object(table));
    res.out
        .insert("scaling_ratios".into(), Value::Object(ratios));
    res.out
        .insert("scaling_detail".into(), Value::Object(detail));
    res.out.insert(
        "scaling_method".into(),
        json!(format!(
            "For each path and each N in {list:?} (at most one per CPU; {} CPUs here): a fresh lab whose veth pairs have N transmit and receive queues (ip link add ... numtxqueues N numrxqueues N), N static relay sessions whose flows' ports were picked so that each takes its own queue (XDP: the x0 receive queue; userspace: the SO_REUSEPORT socket and the r1 receive queue; scaling_detail.*.flows), the intermediate with --forwarder-threads N for the userspace path; N sendmmsg sender threads as fast as they go and N recvmmsg receivers, one {}-s window after {} ms of warm-up, measured again (up to {SATURATION_ATTEMPTS} times) when other work on the host took over {:.0}% of the CPU. Kernel bpf_stats off. queues: packets per veth receive queue over the run (r1: the way back, every path; x0: the way in, counted by veth only in native mode); forwarder_thread_share: the forwarder threads' share of the packets forwarded in userspace (the rest went through the main loop's socket). Senders, receivers and relay share the machine's CPUs, so delivered pps is bounded by the CPUs as much as by the path.",
            ncpu(),
            SATURATION.as_secs(),
            WARMUP.as_millis(),
            EXTERNAL_MAX * 100.0
        )),
    );
}

/// One path at N senders: (the `scaling` row, its details).
fn point(mode: &str, key: &str, n: usize) -> anyhow::Result<(Value, Value)> {
    let (lab, flows, spread, _) = forwarded_lab(&format!("s{}{n}", &mode[..1]), mode, n, &[])?;
    let acct = Acct {
        lab_pids: lab.pid("intermediate").into_iter().collect(),
        ..Default::default()
    };
    let s0 = lab.fresh_relay_stats()?;
    let ((w, queues), ext) = saturation(&lab, mode, &flows, &acct, &format!("scaling {key} {n}"))?;
    let s1 = lab.fresh_relay_stats()?;
    if w.delivered == 0 {
        bail!(
            "delivered nothing ({} offered); intermediate log:\n{}",
            w.offered,
            lab.log("intermediate")
        );
    }
    let grew = |k: &str| ztna_netlab::n(&s1, k).saturating_sub(ztna_netlab::n(&s0, k));
    let row = json!({
        "senders": n,
        "offered_pps": w.offered_pps().round(),
        "delivered_pps": w.delivered_pps().round(),
    });
    let mut d = json!({
        "senders": n,
        "delivered_over_offered": round3(w.delivered as f64 / w.offered.max(1) as f64),
        "flows": spread,
        "queues": queues,
        "saturation": w.json(),
        "external_cpu_share_per_attempt": ext,
    });
    if mode == "off" {
        let all = grew("userspace_forwarded_packets");
        d["forwarder_threads"] = json!(n);
        d["forwarder_thread_share"] = json!(round3(
            grew("userspace_forwarded_packets_threads") as f64 / all.max(1) as f64
        ));
        d["relay_send_dropped_would_block"] = json!(grew("relay_send_dropped_would_block"));
    }
    Ok((row, d))
}

/// The scaling table on stdout.
pub fn print(res: &Results) {
    let Some(table) = res.out.get("scaling").and_then(Value::as_object) else {
        return;
    };
    let cell = |key: &str, n: u64| {
        table
            .get(key)
            .and_then(Value::as_array)
            .and_then(|rows| rows.iter().find(|r| r["senders"].as_u64() == Some(n)))
            .map_or("-".to_string(), |r| {
                format!(
                    "{:.0} ({:.0})",
                    r["delivered_pps"].as_f64().unwrap_or(0.0),
                    r["offered_pps"].as_f64().unwrap_or(0.0)
                )
            })
    };
    let mut ns: Vec<u64> = table
        .values()
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(|r| r["senders"].as_u64())
        .collect();
    ns.sort_unstable();
    ns.dedup();
    println!();
    println!(
        "scaling: delivered pps (offered), N senders on N-queue veth pairs, N forwarder threads"
    );
    println!(
        "{:>7}  {:>22} {:>22} {:>22} {:>8} {:>8}",
        "senders", "XDP native", "XDP generic", "userspace", "nat/usr", "gen/usr"
    );
    let ratio = |k: &str, n: u64| {
        res.out["scaling_ratios"][k]
            .as_array()
            .and_then(|v| v.iter().find(|r| r["senders"].as_u64() == Some(n)))
            .and_then(|r| r["ratio"].as_f64())
            .map_or("-".to_string(), |r| format!("{r:.2}"))
    };
    for n in ns {
        println!(
            "{n:>7}  {:>22} {:>22} {:>22} {:>8} {:>8}",
            cell("xdp_native", n),
            cell("xdp_generic", n),
            cell("userspace", n),
            ratio("xdp_native_over_userspace", n),
            ratio("xdp_generic_over_userspace", n)
        );
    }
}
