//! Response actions: kill a process, quarantine a file, isolate a host, on one agent. An
//! operator requests one with a reason; where the agent's organisation requires two-person
//! approval it waits (an hour at most) for a second operator with scope over that
//! organisation, never the requester; then it is sent on the agent's stream, now or when it
//! reconnects, until it expires. The agent applies only what its own `response` setting
//! allows, each id at most once, and answers with the outcome, which is kept. Every step is an
//! audit entry.

use std::collections::HashSet;

use prost::Message;
use rand::RngCore;
use tonic::Status;
use tracing::{debug, info, warn};
use vedette_proto::limits::MAX_STRING_BYTES;
use vedette_proto::v1::collector_message::Msg as DownMsg;
use vedette_proto::v1::detection::Target;
use vedette_proto::v1::{
    ActionInfo, ActionResult, CollectorMessage, DecideActionRequest, RequestActionRequest,
    ResponseAction, StoredDetection, UndoActionRequest,
};

use super::admin::{AdminSvc, visible};
use super::audit::{self, Act};
use super::{State, blocking};
use crate::peer::Peer;
use crate::store::{ActionRow, DetectionFilter, StoreEvent, now_ms};

/// How long an action may wait for an agent offline (and an isolation lasts), unless told.
const DEFAULT_EXPIRY_SECS: u64 = 24 * 3600;
/// The longest an action may wait, or an isolation last.
const MAX_EXPIRY_SECS: u64 = 7 * 24 * 3600;
/// How long a request waits for a second operator.
const APPROVAL_WINDOW_MS: i64 = 3_600_000;
/// Longest reason, in characters.
const MAX_REASON: usize = 1_000;
/// Longest path a quarantine names, in bytes.
const MAX_PATH: usize = 4_096;

/// The actions an operator may request (restore and release come from `undo`).
pub const KINDS: &[&str] = &["kill", "quarantine", "isolate"];

/// The action as operators see it: its stored state, or `expired` once its time is up.
fn seen(row: &ActionRow, now: i64) -> ActionInfo {
    let mut info = ActionInfo::decode(row.info.as_slice()).unwrap_or_default();
    info.state = row.state.clone();
    let lapsed = match info.state.as_str() {
        "pending" => now >= info.approve_by_ms,
        "approved" | "sent" => now >= info.expires_at_ms,
        _ => false,
    };
    if lapsed {
        info.state = "expired".into();
    }
    info
}

fn row_of(info: &ActionInfo) -> ActionRow {
    ActionRow {
        id: info.id.clone(),
        org: info.org.clone(),
        agent_id: info.agent_id.clone(),
        state: info.state.clone(),
        created_at_ms: info.requested_at_ms,
        expires_at_ms: info.expires_at_ms,
        info: info.encode_to_vec(),
    }
}

/// The person behind an actor (`cert:NAME`, `console:NAME`): the same name by certificate or
/// by console account is the same person.
fn person(actor: &str) -> &str {
    actor.split_once(':').map_or(actor, |(_, name)| name)
}

/// A new action requested at `now`: pending for a second operator (until the approval
/// window ends) where `two_person`, else approved at once.
fn gate(a: &mut ActionInfo, two_person: bool, now: i64) {
    a.requested_at_ms = now;
    (a.state, a.approve_by_ms) = if two_person {
        ("pending".into(), now + APPROVAL_WINDOW_MS)
    } else {
        ("approved".into(), now)
    };
}

fn new_id() -> String {
    let mut raw = [0u8; 8];
    rand::rng().fill_bytes(&mut raw);
    format!("act-{}", hex::encode(raw))
}

fn clip(text: &str) -> String {
    vedette_ops::output::printable(&text.chars().take(80).collect::<String>()).into_owned()
}

