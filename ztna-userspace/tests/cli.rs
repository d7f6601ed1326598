//! The daemons' command lines as a user meets them: configuration layers (flag >
//! `ZTNA_*` variable > `--config` file > default) and the one-line errors for bad
//! settings and missing files. Each case runs the real binary and reads its stderr.

use std::path::PathBuf;
use std::process::Command;

fn temp(name: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("ztna-cli-{}-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

/// Runs a binary with args and env; returns (success, stderr).
fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut c = Command::new(bin);
    c.args(args).env("RUST_BACKTRACE", "0").env("NO_COLOR", "1");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ZTNA_")) {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const INTERMEDIATE: &str = env!("CARGO_BIN_EXE_ztna-intermediate");
const CONNECTOR: &str = env!("CARGO_BIN_EXE_ztna-connector");
const AGENT: &str = env!("CARGO_BIN_EXE_ztna-agent");

#[test]
fn a_missing_certificate_is_reported_with_the_os_reason_not_a_tls_code() {
    let (ok, err) = run(
        INTERMEDIATE,
        &[
            "--cert",
            "/nonexistent/server.pem",
            "--key",
            "/nonexistent/server.key",
            "--ca",
            "/nonexistent/ca.pem",
        ],
        &[],
    );
    assert!(!ok);
    assert_eq!(
        err.trim(),
        "Error: certificate chain /nonexistent/server.pem: No such file or directory (os error 2)"
    );
    let dir = std::env::temp_dir();
    let (ok, err) = run(
        CONNECTOR,
        &[
            "--ca",
            dir.to_str().unwrap(),
            "--service",
            "echo=127.0.0.1:7",
            "--mode",
            "userspace",
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains(&format!("CA bundle {}: Is a directory", dir.display())),
        "{err}"
    );
    assert!(!err.contains("TlsFail"), "{err}");
}

#[test]
fn a_bad_value_in_a_config_file_is_one_line_naming_the_file_and_the_key() {
    let f = temp("bad.toml", "listen = \"0.0.0.0:4433\"\nxdp = \"turbo\"\n");
    let (ok, err) = run(INTERMEDIATE, &["--config", f.to_str().unwrap()], &[]);
    assert!(!ok);
    let line = err.trim();
    assert!(!line.contains('\n'), "one line: {err}");
    assert!(
        line.starts_with(&format!(
            "Error: config file {}: key xdp (line 2): unknown variant `turbo`",
            f.display()
        )),
        "{err}"
    );
    let f = temp(
        "unknown.toml",
        "[[service]]\nid = \"db\"\nbackend = \"10.0.0.1:5432\"\nport = 5\n",
    );
    let (ok, err) = run(CONNECTOR, &["--config", f.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(
        err.contains("key service[0]") && err.contains("unknown field `port`"),
        "{err}"
    );
    let (ok, err) = run(AGENT, &["--config", "/nonexistent/agent.toml", "up"], &[]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        "Error: config file /nonexistent/agent.toml: No such file or directory (os error 2)"
    );
}

#[test]
fn flags_beat_the_environment_which_beats_the_file() {
    // Which certificate the intermediate tries to load tells which layer won.
    let f = temp(
        "layers.toml",
        "cert = \"/from-file.pem\"\nkey = \"/k.pem\"\nca = \"/ca.pem\"\n",
    );
    let cfg = f.to_str().unwrap();
    let tried = |args: &[&str], env: &[(&str, &str)]| {
        let (ok, err) = run(INTERMEDIATE, args, env);
        assert!(!ok);
        err.trim()
            .strip_prefix("Error: certificate chain ")
            .and_then(|r| r.split(':').next())
            .unwrap_or_else(|| panic!("{err}"))
            .to_string()
    };
    assert_eq!(tried(&["--config", cfg], &[]), "/from-file.pem");
    assert_eq!(
        tried(&["--config", cfg], &[("ZTNA_CERT", "/from-env.pem")]),
        "/from-env.pem"
    );
    assert_eq!(
        tried(
            &["--config", cfg, "--cert", "/from-flag.pem"],
            &[("ZTNA_CERT", "/from-env.pem")]
        ),
        "/from-flag.pem"
    );
    // The file itself can come from the environment.
    assert_eq!(tried(&[], &[("ZTNA_CONFIG", cfg)]), "/from-file.pem");
}

#[test]
fn forwarder_threads_come_from_the_environment_too_and_are_range_checked() {
    let f = temp(
        "threads.toml",
        "cert = \"/c.pem\"\nkey = \"/k.pem\"\nca = \"/ca.pem\"\nforwarder_threads = 0\n",
    );
    let cfg = f.to_str().unwrap();
    let refused = |err: &str, n: &str| {
        err.trim()
            == format!(
                "Error: the number of forwarder threads must be 1 to 256, not {n} (--forwarder-threads, ZTNA_FORWARDER_THREADS, or `forwarder_threads` in the config file)"
            )
    };
    let (ok, err) = run(INTERMEDIATE, &["--config", cfg], &[]);
    assert!(!ok && refused(&err, "0"), "{err}");
    let (ok, err) = run(
        INTERMEDIATE,
        &["--config", cfg],
        &[("ZTNA_FORWARDER_THREADS", "300")],
    );
    assert!(!ok && refused(&err, "300"), "{err}");
    // A valid count from the environment gets past the settings to the certificate.
    let (ok, err) = run(
        INTERMEDIATE,
        &["--config", cfg],
        &[("ZTNA_FORWARDER_THREADS", "2")],
    );
    assert!(!ok && err.contains("certificate chain /c.pem"), "{err}");
    let (ok, err) = run(
        INTERMEDIATE,
        &["--config", cfg, "--forwarder-threads", "257"],
        &[],
    );
    assert!(!ok && refused(&err, "257"), "{err}");
}
