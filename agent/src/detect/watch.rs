//! Realtime file watching: inotify (through `notify`) on each configured root, recursively.
//!
//! A file is queued for scanning when it is closed after writing, created, or renamed into a
//! watched tree; other modifications are debounced per path (the scan happens once the file has
//! been quiet for [`DEBOUNCE`]). When the kernel's event queue overflows, the watched roots are
//! walked again so that nothing written meanwhile goes unscanned. Rescans and directories moved
//! in are walked by [`walk`](crate::detect::walk), and events on excluded paths are ignored, so
//! the watcher skips exactly what full scans skip.
//!
//! A directory moved in is bulk work (a tree of any size arriving at once): a thread of its own
//! walks it and feeds its files to the scan queue only while the queue is nearly empty, so
//! files written meanwhile are scanned first, not behind the whole tree.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::detect::pool::{Job, JobSender};
use crate::detect::renames::RenameWatch;
use crate::detect::walk::{WalkRules, each_file};
use crate::telemetry::{Counter, Counters};

/// File-system events buffered between the notify thread and the debouncer.
const EVENT_QUEUE: usize = 4096;

/// Quiet time after a modification before the file is scanned.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// A moved-in tree's next file waits while the scan queue holds this many jobs or more.
const BULK_LOW_WATER: u64 = 2;
/// How often a waiting moved-in walk looks at the queue again.
const BULK_POLL: Duration = Duration::from_millis(5);

/// A running watcher; [`FileWatch::stop`] (or dropping it) stops watching.
pub struct FileWatch {
    /// Where the events come from: a `notify` watcher of every change, or, beside fanotify,
    /// one of renames in only ([`RenameWatch`]). Dropping either closes the event channel.
    watcher: Option<(Option<RecommendedWatcher>, Option<RenameWatch>)>,
    thread: Option<JoinHandle<()>>,
}

/// Where the watcher sends work, and what it skips.
pub struct WatchTarget {
    pub queue: JobSender,
    pub rules: WalkRules,
    pub counters: Arc<Counters>,
    /// Ends a rescan in progress at shutdown.
    pub stop: CancellationToken,
    /// Only files (and directories) renamed into the trees: beside fanotify, which sees every
    /// write but not a file written elsewhere and moved in.
    pub renames_only: bool,
}

impl FileWatch {
    /// Watches `roots` and sends paths to scan into `queue`.
    pub fn start(roots: &[PathBuf], target: WatchTarget) -> Result<FileWatch, WatchError> {
        // Bounded: when scanning falls behind, the notify thread waits, the kernel queue fills
        // and overflows, and the overflow triggers a rescan. Memory never grows with the burst.
        let (tx, rx) = sync_channel::<notify::Result<Event>>(EVENT_QUEUE);
        let source = if target.renames_only {
            let (rules, counters) = (target.rules.clone(), target.counters.clone());
            (None, Some(RenameWatch::start(roots, rules, counters, tx)?))
        } else {
            (Some(watch_all(roots, tx, &target.counters)?), None)
        };
        for root in roots {
            info!(path = %root.display(), renames_only = target.renames_only, "watching");
        }
        let mut debouncer = Debouncer::new(roots.to_vec(), target);
        let thread = std::thread::Builder::new()
            .name("watch-debounce".into())
            .spawn(move || debouncer.run(&rx))
            .map_err(WatchError::Thread)?;
        Ok(FileWatch {
            watcher: Some(source),
            thread: Some(thread),
        })
    }
}

