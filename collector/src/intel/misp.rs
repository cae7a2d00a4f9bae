//! Polling a MISP feed (a directory or URL with `manifest.json` and one file per event): the
//! events whose manifest timestamp is at or after the cursor.

use serde_json::Value;
use vedette_engine::import;

use super::poll::{PollError, stage_imported};
use crate::config::{HttpAuth, IntelSourceConfig};
use crate::http::{get, json};
use crate::store::Store;

/// One poll of the feed at `location`; how many indicators were accepted.
pub(super) fn poll(
    store: &dyn Store,
    source: &IntelSourceConfig,
    location: &str,
    cursor: &str,
) -> Result<u64, PollError> {
    let remote = location.starts_with("http://") || location.starts_with("https://");
    let agent = if remote {
        Some(crate::http::agent(source.ca_cert.as_deref())?)
    } else {
        None
    };
    let read = |name: &str| -> Result<Value, PollError> {
        match &agent {
            Some(a) => {
                let url = format!("{location}{name}");
                Ok(json(
                    &get(a, &url, "application/json", &HttpAuth::None)?.0,
                    &url,
                )?)
            }
            None => {
                let p = std::path::Path::new(location).join(name);
                let bytes = std::fs::read(&p).map_err(|source| PollError::File {
                    path: p.clone(),
                    source,
                })?;
                Ok(json(&bytes, &p.display().to_string())?)
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
