//! `cargo xtask build-ebpf`: the XDP object, built with this recipe (verified on the
//! stable toolchain):
//!
//! - `rust-src` (rustup component) for `build-std = ["core"]` on `bpfel-unknown-none`
//!   (see `ztna-ebpf/.cargo/config.toml`), with `RUSTC_BOOTSTRAP=1` because build-std
//!   is unstable;
//! - `bpf-linker` 0.13.0, installed without its bundled LLVM and linked against
//!   rustc's own `libLLVM-*.so` from the sysroot (features `llvm-<major>` and
//!   `no-llvm-linking`, plus an rpath): Debian packages no LLVM 22, the version
//!   rustc's LLVM has, and the linker must read the bitcode rustc emits;
//! - BTF on (`-C debuginfo=2 -C link-arg=--btf` in that config), so the loader gets
//!   BTF maps and `bpftool map dump` prints fields by name.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

fn sysroot() -> anyhow::Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc")?;
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn have_rust_src(sysroot: &Path) -> bool {
    sysroot.join("lib/rustlib/src/rust/library/core").exists()
}

fn bpf_linker() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let p = home.join("bin/bpf-linker");
    if p.exists() {
        return Some(p);
    }
    let which = Command::new("sh")
        .args(["-c", "command -v bpf-linker"])
        .output()
        .ok()?;
    which
        .status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&which.stdout).trim()))
}

fn install_bpf_linker(sysroot: &Path) -> anyhow::Result<()> {
    let lib = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .find(|n| n.starts_with("libLLVM-") && n.ends_with(".so"))
        .context("no libLLVM-*.so in the rustc sysroot")?;
    let lib = lib
        .trim_start_matches("lib")
        .trim_end_matches(".so")
        .to_string();
    let llvm_major = lib
        .trim_start_matches("LLVM-")
        .split(['-', '.'])
        .next()
        .unwrap_or("22")
        .to_string();
    let sr = sysroot.display().to_string();
    println!("xtask: installing bpf-linker 0.13.0 against rustc's {lib}");
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "0.13.0",
            "--locked",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{llvm_major},no-llvm-linking")])
        .env(
            "RUSTFLAGS",
            format!("-L native={sr}/lib -l dylib={lib} -C link-arg=-Wl,-rpath,{sr}/lib"),
        )
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed: {status}");
    }
    Ok(())
}

/// Builds ztna-ebpf and copies the object to `<root>/target/ztna-ebpf.o`.
pub fn build_ebpf(root: &Path) -> anyhow::Result<PathBuf> {
    let sysroot = sysroot()?;
    if !have_rust_src(&sysroot) {
        println!("xtask: rustup component add rust-src");
        let status = Command::new("rustup")
            .args(["component", "add", "rust-src"])
            .status()?;
        if !status.success() {
            bail!("rustup component add rust-src failed");
        }
    }
    let linker = match bpf_linker() {
        Some(p) => p,
        None => {
            install_bpf_linker(&sysroot)?;
            bpf_linker().context("bpf-linker not found after installing it")?
        }
    };
    let dir = root.join("ztna-ebpf");
    println!("xtask: building ztna-ebpf (bpfel-unknown-none, release)");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if let Some(d) = linker.parent() {
        paths.insert(0, d.to_path_buf());
    }
    let status = Command::new("cargo")
        .current_dir(&dir)
        .args(["build", "--release"])
        // build-std on the stable toolchain, as the recipe verified.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("PATH", std::env::join_paths(paths)?)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("building ztna-ebpf")?;
    if !status.success() {
        bail!("building ztna-ebpf failed: {status}");
    }
    let built = dir.join("target/bpfel-unknown-none/release/ztna-ebpf");
    let out = root.join("target/ztna-ebpf.o");
    std::fs::create_dir_all(root.join("target"))?;
    // Only replace the object when it changed, so cargo does not rebuild the
    // intermediate for nothing.
    let new = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    if std::fs::read(&out).ok().as_deref() != Some(&new[..]) {
        std::fs::write(&out, &new).with_context(|| format!("writing {}", out.display()))?;
    }
    println!("xtask: eBPF object {}", out.display());
    Ok(out)
}
