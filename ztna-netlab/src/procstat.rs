//! CPU accounting from /proc for benchmarks: system-wide softirq and idle time,
//! per-process CPU time (tick-sampled) and scheduler run time (exact), the kernel's
//! softirq threads, and kernel configuration options.

/// Aggregate "cpu" line of /proc/stat: (softirq, idle + iowait) in clock ticks.
pub fn proc_stat() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 7 {
        return (0, 0);
    }
    (v[6], v[3] + v[4])
}

/// utime + stime of process `pid` (all threads), clock ticks (/proc/PID/stat).
pub fn proc_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm field: state is field 3, utime 14, stime 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// utime + stime of process `pid` in seconds (0 when it is gone).
pub fn proc_cpu_s(pid: u32) -> f64 {
    proc_ticks(pid).map_or(0.0, |t| t as f64 * tick_ns() / 1e9)
}

/// Sum over the threads of `pid` (a number or `self`) of the scheduler's run time
/// (ns, not tick-sampled).
pub fn proc_sched_ns(pid: &str) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .filter_map(|t| t.ok())
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| {
                s.split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .sum(),
    )
}

/// The ksoftirqd threads (they run the softirq work that is not done inline).
pub fn ksoftirqd_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .collect()
}

/// Length of a clock tick (USER_HZ) in ns.
pub fn tick_ns() -> f64 {
    // SAFETY: sysconf has no preconditions.
    1e9 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// CPUs this process may run on.
pub fn ncpu() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A kernel config option from /proc/config.gz ("n" when absent), if readable.
pub fn kernel_config(name: &str) -> Option<String> {
    let out = std::process::Command::new("zcat")
        .arg("/proc/config.gz")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("{name}=");
    Some(
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or("n")
            .to_string(),
    )
}
