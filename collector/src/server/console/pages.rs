//! The console's HTML pages, rendered on the server (maud escapes everything interpolated).
//! The only script is `/static/console.js`: live detections and confirmations.

use super::super::audit::{self, Act};
use std::sync::Arc;
use std::time::Duration;

use axum::Form;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{AppendHeaders, IntoResponse, Redirect, Response};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;
use serde_json::Value;
use tracing::{info, warn};
use vedette_ops::output::{self, printable, rfc3339_ms, stored_json, target_text};
use vedette_proto::v1::admin_service_server::AdminService;
use vedette_proto::v1::{
    BundleInfo, BundleRolloutRequest, GetBundleRequest, SlowRulesRequest, StoredDetection,
    VersionRuleCosts,
};
use vedette_proto::{action_name, kind_name};

use super::api::{self, DetectionQuery, StatsQuery};
use super::auth::{self, Who};
use super::{Console, Failure};

/// Largest bundle file the diff compares line by line.
const MAX_DIFF_FILE: usize = 2 * 1024 * 1024;

const KINDS: &[&str] = &[
    "yara",
    "hash",
    "filename",
    "process",
    "connection",
    "agent",
    "dns",
];

impl Failure {
    fn page(self) -> Response {
        error_page(self)
    }
}

pub(super) fn layout(who: Option<&Who>, title: &str, active: &str, body: Markup) -> Markup {
    let nav = [
        ("/alerts", "Alerts"),
        ("/detections", "Detections"),
        ("/chart", "Over time"),
        ("/agents", "Agents"),
        ("/rules", "Rules"),
        ("/intel", "Intel"),
        ("/hunts", "Hunts"),
        ("/actions", "Response"),
        ("/audit", "Audit"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(who) = who {
                    meta name="csrf-token" content=(who.csrf);
                }
                title { (title) " · Vedette" }
                link rel="stylesheet" href="/static/console.css";
                script type="module" src="/static/console.js" {}
            }
            body {
                header {
                    a.brand href="/" { "Vedette" }
                    @if let Some(who) = who {
                        nav {
                            @for (href, name) in nav {
                                @if href != "/intel" || who.collector_wide() {
                                    a href=(href) class=[(active == href).then_some("active")] { (name) }
                                }
                            }
                        }
                        div.who {
                            span #who { (who.peer) }
                            @if who.account {
                                form method="post" action="/logout" {
                                    input type="hidden" name="csrf" value=(who.csrf);
                                    button type="submit" { "Sign out" }
                                }
                            }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

pub(super) fn page(status: StatusCode, markup: Markup) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}

pub fn error_page(f: Failure) -> Response {
    page(
        f.status,
        layout(
            None,
            f.status.canonical_reason().unwrap_or("Error"),
            "",
            html! { p.error { (f.message) } p { a href="/" { "Back to the console" } } },
        ),
    )
}

/// The sign-in page, with a fresh login token bound to a cookie.
pub fn login_page(console: &Console, status: StatusCode, message: Option<&str>) -> Response {
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let token = console.keys.login_token(&nonce);
    let body = html! {
        @if let Some(m) = message { p.error role="alert" { (m) } }
        form #login method="post" action="/login" {
            input type="hidden" name="token" value=(token);
            label { "Account" input #user type="text" name="user" autocomplete="username" required autofocus; }
            label { "Password" input #password type="password" name="password" autocomplete="current-password" required; }
            button #signin type="submit" { "Sign in" }
        }
        p.hint { "Or open this page with an operator client certificate from the collector's CA." }
    };
    let cookie = auth::set_cookie(auth::LOGIN_COOKIE, &nonce, Duration::from_secs(1800));
    (
        AppendHeaders([(header::SET_COOKIE, cookie)]),
        page(status, layout(None, "Sign in", "", body)),
    )
        .into_response()
}

pub async fn login_form(State(console): State<Arc<Console>>) -> Response {
    login_page(&console, StatusCode::OK, None)
}

#[derive(Deserialize)]
pub struct LoginForm {
    user: String,
    password: String,
    token: String,
}

/// Counts a sign-in attempt of `name` from `ip` against its budgets, before any password is
/// checked (concurrent guesses cannot all pass); whether it may go on. A name that is not a
/// valid account name is refused uncounted.
async fn attempt_allowed(
    console: &Console,
    name: &str,
    ip: std::net::IpAddr,
) -> Result<bool, tonic::Status> {
    if auth::check_user_name(name).is_err() {
        return Ok(false);
    }
    let budgets = auth::attempt_budgets(name, ip);
    let (now, window) = (
        crate::store::now_ms(),
        auth::ATTEMPT_WINDOW.as_millis() as i64,
    );
    super::super::blocking(&console.state.store, move |s| {
        s.count_login_attempt(&budgets, now, window)
    })
    .await
}

/// Records a sign-in of an existing account in the audit log, under the account's
/// organisation: done, or refused (a wrong password). A name that is no account is not
/// recorded (anyone can send one).
async fn audit_sign_in(
    console: &Console,
    user: Option<&crate::store::UserRow>,
    from: std::net::IpAddr,
    ok: bool,
) {
    let Some(user) = user else {
        return;
    };
    let mut act = Act::as_actor(format!("console:{}", user.name), "console.sign_in")
        .target(user.name.clone())
        .org(user.org.clone());
    act.detail = format!("from {from}");
    let outcome = if ok {
        Ok(())
    } else {
        Err(tonic::Status::permission_denied("wrong password"))
    };
    audit::record(&console.state.store, act, &outcome).await;
}

/// Whether `password` is the account's (checked against a decoy hash when there is no such
/// account, so that both take as long), on a blocking thread, a few at a time; None when the
/// console is shutting down.
async fn password_matches(
    console: &Console,
    user: Option<&crate::store::UserRow>,
    password: String,
) -> Option<bool> {
    let hash = user.map_or_else(
        || auth::decoy_hash().to_string(),
        |u| u.password_hash.clone(),
    );
    let _slot = console.login_checks.acquire().await.ok()?;
    Some(
        tokio::task::spawn_blocking(move || auth::verify_password(&password, &hash))
            .await
            .unwrap_or(false),
    )
}

pub async fn login(
    State(console): State<Arc<Console>>,
    Extension(client): Extension<super::ClientAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let nonce = auth::cookie(&headers, auth::LOGIN_COOKIE).unwrap_or_default();
    if !console.keys.check_login_token(nonce, &form.token) {
        return login_page(
            &console,
            StatusCode::FORBIDDEN,
            Some("The sign-in form expired; sign in again."),
        );
    }
    let name = form.user.trim().to_string();
    let allowed = match attempt_allowed(&console, &name, client.0).await {
        Ok(allowed) => allowed,
        Err(e) => return Failure::from(e).page(),
    };
    if !allowed {
        warn!(user = %printable(&name), address = %client.0, "console sign-in refused");
        return login_page(
            &console,
            StatusCode::UNAUTHORIZED,
            Some("Wrong account or password, or too many attempts: wait 15 minutes."),
        );
    }
    let lookup = name.clone();
    let user = match super::super::blocking(&console.state.store, move |s| s.user(&lookup)).await {
        Ok(u) => u,
        Err(e) => return Failure::from(e).page(),
    };
    let ok = match password_matches(&console, user.as_ref(), form.password).await {
        Some(ok) => ok,
        None => return Failure::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down").page(),
    };
    // An account's wrong passwords are audited: bounded by its sign-in budget.
    let user = match user {
        Some(u) if ok => u,
        other => {
            warn!(user = %name, address = %client.0, "console sign-in failed");
            audit_sign_in(&console, other.as_ref(), client.0, false).await;
            return login_page(
                &console,
                StatusCode::UNAUTHORIZED,
                Some("Wrong account or password, or too many attempts: wait 15 minutes."),
            );
        }
    };
    let key = auth::account_key(&name);
    if let Err(e) =
        super::super::blocking(&console.state.store, move |s| s.clear_login_attempts(&key)).await
    {
        return Failure::from(e).page();
    }
    let expires = crate::store::now_ms() + auth::SESSION_LIFETIME.as_millis() as i64;
    let (session, _) = console.keys.new_session(&user, expires);
    info!(user = %name, "console sign-in");
    audit_sign_in(&console, Some(&user), client.0, true).await;
    (
        AppendHeaders([
            (
                header::SET_COOKIE,
                auth::set_cookie(auth::SESSION_COOKIE, &session, auth::SESSION_LIFETIME),
            ),
            (
                header::SET_COOKIE,
                auth::set_cookie(auth::LOGIN_COOKIE, "", Duration::ZERO),
            ),
        ]),
        Redirect::to("/detections"),
    )
        .into_response()
}

pub async fn logout() -> Response {
    (
        AppendHeaders([(
            header::SET_COOKIE,
            auth::set_cookie(auth::SESSION_COOKIE, "", Duration::ZERO),
        )]),
        Redirect::to("/login"),
    )
        .into_response()
}

pub async fn home() -> Redirect {
    Redirect::to("/alerts")
}

/// A query string of non-empty pairs.
pub(super) fn query(pairs: &[(&str, String)]) -> String {
    let kept: Vec<(&str, &str)> = pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    serde_urlencoded::to_string(kept).unwrap_or_default()
}

fn filter_pairs(q: &DetectionQuery) -> Vec<(&'static str, String)> {
    vec![
        ("agent", q.agent.clone()),
        ("rule", q.rule.clone()),
        ("kind", q.kind.clone()),
        ("since", q.since.clone()),
        ("until", q.until.clone()),
        ("q", q.q.clone()),
        ("hash", q.hash.clone()),
        ("sha256", q.sha256.clone()),
        ("md5", q.md5.clone()),
        ("host", q.host.clone()),
        ("label", q.label.clone()),
    ]
}

pub(super) fn detection_row(s: &StoredDetection) -> Markup {
    let d = s.detection.clone().unwrap_or_default();
    html! {
        tr data-seq=(s.seq) {
            td { time { (rfc3339_ms(s.received_at_ms)) } }
            td { a href={ "/agents/" (s.agent_id) } { (printable(&s.hostname)) } }
            td { (kind_name(d.kind)) }
            td { a.rule href={ "/detections/" (s.seq) } { (printable(&d.rule)) } }
            td.target { (shortened(&target_text(&d))) }
            td.num { (d.score) }
            td { (action_name(d.action)) }
        }
    }
}

/// Longest target text in a listing (the detail page shows all of it).
const TARGET_CHARS: usize = 240;

fn shortened(text: &str) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(TARGET_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]).into(),
        None => text.into(),
    }
}

pub async fn detections(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Query(q): Query<DetectionQuery>,
) -> Response {
    let agents = match api::all_agents(&console, &who).await {
        Ok(a) => a,
        Err(f) => return f.page(),
    };
    let (rows, next) = match api::detection_page(&console, &who, &q).await {
        Ok(r) => r,
        Err(f) => return f.page(),
    };
    let filters = filter_pairs(&q);
    let labels: std::collections::BTreeSet<&str> = agents
        .iter()
        .flat_map(|a| a.labels.iter().map(String::as_str))
        .collect();
    // The first page follows new detections; older pages stay as they are.
    let live = q
        .before
        .is_none()
        .then(|| format!("/api/v1/detections?{}", query(&filters)));
    let body = html! {
        form #filters.filters method="get" action="/detections" {
            label { "Agent" select #agent name="agent" {
                option value="" { "any" }
                @for a in &agents {
                    option value=(a.id) selected[a.id == q.agent] { (printable(&a.hostname)) " (" (a.id) ")" }
                }
            } }
            label { "Label" select #label name="label" {
                option value="" { "any" }
                @for l in &labels { option value=(l) selected[*l == q.label] { (l) } }
            } }
            label { "Kind" select #kind name="kind" {
                option value="" { "any" }
                @for k in KINDS { option value=(k) selected[*k == q.kind] { (k) } }
            } }
            label { "Rule" input #rule type="text" name="rule" value=(q.rule); }
            label { "From (UTC)" input #since type="datetime-local" name="since" value=(q.since); }
            label { "To (UTC)" input #until type="datetime-local" name="until" value=(q.until); }
            label { "Path or command line" input #q type="search" name="q" value=(q.q); }
            label { "Hash (SHA-256 or MD5)" input #hash type="search" name="hash" value=(q.hash) placeholder="a file's SHA-256 or MD5"; }
            button #apply type="submit" { "Filter" }
            a href="/detections" { "Clear" }
        }
        table #detections data-live=[live] {
            thead { tr { th { "Received" } th { "Host" } th { "Kind" } th { "Rule" } th { "Target" } th { "Score" } th { "Action" } } }
            tbody {
                @for s in &rows { (detection_row(s)) }
            }
        }
        @if rows.is_empty() { p #none.empty { "No detections match." } }
        @if let Some(before) = next {
            p.pager { a #older href={ "/detections?" (query(&[filters.clone(), vec![("before", before.to_string())]].concat())) } { "Older detections →" } }
        }
    };
    page(
        StatusCode::OK,
        layout(Some(&who), "Detections", "/detections", body),
    )
}

/// A JSON value as nested definition lists.
fn json_markup(v: &Value) -> Markup {
    match v {
        Value::Object(map) => html! {
            dl { @for (k, v) in map { @if !v.is_null() { dt { (k) } dd { (json_markup(v)) } } } }
        },
        Value::Array(items) if items.is_empty() => html! { "none" },
        Value::Array(items) => html! { ul { @for i in items { li { (json_markup(i)) } } } },
        Value::String(s) => html! { code { (printable(s)) } },
        other => html! { code { (other.to_string()) } },
    }
}

/// The response a detection offers: kill its process, quarantine its file (as far as its
/// host allows; the agent refuses the rest).
fn respond_markup(who: &Who, s: &vedette_proto::v1::StoredDetection) -> Markup {
    use vedette_proto::v1::detection::Target;
    let seq = [("detection_seq", s.seq.to_string())];
    let target = s.detection.as_ref().and_then(|d| d.target.as_ref());
    let kill = matches!(target, Some(Target::Process(_)));
    let quarantine = match target {
        Some(Target::File(f)) => !f.sha256.is_empty(),
        Some(Target::Process(p)) => !p.exe_sha256.is_empty(),
        _ => false,
    };
    html! {
        @if kill || quarantine {
            section #respond {
                h2 { "Response" }
                @if !s.response.is_empty() { p #response { "Done: " (s.response) "." } }
                @if kill { (super::actions::request_markup(who, "kill", "Kill this process", &seq)) }
                @if quarantine { (super::actions::request_markup(who, "quarantine", "Quarantine this file", &seq)) }
            }
        }
    }
}

pub async fn detection(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path(seq): Path<u64>,
) -> Response {
    let s = match api::one_detection(&console, &who, seq).await {
        Ok(s) => s,
        Err(f) => return f.page(),
    };
    let mut v = stored_json(&s);
    let indicator = v
        .as_object_mut()
        .and_then(|m| m.remove("indicator"))
        .unwrap_or(Value::Null);
    let d = s.detection.clone().unwrap_or_default();
    let body = html! {
        p.summary { (kind_name(d.kind)) " · " (printable(&d.rule)) " · " (target_text(&d)) }
        section #provenance {
            h2 { "Indicator and provenance" }
            (json_markup(&indicator))
            @if d.bundle_version > 0 {
                p { "Rules of bundle " a href="/rules" { "version " (d.bundle_version) } "." }
            } @else {
                p { "Host-local rules (no fleet bundle)." }
            }
        }
        section #fields {
            h2 { "Everything the agent sent" }
            (json_markup(&v))
        }
        p { a href={ "/detections?agent=" (s.agent_id) } { "More from this agent" } }
        (respond_markup(&who, &s))
    };
    page(
        StatusCode::OK,
        layout(Some(&who), &format!("Detection {seq}"), "/detections", body),
    )
}

pub async fn chart(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Query(q): Query<StatsQuery>,
) -> Response {
    let stats = match api::stats_of(&console, &who, &q).await {
        Ok(s) => s,
        Err(f) => return f.page(),
    };
    let body = html! {
        form.filters method="get" action="/chart" {
            label { "Range" select name="range" {
                @for r in ["24h", "7d", "30d"] { option value=(r) selected[r == stats.range] { (r) } }
            } }
            label { "By" select name="by" {
                @for b in ["rule", "agent"] { option value=(b) selected[b == stats.by] { (b) } }
            } }
            button type="submit" { "Show" }
        }
        p { (stats.total) " detection(s) in the last " (stats.range) ", by " (stats.by) "."
            @if stats.capped { " Only the newest " (api::STATS_MAX_DETECTIONS) " are counted." } }
        (svg_chart(&stats))
    };
    page(
        StatusCode::OK,
        layout(Some(&who), "Detections over time", "/chart", body),
    )
}

const PALETTE: &[&str] = &[
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f",
];

/// A stacked bar chart, one bar per bucket.
fn svg_chart(s: &api::Stats) -> Markup {
    let (w, h, left, bottom) = (900.0f64, 260.0f64, 40.0f64, 24.0f64);
    let totals: Vec<u64> = (0..s.buckets)
        .map(|i| s.series.iter().map(|(_, c)| c[i]).sum())
        .collect();
    let max = totals.iter().copied().max().unwrap_or(0).max(1) as f64;
    let bar = (w - left) / s.buckets as f64;
    let label_every = (s.buckets / 6).max(1);
    let mut rects = Vec::new();
    let mut labels = Vec::new();
    for i in 0..s.buckets {
        let x = left + bar * i as f64;
        let mut y = h - bottom;
        for (n, (name, counts)) in s.series.iter().enumerate() {
            let c = counts[i];
            if c == 0 {
                continue;
            }
            let bh = (h - bottom - 16.0) * c as f64 / max;
            y -= bh;
            rects.push((
                x + 1.0,
                y,
                (bar - 2.0).max(1.0),
                bh,
                PALETTE[n % PALETTE.len()],
                format!("{name}: {c}"),
            ));
        }
        if i % label_every == 0 {
            let at = rfc3339_ms(s.from_ms + s.bucket_ms * i as i64);
            labels.push((x, at.get(5..16).unwrap_or("").to_string()));
        }
    }
    html! {
        svg #chart xmlns="http://www.w3.org/2000/svg" viewBox={ "0 0 " (w) " " (h + 10.0) } role="img" aria-label="Detections over time" {
            line x1=(left) y1=(h - bottom) x2=(w) y2=(h - bottom) stroke="#888" {}
            text x="0" y="12" font-size="11" { (max as u64) }
            text x="0" y=(h - bottom) font-size="11" { "0" }
            @for r in &rects {
                rect x=(format!("{:.1}", r.0)) y=(format!("{:.1}", r.1)) width=(format!("{:.1}", r.2)) height=(format!("{:.1}", r.3)) fill=(r.4) {
                    title { (printable(&r.5)) }
                }
            }
            @for (x, label) in &labels {
                text x=(format!("{x:.1}")) y=(h - 6.0) font-size="10" { (label) }
            }
        }
        ul.legend {
            @for (n, (name, counts)) in s.series.iter().enumerate() {
                li { svg width="12" height="12" { rect width="12" height="12" fill=(PALETTE[n % PALETTE.len()]) {} } " " (printable(name)) " (" (counts.iter().sum::<u64>()) ")" }
            }
        }
    }
}

fn agent_state_cell(a: &vedette_proto::v1::AgentInfo) -> Markup {
    let state = output::agent_state(a);
    let label = match state {
        "connected" => "online",
        "disconnected" => "offline",
        other => other,
    };
    html! { span class={ "state " (state) } { (label) } }
}

pub async fn agents(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
) -> Response {
    let agents = match api::all_agents(&console, &who).await {
        Ok(a) => a,
        Err(f) => return f.page(),
    };
    let body = html! {
        table #agents {
            thead { tr { th { "Host" } th { "State" } th { "Last seen" } th { "Version" } th { "Bundle" } th { "Spool backlog" } th { "Dropped" } th { "Organisation" } th {} } }
            tbody {
                @for a in &agents {
                    tr data-agent=(a.id) {
                        td { a href={ "/agents/" (a.id) } { (printable(&a.hostname)) } br; small { (a.id) }
                            @if !a.labels.is_empty() { br; small.labels { "labels: " (a.labels.join(", ")) } } }
                        td { (agent_state_cell(a))
                            @if let Some(skew) = output::clock_skew(a) { br; small.error { (skew) } } }
                        td { (rfc3339_ms(a.last_seen_ms)) }
                        td { (printable(&a.agent_version)) }
                        td { (a.bundle_version)
                            @if a.bundle_failed_version > 0 { br; small.error { "failed " (a.bundle_failed_version) ": " (printable(&a.bundle_error)) } } }
                        td.num { (a.counters.get("spool_pending").copied().unwrap_or(0)) }
                        td.num { (a.dropped_total) }
                        td { (a.org) }
                        td { @if !a.revoked { a.revoke href={ "/agents/" (a.id) "/revoke" } { "Revoke…" } } }
                    }
                }
            }
        }
        @if agents.is_empty() { p.empty { "No agents enrolled yet: " code { "vedettectl token create" } ", then " code { "vedette-agent enroll" } "." } }
    };
    page(
        StatusCode::OK,
        layout(Some(&who), "Agents", "/agents", body),
    )
}

async fn find_agent(
    console: &Console,
    who: &Who,
    id: &str,
) -> Result<vedette_proto::v1::AgentInfo, Failure> {
    api::all_agents(console, who)
        .await?
        .into_iter()
        .find(|a| a.id == id)
        .ok_or_else(|| Failure::new(StatusCode::NOT_FOUND, format!("no agent `{id}`")))
}

pub async fn agent(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path(id): Path<String>,
) -> Response {
    let a = match find_agent(&console, &who, &id).await {
        Ok(a) => a,
        Err(f) => return f.page(),
    };
    let body = html! {
        p { (agent_state_cell(&a)) " · " a href={ "/detections?agent=" (a.id) } { "Detections" }
            @if !a.revoked { " · " a.revoke href={ "/agents/" (a.id) "/revoke" } { "Revoke…" } } }
        @if !a.revoked {
            section #respond {
                h2 { "Response" }
                (super::actions::request_markup(&who, "isolate", "Isolate this host", &[("agent_id", a.id.clone())]))
            }
        }
        (json_markup(&output::agent_json(&a)))
    };
    page(
        StatusCode::OK,
        layout(Some(&who), &printable(&a.hostname), "/agents", body),
    )
}