/// A `notify` watcher of every change under `roots`, sending to `tx`.
fn watch_all(
    roots: &[PathBuf],
    tx: SyncSender<notify::Result<Event>>,
    counters: &Counters,
) -> Result<RecommendedWatcher, WatchError> {
    let mut watcher = notify::recommended_watcher(move |ev| {
        let _ = tx.send(ev);
    })
    .map_err(WatchError::Start)?;
    for root in roots {
        match watcher.watch(root, RecursiveMode::Recursive) {
            Ok(()) => {}
            Err(e) if is_watch_limit(&e) => {
                error!(
                    path = %root.display(),
                    error = %e,
                    "inotify watch limit reached: raise fs.inotify.max_user_watches \
                     (sysctl -w fs.inotify.max_user_watches=524288); part of this tree is not watched"
                );
                counters.inc(Counter::WatchLimitReached);
            }
            Err(source) => {
                return Err(WatchError::Root {
                    path: root.clone(),
                    source,
                });
            }
        }
    }
    Ok(watcher)
}

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot start the file watcher: {0}")]
    Start(notify::Error),
    #[error("cannot watch `{path}`: {source}")]
    Root {
        path: PathBuf,
        source: notify::Error,
    },
    #[error("cannot start the watcher thread: {0}")]
    Thread(std::io::Error),
}

impl FileWatch {
    /// Stops watching; returns once nothing more will be queued for scanning (see `Drop`).
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        // Dropping the watcher closes the event channel, which ends the debouncer: after this,
        // nothing more is queued for scanning.
        self.watcher.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn is_watch_limit(e: &notify::Error) -> bool {
    matches!(e.kind, notify::ErrorKind::MaxFilesWatch)
        || matches!(&e.kind, notify::ErrorKind::Io(io) if rustix::io::Errno::from_io_error(io) == Some(rustix::io::Errno::NOSPC))
}

/// What an event means for the paths it names.
enum Action {
    Now,
    Later,
    Ignore,
}

fn action(kind: &EventKind) -> Action {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Action::Now,
        EventKind::Create(CreateKind::File | CreateKind::Any) => Action::Later,
        EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)) => Action::Now,
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => Action::Later,
        _ => Action::Ignore,
    }
}

fn is_rename_in(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
    )
}

/// Turns events into paths to scan: at once for closed-after-write and moved-in files, after
/// [`DEBOUNCE`] of quiet for other changes; a rescan of every root after an overflow.
struct Debouncer {
    roots: Vec<PathBuf>,
    target: Arc<WatchTarget>,
    /// Path → when it is due.
    pending: HashMap<PathBuf, Instant>,
    /// Directories moved in, to the thread that walks them (started with the first).
    moved: Option<std::sync::mpsc::Sender<PathBuf>>,
}

impl Debouncer {
    fn new(roots: Vec<PathBuf>, target: WatchTarget) -> Debouncer {
        Debouncer {
            roots,
            target: Arc::new(target),
            pending: HashMap::new(),
            moved: None,
        }
    }

    /// Hands a directory moved in to the walker of moved-in trees; false when the scan queue
    /// has closed.
    fn walk_moved(&mut self, dir: PathBuf) -> bool {
        let dir = match &self.moved {
            Some(tx) => match tx.send(dir) {
                Ok(()) => return true,
                Err(e) => e.0,
            },
            None => dir,
        };
        let (tx, rx) = std::sync::mpsc::channel::<PathBuf>();
        let target = self.target.clone();
        let started = std::thread::Builder::new()
            .name("moved-walk".into())
            .spawn(move || {
                for root in rx {
                    if !bulk_walk(&target, &root) {
                        return;
                    }
                }
            });
        match started {
            Ok(_) => {
                let sent = tx.send(dir).is_ok();
                self.moved = Some(tx);
                sent
            }
            // No thread: walked here, as a rescan is.
            Err(_) => self.walk_into(&dir),
        }
    }

    /// Runs until the event channel closes (the watcher stopped) or the queue does.
    fn run(&mut self, rx: &Receiver<notify::Result<Event>>) {
        loop {
            let wait = self
                .pending
                .values()
                .min()
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(3600));
            let open = match rx.recv_timeout(wait) {
                Ok(event) => self.handle(event),
                Err(RecvTimeoutError::Timeout) => true,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            if !open || !self.flush(Instant::now()) {
                return;
            }
        }
    }

