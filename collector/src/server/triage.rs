//! Triage: alerts, the verdicts operators give them, and exceptions. The same roles and
//! organisation scope as every other admin call: a scoped operator lists, reads, judges and
//! excepts its own organisation's alerts only, and is told the same whether another
//! organisation's alert exists or not.

use rand::RngCore;
use tonic::Status;
use tracing::info;
use vedette_engine::exceptions::{self, Exception};
use vedette_proto::v1::{
    AddExceptionRequest, Alert, ExceptionInfo, GetAlertRequest, GetAlertResponse,
    ListAlertsRequest, ListAlertsResponse, ListExceptionsRequest, SetAlertStatusRequest,
    SetAlertStatusResponse, Verdict,
};

use super::admin::{AdminSvc, listing_scope, visible};
use super::audit::Act;
use super::blocking;
use crate::peer::Peer;
use crate::store::{
    ALERT_STATUSES, AlertFilter, AlertRow, CLOSED_STATUSES, DetectionFilter, ExceptionRow,
    VerdictRow, now_ms,
};

/// Default and largest page of alerts.
const DEFAULT_ALERTS: u32 = 100;
const MAX_ALERTS: u32 = 1_000;
/// Default and largest number of an alert's detections shown with it.
const DEFAULT_ALERT_DETECTIONS: u32 = 20;
const MAX_ALERT_DETECTIONS: u32 = 1_000;
/// Longest verdict note.
const MAX_NOTE: usize = 4096;
/// Longest exception lifetime: exceptions are for judged noise, not forever by accident.
const MAX_EXCEPTION_TTL_SECS: u64 = 3 * 365 * 24 * 3600;

pub(super) fn alert_info(a: AlertRow) -> Alert {
    Alert {
        id: a.id,
        org: a.org,
        rule: a.rule,
        subject: a.subject,
        kind: a.kind,
        score: a.score,
        first_seen_ms: a.first_seen_ms,
        last_seen_ms: a.last_seen_ms,
        detections: a.detections,
        hosts: a.hosts,
        status: a.status,
        new_activity: a.new_activity,
        last_seq: a.last_seq,
        updated_at_ms: a.updated_at_ms,
    }
}

fn verdict_info(v: VerdictRow) -> Verdict {
    Verdict {
        seq: v.seq,
        alert_id: v.alert_id,
        at_ms: v.at_ms,
        actor: v.actor,
        status: v.status,
        note: v.note,
        exception_id: v.exception_id,
    }
}

pub(super) fn exception_info(e: ExceptionRow) -> ExceptionInfo {
    ExceptionInfo {
        id: e.ex.id,
        rule: e.ex.rule,
        indicator: e.ex.indicator,
        sha256: e.ex.sha256,
        path: e.ex.path,
        org: e.ex.org,
        agent: e.ex.agent,
        expires_at_ms: e.ex.expires_at_ms,
        reason: e.ex.reason,
        created_at_ms: e.created_at_ms,
        created_by: e.created_by,
        removed_at_ms: e.removed_at_ms,
        removed_by: e.removed_by,
    }
}

fn check_status(status: &str) -> Result<(), Status> {
    if ALERT_STATUSES.contains(&status) {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "`{}` is not an alert status: one of {}",
        status.chars().take(40).collect::<String>(),
        ALERT_STATUSES.join(", ")
    )))
}

/// When something given a lifetime of `ttl_seconds` expires (0: never).
fn expiry(ttl_seconds: u64) -> Result<i64, Status> {
    if ttl_seconds > MAX_EXCEPTION_TTL_SECS {
        return Err(Status::invalid_argument(format!(
            "an exception lasts at most {} days",
            MAX_EXCEPTION_TTL_SECS / 86_400
        )));
    }
    Ok(match ttl_seconds {
        0 => 0,
        s => now_ms() + (s as i64) * 1000,
    })
}

fn new_exception_id() -> String {
    let mut b = [0u8; 6];
    rand::rng().fill_bytes(&mut b);
    format!("ex-{}", hex::encode(b))
}

impl AdminSvc {
    pub(super) async fn list_alerts_as(
        &self,
        who: &Peer,
        req: ListAlertsRequest,
    ) -> Result<ListAlertsResponse, Status> {
        let status = Some(req.status.trim().to_string()).filter(|s| !s.is_empty());
        if let Some(s) = &status {
            check_status(s)?;
        }
        let limit = match req.limit {
            0 => DEFAULT_ALERTS,
            l => l.min(MAX_ALERTS),
        };
        let filter = AlertFilter {
            status,
            org: listing_scope(who, &req.org)?,
            before_seq: Some(req.before_seq).filter(|s| *s != 0),
            limit: limit + 1,
        };
        let mut rows = blocking(&self.state.store, move |s| s.list_alerts(&filter)).await?;
        let next_before_seq = match rows.len() > limit as usize {
            true => {
                rows.truncate(limit as usize);
                rows.last().map_or(0, |a| a.last_seq)
            }
            false => 0,
        };
        Ok(ListAlertsResponse {
            alerts: rows.into_iter().map(alert_info).collect(),
            next_before_seq,
        })
    }