/// Checks the target of a kill or quarantine, as requested or taken from a detection.
fn check_target(a: &ActionInfo) -> Result<(), Status> {
    match a.kind.as_str() {
        "kill" if a.pid <= 1 || a.start_time <= 0 => Err(Status::invalid_argument(
            "kill names a process by --pid (above 1) and --start (its start time, seconds \
             since the epoch, as process detections carry it), or by --detection",
        )),
        "quarantine" => {
            let hex = a.sha256.len() == 64 && a.sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !a.path.starts_with('/') || a.path.len() > MAX_PATH || a.path.contains('\0') {
                Err(Status::invalid_argument(format!(
                    "quarantine names a file by its absolute --path, not `{}`",
                    clip(&a.path)
                )))
            } else if !hex {
                Err(Status::invalid_argument(format!(
                    "`{}` is not a SHA-256 (64 hex digits)",
                    clip(&a.sha256)
                )))
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

/// The target of a detection, for an action of `kind` on it.
fn target_of(d: &StoredDetection, a: &mut ActionInfo) -> Result<(), Status> {
    let det = d.detection.clone().unwrap_or_default();
    a.agent_id = d.agent_id.clone();
    match (a.kind.as_str(), det.target) {
        ("kill", Some(Target::Process(p))) => (a.pid, a.start_time) = (p.pid, p.start_time),
        ("kill", Some(Target::Dns(t))) if t.attributed => {
            (a.pid, a.start_time) = (t.pid, t.start_time);
        }
        ("quarantine", Some(Target::File(f))) => {
            (a.path, a.sha256) = (f.path, f.sha256);
        }
        ("quarantine", Some(Target::Process(p))) => {
            (a.path, a.sha256) = (p.exe, p.exe_sha256);
        }
        ("isolate", _) => {}
        (kind, _) => {
            return Err(Status::invalid_argument(format!(
                "detection {} names no {} for {kind}",
                d.seq,
                if kind == "kill" { "process" } else { "file" }
            )));
        }
    }
    Ok(())
}

impl AdminSvc {
    /// A new action as the caller asks it: checked, stored as pending or approved.
    pub(super) async fn request_action_as(
        &self,
        who: &Peer,
        actor: &str,
        req: RequestActionRequest,
        act: &mut Act,
    ) -> Result<ActionInfo, Status> {
        let kind = req.kind.trim().to_ascii_lowercase();
        if !KINDS.contains(&kind.as_str()) {
            return Err(Status::invalid_argument(format!(
                "`{}` is not an action; use {}",
                clip(&kind),
                KINDS.join(", ")
            )));
        }
        let reason = req.reason.trim().to_string();
        if reason.is_empty() || reason.chars().count() > MAX_REASON {
            return Err(Status::invalid_argument(format!(
                "every action needs a --reason (1 to {MAX_REASON} characters): it goes in the \
                 audit log"
            )));
        }
        let secs = match req.expires_secs {
            0 => DEFAULT_EXPIRY_SECS,
            s if s > MAX_EXPIRY_SECS => {
                return Err(Status::invalid_argument(format!(
                    "an action expires within {} days at most",
                    MAX_EXPIRY_SECS / 86_400
                )));
            }
            s => s,
        };
        let mut a = ActionInfo {
            id: new_id(),
            kind,
            agent_id: req.agent_id.trim().to_string(),
            pid: req.pid,
            start_time: req.start_time,
            path: req.path,
            sha256: req.sha256.trim().to_ascii_lowercase(),
            detection_seq: req.detection_seq,
            reason,
            requested_by: actor.to_string(),
            ..ActionInfo::default()
        };
        act.target = a.id.clone();
        if a.detection_seq > 0 {
            let d = self.detection(who, a.detection_seq).await?;
            target_of(&d, &mut a)?;
        }
        check_target(&a)?;
        let (hostname, org) = self.agent_for_action(who, &a.agent_id).await?;
        act.org = org.clone();
        let two_person = self.two_person(&org).await?;
        let now = now_ms();
        a.hostname = hostname;
        a.org = org;
        a.expires_at_ms = now.saturating_add((secs * 1000) as i64);
        gate(&mut a, two_person, now);
        act.detail = describe(&a);
        let row = row_of(&a);
        blocking(&self.state.store, move |s| s.put_action(&row, None)).await?;
        info!(by = %who, action = %a.id, kind = %a.kind, agent = %a.agent_id, state = %a.state, "response action requested");
        if a.state == "approved" {
            actions_changed(&self.state, true).await;
        }
        Ok(a)
    }

    /// The stored detection `seq`, if the caller may see it.
    async fn detection(&self, who: &Peer, seq: u64) -> Result<StoredDetection, Status> {
        let filter = DetectionFilter {
            before_seq: Some(seq.saturating_add(1)),
            limit: 1,
            max_bytes: 1 << 20,
            suppressed: true,
            org: who.scope().map(str::to_string),
            ..DetectionFilter::default()
        };
        let page = blocking(&self.state.store, move |s| s.list_detections(&filter)).await?;
        page.detections
            .into_iter()
            .find(|d| d.seq == seq)
            .ok_or_else(|| Status::not_found(format!("no detection {seq}")))
    }

    /// The host name and organisation of an agent the caller may act on.
    async fn agent_for_action(&self, who: &Peer, id: &str) -> Result<(String, String), Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "an action is for one agent: --agent ID (or --detection SEQ)",
            ));
        }
        let key = id.to_string();
        let agent = blocking(&self.state.store, move |s| s.agent(&key)).await?;
        match agent {
            Some(a) if visible(who, &a.org) && !a.revoked => Ok((a.hostname, a.org)),
            Some(a) if visible(who, &a.org) => Err(Status::failed_precondition(format!(
                "agent {id} is revoked"
            ))),
            Some(_) => Err(Status::permission_denied(format!(
                "agent {id} is not in organisation `{}`",
                who.scope().unwrap_or_default()
            ))),
            None => Err(Status::not_found(format!("no agent {id}"))),
        }
    }

    /// Whether response actions on `org`'s agents wait for a second operator.
    async fn two_person(&self, org: &str) -> Result<bool, Status> {
        let orgs = blocking(&self.state.store, |s| s.list_orgs()).await?;
        Ok(orgs
            .iter()
            .any(|o| o.name == org && o.response_approval == "two-person"))
    }

    /// The stored action `id`, if the caller may see it.
    async fn action_for(&self, who: &Peer, id: &str) -> Result<ActionRow, Status> {
        let key = id.to_string();
        let row = blocking(&self.state.store, move |s| s.action(&key)).await?;
        match row {
            Some(r) if visible(who, &r.org) => Ok(r),
            _ => Err(match who.scope() {
                Some(own) => {
                    Status::permission_denied(format!("no action {id} in organisation `{own}`"))
                }
                None => Status::not_found(format!("no action {id}")),
            }),
        }
    }

    /// Approves or denies a pending action. The requester may withdraw (deny) it, never
    /// approve it.
    pub(super) async fn decide_action_as(
        &self,
        who: &Peer,
        actor: &str,
        req: DecideActionRequest,
        act: &mut Act,
    ) -> Result<ActionInfo, Status> {
        let id = req.id.trim().to_string();
        act.target = id.clone();
        let row = self.action_for(who, &id).await?;
        act.org = row.org.clone();
        let mut a = seen(&row, now_ms());
        if a.state != "pending" {
            return Err(Status::failed_precondition(format!(
                "action {id} is {}: only a pending action is approved or denied",
                a.state
            )));
        }
        if req.approve && person(&a.requested_by) == who.name() {
            return Err(Status::permission_denied(format!(
                "{} requested action {id}: a second operator must approve it",
                a.requested_by
            )));
        }
        a.state = if req.approve { "approved" } else { "denied" }.into();
        a.decided_by = actor.to_string();
        a.decided_at_ms = now_ms();
        if !req.approve {
            a.detail = req.reason.trim().chars().take(MAX_REASON).collect();
        }
        act.detail = format!("{} of {}", a.state, describe(&a));
        let new = row_of(&a);
        if !blocking(&self.state.store, move |s| {
            s.put_action(&new, Some("pending"))
        })
        .await?
        {
            return Err(Status::aborted(format!(
                "action {id} was decided meanwhile; list it again"
            )));
        }
        info!(by = %who, action = %id, state = %a.state, "response action decided");
        if req.approve {
            actions_changed(&self.state, true).await;
        }
        Ok(a)
    }

    /// Undoes a quarantine (restore) or an isolation (release) the agent did: a new action.
    /// A release is sent at once; a restore puts a file back, so it waits for a second
    /// operator where the organisation requires one.
    pub(super) async fn undo_action_as(
        &self,
        who: &Peer,
        actor: &str,
        req: UndoActionRequest,
        act: &mut Act,
    ) -> Result<ActionInfo, Status> {
        let id = req.id.trim().to_string();
        act.target = id.clone();
        let row = self.action_for(who, &id).await?;
        act.org = row.org.clone();
        let mut done = seen(&row, now_ms());
        let kind = undo_kind(&done)?;
        let reason = req.reason.trim().to_string();
        let req = RequestActionRequest {
            kind: kind.into(),
            agent_id: done.agent_id.clone(),
            path: done.path.clone(),
            sha256: done.sha256.clone(),
            reason: if reason.is_empty() {
                format!("undo {id}")
            } else {
                reason
            },
            ..RequestActionRequest::default()
        };
        let two_person = kind == "restore" && self.two_person(&row.org).await?;
        let now = now_ms();
        let mut undo = ActionInfo {
            id: new_id(),
            kind: kind.into(),
            agent_id: req.agent_id,
            hostname: done.hostname.clone(),
            org: row.org.clone(),
            path: req.path,
            sha256: req.sha256,
            reason: req.reason,
            requested_by: actor.to_string(),
            expires_at_ms: now.saturating_add((DEFAULT_EXPIRY_SECS * 1000) as i64),
            undoes: id.clone(),
            ..ActionInfo::default()
        };
        gate(&mut undo, two_person, now);
        done.undone_by = undo.id.clone();
        act.detail = format!("{} by {}", describe(&done), undo.id);
        let (new, old) = (row_of(&undo), row_of(&done));
        let stored = blocking(&self.state.store, move |s| {
            Ok(s.put_action(&old, Some("done"))? && s.put_action(&new, None)?)
        })
        .await?;
        if !stored {
            return Err(Status::aborted(format!(
                "action {id} changed meanwhile; list it again"
            )));
        }
        info!(by = %who, action = %undo.id, undoes = %id, "response action undone");
        if undo.state == "approved" {
            actions_changed(&self.state, true).await;
        }
        Ok(undo)
    }

    pub(super) async fn list_actions_as(
        &self,
        who: &Peer,
        agent_id: &str,
    ) -> Result<Vec<ActionInfo>, Status> {
        let scope = who.scope().map(str::to_string);
        let rows = blocking(&self.state.store, move |s| s.list_actions(scope.as_deref())).await?;
        let now = now_ms();
        Ok(rows
            .iter()
            .filter(|r| agent_id.is_empty() || r.agent_id == agent_id)
            .map(|r| seen(r, now))
            .collect())
    }
}

