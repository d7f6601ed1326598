//! C ABI over [`ztna_core::AgentEngine`], for the macOS app's packet tunnel provider.
//!
//! The shape is boringtun's: an opaque handle, inputs pushed in, outputs polled out
//! into the caller's buffers. The caller owns the UDP socket, the tunnel
//! (`NEPacketTunnelFlow`) and the timer; this library starts no thread, opens no
//! socket and blocks nowhere. It reads the monotonic clock (`Instant::now`) itself on
//! every call, so the C side never passes a time.
//!
//! Every entry point checks its pointers, catches panics and returns a
//! [`ZtnaError`]; a handle whose call panicked is poisoned and answers every later
//! call with [`ZtnaError::Poisoned`] (its state may be half-updated), until freed.
//!
//! A handle is not thread-safe: calls on one handle must not overlap (the macOS app
//! makes them all from one serial dispatch queue). Different handles are
//! independent.
//!
//! The header `include/ztna_agent.h` is generated from this file by cbindgen
//! (`tests/header.rs` fails when it is stale; `ZTNA_BLESS=1` rewrites it).

use std::cell::Cell;
use std::ffi::{CStr, CString, c_char, c_void};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use ztna_core::agent::{AgentConfig, AgentEngine, AgentEvent, TUN_MTU};
use ztna_core::{ClientConfig, ClientError, MAX_UDP_PAYLOAD, Role};

mod log;
mod pem;

/// Result of every call. `ZTNA_ERROR_OK` (0) is success; `ZTNA_ERROR_NOTHING` (1) means "no
/// output right now" from a poll function and is not a failure; every other value
/// is an error, described by `ztna_error_message`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZtnaError {
    /// Success.
    Ok = 0,
    /// A poll found nothing to return (no datagram, no packet, no timer).
    Nothing = 1,
    /// A required pointer (handle, buffer, output) was null.
    NullPointer = 2,
    /// The output buffer is too small; the needed size was written to the length
    /// output, and the item is kept for the next call.
    BufferTooSmall = 3,
    /// A string was not valid UTF-8.
    InvalidUtf8 = 4,
    /// A socket address had an unknown family (not 4 or 6).
    InvalidAddress = 5,
    /// The configuration is unusable (no services, empty PEM, bad option).
    InvalidConfig = 6,
    /// The certificate, key or CA could not be written or loaded.
    Tls = 7,
    /// The engine refused to start (QUIC setup failed).
    Engine = 8,
    /// An input was empty (a datagram, a packet, the relay list) or longer than any
    /// valid datagram or packet.
    InvalidLength = 9,
    /// A call panicked inside the library; the handle is unusable (free it).
    Panic = 10,
    /// An earlier call on this handle panicked; only `ztna_agent_free` is valid.
    Poisoned = 11,
}

/// A socket address (or a bare IP address where the port is ignored).
///
/// Layout (20 bytes, alignment 2): byte 0 `family` (4 = IPv4, 6 = IPv6), byte 1
/// padding (write 0), bytes 2-3 `port` in host byte order, bytes 4-19 `addr` in
/// network byte order: an IPv4 address in `addr[0..4]` (the rest zero), an IPv6
/// address in all 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZtnaSockaddr {
    /// 4 for IPv4, 6 for IPv6.
    pub family: u8,
    /// Padding; write 0.
    pub _reserved: u8,
    /// Port, host byte order.
    pub port: u16,
    /// Address, network byte order (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
}

impl ZtnaSockaddr {
    fn to_std(self) -> Option<SocketAddr> {
        let ip = match self.family {
            4 => IpAddr::V4(Ipv4Addr::new(
                self.addr[0],
                self.addr[1],
                self.addr[2],
                self.addr[3],
            )),
            6 => IpAddr::V6(Ipv6Addr::from(self.addr)),
            _ => return None,
        };
        Some(SocketAddr::new(ip, self.port))
    }

    fn from_std(a: SocketAddr) -> Self {
        let (family, addr) = ip_bytes(a.ip());
        ZtnaSockaddr {
            family,
            _reserved: 0,
            port: a.port(),
            addr,
        }
    }
}

fn ip_bytes(ip: IpAddr) -> (u8, [u8; 16]) {
    let mut addr = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            (4, addr)
        }
        IpAddr::V6(v6) => (6, v6.octets()),
    }
}

/// One destination prefix to route into the tunnel.
///
/// Layout (18 bytes, alignment 1): byte 0 `family` (4 or 6), byte 1 `prefix_len`
/// (0-32 or 0-128), bytes 2-17 `addr` (network byte order, IPv4 in the first 4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZtnaPrefix {
    /// 4 for IPv4, 6 for IPv6.
    pub family: u8,
    /// Prefix length in bits.
    pub prefix_len: u8,
    /// Network address, network byte order (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
}

/// The tunnel interface's settings, for `NEPacketTunnelNetworkSettings`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZtnaTunnelInfo {
    /// 1 once the intermediate assigned the tunnel addresses, else 0 (and the
    /// addresses are zero).
    pub has_address: u8,
    /// Our IPv4 address inside the tunnel (network byte order; a /32).
    pub ipv4: [u8; 4],
    /// Our IPv6 address inside the tunnel (network byte order; a /128).
    pub ipv6: [u8; 16],
    /// MTU of the tunnel interface (1280).
    pub mtu: u16,
}

