//! The agent's history: every file it read with its three digests, and every executable that
//! ran, kept on disk so that an indicator published later is answered without reading a file
//! again ([`retro`]), and so that a binary that ran and was deleted since can still be found.
//! Nothing of it leaves the host but matches.
//!
//! # Layout
//!
//! ```text
//! STATE/history/00000000000000000001.seg   segments of records, appended, oldest first
//! ```
//!
//! # Record format
//!
//! ```text
//! len u32le | crc u32le (CRC-32 of body) | body (len bytes)
//! body = kind u8 (1 file, 2 exec) | first_ms i64 | last_ms i64 | runs u64
//!        | md5 [16] | sha1 [20] | sha256 [32]        (all zero: unknown)
//!        | dev u64 | ino u64 | size u64 | mtime_ns i64 | ctime_ns i64 | uid u32
//!        | path (the rest; raw bytes)
//! ```
//! (all integers little endian). A file record is one read of one state of a file; an exec
//! record is one executable (by SHA-256, path and user) seen running `runs` times between
//! `first_ms` and `last_ms` since its previous record: a reader adds the runs of one
//! executable's records up and takes the earliest first and latest last.
//!
//! # Guarantees
//!
//! - Records are buffered and written in whole records, one `write` of at most 64 KiB on a
//!   file opened for appending, at least every second (and before every lookup): a process
//!   killed at any instant (SIGKILL included) loses at most the last second of records, and
//!   leaves at worst a torn last record, which the next start cuts off; a record whose
//!   checksum fails is never parsed. A power cut can lose the last records that were not yet
//!   written back.
//! - The history stays within `history_max_bytes`: past it the oldest segment is deleted whole,
//!   and the records it held are counted (`history_dropped`).
//! - Lookups read the segments from disk, one pass for any number of digests: the history is
//!   never held in memory (but for the run counts of executables seen since their last record).

pub mod hunt;
pub mod retro;

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::warn;
use vedette_engine::FileReport;

use crate::detect::cache::Stamp;
use crate::telemetry::{Counter, Counters};

/// Bytes of a record before its path.
const FIXED: usize = 1 + 8 + 8 + 8 + 16 + 20 + 32 + 5 * 8 + 4;
/// Longest path kept (Linux's `PATH_MAX`).
const MAX_PATH: usize = 4096;
/// Segments a full history is split into: what deleting the oldest one frees.
const SEGMENTS: u64 = 16;
/// An executable seen again is written again at most this often (its runs counted meanwhile).
const EXEC_REWRITE_MS: i64 = 10 * 60 * 1000;
/// Bytes of records buffered before they are written out (at most a second's worth is lost
/// when the agent is killed).
const BUFFER: usize = 64 << 10;
/// Executables whose runs are counted in memory; past it, all are written and forgotten.
const MAX_EXECS: usize = 16_384;

/// What a record is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    File = 1,
    Exec = 2,
}

/// One record of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    pub first_ms: i64,
    pub last_ms: i64,
    pub runs: u64,
    pub md5: [u8; 16],
    pub sha1: [u8; 20],
    pub sha256: [u8; 32],
    pub stamp: Stamp,
    /// The user an executable ran as (`u32::MAX` for files).
    pub uid: u32,
    pub path: PathBuf,
}

impl Record {
    /// The hex digests, `None` where unknown.
    pub fn hex(&self) -> (Option<String>, Option<String>, Option<String>) {
        fn known(b: &[u8]) -> Option<String> {
            b.iter().any(|x| *x != 0).then(|| hex::encode(b))
        }
        (known(&self.md5), known(&self.sha1), known(&self.sha256))
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let path = self.path.as_os_str().as_bytes();
        let path = &path[..path.len().min(MAX_PATH)];
        let mut body = Vec::with_capacity(FIXED + path.len());
        body.push(self.kind as u8);
        body.extend_from_slice(&self.first_ms.to_le_bytes());
        body.extend_from_slice(&self.last_ms.to_le_bytes());
        body.extend_from_slice(&self.runs.to_le_bytes());
        body.extend_from_slice(&self.md5);
        body.extend_from_slice(&self.sha1);
        body.extend_from_slice(&self.sha256);
        let s = &self.stamp;
        for v in [s.dev, s.ino, s.size, s.mtime_ns as u64, s.ctime_ns as u64] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.extend_from_slice(&self.uid.to_le_bytes());
        body.extend_from_slice(path);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
    }

