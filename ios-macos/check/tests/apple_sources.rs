//! The Linux checks on the real `ios-macos/` tree (run by `cargo xtask test` with the
//! rest of the workspace). What only a Mac can verify is listed in
//! `ios-macos/README.md`.

use std::path::PathBuf;

use ztna_apple_check::{Problem, apple_dir, ffi, header_path, project, swift, swift_files};

fn sources() -> Vec<PathBuf> {
    let files = swift_files(&apple_dir()).expect("listing ios-macos/");
    // The app, the extension and the shared code: a check that sees no file (a
    // moved directory) must not pass vacuously.
    for dir in ["App", "PacketTunnel", "Shared"] {
        assert!(
            files.iter().any(|f| f.starts_with(apple_dir().join(dir))),
            "no Swift file under ios-macos/{dir}: {files:?}"
        );
    }
    files
}

fn assert_none(what: &str, problems: &[Problem]) {
    let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    assert!(
        problems.is_empty(),
        "{what}: {} problem(s):\n{}",
        problems.len(),
        shown.join("\n")
    );
}

#[test]
fn every_swift_file_parses() {
    let mut problems = Vec::new();
    for f in sources() {
        let text = std::fs::read_to_string(&f).unwrap();
        problems.extend(swift::syntax_problems(&f, &text).unwrap());
    }
    assert_none("Swift syntax", &problems);
}

#[test]
fn every_ztna_name_in_swift_is_in_the_header_with_its_arity() {
    let (header, mut problems) = ffi::Header::load(&header_path()).unwrap();
    // The wrapper calls the library; a header with fewer functions than the Swift
    // code would call would be a different header.
    assert!(
        header.functions.len() >= 12,
        "{:?}",
        header.functions.keys()
    );
    let mut calls = 0;
    for f in sources() {
        let text = std::fs::read_to_string(&f).unwrap();
        calls += ffi::swift_uses(&f, &text)
            .unwrap()
            .iter()
            .filter(|u| u.arguments.is_some() && header.functions.contains_key(&u.name))
            .count();
        problems.extend(ffi::check_uses(&header, &f, &text).unwrap());
    }
    assert_none("C header", &problems);
    // Every function in the header is used by the wrapper: the app covers the ABI.
    let mut unused: Vec<&String> = header.functions.keys().collect();
    for f in sources() {
        let text = std::fs::read_to_string(&f).unwrap();
        let uses = ffi::swift_uses(&f, &text).unwrap();
        unused.retain(|name| !uses.iter().any(|u| &u.name == *name));
    }
    assert!(
        unused.is_empty(),
        "header functions no Swift code calls: {unused:?}"
    );
    assert!(calls >= header.functions.len(), "{calls} calls");
}

#[test]
fn project_yml_has_both_targets_and_names_every_swift_file() {
    let problems = project::check(&apple_dir().join("project.yml"), &sources(), &header_path());
    assert_none("project.yml", &problems);
}
