//! Finding things: every source of work (the watcher, full scans, the process monitor), the
//! scanning they share, and the detections they make.
//!
//! ```text
//! watch (inotify) ──paths──► pool (scanner threads) ──┐
//! full_scan (walk + scanner threads, cache) ──────────┼──► Detection ──► deliver
//! procmon (/proc: processes, connections) ────────────┘
//! ```
//! Every file the watcher or a full scan finds is judged by [`scan::scan_file`] (the process
//! monitor scans executables itself, through its own cache); every tree, whoever walks it, is
//! walked by [`walk`] with the same rules (excludes, one file system, no symlinks).

pub(crate) mod cache;
pub(crate) mod full_scan;
pub(crate) mod pool;
pub(crate) mod procmon;
pub(crate) mod scan;
pub(crate) mod walk;
pub(crate) mod watch;

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use vedette_engine::{FileReport, MatchKind, RuleMatch};
use vedette_proto::v1::{Detection, DetectionKind, FileTarget, detection};

/// A detection of one match on one target, with a fresh id.
pub(crate) fn detection(m: RuleMatch, bundle_version: u64, target: detection::Target) -> Detection {
    Detection {
        id: uuid::Uuid::new_v4().to_string(),
        kind: kind_of(m.kind) as i32,
        rule: m.rule,
        source: m.source,
        observed_at_ms: vedette_proto::now_ms(),
        score: m.score,
        description: m.description,
        bundle_version,
        target: Some(target),
    }
}

/// One detection per rule that matched the file.
pub(crate) fn file_detections(
    path: &Path,
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

fn kind_of(k: MatchKind) -> DetectionKind {
    match k {
        MatchKind::Yara => DetectionKind::Yara,
        MatchKind::Hash => DetectionKind::Hash,
        MatchKind::Filename => DetectionKind::Filename,
        MatchKind::Process => DetectionKind::Process,
        MatchKind::Connection => DetectionKind::Connection,
    }
}
