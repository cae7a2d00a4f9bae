//! `AdminService`: tokens, agents and detections for operators, rule bundles for maintainers
//! (`vedettectl`).

use std::sync::Arc;

use rand::RngCore;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use vedette_engine::bundle::{self, BundleError};
use vedette_proto::v1::admin_service_server::AdminService;
use vedette_proto::v1::{
    ActionInfo, DecideActionRequest, ListActionsRequest, ListActionsResponse, RequestActionRequest,
    UndoActionRequest,
};
use vedette_proto::v1::{
    AddExceptionRequest, AddExceptionResponse, GetAlertRequest, GetAlertResponse,
    ListAlertsRequest, ListAlertsResponse, ListExceptionsRequest, ListExceptionsResponse,
    RemoveExceptionRequest, RemoveExceptionResponse, SetAlertStatusRequest, SetAlertStatusResponse,
};
use vedette_proto::v1::{
    AgentBundleState, AgentInfo, BundleContent, BundleInfo, BundleRolloutRequest,
    BundleRolloutResponse, CertInfo, CreateOrgRequest, CreateOrgResponse, CreateTokenRequest,
    CreateTokenResponse, GetBundleRequest, GetBundleResponse, IntelSource, IntelStatusRequest,
    IntelStatusResponse, ListAgentsRequest, ListAgentsResponse, ListBundlesRequest,
    ListBundlesResponse, ListCertsRequest, ListCertsResponse, ListDetectionsRequest,
    ListDetectionsResponse, ListIntelRequest, ListIntelResponse, ListOrgsRequest, ListOrgsResponse,
    Org, PublishBundleRequest, PublishBundleResponse, RevokeAgentRequest, RevokeAgentResponse,
    RevokeCertRequest, RevokeCertResponse, SetOrgRequest, SetOrgResponse, SlowRulesRequest,
    SlowRulesResponse, StageIntelRequest, StageIntelResponse,
};
use vedette_proto::v1::{
    AuditEntry, ListAuditRequest, ListAuditResponse, ListTokensRequest, ListTokensResponse,
    RemoveAgentRequest, RemoveAgentResponse, RemoveOrgRequest, RemoveOrgResponse, RenameOrgRequest,
    RenameOrgResponse, RevokeTokenRequest, RevokeTokenResponse, TokenInfo,
};
use vedette_proto::v1::{
    GetHuntRequest, GetHuntResponse, ListHuntsRequest, ListHuntsResponse, StartHuntRequest,
    StartHuntResponse,
};
use vedette_proto::v1::{
    PromoteBundleRequest, PromoteBundleResponse, SetAgentLabelsRequest, SetAgentLabelsResponse,
};

use super::agent::token_hash;
use super::audit::{self, Act};
use super::{State, blocking};
use crate::orgs;
use crate::peer::Peer;
use crate::pki::Role;
use crate::store::{AuditRow, BundleRow, DetectionFilter, OrgRow, StoreEvent, TokenRow, now_ms};
use vedette_share::sharing::{Share, Tlp};

/// Longest token lifetime an operator may ask for.
const MAX_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;
/// Most enrollments one token may allow.
const MAX_TOKEN_USES: u32 = 100_000;
/// Default and largest `limit` of a detection listing.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 10_000;
/// Stored detections read for one page of a listing, at most (one more may pass it).
const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Default and largest page of staged indicators.
const INTEL_PAGE: u32 = 1_000;
const MAX_INTEL_PAGE: u32 = 5_000;

pub struct AdminSvc {
    pub(super) state: Arc<State>,
}

impl AdminSvc {
    pub(super) fn new(state: Arc<State>) -> Self {
        AdminSvc { state }
    }

    fn operator<T>(&self, request: &Request<T>) -> Result<Peer, Status> {
        let id = Peer::of(request)?;
        id.require_role(Role::Operator)?;
        Ok(id)
    }

    /// Operators and maintainers may read bundles and their rollout.
    fn reader<T>(&self, request: &Request<T>) -> Result<Peer, Status> {
        let id = Peer::of(request)?;
        if id.require_role(Role::Maintainer).is_err() {
            id.require_role(Role::Operator)?;
        }
        Ok(id)
    }

    /// A collector-wide operator (organisations, intel).
    fn collector_operator<T>(&self, request: &Request<T>, what: &str) -> Result<Peer, Status> {
        let id = self.operator(request)?;
        id.require_collector_wide(what)?;
        Ok(id)
    }
}

/// Which organisation a listing is limited to: the caller's own when its certificate is
/// scoped (asking for another is refused, whether it exists or not), else the one asked for
/// (None: all).
pub(super) fn listing_scope(who: &Peer, asked: &str) -> Result<Option<String>, Status> {
    match who.scope() {
        Some(own) if asked.is_empty() || asked == own => Ok(Some(own.to_string())),
        Some(_) => Err(Status::permission_denied(
            "this certificate is limited to its own organisation",
        )),
        None if asked.is_empty() => Ok(None),
        None => Ok(Some(asked.to_string())),
    }
}

/// Whether a row of organisation `org` is visible to the caller.
pub(super) fn visible(who: &Peer, org: &str) -> bool {
    who.scope().is_none_or(|own| own == org)
}

fn org_info(o: OrgRow) -> Org {
    Org {
        name: o.name,
        stix_id: o.stix_id,
        sector: o.sector,
        country: o.country,
        share: o.share,
        tlp: o.tlp,
        created_at_ms: o.created_at_ms,
        agents: o.agents,
        response_approval: crate::store::approval(&o.response_approval).to_string(),
    }
}

/// Applies the fields given in a create or set request to `row`, checking each.
fn apply_org_fields(
    row: &mut OrgRow,
    sector: &str,
    country: &str,
    share: &str,
    tlp: &str,
) -> Result<(), Status> {
    if !sector.is_empty() {
        orgs::check_sector(sector).map_err(|e| Status::invalid_argument(e.to_string()))?;
        row.sector = sector.to_string();
    }
    if !country.is_empty() {
        row.country = orgs::normalise_country(country)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    if !share.is_empty() {
        let s = Share::parse(share).ok_or_else(|| {
            Status::invalid_argument(format!(
                "`{share}` is not a sharing policy; use {}",
                Share::NAMES
            ))
        })?;
        row.share = s.as_str().to_string();
    }
    if !tlp.is_empty() {
        let t = Tlp::parse(tlp).ok_or_else(|| {
            Status::invalid_argument(format!(
                "`{tlp}` is not a TLP 2.0 level; use {}",
                Tlp::NAMES
            ))
        })?;
        row.tlp = t.as_str().to_string();
    }
    Ok(())
}

fn token_info(t: &TokenRow) -> TokenInfo {
    TokenInfo {
        id: t.id().to_string(),
        org: t.org.clone(),
        uses_left: t.uses_left,
        created_at_ms: t.created_at_ms,
        expires_at_ms: t.expires_at_ms,
        created_by: t.created_by.clone(),
        revoked_at_ms: t.revoked_at_ms,
    }
}

fn audit_entry(e: AuditRow) -> AuditEntry {
    AuditEntry {
        seq: e.seq,
        at_ms: e.at_ms,
        actor: e.actor,
        action: e.action,
        target: e.target,
        outcome: e.outcome,
        org: e.org,
        detail: e.detail,
    }
}

/// A label: letters, digits, `.`, `_` and `-`, at most 32 characters.
fn check_label(label: &str) -> Result<(), Status> {
    let ok = !label.is_empty()
        && label.len() <= 32
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "`{}` is not a label: letters, digits, `.`, `_` and `-`, at most 32",
            label.chars().take(64).collect::<String>()
        )))
    }
}

