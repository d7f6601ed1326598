//! `cargo xtask`: build, test and demo orchestration for ztna.
//!
//! - `demo`: throwaway CA, intermediate, UDP echo service, connector and agent on
//!   loopback (release build); real traffic; as root also an HTTP download through
//!   `ztna-agent up` and a kernel-mode connector in network namespaces; prints a
//!   report; exits 0 only if every echo came back and the file arrived intact.
//! - `test`: the README's test command: every workspace test, the deployment's
//!   checks (`deploy`: manifests, images, their run under `podman kube play`), then
//!   the demo.
//! - `images`: the container images of `deploy/docker` (`deploy::images`).
//!
//! Both first install what a fresh machine lacks (`prereqs`, `ebpf`).

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

mod bench;
mod deploy;
mod ebpf;
mod fuzz;
mod prereqs;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "ztna build, test and demo tasks")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the end-to-end demo on loopback and print a report.
    Demo {
        /// Echo packets to send.
        #[arg(long, default_value_t = 200)]
        count: u32,
        /// UDP payload size ("max" for the largest that fits).
        #[arg(long, default_value = "512")]
        size: String,
        /// Use the debug build (quicker to build, slower to run).
        #[arg(long)]
        debug: bool,
    },
    /// Build the XDP program (installs rust-src and bpf-linker if missing) into
    /// target/ztna-ebpf.o, which the intermediate embeds.
    BuildEbpf,
    /// Run every test (the README's test command; CI runs this).
    Test,
    /// Build the container images of deploy/docker with podman (root), in storage
    /// private to target/deploy/podman; --out writes each as a docker-archive.
    Images {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The deploy checks of `test` alone (root): manifests, images, and the images
    /// run with podman kube play (ztna-netlab/tests/kube_play.rs).
    Deploy,
    /// Run every fuzz target (cargo-fuzz, nightly) for --secs seconds each.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
    /// Benchmarks (root): `relay` drives the same load through XDP native, XDP
    /// generic, the userspace forwarder and the datagram relay (JSON to --out, an
    /// SVG next to it, a table on stdout); `tunnel` measures TCP/UDP through the
    /// tunnel on each path against no tunnel and boringtun; `flood` floods the relay
    /// port with junk for 30 s while an agent echoes through it (RSS, RTT with and
    /// without the flood, counters per attack kind).
    Bench {
        /// What to benchmark: `relay`, `tunnel` or `flood`.
        what: String,
        #[arg(long)]
        out: PathBuf,
        /// Further arguments for the benchmark program, after `--` (relay:
        /// `--senders N`, `--scaling 1,2,4,...`, `--only STEP,...`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// NAT traversal matrix in network namespaces (root): every pair of
    /// {no NAT, cone-like, symmetric-like}; JSON to --out, a table on stdout.
    NatMatrix {
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::Demo { count, size, debug } => {
            prereqs::ensure()?;
            let profile = if debug {
                Profile::Debug
            } else {
                Profile::Release
            };
            demo(count, &size, profile)
        }
        Cmd::Test => test(),
        Cmd::Images { out } => {
            if !is_root() {
                bail!("images needs root (podman with its own storage, mmdebstrap)");
            }
            prereqs::ensure()?;
            deploy::images(&root(), out.as_deref())
        }
        Cmd::Deploy => deploy_checks(),
        Cmd::BuildEbpf => ebpf::build_ebpf(&root()).map(|_| ()),
        Cmd::Fuzz { secs } => fuzz::run(&root(), secs).map(|_| ()),
        Cmd::NatMatrix { out } => nat_matrix(&out),
        Cmd::Bench { what, out, args } => bench::bench(&what, &out, &args),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Crates whose tests need root (network namespaces, BPF). Their tests are
/// `#[ignore]`d in a plain `cargo test` and run here with `--ignored` when root.
const PRIVILEGED_CRATES: &[&str] = &["ztna-netlab", "ztna-xdp-tests"];

#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Runs `cargo test ARGS` with `env` added, streaming its output, and adds up its
/// result lines.
fn cargo_test(args: &[&str], env: &[(String, PathBuf)], tally: &mut Tally) -> anyhow::Result<bool> {
    let mut child = cargo()
        .arg("test")
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |key: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim().strip_suffix(key).map(|n| {
                            n.trim()
                                .trim_start_matches("ok. ")
                                .trim_start_matches("FAILED. ")
                                .trim()
                                .to_string()
                        })
                    })
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            };
            tally.passed += num(" passed");
            tally.failed += num(" failed");
            tally.ignored += num(" ignored");
        }
    }
    Ok(child.wait()?.success())
}

