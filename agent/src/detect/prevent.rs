//! Prevention mode: every exec of a file on the watched file systems waits for a verdict, and
//! the exec of a file matching a rule or indicator scored at or above the threshold is denied
//! (the process gets EPERM; the detection says `action: blocked`).
//!
//! A fanotify group of the content class holds each exec (`FAN_OPEN_EXEC_PERM`) until the
//! agent answers. Verdict threads of their own (not the scan pool, whose queue may be long)
//! judge the executable **through the event's descriptor**, from the shared executable cache
//! when the file is unchanged; an unchanged file whose cached verdict allows it is let through
//! by the reader at once. [`verdicts`](crate::detect::verdicts) orders the rest, so that one
//! user cannot keep the threads from the others. The agent fails open by default:
//! - an exec with no verdict within the timeout, or past the queue or its user's share of it,
//!   is allowed (`prevent_on_timeout = "deny"`: denied when a user other than root can write
//!   where its executable is), counted, and judged afterwards: a match is reported as `late`
//!   (or `blocked`, when it was denied);
//! - an unreadable file or any scan error allows;
//! - the agent's own execs are allowed at once;
//! - when the agent stops, everything held is allowed; when it dies, the kernel closes the
//!   group and allows whatever was held.
//!
//! What this cannot guard against, and the operator must know: while the agent is alive but
//! frozen (SIGSTOP, a debugger) every exec on the marked file systems waits; and a file that
//! an indicator matches wrongly cannot be run until the rule is fixed.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use nix::errno::Errno;
use nix::sys::fanotify::{
    EventFFlags, Fanotify, FanotifyEvent, FanotifyResponse, InitFlags, MaskFlags, Response,
};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use tokio::sync::mpsc;
use tracing::warn;
use vedette_engine::{FileScanner, RuleMatch, RuleSet, ScanOptions};
use vedette_proto::v1::{Detection, DetectionAction};

use crate::config::{OnTimeout, Prevention};
use crate::detect::ReportFilter;
use crate::detect::fanotify::{FanError, mark, raise_open_files_limit};
use crate::detect::procmon::{
    Exec, Reading, Users, cached_exe_matches, exe_matches, exec_detections,
};
use crate::detect::verdicts::{Queue, SMALL, Taken, Verdict};
use crate::governor::governor;
use crate::telemetry::{Counter, Counters};

/// Threads giving verdicts; the first judges quick ones only (small or cached files).
const VERDICT_THREADS: usize = 2;

/// What prevention needs from the agent.
pub struct GateTarget {
    pub rules: Arc<ArcSwap<RuleSet>>,
    pub options: ScanOptions,
    pub policy: Prevention,
    pub reports: ReportFilter,
    pub detections: mpsc::Sender<Detection>,
    pub counters: Arc<Counters>,
}

/// Running prevention; [`ExecGate::stop`] (or dropping it) allows everything held and stops.
pub struct ExecGate {
    stop: Option<std::io::PipeWriter>,
    threads: Vec<JoinHandle<()>>,
}

impl ExecGate {
    /// Holds every exec on the file systems of `roots` for a verdict.
    pub fn start(roots: &[PathBuf], target: GateTarget) -> Result<ExecGate, FanError> {
        let group = Fanotify::init(
            InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
            EventFFlags::O_RDONLY
                | EventFFlags::O_LARGEFILE
                | EventFFlags::O_CLOEXEC
                | EventFFlags::O_NOATIME,
        )
        .map_err(FanError::Init)?;
        for root in roots {
            mark(&group, root, MaskFlags::FAN_OPEN_EXEC_PERM)?;
        }
        raise_open_files_limit();
        let held = Arc::new(Held {
            group,
            pending: Mutex::new(HashMap::new()),
        });
        let queue = Arc::new(Queue::default());
        let judges = Arc::new(Judges {
            queue: queue.clone(),
            held: held.clone(),
            users: Users::load(),
            target,
        });
        let mut threads = Vec::new();
        for i in 0..VERDICT_THREADS {
            let judges = judges.clone();
            let t = std::thread::Builder::new()
                .name(format!("verdict-{i}"))
                .spawn(move || judges.run(i == 0))
                .map_err(FanError::Thread)?;
            threads.push(t);
        }
        let (rd, wr) = std::io::pipe().map_err(FanError::Thread)?;
        let mut reader = Reader {
            held,
            queue,
            deadlines: VecDeque::new(),
            next: 0,
            judges,
            me: std::process::id() as i32,
        };
        let t = std::thread::Builder::new()
            .name("prevent".into())
            .spawn(move || reader.run(rd))
            .map_err(FanError::Thread)?;
        threads.push(t);
        Ok(ExecGate {
            stop: Some(wr),
            threads,
        })
    }

