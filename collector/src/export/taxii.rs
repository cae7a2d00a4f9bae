//! The TAXII 2.1 sink (`[[export.taxii]]`): STIX 2.1 sightings posted to a collection.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use vedette_proto::v1::StoredDetection;
use vedette_share::sharing::{self, Sharing, Tally};

use super::ExportError;
use crate::config::{HttpAuth, SinkConfig};
use crate::store::{Store, now_ms};

/// Sends the sightings of a batch, one per indicator, organisation and window: a window that
/// already had detections is sent again under the same id with the higher count and a later
/// `modified` (TAXII keeps each version). The tallies and the cursor (moved to `last`, past
/// what the batch left out too) are saved together once the server has them.
pub(super) fn post(
    store: &dyn Store,
    name: &str,
    sink: &SinkConfig,
    (batch, last): (&[(u64, StoredDetection)], u64),
    policy: &dyn Fn(&str) -> Option<Sharing>,
    producer: &str,
) -> Result<(), ExportError> {
    let SinkConfig::Taxii {
        api_root,
        collection,
        auth,
        ca_cert,
        window_ms,
    } = sink
    else {
        return Ok(());
    };
    let list: Vec<StoredDetection> = batch.iter().map(|(_, d)| d.clone()).collect();
    let groups = sharing::sighting_groups(&list, policy, producer, *window_ms);
    let ids: Vec<String> = groups.iter().map(|g| g.id.clone()).collect();
    let before = store.sighting_tallies(name, &ids)?;
    let now = now_ms();
    let tallies: Vec<(String, Tally)> = groups
        .iter()
        .map(|g| {
            let t = match before.get(&g.id) {
                Some(b) => Tally::after(b, g, now),
                None => g.tally(now),
            };
            (g.id.clone(), t)
        })
        .collect();
    let by_id: std::collections::HashMap<&str, Tally> =
        tallies.iter().map(|(id, t)| (id.as_str(), *t)).collect();
    let objects = sharing::group_objects(&groups, &|g| {
        by_id.get(g.id.as_str()).copied().unwrap_or_default()
    });
    if !objects.is_empty() {
        deliver(api_root, collection, auth, ca_cert.as_deref(), objects)?;
    }
    store.sightings_sent(name, &tallies, last, batch.len() as u64, now)?;
    Ok(())
}

/// POSTs `objects` and checks the status resource the server answers with.
pub(super) fn deliver(
    api_root: &str,
    collection: &str,
    auth: &HttpAuth,
    ca_cert: Option<&Path>,
    objects: Vec<serde_json::Value>,
) -> Result<(), ExportError> {
    let envelope = json!({"objects": objects});
    let agent = crate::http::agent(ca_cert)?;
    let url = format!("{api_root}collections/{collection}/objects/");
    let status = crate::http::send_json(&agent, &url, auth, Some(&envelope))?;
    let mut status = status;
    for _ in 0..30 {
        match status["status"].as_str() {
            Some("complete") => {
                let failed = status["failure_count"].as_u64().unwrap_or(0);
                if failed == 0 {
                    return Ok(());
                }
                // Objects the server already holds (an identity or a marking shared by every
                // batch, a batch sent again) are not failures of this export, whatever the
                // server's message says: it is asked for each one.
                let failures = status["failures"].as_array().cloned().unwrap_or_default();
                let held = |f: &serde_json::Value| {
                    let id = f["id"].as_str().unwrap_or_default();
                    !id.is_empty() && holds(&agent, api_root, collection, auth, id)
                };
                let lost: Vec<String> = failures
                    .iter()
                    .filter(|f| !held(f))
                    .map(|f| format!("{}: {}", f["id"], f["message"]))
                    .collect();
                if lost.is_empty() && failures.len() as u64 >= failed {
                    return Ok(());
                }
                let why: Vec<String> = lost.into_iter().take(5).collect();
                return Err(ExportError::Refused(format!(
                    "{failed} object(s) refused: {}",
                    why.join("; ")
                )));
            }
            Some("pending") => {
                let id = status["id"].as_str().unwrap_or_default().to_string();
                std::thread::sleep(Duration::from_millis(500));
                status =
                    crate::http::send_json(&agent, &format!("{api_root}status/{id}/"), auth, None)?;
            }
            _ => {
                return Err(ExportError::Refused(format!(
                    "unexpected status resource: {status}"
                )));
            }
        }
    }
    Err(ExportError::Refused(
        "the server's status stayed pending".into(),
    ))
}

/// Whether the collection holds an object with this id (a refused object that is there
/// already was delivered before).
fn holds(agent: &ureq::Agent, api_root: &str, collection: &str, auth: &HttpAuth, id: &str) -> bool {
    let url = format!("{api_root}collections/{collection}/objects/{id}/");
    crate::http::send_json(agent, &url, auth, None).is_ok_and(|envelope| {
        envelope["objects"]
            .as_array()
            .is_some_and(|objects| objects.iter().any(|o| o["id"] == id))
    })
}