fn nat_matrix(out: &Path) -> anyhow::Result<()> {
    if !is_root() {
        bail!("nat-matrix needs root (network namespaces, iptables)");
    }
    run(cargo().args([
        "build",
        "-p",
        "ztna-userspace",
        "-p",
        "ztna-netlab",
        "--bins",
    ]))?;
    let out = std::path::absolute(out)?;
    run(Command::new(root().join("target/debug/nat-matrix"))
        .arg("--out")
        .arg(&out))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn deploy_checks() -> anyhow::Result<()> {
    if !is_root() {
        bail!("deploy needs root (podman with its own storage, mmdebstrap, namespaces)");
    }
    prereqs::ensure()?;
    prereqs::ensure_deploy_tools()?;
    ebpf::build_ebpf(&root())?;
    let mut checks = deploy::Checks::default();
    let rendered = deploy::check_manifests(&root(), &mut checks);
    let podman = deploy::check_images(&root(), &mut checks, false);
    let mut tally = Tally::default();
    let mut ok = checks.failed == 0;
    if let (Some(podman), Some(rendered)) = (podman, rendered) {
        let started = Instant::now();
        ok &= cargo_test(
            &[
                "-p",
                "ztna-netlab",
                "--test",
                "kube_play",
                "--",
                "--ignored",
            ],
            &[
                deploy::kube_play_env(&podman, &rendered),
                // The lab's agent and cert tool: the release builds the images took.
                vec![("ZTNA_BIN_DIR".into(), root().join("target/release"))],
            ]
            .concat(),
            &mut tally,
        )?;
        println!(
            "deploy: kube play test {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    let passed = checks.passed + tally.passed;
    let failed = checks.failed + tally.failed;
    println!(
        "\nxtask: {passed} passed, {failed} failed, {} skipped",
        checks.skipped
    );
    if !ok || failed > 0 {
        bail!("deploy checks failed");
    }
    Ok(())
}

fn test() -> anyhow::Result<()> {
    prereqs::ensure()?;
    ebpf::build_ebpf(&root())?;
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    let mut plain = Tally::default();
    let mut ok = cargo_test(
        &[
            "--workspace",
            "--no-fail-fast",
            "--lib",
            "--bins",
            "--tests",
        ],
        &[],
        &mut plain,
    )?;
    println!("\n== deploy: Kubernetes manifests, container images ==");
    let mut deploy = deploy::Checks::default();
    let mut kube_play_env = Vec::new();
    if is_root() {
        if let Err(e) = prereqs::ensure_deploy_tools() {
            eprintln!("xtask: deploy tools: {e:#}");
        }
        let rendered = deploy::check_manifests(&root(), &mut deploy);
        if let (Some(podman), Some(rendered)) =
            (deploy::check_images(&root(), &mut deploy, false), rendered)
        {
            kube_play_env = deploy::kube_play_env(&podman, &rendered);
        }
    } else {
        deploy::check_manifests(&root(), &mut deploy);
        println!("deploy: images ... SKIPPED: podman and mmdebstrap need root");
        deploy.skipped += 1;
    }
    let mut privileged = Tally::default();
    let skipped;
    if is_root() {
        println!("\n== privileged tests (root): network namespaces, XDP, BPF maps ==");
        let mut args = vec!["--no-fail-fast"];
        for c in PRIVILEGED_CRATES {
            args.extend(["-p", c]);
        }
        args.extend(["--", "--ignored", "--test-threads=1"]);
        ok &= cargo_test(&args, &kube_play_env, &mut privileged)?;
        skipped = deploy.skipped;
    } else {
        skipped = plain.ignored + deploy.skipped;
        println!(
            "\nSKIPPED: {} privileged tests (not root; CI runs them as root)",
            plain.ignored
        );
    }
    println!("\n== fuzz targets, briefly (cargo xtask fuzz runs them longer) ==");
    let fuzz_ok = match fuzz::run(&root(), 5) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("fuzzing failed: {e:#}");
            false
        }
    };
    println!("\n== demo (smoke test of the real binaries) ==");
    let demo_ok = match demo(50, "max", Profile::Debug) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            false
        }
    };
    let passed =
        plain.passed + privileged.passed + deploy.passed + u64::from(demo_ok) + u64::from(fuzz_ok);
    let failed = plain.failed
        + privileged.failed
        + deploy.failed
        + u64::from(!demo_ok)
        + u64::from(!fuzz_ok);
    println!("\nxtask: {passed} passed, {failed} failed, {skipped} skipped");
    if !ok || !demo_ok || !fuzz_ok || failed > 0 {
        bail!("tests failed");
    }
    Ok(())
}

