//! The MISP sink (`[[export.misp]]`): a sighting of each MISP attribute a detection came from.

use std::path::Path;

use serde_json::{Value, json};
use vedette_proto::v1::StoredDetection;
use vedette_share::sharing::{Share, Sharing, Tally};

use super::ExportError;
use crate::http::HttpError;
use crate::store::{Store, now_ms};

/// One MISP sighting per attribute, organisation (as it is shared) and window, as PyMISP's
/// `add_sighting` sends it: the first detection of a window sends it, the others of that
/// window are counted with it (a MISP sighting has no count). The cursor moves after each;
/// other detections have nothing to sight in MISP and are passed.
pub(super) fn sightings(
    store: &dyn Store,
    name: &str,
    (url, key, ca_cert, window_ms): (&str, &str, Option<&Path>, i64),
    batch: &[(u64, StoredDetection)],
    policy: &dyn Fn(&str) -> Option<Sharing>,
) -> Result<u64, ExportError> {
    let agent = crate::http::agent(ca_cert)?;
    let target = format!("{url}sightings/add");
    let mut done = 0;
    let mut passed_to = None;
    for (seq, s) in batch {
        let d = s.detection.clone().unwrap_or_default();
        let attribute = d
            .indicator
            .as_ref()
            .filter(|i| i.source == "misp" && !i.id.is_empty())
            .map(|i| i.id.clone());
        let shared = policy(&s.org).filter(|p| p.share != Share::None);
        let (Some(attribute), Some(shared)) = (attribute, shared) else {
            passed_to = Some(*seq);
            continue;
        };
        let source = shared.sighting_source();
        let window = d.observed_at_ms.div_euclid(window_ms.max(1)) * window_ms.max(1);
        let id = format!("misp|{attribute}|{source}|{window}");
        let before = store.sighting_tallies(name, std::slice::from_ref(&id))?;
        if let Some(b) = before.get(&id) {
            let t = Tally {
                count: b.count + 1,
                last_seen_ms: b.last_seen_ms.max(d.observed_at_ms),
                first_seen_ms: b.first_seen_ms.min(d.observed_at_ms),
                ..*b
            };
            store.sightings_sent(name, &[(id, t)], *seq, 1, now_ms())?;
            done += 1;
            passed_to = None;
            continue;
        }
        let body = sighting_body(&attribute, d.observed_at_ms, &source, "0");
        let result = post(&agent, &target, key, &body);
        if let Err(e) = result {
            let at = passed_to.unwrap_or(0);
            let _ = store.export_progress(name, at, 0, &e.to_string(), now_ms());
            return Err(e);
        }
        let now = now_ms();
        let t = Tally {
            count: 1,
            first_seen_ms: d.observed_at_ms,
            last_seen_ms: d.observed_at_ms,
            created_ms: now,
            modified_ms: now,
        };
        store.sightings_sent(name, &[(id, t)], *seq, 1, now)?;
        done += 1;
        passed_to = None;
    }
    if let Some(seq) = passed_to {
        store.export_progress(name, seq, 0, "", now_ms())?;
    }
    Ok(done.max(u64::from(!batch.is_empty())))
}

/// POSTs one sighting; an answer carrying `errors` is a refusal.
pub(super) fn post(
    agent: &ureq::Agent,
    target: &str,
    key: &str,
    body: &Value,
) -> Result<(), ExportError> {
    let sent = agent
        .post(target)
        .header("Authorization", key)
        .header("Accept", "application/json")
        .header("content-type", "application/json")
        .send(body.to_string());
    match sent {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let text = resp
                .body_mut()
                .with_config()
                .limit(1 << 20)
                .read_to_string()
                .unwrap_or_default();
            let refused = serde_json::from_str::<Value>(&text)
                .map(|v| v.get("errors").is_some())
                .unwrap_or(false);
            if (200..300).contains(&status) && !refused {
                Ok(())
            } else {
                Err(ExportError::Refused(format!(
                    "POST {target}: HTTP {status}: {}",
                    text.chars().take(200).collect::<String>()
                )))
            }
        }
        Err(e) => Err(ExportError::Http(HttpError::Request {
            method: "POST",
            url: target.to_string(),
            source: Box::new(e),
        })),
    }
}

/// A MISP sighting as PyMISP's `add_sighting` sends it: the attribute, when (seconds), who saw
/// it (the organisation, or its anonymous stand-in: sector and country; MISP sightings carry
/// no tags), and its type (`0` seen, `1` false positive).
pub(super) fn sighting_body(attribute: &str, at_ms: i64, source: &str, kind: &str) -> Value {
    json!({
        "uuid": attribute,
        "timestamp": (at_ms / 1000).max(0),
        "source": source,
        "type": kind,
    })
}
