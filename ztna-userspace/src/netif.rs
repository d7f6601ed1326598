//! Local interfaces: their addresses (host candidates) and `ip` for routes.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;

use anyhow::{Context, bail};

/// Runs `ip ARGS`, naming the command and its output in the error.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
use ztna_core::p2p::CandidateKind;
use ztna_core::p2p::{self, Candidate};

/// One address of a local interface, as getifaddrs(3) lists it.
struct IfAddr {
    name: String,
    up: bool,
    ip: IpAddr,
}

/// Every IPv4 and IPv6 address of every interface.
fn if_addrs() -> Vec<IfAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur points into the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: sa_family tells the layout.
        let ip = unsafe {
            match (*ifa.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        out.push(IfAddr {
            name: name.to_string_lossy().into_owned(),
            up: ifa.ifa_flags & libc::IFF_UP as u32 != 0,
            ip,
        });
    }
    // SAFETY: frees the list from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    out
}

/// Addresses of the interfaces that are up, without loopback and link-local ones.
pub fn interface_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    for a in if_addrs() {
        let skip = match a.ip {
            IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xffc0) == 0xfe80,
        };
        if a.up && !skip && !out.contains(&a.ip) {
            out.push(a.ip);
        }
    }
    out
}

/// Every IPv4 address of interface `iface` (whether it is up or not: they are this
/// host's addresses either way).
pub fn interface_ipv4_addrs(iface: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for a in if_addrs() {
        if let IpAddr::V4(v4) = a.ip
            && a.name == iface
            && !out.contains(&v4)
        {
            out.push(v4);
        }
    }
    out
}

/// Every IPv6 address of interface `iface`, link-local ones included (callers
/// filter what they cannot use).
pub fn interface_ipv6_addrs(iface: &str) -> Vec<std::net::Ipv6Addr> {
    let mut out = Vec::new();
    for a in if_addrs() {
        if let IpAddr::V6(v6) = a.ip
            && a.name == iface
            && !out.contains(&v6)
        {
            out.push(v6);
        }
    }
    out
}

/// Host candidates for a socket bound to `local` (this machine's interface
/// addresses when it is bound to the unspecified address), plus the
/// server-reflexive one.
pub fn candidates(local: SocketAddr, reflexive: Option<SocketAddr>) -> Vec<Candidate> {
    let hosts = if local.ip().is_unspecified() {
        interface_addrs()
    } else {
        Vec::new()
    };
    p2p::candidates(local, &hosts, reflexive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_for_a_bound_socket() {
        let c = candidates(
            "127.0.0.1:5000".parse().unwrap(),
            Some("203.0.113.9:6000".parse().unwrap()),
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].kind, CandidateKind::Host);
        assert_eq!(c[1].kind, CandidateKind::ServerReflexive);
        let same = candidates(
            "127.0.0.1:5000".parse().unwrap(),
            Some("127.0.0.1:5000".parse().unwrap()),
        );
        assert_eq!(
            same.len(),
            1,
            "a reflexive address equal to a host one is not repeated"
        );
        let any = candidates("0.0.0.0:5000".parse().unwrap(), None);
        assert!(
            any.iter()
                .all(|c| c.addr.port() == 5000 && c.addr.is_ipv4() && !c.addr.ip().is_loopback())
        );
    }

    #[test]
    fn ipv4_addresses_of_one_interface() {
        assert!(interface_ipv4_addrs("lo").contains(&Ipv4Addr::LOCALHOST));
        assert!(interface_ipv4_addrs("no-such-interface-ztna").is_empty());
        assert!(interface_ipv6_addrs("no-such-interface-ztna").is_empty());
    }
}
