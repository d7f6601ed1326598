//! Loading the XDP fast path and keeping its maps in step with the relay table.
//!
//! The program (`ztna-ebpf/`, built by `cargo xtask build-ebpf`) is embedded at build
//! time. `load` removes pins left by an earlier run, so a restarted intermediate never
//! forwards on stale entries, loads the program, pins its maps in the instance's pin
//! directory (`/sys/fs/bpf/ztna/<port>` by default; BTF included, so `bpftool map
//! dump pinned` prints field names), writes the relay port into `ZTNA_CONFIG` and the relay's own IPv4
//! addresses into `ZTNA_LOCAL_ADDRS`, and attaches to each interface.
//! Links are bpf_links owned by this process: they go away with it, also on a crash.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues};
use aya::programs::{Xdp, XdpMode};
use ztna_common::frames::Cid;
use ztna_common::relay::{
    LOCAL_ADDR_PRESENT, MAP_CONFIG, MAP_LOCAL_ADDRS, MAP_RELAY, MAP_SESSION_STATS, MAP_STATS,
    MAP_STATS_BYTES, MAX_LOCAL_ADDRS, PIN_ROOT, PROGRAM_NAME, RelayConfig, RelayEntry, RelayKey,
    SessionStats, VERDICT_COUNT, Verdict,
};

use crate::relay::KernelTable;

/// The eBPF object built by `cargo xtask build-ebpf`; empty if it was not built.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztna-ebpf.o"));

pub fn embedded_object() -> Option<&'static [u8]> {
    (!EBPF_OBJECT.is_empty()).then_some(EBPF_OBJECT)
}

/// `--xdp` choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpChoice {
    /// No XDP: the userspace forwarder serves the table.
    Off,
    /// Native, else generic, else off; logs which and why.
    Auto,
    /// Generic (SKB) mode: works on any interface, slower.
    Generic,
    /// Native (driver) mode.
    Native,
}

/// A loaded, attached program with its maps.
pub struct XdpRelay {
    ebpf: Ebpf,
    pub mode: &'static str,
    pub interfaces: Vec<String>,
    /// The relay socket's address, and what `ZTNA_LOCAL_ADDRS` holds for it.
    relay_addr: SocketAddr,
    local_addrs: Vec<Ipv4Addr>,
    /// Where its maps are pinned (removed when this drops).
    pub pin_dir: PathBuf,
    /// Forwarding sysctls we turned on; restored when this drops. Declared after
    /// `ebpf` so the program detaches first.
    _forwarding: Vec<SysctlRestore>,
}

/// A sysctl file this process changed, and the value it had before: written back
/// on drop, so that stopping the intermediate leaves the host as it found it. (A
/// crashed or killed intermediate cannot; it logs what it changed when it does.)
#[derive(Debug)]
pub struct SysctlRestore {
    path: PathBuf,
    previous: String,
}

impl SysctlRestore {
    /// Writes `value` to `path` if it holds something else; `None` if it already
    /// held `value` (nothing to restore).
    pub fn set(path: &Path, value: &str) -> anyhow::Result<Option<Self>> {
        let previous =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        if previous.trim() == value {
            return Ok(None);
        }
        std::fs::write(path, value).with_context(|| format!("writing {}", path.display()))?;
        Ok(Some(SysctlRestore {
            path: path.to_path_buf(),
            previous: previous.trim().to_string(),
        }))
    }
}

impl Drop for SysctlRestore {
    fn drop(&mut self) {
        match std::fs::write(&self.path, &self.previous) {
            Ok(()) => tracing::info!("restored {} to {}", self.path.display(), self.previous),
            Err(e) => tracing::warn!(
                "restoring {} to {}: {e}; it stays changed",
                self.path.display(),
                self.previous
            ),
        }
    }
}

