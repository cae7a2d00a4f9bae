//! `vedette-agent run`: wires the stages together and runs them until shutdown.
//!
//! ```text
//! watch (inotify) ──paths──► scan pool (threads) ─┐
//! full scans (thread) ────────────────────────────┼─detections─► spool writer ─► spool (disk)
//! procmon (thread) ───────────────────────────────┘                                │
//!                                                      collector ◄── ship (gRPC) ◄─┘
//! ```
//! Every channel is bounded. Shutdown stops the watcher, lets the pool finish its queue, the
//! spool writer makes the last detections durable, and the shipper gets its drain time to have
//! them acknowledged; whatever is not acknowledged by then is sent after the next start.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vedette_engine::{FileScanner, RuleSet, ScanOptions};
use vedette_proto::client::ClientTls;
use vedette_proto::v1::{BundleStatus, Detection, RuleBundle};

use crate::config::Settings;
use crate::counters::Counters;
use crate::rules::Fleet;
use crate::scan::ScanPool;
use crate::ship::{self, ShipConfig, Spooled};
use crate::spool::Spool;
use crate::state::StateDir;
use crate::watch::FileWatch;

/// Detections buffered between the scan workers and the shipper.
const DETECTION_QUEUE: usize = 1024;

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
    let fleet = {
        let (state, local, keys, unsigned) = (
            state.clone(),
            settings.rules.clone(),
            settings.maintainer_keys.clone(),
            settings.insecure_allow_unsigned_bundles,
        );
        tokio::task::spawn_blocking(move || Fleet::start(&state, local, &keys, unsigned))
            .await
            .context("rule loading failed")??
    };
    let fleet = Arc::new(fleet);
    let rules = fleet.current.clone();
    // Bundles offered by the collector: the newest waits here, one is compiled at a time.
    let (offers, mut offered) = watch::channel::<Option<RuleBundle>>(None);
    let (status_tx, statuses) = mpsc::channel::<BundleStatus>(8);
    let applier = {
        let fleet = fleet.clone();
        tokio::spawn(async move {
            while offered.changed().await.is_ok() {
                let Some(b) = offered.borrow_and_update().clone() else {
                    continue;
                };
                let fleet = fleet.clone();
                let Ok(status) = tokio::task::spawn_blocking(move || fleet.apply(&b)).await else {
                    continue;
                };
                if status_tx.send(status).await.is_err() {
                    return;
                }
            }
        })
    };
    let counters = Arc::new(Counters::default());
    let spool_dir = state.spool();
    let cap = settings.spool_max_bytes;
    let (spool, recovery) = tokio::task::spawn_blocking(move || Spool::open(&spool_dir, cap))
        .await
        .context("spool recovery failed")?
        .context("cannot open the spool")?;
    counters.add("spool_damaged_segments", recovery.damaged_segments);
    counters.add("spool_damaged_bytes", recovery.damaged_bytes);
    counters.set("spool_pending", recovery.pending);
    let spooled = Spooled::new(spool);
    let (det_tx, det_rx) = mpsc::channel(DETECTION_QUEUE);
    let writer = {
        let (sp, counters) = (spooled.clone(), counters.clone());
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || ship::write_spool(&sp, det_rx, &counters))?
    };
    let options = ScanOptions {
        max_file_size: settings.max_file_size,
        timeout: settings.scan_timeout,
    };
    let pool = ScanPool::start(
        settings.scan_workers,
        rules.clone(),
        options,
        det_tx.clone(),
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
    let excludes = crate::walk::exclusions(&settings.exclude).map_err(anyhow::Error::msg)?;
    let watch = FileWatch::start(&roots, excludes, pool.sender(), counters.clone())?;
    let mut settings = settings;
    settings.scan_paths = settings
        .scan_paths
        .iter()
        .map(|p| std::fs::canonicalize(p).with_context(|| format!("cannot scan `{}`", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;

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
    let link = ship::BundleLink {
        fleet: fleet.clone(),
        offers,
        statuses,
    };
    let shipper = tokio::spawn(ship::run(
        ship_cfg,
        spooled.clone(),
        link,
        counters.clone(),
        shutdown.clone(),
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    if !settings.scan_paths.is_empty() {
        let (det, counters, stop) = (det_tx.clone(), counters.clone(), stop.clone());
        let cache_path = state.dir.join("scan-cache.bin");
        let settings = settings.clone();
        let fleet = fleet.clone();
        threads.push(
            std::thread::Builder::new()
                .name("full-scan".into())
                .spawn(move || {
                    // Full scans run in the background: the host's own work goes first.
                    crate::walk::lower_thread_priority(crate::walk::BACKGROUND_NICE);
                    full_scans(
                        &settings,
                        &fleet,
                        options,
                        &cache_path,
                        &det,
                        &counters,
                        &stop,
                    )
                })?,
        );
    }
    if settings.processes {
        let (rules, det, counters, stop) = (
            rules.clone(),
            det_tx.clone(),
            counters.clone(),
            stop.clone(),
        );
        let interval = settings.process_interval;
        threads.push(
            std::thread::Builder::new()
                .name("procmon".into())
                .spawn(move || {
                    watch_processes(interval, &rules, options, &det, &counters, &stop)
                })?,
        );
    }
    drop(det_tx);

    shutdown.cancelled().await;
    info!("stopping");
    stop.store(true, Ordering::Relaxed);
    drop(watch);
    let _ = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    })
    .await;
    // The workers finish what is queued; their detections still reach the spool.
    let _ = tokio::task::spawn_blocking(move || {
        pool.join();
        let _ = writer.join();
    })
    .await;
    let _ = shipper.await;
    applier.abort();
    if let Err(e) = spooled.spool.sync() {
        warn!(error = %e, "cannot save the spool's ack mark; some detections will be sent twice (stored once)");
    }
    info!(
        scanned = counters.get("files_scanned"),
        detections = counters.get("detections"),
        acked = counters.get("detections_acked"),
        pending = spooled.spool.pending(),
        "agent stopped"
    );
    Ok(())
}

/// Sleeps up to `d`, waking early when `stop` is set (returns false) or `wake` is (true).
fn pause(d: Duration, stop: &AtomicBool, wake: Option<&AtomicBool>) -> bool {
    // No end: `d` too long to represent (waits for `stop` or `wake` only).
    let end = std::time::Instant::now().checked_add(d);
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        if wake.is_some_and(|w| w.load(Ordering::Relaxed)) {
            return true;
        }
        let left = match end {
            Some(e) => e.saturating_duration_since(std::time::Instant::now()),
            None => Duration::MAX,
        };
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100).min(left));
    }
}

