//! Loading PEM files into a quiche configuration with errors a person can act on.
//!
//! quiche (BoringSSL) reports every failure to load a file as `TlsFail`, whether the
//! file is missing, unreadable, not PEM or the wrong kind of PEM. So each file is
//! read first: a missing or unreadable one is reported with the OS's reason, a file
//! without a PEM block as such, and only then does the TLS library get to refuse it.

use std::path::Path;

/// What a PEM file is loaded as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PemKind {
    /// CA certificates that verify the peer.
    CaBundle,
    /// This side's certificate chain.
    CertChain,
    /// This side's private key.
    PrivateKey,
}

impl std::fmt::Display for PemKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PemKind::CaBundle => "CA bundle",
            PemKind::CertChain => "certificate chain",
            PemKind::PrivateKey => "private key",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    /// The OS's reason: no such file, permission denied, is a directory, ...
    #[error("{kind} {path}: {reason}")]
    Read {
        kind: PemKind,
        path: String,
        /// Not a `source`: it is the message, and printing it twice helps nobody.
        reason: std::io::Error,
    },
    #[error("{kind} {path}: not PEM (no \"-----BEGIN\" line)")]
    NotPem { kind: PemKind, path: String },
    #[error("{kind} {path}: the TLS library could not use it as a {kind} ({source:?})")]
    Rejected {
        kind: PemKind,
        path: String,
        source: quiche::Error,
    },
}

/// Loads `path` into `c` as `kind`.
pub fn load(c: &mut quiche::Config, kind: PemKind, path: &str) -> Result<(), TlsFileError> {
    check_pem(kind, Path::new(path))?;
    let r = match kind {
        PemKind::CaBundle => c.load_verify_locations_from_file(path),
        PemKind::CertChain => c.load_cert_chain_from_pem_file(path),
        PemKind::PrivateKey => c.load_priv_key_from_pem_file(path),
    };
    r.map_err(|source| TlsFileError::Rejected {
        kind,
        path: path.to_string(),
        source,
    })
}

/// Reads `path` and checks that it holds a PEM block.
pub fn check_pem(kind: PemKind, path: &Path) -> Result<(), TlsFileError> {
    let bytes = std::fs::read(path).map_err(|reason| TlsFileError::Read {
        kind,
        path: path.display().to_string(),
        reason,
    })?;
    if !bytes.windows(10).any(|w| w == b"-----BEGIN") {
        return Err(TlsFileError::NotPem {
            kind,
            path: path.display().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> quiche::Config {
        quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap()
    }

    #[test]
    fn a_missing_file_is_reported_with_the_os_reason() {
        let e = load(&mut config(), PemKind::CertChain, "/nonexistent/ztna.pem").unwrap_err();
        assert_eq!(
            e.to_string(),
            "certificate chain /nonexistent/ztna.pem: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn a_directory_or_non_pem_file_says_so() {
        let dir = std::env::temp_dir();
        let e = load(&mut config(), PemKind::PrivateKey, dir.to_str().unwrap()).unwrap_err();
        assert!(e.to_string().contains("Is a directory"), "{e}");
        let f = dir.join(format!("ztna-not-pem-{}", std::process::id()));
        std::fs::write(&f, b"hello").unwrap();
        let e = load(&mut config(), PemKind::CaBundle, f.to_str().unwrap()).unwrap_err();
        assert!(
            e.to_string().ends_with("not PEM (no \"-----BEGIN\" line)"),
            "{e}"
        );
        // PEM, but not a key: now it is the TLS library's turn to refuse.
        std::fs::write(
            &f,
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = load(&mut config(), PemKind::PrivateKey, f.to_str().unwrap()).unwrap_err();
        assert!(matches!(e, TlsFileError::Rejected { .. }), "{e}");
        std::fs::remove_file(&f).unwrap();
    }
}
