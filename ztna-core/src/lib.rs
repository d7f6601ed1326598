//! Sans-IO core shared by the ztna agent (Linux CLI, and later the C ABI for macOS)
//! and the app connector: the agent engine ([`AgentEngine`]), the control-connection
//! client over quiche, data connections, NAT-traversal checks, peer identities and IP
//! packet helpers. Nothing here opens a socket or reads the clock; nothing here is
//! Linux-only.

pub mod agent;
pub mod client;
pub mod data;
pub mod frame_io;
pub mod identity;
pub mod p2p;
pub mod packet;
pub mod relays;
pub mod tls_files;

pub use agent::{AgentConfig, AgentEngine, AgentEvent, PathKind};
pub use client::{ClientConfig, ClientError, ClientEvent, ClientStats, ControlClient, Role};

/// ALPN of the control connection.
pub const ALPN: &[u8] = b"ztna-v1";

/// UDP payload size for every ztna QUIC connection. quiche's default of 1200 leaves
/// too little room for a 1280-byte inner packet; 1350 fits typical 1500-byte paths
/// with IPv6 and tunnel headers to spare.
pub const MAX_UDP_PAYLOAD: usize = 1350;

/// Transport settings every ztna QUIC connection shares: idle timeout, 1350-byte UDP
/// payloads (quiche's default of 1200 leaves too little room for a full inner packet),
/// flow-control windows, DATAGRAM queues.
pub fn apply_transport_defaults(c: &mut quiche::Config, idle_timeout: std::time::Duration) {
    c.set_max_idle_timeout(idle_timeout.as_millis() as u64);
    c.set_max_recv_udp_payload_size(MAX_UDP_PAYLOAD);
    c.set_max_send_udp_payload_size(MAX_UDP_PAYLOAD);
    c.set_initial_max_data(10_000_000);
    c.set_initial_max_stream_data_bidi_local(1_000_000);
    c.set_initial_max_stream_data_bidi_remote(1_000_000);
    c.set_initial_max_stream_data_uni(1_000_000);
    c.set_initial_max_streams_bidi(100);
    c.set_initial_max_streams_uni(100);
    c.enable_dgram(true, 4096, 4096);
}

/// Default UDP port of the intermediate.
pub const DEFAULT_PORT: u16 = 4433;

/// QUIC application error codes used in CONNECTION_CLOSE on ztna connections.
pub mod app_error {
    /// The intermediate is shutting down (SIGTERM); reconnect later.
    pub const SHUTTING_DOWN: u64 = 0x100;
    /// The client presented no certificate and client authentication is required.
    pub const CERTIFICATE_REQUIRED: u64 = 0x101;
    /// The client is closing on its own.
    pub const CLIENT_CLOSING: u64 = 0x102;
    /// The peer's certificate could not be parsed.
    pub const BAD_CERTIFICATE: u64 = 0x103;
    /// The peer's certificate does not cover the role and service (data connections).
    pub const NOT_AUTHORIZED: u64 = 0x104;
    /// The peer left too many control frames unread (granted no stream credit).
    pub const FRAME_QUEUE_FULL: u64 = 0x105;

    pub fn name(code: u64) -> &'static str {
        match code {
            SHUTTING_DOWN => "shutting down",
            CERTIFICATE_REQUIRED => "client certificate required",
            CLIENT_CLOSING => "client closing",
            BAD_CERTIFICATE => "bad certificate",
            NOT_AUTHORIZED => "not authorized",
            FRAME_QUEUE_FULL => "control frame queue full",
            _ => "unknown",
        }
    }
}
