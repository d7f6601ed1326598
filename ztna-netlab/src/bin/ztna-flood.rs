//! `ztna-flood`: a bounded junk flood at a relay's UDP port, for the flood test
//! (`tests/flood.rs`) and `cargo xtask bench flood`. For `--seconds`, every kind is
//! sent at its own rate (packets per second, paced in 5 ms ticks) from one socket
//! on this host's own address:
//!
//! - `unknown_cid`: short-header packets (RFC 9000 §17.3) to random DCIDs that are
//!   not relay CIDs, 40–1200 bytes. The intermediate answers a rate-limited few
//!   with stateless resets.
//! - `tiny_initial`: long-header QUIC v1 Initials in datagrams of 40–1199 bytes,
//!   under the 1200 a client Initial needs (RFC 9000 §14.1): dropped unanswered.
//! - `relay_cid_spoof`: short-header packets to a live relay CID (`--relay-cid`)
//!   from a sender that is not the session's endpoint: never forwarded.
//! - `handshake`: real quiche client Initials (padded to 1200 bytes) with fresh
//!   random CIDs each, never followed up: each earns a stateless Retry.
//!
//! It also reads whatever comes back, to show the relay amplifies nothing. Prints
//! one JSON object: `{"seconds", "sent": {kind: packets}, "sent_bytes",
//! "received_packets", "received_bytes", "send_errors"}`.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::json;
use ztna_common::relay::{RELAY_CID_LEN, RELAY_CID_MARKER};

#[derive(Parser)]
#[command(about = "Bounded junk flood at a relay port (see the module docs)")]
struct Args {
    /// The relay's address and port.
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 2000)]
    unknown_cid_pps: u64,
    #[arg(long, default_value_t = 2000)]
    tiny_initial_pps: u64,
    /// Needs `--relay-cid`; without one this kind is not sent.
    #[arg(long, default_value_t = 2000)]
    relay_cid_spoof_pps: u64,
    #[arg(long, default_value_t = 300)]
    handshake_pps: u64,
    /// A live relay CID, 16 hex digits (first byte a5).
    #[arg(long)]
    relay_cid: Option<String>,
}

const KINDS: [&str; 4] = [
    "unknown_cid",
    "tiny_initial",
    "relay_cid_spoof",
    "handshake",
];

struct Flood {
    rng: SystemRandom,
    socket: UdpSocket,
    target: SocketAddr,
    relay_cid: Option<[u8; RELAY_CID_LEN]>,
    quic: quiche::Config,
    buf: Vec<u8>,
}

impl Flood {
    fn random(&self, buf: &mut [u8]) {
        let _ = self.rng.fill(buf);
    }

    /// A random length in `lo..=hi`.
    fn len_in(&self, lo: usize, hi: usize) -> usize {
        let mut b = [0u8; 2];
        self.random(&mut b);
        lo + usize::from(u16::from_be_bytes(b)) % (hi - lo + 1)
    }

