//! Network-namespace lab for privileged tests and benchmarks: real hosts made of
//! namespaces and veth pairs, the real ztna binaries run inside them.
//!
//! Relay topology (one-NIC relay, as deployed; addresses exist only inside the
//! namespaces this process creates, and are deleted with them):
//!
//! ```text
//!  agent ns            router ns                       relay ns
//!  a0 10.201.1.2 ── a1 10.201.1.1                      
//!                      r1 10.201.0.254 ────────────── x0 10.201.0.1  (XDP here)
//!  conn ns             c1 10.201.2.1
//!  c0 10.201.2.2 ──────┘
//!  attacker ns         f1 10.201.3.1                   (optional: `add_attacker`)
//!  f0 10.201.3.2 ──────┘
//! ```
//!
//! [`Lab::add_ipv6`] gives every link an IPv6 subnet as well (`fd01:201:<n>::/64`
//! beside `10.201.<n>.0/24`, the router `::fe`/`::1` as in IPv4, hosts `::2`, the
//! relay `fd01:201::1`) with default routes through the router.
//!
//! Relayed packets arrive on x0 and leave on x0 again (XDP_TX), so source = the
//! relay's one address, as the endpoints' NAT mappings expect. XDP_TX into a veth is
//! only delivered if the peer end has GRO on or an XDP program, so r1 gets GRO.
//!
//! [`Lab::relay_topology_queues`] gives every veth N transmit and receive queues
//! (one by default). veth hands a packet to the peer's receive queue of the index of
//! the transmit queue it left by; a receive queue whose device runs an XDP program
//! (x0 in native mode, r1 always) is served by one NAPI instance, i.e. one CPU at a
//! time, so N CPUs sending into one queue are bound by it. The kernel picks a transmit
//! queue by a hash of the flow, but not for forwarded packets here: the router sends
//! them out on the queue recorded when they came in, off by one (queue i + 1 goes
//! out on i, queue 0 by the hash again), so every flow through the router ends up on
//! queue 0 of x0 whatever its ports. The lab therefore maps queues to CPUs with XPS
//! (`xps_cpus`, on every veth end): CPU c transmits on queue c mod N, and N senders
//! busy on N CPUs fill N queues, each drained on its own CPU (XDP_TX on veth picks
//! the peer's queue by CPU the same way).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod flood;
mod inspect;
pub mod multi_relay;
pub mod p2p;
pub mod procstat;
pub mod tunnel;
pub mod xdp_run;

pub const RELAY_IP: &str = "10.201.0.1";
/// The relay's IPv6 address (after [`Lab::add_ipv6`]).
pub const RELAY_IP6: &str = "fd01:201::1";
pub const AGENT_IP6: &str = "fd01:201:1::2";
pub const CONN_IP6: &str = "fd01:201:2::2";
pub const AGENT_IP: &str = "10.201.1.2";
pub const CONN_IP: &str = "10.201.2.2";
pub const RELAY_PORT: u16 = 4433;
/// The attacker host of `Lab::add_attacker` (behind the router, like the agent).
pub const ATTACKER_IP: &str = "10.201.3.2";

/// Static relay sessions by their A address (as text): (relay CID A→B, relay CID B→A).
pub type StaticSessions = HashMap<String, ([u8; 8], [u8; 8])>;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Moves the calling thread into network namespace `ns` (`/run/netns/ns`); other
/// threads stay where they are.
pub fn enter_netns(ns: &str) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns(2) on this thread only, with a namespace fd we hold open.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a new thread inside network namespace `ns`; join it when its result
/// is wanted (several can run at once).
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> std::thread::JoinHandle<anyhow::Result<T>> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns)?;
        f()
    })
}

/// Runs `f` on a thread inside network namespace `ns` and returns its result.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    spawn_in_netns(ns, f)
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// `ztna-intermediate`'s flags for listening on `listen` with the lab's certificates
/// in `certs` (from `Lab::certs` or the tunnel's).
pub fn intermediate_args(certs: &Path, listen: &str) -> Vec<String> {
    let c = |f: &str| certs.join(f).display().to_string();
    vec![
        "--listen".into(),
        listen.into(),
        "--cert".into(),
        c("intermediate.pem"),
        "--key".into(),
        c("intermediate.key"),
        "--ca".into(),
        c("ca.pem"),
    ]
}

