//! The console's Alerts pages (where it opens) and `/api/v1/alerts`: alerts newest activity
//! first, one alert with its newest detections and verdict history, and the verdict form
//! (CSRF-checked like every form), through the admin service on the caller's behalf.

use std::sync::Arc;

use axum::Form;
use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::json;
use vedette_ops::output::{alert_json, printable, rfc3339_ms, stored_json, verdict_json};
use vedette_proto::kind_name;
use vedette_proto::v1::admin_service_server::AdminService;
use vedette_proto::v1::{
    Alert, GetAlertRequest, GetAlertResponse, ListAlertsRequest, ListAlertsResponse,
    SetAlertStatusRequest,
};

use super::api::{ApiResult, DEFAULT_PAGE, MAX_PAGE};
use super::auth::Who;
use super::pages::{detection_row, layout, page, query};
use super::{Console, Failure};

/// Filters of an alert listing (query string of the API and of the page).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct AlertQuery {
    /// open, acknowledged, true-positive, false-positive, benign.
    pub status: String,
    pub org: String,
    pub limit: Option<u32>,
    /// Only alerts whose newest detection is older than this sequence number (the next page).
    pub before: Option<u64>,
}

/// How many of its newest detections to show with an alert.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AlertDetail {
    pub detections: Option<u32>,
}

/// The verdict form.
#[derive(Debug, Deserialize)]
pub struct VerdictForm {
    status: String,
    #[serde(default)]
    note: String,
    /// A checkbox: present when ticked.
    #[serde(default)]
    except: Option<String>,
    /// The exception's lifetime in days (empty: it does not expire).
    #[serde(default)]
    expires_days: String,
}

async fn list(console: &Console, who: &Who, q: &AlertQuery) -> Result<ListAlertsResponse, Failure> {
    Ok(console
        .admin
        .list_alerts(Console::request(
            who,
            ListAlertsRequest {
                status: q.status.trim().to_string(),
                org: q.org.trim().to_string(),
                limit: q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE),
                before_seq: q.before.unwrap_or(0),
            },
        ))
        .await?
        .into_inner())
}

async fn one(console: &Console, who: &Who, id: u64, n: u32) -> Result<GetAlertResponse, Failure> {
    Ok(console
        .admin
        .get_alert(Console::request(who, GetAlertRequest { id, detections: n }))
        .await?
        .into_inner())
}

pub async fn api_alerts(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Query(q): Query<AlertQuery>,
) -> ApiResult {
    let r = list(&console, &who, &q).await?;
    let next = (r.next_before_seq != 0).then_some(r.next_before_seq);
    Ok(Json(json!({
        "alerts": r.alerts.iter().map(alert_json).collect::<Vec<_>>(),
        "next_before": next,
    }))
    .into_response())
}

pub async fn api_alert(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path(id): Path<u64>,
    Query(q): Query<AlertDetail>,
) -> ApiResult {
    let r = one(&console, &who, id, q.detections.unwrap_or(20)).await?;
    Ok(Json(json!({
        "alert": alert_json(&r.alert.unwrap_or_default()),
        "verdicts": r.verdicts.iter().map(verdict_json).collect::<Vec<_>>(),
        "detections": r.detections.iter().map(stored_json).collect::<Vec<_>>(),
    }))
    .into_response())
}

fn status_cell(a: &Alert) -> Markup {
    html! {
        span class={ "status " (a.status) } { (a.status) }
        @if a.new_activity { " " span.new { "new activity" } }
    }
}

const STATUSES: &[&str] = &[
    "open",
    "acknowledged",
    "true-positive",
    "false-positive",
    "benign",
];

pub async fn alerts(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Query(q): Query<AlertQuery>,
) -> Response {
    let r = match list(&console, &who, &q).await {
        Ok(r) => r,
        Err(f) => return super::pages::error_page(f),
    };
    let body = html! {
        form.filters method="get" action="/alerts" {
            label { "Status " select name="status" {
                option value="" { "any" }
                @for s in STATUSES { option value=(s) selected[q.status == *s] { (s) } }
            } }
            button type="submit" { "Filter" }
        }
        p { "Detections grouped by organisation, rule and what was seen, newest activity first. Open one for its detections and to judge it." }
        table #alerts {
            thead { tr { th { "Alert" } th { "Status" } th { "Organisation" } th.num { "Hosts" } th.num { "Detections" } th { "Last seen" } th { "Rule" } th { "Subject" } } }
            tbody { @for a in &r.alerts {
                tr.alert data-id=(a.id) {
                    td { a href={ "/alerts/" (a.id) } { "#" (a.id) } }
                    td { (status_cell(a)) }
                    td { (printable(&a.org)) }
                    td.num.hosts { (a.hosts) }
                    td.num { (a.detections) }
                    td { time { (rfc3339_ms(a.last_seen_ms)) } }
                    td { a.rule href={ "/alerts/" (a.id) } { (printable(&a.rule)) } }
                    td.target { code { (printable(&a.subject)) } }
                }
            } }
        }
        @if r.alerts.is_empty() { p { "No alerts match." } }
        @if r.next_before_seq != 0 {
            p { a href={ "/alerts?" (query(&[("status", q.status.clone()), ("org", q.org.clone()), ("before", r.next_before_seq.to_string())])) } { "Older alerts" } }
        }
    };
    page(
        StatusCode::OK,
        layout(Some(&who), "Alerts", "/alerts", body),
    )
}

