//! `cargo xtask bench relay|tunnel|flood --out FILE [-- ARGS]` (root). Builds the
//! release binaries and runs `relay-bench`, `tunnel-bench` or `flood-bench`
//! (ztna-netlab) with them and ARGS: JSON to FILE (relay: an SVG next to it), a table
//! on stdout.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn bench(what: &str, out: &Path, args: &[String]) -> anyhow::Result<()> {
    let program = match what {
        "relay" => "relay-bench",
        "tunnel" => "tunnel-bench",
        "flood" => "flood-bench",
        _ => bail!("unknown benchmark {what:?} (known: relay, tunnel, flood)"),
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the {what} benchmark needs root (network namespaces, XDP, bpf(2))");
    }
    crate::prereqs::ensure()?;
    if what == "tunnel" {
        crate::prereqs::ensure_bench_tools()?;
    }
    let root = root();
    // The intermediate embeds target/ztna-ebpf.o at build time. Rebuild it from the
    // current source; if that fails, an existing object is used, and without one
    // relay-bench records the XDP paths as skipped.
    if let Err(e) = crate::ebpf::build_ebpf(&root) {
        let obj = root.join("target/ztna-ebpf.o");
        eprintln!(
            "xtask bench: building the eBPF object failed ({e:#}); {}",
            if obj.exists() {
                "using the existing target/ztna-ebpf.o"
            } else {
                "the XDP paths will be skipped"
            }
        );
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "ztna-userspace",
        "-p",
        "ztna-netlab",
    ]))?;
    let out = std::path::absolute(out)?;
    let bin = root.join("target/release");
    run(Command::new(bin.join(program))
        .arg("--out")
        .arg(&out)
        .args(args)
        .env("ZTNA_BIN_DIR", &bin))
}