    /// Alert `id` if the caller may see it. Another organisation's alert is refused to a
    /// scoped caller exactly as one that does not exist.
    async fn visible_alert(&self, who: &Peer, id: u64) -> Result<AlertRow, Status> {
        let row = blocking(&self.state.store, move |s| s.alert(id)).await?;
        match (row, who.scope()) {
            (Some(r), _) if visible(who, &r.org) => Ok(r),
            (_, Some(own)) => Err(Status::permission_denied(format!(
                "no alert {id} in organisation `{own}`"
            ))),
            (_, None) => Err(Status::not_found(format!("no alert {id}"))),
        }
    }

    pub(super) async fn get_alert_as(
        &self,
        who: &Peer,
        req: GetAlertRequest,
    ) -> Result<GetAlertResponse, Status> {
        let alert = self.visible_alert(who, req.id).await?;
        let filter = DetectionFilter {
            alert_id: Some(alert.id),
            limit: match req.detections {
                0 => DEFAULT_ALERT_DETECTIONS,
                n => n.min(MAX_ALERT_DETECTIONS),
            },
            max_bytes: 4 * 1024 * 1024,
            ..Default::default()
        };
        let id = alert.id;
        let (page, verdicts) = blocking(&self.state.store, move |s| {
            Ok((s.list_detections(&filter)?, s.alert_verdicts(id)?))
        })
        .await?;
        let mut detections = page.detections;
        detections.reverse();
        Ok(GetAlertResponse {
            alert: Some(alert_info(alert)),
            detections,
            verdicts: verdicts.into_iter().map(verdict_info).collect(),
        })
    }

    pub(super) async fn set_alert_status_as(
        &self,
        who: &Peer,
        req: SetAlertStatusRequest,
        act: &mut Act,
    ) -> Result<SetAlertStatusResponse, Status> {
        let status = req.status.trim().to_string();
        check_status(&status)?;
        if req.note.len() > MAX_NOTE {
            return Err(Status::invalid_argument(format!(
                "the note is longer than {MAX_NOTE} bytes"
            )));
        }
        act.target = format!("alert {}", req.id);
        let alert = self.visible_alert(who, req.id).await?;
        act.org = alert.org.clone();
        act.detail = status.clone();
        let exception = match req.except {
            true => Some(self.except_alert(&alert, &status, &req, act).await?),
            false => None,
        };
        let verdict = VerdictRow {
            alert_id: alert.id,
            at_ms: now_ms(),
            actor: act.actor.clone(),
            status: status.clone(),
            note: req.note.trim().to_string(),
            exception_id: exception
                .as_ref()
                .map(|e| e.ex.id.clone())
                .unwrap_or_default(),
            ..Default::default()
        };
        let judged = blocking(&self.state.store, move |s| s.judge_alert(&verdict)).await?;
        let Some(judged) = judged else {
            return Err(Status::not_found(format!("no alert {}", req.id)));
        };
        info!(by = %who, alert = judged.id, status = %status, "alert judged");
        Ok(SetAlertStatusResponse {
            alert: Some(alert_info(judged)),
            exception: exception.map(exception_info),
        })
    }

    /// The exception a false-positive or benign verdict makes: the alert's rule, its hash (or
    /// its exact path) and its organisation.
    async fn except_alert(
        &self,
        alert: &AlertRow,
        status: &str,
        req: &SetAlertStatusRequest,
        act: &mut Act,
    ) -> Result<ExceptionRow, Status> {
        if !CLOSED_STATUSES.contains(&status) {
            return Err(Status::invalid_argument(format!(
                "an exception goes with a false-positive or benign verdict, not `{status}`"
            )));
        }
        let (sha256, path) = match alert.subject.split_once(':') {
            Some(("sha256", h)) => (h.to_string(), String::new()),
            Some(("path", p)) => (String::new(), exceptions::literal_glob(p)),
            _ => {
                return Err(Status::failed_precondition(format!(
                    "alert {} is about `{}`, which an exception cannot name (a hash or a path); \
                     add one with `vedettectl exceptions add --rule` instead",
                    alert.id, alert.subject
                )));
            }
        };
        let note = req.note.trim();
        let ex = Exception {
            id: new_exception_id(),
            rule: alert.rule.clone(),
            sha256,
            path,
            org: alert.org.clone(),
            expires_at_ms: expiry(req.except_ttl_seconds)?,
            reason: match note.is_empty() {
                true => format!("{status} verdict on alert {}", alert.id),
                false => note.to_string(),
            },
            ..Default::default()
        };
        let row = self.store_exception(ex, act).await?;
        act.detail = format!("{status}, exception {}", row.ex.id);
        Ok(row)
    }

