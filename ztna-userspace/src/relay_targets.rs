//! Where the relays are: `server` in the agent's and connector's settings, a list of
//! `HOST[:PORT]` entries where HOST is an address or a DNS name. A name stands for
//! every address it resolves to (the headless Service of the relay DaemonSet
//! resolves to each relay's node), and is resolved again every
//! [`REFRESH`] on a thread of its own, so registrations follow relays that appear
//! and disappear without a restart. The packet loop only picks up the result
//! ([`RelayWatch::take`]): no DNS lookup ever blocks it.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;

/// How often names are resolved again.
pub const REFRESH: Duration = Duration::from_secs(10);

/// One `server` entry: an address, or a name resolved to all its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayTarget {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

impl std::str::FromStr for RelayTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(RelayTarget::Addr(a));
        }
        if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
            return Ok(RelayTarget::Addr(SocketAddr::new(
                ip,
                ztna_core::DEFAULT_PORT,
            )));
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|e| format!("{s:?}: port {p:?}: {e}"))?,
            ),
            None => (s, ztna_core::DEFAULT_PORT),
        };
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(format!(
                "{s:?}: expected ADDRESS[:PORT] or HOSTNAME[:PORT] (port {})",
                ztna_core::DEFAULT_PORT
            ));
        }
        Ok(RelayTarget::Name {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for RelayTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayTarget::Addr(a) => write!(f, "{a}"),
            RelayTarget::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl<'de> Deserialize<'de> for RelayTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `server = "relays.example:4433"` or `server = ["10.0.0.1", "10.0.0.2:4433"]`;
/// a bad entry's error says why (an untagged enum would only say "no variant").
pub fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<RelayTarget>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<RelayTarget>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a relay \"HOST[:PORT]\" or a list of them")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![v.parse().map_err(E::custom)?])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(t) = seq.next_element::<RelayTarget>()? {
                out.push(t);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}

/// Every address of every target, in order, without repeats. A name that does not
/// resolve is an error naming it, with the resolver's reason.
pub fn resolve(targets: &[RelayTarget]) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    for t in targets {
        let addrs: Vec<SocketAddr> = match t {
            RelayTarget::Addr(a) => vec![*a],
            RelayTarget::Name { host, port } => {
                let mut v: Vec<SocketAddr> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| format!("resolving relay {t}: {e}"))?
                    .collect();
                // getaddrinfo's order varies between calls; a stable one keeps the
                // "primary" relay stable.
                v.sort();
                v
            }
        };
        for a in addrs {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    Ok(out)
}

/// Re-resolves the names of a target list in the background.
pub struct RelayWatch {
    latest: Mutex<Option<Vec<SocketAddr>>>,
    stop: AtomicBool,
}

impl RelayWatch {
    /// Starts the thread if some target is a name; `None` if all are addresses
    /// (nothing can change). `current` is what the caller runs with now: only a
    /// different, non-empty result is handed over.
    pub fn spawn(
        targets: Vec<RelayTarget>,
        current: Vec<SocketAddr>,
        every: Duration,
    ) -> Option<Arc<RelayWatch>> {
        if !targets
            .iter()
            .any(|t| matches!(t, RelayTarget::Name { .. }))
        {
            return None;
        }
        let watch = RelayWatch::manual();
        let w = watch.clone();
        std::thread::Builder::new()
            .name("relay-dns".into())
            .spawn(move || {
                let mut known = current;
                while !w.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                    match resolve(&targets) {
                        Ok(addrs) if !addrs.is_empty() && addrs != known => {
                            tracing::info!("relays now {addrs:?}");
                            known = addrs.clone();
                            w.publish(addrs);
                        }
                        Ok(_) => {}
                        // Keep the relays we have: a resolver hiccup is no reason
                        // to drop them.
                        Err(e) => tracing::warn!("{e}; keeping {known:?}"),
                    }
                }
            })
            .ok()?;
        Some(watch)
    }

    /// A watch fed by hand ([`RelayWatch::publish`]): tests, and drivers with
    /// their own source of relays.
    pub fn manual() -> Arc<RelayWatch> {
        Arc::new(RelayWatch {
            latest: Mutex::new(None),
            stop: AtomicBool::new(false),
        })
    }

    /// Hands `addrs` to the next `take`.
    pub fn publish(&self, addrs: Vec<SocketAddr>) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(addrs);
    }

    /// The new relay list, once per change.
    pub fn take(&self) -> Option<Vec<SocketAddr>> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Drop for RelayWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_names_and_default_port() {
        let p = |s: &str| s.parse::<RelayTarget>();
        assert_eq!(
            p("10.0.0.1:5000"),
            Ok(RelayTarget::Addr("10.0.0.1:5000".parse().unwrap()))
        );
        assert_eq!(
            p("10.0.0.1"),
            Ok(RelayTarget::Addr("10.0.0.1:4433".parse().unwrap()))
        );
        assert_eq!(
            p("[fd00::1]"),
            Ok(RelayTarget::Addr("[fd00::1]:4433".parse().unwrap()))
        );
        assert_eq!(
            p("relays.ztna.svc.cluster.local"),
            Ok(RelayTarget::Name {
                host: "relays.ztna.svc.cluster.local".into(),
                port: 4433
            })
        );
        assert!(p("relays:99999").unwrap_err().contains("port"));
        assert!(p("bad host:1").unwrap_err().contains("HOSTNAME"));
    }

    #[test]
    fn resolves_names_to_every_address_without_repeats() {
        let t: Vec<RelayTarget> = vec![
            "localhost:4433".parse().unwrap(),
            "127.0.0.1:4433".parse().unwrap(),
        ];
        let addrs = resolve(&t).unwrap();
        assert!(
            addrs.contains(&"127.0.0.1:4433".parse().unwrap()),
            "{addrs:?}"
        );
        let mut dedup = addrs.clone();
        dedup.dedup();
        assert_eq!(addrs.len(), dedup.len());
        let err = resolve(&["no-such-relay.invalid".parse().unwrap()]).unwrap_err();
        assert!(err.contains("no-such-relay.invalid"), "{err}");
    }
}
