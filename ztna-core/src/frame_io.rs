//! Buffers for the length-prefixed control frames on one QUIC stream in each
//! direction (see `ztna_common::frames`). Partial writes stay queued; partial reads
//! wait for the rest of the frame.

use ztna_common::WireError;
use ztna_common::frames::{Frame, frame_len};

/// Most bytes of frames kept queued for a stream. Frames wait here only while the
/// peer grants no stream credit; a peer that never does must not make us buffer
/// without bound (the intermediate closes such a connection).
pub const MAX_QUEUED: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Encode(#[from] WireError),
    #[error("{queued} bytes of frames unsent: the peer grants no stream credit")]
    Full { queued: usize },
}

#[derive(Default)]
pub struct FrameIo {
    out: Vec<u8>,
    inbuf: Vec<u8>,
}

impl FrameIo {
    /// Drops everything (the connection was replaced).
    pub fn reset(&mut self) {
        self.out.clear();
        self.inbuf.clear();
    }

    /// Queues one frame; refused (nothing queued) once [`MAX_QUEUED`] bytes wait.
    pub fn queue(&mut self, frame: &Frame<'_>) -> Result<(), QueueError> {
        // The largest frame: SERVICE_PREFIXES with a 255-byte id and 64 IPv6 prefixes.
        let mut buf = [0u8; 2048];
        let n = frame.encode(&mut buf)?;
        if self.out.len() + n > MAX_QUEUED {
            return Err(QueueError::Full {
                queued: self.out.len(),
            });
        }
        self.out.extend_from_slice(&buf[..n]);
        Ok(())
    }

    /// Bytes queued and not yet accepted by the stream.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// Writes queued bytes to `stream`; whatever does not fit stays queued.
    pub fn flush(&mut self, conn: &mut quiche::Connection, stream: u64) {
        if self.out.is_empty() {
            return;
        }
        let r = conn.stream_send(stream, &self.out, false);
        tracing::debug!("frame stream {stream}: wrote {r:?} of {}", self.out.len());
        match r {
            Ok(n) => {
                self.out.drain(..n);
            }
            Err(quiche::Error::Done) => {}
            Err(e) => tracing::debug!("frame stream {stream}: {e}"),
        }
    }

    /// Reads what `stream` has and returns every complete frame, each as its bytes.
    /// A frame whose length prefix is invalid poisons the stream: the rest is dropped
    /// and counted by the caller through the returned error count.
    pub fn read(&mut self, conn: &mut quiche::Connection, stream: u64) -> (Vec<Vec<u8>>, u64) {
        let mut buf = [0u8; 4096];
        while let Ok((n, _fin)) = conn.stream_recv(stream, &mut buf) {
            self.inbuf.extend_from_slice(&buf[..n]);
        }
        let mut frames = Vec::new();
        let mut errors = 0;
        loop {
            match frame_len(&self.inbuf) {
                Ok(Some(n)) => frames.push(self.inbuf.drain(..n).collect()),
                Ok(None) => break,
                Err(_) => {
                    errors += 1;
                    self.inbuf.clear();
                    break;
                }
            }
        }
        (frames, errors)
    }
}

/// Decodes one complete frame's bytes.
pub fn decode(bytes: &[u8]) -> Result<Frame<'_>, WireError> {
    match Frame::decode(bytes)? {
        Some((f, _)) => Ok(f),
        None => Err(WireError::Truncated {
            needed: bytes.len() + 1,
            have: bytes.len(),
        }),
    }
}
