//! The console's Hunt pages and `/api/v1/hunts`: start a hunt (digests pasted one per line),
//! list hunts, and one hunt's answers per agent, the page reloading itself while answers are
//! still due. Through the admin service on the caller's behalf, as `vedettectl hunt`.

use std::sync::Arc;

use axum::Form;
use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::json;
use vedette_ops::output::{hunt_detail_json, hunt_json, presence_name, printable, rfc3339_ms};
use vedette_proto::v1::admin_service_server::AdminService;
use vedette_proto::v1::{
    GetHuntRequest, GetHuntResponse, HuntInfo, ListHuntsRequest, StartHuntRequest,
};

use super::api::ApiResult;
use super::auth::Who;
use super::pages::{error_page, layout, page};
use super::{Console, Failure};

/// The start form: digests one per line, an organisation, how long it waits.
#[derive(Debug, Deserialize)]
pub struct HuntForm {
    digests: String,
    #[serde(default)]
    org: String,
    #[serde(default)]
    expires_hours: String,
}

/// The start request of the API.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct HuntBody {
    sha256: Vec<String>,
    md5: Vec<String>,
    sha1: Vec<String>,
    org: String,
    expires_secs: u64,
}

async fn start(console: &Console, who: &Who, req: StartHuntRequest) -> Result<HuntInfo, Failure> {
    Ok(console
        .admin
        .start_hunt(Console::request(who, req))
        .await?
        .into_inner()
        .hunt
        .unwrap_or_default())
}

async fn list(console: &Console, who: &Who) -> Result<Vec<HuntInfo>, Failure> {
    Ok(console
        .admin
        .list_hunts(Console::request(who, ListHuntsRequest {}))
        .await?
        .into_inner()
        .hunts)
}

async fn one(console: &Console, who: &Who, id: String) -> Result<GetHuntResponse, Failure> {
    Ok(console
        .admin
        .get_hunt(Console::request(who, GetHuntRequest { id }))
        .await?
        .into_inner())
}

pub async fn api_hunts(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
) -> ApiResult {
    let hunts = list(&console, &who).await?;
    Ok(Json(json!({ "hunts": hunts.iter().map(hunt_json).collect::<Vec<_>>() })).into_response())
}

pub async fn api_hunt(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path(id): Path<String>,
) -> ApiResult {
    let r = one(&console, &who, id).await?;
    Ok(Json(hunt_detail_json(&r)).into_response())
}

pub async fn api_start(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Json(body): Json<HuntBody>,
) -> ApiResult {
    let req = StartHuntRequest {
        sha256: body.sha256,
        md5: body.md5,
        sha1: body.sha1,
        org: body.org,
        expires_secs: body.expires_secs,
    };
    let h = start(&console, &who, req).await?;
    Ok(Json(json!({ "hunt": hunt_json(&h) })).into_response())
}

/// Starts a hunt from the form, then shows it.
pub async fn start_form(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Form(form): Form<HuntForm>,
) -> Response {
    let list = match vedette_ops::cli::digest_list(&form.digests) {
        Ok(l) => l,
        Err((line, why)) => {
            return error_page(Failure::bad_request(format!("digests, line {line}: {why}")));
        }
    };
    let hours: u64 = match form.expires_hours.trim() {
        "" => 24,
        h => match h.parse() {
            Ok(h) => h,
            Err(_) => {
                return error_page(Failure::bad_request(format!(
                    "`expires_hours`: `{h}` is not a number of hours"
                )));
            }
        },
    };
    let req = StartHuntRequest {
        sha256: list.sha256,
        md5: list.md5,
        sha1: list.sha1,
        org: form.org,
        expires_secs: hours * 3600,
    };
    match start(&console, &who, req).await {
        Ok(h) => Redirect::to(&format!("/hunts/{}", h.id)).into_response(),
        Err(f) => error_page(f),
    }
}

fn digests(h: &HuntInfo) -> usize {
    h.sha256.len() + h.md5.len() + h.sha1.len()
}

