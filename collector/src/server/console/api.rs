//! `/api/v1/`: JSON over the admin service, documented in `collector/openapi.json`. The
//! console's pages use it for live updates; operators' tools use it with their client
//! certificates.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use vedette_ops::output::{self, stored_json};
use vedette_proto::v1::admin_service_server::AdminService;
use vedette_proto::v1::{
    AgentInfo, BundleInfo, BundleRolloutRequest, IntelStatusRequest, IntelStatusResponse,
    ListAgentsRequest, ListBundlesRequest, ListDetectionsRequest, RevokeAgentRequest,
    SlowRulesRequest, StoredDetection,
};

use super::auth::Who;
use super::{Console, Failure};

/// Default and largest page of a listing.
pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 1_000;
/// Most detections one chart reads.
pub const STATS_MAX_DETECTIONS: usize = 50_000;

pub type ApiResult = Result<Response, Failure>;

/// A JSON error body with its status.
pub fn error(f: Failure) -> Response {
    (f.status, Json(json!({ "error": f.message }))).into_response()
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        error(self)
    }
}

/// Filters of a detection listing (query string of the API and of the page).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct DetectionQuery {
    pub agent: String,
    pub rule: String,
    /// yara, hash, filename, process, connection, agent.
    pub kind: String,
    /// RFC 3339 (`2026-11-27T10:00:00Z`), `2026-11-27T10:00` (UTC), or ms since the epoch.
    pub since: String,
    pub until: String,
    /// Text in the path, process name or command line.
    pub q: String,
    /// The SHA-256 of the file or executable.
    pub sha256: String,
    /// The MD5 of the file.
    pub md5: String,
    /// The agent's host name.
    pub host: String,
    /// A label the agent has.
    pub label: String,
    /// A SHA-256 or an MD5, told apart by length (the console's search box).
    pub hash: String,
    /// Detections an exception covers too.
    pub suppressed: bool,
    /// Only this alert's detections.
    pub alert: Option<u64>,
    pub limit: Option<u32>,
    pub before: Option<u64>,
}

/// A kind's name to its value.
pub fn parse_kind(name: &str) -> Result<i32, Failure> {
    vedette_proto::kind_from_name(name).ok_or_else(|| {
        Failure::bad_request(format!(
            "`kind`: `{name}` is not one of yara, hash, filename, process, connection, agent"
        ))
    })
}

/// A time given as RFC 3339, as an HTML `datetime-local` value (taken as UTC), or as
/// milliseconds since the Unix epoch.
pub fn parse_time(key: &str, text: &str) -> Result<i64, Failure> {
    let t = text.trim();
    if let Ok(ms) = t.parse::<i64>() {
        return Ok(ms);
    }
    let with_seconds;
    let t = if t.len() == 16 && t.as_bytes().get(10) == Some(&b'T') {
        with_seconds = format!("{t}:00");
        &with_seconds
    } else {
        t
    };
    let parsed = humantime::parse_rfc3339_weak(t.trim_end_matches('Z'))
        .or_else(|_| humantime::parse_rfc3339(t));
    match parsed {
        Ok(time) => Ok(time
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)),
        Err(_) => Err(Failure::bad_request(format!(
            "`{key}`: `{text}` is not a time (2026-11-27T10:00:00Z, or milliseconds since 1970)"
        ))),
    }
}

impl DetectionQuery {
    pub fn request(&self) -> Result<ListDetectionsRequest, Failure> {
        let time = |key: &str, v: &str| {
            if v.trim().is_empty() {
                Ok(0)
            } else {
                parse_time(key, v)
            }
        };
        let (sha256, md5) = self.digests()?;
        Ok(ListDetectionsRequest {
            agent_id: self.agent.trim().to_string(),
            since_ms: time("since", &self.since)?,
            until_ms: time("until", &self.until)?,
            kind: match self.kind.trim() {
                "" => 0,
                k => parse_kind(k)?,
            },
            rule: self.rule.trim().to_string(),
            text: self.q.trim().to_string(),
            sha256,
            md5,
            host: self.host.trim().to_string(),
            label: self.label.trim().to_string(),
            limit: self.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE),
            before_seq: self.before.unwrap_or(0),
            org: String::new(),
            unfiltered_export: false,
            suppressed: self.suppressed,
            alert_id: self.alert.unwrap_or(0),
        })
    }
}

