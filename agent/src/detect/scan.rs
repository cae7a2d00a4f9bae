//! The per-file scan step every stage shares: scan, count the outcome, log what an operator
//! should see.

use std::path::Path;

use tracing::{debug, warn};
use vedette_engine::{FileReport, FileScanner, SkipReason};

use crate::telemetry::{Counter, Counters};

/// Scans one file with `scanner`: a report, or why the file was skipped (counted and logged).
pub(crate) fn scan_file(
    scanner: &mut FileScanner<'_>,
    path: &Path,
    counters: &Counters,
) -> Result<FileReport, SkipReason> {
    account(scanner.scan_path(path), path, counters)
}

/// [`scan_file`] for a file already open (an event's descriptor); `path` names it.
pub(crate) fn scan_open_file(
    scanner: &mut FileScanner<'_>,
    file: std::fs::File,
    path: &Path,
    counters: &Counters,
) -> Result<FileReport, SkipReason> {
    account(scanner.scan_open(file, path), path, counters)
}

fn account(
    result: Result<FileReport, SkipReason>,
    path: &Path,
    counters: &Counters,
) -> Result<FileReport, SkipReason> {
    match result {
        Ok(report) => {
            counters.inc(Counter::FilesScanned);
            Ok(report)
        }
        Err(reason) => {
            counters.inc(Counter::skipped(&reason));
            match &reason {
                SkipReason::Unreadable(e) => {
                    warn!(path = %path.display(), error = %e, "skipping unreadable file")
                }
                SkipReason::Timeout => warn!(path = %path.display(), "YARA scan timed out"),
                _ => debug!(path = %path.display(), reason = reason.as_str(), "file skipped"),
            }
            Err(reason)
        }
    }
}
