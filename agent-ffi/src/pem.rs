//! The PEM bytes as private files, because quiche 0.30 loads certificates, keys and
//! CAs only from files (`load_*_from_file`). A fresh directory (mode 0700) under the
//! temporary directory holds `ca.pem`, `cert.pem` and `key.pem` (mode 0600, created
//! exclusively so nothing pre-planted is followed); dropping the `PemDir` removes
//! it. On macOS the temporary directory is the extension's own container, so the
//! key never leaves the app's sandbox.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct PemDir {
    dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl PemDir {
    pub fn write(ca: &[u8], cert: &[u8], key: &[u8]) -> io::Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "ztna-agent-{}-{}-{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut b = fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        // Not recursive: fails if the name exists, so we own what we create.
        b.create(&dir)?;
        let d = PemDir {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            dir,
        };
        // From here on, a failure removes the directory (Drop).
        write_private(&d.ca, ca)?;
        write_private(&d.cert, cert)?;
        write_private(&d.key, key)?;
        Ok(d)
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut o = fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let mut f = o.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

impl Drop for PemDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
