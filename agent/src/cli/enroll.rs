//! `vedette-agent enroll`: make a key on this host, send a CSR with a one-time token, keep the
//! signed certificate.
//!
//! Trust in the collector comes from the operator, not the network: either the CA file, or the
//! CA's SHA-256 fingerprint printed by `vedette-collector init`. With a fingerprint, the CA is
//! taken from the chain the collector presents only if its hash matches, and the server
//! certificate must still verify against it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use vedette_ops::client::{ClientTls, connect, host_of};
use vedette_proto::v1::EnrollRequest;
use vedette_proto::v1::agent_service_client::AgentServiceClient;

use crate::state::{Enrollment, StateDir, write_atomic};

/// How the agent decides to trust the collector.
pub enum CaPin {
    /// The CA certificate file, copied from the collector.
    File(PathBuf),
    /// SHA-256 of the CA certificate (DER), hex; colons and case are ignored.
    Sha256(String),
}

pub struct EnrollArgs<'a> {
    pub collector: &'a str,
    pub token: &'a str,
    pub pin: CaPin,
    pub state: &'a StateDir,
    /// Maintainer keys the operator gave (`--maintainer-key`); with no fingerprints either,
    /// the collector's (`--trust-collector-keys`).
    pub maintainers: Vec<vedette_engine::bundle::PublicKey>,
    /// SHA-256 (hex) of offered maintainer keys to pin (`--maintainer-key-sha256`).
    pub fingerprints: Vec<String>,
}

/// Enrolls this host. Returns the agent id.
pub async fn enroll(args: EnrollArgs<'_>) -> anyhow::Result<String> {
    let state = args.state;
    if state.is_enrolled() {
        bail!(
            "`{}` already holds an enrollment; use another --state-dir or remove it on purpose",
            state.dir.display()
        );
    }
    let ca_pem = match &args.pin {
        CaPin::File(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read the CA file `{}`", p.display()))?,
        CaPin::Sha256(hex_pin) => fetch_pinned_ca(args.collector, &parse_pin(hex_pin)?).await?,
    };
    state.create()?;
    // The key is made here and written before anything is sent; it never leaves this host.
    let key = rcgen::KeyPair::generate().context("cannot generate a key")?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .context("cannot make a certificate signing request")?;
    let hostname = crate::deliver::inventory::host_name();
    let tls = ClientTls {
        ca_pem: ca_pem.clone(),
        identity: None,
    };
    let channel = connect(args.collector, &tls)
        .await
        .with_context(|| format!("cannot connect to the collector at `{}`", args.collector))?;
    let response = AgentServiceClient::new(channel)
        .enroll(EnrollRequest {
            token: args.token.trim().to_string(),
            csr_pem: csr,
            hostname,
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::PermissionDenied => anyhow::anyhow!("enrollment refused: {}", s.message()),
            _ => anyhow::anyhow!("enrollment failed: {}: {}", s.code(), s.message()),
        })?
        .into_inner();
    if let CaPin::Sha256(pin) = &args.pin {
        let got = vedette_engine::bundle::fleet_of_ca_pem(&response.ca_pem);
        if got.as_deref() != Some(parse_pin(pin)?.as_str()) {
            bail!("the collector returned a CA that does not match the pinned fingerprint");
        }
    }
    write_atomic(&state.key(), key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&state.ca(), ca_pem.as_bytes(), 0o644)?;
    write_atomic(&state.cert(), response.certificate_pem.as_bytes(), 0o644)?;
    let pinned = maintainers_to_pin(&args, &response.maintainer_keys)?;
    let mut maintainers = String::new();
    for key in &pinned {
        maintainers.push_str(&key.to_pem());
    }
    write_atomic(&state.maintainers(), maintainers.as_bytes(), 0o644)?;
    let enrollment = Enrollment {
        agent_id: response.agent_id.clone(),
        collectors: vec![args.collector.to_string()],
    };
    let text = toml::to_string(&enrollment).context("cannot encode the enrollment")?;
    // Written last: its presence means the enrollment is complete.
    write_atomic(&state.enrollment(), text.as_bytes(), 0o644)?;
    Ok(response.agent_id)
}

/// The maintainer keys pinned at enrollment: only bundles signed by one of them are ever
/// applied. The operator's, when given (`--maintainer-key`, or `--maintainer-key-sha256` of a
/// key the collector offers): a collector, or whoever took it over, cannot add one. Otherwise
/// (`--trust-collector-keys`) the ones the collector offers, over the CA-pinned channel, with
/// a warning.
fn maintainers_to_pin(
    args: &EnrollArgs<'_>,
    offered: &[Vec<u8>],
) -> anyhow::Result<Vec<vedette_engine::bundle::PublicKey>> {
    let mut keys = Vec::new();
    for k in offered {
        keys.push(
            vedette_engine::bundle::PublicKey::from_bytes(k)
                .context("the collector sent a maintainer key that is not 32 bytes")?,
        );
    }
    let offered = keys;
    let mut given = args.maintainers.clone();
    for f in &args.fingerprints {
        match offered.iter().find(|k| k.sha256() == *f) {
            Some(k) => given.push(*k),
            None => bail!(
                "the collector offers no maintainer key with SHA-256 {f}: nothing pinned; \
                 remove {} and enroll again with a new token",
                args.state.dir.display()
            ),
        }
    }
    if given.is_empty() {
        eprintln!(
            "warning: pinning the {} maintainer key(s) the collector offers; whoever controls \
             the collector could sign bundles this agent applies (--trust-collector-keys). \
             Give the maintainers' keys with --maintainer-key to pin those instead.",
            offered.len()
        );
        return Ok(offered);
    }
    for k in offered.iter().filter(|k| !given.contains(k)) {
        eprintln!(
            "note: the collector offers maintainer key {}, not given with --maintainer-key: \
             not pinned",
            k.id()
        );
    }
    Ok(given)
}

fn parse_pin(s: &str) -> anyhow::Result<String> {
    let clean: String = s
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_lowercase();
    if clean.len() != 64 || !clean.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("`{s}` is not a SHA-256 fingerprint (64 hex digits)");
    }
    Ok(clean)
}