pub async fn revoke_confirm(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path(id): Path<String>,
) -> Response {
    let a = match find_agent(&console, &who, &id).await {
        Ok(a) => a,
        Err(f) => return f.page(),
    };
    let body = html! {
        p { "Revoke " strong { (printable(&a.hostname)) } " (" code { (a.id) } ")? Its stream is closed now and its certificate is refused from now on; the host must enroll again with a new token to report." }
        form #confirm-revoke method="post" action={ "/agents/" (a.id) "/revoke" } {
            input type="hidden" name="csrf" value=(who.csrf);
            button #confirm.danger type="submit" { "Revoke this agent" }
            " "
            a href="/agents" { "Cancel" }
        }
    };
    page(
        StatusCode::OK,
        layout(Some(&who), "Revoke an agent", "/agents", body),
    )
}

pub async fn revoke(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path(id): Path<String>,
) -> Response {
    // Only an id the store knows gets here past the revoke: one the collector made (a UUID).
    match api::revoke_agent(&console, &who, &id).await {
        Ok(_) => Redirect::to(&format!("/agents/{id}")).into_response(),
        Err(f) => f.page(),
    }
}

/// The agents of one label in the rollout (an agent with several labels counts in each).
#[derive(Default)]
struct LabelRollout {
    agents: u32,
    /// The versions its agents are due, e.g. "7" or "6, 7".
    due: String,
    /// Agents running what they are due (or newer).
    current: u32,
}

