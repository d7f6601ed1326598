//! A bare control client on a blocking socket of its own, driven by its caller: it
//! sees every [`ClientEvent`] (the agent engine keeps some to itself). For tests and
//! tools that speak the control protocol directly (drain, compatibility, relay
//! sessions by hand).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context;
use ztna_core::{ClientConfig, ClientEvent, ControlClient};

pub struct ControlProbe {
    pub client: ControlClient,
    socket: UdpSocket,
    buf: Vec<u8>,
}

impl ControlProbe {
    /// Binds `bind` and starts the handshake.
    pub fn connect(cfg: ClientConfig, bind: SocketAddr) -> anyhow::Result<ControlProbe> {
        let socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
        let local = socket.local_addr()?;
        let client = ControlClient::new(cfg, local, Instant::now())?;
        let mut p = ControlProbe {
            client,
            socket,
            buf: vec![0u8; 65535],
        };
        p.flush();
        Ok(p)
    }

    /// Sends what the client has to send.
    pub fn flush(&mut self) {
        let mut out = [0u8; 2048];
        while let Some((n, to)) = self.client.poll_transmit(&mut out, Instant::now()) {
            let _ = self.socket.send_to(&out[..n], to);
        }
    }

    /// Drives the client until an event `want` accepts arrives (returned), or
    /// `timeout` passes (`None`). Other events are dropped.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        want: impl Fn(&ClientEvent) -> bool,
    ) -> Option<ClientEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            self.flush();
            while let Some(ev) = self.client.poll_event() {
                if want(&ev) {
                    return Some(ev);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let wake = self
                .client
                .poll_timeout()
                .map_or(deadline, |t| t.min(deadline));
            let wait = wake
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            self.socket.set_read_timeout(Some(wait)).ok()?;
            if let Ok((n, from)) = self.socket.recv_from(&mut self.buf) {
                self.client.recv(&mut self.buf[..n], from, Instant::now());
            }
            let now = Instant::now();
            if self.client.poll_timeout().is_some_and(|t| t <= now) {
                self.client.handle_timeout(now);
            }
        }
    }

    /// Asks for a relay session to `service` and sends the request.
    pub fn request_session(&mut self, service: &str) -> anyhow::Result<u32> {
        let id = self.client.request_session(service)?;
        self.flush();
        Ok(id)
    }
}
