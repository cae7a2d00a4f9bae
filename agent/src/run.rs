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
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vedette_engine::{FileScanner, RuleSet, RuleSetBuilder, ScanOptions};
use vedette_proto::client::ClientTls;
use vedette_proto::v1::Detection;

use crate::config::Settings;
use crate::counters::Counters;
use crate::scan::ScanPool;
use crate::ship::{self, ShipConfig, Spooled};
use crate::spool::Spool;
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
    let shipper = tokio::spawn(ship::run(
        ship_cfg,
        spooled.clone(),
        counters.clone(),
        shutdown.clone(),
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    if !settings.scan_paths.is_empty()
        && (settings.scan_on_start || settings.scan_interval.is_some())
    {
        let (rules, det, counters, stop) = (
            rules.clone(),
            det_tx.clone(),
            counters.clone(),
            stop.clone(),
        );
        let cache_path = state.dir.join("scan-cache.bin");
        let settings = settings.clone();
        threads.push(
            std::thread::Builder::new()
                .name("full-scan".into())
                .spawn(move || {
                    full_scans(
                        &settings,
                        &rules,
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

/// Sleeps up to `d`, waking early when `stop` is set. Returns false when stopping.
fn pause(d: Duration, stop: &AtomicBool) -> bool {
    let end = std::time::Instant::now() + d;
    while std::time::Instant::now() < end {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100).min(end - std::time::Instant::now()));
    }
    !stop.load(Ordering::Relaxed)
}

/// Full scans at start-up and on the interval, at the configured CPU budget. Results are cached
/// in the state directory, so unchanged files are neither rescanned nor reported twice.
fn full_scans(
    settings: &Settings,
    rules: &ArcSwap<RuleSet>,
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
            match settings.scan_interval {
                Some(d) if pause(d, stop) => {}
                _ => return,
            }
        }
        first = false;
        let current = rules.load_full();
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
            if !pause(interval, stop) {
                return;
            }
            if !Arc::ptr_eq(&rules.load(), &current) {
                break;
            }
        }
    }
}
