//! Capabilities checked before a privileged step is tried, so that a process (a
//! container, typically) started without one stops with a message naming it, not
//! with an EPERM from somewhere inside the loader.

use anyhow::{Context, bail};

/// A Linux capability: its name and its bit in the capability sets
/// (`include/uapi/linux/capability.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub name: &'static str,
    pub bit: u32,
}

pub const CAP_NET_ADMIN: Capability = Capability {
    name: "CAP_NET_ADMIN",
    bit: 12,
};
pub const CAP_SYS_ADMIN: Capability = Capability {
    name: "CAP_SYS_ADMIN",
    bit: 21,
};
pub const CAP_PERFMON: Capability = Capability {
    name: "CAP_PERFMON",
    bit: 38,
};
pub const CAP_BPF: Capability = Capability {
    name: "CAP_BPF",
    bit: 39,
};

/// What loading the XDP program, creating and pinning its maps (CAP_BPF), passing
/// the verifier's checks for privileged programs (CAP_PERFMON) and attaching it to
/// an interface (CAP_NET_ADMIN) take. Each is shown to be needed by the deploy test
/// (ztna-netlab/tests/kube_play.rs), which removes them one at a time.
pub const XDP: &[Capability] = &[CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON];

/// The effective capability set of this process (`CapEff` in /proc/self/status).
pub fn effective() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")
        .context("reading /proc/self/status to check capabilities")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .context("no CapEff line in /proc/self/status")
}

/// The capabilities of `needed` missing from the effective set `eff`. CAP_SYS_ADMIN
/// stands in for CAP_BPF and CAP_PERFMON, as the kernel lets it (and kernels before
/// 5.8 know only it).
pub fn missing(eff: u64, needed: &[Capability]) -> Vec<Capability> {
    let has = |c: Capability| eff & (1 << c.bit) != 0;
    needed
        .iter()
        .copied()
        .filter(|&c| {
            let stand_in = (c == CAP_BPF || c == CAP_PERFMON) && has(CAP_SYS_ADMIN);
            !has(c) && !stand_in
        })
        .collect()
}

/// Fails, naming them, if this process lacks any of `needed` for `what`.
pub fn require(what: &str, needed: &[Capability]) -> anyhow::Result<()> {
    let lacking = missing(effective()?, needed);
    if lacking.is_empty() {
        return Ok(());
    }
    let names = |cs: &[Capability]| cs.iter().map(|c| c.name).collect::<Vec<_>>().join(", ");
    let setcap = needed
        .iter()
        .map(|c| c.name.to_lowercase())
        .collect::<Vec<_>>()
        .join(",");
    bail!(
        "{what} needs {} (missing: {}): in Kubernetes add {} to the container's \
         securityContext.capabilities.add (deploy/k8s/base/intermediate.yaml); \
         elsewhere run as root or grant them (setcap {setcap}+ep on the binary)",
        names(needed),
        names(&lacking),
        lacking
            .iter()
            .map(|c| c.name.trim_start_matches("CAP_"))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(caps: &[Capability]) -> u64 {
        caps.iter().fold(0, |s, c| s | 1 << c.bit)
    }

    #[test]
    fn names_what_is_missing() {
        assert_eq!(missing(set(XDP), XDP), vec![]);
        assert_eq!(
            missing(set(&[CAP_BPF, CAP_PERFMON]), XDP),
            vec![CAP_NET_ADMIN]
        );
        assert_eq!(missing(0, XDP), XDP.to_vec());
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon_only() {
        assert_eq!(missing(set(&[CAP_SYS_ADMIN]), XDP), vec![CAP_NET_ADMIN]);
    }

    #[test]
    fn bits_match_capability_h() {
        // /proc/self/status of a process with only CAP_BPF prints 0000008000000000.
        assert_eq!(set(&[CAP_BPF]), 0x0000_0080_0000_0000);
        assert_eq!(set(&[CAP_NET_ADMIN]), 0x1000);
    }
}
