//! The collector's certificate authority: creates it, loads it, and issues the certificates the
//! fleet uses (server, operator/maintainer clients, agents from their CSRs).
//!
//! Who a certificate belongs to is written as a SAN URI, read back by [`crate::identity`]:
//! `vedette:agent:<uuid>` for agents, `vedette:role:<role>` (one per role) for people and tools,
//! and `vedette:org:<name>` for the organisation an agent belongs to or an operator is limited
//! to (none: the default organisation for an agent, collector-wide for an operator).
//! Private keys are written with mode 0600 and never leave the host that made them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// SAN URI prefix naming an agent.
pub const AGENT_URI_PREFIX: &str = "vedette:agent:";
/// SAN URI prefix naming a role of a person or tool.
pub const ROLE_URI_PREFIX: &str = "vedette:role:";
/// SAN URI prefix naming the organisation an agent belongs to, or an operator is limited to.
pub const ORG_URI_PREFIX: &str = "vedette:org:";

/// Lifetime of the CA certificate.
const CA_VALIDITY: Duration = Duration::days(3650);
/// Lifetime of server and operator certificates.
const LEAF_VALIDITY: Duration = Duration::days(825);
/// Lifetime of agent certificates.
const AGENT_VALIDITY: Duration = Duration::days(397);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write `{path}`: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("`{path}` is not a valid {what}: {reason}")]
    Invalid {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("certificate signing request rejected: {0}")]
    BadCsr(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Roles a client certificate can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Role {
    /// May enroll and revoke agents, create tokens, read detections.
    Operator,
    /// May publish rule bundles.
    Maintainer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Maintainer => "maintainer",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "operator" => Some(Role::Operator),
            "maintainer" => Some(Role::Maintainer),
            _ => None,
        }
    }
}

/// A PEM certificate and its PEM private key.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The collector's CA, loaded in memory for signing.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Creates a new CA certificate and key.
    pub fn generate(common_name: &str) -> Result<(Ca, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        let issuer = Issuer::new(params, key);
        Ok((Ca { cert_pem, issuer }, key_pem))
    }

    /// Loads a CA from its certificate and key files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, PkiError> {
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Invalid {
            path: key_path.to_owned(),
            what: "private key",
            reason: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| PkiError::Invalid {
            path: cert_path.to_owned(),
            what: "CA certificate",
            reason: e.to_string(),
        })?;
        Ok(Ca { cert_pem, issuer })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// SHA-256 of the CA certificate (DER), lowercase hex: what agents pin with `--ca-sha256`.
    pub fn fingerprint(&self) -> String {
        vedette_engine::bundle::fleet_of_ca_pem(&self.cert_pem).unwrap_or_default()
    }

    /// Issues the collector's TLS server certificate for the given DNS names and IP addresses.
    pub fn issue_server(&self, names: &[String]) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = dn("vedette-collector");
        self.sign_leaf(params, key, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// Signs a leaf certificate for `key`: signature use only, the given purpose, leaf validity.
    fn sign_leaf(
        &self,
        mut params: CertificateParams,
        key: KeyPair,
        purpose: ExtendedKeyUsagePurpose,
    ) -> Result<IssuedCert, PkiError> {
        params.extended_key_usages = vec![purpose];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, LEAF_VALIDITY);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a client certificate for a person or tool with the given roles, limited to one
    /// organisation when `org` is given.
    pub fn issue_client(
        &self,
        name: &str,
        roles: &[Role],
        org: Option<&str>,
    ) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate()?;
        let params = client_params(name, roles, org)?;
        self.sign_leaf(params, key, ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// Signs a person's or tool's CSR (its key made where it is used, never seen here) as
    /// [`issue_client`](Self::issue_client) would issue it: only the request's public key is
    /// taken; the name, roles and organisation are the ones given here.
    pub fn sign_client_csr(
        &self,
        csr_pem: &str,
        name: &str,
        roles: &[Role],
        org: Option<&str>,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let mut params = client_params(name, roles, org)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, LEAF_VALIDITY);
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.pem())
    }

    /// Signs an agent's CSR for an agent of organisation `org`. Only the public key of the
    /// request is used: the subject and the extensions are chosen here, so an agent cannot ask
    /// for a role, another agent's id or another organisation.
    pub fn sign_agent_csr(
        &self,
        csr_pem: &str,
        agent_id: &str,
        org: &str,
        lifetime: std::time::Duration,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(agent_id);
        params.subject_alt_names = vec![
            uri(&format!("{AGENT_URI_PREFIX}{agent_id}"))?,
            uri(&format!("{ORG_URI_PREFIX}{org}"))?,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(
            &mut params,
            Duration::try_from(lifetime).unwrap_or(AGENT_VALIDITY),
        );
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.pem())
    }
}

