//! The XDP program's own cost: BPF_PROG_TEST_RUN on the lab intermediate's program
//! instance (by id, through bpf(2), as aya cannot take a program it did not load),
//! its verdict counters, and kernel run-time statistics for live traffic.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use ztna_common::relay::{RelayKey, SessionStats, Verdict};

use super::*;

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_ENABLE_STATS: libc::c_long = 32;

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a repr(C) prefix of union bpf_attr for `cmd`, valid for the
    // call; the kernel treats the rest of the union as zero.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as u32) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd_from(r: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this fd to us; we own it.
    unsafe { OwnedFd::from_raw_fd(r as i32) }
}

/// Enables bpf_stats (run_time_ns, run_cnt) while the returned fd is open.
pub fn enable_bpf_stats() -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        ty: u32, // BPF_STATS_RUN_TIME = 0
    }
    sys_bpf(BPF_ENABLE_STATS, &mut Attr { ty: 0 }).map(fd_from)
}

pub fn prog_fd_by_id(id: u32) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        prog_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    sys_bpf(
        BPF_PROG_GET_FD_BY_ID,
        &mut Attr {
            prog_id: id,
            next_id: 0,
            open_flags: 0,
        },
    )
    .map(fd_from)
}

/// union bpf_attr, BPF_PROG_TEST_RUN member.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// BPF_PROG_TEST_RUN of `prog` on `pkt`, `repeat` times, in the calling thread's
/// namespace, with ctx ingress_ifindex = `ifindex`. Returns (XDP action, output
/// packet, average ns per run).
pub fn test_run(
    prog: &OwnedFd,
    pkt: &[u8],
    ifindex: u32,
    repeat: u32,
) -> std::io::Result<(u32, Vec<u8>, u32)> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let ctx: [u32; 6] = [0, pkt.len() as u32, 0, ifindex, 0, 0];
    let mut out = vec![0u8; pkt.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: pkt.len() as u32,
        data_size_out: out.len() as u32,
        data_in: pkt.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ctx_size_in: size_of_val(&ctx) as u32,
        ctx_in: ctx.as_ptr() as u64,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval, out, attr.duration))
}

fn xdp_action_name(a: u32) -> &'static str {
    match a {
        0 => "XDP_ABORTED",
        1 => "XDP_DROP",
        2 => "XDP_PASS",
        3 => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "unknown",
    }
}

/// Map `name` of the lab intermediate's program, from its pin directory
/// ([`pin_dir`]; kernel map names are cut to 15 bytes, which makes
/// `ZTNA_LOCAL_ADDRS` and `ZTNA_LOCAL_ADDRS6` alike by name).
pub fn prog_map(name: &str) -> anyhow::Result<aya::maps::Map> {
    let pin = pin_dir().join(name);
    let data = aya::maps::MapData::from_pin(&pin)
        .with_context(|| format!("opening pinned {}", pin.display()))?;
    Ok(aya::maps::Map::from_map_data(data)?)
}

/// The lab intermediate's verdict counters (its program's own ZTNA_STATS), summed
/// over CPUs.
pub fn verdicts() -> anyhow::Result<Vec<(&'static str, u64)>> {
    ztna_userspace::xdp::verdict_counters(&pin_dir())
}

/// Counters that grew from `before` to `after` (verdict name → growth).
pub fn moved(before: &[(&'static str, u64)], after: &[(&'static str, u64)]) -> Map<String, Value> {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| a.1 > b.1)
        .map(|(b, a)| (b.0.to_string(), json!(a.1 - b.1)))
        .collect()
}

