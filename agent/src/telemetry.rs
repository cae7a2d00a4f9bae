//! What the agent counts, and how it logs.
//!
//! Counters are a fixed set of named atomics ([`Counter`]): a stage bumps one with a single
//! relaxed add, with no lock and no string on the hot path. Heartbeats send them under their wire
//! names ([`Counter::name`]), which `vedettectl agents list --json` shows unchanged; a counter
//! appears once a stage has touched it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vedette_engine::SkipReason;

macro_rules! counters {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// Every counter and gauge the agent keeps.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Counter {
            $($(#[$doc])* $variant,)*
        }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];

            /// The name sent in heartbeats.
            pub fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => $name,)*
                }
            }
        }
    };
}

counters! {
    /// Files read and judged by a scanner.
    FilesScanned = "files_scanned",
    /// Files answered from the result cache.
    CacheHits = "cache_hits",
    /// Detections made (before the spool).
    Detections = "detections",
    /// Full scans finished.
    FullScans = "full_scans",
    SkippedNotRegular = "files_skipped_not_regular",
    SkippedSymlink = "files_skipped_symlink",
    SkippedTooLarge = "files_skipped_too_large",
    SkippedVanished = "files_skipped_vanished",
    SkippedUnreadable = "files_skipped_unreadable",
    SkippedTimeout = "files_skipped_timeout",
    /// Symlink loops met while walking.
    WalkSymlinkLoops = "walk_symlink_loops",
    /// Other errors met while walking (unreadable directories).
    WalkErrors = "walk_errors",
    /// File-system events received from the kernel.
    FsEvents = "fs_events",
    /// Executions reported by fanotify.
    ExecEvents = "exec_events",
    /// Exec events from the process connector lost (socket buffer or queue full).
    ExecEventsLost = "exec_events_lost",
    /// Executions held for a verdict (prevention mode).
    ExecVerdicts = "exec_verdicts",
    /// Executions denied (prevention mode).
    ExecsBlocked = "execs_blocked",
    /// Executions allowed without a verdict: none came in time, or the verdict queue was full.
    ExecVerdictsLate = "exec_verdicts_late",
    /// Kernel event queue overflows (each one triggers a rescan).
    WatchOverflows = "watch_overflows",
    /// Errors reported by the watcher.
    WatchErrors = "watch_errors",
    /// Trees (partly) unwatched for lack of inotify watches.
    WatchLimitReached = "watch_limit_reached",
    /// Detections made durable in the spool.
    DetectionsSpooled = "detections_spooled",
    /// Detections sent (resends included).
    DetectionsSent = "detections_sent",
    /// Detections sent again after a reconnect.
    DetectionsResent = "detections_resent",
    /// Detections the collector acknowledged.
    DetectionsAcked = "detections_acked",
    /// Detections lost (spool cap, oversized record).
    DetectionsDropped = "detections_dropped",
    /// Gauge: detections in the spool not yet acknowledged.
    SpoolPending = "spool_pending",
    /// Gauge: bytes in the spool.
    SpoolBytes = "spool_bytes",
    /// Spool segments found damaged at start (cut at the damage).
    SpoolDamagedSegments = "spool_damaged_segments",
    /// Bytes cut from damaged spool segments.
    SpoolDamagedBytes = "spool_damaged_bytes",
    /// Connection attempts to a collector.
    ConnectAttempts = "connect_attempts",
    /// Connections established.
    Connections = "connections",
}

impl Counter {
    /// The counter for a file that could not be scanned.
    pub fn skipped(reason: &SkipReason) -> Counter {
        match reason {
            SkipReason::NotRegular => Counter::SkippedNotRegular,
            SkipReason::Symlink => Counter::SkippedSymlink,
            SkipReason::TooLarge(_) => Counter::SkippedTooLarge,
            SkipReason::Vanished => Counter::SkippedVanished,
            SkipReason::Unreadable(_) => Counter::SkippedUnreadable,
            SkipReason::Timeout => Counter::SkippedTimeout,
        }
    }

    /// The skip reason's short name when this counts skipped files.
    pub fn skip_reason(self) -> Option<&'static str> {
        self.name().strip_prefix("files_skipped_")
    }
}

const COUNT: usize = Counter::ALL.len();

/// The agent's counters, shared by every stage.
pub struct Counters {
    values: [AtomicU64; COUNT],
    /// Whether a stage has touched the counter: only those are reported.
    touched: [AtomicBool; COUNT],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            values: std::array::from_fn(|_| AtomicU64::new(0)),
            touched: std::array::from_fn(|_| AtomicBool::new(false)),
        }
    }
}

impl Counters {
    pub fn add(&self, c: Counter, n: u64) {
        self.values[c as usize].fetch_add(n, Ordering::Relaxed);
        self.touch(c);
    }

    pub fn inc(&self, c: Counter) {
        self.add(c, 1);
    }

    /// Sets a gauge (a value that also goes down, like the spool size).
    pub fn set(&self, c: Counter, v: u64) {
        self.values[c as usize].store(v, Ordering::Relaxed);
        self.touch(c);
    }

    pub fn get(&self, c: Counter) -> u64 {
        self.values[c as usize].load(Ordering::Relaxed)
    }

    fn touch(&self, c: Counter) {
        let t = &self.touched[c as usize];
        if !t.load(Ordering::Relaxed) {
            t.store(true, Ordering::Relaxed);
        }
    }

    /// Every touched counter under its wire name.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        Counter::ALL
            .iter()
            .filter(|c| self.touched[**c as usize].load(Ordering::Relaxed))
            .map(|c| (c.name().to_string(), self.get(*c)))
            .collect()
    }

    /// Files skipped, by reason (`too_large 3`), for summaries.
    pub fn skipped(&self) -> (u64, Vec<String>) {
        let mut total = 0;
        let mut reasons = Vec::new();
        for c in Counter::ALL {
            if let Some(r) = c.skip_reason()
                && self.touched[*c as usize].load(Ordering::Relaxed)
            {
                total += self.get(*c);
                reasons.push(format!("{r} {}", self.get(*c)));
            }
        }
        (total, reasons)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_are_unique_and_only_touched_counters_are_reported() {
        let mut names: Vec<&str> = Counter::ALL.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Counter::ALL.len());
        let c = Counters::default();
        c.inc(Counter::FilesScanned);
        c.add(Counter::FilesScanned, 2);
        c.set(Counter::SpoolPending, 0);
        c.inc(Counter::skipped(&SkipReason::TooLarge(9)));
        let snap = c.snapshot();
        assert_eq!(snap.len(), 3, "{snap:?}");
        assert_eq!(snap["files_scanned"], 3);
        assert_eq!(snap["spool_pending"], 0);
        assert_eq!(snap["files_skipped_too_large"], 1);
        assert_eq!(c.skipped(), (1, vec!["too_large 1".to_string()]));
    }
}
