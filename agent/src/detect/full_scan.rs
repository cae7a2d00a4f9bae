//! Full scans: every file below the scan paths, judged with the current rules; unchanged files
//! are answered from the [`ScanCache`].
//!
//! Walker threads only list and stat; scanner threads (each with its own YARA scanner, which
//! cannot move between threads) take files from a bounded queue. Defaults protect the host: the
//! walk's rules ([`walk`](crate::detect::walk)), a size cap per file, and an optional CPU budget
//! that makes each thread pause in proportion to the time it spent scanning. In the daemon, full
//! scans run at a low priority at start, on an interval, and after every new rule bundle.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vedette_engine::digests::DigestMemo;
use vedette_engine::{FileReport, FileScanner, RuleMatch, RuleSet, ScanOptions, SkipReason};
use vedette_proto::v1::Detection;

use crate::detect::cache::{ScanCache, Stamp, rules_tag};
use crate::detect::examine::examine_file;
use crate::detect::walk::{Found, WalkRules, each_file_parallel};
use crate::detect::{Ids, ReportFilter, file_detections};
use crate::governor::governor;
use crate::rules::ActiveRules;
use crate::rules::costs::{Sample, SharedSample};
use crate::telemetry::{Counter, Counters};

/// Files listed and waiting for a scanner thread.
const QUEUE_DEPTH: usize = 4096;

/// Longest a full scan's thread waits, before each file, for the real-time queue to empty: a
/// host that never stops writing files still gets its full scans, at one file per thread per
/// this long at the least.
const MAX_YIELD: Duration = Duration::from_secs(2);
/// How often a waiting full scan's thread looks at the real-time queue again.
const YIELD_POLL: Duration = Duration::from_millis(2);

/// How a full scan runs.
#[derive(Debug, Clone)]
pub struct ScanPlan {
    pub threads: usize,
    pub walk: WalkRules,
    /// Percentage of one core all scanning work together may use (1..=100): the agent's
    /// [`budget`](crate::budget), shared by every scan thread and the rule compiler.
    pub max_cpu_percent: u32,
    /// Limits per file.
    pub scan: ScanOptions,
}

/// Nice value of the agent's background scans: low CPU priority, and, with no I/O priority set,
/// Linux derives a low best-effort I/O priority from it.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's CPU (and so I/O) priority to `nice`, never raising it; threads
/// it starts inherit it.
pub fn lower_thread_priority(nice: i32) {
    let tid = rustix::thread::gettid();
    let current = rustix::process::getpriority_process(Some(tid)).unwrap_or(0);
    if current >= nice {
        return;
    }
    if let Err(e) = rustix::process::setpriority_process(Some(tid), nice) {
        warn!(error = %e, "cannot lower the scan threads' priority");
    }
}

/// One file's outcome, as a full scan reports it.
pub enum Outcome {
    /// Scanned now, or answered from the cache. `new` are the matches not found in this state
    /// of the file before (none for a cache hit; all of them without a cache).
    Scanned {
        report: FileReport,
        new: Vec<RuleMatch>,
    },
    /// Not scanned (counted under its reason).
    Skipped,
}

/// What a scan needs besides its plan: the rules, the cache, the counters and the stop signal.
pub struct ScanContext<'a> {
    pub rules: ScanRules<'a>,
    pub cache: Option<&'a ScanCache>,
    pub counters: &'a Counters,
    pub stop: &'a CancellationToken,
    /// Digests computed while the rules loaded, used for files still in that state.
    pub digests: Option<&'a DigestMemo>,
}

/// A deferred rule set load: returns the rule set.
type Load<'a> = Box<dyn FnOnce() -> RuleSet + Send + 'a>;

/// The rules of a scan: loaded already, or loaded when the first file misses the cache. A scan
/// whose every file is unchanged since the cached scan then never loads (or compiles) them.
pub struct ScanRules<'a> {
    /// The cache tag of the rule set ([`rules_tag`]), known before it is loaded.
    tag: u64,
    ready: Option<&'a RuleSet>,
    loaded: OnceLock<RuleSet>,
    load: Mutex<Option<Load<'a>>>,
}