/// Program cost under BPF_PROG_TEST_RUN, on the lab intermediate's own program
/// instance (found via x0), from a thread in the relay namespace.
pub fn prog_cost(lab: &Lab, prog_id: u32, cids: &Cids) -> anyhow::Result<Value> {
    let stats_sysctl = || {
        std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let sysctl_before = stats_sysctl();
    let prog = prog_fd_by_id(prog_id).context("BPF_PROG_GET_FD_BY_ID")?;
    let (x0_mac, ifindex) = lab.mac_ifindex(&lab.ns("x"), "x0")?;
    let (r1_mac, _) = lab.mac_ifindex(&lab.ns("r"), "r1")?;
    let (s, _) = self_session();
    let self_cid = cids.get(&s.to_string()).context("self static session")?.0;
    let (p, _) = routed_session();
    let routed_cid = cids.get(&p.to_string()).context("routed static session")?.0;
    // As the brief has it: relay:4433 → relay:4433, entry back to the relay.
    let self_pkt = frame(x0_mac, x0_mac, s, s, 64, &quic_short(self_cid, PAYLOAD));
    // Routed: P:4433 → P:4433 in on x0, out to the router: the rewrite (source :=
    // the packet's destination, destination := the peer P, MACs := the route to P)
    // reproduces the packet byte for byte, so every repeat runs the whole forward
    // path, with a route from the program's own bpf_fib_lookup. The program forwards
    // only packets to the relay's own addresses, so P is declared one of them for
    // the measurement (and removed after): no byte-for-byte fixed point exists
    // otherwise, since a packet to a truly local address would need a local peer.
    let routed_pkt = frame(x0_mac, r1_mac, p, p, 64, &quic_short(routed_cid, PAYLOAD));
    let mut local_addrs: aya::maps::HashMap<_, u32, u8> =
        aya::maps::HashMap::try_from(prog_map(ztna_common::relay::MAP_LOCAL_ADDRS)?)?;
    let p_key = u32::from_ne_bytes(p.ip().octets());
    local_addrs.insert(p_key, ztna_common::relay::LOCAL_ADDR_PRESENT, 0)?;
    let mut sessions: aya::maps::PerCpuHashMap<_, RelayKey, SessionStats> =
        aya::maps::PerCpuHashMap::try_from(prog_map(ztna_common::relay::MAP_SESSION_STATS)?)?;
    let ncpu = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let key = RelayKey { cid: routed_cid };
    let before = verdicts()?;
    let runs = ztna_netlab::spawn_in_netns(&lab.ns("x"), move || {
        let series = |pkt: &[u8], n: usize| -> anyhow::Result<Value> {
            let mut v = Vec::new();
            let mut verdict = 0;
            for _ in 0..n {
                let (ret, _, d) = test_run(&prog, pkt, ifindex, TEST_RUN_REPEAT)?;
                verdict = ret;
                v.push(d);
            }
            let mut sorted = v.clone();
            sorted.sort_unstable();
            Ok(
                json!({"verdict": verdict, "ns_per_run_min": sorted[0], "ns_per_run_median": sorted[n / 2], "runs": v}),
            )
        };
        let mut out = Map::new();
        // 1. The relay → relay packet.
        let (ret, data, _) = test_run(&prog, &self_pkt, ifindex, 1)?;
        let mut selfj = json!({"verdict": ret, "verdict_name": xdp_action_name(ret), "output_identical": data == self_pkt});
        if ret == 3 {
            selfj["repeats"] = series(&self_pkt, TEST_RUNS)?;
        }
        out.insert("self_relay_packet".into(), selfj);
        // 2. The routed self-mapping packet: the first run looks the route up and
        // fills this CPU's route cache, the repeats hit it (the steady state).
        let (ret, data, _) = test_run(&prog, &routed_pkt, ifindex, 1)?;
        let mut routed = json!({"verdict": ret, "verdict_name": xdp_action_name(ret), "output_identical": data == routed_pkt});
        if ret == 3 {
            routed["repeats"] = series(&routed_pkt, TEST_RUNS)?;
            // 3. Without the session's per-CPU value the program has nowhere to cache
            // the route: a bpf_fib_lookup on every run (and no per-session counters).
            sessions.remove(&key)?;
            let r = series(&routed_pkt, 3);
            let zero = aya::maps::PerCpuValues::try_from(vec![SessionStats::default(); ncpu])?;
            sessions.insert(key, zero, 0)?;
            out.insert("fib_lookup_every_packet".into(), r?);
        }
        out.insert("routed_self_mapping_packet".into(), routed);
        Ok(out)
    });
    let out = join(runs);
    local_addrs
        .remove(&p_key)
        .context("removing the routed peer from the local addresses")?;
    let mut out = out?;
    // Which counter the single runs moved (explains a pass).
    let moved = moved(&before, &verdicts()?);
    if out["self_relay_packet"]["verdict"] != 3 {
        let why = if moved.contains_key(Verdict::PassFibMiss.name()) {
            "pass_fib_miss: the relay's own address is a local route, for which bpf_fib_lookup returns BPF_FIB_LKUP_RET_NOT_FWDED, so the program hands the packet to userspace"
        } else {
            "see verdict_counters_moved"
        };
        out["self_relay_packet"]["reason"] = json!(why);
    }
    out.insert("verdict_counters_moved".into(), Value::Object(moved));
    out.insert("prog_id".into(), json!(prog_id));
    out.insert("repeat".into(), json!(TEST_RUN_REPEAT));
    out.insert(
        "bpf_stats_enabled_sysctl_before_after".into(),
        json!([sysctl_before, stats_sysctl()]),
    );
    Ok(Value::Object(out))
}
