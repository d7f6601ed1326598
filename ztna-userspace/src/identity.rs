//! Certificate-based identities: dev PKI generation and peer authorization.
//!
//! Names follow `<role>.<service>.ztna` in DNS SANs, so one certificate can
//! carry grants for several services and ordinary X.509 tooling can inspect
//! them.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::string::{BmpString, Ia5String, PrintableString, TeletexString, UniversalString};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
};
use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::X509Certificate;
use ztna_core::identity::CertificateError;
pub use ztna_core::identity::{PeerIdentity, Role, authorize};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
const CA_CN: &str = "ztna dev CA";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("bad certificate: {0}")]
    BadCertificate(String),
}

impl From<CertificateError> for IdentityError {
    fn from(e: CertificateError) -> Self {
        IdentityError::BadCertificate(e.0)
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Paths of the files written by [`generate_dev_pki`].
#[derive(Clone, Debug)]
pub struct DevPki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub agent_cert: PathBuf,
    pub agent_key: PathBuf,
    pub connector_cert: PathBuf,
    pub connector_key: PathBuf,
}

/// Writes a throw-away CA plus server, agent and connector leaves into `dir`.
///
/// Files: `ca.pem`/`ca.key`, `intermediate.pem`/`.key` (SANs `localhost`,
/// `intermediate.ztna`, 127.0.0.1, ::1), `agent.pem`/`.key`
/// (`agent.<svc>.ztna` per service), `connector.pem`/`.key`
/// (`connector.<svc>.ztna` per service). Keys are P-256 PKCS#8 PEM.
pub fn generate_dev_pki(dir: &Path, services: &[String]) -> Result<DevPki, IdentityError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;

    let ca_key = new_key()?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params.distinguished_name.push(DnType::CommonName, CA_CN);
    // pathlen 0: the dev CA only ever signs leaves directly.
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut ca_params);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let ca_cert_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    write_file(&ca_cert_path, ca_cert.pem().as_bytes(), false)?;
    write_file(&ca_key_path, issuer.key().serialize_pem().as_bytes(), true)?;

    let server_sans = vec![
        SanType::DnsName(ia5("localhost")?),
        SanType::DnsName(ia5("intermediate.ztna")?),
        SanType::IpAddress([127, 0, 0, 1].into()),
        SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
    ];
    let (server_cert, server_key) = write_leaf(
        &issuer,
        dir,
        "intermediate",
        server_sans,
        &[ExtendedKeyUsagePurpose::ServerAuth],
    )?;

    // Agents and connectors get both EKUs because they may later terminate
    // TLS for each other; BoringSSL enforces the EKU per direction.
    let peer_eku = [
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let role_sans = |role: &str| -> Result<Vec<SanType>, IdentityError> {
        services
            .iter()
            .map(|s| Ok(SanType::DnsName(ia5(&format!("{role}.{s}.ztna"))?)))
            .collect()
    };
    let (agent_cert, agent_key) =
        write_leaf(&issuer, dir, "agent", role_sans("agent")?, &peer_eku)?;
    let (connector_cert, connector_key) = write_leaf(
        &issuer,
        dir,
        "connector",
        role_sans("connector")?,
        &peer_eku,
    )?;

    Ok(DevPki {
        dir: dir.to_path_buf(),
        ca_cert: ca_cert_path,
        ca_key: ca_key_path,
        server_cert,
        server_key,
        agent_cert,
        agent_key,
        connector_cert,
        connector_key,
    })
}

