//! The daemons' HTTP control plane: `/metrics` (Prometheus text format, from a
//! `prometheus_client` registry), `/healthz` (the packet loop turns) and `/readyz`
//! (the daemon can do its job: the intermediate's socket is bound and, with XDP,
//! the program attached; the connector is registered).
//!
//! It runs on its own thread with a single-threaded tokio runtime and hyper; the
//! packet loops stay on mio and only touch atomics ([`Health`], the counter
//! structs), which collectors read at scrape time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::counters::Counters;

/// A loop that has not turned for this long is reported unhealthy.
pub const STALL_AFTER: Duration = Duration::from_secs(10);

/// What the packet loop tells the health endpoints.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` at the loop's last turn.
    last_turn_ms: AtomicU64,
    ready: AtomicBool,
    /// Why not ready (shown by /readyz).
    not_ready: Mutex<String>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            started: Instant::now(),
            last_turn_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            not_ready: Mutex::new("starting".into()),
        }
    }
}

impl Health {
    /// Called by the packet loop at every turn.
    pub fn tick(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_turn_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn set_not_ready(&self, why: &str) {
        let mut w = self.not_ready.lock().unwrap_or_else(|e| e.into_inner());
        if *w != why {
            *w = why.to_string();
        }
        self.ready.store(false, Ordering::Relaxed);
    }

    /// How long ago the loop last turned.
    pub fn since_last_turn(&self) -> Duration {
        let last = Duration::from_millis(self.last_turn_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    fn healthz(&self) -> (StatusCode, String) {
        let idle = self.since_last_turn();
        if idle < STALL_AFTER {
            (StatusCode::OK, "ok\n".into())
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "packet loop has not turned for {:.1} s\n",
                    idle.as_secs_f64()
                ),
            )
        }
    }

    fn readyz(&self) -> (StatusCode, String) {
        if self.ready.load(Ordering::Relaxed) {
            (StatusCode::OK, "ready\n".into())
        } else {
            let why = self.not_ready.lock().unwrap_or_else(|e| e.into_inner());
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            )
        }
    }
}

/// The running HTTP server; stops when dropped.
pub struct MetricsServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds `listen` (errors carry the OS's reason) and serves the endpoints.
pub fn serve(
    listen: SocketAddr,
    registry: Registry,
    health: Arc<Health>,
) -> anyhow::Result<MetricsServer> {
    let std_listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("metrics: binding {listen}"))?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let registry = Arc::new(registry);
    let thread = std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("metrics: no runtime: {e}");
                    return;
                }
            };
            rt.block_on(accept_loop(std_listener, registry, health, stop_rx));
        })?;
    tracing::info!("metrics and health on http://{addr}/metrics, /healthz, /readyz");
    Ok(MetricsServer {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

async fn accept_loop(
    std_listener: std::net::TcpListener,
    registry: Arc<Registry>,
    health: Arc<Health>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(std_listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics: {e}");
            return;
        }
    };
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::debug!("metrics: accept: {e}");
                    continue;
                }
            },
        };
        let (registry, health) = (registry.clone(), health.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let r = respond(&req, &registry, &health);
                async move { Ok::<_, Infallible>(r) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            // A scraper that stalls cannot hold a connection open for ever.
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

fn respond(req: &Request<Incoming>, registry: &Registry, health: &Health) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, ctype: &'static str| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into(), PLAIN);
    }
    match req.uri().path() {
        "/metrics" => {
            let mut body = String::new();
            if let Err(e) = prometheus_client::encoding::text::encode(&mut body, registry) {
                return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"), PLAIN);
            }
            // Content negotiation as Prometheus's own clients do it: OpenMetrics for
            // scrapers that ask for it, the classic text format for everyone else
            // (older scrapers, promtool, curl).
            let wants_openmetrics = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("application/openmetrics-text"));
            if wants_openmetrics {
                text(
                    StatusCode::OK,
                    body,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
            } else {
                text(
                    StatusCode::OK,
                    openmetrics_to_classic(&body),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            }
        }
        "/healthz" => {
            let (s, b) = health.healthz();
            text(s, b, PLAIN)
        }
        "/readyz" => {
            let (s, b) = health.readyz();
            text(s, b, PLAIN)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n".into(),
            PLAIN,
        ),
    }
}

/// Rewrites prometheus-client's OpenMetrics text into the classic Prometheus text
/// format (0.0.4): a counter family `x` becomes `x_total` in its HELP and TYPE lines
/// (OpenMetrics names the family without the suffix its samples carry), `# UNIT` and
/// `# EOF` go, and empty label sets `{}` are dropped.
pub fn openmetrics_to_classic(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<(&str, &str)> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let family = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some((h, text)) = help.take()
                && h == name
            {
                out.push_str(&format!("# HELP {family} {text}\n"));
            }
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(&line.replacen("{}", "", 1));
        out.push('\n');
    }
    out
}

