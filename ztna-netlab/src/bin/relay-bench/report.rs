//! The report: the summary keys of the JSON (ratios, targets, methods), an SVG chart,
//! and the table on stdout.

use ztna_netlab::procstat::kernel_config;

use super::*;

pub fn svg(res: &Results) -> String {
    let f = |k: &str| res.out.get(k).and_then(|v| v.as_f64());
    let cpu = res
        .out
        .get("cpu_ns_per_pkt")
        .cloned()
        .unwrap_or(Value::Null);
    let names = [
        ("XDP native", "xdp_native"),
        ("XDP generic", "xdp_generic"),
        ("userspace fwd", "userspace"),
        ("datagram relay", "datagram_relay"),
    ];
    let mut s = String::from(
        "<svg xmlns='http://www.w3.org/2000/svg' width='920' height='320' font-family='sans-serif' font-size='12'>\n<rect width='920' height='320' fill='white'/>\n",
    );
    let panel = |s: &mut String,
                 x0: f64,
                 title: &str,
                 bars: &[(&str, Option<f64>)],
                 unit: &str,
                 color: &str| {
        s.push_str(&format!(
            "<text x='{x0}' y='22' font-size='14' font-weight='bold'>{title}</text>\n"
        ));
        let max = bars.iter().filter_map(|b| b.1).fold(1.0, f64::max);
        for (i, (name, v)) in bars.iter().enumerate() {
            let y = 42.0 + i as f64 * 46.0;
            s.push_str(&format!(
                "<text x='{x0}' y='{:.0}'>{name}</text>\n",
                y + 18.0
            ));
            match v {
                Some(v) => {
                    let w = 240.0 * v.max(0.0) / max;
                    s.push_str(&format!(
                        "<rect x='{:.0}' y='{y:.0}' width='{w:.1}' height='26' fill='{color}'/><text x='{:.0}' y='{:.0}'>{v:.0} {unit}</text>\n",
                        x0 + 110.0,
                        x0 + 115.0 + w,
                        y + 18.0
                    ));
                }
                None => s.push_str(&format!(
                    "<text x='{:.0}' y='{:.0}' fill='#888'>not measured</text>\n",
                    x0 + 115.0,
                    y + 18.0
                )),
            }
        }
    };
    let mut pps: Vec<(&str, Option<f64>)> = names
        .iter()
        .map(|(n, k)| (*n, f(&format!("{k}_pps"))))
        .collect();
    pps.push(("direct (no relay)", f("direct_pps")));
    panel(
        &mut s,
        10.0,
        &format!("Delivered packets/s, {PAYLOAD}-byte payloads"),
        &pps,
        "pps",
        "#4a7bd0",
    );
    let cpus: Vec<(&str, Option<f64>)> =
        names.iter().map(|(n, k)| (*n, cpu[*k].as_f64())).collect();
    panel(
        &mut s,
        470.0,
        &format!("Relay CPU ns per packet at {} kpps", CPU_RATE_PPS / 1000),
        &cpus,
        "ns",
        "#d0704a",
    );
    s.push_str("<text x='10' y='290' fill='#555'>pps: generator-bound for XDP (generator, receivers and relay share 2 vCPUs). CPU: XDP = softirq time minus the direct baseline;</text>\n");
    s.push_str("<text x='10' y='306' fill='#555'>userspace / datagram relay = intermediate utime+stime. Methods and like-for-like numbers in the JSON.</text>\n");
    s.push_str("</svg>\n");
    s
}

