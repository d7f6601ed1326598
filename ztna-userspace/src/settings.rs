//! The daemons' settings: each struct is at once their flags (with `ZTNA_*`
//! environment variables, via clap) and their TOML file (via serde); see [`config`]
//! for the layering. Defaults are applied after layering, by the `resolve` methods,
//! so that a file's value is not hidden by a flag's default. Example files:
//! `deploy/config/`.
//!
//! [`config`]: crate::config

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;
use crate::layered;
use crate::relay_targets::RelayTarget;
use crate::service::ServiceSpec;
use crate::xdp::XdpChoice;

/// `--metrics-listen`: an address, or `off`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Off,
    At(SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Listen::Off);
        }
        s.parse()
            .map(Listen::At)
            .map_err(|e| format!("{s:?}: {e} (expected ADDR:PORT or off)"))
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Listen {
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            Listen::Off => None,
            Listen::At(a) => Some(*a),
        }
    }
}

/// Most forwarder threads (`forwarder_threads`): more than any machine's cores, few
/// enough that a typo does not start a million threads.
pub const MAX_FORWARDER_THREADS: usize = 256;

/// `ztna-intermediate` settings.
#[derive(clap::Args, Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct IntermediateSettings {
    /// UDP address to listen on [default: 0.0.0.0:4433].
    #[arg(long, env = "ZTNA_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Server certificate chain (PEM). Required.
    #[arg(long, env = "ZTNA_CERT")]
    pub cert: Option<PathBuf>,
    /// Server private key (PEM). Required.
    #[arg(long, env = "ZTNA_KEY")]
    pub key: Option<PathBuf>,
    /// CA bundle that signs client certificates (PEM). Required unless
    /// insecure_no_client_auth.
    #[arg(long, env = "ZTNA_CA")]
    pub ca: Option<PathBuf>,
    /// Accept clients without certificates and authorize every registration.
    /// For local experiments only; logs a warning at start.
    #[arg(long, env = "ZTNA_INSECURE_NO_CLIENT_AUTH", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub insecure_no_client_auth: Option<bool>,
    /// QUIC idle timeout in seconds [default: 30].
    #[arg(long, env = "ZTNA_IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<u64>,
    /// Skip stateless retry (address validation) before creating connection state.
    #[arg(long, env = "ZTNA_NO_RETRY", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub no_retry: Option<bool>,
    /// XDP fast path: off, auto (native, then generic, then off), generic or
    /// native [default: off].
    #[arg(long, env = "ZTNA_XDP", value_enum)]
    pub xdp: Option<XdpChoice>,
    /// Interface(s) to attach the XDP program to (repeatable; the environment
    /// variable takes a comma-separated list).
    #[arg(long = "iface", env = "ZTNA_IFACE", value_delimiter = ',')]
    #[serde(default)]
    pub iface: Vec<String>,
    /// Directory for the XDP program's pinned maps [default:
    /// /sys/fs/bpf/ztna/<listen port>], so that instances never share maps.
    #[arg(long, env = "ZTNA_BPF_PIN_DIR")]
    pub bpf_pin_dir: Option<PathBuf>,
    /// A fixed relay session between two UDP addresses, A=B (repeatable): the log
    /// and the stats file give its two relay CIDs. For benchmarks and for checking
    /// a relay path without agents.
    #[arg(
        long = "static-session",
        env = "ZTNA_STATIC_SESSION",
        value_delimiter = ' '
    )]
    #[serde(default)]
    pub static_session: Vec<String>,
    /// Identity of this instance in its stateless-reset key (default: host name and
    /// UDP address). Give instances that share a server key different ones.
    #[arg(long, env = "ZTNA_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// This relay's ID in its relay CIDs (0-65535; bytes 1-2 of every relay CID).
    /// Packets to relay CIDs of another ID are dropped (userspace) or passed (XDP),
    /// never forwarded. Default: derived from the instance identity (SHA-256 of
    /// `instance_id`, else host name and UDP address), so it survives restarts;
    /// set distinct ones for relays that share an address.
    #[arg(long, env = "ZTNA_RELAY_ID")]
    pub relay_id: Option<u16>,
    /// Forwarding entries the relay holds (two per relay session), in userspace and
    /// in each XDP table; the kernel allocates the tables at this size when XDP
    /// loads [default: 65536].
    #[arg(long, env = "ZTNA_MAX_RELAY_ENTRIES")]
    pub max_relay_entries: Option<u32>,
    /// Threads of the userspace forwarder (1-256): the UDP port is bound this many
    /// times with SO_REUSEPORT, the kernel spreads flows over the sockets by their
    /// addresses, and each socket has a thread that forwards relayed packets (QUIC
    /// control traffic goes on to the main loop) [default: 1].
    #[arg(long, env = "ZTNA_FORWARDER_THREADS")]
    pub forwarder_threads: Option<usize>,
    /// Write counters as JSON to this file every second.
    #[arg(long, env = "ZTNA_STATS_FILE")]
    pub stats_file: Option<PathBuf>,
    /// Seconds a drain (SIGTERM) forwards the existing relay sessions at most:
    /// new sessions and registrations are refused, /readyz answers 503, and the
    /// intermediate exits once no session is left or this time has passed. 0: no
    /// drain, SIGTERM closes every connection at once (as SIGINT does) [default: 10].
    #[arg(long, env = "ZTNA_DRAIN_TIMEOUT", value_name = "SECS")]
    pub drain_timeout: Option<u64>,
    /// Serve /metrics, /healthz and /readyz over HTTP here, or `off`
    /// [default: 127.0.0.1:9090].
    #[arg(long, env = "ZTNA_METRICS_LISTEN")]
    pub metrics_listen: Option<Listen>,
    /// Default log filter (RUST_LOG overrides) [default: info].
    #[arg(long, env = "ZTNA_LOG")]
    pub log: Option<String>,
}