/// Exports a counter struct: field `f` as `ztna_<prefix>_<f>_total`.
#[derive(Debug)]
pub struct CountersCollector<C: Counters> {
    pub prefix: &'static str,
    pub counters: Arc<C>,
}

impl<C: Counters> Collector for CountersCollector<C> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut result = Ok(());
        self.counters.each(&mut |name, help, value| {
            if result.is_err() {
                return;
            }
            let name = format!("ztna_{}_{name}", self.prefix);
            // Doc lines arrive joined with their leading spaces.
            let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
            let help = if help.is_empty() {
                name.replace('_', " ")
            } else {
                help
            };
            result = encoder
                .encode_descriptor(
                    &name,
                    &help,
                    None,
                    prometheus_client::metrics::MetricType::Counter,
                )
                .and_then(|m| ConstCounter::new(value).encode(m));
        });
        result
    }
}

/// One labeled family, built at scrape time from values the daemon keeps.
pub fn encode_family<const N: usize>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    gauge: bool,
    rows: &[([(&str, &str); N], u64)],
) -> Result<(), std::fmt::Error> {
    use prometheus_client::metrics::MetricType;
    let kind = if gauge {
        MetricType::Gauge
    } else {
        MetricType::Counter
    };
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    if N == 0 {
        // One unlabeled sample (no `{}`).
        let value = rows.first().map_or(0, |r| r.1);
        return if gauge {
            ConstGauge::new(value as i64).encode(family)
        } else {
            ConstCounter::new(value).encode(family)
        };
    }
    for (labels, value) in rows {
        let m = family.encode_family(labels)?;
        if gauge {
            ConstGauge::new(*value as i64).encode(m)?;
        } else {
            ConstCounter::new(*value).encode(m)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::counters!(TestCounters {
        /// Things that happened.
        happened,
        plain,
    });

    fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        let mut r = agent.get(&format!("http://{addr}{path}")).call().unwrap();
        let status = r.status().as_u16();
        (status, r.body_mut().read_to_string().unwrap())
    }

    #[test]
    fn serves_counters_health_and_readiness_over_real_http() {
        let counters = Arc::new(TestCounters::default());
        counters.happened.store(7, Ordering::Relaxed);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(CountersCollector {
            prefix: "test",
            counters: counters.clone(),
        }));
        let health = Arc::new(Health::default());
        let server = serve("127.0.0.1:0".parse().unwrap(), registry, health.clone()).unwrap();
        let (status, body) = get(server.addr, "/metrics");
        assert_eq!(status, 200);
        assert!(
            body.contains("# HELP ztna_test_happened_total Things that happened.\n"),
            "{body}"
        );
        assert!(
            body.contains("# TYPE ztna_test_happened_total counter\n"),
            "{body}"
        );
        assert!(body.contains("ztna_test_happened_total 7\n"), "{body}");
        assert!(
            body.contains("# HELP ztna_test_plain_total ztna test plain\n"),
            "{body}"
        );
        assert!(!body.contains("# EOF"), "{body}");
        // OpenMetrics for those who ask for it.
        let mut r = ureq::get(&format!("http://{}/metrics", server.addr))
            .header("accept", "application/openmetrics-text; version=1.0.0")
            .call()
            .unwrap();
        let om = r.body_mut().read_to_string().unwrap();
        assert!(om.contains("# TYPE ztna_test_happened counter\n"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
        // Counters are read at scrape time.
        counters.happened.store(8, Ordering::Relaxed);
        assert!(
            get(server.addr, "/metrics")
                .1
                .contains("ztna_test_happened_total 8\n")
        );

        health.tick();
        assert_eq!(get(server.addr, "/healthz"), (200, "ok\n".into()));
        assert_eq!(
            get(server.addr, "/readyz"),
            (503, "not ready: starting\n".into())
        );
        health.set_not_ready("not registered with the intermediate");
        assert_eq!(
            get(server.addr, "/readyz"),
            (
                503,
                "not ready: not registered with the intermediate\n".into()
            )
        );
        health.set_ready();
        assert_eq!(get(server.addr, "/readyz"), (200, "ready\n".into()));
        assert_eq!(get(server.addr, "/nope").0, 404);
    }

    #[test]
    fn a_loop_that_stops_turning_is_unhealthy() {
        let health = Health {
            started: Instant::now() - STALL_AFTER - Duration::from_secs(1),
            ..Health::default()
        };
        let (status, body) = health.healthz();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.starts_with("packet loop has not turned for 11"),
            "{body}"
        );
        health.tick();
        assert_eq!(health.healthz().0, StatusCode::OK);
    }

    #[test]
    fn a_taken_port_is_reported_with_the_os_reason() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = serve(addr, Registry::default(), Arc::new(Health::default()))
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("Address already in use"), "{e:#}");
    }
}