/// The rollout grouped by label, "(no label)" for agents without one.
fn by_label(r: &vedette_proto::v1::BundleRolloutResponse) -> Vec<(String, LabelRollout)> {
    let mut groups: std::collections::BTreeMap<
        String,
        (LabelRollout, std::collections::BTreeSet<u64>),
    > = std::collections::BTreeMap::new();
    for a in &r.agents {
        let none = ["(no label)".to_string()];
        let labels = if a.labels.is_empty() {
            &none[..]
        } else {
            &a.labels[..]
        };
        for l in labels {
            let (g, due) = groups.entry(l.clone()).or_default();
            g.agents += 1;
            due.insert(a.due_version);
            if a.applied_version >= a.due_version {
                g.current += 1;
            }
        }
    }
    groups
        .into_iter()
        .map(|(l, (mut g, due))| {
            g.due = due
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            (l, g)
        })
        .collect()
}

pub async fn rules(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
) -> Response {
    let bundles = match api::all_bundles(&console, &who).await {
        Ok(b) => b,
        Err(f) => return f.page(),
    };
    let rollout = match bundles.first() {
        None => None,
        Some(latest) => match console
            .admin
            .bundle_rollout(Console::request(
                &who,
                BundleRolloutRequest {
                    version: latest.version,
                },
            ))
            .await
        {
            Ok(r) => Some(r.into_inner()),
            Err(s) => return Failure::from(s).page(),
        },
    };
    let by_label = rollout.as_ref().map(by_label).unwrap_or_default();
    let slow = match console
        .admin
        .slow_rules(Console::request(&who, SlowRulesRequest::default()))
        .await
    {
        Ok(r) => slow_rules(&r.into_inner().versions),
        Err(s) => return Failure::from(s).page(),
    };
    let body = html! {
        @if let Some(r) = &rollout {
            section #rollout {
                h2 { "Version " (r.version) " in the fleet" @if !r.target.is_empty() { " (published to label " code { (r.target) } ")" } }
                p { (r.on_version) " on it · " (r.behind) " behind · " (r.failed) " failed · " (r.ahead) " ahead" @if r.not_due > 0 { " · " (r.not_due) " not due it" } }
                h3 { "By label" }
                table #by-label {
                    thead { tr { th { "Label" } th { "Agents" } th { "Due" } th { "On what they are due" } th { "Behind" } } }
                    tbody { @for (label, g) in &by_label {
                        tr { td { (label) } td.num { (g.agents) } td { (g.due) } td.num { (g.current) } td.num { (g.agents - g.current) } }
                    } }
                }
                h3 { "By host" }
                table {
                    thead { tr { th { "Host" } th { "Labels" } th { "Runs" } th { "Due" } th { "Applied" } th { "Failure" } th { "Connected" } } }
                    tbody { @for a in &r.agents {
                        tr { td { a href={ "/agents/" (a.agent_id) } { (printable(&a.hostname)) } }
                             td { (a.labels.join(", ")) }
                             td { (a.applied_version) } td { (a.due_version) } td { (rfc3339_ms(a.applied_at_ms)) }
                             td { @if a.failed_version > 0 { span.error { "version " (a.failed_version) ": " (printable(&a.error)) } } }
                             td { (if a.connected { "yes" } else { "no" }) } }
                    } }
                }
            }
        }
        (bundle_history(&bundles))
        (slow)
    };
    page(StatusCode::OK, layout(Some(&who), "Rules", "/rules", body))
}