/// The action that undoes `done`: restore for a quarantine, release for an isolation, when
/// it is done and not undone yet.
fn undo_kind(done: &ActionInfo) -> Result<&'static str, Status> {
    let kind = match done.kind.as_str() {
        "quarantine" => "restore",
        "isolate" => "release",
        other => {
            return Err(Status::failed_precondition(format!(
                "a {other} cannot be undone; quarantine and isolate can"
            )));
        }
    };
    if done.state != "done" || !done.undone_by.is_empty() {
        return Err(Status::failed_precondition(format!(
            "action {} is {}{}: only a done one is undone",
            done.id,
            done.state,
            if done.undone_by.is_empty() {
                String::new()
            } else {
                format!(", undone by {}", done.undone_by)
            }
        )));
    }
    Ok(kind)
}

/// What an action is for, in an audit entry: kind, agent, target, reason.
fn describe(a: &ActionInfo) -> String {
    let target = match a.kind.as_str() {
        "kill" => format!(" pid {} started {}", a.pid, a.start_time),
        "quarantine" | "restore" => format!(" {} sha256 {}", a.path, a.sha256),
        _ => String::new(),
    };
    format!(
        "{} on agent {}{target}: {}",
        a.kind,
        a.agent_id,
        a.reason.chars().take(200).collect::<String>()
    )
}