/// Severity of a log line.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ZtnaLogLevel {
    /// Something failed (the agent could not start, a TLS file was refused).
    Error = 1,
    /// Something went wrong and is being handled (disconnected, registration refused).
    Warn = 2,
    /// State changes: connected, registered, path changed, routes changed.
    Info = 3,
    /// Per-connection details.
    Debug = 4,
    /// Per-packet details.
    Trace = 5,
}

/// Log callback: `ctx` is the configuration's `log_ctx`; `message` is a
/// NUL-terminated UTF-8 line, valid only during the call. Called only from inside
/// the library's functions, on the caller's thread.
pub type ZtnaLogFn =
    Option<unsafe extern "C" fn(ctx: *mut c_void, level: ZtnaLogLevel, message: *const c_char)>;

/// Option bit: open end-to-end QUIC data connections (relayed, then direct). Without
/// it every service uses the datagram relay on the control connection.
pub const ZTNA_OPT_DATA_PATH: u32 = 1;
/// Option bit: hole punching and direct data connections (needs
/// `ZTNA_OPT_DATA_PATH`).
pub const ZTNA_OPT_P2P: u32 = 2;
/// Buffer size that always fits one outgoing UDP datagram (`ztna_agent_poll_udp`).
pub const ZTNA_MAX_DATAGRAM: usize = 1350;
/// Buffer size that always fits one tunnel packet (`ztna_agent_poll_tun`); the
/// tunnel MTU is 1280, packets from the data path are never larger than a datagram.
pub const ZTNA_MAX_PACKET: usize = 1350;
// Literals above so that the header shows numbers; they must follow the engine.
const _: () = assert!(ZTNA_MAX_DATAGRAM == MAX_UDP_PAYLOAD && ZTNA_MAX_PACKET >= TUN_MTU as usize);

/// Everything `ztna_agent_new` needs. Pointers are read during the call only.
#[repr(C)]
pub struct ZtnaAgentConfig {
    /// UDP address of the intermediate (the relay). A deployment with several
    /// passes them all to `ztna_agent_set_relays` after creating the agent.
    pub intermediate: ZtnaSockaddr,
    /// Name checked against the intermediate's certificate and sent as SNI
    /// (NUL-terminated UTF-8); null means "intermediate.ztna".
    pub server_name: *const c_char,
    /// PEM of the CA that signs the intermediate's and the connectors'
    /// certificates.
    pub ca_pem: *const u8,
    /// Length of `ca_pem` in bytes.
    pub ca_pem_len: usize,
    /// PEM of this agent's certificate (chain).
    pub cert_pem: *const u8,
    /// Length of `cert_pem` in bytes.
    pub cert_pem_len: usize,
    /// PEM of this agent's private key.
    pub key_pem: *const u8,
    /// Length of `key_pem` in bytes.
    pub key_pem_len: usize,
    /// Service ids to register, `services_len` NUL-terminated UTF-8 strings.
    pub services: *const *const c_char,
    /// Number of entries in `services` (at least 1).
    pub services_len: usize,
    /// Address of the caller's UDP socket (its port is advertised in NAT-traversal
    /// candidates); family 0 means 0.0.0.0:0. A specific address is also the host
    /// candidate; for a socket bound to the unspecified address, pass the
    /// interface addresses with `ztna_agent_network_changed` after creating.
    pub local: ZtnaSockaddr,
    /// `ZTNA_OPT_*` bits.
    pub options: u32,
    /// Keepalive interval on the control connection in ms; 0 for the default (5 s).
    pub keepalive_ms: u32,
    /// Idle timeout of the QUIC connections in ms; 0 for the default (30 s).
    pub idle_timeout_ms: u32,
    /// Most verbose level passed to `log`: a `ztna_log_level` value (1 error to 5
    /// trace); 0 logs nothing. An integer, not the enum, so that any value a C
    /// caller stores is valid.
    pub log_level: u32,
    /// Log callback, or null for no logging.
    pub log: ZtnaLogFn,
    /// Passed back to `log` as its first argument.
    pub log_ctx: *mut c_void,
}

/// An agent: the engine, the private PEM files and the output waiting for a larger
/// buffer. Opaque to C.
pub struct ZtnaAgent {
    engine: AgentEngine,
    log: log::Logger,
    /// Kept alive for the engine (quiche reloads nothing later, but data connections
    /// build their TLS config from the paths at start); removed on free.
    _pem: pem::PemDir,
    /// A datagram polled from the engine that did not fit the caller's buffer.
    pending_udp: Option<(Vec<u8>, SocketAddr)>,
    /// A tunnel packet polled from the engine that did not fit the caller's buffer.
    pending_tun: Option<Vec<u8>>,
    /// Scratch for inputs: the engine decrypts in place, the caller's bytes are
    /// const.
    scratch: Vec<u8>,
    poisoned: Cell<bool>,
}

/// Runs `f` with panics caught; logs go to `log` while it runs.
fn guard(f: impl FnOnce() -> ZtnaError) -> ZtnaError {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(ZtnaError::Panic)
}