/// Most labels one agent may have.
const MAX_LABELS: usize = 16;

fn bundle_info(b: &BundleRow) -> BundleInfo {
    BundleInfo {
        version: b.version,
        name: b.name.clone(),
        created_at_ms: b.created_at_ms,
        publisher: b.publisher.clone(),
        published_by: b.published_by.clone(),
        published_at_ms: b.published_at_ms,
        digest: b.digest.clone(),
        signer_key: hex::encode(&b.signer_key),
        files: b.files,
        size: b.size,
        target: b.target.clone(),
    }
}

/// Checks a bundle as the collector receives it: signature by a trusted maintainer, canonical
/// content, every YARA file compiling (again: the publisher's check ran on another machine).
fn check_bundle(state: &State, req: &PublishBundleRequest) -> Result<BundleContent, Status> {
    bundle::verify(
        &req.content,
        &req.signature,
        &req.signer_key,
        &state.maintainer_keys,
        state.allow_unsigned,
    )
    .map_err(|e| match e {
        BundleError::Unsigned => Status::permission_denied(
            "the bundle is not signed, and this collector does not accept unsigned bundles",
        ),
        e => Status::permission_denied(e.to_string()),
    })?;
    let content =
        bundle::decode(&req.content).map_err(|e| Status::invalid_argument(e.to_string()))?;
    bundle::check_fleet(&content, &state.ca.fingerprint())
        .map_err(|e| Status::permission_denied(e.to_string()))?;
    if let Err(problems) = bundle::validate(&content, false) {
        let list: Vec<String> = problems.iter().take(20).map(|p| p.to_string()).collect();
        return Err(Status::invalid_argument(format!(
            "the bundle does not compile:\n{}",
            list.join("\n")
        )));
    }
    Ok(content)
}

/// Tells the collectors sharing the store; a failure is logged (they still catch up when
/// their listening connection is re-made, and a revoked agent is refused at its next connect).
pub(super) async fn announce(state: &super::State, event: StoreEvent) {
    let what = event.encode();
    if let Err(e) = blocking(&state.store, move |s| s.announce(&event)).await {
        warn!(error = %e, event = %what, "cannot tell the other collectors");
    }
}

fn cert_info(c: &crate::store::CertRow) -> CertInfo {
    CertInfo {
        serial: c.serial.clone(),
        kind: c.kind.clone(),
        subject: c.subject.clone(),
        roles: c
            .roles
            .split(',')
            .filter(|r| !r.is_empty())
            .map(String::from)
            .collect(),
        not_after_ms: c.not_after_ms,
        recorded_at_ms: c.recorded_at_ms,
        revoked_at_ms: c.revoked_at_ms,
        org: c.org.clone(),
    }
}

/// A serial number as given (hex, any case, colons allowed), as stored: lowercase hex.
fn normalise_serial(s: &str) -> Result<String, Status> {
    let hex: String = s
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.is_empty() || hex.len() > 40 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Status::invalid_argument(format!(
            "`{}` is not a certificate serial number (hex, at most 20 bytes)",
            s.chars().take(64).collect::<String>()
        )));
    }
    Ok(hex)
}

impl AdminSvc {
    async fn create_token_as(
        &self,
        who: &Peer,
        req: CreateTokenRequest,
        act: &mut Act,
    ) -> Result<CreateTokenResponse, Status> {
        let org = match (who.scope(), req.org.as_str()) {
            (Some(own), "") => own.to_string(),
            (Some(own), asked) if asked == own => own.to_string(),
            (Some(_), _) => {
                return Err(Status::permission_denied(
                    "this certificate may create tokens for its own organisation only",
                ));
            }
            (None, "") => orgs::DEFAULT_ORG.to_string(),
            (None, asked) => asked.to_string(),
        };
        let known = blocking(&self.state.store, |s| s.list_orgs()).await?;
        if !known.iter().any(|o| o.name == org) {
            return Err(Status::not_found(format!(
                "no organisation `{org}`; create it with `vedettectl orgs create {org}`"
            )));
        }
        let ttl = match req.ttl_seconds {
            0 => self.state.token_ttl.as_secs(),
            t if t > MAX_TOKEN_TTL_SECS => {
                return Err(Status::invalid_argument(format!(
                    "ttl of {t} s is longer than the {MAX_TOKEN_TTL_SECS} s allowed"
                )));
            }
            t => t,
        };
        let uses = match req.uses {
            0 => 1,
            u if u > MAX_TOKEN_USES => {
                return Err(Status::invalid_argument(format!(
                    "{u} uses is more than the {MAX_TOKEN_USES} allowed"
                )));
            }
            u => u,
        };
        act.org = org.clone();
        let mut raw = [0u8; 24];
        rand::rng().fill_bytes(&mut raw);
        let token = format!("vdt_{}", hex::encode(raw));
        let hash = token_hash(&token);
        let now = now_ms();
        let expires = now + (ttl as i64) * 1000;
        let row = TokenRow {
            hash,
            org: org.clone(),
            uses_left: uses,
            created_at_ms: now,
            expires_at_ms: expires,
            created_by: act.actor.clone(),
            revoked_at_ms: 0,
        };
        act.target = row.id().to_string();
        act.detail = format!("uses {uses}, valid {ttl} s");
        blocking(&self.state.store, move |s| s.create_token(&row)).await?;
        info!(by = %who, org = %org, ttl_secs = ttl, uses, "enrollment token created");
        Ok(CreateTokenResponse {
            token,
            expires_at_ms: expires,
            uses,
            org,
        })
    }

