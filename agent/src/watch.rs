//! Realtime file watching: inotify (through `notify`) on each configured root, recursively.
//!
//! A file is queued for scanning when it is closed after writing, created, or renamed into a
//! watched tree; other modifications are debounced per path (the scan happens once the file has
//! been quiet for [`DEBOUNCE`]). When the kernel's event queue overflows, the affected root is
//! walked again so that nothing written meanwhile goes unscanned.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{RecvTimeoutError, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tracing::{error, info, warn};

use crate::counters::Counters;

/// File-system events buffered between the notify thread and the debouncer.
const EVENT_QUEUE: usize = 4096;

/// Quiet time after a modification before the file is scanned.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// A running watcher; dropping it stops watching.
pub struct FileWatch {
    watcher: Option<RecommendedWatcher>,
    thread: Option<JoinHandle<()>>,
}

impl FileWatch {
    /// Watches `roots` and sends paths to scan into `queue`.
    pub fn start(
        roots: &[PathBuf],
        excludes: globset::GlobSet,
        queue: SyncSender<PathBuf>,
        counters: Arc<Counters>,
    ) -> anyhow::Result<FileWatch> {
        // Bounded: when scanning falls behind, the notify thread waits, the kernel queue fills
        // and overflows, and the overflow triggers a rescan. Memory never grows with the burst.
        let (tx, rx) = sync_channel::<notify::Result<Event>>(EVENT_QUEUE);
        let mut watcher = notify::recommended_watcher(move |ev| {
            let _ = tx.send(ev);
        })?;
        for root in roots {
            match watcher.watch(root, RecursiveMode::Recursive) {
                Ok(()) => info!(path = %root.display(), "watching"),
                Err(e) if is_watch_limit(&e) => {
                    error!(
                        path = %root.display(),
                        error = %e,
                        "inotify watch limit reached: raise fs.inotify.max_user_watches \
                         (sysctl -w fs.inotify.max_user_watches=524288); part of this tree is not watched"
                    );
                    counters.inc("watch_limit_reached");
                }
                Err(e) => anyhow::bail!("cannot watch `{}`: {e}", root.display()),
            }
        }
        let roots = roots.to_vec();
        let thread = std::thread::Builder::new()
            .name("watch-debounce".into())
            .spawn(move || debounce(rx, &roots, &excludes, &queue, &counters))?;
        Ok(FileWatch {
            watcher: Some(watcher),
            thread: Some(thread),
        })
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
        || matches!(&e.kind, notify::ErrorKind::Io(io) if io.raw_os_error() == Some(libc::ENOSPC))
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

fn debounce(
    rx: std::sync::mpsc::Receiver<notify::Result<Event>>,
    roots: &[PathBuf],
    excludes: &globset::GlobSet,
    queue: &SyncSender<PathBuf>,
    counters: &Counters,
) {
    let mut pending: HashMap<PathBuf, Instant> = HashMap::new();
    loop {
        let wait = pending
            .values()
            .min()
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        match rx.recv_timeout(wait) {
            Ok(Ok(event)) => {
                counters.inc("fs_events");
                if event.need_rescan() {
                    warn!("inotify queue overflowed: rescanning watched trees");
                    counters.inc("watch_overflows");
                    for root in roots {
                        if !walk_into(root, queue) {
                            return;
                        }
                    }
                    continue;
                }
                let (now, later) = match action(&event.kind) {
                    Action::Now => (true, false),
                    Action::Later => (false, true),
                    Action::Ignore => (false, false),
                };
                // A rename reports [from, to]; the last path is where the file is now.
                let paths: &[PathBuf] = match event.kind {
                    EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                        event.paths.last().map(std::slice::from_ref).unwrap_or(&[])
                    }
                    _ => &event.paths,
                };
                for p in paths.iter().filter(|p| !excludes.is_match(p)) {
                    if now {
                        pending.insert(p.clone(), Instant::now());
                    } else if later {
                        pending.insert(p.clone(), Instant::now() + DEBOUNCE);
                    }
                }
            }
            Ok(Err(e)) => {
                warn!(error = %e, "watch error");
                counters.inc("watch_errors");
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        let due: Vec<PathBuf> = pending
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(p, _)| p.clone())
            .collect();
        for p in due {
            pending.remove(&p);
            if p.is_dir() {
                // A directory moved into a watched tree: its files are new to us.
                if !walk_into(&p, queue) {
                    return;
                }
            } else if queue.send(p).is_err() {
                return;
            }
        }
    }
}

/// Queues every regular file under `root` (not following symlinks). False when the queue closed.
pub fn walk_into(root: &Path, queue: &SyncSender<PathBuf>) -> bool {
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() && queue.send(entry.path()).is_err() {
                return false;
            }
        }
    }
    true
}