/// Every published version, newest first, with a form to compare two.
fn bundle_history(bundles: &[BundleInfo]) -> Markup {
    html! {
        section #bundles {
            h2 { "Bundle history" }
            @if bundles.len() >= 2 {
                form.filters method="get" action="/rules/diff" {
                    label { "Compare" select name="from" { @for b in bundles { option value=(b.version) selected[b.version == bundles[1].version] { (b.version) } } } }
                    label { "with" select name="to" { @for b in bundles { option value=(b.version) { (b.version) } } } }
                    button #diff type="submit" { "Diff" }
                }
            }
            table {
                thead { tr { th { "Version" } th { "To" } th { "Name" } th { "Publisher" } th { "Published by" } th { "Published" } th { "Files" } th { "Size" } th { "Digest" } } }
                tbody { @for b in bundles {
                    tr { td { (b.version) } td { @if b.target.is_empty() { "every agent" } @else { "label " code { (b.target) } } }
                         td { (printable(&b.name)) } td { (printable(&b.publisher)) } td { (b.published_by) }
                         td { (rfc3339_ms(b.published_at_ms)) } td.num { (b.files) } td.num { (b.size) } td { code { (b.digest.get(..16).unwrap_or(&b.digest)) } } }
                } }
            }
            @if bundles.is_empty() { p.empty { "No bundle published yet: " code { "vedettectl rules publish" } "." } }
        }
    }
}

