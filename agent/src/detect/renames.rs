//! Files and directories moved into the watched trees, beside fanotify: fanotify reports every
//! file closed after writing, not a file written elsewhere and renamed in.
//!
//! inotify watches each directory of the trees for two events only: something moved in, and a
//! directory created (to watch it too). A file written in a watched tree costs one event (its
//! creation), where a watcher of every change gets its open, each write and its close. What it
//! sees goes to the [`watch`](crate::detect::watch) debouncer as `notify` events (a rename in,
//! or a rescan after the kernel's queue overflowed), so both event sources share one path to
//! the scan queue.
//!
//! A directory created in a tree is watched once its creation is read; anything already in it
//! by then is reported as moved in (it may have been: fanotify has seen what was written there,
//! and the scan cache answers for it).
//!
//! A watched directory that moves is told too: moved within the trees, its new place was
//! watched again when the move in was read (the kernel queues that first, and the watch keeps
//! its descriptor), so its watches follow it; moved out, it and the directories below it are
//! no longer watched, and nothing moved into them later is reported under their old paths.

use std::ffi::OsStr;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::thread::JoinHandle;

use notify::event::{Flag, ModifyKind, RenameMode};
use notify::{Event, EventKind};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::io::Errno;
use tracing::{error, warn};

use crate::detect::walk::WalkRules;
use crate::detect::watch::WatchError;
use crate::telemetry::{Counter, Counters};

/// What each directory is watched for.
const MASK: WatchFlags = WatchFlags::MOVED_TO
    .union(WatchFlags::CREATE)
    .union(WatchFlags::MOVE_SELF)
    .union(WatchFlags::ONLYDIR)
    .union(WatchFlags::DONT_FOLLOW)
    .union(WatchFlags::EXCL_UNLINK);

/// How often the reading thread looks whether it must stop, in nanoseconds (under a second).
const STOP_POLL_NS: i64 = 200_000_000;

/// The running watch; dropping it stops the thread, which closes the event channel.
pub(crate) struct RenameWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for RenameWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The inotify descriptor and what each watch descriptor names.
struct Watches {
    fd: OwnedFd,
    dirs: std::collections::HashMap<i32, Watched>,
    rules: WalkRules,
    counters: Arc<Counters>,
    /// The roots' devices, when a walk stays on each root's file system.
    devices: Vec<u64>,
    /// Whether the watch limit was already reported.
    limit_reported: bool,
}

/// A watched directory: its path, and its inode, to tell whether that path is still it.
struct Watched {
    path: PathBuf,
    ino: u64,
}

impl RenameWatch {
    /// Watches every directory under `roots` (an error for a root that cannot be watched) and
    /// sends what moves in to `tx`.
    pub(crate) fn start(
        roots: &[PathBuf],
        rules: WalkRules,
        counters: Arc<Counters>,
        tx: SyncSender<notify::Result<Event>>,
    ) -> Result<RenameWatch, WatchError> {
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)
            .map_err(|e| WatchError::Start(notify::Error::io(e.into())))?;
        let devices = roots
            .iter()
            .filter(|_| rules.one_file_system)
            .filter_map(|r| std::fs::metadata(r).ok().map(|m| m.dev()))
            .collect();
        let mut w = Watches {
            fd,
            dirs: Default::default(),
            rules,
            counters,
            devices,
            limit_reported: false,
        };
        for root in roots {
            w.add(root, true).map_err(|e| WatchError::Root {
                path: root.clone(),
                source: notify::Error::io(e),
            })?;
            w.add_tree(root, &mut |_| {});
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let roots = roots.to_vec();
        let thread = std::thread::Builder::new()
            .name("watch-renames".into())
            .spawn(move || w.run(&roots, &tx, &flag))
            .map_err(WatchError::Thread)?;
        Ok(RenameWatch {
            stop,
            thread: Some(thread),
        })
    }
}

