//! Loading the XDP fast path and keeping its maps in step with the relay table.
//!
//! The program (`ztna-ebpf/`, built by `cargo xtask build-ebpf`) is embedded at build
//! time. `load` removes pins left by an earlier run, so a restarted intermediate never
//! forwards on stale entries, loads the program, pins its maps in the instance's pin
//! directory (`/sys/fs/bpf/ztna/<port>` by default; BTF included, so `bpftool map
//! dump pinned` prints field names), writes the relay port and relay ID into
//! `ZTNA_CONFIG` and the relay's own addresses into `ZTNA_LOCAL_ADDRS` (IPv4) and
//! `ZTNA_LOCAL_ADDRS6` (IPv6), and attaches to each interface.
//! Links are bpf_links owned by this process: they go away with it, also on a crash.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::{Xdp, XdpMode};
use ztna_common::relay::{
    LOCAL_ADDR_PRESENT, MAP_CONFIG, MAP_LOCAL_ADDRS, MAP_LOCAL_ADDRS6, MAP_RELAY, MAP_RELAY6,
    MAP_SESSION_STATS, MAP_SESSION_STATS6, MAP_STATS, MAP_STATS_BYTES, MAX_LOCAL_ADDRS, PIN_ROOT,
    PROGRAM_NAME, RelayConfig, VERDICT_COUNT, Verdict,
};

mod table;
use table::open_pinned;
pub use table::{KernelEntry, XdpTable};

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
    /// What `ZTNA_LOCAL_ADDRS6` holds.
    local_addrs6: Vec<Ipv6Addr>,
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

