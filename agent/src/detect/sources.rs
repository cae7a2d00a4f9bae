//! Where file and exec events come from: fanotify where the agent may use it (with inotify
//! for files renamed into the trees), inotify otherwise; and prevention's own fanotify group,
//! when `prevent` is on. Each says once in the log which it is, and why.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, EventSource};
use crate::detect::fanotify::{FanTarget, FanWatch};
use crate::detect::pool::ScanPool;
use crate::detect::prevent::{ExecGate, GateTarget};
use crate::detect::walk::WalkRules;
use crate::detect::watch::{FileWatch, WatchTarget};
use crate::telemetry::Counters;

/// The source of file events. With fanotify, inotify still reports files renamed into the
/// trees (a file written outside them and moved in raises no fanotify event there).
pub(crate) enum Events {
    Fanotify(FanWatch, FileWatch),
    Inotify(FileWatch),
}

impl Events {
    /// fanotify when configured so or (`auto`) when the agent may use it; else inotify. Says
    /// once which, and why.
    pub(crate) fn start(
        settings: &Config,
        roots: &[PathBuf],
        pool: &ScanPool,
        walk: WalkRules,
        counters: &Arc<Counters>,
        stop: &CancellationToken,
    ) -> anyhow::Result<Events> {
        let wanted = settings.event_source;
        if wanted == EventSource::Inotify {
            info!("file events from inotify (event_source = \"inotify\")");
        } else if !roots.is_empty() {
            let target = FanTarget {
                queue: pool.sender(),
                rules: walk.clone(),
                counters: counters.clone(),
                stop: stop.clone(),
                execs: settings.processes,
            };
            match FanWatch::start(roots, target) {
                Ok(w) => {
                    info!(execs = settings.processes, "file events from fanotify");
                    let renames = WatchTarget {
                        queue: pool.sender(),
                        rules: walk,
                        counters: counters.clone(),
                        stop: stop.clone(),
                        renames_only: true,
                    };
                    return Ok(Events::Fanotify(w, FileWatch::start(roots, renames)?));
                }
                Err(e) if wanted == EventSource::Auto => {
                    warn!(reason = %e, "fanotify unavailable; file events from inotify");
                }
                Err(e) => anyhow::bail!("event_source = \"fanotify\": {e}"),
            }
        }
        let target = WatchTarget {
            queue: pool.sender(),
            rules: walk,
            counters: counters.clone(),
            stop: stop.clone(),
            renames_only: false,
        };
        Ok(Events::Inotify(FileWatch::start(roots, target)?))
    }

    /// The devices whose execs fanotify reports (none with inotify).
    pub(crate) fn exec_devices(&self, roots: &[PathBuf], settings: &Config) -> HashSet<u64> {
        match self {
            Events::Fanotify(..) if settings.processes => roots
                .iter()
                .filter_map(|r| std::fs::metadata(r).ok())
                .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
                .collect(),
            _ => HashSet::new(),
        }
    }

    pub(crate) fn stop(self) {
        match self {
            Events::Fanotify(w, renames) => {
                w.stop();
                renames.stop();
            }
            Events::Inotify(w) => w.stop(),
        }
    }
}

/// Prevention mode on the file systems of the watched paths; when it cannot start, the log
/// says loudly that nothing is blocked (detection goes on).
pub(crate) fn start_prevention(roots: &[PathBuf], target: GateTarget) -> Option<ExecGate> {
    let policy = target.policy;
    if roots.is_empty() {
        error!("prevent = true, but no path is watched: no execution is held, nothing is blocked");
        return None;
    }
    match ExecGate::start(roots, target) {
        Ok(g) => {
            info!(
                min_score = policy.min_score,
                timeout_ms = policy.timeout.as_millis() as u64,
                "prevention on: executions on the watched file systems wait for a verdict"
            );
            Some(g)
        }
        Err(e) => {
            error!(reason = %e, "prevent = true, but executions cannot be held: nothing is blocked");
            None
        }
    }
}
