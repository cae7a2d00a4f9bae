//! The MISP sink (`[[export.misp]]`): a sighting of each MISP attribute a detection came from.

use std::path::Path;

use serde_json::{Value, json};
use vedette_proto::v1::StoredDetection;
use vedette_share::sharing::{Share, Sharing};

use super::ExportError;
use crate::http::HttpError;
use crate::store::{Store, now_ms};

/// One MISP sighting per detection of a MISP attribute, as PyMISP's `add_sighting` sends it,
/// the cursor moved after each; other detections have nothing to sight in MISP and are passed.
pub(super) fn sightings(
    store: &dyn Store,
    name: &str,
    url: &str,
    key: &str,
    ca_cert: Option<&Path>,
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
        // A sighting says who saw the attribute and when: the organisation, or its anonymous
        // stand-in (sector and country). MISP sightings carry no tags.
        let body = json!({
            "uuid": attribute,
            "timestamp": (d.observed_at_ms / 1000).max(0),
            "source": shared.sighting_source(),
            "type": "0",
        });
        let sent = agent
            .post(&target)
            .header("Authorization", key)
            .header("Accept", "application/json")
            .header("content-type", "application/json")
            .send(body.to_string());
        let result = match sent {
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
                url: target.clone(),
                source: Box::new(e),
            })),
        };
        if let Err(e) = result {
            let at = passed_to.unwrap_or(0);
            let _ = store.export_progress(name, at, 0, &e.to_string(), now_ms());
            return Err(e);
        }
        store.export_progress(name, *seq, 1, "", now_ms())?;
        done += 1;
        passed_to = None;
    }
    if let Some(seq) = passed_to {
        store.export_progress(name, seq, 0, "", now_ms())?;
    }
    Ok(done.max(u64::from(!batch.is_empty())))
}
