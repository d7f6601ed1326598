//! Reading a lab's interfaces: iproute2's JSON for a link, its MAC address and
//! ifindex, the XDP program attached to it, and the per-queue packet counters of
//! veth (`ethtool -S`).

use anyhow::{Context, bail};
use serde_json::Value;

use crate::Lab;

impl Lab {
    /// `ip -j [FLAG] link show dev DEV` in `ns` (FLAG: `-s` statistics, `-d`
    /// details such as the XDP program).
    pub fn link(&self, ns: &str, dev: &str, flag: Option<&str>) -> anyhow::Result<Value> {
        let mut args = vec!["-j"];
        args.extend(flag);
        args.extend(["link", "show", "dev", dev]);
        let out = self.exec(ns, "ip", &args)?;
        let v: Value = serde_json::from_slice(&out.stdout).context("ip -j link")?;
        Ok(v[0].clone())
    }

    /// MAC address and ifindex of `dev` in `ns`.
    pub fn mac_ifindex(&self, ns: &str, dev: &str) -> anyhow::Result<([u8; 6], u32)> {
        let v = self.link(ns, dev, None)?;
        let s = v["address"].as_str().context("no MAC address")?;
        let mut m = [0u8; 6];
        for (i, b) in s.split(':').enumerate().take(6) {
            m[i] = u8::from_str_radix(b, 16)?;
        }
        let ifindex = v["ifindex"].as_u64().context("no ifindex")? as u32;
        Ok((m, ifindex))
    }

    /// Id of the XDP program attached to `dev` in `ns` (exactly that instance, even
    /// when other labs run programs of the same name).
    pub fn xdp_prog_id(&self, ns: &str, dev: &str) -> anyhow::Result<u32> {
        let v = self.link(ns, dev, Some("-d"))?;
        find_prog_id(&v["xdp"]).with_context(|| format!("no XDP program on {dev}: {v}"))
    }

    /// Packets each receive queue of veth `dev` in `ns` took (`ethtool -S`:
    /// `rx_queue_<i>_xdp_packets`). veth counts them only on a queue that runs in
    /// NAPI mode, i.e. while `dev` has an XDP program attached in native mode.
    pub fn rx_queue_packets(&self, ns: &str, dev: &str) -> anyhow::Result<Vec<u64>> {
        let out = self.exec(ns, "ethtool", &["-S", dev])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut per_queue = Vec::new();
        for line in text.lines() {
            let Some((k, v)) = line.trim().split_once(':') else {
                continue;
            };
            let Some(q) = k
                .strip_prefix("rx_queue_")
                .and_then(|r| r.strip_suffix("_xdp_packets"))
            else {
                continue;
            };
            let q: usize = q.parse().context("queue number")?;
            if per_queue.len() <= q {
                per_queue.resize(q + 1, 0);
            }
            per_queue[q] = v.trim().parse().context("queue counter")?;
        }
        if per_queue.is_empty() {
            bail!("ethtool -S {dev}: no per-queue counters:\n{text}");
        }
        Ok(per_queue)
    }
}

/// Finds "prog": {"id": N} anywhere in iproute2's JSON.
fn find_prog_id(v: &Value) -> Option<u32> {
    match v {
        Value::Object(m) => {
            if let Some(id) = m.get("prog").and_then(|p| p["id"].as_u64()) {
                return Some(id as u32);
            }
            m.values().find_map(find_prog_id)
        }
        Value::Array(a) => a.iter().find_map(find_prog_id),
        _ => None,
    }
}