impl Watches {
    /// Watches one directory. A root's failure is the caller's, but for the watch limit,
    /// logged once and counted like any directory's.
    fn add(&mut self, dir: &Path, root: bool) -> std::io::Result<()> {
        match inotify::add_watch(&self.fd, dir, MASK) {
            Ok(wd) => {
                let ino = std::fs::symlink_metadata(dir).map_or(0, |m| m.ino());
                let path = dir.to_owned();
                self.dirs.insert(wd, Watched { path, ino });
                Ok(())
            }
            // A root that is a file: nothing moves into it.
            Err(Errno::NOTDIR) if root => Ok(()),
            Err(e) if root && e != Errno::NOSPC => Err(e.into()),
            Err(Errno::NOSPC) => {
                self.counters.inc(Counter::WatchLimitReached);
                if !std::mem::replace(&mut self.limit_reported, true) {
                    error!(
                        path = %dir.display(),
                        "inotify watch limit reached: raise fs.inotify.max_user_watches \
                         (sysctl -w fs.inotify.max_user_watches=524288); files moved into \
                         directories past it are not seen"
                    );
                }
                Ok(())
            }
            // Gone or not a directory by now: nothing to watch.
            Err(_) => Ok(()),
        }
    }

    /// Watches every directory below `dir` (not `dir` itself), giving `found` each other entry.
    fn add_tree(&mut self, dir: &Path, found: &mut dyn FnMut(PathBuf)) {
        let mut pending = vec![dir.to_owned()];
        while let Some(d) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(ft) = entry.file_type() else {
                    continue;
                };
                if !ft.is_dir() {
                    found(path);
                    continue;
                }
                if !self.rules.admits(&path) || !self.on_root_device(&path) {
                    continue;
                }
                if self.add(&path, false).is_ok() {
                    pending.push(path);
                }
            }
        }
    }

    fn on_root_device(&self, dir: &Path) -> bool {
        self.devices.is_empty()
            || std::fs::symlink_metadata(dir).is_ok_and(|m| self.devices.contains(&m.dev()))
    }

    /// Reads events until told to stop or the debouncer is gone.
    fn run(
        &mut self,
        roots: &[PathBuf],
        tx: &SyncSender<notify::Result<Event>>,
        stop: &AtomicBool,
    ) {
        let mut buf = vec![MaybeUninit::<u8>::uninit(); 64 << 10];
        let wait = Timespec {
            tv_sec: 0,
            tv_nsec: STOP_POLL_NS,
        };
        while !stop.load(Ordering::Relaxed) {
            let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
            match poll(&mut fds, Some(&wait)) {
                Ok(0) | Err(Errno::INTR) => continue,
                Ok(_) => {}
                Err(e) => {
                    error!(error = %e, "cannot wait for inotify events; files moved in are no longer seen");
                    return;
                }
            }
            // One read's worth at a time (the buffer bounds it), handled before the next read:
            // a writer that never stops cannot grow this list.
            let mut events = Vec::new();
            let mut reader = inotify::Reader::new(&self.fd, &mut buf);
            loop {
                match reader.next() {
                    Ok(ev) => {
                        events.push((
                            ev.wd(),
                            ev.events(),
                            ev.file_name()
                                .map(|n| PathBuf::from(OsStr::from_bytes(n.to_bytes()))),
                        ));
                        if reader.is_buffer_empty() {
                            break;
                        }
                    }
                    Err(Errno::AGAIN) => break,
                    Err(Errno::INTR) => continue,
                    Err(e) => {
                        warn!(error = %e, "reading inotify events");
                        self.counters.inc(Counter::WatchErrors);
                        break;
                    }
                }
            }
            for (wd, flags, name) in events {
                for event in self.event(roots, wd, flags, name) {
                    if tx.send(Ok(event)).is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// What one inotify event means for the debouncer.
    fn event(
        &mut self,
        roots: &[PathBuf],
        wd: i32,
        flags: ReadFlags,
        name: Option<PathBuf>,
    ) -> Vec<Event> {
        if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
            // Directories created meanwhile may be unwatched: watch the trees again (a
            // directory already watched keeps its descriptor) and rescan them.
            for root in roots {
                self.add_tree(root, &mut |_| {});
            }
            return vec![Event::new(EventKind::Other).set_flag(Flag::Rescan)];
        }
        if flags.contains(ReadFlags::IGNORED) {
            self.dirs.remove(&wd);
            return Vec::new();
        }
        if flags.contains(ReadFlags::MOVE_SELF) {
            self.moved(roots, wd);
            return Vec::new();
        }
        let (Some(dir), Some(name)) = (self.dirs.get(&wd), name) else {
            return Vec::new();
        };
        let path = dir.path.join(name);
        let moved_in = |p: PathBuf| {
            Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::To))).add_path(p)
        };
        let is_dir = flags.contains(ReadFlags::ISDIR);
        if is_dir && (!self.rules.admits(&path) || !self.on_root_device(&path)) {
            return Vec::new();
        }
        if flags.contains(ReadFlags::MOVED_TO) {
            if is_dir && self.add(&path, false).is_ok() {
                // Its files are walked by the debouncer; its directories are watched here.
                self.add_tree(&path, &mut |_| {});
            }
            return vec![moved_in(path)];
        }
        if flags.contains(ReadFlags::CREATE) && is_dir && self.add(&path, false).is_ok() {
            let mut found = Vec::new();
            self.add_tree(&path, &mut |p| found.push(moved_in(p)));
            return found;
        }
        Vec::new()
    }

    /// A watched directory moved. Unless its path is still it (it moved within the trees, and
    /// its new place was watched again before this event), it left them: it and the directories
    /// below it are no longer watched. A root keeps its watch wherever it went.
    fn moved(&mut self, roots: &[PathBuf], wd: i32) {
        let Some(dir) = self.dirs.get(&wd) else {
            return;
        };
        let still_there =
            std::fs::symlink_metadata(&dir.path).is_ok_and(|m| m.is_dir() && m.ino() == dir.ino);
        if still_there || roots.contains(&dir.path) {
            return;
        }
        let gone = dir.path.clone();
        let below: Vec<i32> = (self.dirs.iter())
            .filter(|(_, d)| d.path.starts_with(&gone))
            .map(|(wd, _)| *wd)
            .collect();
        for wd in below {
            // The kernel's IN_IGNORED for it finds nothing left to remove.
            let _ = inotify::remove_watch(&self.fd, wd);
            self.dirs.remove(&wd);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{Receiver, sync_channel};
    use std::time::{Duration, Instant};

    use super::*;

    fn rules() -> WalkRules {
        WalkRules {
            one_file_system: true,
            excludes: globset::GlobSetBuilder::new().build().unwrap(),
        }
    }

    /// The paths reported moved in, until `want` is among them.
    fn until(rx: &Receiver<notify::Result<Event>>, want: &Path) -> Vec<PathBuf> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while !seen.iter().any(|p| p == want) {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("{} not reported; saw {seen:?}", want.display()))
                .unwrap();
            assert!(
                matches!(ev.kind, EventKind::Modify(ModifyKind::Name(RenameMode::To))),
                "{ev:?}"
            );
            seen.extend(ev.paths);
        }
        seen
    }

    /// A watched root and a directory beside it, each holding the directories named.
    struct Trees {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        rx: Receiver<notify::Result<Event>>,
        watch: RenameWatch,
    }

    impl Trees {
        fn new(in_root: &[&str], beside: &[&str]) -> Trees {
            let tmp = tempfile::tempdir().unwrap();
            let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
            for (base, dirs) in [(&root, in_root), (&outside, beside)] {
                std::fs::create_dir(base).unwrap();
                for d in dirs {
                    std::fs::create_dir_all(base.join(d)).unwrap();
                }
            }
            let (tx, rx) = sync_channel(64);
            let counters = Arc::new(Counters::default());
            let watch =
                RenameWatch::start(std::slice::from_ref(&root), rules(), counters, tx).unwrap();
            Trees {
                _tmp: tmp,
                root,
                outside,
                rx,
                watch,
            }
        }

        /// Writes `name` beside the root and moves it to `to`.
        fn move_in(&self, name: &str, to: &Path) {
            std::fs::write(self.outside.join(name), name).unwrap();
            std::fs::rename(self.outside.join(name), to).unwrap();
        }
    }

    #[test]
    fn renames_into_any_directory_of_the_tree_are_reported_and_writes_are_not() {
        let t = Trees::new(&["old/deep"], &["tree/sub"]);
        let (root, rx) = (&t.root, &t.rx);

        // Written in place: fanotify's, not reported here.
        std::fs::write(root.join("written"), "x").unwrap();
        std::fs::write(root.join("old/deep/written"), "x").unwrap();
        // Moved into the root, into a directory there from the start, into a new one.
        for (name, to) in [("a", root.join("a")), ("b", root.join("old/deep/b"))] {
            t.move_in(name, &to);
            let seen = until(rx, &to);
            assert!(!seen.iter().any(|p| p.ends_with("written")), "{seen:?}");
        }
        std::fs::create_dir(root.join("new")).unwrap();
        // The new directory is watched once its creation is read; a file moved in before is
        // reported as found in it.
        t.move_in("c", &root.join("new/c"));
        until(rx, &root.join("new/c"));

        // A tree moved in: reported itself, and a file moved later into its subdirectory.
        std::fs::rename(t.outside.join("tree"), root.join("tree")).unwrap();
        until(rx, &root.join("tree"));
        t.move_in("d", &root.join("tree/sub/d"));
        until(rx, &root.join("tree/sub/d"));

        // Stopping closes the channel.
        drop(t.watch);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match t
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(_) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(e) => panic!("the channel stayed open: {e}"),
            }
        }
    }

    #[test]
    fn a_directory_moved_within_is_watched_where_it_went_and_one_moved_out_is_not_watched() {
        let t = Trees::new(&["stays/sub", "leaves/sub"], &[]);
        let (root, outside, rx) = (&t.root, &t.outside, &t.rx);

        // Renamed within the root: a file moved later into its subdirectory has the new path.
        std::fs::rename(root.join("stays"), root.join("moved")).unwrap();
        until(rx, &root.join("moved"));
        t.move_in("a", &root.join("moved/sub/a"));
        until(rx, &root.join("moved/sub/a"));

        // Moved out: a file moved into it afterwards is not reported, under either path. A new
        // directory made at its old path is watched as any new one.
        std::fs::rename(root.join("leaves"), outside.join("left")).unwrap();
        t.move_in("b", &outside.join("left/sub/b"));
        t.move_in("c", &outside.join("left/c"));
        std::fs::create_dir_all(root.join("leaves/sub")).unwrap();
        t.move_in("d", &root.join("leaves/sub/d"));
        let seen = until(rx, &root.join("leaves/sub/d"));
        assert!(
            !seen.iter().any(|p| p.ends_with("b") || p.ends_with("c")),
            "reported from a directory moved out: {seen:?}"
        );
    }

    #[test]
    fn a_root_that_cannot_be_watched_is_an_error_naming_it_and_a_file_root_is_none() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("missing");
        let (tx, _rx) = sync_channel(1);
        let Err(e) = RenameWatch::start(
            std::slice::from_ref(&missing),
            rules(),
            Arc::new(Counters::default()),
            tx,
        ) else {
            panic!("a missing root was watched");
        };
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
        // A root that is a file is no error: nothing can move into it.
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let (tx, _rx) = sync_channel(1);
        let counters = Arc::new(Counters::default());
        assert!(RenameWatch::start(std::slice::from_ref(&file), rules(), counters, tx).is_ok());
    }
}