    /// Allows everything held, stops holding execs, and waits for the threads.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for ExecGate {
    fn drop(&mut self) {
        self.stop.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The group and the execs it holds, each answered exactly once by whoever takes it out.
struct Held {
    group: Fanotify,
    pending: Mutex<HashMap<u64, FanotifyEvent>>,
}

impl Held {
    /// Answers held exec `seq`; false when it was answered already (without a verdict).
    fn answer(&self, seq: u64, allow: bool) -> bool {
        self.answer_then(seq, allow, || {})
    }

    /// Answers held exec `seq` after `before` ran, both under the lock that makes an answer
    /// once: what `before` records is in place before the exec goes on, and only when this is
    /// the answer. False when it was answered already.
    fn answer_then(&self, seq: u64, allow: bool, before: impl FnOnce()) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match pending.remove(&seq) {
            Some(event) => {
                before();
                self.respond(&event, allow);
                true
            }
            None => false,
        }
    }

    fn respond(&self, event: &FanotifyEvent, allow: bool) {
        let Some(fd) = event.fd() else {
            return;
        };
        let verdict = if allow {
            Response::FAN_ALLOW
        } else {
            Response::FAN_DENY
        };
        if let Err(e) = self
            .group
            .write_response(FanotifyResponse::new(fd, verdict))
        {
            warn!(error = %e, "cannot answer a held exec");
        }
    }

    /// Allows everything still held.
    fn allow_all(&self) {
        let all: Vec<FanotifyEvent> = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, e)| e)
            .collect();
        for event in &all {
            self.respond(event, true);
        }
    }
}

/// A held exec's deadline, and what it gets without a verdict.
struct Deadline {
    seq: u64,
    at: Instant,
    pid: u32,
    fallback: bool,
    key: (u64, u64),
}

/// Reads held execs, hands them to the verdict threads, and answers those whose time is up.
struct Reader {
    held: Arc<Held>,
    queue: Arc<Queue>,
    /// Held execs in arrival order (all share one timeout).
    deadlines: VecDeque<Deadline>,
    next: u64,
    judges: Arc<Judges>,
    me: i32,
}

