//! Export sinks: every stored detection goes to each configured sink once, in the order the
//! store received them, as ECS JSON lines (`[[export.jsonl]]`) or STIX 2.1 sightings posted to a
//! TAXII 2.1 collection (`[[export.taxii]]`), or MISP sightings of the attributes detections
//! came from (`[[export.misp]]`).
//!
//! Each sink has a cursor in the store (the sequence number of the last detection it took). A
//! batch is delivered first and the cursor moved after, so a crash in between delivers that
//! batch again: the JSONL sink then finds it already in its file (each line carries its
//! `event.sequence`) and skips it; TAXII objects keep their ids, so a server holds each once.
//! A sink that refuses is retried with backoff; detections wait in the store meanwhile.
//!
//! What a sink sends about a detection follows the sharing policy of the agent's organisation
//! (`full`, `anonymised` or `none`, read from the store for each batch, so a change applies to
//! the next one) and carries its TLP marking; see README.md, "Sharing and privacy".

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vedette_proto::export::{self, Share, Sharing};
use vedette_proto::v1::StoredDetection;

use crate::config::{HttpAuth, SinkConfig};
use crate::server::SharedStore;
use crate::store::{Store, now_ms};

/// Detections per delivery.
const BATCH: u32 = 500;
/// Only detections received at least this long ago are exported: a PostgreSQL sequence number
/// is taken before its transaction commits, so a lower one can appear slightly later.
const SETTLE_MS: i64 = 2_000;
/// How often an idle sink looks for new detections.
const IDLE: Duration = Duration::from_secs(1);
/// How long a collector's hold on a sink lasts without renewal; another collector sharing the
/// store takes the sink over after it.
const LEASE_MS: i64 = 30_000;

