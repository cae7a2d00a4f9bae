//! Full scans: a parallel directory walk where each walker thread scans the files it finds with
//! its own scanner over the shared rule set.
//!
//! Defaults protect the host: one file system per root, `/proc`, `/sys`, `/dev` and `/run`
//! excluded, symlinks not followed, a size cap per file, and an optional CPU budget that makes
//! each thread pause in proportion to the time it spent scanning. Unchanged files are answered
//! from the [`ScanCache`].

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use globset::{Glob, GlobSet, GlobSetBuilder};
use ignore::{WalkBuilder, WalkState};
use vedette_engine::{FileReport, FileScanner, RuleSet, ScanOptions};

use crate::cache::{ScanCache, Stamp};
use crate::counters::Counters;

/// Paths never walked unless given as roots themselves.
pub const DEFAULT_EXCLUDES: [&str; 4] = ["/proc", "/sys", "/dev", "/run"];

#[derive(Debug, Clone)]
pub struct WalkOptions {
    pub threads: usize,
    /// Stay on each root's file system.
    pub one_file_system: bool,
    /// Glob patterns of paths to skip (matched against the full path).
    pub excludes: Vec<String>,
    /// Percentage of one core each thread may use while scanning (1..=100).
    pub max_cpu_percent: u32,
    /// Limits per file.
    pub scan: ScanOptions,
}

impl Default for WalkOptions {
    fn default() -> Self {
        WalkOptions {
            threads: 2,
            one_file_system: true,
            excludes: Vec::new(),
            max_cpu_percent: 100,
            scan: ScanOptions::default(),
        }
    }
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
        tracing::warn!(error = %e, "cannot lower the scan threads' priority");
    }
}

/// Builds the exclusion set; a bad glob is an error naming it.
pub fn exclusions(patterns: &[String]) -> Result<GlobSet, String> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(Glob::new(p).map_err(|e| format!("exclude `{p}`: {e}"))?);
    }
    b.build().map_err(|e| e.to_string())
}

/// One file's outcome, as the walk reports it.
pub enum Outcome {
    /// Scanned now, or answered from the cache (`cached`).
    Scanned {
        report: FileReport,
        cached: bool,
    },
    Skipped(vedette_engine::SkipReason),
}

/// Walks `roots`, scanning every regular file, and calls `on_file` for each (from several
/// threads). `stop` ends the walk early.
pub fn scan_tree(
    roots: &[PathBuf],
    opts: &WalkOptions,
    rules: &RuleSet,
    cache: Option<&ScanCache>,
    counters: &Counters,
    stop: &AtomicBool,
    on_file: &(dyn Fn(&Path, Outcome) + Sync),
) -> Result<(), String> {
    let Some((first, rest)) = roots.split_first() else {
        return Ok(());
    };
    let excludes = exclusions(&opts.excludes)?;
    let root_set: Vec<PathBuf> = roots.to_vec();
    let mut builder = WalkBuilder::new(first);
    for r in rest {
        builder.add(r);
    }
    builder
        .standard_filters(false)
        .hidden(false)
        .follow_links(false)
        .same_file_system(opts.one_file_system)
        .filter_entry(move |entry| {
            let p = entry.path();
            let is_root = root_set.iter().any(|r| r == p);
            is_root
                || (!DEFAULT_EXCLUDES.iter().any(|x| p == Path::new(x)) && !excludes.is_match(p))
        });
    let budget = opts.max_cpu_percent.clamp(1, 100);
    let scan = opts.scan;
    let threads = opts.threads.max(1);
    // Walker threads only list and stat; scanner threads (each with its own YARA scanner, which
    // cannot move between threads) take files from a bounded queue.
    let (tx, rx) = sync_channel::<(PathBuf, Option<Stamp>)>(4096);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut scanner = FileScanner::new(rules, scan);
                loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((path, stamp)) = job else { return };
                    if stop.load(Ordering::Relaxed) {
                        continue;
                    }
                    let started = Instant::now();
                    let outcome = match scanner.scan_path(&path) {
                        Ok(report) => {
                            counters.inc("files_scanned");
                            if let (Some(cache), Some(stamp)) = (cache, stamp) {
                                cache.insert(
                                    stamp,
                                    report.matches.clone(),
                                    report.sha256.as_deref(),
                                );
                            }
                            Outcome::Scanned {
                                report,
                                cached: false,
                            }
                        }
                        Err(reason) => {
                            counters.inc(&format!("files_skipped_{}", reason.as_str()));
                            Outcome::Skipped(reason)
                        }
                    };
                    on_file(&path, outcome);
                    if budget < 100 {
                        // Pause so that scanning uses at most `budget` percent of this thread.
                        let busy = started.elapsed();
                        let pause = busy.mul_f64(f64::from(100 - budget) / f64::from(budget));
                        std::thread::sleep(pause.min(Duration::from_secs(5)));
                    }
                }
            });
        }
        builder.threads(threads).build_parallel().run(|| {
            let tx = tx.clone();
            Box::new(move |entry| {
                if stop.load(Ordering::Relaxed) {
                    return WalkState::Quit;
                }
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        let looped = e
                            .io_error()
                            .is_some_and(|io| io.raw_os_error() == Some(libc::ELOOP));
                        counters.inc(if looped {
                            "walk_symlink_loops"
                        } else {
                            "walk_errors"
                        });
                        return WalkState::Continue;
                    }
                };
                if !entry.file_type().is_some_and(|t| t.is_file()) {
                    if entry
                        .file_type()
                        .is_some_and(|t| !t.is_dir() && !t.is_symlink())
                    {
                        // FIFOs, sockets, devices: never opened.
                        counters.inc("files_skipped_not_regular");
                    }
                    return WalkState::Continue;
                }
                let path = entry.path();
                let stamp = entry.metadata().ok().map(|m| Stamp::of(&m));
                if let (Some(cache), Some(stamp)) = (cache, stamp.as_ref())
                    && let Some(hit) = cache.get(stamp)
                {
                    counters.inc("cache_hits");
                    let report = FileReport {
                        size: stamp.size,
                        device: stamp.dev,
                        inode: stamp.ino,
                        matches: hit.matches,
                        sha256: Some(hit.sha256).filter(|s| !s.is_empty()),
                        ..Default::default()
                    };
                    on_file(
                        path,
                        Outcome::Scanned {
                            report,
                            cached: true,
                        },
                    );
                    return WalkState::Continue;
                }
                if tx.send((path.to_owned(), stamp)).is_err() {
                    return WalkState::Quit;
                }
                WalkState::Continue
            })
        });
        drop(tx);
    });
    Ok(())
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
}
