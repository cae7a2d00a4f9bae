//! The admin API client: vedettectl.toml, the connection with the operator's certificate,
//! and one call per command.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vedette_ops::output::rfc3339_ms;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tonic::transport::Channel;
use vedette_ops::client::{ClientTls, connect};
use vedette_proto::limits::MAX_MESSAGE_BYTES;
use vedette_proto::v1::admin_service_client::AdminServiceClient;
use vedette_proto::v1::{
    AgentInfo, CertInfo, CreateOrgRequest, CreateTokenRequest, ListAgentsRequest, ListCertsRequest,
    ListDetectionsRequest, ListOrgsRequest, Org, RevokeAgentRequest, RevokeCertRequest,
    SetOrgRequest, StoredDetection,
};
use vedette_proto::v1::{
    AuditEntry, ListAuditRequest, ListTokensRequest, PromoteBundleRequest, RemoveAgentRequest,
    RemoveOrgRequest, RenameOrgRequest, RevokeTokenRequest, SetAgentLabelsRequest, TokenInfo,
};

/// `vedettectl.toml`. Relative paths are relative to the file's directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtlConfig {
    /// The collector's `host:port`; the host must be a name in its server certificate.
    pub collector: String,
    /// The collector's CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// This operator's certificate (PEM).
    pub cert: PathBuf,
    /// This operator's private key (PEM).
    pub key: PathBuf,
    /// Maintainer signing key (Ed25519, PEM) used by `rules publish` and `rules rollback`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign_key: Option<PathBuf>,
    /// The organisation exports name as the maker of sightings (`vedettectl export`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organisation: Option<String>,
}

