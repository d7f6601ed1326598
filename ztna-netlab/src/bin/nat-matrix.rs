//! Every pair of {no NAT, cone-like, symmetric-like} for agent and connector: the
//! path reached, time to direct, fallback time after a cut of the direct path, and
//! echoes lost during the fallback. Needs root. `cargo xtask nat-matrix --out FILE`.
use std::path::PathBuf;

use anyhow::Context;
use ztna_netlab::p2p::{Nat, scenario};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut out: Option<PathBuf> = None;
    let mut only: Option<(Nat, Nat)> = None;
    let parse = |s: &str| Nat::ALL.into_iter().find(|n| n.name() == s);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = args.next().map(PathBuf::from),
            // One pair only, e.g. `--pair no-nat,symmetric-like` (for debugging).
            "--pair" => {
                let v = args.next().unwrap_or_default();
                let (x, y) = v.split_once(',').context("--pair AGENT,CONNECTOR")?;
                only = Some((
                    parse(x).context("agent NAT")?,
                    parse(y).context("connector NAT")?,
                ));
            }
            other => anyhow::bail!("unknown argument {other:?} (usage: nat-matrix --out FILE)"),
        }
    }
    let out = out.context("--out FILE is required")?;
    let mut rows = Vec::new();
    if std::env::var_os("RUST_LOG").is_some() {
        ztna_userspace::logging::init("info");
    }
    for a in Nat::ALL {
        for c in Nat::ALL {
            if only.is_some_and(|o| o != (a, c)) {
                continue;
            }
            eprintln!(
                "nat-matrix: agent {} / connector {} ...",
                a.name(),
                c.name()
            );
            let r = scenario(a, c, true).with_context(|| format!("{} / {}", a.name(), c.name()))?;
            rows.push(r);
        }
    }
    let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
    println!(
        "{:<16} {:<16} {:<16} {:>14} {:>12} {:>10} {:>14} {:>10}",
        "agent", "connector", "path", "to direct", "fallback", "lost", "direct again", "echoes ok"
    );
    for r in &rows {
        println!(
            "{:<16} {:<16} {:<16} {:>14} {:>12} {:>10} {:>14} {:>10}",
            r.agent_nat.map_or("", |n| n.name()),
            r.connector_nat.map_or("", |n| n.name()),
            r.path,
            ms(r.time_to_direct_ms),
            ms(r.fallback_ms),
            r.lost_during_fallback.map_or("-".into(), |v| v.to_string()),
            ms(r.direct_again_ms),
            format!("{}/{}", r.echoes_ok, r.echoes_sent),
        );
    }
    let json = serde_json::json!({
        "method": "namespaces with netfilter NATs (MASQUERADE = cone-like, MASQUERADE --random-fully = symmetric-like, \
                   unsolicited inbound dropped); echo every 10 ms; cut = DROP between the NATs' outside addresses",
        "pairs": rows,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("nat-matrix: wrote {}", out.display());
    Ok(())
}