    fn decode(body: &[u8]) -> Option<Record> {
        if body.len() < FIXED || body.len() > FIXED + MAX_PATH {
            return None;
        }
        let (head, path) = body.split_at(FIXED);
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let (first_ms, last_ms, runs) = (word(1) as i64, word(9) as i64, word(17));
        let kind = match head[0] {
            1 => Kind::File,
            2 => Kind::Exec,
            _ => return None,
        };
        let mut r = Record {
            kind,
            first_ms,
            last_ms,
            runs,
            md5: [0; 16],
            sha1: [0; 20],
            sha256: [0; 32],
            stamp: Stamp {
                dev: 0,
                ino: 0,
                size: 0,
                mtime_ns: 0,
                ctime_ns: 0,
            },
            uid: 0,
            path: PathBuf::from(std::ffi::OsStr::from_bytes(path)),
        };
        r.md5.copy_from_slice(&head[25..41]);
        r.sha1.copy_from_slice(&head[41..61]);
        r.sha256.copy_from_slice(&head[61..93]);
        r.stamp = Stamp {
            dev: word(93),
            ino: word(101),
            size: word(109),
            mtime_ns: word(117) as i64,
            ctime_ns: word(125) as i64,
        };
        let mut b = [0u8; 4];
        b.copy_from_slice(&head[133..137]);
        r.uid = u32::from_le_bytes(b);
        Some(r)
    }
}

/// Hex (either case) into `out`; false when `hex` is not exactly that many bytes of hex.
pub(crate) fn unhex(hex: Option<&str>, out: &mut [u8]) -> bool {
    hex.is_some_and(|h| hex::decode_to_slice(h, out).is_ok())
}

/// An executable whose runs are counted between its records.
#[derive(Debug, Clone, Copy)]
struct Runs {
    first_ms: i64,
    last_ms: i64,
    /// Runs since the last record written.
    pending: u64,
    written_ms: i64,
    stamp: Stamp,
}

type ExecKey = ([u8; 32], PathBuf, u32);

struct Writer {
    file: Option<std::fs::File>,
    /// Segments on disk, oldest first: number and size.
    segments: VecDeque<(u64, u64)>,
    total: u64,
    execs: HashMap<ExecKey, Runs>,
    /// Records not yet written, and how many.
    buf: Vec<u8>,
    buffered: u64,
}

/// The history of one agent (see the module's documentation).
pub struct History {
    dir: PathBuf,
    max_bytes: u64,
    segment_max: u64,
    writer: Mutex<Writer>,
    appended: AtomicU64,
    dropped: AtomicU64,
    counters: std::sync::OnceLock<std::sync::Arc<Counters>>,
}

/// What opening the history found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub segments: usize,
    pub bytes: u64,
    /// Bytes of a torn or damaged last record, cut off.
    pub cut: u64,
}

