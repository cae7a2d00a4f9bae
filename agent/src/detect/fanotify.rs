//! On-access events from fanotify: every file closed after writing and every file opened for
//! execution on the file systems that hold the watched paths, each with an open descriptor.
//!
//! One mark per file system (`FAN_MARK_FILESYSTEM`, or the mount where that is refused): no
//! per-directory watches and no `max_user_watches` limit. A written file is queued only when its
//! path, read from the event's descriptor, is under a watched root and not excluded; the scanner
//! then reads **the descriptor**, never the path, so nothing can be swapped in between. Every
//! exec on those file systems is queued with the pid that made it. The agent's own events are
//! ignored. The kernel's queue keeps its limit (`fs.fanotify.max_queued_events`): when scanning
//! falls behind, the reader waits on the bounded job queue, the kernel queue fills, and its
//! overflow rescans the roots, so memory never grows with a burst.
//!
//! A file written outside the roots and then renamed into one raises no event here (the rename
//! is not a write, and `FAN_MOVED_TO` needs a group that hands over no descriptors): the daemon
//! keeps [`watch`](crate::detect::watch) beside it for renames only. Needs CAP_SYS_ADMIN; the
//! daemon falls back to inotify for everything without it.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::sys::fanotify::{EventFFlags, Fanotify, FanotifyEvent, InitFlags, MarkFlags, MaskFlags};
use rustix::event::{PollFd, PollFlags, poll};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::detect::pool::{Job, JobSender};
use crate::detect::walk::{WalkRules, each_file};
use crate::telemetry::{Counter, Counters};

/// A running fanotify reader; [`FanWatch::stop`] (or dropping it) stops it.
pub struct FanWatch {
    stop: Option<std::io::PipeWriter>,
    thread: Option<JoinHandle<()>>,
}

/// Where events go, and what is skipped.
pub struct FanTarget {
    pub queue: JobSender,
    pub rules: WalkRules,
    pub counters: Arc<Counters>,
    /// Ends an overflow rescan in progress at shutdown.
    pub stop: CancellationToken,
    /// Also report executions (`FAN_OPEN_EXEC`).
    pub execs: bool,
}

/// Why fanotify could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FanError {
    #[error("fanotify_init failed: {0} (it needs CAP_SYS_ADMIN)")]
    Init(Errno),
    #[error("cannot mark the file system of `{}`: {source}", path.display())]
    Mark { path: PathBuf, source: Errno },
    #[error("cannot start the fanotify thread: {0}")]
    Thread(std::io::Error),
}

impl FanWatch {
    /// Marks the file systems of `roots` and starts reading events.
    pub fn start(roots: &[PathBuf], target: FanTarget) -> Result<FanWatch, FanError> {
        let group = Fanotify::init(
            InitFlags::FAN_CLASS_NOTIF | InitFlags::FAN_CLOEXEC,
            EventFFlags::O_RDONLY
                | EventFFlags::O_LARGEFILE
                | EventFFlags::O_CLOEXEC
                | EventFFlags::O_NOATIME,
        )
        .map_err(FanError::Init)?;
        let mut mask = MaskFlags::FAN_CLOSE_WRITE;
        if target.execs {
            mask |= MaskFlags::FAN_OPEN_EXEC;
        }
        for root in roots {
            mark(&group, root, mask)?;
        }
        raise_open_files_limit();
        let (rd, wr) = std::io::pipe().map_err(FanError::Thread)?;
        let mut reader = Reader {
            group,
            roots: roots.to_vec(),
            target,
            me: std::process::id() as i32,
        };
        let thread = std::thread::Builder::new()
            .name("fanotify".into())
            .spawn(move || reader.run(rd))
            .map_err(FanError::Thread)?;
        Ok(FanWatch {
            stop: Some(wr),
            thread: Some(thread),
        })
    }

