//! What the agent counts, and how it logs.
//!
//! Counters are a fixed set of named atomics ([`Counter`]): a stage bumps one with a single
//! relaxed add, with no lock and no string on the hot path. Heartbeats send them under their wire
//! names ([`Counter::name`]), which `vedettectl agents list --json` shows unchanged; a counter
//! appears once a stage has touched it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use vedette_proto::v1::Detection;

use vedette_engine::SkipReason;

macro_rules! counters {
    ($($(#[doc = $doc:literal])+ $variant:ident = $name:literal $kind:ident,)*) => {
        /// Every counter and gauge the agent keeps.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Counter {
            $($(#[doc = $doc])+ $variant,)*
        }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];

            /// The name sent in heartbeats.
            pub fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => $name,)*
                }
            }

            /// Its help text in the metrics exposition.
            pub fn help(self) -> &'static str {
                match self {
                    $(Counter::$variant => concat!($($doc),+),)*
                }
            }

            /// Whether it is a gauge (a value that also goes down) rather than a counter.
            pub fn is_gauge(self) -> bool {
                match self {
                    $(Counter::$variant => Kind::$kind == Kind::gauge,)*
                }
            }
        }
    };
}

#[allow(non_camel_case_types)]
#[derive(PartialEq, Eq)]
enum Kind {
    counter,
    gauge,
}

