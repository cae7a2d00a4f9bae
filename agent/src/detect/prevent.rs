//! Prevention mode: every exec of a file on the watched file systems waits for a verdict, and
//! the exec of a file matching a rule or indicator scored at or above the threshold is denied
//! (the process gets EPERM; the detection says `action: blocked`).
//!
//! A fanotify group of the content class holds each exec (`FAN_OPEN_EXEC_PERM`) until the
//! agent answers. Verdict threads of their own (not the scan pool, whose queue may be long)
//! judge the executable **through the event's descriptor**, from the shared executable cache
//! when the file is unchanged. The agent fails open:
//! - a verdict not given within the timeout is given as "allow" by the reader, and counted;
//! - a full verdict queue, an unreadable file or any scan error allows;
//! - the agent's own execs are allowed at once;
//! - when the agent stops, everything held is allowed; when it dies, the kernel closes the
//!   group and allows whatever was held.
//!
//! What this cannot guard against, and the operator must know: while the agent is alive but
//! frozen (SIGSTOP, a debugger) every exec on the marked file systems waits; and a file that
//! an indicator matches wrongly cannot be run until the rule is fixed.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
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

use crate::config::Prevention;
use crate::detect::ReportFilter;
use crate::detect::fanotify::{FanError, mark, raise_open_files_limit};
use crate::detect::procmon::{Exec, Users, exe_matches, exec_detections};
use crate::governor::governor;
use crate::telemetry::{Counter, Counters};

/// Execs waiting for a verdict thread; past this they are allowed at once.
const VERDICT_QUEUE: usize = 256;

/// Threads giving verdicts.
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
        let (tx, rx) = sync_channel::<Verdict>(VERDICT_QUEUE);
        let judges = Arc::new(Judges {
            rx: Mutex::new(rx),
            held: held.clone(),
            users: Users::load(),
            target,
        });
        let mut threads = Vec::new();
        for i in 0..VERDICT_THREADS {
            let judges = judges.clone();
            let t = std::thread::Builder::new()
                .name(format!("verdict-{i}"))
                .spawn(move || judges.run())
                .map_err(FanError::Thread)?;
            threads.push(t);
        }
        let (rd, wr) = std::io::pipe().map_err(FanError::Thread)?;
        let mut reader = Reader {
            held,
            queue: tx,
            deadlines: VecDeque::new(),
            next: 0,
            timeout: judges.target.policy.timeout,
            counters: judges.target.counters.clone(),
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
    /// Answers held exec `seq`; false when it was answered already (it timed out).
    fn answer(&self, seq: u64, allow: bool) -> bool {
        let event = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&seq);
        match event {
            Some(event) => {
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

/// One exec to judge.
struct Verdict {
    seq: u64,
    file: File,
    path: PathBuf,
    pid: u32,
}

/// Reads held execs, hands them to the verdict threads, and allows those whose time is up.
struct Reader {
    held: Arc<Held>,
    queue: SyncSender<Verdict>,
    /// Held execs in arrival order with their deadlines (all share one timeout).
    deadlines: VecDeque<(u64, Instant)>,
    next: u64,
    timeout: Duration,
    counters: Arc<Counters>,
    me: i32,
}

impl Reader {
    fn run(&mut self, mut stop: std::io::PipeReader) {
        loop {
            let wait = self.deadlines.front().map(|(_, d)| {
                let left = d
                    .saturating_duration_since(Instant::now())
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
                    // Returning closes the queue; the group closes with the last verdict
                    // thread, and the kernel then allows what it held.
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
        self.held.allow_all();
    }

    /// Queues one held exec for a verdict (or allows it at once).
    fn hold(&mut self, event: FanotifyEvent) {
        let Some(fd) = event.fd() else {
            return;
        };
        if !event.mask().contains(MaskFlags::FAN_OPEN_EXEC_PERM) {
            return;
        }
        self.counters.inc(Counter::ExecVerdicts);
        if event.pid() == self.me {
            self.held.respond(&event, true);
            return;
        }
        let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        let file = fd.try_clone_to_owned().map(File::from);
        let (Ok(path), Ok(file)) = (path, file) else {
            self.counters.inc(Counter::ExecVerdictsLate);
            self.held.respond(&event, true);
            return;
        };
        self.next += 1;
        let seq = self.next;
        let pid = u32::try_from(event.pid()).unwrap_or(0);
        self.held
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(seq, event);
        self.deadlines
            .push_back((seq, Instant::now() + self.timeout));
        let job = Verdict {
            seq,
            file,
            path,
            pid,
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.queue.try_send(job)
            && self.held.answer(seq, true)
        {
            self.counters.inc(Counter::ExecVerdictsLate);
        }
    }

    /// Allows every held exec whose deadline passed.
    fn expire(&mut self) {
        let now = Instant::now();
        while let Some(&(seq, deadline)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if self.held.answer(seq, true) {
                self.counters.inc(Counter::ExecVerdictsLate);
            }
        }
    }
}

/// What the verdict threads share.
struct Judges {
    rx: Mutex<Receiver<Verdict>>,
    held: Arc<Held>,
    users: Users,
    target: GateTarget,
}

impl Judges {
    /// Gives verdicts until the reader stops; a new rule set takes over at the next exec.
    fn run(&self) {
        let t = &self.target;
        let mut carried: Option<Verdict> = None;
        loop {
            let rules = t.rules.load_full();
            let mut scanner = FileScanner::new(&rules, t.options);
            let mut made = governor().generation();
            loop {
                if governor().release_due(&mut made, &t.counters) {
                    scanner.release();
                }
                let next = carried.take().or_else(|| {
                    let rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
                    rx.recv().ok()
                });
                let Some(job) = next else {
                    return;
                };
                if !Arc::ptr_eq(&t.rules.load(), &rules) {
                    carried = Some(job);
                    break;
                }
                if !self.judge(job, &mut scanner, &rules) {
                    return;
                }
            }
        }
    }

    /// Answers one exec; false when detections can no longer be sent (the agent is stopping).
    fn judge(&self, job: Verdict, scanner: &mut FileScanner<'_>, rules: &RuleSet) -> bool {
        let t = &self.target;
        let (matches, sha256) = exe_matches(&t.reports.execs, scanner, job.file, &job.path);
        let blocking: Vec<RuleMatch> = matches
            .into_iter()
            .filter(|m| m.score >= t.policy.min_score)
            .collect();
        if blocking.is_empty() {
            self.held.answer(job.seq, true);
            return true;
        }
        // What /proc tells of the process is read while it still waits (it may exit at once).
        let exec = Exec {
            pid: job.pid,
            path: &job.path,
            sha256,
        };
        let found = exec_detections(&t.reports.ids, &self.users, &exec, blocking, rules);
        if !self.held.answer(job.seq, false) {
            // Too late: the exec was allowed, and the exec event reports it as an alert.
            return true;
        }
        t.counters.inc(Counter::ExecsBlocked);
        for mut d in found {
            d.action = DetectionAction::Blocked as i32;
            d.description = blocked_description(&job.path, &d.description);
            t.counters.inc(Counter::Detections);
            if t.detections.blocking_send(d).is_err() {
                return false;
            }
        }
        true
    }
}

fn blocked_description(path: &Path, what: &str) -> String {
    let what = if what.is_empty() {
        String::new()
    } else {
        format!(": {what}")
    };
    format!("execution of {} blocked{what}", path.display())
}