/// Checks the handle, then runs `f` on it with its logger installed; a panic
/// poisons the handle.
///
/// # Safety
/// `agent` is null or a pointer from `ztna_agent_new` not yet freed.
unsafe fn with_agent(
    agent: *mut ZtnaAgent,
    f: impl FnOnce(&mut ZtnaAgent) -> ZtnaError,
) -> ZtnaError {
    // SAFETY: the caller passes null or a live handle, used by one thread at a time.
    let Some(a) = (unsafe { agent.as_mut() }) else {
        return ZtnaError::NullPointer;
    };
    if a.poisoned.get() {
        return ZtnaError::Poisoned;
    }
    let dispatch = a.log.dispatch();
    let r = catch_unwind(AssertUnwindSafe(|| {
        tracing::dispatcher::with_default(&dispatch, || {
            let r = f(a);
            a.drain_events();
            r
        })
    }));
    match r {
        Ok(e) => e,
        Err(_) => {
            a.poisoned.set(true);
            ZtnaError::Panic
        }
    }
}

impl ZtnaAgent {
    /// Follows a new relay list, logged.
    fn set_relays(&mut self, addrs: &[SocketAddr]) -> Result<(), ClientError> {
        let now = Instant::now();
        // With several relays the engine judges each one's liveness in a second, so
        // a lost relay's services move.
        self.engine.set_relays(addrs, now)?;
        let shown: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        self.log
            .line(ZtnaLogLevel::Info, &format!("relays: {}", shown.join(", ")));
        Ok(())
    }

    /// Turns the engine's events into log lines (the status JSON has the state).
    fn drain_events(&mut self) {
        while let Some(ev) = self.engine.poll_event() {
            let (level, msg) = match &ev {
                AgentEvent::Connected { handshake } => (
                    ZtnaLogLevel::Info,
                    format!("connected to the intermediate (handshake {handshake:?})"),
                ),
                AgentEvent::ObservedAddress(a) => {
                    (ZtnaLogLevel::Info, format!("observed address {a}"))
                }
                AgentEvent::Registered(s) => (ZtnaLogLevel::Info, format!("registered {s}")),
                AgentEvent::Refused { service, status } => (
                    ZtnaLogLevel::Warn,
                    format!("registration of {service} refused: {status:?}"),
                ),
                AgentEvent::Disconnected { reason, retry_in } => (
                    ZtnaLogLevel::Warn,
                    format!("disconnected: {reason}; retry in {retry_in:?}"),
                ),
                AgentEvent::PathChanged(c) => (
                    ZtnaLogLevel::Info,
                    format!("{} now takes the {} path", c.service, c.path),
                ),
                AgentEvent::RoutesChanged => (ZtnaLogLevel::Info, "routes changed".to_string()),
            };
            self.log.line(level, &msg);
        }
    }
}

/// Reads `len` bytes at `ptr`; null is an error unless `len` is 0.
///
/// # Safety
/// `ptr` is null or valid for `len` bytes.
unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> Result<&'a [u8], ZtnaError> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(ZtnaError::NullPointer);
    }
    // SAFETY: non-null and valid for `len` bytes by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// # Safety
/// `ptr` is null or a NUL-terminated string.
unsafe fn utf8<'a>(ptr: *const c_char) -> Result<&'a str, ZtnaError> {
    if ptr.is_null() {
        return Err(ZtnaError::NullPointer);
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(ptr) }
        .to_str()
        .map_err(|_| ZtnaError::InvalidUtf8)
}

