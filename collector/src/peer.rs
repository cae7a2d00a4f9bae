//! Who is calling (the peer): the one place that turns a verified TLS client certificate into
//! an agent or a client with roles. (A STIX `identity` is something else: `vedette_share::stix`.)
//!
//! The TLS layer (see [`crate::server::tls`]) has already verified the chain against the
//! collector's CA before a request reaches a handler; this module only reads the SAN URIs that
//! [`crate::pki`] wrote. Nothing a client sends in a message is ever used as its identity.

use std::collections::BTreeSet;

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::orgs::DEFAULT_ORG;
use crate::pki::{AGENT_URI_PREFIX, ORG_URI_PREFIX, ROLE_URI_PREFIX, Role};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// An enrolled agent, by the id and the organisation in its certificate (the default
    /// organisation when the certificate names none).
    Agent { id: String, org: String },
    /// A person or tool with the given roles (operator, maintainer), limited to one
    /// organisation when `org` is set, collector-wide otherwise.
    Client {
        name: String,
        roles: BTreeSet<Role>,
        org: Option<String>,
    },
}

/// The identity the web console authenticated (by client certificate or account), set on the
/// admin calls it makes for that caller. Only the collector's own code can set it: request
/// extensions never come from the network.
#[derive(Debug, Clone)]
pub(crate) struct OnBehalfOf(pub Peer);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Agent { id, .. } => write!(f, "agent {id}"),
            Peer::Client {
                name,
                org: Some(org),
                ..
            } => write!(f, "{name} (of {org})"),
            Peer::Client { name, .. } => write!(f, "{name}"),
        }
    }
}

impl Peer {
    /// The identity of the verified client certificate of a request.
    ///
    /// Fails with UNAUTHENTICATED when the caller presented no certificate, and with
    /// PERMISSION_DENIED when the certificate names neither an agent nor a role.
    pub fn of<T>(request: &Request<T>) -> Result<Peer, Status> {
        if let Some(OnBehalfOf(id)) = request.extensions().get::<OnBehalfOf>() {
            return Ok(id.clone());
        }
        let leaf = Peer::leaf_der(request)
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        Peer::from_der(&leaf)
            .ok_or_else(|| Status::permission_denied("the client certificate names no identity"))
    }

