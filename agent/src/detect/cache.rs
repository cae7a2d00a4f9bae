//! Scan result cache: an unchanged file is not scanned twice with the same rules, and a match
//! already reported for it is not reported again, whatever found it (the watcher, a full scan,
//! a rescan after new rules) and across restarts.
//!
//! Key: (device, inode); an entry holds the file's state (size, mtime and ctime in
//! nanoseconds: any write or chmod changes ctime), the tag of the rules it was scanned with, and
//! the matches found (and reported) for that state. A lookup is a hit only for the same state
//! and the same rules; a scan of the same state with other rules reports only the matches that
//! were not found before.
//!
//! File format (little endian), written to a temporary file and renamed into place:
//! ```text
//! magic "VDTCACHE" | version u32 | count u64
//! count × ( dev u64 | ino u64 | size u64 | mtime_ns i64 | ctime_ns i64 | rules u64 | sha256 str
//!           | n u16 | n × match )
//! match = kind u8 | score u8 | rule str | source str | description str
//!         | indicator source str | id str | event str | origin str | techniques str (comma-separated)
//!                                                                     (str = len u32 | bytes)
//! sha256 of everything above [32]
//! ```
//! A file whose checksum, magic or version does not match is ignored (and replaced on save):
//! the cache is an optimisation, never a source of truth. Detection ids are derived from the
//! file's state and the rule, so a match reported again after a lost cache is still stored once.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use vedette_engine::codec::{Reader, Writer, unseal};
use vedette_engine::{FileReport, MatchKind, RuleMatch, RuleSet};

const MAGIC: &[u8; 8] = b"VDTCACHE";
const VERSION: u32 = 3;

/// Entries kept in memory; past it, entries of files that matched nothing are dropped first.
const MAX_ENTRIES: usize = 1 << 20;

/// A file changed this recently when it was scanned may change again within the same timestamp
/// tick without its stamp changing: its entry is never a cache hit (it still says what was
/// reported). Linux file systems keep nanoseconds, updated at least every clock tick (at most
/// 10 ms); a file system whose times have no fraction of a second (FAT, some network file
/// systems) gets [`RACY_COARSE_NS`].
pub const RACY_NS: i64 = 100_000_000;
const RACY_COARSE_NS: i64 = 2_000_000_000;

/// The rules tag of entries that must be scanned again whatever the rules.
const NEVER_HIT: u64 = 0;

/// What identifies one state of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Stamp {
    pub fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        }
    }

    /// The state the scanner saw, from the descriptor it read.
    pub fn of_report(r: &FileReport) -> Stamp {
        Stamp {
            dev: r.device,
            ino: r.inode,
            size: r.size,
            mtime_ns: r.mtime_ns,
            ctime_ns: r.ctime_ns,
        }
    }
}

/// A short tag of a rule set (the first bytes of its fingerprint).
pub fn rules_tag(rules: &RuleSet) -> u64 {
    let f = rules.fingerprint();
    let mut b = [0u8; 8];
    b.copy_from_slice(&f[..8]);
    u64::from_le_bytes(b)
}

struct Entry {
    stamp: Stamp,
    rules: u64,
    matches: Vec<RuleMatch>,
    /// SHA-256 of the content, kept for files that matched (empty otherwise).
    sha256: String,
}

/// What the cache remembers of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub matches: Vec<RuleMatch>,
    pub sha256: String,
}

#[derive(Default)]
pub struct ScanCache {
    map: Mutex<HashMap<(u64, u64), Entry>>,
    /// Changed since the last save.
    dirty: AtomicBool,
    /// Keep the SHA-256 of every file, not only of those that matched (executables: the
    /// history keeps each one's runs by it).
    every_digest: bool,
}

/// Whether two matches are the same finding (kind, rule, source).
pub(crate) fn same_finding(a: &RuleMatch, b: &RuleMatch) -> bool {
    a.kind == b.kind && a.rule == b.rule && a.source == b.source
}

impl ScanCache {
    pub fn new() -> ScanCache {
        ScanCache::default()
    }

