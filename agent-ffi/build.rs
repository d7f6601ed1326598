//! Rust bindings generated from the committed C header, for `tests/bindgen_agent.rs`:
//! a test that drives a full agent through them proves that the header matches the
//! ABI. The library itself does not use them.

fn main() {
    let header = "include/ztna_agent.h";
    println!("cargo:rerun-if-changed={header}");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    if !std::path::Path::new(header).exists() {
        // Only while bootstrapping the header (tests/header.rs writes it): the
        // bindgen test then fails to compile, which is the point.
        println!(
            "cargo:warning={header} is missing; run ZTNA_BLESS=1 cargo test -p ztna-agent-ffi --test header"
        );
        std::fs::write(out.join("bindings.rs"), "").unwrap();
        return;
    }
    bindgen::Builder::default()
        .header(header)
        .allowlist_item("ztna_.*|ZTNA_.*|Ztna.*")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .layout_tests(true)
        .generate()
        .expect("bindgen on include/ztna_agent.h")
        .write_to_file(out.join("bindings.rs"))
        .expect("writing bindings.rs");
}
