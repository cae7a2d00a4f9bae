//! Scan result cache: an unchanged file is not scanned twice with the same rules.
//!
//! Key: (device, inode); an entry is valid while the file's size, mtime and ctime (nanoseconds)
//! are the ones recorded and the rule set's fingerprint is the one the cache was made with (any
//! write or chmod changes ctime; new rules change the fingerprint and empty the cache).
//!
//! File format (little endian), written to a temporary file and renamed into place:
//! ```text
//! magic "VDTCACHE" | version u32 | rules fingerprint [32] | count u64
//! count × ( dev u64 | ino u64 | size u64 | mtime_ns i64 | ctime_ns i64 | sha256 str | n u16 | n × match )
//! match = kind u8 | score u8 | rule str | source str | description str     (str = len u32 | bytes)
//! sha256 of everything above [32]
//! ```
//! A file whose checksum, magic or version does not match is ignored (and replaced on save):
//! the cache is an optimisation, never a source of truth.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;

use vedette_engine::codec::{Reader, Writer, unseal};
use vedette_engine::{MatchKind, RuleMatch};

const MAGIC: &[u8; 8] = b"VDTCACHE";
const VERSION: u32 = 1;

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
}

struct Entry {
    stamp: Stamp,
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

pub struct ScanCache {
    fingerprint: [u8; 32],
    map: Mutex<HashMap<(u64, u64), Entry>>,
}

impl ScanCache {
    pub fn new(fingerprint: [u8; 32]) -> ScanCache {
        ScanCache {
            fingerprint,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u64), Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The recorded matches when the file is unchanged since it was scanned.
    pub fn get(&self, stamp: &Stamp) -> Option<Cached> {
        let map = self.map();
        let e = map.get(&(stamp.dev, stamp.ino))?;
        (e.stamp == *stamp).then(|| Cached {
            matches: e.matches.clone(),
            sha256: e.sha256.clone(),
        })
    }

    pub fn insert(&self, stamp: Stamp, matches: Vec<RuleMatch>, sha256: Option<&str>) {
        let sha256 = if matches.is_empty() {
            String::new()
        } else {
            sha256.unwrap_or("").to_string()
        };
        self.map().insert(
            (stamp.dev, stamp.ino),
            Entry {
                stamp,
                matches,
                sha256,
            },
        );
    }

    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }

    /// Loads a cache made with the same rules; anything else gives an empty cache.
    pub fn load(path: &Path, fingerprint: [u8; 32]) -> ScanCache {
        let cache = ScanCache::new(fingerprint);
        let Ok(bytes) = std::fs::read(path) else {
            return cache;
        };
        if let Some(entries) = decode(&bytes, &fingerprint) {
            let mut map = cache.map();
            for e in entries {
                map.insert((e.stamp.dev, e.stamp.ino), e);
            }
        } else {
            tracing::info!(path = %path.display(), "scan cache unusable (other rules, other version or damaged); starting afresh");
        }
        cache
    }

    /// Writes the cache atomically.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut w = Writer::default();
        w.bytes(MAGIC);
        w.u32(VERSION);
        w.bytes(&self.fingerprint);
        {
            let map = self.map();
            w.u64(map.len() as u64);
            for e in map.values() {
                encode_entry(&mut w, e);
            }
        }
        let out = w.seal();
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()?;
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
    w.text(&e.sha256);
    let n = e.matches.len().min(u16::MAX as usize);
    w.u16(n as u16);
    for m in &e.matches[..n] {
        w.u8(kind_code(m.kind));
        w.u8(m.score.min(255) as u8);
        for s in [&m.rule, &m.source, &m.description] {
            w.text(s);
        }
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

fn decode(bytes: &[u8], fingerprint: &[u8; 32]) -> Option<Vec<Entry>> {
    let mut r = Reader(unseal(bytes)?);
    if r.take(8)? != MAGIC || r.u32()? != VERSION || r.take(32)? != fingerprint {
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
        let sha256 = r.text()?;
        let n = r.u16()?;
        let mut matches = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let kind = kind_of(r.u8()?)?;
            let score = u32::from(r.u8()?);
            matches.push(RuleMatch {
                kind,
                score,
                rule: r.text()?,
                source: r.text()?,
                description: r.text()?,
                author: String::new(),
                reference: String::new(),
            });
        }
        out.push(Entry {
            stamp,
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

    #[test]
    fn round_trip_and_invalidation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.bin");
        let c = ScanCache::new([7; 32]);
        c.insert(stamp(1), vec![], None);
        c.insert(
            stamp(2),
            vec![RuleMatch {
                kind: MatchKind::Yara,
                rule: "r".into(),
                source: "s".into(),
                score: 80,
                description: "d".into(),
                author: String::new(),
                reference: String::new(),
            }],
            Some("abc"),
        );
        c.save(&path).unwrap();
        let c2 = ScanCache::load(&path, [7; 32]);
        assert_eq!(c2.get(&stamp(1)).unwrap().matches, vec![]);
        let hit = c2.get(&stamp(2)).unwrap();
        assert_eq!(hit.matches[0].rule, "r");
        assert_eq!(hit.sha256, "abc");
        // A changed ctime is a changed file.
        assert_eq!(
            c2.get(&Stamp {
                ctime_ns: 7,
                ..stamp(1)
            }),
            None
        );
        // Other rules: nothing is reused.
        assert_eq!(ScanCache::load(&path, [8; 32]).len(), 0);
        // A damaged file is ignored, not parsed.
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(ScanCache::load(&path, [7; 32]).len(), 0);
    }
}