counters! {
    /// Files read and judged by a scanner.
    FilesScanned = "files_scanned" counter,
    /// Bytes of the files judged by a scanner.
    BytesScanned = "scanned_bytes" counter,
    /// Files answered from the result cache.
    CacheHits = "cache_hits" counter,
    /// Detections made (before the spool).
    Detections = "detections" counter,
    /// Detections an exception of the bundle covered: not spooled, not sent.
    Suppressed = "suppressed" counter,
    /// Built-in findings the bundle turned off for this agent: not spooled, not sent.
    FindingsOff = "findings_off" counter,
    /// Full scans finished.
    FullScans = "full_scans" counter,
    /// Files not scanned: not a regular file.
    SkippedNotRegular = "files_skipped_not_regular" counter,
    /// Files not scanned: a symbolic link.
    SkippedSymlink = "files_skipped_symlink" counter,
    /// Files not scanned: larger than max_file_size.
    SkippedTooLarge = "files_skipped_too_large" counter,
    /// Files not scanned: gone before they were opened.
    SkippedVanished = "files_skipped_vanished" counter,
    /// Files not scanned: could not be read.
    SkippedUnreadable = "files_skipped_unreadable" counter,
    /// Files not scanned: the YARA scan ran past scan_timeout.
    SkippedTimeout = "files_skipped_timeout" counter,
    /// Symlink loops met while walking.
    WalkSymlinkLoops = "walk_symlink_loops" counter,
    /// Other errors met while walking (unreadable directories).
    WalkErrors = "walk_errors" counter,
    /// File-system events received from the kernel.
    FsEvents = "fs_events" counter,
    /// Executions reported by fanotify.
    ExecEvents = "exec_events" counter,
    /// Exec events from the process connector lost (socket buffer or queue full).
    ExecEventsLost = "exec_events_lost" counter,
    /// Executions held for a verdict (prevention mode).
    ExecVerdicts = "exec_verdicts" counter,
    /// Executions denied (prevention mode).
    ExecsBlocked = "execs_blocked" counter,
    /// Executions allowed without a verdict: none came in time, or too many were waiting.
    ExecVerdictsLate = "exec_verdicts_late" counter,
    /// Executions denied without a verdict (`prevent_on_timeout = "deny"`).
    ExecVerdictsDenied = "exec_verdicts_denied" counter,
    /// Executions answered without a verdict and not judged afterwards by prevention (too many
    /// waiting): left to the exec events.
    ExecVerdictsUnjudged = "exec_verdicts_unjudged" counter,
    /// DNS datagrams seen (UDP port 53, every interface).
    DnsPackets = "dns_packets" counter,
    /// DNS packets the kernel dropped before the agent read them (socket buffer full).
    DnsPacketsDropped = "dns_packets_dropped" counter,
    /// DNS datagrams that were no DNS message the parser could read.
    DnsUnreadable = "dns_unreadable" counter,
    /// Queries for a listed domain counted into a detection already made (same process,
    /// same domain, within `dns_window`).
    DnsRepeats = "dns_repeats" counter,
    /// New processes judged (names, command lines, executables).
    ProcessesSeen = "processes_seen" counter,
    /// Kernel event queue overflows (each one triggers a rescan).
    WatchOverflows = "watch_overflows" counter,
    /// Errors reported by the watcher.
    WatchErrors = "watch_errors" counter,
    /// Trees (partly) unwatched for lack of inotify watches.
    WatchLimitReached = "watch_limit_reached" counter,
    /// Files waiting for a scan worker.
    ScanQueue = "scan_queue" gauge,
    /// Jobs the backlog helpers took from the scan queue (see `detect::pool`).
    HelperScans = "helper_scans" counter,
    /// Detections waiting to be written to the spool.
    DetectionQueue = "detection_queue" gauge,
    /// Detections made durable in the spool.
    DetectionsSpooled = "detections_spooled" counter,
    /// Detections sent (resends included).
    DetectionsSent = "detections_sent" counter,
    /// Detections sent again after a reconnect.
    DetectionsResent = "detections_resent" counter,
    /// Detections the collector acknowledged.
    DetectionsAcked = "detections_acked" counter,
    /// Detections lost (spool cap, oversized record).
    DetectionsDropped = "detections_dropped" counter,
    /// Detections in the spool not yet acknowledged.
    SpoolPending = "spool_pending" gauge,
    /// Bytes in the spool.
    SpoolBytes = "spool_bytes" gauge,
    /// Spool segments found damaged at start (cut at the damage).
    SpoolDamagedSegments = "spool_damaged_segments" counter,
    /// Bytes cut from damaged spool segments.
    SpoolDamagedBytes = "spool_damaged_bytes" counter,
    /// Connection attempts to a collector.
    ConnectAttempts = "connect_attempts" counter,
    /// Connections established.
    Connections = "connections" counter,
    /// Version of the fleet rule bundle in force (0: host-local rules only).
    RulesBundleVersion = "rules_bundle_version" gauge,
    /// YARA rules in force.
    RulesYara = "rules_yara" gauge,
    /// Time the last rule-set build took.
    RulesLoadMs = "rules_load_ms" gauge,
    /// CPU time the agent used (user and system).
    CpuMs = "cpu_ms" counter,
    /// The agent's resident memory.
    RssBytes = "resident_memory_bytes" gauge,
    /// The memory ceiling the agent keeps to (`max_rss`; 0: none).
    MemoryLimitBytes = "memory_limit_bytes" gauge,
    /// 1 while the agent is over its memory ceiling (scanning one file at a time).
    MemoryOverLimit = "memory_over_limit" gauge,
    /// Times the agent went over its memory ceiling.
    MemoryLimitExceeded = "memory_limit_exceeded" counter,
    /// Scanners released to get back under the memory ceiling.
    ScannersReleased = "scanners_released" counter,
    /// The share of one core all scanning work together may use (`max_cpu_percent`).
    CpuBudgetPercent = "cpu_budget_percent" gauge,
    /// The share of one core scanning work used over the last 10 seconds.
    CpuUsedPercent = "cpu_used_percent" gauge,
    /// Time scanning work (scan threads, the rule compiler) paused to stay within the CPU
    /// budget.
    ScanThrottledMs = "scan_throttled_ms" counter,
    /// Records written to the history (files read, executables run).
    HistoryRecords = "history_records" counter,
    /// The history's size on disk.
    HistoryBytes = "history_bytes" gauge,
    /// History records dropped, the oldest first, to stay within `history_max_bytes`.
    HistoryDropped = "history_dropped" counter,
    /// Detections found in the history by new rules or a hunt (retro).
    RetroDetections = "retro_detections" counter,
    /// Hunts answered from the history.
    HuntsAnswered = "hunts_answered" counter,
    /// Hunts received past their expiry, not answered.
    HuntsExpired = "hunts_expired" counter,
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

/// The agent's counters, shared by every stage. The same values feed heartbeats
/// ([`Counters::snapshot`]) and the metrics exposition ([`Counters::registry`]).
pub struct Counters {
    values: [AtomicU64; COUNT],
    /// Whether a stage has touched the counter: only those are reported in heartbeats.
    touched: [AtomicBool; COUNT],
    /// Time to scan one file (opened, hashed where needed, matched), in seconds.
    pub scan_seconds: Histogram,
    /// What gauges are read from when sampled.
    sources: Mutex<Sources>,
}

#[derive(Default)]
struct Sources {
    detections: Option<mpsc::WeakSender<Detection>>,
    rules: Option<Weak<crate::rules::ActiveRules>>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            values: std::array::from_fn(|_| AtomicU64::new(0)),
            touched: std::array::from_fn(|_| AtomicBool::new(false)),
            // 50 µs to about 26 s.
            scan_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 20)),
            sources: Mutex::new(Sources::default()),
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

    /// Lowers a gauge (never below zero).
    pub fn sub(&self, c: Counter, n: u64) {
        let _ = self.values[c as usize].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(n))
        });
    }

    /// Samples the detection queue's depth from now on.
    pub fn attach_detection_queue(&self, tx: &mpsc::Sender<Detection>) {
        self.sources_mut().detections = Some(tx.downgrade());
    }

    /// Samples the rules in force from now on.
    pub fn attach_rules(&self, rules: &Arc<crate::rules::ActiveRules>) {
        self.sources_mut().rules = Some(Arc::downgrade(rules));
    }

    fn sources_mut(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refreshes the sampled gauges: the agent's CPU time and memory, the detection queue,
    /// the rules in force.
    pub fn sample(&self) {
        if let Some((cpu_ms, rss)) = own_usage() {
            self.set(Counter::CpuMs, cpu_ms);
            self.set(Counter::RssBytes, rss);
        }
        let sources = self.sources_mut();
        if let Some(tx) = sources.detections.as_ref().and_then(|w| w.upgrade()) {
            let depth = tx.max_capacity() - tx.capacity();
            self.set(Counter::DetectionQueue, depth as u64);
        }
        if let Some(rules) = sources.rules.as_ref().and_then(Weak::upgrade) {
            self.set(
                Counter::RulesBundleVersion,
                rules.applied.load(Ordering::Relaxed),
            );
            let stats = rules.stats();
            self.set(Counter::RulesYara, stats.yara_rules);
            self.set(Counter::RulesLoadMs, stats.load_ms);
        }
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

    /// Every touched counter under its wire name, sampled gauges refreshed.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.sample();
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

/// The agent's CPU time (ms, user and system) and resident memory (bytes).
fn own_usage() -> Option<(u64, u64)> {
    // utime and stime, fields 14 and 15 of /proc/self/stat, in USER_HZ ticks (100 a second
    // on Linux whatever the kernel's own HZ); the name in field 2 may hold spaces, so count
    // from the `)` that closes it.
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    let cpu = (ticks(11)? + ticks(12)?) * 10;
    Some((cpu, resident_bytes()?))
}

/// The agent's resident memory (`VmRSS`), in bytes.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(rss_kib * 1024)
}

impl Counters {
    /// The metrics exposition of these counters (`vedette_agent_…`).
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::default();
        r.register(
            "vedette_agent_scan_seconds",
            "Time to scan one file",
            self.scan_seconds.clone(),
        );
        r.register_collector(Box::new(Exposition(self.clone())));
        r
    }
}

