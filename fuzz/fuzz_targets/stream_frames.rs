//! Stream frames (`ztna_common::frames`): a byte stream is decoded frame by frame as
//! the receivers do, skipping malformed ones by their length; decoded frames encode
//! back to their bytes, and their candidate and prefix lists parse.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ztna_common::frames::{self, Frame, frame_len};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while !rest.is_empty() {
        match Frame::decode(rest) {
            Ok(Some((frame, used))) => {
                if !matches!(frame, Frame::Unknown { .. } | Frame::Capabilities { .. }) {
                    let mut out = vec![0u8; used];
                    let n = frame.encode(&mut out).expect("a decoded frame encodes");
                    assert_eq!(&out[..n], &rest[..used], "round trip");
                }
                match frame {
                    Frame::Candidates { candidates, count, .. } => {
                        assert_eq!(frames::candidates(candidates).count(), count as usize);
                    }
                    Frame::ServicePrefixes { prefixes, count, .. } => {
                        assert_eq!(frames::prefixes(prefixes).count(), count as usize);
                    }
                    _ => {}
                }
                rest = &rest[used..];
            }
            Ok(None) => break,
            Err(_) => match frame_len(rest) {
                Ok(Some(n)) if n > 0 => rest = &rest[n..],
                _ => break,
            },
        }
    }
});