impl<'a> ScanRules<'a> {
    pub fn ready(rules: &'a RuleSet) -> ScanRules<'a> {
        ScanRules {
            tag: rules_tag(rules),
            ready: Some(rules),
            loaded: OnceLock::new(),
            load: Mutex::new(None),
        }
    }

    pub fn owned(rules: RuleSet) -> ScanRules<'a> {
        let tag = rules_tag(&rules);
        let loaded = OnceLock::new();
        let _ = loaded.set(rules);
        ScanRules {
            tag,
            ready: None,
            loaded,
            load: Mutex::new(None),
        }
    }

    /// Rules loaded by `load` when first needed; `fingerprint` must be the one they will have
    /// ([`vedette_engine::RuleSetBuilder::fingerprint`]).
    pub fn lazy(fingerprint: [u8; 32], load: Load<'a>) -> ScanRules<'a> {
        let mut b = [0u8; 8];
        b.copy_from_slice(&fingerprint[..8]);
        ScanRules {
            tag: u64::from_le_bytes(b),
            ready: None,
            loaded: OnceLock::new(),
            load: Mutex::new(Some(load)),
        }
    }

    pub fn tag(&self) -> u64 {
        self.tag
    }

    /// The rule set, loading it now if it was not (other callers wait for that load).
    pub fn get(&self) -> &RuleSet {
        if let Some(r) = self.ready {
            return r;
        }
        self.loaded.get_or_init(|| {
            let load = self.load.lock().unwrap_or_else(|p| p.into_inner()).take();
            load.map_or_else(RuleSet::empty, |f| f())
        })
    }

    /// The rule set if it is loaded.
    pub fn loaded(&self) -> Option<&RuleSet> {
        self.ready.or_else(|| self.loaded.get())
    }
}

/// Walks `roots`, scanning every regular file, and calls `on_file` for each (from several
/// threads). `stop` ends the scan early.
pub fn scan_tree(
    roots: &[PathBuf],
    plan: &ScanPlan,
    cx: &ScanContext<'_>,
    on_file: &(dyn Fn(&Path, Outcome) + Sync),
) {
    let threads = plan.threads.max(1);
    crate::budget::budget().set_percent(plan.max_cpu_percent);
    let (tx, rx) = sync_channel::<Found>(QUEUE_DEPTH);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| scanner_thread(&rx, plan, cx, on_file));
        }
        let visit = |found: Found| {
            charge_walk(cx.counters);
            if let Some(hit) = cached(cx, plan, &found) {
                on_file(&found.path, hit);
                return true;
            }
            tx.send(found).is_ok()
        };
        each_file_parallel(roots, &plan.walk, threads, cx.counters, cx.stop, &visit);
        drop(tx);
    });
}

thread_local! {
    /// The walker thread's CPU time at its last charge.
    static WALK_CPU: std::cell::Cell<Duration> = const { std::cell::Cell::new(Duration::ZERO) };
}

/// Charges the walk (listing, stat, cache lookups) to the CPU budget, as the scans are: the
/// calling walker thread's CPU time since its last charge; pauses it when over.
fn charge_walk(counters: &crate::telemetry::Counters) {
    let now = crate::budget::thread_time();
    let last = WALK_CPU.with(|c| c.replace(now));
    if last.is_zero() || now < last {
        return;
    }
    let pause = crate::budget::budget().charge(now - last);
    if !pause.is_zero() {
        std::thread::sleep(pause);
        counters.add(Counter::ScanThrottledMs, pause.as_millis() as u64);
    }
}

/// The cache's answer for an unchanged file. A file too large to scan, whose name matched
/// nothing, is skipped again as too large (without loading the rules to judge its name).
fn cached(cx: &ScanContext<'_>, plan: &ScanPlan, found: &Found) -> Option<Outcome> {
    let (cache, stamp) = (cx.cache?, found.stamp.as_ref()?);
    let hit = cache.get(stamp, cx.rules.tag())?;
    if stamp.size > plan.scan.max_file_size && hit.matches.is_empty() {
        cx.counters.inc(Counter::SkippedTooLarge);
        return Some(Outcome::Skipped);
    }
    cx.counters.inc(Counter::CacheHits);
    let report = FileReport {
        size: stamp.size,
        device: stamp.dev,
        inode: stamp.ino,
        mtime_ns: stamp.mtime_ns,
        ctime_ns: stamp.ctime_ns,
        matches: hit.matches,
        sha256: Some(hit.sha256).filter(|s| !s.is_empty()),
        ..Default::default()
    };
    Some(Outcome::Scanned {
        report,
        new: Vec::new(),
    })
}