/// # Safety
/// Every pointer in `cfg` is valid as its field documents.
unsafe fn build(cfg: &ZtnaAgentConfig) -> Result<Box<ZtnaAgent>, ZtnaError> {
    let max = match cfg.log_level {
        0 => None,
        1 => Some(ZtnaLogLevel::Error),
        2 => Some(ZtnaLogLevel::Warn),
        3 => Some(ZtnaLogLevel::Info),
        4 => Some(ZtnaLogLevel::Debug),
        _ => Some(ZtnaLogLevel::Trace),
    };
    let logger = log::Logger::new(
        if max.is_some() { cfg.log } else { None },
        cfg.log_ctx,
        max.unwrap_or(ZtnaLogLevel::Error),
    );
    let server = cfg.intermediate.to_std().ok_or(ZtnaError::InvalidAddress)?;
    let local = if cfg.local.family == 0 {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        cfg.local.to_std().ok_or(ZtnaError::InvalidAddress)?
    };
    let server_name = if cfg.server_name.is_null() {
        "intermediate.ztna".to_string()
    } else {
        // SAFETY: non-null, NUL-terminated by the field's contract.
        unsafe { utf8(cfg.server_name) }?.to_string()
    };
    if cfg.services_len == 0 {
        return Err(ZtnaError::InvalidConfig);
    }
    if cfg.services.is_null() {
        return Err(ZtnaError::NullPointer);
    }
    // SAFETY: `services_len` pointers by the field's contract.
    let ptrs = unsafe { std::slice::from_raw_parts(cfg.services, cfg.services_len) };
    let mut services = Vec::with_capacity(ptrs.len());
    for &p in ptrs {
        // SAFETY: each is a NUL-terminated string by the field's contract.
        let s = unsafe { utf8(p) }?;
        if s.is_empty() {
            return Err(ZtnaError::InvalidConfig);
        }
        services.push(s.to_string());
    }
    // SAFETY: pointer/length pairs by the fields' contract.
    let (ca, cert, key) = unsafe {
        (
            bytes(cfg.ca_pem, cfg.ca_pem_len)?,
            bytes(cfg.cert_pem, cfg.cert_pem_len)?,
            bytes(cfg.key_pem, cfg.key_pem_len)?,
        )
    };
    if ca.is_empty() || cert.is_empty() || key.is_empty() {
        return Err(ZtnaError::InvalidConfig);
    }
    if cfg.options & !(ZTNA_OPT_DATA_PATH | ZTNA_OPT_P2P) != 0 {
        return Err(ZtnaError::InvalidConfig);
    }
    let pem = pem::PemDir::write(ca, cert, key).map_err(|e| {
        logger.line(ZtnaLogLevel::Error, &format!("writing the PEM files: {e}"));
        ZtnaError::Tls
    })?;

    let mut client = ClientConfig::new(server, Role::Agent, services);
    client.server_name = server_name;
    client.ca_file = Some(path_str(&pem.ca));
    client.cert_file = Some(path_str(&pem.cert));
    client.key_file = Some(path_str(&pem.key));
    if cfg.keepalive_ms != 0 {
        client.keepalive = Duration::from_millis(cfg.keepalive_ms.into());
    }
    if cfg.idle_timeout_ms != 0 {
        client.idle_timeout = Duration::from_millis(cfg.idle_timeout_ms.into());
    }
    let mut agent_cfg = AgentConfig::new(client);
    agent_cfg.data_path = cfg.options & ZTNA_OPT_DATA_PATH != 0;
    agent_cfg.p2p = agent_cfg.data_path && cfg.options & ZTNA_OPT_P2P != 0;
    let host_addrs = if local.ip().is_unspecified() {
        Vec::new()
    } else {
        vec![local.ip()]
    };
    let dispatch = logger.dispatch();
    let engine = tracing::dispatcher::with_default(&dispatch, || {
        AgentEngine::new(agent_cfg, local, host_addrs, Instant::now())
    })
    .map_err(|e| {
        logger.line(ZtnaLogLevel::Error, &format!("starting the agent: {e}"));
        engine_error(&e)
    })?;
    Ok(Box::new(ZtnaAgent {
        engine,
        log: logger,
        _pem: pem,
        pending_udp: None,
        pending_tun: None,
        scratch: vec![0; 65536],
        poisoned: Cell::new(false),
    }))
}

/// The code for an engine that refused a configuration.
fn engine_error(e: &ClientError) -> ZtnaError {
    match e {
        ClientError::TlsFile(_) => ZtnaError::Tls,
        _ => ZtnaError::Engine,
    }
}

fn path_str(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Creates an agent and starts connecting to the intermediate (the first datagrams
/// come out of `ztna_agent_poll_udp`). The certificate, key and CA are written to
/// private temporary files (mode 0600 in a fresh 0700 directory, removed by
/// `ztna_agent_free`) because the QUIC library loads them from files.
///
/// On success `*out` is the handle, to be released with `ztna_agent_free`; on
/// failure `*out` is null.
///
/// # Safety
/// `config` is null or points to a valid `ztna_agent_config`; `out` is null or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ztna_agent_new(
    config: *const ZtnaAgentConfig,
    out: *mut *mut ZtnaAgent,
) -> ZtnaError {
    guard(|| {
        if out.is_null() {
            return ZtnaError::NullPointer;
        }
        // SAFETY: non-null and writable.
        unsafe { *out = std::ptr::null_mut() };
        // SAFETY: null or valid, by the contract.
        let Some(cfg) = (unsafe { config.as_ref() }) else {
            return ZtnaError::NullPointer;
        };
        // SAFETY: the fields are valid by the contract.
        match unsafe { build(cfg) } {
            Ok(mut a) => {
                let dispatch = a.log.dispatch();
                tracing::dispatcher::with_default(&dispatch, || a.drain_events());
                // SAFETY: non-null and writable.
                unsafe { *out = Box::into_raw(a) };
                ZtnaError::Ok
            }
            Err(e) => e,
        }
    })
}

/// Releases an agent: its connections are dropped without a goodbye (call
/// `ztna_agent_close` and send what `ztna_agent_poll_udp` returns first for a
/// clean close) and its temporary PEM files are removed. Null is ignored.
///
/// # Safety
/// `agent` is null or a handle from `ztna_agent_new` not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ztna_agent_free(agent: *mut ZtnaAgent) {
    let _ = guard(|| {
        if !agent.is_null() {
            // SAFETY: a live handle from `Box::into_raw`, freed once.
            drop(unsafe { Box::from_raw(agent) });
        }
        ZtnaError::Ok
    });
}

/// Closes every connection gracefully; the CONNECTION_CLOSE datagrams come out of
/// `ztna_agent_poll_udp`. The agent does not reconnect afterwards.
///
/// # Safety
/// `agent` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ztna_agent_close(agent: *mut ZtnaAgent) -> ZtnaError {
    // SAFETY: forwarded contract.
    unsafe {
        with_agent(agent, |a| {
            a.engine.close();
            ZtnaError::Ok
        })
    }
}