/// Tells every agent stream (here and, through the store, on other collectors) to look for
/// actions due to its agent.
pub(super) async fn actions_changed(state: &State, announce: bool) {
    state.actions.send_modify(|n| *n = n.wrapping_add(1));
    if announce {
        super::admin::announce(state, StoreEvent::Actions).await;
    }
}

/// The actions one agent stream sent its agent.
#[derive(Default)]
pub(super) struct ActionPusher {
    sent: HashSet<String>,
}

impl ActionPusher {
    /// For a stream that starts now, with the news of approvals it follows.
    pub(super) fn start(state: &State) -> (tokio::sync::watch::Receiver<u64>, ActionPusher) {
        (state.actions.subscribe(), ActionPusher::default())
    }

    /// Sends the agent every action due to it not sent on this stream (an agent that got one
    /// before a reconnect gets it again, and answers from its journal without doing it twice);
    /// false when the stream is gone.
    pub(super) async fn push(
        &mut self,
        state: &State,
        agent_id: &str,
        tx: &super::agent::Down,
    ) -> Result<bool, Status> {
        let id = agent_id.to_string();
        let due = blocking(&state.store, move |s| s.due_actions(&id, now_ms())).await?;
        for row in due {
            if !self.sent.insert(row.id.clone()) {
                continue;
            }
            let mut a = seen(&row, now_ms());
            let msg = CollectorMessage {
                msg: Some(DownMsg::Action(ResponseAction {
                    id: a.id.clone(),
                    kind: a.kind.clone(),
                    pid: a.pid,
                    start_time: a.start_time,
                    path: a.path.clone(),
                    sha256: a.sha256.clone(),
                    undoes: a.undoes.clone(),
                    expires_at_ms: a.expires_at_ms,
                })),
            };
            if tx.send(Ok(msg)).await.is_err() {
                return Ok(false);
            }
            debug!(agent = %agent_id, action = %a.id, "response action sent");
            if row.state == "approved" {
                a.state = "sent".into();
                a.sent_at_ms = now_ms();
                let new = row_of(&a);
                blocking(&state.store, move |s| s.put_action(&new, Some("approved"))).await?;
                let act = Act::as_actor("collector".into(), "action.deliver")
                    .target(a.id.clone())
                    .org(a.org.clone());
                let act = Act {
                    detail: format!("sent to agent {agent_id}"),
                    ..act
                };
                audit::record(&state.store, act, &Ok::<(), Status>(())).await;
            }
        }
        Ok(true)
    }
}

