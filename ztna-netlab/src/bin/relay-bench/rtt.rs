//! RTT through a path: sequential UDP ping-pongs between two SCHED_FIFO threads
//! pinned to one CPU; pinning the relay process alongside for the same-CPU variant.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};

use super::*;
use crate::load::bind;

/// Sets the CPU affinity of thread `tid`; returns whether it worked.
pub fn set_affinity(tid: i32, set: &libc::cpu_set_t) -> bool {
    // SAFETY: sched_setaffinity with a valid cpu_set_t.
    unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), set) == 0 }
}

/// Sets the CPU affinity of every thread of `pid` to `cpu` (None: unchanged);
/// returns the previous masks.
pub fn pin_process(pid: u32, cpu: Option<usize>) -> anyhow::Result<Vec<(i32, libc::cpu_set_t)>> {
    let mut saved = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
        let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above, for thread `tid`.
        if unsafe { libc::sched_getaffinity(tid, size_of::<libc::cpu_set_t>(), &mut old) } != 0 {
            continue;
        }
        if let Some(c) = cpu {
            // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it (c < CPU_SETSIZE).
            let set = unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(c, &mut set);
                set
            };
            if !set_affinity(tid, &set) {
                bail!(
                    "sched_setaffinity {tid}: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        saved.push((tid, old));
    }
    Ok(saved)
}

/// Pins the calling thread to CPU 0. The pinger and the echoer share one CPU: in
/// this VM a wake-up across vCPUs costs tens of µs when the other vCPU is halted
/// (haltpoll), which would swamp the path's latency.
fn pin_cpu0() {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0 = this thread).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Puts the calling thread in SCHED_FIFO, so that wake-ups of the RTT threads do
/// not wait behind other work on the shared CPUs. Returns whether it worked.
fn realtime_thread() -> bool {
    let p = libc::sched_param { sched_priority: 10 };
    // SAFETY: sched_setscheduler(0 = this thread) with a valid sched_param.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) == 0 }
}

/// Sequential UDP ping-pong from `pinger` (agent ns) to `to`; the echoer at
/// `echo_at` (connector ns) answers the sender, or with `reply` = (address, CID)
/// sends the packet with the other relay CID back through the relay.
pub fn rtt(
    lab: &Lab,
    pinger: SocketAddrV4,
    to: SocketAddrV4,
    echo_at: SocketAddrV4,
    reply: Option<(SocketAddrV4, [u8; 8])>,
    payload: Vec<u8>,
) -> anyhow::Result<Value> {
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let (ready_tx, ready_rx) = mpsc::channel();
    let echo = ztna_netlab::spawn_in_netns(&lab.ns("c"), move || {
        let s = bind(echo_at, None)?;
        let rt = realtime_thread();
        pin_cpu0();
        let _ = ready_tx.send(rt);
        s.set_read_timeout(Some(Duration::from_millis(50)))?;
        let mut buf = [0u8; 2048];
        while !st.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let dest = match reply {
                    Some((via, cid)) => {
                        buf[1..9].copy_from_slice(&cid);
                        SocketAddr::V4(via)
                    }
                    None => from,
                };
                let _ = s.send_to(&buf[..n], dest);
            }
        }
        Ok(())
    });
    let Ok(echo_rt) = ready_rx.recv_timeout(Duration::from_secs(5)) else {
        stop.store(true, Ordering::Relaxed);
        return Err(join(echo)
            .err()
            .unwrap_or_else(|| anyhow::anyhow!("echoer did not start")));
    };
    let result = join(ztna_netlab::spawn_in_netns(&lab.ns("a"), move || {
        let s = bind(pinger, None)?;
        let rt = realtime_thread();
        pin_cpu0();
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut buf = [0u8; 2048];
        let mut v = Vec::with_capacity(PINGS);
        let mut lost = 0u64;
        for i in 0..PINGS + 50 {
            let t = Instant::now();
            s.send_to(&payload, to)?;
            match s.recv_from(&mut buf) {
                Ok((n, _)) if n == payload.len() => {
                    if i >= 50 {
                        v.push(t.elapsed().as_nanos() as f64 / 1000.0);
                    }
                }
                _ => lost += u64::from(i >= 50),
            }
        }
        Ok((v, lost, rt))
    }));
    stop.store(true, Ordering::Relaxed);
    join(echo)?;
    let (mut v, lost, ping_rt) = result?;
    if v.is_empty() {
        bail!("no ping to {to} came back");
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Ok(json!({
        "p50": round2(p(0.5)), "p99": round2(p(0.99)), "min": round2(v[0]), "samples": v.len(), "lost": lost,
        "sched_fifo": echo_rt && ping_rt,
    }))
}