/// Feeds one UDP datagram received on the caller's socket from `from`. The bytes
/// are copied; the buffer may be reused at once.
///
/// # Safety
/// `agent` is null or a live handle; `bytes` is null or valid for `len` bytes;
/// `from` is null or valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ztna_agent_udp_input(
    agent: *mut ZtnaAgent,
    bytes: *const u8,
    len: usize,
    from: *const ZtnaSockaddr,
) -> ZtnaError {
    // SAFETY: forwarded contract.
    unsafe {
        with_agent(agent, |a| {
            if bytes.is_null() {
                return ZtnaError::NullPointer;
            }
            let Some(from) = from.as_ref() else {
                return ZtnaError::NullPointer;
            };
            let Some(from) = from.to_std() else {
                return ZtnaError::InvalidAddress;
            };
            if len == 0 || len > a.scratch.len() {
                return ZtnaError::InvalidLength;
            }
            a.scratch[..len].copy_from_slice(std::slice::from_raw_parts(bytes, len));
            a.engine
                .handle_udp(&mut a.scratch[..len], from, Instant::now());
            ZtnaError::Ok
        })
    }
}

/// Feeds one IP packet read from the tunnel (an IPv4 or IPv6 packet, no
/// link-layer or `utun` header). The bytes are copied. Packets to no service are
/// answered with ICMP (out of `ztna_agent_poll_tun`), not with an error.
///
/// # Safety
/// `agent` is null or a live handle; `packet` is null or valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ztna_agent_tun_input(
    agent: *mut ZtnaAgent,
    packet: *const u8,
    len: usize,
) -> ZtnaError {
    // SAFETY: forwarded contract.
    unsafe {
        with_agent(agent, |a| {
            if packet.is_null() {
                return ZtnaError::NullPointer;
            }
            if len == 0 || len > a.scratch.len() {
                return ZtnaError::InvalidLength;
            }
            a.scratch[..len].copy_from_slice(std::slice::from_raw_parts(packet, len));
            a.engine.handle_tun(&mut a.scratch[..len], Instant::now());
            ZtnaError::Ok
        })
    }
}

/// Takes the next UDP datagram to send: its bytes into `out` (capacity `cap`), its
/// length into `*out_len`, its destination into `*to`. Returns `ZTNA_ERROR_NOTHING` when
/// there is none (call again after the next input or timeout). When `cap` is too
/// small, returns `ZTNA_ERROR_BUFFER_TOO_SMALL` with the needed size in `*out_len`
/// and keeps the datagram for the next call. `ZTNA_MAX_DATAGRAM` bytes always fit.
/// Call until `ZTNA_ERROR_NOTHING` after every input.
///
/// # Safety
/// `agent` is null or a live handle; `out` is null or writable for `cap` bytes;
/// `out_len` and `to` are null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ztna_agent_poll_udp(
    agent: *mut ZtnaAgent,
    out: *mut u8,
    cap: usize,
    out_len: *mut usize,
    to: *mut ZtnaSockaddr,
) -> ZtnaError {
    // SAFETY: forwarded contract.
    unsafe {
        with_agent(agent, |a| {
            if out.is_null() || out_len.is_null() || to.is_null() {
                return ZtnaError::NullPointer;
            }
            if a.pending_udp.is_none() && cap >= ZTNA_MAX_DATAGRAM {
                // The usual case: straight into the caller's buffer, no copy. Zeroed
                // first: the caller's memory may be uninitialized, which a `&mut
                // [u8]` must not see.
                std::ptr::write_bytes(out, 0, ZTNA_MAX_DATAGRAM);
                let buf = std::slice::from_raw_parts_mut(out, ZTNA_MAX_DATAGRAM);
                return match a.engine.poll_transmit(buf, Instant::now()) {
                    Some((n, dest)) => {
                        *out_len = n;
                        *to = ZtnaSockaddr::from_std(dest);
                        ZtnaError::Ok
                    }
                    None => ZtnaError::Nothing,
                };
            }
            if a.pending_udp.is_none() {
                let mut buf = vec![0u8; MAX_UDP_PAYLOAD];
                match a.engine.poll_transmit(&mut buf, Instant::now()) {
                    Some((n, dest)) => {
                        buf.truncate(n);
                        a.pending_udp = Some((buf, dest));
                    }
                    None => return ZtnaError::Nothing,
                }
            }
            let Some((p, dest)) = a.pending_udp.as_ref() else {
                return ZtnaError::Nothing;
            };
            *out_len = p.len();
            if p.len() > cap {
                return ZtnaError::BufferTooSmall;
            }
            std::ptr::copy_nonoverlapping(p.as_ptr(), out, p.len());
            *to = ZtnaSockaddr::from_std(*dest);
            a.pending_udp = None;
            ZtnaError::Ok
        })
    }
}

