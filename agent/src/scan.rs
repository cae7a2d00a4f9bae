//! The scan pool: a fixed number of worker threads, each with its own scanner over the current
//! shared rule set, fed through one bounded queue.
//!
//! Invariants: scanning never runs on the async runtime; a full queue blocks the producer (the
//! watcher or walker), and a full detection channel blocks the workers, so a burst slows the
//! agent down instead of growing its memory. A scan that started on one rule set finishes on it;
//! the next file picks up a swapped-in set.

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tracing::{debug, warn};
use vedette_engine::{
    FileReport, FileScanner, MatchKind, RuleMatch, RuleSet, ScanOptions, SkipReason,
};
use vedette_proto::v1::{Detection, DetectionKind, FileTarget, detection};

use crate::counters::Counters;

/// Files waiting for a worker.
const QUEUE_DEPTH: usize = 1024;

/// Handle to the pool: send paths, then drop the handle and `join` to stop.
pub struct ScanPool {
    tx: Option<SyncSender<PathBuf>>,
    workers: Vec<JoinHandle<()>>,
}

impl ScanPool {
    pub fn start(
        workers: usize,
        rules: Arc<ArcSwap<RuleSet>>,
        options: ScanOptions,
        detections: mpsc::Sender<Detection>,
        counters: Arc<Counters>,
    ) -> std::io::Result<ScanPool> {
        let (tx, rx) = sync_channel::<PathBuf>(QUEUE_DEPTH);
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::new();
        for i in 0..workers.max(1) {
            let (rx, rules, detections, counters) = (
                rx.clone(),
                rules.clone(),
                detections.clone(),
                counters.clone(),
            );
            handles.push(
                std::thread::Builder::new()
                    .name(format!("scan-{i}"))
                    .spawn(move || worker(&rx, &rules, options, &detections, &counters))?,
            );
        }
        Ok(ScanPool {
            tx: Some(tx),
            workers: handles,
        })
    }

    /// A sender for producers; `send` blocks while the queue is full.
    pub fn sender(&self) -> SyncSender<PathBuf> {
        // Present until `join` takes it.
        self.tx.clone().expect("scan pool already stopped")
    }

    /// Stops accepting work, lets the workers finish what is queued, and waits for them.
    pub fn join(mut self) {
        self.tx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn next_job(rx: &Mutex<Receiver<PathBuf>>) -> Option<PathBuf> {
    rx.lock().unwrap_or_else(|p| p.into_inner()).recv().ok()
}

fn worker(
    rx: &Mutex<Receiver<PathBuf>>,
    current: &ArcSwap<RuleSet>,
    options: ScanOptions,
    detections: &mpsc::Sender<Detection>,
    counters: &Counters,
) {
    let mut carried: Option<PathBuf> = None;
    loop {
        let rules = current.load_full();
        let mut scanner = FileScanner::new(&rules, options);
        loop {
            let Some(path) = carried.take().or_else(|| next_job(rx)) else {
                return;
            };
            if !Arc::ptr_eq(&current.load(), &rules) {
                // New rules arrived: rebuild the scanner, then scan this file with them.
                carried = Some(path);
                break;
            }
            match scanner.scan_path(&path) {
                Ok(report) => {
                    counters.inc("files_scanned");
                    for d in detections_of(&path, &report, rules.bundle_version) {
                        counters.inc("detections");
                        if detections.blocking_send(d).is_err() {
                            // The shipper is gone: the agent is stopping.
                            return;
                        }
                    }
                }
                Err(reason) => {
                    counters.inc(&format!("files_skipped_{}", reason.as_str()));
                    match &reason {
                        SkipReason::Unreadable(e) => {
                            warn!(path = %path.display(), error = %e, "skipping unreadable file")
                        }
                        SkipReason::Timeout => warn!(path = %path.display(), "YARA scan timed out"),
                        _ => {
                            debug!(path = %path.display(), reason = reason.as_str(), "file skipped")
                        }
                    }
                }
            }
        }
    }
}

/// A detection of one match on one target, with a fresh id.
pub fn detection(m: RuleMatch, bundle_version: u64, target: detection::Target) -> Detection {
    Detection {
        id: uuid::Uuid::new_v4().to_string(),
        kind: kind_of(m.kind) as i32,
        rule: m.rule,
        source: m.source,
        observed_at_ms: now_ms(),
        score: m.score,
        description: m.description,
        bundle_version,
        target: Some(target),
    }
}

/// One detection per rule that matched the file.
pub fn detections_of(
    path: &std::path::Path,
    report: &FileReport,
    bundle_version: u64,
) -> Vec<Detection> {
    let raw = path.as_os_str().as_bytes();
    let raw_path = if std::str::from_utf8(raw).is_ok() {
        Vec::new()
    } else {
        raw.to_vec()
    };
    let target = FileTarget {
        path: path.to_string_lossy().into_owned(),
        raw_path,
        size: report.size,
        sha256: report.sha256.clone().unwrap_or_default(),
        md5: report.md5.clone().unwrap_or_default(),
        sha1: report.sha1.clone().unwrap_or_default(),
    };
    report
        .matches
        .iter()
        .map(|m| {
            detection(
                m.clone(),
                bundle_version,
                detection::Target::File(target.clone()),
            )
        })
        .collect()
}

pub fn kind_of(k: MatchKind) -> DetectionKind {
    match k {
        MatchKind::Yara => DetectionKind::Yara,
        MatchKind::Hash => DetectionKind::Hash,
        MatchKind::Filename => DetectionKind::Filename,
        MatchKind::Process => DetectionKind::Process,
        MatchKind::Connection => DetectionKind::Connection,
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
