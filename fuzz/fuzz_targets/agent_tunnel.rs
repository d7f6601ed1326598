//! The agent engine's tunnel input (`AgentEngine::handle_tun`): arbitrary packets
//! from the OS never panic, and everything that comes back out for the tunnel is an
//! IP packet no larger than the tunnel MTU's minimum for ICMP errors.
#![no_main]
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use ztna_core::agent::{AgentConfig, AgentEngine};
use ztna_core::{ClientConfig, Role};

fn engine() -> &'static Mutex<AgentEngine> {
    static E: OnceLock<Mutex<AgentEngine>> = OnceLock::new();
    E.get_or_init(|| {
        let client = ClientConfig::new("127.0.0.1:4433".parse().unwrap(), Role::Agent, vec!["echo".into()]);
        let mut cfg = AgentConfig::new(client);
        cfg.routes = vec![("10.100.0.0/24".parse().unwrap(), "echo".into())];
        let e = AgentEngine::new(cfg, "127.0.0.1:50000".parse().unwrap(), vec![], Instant::now())
            .expect("engine");
        Mutex::new(e)
    })
}

fuzz_target!(|data: &[u8]| {
    let mut e = engine().lock().unwrap();
    let now = Instant::now();
    let mut pkt = data.to_vec();
    e.handle_tun(&mut pkt, now);
    let mut out = vec![0u8; 65535];
    while let Some(n) = e.poll_tun(&mut out) {
        assert!(n <= 1280);
        assert!(matches!(out[0] >> 4, 4 | 6));
    }
});
