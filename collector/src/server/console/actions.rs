//! The console's Response page and `/api/v1/actions`: request a kill, a quarantine or an
//! isolation (from a detection or an agent page), approve, deny and undo, and follow each
//! action to its outcome. Through the admin service on the caller's behalf, as `vedettectl
//! actions`: the same roles, organisation scope and two-person rule.

use std::sync::Arc;

use axum::Form;
use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::json;
use vedette_ops::output::{action_json, printable, rfc3339_ms};
use vedette_proto::v1::admin_service_server::AdminService;
use vedette_proto::v1::{
    ActionInfo, DecideActionRequest, ListActionsRequest, RequestActionRequest, UndoActionRequest,
};

use super::api::ApiResult;
use super::auth::Who;
use super::pages::{error_page, layout, page};
use super::{Console, Failure};

/// A request, from a form or the API: what the admin service's `RequestAction` takes.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ActionBody {
    kind: String,
    agent_id: String,
    pid: u32,
    start_time: i64,
    path: String,
    sha256: String,
    detection_seq: u64,
    expires_secs: u64,
    reason: String,
}

/// A decision or an undo: its reason.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ReasonBody {
    reason: String,
}

impl From<ActionBody> for RequestActionRequest {
    fn from(b: ActionBody) -> Self {
        RequestActionRequest {
            kind: b.kind,
            agent_id: b.agent_id,
            pid: b.pid,
            start_time: b.start_time,
            path: b.path,
            sha256: b.sha256,
            detection_seq: b.detection_seq,
            expires_secs: b.expires_secs,
            reason: b.reason,
        }
    }
}

async fn request(console: &Console, who: &Who, body: ActionBody) -> Result<ActionInfo, Failure> {
    let req = RequestActionRequest::from(body);
    Ok(console
        .admin
        .request_action(Console::request(who, req))
        .await?
        .into_inner())
}

/// `approve`, `deny` or `undo` action `id`.
async fn decide(
    console: &Console,
    who: &Who,
    id: String,
    verb: &str,
    reason: String,
) -> Result<ActionInfo, Failure> {
    let r = match verb {
        "undo" => {
            console
                .admin
                .undo_action(Console::request(who, UndoActionRequest { id, reason }))
                .await
        }
        _ => {
            let approve = verb == "approve";
            let req = DecideActionRequest {
                id,
                approve,
                reason,
            };
            console
                .admin
                .decide_action(Console::request(who, req))
                .await
        }
    };
    Ok(r?.into_inner())
}

async fn list(console: &Console, who: &Who) -> Result<Vec<ActionInfo>, Failure> {
    Ok(console
        .admin
        .list_actions(Console::request(who, ListActionsRequest::default()))
        .await?
        .into_inner()
        .actions)
}

pub async fn api_actions(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
) -> ApiResult {
    let actions = list(&console, &who).await?;
    Ok(
        Json(json!({ "actions": actions.iter().map(action_json).collect::<Vec<_>>() }))
            .into_response(),
    )
}

pub async fn api_request(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Json(body): Json<ActionBody>,
) -> ApiResult {
    let a = request(&console, &who, body).await?;
    Ok(Json(json!({ "action": action_json(&a) })).into_response())
}

pub async fn api_decide(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path((id, verb)): Path<(String, String)>,
    body: Option<Json<ReasonBody>>,
) -> ApiResult {
    if !matches!(verb.as_str(), "approve" | "deny" | "undo") {
        return Err(Failure::new(StatusCode::NOT_FOUND, "no such page"));
    }
    let reason = body.map(|Json(b)| b.reason).unwrap_or_default();
    let a = decide(&console, &who, id, &verb, reason).await?;
    Ok(Json(json!({ "action": action_json(&a) })).into_response())
}

/// Requests an action from a form (a detection's or an agent's page), then shows the list.
pub async fn request_form(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Form(body): Form<ActionBody>,
) -> Response {
    match request(&console, &who, body).await {
        // No fragment: the page's own refresh must load it again, not scroll to the row.
        Ok(_) => Redirect::to("/actions").into_response(),
        Err(f) => error_page(f),
    }
}

