//! The forwarded paths (XDP native, XDP generic, the userspace forwarder), each in a
//! lab of its own: delivered pps at saturation, relay CPU per packet at a fixed
//! offered load against the same load sent directly, RTT; in the native lab also the
//! direct path and the program's cost (`prog`).

use crate::load::Flow;
use crate::prog::{enable_bpf_stats, moved, prog_cost, verdicts};
use crate::rtt::{pin_process, rtt, set_affinity};
use crate::spread::{QueueCounters, spread_flows};
use crate::window::Acct;

use super::*;

/// Starts the lab's intermediate in `mode` with static `sessions` and `extra`
/// arguments; returns their relay CIDs.
pub fn start_intermediate(
    lab: &mut Lab,
    certs: &std::path::Path,
    mode: &str,
    sessions: &[(SocketAddrV4, SocketAddrV4)],
    extra: &[String],
) -> anyhow::Result<Cids> {
    let mut args: Vec<String> = sessions
        .iter()
        .flat_map(|(a, b)| ["--static-session".into(), format!("{a}={b}")])
        .collect();
    args.extend(extra.iter().cloned());
    args.extend(["--bpf-pin-dir".into(), pin_dir().display().to_string()]);
    lab.start_intermediate(certs, &relay_addr().to_string(), mode, &args)?;
    let cids = lab.static_sessions()?;
    let s = lab.relay_stats()?;
    if s["xdp_mode"] != mode {
        bail!(
            "intermediate runs XDP {} (wanted {mode}):\n{}",
            s["xdp_mode"],
            lab.log("intermediate")
        );
    }
    if cids.len() != sessions.len() {
        bail!(
            "{} static sessions requested, {} in the stats file: {s}",
            sessions.len(),
            cids.len()
        );
    }
    Ok(cids)
}

/// A lab of `n` queues with the intermediate in `mode` serving `n` spread flows
/// (plus `more` sessions), `n` forwarder threads in userspace. Returns the lab, the
/// flows to the relay, how they were spread, and every session's CIDs.
pub fn forwarded_lab(
    tag: &str,
    mode: &str,
    n: usize,
    more: &[(SocketAddrV4, SocketAddrV4)],
) -> anyhow::Result<(Lab, Vec<Flow>, Value, Cids)> {
    let mut lab = Lab::relay_topology_queues(tag, n)?;
    let certs = lab.certs()?;
    let spread = spread_flows(&lab, mode, n)?;
    let mut sessions = spread.flows.clone();
    sessions.extend_from_slice(more);
    let threads = ["--forwarder-threads".to_string(), n.to_string()];
    let extra: &[String] = if mode == "off" { &threads } else { &[] };
    let cids = start_intermediate(&mut lab, &certs, mode, &sessions, extra)?;
    let flows = spread
        .flows
        .iter()
        .map(|(a, b)| Flow {
            src: *a,
            dst: *b,
            to: relay_addr(),
            payload: quic_short(cids[&a.to_string()].0, PAYLOAD),
        })
        .collect();
    Ok((lab, flows, spread.how, cids))
}

/// Delivered pps of `flows` as fast as the senders go, measured again while
/// disturbed; with the packets per veth queue over the run.
pub fn saturation(
    lab: &Lab,
    mode: &str,
    flows: &[Flow],
    acct: &Acct,
    what: &str,
) -> anyhow::Result<((Window, Value), Vec<f64>)> {
    least_disturbed(&format!("{what} saturation"), SATURATION_ATTEMPTS, || {
        let q0 = QueueCounters::read(lab, mode)?;
        let w = measure(lab, flows, None, SATURATION, acct)?;
        let queues = QueueCounters::read(lab, mode)?.since(&q0);
        Ok(((w, queues), w.external_share()))
    })
}

