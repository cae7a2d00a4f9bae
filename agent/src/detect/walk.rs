//! The one way Vedette walks a tree: full scans, the `scan` command, the watcher's rescans after
//! an overflow and directories moved into a watched tree all go through here, so they all skip
//! the same things.
//!
//! Rules: symlinks are never followed; each root's file system is not left unless asked;
//! `/proc`, `/sys`, `/dev` and `/run` and every `exclude` glob are skipped below the roots (a
//! root itself is always walked); FIFOs, sockets and devices are counted, never opened.

use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};
use ignore::{DirEntry, WalkBuilder, WalkState};
use tokio_util::sync::CancellationToken;

use crate::detect::cache::Stamp;
use crate::telemetry::{Counter, Counters};

/// Paths never walked unless given as roots themselves.
pub const DEFAULT_EXCLUDES: [&str; 4] = ["/proc", "/sys", "/dev", "/run"];

/// A glob in `exclude` that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("exclude `{pattern}`: {source}")]
pub struct BadExclude {
    pattern: String,
    source: globset::Error,
}

/// Builds the exclusion set; a bad glob is an error naming it.
pub fn exclusions(patterns: &[String]) -> Result<GlobSet, BadExclude> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(Glob::new(p).map_err(|source| BadExclude {
            pattern: p.clone(),
            source,
        })?);
    }
    b.build().map_err(|source| BadExclude {
        pattern: patterns.join(", "),
        source,
    })
}

/// What a walk skips.
#[derive(Debug, Clone, Default)]
pub struct WalkRules {
    /// Stay on each root's file system.
    pub one_file_system: bool,
    pub excludes: GlobSet,
}

impl WalkRules {
    /// Whether `path`, met below a root, is walked.
    pub fn admits(&self, path: &Path) -> bool {
        !DEFAULT_EXCLUDES.iter().any(|x| path == Path::new(x)) && !self.excludes.is_match(path)
    }
}

/// A regular file found by a walk; `stamp` is None when its metadata could not be read.
pub struct Found {
    pub path: PathBuf,
    pub stamp: Option<Stamp>,
}

fn builder(roots: &[PathBuf], rules: &WalkRules) -> Option<WalkBuilder> {
    let (first, rest) = roots.split_first()?;
    let mut builder = WalkBuilder::new(first);
    for r in rest {
        builder.add(r);
    }
    let (roots, rules) = (roots.to_vec(), rules.clone());
    builder
        .standard_filters(false)
        .hidden(false)
        .follow_links(false)
        .same_file_system(rules.one_file_system)
        .filter_entry(move |entry| {
            let p = entry.path();
            roots.iter().any(|r| r == p) || rules.admits(p)
        });
    Some(builder)
}

/// The regular file an entry is, if it is one; errors and special files are counted.
fn regular(entry: Result<DirEntry, ignore::Error>, counters: &Counters) -> Option<Found> {
    let entry = match entry {
        Ok(e) => e,
        Err(e) => {
            let looped = e.io_error().is_some_and(|io| {
                rustix::io::Errno::from_io_error(io) == Some(rustix::io::Errno::LOOP)
            });
            counters.inc(if looped {
                Counter::WalkSymlinkLoops
            } else {
                Counter::WalkErrors
            });
            return None;
        }
    };
    let ft = entry.file_type()?;
    if !ft.is_file() {
        if !ft.is_dir() && !ft.is_symlink() {
            // FIFOs, sockets, devices: never opened.
            counters.inc(Counter::SkippedNotRegular);
        }
        return None;
    }
    let stamp = entry.metadata().ok().map(|m| Stamp::of(&m));
    Some(Found {
        path: entry.into_path(),
        stamp,
    })
}

/// Calls `visit` for every regular file below `roots`, on this thread, until it returns false
/// or `stop` fires. Returns false when it was stopped early.
pub fn each_file(
    roots: &[PathBuf],
    rules: &WalkRules,
    counters: &Counters,
    stop: &CancellationToken,
    mut visit: impl FnMut(Found) -> bool,
) -> bool {
    let Some(builder) = builder(roots, rules) else {
        return true;
    };
    for entry in builder.build() {
        if stop.is_cancelled() {
            return false;
        }
        if let Some(found) = regular(entry, counters)
            && !visit(found)
        {
            return false;
        }
    }
    true
}

/// Like [`each_file`], with `threads` walker threads calling `visit` concurrently.
pub fn each_file_parallel(
    roots: &[PathBuf],
    rules: &WalkRules,
    threads: usize,
    counters: &Counters,
    stop: &CancellationToken,
    visit: &(dyn Fn(Found) -> bool + Sync),
) {
    let Some(mut builder) = builder(roots, rules) else {
        return;
    };
    builder.threads(threads.max(1)).build_parallel().run(|| {
        Box::new(move |entry| {
            if stop.is_cancelled() {
                return WalkState::Quit;
            }
            match regular(entry, counters).map(visit) {
                Some(false) => WalkState::Quit,
                _ => WalkState::Continue,
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_apply_below_the_roots_and_special_files_are_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        std::fs::create_dir_all(root.join("keep/skip")).unwrap();
        std::fs::write(root.join("keep/a"), b"a").unwrap();
        std::fs::write(root.join("keep/skip/b"), b"b").unwrap();
        std::os::unix::fs::symlink(root.join("keep/a"), root.join("link")).unwrap();
        let fifo = root.join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let rules = WalkRules {
            one_file_system: true,
            excludes: exclusions(&[format!("{}/keep/skip", root.display())]).unwrap(),
        };
        let counters = Counters::default();
        let mut seen = Vec::new();
        let done = each_file(
            std::slice::from_ref(&root),
            &rules,
            &counters,
            &CancellationToken::new(),
            |f| {
                seen.push(f.path);
                true
            },
        );
        assert!(done);
        assert_eq!(seen, vec![root.join("keep/a")]);
        assert_eq!(counters.get(Counter::SkippedNotRegular), 1);
        assert!(exclusions(&["a[".to_string()]).is_err());
    }
}