/// Issues one more leaf (serverAuth + clientAuth) with the given DNS SANs,
/// signed by an existing CA on disk. Writes `<dir>/<name>.pem` and
/// `<dir>/<name>.key`.
pub fn issue_leaf(
    ca_cert: &Path,
    ca_key: &Path,
    dir: &Path,
    name: &str,
    dns_sans: &[String],
) -> Result<(PathBuf, PathBuf), IdentityError> {
    let issuer = load_issuer(ca_cert, ca_key)?;
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let sans = dns_sans
        .iter()
        .map(|s| Ok(SanType::DnsName(ia5(s)?)))
        .collect::<Result<Vec<_>, IdentityError>>()?;
    write_leaf(
        &issuer,
        dir,
        name,
        sans,
        &[
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    )
}

fn new_key() -> Result<KeyPair, IdentityError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

fn ia5(s: &str) -> Result<Ia5String, IdentityError> {
    Ok(Ia5String::try_from(s)?)
}

fn set_validity(params: &mut CertificateParams) {
    // Backdated a day so small clock skew between hosts doesn't make a fresh
    // certificate "not yet valid".
    let now = SystemTime::now();
    params.not_before = (now - DAY).into();
    params.not_after = (now + 365 * DAY).into();
}

fn write_leaf(
    issuer: &Issuer<'_, KeyPair>,
    dir: &Path,
    name: &str,
    sans: Vec<SanType>,
    eku: &[ExtendedKeyUsagePurpose],
) -> Result<(PathBuf, PathBuf), IdentityError> {
    let key = new_key()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = eku.to_vec();
    // AKID lets verifiers pick the right CA when several share a subject name
    // (e.g. dev PKIs regenerated with the same CN).
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params);
    let cert = params.signed_by(&key, issuer)?;

    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    write_file(&cert_path, cert.pem().as_bytes(), false)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), true)?;
    Ok((cert_path, key_path))
}

fn write_file(path: &Path, data: &[u8], private: bool) -> Result<(), IdentityError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))
}

fn read_file(path: &Path) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(io_err(path))
}

/// Decodes the first CERTIFICATE block of a PEM file to DER.
pub fn pem_to_der(pem: &[u8]) -> Result<Vec<u8>, IdentityError> {
    Ok(ztna_core::identity::pem_to_der(pem)?)
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, IdentityError> {
    Ok(ztna_core::identity::parse_cert(der)?)
}

/// Rebuilds an rcgen issuer from CA files. rcgen's own
/// `Issuer::from_ca_cert_pem` sits behind its `x509-parser` feature, which
/// the workspace does not enable, so the issuer DN and key id are copied here.
fn load_issuer(ca_cert: &Path, ca_key: &Path) -> Result<Issuer<'static, KeyPair>, IdentityError> {
    let der = pem_to_der(&read_file(ca_cert)?)?;
    let cert = parse_cert(&der)?;
    let key_pem = String::from_utf8(read_file(ca_key)?)
        .map_err(|_| IdentityError::BadCertificate(format!("{}: not UTF-8", ca_key.display())))?;
    let key = KeyPair::from_pem(&key_pem)?;

    // A mismatched pair would silently produce leaves nobody can verify.
    if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
        return Err(IdentityError::BadCertificate(format!(
            "{} does not match the key in {}",
            ca_key.display(),
            ca_cert.display()
        )));
    }
    if !cert.is_ca() {
        return Err(IdentityError::BadCertificate(format!(
            "{} is not a CA certificate",
            ca_cert.display()
        )));
    }

    let mut params = CertificateParams::default();
    params.distinguished_name = dn_from_x509(cert.subject())?;
    // Leaves' AKID must equal the CA's SKI byte for byte, or OpenSSL-family
    // verifiers refuse to chain them.
    if let Some(ski) = cert
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
    {
        params.key_identifier_method = KeyIdMethod::PreSpecified(ski);
    }
    Ok(Issuer::new(params, key))
}

