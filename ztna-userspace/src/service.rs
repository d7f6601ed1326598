//! What a connector serves: a service id, the addresses agents use for it
//! (prefixes, published to the intermediate) and where its traffic goes (the
//! backend).
//!
//! `--service ID=BACKEND[@PREFIX[,PREFIX...]]`:
//!
//! | BACKEND | kernel mode (TUN + NAT) | userspace mode |
//! |---|---|---|
//! | `HOST:PORT` | the prefix's address is DNATed to HOST:PORT for TCP and UDP, to HOST for ICMP | UDP to HOST:PORT |
//! | `HOST` | DNAT to HOST, ports kept (every port of the host) | UDP to HOST, same port |
//! | `routed` | no DNAT: the prefixes are a real subnet the connector routes to | UDP to the packet's destination |
//!
//! In kernel mode the connector's host masquerades the agents' traffic, so
//! backends need no route back to the agents' addresses.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// Where a service's traffic goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// One address and port (TCP and UDP map to it).
    Addr(SocketAddr),
    /// A host: every port of it.
    Host(IpAddr),
    /// The prefixes themselves are reachable from the connector.
    Routed,
}

impl Backend {
    /// Where a packet to `dst` goes, in userspace mode.
    pub fn target(&self, dst: SocketAddr) -> SocketAddr {
        match *self {
            Backend::Addr(a) => a,
            Backend::Host(h) => SocketAddr::new(h, dst.port()),
            Backend::Routed => dst,
        }
    }
}

impl From<SocketAddr> for Backend {
    fn from(a: SocketAddr) -> Self {
        Backend::Addr(a)
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Addr(a) => write!(f, "{a}"),
            Backend::Host(h) => write!(f, "{h}"),
            Backend::Routed => f.write_str("routed"),
        }
    }
}

/// One service this connector provides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub id: String,
    /// Where the real service listens.
    pub backend: Backend,
    /// The addresses agents send to (published to the intermediate, which tells
    /// authorized agents to route them into the tunnel). Packets to any other
    /// address are dropped, so the connector cannot be used to reach arbitrary
    /// hosts. Empty accepts any (and publishes nothing).
    pub prefixes: Vec<IpNet>,
}

impl ServiceSpec {
    /// True if agents may send to `dst` for this service.
    pub fn covers(&self, dst: IpAddr) -> bool {
        self.prefixes.is_empty() || self.prefixes.iter().any(|p| p.contains(&dst))
    }
}

impl std::str::FromStr for ServiceSpec {
    type Err = String;

    /// `ID=BACKEND[@PREFIX[,PREFIX...]]` (see the module docs), where a prefix is
    /// an address (`10.100.0.1`, `fd00::5`: one host) or a CIDR block
    /// (`10.20.0.0/24`), e.g. `echo=127.0.0.1:9000@10.100.0.1,fd00:100::1`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (id, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("service {s:?}: expected ID=HOST:PORT[@PREFIX[,PREFIX...]]"))?;
        let (backend, prefixes) = match rest.split_once('@') {
            Some((b, list)) => (
                b,
                list.split(',')
                    .map(|p| parse_prefix(p).map_err(|e| format!("service {s:?}: {e}")))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => (rest, Vec::new()),
        };
        let backend = if backend == "routed" {
            Backend::Routed
        } else if let Ok(a) = backend.parse::<SocketAddr>() {
            Backend::Addr(a)
        } else {
            Backend::Host(backend.parse::<IpAddr>().map_err(|e| {
                format!("service {s:?}: backend {backend:?} is not HOST:PORT, HOST or routed: {e}")
            })?)
        };
        if backend == Backend::Routed && prefixes.is_empty() {
            return Err(format!(
                "service {s:?}: a routed service needs its prefixes (routed@10.20.0.0/24)"
            ));
        }
        if id.is_empty() {
            return Err(format!("service {s:?}: empty service id"));
        }
        Ok(ServiceSpec {
            id: id.to_string(),
            backend,
            prefixes,
        })
    }
}

/// In a config file, a service is a table: `id`, `backend` and `prefixes` (a list),
/// checked as the flag's `ID=BACKEND@PREFIX,...` form is.
impl<'de> serde::Deserialize<'de> for ServiceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            id: String,
            backend: String,
            #[serde(default)]
            prefixes: Vec<String>,
        }
        let t = Table::deserialize(d)?;
        let spec = if t.prefixes.is_empty() {
            format!("{}={}", t.id, t.backend)
        } else {
            format!("{}={}@{}", t.id, t.backend, t.prefixes.join(","))
        };
        spec.parse().map_err(serde::de::Error::custom)
    }
}

/// An address (a host prefix) or a CIDR block whose host bits are zero.
pub fn parse_prefix(p: &str) -> Result<IpNet, String> {
    if p.contains('/') {
        let net = p
            .parse::<IpNet>()
            .map_err(|e| format!("prefix {p:?}: {e}"))?;
        if net.trunc() != net {
            return Err(format!(
                "prefix {p:?} has host bits set (did you mean {}?)",
                net.trunc()
            ));
        }
        Ok(net)
    } else {
        p.parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|e| format!("address {p:?}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_backend_form_and_names_the_bad_part() {
        let s: ServiceSpec = "db=10.0.3.2:5432@10.100.0.5,fd00::5".parse().unwrap();
        assert_eq!(s.backend, Backend::Addr("10.0.3.2:5432".parse().unwrap()));
        assert_eq!(s.prefixes.len(), 2);
        assert!(s.covers("fd00::5".parse().unwrap()));
        assert!(!s.covers("10.100.0.6".parse().unwrap()));
        let h: ServiceSpec = "web=10.0.3.2@10.100.0.6".parse().unwrap();
        assert_eq!(h.backend, Backend::Host("10.0.3.2".parse().unwrap()));
        assert_eq!(
            h.backend.target("10.100.0.6:8080".parse().unwrap()),
            "10.0.3.2:8080".parse().unwrap()
        );
        let r: ServiceSpec = "lan=routed@10.20.0.0/24".parse().unwrap();
        assert_eq!(r.backend, Backend::Routed);
        assert!(r.covers("10.20.0.77".parse().unwrap()));
        let err = |x: &str| x.parse::<ServiceSpec>().unwrap_err();
        assert!(err("lan=routed").contains("needs its prefixes"));
        assert!(err("x=nowhere@10.0.0.1").contains("is not HOST:PORT, HOST or routed"));
        assert!(err("x=10.0.0.1@10.20.0.1/24").contains("host bits set"));
        assert!(err("x=10.0.0.1@10.20.0.300").contains("10.20.0.300"));
        assert!(err("=10.0.0.1").contains("empty service id"));
        assert!(err("nothing").contains("expected ID="));
    }
}
