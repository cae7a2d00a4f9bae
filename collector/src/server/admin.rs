//! `AdminService`: tokens, agents and detections for operators (`vedettectl`).

use std::sync::Arc;

use rand::RngCore;
use tonic::{Request, Response, Status};
use tracing::info;
use vedette_proto::v1::admin_service_server::AdminService;
use vedette_proto::v1::{
    AgentInfo, CreateTokenRequest, CreateTokenResponse, ListAgentsRequest, ListAgentsResponse,
    ListDetectionsRequest, ListDetectionsResponse, RevokeAgentRequest, RevokeAgentResponse,
};

use super::agent::token_hash;
use super::{State, blocking};
use crate::identity::Identity;
use crate::pki::Role;
use crate::store::{DetectionFilter, now_ms};

/// Longest token lifetime an operator may ask for.
const MAX_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;
/// Most enrollments one token may allow.
const MAX_TOKEN_USES: u32 = 100_000;
/// Default and largest `limit` of a detection listing.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 10_000;

pub struct AdminSvc {
    state: Arc<State>,
}

impl AdminSvc {
    pub(super) fn new(state: Arc<State>) -> Self {
        AdminSvc { state }
    }

    fn operator<T>(&self, request: &Request<T>) -> Result<Identity, Status> {
        let id = Identity::of(request)?;
        id.require_role(Role::Operator)?;
        Ok(id)
    }
}

#[tonic::async_trait]
impl AdminService for AdminSvc {
    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let who = self.operator(&request)?;
        let req = request.into_inner();
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
        let mut raw = [0u8; 24];
        rand::rng().fill_bytes(&mut raw);
        let token = format!("vdt_{}", hex::encode(raw));
        let hash = token_hash(&token);
        let now = now_ms();
        let expires = now + (ttl as i64) * 1000;
        blocking(&self.state.store, move |s| {
            s.create_token(&hash, now, expires, uses)
        })
        .await?;
        info!(by = %who, ttl_secs = ttl, uses, "enrollment token created");
        Ok(Response::new(CreateTokenResponse {
            token,
            expires_at_ms: expires,
            uses,
        }))
    }

    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        self.operator(&request)?;
        let rows = blocking(&self.state.store, |s| s.list_agents()).await?;
        let agents = rows
            .into_iter()
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
                arch: r.arch,
                counters: r.counters.into_iter().collect(),
            })
            .collect();
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    async fn revoke_agent(
        &self,
        request: Request<RevokeAgentRequest>,
    ) -> Result<Response<RevokeAgentResponse>, Status> {
        let who = self.operator(&request)?;
        let agent_id = request.into_inner().agent_id;
        let id = agent_id.clone();
        // Stored first: from here on the agent cannot open a new stream.
        let found = blocking(&self.state.store, move |s| s.revoke_agent(&id, now_ms())).await?;
        if !found {
            return Err(Status::not_found(format!("no agent `{agent_id}`")));
        }
        let open = self.state.streams().remove(&agent_id);
        let disconnected = open.is_some();
        if let Some((_, stop)) = open {
            stop.cancel();
        }
        info!(by = %who, agent = %agent_id, disconnected, "agent revoked");
        Ok(Response::new(RevokeAgentResponse { disconnected }))
    }

    async fn list_detections(
        &self,
        request: Request<ListDetectionsRequest>,
    ) -> Result<Response<ListDetectionsResponse>, Status> {
        self.operator(&request)?;
        let req = request.into_inner();
        let filter = DetectionFilter {
            agent_id: Some(req.agent_id).filter(|a| !a.is_empty()),
            since_ms: Some(req.since_ms).filter(|s| *s != 0),
            limit: match req.limit {
                0 => DEFAULT_LIMIT,
                l => l.min(MAX_LIMIT),
            },
        };
        let detections = blocking(&self.state.store, move |s| s.list_detections(&filter)).await?;
        Ok(Response::new(ListDetectionsResponse { detections }))
    }
}
