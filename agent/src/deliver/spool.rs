//! The durable spool: every detection is on disk before it is sent, and leaves the disk only
//! after the collector acknowledged it.
//!
//! # Layout
//!
//! ```text
//! STATE/spool/00000000000000000001.seg   segments, named by the id of their first record
//! STATE/spool/00000000000000000733.seg
//! STATE/spool/ack                        acknowledged-up-to id and dropped total (checksummed)
//! ```
//!
//! # Record format
//!
//! ```text
//! ┌────────────┬────────────┬────────────┬──────────────────────────────┐
//! │ len: u32le │ crc: u32le │ id: u64le  │ payload: len bytes            │
//! └────────────┴────────────┴────────────┴──────────────────────────────┘
//! ```
//! `payload` is one protobuf-encoded `vedette.v1.Detection`; `crc` is CRC-32 (IEEE) over the id
//! bytes and the payload. Ids start at 1 and grow by one per record, across segments.
//!
//! # Invariants
//!
//! - A record is handed to the shipper only after the `fdatasync` that made it durable
//!   (one sync per group of detections that arrived together, so bursts cost one sync).
//! - Records are acknowledged in id order: the collector acks a batch only after its store
//!   committed, batches are acked in sequence, so "acknowledged" is always a prefix `1..=acked`.
//! - A segment file is deleted only when every record in it is acknowledged, or when the spool is
//!   over its size cap; then the oldest segment goes first and every unacknowledged record in it
//!   is added to the dropped total, which is persisted and sent in every heartbeat. Loss is never
//!   silent. (A record dropped while a batch holding it was in flight and then acknowledged is
//!   counted as dropped although it was delivered: the count can exceed the loss, never fall
//!   short of it.)
//! - On start every segment is read and checked. The first record that is short, oversized,
//!   fails its checksum or breaks the id sequence ends that segment: the file is truncated
//!   there (a torn tail is never parsed as data), and the damage is logged and counted.
//!
//! # What a crash or power cut can lose
//!
//! A process crash (SIGKILL included) loses nothing that reached the spool: records are written
//! before they are sent, and the ack file is replaced atomically. A power cut can lose only
//! detections that had not yet been synced, which were never sent nor acknowledged to anyone.
//! The ack file is not synced on every ack; after a power cut it may be older than the truth, so
//! some acknowledged detections are sent again, and the collector stores each detection id once.
//! Changes of the dropped total are synced.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use prost::Message;
use tracing::{info, warn};
use vedette_proto::v1::Detection;

const HEADER: usize = 16;
/// Largest payload accepted; a longer length field is damage.
pub const MAX_RECORD: usize = 4 * 1024 * 1024;
/// Smallest size cap the spool accepts.
pub const MIN_CAP: u64 = 64 * 1024;
/// Largest segment file.
const MAX_SEGMENT: u64 = 8 * 1024 * 1024;

/// What `open` found wrong and repaired.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Records waiting for an ack.
    pub pending: u64,
    /// Segments cut at a damaged record.
    pub damaged_segments: u64,
    /// Bytes removed from damaged tails.
    pub damaged_bytes: u64,
}

struct Segment {
    first_id: u64,
    /// Id of the last record; `first_id - 1` when empty.
    last_id: u64,
    bytes: u64,
    path: PathBuf,
    file: File,
}

struct Inner {
    segments: VecDeque<Segment>,
    /// Whether the last segment takes new records (segments found at start are sealed).
    active: bool,
    next_id: u64,
    acked: u64,
    dropped: u64,
    total_bytes: u64,
    /// The reader's position: (segment first id, byte offset, id of the record there).
    read_pos: Option<(u64, u64, u64)>,
    /// Whether a drop has been logged since the spool last had room.
    dropping: bool,
}

pub struct Spool {
    dir: PathBuf,
    cap: u64,
    segment_bytes: u64,
    inner: Mutex<Inner>,
    /// Figures published after every change, read without the lock (which an fsync may hold).
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    acked: AtomicU64,
    pending: AtomicU64,
    dropped: AtomicU64,
    bytes: AtomicU64,
}

