//! Reading a process's executable on a worker thread, within a deadline, so that a file system
//! that never answers (a hung FUSE daemon, a dead NFS server) cannot stop the process monitor;
//! and saying so, as a detection, when an executable cannot be read at all: a user's own FUSE
//! mount (without `allow_other`) and NFS with `root_squash` refuse even root, which leaves no
//! hash, no YARA rule and no verdict for what runs from them.
//!
//! A read past its deadline leaves its worker behind (blocked in the kernel until the file
//! system answers or goes away, or still reading a very large file); the next read gets a new
//! worker. A FUSE or network file system that let a read pass its deadline is not read again
//! while the rule set lasts. At most [`MAX_STUCK`] workers are left behind at a time.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

use vedette_engine::{FileScanner, IndicatorRef, MatchKind, RuleMatch, RuleSet, ScanOptions};

use crate::detect::cache::ScanCache;
use crate::detect::mounts::{Mounts, exe_device};
use crate::detect::procmon::{Reading, exe_matches};

/// The rule name of a process whose executable the agent cannot read.
pub const UNSCANNABLE_RULE: &str = vedette_engine::findings::UNSCANNABLE_EXEC;

/// Workers left blocked on reads that never finished, at most.
const MAX_STUCK: usize = 4;

/// One executable to read and judge.
struct Job {
    pid: u32,
    name: PathBuf,
}

/// What reading it gave.
enum Read {
    Judged(Vec<RuleMatch>, String),
    /// The process is gone.
    Gone,
    /// It could not be read: why.
    Refused(std::io::Error),
}

/// Reads and judges executables against one rule set, each within `deadline`.
pub(crate) struct ExeReader {
    rules: Arc<RuleSet>,
    options: ScanOptions,
    cache: Arc<ScanCache>,
    deadline: Duration,
    worker: Option<(Sender<Job>, Receiver<Read>)>,
    /// Held by every worker until it returns: the workers still alive.
    alive: Arc<()>,
    /// Devices whose reads did not finish in time: not read again.
    hung: HashSet<u64>,
}

impl ExeReader {
    pub(crate) fn new(
        rules: Arc<RuleSet>,
        options: ScanOptions,
        cache: Arc<ScanCache>,
        deadline: Duration,
    ) -> ExeReader {
        ExeReader {
            rules,
            options,
            cache,
            deadline,
            worker: None,
            alive: Arc::new(()),
            hung: HashSet::new(),
        }
    }

    /// A worker, started when there is none.
    fn worker(&mut self) -> Option<&(Sender<Job>, Receiver<Read>)> {
        let left_behind = Arc::strong_count(&self.alive) - 1;
        if self.worker.is_none() && left_behind < MAX_STUCK {
            let (jobs, rx) = channel::<Job>();
            let (tx, results) = channel::<Read>();
            let (rules, options, cache) = (self.rules.clone(), self.options, self.cache.clone());
            let alive = self.alive.clone();
            let started = std::thread::Builder::new()
                .name("exe-reader".into())
                .spawn(move || {
                    work(&rules, options, &cache, &rx, &tx);
                    drop(alive);
                });
            if started.is_ok() {
                self.worker = Some((jobs, results));
            }
        }
        self.worker.as_ref()
    }

    /// The matches and SHA-256 of the executable process `pid` runs (`exe` is the name
    /// indicators see), or the finding that it cannot be read.
    pub(crate) fn judge(&mut self, pid: u32, exe: &Path) -> (Vec<RuleMatch>, String) {
        let dev = exe_device(pid, exe);
        if let Some(dev) = dev.filter(|d| self.hung.contains(d)) {
            let why = "an earlier read on its file system did not finish";
            return (vec![unscannable(pid, exe, fstype(dev), why)], String::new());
        }
        let deadline = self.deadline;
        let Some((jobs, results)) = self.worker() else {
            let why = "too many reads are hung";
            return (
                vec![unscannable(pid, exe, dev.and_then(fstype), why)],
                String::new(),
            );
        };
        let job = Job {
            pid,
            name: exe.to_owned(),
        };
        if jobs.send(job).is_err() {
            self.worker = None;
            return (Vec::new(), String::new());
        }
        match results.recv_timeout(deadline) {
            Ok(Read::Judged(m, sha)) => (m, sha),
            Ok(Read::Gone) => (Vec::new(), String::new()),
            Ok(Read::Refused(e)) => {
                let why = e.to_string();
                (
                    vec![unscannable(pid, exe, dev.and_then(fstype), &why)],
                    String::new(),
                )
            }
            Err(RecvTimeoutError::Timeout) => {
                // Left behind: it returns when the read does, and finds no one listening.
                self.worker = None;
                let mounts = Mounts::read();
                self.hung.extend(dev.filter(|d| mounts.may_hang(*d)));
                let why = format!(
                    "it was not read within {}",
                    humantime::format_duration(deadline)
                );
                (
                    vec![unscannable(pid, exe, dev.and_then(fstype), &why)],
                    String::new(),
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.worker = None;
                (Vec::new(), String::new())
            }
        }
    }
}

/// The worker: reads and judges until its caller goes away.
fn work(
    rules: &RuleSet,
    options: ScanOptions,
    cache: &ScanCache,
    jobs: &Receiver<Job>,
    results: &Sender<Read>,
) {
    let mut scanner = FileScanner::new(rules, options);
    while let Ok(job) = jobs.recv() {
        let read = match std::fs::File::open(format!("/proc/{}/exe", job.pid)) {
            Ok(file) => match file.metadata() {
                Ok(_) => {
                    let (m, sha) =
                        exe_matches(cache, &mut scanner, file, &job.name, Reading::UpToCap);
                    Read::Judged(m, sha)
                }
                Err(e) => Read::Refused(e),
            },
            Err(e) if gone(&e) => Read::Gone,
            Err(e) => Read::Refused(e),
        };
        if results.send(read).is_err() {
            return;
        }
    }
}

/// Whether an open of `/proc/PID/exe` failed because the process (or its executable) is gone.
fn gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
        || e.raw_os_error() == Some(rustix::io::Errno::SRCH.raw_os_error())
}

/// The type of the file system on `dev`.
fn fstype(dev: u64) -> Option<String> {
    Mounts::read().fstype(dev).map(str::to_string)
}

/// The finding for a process whose executable cannot be read.
fn unscannable(pid: u32, exe: &Path, fstype: Option<String>, why: &str) -> RuleMatch {
    let on = fstype.map(|t| format!(" on {t}")).unwrap_or_default();
    RuleMatch {
        kind: MatchKind::Process,
        rule: UNSCANNABLE_RULE.into(),
        source: "vedette".into(),
        score: vedette_engine::findings::default_score(UNSCANNABLE_RULE),
        description: format!(
            "process {pid} runs {}{on}, which the agent cannot read ({why}): no hash, no YARA \
             rule and no verdict judged it",
            exe.display()
        ),
        author: String::new(),
        reference: String::new(),
        indicator: Arc::new(IndicatorRef {
            source: "vedette".into(),
            id: UNSCANNABLE_RULE.into(),
            origin: "built-in".into(),
            // Hide artifacts.
            techniques: vec!["T1564".into()],
            ..Default::default()
        }),
    }
}
