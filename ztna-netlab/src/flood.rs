//! The flood scenario of `tests/flood.rs` and `flood-bench`: on the relay topology
//! with an attacker host (`Lab::add_attacker`), a legitimate agent runs its echo
//! through the forwarded relay while `ztna-flood` sends junk at the relay port from
//! the attacker: unknown CIDs, tiny Initials, packets to the echo's own relay CID
//! and real handshake Initials. The live relay CID is taken off the wire at the
//! router, as any on-path observer could (DCIDs travel in the clear).
//!
//! The outcome holds what the checks and the record need: both echo reports, the
//! flood's own summary, the intermediate's counters and RSS before and after, and
//! the relay host's kernel UDP receive-buffer drops.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use ztna_common::relay::{RELAY_CID_LEN, is_relay_cid};

use crate::{AGENT_IP, Lab, RELAY_IP, RELAY_PORT, bin_dir, echo_report, n, proc_status_kib};

/// The legitimate echo: bursts of 4 packets of 1000 bytes, 20 ms apart (about 180
/// packets a second, a few interactive flows' worth).
pub const ECHO_BURST: u32 = 4;
pub const ECHO_INTERVAL_MS: u64 = 20;
pub const ECHO_SIZE: u32 = 1000;

/// Packets per second of each kind (`ztna-flood`'s defaults, about 6300 in all):
/// each kind well over what the intermediate rate-limits (500 resets a second), yet
/// few enough that a 2-core machine running everything still has CPU for the echo.
pub const FLOOD_RATES: [(&str, u64); 4] = [
    ("unknown_cid", 2000),
    ("tiny_initial", 2000),
    ("relay_cid_spoof", 2000),
    ("handshake", 300),
];

pub struct Plan {
    /// The intermediate's `--xdp`: "native", "generic" or "off".
    pub xdp: &'static str,
    pub flood: Duration,
    /// How long the flooded echo is planned to run (it starts just before the flood).
    pub echo: Duration,
    /// Also run the same echo before, without the flood (the benchmark's baseline).
    pub baseline: bool,
}

pub struct Outcome {
    pub xdp: String,
    pub baseline: Option<Value>,
    pub echo: Value,
    /// `ztna-flood`'s summary.
    pub flood: Value,
    /// The echo was still running when the flood ended.
    pub echo_outlived_flood: bool,
    pub relay_cid: String,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// Peak RSS of the intermediate's whole life, read after the flood.
    pub rss_peak_kib: u64,
    pub stats_before: Value,
    pub stats_after: Value,
    /// Upper bound of the time between the two stats snapshots.
    pub stats_interval: Duration,
    /// Datagrams the relay host's kernel dropped for a full socket receive buffer.
    pub rcvbuf_errors: u64,
}

impl Outcome {
    /// Growth of an intermediate counter over the flood.
    pub fn delta(&self, counter: &str) -> u64 {
        n(&self.stats_after, counter).saturating_sub(n(&self.stats_before, counter))
    }

    /// Growth of an XDP verdict counter over the flood (0 without XDP).
    pub fn xdp_delta(&self, verdict: &str) -> u64 {
        n(&self.stats_after["xdp_verdicts"], verdict)
            .saturating_sub(n(&self.stats_before["xdp_verdicts"], verdict))
    }

    /// Packets of `kind` the attacker sent.
    pub fn sent(&self, kind: &str) -> u64 {
        n(&self.flood["sent"], kind)
    }

