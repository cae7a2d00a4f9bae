//! Hunts: digests asked of every agent in scope, answered from each agent's history. The same
//! roles and organisation scope as every admin call: a scoped operator hunts in its own
//! organisation, and sees only its own organisation's agents in any hunt. The agents asked are
//! fixed when the hunt starts; one offline then answers when it reconnects, until the hunt
//! expires. Each agent's first answer is the one kept.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use prost::Message;
use rand::RngCore;
use tonic::Status;
use tracing::{debug, info};
use vedette_proto::limits::{MAX_HUNT_HASHES, MAX_HUNT_HITS, MAX_STRING_BYTES};
use vedette_proto::v1::collector_message::Msg as DownMsg;
use vedette_proto::v1::{
    CollectorMessage, GetHuntResponse, HuntAgent, HuntAnswer, HuntInfo, HuntRequest,
    StartHuntRequest,
};

use super::admin::{AdminSvc, listing_scope, visible};
use super::audit::Act;
use super::{State, blocking};
use crate::peer::Peer;
use crate::store::{HuntRow, StoreEvent, now_ms};

/// How long a hunt waits for agents offline when it starts, unless told otherwise.
const DEFAULT_EXPIRY_SECS: u64 = 24 * 3600;
/// The longest a hunt may wait.
const MAX_EXPIRY_SECS: u64 = 30 * 24 * 3600;

/// The digests of a request, checked (hex of the right length, lower case, each once).
fn digests(list: &[String], bytes: usize, name: &str) -> Result<Vec<String>, Status> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for d in list {
        let d = d.trim().to_ascii_lowercase();
        if d.len() != bytes * 2 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(format!(
                "`{}` is not a {name} ({} hex digits)",
                vedette_ops::output::printable(&d.chars().take(80).collect::<String>()),
                bytes * 2
            )));
        }
        if seen.insert(d.clone()) {
            out.push(d);
        }
    }
    Ok(out)
}

fn hunt_info(h: &HuntRow) -> HuntInfo {
    let req = HuntRequest::decode(h.request.as_slice()).unwrap_or_default();
    HuntInfo {
        id: h.id.clone(),
        org: h.org.clone(),
        created_by: h.created_by.clone(),
        created_at_ms: h.created_at_ms,
        expires_at_ms: h.expires_at_ms,
        sha256: req.sha256,
        md5: req.md5,
        sha1: req.sha1,
        asked: h.asked,
        answered: h.answered,
        hits: 0,
    }
}

impl AdminSvc {
    pub(super) async fn start_hunt_as(
        &self,
        who: &Peer,
        req: StartHuntRequest,
        act: &mut Act,
    ) -> Result<HuntInfo, Status> {
        let org = listing_scope(who, req.org.trim())?.unwrap_or_default();
        act.org = org.clone();
        let sha256 = digests(&req.sha256, 32, "SHA-256")?;
        let md5 = digests(&req.md5, 16, "MD5")?;
        let sha1 = digests(&req.sha1, 20, "SHA-1")?;
        let count = sha256.len() + md5.len() + sha1.len();
        if count == 0 {
            return Err(Status::invalid_argument(
                "a hunt needs at least one digest (--sha256, --md5, --sha1 or --file)",
            ));
        }
        if count > MAX_HUNT_HASHES {
            return Err(Status::invalid_argument(format!(
                "{count} digests: one hunt asks about {MAX_HUNT_HASHES} at most"
            )));
        }
        let secs = match req.expires_secs {
            0 => DEFAULT_EXPIRY_SECS,
            s if s > MAX_EXPIRY_SECS => {
                return Err(Status::invalid_argument(format!(
                    "a hunt expires within {} days at most",
                    MAX_EXPIRY_SECS / 86_400
                )));
            }
            s => s,
        };
        let agents = self.agents_in(&org).await?;
        let now = now_ms();
        let mut raw = [0u8; 8];
        rand::rng().fill_bytes(&mut raw);
        let id = format!("hunt-{}", hex::encode(raw));
        let expires_at_ms = now.saturating_add((secs * 1000) as i64);
        let request = HuntRequest {
            id: id.clone(),
            sha256,
            md5,
            sha1,
            expires_at_ms,
        };
        let mut row = HuntRow {
            id: id.clone(),
            org,
            created_by: who.to_string(),
            created_at_ms: now,
            expires_at_ms,
            request: request.encode_to_vec(),
            asked: agents.len() as u32,
            answered: 0,
        };
        act.target = id.clone();
        act.detail = format!("{count} digest(s), {} agent(s) asked", agents.len());
        let (stored, list) = (row.clone(), agents.clone());
        blocking(&self.state.store, move |s| s.create_hunt(&stored, &list)).await?;
        let started = Started {
            request,
            agents: agents.into_iter().collect(),
        };
        self.state.hunts.send_modify(|n| {
            n.seq = n.seq.wrapping_add(1);
            n.latest = Some(Arc::new(started));
        });
        super::admin::announce(&self.state, StoreEvent::Hunt(id.clone())).await;
        info!(by = %who, hunt = %id, digests = count, agents = row.asked, "hunt started");
        row.answered = 0;
        Ok(hunt_info(&row))
    }