/// A connector's or agent's flags: the lab's CA, and the identity
/// `<certs>/<identity>.pem` and `.key`.
pub fn client_tls_args(certs: &Path, identity: &str) -> Vec<String> {
    let c = |f: &str| certs.join(f).display().to_string();
    vec![
        "--ca".into(),
        c("ca.pem"),
        "--cert".into(),
        c(&format!("{identity}.pem")),
        "--key".into(),
        c(&format!("{identity}.key")),
    ]
}

/// Runs a command, failing with its stderr.
pub fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Workspace root (for binaries and the eBPF object).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Directory of the ztna binaries: $ZTNA_BIN_DIR, else target/debug.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("ZTNA_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/debug"))
}

/// Namespaces made by this process; deleted on drop.
pub struct Lab {
    pub prefix: String,
    namespaces: Vec<String>,
    pub dir: PathBuf,
    children: Vec<(String, Child)>,
    /// XDP programs this lab attached ("ns/dev", kept alive with it).
    xdp_handles: Vec<(String, aya::Ebpf)>,
    /// Transmit and receive queues of every veth the lab creates.
    queues: usize,
}

impl Lab {
    fn new(tag: &str) -> anyhow::Result<Self> {
        if !is_root() {
            bail!("needs root (network namespaces)");
        }
        let prefix = format!("zt{}{}", tag, std::process::id() % 100000);
        let dir = std::env::temp_dir().join(format!("{prefix}-lab"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Lab {
            prefix,
            namespaces: Vec::new(),
            dir,
            children: Vec::new(),
            xdp_handles: Vec::new(),
            queues: 1,
        })
    }

    pub fn ns(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    fn add_ns(&mut self, short: &str) -> anyhow::Result<String> {
        let name = self.ns(short);
        let _ = sh("ip", &["netns", "del", &name]);
        sh("ip", &["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        self.exec(&name, "ip", &["link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// Runs a command inside network namespace `ns`. `nsenter --net` switches only
    /// the network namespace (unlike `ip netns exec`, which also remounts /sys), so
    /// every process shares the host's /sys/fs/bpf and its pinned maps.
    pub fn exec(&self, ns: &str, cmd: &str, args: &[&str]) -> anyhow::Result<Output> {
        let net = format!("--net=/run/netns/{ns}");
        let mut all = vec![net.as_str(), cmd];
        all.extend_from_slice(args);
        sh("nsenter", &all)
    }

    /// A `Command` that runs `program` inside `ns` (see `exec`).
    pub fn command(&self, ns: &str, program: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}")).arg(program);
        c
    }

    fn veth(
        &self,
        ns_a: &str,
        a: &str,
        ip_a: &str,
        ns_b: &str,
        b: &str,
        ip_b: &str,
    ) -> anyhow::Result<()> {
        // Created in ns_a, the peer moved to ns_b: names are per-namespace.
        let q = self.queues.to_string();
        let queues: &[&str] = if self.queues > 1 {
            &["numtxqueues", &q, "numrxqueues", &q]
        } else {
            &[]
        };
        let mut args = vec!["link", "add", a];
        args.extend(queues);
        args.extend(["type", "veth", "peer", "name", b]);
        args.extend(queues);
        args.extend(["netns", ns_b]);
        self.exec(ns_a, "ip", &args)?;
        self.exec(ns_a, "ip", &["addr", "add", ip_a, "dev", a])?;
        self.exec(ns_b, "ip", &["addr", "add", ip_b, "dev", b])?;
        self.exec(ns_a, "ip", &["link", "set", a, "up"])?;
        self.exec(ns_b, "ip", &["link", "set", b, "up"])?;
        if self.queues > 1 {
            self.queues_by_cpu(ns_a, a)?;
            self.queues_by_cpu(ns_b, b)?;
        }
        Ok(())
    }

    /// XPS on `dev` in `ns`: CPU c transmits on queue c mod N (see the module docs).
    fn queues_by_cpu(&self, ns: &str, dev: &str) -> anyhow::Result<()> {
        let cpus = procstat::ncpu();
        let mut script = String::new();
        for q in 0..self.queues {
            let mask = cpu_mask((0..cpus).filter(|c| c % self.queues == q));
            script += &format!("echo {mask} > /sys/class/net/{dev}/queues/tx-{q}/xps_cpus\n");
        }
        // `ip netns exec` mounts the namespace's own /sys, where its devices are.
        sh("ip", &["netns", "exec", ns, "sh", "-ec", &script])?;
        Ok(())
    }

    /// The relay topology of the module docs.
    pub fn relay_topology(tag: &str) -> anyhow::Result<Self> {
        Self::relay_topology_queues(tag, 1)
    }

    /// The relay topology with `queues` transmit and receive queues on every veth
    /// (see the module docs).
    pub fn relay_topology_queues(tag: &str, queues: usize) -> anyhow::Result<Self> {
        let mut lab = Lab::new(tag)?;
        lab.queues = queues.max(1);
        let a = lab.add_ns("a")?;
        let c = lab.add_ns("c")?;
        let r = lab.add_ns("r")?;
        let x = lab.add_ns("x")?;
        lab.veth(&a, "a0", "10.201.1.2/24", &r, "a1", "10.201.1.1/24")?;
        lab.veth(&c, "c0", "10.201.2.2/24", &r, "c1", "10.201.2.1/24")?;
        lab.veth(&x, "x0", "10.201.0.1/24", &r, "r1", "10.201.0.254/24")?;
        lab.exec(&r, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        lab.exec(&a, "ip", &["route", "add", "default", "via", "10.201.1.1"])?;
        lab.exec(&c, "ip", &["route", "add", "default", "via", "10.201.2.1"])?;
        lab.exec(
            &x,
            "ip",
            &["route", "add", "default", "via", "10.201.0.254"],
        )?;
        // A frame sent back out of x0 with XDP_TX in native mode is only delivered
        // if r1, the other end of the veth, runs an XDP program.
        lab.attach_pass(&r, "r1")?;
        // veth offloads checksums to a NIC that does not exist; a real network
        // carries full checksums, and XDP_TX'd frames lose the offload state.
        for (ns, dev) in [
            (&a, "a0"),
            (&c, "c0"),
            (&x, "x0"),
            (&r, "a1"),
            (&r, "c1"),
            (&r, "r1"),
        ] {
            lab.exec(ns, "ethtool", &["-K", dev, "tx", "off"])?;
        }
        // Resolve neighbours up front so the first relayed packets find them.
        lab.exec(&x, "ping", &["-c1", "-W1", "10.201.0.254"])?;
        lab.exec(&a, "ping", &["-c1", "-W1", RELAY_IP])?;
        lab.exec(&c, "ping", &["-c1", "-W1", RELAY_IP])?;
        Ok(lab)
    }

    /// IPv6 on the relay topology's links, beside IPv4 (see the module docs):
    /// addresses without duplicate address detection (usable at once), the router
    /// forwarding, default routes through it, neighbours resolved up front.
    pub fn add_ipv6(&mut self) -> anyhow::Result<()> {
        let (a, c, r, x) = (self.ns("a"), self.ns("c"), self.ns("r"), self.ns("x"));
        for (ns, dev, addr) in [
            (&a, "a0", "fd01:201:1::2/64"),
            (&r, "a1", "fd01:201:1::1/64"),
            (&c, "c0", "fd01:201:2::2/64"),
            (&r, "c1", "fd01:201:2::1/64"),
            (&x, "x0", "fd01:201::1/64"),
            (&r, "r1", "fd01:201::fe/64"),
        ] {
            self.exec(ns, "ip", &["-6", "addr", "add", addr, "dev", dev, "nodad"])?;
        }
        self.exec(&r, "sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
        for (ns, via) in [
            (&a, "fd01:201:1::1"),
            (&c, "fd01:201:2::1"),
            (&x, "fd01:201::fe"),
        ] {
            self.exec(ns, "ip", &["-6", "route", "add", "default", "via", via])?;
        }
        self.exec(&x, "ping", &["-6", "-c1", "-W2", "fd01:201::fe"])?;
        self.exec(&a, "ping", &["-6", "-c1", "-W2", RELAY_IP6])?;
        self.exec(&c, "ping", &["-6", "-c1", "-W2", RELAY_IP6])?;
        Ok(())
    }

    /// An attacker host on the relay topology: namespace `f`, f0 10.201.3.2/24 to
    /// the router's f1 10.201.3.1/24, reaching the relay as any client does.
    pub fn add_attacker(&mut self) -> anyhow::Result<String> {
        let (f, r) = (self.add_ns("f")?, self.ns("r"));
        let ip = format!("{ATTACKER_IP}/24");
        self.veth(&f, "f0", &ip, &r, "f1", "10.201.3.1/24")?;
        self.exec(&f, "ip", &["route", "add", "default", "via", "10.201.3.1"])?;
        for (ns, dev) in [(&f, "f0"), (&r, "f1")] {
            self.exec(ns, "ethtool", &["-K", dev, "tx", "off"])?;
        }
        self.exec(&f, "ping", &["-c1", "-W1", RELAY_IP])?;
        Ok(f)
    }

    /// Starts a binary from `bin_dir()` inside `ns`; stderr goes to `<dir>/<name>.log`.
    pub fn spawn(
        &mut self,
        ns: &str,
        name: &str,
        bin: &str,
        args: &[String],
    ) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let child = self
            .command(ns, &bin_dir().join(bin))
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    fn push_child(&mut self, name: &str, child: Child) {
        self.children.push((name.to_string(), child));
    }

    /// Process id of a started process.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Waits until `name`'s log contains `needle`.
    pub fn wait_log(&self, name: &str, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log(name).contains(needle) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The cause is often in another process's log: show the tails of all.
        let others: String = self
            .children
            .iter()
            .filter(|(n, _)| n != name)
            .map(|(n, _)| {
                let log = self.log(n);
                let tail: Vec<&str> = log.lines().rev().take(8).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {n} (last lines):\n{}\n", tail.join("\n"))
            })
            .collect();
        bail!(
            "{name} did not log {needle:?} within {timeout:?}:\n{}\n{others}",
            self.log(name)
        )
    }

    /// Waits for a started process to exit by itself.
    pub fn wait_exit(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .with_context(|| format!("no process {name}"))?;
        loop {
            if let Some(status) = self.children[i].1.try_wait()? {
                self.children.remove(i);
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{name} still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM to a started process and waits for it (see [`terminate`]).
    pub fn stop(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.children.remove(i);
            terminate(&mut child);
        }
    }

    /// Attaches the pass-everything XDP program to `dev` in `ns` in native mode (veth
    /// then serves the device's receive queues in NAPI mode and counts them); it
    /// stays until [`Lab::detach_pass`] or the lab's end.
    pub fn attach_pass(&mut self, ns: &str, dev: &str) -> anyhow::Result<()> {
        let dev_name = dev.to_string();
        let handle = crate::in_netns(ns, move || ztna_userspace::xdp::attach_pass(&dev_name))?;
        self.xdp_handles.push((format!("{ns}/{dev}"), handle));
        Ok(())
    }

    /// Detaches what [`Lab::attach_pass`] attached to `dev` in `ns`.
    pub fn detach_pass(&mut self, ns: &str, dev: &str) {
        let key = format!("{ns}/{dev}");
        self.xdp_handles.retain(|(k, _)| *k != key);
    }

    /// Certificates for the lab (dev CA).
    pub fn certs(&self) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join("certs");
        let out = Command::new(bin_dir().join("ztna"))
            .args(["gen-certs", "--out"])
            .arg(&dir)
            .args(["--service", "echo"])
            .output()?;
        if !out.status.success() {
            bail!("gen-certs: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(dir)
    }

    /// Starts echo service, intermediate (`xdp`: off|generic|native) and connector.
    pub fn start_relay_stack(&mut self, xdp: &str) -> anyhow::Result<PathBuf> {
        self.start_relay_stack_on(xdp, RELAY_IP)
    }

    /// [`Lab::start_relay_stack`] with the intermediate bound to `listen_ip` (e.g.
    /// the wildcard 0.0.0.0) and [`RELAY_PORT`]; clients still use [`RELAY_IP`].
    pub fn start_relay_stack_on(&mut self, xdp: &str, listen_ip: &str) -> anyhow::Result<PathBuf> {
        self.start_relay_stack_at(
            xdp,
            &format!("{listen_ip}:{RELAY_PORT}"),
            &format!("{RELAY_IP}:{RELAY_PORT}"),
        )
    }

    /// [`Lab::start_relay_stack`] with the intermediate listening on `listen` and
    /// the connector reaching it at `server` (socket addresses, IPv6 ones in
    /// brackets).
    pub fn start_relay_stack_at(
        &mut self,
        xdp: &str,
        listen: &str,
        server: &str,
    ) -> anyhow::Result<PathBuf> {
        self.start_relay_stack_with(xdp, listen, server, &[])
    }

    /// [`Lab::start_relay_stack_at`] with `extra` flags for the intermediate.
    pub fn start_relay_stack_with(
        &mut self,
        xdp: &str,
        listen: &str,
        server: &str,
        extra: &[&str],
    ) -> anyhow::Result<PathBuf> {
        let certs = self.certs()?;
        let cn = self.ns("c");
        self.spawn(
            &cn,
            "echo",
            "ztna",
            &[
                "echo-server".into(),
                "--listen".into(),
                format!("{CONN_IP}:9000"),
            ],
        )?;
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        self.start_intermediate(&certs, listen, xdp, &extra)?;
        let mut args = vec!["--server".into(), server.into()];
        args.extend(client_tls_args(&certs, "connector"));
        args.extend([
            "--service".into(),
            format!("echo={CONN_IP}:9000@10.100.0.1"),
        ]);
        self.spawn(&cn, "connector", "ztna-connector", &args)?;
        self.wait_log(
            "connector",
            "registered as connector",
            Duration::from_secs(10),
        )?;
        Ok(certs)
    }

    /// Starts `ztna-intermediate` in the relay namespace, listening on `listen`, with
    /// the lab's certificates, a stats file in the lab directory ([`Lab::relay_stats`])
    /// and `--xdp xdp` (on x0 unless off), plus `extra` arguments; waits until it
    /// listens.
    pub fn start_intermediate(
        &mut self,
        certs: &Path,
        listen: &str,
        xdp: &str,
        extra: &[String],
    ) -> anyhow::Result<()> {
        let stats = self.dir.join("intermediate-stats.json");
        let mut args = intermediate_args(certs, listen);
        args.extend([
            "--stats-file".into(),
            stats.display().to_string(),
            "--xdp".into(),
            xdp.into(),
        ]);
        if xdp != "off" {
            args.extend(["--iface".into(), "x0".into()]);
        }
        args.extend(extra.iter().cloned());
        let x = self.ns("x");
        self.spawn(&x, "intermediate", "ztna-intermediate", &args)?;
        self.wait_log("intermediate", "listening", Duration::from_secs(10))
    }

    /// The intermediate's static sessions (`--static-session A=B`) from its stats
    /// file: A (as text) → (relay CID A→B, relay CID B→A).
    pub fn static_sessions(&self) -> anyhow::Result<StaticSessions> {
        let s = self.fresh_relay_stats()?;
        let hex = |v: &serde_json::Value| -> anyhow::Result<[u8; 8]> {
            let t = v.as_str().unwrap_or("");
            if t.len() != 16 {
                bail!("relay CID {t:?} is not 8 bytes of hex");
            }
            let mut c = [0u8; 8];
            for (i, b) in c.iter_mut().enumerate() {
                *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16)?;
            }
            Ok(c)
        };
        let mut by_a = HashMap::new();
        for v in s["static_sessions"]
            .as_array()
            .context("no static_sessions in the stats file")?
        {
            let a = v["a"].as_str().context("static session without a")?;
            by_a.insert(
                a.to_string(),
                (hex(&v["dcid_a_to_b"])?, hex(&v["dcid_b_to_a"])?),
            );
        }
        Ok(by_a)
    }

    /// The agent's echo inside the agent namespace, not yet started: its JSON
    /// report comes on stdout.
    pub fn agent_echo_command(&self, certs: &Path, extra: &[&str]) -> Command {
        self.agent_echo_command_to(certs, &format!("{RELAY_IP}:{RELAY_PORT}"), extra)
    }

    /// [`Lab::agent_echo_command`] reaching the intermediate at `server`.
    pub fn agent_echo_command_to(&self, certs: &Path, server: &str, extra: &[&str]) -> Command {
        let c = |f: &str| certs.join(f).display().to_string();
        let bin = bin_dir().join("ztna-agent");
        let relay = server.to_string();
        let mut args: Vec<String> = vec![
            "--server".into(),
            relay,
            "--ca".into(),
            c("ca.pem"),
            "--cert".into(),
            c("agent.pem"),
            "--key".into(),
            c("agent.key"),
            "--service".into(),
            "echo".into(),
            "--no-p2p".into(),
            "echo".into(),
            "--dst".into(),
            "10.100.0.1:7".into(),
            "--json".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = self.command(&self.ns("a"), &bin);
        cmd.args(&args).env("NO_COLOR", "1");
        cmd
    }

    /// Runs the agent's echo inside the agent namespace; returns its JSON report.
    pub fn agent_echo(&self, certs: &Path, extra: &[&str]) -> anyhow::Result<serde_json::Value> {
        echo_report(self.agent_echo_command(certs, extra).output()?)
    }

    /// The intermediate's latest counters.
    pub fn relay_stats(&self) -> anyhow::Result<serde_json::Value> {
        let p = self.dir.join("intermediate-stats.json");
        let s = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(serde_json::from_str(&s)?)
    }

    /// Waits for the next stats file write (written every second).
    pub fn fresh_relay_stats(&self) -> anyhow::Result<serde_json::Value> {
        let p = self.dir.join("intermediate-stats.json");
        let before = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let now = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
            if now.is_some() && now != before {
                return self.relay_stats();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("stats file {} not refreshed", p.display())
    }
}

/// A CPU set as the kernel's bitmap text: hex, in comma-separated 32-bit groups
/// (CPUs 0 and 33: `2,00000001`).
fn cpu_mask(cpus: impl Iterator<Item = usize>) -> String {
    let mut words: Vec<u32> = Vec::new();
    for c in cpus {
        if words.len() <= c / 32 {
            words.resize(c / 32 + 1, 0);
        }
        words[c / 32] |= 1 << (c % 32);
    }
    if words.is_empty() {
        return "0".into();
    }
    let mut groups: Vec<String> = words.iter().rev().map(|w| format!("{w:08x}")).collect();
    groups[0] = format!("{:x}", words[words.len() - 1]);
    groups.join(",")
}

/// The JSON report of a finished `ztna-agent echo --json`.
pub fn echo_report(out: Output) -> anyhow::Result<serde_json::Value> {
    if !out.status.success() {
        bail!("agent: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("agent output {}", String::from_utf8_lossy(&out.stdout)))
}

/// A field of /proc/<pid>/status in KiB (`VmRSS`, `VmHWM`, ...).
pub fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// SIGTERM, and a second one after 5 s (an intermediate still draining its relay
/// sessions then stops at once, cleanly: pins removed), SIGKILL 3 s after that.
fn terminate(child: &mut Child) {
    for wait in [Duration::from_secs(5), Duration::from_secs(3)] {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        // nsenter execs the binary, so the pid is the binary's.
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.xdp_handles.clear();
        for (_, c) in self.children.iter_mut().rev() {
            terminate(c);
        }
        for ns in self.namespaces.iter().rev() {
            let _ = sh("ip", &["netns", "del", ns]);
        }
        // The logs and certificates stay for a failed test to be read.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Field `k` of a JSON object as u64 (0 if absent).
pub fn n(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_masks_are_hex_in_32_bit_groups() {
        assert_eq!(super::cpu_mask([0].into_iter()), "1");
        assert_eq!(super::cpu_mask([1, 3].into_iter()), "a");
        assert_eq!(super::cpu_mask([0, 33].into_iter()), "2,00000001");
        assert_eq!(super::cpu_mask([].into_iter()), "0");
    }
}
