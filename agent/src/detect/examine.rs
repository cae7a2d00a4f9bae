//! Examining one file, the step every stage shares: scan it, count the outcome, log what an
//! operator should see.

use std::path::Path;

use tracing::{debug, warn};
use vedette_engine::{FileReport, FileScanner, SkipReason};
use vedette_ops::cli::RateLimited;

use crate::telemetry::{Counter, Counters};

/// Scans one file with `scanner`: a report, or why the file was skipped (counted and logged).
pub(crate) fn examine_file(
    scanner: &mut FileScanner<'_>,
    path: &Path,
    counters: &Counters,
) -> Result<FileReport, SkipReason> {
    let started = std::time::Instant::now();
    let result = scanner.scan_path(path);
    account(result, started, path, counters)
}

/// [`examine_file`] for a file already open (an event's descriptor); `path` names it.
pub(crate) fn examine_open_file(
    scanner: &mut FileScanner<'_>,
    file: std::fs::File,
    path: &Path,
    counters: &Counters,
) -> Result<FileReport, SkipReason> {
    let started = std::time::Instant::now();
    let result = scanner.scan_open(file, path);
    account(result, started, path, counters)
}

/// Unreadable files and scan timeouts are logged at 1, 2, 4, 8... occurrences: a tree of
/// unreadable files does not flood the log (each one is counted, and logged at debug level).
static UNREADABLE: RateLimited = RateLimited::new();
static TIMED_OUT: RateLimited = RateLimited::new();

fn account(
    result: Result<FileReport, SkipReason>,
    started: std::time::Instant,
    path: &Path,
    counters: &Counters,
) -> Result<FileReport, SkipReason> {
    match result {
        Ok(report) => {
            counters.inc(Counter::FilesScanned);
            counters.add(Counter::BytesScanned, report.size);
            counters
                .scan_seconds
                .observe(started.elapsed().as_secs_f64());
            Ok(report)
        }
        Err(reason) => {
            counters.inc(Counter::skipped(&reason));
            match &reason {
                SkipReason::Unreadable(e) => match UNREADABLE.hit() {
                    Some(n) => {
                        warn!(path = %path.display(), error = %e, unreadable_so_far = n, "skipping unreadable file")
                    }
                    None => debug!(path = %path.display(), error = %e, "skipping unreadable file"),
                },
                SkipReason::Timeout => match TIMED_OUT.hit() {
                    Some(n) => {
                        warn!(path = %path.display(), timed_out_so_far = n, "YARA scan timed out")
                    }
                    None => debug!(path = %path.display(), "YARA scan timed out"),
                },
                _ => debug!(path = %path.display(), reason = reason.as_str(), "file skipped"),
            }
            Err(reason)
        }
    }
}