/// The costliest rules per version, as agents timed them on their own files.
fn slow_rules(versions: &[VersionRuleCosts]) -> Markup {
    html! {
        section #slow-rules {
            h2 { "Slowest rules on the hosts' own files" }
            p { "Each agent times its rules on a sample of the files of its last full scan and sends the costliest. A share is of the time all rules took on that host's sample." }
            @if versions.is_empty() { p.empty { "No agent has timed its rules yet: each does after a full scan (" code { "profile_rules" } " in agent.toml)." } }
            @for v in versions {
                h3 { @if v.bundle_version == 0 { "Host-local rules only" } @else { "Version " (v.bundle_version) } " · " (v.agents) " agent(s)" }
                table.slow {
                    thead { tr { th { "Rule" } th { "File" } th { "Highest share" } th { "On" } th { "Agents naming it" } } }
                    tbody { @for r in &v.rules {
                        tr { td { code { (printable(&r.rule)) } } td { (printable(&r.file)) ":" (r.line) }
                             td.num { (format!("{:.1} %", f64::from(r.max_share_ppm) / 10_000.0)) }
                             td { a href={ "/agents/" (r.agent_id) } { (printable(&r.hostname)) } }
                             td.num { (r.agents) } }
                    } }
                }
            }
        }
    }
}