pub fn summarize(res: &mut Results) {
    let generator = format!(
        "{n} threads x sendmmsg batch {BATCH} ({n} UDP sockets in the agent namespace, one static relay session each), {PAYLOAD}-byte QUIC-short-header payloads (0x40 + 8-byte relay CID + filler); {n} recvmmsg receivers (8 MiB buffers) in the connector namespace; every veth with {n} transmit and receive queues and the flows' ports picked so that each takes a queue of its own (path_*.flows; packets per queue in path_*.queues_saturation); the userspace forwarder with --forwarder-threads {n}; generator, receivers and relay share the same {} vCPUs. Datagram relay: {DGRAM_AGENTS} in-process agents (see path_datagram_relay.load)",
        ncpu(),
        n = res.senders
    );
    res.out.insert("generator".into(), json!(generator));
    let g = res
        .windows
        .iter()
        .filter(|(k, _)| **k != "datagram_relay")
        .map(|(_, w)| w.0.offered_pps())
        .fold(0.0, f64::max);
    res.out.insert("generator_pps".into(), json!(g.round()));
    let offered: Map<String, Value> = res
        .windows
        .iter()
        .map(|(k, w)| (k.to_string(), json!(w.0.offered_pps().round())))
        .collect();
    res.out
        .insert("generator_pps_per_path".into(), Value::Object(offered));
    // Delivered ≈ offered: the generator (whose sendmmsg calls run the whole veth
    // path inline, XDP included) ran out of CPU first, not the relay path.
    let bound: Map<String, Value> = res
        .windows
        .iter()
        .map(|(k, w)| {
            let r = w.0.delivered as f64 / w.0.offered.max(1) as f64;
            let by = if r > 0.98 {
                "generator-bound (delivered = offered: the relay path kept up)"
            } else {
                "path-bound (packets dropped on the way)"
            };
            (
                k.to_string(),
                json!(format!("{by}, delivered/offered {r:.3}")),
            )
        })
        .collect();
    res.out
        .insert("saturation_bound".into(), Value::Object(bound));
    res.out.insert("payload_bytes".into(), json!(PAYLOAD));
    res.out.insert("senders".into(), json!(res.senders));
    res.out.insert(
        "saturation_window_s".into(),
        json!(SATURATION.as_secs_f64()),
    );

    // CPU per relayed packet.
    let hz = kernel_config("CONFIG_HZ")
        .and_then(|h| h.parse::<f64>().ok())
        .unwrap_or(250.0);
    let irq_time = kernel_config("CONFIG_IRQ_TIME_ACCOUNTING");
    let sample_ns = 1e9 / hz;
    let mut cpu = Map::new();
    let mut attributed = Map::new();
    let mut detail = Map::new();
    for key in ["xdp_native", "xdp_generic", "userspace", "datagram_relay"] {
        let Some((sat, w, base)) = res.windows.get(key).copied() else {
            continue;
        };
        let mut d = Map::new();
        d.insert("offered_pps".into(), json!(w.offered_pps().round()));
        d.insert("delivered".into(), json!(w.delivered));
        d.insert(
            "softirq_ns_per_pkt".into(),
            json!(w.per_pkt(w.softirq_ns).round()),
        );
        d.insert(
            "lab_cpu_ns_per_pkt".into(),
            json!(w.per_pkt(w.lab_ns).round()),
        );
        if let Some(b) = base {
            let soft = w.per_pkt(w.softirq_ns) - b.per_pkt(b.softirq_ns);
            // The softirq column is a count of 1/HZ samples: Poisson error.
            let se = |x: &Window| {
                (x.softirq_ns / sample_ns).sqrt() * sample_ns / x.delivered.max(1) as f64
            };
            let soft_se = (se(&w).powi(2) + se(&b).powi(2)).sqrt();
            let lab = w.per_pkt(w.lab_ns) - b.per_pkt(b.lab_ns);
            d.insert(
                "direct_softirq_ns_per_pkt".into(),
                json!(b.per_pkt(b.softirq_ns).round()),
            );
            d.insert("softirq_minus_direct".into(), json!(soft.round()));
            d.insert(
                "softirq_minus_direct_sampling_error".into(),
                json!(soft_se.round()),
            );
            d.insert(
                "direct_lab_cpu_ns_per_pkt".into(),
                json!(b.per_pkt(b.lab_ns).round()),
            );
            d.insert("lab_cpu_minus_direct".into(), json!(lab.round()));
            attributed.insert(key.into(), json!(lab.round()));
            if key.starts_with("xdp") {
                cpu.insert(key.into(), json!(soft.round()));
            }
        }
        if let Some(p) = w.proc_ns {
            d.insert(
                "intermediate_utime_stime_ns_per_pkt".into(),
                json!(w.per_pkt(p).round()),
            );
            if !key.starts_with("xdp") {
                cpu.insert(key.into(), json!(w.per_pkt(p).round()));
            }
        }
        if let Some(p) = w.proc_sched_ns {
            d.insert(
                "intermediate_schedstat_ns_per_pkt".into(),
                json!(w.per_pkt(p).round()),
            );
        }
        if let Some(p) = sat.prog_ns_per_run() {
            d.insert("prog_run_time_ns_per_pkt_live".into(), json!(round2(p)));
        }
        detail.insert(key.into(), Value::Object(d));
    }
    res.out
        .insert("cpu_ns_per_pkt".into(), Value::Object(cpu.clone()));
    res.out.insert(
        "cpu_ns_per_pkt_lab_minus_direct".into(),
        Value::Object(attributed.clone()),
    );
    res.out.insert("cpu_detail".into(), Value::Object(detail));
    res.out.insert(
        "cpu_method".into(),
        json!(format!(
            "Offered {CPU_RATE_PPS} pps in {CPU_ROUNDS} windows of {} s (each after {} ms warm-up), alternating with the direct baseline (relay, direct, relay, direct), same generator as the saturation runs; delivered packets counted at the receivers. cpu_ns_per_pkt.xdp_*: softirq time summed over CPUs (/proc/stat softirq column) per delivered packet, minus the same for the same load sent directly agent ns -> connector ns without the relay (interleaved, same lab; CONFIG_IRQ_TIME_ACCOUNTING={}, so the column is {} and cpu_detail.*.softirq_minus_direct_sampling_error gives the 1-sigma sampling error). It counts all softirq work the relay detour adds in this lab: the router's second forward, the veth hops r1->x0 and x0->r1 (skb->xdp conversion on x0, XDP pass program and skb rebuild on r1), besides the relay's own XDP work. cpu_ns_per_pkt.userspace and .datagram_relay: the intermediate's utime+stime delta (/proc/PID/stat) per delivered packet; it includes whatever softirq work its own syscalls ran inline (e.g. the router forwarding its sends), but not the kernel's receive path into its socket. cpu_ns_per_pkt_lab_minus_direct (like-for-like, not tick-sampled): scheduler run time (schedstat) of everything in the lab (generator and receiver threads, ksoftirqd, the intermediate) per packet, minus the same for the direct baseline. prog_run_time_ns_per_pkt_live: the program's own run time per packet, kernel bpf_stats (BPF_ENABLE_STATS), during the saturation run. external_cpu_share: CPU used outside the lab during a window (other work on the shared host); windows above {:.0}% were measured again (up to {CPU_ATTEMPTS} times, least disturbed kept).",
            CPU_WINDOW.as_secs(),
            WARMUP.as_millis(),
            irq_time.clone().unwrap_or_else(|| "unknown".into()),
            if irq_time.as_deref() == Some("y") { "precise" } else { "tick-sampled" },
            EXTERNAL_MAX * 100.0
        )),
    );

    // Program cost.
    let prog = res.out.get("prog_test_run").cloned().unwrap_or(Value::Null);
    let prog_ns = prog["routed_self_mapping_packet"]["repeats"]["ns_per_run_min"].as_f64();
    res.out.insert("prog_ns_per_pkt".into(), json!(prog_ns));
    if !prog.is_null() {
        res.out.insert(
            "prog_ns_per_pkt_median".into(),
            prog["routed_self_mapping_packet"]["repeats"]["ns_per_run_median"].clone(),
        );
        res.out.insert(
            "prog_ns_per_pkt_with_fib_lookup".into(),
            prog["fib_lookup_every_packet"]["ns_per_run_min"].clone(),
        );
        res.out.insert(
            "prog_test_run_verdict".into(),
            prog["routed_self_mapping_packet"]["verdict"].clone(),
        );
        res.out.insert(
            "prog_test_run_verdict_relay_to_relay_packet".into(),
            prog["self_relay_packet"]["verdict"].clone(),
        );
    }
    res.out.insert(
        "prog_ns_method".into(),
        json!(format!(
            "BPF_PROG_TEST_RUN (bpf(2) cmd 10; fd by BPF_PROG_GET_FD_BY_ID of the program attached to x0, i.e. the intermediate's own instance) with repeat={TEST_RUN_REPEAT}, {TEST_RUNS} runs, best run reported (median alongside): other work on the shared vCPUs only ever slows a run down; from a thread in the relay namespace with xdp_md.ingress_ifindex = x0, bpf_stats off. prog_ns_per_pkt: static session {p}={p} and the packet {p} -> {p} with MACs x0 -> r1: the rewrite reproduces it byte for byte (checked: output_identical), so every repeat takes the whole forward path (table lookup, sender check, route from the per-CPU cache that the first run's bpf_fib_lookup filled, rewrite with incremental checksums, counters, XDP_TX). The packet of static session {s}={s} (relay -> relay) returns the verdict in prog_test_run.self_relay_packet: the relay's own address is a local route, which bpf_fib_lookup does not forward to. prog_ns_per_pkt_with_fib_lookup: the same packet with the session's per-CPU value removed, so every run does bpf_fib_lookup (the first packet per peer per CPU per second).",
            p = routed_session().0,
            s = self_session().0
        )),
    );

    // RTT and ratios.
    let p50 = |k: &str| res.rtt.get(k).and_then(|v| v["p50"].as_f64());
    let added = p50("relay_xdp")
        .zip(p50("direct"))
        .map(|(x, d)| round2(x - d));
    let added_user = p50("relay_userspace")
        .zip(p50("direct"))
        .map(|(x, d)| round2(x - d));
    res.out
        .insert("rtt_us".into(), Value::Object(res.rtt.clone()));
    res.out.insert("added_rtt_p50_us".into(), json!(added));
    res.out
        .insert("added_rtt_p50_us_userspace".into(), json!(added_user));
    res.out.insert(
        "rtt_method".into(),
        json!(format!(
            "{PINGS} sequential {PAYLOAD}-byte UDP ping-pongs (after 50 warm-up) agent ns <-> connector ns, pinger and echoer threads in SCHED_FIFO and pinned to CPU 0 (cross-vCPU wake-ups of a halted vCPU cost tens of us in this VM and would swamp the path latency; the userspace intermediate is not pinned, so relay_userspace includes two such wake-ups; relay_userspace_same_cpu = the same with the intermediate pinned to CPU 0 for the measurement); relay_*: one static session used both ways (the echoer replies to the relay with the other relay CID), so two relay traversals per RTT; relay_xdp = XDP native; added_rtt_p50_us = relay_xdp.p50 - direct.p50"
        )),
    );
    let c = |k: &str| cpu.get(k).and_then(|v| v.as_f64());
    let ratio = c("xdp_native").zip(c("userspace")).map(|(x, u)| x / u);
    let a = |k: &str| attributed.get(k).and_then(|v| v.as_f64());
    let ratio_lab = a("xdp_native").zip(a("userspace")).map(|(x, u)| x / u);
    let pps = |k: &str| res.out.get(k).and_then(|v| v.as_f64());
    res.out.insert(
        "ratios".into(),
        json!({
            "xdp_native_cpu_over_userspace_cpu": ratio.map(round3),
            "xdp_generic_cpu_over_userspace_cpu": c("xdp_generic").zip(c("userspace")).map(|(x, u)| round3(x / u)),
            "xdp_native_over_userspace_lab_cpu_minus_direct": ratio_lab.map(round3),
            "xdp_native_pps_over_userspace_pps": pps("xdp_native_pps").zip(pps("userspace_pps")).map(|(x, u)| round2(x / u)),
        }),
    );
    let target = |v: Option<f64>, t: f64| json!({"value": v.map(round3), "target": t, "met": v.map(|v| v <= t)});
    res.out.insert(
        "targets".into(),
        json!({
            "xdp_cpu_per_pkt_le_tenth_of_userspace": target(ratio, 0.1),
            "xdp_cpu_per_pkt_le_tenth_of_userspace_like_for_like": target(ratio_lab, 0.1),
            "prog_ns_per_pkt_le_50": target(prog_ns, 50.0),
            "added_rtt_p50_le_10us": target(added, 10.0),
        }),
    );
    res.out
        .insert("skipped".into(), Value::Object(res.skipped.clone()));
    res.out
        .insert("errors".into(), Value::Object(res.errors.clone()));
    let uname = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    res.out.insert(
        "environment".into(),
        json!({
            "kernel": uname, "cpus": ncpu(), "config_hz": hz, "irq_time_accounting": irq_time,
            "bin_dir": ztna_netlab::bin_dir().display().to_string(),
        }),
    );
}

