//! Real traffic through the tunnel: `ztna-agent up` in the agent namespace, the
//! connector in kernel mode beside real servers (an HTTP server with a file to
//! fetch, the UDP echo service, iperf3), in the relay topology of the crate docs.
//!
//! Services, all on the connector host 10.201.2.2:
//!
//! | service | prefix | backend | agent may use it |
//! |---|---|---|---|
//! | echo | 10.100.0.1 | 127.0.0.1:9000 (UDP echo on the connector's loopback) | yes |
//! | web | 10.100.0.2 | 10.201.2.2 (every port: HTTP on 8080, iperf3 on 5201) | yes |
//! | secret | 10.100.0.3 | 10.201.2.2 | no (its certificate does not cover it) |

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{CONN_IP, Lab, RELAY_IP, RELAY_PORT, bin_dir};

pub const ECHO_VIP: &str = "10.100.0.1";
pub const WEB_VIP: &str = "10.100.0.2";
pub const SECRET_VIP: &str = "10.100.0.3";
pub const HTTP_PORT: u16 = 8080;

pub struct TunnelStack {
    pub certs: PathBuf,
    /// The file the HTTP server serves as `/blob`, and its SHA-256.
    pub blob: PathBuf,
    pub sha256: String,
}

/// SHA-256 of a file, as `sha256sum` prints it.
pub fn sha256(path: &Path) -> anyhow::Result<String> {
    let out = crate::sh("sha256sum", &[&path.display().to_string()])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

impl Lab {
    /// Starts a system program (not a ztna binary) inside `ns`, like `spawn`.
    pub fn spawn_program(
        &mut self,
        ns: &str,
        name: &str,
        program: &str,
        args: &[&str],
    ) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let child = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        self.push_child(name, child);
        Ok(())
    }

    /// Certificates for echo, web and secret; the agent's covers echo and web only.
    fn tunnel_certs(&self) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join("certs");
        let out = std::process::Command::new(bin_dir().join("ztna"))
            .args(["gen-certs", "--out"])
            .arg(&dir)
            .args([
                "--service",
                "echo",
                "--service",
                "web",
                "--service",
                "secret",
            ])
            .output()?;
        if !out.status.success() {
            bail!("gen-certs: {}", String::from_utf8_lossy(&out.stderr));
        }
        let (cert, key) = ztna_userspace::identity::issue_leaf(
            &dir.join("ca.pem"),
            &dir.join("ca.key"),
            &dir,
            "agent-echo-web",
            &["agent.echo.ztna".into(), "agent.web.ztna".into()],
        )?;
        std::fs::rename(cert, dir.join("agent.pem"))?;
        std::fs::rename(key, dir.join("agent.key"))?;
        Ok(dir)
    }

    /// The tunnel's certificates and servers on the connector host (HTTP with a
    /// `blob_mib` MiB file, iperf3, the UDP echo service), waiting until HTTP
    /// answers.
    pub fn start_tunnel_services(&mut self, blob_mib: usize) -> anyhow::Result<TunnelStack> {
        let certs = self.tunnel_certs()?;
        let www = self.dir.join("www");
        std::fs::create_dir_all(&www)?;
        let blob = www.join("blob");
        // Incompressible, reproducible content.
        let mut data = vec![0u8; blob_mib << 20];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        std::fs::write(&blob, &data)?;
        let sha256 = sha256(&blob)?;
        let cn = self.ns("c");
        let www_s = www.display().to_string();
        self.spawn_program(
            &cn,
            "http",
            "python3",
            &[
                "-m",
                "http.server",
                "8080",
                "--bind",
                CONN_IP,
                "--directory",
                &www_s,
            ],
        )?;
        self.spawn_program(&cn, "iperf3", "iperf3", &["-s", "-B", CONN_IP])?;
        self.spawn(
            &cn,
            "echo",
            "ztna",
            &[
                "echo-server".into(),
                "--listen".into(),
                "127.0.0.1:9000".into(),
            ],
        )?;
        // The HTTP server answers before anything goes through the tunnel.
        let deadline = Instant::now() + Duration::from_secs(10);
        let url = format!("http://{CONN_IP}:{HTTP_PORT}/");
        while self
            .exec(
                &cn,
                "curl",
                &["-sS", "-o", "/dev/null", "--max-time", "1", &url],
            )
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("HTTP server not up:\n{}", self.log("http"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(TunnelStack {
            certs,
            blob,
            sha256,
        })
    }

    /// The services of the module docs: HTTP server with a `blob_mib` MiB file,
    /// UDP echo, iperf3 server, the intermediate (`xdp`: off|generic|native) and
    /// the connector in `connector_mode` (`kernel`, `userspace`, or `unprivileged`:
    /// `auto` as user nobody without capabilities).
    pub fn start_tunnel_stack(
        &mut self,
        xdp: &str,
        connector_mode: &str,
        blob_mib: usize,
    ) -> anyhow::Result<TunnelStack> {
        let stack = self.start_tunnel_services(blob_mib)?;
        let certs = stack.certs.clone();
        let c = |f: &str| certs.join(f).display().to_string();
        let cn = self.ns("c");
        self.start_intermediate(&certs, &format!("{RELAY_IP}:{RELAY_PORT}"), xdp, &[])?;
        let mut args = vec!["--server".to_string(), format!("{RELAY_IP}:{RELAY_PORT}")];
        args.extend(crate::client_tls_args(&certs, "connector"));
        args.extend(
            [
                "--mode",
                connector_mode,
                "--service",
                &format!("echo=127.0.0.1:9000@{ECHO_VIP}"),
                "--service",
                &format!("web={CONN_IP}@{WEB_VIP}"),
                "--service",
                &format!("secret={CONN_IP}@{SECRET_VIP}"),
            ]
            .map(String::from),
        );
        if connector_mode == "unprivileged" {
            // As nobody, with no capabilities: `--mode auto` must pick the
            // userspace mode by itself. The lab's key files are root's.
            for f in ["ca.pem", "connector.pem", "connector.key"] {
                crate::sh("chmod", &["0644", &c(f)])?;
            }
            let bin = bin_dir().join("ztna-connector").display().to_string();
            let mut all: Vec<&str> = vec![
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                &bin,
            ];
            let args: Vec<String> = args
                .iter()
                .map(|a| {
                    if a == "unprivileged" {
                        "auto".to_string()
                    } else {
                        a.clone()
                    }
                })
                .collect();
            all.extend(args.iter().map(String::as_str));
            self.spawn_program(&cn, "connector", "setpriv", &all)?;
        } else {
            self.spawn(&cn, "connector", "ztna-connector", &args)?;
        }
        for svc in ["echo", "web", "secret"] {
            self.wait_log(
                "connector",
                &format!("registered as connector for {svc:?}"),
                Duration::from_secs(10),
            )
            .or_else(|_| {
                self.wait_log(
                    "intermediate",
                    &format!("registered as connector for {svc:?}"),
                    Duration::from_secs(1),
                )
            })?;
        }
        Ok(stack)
    }

    /// `ztna-agent up` in the agent namespace for echo, web and `extra_services`,
    /// with `flags` (e.g. `--no-p2p`); waits until the web route is installed.
    pub fn start_agent_up(
        &mut self,
        certs: &Path,
        flags: &[&str],
        extra_services: &[&str],
    ) -> anyhow::Result<()> {
        let mut args: Vec<String> = vec!["--server".into(), format!("{RELAY_IP}:{RELAY_PORT}")];
        for s in extra_services {
            args.extend(["--service".into(), s.to_string()]);
        }
        args.extend(flags.iter().map(|s| s.to_string()));
        let (a, socket) = (self.ns("a"), self.status_socket());
        self.start_agent_up_as("agent", &a, certs, "agent", &args, &socket)
    }

    /// `ztna-agent up` as process `name` in `ns` for echo and web, with identity
    /// `<certs>/<identity>.pem` and `.key`, `args` (servers, more services, flags)
    /// and its status on `socket`; waits until the web route is installed.
    pub fn start_agent_up_as(
        &mut self,
        name: &str,
        ns: &str,
        certs: &Path,
        identity: &str,
        args_in: &[String],
        socket: &Path,
    ) -> anyhow::Result<()> {
        let mut args = crate::client_tls_args(certs, identity);
        args.extend(["--service", "echo", "--service", "web"].map(String::from));
        args.extend(args_in.iter().cloned());
        args.extend([
            "up".into(),
            "--status-socket".into(),
            socket.display().to_string(),
        ]);
        self.spawn(ns, name, "ztna-agent", &args)?;
        self.wait_log(
            name,
            &format!("route {WEB_VIP}/32 via ztna0"),
            Duration::from_secs(15),
        )
    }

    pub fn status_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// The running agent's status (`ztna-agent status --json`).
    pub fn agent_status(&self) -> anyhow::Result<serde_json::Value> {
        ztna_userspace::tun_agent::read_status(&self.status_socket())
    }

    /// Waits until the agent's status satisfies `cond` (the snapshot is refreshed
    /// twice a second); returns the last status either way.
    pub fn wait_agent_status(
        &self,
        within: Duration,
        cond: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let s = self.agent_status().unwrap_or_default();
            if cond(&s) || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The path of `service` in the agent's status.
    pub fn agent_path(&self, service: &str) -> Option<String> {
        let s = self.agent_status().ok()?;
        s["services"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == service)?["path"]
            .as_str()
            .map(String::from)
    }

    /// Waits until `service` runs over `path`.
    pub fn wait_agent_path(
        &self,
        service: &str,
        path: &str,
        within: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let now = self.agent_path(service);
            if now.as_deref() == Some(path) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{service} not on {path} within {within:?} (now {now:?}); agent log:\n{}",
                    self.log("agent")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until something accepts TCP connections at `addr`, seen from `ns`.
    pub fn wait_tcp(&self, ns: &str, addr: std::net::SocketAddr) -> anyhow::Result<()> {
        crate::in_netns(ns, move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!("nothing accepts TCP at {addr}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    }

    /// Asserts that a TCP connection to a port of the web service nobody listens on
    /// fails at once with "connection refused" (an RST, not a timeout).
    pub fn assert_refused_promptly(&self) {
        let start = Instant::now();
        let url = format!("http://{WEB_VIP}:8081/");
        let err = self
            .exec(&self.ns("a"), "curl", &["-sS", "--max-time", "10", &url])
            .expect_err("nothing listens on 8081");
        let e = err.to_string();
        assert!(
            e.contains("Connection refused") || e.contains("Couldn't connect"),
            "{e}"
        );
        assert!(start.elapsed() < Duration::from_secs(3), "refused promptly");
    }

    /// Fetches `url` with curl in the agent namespace into a file; returns its
    /// SHA-256 and how long it took. `extra` goes to curl (e.g. `--limit-rate`).
    pub fn fetch(&self, url: &str, extra: &[&str]) -> anyhow::Result<(String, Duration)> {
        let out = self.dir.join("fetched");
        let _ = std::fs::remove_file(&out);
        let out_s = out.display().to_string();
        let mut args = vec!["-sS", "--fail", "--max-time", "300", "-o", &out_s];
        args.extend_from_slice(extra);
        args.push(url);
        let start = Instant::now();
        self.exec(&self.ns("a"), "curl", &args)
            .with_context(|| format!("curl {url}; agent log:\n{}", self.log("agent")))?;
        Ok((sha256(&out)?, start.elapsed()))
    }
}