#[derive(Deserialize)]
pub struct DiffQuery {
    from: u64,
    to: u64,
}

async fn bundle_files(
    console: &Console,
    who: &Who,
    version: u64,
) -> Result<std::collections::BTreeMap<String, Vec<u8>>, Failure> {
    let r = console
        .admin
        .get_bundle(Console::request(who, GetBundleRequest { version }))
        .await?
        .into_inner();
    let content = vedette_engine::bundle::decode(&r.content).map_err(|e| {
        Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("stored bundle {version} cannot be read: {e}"),
        )
    })?;
    Ok(content
        .files
        .into_iter()
        .map(|f| (f.path, f.data))
        .collect())
}

pub async fn rules_diff(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Query(q): Query<DiffQuery>,
) -> Response {
    let (old, new) = match (
        bundle_files(&console, &who, q.from).await,
        bundle_files(&console, &who, q.to).await,
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(f), _) | (_, Err(f)) => return f.page(),
    };
    let diffs = tokio::task::spawn_blocking(move || file_diffs(&old, &new))
        .await
        .unwrap_or_default();
    let body = html! {
        @if diffs.is_empty() { p.empty { "The two versions hold the same files." } }
        @for (path, change, text) in &diffs {
            section.diff {
                h2 { code { (printable(path)) } " " small { (change) } }
                @if let Some(text) = text {
                    pre { @for line in text.lines() {
                        @let class = match line.as_bytes().first() { Some(b'+') => "add", Some(b'-') => "del", Some(b'@') => "hunk", _ => "ctx" };
                        span class=(class) { (line) } "\n"
                    } }
                }
            }
        }
    };
    page(
        StatusCode::OK,
        layout(
            Some(&who),
            &format!("Rules: version {} → {}", q.from, q.to),
            "/rules",
            body,
        ),
    )
}