    /// A cache that keeps every file's SHA-256 (see `every_digest`).
    pub fn keeping_digests() -> ScanCache {
        ScanCache {
            every_digest: true,
            ..ScanCache::default()
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u64), Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The recorded matches when the file is unchanged since it was scanned with `rules`.
    pub fn get(&self, stamp: &Stamp, rules: u64) -> Option<Cached> {
        let map = self.map();
        let e = map.get(&(stamp.dev, stamp.ino))?;
        (e.stamp == *stamp && e.rules == rules && rules != NEVER_HIT).then(|| Cached {
            matches: e.matches.clone(),
            sha256: e.sha256.clone(),
        })
    }

    /// Records what a scan with `rules` found in the file state `stamp`; returns the matches
    /// not found in that same state before (all of them for a new or changed file).
    pub fn record(
        &self,
        stamp: Stamp,
        rules: u64,
        matches: &[RuleMatch],
        sha256: Option<&str>,
    ) -> Vec<RuleMatch> {
        let mut map = self.map();
        let known: &[RuleMatch] = match map.get(&(stamp.dev, stamp.ino)) {
            Some(e) if e.stamp == stamp => &e.matches,
            _ => &[],
        };
        let new: Vec<RuleMatch> = matches
            .iter()
            .filter(|m| !known.iter().any(|k| same_finding(k, m)))
            .cloned()
            .collect();
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, e| !e.matches.is_empty());
        }
        let sha256 = if matches.is_empty() && !self.every_digest {
            String::new()
        } else {
            sha256.unwrap_or("").to_string()
        };
        let now_ns = vedette_proto::now_ms().saturating_mul(1_000_000);
        let changed = stamp.ctime_ns.max(stamp.mtime_ns);
        let window = if changed % 1_000_000_000 == 0 {
            RACY_COARSE_NS
        } else {
            RACY_NS
        };
        let racy = now_ns.saturating_sub(changed) < window;
        map.insert(
            (stamp.dev, stamp.ino),
            Entry {
                stamp,
                rules: if racy { NEVER_HIT } else { rules },
                matches: matches.to_vec(),
                sha256,
            },
        );
        self.dirty.store(true, Ordering::Relaxed);
        new
    }

    /// The history answered for the file in state `stamp` under new rules: `fresh` (what they
    /// add) is known as reported for that state, and when `retag` is given, an entry scanned
    /// with the rules tagged `old` is a hit for the new ones (tagged `retag`) too.
    pub fn answered(&self, stamp: &Stamp, old: u64, retag: Option<u64>, fresh: &[RuleMatch]) {
        let mut map = self.map();
        let Some(e) = map.get_mut(&(stamp.dev, stamp.ino)) else {
            return;
        };
        if e.stamp != *stamp {
            return;
        }
        let mut changed = false;
        for m in fresh {
            if !e.matches.iter().any(|k| same_finding(k, m)) {
                e.matches.push(m.clone());
                changed = true;
            }
        }
        if let Some(new) = retag
            && e.rules == old
            && old != NEVER_HIT
        {
            e.rules = new;
            changed = true;
        }
        if changed {
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Entries scanned with the rules tagged `tag`.
    pub fn count_tagged(&self, tag: u64) -> usize {
        self.map().values().filter(|e| e.rules == tag).count()
    }

    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }

    /// Loads the cache saved at `path`; a missing, damaged or older file gives an empty cache.
    pub fn load(path: &Path) -> ScanCache {
        let cache = ScanCache::new();
        let Ok(bytes) = std::fs::read(path) else {
            return cache;
        };
        if let Some(entries) = decode(&bytes) {
            let mut map = cache.map();
            for e in entries {
                map.insert((e.stamp.dev, e.stamp.ino), e);
            }
        } else {
            tracing::info!(path = %path.display(), "scan cache unusable (other version or damaged); starting afresh");
        }
        cache
    }

    /// Writes the cache atomically when it changed since the last save.
    pub fn save_if_changed(&self, path: &Path) -> std::io::Result<()> {
        if self.dirty.swap(false, Ordering::Relaxed)
            && let Err(e) = self.save(path)
        {
            self.dirty.store(true, Ordering::Relaxed);
            return Err(e);
        }
        Ok(())
    }

    /// Writes the cache atomically.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut w = Writer::default();
        w.bytes(MAGIC);
        w.u32(VERSION);
        {
            let map = self.map();
            w.u64(map.len() as u64);
            for e in map.values() {
                encode_entry(&mut w, e);
            }
        }
        let out = w.seal();
        // Made anew and exclusively (never through a symlink planted at the temporary name),
        // private, then renamed over the old file.
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        if let Err(e) = f.write_all(&out).and_then(|()| f.sync_all()) {
            // A full disk is not made fuller by a half-written copy; the old file stays whole.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, path)
    }
}

fn encode_entry(w: &mut Writer, e: &Entry) {
    let s = e.stamp;
    for v in [s.dev, s.ino, s.size] {
        w.u64(v);
    }
    w.u64(s.mtime_ns as u64);
    w.u64(s.ctime_ns as u64);
    w.u64(e.rules);
    w.text(&e.sha256);
    let n = e.matches.len().min(u16::MAX as usize);
    w.u16(n as u16);
    for m in &e.matches[..n] {
        w.u8(kind_code(m.kind));
        w.u8(m.score.min(255) as u8);
        let i = &m.indicator;
        for s in [
            &m.rule,
            &m.source,
            &m.description,
            &i.source,
            &i.id,
            &i.event,
            &i.origin,
        ] {
            w.text(s);
        }
        w.text(&i.techniques.join(","));
    }
}

fn kind_code(k: MatchKind) -> u8 {
    match k {
        MatchKind::Yara => 1,
        MatchKind::Hash => 2,
        MatchKind::Filename => 3,
        MatchKind::Process => 4,
        MatchKind::Connection => 5,
    }
}

fn kind_of(c: u8) -> Option<MatchKind> {
    Some(match c {
        1 => MatchKind::Yara,
        2 => MatchKind::Hash,
        3 => MatchKind::Filename,
        4 => MatchKind::Process,
        5 => MatchKind::Connection,
        _ => return None,
    })
}