impl History {
    /// Opens (or creates, 0700) the history in `dir`, at most `max_bytes` on disk; a torn last
    /// record is cut off.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<(History, Opened)> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mut segments = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            segments.push((n, e.metadata()?.len()));
        }
        segments.sort_unstable();
        let mut opened = Opened {
            segments: segments.len(),
            ..Opened::default()
        };
        if let Some(last) = segments.last_mut() {
            let path = segment_path(dir, last.0);
            let whole = scan_segment(&path, &mut |_| {})?;
            if whole < last.1 {
                opened.cut = last.1 - whole;
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(whole)?;
                last.1 = whole;
            }
        }
        let total = segments.iter().map(|s| s.1).sum();
        opened.bytes = total;
        let history = History {
            dir: dir.to_owned(),
            max_bytes,
            segment_max: (max_bytes / SEGMENTS).max(64 << 10),
            writer: Mutex::new(Writer {
                file: None,
                segments: segments.into(),
                total,
                execs: HashMap::new(),
                buf: Vec::new(),
                buffered: 0,
            }),
            appended: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            counters: std::sync::OnceLock::new(),
        };
        Ok((history, opened))
    }

    /// Counts what is written and dropped from now on in `counters`.
    pub fn attach(&self, counters: std::sync::Arc<Counters>) {
        counters.set(Counter::HistoryBytes, self.bytes());
        let _ = self.counters.set(counters);
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records appended since the start.
    pub fn appended(&self) -> u64 {
        self.appended.load(Ordering::Relaxed)
    }

    /// Records dropped (the oldest first) to stay within the size cap, since the start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.writer().total
    }

    /// Keeps a file read in full (`report` of the file at `path`): its state and digests.
    /// A report without digests (a file only judged by name) is not kept.
    pub fn file(&self, path: &Path, report: &FileReport) {
        let now = vedette_proto::now_ms();
        let mut r = Record {
            kind: Kind::File,
            first_ms: now,
            last_ms: now,
            runs: 0,
            md5: [0; 16],
            sha1: [0; 20],
            sha256: [0; 32],
            stamp: Stamp::of_report(report),
            uid: u32::MAX,
            path: path.to_owned(),
        };
        let any = [
            unhex(report.md5.as_deref(), &mut r.md5),
            unhex(report.sha1.as_deref(), &mut r.sha1),
            unhex(report.sha256.as_deref(), &mut r.sha256),
        ];
        if any.iter().any(|k| *k) {
            self.append(&r);
        }
    }

    /// Counts a run of the executable at `path` (SHA-256 in hex, in state `stamp`) as `uid`:
    /// written at once the first time, then with its runs at most every ten minutes.
    pub fn exec(&self, path: &Path, sha256: &str, stamp: Stamp, uid: u32) {
        let mut digest = [0u8; 32];
        if !unhex(Some(sha256), &mut digest) {
            return;
        }
        let now = vedette_proto::now_ms();
        let key = (digest, path.to_owned(), uid);
        let due = {
            let mut w = self.writer();
            if w.execs.len() >= MAX_EXECS && !w.execs.contains_key(&key) {
                let all: Vec<Record> = w.execs.drain().filter_map(exec_record).collect();
                self.write_all(&mut w, &all);
            }
            let runs = w.execs.entry(key.clone()).or_insert(Runs {
                first_ms: now,
                last_ms: now,
                pending: 0,
                written_ms: i64::MIN,
                stamp,
            });
            if runs.pending == 0 {
                runs.first_ms = now;
            }
            runs.pending += 1;
            runs.last_ms = now;
            runs.stamp = stamp;
            if now.saturating_sub(runs.written_ms) >= EXEC_REWRITE_MS {
                let r = exec_record((key, *runs));
                runs.pending = 0;
                runs.written_ms = now;
                r
            } else {
                None
            }
        };
        if let Some(r) = due {
            self.append(&r);
        }
    }

    /// Writes the runs counted since each executable's last record: of those written more than
    /// ten minutes ago, or (`all`, at shutdown) of every one.
    pub fn flush_runs(&self, all: bool) {
        let mut w = self.writer();
        let now = vedette_proto::now_ms();
        let mut due = Vec::new();
        for (key, runs) in w.execs.iter_mut() {
            let old = now.saturating_sub(runs.written_ms) >= EXEC_REWRITE_MS;
            if runs.pending > 0 && (all || old) {
                due.extend(exec_record((key.clone(), *runs)));
                runs.pending = 0;
                runs.written_ms = now;
            }
        }
        self.write_all(&mut w, &due);
        self.flush_locked(&mut w);
    }

    fn append(&self, r: &Record) {
        let mut w = self.writer();
        self.write_all(&mut w, std::slice::from_ref(r));
    }

    /// Takes the records into the buffer, written out once it holds [`BUFFER`] bytes (and
    /// every second by [`History::flush`]).
    fn write_all(&self, w: &mut Writer, records: &[Record]) {
        for r in records {
            r.encode(&mut w.buf);
        }
        w.buffered += records.len() as u64;
        self.appended
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        if let Some(c) = self.counters.get() {
            c.add(Counter::HistoryRecords, records.len() as u64);
        }
        if w.buf.len() >= BUFFER {
            self.flush_locked(w);
        }
    }

    /// Writes out what is buffered (one write, whole records); the daemon calls it every
    /// second, so that a killed agent loses at most that much of its history.
    pub fn flush(&self) {
        let mut w = self.writer();
        self.flush_locked(&mut w);
    }

    /// Failures are logged and the records they held counted as dropped, not fatal: the
    /// history is what helps answer later, never what detects now.
    fn flush_locked(&self, w: &mut Writer) {
        if w.buf.is_empty() {
            return;
        }
        let buf = std::mem::take(&mut w.buf);
        let records = std::mem::take(&mut w.buffered);
        if let Err(e) = self.write_locked(w, &buf) {
            static FAILED: vedette_ops::cli::RateLimited = vedette_ops::cli::RateLimited::new();
            if let Some(n) = FAILED.hit() {
                warn!(dir = %self.dir.display(), error = %e, failures = n, "cannot write the history; what was seen meanwhile cannot be answered later");
            }
            self.dropped.fetch_add(records, Ordering::Relaxed);
            if let Some(c) = self.counters.get() {
                c.add(Counter::HistoryDropped, records);
            }
        }
        // The buffer's memory is kept for the next records.
        w.buf = buf;
        w.buf.clear();
        if let Some(c) = self.counters.get() {
            c.set(Counter::HistoryBytes, w.total);
        }
    }

    fn write_locked(&self, w: &mut Writer, buf: &[u8]) -> std::io::Result<()> {
        let full = w
            .segments
            .back()
            .is_none_or(|s| s.1 + buf.len() as u64 > self.segment_max);
        if full || w.file.is_none() {
            let number = match w.segments.back() {
                Some(s) if !full => s.0,
                Some(s) => s.0 + 1,
                None => 1,
            };
            let file = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(segment_path(&self.dir, number))?;
            if full {
                w.segments.push_back((number, 0));
            }
            w.file = Some(file);
        }
        while w.total + buf.len() as u64 > self.max_bytes && w.segments.len() > 1 {
            self.drop_oldest(w);
        }
        if let Some(f) = w.file.as_mut() {
            f.write_all(buf)?;
        }
        if let Some(s) = w.segments.back_mut() {
            s.1 += buf.len() as u64;
        }
        w.total += buf.len() as u64;
        Ok(())
    }

    fn drop_oldest(&self, w: &mut Writer) {
        let Some((number, bytes)) = w.segments.pop_front() else {
            return;
        };
        let path = segment_path(&self.dir, number);
        let mut records = 0u64;
        let _ = scan_segment(&path, &mut |_| records += 1);
        if let Err(e) = std::fs::remove_file(&path) {
            warn!(path = %path.display(), error = %e, "cannot delete the oldest history segment");
        }
        w.total = w.total.saturating_sub(bytes);
        self.dropped.fetch_add(records, Ordering::Relaxed);
        if let Some(c) = self.counters.get() {
            c.add(Counter::HistoryDropped, records);
        }
    }

    /// Calls `visit` with every record, oldest first, then with the runs counted since their
    /// executables' last records. Damaged records are skipped.
    pub fn each(&self, visit: &mut dyn FnMut(&Record)) -> std::io::Result<()> {
        let (segments, pending) = {
            let mut w = self.writer();
            self.flush_locked(&mut w);
            let pending: Vec<Record> = w
                .execs
                .iter()
                .filter(|(_, r)| r.pending > 0)
                .filter_map(|(k, r)| exec_record((k.clone(), *r)))
                .collect();
            (w.segments.iter().map(|s| s.0).collect::<Vec<_>>(), pending)
        };
        for n in segments {
            match scan_segment(&segment_path(&self.dir, n), visit) {
                Ok(_) => {}
                // Dropped to make room meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        for r in &pending {
            visit(r);
        }
        Ok(())
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.flush();
    }
}