pub fn print_table(res: &Results) {
    if !res.windows.is_empty() {
        print_paths(res);
    }
    crate::scaling::print(res);
    if !res.skipped.is_empty() {
        println!("SKIPPED: {}", Value::Object(res.skipped.clone()));
    }
    if !res.errors.is_empty() {
        println!("ERRORS: {}", Value::Object(res.errors.clone()));
    }
}

/// The forwarded paths, the datagram relay and the direct path.
fn print_paths(res: &Results) {
    let f = |k: &str| res.out.get(k).and_then(|v| v.as_f64());
    let cpu = &res.out["cpu_ns_per_pkt"];
    let detail = &res.out["cpu_detail"];
    let fmt = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |v| format!("{v:.d$}"));
    println!();
    println!(
        "{:<20} {:>10} {:>10} {:>12} {:>9} {:>12} {:>10}",
        "path", "delivered", "offered", "relay CPU", "+-", "lab CPU", "prog live"
    );
    println!(
        "{:<20} {:>10} {:>10} {:>12} {:>9} {:>12} {:>10}",
        "", "pps", "pps", "ns/pkt", "(1 sig)", "-direct", "ns/pkt"
    );
    for (name, key) in [
        ("XDP native", "xdp_native"),
        ("XDP generic", "xdp_generic"),
        ("userspace forwarder", "userspace"),
        ("datagram relay", "datagram_relay"),
        ("direct (no relay)", "direct"),
    ] {
        let d = &detail[key];
        println!(
            "{:<20} {:>10} {:>10} {:>12} {:>9} {:>12} {:>10}",
            name,
            fmt(f(&format!("{key}_pps")), 0),
            fmt(res.windows.get(key).map(|w| w.0.offered_pps()), 0),
            fmt(cpu[key].as_f64(), 0),
            fmt(
                d["softirq_minus_direct_sampling_error"]
                    .as_f64()
                    .filter(|_| key.starts_with("xdp")),
                0
            ),
            fmt(d["lab_cpu_minus_direct"].as_f64(), 0),
            fmt(d["prog_run_time_ns_per_pkt_live"].as_f64(), 1),
        );
    }
    println!("generator: {}", res.out["generator"].as_str().unwrap_or(""));
    println!(
        "generator offered up to {:.0} pps",
        f("generator_pps").unwrap_or(0.0)
    );
    println!(
        "relay CPU at {CPU_RATE_PPS} pps: XDP = softirq minus direct baseline (tick-sampled, +- = 1 sigma); userspace / datagram = intermediate utime+stime; lab CPU - direct = schedstat of the whole lab minus direct baseline"
    );
    for k in [
        "direct",
        "relay_xdp",
        "relay_xdp_generic",
        "relay_userspace",
        "relay_userspace_same_cpu",
    ] {
        let r = &res.out["rtt_us"][k];
        println!(
            "RTT {:<25} p50 {:>8} us  p99 {:>8} us",
            k,
            fmt(r["p50"].as_f64(), 1),
            fmt(r["p99"].as_f64(), 1)
        );
    }
    let prog = res.out.get("prog_test_run").unwrap_or(&Value::Null);
    if !prog.is_null() {
        let s = &prog["self_relay_packet"];
        println!(
            "test run, relay -> relay packet: verdict {} ({}){}",
            s["verdict"],
            s["verdict_name"].as_str().unwrap_or("?"),
            s["repeats"]["ns_per_run_min"]
                .as_f64()
                .map_or(String::new(), |v| format!(", {v:.0} ns/run"))
        );
        let r = &prog["routed_self_mapping_packet"];
        println!(
            "test run, routed self-mapping packet: verdict {} ({}), output identical {}, {} ns/run (median {}); bpf_fib_lookup on every run: {} ns",
            r["verdict"],
            r["verdict_name"].as_str().unwrap_or("?"),
            r["output_identical"],
            fmt(r["repeats"]["ns_per_run_min"].as_f64(), 0),
            fmt(r["repeats"]["ns_per_run_median"].as_f64(), 0),
            fmt(
                prog["fib_lookup_every_packet"]["ns_per_run_min"].as_f64(),
                0
            )
        );
    }
    let t = &res.out["targets"];
    let line = |label: &str, k: &str, unit: &str, d: usize| {
        let v = &t[k];
        let met = match v["met"].as_bool() {
            Some(true) => "MET",
            Some(false) => "MISSED",
            None => "n/a",
        };
        println!(
            "{label:<52} {:>8}{unit}  target <= {}{unit}: {met}",
            fmt(v["value"].as_f64(), d),
            v["target"]
        );
    };
    line(
        "XDP native CPU/pkt / userspace CPU/pkt:",
        "xdp_cpu_per_pkt_le_tenth_of_userspace",
        "",
        3,
    );
    line(
        "  same, like-for-like (lab CPU minus direct):",
        "xdp_cpu_per_pkt_le_tenth_of_userspace_like_for_like",
        "",
        3,
    );
    line(
        "program cost per packet (BPF_PROG_TEST_RUN):",
        "prog_ns_per_pkt_le_50",
        " ns",
        1,
    );
    line(
        "added RTT p50, XDP native vs direct:",
        "added_rtt_p50_le_10us",
        " us",
        1,
    );
}
