//! The scan pool: a fixed number of worker threads, each with its own scanner over the current
//! shared rule set, fed with [`Job`]s through one bounded queue (by the watcher or fanotify).
//!
//! Invariants: scanning never runs on the async runtime; a full queue blocks the producer, and a
//! full detection channel blocks the workers, so a burst slows the agent down instead of growing
//! its memory. A scan that started on one rule set finishes on it; the next file picks up a
//! swapped-in set. A worker idle for [`IDLE`] drops its scanner, and every worker releases its
//! scanner when the agent goes over its memory ceiling ([`crate::governor`]).
//!
//! A burst (a package install, an archive unpacked, a build) can queue thousands of files at
//! once. While more than [`BACKLOG`] wait, helper threads join the workers (at most
//! [`MAX_HELPERS`], and one thread per core in all: each holds a scanner), at the low priority
//! of background scans: they take the cores the host leaves idle, and give them back to the
//! host's own work first. With the backlog gone, they drop their scanners and wait again.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use vedette_engine::{FileScanner, RuleSet, ScanOptions};
use vedette_proto::v1::Detection;

use crate::detect::ReportFilter;
use crate::detect::examine::{examine_file, examine_open_file};
use crate::detect::procmon::{Reading, Users, exe_matches, exec_detections};
use crate::governor::governor;
use crate::telemetry::{Counter, Counters};

/// Files waiting for a worker.
const QUEUE_DEPTH: usize = 1024;

/// A worker with no file for this long releases its scanner.
const IDLE: Duration = Duration::from_secs(30);

/// Files waiting past which helpers join the workers.
const BACKLOG: u64 = 64;
/// Most helpers.
const MAX_HELPERS: usize = 4;
/// Longest a helper waits for a backlog before it looks whether the pool stopped.
const HELPER_WAKE: Duration = Duration::from_secs(1);

/// One piece of work.
pub enum Job {
    /// A file to open and scan (inotify, rescans).
    Path(PathBuf),
    /// A file closed after writing, open (fanotify); read through the descriptor.
    Written { file: File, path: PathBuf },
    /// An executable opened for execution by `pid` (fanotify).
    Exec { file: File, path: PathBuf, pid: u32 },
}

/// Where producers put jobs: the pool's bounded queue, with its depth counted
/// ([`Counter::ScanQueue`]).
#[derive(Clone)]
pub struct JobSender {
    tx: SyncSender<Job>,
    counters: Arc<Counters>,
    /// Woken when the queue holds [`BACKLOG`] files (None: no helpers).
    backlog: Option<Arc<Backlog>>,
}

impl JobSender {
    /// A sender over a queue of its own (tests, and producers outside the pool).
    pub fn new(tx: SyncSender<Job>, counters: Arc<Counters>) -> JobSender {
        JobSender {
            tx,
            counters,
            backlog: None,
        }
    }

    /// Queues `job`, waiting while the queue is full; an error once the pool has stopped.
    pub fn send(&self, job: Job) -> Result<(), std::sync::mpsc::SendError<Job>> {
        self.counters.inc(Counter::ScanQueue);
        if let Some(b) = &self.backlog
            && self.counters.get(Counter::ScanQueue) == BACKLOG
        {
            b.wake.notify_all();
        }
        let sent = self.tx.send(job);
        if sent.is_err() {
            self.counters.sub(Counter::ScanQueue, 1);
        }
        sent
    }
}

/// Where helpers wait for a backlog.
#[derive(Default)]
struct Backlog {
    lock: Mutex<()>,
    wake: Condvar,
    stopped: AtomicBool,
}

/// Handle to the pool: send jobs, then [`ScanPool::join`] to stop.
pub struct ScanPool {
    tx: JobSender,
    workers: Vec<JoinHandle<()>>,
    backlog: Arc<Backlog>,
}

/// What every worker shares.
struct Shared {
    rx: Mutex<Receiver<Job>>,
    rules: Arc<ArcSwap<RuleSet>>,
    options: ScanOptions,
    detections: mpsc::Sender<Detection>,
    reports: ReportFilter,
    counters: Arc<Counters>,
    users: Users,
}