pub async fn alert(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path(id): Path<u64>,
) -> Response {
    let r = match one(&console, &who, id, 50).await {
        Ok(r) => r,
        Err(f) => return super::pages::error_page(f),
    };
    let a = r.alert.clone().unwrap_or_default();
    let body = html! {
        p { (status_cell(&a)) " · " (printable(&a.org)) " · " (kind_name(a.kind)) " · score " (a.score) }
        dl.summary {
            dt { "Rule" } dd { code { (printable(&a.rule)) } }
            dt { "Subject" } dd { code { (printable(&a.subject)) } }
            dt { "Hosts" } dd #hosts { (a.hosts) }
            dt { "Detections" } dd { (a.detections) }
            dt { "First seen" } dd { (rfc3339_ms(a.first_seen_ms)) }
            dt { "Last seen" } dd { (rfc3339_ms(a.last_seen_ms)) }
        }
        (verdict_form(&who, &a))
        h2 { "History" }
        table #verdicts {
            thead { tr { th { "At" } th { "Who" } th { "Verdict" } th { "Note" } th { "Exception" } } }
            tbody { @for v in &r.verdicts {
                tr { td { (rfc3339_ms(v.at_ms)) } td { code { (printable(&v.actor)) } }
                     td.verdict { (v.status) } td { (printable(&v.note)) } td { code { (v.exception_id) } } }
            } }
        }
        @if r.verdicts.is_empty() { p { "No verdict yet." } }
        h2 { "Newest detections" }
        table #detections {
            thead { tr { th { "Received" } th { "Host" } th { "Kind" } th { "Rule" } th { "Target" } th.num { "Score" } th { "Action" } } }
            tbody { @for s in &r.detections { (detection_row(s)) } }
        }
    };
    let title = format!("Alert #{}", a.id);
    page(StatusCode::OK, layout(Some(&who), &title, "/alerts", body))
}

fn verdict_form(who: &Who, a: &Alert) -> Markup {
    html! {
        form #verdict method="post" action={ "/alerts/" (a.id) "/verdict" } {
            input type="hidden" name="csrf" value=(who.csrf);
            label { "Verdict " select #status name="status" {
                @for s in STATUSES { option value=(s) selected[a.status == *s] { (s) } }
            } }
            label { "Note " input #note type="text" name="note" maxlength="4096"; }
            label { input #except type="checkbox" name="except" value="1"; " and add an exception for this rule and " (if a.subject.starts_with("sha256:") { "hash" } else { "path" }) " in " (printable(&a.org)) " (false-positive or benign)" }
            label { "for " select name="expires_days" {
                option value="" { "ever" }
                @for d in [7, 30, 90] { option value=(d) { (d) " days" } }
            } }
            button #judge type="submit" { "Save verdict" }
        }
    }
}

pub async fn judge(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path(id): Path<u64>,
    Form(form): Form<VerdictForm>,
) -> Response {
    let days: u64 = match form.expires_days.trim() {
        "" => 0,
        d => match d.parse() {
            Ok(d) => d,
            Err(_) => {
                return super::pages::error_page(Failure::bad_request(format!(
                    "`expires_days`: `{d}` is not a number of days"
                )));
            }
        },
    };
    let request = SetAlertStatusRequest {
        id,
        status: form.status,
        note: form.note,
        except: form.except.is_some(),
        except_ttl_seconds: days * 86_400,
    };
    match console
        .admin
        .set_alert_status(Console::request(&who, request))
        .await
    {
        Ok(_) => Redirect::to(&format!("/alerts/{id}")).into_response(),
        Err(status) => super::pages::error_page(status.into()),
    }
}