fn exec_record((key, runs): (ExecKey, Runs)) -> Option<Record> {
    let (sha256, path, uid) = key;
    Some(Record {
        kind: Kind::Exec,
        first_ms: runs.first_ms,
        last_ms: runs.last_ms,
        runs: runs.pending,
        md5: [0; 16],
        sha1: [0; 20],
        sha256,
        stamp: runs.stamp,
        uid,
        path,
    })
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}.seg"))
}

/// Reads one segment's records in order, up to the first that is short or damaged; the length
/// of the intact records read.
fn scan_segment(path: &Path, visit: &mut dyn FnMut(&Record)) -> std::io::Result<u64> {
    let mut r = BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let mut head = [0u8; 8];
    let mut body = Vec::new();
    let mut whole = 0u64;
    loop {
        match r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(whole),
            Err(e) => return Err(e),
        }
        let (len, crc) = split_head(&head);
        if !(FIXED..=FIXED + MAX_PATH).contains(&len) {
            return Ok(whole);
        }
        body.resize(len, 0);
        match r.read_exact(&mut body) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(whole),
            Err(e) => return Err(e),
        }
        if crc32fast::hash(&body) != crc {
            return Ok(whole);
        }
        if let Some(rec) = Record::decode(&body) {
            visit(&rec);
        }
        whole += 8 + len as u64;
    }
}