/// One forwarded-relay path (`mode`: native, generic, off) in its own lab.
pub fn relay_path(mode: &str, res: &mut Results) -> anyhow::Result<()> {
    let key = path_key(mode);
    let mut more = vec![rtt_addrs()];
    if mode == "native" {
        more.push(self_session());
        more.push(routed_session());
    }
    let (lab, flows, spread, cids) =
        forwarded_lab(&format!("b{}", &mode[..1]), mode, res.senders, &more)?;
    let pid = lab.pid("intermediate");
    let prog_id = if mode == "off" {
        None
    } else {
        Some(lab.xdp_prog_id(&lab.ns("x"), "x0")?)
    };
    let direct: Vec<Flow> = flows
        .iter()
        .map(|f| Flow {
            src: f.src,
            dst: f.dst,
            to: f.dst,
            payload: f.payload.clone(),
        })
        .collect();
    let s0 = lab.fresh_relay_stats()?;
    let v0 = prog_id.map(|_| verdicts()).transpose()?;
    let lab_pids: Vec<u32> = pid.into_iter().collect();
    let mut path = Map::new();

    // Saturation; for XDP with bpf_stats on (the program's live run time), off
    // again for everything else (it adds two clock reads to every run).
    let stats_fd = match prog_id {
        Some(_) => match enable_bpf_stats() {
            Ok(fd) => Some(fd),
            Err(e) => {
                path.insert(
                    "prog_run_stats_error".into(),
                    json!(format!("BPF_ENABLE_STATS: {e}")),
                );
                None
            }
        },
        None => None,
    };
    eprintln!("relay-bench: {key}: saturation, {} s", SATURATION.as_secs());
    let sat_acct = Acct {
        lab_pids: lab_pids.clone(),
        prog: prog_id,
        ..Default::default()
    };
    let ((sat, queues), sat_ext) = saturation(&lab, mode, &flows, &sat_acct, key)?;
    drop(stats_fd);
    eprintln!(
        "relay-bench: {key}: {:.0} pps delivered of {:.0} offered",
        sat.delivered_pps(),
        sat.offered_pps()
    );

    eprintln!(
        "relay-bench: {key}: CPU at {CPU_RATE_PPS} pps through the relay, then sent directly"
    );
    let cpu_acct = Acct {
        relay_pid: pid,
        lab_pids: lab_pids.clone(),
        ..Default::default()
    };
    let base_acct = Acct {
        lab_pids: lab_pids.clone(),
        ..Default::default()
    };
    let ((cpu, base), cpu_ext) = least_disturbed(&format!("{key} CPU"), CPU_ATTEMPTS, || {
        // Relay and direct interleaved, twice: slow drifts hit both alike.
        let (mut r, mut d) = (Window::default(), Window::default());
        for _ in 0..CPU_ROUNDS {
            r = r.plus(&measure(
                &lab,
                &flows,
                Some(CPU_RATE_PPS),
                CPU_WINDOW,
                &cpu_acct,
            )?);
            d = d.plus(&measure(
                &lab,
                &direct,
                Some(CPU_RATE_PPS),
                CPU_WINDOW,
                &base_acct,
            )?);
        }
        Ok(((r, d), r.external_share().max(d.external_share())))
    })?;
    let s1 = lab.fresh_relay_stats()?;
    let v1 = prog_id.map(|_| verdicts()).transpose()?;

    // RTT through this path: pinger → relay → echoer → relay → pinger.
    let (pa, pb) = rtt_addrs();
    let (ab, ba) = cids[&pa.to_string()];
    let name = match mode {
        "native" => "relay_xdp",
        "generic" => "relay_xdp_generic",
        _ => "relay_userspace",
    };
    res.rtt.insert(
        name.into(),
        rtt(
            &lab,
            pa,
            relay_addr(),
            pb,
            Some((relay_addr(), ba)),
            quic_short(ab, PAYLOAD),
        )?,
    );
    if mode == "off"
        && let Some(pid) = pid
    {
        // The same with the intermediate on the pinger's CPU: no wake-up across
        // vCPUs, the forwarder's own processing latency.
        let saved = pin_process(pid, Some(0))?;
        let r = rtt(
            &lab,
            pa,
            relay_addr(),
            pb,
            Some((relay_addr(), ba)),
            quic_short(ab, PAYLOAD),
        );
        for (tid, mask) in saved {
            set_affinity(tid, &mask);
        }
        res.rtt.insert("relay_userspace_same_cpu".into(), r?);
    }

    let n = |s: &Value| s["userspace_forwarded_packets"].as_u64().unwrap_or(0);
    path.insert("senders".into(), json!(flows.len()));
    if mode == "off" {
        path.insert("forwarder_threads".into(), json!(flows.len()));
    }
    path.insert("flows".into(), spread);
    path.insert("saturation".into(), sat.json());
    path.insert("queues_saturation".into(), queues);
    path.insert("cpu_run".into(), cpu.json());
    path.insert("direct_baseline_cpu_run".into(), base.json());
    path.insert(
        "external_cpu_share_per_attempt".into(),
        json!({"saturation": sat_ext, "cpu": cpu_ext}),
    );
    path.insert(
        "userspace_forwarded_packets".into(),
        json!(n(&s1).saturating_sub(n(&s0))),
    );
    if let (Some(v0), Some(v1)) = (v0, v1) {
        path.insert("xdp_verdicts".into(), Value::Object(moved(&v0, &v1)));
        path.insert("prog_id".into(), json!(prog_id));
    }
    res.out
        .insert(format!("{key}_pps"), json!(sat.delivered_pps().round()));
    res.out.insert(format!("path_{key}"), Value::Object(path));
    res.windows.insert(key, (sat, cpu, Some(base)));

    if mode == "native" {
        eprintln!("relay-bench: direct (no relay): saturation and RTT");
        let (d, ext) = least_disturbed("direct saturation", SATURATION_ATTEMPTS, || {
            let w = measure(&lab, &direct, None, SATURATION, &base_acct)?;
            Ok((w, w.external_share()))
        })?;
        res.out
            .insert("direct_pps".into(), json!(d.delivered_pps().round()));
        res.out.insert(
            "path_direct".into(),
            json!({"saturation": d.json(), "external_cpu_share_per_attempt": {"saturation": ext}}),
        );
        res.windows.insert("direct", (d, base, None));
        res.rtt.insert(
            "direct".into(),
            rtt(&lab, pa, pb, pb, None, quic_short(ab, PAYLOAD))?,
        );
        eprintln!("relay-bench: program cost: BPF_PROG_TEST_RUN, repeat {TEST_RUN_REPEAT}");
        let prog = prog_cost(&lab, prog_id.context("no program id")?, &cids)?;
        res.out.insert("prog_test_run".into(), prog);
    }
    Ok(())
}