    /// Checks and stores an exception made by the caller behind `act`.
    async fn store_exception(&self, ex: Exception, act: &Act) -> Result<ExceptionRow, Status> {
        let ex = ex
            .checked()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let row = ExceptionRow {
            ex,
            created_at_ms: now_ms(),
            created_by: act.actor.clone(),
            ..Default::default()
        };
        let stored = row.clone();
        blocking(&self.state.store, move |s| {
            let now = now_ms();
            let active = s
                .list_exceptions()?
                .iter()
                .filter(|e| e.active(now))
                .count();
            if active >= exceptions::MAX_EXCEPTIONS {
                return Ok(false);
            }
            s.add_exception(&stored)?;
            Ok(true)
        })
        .await?
        .then_some(row)
        .ok_or_else(|| {
            Status::resource_exhausted(format!(
                "{} exceptions are in force, the most there may be: remove some first",
                exceptions::MAX_EXCEPTIONS
            ))
        })
    }

    pub(super) async fn add_exception_as(
        &self,
        who: &Peer,
        req: AddExceptionRequest,
        act: &mut Act,
    ) -> Result<ExceptionInfo, Status> {
        let org = match who.scope() {
            Some(_) => listing_scope(who, &req.org)?.unwrap_or_default(),
            None => req.org.trim().to_string(),
        };
        if !org.is_empty() {
            let name = org.clone();
            let orgs = blocking(&self.state.store, |s| s.list_orgs()).await?;
            if !orgs.iter().any(|o| o.name == name) {
                return Err(Status::not_found(format!("no organisation `{org}`")));
            }
        }
        let agent = req.agent.trim().to_string();
        if !agent.is_empty() {
            let id = agent.clone();
            let row = blocking(&self.state.store, move |s| s.agent(&id)).await?;
            match row {
                Some(r) if visible(who, &r.org) && (org.is_empty() || r.org == org) => {}
                _ => return Err(Status::not_found(format!("no agent `{agent}`"))),
            }
        }
        act.org = org.clone();
        let ex = Exception {
            id: new_exception_id(),
            rule: req.rule,
            indicator: req.indicator,
            sha256: req.sha256,
            path: req.path,
            org,
            agent,
            expires_at_ms: expiry(req.ttl_seconds)?,
            reason: req.reason,
        };
        act.target = ex.id.clone();
        let row = self.store_exception(ex, act).await?;
        act.detail = describe(&row.ex);
        info!(by = %who, exception = %row.ex.id, "exception added");
        Ok(exception_info(row))
    }

    pub(super) async fn list_exceptions_as(
        &self,
        who: &Peer,
        req: ListExceptionsRequest,
    ) -> Result<Vec<ExceptionInfo>, Status> {
        let rows = blocking(&self.state.store, |s| s.list_exceptions()).await?;
        let now = now_ms();
        Ok(rows
            .into_iter()
            .filter(|e| e.ex.org.is_empty() || visible(who, &e.ex.org))
            .filter(|e| req.all || e.active(now))
            .map(exception_info)
            .collect())
    }

    pub(super) async fn remove_exception_as(
        &self,
        who: &Peer,
        id: String,
        act: &mut Act,
    ) -> Result<ExceptionInfo, Status> {
        act.target = id.clone();
        let rows = blocking(&self.state.store, |s| s.list_exceptions()).await?;
        let row = rows.into_iter().find(|e| e.ex.id == id);
        let row = match (row, who.scope()) {
            (Some(r), Some(own)) if r.ex.org == own => r,
            (_, Some(own)) => {
                return Err(Status::permission_denied(format!(
                    "no exception `{id}` of organisation `{own}`"
                )));
            }
            (Some(r), None) => r,
            (None, None) => return Err(Status::not_found(format!("no exception `{id}`"))),
        };
        act.org = row.ex.org.clone();
        if row.removed_at_ms != 0 {
            return Err(Status::failed_precondition(format!(
                "exception `{id}` was removed already"
            )));
        }
        let by = act.actor.clone();
        let removed = blocking(&self.state.store, move |s| {
            s.remove_exception(&id, &by, now_ms())
        })
        .await?
        .unwrap_or(row);
        info!(by = %who, exception = %removed.ex.id, "exception removed");
        Ok(exception_info(removed))
    }
}

/// What an exception covers, for the audit log.
fn describe(e: &Exception) -> String {
    let mut parts = Vec::new();
    for (k, v) in [
        ("rule", &e.rule),
        ("indicator", &e.indicator),
        ("sha256", &e.sha256),
        ("path", &e.path),
        ("agent", &e.agent),
    ] {
        if !v.is_empty() {
            parts.push(format!("{k}={v}"));
        }
    }
    parts.join(" ")
}