/// Takes the next IP packet to write to the tunnel: its bytes into `out`
/// (capacity `cap`), its length into `*out_len`. Returns `ZTNA_ERROR_NOTHING` when there
/// is none. When `cap` is too small, returns `ZTNA_ERROR_BUFFER_TOO_SMALL` with the
/// needed size in `*out_len` and keeps the packet. `ZTNA_MAX_PACKET` bytes always
/// fit. Call until `ZTNA_ERROR_NOTHING` after every input.
///
/// # Safety
/// `agent` is null or a live handle; `out` is null or writable for `cap` bytes;
/// `out_len` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ztna_agent_poll_tun(
    agent: *mut ZtnaAgent,
    out: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> ZtnaError {
    // SAFETY: forwarded contract.
    unsafe {
        with_agent(agent, |a| {
            if out.is_null() || out_len.is_null() {
                return ZtnaError::NullPointer;
            }
            if a.pending_tun.is_none() && cap >= ZTNA_MAX_PACKET {
                // As in `ztna_agent_poll_udp`: no copy in the usual case.
                std::ptr::write_bytes(out, 0, ZTNA_MAX_PACKET);
                let buf = std::slice::from_raw_parts_mut(out, ZTNA_MAX_PACKET);
                return match a.engine.poll_tun(buf) {
                    Some(n) => {
                        *out_len = n;
                        ZtnaError::Ok
                    }
                    None => ZtnaError::Nothing,
                };
            }
            if a.pending_tun.is_none() {
                let mut buf = vec![0u8; ZTNA_MAX_PACKET];
                match a.engine.poll_tun(&mut buf) {
                    Some(n) => {
                        buf.truncate(n);
                        a.pending_tun = Some(buf);
                    }
                    None => return ZtnaError::Nothing,
                }
            }
            let Some(p) = a.pending_tun.as_ref() else {
                return ZtnaError::Nothing;
            };
            *out_len = p.len();
            if p.len() > cap {
                return ZtnaError::BufferTooSmall;
            }
            std::ptr::copy_nonoverlapping(p.as_ptr(), out, p.len());
            a.pending_tun = None;
            ZtnaError::Ok
        })
    }
}

/// Milliseconds until `ztna_agent_on_timeout` must be called, rounded up (0: now),
/// into `*ms`; `ZTNA_ERROR_NOTHING` when no timer is set (the agent has stopped). Ask
/// again after every call that changes the agent and re-arm the timer.
///
/// # Safety
/// `agent` is null or a live handle; `ms` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ztna_agent_next_timeout_ms(
    agent: *mut ZtnaAgent,
    ms: *mut u64,
) -> ZtnaError {
    // SAFETY: forwarded contract.
    unsafe {
        with_agent(agent, |a| {
            if ms.is_null() {
                return ZtnaError::NullPointer;
            }
            let Some(t) = a.engine.poll_timeout() else {
                return ZtnaError::Nothing;
            };
            let d = t.saturating_duration_since(Instant::now());
            // Rounded up: a timer that fires a fraction early would find nothing due
            // and re-arm at 0, spinning.
            *ms = d.as_nanos().div_ceil(1_000_000).min(u64::MAX as u128) as u64;
            ZtnaError::Ok
        })
    }
}

/// The timer fired: runs what is due (retransmissions, keepalives, path checks).
/// Calling it early is harmless. Afterwards poll the outputs.
///
/// # Safety
/// `agent` is null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ztna_agent_on_timeout(agent: *mut ZtnaAgent) -> ZtnaError {
    // SAFETY: forwarded contract.
    unsafe {
        with_agent(agent, |a| {
            let now = Instant::now();
            if a.engine.poll_timeout().is_some_and(|t| t <= now) {
                a.engine.handle_timeout(now);
            }
            ZtnaError::Ok
        })
    }
}

/// The machine's network changed (wake from sleep, Wi-Fi ↔ cellular, interfaces
/// up or down): `addrs` are the interface addresses now (`count` entries, ports
/// ignored; null with 0 for none). Direct paths are re-checked; the relay carries
/// traffic meanwhile.
///
/// # Safety
/// `agent` is null or a live handle; `addrs` is null or valid for `count` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ztna_agent_network_changed(
    agent: *mut ZtnaAgent,
    addrs: *const ZtnaSockaddr,
    count: usize,
) -> ZtnaError {
    // SAFETY: forwarded contract.
    unsafe {
        with_agent(agent, |a| {
            let list: &[ZtnaSockaddr] = if count == 0 {
                &[]
            } else if addrs.is_null() {
                return ZtnaError::NullPointer;
            } else {
                std::slice::from_raw_parts(addrs, count)
            };
            let mut ips = Vec::with_capacity(list.len());
            for s in list {
                match s.to_std() {
                    Some(sa) => ips.push(sa.ip()),
                    None => return ZtnaError::InvalidAddress,
                }
            }
            a.engine.network_changed(ips, Instant::now());
            ZtnaError::Ok
        })
    }
}

