//! Operating the intermediate: the stats file, the metrics' gauges, reloads.

use super::*;

impl Intermediate {
    pub(super) fn write_stats_file(&self) {
        let Some(path) = &self.cfg.stats_file else {
            return;
        };
        let mut v = self.stats.snapshot();
        v["xdp_mode"] = self.xdp_mode().into();
        v["relay_sessions"] = self.relay.len().into();
        v["draining"] = self.is_draining().into();
        v["forwarder_threads"] = self.cfg.forwarder_threads.into();
        v["static_sessions"] = self
            .relay
            .sessions()
            .filter(|s| s.is_static)
            .map(|s| {
                let a = self.relay.entry(&s.agent_cid).map(|f| f.peer.to_string());
                let b = self.relay.entry(&s.connector_cid).map(|f| f.peer.to_string());
                serde_json::json!({ "a": a, "b": b, "dcid_a_to_b": hex(&s.connector_cid), "dcid_b_to_a": hex(&s.agent_cid) })
            })
            .collect::<Vec<_>>()
            .into();
        if let Some(totals) = self.xdp.as_ref().and_then(|x| x.verdict_totals().ok()) {
            v["xdp_verdicts"] = totals
                .into_iter()
                .map(|(k, n, _)| (k.name().to_string(), serde_json::Value::from(n)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, v.to_string())
            .and_then(|_| std::fs::rename(&tmp, path))
            .is_err()
        {
            tracing::debug!("writing {}", path.display());
        }
    }

    /// Applies what can change while connections run: the certificate, key and CA
    /// (for connections from now on: established ones keep their session), whether
    /// clients need certificates, the idle timeout of new connections, Retry. The new
    /// TLS context is built before anything changes, so a configuration that does not
    /// load changes nothing. Settings that need a restart are named in the log.
    pub fn reload(&mut self, new: IntermediateConfig) -> anyhow::Result<()> {
        let quic = quic_config(&new)?;
        let old = &self.cfg;
        let needs_restart = [
            ("listen", old.listen != new.listen),
            ("xdp", old.xdp != new.xdp),
            ("iface", old.xdp_interfaces != new.xdp_interfaces),
            ("bpf_pin_dir", old.bpf_pin_dir != new.bpf_pin_dir),
            ("metrics_listen", old.metrics_listen != new.metrics_listen),
            (
                "max_relay_entries",
                old.max_relay_entries != new.max_relay_entries,
            ),
            ("static_session", old.static_sessions != new.static_sessions),
            (
                "forwarder_threads",
                old.forwarder_threads != new.forwarder_threads,
            ),
            ("instance_id", old.instance_id != new.instance_id),
            ("relay_id", old.relay_id != new.relay_id),
            (
                "tunnel addresses",
                old.tunnel_ipv4 != new.tunnel_ipv4 || old.tunnel_ipv6 != new.tunnel_ipv6,
            ),
        ];
        for (what, changed) in needs_restart {
            if changed {
                tracing::warn!("reload: {what} changed; it takes effect at the next restart");
            }
        }
        let cert_pem = std::fs::read(&new.cert_file).unwrap_or_default();
        let fingerprint = ring::digest::digest(&ring::digest::SHA256, &cert_pem);
        self.quic = quic;
        self.cfg.cert_file = new.cert_file;
        self.cfg.key_file = new.key_file;
        self.cfg.ca_file = new.ca_file;
        self.cfg.require_client_cert = new.require_client_cert;
        self.cfg.idle_timeout = new.idle_timeout;
        self.cfg.retry = new.retry;
        self.cfg.stats_file = new.stats_file;
        // From the next drain on; a running one keeps its deadline.
        self.cfg.drain_timeout = new.drain_timeout;
        tracing::info!(
            "configuration reloaded: new connections get certificate {} (PEM SHA-256 {}), {} established connections keep theirs",
            self.cfg.cert_file.display(),
            hex(&fingerprint.as_ref()[..8]),
            self.clients.len()
        );
        Ok(())
    }

    /// Brings the gauges the metrics endpoint reads up to date (every
    /// [`GAUGES_EVERY`]).
    pub(super) fn update_gauges(&mut self) {
        self.stats
            .kernel_mixed_family_entries
            .store(self.relay.kernel_mixed_family, Ordering::Relaxed);
        let g = &self.gauges;
        let set = |a: &AtomicU64, v: usize| a.store(v as u64, Ordering::Relaxed);
        let (mut agents, mut connectors, mut other) = (0, 0, 0);
        for c in self.clients.values() {
            if !c.connector_of.is_empty() {
                connectors += 1;
            } else if !c.agent_of.is_empty() {
                agents += 1;
            } else {
                other += 1;
            }
        }
        set(&g.agents, agents);
        set(&g.connectors, connectors);
        set(&g.unregistered, other);
        set(&g.relay_sessions, self.relay.len());
        set(&g.datagram_flows, self.flows.len());
        set(&g.xdp_attached, usize::from(self.xdp.is_some()));
        set(&g.draining, usize::from(self.is_draining()));
        if let Some(totals) = self.xdp.as_ref().and_then(|x| x.verdict_totals().ok()) {
            for (v, packets, bytes) in totals {
                g.xdp_packets[v as usize].store(packets, Ordering::Relaxed);
                g.xdp_bytes[v as usize].store(bytes, Ordering::Relaxed);
            }
        }
    }
}