    /// Revokes an agent (and with `remove`, hides it from default listings): stored first, so
    /// that it cannot open a new stream, then its open stream closed wherever it is.
    async fn revoke_agent_as(
        &self,
        who: &Peer,
        agent_id: String,
        remove: bool,
    ) -> Result<bool, Status> {
        if let Some(own) = who.scope() {
            // The same answer for another organisation's agent and for none at all.
            let id = agent_id.clone();
            let row = blocking(&self.state.store, move |s| s.agent(&id)).await?;
            if row.is_none_or(|r| r.org != own) {
                return Err(Status::permission_denied(format!(
                    "no agent `{agent_id}` in organisation `{own}`"
                )));
            }
        }
        let id = agent_id.clone();
        let found = blocking(&self.state.store, move |s| {
            if remove {
                s.remove_agent(&id, now_ms())
            } else {
                s.revoke_agent(&id, now_ms())
            }
        })
        .await?;
        if !found {
            return Err(Status::not_found(format!("no agent `{agent_id}`")));
        }
        announce(&self.state, StoreEvent::Revoked(agent_id.clone())).await;
        let open = self.state.streams().remove(&agent_id);
        let disconnected = open.is_some();
        if let Some((_, stop)) = open {
            stop.cancel();
        }
        let what = if remove {
            "agent removed"
        } else {
            "agent revoked"
        };
        info!(by = %who, agent = %agent_id, disconnected, "{what}");
        Ok(disconnected)
    }

