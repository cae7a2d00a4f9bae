//! Digests computed ahead of a scan: while the YARA rules compile or load on one core, the other
//! reads and hashes the files the scan will meet (only the digests the indicator lists need), and
//! the scan then takes each file's digests from here instead of hashing it again.
//!
//! A digest is only used for the very state it was computed from: same device, inode, size,
//! modification and change time on the descriptor the scanner reads. A file changed shortly
//! before it was hashed is not remembered, since a write within the same clock tick would leave
//! its times unchanged.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;

use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::ioc::Iocs;

/// Files smaller than this are not hashed ahead: opening and reading them costs more than
/// their digests.
pub const MIN_SIZE: u64 = 16 * 1024;

/// At most this many files are remembered (about 200 bytes each).
pub const MAX_ENTRIES: usize = 65_536;

/// A file changed less than this long before it was hashed is not remembered.
const SETTLE_NS: i64 = 2_000_000_000;

/// Which digests the indicator lists need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    pub md5: bool,
    pub sha1: bool,
    pub sha256: bool,
}

impl Wanted {
    pub fn of(iocs: &Iocs) -> Wanted {
        Wanted {
            md5: iocs.wants_md5(),
            sha1: iocs.wants_sha1(),
            sha256: iocs.wants_sha256(),
        }
    }

    pub fn any(&self) -> bool {
        self.md5 || self.sha1 || self.sha256
    }
}

/// The state of a file a digest belongs to (times in nanoseconds since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct State {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl State {
    pub fn of(meta: &std::fs::Metadata) -> State {
        State {
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        }
    }
}

/// Hex digests of one file, those that were wanted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Digests {
    pub md5: Option<String>,
    pub sha1: Option<String>,
    pub sha256: Option<String>,
}

impl Digests {
    pub fn of(data: &[u8], wanted: Wanted) -> Digests {
        Digests {
            md5: wanted.md5.then(|| hex::encode(Md5::digest(data))),
            sha1: wanted.sha1.then(|| hex::encode(Sha1::digest(data))),
            sha256: wanted.sha256.then(|| hex::encode(Sha256::digest(data))),
        }
    }
}

/// Digests of files by identity (device, inode), each with the state it was computed from.
#[derive(Default)]
pub struct DigestMemo {
    map: Mutex<HashMap<(u64, u64), (State, Digests)>>,
}

/// What [`DigestMemo::hash_ahead`] did with one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ahead {
    /// Hashed and remembered.
    Hashed,
    /// Left for the scan (too small, too large, recently changed, changed while read, not a
    /// regular file, unreadable).
    Left,
    /// The memo is full: stop.
    Full,
}

