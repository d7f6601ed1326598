//! `project.yml`, the XcodeGen spec: it parses as YAML; it has an application and a
//! packet tunnel app extension that the application embeds; their Info.plist and
//! entitlement files exist and declare what a packet tunnel needs (the
//! NetworkExtension `packet-tunnel-provider` entitlement, App Groups, the
//! `com.apple.networkextension.packet-tunnel` extension point); the extension finds
//! the C module map, which names the committed header; and every Swift file under
//! `ios-macos/` is in some target's sources.
//!
//! Only the part of XcodeGen's format this project uses is understood; a sources
//! entry with `includes`/`excludes` is reported rather than guessed at.

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

use crate::Problem;

/// Target types of the two targets the app needs.
const APP_TYPE: &str = "application";
const EXTENSION_TYPE: &str = "app-extension";

/// Strings each file must contain (plists are small and fixed; a substring check is
/// what can fail meaningfully here without a plist parser).
const NE_ENTITLEMENT: [&str; 2] = [
    "com.apple.developer.networking.networkextension",
    "packet-tunnel-provider",
];
const APP_GROUPS: &str = "com.apple.security.application-groups";
const EXTENSION_POINT: [&str; 2] = [
    "com.apple.networkextension.packet-tunnel",
    "NSExtensionPrincipalClass",
];

/// One target of the spec, as far as the checks need it.
#[derive(Debug)]
struct Target<'a> {
    name: String,
    spec: &'a Yaml,
}

impl Target<'_> {
    fn kind(&self) -> Option<&str> {
        self.spec["type"].as_str()
    }

    /// A build setting from `settings.base.KEY` or `settings.KEY`.
    fn setting(&self, key: &str) -> Option<&str> {
        let s = &self.spec["settings"];
        s["base"][key].as_str().or_else(|| s[key].as_str())
    }

    fn entitlements(&self) -> Option<&str> {
        self.spec["entitlements"]["path"]
            .as_str()
            .or_else(|| self.setting("CODE_SIGN_ENTITLEMENTS"))
    }

    fn depends_on(&self, other: &str) -> bool {
        self.spec["dependencies"]
            .as_vec()
            .is_some_and(|deps| deps.iter().any(|d| d["target"].as_str() == Some(other)))
    }
}

/// Resolves a path from the spec: `$(SRCROOT)` and relative paths are the spec's
/// directory.
fn resolve(dir: &Path, p: &str) -> PathBuf {
    let p = p.trim().trim_matches('"');
    match p.strip_prefix("$(SRCROOT)") {
        Some(rest) => dir.join(rest.trim_start_matches('/')),
        None => dir.join(p),
    }
}

/// Runs every project check on the spec at `spec_path` against `swift_files`; the
/// header is what the module map must name.
pub fn check(spec_path: &Path, swift_files: &[PathBuf], header: &Path) -> Vec<Problem> {
    let text = match std::fs::read_to_string(spec_path) {
        Ok(t) => t,
        Err(e) => return vec![Problem::file(spec_path, format!("cannot read: {e}"))],
    };
    check_text(spec_path, &text, swift_files, header)
}

