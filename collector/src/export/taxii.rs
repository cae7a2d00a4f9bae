//! The TAXII 2.1 sink (`[[export.taxii]]`): STIX 2.1 sightings posted to a collection.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use vedette_proto::v1::StoredDetection;
use vedette_share::sharing::{self, Sharing};

use super::ExportError;
use crate::config::HttpAuth;

/// POSTs the sightings of a batch and checks the status resource the server answers with.
pub(super) fn post(
    api_root: &str,
    collection: &str,
    auth: &HttpAuth,
    ca_cert: Option<&Path>,
    batch: &[(u64, StoredDetection)],
    policy: &dyn Fn(&str) -> Option<Sharing>,
    producer: &str,
) -> Result<(), ExportError> {
    let list: Vec<StoredDetection> = batch.iter().map(|(_, d)| d.clone()).collect();
    let objects = sharing::stix_objects(&list, policy, producer);
    if objects.is_empty() {
        return Ok(());
    }
    let envelope = json!({"objects": objects});
    let agent = crate::http::agent(ca_cert)?;
    let url = format!("{api_root}collections/{collection}/objects/");
    let status = crate::http::send_json(&agent, &url, auth, Some(&envelope))?;
    let mut status = status;
    for _ in 0..30 {
        match status["status"].as_str() {
            Some("complete") => {
                let failed = status["failure_count"].as_u64().unwrap_or(0);
                if failed > 0 {
                    let why: Vec<String> = status["failures"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .take(5)
                        .map(|f| format!("{}: {}", f["id"], f["message"]))
                        .collect();
                    // Objects the server already holds are not failures of this export.
                    if why.iter().all(|w| w.to_lowercase().contains("already")) {
                        return Ok(());
                    }
                    return Err(ExportError::Refused(format!(
                        "{failed} object(s) refused: {}",
                        why.join("; ")
                    )));
                }
                return Ok(());
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