impl DetectionQuery {
    /// The `sha256` and `md5` asked for: their own parameters, or `hash` by its length.
    fn digests(&self) -> Result<(String, String), Failure> {
        let (sha256, md5) = (self.sha256.trim(), self.md5.trim());
        let hash = self.hash.trim();
        let hex = hash.bytes().all(|b| b.is_ascii_hexdigit());
        match hash.len() {
            0 => Ok((sha256.to_string(), md5.to_string())),
            64 if hex && sha256.is_empty() => Ok((hash.to_string(), md5.to_string())),
            32 if hex && md5.is_empty() => Ok((sha256.to_string(), hash.to_string())),
            _ => Err(Failure::bad_request(format!(
                "`hash`: `{}` is neither a SHA-256 (64 hex digits) nor an MD5 (32)",
                hash.chars().take(80).collect::<String>()
            ))),
        }
    }
}

/// One page of detections, newest first, and the `before` of the next page.
pub async fn detection_page(
    console: &Console,
    who: &Who,
    q: &DetectionQuery,
) -> Result<(Vec<StoredDetection>, Option<u64>), Failure> {
    let req = q.request()?;
    let r = console
        .admin
        .list_detections(Console::request(who, req))
        .await?
        .into_inner();
    let mut detections = r.detections;
    detections.reverse();
    Ok((detections, Some(r.next_before_seq).filter(|s| *s != 0)))
}

/// The detection with store sequence number `seq`, if the caller may see it.
pub async fn one_detection(
    console: &Console,
    who: &Who,
    seq: u64,
) -> Result<StoredDetection, Failure> {
    let req = ListDetectionsRequest {
        before_seq: seq.saturating_add(1),
        limit: 1,
        ..Default::default()
    };
    let r = console
        .admin
        .list_detections(Console::request(who, req))
        .await?
        .into_inner();
    r.detections
        .into_iter()
        .find(|d| d.seq == seq)
        .ok_or_else(|| Failure::new(StatusCode::NOT_FOUND, format!("no detection {seq}")))
}

pub async fn all_agents(console: &Console, who: &Who) -> Result<Vec<AgentInfo>, Failure> {
    let mut agents = console
        .admin
        .list_agents(Console::request(who, ListAgentsRequest::default()))
        .await?
        .into_inner()
        .agents;
    agents.sort_by(|a, b| a.hostname.cmp(&b.hostname).then(a.id.cmp(&b.id)));
    Ok(agents)
}

/// Bundles, newest first.
pub async fn all_bundles(console: &Console, who: &Who) -> Result<Vec<BundleInfo>, Failure> {
    let mut bundles = console
        .admin
        .list_bundles(Console::request(who, ListBundlesRequest {}))
        .await?
        .into_inner()
        .bundles;
    bundles.sort_by_key(|b| std::cmp::Reverse(b.version));
    Ok(bundles)
}

pub async fn intel_status(console: &Console, who: &Who) -> Result<IntelStatusResponse, Failure> {
    Ok(console
        .admin
        .intel_status(Console::request(who, IntelStatusRequest {}))
        .await?
        .into_inner())
}

/// Revokes an agent; whether its stream was open.
pub async fn revoke_agent(console: &Console, who: &Who, id: &str) -> Result<bool, Failure> {
    Ok(console
        .admin
        .revoke_agent(Console::request(
            who,
            RevokeAgentRequest {
                agent_id: id.to_string(),
            },
        ))
        .await?
        .into_inner()
        .disconnected)
}

pub async fn session(Extension(who): Extension<Who>) -> Json<Value> {
    let (roles, org) = match &who.peer {
        crate::peer::Peer::Client { roles, org, .. } => (
            roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
            org.clone(),
        ),
        crate::peer::Peer::Agent { .. } => (Vec::new(), None),
    };
    Json(json!({
        "name": who.peer.name(),
        "roles": roles,
        "org": org,
        "account": who.account,
        "csrf": who.csrf,
    }))
}

pub async fn detections(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Query(q): Query<DetectionQuery>,
) -> ApiResult {
    let (page, next) = detection_page(&console, &who, &q).await?;
    Ok(Json(json!({
        "detections": page.iter().map(stored_json).collect::<Vec<_>>(),
        "next_before": next,
    }))
    .into_response())
}

pub async fn detection(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path(seq): Path<u64>,
) -> ApiResult {
    let d = one_detection(&console, &who, seq).await?;
    Ok(Json(stored_json(&d)).into_response())
}

/// One page of an ordered listing: the first `limit` items (default and cap:
/// [`DEFAULT_PAGE`], [`MAX_PAGE`]) that `keep` accepts, and the cursor (`key` of the last one)
/// when more follow.
fn one_page<T, K>(
    items: &[T],
    limit: Option<u32>,
    keep: impl Fn(&T) -> bool,
    key: impl Fn(&T) -> K,
) -> (Vec<&T>, Option<K>) {
    let limit = limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE) as usize;
    let mut page: Vec<&T> = items.iter().filter(|t| keep(t)).take(limit + 1).collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let next = more.then(|| page.last().map(|t| key(t))).flatten();
    (page, next)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AgentQuery {
    pub limit: Option<u32>,
    /// The id of the last agent of the previous page.
    pub after: String,
}