fn mount_bpffs() -> anyhow::Result<()> {
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let path = c"/sys/fs/bpf";
    // SAFETY: statfs fills the struct we own.
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut st) };
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    if rc == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    // SAFETY: plain mount(2) with static C strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting bpffs on /sys/fs/bpf: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// `bpf_fib_lookup` refuses to route packets that arrive on an interface with IPv4
/// forwarding off (BPF_FIB_LKUP_RET_FWD_DISABLED), like the kernel's own forwarding.
/// Returns the guard that turns it off again, if it was off.
fn enable_forwarding(iface: &str) -> anyhow::Result<Option<SysctlRestore>> {
    let path = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
    let restore = SysctlRestore::set(Path::new(&path), "1")
        .with_context(|| format!("enabling IPv4 forwarding on {iface} (does it exist?)"))?;
    if restore.is_some() {
        tracing::warn!(
            "enabled IPv4 forwarding on {iface} ({path}): XDP forwarding needs it for route \
             lookups; it is turned off again when the intermediate stops (not if it crashes)"
        );
    }
    Ok(restore)
}

/// The pin directory of an intermediate listening on `port`, unless configured.
pub fn default_pin_dir(port: u16) -> PathBuf {
    Path::new(PIN_ROOT).join(port.to_string())
}

fn pin_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Every map the loader pins in the instance's directory.
const PINNED_MAPS: [&str; 6] = [
    MAP_RELAY,
    MAP_SESSION_STATS,
    MAP_STATS,
    MAP_STATS_BYTES,
    MAP_CONFIG,
    MAP_LOCAL_ADDRS,
];

/// Removes the pins of an earlier run in `dir`, and `dir` if that leaves it empty.
pub fn remove_stale_pins(dir: &Path) {
    for m in PINNED_MAPS {
        let _ = std::fs::remove_file(pin_path(dir, m));
    }
    let _ = std::fs::remove_dir(dir);
}

/// The pin directories of running (or crashed) intermediates under [`PIN_ROOT`].
pub fn instance_pin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(PIN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join(MAP_RELAY).exists())
        .collect();
    dirs.sort();
    dirs
}

impl XdpRelay {
    /// For a relay bound to the wildcard address: brings `ZTNA_LOCAL_ADDRS` in step
    /// with the interfaces' current IPv4 addresses (the intermediate calls it every
    /// second), so that an added address is forwarded in XDP and a removed one no
    /// longer is. Returns whether the map changed.
    pub fn refresh_local_addrs(&mut self) -> anyhow::Result<bool> {
        if !self.relay_addr.ip().is_unspecified() {
            return Ok(false);
        }
        let (now, _) = relay_local_addrs(
            self.relay_addr.ip(),
            &self.interfaces,
            crate::netif::interface_ipv4_addrs,
        );
        if now == self.local_addrs {
            return Ok(false);
        }
        let mut map: HashMap<_, u32, u8> = HashMap::try_from(
            self.ebpf
                .map_mut(MAP_LOCAL_ADDRS)
                .context("map ZTNA_LOCAL_ADDRS missing")?,
        )?;
        // Against what the map holds (a failed earlier attempt may have left it
        // half-way); removed first: it holds at most MAX_LOCAL_ADDRS.
        let held: Vec<u32> = map.keys().collect::<Result<_, _>>()?;
        let wanted: Vec<u32> = now.iter().map(|a| u32::from_ne_bytes(a.octets())).collect();
        for gone in held.iter().filter(|k| !wanted.contains(k)) {
            map.remove(gone).with_context(|| {
                format!(
                    "removing {} from {MAP_LOCAL_ADDRS}",
                    Ipv4Addr::from(gone.to_ne_bytes())
                )
            })?;
        }
        for new in wanted.iter().filter(|k| !held.contains(k)) {
            map.insert(new, LOCAL_ADDR_PRESENT, 0).with_context(|| {
                format!(
                    "adding {} to {MAP_LOCAL_ADDRS}",
                    Ipv4Addr::from(new.to_ne_bytes())
                )
            })?;
        }
        tracing::info!(
            "XDP: local addresses changed from {:?} to {now:?}",
            self.local_addrs
        );
        self.local_addrs = now;
        Ok(true)
    }
}

