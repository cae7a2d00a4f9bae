//! The process monitor's loop: judges each exec the process connector reports as it comes,
//! polls connections every `process_interval`, and walks `/proc` for processes not judged yet:
//! every `process_interval` without exec events, every [`PROCESS_WALK`] with them (and at once
//! when the kernel dropped some). Each process is judged once per rule set (and again after an
//! exec); [`procmon`](super::procmon) does the judging.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;
use vedette_engine::{FileScanner, RuleSet, ScanOptions};
use vedette_proto::v1::Detection;

use crate::detect::ReportFilter;
use crate::detect::exeread::ExeReader;
use crate::detect::memscan::MemScanLimits;
use crate::detect::procmon::ProcessJudge;
use crate::governor::governor;
use crate::rules::ActiveRules;
use crate::telemetry::{Counter, Counters};

/// How often the process monitor walks all of `/proc` while the process connector reports
/// execs (without it, every `process_interval`).
const PROCESS_WALK: Duration = Duration::from_secs(30);

/// Most exec events judged in one go before the poll's deadline is looked at again.
const EXEC_BURST: usize = 256;

/// What the process monitor runs with.
pub(crate) struct ProcessWatch {
    pub rules: Arc<ActiveRules>,
    pub reports: ReportFilter,
    /// Devices whose execs fanotify reports (see [`ProcessJudge::with_exec_covered`]).
    pub exec_covered: HashSet<u64>,
    pub det: mpsc::Sender<Detection>,
    pub counters: Arc<Counters>,
    pub stop: CancellationToken,
    /// To wait on the token and timers from a plain thread.
    pub rt: Handle,
    /// `process_interval`.
    pub interval: Duration,
    /// `memory_scan`.
    pub memory: bool,
    pub options: ScanOptions,
    /// The names DNS answers gave addresses, when DNS is seen.
    pub dns: Option<Arc<crate::detect::dns::DnsLinks>>,
}

/// Where one rule set's loop stands.
struct Schedule {
    next_poll: Instant,
    next_walk: Instant,
    /// `ExecEventsLost` at the last walk: a change means the kernel dropped events.
    lost: u64,
}

impl ProcessWatch {
    /// Runs until shutdown; `execs` are the pids the process connector reports, if it does.
    pub(crate) fn run(&self, mut execs: Option<Receiver<u32>>) {
        let mut walked = false;
        while !self.stop.is_cancelled() {
            let current = self.rules.current.load_full();
            if !self.run_rule_set(&current, &mut walked, &mut execs) {
                return;
            }
        }
    }

    /// Runs until the rule set changes (true) or shutdown (false).
    fn run_rule_set(
        &self,
        current: &Arc<RuleSet>,
        walked: &mut bool,
        execs: &mut Option<Receiver<u32>>,
    ) -> bool {
        let mut judge = ProcessJudge::new(self.reports.ids.clone())
            .with_exe_cache(self.reports.execs.clone())
            .with_counters(self.counters.clone())
            .with_exec_covered(self.exec_covered.clone())
            .with_dns(self.dns.clone())
            .with_history(self.reports.history.clone())
            .with_exe_reader(ExeReader::new(
                current.clone(),
                self.options,
                self.reports.execs.clone(),
                self.options.timeout,
            ));
        if self.memory {
            judge = judge.with_memory(MemScanLimits::default());
        }
        let mut scanner = FileScanner::new(current, self.options);
        let mut made = governor().generation();
        let mut at = Schedule {
            next_poll: Instant::now(),
            next_walk: Instant::now(),
            lost: self.counters.get(Counter::ExecEventsLost),
        };
        while Arc::ptr_eq(&self.rules.current.load(), current) {
            if governor().release_due(&mut made, &self.counters) {
                scanner.release();
            }
            let found = self.poll(&mut judge, &mut scanner, current, &mut at, walked, execs);
            if !self.send(found) {
                return false;
            }
            let Some(rx) = execs.as_ref() else {
                if !self.pause(self.interval) {
                    return false;
                }
                continue;
            };
            match rx.recv_timeout(at.next_poll.saturating_duration_since(Instant::now())) {
                Ok(pid) => {
                    let more = std::iter::from_fn(|| rx.try_recv().ok());
                    for pid in std::iter::once(pid).chain(more.take(EXEC_BURST - 1)) {
                        if !self.send(judge.exec(pid, &mut scanner)) {
                            return false;
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // The listener stops with the agent (or on an error it logged).
                Err(RecvTimeoutError::Disconnected) => *execs = None,
            }
            if self.stop.is_cancelled() {
                return false;
            }
        }
        true
    }

    /// When the poll is due: the connections, and the walk of `/proc` when that is due too.
    /// With exec events, the walk only catches what they cannot show: processes from before
    /// the agent, and events the kernel dropped.
    fn poll(
        &self,
        judge: &mut ProcessJudge,
        scanner: &mut FileScanner,
        current: &RuleSet,
        at: &mut Schedule,
        walked: &mut bool,
        execs: &Option<Receiver<u32>>,
    ) -> Vec<Detection> {
        let now = Instant::now();
        if now < at.next_poll {
            return Vec::new();
        }
        let mut found = Vec::new();
        let lost_now = self.counters.get(Counter::ExecEventsLost);
        if execs.is_none() || now >= at.next_walk || lost_now != at.lost {
            found = judge.new_processes(scanner);
            if !*walked {
                *walked = true;
                governor().startup_job_done();
                info!(
                    took_ms = now.elapsed().as_millis() as u64,
                    detections = found.len(),
                    "first process walk finished"
                );
            }
            at.lost = lost_now;
            at.next_walk = Instant::now() + self.interval.max(PROCESS_WALK);
        }
        found.extend(judge.c2_connections(current));
        at.next_poll = Instant::now() + self.interval;
        found
    }

    /// Hands detections to the spool writer; false once it is gone.
    fn send(&self, found: Vec<Detection>) -> bool {
        for d in found {
            self.counters.inc(Counter::Detections);
            if self.det.blocking_send(d).is_err() {
                return false;
            }
        }
        true
    }

    /// Sleeps up to `d`; false when shutdown came first.
    fn pause(&self, d: Duration) -> bool {
        super::pause(&self.rt, &self.stop, d)
    }
}
