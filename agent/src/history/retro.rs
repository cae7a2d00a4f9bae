//! New indicators against the past: when the rules change, the history is read once and every
//! file and executable it kept is matched by its digests and path against what the new rules
//! find and the old ones did not. Each hit becomes a detection marked `retro`, with when it was
//! first and last seen and whether it is still there; no file is read for it.
//!
//! When the change is only of hash indicators ([`RuleSet::beyond_hashes`] unchanged), the
//! result cache's entries whose very state the history holds are answered by this pass, and
//! keep their hit under the new rules: no file is read again. A rescan is still due when some
//! cached file is not in the history (seen before it was kept, or dropped from it); it then
//! reads only those. Any other change rescans as before, once the history has answered.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{info, warn};
use vedette_engine::{RuleMatch, RuleSet};
use vedette_proto::v1::detection::Target;
use vedette_proto::v1::{Detection, FileTarget, Presence, ProcessTarget};

use super::{History, Kind, Record};
use crate::detect::cache::{Stamp, rules_tag, same_finding};
use crate::detect::procmon::Users;
use crate::detect::{ReportFilter, Subject, detection};
use crate::telemetry::{Counter, Counters};

/// Most files and executables one change reports; past it, the rest are counted and logged.
const MAX_HITS: usize = 20_000;

/// What answers rule changes from the history.
pub(crate) struct Retro {
    pub history: Arc<History>,
    pub reports: ReportFilter,
    /// Weak: the rules keep this hook for ever, and the spool writer ends when the last
    /// detecting stage is gone.
    pub det: mpsc::WeakSender<Detection>,
    pub counters: Arc<Counters>,
}

/// One file (or executable) found in the history: its records merged.
pub(crate) struct Hit {
    pub kind: Kind,
    pub path: PathBuf,
    pub first_ms: i64,
    pub last_ms: i64,
    pub runs: u64,
    /// The latest state it was seen in.
    pub stamp: Stamp,
    pub digests: (Option<String>, Option<String>, Option<String>),
    pub uid: u32,
    pub matches: Vec<RuleMatch>,
}

impl Hit {
    pub(crate) fn of(r: &Record, matches: Vec<RuleMatch>) -> Hit {
        Hit {
            kind: r.kind,
            path: r.path.clone(),
            first_ms: r.first_ms,
            last_ms: r.last_ms,
            runs: r.runs,
            stamp: r.stamp,
            digests: r.hex(),
            uid: r.uid,
            matches,
        }
    }

    /// Another record of the same file or executable: the earliest first, the latest last
    /// (and its state), the runs added up.
    pub(crate) fn merge(&mut self, r: &Record) {
        self.first_ms = self.first_ms.min(r.first_ms);
        if r.last_ms >= self.last_ms {
            self.last_ms = r.last_ms;
            self.stamp = r.stamp;
        }
        self.runs += r.runs;
    }

    /// Whether it is still at its path, unchanged. What is there when it changed since was
    /// read (and kept) when it was written, or is read by the next full scan, and is judged
    /// then as any file.
    pub(crate) fn presence(&self) -> Presence {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.is_file() && Stamp::of(&m) == self.stamp => Presence::Present,
            Ok(m) if m.is_file() => Presence::Changed,
            _ => Presence::Gone,
        }
    }
}

/// What the history says of one rule change.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    pub records: u64,
    pub hits: usize,
    /// Hits past [`MAX_HITS`], not reported.
    pub untold: usize,
    /// Cached files the history could not answer for (a rescan reads them).
    pub unanswered: usize,
}

impl Retro {
    /// Answers the change from `old` to `new` from the history: reports what the new rules
    /// find there. True when a rescan is still due.
    pub fn rules_changed(&self, old: &RuleSet, new: &RuleSet) -> bool {
        if old.fingerprint() == new.fingerprint() {
            return false;
        }
        let hash_only = old.beyond_hashes() == new.beyond_hashes();
        let started = std::time::Instant::now();
        match self.answer(old, new, hash_only) {
            Ok(a) => {
                info!(
                    records = a.records,
                    hits = a.hits,
                    unanswered_cached_files = a.unanswered,
                    ms = started.elapsed().as_millis() as u64,
                    hash_only,
                    "new rules matched against the history"
                );
                if a.untold > 0 {
                    warn!(
                        reported = a.hits,
                        untold = a.untold,
                        "more history hits than one change reports; the rest are found by scans"
                    );
                }
                !hash_only || a.unanswered > 0
            }
            Err(e) => {
                warn!(error = %e, "cannot read the history; rescanning instead");
                true
            }
        }
    }