pub async fn agents(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Query(q): Query<AgentQuery>,
) -> ApiResult {
    let mut agents = all_agents(&console, &who).await?;
    agents.sort_by(|a, b| a.id.cmp(&b.id));
    let (page, next) = one_page(
        &agents,
        q.limit,
        |a| q.after.is_empty() || a.id > q.after,
        |a| a.id.clone(),
    );
    Ok(Json(json!({
        "agents": page.iter().map(|a| output::agent_json(a)).collect::<Vec<_>>(),
        "next_after": next,
    }))
    .into_response())
}

pub async fn revoke(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path(id): Path<String>,
) -> ApiResult {
    let disconnected = revoke_agent(&console, &who, &id).await?;
    Ok(
        Json(json!({ "agent_id": id, "revoked": true, "disconnected": disconnected }))
            .into_response(),
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct BundleQuery {
    pub limit: Option<u32>,
    /// Only versions below this one (the next page).
    pub before: Option<u64>,
}

pub async fn bundles(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Query(q): Query<BundleQuery>,
) -> ApiResult {
    let bundles = all_bundles(&console, &who).await?;
    let (page, next) = one_page(
        &bundles,
        q.limit,
        |b| q.before.is_none_or(|before| b.version < before),
        |b| b.version,
    );
    Ok(Json(json!({
        "bundles": page.iter().map(|b| output::bundle_json(b)).collect::<Vec<_>>(),
        "next_before": next,
    }))
    .into_response())
}

pub async fn rollout(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Path(version): Path<u64>,
) -> ApiResult {
    let r = console
        .admin
        .bundle_rollout(Console::request(&who, BundleRolloutRequest { version }))
        .await?
        .into_inner();
    Ok(Json(output::rollout_json(&r)).into_response())
}

pub async fn slow_rules(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
) -> ApiResult {
    let r = console
        .admin
        .slow_rules(Console::request(&who, SlowRulesRequest::default()))
        .await?
        .into_inner();
    Ok(Json(json!({
        "versions": r.versions.iter().map(output::rule_costs_json).collect::<Vec<_>>(),
    }))
    .into_response())
}

pub async fn intel(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
) -> ApiResult {
    let r = intel_status(&console, &who).await?;
    Ok(Json(json!({
        "staged": r.staged,
        "sources": r.sources.iter().map(output::source_json).collect::<Vec<_>>(),
        "sinks": r.sinks.iter().map(output::sink_json).collect::<Vec<_>>(),
    }))
    .into_response())
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct StatsQuery {
    /// 24h (default), 7d or 30d.
    pub range: String,
    /// rule (default) or agent.
    pub by: String,
}

/// Detections over time: counts per bucket for the most frequent rules or agents.
#[derive(Debug, Default)]
pub struct Stats {
    pub range: &'static str,
    pub by: &'static str,
    pub from_ms: i64,
    pub bucket_ms: i64,
    pub buckets: usize,
    /// Name and counts per bucket, most detections first; the rest summed as `other`.
    pub series: Vec<(String, Vec<u64>)>,
    pub total: u64,
    /// More detections were in the range than the chart reads.
    pub capped: bool,
}

/// Series shown by name; the others are summed.
const TOP_SERIES: usize = 6;

/// The chart's range (`24h`, `7d`, `30d`): its name, span in hours and number of buckets.
fn stats_range(range: &str) -> Result<(&'static str, i64, usize), Failure> {
    match range {
        "" | "24h" => Ok(("24h", 24, 24)),
        "7d" => Ok(("7d", 24 * 7, 28)),
        "30d" => Ok(("30d", 24 * 30, 30)),
        other => Err(Failure::bad_request(format!(
            "`range`: `{other}` is not one of 24h, 7d, 30d"
        ))),
    }
}

/// What the chart's series are (`rule` or `agent`).
fn stats_by(by: &str) -> Result<&'static str, Failure> {
    match by {
        "" | "rule" => Ok("rule"),
        "agent" => Ok("agent"),
        other => Err(Failure::bad_request(format!(
            "`by`: `{other}` is not one of rule, agent"
        ))),
    }
}

/// The series a detection counts in.
fn series_key(d: &StoredDetection, by: &str) -> String {
    match by {
        "agent" if d.hostname.is_empty() => d.agent_id.clone(),
        "agent" => d.hostname.clone(),
        _ => d
            .detection
            .as_ref()
            .map(|d| d.rule.clone())
            .unwrap_or_default(),
    }
}

/// The largest [`TOP_SERIES`] - 1 series by name, the rest summed as `other`.
fn top_series(counts: BTreeMap<String, Vec<u64>>, buckets: usize) -> Vec<(String, Vec<u64>)> {
    let mut series: Vec<(String, Vec<u64>)> = counts.into_iter().collect();
    series.sort_by_key(|(name, c)| (std::cmp::Reverse(c.iter().sum::<u64>()), name.clone()));
    if series.len() > TOP_SERIES {
        let rest = series.split_off(TOP_SERIES - 1);
        let mut other = vec![0; buckets];
        for (_, c) in rest {
            for (o, n) in other.iter_mut().zip(c) {
                *o += n;
            }
        }
        series.push(("other".to_string(), other));
    }
    series
}

pub async fn stats_of(console: &Console, who: &Who, q: &StatsQuery) -> Result<Stats, Failure> {
    let (range, span_h, buckets) = stats_range(&q.range)?;
    let by = stats_by(&q.by)?;
    let bucket_ms = span_h * 3_600_000 / buckets as i64;
    let now = crate::store::now_ms();
    // Whole buckets, the last one holding now.
    let to = (now / bucket_ms + 1) * bucket_ms;
    let from = to - bucket_ms * buckets as i64;
    let mut counts: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut read = 0usize;
    let mut before = 0u64;
    let mut capped = false;
    loop {
        let req = ListDetectionsRequest {
            since_ms: from,
            limit: 10_000,
            before_seq: before,
            ..Default::default()
        };
        let r = console
            .admin
            .list_detections(Console::request(who, req))
            .await?
            .into_inner();
        for d in &r.detections {
            let i = ((d.received_at_ms - from) / bucket_ms).clamp(0, buckets as i64 - 1) as usize;
            counts
                .entry(series_key(d, by))
                .or_insert_with(|| vec![0; buckets])[i] += 1;
        }
        read += r.detections.len();
        if r.next_before_seq == 0 {
            break;
        }
        if read >= STATS_MAX_DETECTIONS {
            capped = true;
            break;
        }
        before = r.next_before_seq;
    }
    Ok(Stats {
        range,
        by,
        from_ms: from,
        bucket_ms,
        buckets,
        total: read as u64,
        series: top_series(counts, buckets),
        capped,
    })
}

pub async fn stats(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Query(q): Query<StatsQuery>,
) -> ApiResult {
    let s = stats_of(&console, &who, &q).await?;
    Ok(Json(json!({
        "range": s.range,
        "by": s.by,
        "from": output::rfc3339_ms(s.from_ms),
        "bucket_seconds": s.bucket_ms / 1000,
        "buckets": (0..s.buckets)
            .map(|i| output::rfc3339_ms(s.from_ms + s.bucket_ms * i as i64))
            .collect::<Vec<_>>(),
        "series": s.series.iter().map(|(name, counts)| json!({"name": name, "counts": counts})).collect::<Vec<_>>(),
        "total": s.total,
        "capped": s.capped,
    }))
    .into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AuditQuery {
    /// Only entries at or after this time (as for detections).
    pub since: String,
    /// At most this many, the most recent (default 100, at most 10,000).
    pub limit: Option<u32>,
}

/// The audit log's most recent entries, oldest first.
pub async fn audit_entries(
    console: &Console,
    who: &Who,
    q: &AuditQuery,
) -> Result<Vec<vedette_proto::v1::AuditEntry>, Failure> {
    let since_ms = match q.since.trim() {
        "" => 0,
        t => parse_time("since", t)?,
    };
    Ok(console
        .admin
        .list_audit(Console::request(
            who,
            vedette_proto::v1::ListAuditRequest {
                since_ms,
                limit: q.limit.unwrap_or(100),
            },
        ))
        .await?
        .into_inner()
        .entries)
}

pub async fn audit(
    State(console): State<Arc<Console>>,
    Extension(who): Extension<Who>,
    Query(q): Query<AuditQuery>,
) -> ApiResult {
    let entries = audit_entries(&console, &who, &q).await?;
    Ok(Json(json!({
        "entries": entries.iter().map(output::audit_json).collect::<Vec<_>>(),
    }))
    .into_response())
}

pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], super::OPENAPI).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_hold_the_limit_and_point_past_their_last_item() {
        let items: Vec<u32> = (1..=5).collect();
        let (page, next) = one_page(&items, Some(2), |_| true, |n| *n);
        assert_eq!((page, next), (vec![&1, &2], Some(2)));
        let (page, next) = one_page(&items, Some(2), |n| *n > 4, |n| *n);
        assert_eq!((page, next), (vec![&5], None));
        let (page, next) = one_page(&items, Some(5), |_| true, |n| *n);
        assert_eq!((page.len(), next), (5, None));
    }
}