    /// Takes one event; false when the scan queue has closed.
    fn handle(&mut self, event: notify::Result<Event>) -> bool {
        let counters = &self.target.counters;
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "watch error");
                counters.inc(Counter::WatchErrors);
                return true;
            }
        };
        counters.inc(Counter::FsEvents);
        if event.need_rescan() {
            warn!("inotify queue overflowed: rescanning watched trees");
            counters.inc(Counter::WatchOverflows);
            let roots = self.roots.clone();
            return roots.iter().all(|r| self.walk_into(r));
        }
        let due = match action(&event.kind) {
            _ if self.target.renames_only && !is_rename_in(&event.kind) => return true,
            Action::Now => Instant::now(),
            Action::Later => Instant::now() + DEBOUNCE,
            Action::Ignore => return true,
        };
        // A rename reports [from, to]; the last path is where the file is now.
        let paths: &[PathBuf] = match event.kind {
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                event.paths.last().map(std::slice::from_ref).unwrap_or(&[])
            }
            _ => &event.paths,
        };
        for p in paths.iter().filter(|p| self.target.rules.admits(p)) {
            self.pending.insert(p.clone(), due);
        }
        true
    }

    /// Queues every path due at `now`; false when the scan queue has closed.
    fn flush(&mut self, now: Instant) -> bool {
        let due: Vec<PathBuf> = self
            .pending
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(p, _)| p.clone())
            .collect();
        for p in due {
            self.pending.remove(&p);
            let open = if p.is_dir() {
                // A directory moved into a watched tree: its files are new to us.
                self.walk_moved(p)
            } else {
                self.target.queue.send(Job::Path(p)).is_ok()
            };
            if !open {
                return false;
            }
        }
        true
    }

    /// Queues every regular file under `root`. False when the queue closed.
    fn walk_into(&self, root: &Path) -> bool {
        queue_tree(&self.target, root, false)
    }
}

/// Queues every regular file under `root`, each once the scan queue is nearly empty. False
/// when the queue closed or the agent is stopping.
fn bulk_walk(t: &WatchTarget, root: &Path) -> bool {
    queue_tree(t, root, true) && !t.stop.is_cancelled()
}

/// Queues every regular file under `root`; when `yielding`, each waits until the scan queue
/// holds fewer than [`BULK_LOW_WATER`] jobs. False when the queue closed (or, yielding, the
/// agent is stopping).
fn queue_tree(t: &WatchTarget, root: &Path, yielding: bool) -> bool {
    let mut open = true;
    each_file(
        &[root.to_owned()],
        &t.rules,
        &t.counters,
        &t.stop,
        |found| {
            while yielding && t.counters.get(Counter::ScanQueue) >= BULK_LOW_WATER {
                if t.stop.is_cancelled() {
                    open = false;
                    return false;
                }
                std::thread::sleep(BULK_POLL);
            }
            open = t.queue.send(Job::Path(found.path)).is_ok();
            open
        },
    );
    open
}

#[cfg(test)]
mod tests {
    use notify::event::{DataChange, Flag};

    use super::*;

    /// The paths queued so far.
    fn paths(rx: &Receiver<Job>) -> Vec<PathBuf> {
        rx.try_iter()
            .map(|j| match j {
                Job::Path(p) => p,
                _ => panic!("the watcher queues paths only"),
            })
            .collect()
    }

    fn debouncer(roots: &[PathBuf], excludes: &[String]) -> (Debouncer, Receiver<Job>) {
        let (queue, rx) = sync_channel(64);
        let counters = Arc::new(Counters::default());
        let target = WatchTarget {
            queue: JobSender::new(queue, counters.clone()),
            rules: WalkRules {
                one_file_system: true,
                excludes: crate::detect::walk::exclusions(excludes).unwrap(),
            },
            counters,
            stop: CancellationToken::new(),
            renames_only: false,
        };
        (Debouncer::new(roots.to_vec(), target), rx)
    }