    /// The agents of `org` (every one when empty) that can still answer: not revoked.
    async fn agents_in(&self, org: &str) -> Result<Vec<String>, Status> {
        let org = org.to_string();
        let all = blocking(&self.state.store, |s| s.list_agents()).await?;
        Ok(all
            .into_iter()
            .filter(|a| !a.revoked && (org.is_empty() || a.org == org))
            .map(|a| a.id)
            .collect())
    }

    pub(super) async fn list_hunts_as(&self, who: &Peer) -> Result<Vec<HuntInfo>, Status> {
        let scope = who.scope().map(str::to_string);
        let rows = blocking(&self.state.store, move |s| s.list_hunts(None)).await?;
        let mut out = Vec::new();
        for h in rows {
            match &scope {
                None => out.push(hunt_info(&h)),
                // A hunt of every organisation shows a scoped operator its own agents only.
                Some(_) if h.org.is_empty() => {
                    let full = self.hunt_as(who, h.id.clone()).await?;
                    out.extend(full.hunt);
                }
                Some(own) if &h.org == own => out.push(hunt_info(&h)),
                Some(_) => {}
            }
        }
        Ok(out)
    }

    pub(super) async fn hunt_as(&self, who: &Peer, id: String) -> Result<GetHuntResponse, Status> {
        let key = id.clone();
        let found = blocking(&self.state.store, move |s| s.hunt(&key)).await?;
        let Some((h, rows)) = found.filter(|(h, _)| h.org.is_empty() || visible(who, &h.org))
        else {
            return Err(match who.scope() {
                Some(own) => {
                    Status::permission_denied(format!("no hunt {id} in organisation `{own}`"))
                }
                None => Status::not_found(format!("no hunt {id}")),
            });
        };
        let agents: HashMap<String, (String, String)> =
            blocking(&self.state.store, |s| s.list_agents())
                .await?
                .into_iter()
                .map(|a| (a.id, (a.hostname, a.org)))
                .collect();
        let mut info = hunt_info(&h);
        let mut out = Vec::new();
        for r in rows {
            let (hostname, org) = agents.get(&r.agent_id).cloned().unwrap_or_default();
            if !visible(who, &org) {
                continue;
            }
            let answer = (r.answered_at_ms > 0)
                .then(|| HuntAnswer::decode(r.answer.as_slice()).ok())
                .flatten();
            info.hits += answer.as_ref().map_or(0, |a| a.hits.len() as u32);
            out.push(HuntAgent {
                agent_id: r.agent_id,
                hostname,
                org,
                answered_at_ms: r.answered_at_ms,
                answer,
            });
        }
        info.asked = out.len() as u32;
        info.answered = out.iter().filter(|a| a.answered_at_ms > 0).count() as u32;
        Ok(GetHuntResponse {
            hunt: Some(info),
            agents: out,
        })
    }
}

/// A hunt started through this collector: what agents are sent, and which agents it asks.
pub(crate) struct Started {
    request: HuntRequest,
    agents: HashSet<String>,
}

/// What agent streams are told of hunts: a count of changes, and the hunt started last
/// through this collector (None: look in the store).
#[derive(Default, Clone)]
pub(crate) struct HuntNews {
    seq: u64,
    latest: Option<Arc<Started>>,
}