fn scanner_thread(
    rx: &Mutex<Receiver<Found>>,
    plan: &ScanPlan,
    cx: &ScanContext<'_>,
    on_file: &(dyn Fn(&Path, Outcome) + Sync),
) {
    // Made at the first file to scan: the rules are loaded then, if they were not.
    let mut scanner: Option<FileScanner<'_>> = None;
    let gov = governor();
    let mut made = gov.generation();
    loop {
        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(Found { path, stamp }) = job else {
            return;
        };
        if cx.stop.is_cancelled() {
            continue;
        }
        yield_to_realtime(cx.counters, cx.stop);
        // Making a scanner (and loading the rules for it) is charged with its first file.
        let cpu_before = crate::budget::thread_time();
        if gov.release_due(&mut made, cx.counters) {
            scanner = None;
        }
        let scanner = scanner.get_or_insert_with(|| {
            FileScanner::new(cx.rules.get(), plan.scan).with_digests_ahead(cx.digests)
        });
        let outcome = match gov.paced(|| examine_file(scanner, &path, cx.counters)) {
            Ok(report) => {
                let new = match cx.cache {
                    Some(cache) => cache.record(
                        Stamp::of_report(&report),
                        cx.rules.tag(),
                        &report.matches,
                        report.sha256.as_deref(),
                    ),
                    None => report.matches.clone(),
                };
                Outcome::Scanned { report, new }
            }
            Err(SkipReason::TooLarge(_)) => {
                // Judged by its name only: remembered, so that an unchanged tree needs no
                // rules to be skipped again.
                if let (Some(cache), Some(stamp)) = (cx.cache, stamp) {
                    cache.record(stamp, cx.rules.tag(), &[], None);
                }
                Outcome::Skipped
            }
            Err(_) => Outcome::Skipped,
        };
        on_file(&path, outcome);
        // The CPU this file took, against the budget of all scanning work.
        let pause = crate::budget::budget().charge(crate::budget::thread_time() - cpu_before);
        if !pause.is_zero() {
            std::thread::sleep(pause);
            cx.counters
                .add(Counter::ScanThrottledMs, pause.as_millis() as u64);
        }
    }
}

/// Files written or executed now go first: while the real-time scan queue (the watcher's,
/// fanotify's) holds jobs, a full scan's thread waits, up to [`MAX_YIELD`]. The budget caps
/// what a full scan uses; this keeps it off the cores a burst of real-time work needs.
fn yield_to_realtime(counters: &Counters, stop: &CancellationToken) {
    let until = Instant::now() + MAX_YIELD;
    while counters.get(Counter::ScanQueue) > 0 && !stop.is_cancelled() {
        let now = Instant::now();
        if now >= until {
            return;
        }
        std::thread::sleep(YIELD_POLL.min(until - now));
    }
}

/// The daemon's full scans.
pub struct FullScans {
    pub roots: Vec<PathBuf>,
    pub plan: ScanPlan,
    pub on_start: bool,
    /// None: only a new bundle starts a scan.
    pub interval: Option<Duration>,
    /// The result cache the watcher also records into, and where it is saved.
    pub reports: ReportFilter,
    pub cache_path: PathBuf,
    /// Time the rules on a sample of each scan's files ([`crate::rules::costs`]).
    pub profile_rules: bool,
}

impl FullScans {
    /// Scans at start, on the interval and after each new bundle, until `stop` fires. Runs on
    /// its own thread, at background priority.
    pub fn run(
        &self,
        rules: &ActiveRules,
        det: &mpsc::Sender<Detection>,
        counters: &Counters,
        stop: &CancellationToken,
        rt: &tokio::runtime::Handle,
    ) {
        lower_thread_priority(BACKGROUND_NICE);
        let mut first = true;
        loop {
            if !(first && self.on_start) {
                let wait = self.interval.unwrap_or(Duration::MAX);
                let woken = rt.block_on(async {
                    tokio::select! {
                        () = stop.cancelled() => false,
                        () = rules.rescan.notified() => true,
                        () = tokio::time::sleep(wait) => true,
                    }
                });
                if !woken {
                    return;
                }
            }
            let sample = self.once(&rules.current.load_full(), det, counters, stop);
            if first && self.on_start {
                governor().startup_job_done();
            }
            if self.profile_rules && !stop.is_cancelled() {
                rules.measure_costs(sample.files());
            }
            first = false;
        }
    }