    fn event(kind: EventKind, paths: &[&Path]) -> notify::Result<Event> {
        let mut e = Event::new(kind);
        for p in paths {
            e = e.add_path(p.to_path_buf());
        }
        Ok(e)
    }

    #[test]
    fn writes_wait_for_quiet_closes_and_renames_go_at_once_and_excludes_are_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("c"),
        );
        let skipped = tmp.path().join("skip.log");
        let (mut d, rx) = debouncer(&[tmp.path().to_owned()], &["**/*.log".to_string()]);
        let modify = EventKind::Modify(ModifyKind::Data(DataChange::Content));
        assert!(d.handle(event(modify, &[&a])));
        assert!(d.handle(event(modify, &[&a])));
        assert!(d.handle(event(modify, &[&skipped])));
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(d.handle(event(closed, &[&b])));
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert!(d.handle(event(renamed, &[&a, &c])));
        let start = Instant::now();
        assert!(d.flush(start));
        let mut now = paths(&rx);
        now.sort();
        assert_eq!(
            now,
            vec![b.clone(), c.clone()],
            "closed and renamed-in go at once"
        );
        assert!(d.flush(start + DEBOUNCE + Duration::from_millis(1)));
        let later = paths(&rx);
        assert_eq!(
            later,
            vec![a.clone()],
            "two writes to `a` make one scan; skip.log none"
        );
        assert_eq!(d.target.counters.get(Counter::FsEvents), 5);
    }

    #[test]
    fn a_directory_moved_in_waits_for_the_files_written_before_it() {
        let tmp = tempfile::tempdir().unwrap();
        let moved = tmp.path().join("moved");
        std::fs::create_dir_all(&moved).unwrap();
        std::fs::write(moved.join("one"), b"1").unwrap();
        let (mut d, rx) = debouncer(&[tmp.path().to_owned()], &[]);
        // Two written files are queued, not taken yet.
        for name in ["w1", "w2"] {
            d.target
                .queue
                .send(Job::Path(tmp.path().join(name)))
                .unwrap();
        }
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert!(d.handle(event(renamed, &[&moved])));
        assert!(d.flush(Instant::now()));
        let first: Vec<PathBuf> = (0..2)
            .map(|_| match rx.recv().unwrap() {
                Job::Path(p) => p,
                _ => panic!("paths only"),
            })
            .collect();
        assert_eq!(first, [tmp.path().join("w1"), tmp.path().join("w2")]);
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "the moved tree waits while the queue is busy"
        );
        // The pool takes them: the queue is empty, and the moved tree's file follows.
        d.target.counters.sub(Counter::ScanQueue, 2);
        match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
            Job::Path(p) => assert_eq!(p, moved.join("one")),
            _ => panic!("paths only"),
        }
    }

    #[test]
    fn an_overflow_rescans_every_root_through_the_walk_rules() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("x/cache")).unwrap();
        std::fs::write(tmp.path().join("x/one"), b"1").unwrap();
        std::fs::write(tmp.path().join("x/cache/two"), b"2").unwrap();
        let excl = format!("{}/x/cache", tmp.path().display());
        let (mut d, rx) = debouncer(&[tmp.path().to_owned()], &[excl]);
        let overflow = Event::new(EventKind::Other).set_flag(Flag::Rescan);
        assert!(d.handle(Ok(overflow)));
        let queued = paths(&rx);
        assert_eq!(queued, vec![tmp.path().join("x/one")]);
        assert_eq!(d.target.counters.get(Counter::WatchOverflows), 1);
        drop(rx);
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(d.handle(event(closed, &[&tmp.path().join("x/one")])));
        assert!(
            !d.flush(Instant::now()),
            "a closed queue ends the debouncer"
        );
    }
}