impl XdpRelay {
    /// Packets and bytes per verdict, summed over CPUs, from this instance's maps.
    pub fn verdict_totals(&self) -> anyhow::Result<Vec<(Verdict, u64, u64)>> {
        let packets: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(MAP_STATS).context("map ZTNA_STATS missing")?)?;
        let bytes: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(MAP_STATS_BYTES)
                .context("map ZTNA_STATS_BYTES missing")?,
        )?;
        let mut out = Vec::with_capacity(VERDICT_COUNT as usize);
        for v in Verdict::ALL {
            let p: u64 = packets.get(&(v as u32), 0)?.iter().sum();
            let b: u64 = bytes.get(&(v as u32), 0)?.iter().sum();
            out.push((v, p, b));
        }
        Ok(out)
    }
}

impl Drop for XdpRelay {
    fn drop(&mut self) {
        // The links detach when the Ebpf drops; the pins would outlive us.
        remove_stale_pins(&self.pin_dir);
    }
}

/// The IPv4 addresses the relay's socket, bound to `bound`, receives on: that
/// address when it is a specific one, else every IPv4 address of the interfaces the
/// program is attached to (`addrs_of` lists an interface's). A specific IPv6 address
/// has none: the program then forwards nothing. At most [`MAX_LOCAL_ADDRS`], in
/// order; the rest (packets to them go to userspace) are returned separately.
pub fn relay_local_addrs(
    bound: IpAddr,
    interfaces: &[String],
    addrs_of: impl Fn(&str) -> Vec<Ipv4Addr>,
) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>) {
    let specific = match bound {
        IpAddr::V4(a) if !a.is_unspecified() => Some(vec![a]),
        IpAddr::V6(a) if !a.is_unspecified() => Some(a.to_ipv4_mapped().into_iter().collect()),
        // The wildcard: 0.0.0.0, or [::] (dual-stack, so it takes IPv4 too).
        _ => None,
    };
    let mut all = specific.unwrap_or_else(|| {
        let mut all = Vec::new();
        for iface in interfaces {
            for a in addrs_of(iface) {
                if !all.contains(&a) {
                    all.push(a);
                }
            }
        }
        all
    });
    let rest = all.split_off(all.len().min(MAX_LOCAL_ADDRS as usize));
    (all, rest)
}

