//! Prometheus metrics of the connector and of the Linux agent (`ztna-agent up`).
//! Labels are low-cardinality: a deployment's service names, paths, directions.
//!
//! Connector: `ztna_connector_services_registered` and `ztna_connector_services`
//! (gauges), `ztna_connector_data_connections` (gauge, open), and every counter of
//! `ConnectorStats` as `ztna_connector_<counter>_total`.
//!
//! Agent, from its status snapshot (refreshed every 500 ms): `ztna_agent_connected`,
//! `ztna_agent_service_registered{service}`, `ztna_agent_service_path{service,path}`
//! (1 for the path in use), `ztna_agent_service_rtt_seconds{service}`,
//! `ztna_agent_service_packets_total{service,direction}` and `..._bytes_total`, and
//! `ztna_agent_tun_dropped_total{reason}`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::connector::ConnectorStats;
use crate::metrics::{CountersCollector, encode_family};

/// Values the connector's loop sets.
#[derive(Debug, Default)]
pub struct ConnectorGauges {
    pub services: AtomicU64,
    pub services_registered: AtomicU64,
    pub data_connections: AtomicU64,
}

pub fn connector_registry(stats: Arc<ConnectorStats>, gauges: Arc<ConnectorGauges>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(ConnectorFamilies { gauges }));
    r.register_collector(Box::new(CountersCollector {
        prefix: "connector",
        counters: stats,
    }));
    r
}

#[derive(Debug)]
struct ConnectorFamilies {
    gauges: Arc<ConnectorGauges>,
}

impl Collector for ConnectorFamilies {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let g = &self.gauges;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, help, v) in [
            (
                "ztna_connector_services",
                "Services this connector provides",
                get(&g.services),
            ),
            (
                "ztna_connector_services_registered",
                "Services the intermediate has acknowledged on the current control connection",
                get(&g.services_registered),
            ),
            (
                "ztna_connector_data_connections",
                "Open data connections from agents (relayed and direct)",
                get(&g.data_connections),
            ),
        ] {
            encode_family::<0>(&mut e, name, help, true, &[([], v)])?;
        }
        Ok(())
    }
}

/// The agent's metrics from its status snapshot.
pub fn agent_registry(status: Arc<Mutex<String>>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(AgentStatusCollector { status }));
    r
}

#[derive(Debug)]
struct AgentStatusCollector {
    status: Arc<Mutex<String>>,
}

const PATHS: [&str; 4] = ["direct", "relay-xdp", "relay-userspace", "datagram"];

impl Collector for AgentStatusCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let text = self.status.lock().map(|s| s.clone()).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        encode_family::<0>(
            &mut e,
            "ztna_agent_connected",
            "1 while the control connection to the intermediate is up",
            true,
            &[([], u64::from(v["connected"].as_bool().unwrap_or(false)))],
        )?;
        let services = v["services"].as_array().cloned().unwrap_or_default();
        let name = |s: &serde_json::Value| s["name"].as_str().unwrap_or("").to_string();
        let names: Vec<String> = services.iter().map(name).collect();
        let registered: Vec<([(&str, &str); 1], u64)> = services
            .iter()
            .zip(&names)
            .map(|(s, n)| {
                (
                    [("service", n.as_str())],
                    u64::from(s["registered"].as_bool() == Some(true)),
                )
            })
            .collect();
        encode_family(
            &mut e,
            "ztna_agent_service_registered",
            "1 if the intermediate acknowledged the registration",
            true,
            &registered,
        )?;
        let mut path_rows = Vec::new();
        for (s, n) in services.iter().zip(&names) {
            for p in PATHS {
                path_rows.push((
                    [("service", n.as_str()), ("path", p)],
                    u64::from(s["path"] == p),
                ));
            }
        }
        encode_family(
            &mut e,
            "ztna_agent_service_path",
            "1 for the path each service's traffic takes now",
            true,
            &path_rows,
        )?;
        {
            let mut rtt = e.encode_descriptor(
                "ztna_agent_service_rtt_seconds",
                "Smoothed RTT of each service's current path",
                None,
                MetricType::Gauge,
            )?;
            for (s, n) in services.iter().zip(&names) {
                if let Some(ms) = s["rtt_ms"].as_f64() {
                    let labels = [("service", n.as_str())];
                    ConstGauge::new(ms / 1000.0).encode(rtt.encode_family(&labels)?)?;
                }
            }
        }
        for (metric, unit, help) in [
            (
                "ztna_agent_service_packets",
                "packets",
                "Packets through the tunnel per service and direction",
            ),
            (
                "ztna_agent_service_bytes",
                "bytes",
                "Bytes through the tunnel per service and direction",
            ),
        ] {
            let mut rows = Vec::new();
            for (s, n) in services.iter().zip(&names) {
                for dir in ["tx", "rx"] {
                    let v = n_of(&s["traffic"][format!("{dir}_{unit}")]);
                    rows.push(([("service", n.as_str()), ("direction", dir)], v));
                }
            }
            encode_family(&mut e, metric, help, false, &rows)?;
        }
        encode_family(
            &mut e,
            "ztna_agent_tun_dropped",
            "Packets from the tunnel device not sent, by reason",
            false,
            &[
                ([("reason", "no_route")], n(&v["tun_no_route"])),
                ([("reason", "too_big")], n(&v["tun_too_big"])),
                ([("reason", "send_failed")], n(&v["tun_send_failed"])),
                (
                    [("reason", "tun_write_dropped")],
                    n(&v["tun_write_dropped"]),
                ),
            ],
        )?;
        Ok(())
    }
}

fn n_of(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_metrics_follow_the_status_snapshot() {
        let status = Arc::new(Mutex::new(
            serde_json::json!({
                "connected": true,
                "services": [{
                    "name": "db", "registered": true, "path": "relay-xdp", "rtt_ms": 2.5,
                    "traffic": {"tx_packets": 3, "tx_bytes": 300, "rx_packets": 4, "rx_bytes": 400}
                }],
                "tun_no_route": 7
            })
            .to_string(),
        ));
        let r = agent_registry(status.clone());
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &r).unwrap();
        let text = crate::metrics::openmetrics_to_classic(&om);
        for line in [
            "ztna_agent_connected 1",
            "ztna_agent_service_registered{service=\"db\"} 1",
            "ztna_agent_service_path{service=\"db\",path=\"relay-xdp\"} 1",
            "ztna_agent_service_path{service=\"db\",path=\"direct\"} 0",
            "ztna_agent_service_rtt_seconds{service=\"db\"} 0.0025",
            "ztna_agent_service_packets_total{service=\"db\",direction=\"rx\"} 4",
            "ztna_agent_service_bytes_total{service=\"db\",direction=\"tx\"} 300",
            "ztna_agent_tun_dropped_total{reason=\"no_route\"} 7",
        ] {
            assert!(
                text.contains(&format!("{line}\n")),
                "{line} missing in\n{text}"
            );
        }
        *status.lock().unwrap() = "{}".into();
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &r).unwrap();
        assert!(om.contains("ztna_agent_connected 0\n"), "{om}");
    }
}