layered!(IntermediateSettings {
    listen,
    cert,
    key,
    ca,
    insecure_no_client_auth,
    idle_timeout_secs,
    no_retry,
    xdp,
    iface,
    bpf_pin_dir,
    static_session,
    instance_id,
    relay_id,
    max_relay_entries,
    forwarder_threads,
    stats_file,
    drain_timeout,
    metrics_listen,
    log,
});

/// The intermediate's settings with defaults applied.
#[derive(Debug, Clone)]
pub struct IntermediateResolved {
    pub cfg: crate::intermediate::IntermediateConfig,
    pub log: String,
}

impl IntermediateSettings {
    pub fn resolve(self) -> Result<IntermediateResolved, ConfigError> {
        let listen = self.listen.unwrap_or(([0, 0, 0, 0], 4433).into());
        let cert = self.cert.ok_or(ConfigError::Missing {
            what: "the server certificate",
            flag: "cert",
            env: "ZTNA_CERT",
            key: "cert",
        })?;
        let key = self.key.ok_or(ConfigError::Missing {
            what: "the server key",
            flag: "key",
            env: "ZTNA_KEY",
            key: "key",
        })?;
        let mut cfg = crate::intermediate::IntermediateConfig::new(listen, cert, key, self.ca);
        cfg.require_client_cert = !self.insecure_no_client_auth.unwrap_or(false);
        cfg.idle_timeout = Duration::from_secs(self.idle_timeout_secs.unwrap_or(30));
        cfg.retry = !self.no_retry.unwrap_or(false);
        cfg.xdp = self.xdp.unwrap_or(XdpChoice::Off);
        cfg.xdp_interfaces = self.iface;
        cfg.bpf_pin_dir = self.bpf_pin_dir;
        cfg.static_sessions = self
            .static_session
            .iter()
            .map(|s| parse_pair(s))
            .collect::<Result<_, _>>()
            .map_err(|why| ConfigError::Invalid {
                path: "static_session".into(),
                location: String::new(),
                why,
            })?;
        cfg.instance_id = self.instance_id;
        cfg.relay_id = self.relay_id;
        cfg.max_relay_entries = self
            .max_relay_entries
            .unwrap_or(ztna_common::relay::MAX_RELAY_ENTRIES)
            .max(2) as usize;
        cfg.forwarder_threads = match self.forwarder_threads.unwrap_or(1) {
            n @ 1..=MAX_FORWARDER_THREADS => n,
            n => {
                return Err(ConfigError::OutOfRange {
                    what: "the number of forwarder threads",
                    flag: "forwarder-threads",
                    env: "ZTNA_FORWARDER_THREADS",
                    key: "forwarder_threads",
                    value: n as u64,
                    min: 1,
                    max: MAX_FORWARDER_THREADS as u64,
                });
            }
        };
        cfg.stats_file = self.stats_file;
        cfg.drain_timeout = self.drain_timeout.map_or(
            crate::intermediate::DEFAULT_DRAIN_TIMEOUT,
            Duration::from_secs,
        );
        cfg.metrics_listen = self
            .metrics_listen
            .unwrap_or(Listen::At(([127, 0, 0, 1], 9090).into()))
            .addr();
        Ok(IntermediateResolved {
            cfg,
            log: self.log.unwrap_or_else(|| "info".into()),
        })
    }
}