/// Per changed file: its path, what changed, and a unified diff where it can be shown.
fn file_diffs(
    old: &std::collections::BTreeMap<String, Vec<u8>>,
    new: &std::collections::BTreeMap<String, Vec<u8>>,
) -> Vec<(String, String, Option<String>)> {
    let mut paths: Vec<&String> = old.keys().chain(new.keys()).collect();
    paths.sort();
    paths.dedup();
    let mut out = Vec::new();
    for path in paths {
        let (a, b) = (old.get(path), new.get(path));
        if a == b {
            continue;
        }
        let change = match (a, b) {
            (None, _) => "added",
            (_, None) => "removed",
            _ => "changed",
        };
        let a = a.map_or(&[][..], Vec::as_slice);
        let b = b.map_or(&[][..], Vec::as_slice);
        let text = match (std::str::from_utf8(a), std::str::from_utf8(b)) {
            (Ok(a), Ok(b)) if a.len() <= MAX_DIFF_FILE && b.len() <= MAX_DIFF_FILE => Some(
                similar::TextDiff::configure()
                    .timeout(Duration::from_secs(2))
                    .diff_lines(a, b)
                    .unified_diff()
                    .context_radius(3)
                    .to_string(),
            ),
            _ => None,
        };
        out.push((
            path.clone(),
            format!("{change} ({} → {} bytes)", a.len(), b.len()),
            text,
        ));
    }
    out
}