impl ScanPool {
    /// `workers` threads that scan with the current `rules` and send what `reports` says is
    /// new to `detections`, and helpers for backlogs (see the module's text).
    pub fn start(
        workers: usize,
        rules: Arc<ArcSwap<RuleSet>>,
        options: ScanOptions,
        detections: mpsc::Sender<Detection>,
        reports: ReportFilter,
        counters: Arc<Counters>,
    ) -> std::io::Result<ScanPool> {
        let (tx, rx) = sync_channel::<Job>(QUEUE_DEPTH);
        let shared = Arc::new(Shared {
            rx: Mutex::new(rx),
            rules,
            options,
            detections,
            reports,
            counters,
            users: Users::load(),
        });
        let backlog = Arc::new(Backlog::default());
        let mut tx = JobSender::new(tx, shared.counters.clone());
        tx.backlog = Some(backlog.clone());
        let workers = workers.max(1);
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let mut handles = Vec::new();
        for i in 0..workers {
            let shared = shared.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("scan-{i}"))
                    .spawn(move || worker(&shared, None))?,
            );
        }
        for i in 0..cores.saturating_sub(workers).min(MAX_HELPERS) {
            let (shared, backlog) = (shared.clone(), backlog.clone());
            handles.push(
                std::thread::Builder::new()
                    .name(format!("scan-helper-{i}"))
                    .spawn(move || worker(&shared, Some(&backlog)))?,
            );
        }
        Ok(ScanPool {
            tx,
            workers: handles,
            backlog,
        })
    }

    /// A sender for producers; `send` blocks while the queue is full.
    pub fn sender(&self) -> JobSender {
        self.tx.clone()
    }

    /// Stops accepting work, lets the workers finish what is queued, and waits for them.
    pub fn join(self) {
        self.backlog.stopped.store(true, Ordering::Relaxed);
        self.backlog.wake.notify_all();
        drop(self.tx);
        for w in self.workers {
            let _ = w.join();
        }
    }
}

/// What waiting for the next job gave.
enum Next {
    Job(Job),
    /// Nothing came within the idle time.
    Idle,
    /// The queue is closed: the agent is stopping.
    Stop,
}

/// A worker (`backlog` None), or a helper: at background priority, it takes files only while
/// a backlog lasts, and drops its scanner when the queue is empty.
fn worker(shared: &Shared, backlog: Option<&Backlog>) {
    if backlog.is_some() {
        crate::detect::full_scan::lower_thread_priority(crate::detect::full_scan::BACKGROUND_NICE);
    }
    let wait = if backlog.is_some() { HELPER_WAKE } else { IDLE };
    let gov = governor();
    let mut carried: Option<Job> = None;
    loop {
        // Waiting with no scanner and no rule set held: an idle worker keeps neither the
        // YARA scanner's memory nor, after a swap, the previous rules alive.
        let first = match carried.take() {
            Some(job) => job,
            None => {
                if let Some(b) = backlog
                    && !b.wait(&shared.counters)
                {
                    return;
                }
                match shared.next(backlog.map(|_| HELPER_WAKE)) {
                    Next::Job(job) => job,
                    // A helper whose backlog was taken by the others.
                    Next::Idle if backlog.is_some() => continue,
                    Next::Idle | Next::Stop => return,
                }
            }
        };
        let rules = shared.rules.load_full();
        let mut scanner = FileScanner::new(&rules, shared.options);
        let mut made = gov.generation();
        let mut job = Some(first);
        while let Some(this) = job.take() {
            if backlog.is_some() {
                shared.counters.inc(Counter::HelperScans);
            }
            let found = gov.paced(|| shared.judge(this, &mut scanner, &rules));
            for d in found {
                shared.counters.inc(Counter::Detections);
                if shared.detections.blocking_send(d).is_err() {
                    // The spool writer is gone: the agent is stopping.
                    return;
                }
            }
            if gov.release_due(&mut made, &shared.counters)
                || (backlog.is_some() && shared.counters.get(Counter::ScanQueue) == 0)
            {
                break;
            }
            match shared.next(Some(wait)) {
                // New rules arrived: rebuild the scanner, then do this job with them.
                Next::Job(next) if !Arc::ptr_eq(&shared.rules.load(), &rules) => {
                    carried = Some(next);
                }
                Next::Job(next) => job = Some(next),
                Next::Idle => gov.want_trim(),
                Next::Stop => return,
            }
        }
    }
}