/// The deployment's relays (intermediates), `relays_len` entries. The agent keeps a
/// control connection to each and registers its services with every one; each
/// service runs through the relay with the lowest measured RTT (near-equal ones
/// share the load) while the others stay warm, and a relay that goes silent for a
/// second or drains loses its services to the next. The list replaces the previous
/// one, the configuration's `intermediate` included: relays not listed are closed
/// (their services move), listed ones already connected keep their connections.
///
/// Call after `ztna_agent_new` and whenever the list changes (a DNS name
/// re-resolved). An empty list is `ZTNA_ERROR_INVALID_LENGTH` and changes nothing:
/// a failed lookup must not drop every relay.
///
/// # Safety
/// `agent` is null or a live handle; `relays` is null or valid for `relays_len`
/// entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ztna_agent_set_relays(
    agent: *mut ZtnaAgent,
    relays: *const ZtnaSockaddr,
    relays_len: usize,
) -> ZtnaError {
    // SAFETY: forwarded contract.
    unsafe {
        with_agent(agent, |a| {
            if relays_len == 0 {
                return ZtnaError::InvalidLength;
            }
            if relays.is_null() {
                return ZtnaError::NullPointer;
            }
            let list = std::slice::from_raw_parts(relays, relays_len);
            let mut addrs = Vec::with_capacity(list.len());
            for s in list {
                match s.to_std() {
                    Some(sa) => addrs.push(sa),
                    None => return ZtnaError::InvalidAddress,
                }
            }
            match a.set_relays(&addrs) {
                Ok(()) => ZtnaError::Ok,
                Err(e) => {
                    a.log
                        .line(ZtnaLogLevel::Error, &format!("setting the relays: {e}"));
                    engine_error(&e)
                }
            }
        })
    }
}

/// The tunnel's settings: addresses and MTU into `*info`, and the destination
/// prefixes to route into the tunnel (every service's) into `prefixes` (capacity
/// `cap` entries), their number into `*count`. With too small a `cap` (0 and a
/// null `prefixes` to ask), returns `ZTNA_ERROR_BUFFER_TOO_SMALL` with the needed
/// count in `*count` (`*info` is still filled). The routes change when the
/// intermediate sends new prefixes (logged as "routes changed"): read them again
/// then.
///
/// # Safety
/// `agent` is null or a live handle; `info` and `count` are null or writable;
/// `prefixes` is null or writable for `cap` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ztna_agent_routes(
    agent: *mut ZtnaAgent,
    info: *mut ZtnaTunnelInfo,
    prefixes: *mut ZtnaPrefix,
    cap: usize,
    count: *mut usize,
) -> ZtnaError {
    // SAFETY: forwarded contract.
    unsafe {
        with_agent(agent, |a| {
            if info.is_null() || count.is_null() {
                return ZtnaError::NullPointer;
            }
            let mut ti = ZtnaTunnelInfo {
                mtu: TUN_MTU,
                ..Default::default()
            };
            if let Some((v4, v6)) = a.engine.tunnel_address() {
                ti.has_address = 1;
                ti.ipv4 = v4.octets();
                ti.ipv6 = v6.octets();
            }
            *info = ti;
            let mut nets: Vec<ipnet::IpNet> =
                a.engine.routes().iter().map(|(n, _)| n.trunc()).collect();
            nets.sort();
            nets.dedup();
            *count = nets.len();
            if nets.len() > cap {
                return ZtnaError::BufferTooSmall;
            }
            if nets.is_empty() {
                return ZtnaError::Ok;
            }
            if prefixes.is_null() {
                return ZtnaError::NullPointer;
            }
            for (i, n) in nets.iter().enumerate() {
                let (family, addr) = ip_bytes(n.network());
                *prefixes.add(i) = ZtnaPrefix {
                    family,
                    prefix_len: n.prefix_len(),
                    addr,
                };
            }
            ZtnaError::Ok
        })
    }
}

/// The status as JSON (connected, observed address, tunnel addresses, MTU,
/// handshake time; per service: registered, prefixes, path, RTT, relay and standby
/// relay, traffic, path history; per relay: address, connected, draining, RTT),
/// NUL-terminated, into `out` (capacity `cap` bytes). `*out_len`
/// gets the JSON's length without the NUL; `cap` must be at least `*out_len + 1`,
/// otherwise `ZTNA_ERROR_BUFFER_TOO_SMALL` with the length in `*out_len`.
///
/// # Safety
/// `agent` is null or a live handle; `out` is null or writable for `cap` bytes;
/// `out_len` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ztna_agent_status_json(
    agent: *mut ZtnaAgent,
    out: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> ZtnaError {
    // SAFETY: forwarded contract.
    unsafe {
        with_agent(agent, |a| {
            if out_len.is_null() {
                return ZtnaError::NullPointer;
            }
            let json = serde_json::to_string(&a.engine.status()).unwrap_or_default();
            *out_len = json.len();
            if json.len() + 1 > cap {
                return ZtnaError::BufferTooSmall;
            }
            if out.is_null() {
                return ZtnaError::NullPointer;
            }
            std::ptr::copy_nonoverlapping(json.as_ptr(), out.cast::<u8>(), json.len());
            *out.add(json.len()) = 0;
            ZtnaError::Ok
        })
    }
}

/// A static, NUL-terminated English description of `code` (any integer; unknown
/// values get "unknown error code"). Never null; never freed.
#[unsafe(no_mangle)]
pub extern "C" fn ztna_error_message(code: i32) -> *const c_char {
    let s: &'static CStr = match code {
        0 => c"ok",
        1 => c"nothing to return right now",
        2 => c"a required pointer was null",
        3 => c"buffer too small; the needed size was returned in the length output",
        4 => c"a string is not valid UTF-8",
        5 => c"invalid socket address (family must be 4 or 6)",
        6 => c"invalid configuration (services, PEM or options)",
        7 => c"certificate, key or CA could not be written or loaded",
        8 => c"the agent engine failed to start",
        9 => c"input length is 0 or too large",
        10 => c"the library panicked; free the handle",
        11 => c"the handle is poisoned by an earlier panic; free it",
        _ => c"unknown error code",
    };
    s.as_ptr()
}

