//! The committed header is what cbindgen makes of the crate today: this test fails
//! when they differ. `ZTNA_BLESS=1` rewrites the header instead.

use std::path::Path;

#[test]
fn header_is_up_to_date() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen")
        .write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let path = crate_dir.join("include/ztna_agent.h");
    if std::env::var_os("ZTNA_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/ztna_agent.h is out of date with src/: regenerate it with \
         ZTNA_BLESS=1 cargo test -p ztna-agent-ffi --test header"
    );
    // The header documents every function and type (cbindgen copies the doc
    // comments): each declaration is preceded by a comment.
    for name in [
        "ztna_agent_new",
        "ztna_agent_free",
        "ztna_agent_udp_input",
        "ztna_agent_tun_input",
        "ztna_agent_poll_udp",
        "ztna_agent_poll_tun",
        "ztna_agent_next_timeout_ms",
        "ztna_agent_on_timeout",
        "ztna_agent_routes",
        "ztna_agent_status_json",
        "ztna_agent_network_changed",
        "ztna_agent_set_relays",
        "ztna_error_message",
    ] {
        // The declaration: the line naming `name(` outside a comment.
        let mut at = None;
        let mut pos = 0;
        for line in generated.split_inclusive('\n') {
            let t = line.trim_start();
            if !t.starts_with('*') && !t.starts_with('/') && line.contains(&format!("{name}(")) {
                at = Some(pos);
                break;
            }
            pos += line.len();
        }
        let at = at.unwrap_or_else(|| panic!("{name} missing from the header"));
        assert!(
            generated[..at].trim_end().ends_with("*/"),
            "{name} has no doc comment in the header"
        );
    }
}
