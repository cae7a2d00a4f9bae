//! The webhook sink (`[[export.webhook]]`): each new alert posted once, not each detection.
//!
//! The sink's cursor walks the detections as the other sinks do; the first detection of an
//! alert the sink has not posted yet posts it, and the alert is recorded as posted (with the
//! cursor, in one step) so that its later detections, a retry or another collector taking
//! the sink over do not post it again. Alerts of an organisation that shares nothing are not
//! posted; under `anonymised` the post carries what an anonymised ECS line carries.

use std::collections::HashSet;

use serde_json::{Value, json};
use vedette_proto::v1::StoredDetection;
use vedette_share::sharing::{Sharing, Tally, ecs_document};

use super::ExportError;
use crate::http::HttpError;
use crate::store::{Store, now_ms};

/// Where and how a webhook posts.
pub(super) struct Hook<'a> {
    pub url: &'a str,
    pub token: Option<&'a str>,
    pub slack: bool,
    pub ca_cert: Option<&'a std::path::Path>,
}

/// Posts the alerts of `batch` not posted before; how many detections it went past.
pub(super) fn post_alerts(
    store: &dyn Store,
    name: &str,
    hook: &Hook<'_>,
    batch: &[(u64, StoredDetection)],
    policy: &dyn Fn(&str) -> Option<Sharing>,
) -> Result<u64, ExportError> {
    let agent = crate::http::agent(hook.ca_cert)?;
    let ids: Vec<String> = batch.iter().map(|(_, s)| key(s.alert_id)).collect();
    let mut posted: HashSet<String> = store.sighting_tallies(name, &ids)?.into_keys().collect();
    let mut passed_to = None;
    for (seq, s) in batch {
        let doc = policy(&s.org).and_then(|p| ecs_document(s, &p));
        let id = key(s.alert_id);
        let (Some(doc), false) = (doc, s.alert_id == 0 || posted.contains(&id)) else {
            passed_to = Some(*seq);
            continue;
        };
        let body = if hook.slack {
            json!({ "text": summary(s, &doc) })
        } else {
            json!({
                "alert": {"id": s.alert_id, "status": s.alert_status},
                "text": summary(s, &doc),
                "detection": doc,
            })
        };
        if let Err(e) = post(&agent, name, hook, &body) {
            let _ =
                store.export_progress(name, passed_to.unwrap_or(0), 0, &e.to_string(), now_ms());
            return Err(e);
        }
        let at = s.detection.as_ref().map_or(0, |d| d.observed_at_ms);
        let now = now_ms();
        let t = Tally {
            count: 1,
            first_seen_ms: at,
            last_seen_ms: at,
            created_ms: now,
            modified_ms: now,
        };
        store.sightings_sent(name, &[(id.clone(), t)], *seq, 1, now)?;
        posted.insert(id);
        passed_to = None;
    }
    if let Some(seq) = passed_to {
        store.export_progress(name, seq, 0, "", now_ms())?;
    }
    Ok(batch.len() as u64)
}

/// The key that marks an alert as posted through a sink.
fn key(alert_id: u64) -> String {
    format!("alert|{alert_id}")
}

/// One line for people: the alert, the rule and its score, where, and what (from the ECS
/// document, so it says no more than the organisation's policy lets out).
pub(super) fn summary(s: &StoredDetection, doc: &Value) -> String {
    let text = |v: &Value| v.as_str().filter(|t| !t.is_empty()).map(str::to_string);
    let rule = text(&doc["rule"]["name"]).unwrap_or_default();
    let score = doc["event"]["risk_score"].as_u64().unwrap_or_default();
    let org = text(&doc["organization"]["name"]).unwrap_or_else(|| s.org.clone());
    let what = text(&doc["file"]["path"])
        .or_else(|| text(&doc["process"]["executable"]))
        .or_else(|| {
            let ip = text(&doc["destination"]["ip"])?;
            Some(format!("{ip}:{}", doc["destination"]["port"]))
        })
        .or_else(|| text(&doc["file"]["hash"]["sha256"]))
        .or_else(|| text(&doc["process"]["hash"]["sha256"]));
    let mut line = format!("Vedette alert {}: {rule} (score {score})", s.alert_id);
    if let Some(host) = text(&doc["host"]["name"]) {
        line.push_str(&format!(" on {host}"));
    }
    line.push_str(&format!(" [{org}]"));
    if let Some(what) = what {
        line.push_str(&format!(": {what}"));
    }
    line
}

/// Posts `body`; errors name the sink, never the URL (often the credential itself).
fn post(agent: &ureq::Agent, name: &str, hook: &Hook<'_>, body: &Value) -> Result<(), ExportError> {
    let mut req = agent
        .post(hook.url)
        .header("content-type", "application/json");
    if let Some(t) = hook.token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let mut resp = req.send(body.to_string()).map_err(|e| HttpError::Request {
        method: "POST",
        url: name.to_string(),
        source: Box::new(e),
    })?;
    crate::http::answer("POST", name, &mut resp)?;
    Ok(())
}