    /// Stops reading; returns once nothing more will be queued.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for FanWatch {
    fn drop(&mut self) {
        // Closing the pipe's write end wakes the reader's poll; it then returns.
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Marks the whole file system holding `path`, or its mount where file-system marks are
/// refused.
pub(crate) fn mark(group: &Fanotify, path: &Path, mask: MaskFlags) -> Result<(), FanError> {
    let add = MarkFlags::FAN_MARK_ADD;
    let result = group
        .mark(
            add | MarkFlags::FAN_MARK_FILESYSTEM,
            mask,
            rustix::fs::CWD,
            Some(path),
        )
        .or_else(|_| {
            group.mark(
                add | MarkFlags::FAN_MARK_MOUNT,
                mask,
                rustix::fs::CWD,
                Some(path),
            )
        });
    match result {
        Ok(()) => {
            info!(path = %path.display(), "watching (fanotify)");
            Ok(())
        }
        Err(source) => Err(FanError::Mark {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Every queued event holds an open descriptor: lift the soft limit on open files to the hard
/// one so a burst cannot run the agent out of descriptors.
pub(crate) fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            warn!(error = %e, "cannot raise the open files limit");
        }
    }
}

struct Reader {
    group: Fanotify,
    roots: Vec<PathBuf>,
    target: FanTarget,
    me: i32,
}

impl Reader {
    /// Reads events until the stop pipe closes or the queue does.
    fn run(&mut self, mut stop: std::io::PipeReader) {
        loop {
            let mut fds = [
                PollFd::new(&self.group, PollFlags::IN),
                PollFd::new(&stop, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    warn!(error = %e, "fanotify poll failed; no more file events");
                    return;
                }
            }
            let stopped = !fds[1].revents().is_empty();
            if stopped {
                let _ = stop.read(&mut [0u8; 1]);
                return;
            }
            let events = match self.group.read_events() {
                Ok(events) => events,
                Err(Errno::EINTR | Errno::EAGAIN) => continue,
                Err(e) => {
                    warn!(error = %e, "cannot read fanotify events");
                    self.target.counters.inc(Counter::WatchErrors);
                    continue;
                }
            };
            for event in events {
                if !self.handle(&event) {
                    return;
                }
            }
        }
    }

    /// Queues what one event asks for; false when the queue has closed.
    fn handle(&self, event: &FanotifyEvent) -> bool {
        let t = &self.target;
        t.counters.inc(Counter::FsEvents);
        let mask = event.mask();
        if mask.contains(MaskFlags::FAN_Q_OVERFLOW) {
            warn!("fanotify queue overflowed: rescanning watched trees");
            t.counters.inc(Counter::WatchOverflows);
            return self.rescan();
        }
        let Some(fd) = event.fd() else {
            return true;
        };
        if event.pid() == self.me {
            return true;
        }
        let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) else {
            return true;
        };
        let open = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().ok().map(File::from);
        if mask.contains(MaskFlags::FAN_OPEN_EXEC)
            && let Some(file) = open(fd)
        {
            t.counters.inc(Counter::ExecEvents);
            let pid = u32::try_from(event.pid()).unwrap_or(0);
            let job = Job::Exec {
                file,
                path: path.clone(),
                pid,
            };
            if t.queue.send(job).is_err() {
                return false;
            }
        }
        if mask.contains(MaskFlags::FAN_CLOSE_WRITE)
            && self.roots.iter().any(|r| path.starts_with(r))
            && t.rules.admits(&path)
            && let Some(file) = open(fd)
        {
            return t.queue.send(Job::Written { file, path }).is_ok();
        }
        true
    }

    /// Queues every file under the roots (after an overflow). False when the queue closed.
    fn rescan(&self) -> bool {
        let t = &self.target;
        let mut open = true;
        each_file(&self.roots, &t.rules, &t.counters, &t.stop, |found| {
            open = t.queue.send(Job::Path(found.path)).is_ok();
            open
        });
        open
    }
}