/// Keeps an agent's outcome of an action sent to it (the first one: a repeat after a
/// reconnect changes nothing). An outcome for an action of another agent is ignored.
pub(super) async fn record_result(
    state: &State,
    agent_id: &str,
    r: ActionResult,
) -> Result<(), Status> {
    if r.id.len() > 64 || r.outcome.len() > 16 || r.detail.len() > MAX_STRING_BYTES {
        return Err(Status::invalid_argument(
            "a string of the action result is too long",
        ));
    }
    if !matches!(r.outcome.as_str(), "done" | "refused" | "failed") {
        return Err(Status::invalid_argument(format!(
            "`{}` is not an action outcome (done, refused, failed)",
            clip(&r.outcome)
        )));
    }
    let key = r.id.clone();
    let row = blocking(&state.store, move |s| s.action(&key)).await?;
    let Some(row) = row.filter(|row| row.agent_id == agent_id) else {
        warn!(agent = %agent_id, action = %clip(&r.id), "outcome of an action not sent to this agent: ignored");
        return Ok(());
    };
    if !matches!(row.state.as_str(), "approved" | "sent") {
        debug!(agent = %agent_id, action = %r.id, "outcome known already");
        return Ok(());
    }
    let mut a = seen(&row, now_ms());
    a.state = r.outcome.clone();
    a.finished_at_ms = now_ms();
    a.detail = r.detail.clone();
    let (new, from) = (row_of(&a), row.state.clone());
    if !blocking(&state.store, move |s| s.put_action(&new, Some(&from))).await? {
        return Ok(());
    }
    info!(agent = %agent_id, action = %a.id, kind = %a.kind, outcome = %r.outcome, detail = %vedette_ops::output::printable(&r.detail), "response action outcome");
    let act = Act::as_actor(format!("agent:{agent_id}"), "action.outcome")
        .target(a.id.clone())
        .org(a.org.clone());
    let act = Act {
        detail: describe(&a),
        ..act
    };
    let outcome: Result<(), Status> = match r.outcome.as_str() {
        "done" => Ok(()),
        "refused" => Err(Status::failed_precondition(r.detail)),
        _ => Err(Status::internal(r.detail)),
    };
    audit::record(&state.store, act, &outcome).await;
    if outcome.is_err() && !a.undoes.is_empty() {
        // An undo that did not happen leaves the action it undoes to be undone again.
        let key = a.undoes.clone();
        if let Some(row) = blocking(&state.store, move |s| s.action(&key)).await? {
            let mut undone = seen(&row, 0);
            if undone.undone_by == a.id {
                undone.undone_by.clear();
                let new = row_of(&undone);
                blocking(&state.store, move |s| s.put_action(&new, Some("done"))).await?;
            }
        }
    }
    Ok(())
}

/// What response actions did to the detections of a listing: `quarantined` on the file
/// detections of an agent whose file (by SHA-256) it quarantined and has not restored,
/// `killed` on the detection a kill was taken from.
pub(super) async fn mark_detections(
    state: &State,
    detections: &mut [StoredDetection],
) -> Result<(), Status> {
    if detections.is_empty() {
        return Ok(());
    }
    let rows = blocking(&state.store, |s| s.list_actions(None)).await?;
    let done: Vec<ActionInfo> = rows
        .iter()
        .filter(|r| r.state == "done")
        .map(|r| seen(r, 0))
        .collect();
    for d in detections.iter_mut() {
        let sha = match d.detection.as_ref().and_then(|x| x.target.as_ref()) {
            Some(Target::File(f)) => f.sha256.clone(),
            Some(Target::Process(p)) => p.exe_sha256.clone(),
            _ => String::new(),
        };
        for a in &done {
            let quarantined = a.kind == "quarantine"
                && a.undone_by.is_empty()
                && a.agent_id == d.agent_id
                && !sha.is_empty()
                && a.sha256 == sha;
            if quarantined {
                d.response = "quarantined".into();
            } else if a.kind == "kill" && a.detection_seq == d.seq {
                d.response = "killed".into();
            }
        }
    }
    Ok(())
}