/// A client certificate's name, roles and organisation.
fn client_params(
    name: &str,
    roles: &[Role],
    org: Option<&str>,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(name);
    params.subject_alt_names = roles
        .iter()
        .map(|r| uri(&format!("{ROLE_URI_PREFIX}{}", r.as_str())))
        .collect::<Result<_, _>>()?;
    if let Some(org) = org {
        params
            .subject_alt_names
            .push(uri(&format!("{ORG_URI_PREFIX}{org}"))?);
    }
    Ok(params)
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Vedette");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn uri(s: &str) -> Result<SanType, rcgen::Error> {
    Ok(SanType::URI(s.to_string().try_into()?))
}

/// Sets the validity and a random serial number: 128 bits, unique without a counter to keep.
fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let mut serial = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut serial);
    // Positive, and without a leading zero byte (DER integers are minimal).
    serial[0] = (serial[0] & 0x7f) | 0x40;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let now = OffsetDateTime::now_utc();
    // Tolerate a little clock skew between the collector and its peers: an hour, or a tenth
    // of a short lifetime.
    params.not_before = now - std::cmp::min(validity / 10_i32, Duration::hours(1));
    params.not_after = now + validity;
}

/// The serial number of a certificate (DER), lowercase hex: how `certs list` and
/// `certs revoke` name it.
pub fn serial_hex(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(hex::encode(cert.raw_serial()))
}

/// The serial number of the first certificate in a PEM text, lowercase hex.
pub fn serial_of_pem(pem: &str) -> Option<String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    serial_hex(der.as_ref())
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Issues a client certificate with `roles` under the CA in `ca_cert`/`ca_key`, and writes
/// `PREFIX.crt` and `PREFIX.key` (0600). Returns both paths.
pub fn issue_files(
    ca_cert: &Path,
    ca_key: &Path,
    name: &str,
    roles: &[Role],
    org: Option<&str>,
    out: &Path,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let ca = Ca::load(ca_cert, ca_key)?;
    let cert = ca.issue_client(name, roles, org)?;
    let (crt, key) = (with_suffix(out, ".crt"), with_suffix(out, ".key"));
    write_new(&key, cert.key_pem.as_bytes(), 0o600)?;
    write_new(&crt, cert.cert_pem.as_bytes(), 0o644)?;
    Ok((crt, key))
}

/// Signs the CSR in `csr` as a client certificate and writes `PREFIX.crt` (no key: it stays
/// where the request was made).
pub fn sign_csr_file(
    (ca_cert, ca_key): (&Path, &Path),
    csr: &Path,
    name: &str,
    roles: &[Role],
    org: Option<&str>,
    out: &Path,
) -> Result<PathBuf, PkiError> {
    let ca = Ca::load(ca_cert, ca_key)?;
    let pem = fs::read_to_string(csr).map_err(|source| PkiError::Read {
        path: csr.to_owned(),
        source,
    })?;
    let cert = ca
        .sign_client_csr(&pem, name, roles, org)
        .map_err(|e| match e {
            PkiError::BadCsr(why) => PkiError::BadCsr(format!("`{}`: {why}", csr.display())),
            other => other,
        })?;
    let crt = with_suffix(out, ".crt");
    write_new(&crt, cert.as_bytes(), 0o644)?;
    Ok(crt)
}

/// `PREFIX` + `suffix` (`alice` + `.key`), for the files a command writes under one prefix.
pub fn with_suffix(prefix: &Path, suffix: &str) -> std::path::PathBuf {
    let mut p = prefix.as_os_str().to_owned();
    p.push(suffix);
    p.into()
}

/// Writes a new file with the given mode; fails if it exists.
pub fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists {
                    path: path.to_owned(),
                }
            } else {
                PkiError::Write {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(|source| PkiError::Write {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_certificate_ignores_what_the_csr_asks_for() {
        let (ca, _) = Ca::generate("test CA").unwrap();
        // The CSR asks for an operator role and another organisation; the issued certificate
        // must carry only the agent id and the organisation given here.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            uri("vedette:role:operator").unwrap(),
            uri("vedette:org:other").unwrap(),
        ];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let pem = ca
            .sign_agent_csr(
                &csr,
                "0000-agent",
                "alpha",
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        let id = crate::peer::Peer::from_pem_for_tests(&pem);
        assert_eq!(
            id,
            crate::peer::Peer::Agent {
                id: "0000-agent".to_string(),
                org: "alpha".to_string()
            }
        );
    }

    #[test]
    fn serial_numbers_are_random_and_unique() {
        let (ca, _) = Ca::generate("test CA").unwrap();
        let serials: std::collections::BTreeSet<String> = (0..20)
            .map(|_| {
                let c = ca.issue_client("alice", &[Role::Operator], None).unwrap();
                serial_of_pem(&c.cert_pem).unwrap()
            })
            .collect();
        assert_eq!(serials.len(), 20);
        assert!(serials.iter().all(|s| s.len() == 32), "{serials:?}");
    }

    #[test]
    fn garbage_csr_is_rejected() {
        let (ca, _) = Ca::generate("test CA").unwrap();
        assert!(matches!(
            ca.sign_agent_csr(
                "not a csr",
                "x",
                "default",
                std::time::Duration::from_secs(60)
            ),
            Err(PkiError::BadCsr(_))
        ));
    }
}