fn parse_pair(s: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (a, b) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected A=B"))?;
    let p = |x: &str| x.parse::<SocketAddr>().map_err(|e| format!("{x:?}: {e}"));
    Ok((p(a)?, p(b)?))
}

/// How the connector delivers agents' packets to services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectorMode {
    Auto,
    Kernel,
    Userspace,
}

/// The client side shared by the connector and the agent: where the intermediate is
/// and how this side proves who it is. Both daemons' settings carry these fields
/// (declared by [`client_settings!`], since serde cannot combine `flatten` with
/// `deny_unknown_fields`); [`ClientSettings`] is the copy the rest works with.
#[derive(Default, Debug, Clone)]
pub struct ClientSettings {
    pub server: Vec<RelayTarget>,
    pub server_name: Option<String>,
    pub ca: Option<String>,
    pub insecure_skip_server_verify: Option<bool>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub max_backoff_ms: Option<u64>,
    pub metrics_listen: Option<Listen>,
    pub log: Option<String>,
}

/// Declares a client daemon's settings struct with the [`ClientSettings`] fields
/// first, then its own; implements `Layered` and `client()`.
macro_rules! client_settings {
    ($(#[$sm:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident : $t:ty,)* }) => {
        $(#[$sm])*
        pub struct $name {
            /// The relays (intermediates), repeatable: ADDRESS[:PORT] or
            /// HOSTNAME[:PORT], a name standing for every address it resolves to
            /// (re-resolved every 10 s); the environment variable takes a
            /// comma-separated list, the file a string or an array
            /// [default: 127.0.0.1:4433].
            #[arg(long, env = "ZTNA_SERVER", value_delimiter = ',', global = true)]
            #[serde(default, deserialize_with = "crate::relay_targets::one_or_many")]
            pub server: Vec<RelayTarget>,
            /// Name expected in the intermediate's certificate [default: intermediate.ztna].
            #[arg(long, env = "ZTNA_SERVER_NAME", global = true)]
            pub server_name: Option<String>,
            /// CA that signed the intermediate's certificate. Required unless
            /// insecure_skip_server_verify.
            #[arg(long, env = "ZTNA_CA", global = true)]
            pub ca: Option<String>,
            /// Skip verifying the intermediate's certificate (dev only).
            #[arg(long, env = "ZTNA_INSECURE_SKIP_SERVER_VERIFY", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", global = true)]
            pub insecure_skip_server_verify: Option<bool>,
            /// This side's certificate (SAN connector.<service>.ztna or agent.<service>.ztna).
            #[arg(long, env = "ZTNA_CERT", global = true)]
            pub cert: Option<String>,
            /// This side's private key.
            #[arg(long, env = "ZTNA_KEY", global = true)]
            pub key: Option<String>,
            /// Longest wait between reconnect attempts, in milliseconds [default: 5000].
            #[arg(long, env = "ZTNA_MAX_BACKOFF_MS", global = true)]
            pub max_backoff_ms: Option<u64>,
            /// Serve /metrics, /healthz and /readyz over HTTP here, or `off`.
            #[arg(long, env = "ZTNA_METRICS_LISTEN", global = true)]
            pub metrics_listen: Option<Listen>,
            /// Default log filter (RUST_LOG overrides).
            #[arg(long, env = "ZTNA_LOG", global = true)]
            pub log: Option<String>,
            $($(#[$fm])* pub $f: $t,)*
        }

        layered!($name {
            server, server_name, ca, insecure_skip_server_verify, cert, key,
            max_backoff_ms, metrics_listen, log, $($f),*
        });

        impl $name {
            pub fn client(&self) -> ClientSettings {
                ClientSettings {
                    server: self.server.clone(),
                    server_name: self.server_name.clone(),
                    ca: self.ca.clone(),
                    insecure_skip_server_verify: self.insecure_skip_server_verify,
                    cert: self.cert.clone(),
                    key: self.key.clone(),
                    max_backoff_ms: self.max_backoff_ms,
                    metrics_listen: self.metrics_listen.clone(),
                    log: self.log.clone(),
                }
            }
        }
    };
}

impl ClientSettings {
    /// The relay list as configured (default: 127.0.0.1:4433).
    pub fn relay_targets(&self) -> Vec<RelayTarget> {
        if self.server.is_empty() {
            vec![RelayTarget::Addr(
                ([127, 0, 0, 1], ztna_core::DEFAULT_PORT).into(),
            )]
        } else {
            self.server.clone()
        }
    }

    /// Every relay address, names resolved; a daemon starting before its relays'
    /// names resolve (a fresh cluster) waits, saying so every `retry`.
    pub fn relay_addrs_waiting(&self, retry: Duration) -> Vec<SocketAddr> {
        let targets = self.relay_targets();
        loop {
            match crate::relay_targets::resolve(&targets) {
                Ok(a) if !a.is_empty() => return a,
                Ok(_) => tracing::warn!("relays {targets:?}: no addresses; retrying in {retry:?}"),
                Err(e) => tracing::warn!("{e}; retrying in {retry:?}"),
            }
            std::thread::sleep(retry);
        }
    }

    /// The control client's configuration for `role`.
    pub fn client_config(
        &self,
        role: ztna_core::Role,
        services: Vec<String>,
    ) -> Result<ztna_core::ClientConfig, ConfigError> {
        if self.ca.is_none() && !self.insecure_skip_server_verify.unwrap_or(false) {
            return Err(ConfigError::Missing {
                what: "the CA that verifies the intermediate (or insecure_skip_server_verify)",
                flag: "ca",
                env: "ZTNA_CA",
                key: "ca",
            });
        }
        let server = match self.server.first() {
            Some(RelayTarget::Addr(a)) => *a,
            // Named relays: the caller sets `server` from `relay_addrs`.
            _ => ([127, 0, 0, 1], ztna_core::DEFAULT_PORT).into(),
        };
        let mut cfg = ztna_core::ClientConfig::new(server, role, services);
        cfg.server_name = self
            .server_name
            .clone()
            .unwrap_or_else(|| "intermediate.ztna".into());
        cfg.ca_file = self.ca.clone();
        cfg.cert_file = self.cert.clone();
        cfg.key_file = self.key.clone();
        cfg.backoff_max = Duration::from_millis(self.max_backoff_ms.unwrap_or(5000));
        Ok(cfg)
    }
}

client_settings! {
/// `ztna-connector` settings.
#[derive(clap::Args, Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ConnectorSettings {
    /// Service to provide, repeatable: ID=BACKEND[@PREFIX[,PREFIX...]], where
    /// BACKEND is HOST:PORT, HOST (every port) or `routed` (the prefixes are a
    /// subnet this host routes to) and a PREFIX an address or CIDR block agents
    /// reach the service at, e.g. db=10.0.3.2:5432@10.100.0.5. The environment
    /// variable takes a space-separated list; the file an array of tables
    /// `[[service]]` with `id`, `backend` and `prefixes`. Required.
    #[arg(long = "service", env = "ZTNA_SERVICE", value_delimiter = ' ')]
    #[serde(default)]
    pub service: Vec<ServiceSpec>,
    /// How agents' packets reach the services: `kernel` (a TUN device and the
    /// kernel's NAT: TCP, UDP, ICMP; needs CAP_NET_ADMIN), `userspace` (UDP and
    /// ICMP echo from this process, TCP through a userspace TCP/IP stack;
    /// unprivileged), `auto` (kernel when permitted) [default: auto].
    #[arg(long, env = "ZTNA_MODE", value_enum)]
    pub mode: Option<ConnectorMode>,
    /// TUN device of the kernel mode [default: ztnac0].
    #[arg(long, env = "ZTNA_TUN")]
    pub tun: Option<String>,
    /// Most concurrent flows (TCP connections, UDP flows) one agent may have
    /// through this connector; more are refused and counted [default: 1024].
    #[arg(long, env = "ZTNA_FLOWS_PER_AGENT")]
    pub flows_per_agent: Option<u32>,
    /// Local UDP address for the connection to the intermediate [default: 0.0.0.0:0,
    /// or [::]:0 for an IPv6 `--server`].
    #[arg(long, env = "ZTNA_BIND")]
    pub bind: Option<SocketAddr>,
}
}

client_settings! {
/// `ztna-agent` settings (the `up` subcommand uses them all; `echo` the client part
/// and the services).
#[derive(clap::Args, Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// Service to register for (repeatable; `echo` uses the first; the environment
    /// variable takes a comma-separated list). Required.
    #[arg(long = "service", env = "ZTNA_SERVICE", value_delimiter = ',', global = true)]
    #[serde(default)]
    pub service: Vec<String>,
    /// Keep to the datagram relay (no end-to-end data connection).
    #[arg(long, env = "ZTNA_DATAGRAM_ONLY", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", global = true)]
    pub datagram_only: Option<bool>,
    /// No hole punching: keep the data connection on the forwarded relay.
    #[arg(long, env = "ZTNA_NO_P2P", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", global = true)]
    pub no_p2p: Option<bool>,
    /// TUN device name of `up` [default: ztna0].
    #[arg(long, env = "ZTNA_TUN", global = true)]
    pub tun: Option<String>,
    /// Unix socket of `up`, read by `status` [default: $XDG_RUNTIME_DIR/ztna-agent.sock
    /// or /run/ztna-agent.sock].
    #[arg(long, env = "ZTNA_STATUS_SOCKET", global = true)]
    pub status_socket: Option<PathBuf>,
}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Layered, parse};
    use std::path::Path;

    #[test]
    fn the_example_configs_in_deploy_load_and_resolve() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config");
        let i: IntermediateSettings =
            crate::config::load_file(&dir.join("intermediate.toml")).unwrap();
        let i = i.resolve().unwrap();
        assert_eq!(i.cfg.listen.port(), 4433);
        assert_eq!(i.cfg.xdp, XdpChoice::Auto);
        assert_eq!(i.cfg.metrics_listen, Some("0.0.0.0:9090".parse().unwrap()));
        assert_eq!(i.cfg.relay_id, Some(1));
        assert_eq!(i.cfg.drain_timeout, Duration::from_secs(10));
        let c: ConnectorSettings = crate::config::load_file(&dir.join("connector.toml")).unwrap();
        assert_eq!(c.service.len(), 2, "{c:?}");
        assert_eq!(c.service[0].id, "db");
        assert!(
            c.client()
                .client_config(ztna_core::Role::Connector, vec![])
                .is_ok()
        );
        assert_eq!(c.server.len(), 2, "every relay: {:?}", c.server);
        let a: AgentSettings = crate::config::load_file(&dir.join("agent.toml")).unwrap();
        assert_eq!(a.service, vec!["db".to_string(), "web".to_string()]);
        assert_eq!(a.tun.as_deref(), Some("ztna0"));
        assert_eq!(
            a.server.last(),
            Some(&RelayTarget::Name {
                host: "relays.example.com".into(),
                port: 4433
            })
        );
    }

    #[test]
    fn server_takes_one_relay_or_a_list_and_names_the_file_and_key_when_bad() {
        let one: AgentSettings = parse("server = \"10.0.0.1\"\n", Path::new("a.toml")).unwrap();
        assert_eq!(
            one.server,
            vec![RelayTarget::Addr("10.0.0.1:4433".parse().unwrap())]
        );
        let many: AgentSettings = parse(
            "server = [\"10.0.0.1:5000\", \"relays.example\"]\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(many.server.len(), 2);
        let bad =
            parse::<AgentSettings>("server = [\"bad host\"]\n", Path::new("a.toml")).unwrap_err();
        let msg = bad.to_string();
        assert!(
            msg.contains("a.toml") && msg.contains("server") && msg.contains("HOSTNAME"),
            "{msg}"
        );
    }

    #[test]
    fn a_flag_beats_the_file_and_the_file_beats_the_default() {
        let file: IntermediateSettings = parse(
            "cert = \"/etc/ztna/c.pem\"\nkey = \"/etc/ztna/k.pem\"\nca = \"/etc/ztna/ca.pem\"\nidle_timeout_secs = 7\nxdp = \"generic\"\n",
            Path::new("i.toml"),
        )
        .unwrap();
        let flags = IntermediateSettings {
            idle_timeout_secs: Some(9),
            ..Default::default()
        };
        let r = flags.over(file).resolve().unwrap();
        assert_eq!(r.cfg.idle_timeout, Duration::from_secs(9));
        // Not set anywhere: the intermediate derives it from its identity.
        assert_eq!(r.cfg.relay_id, None);
        assert_eq!(r.cfg.drain_timeout, Duration::from_secs(10));
        assert_eq!(r.cfg.xdp, XdpChoice::Generic);
        assert_eq!(r.cfg.listen, "0.0.0.0:4433".parse().unwrap());
        let missing = IntermediateSettings::default().resolve().unwrap_err();
        assert_eq!(
            missing.to_string(),
            "the server certificate is required: --cert, ZTNA_CERT, or `cert` in the config file"
        );
    }

    #[test]
    fn forwarder_threads_layer_like_every_key_and_stay_in_range() {
        let file: IntermediateSettings = parse(
            "cert = \"/c.pem\"\nkey = \"/k.pem\"\nca = \"/ca.pem\"\nforwarder_threads = 4\n",
            Path::new("i.toml"),
        )
        .unwrap();
        assert_eq!(file.clone().resolve().unwrap().cfg.forwarder_threads, 4);
        let flags = IntermediateSettings {
            forwarder_threads: Some(2),
            ..Default::default()
        };
        assert_eq!(
            flags
                .over(file.clone())
                .resolve()
                .unwrap()
                .cfg
                .forwarder_threads,
            2
        );
        let unset = IntermediateSettings {
            forwarder_threads: None,
            ..file.clone()
        };
        assert_eq!(unset.resolve().unwrap().cfg.forwarder_threads, 1);
        for bad in [0, MAX_FORWARDER_THREADS + 1] {
            let s = IntermediateSettings {
                forwarder_threads: Some(bad),
                ..file.clone()
            };
            assert_eq!(
                s.resolve().unwrap_err().to_string(),
                format!(
                    "the number of forwarder threads must be 1 to 256, not {bad} (--forwarder-threads, ZTNA_FORWARDER_THREADS, or `forwarder_threads` in the config file)"
                )
            );
        }
    }

    #[test]
    fn bad_values_in_service_tables_name_the_entry() {
        let e = parse::<ConnectorSettings>(
            "[[service]]\nid = \"db\"\nbackend = \"10.0.3.2:5432\"\n\n[[service]]\nid = \"lan\"\nbackend = \"routed\"\n",
            Path::new("/etc/ztna/connector.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("config file /etc/ztna/connector.toml: key service[1]"),
            "{e}"
        );
        assert!(e.contains("needs its prefixes"), "{e}");
        let e = parse::<ConnectorSettings>(
            "[[service]]\nid = \"db\"\nbakend = \"x\"\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `bakend`"), "{e}");
    }
}