// The log module needs a C string per line; keep the conversion here.
fn c_line(msg: &str) -> CString {
    CString::new(msg.replace('\0', " ")).unwrap_or_default()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_the_documented_ones() {
        use std::mem::{align_of, offset_of, size_of};
        assert_eq!(
            (size_of::<ZtnaSockaddr>(), align_of::<ZtnaSockaddr>()),
            (20, 2)
        );
        assert_eq!(offset_of!(ZtnaSockaddr, port), 2);
        assert_eq!(offset_of!(ZtnaSockaddr, addr), 4);
        assert_eq!((size_of::<ZtnaPrefix>(), align_of::<ZtnaPrefix>()), (18, 1));
        assert_eq!(offset_of!(ZtnaPrefix, addr), 2);
        assert_eq!(size_of::<ZtnaError>(), 4, "a C enum is an int");
    }

    #[test]
    fn sockaddr_round_trips() {
        for a in ["192.0.2.7:4433", "[2001:db8::1]:9"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(ZtnaSockaddr::from_std(a).to_std(), Some(a));
        }
        let bad = ZtnaSockaddr {
            family: 5,
            ..Default::default()
        };
        assert_eq!(bad.to_std(), None);
    }

    /// An agent towards 127.0.0.1:9 (nobody there: creating it only queues an
    /// Initial), with PEMs from a throwaway CA in `dir`.
    fn test_agent(dir: &std::path::Path) -> *mut ZtnaAgent {
        let pki = ztna_userspace::identity::generate_dev_pki(dir, &["echo".into()]).unwrap();
        let pem: Vec<Vec<u8>> = [&pki.ca_cert, &pki.agent_cert, &pki.agent_key]
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        let echo = CString::new("echo").unwrap();
        let services = [echo.as_ptr()];
        let cfg = ZtnaAgentConfig {
            intermediate: ZtnaSockaddr::from_std("127.0.0.1:9".parse().unwrap()),
            server_name: std::ptr::null(),
            ca_pem: pem[0].as_ptr(),
            ca_pem_len: pem[0].len(),
            cert_pem: pem[1].as_ptr(),
            cert_pem_len: pem[1].len(),
            key_pem: pem[2].as_ptr(),
            key_pem_len: pem[2].len(),
            services: services.as_ptr(),
            services_len: 1,
            local: ZtnaSockaddr::default(),
            options: 0,
            keepalive_ms: 0,
            idle_timeout_ms: 0,
            log_level: 0,
            log: None,
            log_ctx: std::ptr::null_mut(),
        };
        let mut a = std::ptr::null_mut();
        // SAFETY: valid config and out pointer.
        assert_eq!(unsafe { ztna_agent_new(&cfg, &mut a) }, ZtnaError::Ok);
        a
    }

    #[test]
    fn a_panic_is_an_error_and_poisons_the_handle() {
        let dir = std::env::temp_dir().join(format!("ztna-ffi-unit-{}", std::process::id()));
        let a = test_agent(&dir);
        // SAFETY: a live handle, freed once.
        unsafe {
            let pem_dir = (*a)._pem.ca.parent().unwrap().to_path_buf();
            assert!(pem_dir.join("key.pem").exists());
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = |p: &std::path::Path| {
                    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
                };
                assert_eq!(mode(&pem_dir), 0o700);
                assert_eq!(mode(&pem_dir.join("key.pem")), 0o600);
            }
            assert_eq!(with_agent(a, |_| panic!("boom")), ZtnaError::Panic);
            assert_eq!(ztna_agent_on_timeout(a), ZtnaError::Poisoned);
            ztna_agent_free(a);
            assert!(!pem_dir.exists(), "free removes the PEM directory");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn several_relays_get_fast_liveness() {
        use ztna_core::client::Liveness;
        let dir = std::env::temp_dir().join(format!("ztna-ffi-relays-{}", std::process::id()));
        let a = test_agent(&dir);
        let relays = [
            ZtnaSockaddr::from_std("127.0.0.1:9".parse().unwrap()),
            ZtnaSockaddr::from_std("[::1]:9".parse().unwrap()),
        ];
        // SAFETY: a live handle with two addresses, freed once.
        unsafe {
            let engine = &(*a).engine;
            assert_eq!(engine.relays().len(), 1);
            assert_eq!(
                engine.relays().primary().config().liveness,
                None,
                "one relay: QUIC's idle timeout judges it"
            );
            assert_eq!(
                ztna_agent_set_relays(a, relays.as_ptr(), relays.len()),
                ZtnaError::Ok
            );
            let engine = &(*a).engine;
            let got: Vec<SocketAddr> = engine.relays().iter().map(|r| r.addr()).collect();
            assert_eq!(
                got,
                vec!["127.0.0.1:9".parse().unwrap(), "[::1]:9".parse().unwrap()]
            );
            for r in engine.relays().iter() {
                assert_eq!(
                    r.client.config().liveness,
                    Some(Liveness::FAST),
                    "{}",
                    r.addr()
                );
            }
            ztna_agent_free(a);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
