//! The collector's own polls of threat-intelligence sources: TAXII 2.1 collections
//! (`taxii.rs`) and MISP feeds (`misp.rs`). Each poll fetches only what is new since the last
//! one (TAXII `added_after`, the feed manifest's event timestamps), stages it with the cursor in
//! one transaction, and on failure records the error and retries with backoff, keeping
//! everything staged before.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vedette_engine::import;

use super::stage::{IntelBatch, stage};
use crate::config::{IntelSourceConfig, IntelSourceKind};
use crate::http::HttpError;
use crate::server::SharedStore;
use crate::store::{Store, now_ms};

/// Why a poll failed (what it staged before stays).
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("`{}`: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a TAXII 2.1 API root")]
    NotTaxii(String),
    #[error("{0}: `more` without `next` or a date")]
    NoNextPage(String),
    /// A feed or event the importer cannot read.
    #[error(transparent)]
    Import(#[from] vedette_engine::ParseError),
}

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
                let why = e.to_string();
                let _ =
                    tokio::task::spawn_blocking(move || s.intel_error(&o, k, &why, now_ms())).await;
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

/// One poll: fetches what is new and stages it; returns how many indicators were accepted.
pub fn poll_once(store: &dyn Store, source: &IntelSourceConfig) -> Result<u64, PollError> {
    let cursor = store.intel_cursor(&source.origin())?;
    match &source.kind {
        IntelSourceKind::Taxii { api_root, auth, .. } => {
            super::taxii::poll(store, source, api_root, auth, cursor)
        }
        IntelSourceKind::MispFeed { location } => {
            super::misp::poll(store, source, location, &cursor)
        }
    }
}

/// Stages what one page or event brought, with the cursor to resume from.
pub(super) fn stage_imported(
    store: &dyn Store,
    source: &IntelSourceConfig,
    imported: &import::Imported,
    continued: bool,
    cursor: &str,
) -> Result<u64, PollError> {
    let origin = source.origin();
    let lines: Vec<String> = imported.accepted.iter().map(|l| l.to_json()).collect();
    let staged = stage(
        store,
        IntelBatch {
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
    )?;
    for (id, why) in imported.rejected.iter().take(20) {
        warn!(%origin, %id, reason = %why, "indicator not imported");
    }
    Ok(lines.len() as u64 - staged.refused.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_polls_back_off_up_to_the_interval() {
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