/// Full scans at start-up, on the interval, and after a new rule bundle, at the configured CPU
/// budget. Results are cached in the state directory under the rule set's fingerprint, so
/// unchanged files are not rescanned with the same rules, and are with new ones.
fn full_scans(
    settings: &Settings,
    fleet: &Fleet,
    options: ScanOptions,
    cache_path: &Path,
    det: &mpsc::Sender<Detection>,
    counters: &Counters,
    stop: &AtomicBool,
) {
    let walk = crate::walk::WalkOptions {
        threads: settings.scan_workers,
        one_file_system: true,
        excludes: settings.exclude.clone(),
        max_cpu_percent: settings.max_cpu_percent,
        scan: options,
    };
    let mut first = true;
    loop {
        if !first || !settings.scan_on_start {
            // Without an interval, only a new bundle starts a scan.
            let wait = settings.scan_interval.unwrap_or(Duration::MAX);
            if !pause(wait, stop, Some(&fleet.rescan)) {
                return;
            }
        }
        first = false;
        fleet.rescan.store(false, Ordering::Relaxed);
        let current = fleet.current.load_full();
        let cache = crate::cache::ScanCache::load(cache_path, current.fingerprint());
        let started = std::time::Instant::now();
        let on_file = |path: &Path, outcome: crate::walk::Outcome| {
            if let crate::walk::Outcome::Scanned {
                report,
                cached: false,
            } = outcome
            {
                for d in crate::scan::detections_of(path, &report, current.bundle_version) {
                    counters.inc("detections");
                    let _ = det.blocking_send(d);
                }
            }
        };
        let result = crate::walk::scan_tree(
            &settings.scan_paths,
            &walk,
            &current,
            Some(&cache),
            counters,
            stop,
            &on_file,
        );
        if let Err(e) = result {
            warn!(error = %e, "full scan failed");
        }
        if let Err(e) = cache.save(cache_path) {
            warn!(path = %cache_path.display(), error = %e, "cannot save the scan cache");
        }
        counters.inc("full_scans");
        info!(
            seconds = started.elapsed().as_secs_f64(),
            cached_files = cache.len(),
            "full scan finished"
        );
    }
}

/// Polls processes and connections; each process is judged once.
fn watch_processes(
    interval: Duration,
    rules: &ArcSwap<RuleSet>,
    options: ScanOptions,
    det: &mpsc::Sender<Detection>,
    counters: &Counters,
    stop: &AtomicBool,
) {
    loop {
        let current = rules.load_full();
        let mut judge = crate::procmon::ProcessJudge::new(&current);
        let mut scanner = FileScanner::new(&current, options);
        loop {
            let mut found = judge.new_processes(&mut scanner);
            found.extend(judge.c2_connections(&current));
            for d in found {
                counters.inc("detections");
                if det.blocking_send(d).is_err() {
                    return;
                }
            }
            if !pause(interval, stop, None) {
                return;
            }
            if !Arc::ptr_eq(&rules.load(), &current) {
                break;
            }
        }
    }
}