impl Reader {
    fn run(&mut self, mut stop: std::io::PipeReader) {
        loop {
            let wait = self.deadlines.front().map(|d| {
                let left =
                    d.at.saturating_duration_since(Instant::now())
                        .min(Duration::from_secs(10));
                // Rounded up to the next millisecond, so a deadline is never woken for early.
                let ms = i64::try_from(left.as_millis()).unwrap_or(10_000) + 1;
                Timespec {
                    tv_sec: ms / 1000,
                    tv_nsec: (ms % 1000) * 1_000_000,
                }
            });
            let mut fds = [
                PollFd::new(&self.held.group, PollFlags::IN),
                PollFd::new(&stop, PollFlags::IN),
            ];
            match poll(&mut fds, wait.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    // The group closes with the last verdict thread, and the kernel then allows
                    // what it held.
                    warn!(error = %e, "prevention poll failed; executions are no longer held");
                    break;
                }
            }
            let stopped = !fds[1].revents().is_empty();
            if stopped {
                let _ = stop.read(&mut [0u8; 1]);
                break;
            }
            match self.held.group.read_events() {
                Ok(events) => events.into_iter().for_each(|e| self.hold(e)),
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(e) => warn!(error = %e, "cannot read held executions"),
            }
            self.expire();
        }
        self.queue.close();
        self.held.allow_all();
    }

    fn counters(&self) -> &Counters {
        &self.judges.target.counters
    }

    /// Queues one held exec for a verdict (or answers it at once).
    fn hold(&mut self, event: FanotifyEvent) {
        let Some(fd) = event.fd() else {
            return;
        };
        if !event.mask().contains(MaskFlags::FAN_OPEN_EXEC_PERM) {
            return;
        }
        self.counters().inc(Counter::ExecVerdicts);
        if event.pid() == self.me {
            self.held.respond(&event, true);
            return;
        }
        let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        let file = fd.try_clone_to_owned().map(File::from);
        let (Ok(path), Ok(file)) = (path, file) else {
            self.counters().inc(Counter::ExecVerdictsLate);
            self.held.respond(&event, true);
            return;
        };
        let Ok(meta) = file.metadata() else {
            self.counters().inc(Counter::ExecVerdictsLate);
            self.held.respond(&event, true);
            return;
        };
        let t = &self.judges.target;
        let cached = cached_exe_matches(&t.reports.execs, &t.rules.load(), &meta, &path);
        if let Some((matches, _)) = &cached
            && matches.iter().all(|m| m.score < t.policy.min_score)
        {
            // Judged before in this very state, under this name: no thread needed.
            self.held.respond(&event, true);
            return;
        }
        let pid = u32::try_from(event.pid()).unwrap_or(0);
        let fallback = t.policy.on_timeout == OnTimeout::Allow || !user_writable(&path, &meta);
        self.next += 1;
        let job = Verdict {
            seq: self.next,
            file,
            path,
            pid,
            uid: uid_of(pid),
            quick: cached.is_some() || meta.len() <= SMALL,
            fallback,
            key: (meta.dev(), meta.ino()),
        };
        self.held
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.seq, event);
        self.deadlines.push_back(Deadline {
            seq: job.seq,
            at: Instant::now() + t.policy.timeout,
            pid,
            fallback,
            key: job.key,
        });
        if let Err(job) = self.queue.push_held(job) {
            self.without_verdict(job);
        }
    }

    /// Answers every held exec whose deadline passed.
    fn expire(&mut self) {
        let now = Instant::now();
        while let Some(d) = self.deadlines.front() {
            if d.at > now {
                break;
            }
            let Some(d) = self.deadlines.pop_front() else {
                break;
            };
            match self.queue.withdraw(d.seq) {
                Some(job) => self.without_verdict(job),
                // Being judged (or judged): its thread reports it as late if this answers it.
                None => self.fallback(d.seq, d.fallback, Some((d.pid, d.key))),
            }
        }
    }

    /// Answers an exec that gets no verdict in time, and queues it to be judged afterwards.
    fn without_verdict(&self, job: Verdict) {
        let (seq, fallback, pid, key) = (job.seq, job.fallback, job.pid, job.key);
        let late = self.queue.push_late(job);
        if !late {
            self.counters().inc(Counter::ExecVerdictsUnjudged);
        }
        self.fallback(seq, fallback, late.then_some((pid, key)));
    }

    /// Gives exec `seq` its answer without a verdict, and counts it. `judged` names an exec that
    /// will still be judged, and reported by prevention: the exec events leave it alone.
    fn fallback(&self, seq: u64, allow: bool, judged: Option<(u32, (u64, u64))>) {
        let unjudged = &self.judges.target.reports.unjudged;
        let answered = self.held.answer_then(seq, allow, || {
            if let Some((pid, key)) = judged
                && allow
            {
                unjudged.insert(pid, key);
            }
        });
        if answered {
            self.counters().inc(if allow {
                Counter::ExecVerdictsLate
            } else {
                Counter::ExecVerdictsDenied
            });
        }
    }
}

/// The uid of process `pid` (that of its `/proc` entry); `u32::MAX` when it is gone.
fn uid_of(pid: u32) -> u32 {
    std::fs::metadata(format!("/proc/{pid}")).map_or(u32::MAX, |m| m.uid())
}

/// Whether a user other than root can write the executable, or put another in its place: the
/// file belongs to another user or is writable by its group or others, or so is a directory
/// above it (unless that directory is sticky, as `/tmp` is: then only the owner of an entry may
/// replace it, and a root-owned entry stays root's).
fn user_writable(path: &Path, meta: &Metadata) -> bool {
    const STICKY: u32 = 0o1000;
    let file_open = meta.uid() != 0 || meta.mode() & 0o022 != 0;
    let dir_open = |m: &Metadata| m.uid() != 0 || (m.mode() & 0o022 != 0 && m.mode() & STICKY == 0);
    file_open
        || path
            .ancestors()
            .skip(1)
            .any(|dir| std::fs::metadata(dir).map_or(true, |m| dir_open(&m)))
}

/// What the verdict threads share.
struct Judges {
    queue: Arc<Queue>,
    held: Arc<Held>,
    users: Users,
    target: GateTarget,
}