/// A batch read for sending: detections with ids `first_id..=last_id` (minus dropped ones).
pub struct Batch {
    pub last_id: u64,
    pub detections: Vec<Detection>,
}

fn seg_name(first_id: u64) -> String {
    format!("{first_id:020}.seg")
}

fn crc(id: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&id.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn ctx(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ctx(dir, e))
}

/// Checks one segment: truncates it at the first damaged record, and removes it when nothing
/// in it is left to deliver (then returns `None`).
fn recover_segment(
    path: PathBuf,
    first: u64,
    acked: u64,
    rec: &mut Recovery,
) -> io::Result<Option<Segment>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| ctx(&path, e))?;
    let (last_id, good, damage) = check_segment(&file, first).map_err(|e| ctx(&path, e))?;
    let len = file.metadata().map_err(|e| ctx(&path, e))?.len();
    if let Some(reason) = damage {
        warn!(
            path = %path.display(),
            offset = good,
            removed_bytes = len - good,
            reason,
            "damaged spool record; truncating the segment there"
        );
        file.set_len(good).map_err(|e| ctx(&path, e))?;
        file.sync_all().map_err(|e| ctx(&path, e))?;
        rec.damaged_segments += 1;
        rec.damaged_bytes += len - good;
    }
    if good == 0 || last_id <= acked {
        fs::remove_file(&path).map_err(|e| ctx(&path, e))?;
        return Ok(None);
    }
    Ok(Some(Segment {
        first_id: first,
        last_id,
        bytes: good,
        path,
        file,
    }))
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, checking every record. `cap` is the most bytes
    /// of segments kept.
    pub fn open(dir: &Path, cap: u64) -> io::Result<(Spool, Recovery)> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| ctx(dir, e))?;
        let cap = cap.max(MIN_CAP);
        let (acked, dropped) = read_ack(&dir.join("ack"));
        let names = segment_files(dir)?;
        let mut rec = Recovery::default();
        let mut segments = VecDeque::new();
        let mut prev_last = 0u64;
        for (first, path) in names {
            if first <= prev_last || first == 0 {
                warn!(path = %path.display(), "spool segment overlaps the one before; removing it");
                rec.damaged_segments += 1;
                rec.damaged_bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&path).map_err(|e| ctx(&path, e))?;
                continue;
            }
            let Some(seg) = recover_segment(path, first, acked, &mut rec)? else {
                continue;
            };
            let last_id = seg.last_id;
            prev_last = last_id;
            rec.pending += last_id - first.max(acked + 1) + 1;
            segments.push_back(seg);
        }
        let next_id = prev_last.max(acked) + 1;
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        let spool = Spool {
            dir: dir.to_owned(),
            cap,
            segment_bytes: (cap / 8).clamp(16 * 1024, MAX_SEGMENT),
            inner: Mutex::new(Inner {
                segments,
                active: false,
                next_id,
                acked,
                dropped,
                total_bytes,
                read_pos: None,
                dropping: false,
            }),
            stats: Stats::default(),
        };
        spool.publish(&spool.lock());
        if rec.pending > 0 {
            info!(
                pending = rec.pending,
                "spooled detections waiting for delivery"
            );
        }
        Ok((spool, rec))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends detections and syncs them to disk. Returns how many older records were dropped
    /// to stay under the cap. A detection too large for a record is refused (error).
    pub fn append(&self, detections: &[Detection]) -> io::Result<u64> {
        let mut g = self.lock();
        let inner = &mut *g;
        let result = self.append_locked(inner, detections);
        if result.is_err() {
            // Whatever was not synced is not part of the spool; new records start a new
            // segment, so no segment ever has a hole in its id sequence.
            inner.active = false;
        }
        self.publish(inner);
        result
    }

    /// Updates the lock-free figures from the state.
    fn publish(&self, inner: &Inner) {
        let pending: u64 = inner
            .segments
            .iter()
            .map(|s| {
                let from = s.first_id.max(inner.acked + 1);
                (s.last_id + 1).saturating_sub(from)
            })
            .sum();
        self.stats.acked.store(inner.acked, Ordering::Relaxed);
        self.stats.pending.store(pending, Ordering::Relaxed);
        self.stats.dropped.store(inner.dropped, Ordering::Relaxed);
        self.stats.bytes.store(inner.total_bytes, Ordering::Relaxed);
    }

    fn append_locked(&self, inner: &mut Inner, detections: &[Detection]) -> io::Result<u64> {
        let mut dropped = 0u64;
        let mut buf: Vec<u8> = Vec::new();
        // Id of the last record in `buf` (0: none).
        let mut buf_last = 0u64;
        for d in detections {
            let payload = d.encode_to_vec();
            if payload.len() > MAX_RECORD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "a detection of {} bytes is larger than a spool record ({MAX_RECORD})",
                        payload.len()
                    ),
                ));
            }
            let size = (HEADER + payload.len()) as u64;
            let used = inner.segments.back().map_or(0, |s| s.bytes) + buf.len() as u64;
            if !inner.active || (used > 0 && used + size > self.segment_bytes) {
                self.flush(inner, &mut buf, buf_last)?;
                self.new_segment(inner)?;
            }
            // Over the cap: the oldest segments go (never the one being written).
            while inner.total_bytes + buf.len() as u64 + size > self.cap && inner.segments.len() > 1
            {
                dropped += self.drop_oldest(inner)?;
            }
            let id = inner.next_id;
            inner.next_id += 1;
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc(id, &payload).to_le_bytes());
            buf.extend_from_slice(&id.to_le_bytes());
            buf.extend_from_slice(&payload);
            buf_last = id;
        }
        self.flush(inner, &mut buf, buf_last)?;
        if dropped > 0 {
            inner.dropped += dropped;
            if !inner.dropping {
                warn!(
                    cap_bytes = self.cap,
                    "spool full: dropping the oldest undelivered detections (counted)"
                );
                inner.dropping = true;
            }
            self.write_ack(inner, true)?;
        } else if inner.dropping && inner.total_bytes < self.cap / 2 {
            info!("spool has room again");
            inner.dropping = false;
        }
        Ok(dropped)
    }

    /// Writes `buf` (records up to id `last`) at the end of the active segment and syncs it;
    /// only then do the records count as written. On failure the unsynced tail is cut off.
    fn flush(&self, inner: &mut Inner, buf: &mut Vec<u8>, last: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let Some(s) = inner.segments.back_mut() else {
            return Ok(());
        };
        let written = s
            .file
            .write_all_at(buf, s.bytes)
            .and_then(|()| s.file.sync_data());
        if let Err(e) = written {
            let _ = s.file.set_len(s.bytes);
            return Err(ctx(&s.path, e));
        }
        s.bytes += buf.len() as u64;
        s.last_id = last;
        inner.total_bytes += buf.len() as u64;
        buf.clear();
        Ok(())
    }

    fn new_segment(&self, inner: &mut Inner) -> io::Result<()> {
        let first = inner.next_id;
        let path = self.dir.join(seg_name(first));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| ctx(&path, e))?;
        sync_dir(&self.dir)?;
        inner.segments.push_back(Segment {
            first_id: first,
            last_id: first - 1,
            bytes: 0,
            path,
            file,
        });
        inner.active = true;
        Ok(())
    }

    /// Deletes the oldest segment; returns how many unacknowledged records it held.
    fn drop_oldest(&self, inner: &mut Inner) -> io::Result<u64> {
        let Some(s) = inner.segments.pop_front() else {
            return Ok(0);
        };
        fs::remove_file(&s.path).map_err(|e| ctx(&s.path, e))?;
        inner.total_bytes -= s.bytes;
        let from = s.first_id.max(inner.acked + 1);
        Ok(if s.last_id >= from {
            s.last_id - from + 1
        } else {
            0
        })
    }

    /// Reads up to `max` detections (and about `max_bytes`) with ids from `from_id` on.
    /// Ids of dropped records are skipped. Returns `None` when nothing is there yet.
    pub fn read(&self, from_id: u64, max: usize, max_bytes: usize) -> io::Result<Option<Batch>> {
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(idx) = inner
            .segments
            .iter()
            .rposition(|s| s.first_id <= from_id)
            .or_else(|| (!inner.segments.is_empty()).then_some(0))
        else {
            return Ok(None);
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut last_id = 0u64;
        let mut want = from_id;
        for s in inner.segments.iter().skip(idx) {
            if s.last_id < want.max(s.first_id) {
                continue;
            }
            let mut off = match inner.read_pos {
                Some((seg, off, id)) if seg == s.first_id && id <= want => off,
                _ => 0,
            };
            while off < s.bytes && out.len() < max && bytes < max_bytes {
                let mut head = [0u8; HEADER];
                s.file
                    .read_exact_at(&mut head, off)
                    .map_err(|e| ctx(&s.path, e))?;
                let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
                let rid = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
                let next = off + (HEADER + len) as u64;
                if rid >= want {
                    let mut payload = vec![0u8; len];
                    s.file
                        .read_exact_at(&mut payload, off + HEADER as u64)
                        .map_err(|e| ctx(&s.path, e))?;
                    match Detection::decode(payload.as_slice()) {
                        Ok(d) => out.push(d),
                        Err(e) => {
                            warn!(path = %s.path.display(), id = rid, error = %e, "spool record does not decode; skipped");
                        }
                    }
                    bytes += len;
                    last_id = rid;
                    want = rid + 1;
                }
                off = next;
                inner.read_pos = Some((s.first_id, off, rid + 1));
            }
            if out.len() >= max || bytes >= max_bytes {
                break;
            }
        }
        Ok((last_id != 0).then_some(Batch {
            last_id,
            detections: out,
        }))
    }

    /// Records that every id up to `id` is acknowledged, deleting segments wholly behind it.
    pub fn ack(&self, id: u64) -> io::Result<()> {
        let mut g = self.lock();
        let inner = &mut *g;
        if id <= inner.acked {
            return Ok(());
        }
        inner.acked = id;
        // Every wholly acknowledged segment goes, the one being written included (the next
        // append starts a new one): an idle agent keeps no delivered detections on disk.
        while inner.segments.front().is_some_and(|s| s.last_id <= id) {
            if let Some(s) = inner.segments.pop_front() {
                inner.total_bytes -= s.bytes;
                if let Err(e) = fs::remove_file(&s.path) {
                    // Harmless: at the next start its records are behind the ack mark.
                    warn!(path = %s.path.display(), error = %e, "cannot remove a delivered spool segment");
                }
            }
        }
        if inner.segments.is_empty() {
            inner.active = false;
        }
        self.publish(inner);
        self.write_ack(inner, false)
    }

    fn write_ack(&self, inner: &Inner, sync: bool) -> io::Result<()> {
        let path = self.dir.join("ack");
        let tmp = self.dir.join("ack.tmp");
        let mut body = Vec::with_capacity(20);
        body.extend_from_slice(&inner.acked.to_le_bytes());
        body.extend_from_slice(&inner.dropped.to_le_bytes());
        let sum = crc32fast::hash(&body);
        body.extend_from_slice(&sum.to_le_bytes());
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| ctx(&tmp, e))?;
        f.write_all(&body).map_err(|e| ctx(&tmp, e))?;
        if sync {
            f.sync_data().map_err(|e| ctx(&tmp, e))?;
        }
        fs::rename(&tmp, &path).map_err(|e| ctx(&path, e))?;
        if sync {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Persists the ack state (at shutdown).
    pub fn sync(&self) -> io::Result<()> {
        let g = self.lock();
        self.write_ack(&g, true)
    }

    /// Highest acknowledged id.
    pub fn acked(&self) -> u64 {
        self.stats.acked.load(Ordering::Relaxed)
    }

    /// Records written (synced) but not acknowledged; dropped ones excluded.
    pub fn pending(&self) -> u64 {
        self.stats.pending.load(Ordering::Relaxed)
    }

    /// Detections dropped to stay under the cap, ever (persisted).
    pub fn dropped(&self) -> u64 {
        self.stats.dropped.load(Ordering::Relaxed)
    }

    /// Bytes of segment files.
    pub fn bytes(&self) -> u64 {
        self.stats.bytes.load(Ordering::Relaxed)
    }
}

/// What is in a spool directory, read without changing anything (for `vedette-agent spool`).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Inspection {
    pub segments: u64,
    pub bytes: u64,
    /// Highest acknowledged record id.
    pub acked: u64,
    /// Valid records not yet acknowledged.
    pub pending: u64,
    /// Detections dropped past the size cap, ever.
    pub dropped_total: u64,
    /// Segments with a damaged tail (cut on the agent's next start).
    pub damaged_segments: u64,
    pub damaged_bytes: u64,
}