    /// The verified client certificate of a request (DER), if it came with one.
    pub fn leaf_der<T>(request: &Request<T>) -> Option<Vec<u8>> {
        request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()))
    }

    /// A certificate's validity (DER): not before and not after, in seconds since the epoch.
    pub fn validity(der: &[u8]) -> Option<(i64, i64)> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let v = cert.validity();
        Some((v.not_before.timestamp(), v.not_after.timestamp()))
    }

    /// What the store records of a certificate (DER) seen or issued at `now_ms`.
    pub fn cert_row(der: &[u8], now_ms: i64) -> Option<crate::store::CertRow> {
        let id = Peer::from_der(der)?;
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let (kind, subject, roles, org) = match id {
            Peer::Agent { id, org } => ("agent", id, String::new(), org),
            Peer::Client { name, roles, org } => (
                "client",
                name,
                roles
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                org.unwrap_or_default(),
            ),
        };
        Some(crate::store::CertRow {
            serial: hex::encode(cert.raw_serial()),
            kind: kind.into(),
            subject,
            roles,
            not_after_ms: cert.validity().not_after.timestamp().saturating_mul(1000),
            recorded_at_ms: now_ms,
            revoked_at_ms: 0,
            org,
        })
    }

    pub(crate) fn from_der(der: &[u8]) -> Option<Peer> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        let mut agent = None;
        let mut roles = BTreeSet::new();
        let mut orgs = Vec::new();
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Some(id) = uri.strip_prefix(AGENT_URI_PREFIX) {
                    agent = Some(id.to_string());
                } else if let Some(role) = uri.strip_prefix(ROLE_URI_PREFIX).and_then(Role::parse) {
                    roles.insert(role);
                } else if let Some(org) = uri.strip_prefix(ORG_URI_PREFIX) {
                    orgs.push(org.to_string());
                }
            }
        }
        // A certificate naming several organisations, an empty one, or both an agent and
        // roles is not one this CA issues: refuse it.
        if orgs.len() > 1 || orgs.iter().any(|o| crate::orgs::check_name(o).is_err()) {
            return None;
        }
        let org = orgs.pop();
        match (agent, roles.is_empty()) {
            (Some(id), true) if !id.is_empty() => Some(Peer::Agent {
                id,
                org: org.unwrap_or_else(|| DEFAULT_ORG.to_string()),
            }),
            (None, false) => {
                let name = cert
                    .subject()
                    .iter_common_name()
                    .next()
                    .and_then(|cn| cn.as_str().ok())
                    .unwrap_or("")
                    .to_string();
                Some(Peer::Client { name, roles, org })
            }
            _ => None,
        }
    }

    /// The agent id and organisation, or PERMISSION_DENIED for any other identity.
    pub fn require_agent(self) -> Result<(String, String), Status> {
        match self {
            Peer::Agent { id, org } => Ok((id, org)),
            Peer::Client { .. } => Err(Status::permission_denied(
                "only agent certificates may open an agent stream",
            )),
        }
    }

    /// The certificate's name (agent id, or the person or tool).
    pub fn name(&self) -> &str {
        match self {
            Peer::Agent { id, .. } => id,
            Peer::Client { name, .. } => name,
        }
    }

    /// The organisation a client is limited to; None for collector-wide clients (and agents,
    /// which never reach the admin API).
    pub fn scope(&self) -> Option<&str> {
        match self {
            Peer::Client { org, .. } => org.as_deref(),
            Peer::Agent { .. } => None,
        }
    }

    /// PERMISSION_DENIED for a client limited to one organisation: for what is collector-wide.
    pub fn require_collector_wide(&self, what: &str) -> Result<(), Status> {
        match self.scope() {
            None => Ok(()),
            Some(_) => Err(Status::permission_denied(format!(
                "{what} is collector-wide: this certificate is limited to one organisation"
            ))),
        }
    }

    /// Succeeds when the identity carries `role`; agents never do.
    pub fn require_role(&self, role: Role) -> Result<(), Status> {
        match self {
            Peer::Client { roles, .. } if roles.contains(&role) => Ok(()),
            Peer::Client { .. } => Err(Status::permission_denied(format!(
                "this certificate lacks the {} role",
                role.as_str()
            ))),
            Peer::Agent { .. } => Err(Status::permission_denied(
                "agent certificates cannot call the admin API",
            )),
        }
    }

    #[cfg(test)]
    pub fn from_pem_for_tests(pem: &str) -> Peer {
        Peer::from_der(&der_for_tests(pem)).expect("identity")
    }
}

/// The DER of a PEM certificate.
#[cfg(test)]
fn der_for_tests(pem: &str) -> Vec<u8> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("pem")
        .as_ref()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Ca;

    #[test]
    fn operator_certificate_has_roles_and_no_agent() {
        let (ca, _) = Ca::generate("test CA").unwrap();
        let c = ca
            .issue_client("alice", &[Role::Operator, Role::Maintainer], None)
            .unwrap();
        let id = Peer::from_pem_for_tests(&c.cert_pem);
        assert!(id.require_role(Role::Operator).is_ok());
        assert!(id.require_role(Role::Maintainer).is_ok());
        assert!(id.clone().require_agent().is_err());
        assert_eq!(id.scope(), None);
        let c = ca.issue_client("bob", &[Role::Operator], None).unwrap();
        let id = Peer::from_pem_for_tests(&c.cert_pem);
        assert_eq!(
            id.require_role(Role::Maintainer).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn scoped_operator_certificate_names_its_organisation() {
        let (ca, _) = Ca::generate("test CA").unwrap();
        let c = ca
            .issue_client("carol", &[Role::Operator], Some("alpha"))
            .unwrap();
        let id = Peer::from_pem_for_tests(&c.cert_pem);
        assert_eq!(id.scope(), Some("alpha"));
        assert!(id.require_role(Role::Operator).is_ok());
        assert_eq!(
            id.require_collector_wide("publishing").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            Peer::cert_row(&der_for_tests(&c.cert_pem), 1).unwrap().org,
            "alpha"
        );
    }

    #[test]
    fn agent_certificate_cannot_act_as_operator() {
        let id = Peer::Agent {
            id: "a".into(),
            org: DEFAULT_ORG.into(),
        };
        assert_eq!(
            id.require_role(Role::Operator).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }
}