/// The same for IPv6 (`bpf_ipv6_fib_lookup` checks the ingress interface's
/// `net.ipv6.conf.<iface>.forwarding`). Only for a relay that receives IPv6. An
/// interface with IPv6 forwarding on stops accepting router advertisements unless
/// its `accept_ra` is 2: a host that takes its IPv6 default route from RAs keeps
/// the route it has until it expires.
fn enable_forwarding6(iface: &str) -> anyhow::Result<Option<SysctlRestore>> {
    let path = format!("/proc/sys/net/ipv6/conf/{iface}/forwarding");
    let restore = SysctlRestore::set(Path::new(&path), "1")
        .with_context(|| format!("enabling IPv6 forwarding on {iface} (does it exist?)"))?;
    if restore.is_some() {
        tracing::warn!(
            "enabled IPv6 forwarding on {iface} ({path}): XDP forwarding needs it for IPv6 \
             route lookups (the interface now ignores router advertisements unless its \
             accept_ra is 2); it is turned off again when the intermediate stops"
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
const PINNED_MAPS: [&str; 9] = [
    MAP_RELAY,
    MAP_SESSION_STATS,
    MAP_STATS,
    MAP_STATS_BYTES,
    MAP_CONFIG,
    MAP_LOCAL_ADDRS,
    MAP_RELAY6,
    MAP_SESSION_STATS6,
    MAP_LOCAL_ADDRS6,
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
    /// For a relay bound to the wildcard address: brings `ZTNA_LOCAL_ADDRS` and
    /// `ZTNA_LOCAL_ADDRS6` in step with the interfaces' current addresses (the
    /// intermediate calls it every second), so that an added address is forwarded in
    /// XDP and a removed one no longer is. Returns whether a map changed.
    pub fn refresh_local_addrs(&mut self) -> anyhow::Result<bool> {
        if !self.relay_addr.ip().is_unspecified() {
            return Ok(false);
        }
        let (now, _) = relay_local_addrs(
            self.relay_addr.ip(),
            &self.interfaces,
            crate::netif::interface_ipv4_addrs,
        );
        let (now6, _) = relay_local_addrs6(
            self.relay_addr.ip(),
            &self.interfaces,
            crate::netif::interface_ipv6_addrs,
        );
        let mut changed = false;
        if now != self.local_addrs {
            let wanted: Vec<u32> = now.iter().map(|a| u32::from_ne_bytes(a.octets())).collect();
            sync_set(&mut self.ebpf, MAP_LOCAL_ADDRS, &wanted)?;
            tracing::info!(
                "XDP: local addresses changed from {:?} to {now:?}",
                self.local_addrs
            );
            self.local_addrs = now;
            changed = true;
        }
        if now6 != self.local_addrs6 {
            let wanted: Vec<[u8; 16]> = now6.iter().map(|a| a.octets()).collect();
            sync_set(&mut self.ebpf, MAP_LOCAL_ADDRS6, &wanted)?;
            tracing::info!(
                "XDP: local IPv6 addresses changed from {:?} to {now6:?}",
                self.local_addrs6
            );
            self.local_addrs6 = now6;
            changed = true;
        }
        Ok(changed)
    }
}

/// Makes the keys of set map `name` (value [`LOCAL_ADDR_PRESENT`]) `wanted`,
/// against what the map holds (a failed earlier attempt may have left it half-way);
/// removals first: it holds at most [`MAX_LOCAL_ADDRS`].
fn sync_set<K: aya::Pod + PartialEq + std::fmt::Debug>(
    ebpf: &mut Ebpf,
    name: &str,
    wanted: &[K],
) -> anyhow::Result<()> {
    let mut map: HashMap<_, K, u8> = HashMap::try_from(
        ebpf.map_mut(name)
            .with_context(|| format!("map {name} missing"))?,
    )?;
    let held: Vec<K> = map.keys().collect::<Result<_, _>>()?;
    for gone in held.iter().filter(|k| !wanted.contains(k)) {
        map.remove(gone)
            .with_context(|| format!("removing {gone:?} from {name}"))?;
    }
    for new in wanted.iter().filter(|k| !held.contains(k)) {
        map.insert(new, LOCAL_ADDR_PRESENT, 0)
            .with_context(|| format!("adding {new:?} to {name}"))?;
    }
    Ok(())
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

/// The IPv6 addresses the relay's socket, bound to `bound`, receives on, as
/// [`relay_local_addrs`] for IPv4: a specific IPv6 address (not IPv4-mapped), or
/// for `[::]` every IPv6 address of the interfaces (`addrs_of`). Link-local
/// addresses are left out: the kernel's route lookup never forwards from or to
/// them. An IPv4 bind (`0.0.0.0` included) receives no IPv6.
pub fn relay_local_addrs6(
    bound: IpAddr,
    interfaces: &[String],
    addrs_of: impl Fn(&str) -> Vec<Ipv6Addr>,
) -> (Vec<Ipv6Addr>, Vec<Ipv6Addr>) {
    let usable = |a: &Ipv6Addr| !a.is_unicast_link_local() && a.to_ipv4_mapped().is_none();
    let mut all = match bound {
        IpAddr::V4(_) => Vec::new(),
        IpAddr::V6(a) if !a.is_unspecified() => [a].into_iter().filter(usable).collect(),
        IpAddr::V6(_) => {
            let mut all = Vec::new();
            for iface in interfaces {
                for a in addrs_of(iface) {
                    if usable(&a) && !all.contains(&a) {
                        all.push(a);
                    }
                }
            }
            all
        }
    };
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
    relay_id: u16,
    pin_dir: &Path,
    max_entries: u32,
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
    let (local_addrs6, left_out6) = relay_local_addrs6(
        relay_addr.ip(),
        interfaces,
        crate::netif::interface_ipv6_addrs,
    );
    if local_addrs.is_empty() && local_addrs6.is_empty() {
        tracing::warn!(
            "XDP: the relay at {relay_addr} has no address on {}: the program will \
             forward nothing and the userspace forwarder serves every session",
            interfaces.join(", ")
        );
    }
    if !left_out6.is_empty() {
        tracing::warn!(
            "XDP: more than {MAX_LOCAL_ADDRS} local IPv6 addresses; packets to {left_out6:?} \
             are forwarded in userspace"
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
        if relay_addr.is_ipv6() {
            forwarding.extend(enable_forwarding6(iface)?);
        }
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
        let config = RelayConfig {
            port: relay_addr.port().to_be(),
            relay_id: relay_id.to_be(),
            ..Default::default()
        };
        match try_load(
            object,
            *mode,
            interfaces,
            config,
            (&local_addrs, &local_addrs6),
            pin_dir,
            max_entries,
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
                        local_addrs6: local_addrs6.clone(),
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
    config: RelayConfig,
    (local_addrs, local_addrs6): (&[Ipv4Addr], &[Ipv6Addr]),
    pin_dir: &Path,
    max_entries: u32,
) -> anyhow::Result<(Ebpf, XdpTable)> {
    let mut loader = aya::EbpfLoader::new();
    loader.default_map_pin_directory(pin_dir);
    // The forwarding tables and their per-session counters, sized at load time
    // (preallocated by the kernel: memory is taken now, not as sessions come).
    for m in [MAP_RELAY, MAP_SESSION_STATS, MAP_RELAY6, MAP_SESSION_STATS6] {
        loader.map_max_entries(m, max_entries);
    }
    let mut ebpf = loader.load(object).with_context(|| {
        format!("loading the eBPF object with {max_entries} forwarding entries per table (a smaller --max-relay-entries needs less kernel memory)")
    })?;
    for m in PINNED_MAPS {
        // Maps declared without by-name pinning are pinned here.
        if let Some(map) = ebpf.map(m)
            && !pin_path(pin_dir, m).exists()
        {
            map.pin(pin_path(pin_dir, m))
                .with_context(|| format!("pinning {m}"))?;
        }
    }
    let config_value = config;
    {
        let mut config: Array<_, RelayConfig> = Array::try_from(
            ebpf.map_mut(MAP_CONFIG)
                .context("map ZTNA_CONFIG missing")?,
        )?;
        config.set(0, config_value, 0)?;
    }
    let v4: Vec<u32> = local_addrs
        .iter()
        .map(|a| u32::from_ne_bytes(a.octets()))
        .collect();
    sync_set(&mut ebpf, MAP_LOCAL_ADDRS, &v4)?;
    let v6: Vec<[u8; 16]> = local_addrs6.iter().map(|a| a.octets()).collect();
    sync_set(&mut ebpf, MAP_LOCAL_ADDRS6, &v6)?;
    tracing::info!(
        "XDP: forwarding packets to {local_addrs:?} and {local_addrs6:?} (the relay's own \
         addresses), relay ID {:#06x}",
        u16::from_be(config_value.relay_id)
    );
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
    fn local_ipv6_addresses_need_an_ipv6_socket_and_leave_link_local_out() {
        let ifaces = ["eth0".to_string(), "eth1".to_string()];
        let addrs_of = |iface: &str| -> Vec<Ipv6Addr> {
            match iface {
                "eth0" => vec!["2001:db8::1".parse().unwrap(), "fe80::1".parse().unwrap()],
                "eth1" => vec![
                    "2001:db8:1::1".parse().unwrap(),
                    "2001:db8::1".parse().unwrap(),
                ],
                _ => vec![],
            }
        };
        let wildcard6: IpAddr = "::".parse().unwrap();
        assert_eq!(
            relay_local_addrs6(wildcard6, &ifaces, addrs_of).0,
            vec![
                "2001:db8::1".parse::<Ipv6Addr>().unwrap(),
                "2001:db8:1::1".parse().unwrap()
            ]
        );
        let specific: IpAddr = "2001:db8::7".parse().unwrap();
        assert_eq!(
            relay_local_addrs6(specific, &ifaces, addrs_of).0,
            vec!["2001:db8::7".parse::<Ipv6Addr>().unwrap()]
        );
        for v4ish in ["0.0.0.0", "10.0.0.1", "::ffff:10.0.0.1", "fe80::9"] {
            let b: IpAddr = v4ish.parse().unwrap();
            assert_eq!(
                relay_local_addrs6(b, &ifaces, addrs_of),
                (vec![], vec![]),
                "{v4ish}"
            );
        }
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
