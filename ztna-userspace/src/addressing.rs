//! Tunnel addresses: each agent connection gets an IPv4 address from a CGNAT pool
//! (100.64.0.0/10 by default) and an IPv6 address from a ULA prefix, unique among
//! the intermediate's live agents, so return traffic can be routed by destination
//! address and two agents never present the same source to a service.
//!
//! An agent's address is derived from a hash of its identity and probed forward
//! past addresses in use, so an agent that reconnects to the same intermediate
//! usually gets the address it had (its TCP connections survive a reconnect), and
//! agents sharing one certificate still get distinct addresses.
//!
//! The default IPv6 prefix is a /48 whose 40-bit global ID is taken from a hash of
//! the deployment's CA certificate (RFC 4193 asks for a random one; a hash of a
//! random key pair's certificate is as good and needs no configuration), so every
//! intermediate of one deployment derives the same prefix.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::flows::ClientId;

/// The default IPv4 pool: RFC 6598 shared address space, as Tailscale uses.
pub const DEFAULT_IPV4_POOL: &str = "100.64.0.0/10";

/// A /48 ULA prefix from a hash of `seed` (the CA certificate's bytes).
pub fn ula_from(seed: &[u8]) -> Ipv6Net {
    let h = ring::digest::digest(&ring::digest::SHA256, seed);
    let h = h.as_ref();
    let addr = Ipv6Addr::from([
        0xfd, h[0], h[1], h[2], h[3], h[4], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    Ipv6Net::new(addr, 48).expect("48 is a valid prefix length")
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("tunnel address pool {0} is too small (at least /30 for IPv4, /126 for IPv6)")]
    TooSmall(String),
    #[error("every tunnel address is in use")]
    Exhausted,
}

pub struct AddressPool {
    v4: Ipv4Net,
    v6: Ipv6Net,
    /// Usable host offsets: 1 ..= `size` (network and broadcast-like ends skipped).
    v4_size: u32,
    v6_size: u128,
    v4_used: HashMap<Ipv4Addr, ClientId>,
    v6_used: HashMap<Ipv6Addr, ClientId>,
    by_client: HashMap<ClientId, (Ipv4Addr, Ipv6Addr)>,
}

impl AddressPool {
    pub fn new(v4: Ipv4Net, v6: Ipv6Net) -> Result<Self, PoolError> {
        let v4 = v4.trunc();
        let v6 = v6.trunc();
        let v4_bits = 32 - u32::from(v4.prefix_len());
        let v6_bits = 128 - u32::from(v6.prefix_len());
        if v4_bits < 2 {
            return Err(PoolError::TooSmall(v4.to_string()));
        }
        if v6_bits < 2 {
            return Err(PoolError::TooSmall(v6.to_string()));
        }
        Ok(AddressPool {
            v4,
            v6,
            v4_size: (1u64 << v4_bits).saturating_sub(2).min(u64::from(u32::MAX)) as u32,
            v6_size: if v6_bits >= 128 {
                u128::MAX - 1
            } else {
                (1u128 << v6_bits) - 2
            },
            v4_used: HashMap::new(),
            v6_used: HashMap::new(),
            by_client: HashMap::new(),
        })
    }

    /// The addresses of `client`, assigning them on first use from `identity`'s hash.
    pub fn assign(
        &mut self,
        client: ClientId,
        identity: &str,
    ) -> Result<(Ipv4Addr, Ipv6Addr), PoolError> {
        if let Some(a) = self.by_client.get(&client) {
            return Ok(*a);
        }
        if self.v4_used.len() as u64 >= u64::from(self.v4_size) {
            return Err(PoolError::Exhausted);
        }
        let h = ring::digest::digest(&ring::digest::SHA256, identity.as_bytes());
        let h = h.as_ref();
        let seed = u128::from_be_bytes(h[..16].try_into().expect("16 bytes"));
        // Linear probing from the hashed offset; the pool is far from full in any
        // real deployment, so this ends after a few steps.
        let mut off4 = (seed % u128::from(self.v4_size)) as u32;
        let v4 = loop {
            let a = Ipv4Addr::from(u32::from(self.v4.network()) + 1 + off4);
            if !self.v4_used.contains_key(&a) {
                break a;
            }
            off4 = (off4 + 1) % self.v4_size;
        };
        let mut off6 = seed.rotate_left(64) % self.v6_size;
        let v6 = loop {
            let a = Ipv6Addr::from(u128::from(self.v6.network()) + 1 + off6);
            if !self.v6_used.contains_key(&a) {
                break a;
            }
            off6 = (off6 + 1) % self.v6_size;
        };
        self.v4_used.insert(v4, client);
        self.v6_used.insert(v6, client);
        self.by_client.insert(client, (v4, v6));
        Ok((v4, v6))
    }

    /// The client that holds `addr`, if any.
    pub fn owner_v4(&self, addr: Ipv4Addr) -> Option<ClientId> {
        self.v4_used.get(&addr).copied()
    }

    pub fn owner_v6(&self, addr: Ipv6Addr) -> Option<ClientId> {
        self.v6_used.get(&addr).copied()
    }

    /// Frees `client`'s addresses (its connection closed).
    pub fn release(&mut self, client: ClientId) {
        if let Some((v4, v6)) = self.by_client.remove(&client) {
            self.v4_used.remove(&v4);
            self.v6_used.remove(&v6);
        }
    }

    pub fn in_use(&self) -> usize {
        self.by_client.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(v4: &str) -> AddressPool {
        AddressPool::new(v4.parse().unwrap(), "fd00:1:2::/48".parse().unwrap()).unwrap()
    }

    #[test]
    fn same_identity_same_address_after_reconnect_and_distinct_when_shared() {
        let mut p = pool(DEFAULT_IPV4_POOL);
        let a = p.assign(1, "agent.echo.ztna").unwrap();
        assert_eq!(
            p.assign(1, "agent.echo.ztna").unwrap(),
            a,
            "stable per client"
        );
        let net: Ipv4Net = DEFAULT_IPV4_POOL.parse().unwrap();
        assert!(net.contains(&a.0));
        assert!("fd00:1:2::/48".parse::<Ipv6Net>().unwrap().contains(&a.1));
        // A second connection with the same certificate: a different address.
        let b = p.assign(2, "agent.echo.ztna").unwrap();
        assert_ne!(a.0, b.0);
        assert_ne!(a.1, b.1);
        assert_eq!(p.owner_v4(a.0), Some(1));
        assert_eq!(p.owner_v6(b.1), Some(2));
        // The first one reconnects after its old connection is gone: same address.
        p.release(1);
        p.release(2);
        assert_eq!(p.assign(3, "agent.echo.ztna").unwrap(), a);
        assert_eq!(p.in_use(), 1);
    }

    #[test]
    fn a_small_pool_fills_up_without_duplicates_then_refuses() {
        let mut p = pool("10.9.0.0/29"); // 6 usable hosts
        let mut seen = std::collections::HashSet::new();
        for id in 0..6 {
            let (v4, _) = p.assign(id, "same").unwrap();
            assert!(seen.insert(v4), "{v4} handed out twice");
            let host = u32::from(v4) - u32::from(Ipv4Addr::new(10, 9, 0, 0));
            assert!((1..=6).contains(&host), "{v4} is a usable host address");
        }
        assert_eq!(p.assign(6, "same"), Err(PoolError::Exhausted));
        p.release(3);
        assert!(p.assign(6, "same").is_ok());
        assert!(
            AddressPool::new("10.0.0.0/31".parse().unwrap(), "fd00::/64".parse().unwrap()).is_err()
        );
    }

    #[test]
    fn ula_prefix_is_per_deployment() {
        let a = ula_from(b"ca one");
        let b = ula_from(b"ca two");
        assert_eq!(a.prefix_len(), 48);
        assert_eq!(a.network().octets()[0], 0xfd);
        assert_ne!(a, b);
        assert_eq!(a, ula_from(b"ca one"));
    }
}