fn start_form_markup(who: &Who) -> Markup {
    html! {
        form #start-hunt method="post" action="/hunts" {
            input type="hidden" name="csrf" value=(who.csrf);
            label { "Digests (MD5, SHA-1 or SHA-256, one per line) "
                textarea #digests name="digests" rows="4" cols="70" required {} }
            label { "Organisation " input #org type="text" name="org" placeholder="all in scope"; }
            label { "Answered for " select name="expires_hours" {
                @for h in [1, 6, 24, 48, 168] { option value=(h) selected[h == 24] { (h) " h" } }
            } }
            button #hunt type="submit" { "Start hunt" }
        }
    }
}

pub async fn hunts(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
) -> Response {
    let hunts = match list(&console, &who).await {
        Ok(h) => h,
        Err(f) => return error_page(f),
    };
    let body = html! {
        p { "Ask every agent in scope whether it read or ran a file with these digests, from its history: no disk is read again, and nothing but the hits leaves a host." }
        (start_form_markup(&who))
        table #hunts {
            thead { tr { th { "Hunt" } th { "Started" } th { "By" } th { "Organisation" } th.num { "Digests" } th.num { "Answered" } th { "Expires" } } }
            tbody { @for h in &hunts {
                tr.hunt {
                    td { a href={ "/hunts/" (h.id) } { (h.id) } }
                    td { time { (rfc3339_ms(h.created_at_ms)) } }
                    td { code { (printable(&h.created_by)) } }
                    td { (if h.org.is_empty() { "(all)" } else { &h.org }) }
                    td.num { (digests(h)) }
                    td.num { (h.answered) "/" (h.asked) }
                    td { time { (rfc3339_ms(h.expires_at_ms)) } }
                }
            } }
        }
        @if hunts.is_empty() { p { "No hunts yet." } }
    };
    page(StatusCode::OK, layout(Some(&who), "Hunts", "/hunts", body))
}

pub async fn hunt(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path(id): Path<String>,
) -> Response {
    let r = match one(&console, &who, id).await {
        Ok(r) => r,
        Err(f) => return error_page(f),
    };
    let h = r.hunt.clone().unwrap_or_default();
    let expired = h.expires_at_ms <= vedette_proto::now_ms();
    let waiting = !expired && h.answered < h.asked;
    let body = html! {
        @if waiting {
            // Reloads itself while answers are still due.
            meta http-equiv="refresh" content="3";
        }
        p #summary { (h.answered) " of " (h.asked) " agent(s) answered, " (h.hits) " hit(s); "
            (if expired { "expired " } else { "answered until " }) (rfc3339_ms(h.expires_at_ms)) }
        table #answers {
            thead { tr { th { "Host" } th { "Organisation" } th { "Answer" } th { "Kind" } th { "Path" } th { "SHA-256" } th { "First seen" } th { "Last seen" } th { "Now" } th { "Runs, user" } } }
            tbody { @for a in &r.agents {
                @let answer = a.answer.clone().unwrap_or_default();
                @let state = if a.answered_at_ms > 0 {
                    if answer.error.is_empty() { format!("{} hit(s)", answer.hits_total) } else { answer.error.clone() }
                } else if expired { "never answered".to_string() } else { "pending".to_string() };
                @if answer.hits.is_empty() {
                    tr.agent data-id=(a.agent_id) { td { (printable(&a.hostname)) } td { (printable(&a.org)) } td.state { (printable(&state)) } td {} td {} td {} td {} td {} td {} td {} }
                }
                @for hit in &answer.hits {
                    tr.hit data-id=(a.agent_id) {
                        td { (printable(&a.hostname)) } td { (printable(&a.org)) } td.state { (printable(&state)) }
                        td { (hit.kind) } td { code { (printable(&hit.path)) } } td { code title=(hit.sha256) { (hit.sha256.get(..16).unwrap_or(&hit.sha256)) "…" } }
                        td { (rfc3339_ms(hit.first_seen_ms)) } td { (rfc3339_ms(hit.last_seen_ms)) }
                        td.presence { (presence_name(hit.presence)) }
                        td { @if hit.kind == "exec" { (hit.runs) ", " (printable(&hit.user)) } }
                    }
                }
            } }
        }
    };
    let title = format!("Hunt {}", h.id);
    page(StatusCode::OK, layout(Some(&who), &title, "/hunts", body))
}