    /// One full scan; a sample of the files it read or answered from the cache.
    fn once(
        &self,
        rules: &RuleSet,
        det: &mpsc::Sender<Detection>,
        counters: &Counters,
        stop: &CancellationToken,
    ) -> Sample {
        let cache = &self.reports.cache;
        let ids: &Ids = &self.reports.ids;
        let started = Instant::now();
        let (scanned_before, hits_before) = (
            counters.get(Counter::FilesScanned),
            counters.get(Counter::CacheHits),
        );
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let sample = SharedSample::new(Sample::new(seed));
        let on_file = |path: &Path, outcome: Outcome| {
            if let Outcome::Scanned { report, new } = outcome {
                if report.size > 0 {
                    sample.lock().unwrap_or_else(|p| p.into_inner()).offer(path);
                }
                if let Some(h) = &self.reports.history {
                    h.file(path, &report);
                }
                for d in file_detections(ids, path, &report, &new, rules.bundle_version) {
                    counters.inc(Counter::Detections);
                    let _ = det.blocking_send(d);
                }
            }
        };
        let cx = ScanContext {
            rules: ScanRules::ready(rules),
            cache: Some(cache),
            counters,
            stop,
            digests: None,
        };
        scan_tree(&self.roots, &self.plan, &cx, &on_file);
        // The history first: what the cache says was read, the history holds.
        if let Some(h) = &self.reports.history {
            h.flush();
        }
        if let Err(e) = cache.save_if_changed(&self.cache_path) {
            warn!(path = %self.cache_path.display(), error = %e, "cannot save the scan cache");
        }
        counters.inc(Counter::FullScans);
        // Its scanners and buffers are gone: give their memory back.
        governor().want_trim();
        info!(
            seconds = started.elapsed().as_secs_f64(),
            cached_files = cache.len(),
            files_scanned = counters.get(Counter::FilesScanned) - scanned_before,
            cache_hits = counters.get(Counter::CacheHits) - hits_before,
            "full scan finished"
        );
        sample.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nice value of the calling thread, from /proc.
    fn own_nice() -> i64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Fields after the command name (in parentheses): state is field 3, nice field 19.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split_whitespace().nth(16).unwrap().parse().unwrap()
    }

    #[test]
    fn background_scan_threads_run_at_low_priority_and_pass_it_on() {
        let base = own_nice();
        let want = base.max(i64::from(BACKGROUND_NICE));
        let (mine, child) = std::thread::spawn(|| {
            lower_thread_priority(BACKGROUND_NICE);
            let child = std::thread::spawn(own_nice).join().unwrap();
            (own_nice(), child)
        })
        .join()
        .unwrap();
        assert_eq!(mine, want);
        assert_eq!(child, want);
        // Only that thread: this one keeps its priority.
        assert_eq!(own_nice(), base);
    }

    #[test]
    fn a_full_scan_waits_while_the_real_time_queue_holds_files() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..3 {
            std::fs::write(dir.path().join(format!("f{i}")), "text").unwrap();
        }
        let rules = RuleSet::empty();
        let counters = Counters::default();
        let stop = CancellationToken::new();
        let plan = ScanPlan {
            threads: 1,
            walk: WalkRules::default(),
            max_cpu_percent: 100,
            scan: ScanOptions::default(),
        };
        // A file waits in the real-time queue.
        counters.inc(Counter::ScanQueue);
        std::thread::scope(|s| {
            let scan = s.spawn(|| {
                let cx = ScanContext {
                    rules: ScanRules::ready(&rules),
                    cache: None,
                    counters: &counters,
                    stop: &stop,
                    digests: None,
                };
                let roots = [dir.path().to_owned()];
                scan_tree(&roots, &plan, &cx, &|_, _| {});
            });
            // Well within MAX_YIELD: nothing scanned while the queue holds it.
            let held = Instant::now() + MAX_YIELD / 4;
            while Instant::now() < held {
                assert_eq!(counters.get(Counter::FilesScanned), 0);
                std::thread::yield_now();
            }
            counters.sub(Counter::ScanQueue, 1);
            scan.join().unwrap();
        });
        assert_eq!(counters.get(Counter::FilesScanned), 3);
    }
}
