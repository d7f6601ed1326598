//! NAT-traversal check packets (`ztna_core::p2p`): classification and decoding of
//! arbitrary datagrams; a check made with the key decodes, one made with another key
//! does not.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ztna_core::p2p;

fuzz_target!(|data: &[u8]| {
    let key = [7u8; 16];
    let _ = p2p::is_check(data);
    let _ = p2p::check_session(data);
    if let Some(c) = p2p::decode_check(data, &key) {
        let again = p2p::encode_check(&c, &key);
        assert!(p2p::decode_check(&again, &key).is_some());
        assert!(p2p::decode_check(&again, &[8u8; 16]).is_none(), "tag binds the key");
    }
});