/// Runs one sink until `stop`.
/// `owner` names this collector in the sink's lease: the same after a restart (so a restarted
/// collector takes its sinks back at once), different for every collector sharing the store.
pub async fn run(
    store: SharedStore,
    sink: SinkConfig,
    organisation: String,
    owner: String,
    stop: CancellationToken,
) {
    let name = sink.name();
    let mut failures: u32 = 0;
    loop {
        let (s, k, o, w) = (
            store.clone(),
            sink.clone(),
            organisation.clone(),
            owner.clone(),
        );
        let result = tokio::task::spawn_blocking(move || {
            // Several collectors on one store: one of them exports through each sink.
            if !s
                .export_lease(&k.name(), &w, now_ms(), LEASE_MS)
                .map_err(|e| e.to_string())?
            {
                return Ok(0);
            }
            deliver_once(s.as_ref(), &k, &o)
        })
        .await;
        let wait = match result {
            Ok(Ok(0)) => {
                failures = 0;
                IDLE
            }
            Ok(Ok(n)) => {
                failures = 0;
                info!(sink = %name, exported = n, "detections exported");
                Duration::ZERO
            }
            Ok(Err(e)) => {
                failures += 1;
                warn!(sink = %name, error = %e, "export failed; retrying (nothing is lost)");
                Duration::from_secs(1 << failures.min(6))
            }
            Err(e) => {
                failures += 1;
                warn!(sink = %name, error = %e, "export stopped");
                Duration::from_secs(1 << failures.min(6))
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Delivers the next batch; how many detections it exported.
pub fn deliver_once(
    store: &dyn Store,
    sink: &SinkConfig,
    organisation: &str,
) -> Result<u64, String> {
    let name = sink.name();
    let state = store.export_state(&name).map_err(|e| e.to_string())?;
    let mut cursor = state.seq;
    if let SinkConfig::Jsonl(path) = sink {
        // What the file already holds was delivered, whatever the store's cursor says.
        let in_file = jsonl_last_sequence(path)?;
        if in_file > cursor {
            store
                .export_progress(&name, in_file, 0, "", now_ms())
                .map_err(|e| e.to_string())?;
            cursor = in_file;
        }
    }
    let batch = store
        .detections_after(cursor, now_ms() - SETTLE_MS, BATCH)
        .map_err(|e| e.to_string())?;
    let Some(last) = batch.last().map(|(seq, _)| *seq) else {
        return Ok(0);
    };
    let policies = policies(store, organisation)?;
    let policy = |org: &str| policies.get(org).cloned();
    if let SinkConfig::Misp { url, key, ca_cert } = sink {
        return misp_sightings(store, &name, url, key, ca_cert.as_deref(), &batch, &policy);
    }
    let delivered = match sink {
        SinkConfig::Misp { .. } => Ok(()),
        SinkConfig::Jsonl(path) => jsonl_append(path, &batch, &policy),
        SinkConfig::Taxii {
            api_root,
            collection,
            auth,
            ca_cert,
        } => taxii_post(
            api_root,
            collection,
            auth,
            ca_cert.as_deref(),
            &batch,
            &policy,
            organisation,
        ),
    };
    match delivered {
        Ok(()) => {
            store
                .export_progress(&name, last, batch.len() as u64, "", now_ms())
                .map_err(|e| e.to_string())?;
            Ok(batch.len() as u64)
        }
        Err(e) => {
            let _ = store.export_progress(&name, cursor, 0, &e, now_ms());
            Err(e)
        }
    }
}

/// Every organisation's sharing policy, by name, as the store holds it now.
fn policies(store: &dyn Store, organisation: &str) -> Result<HashMap<String, Sharing>, String> {
    Ok(store
        .list_orgs()
        .map_err(|e| e.to_string())?
        .iter()
        .map(|o| (o.name.clone(), crate::orgs::sharing(o, organisation)))
        .collect())
}

/// The `event.sequence` of the file's last complete line (0 for none); a partial last line (a
/// write cut short) is cut off, to be written again whole.
fn jsonl_last_sequence(path: &Path) -> Result<u64, String> {
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let tail_len = len.min(1 << 20);
    f.seek(SeekFrom::Start(len - tail_len))
        .map_err(|e| e.to_string())?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).map_err(|e| e.to_string())?;
    let complete = match tail.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None => 0,
    };
    if complete < tail.len() {
        f.set_len(len - tail_len + complete as u64)
            .map_err(|e| format!("{}: cutting a partial line: {e}", path.display()))?;
    }
    let text = String::from_utf8_lossy(&tail[..complete]);
    let last = text.lines().rev().find(|l| !l.trim().is_empty());
    Ok(last
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .and_then(|v| v["event"]["sequence"].as_u64())
        .unwrap_or(0))
}

fn jsonl_append(
    path: &Path,
    batch: &[(u64, StoredDetection)],
    policy: &dyn Fn(&str) -> Option<Sharing>,
) -> Result<(), String> {
    let mut text = String::new();
    for (seq, d) in batch {
        let Some(mut v) = policy(&d.org).and_then(|p| export::ecs_shared(d, &p)) else {
            continue;
        };
        v["event"]["sequence"] = json!(seq);
        text.push_str(&v.to_string());
        text.push('\n');
    }
    if text.is_empty() {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_data())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// One MISP sighting per detection of a MISP attribute, as PyMISP's `add_sighting` sends it,
/// the cursor moved after each; other detections have nothing to sight in MISP and are passed.
fn misp_sightings(
    store: &dyn Store,
    name: &str,
    url: &str,
    key: &str,
    ca_cert: Option<&Path>,
    batch: &[(u64, StoredDetection)],
    policy: &dyn Fn(&str) -> Option<Sharing>,
) -> Result<u64, String> {
    let agent = crate::poll::http_agent(ca_cert)?;
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
                    Err(format!(
                        "POST {target}: HTTP {status}: {}",
                        text.chars().take(200).collect::<String>()
                    ))
                }
            }
            Err(e) => Err(format!("POST {target}: {e}")),
        };
        if let Err(e) = result {
            let at = passed_to.unwrap_or(0);
            let _ = store.export_progress(name, at, 0, &e, now_ms());
            return Err(e);
        }
        store
            .export_progress(name, *seq, 1, "", now_ms())
            .map_err(|e| e.to_string())?;
        done += 1;
        passed_to = None;
    }
    if let Some(seq) = passed_to {
        store
            .export_progress(name, seq, 0, "", now_ms())
            .map_err(|e| e.to_string())?;
    }
    Ok(done.max(u64::from(!batch.is_empty())))
}

/// POSTs the sightings of a batch and checks the status resource the server answers with.
fn taxii_post(
    api_root: &str,
    collection: &str,
    auth: &HttpAuth,
    ca_cert: Option<&Path>,
    batch: &[(u64, StoredDetection)],
    policy: &dyn Fn(&str) -> Option<Sharing>,
    organisation: &str,
) -> Result<(), String> {
    let list: Vec<StoredDetection> = batch.iter().map(|(_, d)| d.clone()).collect();
    let objects = export::stix_shared(&list, policy, organisation);
    if objects.is_empty() {
        return Ok(());
    }
    let envelope = json!({"objects": objects});
    let agent = crate::poll::http_agent(ca_cert)?;
    let url = format!("{api_root}collections/{collection}/objects/");
    let status = crate::poll::send_json(&agent, "POST", &url, auth, Some(&envelope))?;
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
                    return Err(format!("{failed} object(s) refused: {}", why.join("; ")));
                }
                return Ok(());
            }
            Some("pending") => {
                let id = status["id"].as_str().unwrap_or_default().to_string();
                std::thread::sleep(Duration::from_millis(500));
                status = crate::poll::send_json(
                    &agent,
                    "GET",
                    &format!("{api_root}status/{id}/"),
                    auth,
                    None,
                )?;
            }
            _ => return Err(format!("unexpected status resource: {status}")),
        }
    }
    Err("the server's status stayed pending".into())
}