    /// Per attack kind: what was sent and the counters that refused it.
    pub fn per_kind(&self) -> Value {
        let c = |names: &[&str]| -> Value {
            names
                .iter()
                .map(|k| (k.to_string(), Value::from(self.delta(k))))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let xdp = |v: &str| (self.xdp != "off").then(|| self.xdp_delta(v));
        json!({
            "unknown_cid": {
                "sent": self.sent("unknown_cid"),
                "counters": c(&["unknown_cid_packets", "stateless_resets_sent", "stateless_resets_rate_limited"]),
            },
            "tiny_initial": {
                "sent": self.sent("tiny_initial"),
                "counters": c(&["dropped_short_initials"]),
            },
            "relay_cid_spoof": {
                "sent": self.sent("relay_cid_spoof"),
                // Unknown once the echo's session is gone (the benchmark's echo ends
                // inside the flood).
                "counters": c(&["relay_sender_mismatch", "relay_sender_updated", "relay_unknown_cid"]),
                "xdp_pass_sender_mismatch": xdp("pass_sender_mismatch"),
                "xdp_pass_unknown_cid": xdp("pass_unknown_cid"),
            },
            "handshake": {
                "sent": self.sent("handshake"),
                "counters": c(&["retries_sent", "connections_accepted", "invalid_tokens"]),
            },
            "load": {
                "recv_budget_exhausted": self.delta("recv_budget_exhausted"),
                "kernel_rcvbuf_errors": self.rcvbuf_errors,
                "xdp_pass_not_relay_cid": xdp("pass_not_relay_cid"),
                "xdp_tx": xdp("tx"),
                "userspace_forwarded_packets": self.delta("userspace_forwarded_packets"),
            },
        })
    }

    /// Everything, for the test's output and the benchmark's file.
    pub fn record(&self) -> Value {
        json!({
            "xdp": self.xdp,
            "flood_seconds": self.flood["seconds"],
            "relay_cid": self.relay_cid,
            "rss_kib": { "before": self.rss_before_kib, "after": self.rss_after_kib, "peak": self.rss_peak_kib },
            "echo": self.echo,
            "baseline_echo": self.baseline,
            "echo_outlived_flood": self.echo_outlived_flood,
            "flood": self.flood,
            "per_kind": self.per_kind(),
            "xdp_verdicts": { "before": self.stats_before["xdp_verdicts"], "after": self.stats_after["xdp_verdicts"] },
        })
    }
}

/// Echo arguments for a run of about `d`.
fn echo_args(d: Duration) -> Vec<String> {
    // A burst takes the interval plus about 2 ms for its echoes.
    let bursts = d.as_millis() as u64 / (ECHO_INTERVAL_MS + 2);
    let count = ECHO_BURST as u64 * bursts.max(1);
    [
        "--count".to_string(),
        count.to_string(),
        "--burst".into(),
        ECHO_BURST.to_string(),
        "--interval-ms".into(),
        ECHO_INTERVAL_MS.to_string(),
        "--size".into(),
        ECHO_SIZE.to_string(),
    ]
    .into()
}

pub fn run(plan: &Plan) -> anyhow::Result<Outcome> {
    let mut lab = Lab::relay_topology(&format!("fl{}", &plan.xdp[..1]))?;
    let attacker = lab.add_attacker()?;
    let certs = lab.start_relay_stack(plan.xdp)?;
    // Sets up the neighbour entries the XDP program's route lookups need.
    let warm = lab.agent_echo(
        &certs,
        &["--count", "20", "--burst", "10", "--size", "1000"],
    )?;
    if n(&warm, "echoed_exact") != 20 {
        bail!("warm-up echo failed: {warm}");
    }
    let args = echo_args(plan.echo);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let baseline = match plan.baseline {
        true => Some(lab.agent_echo(&certs, &args)?),
        false => None,
    };
    // Its log goes to a file: a pipe nobody reads while it runs could fill and block it.
    let echo_log = lab.dir.join("flooded-echo.log");
    let mut echo = ChildGuard(Some(
        lab.agent_echo_command(&certs, &args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&echo_log)?)
            .spawn()
            .context("starting the agent's echo")?,
    ));
    let cid = observe_relay_cid(&lab, Duration::from_secs(10))?;
    let cid_hex: String = cid.iter().map(|b| format!("{b:02x}")).collect();
    // "Before" is taken with the echo connected, so its connection and Retry are not
    // counted as the flood's.
    let pid = lab.pid("intermediate").context("no intermediate")?;
    let stats_before = lab.fresh_relay_stats()?;
    let stats_from = Instant::now();
    let rss_before_kib = proc_status_kib(pid, "VmRSS")?;
    let rcvbuf_before = udp_rcvbuf_errors(&lab)?;
    let mut flood_cmd = lab.command(&attacker, &bin_dir().join("ztna-flood"));
    flood_cmd.args([
        "--target".to_string(),
        format!("{RELAY_IP}:{RELAY_PORT}"),
        "--seconds".into(),
        plan.flood.as_secs().to_string(),
        "--relay-cid".into(),
        cid_hex.clone(),
    ]);
    for (kind, pps) in FLOOD_RATES {
        flood_cmd.args([format!("--{}-pps", kind.replace('_', "-")), pps.to_string()]);
    }
    let out = flood_cmd.output().context("running ztna-flood")?;
    if !out.status.success() {
        bail!("ztna-flood: {}", String::from_utf8_lossy(&out.stderr));
    }
    let flood: Value = serde_json::from_slice(&out.stdout).context("ztna-flood's summary")?;
    let echo_outlived_flood = echo.get().try_wait()?.is_none();

