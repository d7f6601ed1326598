//! Embeds the XDP object built by `cargo xtask build-ebpf` (target/ztna-ebpf.o, or
//! $ZTNA_EBPF_OBJ). Without it the intermediate builds with an empty object and runs
//! with the userspace forwarder only.
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("ztna-ebpf.o");
    let src = std::env::var("ZTNA_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap())
                .join("../target/ztna-ebpf.o")
        });
    println!("cargo:rerun-if-env-changed=ZTNA_EBPF_OBJ");
    println!("cargo:rerun-if-changed={}", src.display());
    match std::fs::read(&src) {
        Ok(bytes) => std::fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=no eBPF object at {} (run `cargo xtask build-ebpf`); XDP disabled in this build",
                src.display()
            );
            std::fs::write(&out, []).unwrap();
        }
    }
}
