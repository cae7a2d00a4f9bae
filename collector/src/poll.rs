//! The collector's own polls of threat-intelligence sources: TAXII 2.1 collections and MISP
//! feeds. Each poll fetches only what is new since the last one (TAXII `added_after`, the feed
//! manifest's event timestamps), stages it with the cursor in one transaction, and on failure
//! records the error and retries with backoff, keeping everything staged before.

use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vedette_engine::import;

use crate::config::{HttpAuth, IntelSourceConfig, IntelSourceKind};
use crate::intel::{Incoming, stage};
use crate::server::SharedStore;
use crate::store::now_ms;

/// Largest response body read from a source.
const MAX_BODY_BYTES: u64 = 64 << 20;
/// Most pages one TAXII poll follows.
const MAX_PAGES: usize = 10_000;
/// Objects asked for per TAXII page (`limit`; a server may send fewer). Sent on every request,
/// the `next` ones included: some servers (medallion 3) fail a `next` request without it.
const TAXII_PAGE: usize = 1_000;
const TAXII: &str = "application/taxii+json;version=2.1";

/// Polls `source` until `stop`: at once, then every interval; after a failure, again after
/// 5 s, 10 s, 20 s … up to the interval.
pub async fn run(store: SharedStore, source: IntelSourceConfig, stop: CancellationToken) {
    let origin = source.origin();
    let mut failures: u32 = 0;
    loop {
        let (s, src) = (store.clone(), source.clone());
        let result = tokio::task::spawn_blocking(move || poll_once(s.as_ref(), &src)).await;
        let wait = match result {
            Ok(Ok(n)) => {
                failures = 0;
                info!(%origin, staged = n, "intel source polled");
                source.interval
            }
            Ok(Err(e)) => {
                failures += 1;
                warn!(%origin, error = %e, "intel source poll failed; what it staged before stays");
                let (s, o, k) = (store.clone(), origin.clone(), source.kind_name());
                let _ =
                    tokio::task::spawn_blocking(move || s.intel_error(&o, k, &e, now_ms())).await;
                backoff(failures, source.interval)
            }
            Err(e) => {
                failures += 1;
                warn!(%origin, error = %e, "intel source poll stopped");
                backoff(failures, source.interval)
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

fn backoff(failures: u32, interval: Duration) -> Duration {
    let step = Duration::from_secs(5).saturating_mul(1 << failures.min(16).saturating_sub(1));
    step.min(interval)
}

fn agent(source: &IntelSourceConfig) -> Result<ureq::Agent, String> {
    http_agent(source.ca_cert.as_deref())
}

/// An HTTP client trusting `ca` (PEM), or the public web PKI roots.
pub fn http_agent(ca: Option<&std::path::Path>) -> Result<ureq::Agent, String> {
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(format!("{}: no certificate in it", ca.display()));
        }
        tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
    }
    Ok(ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        // Credentials are never carried to wherever a redirect points.
        .max_redirects(0)
        .tls_config(tls.build())
        .build()
        .into())
}

/// GET `url`: the status, the body (capped), and the TAXII date-added header.
fn get(
    agent: &ureq::Agent,
    url: &str,
    accept: &str,
    auth: &HttpAuth,
) -> Result<(Vec<u8>, Option<String>), String> {
    let mut req = agent.get(url).header("Accept", accept);
    match auth {
        HttpAuth::None => {}
        HttpAuth::Basic { username, password } => {
            req = req.header(
                "Authorization",
                format!("Basic {}", base64(&format!("{username}:{password}"))),
            );
        }
        HttpAuth::Bearer(token) => {
            req = req.header("Authorization", format!("Bearer {token}"));
        }
    }
    let mut resp = req.call().map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status().as_u16();
    let last = resp
        .headers()
        .get("X-TAXII-Date-Added-Last")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY_BYTES)
        .read_to_vec()
        .map_err(|e| format!("GET {url}: reading the body: {e}"))?;
    match status {
        200..=299 => Ok((body, last)),
        401 | 403 => Err(format!(
            "GET {url}: HTTP {status}: the credentials were refused"
        )),
        _ => Err(format!(
            "GET {url}: HTTP {status}: {}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(200)
                .collect::<String>()
        )),
    }
}

fn authorize<B>(req: ureq::RequestBuilder<B>, auth: &HttpAuth) -> ureq::RequestBuilder<B> {
    match auth {
        HttpAuth::None => req,
        HttpAuth::Basic { username, password } => req.header(
            "Authorization",
            format!("Basic {}", base64(&format!("{username}:{password}"))),
        ),
        HttpAuth::Bearer(token) => req.header("Authorization", format!("Bearer {token}")),
    }
}

/// A TAXII request with a JSON answer: GET, or POST of `body`.
pub fn send_json(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    auth: &HttpAuth,
    body: Option<&Value>,
) -> Result<Value, String> {
    let result = match body {
        Some(b) => authorize(agent.post(url), auth)
            .header("Accept", TAXII)
            .header("Content-Type", TAXII)
            .send(b.to_string()),
        None => authorize(agent.get(url), auth)
            .header("Accept", TAXII)
            .call(),
    };
    let mut resp = result.map_err(|e| format!("{method} {url}: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY_BYTES)
        .read_to_vec()
        .map_err(|e| format!("{method} {url}: reading the body: {e}"))?;
    if !(200..300).contains(&status) {
        return Err(format!(
            "{method} {url}: HTTP {status}: {}",
            String::from_utf8_lossy(&text)
                .chars()
                .take(200)
                .collect::<String>()
        ));
    }
    json(&text, url)
}

fn base64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn json(bytes: &[u8], what: &str) -> Result<Value, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("{what}: not JSON: {e}"))
}

/// One poll: fetches what is new and stages it; returns how many indicators were accepted.
pub fn poll_once(
    store: &dyn crate::store::Store,
    source: &IntelSourceConfig,
) -> Result<u64, String> {
    let origin = source.origin();
    let cursor = store.intel_cursor(&origin).map_err(|e| e.to_string())?;
    match &source.kind {
        IntelSourceKind::Taxii { api_root, auth, .. } => {
            let agent = agent(source)?;
            // The API root must speak TAXII 2.1.
            let (info, _) = get(&agent, api_root, TAXII, auth)?;
            let info = json(&info, api_root)?;
            let speaks = info["versions"].as_array().is_some_and(|v| {
                v.iter()
                    .any(|v| v.as_str().is_some_and(|s| s.contains("version=2.1")))
            });
            if !speaks {
                return Err(format!("{api_root} is not a TAXII 2.1 API root"));
            }
            let mut accepted = 0;
            let mut next: Option<String> = None;
            let mut cursor = cursor;
            for page in 0..MAX_PAGES {
                let mut url = format!("{origin}objects/?limit={TAXII_PAGE}&");
                if !cursor.is_empty() {
                    url.push_str(&format!("added_after={}&", encode(&cursor)));
                }
                if let Some(n) = &next {
                    url.push_str(&format!("next={}&", encode(n)));
                }
                let (body, last) = get(&agent, url.trim_end_matches(['&', '?']), TAXII, auth)?;
                let envelope = if body.is_empty() {
                    Value::Null
                } else {
                    json(&body, &url)?
                };
                let objects = envelope["objects"].as_array().cloned().unwrap_or_default();
                let imported = import::stix_objects(&objects, &origin, now_ms());
                accepted += stage_imported(
                    store,
                    source,
                    &imported,
                    page > 0,
                    last.as_deref().unwrap_or(""),
                )?;
                let more = envelope["more"].as_bool().unwrap_or(false);
                next = envelope["next"].as_str().map(str::to_string);
                if !more {
                    break;
                }
                if next.is_none() {
                    // Without `next`, the following page starts after the last one seen.
                    match last {
                        Some(l) => cursor = l,
                        None => return Err(format!("{url}: `more` without `next` or a date")),
                    }
                }
            }
            Ok(accepted)
        }
        IntelSourceKind::MispFeed { location } => {
            let remote = location.starts_with("http://") || location.starts_with("https://");
            let agent = if remote { Some(agent(source)?) } else { None };
            let read = |name: &str| -> Result<Value, String> {
                match &agent {
                    Some(a) => {
                        let url = format!("{location}{name}");
                        json(&get(a, &url, "application/json", &HttpAuth::None)?.0, &url)
                    }
                    None => {
                        let p = std::path::Path::new(location).join(name);
                        let bytes =
                            std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                        json(&bytes, &p.display().to_string())
                    }
                }
            };
            let manifest = read("manifest.json")?;
            let since: i64 = cursor.parse().unwrap_or(0);
            let mut events: Vec<(i64, String)> = Vec::new();
            for uuid in import::feed_events(&manifest)? {
                let ts = match &manifest[&uuid]["timestamp"] {
                    Value::String(s) => s.parse().unwrap_or(0),
                    Value::Number(n) => n.as_i64().unwrap_or(0),
                    _ => 0,
                };
                // `>=`: another event with the newest timestamp seen may not have been
                // fetched yet (staging it again changes nothing).
                if ts >= since {
                    events.push((ts, uuid));
                }
            }
            events.sort();
            let mut accepted = 0;
            for (i, (ts, uuid)) in events.iter().enumerate() {
                let doc = read(&format!("{uuid}.json"))?;
                let imported = import::misp_event(&doc, location)?;
                accepted += stage_imported(store, source, &imported, i > 0, &ts.to_string())?;
            }
            if events.is_empty() {
                stage_imported(store, source, &import::Imported::default(), false, "")?;
            }
            Ok(accepted)
        }
    }
}

fn stage_imported(
    store: &dyn crate::store::Store,
    source: &IntelSourceConfig,
    imported: &import::Imported,
    continued: bool,
    cursor: &str,
) -> Result<u64, String> {
    let origin = source.origin();
    let lines: Vec<String> = imported.accepted.iter().map(|l| l.to_json()).collect();
    let staged = stage(
        store,
        Incoming {
            origin: &origin,
            kind: source.kind_name(),
            lines: &lines,
            revoked: &imported.revoked,
            skipped: imported.skipped.len() as u64,
            rejected: imported.rejected.len() as u64,
            continued,
            cursor,
        },
        now_ms(),
    )
    .map_err(|e| e.to_string())?;
    for (id, why) in imported.rejected.iter().take(20) {
        warn!(%origin, %id, reason = %why, "indicator not imported");
    }
    Ok(lines.len() as u64 - staged.refused.len() as u64)
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_and_query_encoding() {
        assert_eq!(base64("user1:Password1"), "dXNlcjE6UGFzc3dvcmQx");
        assert_eq!(base64("a"), "YQ==");
        assert_eq!(
            encode("2026-11-26T10:00:00.000Z"),
            "2026-11-26T10%3A00%3A00.000Z"
        );
        assert_eq!(backoff(1, Duration::from_secs(900)), Duration::from_secs(5));
        assert_eq!(
            backoff(3, Duration::from_secs(900)),
            Duration::from_secs(20)
        );
        assert_eq!(
            backoff(30, Duration::from_secs(900)),
            Duration::from_secs(900)
        );
    }
}