/// Approves, denies or undoes from the list's buttons.
pub async fn decide_form(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path((id, verb)): Path<(String, String)>,
    Form(body): Form<ReasonBody>,
) -> Response {
    if !matches!(verb.as_str(), "approve" | "deny" | "undo") {
        return error_page(Failure::new(StatusCode::NOT_FOUND, "no such page"));
    }
    match decide(&console, &who, id, &verb, body.reason).await {
        // No fragment: the page's own refresh must load it again, not scroll to the row.
        Ok(_) => Redirect::to("/actions").into_response(),
        Err(f) => error_page(f),
    }
}

/// A form posting one of an action's buttons.
fn button(who: &Who, a: &ActionInfo, verb: &str, label: &str) -> Markup {
    html! {
        form.inline method="post" action={ "/actions/" (a.id) "/" (verb) } {
            input type="hidden" name="csrf" value=(who.csrf);
            button class=(verb) type="submit" { (label) }
        }
    }
}

fn target(a: &ActionInfo) -> Markup {
    match a.kind.as_str() {
        "kill" => html! { "pid " (a.pid) ", started " (a.start_time) },
        "quarantine" | "restore" => html! { code { (printable(&a.path)) } },
        _ => html! {},
    }
}

/// The form a detection or an agent page shows to request `kind`: `hidden` names the target.
pub fn request_markup(who: &Who, kind: &str, label: &str, hidden: &[(&str, String)]) -> Markup {
    html! {
        form.request-action id={ "request-" (kind) } method="post" action="/actions" {
            input type="hidden" name="csrf" value=(who.csrf);
            input type="hidden" name="kind" value=(kind);
            @for (name, value) in hidden { input type="hidden" name=(name) value=(value); }
            input.reason type="text" name="reason" placeholder="reason (kept in the audit log)" required;
            @if kind == "isolate" {
                select name="expires_secs" {
                    @for h in [1u64, 4, 24, 72] { option value=(h * 3600) selected[h == 24] { "for " (h) " h" } }
                }
            }
            button.danger type="submit" { (label) }
        }
    }
}

pub async fn actions(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
) -> Response {
    let actions = match list(&console, &who).await {
        Ok(a) => a,
        Err(f) => return error_page(f),
    };
    // Not while actions wait for a person: a reload under a click would lose it.
    let awaited = actions
        .iter()
        .any(|a| matches!(a.state.as_str(), "approved" | "sent"));
    let body = html! {
        @if awaited {
            // Reloads itself while actions wait for their agent's outcome.
            meta http-equiv="refresh" content="3";
        }
        p { "Kill, quarantine and isolate on one host, as far as that host's own " code { "response" } " setting allows. Where an organisation requires two-person approval, a second operator approves here." }
        table #actions {
            thead { tr { th { "Action" } th { "Kind" } th { "Host" } th { "Target" } th { "State" } th { "Requested by" } th { "Reason" } th { "Outcome" } th {} } }
            tbody { @for a in &actions {
                tr.action id=(a.id) data-state=(a.state) {
                    td { code { (a.id) } }
                    td.kind { (a.kind) @if !a.undoes.is_empty() { " (undoes " code { (a.undoes) } ")" } }
                    td { (printable(&a.hostname)) }
                    td { (target(a)) }
                    td.state { (a.state) @if !a.decided_by.is_empty() { br; small { "by " (printable(&a.decided_by)) } } }
                    td { code { (printable(&a.requested_by)) } br; small { (rfc3339_ms(a.requested_at_ms)) } }
                    td { (printable(&a.reason)) }
                    td.detail { (printable(&a.detail)) }
                    td {
                        @if a.state == "pending" {
                            (button(&who, a, "approve", "Approve")) (button(&who, a, "deny", "Deny"))
                        }
                        @if a.state == "done" && a.undone_by.is_empty() && matches!(a.kind.as_str(), "quarantine" | "isolate") {
                            (button(&who, a, "undo", if a.kind == "isolate" { "Release" } else { "Restore" }))
                        }
                    }
                }
            } }
        }
        @if actions.is_empty() { p { "No response actions yet: request one from a detection or an agent page." } }
    };
    page(
        StatusCode::OK,
        layout(Some(&who), "Response", "/actions", body),
    )
}