    async fn revoke_token_as(
        &self,
        who: &Peer,
        asked: &str,
        act: &mut Act,
    ) -> Result<RevokeTokenResponse, Status> {
        if asked.len() < 6 || !asked.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(format!(
                "`{}` is not a token id: give at least 6 of the hex digits `token list` shows",
                asked.chars().take(64).collect::<String>()
            )));
        }
        let rows = blocking(&self.state.store, |s| s.list_tokens()).await?;
        let found: Vec<&TokenRow> = rows
            .iter()
            .filter(|t| t.hash.starts_with(asked) && visible(who, &t.org))
            .collect();
        let row = match found.as_slice() {
            [one] => (*one).clone(),
            [] => return Err(Status::not_found(format!("no token `{asked}`"))),
            many => {
                return Err(Status::invalid_argument(format!(
                    "`{asked}` names {} tokens; give more of its digits",
                    many.len()
                )));
            }
        };
        act.target = row.id().to_string();
        act.org = row.org.clone();
        let (hash, at) = (row.hash.clone(), now_ms());
        let newly = blocking(&self.state.store, move |s| s.revoke_token(&hash, at)).await?;
        if !newly {
            return Err(Status::failed_precondition(format!(
                "token {} was revoked already",
                row.id()
            )));
        }
        info!(by = %who, token = %row.id(), org = %row.org, "enrollment token revoked");
        let row = TokenRow {
            revoked_at_ms: at,
            ..row
        };
        Ok(RevokeTokenResponse {
            token: Some(token_info(&row)),
        })
    }

    /// An organisation, and why it cannot be renamed or removed: what still belongs to it.
    async fn still_used(&self, name: &str) -> Result<(OrgRow, Option<String>), Status> {
        let n = name.to_string();
        let (orgs, users, certs) = blocking(&self.state.store, move |s| {
            Ok((s.list_orgs()?, s.list_users()?, s.list_certs()?))
        })
        .await?;
        let Some(org) = orgs.into_iter().find(|o| o.name == n) else {
            return Err(Status::not_found(format!("no organisation `{name}`")));
        };
        let users = users.iter().filter(|u| u.org == name).count();
        let certs = certs
            .iter()
            .filter(|c| c.org == name && c.kind != "agent" && c.revoked_at_ms == 0)
            .count();
        let mut held = Vec::new();
        if org.agents > 0 {
            held.push(format!(
                "{} agents (removed ones too: their detections are kept under its name)",
                org.agents
            ));
        }
        if users > 0 {
            held.push(format!("{users} console accounts"));
        }
        if certs > 0 {
            held.push(format!("{certs} unrevoked operator certificates"));
        }
        let held = (!held.is_empty()).then(|| held.join(", "));
        Ok((org, held))
    }

    async fn rename_org_as(&self, who: &Peer, req: &RenameOrgRequest) -> Result<Org, Status> {
        if req.name == orgs::DEFAULT_ORG {
            return Err(Status::failed_precondition(format!(
                "`{}` is the organisation of tokens made without --org: it keeps its name",
                orgs::DEFAULT_ORG
            )));
        }
        orgs::check_name(&req.new_name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (org, held) = self.still_used(&req.name).await?;
        if let Some(held) = held {
            return Err(Status::failed_precondition(format!(
                "organisation `{}` still has {held}",
                req.name
            )));
        }
        let (old, new) = (req.name.clone(), req.new_name.clone());
        if !blocking(&self.state.store, move |s| s.rename_org(&old, &new)).await? {
            return Err(Status::already_exists(format!(
                "organisation `{}` exists already",
                req.new_name
            )));
        }
        info!(by = %who, org = %req.name, new_name = %req.new_name, "organisation renamed");
        Ok(org_info(OrgRow {
            name: req.new_name.clone(),
            ..org
        }))
    }

    async fn remove_org_as(&self, who: &Peer, name: &str) -> Result<u32, Status> {
        if name == orgs::DEFAULT_ORG {
            return Err(Status::failed_precondition(format!(
                "`{}` is the organisation of tokens made without --org: it cannot be removed",
                orgs::DEFAULT_ORG
            )));
        }
        if let (_, Some(held)) = self.still_used(name).await? {
            return Err(Status::failed_precondition(format!(
                "organisation `{name}` still has {held}"
            )));
        }
        let n = name.to_string();
        let tokens = blocking(&self.state.store, move |s| s.remove_org(&n, now_ms()))
            .await?
            .ok_or_else(|| Status::not_found(format!("no organisation `{name}`")))?;
        info!(by = %who, org = %name, tokens_revoked = tokens, "organisation removed");
        Ok(tokens)
    }

    async fn revoke_cert_as(
        &self,
        request: Request<RevokeCertRequest>,
    ) -> Result<Response<RevokeCertResponse>, Status> {
        let who = self.operator(&request)?;
        let serial = normalise_serial(&request.get_ref().serial)?;
        if let Some(own) = who.scope() {
            // Only a certificate recorded as one of its organisation's.
            let rows = blocking(&self.state.store, |s| s.list_certs()).await?;
            if !rows.iter().any(|c| c.serial == serial && c.org == own) {
                return Err(Status::permission_denied(format!(
                    "no certificate {serial} of organisation `{own}` is recorded here"
                )));
            }
        }
        let s = serial.clone();
        let (newly, row) =
            blocking(&self.state.store, move |st| st.revoke_cert(&s, now_ms())).await?;
        self.state.revoke_cert_here(&serial);
        announce(&self.state, StoreEvent::CertRevoked(serial.clone())).await;
        info!(by = %who, serial = %serial, subject = %row.subject, "certificate revoked");
        Ok(Response::new(RevokeCertResponse {
            revoked: newly,
            cert: Some(cert_info(&row)),
        }))
    }

    async fn stage_intel_as(
        &self,
        request: Request<StageIntelRequest>,
    ) -> Result<Response<StageIntelResponse>, Status> {
        let who = self.reader(&request)?;
        who.require_collector_wide("staging intel")?;
        let req = request.into_inner();
        if req.origin.is_empty() {
            return Err(Status::invalid_argument("an import names its origin"));
        }
        let kind = if req.kind.is_empty() {
            "import".to_string()
        } else {
            req.kind.clone()
        };
        let staged = blocking(&self.state.store, move |s| {
            crate::intel::stage(
                s,
                crate::intel::IntelBatch {
                    origin: &req.origin,
                    kind: &kind,
                    lines: &req.lines,
                    revoked: &req.revoked,
                    skipped: req.skipped,
                    rejected: req.rejected,
                    continued: req.continued,
                    cursor: "",
                },
                now_ms(),
            )
        })
        .await?;
        info!(
            by = %who.name(),
            added = staged.counts.added,
            updated = staged.counts.updated,
            removed = staged.counts.removed,
            refused = staged.refused.len(),
            "intel staged"
        );
        Ok(Response::new(StageIntelResponse {
            added: staged.counts.added,
            updated: staged.counts.updated,
            removed: staged.counts.removed,
            refused: staged.refused,
        }))
    }

    async fn publish_bundle_as(
        &self,
        request: Request<PublishBundleRequest>,
    ) -> Result<Response<PublishBundleResponse>, Status> {
        let who = Peer::of(&request)?;
        who.require_role(Role::Maintainer)?;
        who.require_collector_wide("publishing a bundle")?;
        let req = request.into_inner();
        if !req.to_label.is_empty() {
            check_label(&req.to_label)?;
        }
        let state = self.state.clone();
        let (content, req) =
            tokio::task::spawn_blocking(move || check_bundle(&state, &req).map(|c| (c, req)))
                .await
                .map_err(|e| Status::internal(e.to_string()))??;
        let row = BundleRow {
            version: content.version,
            name: content.name.clone(),
            created_at_ms: content.created_at_ms,
            publisher: content.publisher.clone(),
            published_by: who.name().to_string(),
            published_at_ms: now_ms(),
            digest: bundle::digest(&req.content),
            signer_key: req.signer_key,
            files: content.files.len() as u32,
            target: req.to_label.clone(),
            size: req.content.len() as u64,
            content: req.content,
            signature: req.signature,
        };
        let stored = row.clone();
        let verdict = blocking(&self.state.store, move |s| s.insert_bundle(&stored)).await?;
        if let Err(latest) = verdict {
            return Err(Status::failed_precondition(format!(
                "version {} is not above the latest published version {latest}; publish again",
                row.version
            )));
        }
        super::rollout::refresh(&self.state).await;
        announce(&self.state, StoreEvent::Bundle(row.version)).await;
        let notified = self.due_streams(row.version);
        info!(
            version = row.version,
            name = %row.name,
            digest = %row.digest,
            by = %row.published_by,
            files = row.files,
            agents = notified,
            "rule bundle published"
        );
        Ok(Response::new(PublishBundleResponse {
            version: row.version,
            digest: row.digest,
            agents_notified: notified,
        }))
    }

    async fn create_org_as(
        &self,
        request: Request<CreateOrgRequest>,
    ) -> Result<Response<CreateOrgResponse>, Status> {
        let who = self.collector_operator(&request, "creating an organisation")?;
        let req = request.into_inner();
        orgs::check_name(&req.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut row = OrgRow {
            name: req.name.clone(),
            stix_id: orgs::new_stix_id(),
            share: Share::Anonymised.as_str().to_string(),
            tlp: Tlp::Amber.as_str().to_string(),
            created_at_ms: now_ms(),
            ..OrgRow::default()
        };
        apply_org_fields(&mut row, &req.sector, &req.country, &req.share, &req.tlp)?;
        let r = row.clone();
        if !blocking(&self.state.store, move |s| s.create_org(&r)).await? {
            return Err(Status::already_exists(format!(
                "organisation `{}` exists already; change it with `vedettectl orgs set`",
                req.name
            )));
        }
        info!(by = %who, org = %row.name, share = %row.share, tlp = %row.tlp, "organisation created");
        Ok(Response::new(CreateOrgResponse {
            org: Some(org_info(row)),
        }))
    }

    async fn set_org_as(
        &self,
        request: Request<SetOrgRequest>,
    ) -> Result<Response<SetOrgResponse>, Status> {
        let who = self.collector_operator(&request, "changing an organisation")?;
        let req = request.into_inner();
        let rows = blocking(&self.state.store, |s| s.list_orgs()).await?;
        let mut row = rows
            .into_iter()
            .find(|o| o.name == req.name)
            .ok_or_else(|| Status::not_found(format!("no organisation `{}`", req.name)))?;
        apply_org_fields(&mut row, &req.sector, &req.country, &req.share, &req.tlp)?;
        match req.response_approval.as_str() {
            "" => {}
            "none" | "two-person" => row.response_approval = req.response_approval.clone(),
            other => {
                return Err(Status::invalid_argument(format!(
                    "`{}` is not a response approval; use none or two-person",
                    vedette_ops::output::printable(&other.chars().take(80).collect::<String>())
                )));
            }
        }
        let r = row.clone();
        if !blocking(&self.state.store, move |s| s.update_org(&r)).await? {
            return Err(Status::not_found(format!("no organisation `{}`", req.name)));
        }
        info!(by = %who, org = %row.name, share = %row.share, tlp = %row.tlp, "organisation changed");
        Ok(Response::new(SetOrgResponse {
            org: Some(org_info(row)),
        }))
    }

    /// The audit entry of an action by the caller of `request` (`unknown` when the caller has
    /// no usable identity: the call is refused then, and that is recorded).
    fn act<T>(&self, request: &Request<T>, action: &'static str) -> Act {
        match Peer::of(request) {
            Ok(who) => Act::by(request, &who, action),
            Err(_) => Act::as_actor("unknown".into(), action),
        }
    }

    /// Open agent streams whose agent is now due `version`.
    fn due_streams(&self, version: u64) -> u32 {
        let rollout = self.state.rollout.borrow().clone();
        self.state
            .streams()
            .keys()
            .filter(|id| rollout.due(id).is_some_and(|b| b.version == version))
            .count() as u32
    }

    async fn promote_bundle_as(
        &self,
        req: PromoteBundleRequest,
        act: &mut Act,
    ) -> Result<PromoteBundleResponse, Status> {
        let v = req.version;
        let bundles = blocking(&self.state.store, |s| s.list_bundles()).await?;
        let Some(b) = bundles.iter().find(|b| b.version == v) else {
            return Err(Status::not_found(format!("no bundle version {v}")));
        };
        if b.target.is_empty() {
            return Err(Status::failed_precondition(format!(
                "version {v} was published to every agent already"
            )));
        }
        act.detail = format!("from label {}", b.target);
        blocking(&self.state.store, move |s| s.promote_bundle(v)).await?;
        super::rollout::refresh(&self.state).await;
        announce(&self.state, StoreEvent::Bundle(0)).await;
        let agents_notified = self.due_streams(v);
        info!(
            version = v,
            agents = agents_notified,
            "bundle promoted to every agent"
        );
        Ok(PromoteBundleResponse { agents_notified })
    }

    async fn set_labels_as(
        &self,
        who: &Peer,
        req: SetAgentLabelsRequest,
        act: &mut Act,
    ) -> Result<SetAgentLabelsResponse, Status> {
        for l in req.add.iter().chain(&req.remove) {
            check_label(l)?;
        }
        let id = req.agent_id.clone();
        let row = blocking(&self.state.store, move |s| s.agent(&id)).await?;
        let row = match row {
            Some(r) if visible(who, &r.org) => r,
            _ => return Err(Status::not_found(format!("no agent `{}`", req.agent_id))),
        };
        act.org = row.org.clone();
        let mut labels: std::collections::BTreeSet<String> = row.labels.into_iter().collect();
        labels.extend(req.add.iter().cloned());
        for l in &req.remove {
            labels.remove(l);
        }
        if labels.len() > MAX_LABELS {
            return Err(Status::invalid_argument(format!(
                "an agent has at most {MAX_LABELS} labels"
            )));
        }
        let labels: Vec<String> = labels.into_iter().collect();
        act.detail = format!("labels now: {}", labels.join(","));
        let (id, l) = (req.agent_id.clone(), labels.clone());
        blocking(&self.state.store, move |s| s.set_agent_labels(&id, &l)).await?;
        super::rollout::refresh(&self.state).await;
        announce(&self.state, StoreEvent::Bundle(0)).await;
        info!(by = %who, agent = %req.agent_id, labels = %labels.join(","), "agent labels changed");
        Ok(SetAgentLabelsResponse { labels })
    }

    /// The organisation an action on an agent is recorded under: the caller's own when it is
    /// limited to one (what it may act on; another organisation's agent is refused and none
    /// of that organisation's business), else the agent's (empty when unknown).
    async fn org_of_agent(&self, who: &Peer, id: &str) -> String {
        if let Some(own) = who.scope() {
            return own.to_string();
        }
        let id = id.to_string();
        blocking(&self.state.store, move |s| s.agent(&id))
            .await
            .ok()
            .flatten()
            .map(|a| a.org)
            .unwrap_or_default()
    }
}

#[tonic::async_trait]
impl AdminService for AdminSvc {
    async fn list_alerts(
        &self,
        request: Request<ListAlertsRequest>,
    ) -> Result<Response<ListAlertsResponse>, Status> {
        let who = self.operator(&request)?;
        let r = self.list_alerts_as(&who, request.into_inner()).await?;
        Ok(Response::new(r))
    }

    async fn get_alert(
        &self,
        request: Request<GetAlertRequest>,
    ) -> Result<Response<GetAlertResponse>, Status> {
        let who = self.operator(&request)?;
        let r = self.get_alert_as(&who, request.into_inner()).await?;
        Ok(Response::new(r))
    }

    async fn set_alert_status(
        &self,
        request: Request<SetAlertStatusRequest>,
    ) -> Result<Response<SetAlertStatusResponse>, Status> {
        let mut act = self.act(&request, "alert.judge");
        let r = match self.operator(&request) {
            Ok(who) => {
                self.set_alert_status_as(&who, request.into_inner(), &mut act)
                    .await
            }
            Err(e) => Err(e),
        };
        audit::record(&self.state.store, act, &r).await;
        r.map(Response::new)
    }

    async fn add_exception(
        &self,
        request: Request<AddExceptionRequest>,
    ) -> Result<Response<AddExceptionResponse>, Status> {
        let mut act = self.act(&request, "exception.add");
        let r = match self.operator(&request) {
            Ok(who) => {
                self.add_exception_as(&who, request.into_inner(), &mut act)
                    .await
            }
            Err(e) => Err(e),
        };
        audit::record(&self.state.store, act, &r).await;
        r.map(|e| Response::new(AddExceptionResponse { exception: Some(e) }))
    }

    async fn list_exceptions(
        &self,
        request: Request<ListExceptionsRequest>,
    ) -> Result<Response<ListExceptionsResponse>, Status> {
        let who = self.reader(&request)?;
        let exceptions = self.list_exceptions_as(&who, request.into_inner()).await?;
        Ok(Response::new(ListExceptionsResponse { exceptions }))
    }

    async fn start_hunt(
        &self,
        request: Request<StartHuntRequest>,
    ) -> Result<Response<StartHuntResponse>, Status> {
        let mut act = self.act(&request, "hunt.start");
        let r = match self.operator(&request) {
            Ok(who) => {
                self.start_hunt_as(&who, request.into_inner(), &mut act)
                    .await
            }
            Err(e) => Err(e),
        };
        audit::record(&self.state.store, act, &r).await;
        r.map(|h| Response::new(StartHuntResponse { hunt: Some(h) }))
    }

    async fn request_action(
        &self,
        request: Request<RequestActionRequest>,
    ) -> Result<Response<ActionInfo>, Status> {
        let mut act = self.act(&request, "action.request");
        let r = match self.operator(&request) {
            Ok(who) => {
                let actor = act.actor.clone();
                self.request_action_as(&who, &actor, request.into_inner(), &mut act)
                    .await
            }
            Err(e) => Err(e),
        };
        audit::record(&self.state.store, act, &r).await;
        r.map(Response::new)
    }

    async fn decide_action(
        &self,
        request: Request<DecideActionRequest>,
    ) -> Result<Response<ActionInfo>, Status> {
        let verb = if request.get_ref().approve {
            "action.approve"
        } else {
            "action.deny"
        };
        let mut act = self.act(&request, verb);
        let r = match self.operator(&request) {
            Ok(who) => {
                let actor = act.actor.clone();
                self.decide_action_as(&who, &actor, request.into_inner(), &mut act)
                    .await
            }
            Err(e) => Err(e),
        };
        audit::record(&self.state.store, act, &r).await;
        r.map(Response::new)
    }

    async fn undo_action(
        &self,
        request: Request<UndoActionRequest>,
    ) -> Result<Response<ActionInfo>, Status> {
        let mut act = self.act(&request, "action.undo");
        let r = match self.operator(&request) {
            Ok(who) => {
                let actor = act.actor.clone();
                self.undo_action_as(&who, &actor, request.into_inner(), &mut act)
                    .await
            }
            Err(e) => Err(e),
        };
        audit::record(&self.state.store, act, &r).await;
        r.map(Response::new)
    }

    async fn list_actions(
        &self,
        request: Request<ListActionsRequest>,
    ) -> Result<Response<ListActionsResponse>, Status> {
        let who = self.operator(&request)?;
        let agent = request.into_inner().agent_id.trim().to_string();
        let actions = self.list_actions_as(&who, &agent).await?;
        Ok(Response::new(ListActionsResponse { actions }))
    }

    async fn list_hunts(
        &self,
        request: Request<ListHuntsRequest>,
    ) -> Result<Response<ListHuntsResponse>, Status> {
        let who = self.operator(&request)?;
        let hunts = self.list_hunts_as(&who).await?;
        Ok(Response::new(ListHuntsResponse { hunts }))
    }

    async fn get_hunt(
        &self,
        request: Request<GetHuntRequest>,
    ) -> Result<Response<GetHuntResponse>, Status> {
        let who = self.operator(&request)?;
        let id = request.into_inner().id.trim().to_string();
        Ok(Response::new(self.hunt_as(&who, id).await?))
    }

    async fn remove_exception(
        &self,
        request: Request<RemoveExceptionRequest>,
    ) -> Result<Response<RemoveExceptionResponse>, Status> {
        let mut act = self.act(&request, "exception.remove");
        let r = match self.operator(&request) {
            Ok(who) => {
                let id = request.into_inner().id.trim().to_string();
                self.remove_exception_as(&who, id, &mut act).await
            }
            Err(e) => Err(e),
        };
        audit::record(&self.state.store, act, &r).await;
        r.map(|e| Response::new(RemoveExceptionResponse { exception: Some(e) }))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let who = self.operator(&request)?;
        let mut act = Act::by(&request, &who, "token.create");
        let r = self
            .create_token_as(&who, request.into_inner(), &mut act)
            .await;
        audit::record(&self.state.store, act, &r).await;
        r.map(Response::new)
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let who = self.operator(&request)?;
        let all = request.get_ref().all;
        let now = now_ms();
        let rows = blocking(&self.state.store, |s| s.list_tokens()).await?;
        let tokens = rows
            .iter()
            .filter(|t| visible(&who, &t.org))
            .filter(|t| all || (t.revoked_at_ms == 0 && t.uses_left > 0 && t.expires_at_ms > now))
            .map(token_info)
            .collect();
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let who = self.operator(&request)?;
        let asked = request.get_ref().id.trim().to_ascii_lowercase();
        let mut act = Act::by(&request, &who, "token.revoke").target(asked.clone());
        let r = self.revoke_token_as(&who, &asked, &mut act).await;
        audit::record(&self.state.store, act, &r).await;
        r.map(Response::new)
    }

    async fn remove_agent(
        &self,
        request: Request<RemoveAgentRequest>,
    ) -> Result<Response<RemoveAgentResponse>, Status> {
        let who = self.operator(&request)?;
        let id = request.get_ref().agent_id.clone();
        let org = self.org_of_agent(&who, &id).await;
        let act = Act::by(&request, &who, "agent.remove")
            .target(id.clone())
            .org(org);
        let r = self.revoke_agent_as(&who, id, true).await;
        audit::record(&self.state.store, act, &r).await;
        r.map(|disconnected| Response::new(RemoveAgentResponse { disconnected }))
    }

    async fn revoke_agent(
        &self,
        request: Request<RevokeAgentRequest>,
    ) -> Result<Response<RevokeAgentResponse>, Status> {
        let who = self.operator(&request)?;
        let id = request.get_ref().agent_id.clone();
        let org = self.org_of_agent(&who, &id).await;
        let act = Act::by(&request, &who, "agent.revoke")
            .target(id.clone())
            .org(org);
        let r = self.revoke_agent_as(&who, id, false).await;
        audit::record(&self.state.store, act, &r).await;
        r.map(|disconnected| Response::new(RevokeAgentResponse { disconnected }))
    }

    async fn revoke_cert(
        &self,
        request: Request<RevokeCertRequest>,
    ) -> Result<Response<RevokeCertResponse>, Status> {
        let act = self
            .act(&request, "cert.revoke")
            .target(request.get_ref().serial.trim().to_ascii_lowercase());
        let r = self.revoke_cert_as(request).await;
        audit::record(&self.state.store, act, &r).await;
        r
    }

    async fn stage_intel(
        &self,
        request: Request<StageIntelRequest>,
    ) -> Result<Response<StageIntelResponse>, Status> {
        let mut act = self
            .act(&request, "intel.stage")
            .target(request.get_ref().origin.clone());
        act.detail = format!("{} lines", request.get_ref().lines.len());
        let r = self.stage_intel_as(request).await;
        audit::record(&self.state.store, act, &r).await;
        r
    }

    async fn publish_bundle(
        &self,
        request: Request<PublishBundleRequest>,
    ) -> Result<Response<PublishBundleResponse>, Status> {
        let mut act = self.act(&request, "bundle.publish");
        let r = self.publish_bundle_as(request).await;
        if let Ok(done) = &r {
            act.target = done.get_ref().version.to_string();
            act.detail = format!("digest {}", done.get_ref().digest);
        }
        audit::record(&self.state.store, act, &r).await;
        r
    }

    async fn create_org(
        &self,
        request: Request<CreateOrgRequest>,
    ) -> Result<Response<CreateOrgResponse>, Status> {
        let name = request.get_ref().name.clone();
        let act = self
            .act(&request, "org.create")
            .target(name.clone())
            .org(name);
        let r = self.create_org_as(request).await;
        audit::record(&self.state.store, act, &r).await;
        r
    }

    async fn set_org(
        &self,
        request: Request<SetOrgRequest>,
    ) -> Result<Response<SetOrgResponse>, Status> {
        let name = request.get_ref().name.clone();
        let mut act = self.act(&request, "org.set").target(name.clone()).org(name);
        let req = request.get_ref();
        act.detail = [
            ("sector", &req.sector),
            ("country", &req.country),
            ("share", &req.share),
            ("tlp", &req.tlp),
            ("response approval", &req.response_approval),
        ]
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ");
        let r = self.set_org_as(request).await;
        audit::record(&self.state.store, act, &r).await;
        r
    }

    async fn promote_bundle(
        &self,
        request: Request<PromoteBundleRequest>,
    ) -> Result<Response<PromoteBundleResponse>, Status> {
        let who = Peer::of(&request)?;
        who.require_role(Role::Maintainer)?;
        who.require_collector_wide("promoting a bundle")?;
        let mut act = Act::by(&request, &who, "bundle.promote");
        let req = request.into_inner();
        act.target = req.version.to_string();
        let r = self.promote_bundle_as(req, &mut act).await;
        audit::record(&self.state.store, act, &r).await;
        r.map(Response::new)
    }

    async fn set_agent_labels(
        &self,
        request: Request<SetAgentLabelsRequest>,
    ) -> Result<Response<SetAgentLabelsResponse>, Status> {
        let who = self.operator(&request)?;
        let mut act = Act::by(&request, &who, "agent.label");
        let req = request.into_inner();
        act.target = req.agent_id.clone();
        let r = self.set_labels_as(&who, req, &mut act).await;
        audit::record(&self.state.store, act, &r).await;
        r.map(Response::new)
    }

    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        let who = self.operator(&request)?;
        let req = request.into_inner();
        let org = who.scope().map(str::to_string);
        let limit = match req.limit {
            0 => DEFAULT_LIMIT,
            l => l.min(MAX_LIMIT),
        };
        let rows = blocking(&self.state.store, move |s| {
            s.list_audit(req.since_ms, org.as_deref(), limit)
        })
        .await?;
        Ok(Response::new(ListAuditResponse {
            entries: rows.into_iter().map(audit_entry).collect(),
        }))
    }

    async fn rename_org(
        &self,
        request: Request<RenameOrgRequest>,
    ) -> Result<Response<RenameOrgResponse>, Status> {
        let who = self.collector_operator(&request, "renaming an organisation")?;
        let mut act = Act::by(&request, &who, "org.rename");
        let req = request.into_inner();
        act = act.target(req.name.clone()).org(req.name.clone());
        act.detail = format!("to `{}`", req.new_name);
        let r = self.rename_org_as(&who, &req).await;
        audit::record(&self.state.store, act, &r).await;
        r.map(|org| Response::new(RenameOrgResponse { org: Some(org) }))
    }

    async fn remove_org(
        &self,
        request: Request<RemoveOrgRequest>,
    ) -> Result<Response<RemoveOrgResponse>, Status> {
        let who = self.collector_operator(&request, "removing an organisation")?;
        let name = request.get_ref().name.clone();
        let mut act = Act::by(&request, &who, "org.remove")
            .target(name.clone())
            .org(name.clone());
        let r = self.remove_org_as(&who, &name).await;
        if let Ok(n) = &r {
            act.detail = format!("{n} unspent tokens revoked");
        }
        audit::record(&self.state.store, act, &r).await;
        r.map(|tokens_revoked| Response::new(RemoveOrgResponse { tokens_revoked }))
    }

    async fn list_certs(
        &self,
        request: Request<ListCertsRequest>,
    ) -> Result<Response<ListCertsResponse>, Status> {
        let who = self.operator(&request)?;
        let rows = blocking(&self.state.store, |s| s.list_certs()).await?;
        Ok(Response::new(ListCertsResponse {
            certs: rows
                .iter()
                .filter(|c| visible(&who, &c.org))
                .map(cert_info)
                .collect(),
        }))
    }

    async fn list_intel(
        &self,
        request: Request<ListIntelRequest>,
    ) -> Result<Response<ListIntelResponse>, Status> {
        self.reader(&request)?
            .require_collector_wide("staged intel")?;
        let req = request.into_inner();
        let limit = match req.limit {
            0 => INTEL_PAGE,
            n => n.min(MAX_INTEL_PAGE),
        };
        let rows = blocking(&self.state.store, move |s| {
            s.list_intel((&req.after_source, &req.after_id), limit)
        })
        .await?;
        let (next_source, next_id) = match rows.last() {
            Some(last) if rows.len() as u32 == limit => (last.source.clone(), last.id.clone()),
            _ => (String::new(), String::new()),
        };
        Ok(Response::new(ListIntelResponse {
            lines: rows.into_iter().map(|r| r.line).collect(),
            next_source,
            next_id,
        }))
    }

    async fn intel_status(
        &self,
        request: Request<IntelStatusRequest>,
    ) -> Result<Response<IntelStatusResponse>, Status> {
        self.reader(&request)?
            .require_collector_wide("intel status")?;
        let rows = blocking(&self.state.store, |s| s.intel_sources()).await?;
        let sinks = blocking(&self.state.store, |s| s.export_states()).await?;
        Ok(Response::new(IntelStatusResponse {
            sinks: sinks
                .into_iter()
                .map(|r| vedette_proto::v1::ExportSink {
                    sink: r.sink,
                    exported: r.exported,
                    backlog: r.backlog,
                    last_error: r.last_error,
                    last_attempt_ms: r.last_attempt_ms,
                })
                .collect(),
            staged: rows.iter().map(|r| r.staged).sum(),
            sources: rows
                .into_iter()
                .map(|r| IntelSource {
                    origin: r.origin,
                    kind: r.kind,
                    last_poll_ms: r.last_poll_ms,
                    accepted: r.accepted,
                    skipped: r.skipped,
                    rejected: r.rejected,
                    revoked: r.revoked,
                    staged: r.staged,
                    last_error: r.last_error,
                })
                .collect(),
        }))
    }

    async fn list_bundles(
        &self,
        request: Request<ListBundlesRequest>,
    ) -> Result<Response<ListBundlesResponse>, Status> {
        self.reader(&request)?;
        let rows = blocking(&self.state.store, |s| s.list_bundles()).await?;
        Ok(Response::new(ListBundlesResponse {
            bundles: rows.iter().map(bundle_info).collect(),
        }))
    }

    async fn slow_rules(
        &self,
        request: Request<SlowRulesRequest>,
    ) -> Result<Response<SlowRulesResponse>, Status> {
        let who = self.reader(&request)?;
        let versions = self.slow_rules_as(&who, &request.get_ref().org).await?;
        Ok(Response::new(SlowRulesResponse { versions }))
    }

    async fn get_bundle(
        &self,
        request: Request<GetBundleRequest>,
    ) -> Result<Response<GetBundleResponse>, Status> {
        self.reader(&request)?;
        let version = request.into_inner().version;
        let row = blocking(&self.state.store, move |s| s.bundle(version))
            .await?
            .ok_or_else(|| Status::not_found(format!("no bundle version {version}")))?;
        Ok(Response::new(GetBundleResponse {
            info: Some(bundle_info(&row)),
            content: row.content,
            signature: row.signature,
            signer_key: row.signer_key,
        }))
    }

    async fn bundle_rollout(
        &self,
        request: Request<BundleRolloutRequest>,
    ) -> Result<Response<BundleRolloutResponse>, Status> {
        let who = self.reader(&request)?;
        let mut version = request.into_inner().version;
        if version == 0 {
            version = blocking(&self.state.store, |s| s.bundle(0))
                .await?
                .map(|b| b.version)
                .ok_or_else(|| Status::not_found("no bundle has been published"))?;
        }
        let rows = blocking(&self.state.store, |s| s.list_agents()).await?;
        let target = blocking(&self.state.store, |s| s.list_bundles())
            .await?
            .into_iter()
            .find(|b| b.version == version)
            .map(|b| b.target)
            .unwrap_or_default();
        let mut out = BundleRolloutResponse {
            version,
            target,
            ..Default::default()
        };
        let rollout = self.state.rollout.borrow().clone();
        for r in rows
            .into_iter()
            .filter(|r| !r.revoked && visible(&who, &r.org))
        {
            let due = rollout.due_for(&r.labels).map_or(0, |b| b.version);
            if r.bundle_version == version {
                out.on_version += 1;
            } else if r.bundle_version > version {
                out.ahead += 1;
            } else if r.bundle_failed_version == version {
                out.failed += 1;
            } else if due >= version {
                out.behind += 1;
            } else {
                out.not_due += 1;
            }
            out.agents.push(AgentBundleState {
                labels: r.labels,
                due_version: due,
                agent_id: r.id,
                hostname: r.hostname,
                applied_version: r.bundle_version,
                applied_at_ms: r.bundle_applied_at_ms,
                failed_version: r.bundle_failed_version,
                error: r.bundle_error,
                connected: r.connected,
                org: r.org,
            });
        }
        Ok(Response::new(out))
    }

    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let who = self.operator(&request)?;
        let only = listing_scope(&who, &request.get_ref().org)?;
        let removed = request.get_ref().removed;
        let label = request.get_ref().label.clone();
        let rows = blocking(&self.state.store, |s| s.list_agents()).await?;
        let agents = rows
            .into_iter()
            .filter(|r| only.as_ref().is_none_or(|o| *o == r.org))
            .filter(|r| removed || r.removed_at_ms == 0)
            .filter(|r| label.is_empty() || r.labels.contains(&label))
            .map(|r| AgentInfo {
                id: r.id,
                hostname: r.hostname,
                os: r.os,
                kernel: r.kernel,
                agent_version: r.agent_version,
                enrolled_at_ms: r.enrolled_at_ms,
                first_seen_ms: r.first_seen_ms,
                last_seen_ms: r.last_seen_ms,
                connected: r.connected,
                revoked: r.revoked,
                bundle_version: r.bundle_version,
                bundle_applied_at_ms: r.bundle_applied_at_ms,
                dropped_total: r.dropped_total,
                bundle_failed_version: r.bundle_failed_version,
                bundle_error: r.bundle_error,
                arch: r.arch,
                counters: r.counters.into_iter().collect(),
                org: r.org,
                clock_skew_ms: r.clock_skew_ms,
                stopped_at_ms: r.stopped_at_ms,
                removed_at_ms: r.removed_at_ms,
                labels: r.labels,
            })
            .collect();
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    async fn list_detections(
        &self,
        request: Request<ListDetectionsRequest>,
    ) -> Result<Response<ListDetectionsResponse>, Status> {
        let who = if request.get_ref().unfiltered_export {
            let who =
                self.collector_operator(&request, "an export unfiltered by sharing policy")?;
            warn!(
                operator = who.name(),
                "an export unfiltered by the organisations' sharing policies: host names, paths \
                 and users of every organisation may leave the collector"
            );
            who
        } else {
            self.operator(&request)?
        };
        let req = request.into_inner();
        let filter = DetectionFilter {
            org: listing_scope(&who, &req.org)?,
            agent_id: Some(req.agent_id).filter(|a| !a.is_empty()),
            since_ms: Some(req.since_ms).filter(|s| *s != 0),
            until_ms: Some(req.until_ms).filter(|s| *s != 0),
            kind: Some(req.kind).filter(|k| *k != 0),
            rule: Some(req.rule).filter(|r| !r.is_empty()),
            sha256: hex_filter("sha256", "a SHA-256", 64, &req.sha256)?,
            md5: hex_filter("md5", "an MD5", 32, &req.md5)?,
            host: Some(req.host.trim().to_string()).filter(|h| !h.is_empty()),
            label: match req.label.trim() {
                "" => None,
                l => {
                    check_label(l)?;
                    Some(l.to_string())
                }
            },
            text: Some(req.text).filter(|t| !t.is_empty()),
            before_seq: Some(req.before_seq).filter(|s| *s != 0),
            limit: match req.limit {
                0 => DEFAULT_LIMIT,
                l => l.min(MAX_LIMIT),
            },
            max_bytes: MAX_PAGE_BYTES,
            suppressed: req.suppressed,
            alert_id: Some(req.alert_id).filter(|a| *a != 0),
        };
        let mut page = blocking(&self.state.store, move |s| s.list_detections(&filter)).await?;
        super::actions::mark_detections(&self.state, &mut page.detections).await?;
        Ok(Response::new(ListDetectionsResponse {
            detections: page.detections,
            next_before_seq: page.next_before_seq.unwrap_or(0),
        }))
    }

    async fn list_orgs(
        &self,
        request: Request<ListOrgsRequest>,
    ) -> Result<Response<ListOrgsResponse>, Status> {
        let who = self.reader(&request)?;
        let rows = blocking(&self.state.store, |s| s.list_orgs()).await?;
        Ok(Response::new(ListOrgsResponse {
            orgs: rows
                .into_iter()
                .filter(|o| visible(&who, &o.name))
                .map(org_info)
                .collect(),
        }))
    }
}

/// A digest filter (`key`, `what` it is, `digits` long): empty for none, else that many hex
/// digits (any case), kept in lower case as the store does.
fn hex_filter(key: &str, what: &str, digits: usize, text: &str) -> Result<Option<String>, Status> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(None);
    }
    if t.len() == digits && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(Some(t.to_ascii_lowercase()))
    } else {
        Err(Status::invalid_argument(format!(
            "`{key}`: `{}` is not {what} ({digits} hex digits)",
            t.chars().take(80).collect::<String>()
        )))
    }
}
