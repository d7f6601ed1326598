//! What a fresh machine lacks, installed before anything builds: as root, missing
//! Debian packages are installed with one line saying which; otherwise one line
//! names them and the command that installs them. (rust-src and bpf-linker are
//! `ebpf::build_ebpf`'s: they install without root.)

use std::process::{Command, Stdio};

use anyhow::bail;

/// Building: quiche builds BoringSSL with cmake, and bindgen needs libclang. The
/// agent C ABI's harness (agent-ffi/tests/c) is compiled with the system C compiler.
const BUILD: &[&str] = &["cmake", "libclang-dev", "clang", "gcc"];

/// The privileged tests, the demo's tunnel and the benchmarks: namespaces, NAT,
/// BPF map inspection, the connector's nftables table, real clients and servers;
/// valgrind for the C harness (it runs without it, unchecked, when absent); promtool
/// for the metrics.
const PRIVILEGED: &[&str] = &[
    "valgrind",
    "iproute2",
    "iptables",
    "nftables",
    "bpftool",
    "ethtool",
    "iputils-ping",
    "util-linux",
    "curl",
    "iperf3",
    // promtool, which checks the daemons' /metrics expositions.
    "prometheus",
];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Makes sure the packages for building (and, as root, for the privileged tests)
/// are there.
pub fn ensure() -> anyhow::Result<()> {
    let root = crate::is_root();
    let wanted: Vec<&str> = if root {
        BUILD.iter().chain(PRIVILEGED).copied().collect()
    } else {
        BUILD.to_vec()
    };
    let missing: Vec<&str> = wanted.into_iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !root {
        bail!("missing Debian packages: {list}; install them with: sudo apt-get install -y {list}");
    }
    install(&missing)
}

/// The deploy checks: podman (with runc and catatonit for its pods' infra
/// container; crun refuses this machine's hybrid cgroups), mmdebstrap for the base
/// image, and kubectl for kustomize: the machine's own if it has one, else Debian's
/// kubernetes-client. Root only (they build and run containers).
pub fn ensure_deploy_tools() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = DEPLOY.iter().copied().filter(|p| !installed(p)).collect();
    let has_kubectl = Command::new("sh")
        .args(["-c", "command -v kubectl"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_kubectl {
        missing.push("kubernetes-client");
    }
    if missing.is_empty() {
        return Ok(());
    }
    install(&missing)
}

/// See `ensure_deploy_tools`.
const DEPLOY: &[&str] = &["podman", "runc", "catatonit", "mmdebstrap", "binutils"];

fn install(missing: &[&str]) -> anyhow::Result<()> {
    let list = missing.join(" ");
    println!("xtask: installing missing packages: {list}");
    let quiet = |c: &mut Command| -> anyhow::Result<()> {
        let out = c
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "{c:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    quiet(Command::new("apt-get").args(["update", "-qq"]))?;
    quiet(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(missing),
    )
}

/// The tunnel benchmark's peer: boringtun (userspace WireGuard, from crates.io)
/// and `wg` to configure it.
pub fn ensure_bench_tools() -> anyhow::Result<()> {
    if !installed("wireguard-tools") {
        println!("xtask: installing missing packages: wireguard-tools");
        let ok = Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "wireguard-tools",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()?
            .success();
        if !ok {
            bail!("apt-get install wireguard-tools failed");
        }
    }
    let have = Command::new("sh")
        .args(["-c", "command -v boringtun-cli"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        println!("xtask: cargo install boringtun-cli --locked");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        if !Command::new(cargo)
            .args(["install", "boringtun-cli", "--locked"])
            .status()?
            .success()
        {
            bail!("cargo install boringtun-cli failed");
        }
    }
    Ok(())
}