    fn answer(&self, old: &RuleSet, new: &RuleSet, hash_only: bool) -> std::io::Result<Answered> {
        let (old_tag, new_tag) = (rules_tag(old), rules_tag(new));
        let cache = &self.reports.cache;
        let mut hits: HashMap<(Kind, PathBuf, [u8; 32]), Hit> = HashMap::new();
        let mut answered = Answered::default();
        self.history.each(&mut |r: &Record| {
            answered.records += 1;
            let fresh = fresh_matches(old, new, r);
            if r.kind == Kind::File {
                // The file in this very state is judged by the new rules: what they add was
                // found here, and is known to the cache as reported.
                cache.answered(&r.stamp, old_tag, hash_only.then_some(new_tag), &fresh);
            }
            if fresh.is_empty() {
                return;
            }
            let key = (r.kind, r.path.clone(), r.sha256);
            if let Some(h) = hits.get_mut(&key) {
                h.merge(r);
                for m in fresh {
                    if !h.matches.iter().any(|k| same_finding(k, &m)) {
                        h.matches.push(m);
                    }
                }
            } else if hits.len() < MAX_HITS {
                hits.insert(key, Hit::of(r, fresh));
            } else {
                answered.untold += 1;
            }
        })?;
        answered.hits = hits.len();
        answered.unanswered = if hash_only {
            cache.count_tagged(old_tag)
        } else {
            0
        };
        let users = Users::load();
        let Some(det) = self.det.upgrade() else {
            return Ok(answered);
        };
        for h in hits.into_values() {
            let presence = h.presence();
            for d in self.detections(&h, presence, &users, new.bundle_version) {
                self.counters.inc(Counter::RetroDetections);
                self.counters.inc(Counter::Detections);
                if det.blocking_send(d).is_err() {
                    return Ok(answered);
                }
            }
        }
        Ok(answered)
    }

    fn detections(
        &self,
        h: &Hit,
        presence: Presence,
        users: &Users,
        bundle_version: u64,
    ) -> Vec<Detection> {
        let retro = vedette_proto::v1::Retro {
            first_seen_ms: h.first_ms,
            last_seen_ms: h.last_ms,
            presence: presence as i32,
            runs: h.runs,
        };
        let (md5, sha1, sha256) = h.digests.clone();
        let sha256 = sha256.unwrap_or_default();
        let raw = h.path.as_os_str().as_bytes();
        let (target, digest) = match h.kind {
            Kind::File => (
                Target::File(FileTarget {
                    path: h.path.to_string_lossy().into_owned(),
                    raw_path: if std::str::from_utf8(raw).is_ok() {
                        Vec::new()
                    } else {
                        raw.to_vec()
                    },
                    size: h.stamp.size,
                    sha256: sha256.clone(),
                    md5: md5.unwrap_or_default(),
                    sha1: sha1.unwrap_or_default(),
                }),
                None,
            ),
            Kind::Exec => (
                Target::Process(ProcessTarget {
                    name: h
                        .path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    exe: h.path.to_string_lossy().into_owned(),
                    user: users.name(h.uid),
                    exe_sha256: sha256.clone(),
                    ..Default::default()
                }),
                Some(sha256),
            ),
        };
        h.matches
            .iter()
            .map(|m| {
                let subject = match &digest {
                    None => Subject::File(h.stamp),
                    Some(sha256) => Subject::Executable {
                        sha256,
                        path: &h.path,
                        uid: h.uid,
                    },
                };
                let id = self.reports.ids.id(&subject, m);
                let mut d = detection(id, m.clone(), bundle_version, target.clone());
                d.retro = Some(retro);
                d
            })
            .collect()
    }
}

/// What `new` finds in the record that `old` did not.
fn fresh_matches(old: &RuleSet, new: &RuleSet, r: &Record) -> Vec<RuleMatch> {
    let (md5, sha1, sha256) = r.hex();
    let path = r.path.to_string_lossy();
    let (md5, sha1, sha256) = (md5.as_deref(), sha1.as_deref(), sha256.as_deref());
    let found = new.match_known_file(&path, md5, sha1, sha256);
    if found.is_empty() {
        return found;
    }
    let before = old.match_known_file(&path, md5, sha1, sha256);
    found
        .into_iter()
        .filter(|m| !before.iter().any(|b| same_finding(b, m)))
        .collect()
}