/// Reads a spool directory without repairing it. A record being written while this runs shows
/// as a damaged tail.
pub fn inspect(dir: &Path) -> io::Result<Inspection> {
    let (acked, dropped_total) = read_ack(&dir.join("ack"));
    let mut out = Inspection {
        acked,
        dropped_total,
        ..Inspection::default()
    };
    for (first, path) in segment_files(dir)? {
        let file = match File::open(&path) {
            Ok(f) => f,
            // Deleted after an ack since the listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ctx(&path, e)),
        };
        let len = file.metadata().map_err(|e| ctx(&path, e))?.len();
        let (last_id, good, damage) = check_segment(&file, first).map_err(|e| ctx(&path, e))?;
        out.segments += 1;
        out.bytes += len;
        if damage.is_some() {
            out.damaged_segments += 1;
            out.damaged_bytes += len - good;
        }
        if last_id >= first.max(acked + 1) {
            out.pending += last_id - first.max(acked + 1) + 1;
        }
    }
    Ok(out)
}

/// The segment files of a spool directory with their first record ids, oldest first.
fn segment_files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| ctx(dir, e))? {
        let entry = entry.map_err(|e| ctx(dir, e))?;
        let first = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            out.push((first, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads the ack file; a missing or damaged one means nothing was acknowledged.
fn read_ack(path: &Path) -> (u64, u64) {
    let mut body = Vec::new();
    match File::open(path).and_then(|mut f| f.read_to_end(&mut body)) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return (0, 0),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the spool ack file; resending everything spooled");
            return (0, 0);
        }
    }
    if body.len() == 20 {
        let sum = u32::from_le_bytes(body[16..20].try_into().unwrap_or_default());
        if crc32fast::hash(&body[..16]) == sum {
            let acked = u64::from_le_bytes(body[0..8].try_into().unwrap_or_default());
            let dropped = u64::from_le_bytes(body[8..16].try_into().unwrap_or_default());
            return (acked, dropped);
        }
    }
    warn!(path = %path.display(), "damaged spool ack file; resending everything spooled (the collector stores each detection once)");
    (0, 0)
}

/// Checks every record of a segment. Returns the last good id, the length of the good prefix,
/// and why the rest is damage (if there is any rest).
fn check_segment(file: &File, first_id: u64) -> io::Result<(u64, u64, Option<&'static str>)> {
    let len = file.metadata()?.len();
    let mut r = io::BufReader::with_capacity(256 * 1024, file);
    let mut off = 0u64;
    let mut expect = first_id;
    let mut payload = Vec::new();
    loop {
        if off == len {
            return Ok((expect - 1, off, None));
        }
        if len - off < HEADER as u64 {
            return Ok((expect - 1, off, Some("torn record header")));
        }
        let mut head = [0u8; HEADER];
        r.read_exact(&mut head)?;
        let n = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let sum = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let id = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
        if n > MAX_RECORD {
            return Ok((expect - 1, off, Some("record length out of range")));
        }
        if len - off - (HEADER as u64) < n as u64 {
            return Ok((expect - 1, off, Some("torn record payload")));
        }
        payload.resize(n, 0);
        r.read_exact(&mut payload)?;
        if crc(id, &payload) != sum {
            return Ok((expect - 1, off, Some("record checksum mismatch")));
        }
        if id != expect {
            return Ok((expect - 1, off, Some("record id out of sequence")));
        }
        expect += 1;
        off += (HEADER + n) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(n: u64) -> Detection {
        Detection {
            id: format!("id-{n}"),
            rule: "r".into(),
            ..Default::default()
        }
    }

    fn ids(b: &Batch) -> Vec<String> {
        b.detections.iter().map(|d| d.id.clone()).collect()
    }

    #[test]
    fn records_survive_reopen_until_acked() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append(&(1..=10).map(det).collect::<Vec<_>>()).unwrap();
        let b = s.read(1, 4, usize::MAX).unwrap().unwrap();
        assert_eq!(ids(&b), ["id-1", "id-2", "id-3", "id-4"]);
        assert_eq!(b.last_id, 4);
        s.ack(4).unwrap();
        drop(s);
        let (s, rec) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.pending, 6);
        assert_eq!(s.acked(), 4);
        let b = s.read(5, 100, usize::MAX).unwrap().unwrap();
        assert_eq!(b.detections.len(), 6);
        assert_eq!(b.detections[0].id, "id-5");
        s.ack(b.last_id).unwrap();
        assert_eq!(s.pending(), 0);
        // Nothing delivered stays on disk.
        assert_eq!(s.bytes(), 0);
        let segs = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "seg")
            })
            .count();
        assert_eq!(segs, 0);
        // New records continue the id sequence.
        s.append(&[det(11)]).unwrap();
        let b = s.read(11, 10, usize::MAX).unwrap().unwrap();
        assert_eq!(b.last_id, 11);
    }

    #[test]
    fn torn_and_corrupt_tails_are_cut_not_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append(&(1..=5).map(det).collect::<Vec<_>>()).unwrap();
        drop(s);
        let seg = dir.path().join(seg_name(1));
        let len = fs::metadata(&seg).unwrap().len();
        // Flip a byte in the last record's payload.
        let data = fs::read(&seg).unwrap();
        let mut bad = data.clone();
        bad[len as usize - 1] ^= 0xff;
        fs::write(&seg, &bad).unwrap();
        let (s, rec) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.pending, 4);
        assert_eq!(rec.damaged_segments, 1);
        assert!(rec.damaged_bytes > 0);
        let b = s.read(1, 100, usize::MAX).unwrap().unwrap();
        assert_eq!(b.detections.len(), 4);
        drop(s);
        // A half-written header after good records.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[7, 0, 0]).unwrap();
        drop(f);
        let (_, rec) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.pending, 4);
        assert_eq!(rec.damaged_bytes, 3);
    }

    #[test]
    fn over_the_cap_the_oldest_are_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path(), MIN_CAP).unwrap();
        let n = 2000u64;
        for chunk in (1..=n).collect::<Vec<_>>().chunks(10) {
            let group: Vec<Detection> = chunk
                .iter()
                .map(|&i| Detection {
                    description: "x".repeat(200),
                    ..det(i)
                })
                .collect();
            s.append(&group).unwrap();
        }
        assert!(s.bytes() <= MIN_CAP, "{} bytes", s.bytes());
        let dropped = s.dropped();
        assert!(dropped > 0);
        let mut got = Vec::new();
        let mut from = 1;
        while let Some(b) = s.read(from, 100, usize::MAX).unwrap() {
            from = b.last_id + 1;
            got.extend(ids(&b));
        }
        assert_eq!(got.len() as u64 + dropped, n);
        // The survivors are the newest, in order.
        let expect: Vec<String> = (dropped + 1..=n).map(|i| format!("id-{i}")).collect();
        assert_eq!(got, expect);
        drop(s);
        let (s, _) = Spool::open(dir.path(), MIN_CAP).unwrap();
        assert_eq!(s.dropped(), dropped, "the dropped total is persisted");
    }
}
