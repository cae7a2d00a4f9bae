//! `vedette-agent run`: wires the stages together and runs them until shutdown.
//!
//! ```text
//! watch (inotify) ──paths──► scan pool (threads) ──detections──► ship (gRPC stream) ──► collector
//! ```
//! Every channel is bounded. Shutdown stops the watcher, lets the pool finish its queue, and gives
//! the shipper its drain time to get the last detections acknowledged.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vedette_engine::{RuleSet, RuleSetBuilder, ScanOptions};
use vedette_proto::client::ClientTls;

use crate::config::Settings;
use crate::counters::Counters;
use crate::scan::ScanPool;
use crate::ship::{self, ShipConfig};
use crate::state::StateDir;
use crate::watch::FileWatch;

/// Detections buffered between the scan workers and the shipper.
const DETECTION_QUEUE: usize = 1024;

/// Loads host-local rules; problems are logged and the rest still loads.
pub fn load_rules(paths: &[std::path::PathBuf]) -> anyhow::Result<RuleSet> {
    let mut b = RuleSetBuilder::new();
    for p in paths {
        b.add_path(p)?;
    }
    let rules = b.build(0);
    let r = rules.report();
    for p in &r.problems {
        warn!(problem = %p, "rule file not loaded");
    }
    info!(
        files = r.yara_files,
        with_errors = r.yara_files_with_errors,
        rules = r.yara_rules,
        "YARA rules loaded"
    );
    Ok(rules)
}

pub async fn run(
    state: StateDir,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let creds = state.load()?;
    let collectors = if settings.collectors.is_empty() {
        creds.enrollment.collectors.clone()
    } else {
        settings.collectors.clone()
    };
    info!(agent = %creds.enrollment.agent_id, collectors = ?collectors, "starting agent");
    let paths = settings.rules.clone();
    let rules = tokio::task::spawn_blocking(move || load_rules(&paths))
        .await
        .context("rule loading failed")??;
    let rules = Arc::new(ArcSwap::from_pointee(rules));
    let counters = Arc::new(Counters::default());
    let (det_tx, det_rx) = mpsc::channel(DETECTION_QUEUE);
    let options = ScanOptions {
        max_file_size: settings.max_file_size,
        timeout: settings.scan_timeout,
    };
    let pool = ScanPool::start(
        settings.scan_workers,
        rules.clone(),
        options,
        det_tx,
        counters.clone(),
    )
    .context("cannot start scan workers")?;
    // Absolute, resolved roots: detections then carry clean absolute paths.
    let roots = settings
        .watch
        .iter()
        .map(|p| {
            std::fs::canonicalize(p).with_context(|| format!("cannot watch `{}`", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let watch = FileWatch::start(&roots, pool.sender(), counters.clone())?;

    let ship_cfg = ShipConfig {
        collectors,
        tls: ClientTls {
            ca_pem: creds.ca_pem,
            identity: Some((creds.cert_pem, creds.key_pem)),
        },
        heartbeat: settings.heartbeat,
        backoff_min: Duration::from_millis(500),
        backoff_max: settings.backoff_max,
        drain: Duration::from_secs(5),
    };
    let shipper = tokio::spawn(ship::run(
        ship_cfg,
        det_rx,
        counters.clone(),
        shutdown.clone(),
    ));

    shutdown.cancelled().await;
    info!("stopping");
    drop(watch);
    // The workers finish what is queued; their detections still reach the shipper.
    let _ = tokio::task::spawn_blocking(move || pool.join()).await;
    let _ = shipper.await;
    info!(
        scanned = counters.get("files_scanned"),
        detections = counters.get("detections"),
        acked = counters.get("detections_acked"),
        "agent stopped"
    );
    Ok(())
}