/// Loads and attaches with `choice` (not `Off`) for a relay socket bound to
/// `relay_addr`. Returns the relay and the kernel table that mirrors the forwarding
/// entries.
///
/// For a wildcard bind the interfaces' addresses are read here and again by
/// [`XdpRelay::refresh_local_addrs`].
pub fn load(
    choice: XdpChoice,
    interfaces: &[String],
    relay_addr: SocketAddr,
    pin_dir: &Path,
) -> anyhow::Result<(XdpRelay, XdpTable)> {
    let object = embedded_object().context(
        "this build has no eBPF object (run `cargo xtask build-ebpf` before building the intermediate)",
    )?;
    if interfaces.is_empty() {
        bail!("--xdp needs at least one --iface");
    }
    crate::caps::require("the XDP fast path", crate::caps::XDP)?;
    let (local_addrs, left_out) = relay_local_addrs(
        relay_addr.ip(),
        interfaces,
        crate::netif::interface_ipv4_addrs,
    );
    if local_addrs.is_empty() {
        tracing::warn!(
            "XDP: the relay at {relay_addr} has no IPv4 address on {}: the program will \
             forward nothing and the userspace forwarder serves every session",
            interfaces.join(", ")
        );
    }
    if !left_out.is_empty() {
        tracing::warn!(
            "XDP: more than {MAX_LOCAL_ADDRS} local IPv4 addresses; packets to {left_out:?} \
             are forwarded in userspace"
        );
    }
    mount_bpffs()?;
    // Dropped (restoring the sysctls) if loading fails below.
    let mut forwarding = Vec::new();
    for iface in interfaces {
        forwarding.extend(enable_forwarding(iface)?);
    }
    remove_stale_pins(pin_dir);
    std::fs::create_dir_all(pin_dir)
        .with_context(|| format!("creating the pin directory {}", pin_dir.display()))?;
    let modes: &[(XdpMode, &'static str)] = match choice {
        XdpChoice::Native => &[(XdpMode::Driver, "native")],
        XdpChoice::Generic => &[(XdpMode::Skb, "generic")],
        XdpChoice::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
        XdpChoice::Off => bail!("XDP is off"),
    };
    let mut last_err = None;
    for (mode, name) in modes {
        match try_load(
            object,
            *mode,
            interfaces,
            relay_addr.port(),
            &local_addrs,
            pin_dir,
        ) {
            Ok((ebpf, table)) => {
                tracing::info!(
                    "XDP relay attached in {name} mode to {}",
                    interfaces.join(", ")
                );
                return Ok((
                    XdpRelay {
                        ebpf,
                        mode: name,
                        interfaces: interfaces.to_vec(),
                        relay_addr,
                        local_addrs: local_addrs.clone(),
                        pin_dir: pin_dir.to_path_buf(),
                        _forwarding: std::mem::take(&mut forwarding),
                    },
                    table,
                ));
            }
            Err(e) => {
                tracing::warn!("XDP {name} mode on {}: {e:#}", interfaces.join(", "));
                remove_stale_pins(pin_dir);
                std::fs::create_dir_all(pin_dir)
                    .with_context(|| format!("creating the pin directory {}", pin_dir.display()))?;
                last_err = Some(e);
            }
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no XDP mode tried")))
}

fn try_load(
    object: &[u8],
    mode: XdpMode,
    interfaces: &[String],
    relay_port: u16,
    local_addrs: &[Ipv4Addr],
    pin_dir: &Path,
) -> anyhow::Result<(Ebpf, XdpTable)> {
    let mut ebpf = aya::EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(object)
        .context("loading the eBPF object")?;
    for m in PINNED_MAPS {
        // Maps declared without by-name pinning are pinned here.
        if let Some(map) = ebpf.map(m)
            && !pin_path(pin_dir, m).exists()
        {
            map.pin(pin_path(pin_dir, m))
                .with_context(|| format!("pinning {m}"))?;
        }
    }
    {
        let mut config: Array<_, RelayConfig> = Array::try_from(
            ebpf.map_mut(MAP_CONFIG)
                .context("map ZTNA_CONFIG missing")?,
        )?;
        config.set(
            0,
            RelayConfig {
                port: relay_port.to_be(),
                ..Default::default()
            },
            0,
        )?;
    }
    {
        let mut local: HashMap<_, u32, u8> = HashMap::try_from(
            ebpf.map_mut(MAP_LOCAL_ADDRS)
                .context("map ZTNA_LOCAL_ADDRS missing")?,
        )?;
        for a in local_addrs {
            local
                .insert(u32::from_ne_bytes(a.octets()), LOCAL_ADDR_PRESENT, 0)
                .with_context(|| format!("adding {a} to {MAP_LOCAL_ADDRS}"))?;
        }
    }
    tracing::info!("XDP: forwarding packets to {local_addrs:?} (the relay's own addresses)");
    let prog: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .context("program ztna_relay missing")?
        .try_into()?;
    prog.load().context("verifier rejected the program")?;
    for iface in interfaces {
        prog.attach(iface, mode)
            .with_context(|| format!("attaching to {iface}"))?;
    }
    let table = XdpTable::open(pin_dir)?;
    Ok((ebpf, table))
}

/// Attaches the embedded object's pass-everything program to `iface` in native mode
/// (for the peer end of a veth that receives XDP_TX frames). Detached when the
/// returned handle drops.
pub fn attach_pass(iface: &str) -> anyhow::Result<Ebpf> {
    let object = embedded_object().context("this build has no eBPF object")?;
    let mut ebpf = Ebpf::load(object).context("loading the eBPF object")?;
    let prog: &mut Xdp = ebpf
        .program_mut("ztna_pass")
        .context("program ztna_pass missing")?
        .try_into()?;
    prog.load()?;
    prog.attach(iface, XdpMode::Driver)
        .with_context(|| format!("attaching ztna_pass to {iface}"))?;
    Ok(ebpf)
}

/// The forwarding and session-stats maps, opened from their pins.
pub struct XdpTable {
    relay: HashMap<MapData, RelayKey, RelayEntry>,
    sessions: PerCpuHashMap<MapData, RelayKey, SessionStats>,
    ncpu: usize,
}

fn open_pinned(dir: &Path, name: &str) -> anyhow::Result<aya::maps::Map> {
    let path = pin_path(dir, name);
    let data =
        MapData::from_pin(&path).with_context(|| format!("opening pinned {}", path.display()))?;
    Ok(aya::maps::Map::from_map_data(data)?)
}

impl XdpTable {
    /// Opens the maps pinned in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        Ok(XdpTable {
            relay: HashMap::try_from(open_pinned(dir, MAP_RELAY)?)?,
            sessions: PerCpuHashMap::try_from(open_pinned(dir, MAP_SESSION_STATS)?)?,
            ncpu: aya::util::nr_cpus().map_err(|(_, e)| e)?,
        })
    }

    /// Every entry with its summed counters (for `ztna sessions`).
    pub fn entries(&self) -> Vec<(RelayKey, RelayEntry, SessionStats)> {
        let mut out = Vec::new();
        for item in self.relay.iter().flatten() {
            let (k, v) = item;
            let s = self.session_stats(&k).unwrap_or_default();
            out.push((k, v, s));
        }
        out
    }

    fn session_stats(&self, k: &RelayKey) -> Option<SessionStats> {
        let per_cpu = self.sessions.get(k, 0).ok()?;
        let mut sum = SessionStats::default();
        for s in per_cpu.iter() {
            sum.packets += s.packets;
            sum.bytes += s.bytes;
            sum.last_seen_ns = sum.last_seen_ns.max(s.last_seen_ns);
        }
        Some(sum)
    }
}

