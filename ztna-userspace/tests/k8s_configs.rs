//! The daemons' configurations in deploy/k8s (the ConfigMaps' sources, base and
//! overlays) load and resolve with the daemons' own parsers: a key the daemon does
//! not know, or a bad value, fails here rather than in a crash-looping pod.

use std::path::{Path, PathBuf};

use ztna_userspace::config::load_file;
use ztna_userspace::settings::{ConnectorSettings, IntermediateSettings};

fn configs(name: &str) -> Vec<PathBuf> {
    let k8s = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s");
    let mut found = vec![k8s.join("base/config").join(name)];
    for overlay in std::fs::read_dir(k8s.join("overlays")).unwrap() {
        let file = overlay.unwrap().path().join(name);
        if file.exists() {
            found.push(file);
        }
    }
    found
}

#[test]
fn the_intermediate_configs_load_and_resolve() {
    let files = configs("intermediate.toml");
    assert!(files.len() >= 3, "{files:?}");
    for f in files {
        let s: IntermediateSettings =
            load_file(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let r = s
            .resolve()
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert_eq!(r.cfg.listen.port(), 4433, "{}", f.display());
        // The kubelet probes the node's address: a loopback listener is unreachable.
        assert_eq!(
            r.cfg.metrics_listen,
            Some("0.0.0.0:9090".parse().unwrap()),
            "{}",
            f.display()
        );
    }
}

#[test]
fn the_connector_configs_load() {
    let files = configs("connector.toml");
    assert!(files.len() >= 3, "{files:?}");
    for f in files {
        let c: ConnectorSettings = load_file(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(
            c.client()
                .client_config(ztna_core::Role::Connector, vec![])
                .is_ok(),
            "{}",
            f.display()
        );
    }
}