/// Encodes every counter at each scrape, under `vedette_agent_` plus its wire name. Skipped
/// files are one family with a `reason` label; `_ms` values are given in `_seconds`.
#[derive(Debug)]
struct Exposition(Arc<Counters>);

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters").finish_non_exhaustive()
    }
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.0;
        c.sample();
        let skipped: Vec<Counter> = Counter::ALL
            .iter()
            .copied()
            .filter(|k| k.skip_reason().is_some())
            .collect();
        {
            let mut family = encoder.encode_descriptor(
                "vedette_agent_files_skipped",
                "Files not scanned, by reason",
                None,
                MetricType::Counter,
            )?;
            for k in &skipped {
                let labels = [("reason", k.skip_reason().unwrap_or_default())];
                ConstCounter::new(c.get(*k)).encode(family.encode_family(&labels)?)?;
            }
        }
        for k in Counter::ALL.iter().filter(|k| k.skip_reason().is_none()) {
            let help = k.help().trim();
            let value = c.get(*k);
            if let Some(base) = k.name().strip_suffix("_ms") {
                let name = format!("vedette_agent_{base}_seconds");
                let secs = value as f64 / 1000.0;
                if k.is_gauge() {
                    let m = ConstGauge::new(secs);
                    m.encode(encoder.encode_descriptor(&name, help, None, m.metric_type())?)?;
                } else {
                    let m = ConstCounter::new(secs);
                    m.encode(encoder.encode_descriptor(&name, help, None, m.metric_type())?)?;
                }
                continue;
            }
            let name = format!("vedette_agent_{}", k.name());
            if k.is_gauge() {
                let m = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
                m.encode(encoder.encode_descriptor(&name, help, None, m.metric_type())?)?;
            } else {
                let m = ConstCounter::new(value);
                m.encode(encoder.encode_descriptor(&name, help, None, m.metric_type())?)?;
            }
        }
        Ok(())
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
        // The three touched, and the process's own use, sampled for every snapshot (no
        // queue or rules are attached here).
        assert_eq!(snap.len(), 5, "{snap:?}");
        assert!(snap["resident_memory_bytes"] > 1024 * 1024, "{snap:?}");
        assert!(snap.contains_key("cpu_ms"), "{snap:?}");
        assert_eq!(snap["files_scanned"], 3);
        assert_eq!(snap["spool_pending"], 0);
        assert_eq!(snap["files_skipped_too_large"], 1);
        assert_eq!(c.skipped(), (1, vec!["too_large 1".to_string()]));
    }

    #[test]
    fn gauges_go_down_but_not_below_zero() {
        let c = Counters::default();
        c.add(Counter::ScanQueue, 2);
        c.sub(Counter::ScanQueue, 1);
        assert_eq!(c.get(Counter::ScanQueue), 1);
        c.sub(Counter::ScanQueue, 5);
        assert_eq!(c.get(Counter::ScanQueue), 0);
        assert!(Counter::ScanQueue.is_gauge() && !Counter::FilesScanned.is_gauge());
        assert_eq!(
            Counter::FilesScanned.help(),
            " Files read and judged by a scanner."
        );
    }
}