/// Copies a subject name keeping each attribute's string type, so the
/// leaves' issuer field is byte-identical to the CA's subject.
fn dn_from_x509(
    name: &x509_parser::x509::X509Name<'_>,
) -> Result<DistinguishedName, IdentityError> {
    let bad = |m: &str| IdentityError::BadCertificate(format!("CA subject: {m}"));
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err(bad("multi-valued or empty RDN unsupported"));
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| bad("attribute OID too large"))?
            .collect();
        let data = attr.attr_value().data;
        let text = || std::str::from_utf8(data).map_err(|_| bad("attribute not UTF-8"));
        let value = match attr.attr_value().header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text()?.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(PrintableString::try_from(text()?)?),
            Tag::Ia5String => DnValue::Ia5String(Ia5String::try_from(text()?)?),
            Tag::T61String => DnValue::TeletexString(TeletexString::try_from(text()?)?),
            Tag::BmpString => DnValue::BmpString(BmpString::from_utf16be(data.to_vec())?),
            Tag::UniversalString => {
                DnValue::UniversalString(UniversalString::from_utf32be(data.to_vec())?)
            }
            t => return Err(bad(&format!("unsupported string type {t}"))),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Removes the directory on drop so failed tests don't litter /tmp.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let p = std::env::temp_dir().join(format!(
                "ztna-identity-{tag}-{}-{nanos}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn services() -> Vec<String> {
        vec!["echo".to_string(), "web".to_string()]
    }

    fn identity_of(pem_path: &Path) -> PeerIdentity {
        let der = pem_to_der(&fs::read(pem_path).unwrap()).unwrap();
        PeerIdentity::from_der(&der).unwrap()
    }

    fn ident(sans: &[&str]) -> PeerIdentity {
        PeerIdentity {
            subject: "CN=test".into(),
            dns_sans: sans.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn agent_cert_authorizes_only_its_role_and_services() {
        let tmp = TempDir::new("agent");
        let pki = generate_dev_pki(&tmp.0, &services()).unwrap();
        let id = identity_of(&pki.agent_cert);
        assert_eq!(id.dns_sans, vec!["agent.echo.ztna", "agent.web.ztna"]);
        assert!(id.authorizes(Role::Agent, "echo"));
        assert!(id.authorizes(Role::Agent, "web"));
        assert!(!id.authorizes(Role::Connector, "echo"));
        assert!(!id.authorizes(Role::Agent, "other"));
        assert_eq!(id.name(), "agent.echo.ztna");
        assert!(id.subject.contains("CN=agent"), "{}", id.subject);

        let conn = identity_of(&pki.connector_cert);
        assert!(conn.authorizes(Role::Connector, "echo"));
        assert!(!conn.authorizes(Role::Agent, "echo"));
    }

    #[test]
    fn server_cert_has_expected_sans_and_ca_is_ca() {
        let tmp = TempDir::new("server");
        let pki = generate_dev_pki(&tmp.0, &services()).unwrap();
        let der = pem_to_der(&fs::read(&pki.server_cert).unwrap()).unwrap();
        let cert = parse_cert(&der).unwrap();
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|g| g.to_string())
            .collect();
        assert_eq!(
            names,
            vec![
                "DNSName(localhost)",
                "DNSName(intermediate.ztna)",
                // x509-parser's Display prints IPs as hex octets.
                "IPAddress(7f:00:00:01)",
                "IPAddress(00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:01)",
            ]
        );
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);

        let ca_der = pem_to_der(&fs::read(&pki.ca_cert).unwrap()).unwrap();
        let ca = parse_cert(&ca_der).unwrap();
        assert!(ca.is_ca());
        assert_eq!(ca.subject().to_string(), "CN=ztna dev CA");
        assert_eq!(cert.issuer(), ca.subject());
        // Validity window as documented, with slack for slow test machines.
        let nb = cert.validity().not_before.timestamp();
        let na = cert.validity().not_after.timestamp();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (now - 86400 - 60..=now - 86400 + 60).contains(&nb),
            "{nb} vs {now}"
        );
        assert!((now + 365 * 86400 - 60..=now + 365 * 86400 + 60).contains(&na));
    }

    #[cfg(unix)]
    #[test]
    fn private_keys_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = TempDir::new("perm");
        let pki = generate_dev_pki(&tmp.0, &services()).unwrap();
        for k in [
            &pki.ca_key,
            &pki.server_key,
            &pki.agent_key,
            &pki.connector_key,
        ] {
            let mode = fs::metadata(k).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", k.display());
        }
    }

    #[test]
    fn issue_leaf_with_reloaded_ca_chains_to_it() {
        let tmp = TempDir::new("leaf");
        let pki = generate_dev_pki(&tmp.0, &services()).unwrap();
        let (cert_path, key_path) = issue_leaf(
            &pki.ca_cert,
            &pki.ca_key,
            &tmp.0,
            "other",
            &["agent.other.ztna".to_string()],
        )
        .unwrap();
        assert_eq!(cert_path, tmp.0.join("other.pem"));
        assert!(key_path.exists());

        let id = identity_of(&cert_path);
        assert!(id.authorizes(Role::Agent, "other"));
        assert!(!id.authorizes(Role::Agent, "echo"));

        // Signature, issuer name and AKID must all line up with the CA for
        // real verifiers to build the chain.
        let ca_der = pem_to_der(&fs::read(&pki.ca_cert).unwrap()).unwrap();
        let ca = parse_cert(&ca_der).unwrap();
        let leaf_der = pem_to_der(&fs::read(&cert_path).unwrap()).unwrap();
        let leaf = parse_cert(&leaf_der).unwrap();
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            ca.public_key().subject_public_key.data.as_ref(),
        )
        .verify(
            leaf.tbs_certificate.as_ref(),
            leaf.signature_value.data.as_ref(),
        )
        .unwrap();
        assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());
        let ski = ca
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            })
            .unwrap();
        let akid = leaf
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            })
            .unwrap();
        assert_eq!(akid, ski);
    }

    #[test]
    fn issue_leaf_rejects_mismatched_ca_key() {
        let a = TempDir::new("mis-a");
        let b = TempDir::new("mis-b");
        let pa = generate_dev_pki(&a.0, &services()).unwrap();
        let pb = generate_dev_pki(&b.0, &services()).unwrap();
        let err =
            issue_leaf(&pa.ca_cert, &pb.ca_key, &a.0, "x", &["agent.x.ztna".into()]).unwrap_err();
        assert!(matches!(err, IdentityError::BadCertificate(_)), "{err}");
        // A leaf is not a CA even with its own key.
        let err = issue_leaf(
            &pa.agent_cert,
            &pa.agent_key,
            &a.0,
            "x",
            &["agent.x.ztna".into()],
        )
        .unwrap_err();
        assert!(matches!(err, IdentityError::BadCertificate(_)), "{err}");
    }

    #[test]
    fn io_error_names_the_path() {
        let tmp = TempDir::new("io");
        let missing = tmp.0.join("nope.pem");
        let err = issue_leaf(&missing, &missing, &tmp.0, "x", &[]).unwrap_err();
        match &err {
            IdentityError::Io { path, .. } => assert_eq!(path, &missing),
            e => panic!("unexpected {e:?}"),
        }
        assert!(err.to_string().contains("nope.pem"));
    }

    #[test]
    fn wildcard_service_leaf_authorizes_any_service_for_its_role() {
        let tmp = TempDir::new("wild");
        let pki = generate_dev_pki(&tmp.0, &services()).unwrap();
        let (cert, _) = issue_leaf(
            &pki.ca_cert,
            &pki.ca_key,
            &tmp.0,
            "agent-any",
            &["agent.*.ztna".to_string()],
        )
        .unwrap();
        let id = identity_of(&cert);
        assert_eq!(id.dns_sans, vec!["agent.*.ztna"]);
        assert!(id.authorizes(Role::Agent, "echo"));
        assert!(id.authorizes(Role::Agent, "anything.at.all"));
        assert!(!id.authorizes(Role::Connector, "echo"));
    }

    #[test]
    fn bare_star_authorizes_everything() {
        let id = ident(&["*"]);
        assert!(id.authorizes(Role::Agent, "echo"));
        assert!(id.authorizes(Role::Connector, "other"));
        assert!(!id.authorizes(Role::Agent, ""));
    }

    #[test]
    fn bare_star_survives_issue_and_parse() {
        let tmp = TempDir::new("star");
        let pki = generate_dev_pki(&tmp.0, &services()).unwrap();
        let (cert, _) = issue_leaf(
            &pki.ca_cert,
            &pki.ca_key,
            &tmp.0,
            "admin",
            &["*".to_string()],
        )
        .unwrap();
        let id = identity_of(&cert);
        assert!(id.authorizes(Role::Connector, "web"));
    }

    #[test]
    fn matching_rules() {
        let id = ident(&["AGENT.echo.ZTNA", "agent.a.b.ztna", "connector.x*.ztna"]);
        assert!(id.authorizes(Role::Agent, "echo"));
        assert!(
            !id.authorizes(Role::Agent, "ECHO"),
            "service id is case-sensitive"
        );
        assert!(id.authorizes(Role::Agent, "a.b"));
        assert!(!id.authorizes(Role::Agent, "a"));
        assert!(!id.authorizes(Role::Agent, "b"));
        assert!(
            !id.authorizes(Role::Connector, "xyz"),
            "partial-label * is literal"
        );
        assert!(id.authorizes(Role::Connector, "x*"));

        for san in [
            "agent..ztna",
            "agent.ztna",
            "agentx.echo.ztna",
            "agent.echo.ztnax",
            "agent.echo.zt",
            "agent.echo",
            "xagent.echo.ztna",
            "agent.echo.ztna.evil",
            "**",
            "",
            "agentéecho.ztna",
        ] {
            assert!(!ident(&[san]).authorizes(Role::Agent, "echo"), "{san:?}");
        }
        assert!(!ident(&[]).authorizes(Role::Agent, "echo"));
    }

    #[test]
    fn name_prefers_first_san() {
        assert_eq!(ident(&["b", "a"]).name(), "b");
        assert_eq!(ident(&[]).name(), "CN=test");
    }

    #[test]
    fn from_der_rejects_garbage() {
        assert!(matches!(
            PeerIdentity::from_der(b"not a cert"),
            Err(CertificateError(_))
        ));
        assert!(
            pem_to_der(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").is_err()
        );
    }

    // --- BoringSSL acceptance via an in-memory quiche handshake ---

    struct Side {
        cert: Option<(PathBuf, PathBuf)>,
    }

    /// Runs a QUIC handshake between in-memory endpoints. Returns the
    /// server's view of the client certificate on success, or an error
    /// string naming whichever side failed.
    fn handshake(
        ca: &Path,
        server: Side,
        client: Side,
        sni: &str,
    ) -> Result<Option<Vec<u8>>, String> {
        let alpn: &[&[u8]] = &[b"ztna-test"];
        let mut scfg = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
        let (sc, sk) = server.cert.unwrap();
        scfg.load_cert_chain_from_pem_file(sc.to_str().unwrap())
            .unwrap();
        scfg.load_priv_key_from_pem_file(sk.to_str().unwrap())
            .unwrap();
        scfg.load_verify_locations_from_file(ca.to_str().unwrap())
            .unwrap();
        scfg.verify_peer(true);
        scfg.set_application_protos(alpn).unwrap();

        let mut ccfg = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
        if let Some((cc, ck)) = client.cert {
            ccfg.load_cert_chain_from_pem_file(cc.to_str().unwrap())
                .unwrap();
            ccfg.load_priv_key_from_pem_file(ck.to_str().unwrap())
                .unwrap();
        }
        ccfg.load_verify_locations_from_file(ca.to_str().unwrap())
            .unwrap();
        ccfg.verify_peer(true);
        ccfg.set_application_protos(alpn).unwrap();

        let caddr: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let saddr: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let ccid = quiche::ConnectionId::from_ref(&[1; 16]);
        let scid = quiche::ConnectionId::from_ref(&[2; 16]);
        let mut c = quiche::connect(Some(sni), &ccid, caddr, saddr, &mut ccfg).unwrap();
        let mut s = quiche::accept(&scid, None, saddr, caddr, &mut scfg).unwrap();

        let mut buf = [0u8; 65535];
        for _ in 0..50 {
            let moved = pump(&mut c, &mut s, caddr, saddr, &mut buf)?
                | pump(&mut s, &mut c, saddr, caddr, &mut buf)?;
            if let Some(e) = c.local_error().or(s.local_error()) {
                return Err(format!("{e:?}"));
            }
            if c.is_established() && s.is_established() && !moved {
                return Ok(s.peer_cert().map(<[u8]>::to_vec));
            }
            if !moved {
                break;
            }
        }
        Err(format!(
            "no handshake: client est={} err={:?}/{:?}, server est={} err={:?}/{:?}",
            c.is_established(),
            c.local_error(),
            c.peer_error(),
            s.is_established(),
            s.local_error(),
            s.peer_error()
        ))
    }

    /// Delivers everything `from` wants to send; true if anything moved.
    fn pump(
        from: &mut quiche::Connection,
        to: &mut quiche::Connection,
        faddr: SocketAddr,
        taddr: SocketAddr,
        buf: &mut [u8],
    ) -> Result<bool, String> {
        let mut moved = false;
        loop {
            match from.send(buf) {
                Ok((n, _)) => {
                    moved = true;
                    // Errors surface via local_error()/peer_error() instead.
                    let _ = to.recv(
                        &mut buf[..n],
                        quiche::RecvInfo {
                            from: faddr,
                            to: taddr,
                        },
                    );
                }
                Err(quiche::Error::Done) => return Ok(moved),
                Err(e) => return Err(format!("send: {e:?}")),
            }
        }
    }

    #[test]
    fn boringssl_accepts_mutual_tls() {
        let tmp = TempDir::new("tls");
        let pki = generate_dev_pki(&tmp.0, &services()).unwrap();
        let server = || Side {
            cert: Some((pki.server_cert.clone(), pki.server_key.clone())),
        };

        for sni in ["localhost", "intermediate.ztna"] {
            let peer = handshake(
                &pki.ca_cert,
                server(),
                Side {
                    cert: Some((pki.agent_cert.clone(), pki.agent_key.clone())),
                },
                sni,
            )
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
            let id = PeerIdentity::from_der(&peer.expect("client cert")).unwrap();
            assert!(id.authorizes(Role::Agent, "echo"));
        }

        let peer = handshake(
            &pki.ca_cert,
            server(),
            Side {
                cert: Some((pki.connector_cert.clone(), pki.connector_key.clone())),
            },
            "localhost",
        )
        .unwrap();
        assert!(
            PeerIdentity::from_der(&peer.unwrap())
                .unwrap()
                .authorizes(Role::Connector, "web")
        );

        // Leaves from issue_leaf (reloaded CA) must chain too, including the
        // wildcard-looking SANs.
        let (wc, wk) = issue_leaf(
            &pki.ca_cert,
            &pki.ca_key,
            &tmp.0,
            "wild",
            &["agent.*.ztna".into(), "*".into()],
        )
        .unwrap();
        let peer = handshake(
            &pki.ca_cert,
            server(),
            Side {
                cert: Some((wc, wk)),
            },
            "localhost",
        )
        .unwrap();
        assert!(peer.is_some());
    }

    #[test]
    fn boringssl_rejects_wrong_name_foreign_ca_and_wrong_eku() {
        let tmp = TempDir::new("tls-neg");
        let pki = generate_dev_pki(&tmp.0, &services()).unwrap();
        let other = TempDir::new("tls-neg-other");
        let foreign = generate_dev_pki(&other.0, &services()).unwrap();
        let server = || Side {
            cert: Some((pki.server_cert.clone(), pki.server_key.clone())),
        };
        let agent = || Side {
            cert: Some((pki.agent_cert.clone(), pki.agent_key.clone())),
        };

        // QUIC maps TLS alert N to transport error 0x100 + N; checking the
        // alert proves the rejection came from certificate verification.
        let alert = |r: Result<Option<Vec<u8>>, String>, n: u64| {
            let e = r.expect_err("handshake should fail");
            assert!(
                e.contains(&format!("error_code: {}", 0x100 + n)),
                "want alert {n}: {e}"
            );
        };
        alert(
            handshake(&pki.ca_cert, server(), agent(), "wrong.example"),
            42,
        ); // bad_certificate
        // Same CN "ztna dev CA" but a different key: must not chain.
        let foreign_agent = Side {
            cert: Some((foreign.agent_cert.clone(), foreign.agent_key.clone())),
        };
        alert(
            handshake(&pki.ca_cert, server(), foreign_agent, "localhost"),
            48,
        ); // unknown_ca
        // The server leaf lacks clientAuth, so BoringSSL refuses it as a client cert.
        let server_as_client = server();
        alert(
            handshake(&pki.ca_cert, server(), server_as_client, "localhost"),
            43,
        ); // unsupported_certificate
    }

    /// quiche's `verify_peer(true)` maps to plain SSL_VERIFY_PEER without
    /// FAIL_IF_NO_PEER_CERT, so a certificate-less client still completes the
    /// handshake. Callers must treat a missing `peer_cert()` as unauthorized.
    #[test]
    fn quiche_server_accepts_client_without_certificate() {
        let tmp = TempDir::new("tls-nocert");
        let pki = generate_dev_pki(&tmp.0, &services()).unwrap();
        let peer = handshake(
            &pki.ca_cert,
            Side {
                cert: Some((pki.server_cert.clone(), pki.server_key.clone())),
            },
            Side { cert: None },
            "localhost",
        )
        .unwrap();
        assert!(peer.is_none());
    }
}