fn v4(a: SocketAddr) -> Option<(u32, u16)> {
    match a {
        SocketAddr::V4(a) => Some((u32::from_ne_bytes(a.ip().octets()), a.port().to_be())),
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .map(|ip| (u32::from_ne_bytes(ip.octets()), a.port().to_be())),
    }
}

impl KernelTable for XdpTable {
    fn insert(
        &mut self,
        cid: &Cid,
        peer: SocketAddr,
        expected: SocketAddr,
        session: u32,
    ) -> Result<(), String> {
        let (Some((pa, pp)), Some((ea, ep))) = (v4(peer), v4(expected)) else {
            return Err("IPv6 relay entries stay in userspace".into());
        };
        let key = RelayKey { cid: *cid };
        if self.sessions.get(&key, 0).is_err() {
            let zero = PerCpuValues::try_from(vec![SessionStats::default(); self.ncpu])
                .map_err(|e| e.to_string())?;
            self.sessions
                .insert(key, zero, 0)
                .map_err(|e| e.to_string())?;
        }
        let entry = RelayEntry {
            peer_addr: pa,
            expected_src_addr: ea,
            peer_port: pp,
            expected_src_port: ep,
            session_id: session,
        };
        self.relay.insert(key, entry, 0).map_err(|e| e.to_string())
    }