impl DigestMemo {
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u64), (State, Digests)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `path` (as the scanner opens files: no symlink followed, nothing but a regular
    /// file read) and remembers its `wanted` digests, if it is between [`MIN_SIZE`] and
    /// `max_size` bytes and did not change in the last seconds before `now_ns` (wall clock,
    /// nanoseconds since the epoch). `buf` is reused between calls.
    pub fn hash_ahead(
        &self,
        path: &Path,
        wanted: Wanted,
        max_size: u64,
        now_ns: i64,
        buf: &mut Vec<u8>,
    ) -> Ahead {
        if self.len() >= MAX_ENTRIES {
            return Ahead::Full;
        }
        let Ok(file) = crate::file::open_regular(path) else {
            return Ahead::Left;
        };
        let Ok(meta) = file.metadata() else {
            return Ahead::Left;
        };
        let before = State::of(&meta);
        if !crate::file::is_regular(&meta.file_type())
            || before.size < MIN_SIZE
            || before.size > max_size
            || now_ns.saturating_sub(before.ctime_ns.max(before.mtime_ns)) < SETTLE_NS
        {
            return Ahead::Left;
        }
        buf.clear();
        buf.reserve(before.size as usize + 1);
        if (&file).take(max_size + 1).read_to_end(buf).is_err() || buf.len() as u64 != before.size {
            return Ahead::Left;
        }
        let digests = Digests::of(buf, wanted);
        // The file must not have changed while it was read.
        match file.metadata() {
            Ok(after) if State::of(&after) == before => {}
            _ => return Ahead::Left,
        }
        if buf.capacity() > 8 * 1024 * 1024 {
            *buf = Vec::new();
        }
        self.lock()
            .insert((meta.dev(), meta.ino()), (before, digests));
        Ahead::Hashed
    }

    /// The digests remembered for the file a scanner read, described by its descriptor before
    /// the read (`before`) and after it (`after`): only if they were computed from that very
    /// state and the file did not change while the scanner read it. The entry is used up
    /// either way.
    pub fn take(&self, before: &std::fs::Metadata, after: &std::fs::Metadata) -> Option<Digests> {
        let (state, digests) = self.lock().remove(&(before.dev(), before.ino()))?;
        (state == State::of(before) && state == State::of(after)).then_some(digests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Wanted = Wanted {
        md5: true,
        sha1: true,
        sha256: true,
    };

    fn now_ns() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64
    }

    /// A file written now, its modification time set `age_s` seconds in the past (its change
    /// time stays now).
    fn file_aged(dir: &Path, name: &str, data: &[u8], age_s: i64) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        let then = std::time::SystemTime::now() - std::time::Duration::from_secs(age_s as u64);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(then)
            .unwrap();
        p
    }

    #[test]
    fn digests_are_given_back_for_the_same_state_only() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 40_000];
        let p = file_aged(dir.path(), "a", &data, 0);
        let memo = DigestMemo::default();
        let mut buf = Vec::new();
        // The change time is now (setting the modification time changes it): too fresh.
        assert_eq!(
            memo.hash_ahead(&p, ALL, 1 << 20, now_ns(), &mut buf),
            Ahead::Left
        );
        // Seen from a moment later, it has settled.
        let later = now_ns() + 3 * SETTLE_NS;
        assert_eq!(
            memo.hash_ahead(&p, ALL, 1 << 20, later, &mut buf),
            Ahead::Hashed
        );
        let meta = std::fs::metadata(&p).unwrap();
        let got = memo.take(&meta, &meta).expect("remembered");
        assert_eq!(got, Digests::of(&data, ALL));
        assert_eq!(
            got.sha256.as_deref(),
            Some(hex::encode(Sha256::digest(&data)).as_str())
        );
        // Used up.
        assert!(memo.take(&meta, &meta).is_none());

        // Changed after it was hashed (same size, new content): not given back.
        let old = file_aged(dir.path(), "old", &data, 10);
        assert_eq!(
            memo.hash_ahead(&old, ALL, 1 << 20, later, &mut buf),
            Ahead::Hashed
        );
        std::fs::write(&old, vec![8u8; 40_000]).unwrap();
        let now = std::fs::metadata(&old).unwrap();
        assert!(memo.take(&now, &now).is_none());
        // Changed while the scanner read it: not given back either.
        let mid = file_aged(dir.path(), "mid", &data, 10);
        assert_eq!(
            memo.hash_ahead(&mid, ALL, 1 << 20, later, &mut buf),
            Ahead::Hashed
        );
        let before = std::fs::metadata(&mid).unwrap();
        std::fs::write(&mid, vec![9u8; 40_000]).unwrap();
        let after = std::fs::metadata(&mid).unwrap();
        assert!(memo.take(&before, &after).is_none());
    }

    #[test]
    fn small_large_special_and_linked_files_are_left_to_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let later = now_ns() + 3 * SETTLE_NS;
        let memo = DigestMemo::default();
        let mut buf = Vec::new();
        let small = file_aged(dir.path(), "small", b"tiny", 10);
        assert_eq!(
            memo.hash_ahead(&small, ALL, 1 << 20, later, &mut buf),
            Ahead::Left
        );
        let big = file_aged(dir.path(), "big", &vec![1u8; 70_000], 10);
        assert_eq!(
            memo.hash_ahead(&big, ALL, 65_536, later, &mut buf),
            Ahead::Left
        );
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&big, &link).unwrap();
        assert_eq!(
            memo.hash_ahead(&link, ALL, 1 << 20, later, &mut buf),
            Ahead::Left
        );
        assert_eq!(
            memo.hash_ahead(Path::new("/dev/zero"), ALL, 1 << 20, later, &mut buf),
            Ahead::Left
        );
        assert!(memo.is_empty());
        // Only the wanted digests are computed.
        let only = Wanted {
            md5: false,
            sha1: false,
            sha256: true,
        };
        assert_eq!(
            memo.hash_ahead(&big, only, 1 << 20, later, &mut buf),
            Ahead::Hashed
        );
        let meta = std::fs::metadata(&big).unwrap();
        let got = memo.take(&meta, &meta).unwrap();
        assert!(got.md5.is_none() && got.sha1.is_none() && got.sha256.is_some());
    }
}