/// Connects once, finds the certificate in the presented chain whose SHA-256 is `pin`, verifies
/// the server certificate against it, and returns it as PEM.
async fn fetch_pinned_ca(address: &str, pin: &str) -> anyhow::Result<String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinVerifier {
        pin: pin.to_string(),
        found: Mutex::new(None),
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let host = host_of(address).to_string();
    let name = ServerName::try_from(host.clone())
        .with_context(|| format!("`{host}` is not a valid server name"))?;
    let tcp = TcpStream::connect(address)
        .await
        .with_context(|| format!("cannot connect to the collector at `{address}`"))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with `{address}` failed (wrong fingerprint?)"))?;
    let der = verifier
        .found
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .context("the collector presented no CA certificate")?;
    Ok(pem::encode(&pem::Pem::new("CERTIFICATE", der)))
}

#[derive(Debug)]
struct PinVerifier {
    pin: String,
    found: Mutex<Option<Vec<u8>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| hex::encode(Sha256::digest(c.as_ref())) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "no certificate presented by the collector matches the pinned CA fingerprint"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA is unusable: {e}")))?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified =
            inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        *self.found.lock().unwrap_or_else(|p| p.into_inner()) = Some(ca.as_ref().to_vec());
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::parse_pin;

    #[test]
    fn pins_accept_colons_and_case_and_refuse_junk() {
        let hex = "AB".repeat(32);
        assert_eq!(parse_pin(&hex).unwrap(), "ab".repeat(32));
        let colons = vec!["ab"; 32].join(":");
        assert_eq!(parse_pin(&colons).unwrap(), "ab".repeat(32));
        assert!(parse_pin("abc").is_err());
        assert!(parse_pin(&"zz".repeat(32)).is_err());
    }
}