    /// The datagram of kind `k` (index into `KINDS`), in `self.buf`.
    fn make(&mut self, k: usize) -> anyhow::Result<usize> {
        let mut buf = std::mem::take(&mut self.buf);
        let n = match k {
            // Short header: 0b01xxxxxx, then the DCID (random, not a relay CID).
            0 => {
                let n = self.len_in(40, 1200);
                self.random(&mut buf[..n]);
                buf[0] = 0x40 | (buf[0] & 0x3f);
                if buf[1] == RELAY_CID_MARKER {
                    buf[1] ^= 1;
                }
                n
            }
            // Long header, type Initial: 0b1100xxxx | version 1 [4] | dcid_len 16 |
            // dcid | scid_len 8 | scid | token_len 0 | then random "length" and body.
            1 => {
                let n = self.len_in(40, ztna_userspace::intermediate::MIN_INITIAL_DATAGRAM - 1);
                self.random(&mut buf[..n]);
                buf[0] = 0xc0 | (buf[0] & 0x0f);
                buf[1..5].copy_from_slice(&1u32.to_be_bytes());
                buf[5] = 16;
                buf[22] = 8;
                buf[31] = 0;
                n
            }
            // Short header to the live relay CID, random rest.
            2 => {
                let cid = self.relay_cid.context("no relay CID")?;
                let n = self.len_in(40, 1200);
                self.random(&mut buf[..n]);
                buf[0] = 0x40 | (buf[0] & 0x3f);
                buf[1..1 + RELAY_CID_LEN].copy_from_slice(&cid);
                n
            }
            // A real client Initial with fresh CIDs (its DCID never the marker).
            _ => {
                let (mut scid, mut dcid) = ([0u8; 16], [0u8; 16]);
                self.random(&mut scid);
                self.random(&mut dcid);
                dcid[0] &= !0x80; // never 0xA5
                let local = self.socket.local_addr()?;
                let mut conn = quiche::connect_with_dcid(
                    None,
                    &quiche::ConnectionId::from_ref(&scid),
                    &quiche::ConnectionId::from_ref(&dcid),
                    local,
                    self.target,
                    &mut self.quic,
                )?;
                conn.send(&mut buf)?.0
            }
        };
        self.buf = buf;
        Ok(n)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let relay_cid = match &args.relay_cid {
        Some(hex) => {
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
                .collect::<Result<Vec<u8>, _>>()
                .with_context(|| format!("--relay-cid {hex:?}: not hex"))?;
            let cid: [u8; RELAY_CID_LEN] = bytes
                .try_into()
                .map_err(|_| anyhow::anyhow!("--relay-cid {hex:?}: not {RELAY_CID_LEN} bytes"))?;
            if cid[0] != RELAY_CID_MARKER {
                bail!("--relay-cid {hex:?}: not a relay CID (first byte a5)");
            }
            Some(cid)
        }
        None => None,
    };
    let rates = [
        args.unknown_cid_pps,
        args.tiny_initial_pps,
        if relay_cid.is_some() {
            args.relay_cid_spoof_pps
        } else {
            0
        },
        args.handshake_pps,
    ];
    let socket = UdpSocket::bind("0.0.0.0:0").context("binding")?;
    socket.connect(args.target).context("connecting")?;
    socket.set_nonblocking(true)?;
    let mut quic = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
    quic.set_application_protos(&[ztna_core::ALPN])?;
    quic.verify_peer(false);
    let mut flood = Flood {
        rng: SystemRandom::new(),
        socket,
        target: args.target,
        relay_cid,
        quic,
        buf: vec![0u8; 1500],
    };
    // Pacing counts attempts (a failed send is not retried); `sent` the sent ones.
    let (mut attempts, mut sent, mut sent_bytes, mut errors) = ([0u64; 4], [0u64; 4], 0, 0);
    let (mut received, mut received_bytes) = (0u64, 0u64);
    let mut rbuf = [0u8; 2048];
    let start = Instant::now();
    let duration = Duration::from_secs(args.seconds);
    while start.elapsed() < duration {
        let elapsed = start.elapsed().as_secs_f64();
        for k in 0..KINDS.len() {
            // Catch up to the rate, so a slow tick costs no packets.
            while (attempts[k] as f64) < rates[k] as f64 * elapsed {
                attempts[k] += 1;
                let n = flood.make(k)?;
                match flood.socket.send(&flood.buf[..n]) {
                    Ok(_) => {
                        sent[k] += 1;
                        sent_bytes += n as u64;
                    }
                    Err(_) => errors += 1,
                }
            }
        }
        while let Ok(n) = flood.socket.recv(&mut rbuf) {
            received += 1;
            received_bytes += n as u64;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Late answers (Retries, resets) to the last packets.
    let drain_until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < drain_until {
        while let Ok(n) = flood.socket.recv(&mut rbuf) {
            received += 1;
            received_bytes += n as u64;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let by_kind: serde_json::Map<String, serde_json::Value> = KINDS
        .iter()
        .zip(sent)
        .map(|(k, n)| (k.to_string(), n.into()))
        .collect();
    println!(
        "{}",
        json!({
            "seconds": start.elapsed().as_secs_f64(),
            "sent": by_kind,
            "sent_bytes": sent_bytes,
            "received_packets": received,
            "received_bytes": received_bytes,
            "send_errors": errors,
        })
    );
    Ok(())
}
