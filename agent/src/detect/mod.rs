//! Finding things: every source of work (the watcher, full scans, the process monitor), the
//! scanning they share, and the detections they make.
//!
//! ```text
//! sources: fanotify | watch (inotify) ──files, execs──► pool (scanner threads) ──┐
//! prevent (fanotify, held execs) ──► verdict threads ────────────────────────────┤
//! full_scan (walk + scanner threads, cache) ─────────────────────────────────────┼──► Detection ──► deliver
//! processes + procmon (exec events, /proc, connections) ─────────────────────────┘
//! ```
//! Every file the watcher or a full scan finds is judged by [`examine::examine_file`] (the process
//! monitor scans executables itself, through its own cache); every tree, whoever walks it, is
//! walked by [`walk`] with the same rules (excludes, one file system, no symlinks).

pub mod cache;
pub(crate) mod dns;
pub(crate) mod dnscap;
pub(crate) mod examine;
pub(crate) mod execmon;
pub(crate) mod exeread;
pub(crate) mod fanotify;
pub(crate) mod fileless;
pub(crate) mod full_scan;
pub(crate) mod memscan;
pub(crate) mod mounts;
pub(crate) mod pool;
pub(crate) mod prevent;
pub(crate) mod processes;
pub(crate) mod procmon;
pub(crate) mod renames;
pub(crate) mod sockdiag;
pub(crate) mod sources;
pub(crate) mod verdicts;
pub(crate) mod walk;
pub(crate) mod watch;

use std::net::IpAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use vedette_engine::{FileReport, MatchKind, RuleMatch, RuleSet};
use vedette_proto::v1::{
    Detection, DetectionAction, DetectionKind, FileTarget, IndicatorRef, detection,
};

use crate::detect::cache::{ScanCache, Stamp, rules_tag};

/// What a match was found in: with the agent and the rule, it makes a detection's id.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Subject<'a> {
    /// One state of a file.
    File(Stamp),
    /// One process: its pid and start time (clock ticks after boot).
    Process { pid: u32, start_ticks: u64 },
    /// One connection of one process to a remote address.
    Connection {
        pid: u32,
        start_ticks: u64,
        remote: IpAddr,
        port: u16,
    },
    /// The DNS queries of one process (pid 0: none found) for one name, in one reporting
    /// window (begun at `window_ms`, ms since the epoch): reported at its first query, and
    /// again under the same id with their count when the window ends.
    Dns {
        pid: u32,
        start_ticks: u64,
        name: &'a str,
        window_ms: i64,
    },
    /// An executable (SHA-256 in hex) that ran from `path` as `uid`, found in the history.
    Executable {
        sha256: &'a str,
        path: &'a Path,
        uid: u32,
    },
}

/// Derives detection ids: the same match on the same subject by the same agent always gets the
/// same id, so whatever reports it again (a restart, a lost cache, a rescan) is stored once.
#[derive(Debug, Clone)]
pub(crate) struct Ids {
    agent: Arc<str>,
}

impl Ids {
    pub(crate) fn for_agent(agent_id: &str) -> Ids {
        Ids {
            agent: agent_id.into(),
        }
    }

    /// For detections that leave no host (the `scan` command).
    pub(crate) fn local() -> Ids {
        Ids::for_agent("")
    }

    /// A UUID (version 8: custom) made of the first 128 bits of a SHA-256 over the agent, the
    /// subject and the rule.
    pub(crate) fn id(&self, subject: &Subject, m: &RuleMatch) -> String {
        let mut h = Sha256::new();
        let mut field = |b: &[u8]| {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        };
        field(b"vedette.detection.v1");
        field(self.agent.as_bytes());
        match *subject {
            Subject::File(s) => {
                field(b"file");
                for v in [s.dev, s.ino, s.size, s.mtime_ns as u64, s.ctime_ns as u64] {
                    field(&v.to_le_bytes());
                }
            }
            Subject::Process { pid, start_ticks } => {
                field(b"process");
                field(&pid.to_le_bytes());
                field(&start_ticks.to_le_bytes());
            }
            Subject::Connection {
                pid,
                start_ticks,
                remote,
                port,
            } => {
                field(b"connection");
                field(&pid.to_le_bytes());
                field(&start_ticks.to_le_bytes());
                field(remote.to_string().as_bytes());
                field(&port.to_le_bytes());
            }
            Subject::Dns {
                pid,
                start_ticks,
                name,
                window_ms,
            } => {
                field(b"dns");
                field(&pid.to_le_bytes());
                field(&start_ticks.to_le_bytes());
                field(name.as_bytes());
                field(&window_ms.to_le_bytes());
            }
            Subject::Executable { sha256, path, uid } => {
                field(b"executable");
                field(sha256.as_bytes());
                field(path.as_os_str().as_bytes());
                field(&uid.to_le_bytes());
            }
        }
        field(&[kind_of(m.kind) as u8]);
        field(m.source.as_bytes());
        field(m.rule.as_bytes());
        let digest = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&digest[..16]);
        uuid::Builder::from_custom_bytes(b).into_uuid().to_string()
    }
}

/// Turns file scan results into detections, once per incident: the result cache says which
/// matches were not reported before for this state of the file, and [`Ids`] names them.
#[derive(Clone)]
pub(crate) struct ReportFilter {
    pub ids: Ids,
    pub cache: Arc<ScanCache>,
    /// Results for executables, by their stamp: an exec is reported on its process, so these
    /// are kept apart from the files' own results (which they must not hide). Shared by every
    /// judge of executions (the scan pool and prevention's verdicts).
    pub execs: Arc<ScanCache>,
    /// Execs that prevention let through without a verdict and reports itself.
    pub unjudged: Arc<verdicts::Unjudged>,
    /// Where every file read and every executable run is kept (when `history_max_bytes` is
    /// not `off`).
    pub history: Option<Arc<crate::history::History>>,
}