fn split_head(head: &[u8; 8]) -> (usize, u32) {
    let mut l = [0u8; 4];
    let mut c = [0u8; 4];
    l.copy_from_slice(&head[..4]);
    c.copy_from_slice(&head[4..]);
    (u32::from_le_bytes(l) as usize, u32::from_le_bytes(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn report(n: u64) -> FileReport {
        use sha2::Digest;
        let data = n.to_le_bytes();
        FileReport {
            size: 8,
            device: 1,
            inode: n,
            mtime_ns: 5,
            ctime_ns: 6,
            sha256: Some(hex::encode(sha2::Sha256::digest(data))),
            md5: Some(hex::encode([n as u8; 16])),
            sha1: Some(hex::encode([n as u8; 20])),
            matches: Vec::new(),
        }
    }

    fn all(h: &History) -> Vec<Record> {
        let mut out = Vec::new();
        h.each(&mut |r| out.push(r.clone())).unwrap();
        out
    }

    #[test]
    fn records_survive_a_reopen_with_their_digests_and_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("history");
        let (h, _) = History::open(&at, 1 << 20).unwrap();
        h.file(Path::new("/srv/a"), &report(1));
        h.file(Path::new("/srv/b"), &report(2));
        h.exec(
            Path::new("/usr/bin/x"),
            &hex::encode([9u8; 32]),
            Stamp::of_report(&report(3)),
            1000,
        );
        drop(h);
        let (h, opened) = History::open(&at, 1 << 20).unwrap();
        assert_eq!(opened.cut, 0);
        let records = all(&h);
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].path, Path::new("/srv/a"));
        assert_eq!(records[1].hex().0, report(2).md5);
        assert_eq!(records[1].hex().2, report(2).sha256);
        assert_eq!(records[2].kind, Kind::Exec);
        assert_eq!((records[2].uid, records[2].runs), (1000, 1));
        for e in std::fs::read_dir(&at).unwrap() {
            let mode = e.unwrap().metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let mode = std::fs::metadata(&at).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn a_torn_last_record_is_cut_and_the_intact_ones_load() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("history");
        let (h, _) = History::open(&at, 1 << 20).unwrap();
        for n in 0..10 {
            h.file(Path::new("/srv/f"), &report(n));
        }
        drop(h);
        let seg = segment_path(&at, 1);
        let len = std::fs::metadata(&seg).unwrap().len();
        // A write torn in its middle: the last record loses its tail.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 7)
            .unwrap();
        let (h, opened) = History::open(&at, 1 << 20).unwrap();
        assert!(opened.cut > 0);
        assert_eq!(all(&h).len(), 9);
        // Appending goes on after the intact records.
        h.file(Path::new("/srv/g"), &report(99));
        let records = all(&h);
        assert_eq!(records.len(), 10);
        assert_eq!(records[9].path, Path::new("/srv/g"));
    }

    #[test]
    fn over_its_cap_the_oldest_go_first_and_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("history");
        let cap = 1 << 20;
        let (h, _) = History::open(&at, cap).unwrap();
        let n = 30_000u64;
        for i in 0..n {
            h.file(Path::new(&format!("/srv/file-{i}")), &report(i));
        }
        assert!(h.bytes() <= cap, "{} bytes", h.bytes());
        let records = all(&h);
        assert!(h.dropped() > 0);
        assert_eq!(records.len() as u64 + h.dropped(), n);
        // The newest are kept, in order.
        assert_eq!(
            records.last().unwrap().path,
            Path::new(&format!("/srv/file-{}", n - 1))
        );
        let first = records[0].stamp.ino;
        assert_eq!(first, h.dropped());
    }

    #[test]
    fn an_executable_run_often_is_written_once_with_its_runs_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (h, _) = History::open(&dir.path().join("h"), 1 << 20).unwrap();
        let sha = hex::encode([7u8; 32]);
        let stamp = Stamp::of_report(&report(1));
        for _ in 0..50 {
            h.exec(Path::new("/tmp/beacon"), &sha, stamp, 0);
        }
        assert_eq!(h.appended(), 1);
        let runs: u64 = all(&h).iter().map(|r| r.runs).sum();
        assert_eq!(runs, 50);
        h.flush_runs(false);
        assert_eq!(h.appended(), 1, "written less than ten minutes ago");
        h.flush_runs(true);
        assert_eq!(h.appended(), 2);
        let runs: u64 = all(&h).iter().map(|r| r.runs).sum();
        assert_eq!(runs, 50);
    }
}