pub async fn intel(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
) -> Response {
    let r = match api::intel_status(&console, &who).await {
        Ok(r) => r,
        Err(f) => return f.page(),
    };
    let body = html! {
        p { (r.staged) " indicator(s) staged for the next " code { "vedettectl intel publish" } "." }
        section #sources {
            h2 { "Sources" }
            table {
                thead { tr { th { "Origin" } th { "Kind" } th { "Last poll" } th { "Accepted" } th { "Skipped" } th { "Rejected" } th { "Revoked" } th { "Staged" } th { "Last error" } } }
                tbody { @for s in &r.sources {
                    tr { td { code { (printable(&s.origin)) } } td { (s.kind) } td { (rfc3339_ms(s.last_poll_ms)) }
                         td.num { (s.accepted) } td.num { (s.skipped) } td.num { (s.rejected) } td.num { (s.revoked) } td.num { (s.staged) }
                         td.error { (printable(&s.last_error)) } }
                } }
            }
        }
        section #sinks {
            h2 { "Export sinks" }
            table {
                thead { tr { th { "Sink" } th { "Exported" } th { "Backlog" } th { "Last attempt" } th { "Last error" } } }
                tbody { @for s in &r.sinks {
                    tr { td { (printable(&s.sink)) } td.num { (s.exported) } td.num { (s.backlog) } td { (rfc3339_ms(s.last_attempt_ms)) } td.error { (printable(&s.last_error)) } }
                } }
            }
        }
    };
    page(StatusCode::OK, layout(Some(&who), "Intel", "/intel", body))
}

/// The audit log: the most recent operator actions (the caller's organisation's only, for an
/// operator limited to one).
pub async fn audit(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Query(q): Query<api::AuditQuery>,
) -> Response {
    let entries = match api::audit_entries(&console, &who, &q).await {
        Ok(e) => e,
        Err(f) => return f.page(),
    };
    let body = html! {
        p { "Every operator action, newest first: tokens, enrollments, revocations, certificates, publishing, organisations, accounts and sign-ins. The log is append-only." }
        table #audit {
            thead { tr { th { "At" } th { "Who" } th { "Action" } th { "Target" } th { "Organisation" } th { "Outcome" } th { "Detail" } } }
            tbody { @for e in entries.iter().rev() {
                tr { td { (rfc3339_ms(e.at_ms)) } td { code { (printable(&e.actor)) } } td { (printable(&e.action)) }
                     td { code { (printable(&e.target)) } } td { (printable(&e.org)) }
                     td class=[(e.outcome != "ok").then_some("error")] { (printable(&e.outcome)) }
                     td { (printable(&e.detail)) } }
            } }
        }
    };
    page(StatusCode::OK, layout(Some(&who), "Audit", "/audit", body))
}