impl CtlConfig {
    pub fn load(path: &Path) -> anyhow::Result<CtlConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the vedettectl config `{}`", path.display()))?;
        let mut c: CtlConfig = toml::from_str(&text)
            .with_context(|| format!("invalid vedettectl config `{}`", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        c.ca_cert = base.join(&c.ca_cert);
        c.cert = base.join(&c.cert);
        c.key = base.join(&c.key);
        c.sign_key = c.sign_key.map(|k| base.join(k));
        Ok(c)
    }

    /// The fleet this configuration's CA stands for: what bundles are bound to.
    pub fn fleet(&self) -> anyhow::Result<String> {
        let pem = std::fs::read_to_string(&self.ca_cert).with_context(|| {
            format!(
                "cannot read the CA certificate `{}`",
                self.ca_cert.display()
            )
        })?;
        vedette_engine::bundle::fleet_of_ca_pem(&pem)
            .with_context(|| format!("`{}` holds no certificate", self.ca_cert.display()))
    }

    /// Connects to the collector with this operator's certificate.
    pub async fn client(&self) -> anyhow::Result<AdminServiceClient<Channel>> {
        let read = |p: &Path, what: &str| {
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the {what} `{}`", p.display()))
        };
        let tls = ClientTls {
            ca_pem: read(&self.ca_cert, "CA certificate")?,
            identity: Some((
                read(&self.cert, "certificate")?,
                read(&self.key, "private key")?,
            )),
        };
        let channel = connect(&self.collector, &tls)
            .await
            .with_context(|| format!("cannot connect to the collector at `{}`", self.collector))?;
        Ok(AdminServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

/// Turns a gRPC status into an error a person can act on.
/// A refusal or failure the collector answered, as one line that names what kind it is (never
/// "error", which the caller's own prefix already says), with a hint only where one helps.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    let hint = match s.code() {
        tonic::Code::PermissionDenied if s.message().contains("lacks the") => {
            " (issue one with that role: vedette-collector certs issue --role ...)"
        }
        tonic::Code::Unauthenticated => " (no client certificate was accepted)",
        tonic::Code::Unavailable if !s.message().contains("reachable") => {
            " (is the collector running and reachable?)"
        }
        _ => "",
    };
    anyhow::anyhow!("{}: {}{hint}", code_name(s.code()), s.message())
}

fn code_name(c: tonic::Code) -> &'static str {
    match c {
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::NotFound => "not found",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::FailedPrecondition => "refused",
        tonic::Code::ResourceExhausted => "over a limit",
        tonic::Code::DeadlineExceeded => "timed out",
        tonic::Code::Aborted => "aborted",
        tonic::Code::Cancelled => "cancelled",
        tonic::Code::Internal | tonic::Code::DataLoss => "collector failure",
        _ => "failed",
    }
}

pub async fn token_create(
    cfg: &CtlConfig,
    ttl: Duration,
    uses: u32,
    org: Option<String>,
) -> anyhow::Result<String> {
    let mut c = cfg.client().await?;
    let r = c
        .create_token(CreateTokenRequest {
            ttl_seconds: ttl.as_secs().max(1),
            uses,
            org: org.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(r.token)
}

/// Enrolled agents (of `org` when given), removed ones too with `removed`.
pub async fn agents_list(
    cfg: &CtlConfig,
    org: Option<String>,
    removed: bool,
    label: Option<String>,
) -> anyhow::Result<Vec<AgentInfo>> {
    let mut c = cfg.client().await?;
    Ok(c.list_agents(ListAgentsRequest {
        org: org.unwrap_or_default(),
        removed,
        label: label.unwrap_or_default(),
    })
    .await
    .map_err(status_error)?
    .into_inner()
    .agents)
}

pub async fn agents_revoke(cfg: &CtlConfig, id: &str) -> anyhow::Result<bool> {
    if id.is_empty() {
        bail!("an agent id is required");
    }
    let mut c = cfg.client().await?;
    let r = c
        .revoke_agent(RevokeAgentRequest {
            agent_id: id.to_string(),
        })
        .await
        .map_err(status_error)?;
    Ok(r.into_inner().disconnected)
}

pub async fn agents_label(
    cfg: &CtlConfig,
    id: &str,
    add: Vec<String>,
    remove: Vec<String>,
) -> anyhow::Result<Vec<String>> {
    let mut c = cfg.client().await?;
    Ok(c.set_agent_labels(SetAgentLabelsRequest {
        agent_id: id.to_string(),
        add,
        remove,
    })
    .await
    .map_err(status_error)?
    .into_inner()
    .labels)
}

pub async fn promote(cfg: &CtlConfig, version: u64) -> anyhow::Result<u32> {
    let mut c = cfg.client().await?;
    Ok(c.promote_bundle(PromoteBundleRequest { version })
        .await
        .map_err(status_error)?
        .into_inner()
        .agents_notified)
}

pub async fn agents_remove(cfg: &CtlConfig, id: &str) -> anyhow::Result<bool> {
    let mut c = cfg.client().await?;
    let r = c
        .remove_agent(RemoveAgentRequest {
            agent_id: id.to_string(),
        })
        .await
        .map_err(status_error)?;
    Ok(r.into_inner().disconnected)
}

pub async fn tokens_list(cfg: &CtlConfig, all: bool) -> anyhow::Result<Vec<TokenInfo>> {
    let mut c = cfg.client().await?;
    Ok(c.list_tokens(ListTokensRequest { all })
        .await
        .map_err(status_error)?
        .into_inner()
        .tokens)
}

pub async fn token_revoke(cfg: &CtlConfig, id: &str) -> anyhow::Result<TokenInfo> {
    let mut c = cfg.client().await?;
    c.revoke_token(RevokeTokenRequest { id: id.to_string() })
        .await
        .map_err(status_error)?
        .into_inner()
        .token
        .ok_or_else(|| anyhow::anyhow!("the collector answered without the token"))
}

pub async fn orgs_rename(cfg: &CtlConfig, name: &str, new_name: &str) -> anyhow::Result<Org> {
    let mut c = cfg.client().await?;
    c.rename_org(RenameOrgRequest {
        name: name.to_string(),
        new_name: new_name.to_string(),
    })
    .await
    .map_err(status_error)?
    .into_inner()
    .org
    .ok_or_else(|| anyhow::anyhow!("the collector answered without the organisation"))
}

pub async fn orgs_remove(cfg: &CtlConfig, name: &str) -> anyhow::Result<u32> {
    let mut c = cfg.client().await?;
    Ok(c.remove_org(RemoveOrgRequest {
        name: name.to_string(),
    })
    .await
    .map_err(status_error)?
    .into_inner()
    .tokens_revoked)
}

pub async fn audit_list(
    cfg: &CtlConfig,
    since: Option<SystemTime>,
    limit: u32,
) -> anyhow::Result<Vec<AuditEntry>> {
    let mut c = cfg.client().await?;
    Ok(c.list_audit(ListAuditRequest {
        since_ms: epoch_ms(since),
        limit,
    })
    .await
    .map_err(status_error)?
    .into_inner()
    .entries)
}

/// Detections asked for in one request (the collector's largest page).
const PAGE: usize = 10_000;

/// Milliseconds since the Unix epoch (0 for none).
pub fn epoch_ms(t: Option<SystemTime>) -> i64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64)
}

/// The `limit` most recent detections matching `filter` (its paging fields are set here),
/// oldest first.
pub async fn detections_list(
    cfg: &CtlConfig,
    filter: ListDetectionsRequest,
    limit: usize,
) -> anyhow::Result<Vec<StoredDetection>> {
    let mut c = cfg.client().await?;
    // Newest pages first; each page is oldest first.
    let mut pages = Vec::new();
    let (mut got, mut before_seq) = (0usize, 0u64);
    while got < limit {
        let r = c
            .list_detections(ListDetectionsRequest {
                limit: (limit - got).min(PAGE) as u32,
                before_seq,
                ..filter.clone()
            })
            .await
            .map_err(status_error)?
            .into_inner();
        got += r.detections.len();
        pages.push(r.detections);
        if r.next_before_seq == 0 {
            break;
        }
        before_seq = r.next_before_seq;
    }
    Ok(pages.into_iter().rev().flatten().collect())
}

pub async fn certs_list(cfg: &CtlConfig) -> anyhow::Result<Vec<CertInfo>> {
    let mut c = cfg.client().await?;
    let r = c
        .list_certs(ListCertsRequest {})
        .await
        .map_err(status_error)?;
    Ok(r.into_inner().certs)
}

pub async fn certs_revoke(cfg: &CtlConfig, serial: &str) -> anyhow::Result<(bool, CertInfo)> {
    let mut c = cfg.client().await?;
    let r = c
        .revoke_cert(RevokeCertRequest {
            serial: serial.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    Ok((r.revoked, r.cert.unwrap_or_default()))
}

/// The serial number (hex) of the certificate in a PEM file.
pub fn serial_of_file(path: &Path) -> anyhow::Result<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read `{}`", path.display()))?;
    let block = pem::parse_many(&text)
        .ok()
        .and_then(|blocks| blocks.into_iter().find(|b| b.tag() == "CERTIFICATE"))
        .with_context(|| format!("`{}` holds no PEM certificate", path.display()))?;
    let (_, cert) = X509Certificate::from_der(block.contents())
        .map_err(|e| anyhow::anyhow!("`{}`: not a readable certificate: {e}", path.display()))?;
    Ok(hex::encode(cert.raw_serial()))
}

pub fn cert_json(c: &CertInfo) -> serde_json::Value {
    json!({
        "serial": c.serial,
        "kind": c.kind,
        "subject": c.subject,
        "roles": c.roles,
        "org": c.org,
        "not_after": rfc3339_ms(c.not_after_ms),
        "recorded_at": rfc3339_ms(c.recorded_at_ms),
        "revoked": c.revoked_at_ms != 0,
        "revoked_at": (c.revoked_at_ms != 0).then(|| rfc3339_ms(c.revoked_at_ms)),
    })
}

pub async fn orgs_list(cfg: &CtlConfig) -> anyhow::Result<Vec<Org>> {
    let mut c = cfg.client().await?;
    Ok(c.list_orgs(ListOrgsRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .orgs)
}

pub async fn orgs_create(cfg: &CtlConfig, req: CreateOrgRequest) -> anyhow::Result<Org> {
    let mut c = cfg.client().await?;
    c.create_org(req)
        .await
        .map_err(status_error)?
        .into_inner()
        .org
        .context("the collector returned no organisation")
}

pub async fn orgs_set(cfg: &CtlConfig, req: SetOrgRequest) -> anyhow::Result<Org> {
    let mut c = cfg.client().await?;
    c.set_org(req)
        .await
        .map_err(status_error)?
        .into_inner()
        .org
        .context("the collector returned no organisation")
}

pub fn org_json(o: &Org) -> serde_json::Value {
    json!({
        "name": o.name,
        "stix_id": o.stix_id,
        "sector": o.sector,
        "country": o.country,
        "share": o.share,
        "tlp": o.tlp,
        "response_approval": o.response_approval,
        "agents": o.agents,
        "created_at": rfc3339_ms(o.created_at_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_answers_name_their_kind_once_and_hint_only_where_it_helps() {
        let refused = status_error(tonic::Status::failed_precondition(
            "organisation `acme` still has 1 agents",
        ))
        .to_string();
        assert_eq!(refused, "refused: organisation `acme` still has 1 agents");
        let role = status_error(tonic::Status::permission_denied(
            "this certificate lacks the maintainer role",
        ))
        .to_string();
        assert!(role.contains("certs issue --role"), "{role}");
        let scoped = status_error(tonic::Status::permission_denied(
            "this certificate is limited to its own organisation",
        ))
        .to_string();
        assert!(!scoped.contains("role"), "{scoped}");
        for code in [
            tonic::Code::Unknown,
            tonic::Code::Internal,
            tonic::Code::Aborted,
            tonic::Code::AlreadyExists,
        ] {
            let text = status_error(tonic::Status::new(code, "x")).to_string();
            assert!(!text.starts_with("error"), "{code:?}: {text}");
        }
    }
}