fn decode(bytes: &[u8]) -> Option<Vec<Entry>> {
    let mut r = Reader(unseal(bytes)?);
    if r.take(8)? != MAGIC || r.u32()? != VERSION {
        return None;
    }
    let count = r.u64()?;
    let mut out = Vec::with_capacity(count.min(1 << 20) as usize);
    for _ in 0..count {
        let stamp = Stamp {
            dev: r.u64()?,
            ino: r.u64()?,
            size: r.u64()?,
            mtime_ns: r.u64()? as i64,
            ctime_ns: r.u64()? as i64,
        };
        let rules = r.u64()?;
        let sha256 = r.text()?;
        let n = r.u16()?;
        let mut matches = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let kind = kind_of(r.u8()?)?;
            let score = u32::from(r.u8()?);
            let (rule, source, description) = (r.text()?, r.text()?, r.text()?);
            let indicator = vedette_engine::IndicatorRef {
                source: r.text()?,
                id: r.text()?,
                event: r.text()?,
                origin: r.text()?,
                techniques: r
                    .text()?
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .collect(),
            };
            matches.push(RuleMatch {
                kind,
                score,
                rule,
                source,
                description,
                author: String::new(),
                reference: String::new(),
                indicator: std::sync::Arc::new(indicator),
            });
        }
        out.push(Entry {
            stamp,
            rules,
            matches,
            sha256,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ino: u64) -> Stamp {
        Stamp {
            dev: 1,
            ino,
            size: 10,
            mtime_ns: 5,
            ctime_ns: 6,
        }
    }

    fn found(rule: &str) -> RuleMatch {
        RuleMatch {
            kind: MatchKind::Yara,
            rule: rule.into(),
            source: "s".into(),
            score: 80,
            description: "d".into(),
            author: String::new(),
            reference: String::new(),
            indicator: std::sync::Arc::new(vedette_engine::IndicatorRef {
                source: "misp".into(),
                id: "attr".into(),
                event: "ev".into(),
                origin: "feed".into(),
                techniques: vec!["T1059".into(), "T1105".into()],
            }),
        }
    }

    #[test]
    fn round_trip_and_invalidation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.bin");
        let c = ScanCache::new();
        c.record(stamp(1), 7, &[], None);
        c.record(stamp(2), 7, &[found("r")], Some("abc"));
        c.save(&path).unwrap();
        let c2 = ScanCache::load(&path);
        assert_eq!(c2.get(&stamp(1), 7).unwrap().matches, vec![]);
        let hit = c2.get(&stamp(2), 7).unwrap();
        assert_eq!(hit.matches[0].rule, "r");
        assert_eq!(hit.sha256, "abc");
        // A changed ctime is a changed file.
        let touched = Stamp {
            ctime_ns: 7,
            ..stamp(1)
        };
        assert_eq!(c2.get(&touched, 7), None);
        // Other rules: the file is scanned again.
        assert_eq!(c2.get(&stamp(2), 8), None);
        // A damaged file is ignored, not parsed.
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(ScanCache::load(&path).len(), 0);
    }

    #[test]
    fn a_match_is_new_once_per_file_state_whatever_the_rules() {
        let c = ScanCache::new();
        assert_eq!(
            c.record(stamp(1), 7, &[found("a")], Some("h")),
            vec![found("a")]
        );
        // The same state again, then with other rules that also match `b`: only `b` is new.
        assert_eq!(c.record(stamp(1), 7, &[found("a")], Some("h")), vec![]);
        let both = [found("a"), found("b")];
        assert_eq!(c.record(stamp(1), 8, &both, Some("h")), vec![found("b")]);
        // A changed file: both are new again.
        let changed = Stamp {
            size: 11,
            ..stamp(1)
        };
        assert_eq!(c.record(changed, 8, &both, Some("h")).len(), 2);
    }

    #[test]
    fn a_file_changed_just_before_its_scan_is_never_a_hit() {
        let c = ScanCache::new();
        let now_ns = vedette_proto::now_ms() * 1_000_000;
        let fresh = Stamp {
            ctime_ns: now_ns,
            ..stamp(1)
        };
        assert_eq!(c.record(fresh, 7, &[found("a")], None).len(), 1);
        assert_eq!(c.get(&fresh, 7), None);
        // What was reported is still known.
        assert_eq!(c.record(fresh, 7, &[found("a")], None), vec![]);
    }

    #[test]
    fn saving_never_writes_through_a_planted_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let path = dir.path().join("scan-cache.bin");
        std::os::unix::fs::symlink(&victim, path.with_extension("tmp")).unwrap();
        let c = ScanCache::new();
        c.save(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(ScanCache::load(&path).len(), 0);
    }

    #[test]
    fn saves_only_when_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.bin");
        let c = ScanCache::new();
        c.save_if_changed(&path).unwrap();
        assert!(!path.exists());
        c.record(stamp(1), 7, &[], None);
        c.save_if_changed(&path).unwrap();
        assert_eq!(ScanCache::load(&path).len(), 1);
        std::fs::remove_file(&path).unwrap();
        c.save_if_changed(&path).unwrap();
        assert!(!path.exists());
    }
}
