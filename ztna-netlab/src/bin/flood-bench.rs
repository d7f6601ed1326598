//! `cargo xtask bench flood --out FILE` (root): the flood scenario of
//! `tests/flood.rs` (`ztna_netlab::flood`) for 30 s, with the XDP program attached
//! (native) and with the userspace forwarder (`--xdp off`). Per mode, the agent's
//! echo runs twice for the same planned 25 s: once alone (the baseline), then
//! starting just before the flood and ending inside it. JSON to FILE: RSS of the
//! intermediate before and after the flood, echo RTT p50/p99 and loss without and
//! with the flood side by side (with their ratio), and per attack kind what was
//! sent and the counters that refused it. A table on stdout.

use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use ztna_netlab::flood::{self, ECHO_BURST, ECHO_INTERVAL_MS, ECHO_SIZE, FLOOD_RATES, Plan};
use ztna_netlab::n;

const FLOOD: Duration = Duration::from_secs(30);
/// Shorter than the flood, so the flooded echo runs inside it.
const ECHO: Duration = Duration::from_secs(25);

fn ratio(flooded: u64, baseline: u64) -> Value {
    match baseline {
        0 => Value::Null,
        b => json!((flooded as f64 / b as f64 * 100.0).round() / 100.0),
    }
}

fn mode(xdp: &'static str) -> anyhow::Result<Value> {
    let o = flood::run(&Plan {
        xdp,
        flood: FLOOD,
        echo: ECHO,
        baseline: true,
    })?;
    let base = o.baseline.clone().context("no baseline echo")?;
    let echo = |e: &Value| json!({ "sent": n(e, "sent"), "echoed_exact": n(e, "echoed_exact"), "lost": n(e, "lost"), "corrupted": n(e, "corrupted"), "path": e["path"] });
    Ok(json!({
        "rss_kib": { "before": o.rss_before_kib, "after": o.rss_after_kib, "peak": o.rss_peak_kib },
        "rtt_us": {
            "p50": { "baseline": n(&base, "rtt_p50_us"), "flood": n(&o.echo, "rtt_p50_us"), "ratio": ratio(n(&o.echo, "rtt_p50_us"), n(&base, "rtt_p50_us")) },
            "p99": { "baseline": n(&base, "rtt_p99_us"), "flood": n(&o.echo, "rtt_p99_us"), "ratio": ratio(n(&o.echo, "rtt_p99_us"), n(&base, "rtt_p99_us")) },
        },
        "echo": { "baseline": echo(&base), "flood": echo(&o.echo) },
        "flood": o.flood,
        "per_kind": o.per_kind(),
    }))
}

fn main() -> anyhow::Result<()> {
    let out = std::env::args()
        .skip_while(|a| a != "--out")
        .nth(1)
        .context("usage: flood-bench --out FILE")?;
    let mut modes = serde_json::Map::new();
    for xdp in ["native", "off"] {
        eprintln!("flood-bench: xdp {xdp} ...");
        modes.insert(xdp.into(), mode(xdp).with_context(|| format!("xdp {xdp}"))?);
    }
    let result = json!({
        "flood_seconds": FLOOD.as_secs(),
        "rates_pps": FLOOD_RATES.iter().map(|(k, r)| (k.to_string(), Value::from(*r))).collect::<serde_json::Map<_, _>>(),
        "echo": { "planned_seconds": ECHO.as_secs(), "burst": ECHO_BURST, "interval_ms": ECHO_INTERVAL_MS, "size": ECHO_SIZE },
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "modes": modes,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&result)? + "\n")
        .with_context(|| format!("writing {out}"))?;
    println!(
        "{:<8} {:>10} {:>10} {:>16} {:>16} {:>12} {:>14} {:>12} {:>12}",
        "xdp",
        "RSS before",
        "RSS after",
        "p50 µs (×)",
        "p99 µs (×)",
        "lost",
        "resets/limited",
        "tiny drops",
        "mismatch"
    );
    for (xdp, m) in &modes {
        let k = &m["per_kind"];
        let rtt = |p: &str| {
            format!(
                "{}→{} ({})",
                m["rtt_us"][p]["baseline"], m["rtt_us"][p]["flood"], m["rtt_us"][p]["ratio"]
            )
        };
        println!(
            "{:<8} {:>7} KiB {:>6} KiB {:>16} {:>16} {:>5} / {:<4} {:>6}/{:<7} {:>12} {:>12}",
            xdp,
            m["rss_kib"]["before"],
            m["rss_kib"]["after"],
            rtt("p50"),
            rtt("p99"),
            m["echo"]["flood"]["lost"],
            m["echo"]["flood"]["sent"],
            k["unknown_cid"]["counters"]["stateless_resets_sent"],
            k["unknown_cid"]["counters"]["stateless_resets_rate_limited"],
            k["tiny_initial"]["counters"]["dropped_short_initials"],
            k["relay_cid_spoof"]["counters"]["relay_sender_mismatch"],
        );
    }
    println!("flood-bench: wrote {out}");
    Ok(())
}
