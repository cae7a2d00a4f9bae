//! Export sinks: every stored detection goes to each configured sink once, in the order the
//! store received them, as ECS JSON lines (`[[export.jsonl]]`) or STIX 2.1 sightings posted to a
//! TAXII 2.1 collection (`[[export.taxii]]`), or MISP sightings of the attributes detections
//! came from (`[[export.misp]]`), or RFC 5424 syslog messages (`[[export.syslog]]`); each new
//! alert is posted once to a webhook (`[[export.webhook]]`).
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

mod feedback;
mod jsonl;
mod misp;
mod syslog;
mod taxii;
mod webhook;

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vedette_share::sharing::Sharing;

use crate::config::SinkConfig;
use crate::http::HttpError;
use crate::server::SharedStore;
use crate::store::{CLOSED_STATUSES, Store, StoreError, now_ms};
use vedette_proto::v1::StoredDetection;

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

/// Why a delivery failed (the batch is delivered again; nothing is lost).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("`{}`: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// What the sink answered when it refused (TAXII's failures, MISP's errors).
    #[error("{0}")]
    Refused(String),
}

/// Runs one sink until `stop`.
/// `owner` names this collector in the sink's lease: the same after a restart (so a restarted
/// collector takes its sinks back at once), different for every collector sharing the store.
pub async fn run(
    store: SharedStore,
    sink: SinkConfig,
    producer: String,
    owner: String,
    stop: CancellationToken,
) {
    let name = sink.name();
    let mut failures: u32 = 0;
    loop {
        let (s, k, o, w) = (store.clone(), sink.clone(), producer.clone(), owner.clone());
        let result = tokio::task::spawn_blocking(move || {
            // Several collectors on one store: one of them exports through each sink.
            if !s.export_lease(&k.name(), &w, now_ms(), LEASE_MS)? {
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

/// Delivers the next batch of detections, and of audit entries to a JSONL sink that takes
/// them; how many it exported.
pub fn deliver_once(
    store: &dyn Store,
    sink: &SinkConfig,
    producer: &str,
) -> Result<u64, ExportError> {
    let detections = deliver_detections(store, sink, producer)?;
    let other = match sink {
        SinkConfig::Jsonl { path, audit: true } => deliver_audit(store, sink, path, producer)?,
        SinkConfig::Jsonl { .. } => 0,
        _ => feedback::deliver(store, sink, producer)?,
    };
    Ok(detections + other)
}

/// Delivers the next audit entries to a JSONL file, with a cursor of their own
/// (`audit:` and the sink's name); how many.
fn deliver_audit(
    store: &dyn Store,
    sink: &SinkConfig,
    path: &std::path::Path,
    producer: &str,
) -> Result<u64, ExportError> {
    let name = format!("audit:{}", sink.name());
    let mut cursor = store.export_state(&name)?.seq;
    let in_file = jsonl::last_sequence(path, jsonl::Lines::Audit)?;
    if in_file > cursor {
        store.export_progress(&name, in_file, 0, "", now_ms())?;
        cursor = in_file;
    }
    let batch = store.audit_after(cursor, now_ms() - SETTLE_MS, BATCH)?;
    let Some(last) = batch.last().map(|e| e.seq) else {
        return Ok(0);
    };
    let policies = policies(store, producer)?;
    let policy = |org: &str| policies.get(org).cloned();
    let delivered = jsonl::append_audit(path, &batch, &policy);
    moved(store, &name, (cursor, last), batch.len() as u64, delivered)
}

/// Moves a sink's cursor from `cursor` to `last` past `count` items once they were delivered;
/// records the error (the cursor stays) when they were not.
fn moved(
    store: &dyn Store,
    name: &str,
    (cursor, last): (u64, u64),
    count: u64,
    delivered: Result<(), ExportError>,
) -> Result<u64, ExportError> {
    match delivered {
        Ok(()) => {
            store.export_progress(name, last, count, "", now_ms())?;
            Ok(count)
        }
        Err(e) => {
            let _ = store.export_progress(name, cursor, 0, &e.to_string(), now_ms());
            Err(e)
        }
    }
}

/// Delivers the next batch of detections; how many.
fn deliver_detections(
    store: &dyn Store,
    sink: &SinkConfig,
    producer: &str,
) -> Result<u64, ExportError> {
    let name = sink.name();
    let state = store.export_state(&name)?;
    let mut cursor = state.seq;
    if let SinkConfig::Jsonl { path, .. } = sink {
        // What the file already holds was delivered, whatever the store's cursor says.
        let in_file = jsonl::last_sequence(path, jsonl::Lines::Detections)?;
        if in_file > cursor {
            store.export_progress(&name, in_file, 0, "", now_ms())?;
            cursor = in_file;
        }
    }
    let batch = store.detections_after(cursor, now_ms() - SETTLE_MS, BATCH)?;
    let Some(last) = batch.last().map(|(seq, _)| *seq) else {
        return Ok(0);
    };
    // What an exception covered never leaves; what was judged a false positive (or benign)
    // is no sighting and no new alert, though the SIEM feeds still carry it with its alert's
    // status.
    let sightings = !matches!(sink, SinkConfig::Jsonl { .. } | SinkConfig::Syslog { .. });
    let batch: Vec<(u64, StoredDetection)> = batch
        .into_iter()
        .filter(|(_, d)| {
            d.exception_id.is_empty()
                && !(sightings && CLOSED_STATUSES.contains(&d.alert_status.as_str()))
        })
        .collect();
    if batch.is_empty() {
        return moved(store, &name, (cursor, last), 0, Ok(()));
    }
    let policies = policies(store, producer)?;
    let policy = |org: &str| policies.get(org).cloned();
    send_batch(store, sink, (&batch, cursor, last), &policy, producer)
}

/// Sends one batch of detections (after `cursor`, up to `last`) through `sink`; how many.
fn send_batch(
    store: &dyn Store,
    sink: &SinkConfig,
    (batch, cursor, last): (&[(u64, StoredDetection)], u64, u64),
    policy: &dyn Fn(&str) -> Option<Sharing>,
    producer: &str,
) -> Result<u64, ExportError> {
    let name = sink.name();
    match sink {
        SinkConfig::Misp {
            url,
            key,
            ca_cert,
            window_ms,
        } => misp::sightings(
            store,
            &name,
            (url, key.expose(), ca_cert.as_deref(), *window_ms),
            batch,
            policy,
        ),
        SinkConfig::Jsonl { path, .. } => {
            let delivered = jsonl::append(path, batch, policy);
            moved(store, &name, (cursor, last), batch.len() as u64, delivered)
        }
        SinkConfig::Taxii { .. } => {
            match taxii::post(store, &name, sink, (batch, last), policy, producer) {
                Ok(()) => Ok(batch.len() as u64),
                Err(e) => moved(store, &name, (cursor, last), 0, Err(e)),
            }
        }
        SinkConfig::Webhook {
            url,
            token,
            slack,
            ca_cert,
        } => {
            let hook = webhook::Hook {
                url: url.expose(),
                token: token.as_ref().map(|t| t.expose()),
                slack: *slack,
                ca_cert: ca_cert.as_deref(),
            };
            webhook::post_alerts(store, &name, &hook, batch, policy)
        }
        SinkConfig::Syslog {
            address,
            tls,
            ca_cert,
        } => {
            let receiver = syslog::Receiver {
                address,
                tls: *tls,
                ca_cert: ca_cert.as_deref(),
            };
            let sent = syslog::send(&receiver, batch, policy).map(|_| ());
            moved(store, &name, (cursor, last), batch.len() as u64, sent)
        }
    }
}

/// Every organisation's sharing policy, by name, as the store holds it now; `producer` names
/// the default organisation (see `orgs::sharing`).
fn policies(store: &dyn Store, producer: &str) -> Result<HashMap<String, Sharing>, ExportError> {
    Ok(store
        .list_orgs()?
        .iter()
        .map(|o| (o.name.clone(), crate::orgs::sharing(o, producer)))
        .collect())
}