/// Every agent stream looks in the store for hunts it has not sent (a hunt started through
/// another collector, or events that may have been missed); `id`, when given, is a hunt that
/// needs no look if this collector started it.
pub(super) fn hunts_changed(state: &State, id: Option<&str>) {
    state.hunts.send_if_modified(|n| {
        let ours = n
            .latest
            .as_ref()
            .is_some_and(|l| Some(l.request.id.as_str()) == id);
        if !ours {
            n.seq = n.seq.wrapping_add(1);
            n.latest = None;
        }
        !ours
    });
}

/// The hunts one agent stream sent its agent.
#[derive(Default)]
pub(super) struct HuntPusher {
    sent: HashSet<String>,
    /// The news last acted on.
    seen: u64,
}

impl HuntPusher {
    /// For a stream that starts now (what the store holds then is sent by [`Self::push`]),
    /// with the news it follows.
    pub(super) fn start(state: &State) -> (tokio::sync::watch::Receiver<HuntNews>, HuntPusher) {
        let mut news = state.hunts.subscribe();
        let seen = news.borrow_and_update().seq;
        let pusher = HuntPusher {
            sent: HashSet::new(),
            seen,
        };
        (news, pusher)
    }

    /// Acts on news of hunts: the hunt started here is sent straight away when it asks this
    /// agent and nothing was missed since; anything else is looked up in the store. False when
    /// the stream is gone.
    pub(super) async fn follow(
        &mut self,
        state: &State,
        news: HuntNews,
        agent_id: &str,
        tx: &super::agent::Down,
    ) -> Result<bool, Status> {
        let next = self.seen.wrapping_add(1);
        self.seen = news.seq;
        match news.latest {
            Some(h) if news.seq == next => {
                let live = h.request.expires_at_ms > now_ms();
                if !live || !h.agents.contains(agent_id) || !self.sent.insert(h.request.id.clone())
                {
                    return Ok(true);
                }
                let msg = CollectorMessage {
                    msg: Some(DownMsg::Hunt(h.request.clone())),
                };
                Ok(tx.send(Ok(msg)).await.is_ok())
            }
            _ => self.push(state, agent_id, tx).await,
        }
    }

    /// Sends the agent every hunt that asks it, is not answered nor expired, and was not sent
    /// on this stream; false when the stream is gone.
    pub(super) async fn push(
        &mut self,
        state: &State,
        agent_id: &str,
        tx: &super::agent::Down,
    ) -> Result<bool, Status> {
        let id = agent_id.to_string();
        let pending = blocking(&state.store, move |s| s.pending_hunts(&id, now_ms())).await?;
        for h in pending {
            if !self.sent.insert(h.id.clone()) {
                continue;
            }
            let Ok(req) = HuntRequest::decode(h.request.as_slice()) else {
                continue;
            };
            let msg = CollectorMessage {
                msg: Some(DownMsg::Hunt(req)),
            };
            if tx.send(Ok(msg)).await.is_err() {
                return Ok(false);
            }
            debug!(agent = %agent_id, hunt = %h.id, "hunt sent");
        }
        Ok(true)
    }
}

/// Checks an agent's answer (sizes) and keeps the first one it gives to each hunt.
pub(super) async fn record_answer(
    state: &State,
    agent_id: &str,
    answer: HuntAnswer,
) -> Result<(), Status> {
    if answer.hits.len() > MAX_HUNT_HITS {
        return Err(Status::invalid_argument(format!(
            "a hunt answer carries {MAX_HUNT_HITS} hits at most"
        )));
    }
    let long = |s: &String| s.len() > MAX_STRING_BYTES;
    if long(&answer.id)
        || long(&answer.error)
        || answer.hits.iter().any(|h| {
            [&h.path, &h.kind, &h.sha256, &h.md5, &h.sha1, &h.user]
                .into_iter()
                .any(long)
        })
    {
        return Err(Status::invalid_argument(
            "a string of the hunt answer is too long",
        ));
    }
    let (id, agent, bytes) = (
        answer.id.clone(),
        agent_id.to_string(),
        answer.encode_to_vec(),
    );
    let hits = answer.hits_total;
    let first = blocking(&state.store, move |s| {
        s.answer_hunt(&id, &agent, now_ms(), &bytes)
    })
    .await?;
    if first {
        info!(agent = %agent_id, hunt = %answer.id, hits, "hunt answered");
    } else {
        debug!(agent = %agent_id, hunt = %answer.id, "hunt answer ignored: answered before, or not asked");
    }
    Ok(())
}