/// A child process that is stopped when dropped: SIGTERM, a second SIGTERM after 5 s
/// (which ends an intermediate's drain at once), SIGKILL 3 s after that.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn terminate(&mut self) {
        for wait in [Duration::from_secs(5), Duration::from_secs(3)] {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        eprintln!("{} did not stop on SIGTERM; killing", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate();
    }
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts a binary with stderr piped; lines are forwarded to `tx` tagged by name.
fn spawn(
    bin: &Path,
    name: &'static str,
    args: &[String],
    tx: &mpsc::Sender<(&'static str, String)>,
) -> anyhow::Result<Proc> {
    let mut child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stderr = child.stderr.take().expect("piped");
    let tx = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send((name, line));
        }
    });
    Ok(Proc { name, child })
}

fn wait_for(
    rx: &mpsc::Receiver<(&'static str, String)>,
    who: &str,
    needle: &str,
    log: &mut Vec<String>,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok((name, line)) => {
                let hit = name == who && line.contains(needle);
                log.push(format!("[{name}] {line}"));
                if hit {
                    return Ok(line);
                }
            }
            Err(_) => break,
        }
    }
    bail!(
        "{who} did not log {needle:?} within 15 s; log:\n{}",
        log.join("\n")
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Profile {
    Debug,
    /// What users run: the demo's figures represent the product.
    Release,
}

fn demo(count: u32, size: &str, profile: Profile) -> anyhow::Result<()> {
    if is_root() {
        // The tunnel part relays through XDP when the program is there.
        ebpf::build_ebpf(&root())?;
    }
    let mut build = cargo();
    build.args(["build", "--quiet", "-p", "ztna-userspace", "--bins"]);
    if is_root() {
        build.args(["-p", "ztna-netlab", "--bin", "tunnel-demo"]);
    }
    if profile == Profile::Release {
        build.arg("--release");
    }
    println!(
        "xtask: building the {} binaries",
        if profile == Profile::Release {
            "release"
        } else {
            "debug"
        }
    );
    run(&mut build)?;
    let bin = root().join(match profile {
        Profile::Debug => "target/debug",
        Profile::Release => "target/release",
    });
    let dir = std::env::temp_dir().join(format!("ztna-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = demo_in(&bin, &dir, count, size);
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    println!(
        "\n  HTTP through the tunnel: ztna-agent up (TUN) -> relay -> connector (kernel mode, NAT) -> HTTP server, in network namespaces"
    );
    if !is_root() {
        println!("    skipped: creating TUN devices and namespaces needs root");
        println!("demo OK");
        return Ok(());
    }
    let status = Command::new(bin.join("tunnel-demo"))
        .arg("native")
        .env("ZTNA_BIN_DIR", &bin)
        .env("NO_COLOR", "1")
        .status()
        .context("running tunnel-demo")?;
    if !status.success() {
        bail!("demo FAILED: the HTTP download through the tunnel");
    }
    println!("demo OK");
    Ok(())
}

fn demo_in(bin: &Path, dir: &Path, count: u32, size: &str) -> anyhow::Result<()> {
    let certs = dir.join("certs");
    let out = Command::new(bin.join("ztna"))
        .args(["gen-certs", "--out"])
        .arg(&certs)
        .args(["--service", "echo"])
        .output()
        .context("running ztna gen-certs")?;
    if !out.status.success() {
        bail!("gen-certs failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let c = |f: &str| certs.join(f).display().to_string();
    let relay_port = free_udp_port()?;
    let echo_port = free_udp_port()?;
    let relay = format!("127.0.0.1:{relay_port}");
    let (tx, rx) = mpsc::channel();
    let mut log = Vec::new();

    println!("ztna demo: certificates in {}", certs.display());
    let mut procs = Vec::new();
    procs.push(spawn(
        &bin.join("ztna"),
        "echo",
        &[
            "echo-server".into(),
            "--listen".into(),
            format!("127.0.0.1:{echo_port}"),
        ],
        &tx,
    )?);
    wait_for(&rx, "echo", "echo service on", &mut log)?;
    procs.push(spawn(
        &bin.join("ztna-intermediate"),
        "intermediate",
        &[
            "--listen".into(),
            relay.clone(),
            "--cert".into(),
            c("intermediate.pem"),
            "--key".into(),
            c("intermediate.key"),
            "--ca".into(),
            c("ca.pem"),
            // Any free port: the demo must not depend on 9090 being free.
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ],
        &tx,
    )?);
    wait_for(&rx, "intermediate", "listening", &mut log)?;
    let metrics_line = wait_for(&rx, "intermediate", "metrics and health on", &mut log)?;
    let metrics_url = metrics_line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .map(|u| u.trim_end_matches(','))
        .context("metrics URL in the intermediate's log")?
        .to_string();
    procs.push(spawn(
        &bin.join("ztna-connector"),
        "connector",
        &[
            "--server".into(),
            relay.clone(),
            "--ca".into(),
            c("ca.pem"),
            "--cert".into(),
            c("connector.pem"),
            "--key".into(),
            c("connector.key"),
            "--service".into(),
            format!("echo=127.0.0.1:{echo_port}@10.100.0.1"),
            // On the host's own network: no TUN device, no NAT table here.
            "--mode".into(),
            "userspace".into(),
            "--metrics-listen".into(),
            "off".into(),
        ],
        &tx,
    )?);
    wait_for(&rx, "connector", "registered as connector", &mut log)?;
    println!(
        "ztna demo: intermediate {relay}, connector registered service echo -> 127.0.0.1:{echo_port} as 10.100.0.1"
    );

    // Three runs of the same agent: the original datagram relay, the end-to-end QUIC
    // data connection through the forwarded relay, and the direct path after hole
    // punching (on loopback the "NAT" is trivially open).
    let runs: [(&str, &[&str]); 3] = [
        (
            "datagram relay (intermediate decrypts)",
            &["--datagram-only"],
        ),
        ("forwarded relay (end-to-end QUIC)", &["--no-p2p"]),
        ("direct path (hole punched)", &["--direct-wait-ms", "5000"]),
    ];
    let mut reports = Vec::new();
    for (name, flags) in runs {
        let out = Command::new(bin.join("ztna-agent"))
            .args([
                "--server",
                &relay,
                "--ca",
                &c("ca.pem"),
                "--cert",
                &c("agent.pem"),
                "--key",
                &c("agent.key"),
                "--service",
                "echo",
            ])
            .args(flags)
            .args([
                "echo",
                "--dst",
                "10.100.0.1:7",
                "--size",
                size,
                "--count",
                &count.to_string(),
                "--burst",
                "10",
                "--json",
            ])
            .env("NO_COLOR", "1")
            .output()
            .context("running ztna-agent")?;
        if !out.status.success() {
            bail!(
                "agent failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                log.join("\n")
            );
        }
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("agent report: {}", String::from_utf8_lossy(&out.stdout)))?;
        reports.push((name, report));
    }
    // The gauges are refreshed every 250 ms; the counters are exact.
    std::thread::sleep(Duration::from_millis(300));
    let metrics = ureq::get(&metrics_url)
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .with_context(|| format!("scraping {metrics_url}"))?;
    for p in procs.iter_mut().rev() {
        p.terminate();
    }
    println!(
        "\nztna demo report (agent -> intermediate -> connector -> echo service and back, QUIC on loopback)"
    );
    let mut all_ok = true;
    for (name, report) in &reports {
        let n = |k: &str| report[k].as_u64().unwrap_or(0);
        let ms = |k: &str| {
            report[k]
                .as_f64()
                .map_or("-".into(), |v| format!("{:.3} ms", v / 1000.0))
        };
        let f = |k: &str| {
            report[k]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.3} ms"))
        };
        println!("\n  {name}");
        let history: Vec<String> = report["path_timeline"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| format!("{} at {} ms", c["path"].as_str().unwrap_or("?"), c["at_ms"]))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "    path              {} ({})",
            report["path"].as_str().unwrap_or("-"),
            history.join(" -> ")
        );
        println!(
            "    handshake         {} control, {} data connection",
            f("handshake_ms"),
            f("data_handshake_ms")
        );
        println!(
            "    max DATAGRAM      {} B (UDP payload in tunnel up to {} B)",
            n("max_datagram"),
            n("max_udp_payload")
        );
        println!(
            "    payload           {} B x {}",
            n("payload_size"),
            n("sent")
        );
        println!(
            "    RTT p50 / p99     {} / {}",
            ms("rtt_p50_us"),
            ms("rtt_p99_us")
        );
        println!(
            "    sent {} / echoed byte-exact {} / corrupted {} / lost {}",
            n("sent"),
            n("echoed_exact"),
            n("corrupted"),
            n("lost")
        );
        all_ok &= n("sent") > 0 && n("echoed_exact") == n("sent") && n("corrupted") == 0;
    }
    println!("\n  the intermediate's {metrics_url} (excerpt)");
    for line in metrics.lines().filter(|l| {
        l.starts_with("ztna_forwarded_packets_total")
            || l.starts_with("ztna_connections")
            || l.starts_with("ztna_handshake_duration_seconds_count")
            || l.starts_with("ztna_registrations_total")
            || l.starts_with("ztna_relay_sessions")
            || l.starts_with("ztna_intermediate_connections_")
    }) {
        println!("    {line}");
    }
    let forwarded = |path: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("ztna_forwarded_packets_total{{path=\"{path}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // The datagram run went through the datagram relay, the forwarded-relay run
    // through the userspace forwarder (no XDP on loopback here).
    all_ok &= forwarded("datagram") > 0 && forwarded("userspace") > 0;
    if !all_ok {
        bail!("demo FAILED: not every echo came back byte-exact (or the metrics disagree)");
    }
    Ok(())
}