    // The second write after the flood: the backlog it left is processed by then.
    lab.fresh_relay_stats()?;
    let stats_after = lab.fresh_relay_stats()?;
    let stats_interval = stats_from.elapsed() + Duration::from_secs(1);
    let rss_after_kib = proc_status_kib(pid, "VmRSS")?;
    let rss_peak_kib = proc_status_kib(pid, "VmHWM")?;
    let rcvbuf_errors = udp_rcvbuf_errors(&lab)?.saturating_sub(rcvbuf_before);

    let deadline = Instant::now() + plan.echo + Duration::from_secs(30);
    while echo.get().try_wait()?.is_none() {
        if Instant::now() > deadline {
            bail!("the agent's echo did not finish");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let echo = echo_report(echo.0.take().expect("child").wait_with_output()?)
        .with_context(|| std::fs::read_to_string(&echo_log).unwrap_or_default())?;
    Ok(Outcome {
        xdp: plan.xdp.to_string(),
        baseline,
        echo,
        flood,
        echo_outlived_flood,
        relay_cid: cid_hex,
        rss_before_kib,
        rss_after_kib,
        rss_peak_kib,
        stats_before,
        stats_after,
        stats_interval,
        rcvbuf_errors,
    })
}

/// Kills a child left running by an early return.
struct ChildGuard(Option<std::process::Child>);

impl ChildGuard {
    fn get(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("child taken")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `Udp: ... RcvbufErrors` of the relay namespace (/proc/net/snmp is per namespace).
fn udp_rcvbuf_errors(lab: &Lab) -> anyhow::Result<u64> {
    let out = lab.exec(&lab.ns("x"), "cat", &["/proc/net/snmp"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next(), udp.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no Udp lines in /proc/net/snmp");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(k, _)| *k == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .context("no Udp RcvbufErrors in /proc/net/snmp")
}

/// The relay CID the agent sends its data connection's packets to, as the router
/// sees it on a1: the DCID of a short-header packet from the agent to the relay port.
pub fn observe_relay_cid(lab: &Lab, timeout: Duration) -> anyhow::Result<[u8; RELAY_CID_LEN]> {
    crate::in_netns(&lab.ns("r"), move || {
        let proto = (libc::ETH_P_IP as u16).to_be();
        // SAFETY: socket(2) with constant arguments; the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(c"a1".as_ptr()) };
        // SAFETY: sockaddr_ll is plain data; zero is a valid value for every field.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: bind(2) with a sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            bail!("binding to a1: {}", std::io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: setsockopt(2) with a timeval of the size given.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let agent: Ipv4Addr = AGENT_IP.parse()?;
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            // SAFETY: recv(2) into a buffer of the length given.
            let len = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(len) = usize::try_from(len) else {
                continue;
            };
            let Ok(p) = etherparse::SlicedPacket::from_ip(&buf[..len]) else {
                continue;
            };
            let (Some(etherparse::NetSlice::Ipv4(ip)), Some(etherparse::TransportSlice::Udp(udp))) =
                (&p.net, &p.transport)
            else {
                continue;
            };
            let quic = udp.payload();
            if ip.header().source_addr() == agent
                && udp.destination_port() == RELAY_PORT
                && quic.first().is_some_and(|b| b & 0x80 == 0)
                && quic.len() > RELAY_CID_LEN
                && is_relay_cid(&quic[1..=RELAY_CID_LEN])
            {
                let mut cid = [0u8; RELAY_CID_LEN];
                cid.copy_from_slice(&quic[1..=RELAY_CID_LEN]);
                return Ok(cid);
            }
        }
        bail!("no packet to a relay CID from the agent on the router within {timeout:?}")
    })
}
