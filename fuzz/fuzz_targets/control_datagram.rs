//! Control-connection DATAGRAMs (`ztna_common::wire`): whatever decodes encodes back
//! to the same bytes, and decoding never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ztna_common::wire::ControlMessage;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = ControlMessage::decode(data) {
        let mut out = vec![0u8; msg.encoded_len()];
        let n = msg.encode(&mut out).expect("a decoded message encodes");
        assert_eq!(&out[..n], data, "round trip");
    }
});