pub fn check_text(
    spec_path: &Path,
    text: &str,
    swift_files: &[PathBuf],
    header: &Path,
) -> Vec<Problem> {
    let dir = spec_path.parent().unwrap_or(Path::new("."));
    let docs = match YamlLoader::load_from_str(text) {
        Ok(d) => d,
        Err(e) => {
            return vec![Problem {
                file: spec_path.to_path_buf(),
                line: e.marker().line(),
                column: e.marker().col() + 1,
                message: format!("YAML: {e}"),
            }];
        }
    };
    let Some(doc) = docs.first() else {
        return vec![Problem::file(spec_path, "empty YAML document")];
    };
    let mut problems = Vec::new();
    let mut problem = |m: String| problems.push(Problem::file(spec_path, m));
    if doc["name"].as_str().is_none() {
        problem("no project `name`".into());
    }
    let targets: Vec<Target<'_>> = match doc["targets"].as_hash() {
        Some(h) => h
            .iter()
            .filter_map(|(k, v)| {
                Some(Target {
                    name: k.as_str()?.to_string(),
                    spec: v,
                })
            })
            .collect(),
        None => {
            problem("no `targets` mapping".into());
            Vec::new()
        }
    };

    let app = targets.iter().find(|t| t.kind() == Some(APP_TYPE));
    let ext = targets.iter().find(|t| t.kind() == Some(EXTENSION_TYPE));
    if app.is_none() {
        problem(format!("no target of type {APP_TYPE} (the app)"));
    }
    if ext.is_none() {
        problem(format!(
            "no target of type {EXTENSION_TYPE} (the packet tunnel)"
        ));
    }
    for t in app.iter().chain(ext.iter()) {
        match t.entitlements() {
            None => problem(format!("target {} has no entitlements file", t.name)),
            Some(p) => {
                let want: Vec<&str> = NE_ENTITLEMENT.iter().copied().chain([APP_GROUPS]).collect();
                file_contains(
                    &resolve(dir, p),
                    &t.name,
                    "entitlements",
                    &want,
                    &mut problem,
                );
            }
        }
        if t.setting("PRODUCT_BUNDLE_IDENTIFIER").is_none() {
            problem(format!(
                "target {} has no PRODUCT_BUNDLE_IDENTIFIER",
                t.name
            ));
        }
        match t.setting("INFOPLIST_FILE") {
            None => problem(format!("target {} has no INFOPLIST_FILE", t.name)),
            Some(p) => {
                let want: &[&str] = if t.kind() == Some(EXTENSION_TYPE) {
                    &EXTENSION_POINT
                } else {
                    &[]
                };
                file_contains(&resolve(dir, p), &t.name, "Info.plist", want, &mut problem);
            }
        }
    }
    if let (Some(app), Some(ext)) = (app, ext)
        && !app.depends_on(&ext.name)
    {
        problem(format!(
            "{} does not depend on (embed) {}",
            app.name, ext.name
        ));
    }
    if let Some(ext) = ext {
        check_module_map(dir, ext, header, &mut problem);
    }

    // Every Swift file in some target.
    let mut roots = Vec::new();
    for t in &targets {
        let Some(sources) = t.spec["sources"].as_vec() else {
            problem(format!("target {} has no `sources` list", t.name));
            continue;
        };
        for s in sources {
            let path = match (s.as_str(), s["path"].as_str()) {
                (Some(p), _) | (None, Some(p)) => p,
                _ => {
                    problem(format!("target {}: a source without a path", t.name));
                    continue;
                }
            };
            for key in ["includes", "excludes"] {
                if !s[key].is_badvalue() {
                    problem(format!(
                        "target {}: sources `{key}` of {path} is not understood by this check",
                        t.name
                    ));
                }
            }
            let root = resolve(dir, path);
            if !root.exists() {
                problem(format!(
                    "target {}: source path {path} does not exist",
                    t.name
                ));
            }
            roots.push(root);
        }
    }
    for f in swift_files {
        if !roots.iter().any(|r| f.starts_with(r)) {
            problem(format!(
                "{} is in no target's sources",
                f.strip_prefix(dir).unwrap_or(f).display()
            ));
        }
    }
    problems
}

fn file_contains(
    path: &Path,
    target: &str,
    what: &str,
    want: &[&str],
    problem: &mut impl FnMut(String),
) {
    match std::fs::read_to_string(path) {
        Err(e) => problem(format!(
            "target {target}: {what} file {}: {e}",
            path.display()
        )),
        Ok(text) => {
            for w in want {
                if !text.contains(w) {
                    problem(format!(
                        "target {target}: {what} file {} lacks {w}",
                        path.display()
                    ));
                }
            }
        }
    }
}

