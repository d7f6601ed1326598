//! `cargo xtask fuzz [--secs N]`: every cargo-fuzz target in `fuzz/` (nightly, which
//! the machines have; the workspace itself stays on stable), each for N seconds on
//! its committed seeds (`fuzz/seeds/<target>`; what it finds grows in the ignored
//! `fuzz/corpus/<target>`). Prints executions and findings per target and fails
//! on a finding (the crashing input is kept in `fuzz/artifacts/<target>/`).
//! `cargo xtask test` runs each briefly.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

pub const TARGETS: &[&str] = &[
    "control_datagram",
    "stream_frames",
    "ip_packet",
    "p2p_check",
    "flow_translation",
    "agent_tunnel",
];

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let have = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        println!("xtask: cargo +nightly install cargo-fuzz --locked");
        let ok = Command::new("cargo")
            .args(["+nightly", "install", "cargo-fuzz", "--locked"])
            .status()?
            .success();
        if !ok {
            bail!("installing cargo-fuzz failed");
        }
    }
    Ok(())
}

/// Runs every target for `secs` seconds; returns (target, executions) per target.
pub fn run(root: &Path, secs: u64) -> anyhow::Result<Vec<(String, u64)>> {
    ensure_cargo_fuzz()?;
    let dir = root.join("fuzz");
    for t in TARGETS {
        std::fs::create_dir_all(dir.join("corpus").join(t))?;
    }
    let mut results = Vec::new();
    let mut failed = Vec::new();
    for t in TARGETS {
        let out = Command::new("cargo")
            .current_dir(&dir)
            .env_remove("CARGO_TARGET_DIR")
            .args(["+nightly", "fuzz", "run", "-O", t])
            .arg(format!("corpus/{t}"))
            .arg(format!("seeds/{t}"))
            .args(["--", &format!("-max_total_time={secs}")])
            // Each 4 bytes of input are one table operation: 64 of them exercise
            // collisions and exhaustion, longer inputs only slow the search.
            .args(if *t == "flow_translation" {
                &["-max_len=256"][..]
            } else {
                &[]
            })
            .output()
            .with_context(|| format!("running fuzz target {t}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let runs = log
            .lines()
            .rev()
            .find_map(|l| {
                l.strip_prefix("Done ")?
                    .split(' ')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0);
        let ok = out.status.success();
        println!(
            "fuzz {t:<18} {runs:>12} executions in {secs} s, {}",
            if ok {
                "no findings"
            } else {
                "FINDING (see fuzz/artifacts)"
            }
        );
        if !ok {
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            failed.push(t.to_string());
        }
        results.push((t.to_string(), runs));
    }
    if !failed.is_empty() {
        bail!("fuzz targets with findings: {}", failed.join(", "));
    }
    Ok(results)
}