impl ReportFilter {
    /// Keeps a run of the executable open in `file` (run as `path` by process `pid`) in the
    /// history, with its SHA-256 (hex) when known.
    pub(crate) fn ran(&self, pid: u32, path: &Path, file: Option<&std::fs::File>, sha256: &str) {
        let Some(h) = &self.history else { return };
        if sha256.is_empty() {
            return;
        }
        let stamp = file
            .and_then(|f| f.metadata().ok())
            .or_else(|| std::fs::metadata(path).ok())
            .map(|m| Stamp::of(&m));
        let uid = crate::detect::procmon::read(pid).map_or(u32::MAX, |p| p.uid);
        if let Some(stamp) = stamp {
            h.exec(path, sha256, stamp, uid);
        }
    }

    /// True when the file at `path` was scanned with `rules` and has not changed since.
    pub(crate) fn unchanged(&self, path: &Path, rules: &RuleSet) -> bool {
        std::fs::symlink_metadata(path)
            .is_ok_and(|m| self.cache.get(&Stamp::of(&m), rules_tag(rules)).is_some())
    }

    /// Records the report in the cache; detections for the matches that are new.
    pub(crate) fn file(&self, path: &Path, report: &FileReport, rules: &RuleSet) -> Vec<Detection> {
        if let Some(h) = &self.history {
            h.file(path, report);
        }
        let new = self.cache.record(
            Stamp::of_report(report),
            rules_tag(rules),
            &report.matches,
            report.sha256.as_deref(),
        );
        file_detections(&self.ids, path, report, &new, rules.bundle_version)
    }
}

/// A detection of one match on one target; `id` from [`Ids::id`].
pub(crate) fn detection(
    id: String,
    m: RuleMatch,
    bundle_version: u64,
    target: detection::Target,
) -> Detection {
    let techniques = m.indicator.techniques.clone();
    let indicator = IndicatorRef {
        source: m.indicator.source.clone(),
        id: m.indicator.id.clone(),
        event: m.indicator.event.clone(),
        origin: m.indicator.origin.clone(),
    };
    Detection {
        id,
        kind: kind_of(m.kind) as i32,
        rule: m.rule,
        source: m.source,
        indicator: (!indicator.source.is_empty()).then_some(indicator),
        techniques,
        observed_at_ms: vedette_proto::now_ms(),
        score: m.score,
        description: m.description,
        bundle_version,
        action: DetectionAction::Alert as i32,
        target: Some(target),
        retro: None,
    }
}

/// One detection per match in `matches` (all from `report` of the file at `path`).
pub(crate) fn file_detections(
    ids: &Ids,
    path: &Path,
    report: &FileReport,
    matches: &[RuleMatch],
    bundle_version: u64,
) -> Vec<Detection> {
    let raw = path.as_os_str().as_bytes();
    let raw_path = if std::str::from_utf8(raw).is_ok() {
        Vec::new()
    } else {
        raw.to_vec()
    };
    let target = FileTarget {
        path: path.to_string_lossy().into_owned(),
        raw_path,
        size: report.size,
        sha256: report.sha256.clone().unwrap_or_default(),
        md5: report.md5.clone().unwrap_or_default(),
        sha1: report.sha1.clone().unwrap_or_default(),
    };
    let subject = Subject::File(Stamp::of_report(report));
    matches
        .iter()
        .map(|m| {
            detection(
                ids.id(&subject, m),
                m.clone(),
                bundle_version,
                detection::Target::File(target.clone()),
            )
        })
        .collect()
}

fn kind_of(k: MatchKind) -> DetectionKind {
    match k {
        MatchKind::Yara => DetectionKind::Yara,
        MatchKind::Hash => DetectionKind::Hash,
        MatchKind::Filename => DetectionKind::Filename,
        MatchKind::Process => DetectionKind::Process,
        MatchKind::Connection => DetectionKind::Connection,
    }
}

/// Sleeps up to `d` on a plain thread; false when `stop` came first.
pub(crate) fn pause(
    rt: &tokio::runtime::Handle,
    stop: &tokio_util::sync::CancellationToken,
    d: std::time::Duration,
) -> bool {
    rt.block_on(async {
        tokio::select! {
            () = stop.cancelled() => false,
            () = tokio::time::sleep(d) => true,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str) -> RuleMatch {
        RuleMatch {
            kind: MatchKind::Yara,
            rule: name.into(),
            source: "rules/x.yar".into(),
            score: 75,
            description: String::new(),
            author: String::new(),
            reference: String::new(),
            indicator: Default::default(),
        }
    }

    #[test]
    fn ids_are_stable_and_differ_by_agent_subject_and_rule() {
        let stamp = Stamp {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: 4,
            ctime_ns: 5,
        };
        let file = Subject::File(stamp);
        let a = Ids::for_agent("a");
        let id = a.id(&file, &rule("r"));
        assert_eq!(id, a.id(&file, &rule("r")));
        let parsed = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(parsed.get_version_num(), 8);
        let touched = Subject::File(Stamp {
            ctime_ns: 6,
            ..stamp
        });
        let process = Subject::Process {
            pid: 2,
            start_ticks: 3,
        };
        let others = [
            Ids::for_agent("b").id(&file, &rule("r")),
            a.id(&file, &rule("s")),
            a.id(&touched, &rule("r")),
            a.id(&process, &rule("r")),
        ];
        for other in others {
            assert_ne!(id, other);
        }
    }
}