    fn remove(&mut self, cid: &Cid) {
        let key = RelayKey { cid: *cid };
        let _ = self.relay.remove(&key);
        let _ = self.sessions.remove(&key);
    }

    fn stats(&self, cid: &Cid) -> Option<(u64, u64, u64)> {
        self.session_stats(&RelayKey { cid: *cid })
            .map(|s| (s.packets, s.bytes, s.last_seen_ns))
    }
}

/// Per-verdict counters summed over CPUs, from the map pinned in `dir`.
pub fn verdict_counters(dir: &Path) -> anyhow::Result<Vec<(&'static str, u64)>> {
    let stats: PerCpuArray<MapData, u64> = PerCpuArray::try_from(open_pinned(dir, MAP_STATS)?)?;
    let mut out = Vec::new();
    for v in Verdict::ALL {
        let per_cpu = stats.get(&(v as u32), 0)?;
        out.push((v.name(), per_cpu.iter().sum()));
    }
    debug_assert_eq!(out.len(), VERDICT_COUNT as usize);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file standing in for the sysctl (tests must not change the host's).
    fn sysctl(name: &str, value: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ztna-sysctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, format!("{value}\n")).unwrap();
        p
    }

    fn addrs_of(iface: &str) -> Vec<Ipv4Addr> {
        match iface {
            "eth0" => vec![[192, 0, 2, 1].into(), [198, 51, 100, 1].into()],
            "eth1" => vec![[203, 0, 113, 1].into(), [192, 0, 2, 1].into()],
            _ => vec![],
        }
    }

    #[test]
    fn local_addresses_are_the_bound_one_or_every_one_of_the_interfaces() {
        let ifaces = ["eth0".to_string(), "eth1".to_string()];
        let bound: IpAddr = [10, 0, 0, 1].into();
        assert_eq!(
            relay_local_addrs(bound, &ifaces, addrs_of),
            (vec![[10, 0, 0, 1].into()], vec![])
        );
        let mapped: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        assert_eq!(
            relay_local_addrs(mapped, &ifaces, addrs_of).0,
            vec![Ipv4Addr::new(10, 0, 0, 2)]
        );
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(relay_local_addrs(v6, &ifaces, addrs_of), (vec![], vec![]));
        let all = vec![
            Ipv4Addr::new(192, 0, 2, 1),
            Ipv4Addr::new(198, 51, 100, 1),
            Ipv4Addr::new(203, 0, 113, 1),
        ];
        for wildcard in ["0.0.0.0", "::"] {
            let w: IpAddr = wildcard.parse().unwrap();
            assert_eq!(
                relay_local_addrs(w, &ifaces, addrs_of),
                (all.clone(), vec![])
            );
        }
        let many = |_: &str| (0..70u8).map(|i| Ipv4Addr::new(10, 1, 0, i)).collect();
        let (kept, rest) = relay_local_addrs(Ipv4Addr::UNSPECIFIED.into(), &ifaces, many);
        assert_eq!(
            (kept.len(), rest.len()),
            (MAX_LOCAL_ADDRS as usize, 70 - 64)
        );
        assert_eq!(rest[0], Ipv4Addr::new(10, 1, 0, 64));
    }

    #[test]
    fn a_changed_sysctl_is_restored_on_drop_and_an_unchanged_one_left_alone() {
        let off = sysctl("off", "0");
        let guard = SysctlRestore::set(&off, "1").unwrap().expect("changed");
        assert_eq!(std::fs::read_to_string(&off).unwrap(), "1");
        drop(guard);
        assert_eq!(std::fs::read_to_string(&off).unwrap().trim(), "0");
        let on = sysctl("on", "1");
        assert!(SysctlRestore::set(&on, "1").unwrap().is_none());
        assert_eq!(std::fs::read_to_string(&on).unwrap().trim(), "1");
        assert!(SysctlRestore::set(&off.with_extension("missing"), "1").is_err());
    }
}