impl Backlog {
    /// Waits until more than [`BACKLOG`] files wait; false once the pool stopped.
    fn wait(&self, counters: &Counters) -> bool {
        let mut held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while counters.get(Counter::ScanQueue) < BACKLOG {
            if self.stopped.load(Ordering::Relaxed) {
                return false;
            }
            held = self
                .wake
                .wait_timeout(held, HELPER_WAKE)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

impl Shared {
    /// The next job, waiting at most `idle` (forever: None).
    fn next(&self, idle: Option<Duration>) -> Next {
        let rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        let job = match idle {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => rx.recv_timeout(d),
        };
        match job {
            Ok(job) => {
                self.counters.sub(Counter::ScanQueue, 1);
                Next::Job(job)
            }
            Err(RecvTimeoutError::Timeout) => Next::Idle,
            Err(RecvTimeoutError::Disconnected) => Next::Stop,
        }
    }

    /// The detections one job makes.
    fn judge(&self, job: Job, scanner: &mut FileScanner<'_>, rules: &RuleSet) -> Vec<Detection> {
        let counters = &self.counters;
        match job {
            Job::Path(path) => {
                if self.reports.unchanged(&path, rules) {
                    // A rescan (after an overflow, say) of a file scanned with these rules.
                    counters.inc(Counter::CacheHits);
                    return Vec::new();
                }
                match examine_file(scanner, &path, counters) {
                    Ok(report) => self.reports.file(&path, &report, rules),
                    Err(_) => Vec::new(),
                }
            }
            Job::Written { file, path } => {
                match examine_open_file(scanner, file, &path, counters) {
                    Ok(report) => self.reports.file(&path, &report, rules),
                    Err(_) => Vec::new(),
                }
            }
            Job::Exec { file, path, pid } => {
                if self.reports.unjudged.take(pid, &file) {
                    // Prevention let it run without a verdict, and judges and reports it.
                    return Vec::new();
                }
                let kept = file.try_clone().ok();
                let (matches, sha256) =
                    exe_matches(&self.reports.execs, scanner, file, &path, Reading::Whole);
                self.reports.ran(pid, &path, kept.as_ref(), &sha256);
                if matches.is_empty() {
                    return Vec::new();
                }
                let exec = crate::detect::procmon::Exec {
                    pid,
                    path: &path,
                    sha256,
                };
                exec_detections(&self.reports.ids, &self.users, &exec, matches, rules)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Instant;

    use super::*;
    use crate::detect::Ids;
    use crate::detect::cache::ScanCache;

    #[test]
    fn a_backlog_brings_helpers_that_scan_beside_the_workers_and_every_file_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = vedette_engine::RuleSetBuilder::new();
        b.add_yara_source(Path::new("all.yar"), b"rule every_file { condition: true }");
        let rules = Arc::new(ArcSwap::from_pointee(b.build(0)));
        // Room for one detection: a thread that made a second waits until the test reads.
        let (det_tx, mut det_rx) = mpsc::channel(1);
        let counters = Arc::new(Counters::default());
        let reports = ReportFilter {
            ids: Ids::for_agent("pool-test"),
            cache: Arc::new(ScanCache::new()),
            execs: Arc::new(ScanCache::keeping_digests()),
            unjudged: Arc::default(),
            history: None,
        };
        let pool = ScanPool::start(
            1,
            rules,
            ScanOptions::default(),
            det_tx,
            reports,
            counters.clone(),
        )
        .unwrap();
        let n = 200u64;
        let tx = pool.sender();
        for i in 0..n {
            let path = dir.path().join(format!("f{i}"));
            std::fs::write(&path, format!("file {i}")).unwrap();
            tx.send(Job::Path(path)).unwrap();
        }
        // Every thread (the worker, and one helper per core beyond it, at most MAX_HELPERS)
        // takes a file and waits to hand over its detection, except the first to hand one over,
        // which takes a second: the worker or a helper, whichever was first.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let helpers = (cores - 1).min(MAX_HELPERS) as u64;
        let want = n - 2 - helpers;
        let deadline = Instant::now() + Duration::from_secs(20);
        while counters.get(Counter::ScanQueue) != want
            || !(helpers..=helpers + u64::from(helpers > 0))
                .contains(&counters.get(Counter::HelperScans))
        {
            assert!(
                Instant::now() < deadline,
                "{} files waiting, not {want}, {} taken by helpers, not {helpers} (or one more): \
                 no helper took the backlog",
                counters.get(Counter::ScanQueue),
                counters.get(Counter::HelperScans)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut paths = std::collections::BTreeSet::new();
        for _ in 0..n {
            let d = det_rx.blocking_recv().expect("a detection");
            let Some(vedette_proto::v1::detection::Target::File(f)) = d.target else {
                panic!("not a file detection: {d:?}");
            };
            paths.insert(f.path);
        }
        assert_eq!(paths.len() as u64, n, "each file once");
        drop(tx);
        pool.join();
        assert!(det_rx.try_recv().is_err(), "nothing more");
    }
}
