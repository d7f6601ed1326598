//! Peer identities from X.509 certificates, and what they authorize.
//!
//! Names follow `<role>.<service>.ztna` in DNS SANs, so one certificate can carry
//! grants for several services and ordinary X.509 tooling can inspect them. Chain
//! validation is the TLS stack's job; this module reads an already verified
//! certificate. Pure Rust: the agent engine (and through it the C ABI) uses it to
//! check the connector at the other end of a data connection.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A certificate that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("bad certificate: {0}")]
pub struct CertificateError(pub String);

/// Decodes the first CERTIFICATE block of a PEM file to DER.
pub fn pem_to_der(pem: &[u8]) -> Result<Vec<u8>, CertificateError> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| CertificateError(format!("PEM: {e}")))?;
    if pem.label != "CERTIFICATE" {
        return Err(CertificateError(format!(
            "expected CERTIFICATE PEM block, found {}",
            pem.label
        )));
    }
    Ok(pem.contents)
}

/// Parses one DER certificate; bytes after it are an error.
pub fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, CertificateError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| CertificateError(format!("X.509: {e}")))?;
    if !rest.is_empty() {
        return Err(CertificateError("trailing data after certificate".into()));
    }
    Ok(cert)
}

/// What a participant is: an agent (reaches services) or a connector (serves them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Agent,
    Connector,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Connector => "connector",
        }
    }
}

/// What a verified peer certificate says about its holder.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    pub subject: String,
    pub dns_sans: Vec<String>,
}

impl PeerIdentity {
    /// Parses a DER certificate (e.g. quiche `Connection::peer_cert()`).
    /// Does no chain validation: that is the TLS stack's job.
    pub fn from_der(der: &[u8]) -> Result<Self, CertificateError> {
        let cert = parse_cert(der)?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| CertificateError(format!("SAN extension: {e}")))?;
        let dns_sans = san
            .map(|s| {
                s.value
                    .general_names
                    .iter()
                    .filter_map(|g| match g {
                        GeneralName::DNSName(n) => Some((*n).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(PeerIdentity {
            subject: cert.subject().to_string(),
            dns_sans,
        })
    }

    /// True if some DNS SAN grants `role` access to `service`:
    /// `<role>.<service>.ztna`, `<role>.*.ztna` (any service), or a bare `*`
    /// (any role, any service).
    ///
    /// The role label and `.ztna` suffix are ASCII case-insensitive like any
    /// DNS name, but the service id is compared exactly, so services that
    /// differ only in case never leak into each other. The service id is
    /// everything between the role label and `.ztna`, so it may contain dots
    /// (`agent.a.b.ztna` covers service `a.b`). An empty service id is never
    /// authorized, and `*` inside a longer label (`agent.x*.ztna`) is not a
    /// wildcard.
    pub fn authorizes(&self, role: Role, service: &str) -> bool {
        if service.is_empty() {
            return false;
        }
        self.dns_sans
            .iter()
            .any(|san| san_grants(san, role, service))
    }

    /// Short human name for logs: the first SAN, else the subject.
    pub fn name(&self) -> String {
        self.dns_sans
            .first()
            .cloned()
            .unwrap_or_else(|| self.subject.clone())
    }
}

fn san_grants(san: &str, role: Role, service: &str) -> bool {
    if san == "*" {
        return true;
    }
    const SUFFIX: &str = ".ztna";
    let prefix_len = role.as_str().len() + 1;
    // Byte slicing below is safe: the checked prefix/suffix are ASCII, so the
    // cut points fall on char boundaries whenever the comparisons succeed.
    if san.len() < prefix_len + SUFFIX.len()
        || !san.is_char_boundary(prefix_len)
        || !san.is_char_boundary(san.len() - SUFFIX.len())
    {
        return false;
    }
    let (head, rest) = san.split_at(prefix_len);
    let (middle, tail) = rest.split_at(rest.len() - SUFFIX.len());
    if !head[..head.len() - 1].eq_ignore_ascii_case(role.as_str())
        || !head.ends_with('.')
        || !tail.eq_ignore_ascii_case(SUFFIX)
        || middle.is_empty()
    {
        return false;
    }
    middle == "*" || middle == service
}

/// Checks a peer's certificate (DER, as quiche's `peer_cert()` gives it) for `role`
/// on `service`: `Ok(name)` for logs, or `Err(reason)`.
pub fn authorize(der: Option<&[u8]>, role: Role, service: &str) -> Result<String, String> {
    let der = der.ok_or("no peer certificate")?;
    let id = PeerIdentity::from_der(der).map_err(|e| e.to_string())?;
    if id.authorizes(role, service) {
        Ok(id.name())
    } else {
        Err(format!(
            "{} is not authorized as {} for {service:?}",
            id.name(),
            role.as_str()
        ))
    }
}
