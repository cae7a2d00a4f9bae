//! The scan pool: a fixed number of worker threads, each with its own scanner over the current
//! shared rule set, fed with paths through one bounded queue (by the watcher).
//!
//! Invariants: scanning never runs on the async runtime; a full queue blocks the producer, and a
//! full detection channel blocks the workers, so a burst slows the agent down instead of growing
//! its memory. A scan that started on one rule set finishes on it; the next file picks up a
//! swapped-in set.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use vedette_engine::{FileScanner, RuleSet, ScanOptions};
use vedette_proto::v1::Detection;

use crate::detect::Incidents;
use crate::detect::scan::scan_file;
use crate::telemetry::{Counter, Counters};

/// Files waiting for a worker.
const QUEUE_DEPTH: usize = 1024;

/// Handle to the pool: send paths, then [`ScanPool::join`] to stop.
pub struct ScanPool {
    tx: SyncSender<PathBuf>,
    workers: Vec<JoinHandle<()>>,
}

/// What every worker shares.
struct Shared {
    rx: Mutex<Receiver<PathBuf>>,
    rules: Arc<ArcSwap<RuleSet>>,
    options: ScanOptions,
    detections: mpsc::Sender<Detection>,
    incidents: Incidents,
    counters: Arc<Counters>,
}

impl ScanPool {
    /// `workers` threads that scan with the current `rules` and send what `incidents` says is
    /// new to `detections`.
    pub fn start(
        workers: usize,
        rules: Arc<ArcSwap<RuleSet>>,
        options: ScanOptions,
        detections: mpsc::Sender<Detection>,
        incidents: Incidents,
        counters: Arc<Counters>,
    ) -> std::io::Result<ScanPool> {
        let (tx, rx) = sync_channel::<PathBuf>(QUEUE_DEPTH);
        let shared = Arc::new(Shared {
            rx: Mutex::new(rx),
            rules,
            options,
            detections,
            incidents,
            counters,
        });
        let mut handles = Vec::new();
        for i in 0..workers.max(1) {
            let shared = shared.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("scan-{i}"))
                    .spawn(move || worker(&shared))?,
            );
        }
        Ok(ScanPool {
            tx,
            workers: handles,
        })
    }

    /// A sender for producers; `send` blocks while the queue is full.
    pub fn sender(&self) -> SyncSender<PathBuf> {
        self.tx.clone()
    }

    /// Stops accepting work, lets the workers finish what is queued, and waits for them.
    pub fn join(self) {
        drop(self.tx);
        for w in self.workers {
            let _ = w.join();
        }
    }
}

fn next_job(rx: &Mutex<Receiver<PathBuf>>) -> Option<PathBuf> {
    rx.lock().unwrap_or_else(|p| p.into_inner()).recv().ok()
}

fn worker(shared: &Shared) {
    let mut carried: Option<PathBuf> = None;
    loop {
        let rules = shared.rules.load_full();
        let mut scanner = FileScanner::new(&rules, shared.options);
        loop {
            let Some(path) = carried.take().or_else(|| next_job(&shared.rx)) else {
                return;
            };
            if !Arc::ptr_eq(&shared.rules.load(), &rules) {
                // New rules arrived: rebuild the scanner, then scan this file with them.
                carried = Some(path);
                break;
            }
            if shared.incidents.unchanged(&path, &rules) {
                // A rescan (after an overflow, say) of a file scanned with these rules.
                shared.counters.inc(Counter::CacheHits);
                continue;
            }
            let Ok(report) = scan_file(&mut scanner, &path, &shared.counters) else {
                continue;
            };
            for d in shared.incidents.file(&path, &report, &rules) {
                shared.counters.inc(Counter::Detections);
                if shared.detections.blocking_send(d).is_err() {
                    // The spool writer is gone: the agent is stopping.
                    return;
                }
            }
        }
    }
}