/// The extension imports the C module: `SWIFT_INCLUDE_PATHS` holds a directory with
/// `module.modulemap`, whose `header "..."` is the committed header.
fn check_module_map(dir: &Path, ext: &Target<'_>, header: &Path, problem: &mut impl FnMut(String)) {
    let Some(include) = ext.setting("SWIFT_INCLUDE_PATHS") else {
        problem(format!(
            "target {} has no SWIFT_INCLUDE_PATHS (the C module map)",
            ext.name
        ));
        return;
    };
    let maps: Vec<PathBuf> = include
        .split_whitespace()
        .map(|p| resolve(dir, p).join("module.modulemap"))
        .filter(|p| p.exists())
        .collect();
    let Some(map) = maps.first() else {
        problem(format!(
            "target {}: no module.modulemap in SWIFT_INCLUDE_PATHS {include}",
            ext.name
        ));
        return;
    };
    let text = std::fs::read_to_string(map).unwrap_or_default();
    let named = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("header "))
        .map(|h| h.trim().trim_matches('"'))
        .map(|h| map.parent().unwrap_or(dir).join(h))
        .any(|h| same_file(&h, header));
    if !named {
        problem(format!(
            "{} does not name the header {}",
            map.display(),
            header.display()
        ));
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throwaway tree: a spec, plists, a module map, a header and Swift files.
    struct Tree {
        dir: PathBuf,
    }

    impl Tree {
        fn new(tag: &str) -> Tree {
            let dir =
                std::env::temp_dir().join(format!("ztna-apple-check-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let t = Tree { dir };
            let ents = "<key>com.apple.developer.networking.networkextension</key>\
                        <array><string>packet-tunnel-provider</string></array>\
                        <key>com.apple.security.application-groups</key>";
            t.write("App/App.entitlements", ents);
            t.write("Tunnel/Tunnel.entitlements", ents);
            t.write("App/Info.plist", "<plist/>");
            t.write(
                "Tunnel/Info.plist",
                "com.apple.networkextension.packet-tunnel NSExtensionPrincipalClass",
            );
            t.write(
                "FFI/module.modulemap",
                "module F {\n  header \"../h.h\"\n}\n",
            );
            t.write("h.h", "void f(void);");
            t.write("App/A.swift", "");
            t.write("Tunnel/T.swift", "");
            t
        }

        fn write(&self, rel: &str, text: &str) {
            let p = self.dir.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }

        fn check(&self, spec: &str) -> Vec<String> {
            let swift = crate::swift_files(&self.dir).unwrap();
            check_text(
                &self.dir.join("project.yml"),
                spec,
                &swift,
                &self.dir.join("h.h"),
            )
            .iter()
            .map(|p| p.message.clone())
            .collect()
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const SPEC: &str = r#"
name: P
targets:
  App:
    type: application
    sources: [App]
    entitlements: { path: App/App.entitlements }
    settings:
      base: { INFOPLIST_FILE: App/Info.plist, PRODUCT_BUNDLE_IDENTIFIER: a.b }
    dependencies:
      - target: Tunnel
  Tunnel:
    type: app-extension
    sources:
      - path: Tunnel
    entitlements: { path: Tunnel/Tunnel.entitlements }
    settings:
      base:
        INFOPLIST_FILE: Tunnel/Info.plist
        PRODUCT_BUNDLE_IDENTIFIER: a.b.t
        SWIFT_INCLUDE_PATHS: $(SRCROOT)/FFI
"#;

    #[test]
    fn a_complete_spec_passes() {
        let t = Tree::new("ok");
        assert_eq!(t.check(SPEC), Vec::<String>::new());
    }

    #[test]
    fn a_swift_file_outside_every_target_fails() {
        let t = Tree::new("stray");
        t.write("Extra/E.swift", "");
        assert_eq!(t.check(SPEC), ["Extra/E.swift is in no target's sources"]);
    }

    #[test]
    fn a_missing_extension_or_entitlement_fails() {
        let t = Tree::new("noext");
        let without_ext = SPEC.replace("type: app-extension", "type: framework");
        let got = t.check(&without_ext);
        assert!(
            got.iter()
                .any(|m| m.contains("no target of type app-extension")),
            "{got:?}"
        );
        t.write("Tunnel/Tunnel.entitlements", "<dict/>");
        let got = t.check(SPEC);
        assert!(
            got.iter()
                .any(|m| m.contains("lacks com.apple.developer.networking.networkextension")),
            "{got:?}"
        );
    }

    #[test]
    fn a_module_map_naming_another_header_fails() {
        let t = Tree::new("modmap");
        t.write("other.h", "");
        t.write(
            "FFI/module.modulemap",
            "module F {\n  header \"../other.h\"\n}\n",
        );
        let got = t.check(SPEC);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains("does not name the header"), "{got:?}");
    }

    #[test]
    fn invalid_yaml_is_reported_with_its_line() {
        let t = Tree::new("yaml");
        let problems = check_text(
            &t.dir.join("project.yml"),
            "name: P\ntargets:\n  App: [unclosed\n",
            &[],
            &t.dir.join("h.h"),
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.starts_with("YAML:"), "{problems:?}");
        assert!(problems[0].line >= 3, "{problems:?}");
    }

    #[test]
    fn excludes_are_not_silently_ignored() {
        let t = Tree::new("excl");
        let spec = SPEC.replace(
            "      - path: Tunnel\n",
            "      - path: Tunnel\n        excludes: [\"*.md\"]\n",
        );
        let got = t.check(&spec);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains("not understood"), "{got:?}");
    }
}
