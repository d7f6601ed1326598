//! Compiles `tests/c/harness.c` with the system C compiler against the static
//! library and runs it — under valgrind when it is installed (`cargo xtask test`
//! installs it) — against a real intermediate and connector on loopback. The
//! harness registers, sends UDP to the echo service and a TCP SYN to the web
//! service and checks the replies byte for byte; valgrind must report no leak and
//! no invalid access.
#![cfg(target_os = "linux")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// `target/<profile>/deps/libztna_agent_ffi.a`, built with the test (the library's
/// crate types include staticlib); the test binary lives in the same directory.
fn static_lib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps, deps.parent().unwrap()] {
        let p = dir.join("libztna_agent_ffi.a");
        if p.exists() {
            return p;
        }
    }
    panic!("libztna_agent_ffi.a not found next to {}", exe.display());
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn compile(out: &Path) {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let o = Command::new(&cc)
        .args([
            "-std=c11",
            "-D_POSIX_C_SOURCE=200809L",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-g",
        ])
        .arg("-I")
        .arg(crate_dir.join("include"))
        .arg(crate_dir.join("tests/c/harness.c"))
        .arg(static_lib())
        // BoringSSL (inside quiche) is C++; the Rust standard library wants the rest.
        .args(["-lstdc++", "-lpthread", "-ldl", "-lm", "-o"])
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("running {cc}: {e}"));
    assert!(
        o.status.success(),
        "compiling the C harness failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn c_harness_against_static_library() {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ztna-agent-c-harness");
    compile(&out);
    let env = common::start("c-harness");
    let valgrind = have("valgrind") && std::env::var_os("ZTNA_NO_VALGRIND").is_none();
    let mut cmd = if valgrind {
        let mut c = Command::new("valgrind");
        c.args([
            "--error-exitcode=99",
            "--leak-check=full",
            "--show-leak-kinds=definite,indirect,possible",
            "--errors-for-leak-kinds=definite,indirect,possible",
            // Deep enough for the suppression to see the lazy_static frame.
            "--num-callers=64",
        ])
        .arg(format!(
            "--suppressions={}",
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/c/valgrind.supp")
                .display()
        ))
        .arg(&out);
        c
    } else {
        eprintln!("valgrind not installed: running the C harness without it");
        Command::new(&out)
    };
    let o = cmd
        .arg(env.intermediate.port().to_string())
        .arg(&env.pki.ca_cert)
        .arg(&env.pki.agent_cert)
        .arg(&env.pki.agent_key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && stdout.contains(" 0 failed"),
        "C harness failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        o.status
    );
    let passed: u32 = stdout
        .split("c harness: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(passed >= 15, "only {passed} checks ran:\n{stdout}");
    if valgrind {
        for l in stderr.lines().filter(|l| {
            l.contains("lost:") || l.contains("suppressed:") || l.contains("ERROR SUMMARY")
        }) {
            eprintln!("{l}");
        }
        assert!(
            stderr.contains("ERROR SUMMARY: 0 errors"),
            "valgrind found errors:\n{stderr}"
        );
        assert!(
            stderr.contains("definitely lost: 0 bytes")
                || stderr.contains("All heap blocks were freed"),
            "valgrind found leaks:\n{stderr}"
        );
    }
}
