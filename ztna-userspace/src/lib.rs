//! ztna userspace: the intermediate server, the app connector, the Linux agent and
//! the command-line tools. Binaries in `src/bin/` are thin wrappers over this library.

pub mod addressing;
pub mod agent;
pub mod batch;
pub mod caps;
pub mod client_metrics;
pub mod config;
pub mod connector;
pub mod connector_set;
pub mod counters;
pub mod echo;
pub mod flows;
pub mod identity;
pub mod intermediate;
pub mod intermediate_metrics;
pub mod kernel_nat;
pub mod logging;
pub mod metrics;
pub mod netif;
pub mod probe;
pub mod relay;
pub mod relay_targets;
pub mod service;
pub mod settings;
pub mod tun_agent;
pub mod user_tcp;
pub mod xdp;