impl Judges {
    /// Gives verdicts until the reader stops; a new rule set takes over at the next exec.
    /// `quick_only`: this thread judges small and cached files only.
    fn run(&self, quick_only: bool) {
        let t = &self.target;
        let mut carried: Option<Taken> = None;
        loop {
            let rules = t.rules.load_full();
            let mut scanner = FileScanner::new(&rules, t.options);
            let mut made = governor().generation();
            loop {
                if governor().release_due(&mut made, &t.counters) {
                    scanner.release();
                }
                let Some(taken) = carried.take().or_else(|| self.queue.take(quick_only)) else {
                    return;
                };
                if !Arc::ptr_eq(&t.rules.load(), &rules) {
                    carried = Some(taken);
                    break;
                }
                let open = self.judge(&taken.job, &mut scanner, &rules);
                self.queue.done(&taken);
                if !open {
                    return;
                }
            }
        }
    }

    /// Answers one exec (or reports one answered without a verdict); false when detections
    /// can no longer be sent (the agent is stopping).
    fn judge(&self, job: &Verdict, scanner: &mut FileScanner<'_>, rules: &RuleSet) -> bool {
        let t = &self.target;
        let Ok(file) = job.file.try_clone() else {
            self.held.answer(job.seq, true);
            return true;
        };
        let (matches, sha256) =
            exe_matches(&t.reports.execs, scanner, file, &job.path, Reading::Whole);
        let matches = uncovered(matches, &sha256, &job.path, rules);
        let blocks = |m: &&RuleMatch| m.score >= t.policy.min_score;
        let blocking: Vec<RuleMatch> = matches.iter().filter(blocks).cloned().collect();
        if blocking.is_empty() {
            if self.held.answer(job.seq, true) {
                // Any lower match is the exec event's to report, as an alert.
                return true;
            }
            // Allowed without a verdict: every match is late. (Denied: nothing to say.)
            let late = if job.fallback { matches } else { Vec::new() };
            let found = self.detections(job, sha256, late, rules);
            return self.send(job, found, DetectionAction::Late);
        }
        // What /proc tells of the process is read while it still waits (it may exit at once).
        let found = self.detections(job, sha256.clone(), blocking, rules);
        if self.held.answer(job.seq, false) {
            t.counters.inc(Counter::ExecsBlocked);
            return self.send(job, found, DetectionAction::Blocked);
        }
        if job.fallback {
            let found = self.detections(job, sha256, matches, rules);
            self.send(job, found, DetectionAction::Late)
        } else {
            self.send(job, found, DetectionAction::Blocked)
        }
    }

    fn detections(
        &self,
        job: &Verdict,
        sha256: String,
        matches: Vec<RuleMatch>,
        rules: &RuleSet,
    ) -> Vec<Detection> {
        if matches.is_empty() {
            return Vec::new();
        }
        let exec = Exec {
            pid: job.pid,
            path: &job.path,
            sha256,
        };
        exec_detections(&self.target.reports.ids, &self.users, &exec, matches, rules)
    }

    /// Sends detections with `action`; false when they can no longer be sent.
    fn send(&self, job: &Verdict, found: Vec<Detection>, action: DetectionAction) -> bool {
        let t = &self.target;
        for mut d in found {
            d.action = action as i32;
            d.description = match action {
                DetectionAction::Blocked => blocked_description(&job.path, &d.description),
                DetectionAction::Late => late_description(&job.path, &d.description),
                DetectionAction::Alert => d.description,
            };
            t.counters.inc(Counter::Detections);
            if t.detections.blocking_send(d).is_err() {
                return false;
            }
        }
        true
    }
}

/// The matches no exception of the bundle covers: an excepted match never blocks (and is not
/// reported either).
fn uncovered(
    matches: Vec<RuleMatch>,
    sha256: &str,
    path: &Path,
    rules: &RuleSet,
) -> Vec<RuleMatch> {
    let exceptions = rules.exceptions();
    if exceptions.is_empty() || matches.is_empty() {
        return matches;
    }
    let now = vedette_proto::now_ms();
    let path = path.to_string_lossy();
    matches
        .into_iter()
        .filter(|m| {
            let seen = vedette_engine::exceptions::Seen {
                rule: &m.rule,
                indicator: &m.indicator.id,
                sha256,
                path: &path,
            };
            exceptions.covering_seen(&seen, "", "", now).is_none()
        })
        .collect()
}

fn blocked_description(path: &Path, what: &str) -> String {
    let what = if what.is_empty() {
        String::new()
    } else {
        format!(": {what}")
    };
    format!("execution of {} blocked{what}", path.display())
}

fn late_description(path: &Path, what: &str) -> String {
    let what = if what.is_empty() {
        String::new()
    } else {
        format!(": {what}")
    };
    format!(
        "execution of {} ran before its verdict (judged afterwards){what}",
        path.display()
    )
}
