//! The durable spool: every detection is on disk before it is sent, and leaves the disk only
//! after the collector acknowledged it.
//!
//! # Layout
//!
//! ```text
//! STATE/spool/00000000000000000001.seg   segments, named by the id of their first record
//! STATE/spool/00000000000000000733.seg
//! STATE/spool/ack                        acknowledged-up-to id and dropped total (checksummed),
//!                                        in two slots written in turn
//! STATE/spool/reserve                    room kept for making room on a full disk (zeros)
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
//! - A segment file is deleted only when every record in it is acknowledged. Over the size cap,
//!   or when its disk is full, the spool makes room by evicting records from its sealed segments
//!   in the order [`super::evict`] gives (repeats of one rule before anything else, the lowest
//!   score and then the oldest first): the dropped total grows first, is synced, and is sent in
//!   every heartbeat; then each segment holding victims is rewritten without them (a new file,
//!   synced, renamed over the old one). Loss is never silent. A full disk first gives up the
//!   reserve file, which leaves room for the rewrite; then the detections arriving are ranked
//!   with the spooled ones, and an arriving repeat or lower score is refused (counted) rather
//!   than a first sighting or higher score already spooled evicted; with no room even for a
//!   rewrite, victims that end their segment are cut off (no room needed) and counted after
//!   the cut; where nothing can be freed, the arriving detections are refused (counted) and
//!   what is spooled stays. (A record dropped while a batch holding
//!   it was in flight and then acknowledged is counted as dropped although it was delivered,
//!   and a crash between the count and the rewrite counts records that are still there: the
//!   count can exceed the loss. It can fall short only by a crash in the instant between a cut
//!   on a disk with no room at all and its count.)
//! - On start every segment is read and checked. A record that is short, oversized, fails its
//!   checksum or does not have a higher id than the one before is damage: the rest of the file
//!   is searched for the next intact record (a header whose id follows and whose checksum
//!   holds), and the segment is rewritten with the intact records only (or cut, when the damage
//!   is its tail). Damaged bytes are never parsed as data; the damage is logged and counted.
//!
//! # What a crash or power cut can lose
//!
//! A process crash (SIGKILL included) loses nothing that reached the spool: records are written
//! before they are sent, and each ack write goes to the slot not holding the last state, so a
//! write cut short leaves the state before it. A power cut can lose only
//! detections that had not yet been synced, which were never sent nor acknowledged to anyone.
//! The ack file is not synced on every ack; after a power cut it may be older than the truth, so
//! some acknowledged detections are sent again, and the collector stores each detection id once.
//! Changes of the dropped total are synced.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prost::Message;
use tracing::{info, warn};
use vedette_proto::v1::Detection;

use super::evict;

const HEADER: usize = 16;
/// Largest payload accepted; a longer length field is damage.
pub const MAX_RECORD: usize = 4 * 1024 * 1024;
/// Smallest size cap the spool accepts.
pub const MIN_CAP: u64 = 64 * 1024;
/// Largest segment file.
const MAX_SEGMENT: u64 = 8 * 1024 * 1024;
/// After a drop, the spool is said to have room again once this passes without another.
const QUIET: Duration = Duration::from_secs(30);
/// The reserve file: a segment's size and this much more (see [`Spool::append`]).
const RESERVE: &str = "reserve";
const RESERVE_EXTRA: u64 = 64 * 1024;

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
    /// Ids within `first_id..=last_id` not in the file (evicted), as inclusive ranges.
    gaps: Vec<(u64, u64)>,
    bytes: u64,
    path: PathBuf,
    file: File,
}

impl Segment {
    /// Records in it with an id above `acked`.
    fn unacked(&self, acked: u64) -> u64 {
        let from = self.first_id.max(acked + 1);
        if self.last_id < from {
            return 0;
        }
        let gone: u64 = self
            .gaps
            .iter()
            .map(|&(a, b)| (b + 1).saturating_sub(a.max(from)))
            .sum();
        (self.last_id - from + 1).saturating_sub(gone)
    }
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
    /// When the last drop was.
    dropped_at: Instant,
    /// Whether the reserve file is known to be in place.
    reserved: bool,
    /// When the reserve was last written (or tried).
    reserve_tried: Instant,
    ack: AckFile,
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

/// What one [`Spool::append_from`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Detections now in the spool, synced.
    pub spooled: u64,
    /// Records dropped from the spool to make room (over the cap, or on a full disk).
    pub evicted: u64,
    /// Detections refused for want of room on a full disk.
    pub refused: u64,
}

/// How room was made on a full disk.
#[derive(Default)]
struct Room {
    evicted: u64,
    refused: u64,
    /// Per incoming detection, whether it is refused.
    refuse: Vec<bool>,
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

/// A new, empty, private file at `path` (replacing any), open for reading and writing.
fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| ctx(path, e))
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
    let Checked {
        last_id,
        good,
        spans,
        damage,
        gaps,
    } = check_segment(&file, first).map_err(|e| ctx(&path, e))?;
    let len = file.metadata().map_err(|e| ctx(&path, e))?.len();
    let mut file = file;
    if let Some(reason) = damage {
        let whole = spans.len() <= 1 && spans.first().is_none_or(|s| s.0 == 0);
        warn!(
            path = %path.display(),
            removed_bytes = len - good,
            kept_bytes = good,
            reason,
            "damaged spool records; skipping them and keeping every intact one"
        );
        if whole {
            file.set_len(good).map_err(|e| ctx(&path, e))?;
            file.sync_all().map_err(|e| ctx(&path, e))?;
        } else {
            file = keep_spans(&file, &path, &spans)?;
        }
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
        gaps,
        bytes: good,
        path,
        file,
    }))
}

/// Replaces the segment at `path` with only the byte ranges `spans` of `file` (a new file,
/// synced, renamed over it); returns the new file.
fn keep_spans(file: &File, path: &Path, spans: &[(u64, u64)]) -> io::Result<File> {
    let mut kept = Vec::new();
    for &(start, end) in spans {
        let mut part = vec![0u8; (end - start) as usize];
        file.read_exact_at(&mut part, start)
            .map_err(|e| ctx(path, e))?;
        kept.extend_from_slice(&part);
    }
    let tmp = path.with_extension("seg.tmp");
    let out = create_private(&tmp)?;
    out.write_all_at(&kept, 0)
        .and_then(|()| out.sync_data())
        .map_err(|e| ctx(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| ctx(path, e))?;
    Ok(out)
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
        let ((acked, dropped), ack_slot) = read_ack(&dir.join("ack"));
        remove_leftovers(dir);
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
            prev_last = seg.last_id;
            rec.pending += seg.unacked(acked);
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
                dropped_at: Instant::now(),
                reserved: false,
                reserve_tried: Instant::now(),
                ack: AckFile {
                    file: None,
                    slot: ack_slot,
                },
            }),
            stats: Stats::default(),
        };
        {
            let mut inner = spool.lock();
            inner.reserved = spool.reserve();
            if !inner.reserved {
                warn!(dir = %dir.display(), "no room for the spool's reserve file; a full disk will cost more detections");
            }
            spool.publish(&inner);
        }
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

    /// Appends detections and syncs them to disk. Returns how many records were dropped to
    /// stay under the cap or to make room on a full disk. A detection too large for a record
    /// is refused (error).
    pub fn append(&self, detections: &[Detection]) -> io::Result<u64> {
        let mut rest = detections.to_vec();
        let (appended, result) = self.append_from(&mut rest);
        result.map(|()| appended.evicted + appended.refused)
    }

    /// Appends the detections of `group` and syncs them, taking from `group` each one that is
    /// now in the spool or was refused for want of room (counted), even when the write fails
    /// part way: what is left is what a caller tries again, so no detection is spooled or
    /// counted twice.
    ///
    /// When the disk is full below the cap, room is made (see [`Spool::room_on_full_disk`])
    /// and the write is tried once more; the reserve is taken back when there is room.
    pub fn append_from(&self, group: &mut Vec<Detection>) -> (Appended, io::Result<()>) {
        let mut g = self.lock();
        let inner = &mut *g;
        let mut out = Appended::default();
        let mut result = self.append_taking(inner, group, &mut out);
        if result.as_ref().is_err_and(disk_full) {
            let room = self.room_on_full_disk(inner, group);
            let mut refuse = room.refuse.iter();
            group.retain(|_| !refuse.next().is_some_and(|&r| r));
            out.evicted += room.evicted;
            out.refused = room.refused;
            if room.evicted + room.refused > 0 {
                self.note_dropping(inner);
            }
            if room.refused > 0 {
                // Never spooled, so no crash can leave them counted but present: the count
                // is kept at once, and on disk with the next write of the ack file.
                inner.dropped += room.refused;
                let _ = self.write_ack(inner, true);
            }
            result = self.append_taking(inner, group, &mut out);
        }
        // Taken back when there is room; tried at most once per QUIET, as writing it on a disk
        // too small for it fills the disk first.
        if result.is_ok() && !inner.reserved && inner.reserve_tried.elapsed() >= QUIET {
            inner.reserve_tried = Instant::now();
            inner.reserved = self.reserve();
        }
        self.publish(inner);
        (out, result)
    }

    /// One try at appending `group`, taking from it what was synced.
    fn append_taking(
        &self,
        inner: &mut Inner,
        group: &mut Vec<Detection>,
        out: &mut Appended,
    ) -> io::Result<()> {
        let mut written = 0;
        let result = self.append_once(inner, group, &mut written);
        group.drain(..written.min(group.len()));
        out.spooled += written as u64;
        result.map(|evicted| out.evicted += evicted)
    }

    /// Makes room for `incoming` on a full disk. The reserve is given up first, and is room
    /// enough. Without it, the spooled records and the incoming ones are ranked together as at
    /// the cap ([`evict::choose`]): a repeat or a low score arriving is refused rather than a
    /// first sighting or a higher score spooled before it evicted. Chosen spooled records go
    /// as at the cap (segments rewritten without them); without room for that, victims that
    /// end their segment are cut off; where neither frees anything, the incoming detections
    /// are refused, and what is spooled stays.
    fn room_on_full_disk(&self, inner: &mut Inner, incoming: &[Detection]) -> Room {
        inner.reserved = false;
        let mut room = Room {
            refuse: vec![false; incoming.len()],
            ..Room::default()
        };
        if fs::remove_file(self.dir.join(RESERVE)).is_ok() {
            return room;
        }
        let (mut candidates, sealed) = self.candidates(inner).unwrap_or_default();
        let base = inner.next_id;
        let mut need = 0;
        for (i, d) in incoming.iter().enumerate() {
            let bytes = (HEADER + d.encoded_len()) as u64;
            need += bytes;
            candidates.push(evict::Candidate {
                id: base + i as u64,
                bytes,
                score: d.score,
                group: evict::group_of(d),
            });
        }
        let chosen = evict::choose(&candidates, need, 0);
        let spooled: Vec<u64> = chosen.iter().copied().filter(|&id| id < base).collect();
        for &id in &chosen[spooled.len()..] {
            room.refuse[(id - base) as usize] = true;
        }
        if !spooled.is_empty() {
            let bytes: u64 = candidates
                .iter()
                .filter(|c| spooled.binary_search(&c.id).is_ok())
                .map(|c| c.bytes)
                .sum();
            room.evicted = self
                .evict(inner, &spooled, sealed)
                .or_else(|_| self.cut_room(inner, bytes))
                .unwrap_or_else(|e| {
                    warn!(error = %e, "the spool's disk is full and nothing spooled could go");
                    0
                });
            if room.evicted == 0 {
                room.refuse.fill(true);
            }
        }
        room.refused = room.refuse.iter().filter(|&&r| r).count() as u64;
        room
    }

    fn append_once(
        &self,
        inner: &mut Inner,
        detections: &[Detection],
        written: &mut usize,
    ) -> io::Result<u64> {
        let result = self.append_locked(inner, detections, written);
        if result.is_err() {
            // Whatever was not synced is not part of the spool; new records start a new
            // segment, so no segment ever ends in a half-written record.
            inner.active = false;
            inner.reserved = false;
        }
        result
    }

    fn reserve_bytes(&self) -> u64 {
        self.segment_bytes + RESERVE_EXTRA
    }

    /// Writes the reserve file: room kept on the spool's disk for making room when it is
    /// full (a rewritten segment and the ack file). Whether it is there now.
    fn reserve(&self) -> bool {
        let path = self.dir.join(RESERVE);
        let size = self.reserve_bytes();
        if fs::metadata(&path).is_ok_and(|m| m.len() == size) {
            return true;
        }
        let written = create_private(&path).and_then(|f| {
            // Written, not merely sized: a sparse file would hold no room.
            let zeros = [0u8; 64 * 1024];
            let mut at = 0u64;
            while at < size {
                let n = (size - at).min(zeros.len() as u64) as usize;
                f.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            f.sync_data()
        });
        if written.is_err() {
            let _ = fs::remove_file(&path);
        }
        written.is_ok()
    }

    /// Updates the lock-free figures from the state.
    fn publish(&self, inner: &Inner) {
        let pending: u64 = inner.segments.iter().map(|s| s.unacked(inner.acked)).sum();
        self.stats.acked.store(inner.acked, Ordering::Relaxed);
        self.stats.pending.store(pending, Ordering::Relaxed);
        self.stats.dropped.store(inner.dropped, Ordering::Relaxed);
        self.stats.bytes.store(inner.total_bytes, Ordering::Relaxed);
    }

    /// Appends; `written` counts the detections synced so far (those of every flush done).
    fn append_locked(
        &self,
        inner: &mut Inner,
        detections: &[Detection],
        written: &mut usize,
    ) -> io::Result<u64> {
        let mut dropped = 0u64;
        let mut buf: Vec<u8> = Vec::new();
        // Id of the last record in `buf` (0: none), and how many detections it holds.
        let mut buf_last = 0u64;
        let mut in_buf = 0usize;
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
                *written += std::mem::take(&mut in_buf);
                self.new_segment(inner)?;
            }
            // Over the cap: room is made in the sealed segments (never the one being written).
            while inner.total_bytes + buf.len() as u64 + size > self.cap && inner.segments.len() > 1
            {
                let over = inner.total_bytes + buf.len() as u64 + size - self.cap;
                dropped += self.make_room(inner, over)?;
            }
            let id = inner.next_id;
            inner.next_id += 1;
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc(id, &payload).to_le_bytes());
            buf.extend_from_slice(&id.to_le_bytes());
            buf.extend_from_slice(&payload);
            buf_last = id;
            in_buf += 1;
        }
        self.flush(inner, &mut buf, buf_last)?;
        *written += in_buf;
        if dropped > 0 {
            self.note_dropping(inner);
        } else if inner.dropping
            && inner.total_bytes < self.cap / 2
            && inner.dropped_at.elapsed() >= QUIET
        {
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
        if inner.segments.back().is_some_and(|s| s.bytes == 0) {
            // Begun and never written to (a full disk): begun again under the next id.
            if let Some(s) = inner.segments.pop_back() {
                let _ = fs::remove_file(&s.path);
            }
        }
        let path = self.dir.join(seg_name(first));
        let file = create_private(&path)?;
        sync_dir(&self.dir)?;
        inner.segments.push_back(Segment {
            first_id: first,
            last_id: first - 1,
            gaps: Vec::new(),
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
        inner.read_pos = None;
        Ok(s.unacked(inner.acked))
    }

    /// Frees at least `need` bytes from the sealed segments, in the order [`evict::choose`]
    /// gives (repeats up to a quarter of the cap or of what the spool holds, the smaller, so
    /// the spool is reread seldom); where there is nothing to choose, the oldest segment goes
    /// whole. The dropped total grows by what went, and is
    /// synced. Returns how many unacknowledged records went.
    fn make_room(&self, inner: &mut Inner, need: u64) -> io::Result<u64> {
        let (candidates, sealed) = self.candidates(inner)?;
        let goal = (self.cap / 4).min(inner.total_bytes / 4);
        let victims = evict::choose(&candidates, need, goal);
        if victims.is_empty() {
            let n = self.drop_oldest(inner)?;
            self.count_dropped(inner, n)?;
            return Ok(n);
        }
        self.evict(inner, &victims, sealed)
    }

    /// Drops the records `victims` (ascending) from the first `sealed` segments, each segment
    /// holding some rewritten without them. Returns how many went; an error when none could.
    fn evict(&self, inner: &mut Inner, victims: &[u64], sealed: usize) -> io::Result<u64> {
        // The count first: a crash from here on counts records still there, never fewer.
        self.count_dropped(inner, victims.len() as u64)?;
        let mut failed = None;
        for s in inner.segments.iter_mut().take(sealed) {
            let lo = victims.partition_point(|&v| v < s.first_id);
            let hi = victims.partition_point(|&v| v <= s.last_id);
            if lo < hi {
                match rewrite_without(s, &victims[lo..hi], inner.acked, &self.dir) {
                    Ok(freed) => inner.total_bytes -= freed,
                    Err(e) => {
                        failed = Some((lo, e));
                        break;
                    }
                }
            }
        }
        self.forget_emptied(inner, sealed)?;
        let Some((lo, e)) = failed else {
            return Ok(victims.len() as u64);
        };
        // The victims from the failed segment on are still there: the count says so again
        // (where even that cannot be written, it stays high, never low).
        let kept = (victims.len() - lo) as u64;
        inner.dropped -= kept;
        let _ = self.write_ack(inner, true);
        match lo {
            0 => Err(e),
            removed => Ok(removed as u64),
        }
    }

    /// The unacknowledged records of the sealed segments, as eviction candidates; and how
    /// many segments, from the oldest, are sealed (only those are touched).
    fn candidates(&self, inner: &Inner) -> io::Result<(Vec<evict::Candidate>, usize)> {
        let sealed = inner.segments.len() - usize::from(inner.active);
        let mut candidates = Vec::new();
        for s in inner.segments.iter().take(sealed) {
            records(s, |id, size, payload| {
                if id > inner.acked {
                    let d = Detection::decode(payload).unwrap_or_default();
                    candidates.push(evict::Candidate {
                        id,
                        bytes: size,
                        score: d.score,
                        group: evict::group_of(&d),
                    });
                }
            })?;
        }
        Ok((candidates, sealed))
    }

    /// Makes room on a disk with none left even for rewriting a segment, by cutting files
    /// short, which needs no room: from the newest sealed segment back, the run of repeats
    /// (never a first sighting) that ends each segment goes, until `need` bytes (and a quarter
    /// of the spool) are freed. The count follows the cut (writing it needs room).
    fn cut_room(&self, inner: &mut Inner, need: u64) -> io::Result<u64> {
        let goal = need.max((self.cap / 4).min(inner.total_bytes / 4));
        let sealed = inner.segments.len() - usize::from(inner.active);
        // Per sealed segment, its records (id, size, group); the first id of each group.
        let mut layout: Vec<Vec<(u64, u64, u64)>> = Vec::with_capacity(sealed);
        let mut first: HashMap<u64, u64> = HashMap::new();
        for s in inner.segments.iter().take(sealed) {
            let mut recs = Vec::new();
            records(s, |id, size, payload| {
                let group = evict::group_of(&Detection::decode(payload).unwrap_or_default());
                first.entry(group).or_insert(id);
                recs.push((id, size, group));
            })?;
            layout.push(recs);
        }
        let (mut freed, mut cut) = (0u64, 0u64);
        for (s, recs) in inner.segments.iter_mut().zip(&layout).rev() {
            if freed >= goal {
                break;
            }
            let repeat = |&(id, _, group): &(u64, u64, u64)| {
                id <= inner.acked || first.get(&group) != Some(&id)
            };
            let keep = recs.len() - recs.iter().rev().take_while(|r| repeat(r)).count();
            let keep_to: u64 = recs[..keep].iter().map(|r| r.1).sum();
            if keep_to == s.bytes {
                continue;
            }
            if keep_to == 0 {
                fs::remove_file(&s.path).map_err(|e| ctx(&s.path, e))?;
            } else {
                s.file
                    .set_len(keep_to)
                    .and_then(|()| s.file.sync_data())
                    .map_err(|e| ctx(&s.path, e))?;
            }
            cut += recs[keep..].iter().filter(|r| r.0 > inner.acked).count() as u64;
            freed += s.bytes - keep_to;
            inner.total_bytes -= s.bytes - keep_to;
            s.bytes = keep_to;
            s.last_id = keep.checked_sub(1).map_or(s.first_id - 1, |k| recs[k].0);
            s.gaps.retain(|&(a, _)| a <= s.last_id);
        }
        self.forget_emptied(inner, sealed)?;
        if cut > 0 {
            self.count_dropped(inner, cut)?;
        }
        Ok(cut)
    }

    /// Forgets the sealed segments left empty: by a rewrite or a cut (their files are gone), or
    /// begun on a full disk and never written (their empty files go now).
    fn forget_emptied(&self, inner: &mut Inner, sealed: usize) -> io::Result<()> {
        let before = inner.segments.len();
        let mut position = 0;
        inner.segments.retain(|s| {
            position += 1;
            let keep = position > sealed || s.bytes > 0;
            if !keep {
                let _ = fs::remove_file(&s.path);
            }
            keep
        });
        inner.read_pos = None;
        if inner.segments.len() < before {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Adds `n` to the dropped total and syncs it (in memory too only once it is on disk).
    fn count_dropped(&self, inner: &mut Inner, n: u64) -> io::Result<()> {
        inner.dropped += n;
        let written = self.write_ack(inner, true);
        if written.is_err() {
            inner.dropped -= n;
        }
        written
    }

    /// Logs the first drop of an episode of fullness.
    fn note_dropping(&self, inner: &mut Inner) {
        inner.dropped_at = Instant::now();
        if !inner.dropping {
            warn!(
                cap_bytes = self.cap,
                "spool full: dropping undelivered detections, repeats of one rule and the lowest scores first (counted)"
            );
            inner.dropping = true;
        }
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
                let (len, _, rid) = parse_header(&head);
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

    /// Writes the ack state into the slot of the ack file not holding the last one, in place
    /// (no new file, no rename: an ack costs one small write, not an inode).
    fn write_ack(&self, inner: &mut Inner, sync: bool) -> io::Result<()> {
        let path = self.dir.join("ack");
        let body = ack_slot(inner.acked, inner.dropped);
        let slot = inner.ack.slot;
        let file = match &inner.ack.file {
            Some(f) => f,
            None => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| ctx(&path, e))?;
                // Its directory entry is made durable once.
                sync_dir(&self.dir)?;
                inner.ack.file.insert(f)
            }
        };
        file.write_all_at(&body, slot * ACK_SLOT as u64)
            .map_err(|e| ctx(&path, e))?;
        if sync {
            file.sync_data().map_err(|e| ctx(&path, e))?;
        }
        inner.ack.slot = 1 - slot;
        Ok(())
    }

    /// Persists the ack state (at shutdown).
    pub fn sync(&self) -> io::Result<()> {
        let mut g = self.lock();
        self.write_ack(&mut g, true)
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

/// Calls `f(id, size, payload)` for every record of a segment (its good prefix), oldest first.
fn records(s: &Segment, mut f: impl FnMut(u64, u64, &[u8])) -> io::Result<()> {
    let mut r = io::BufReader::with_capacity(256 * 1024, &s.file);
    let mut off = 0u64;
    let mut payload = Vec::new();
    io::Seek::seek(&mut r, io::SeekFrom::Start(0)).map_err(|e| ctx(&s.path, e))?;
    while off + HEADER as u64 <= s.bytes {
        let mut head = [0u8; HEADER];
        r.read_exact(&mut head).map_err(|e| ctx(&s.path, e))?;
        let (n, _, id) = parse_header(&head);
        if n > MAX_RECORD {
            let e = io::Error::new(io::ErrorKind::InvalidData, "record length out of range");
            return Err(ctx(&s.path, e));
        }
        payload.resize(n, 0);
        r.read_exact(&mut payload).map_err(|e| ctx(&s.path, e))?;
        let size = (HEADER + n) as u64;
        f(id, size, &payload);
        off += size;
    }
    Ok(())
}

/// Rewrites a sealed segment without the records `victims` (ascending) and without the
/// records already acknowledged: a new file, synced, renamed over the old one. A segment left
/// with nothing is deleted (its `bytes` become 0). Returns the bytes freed.
fn rewrite_without(s: &mut Segment, victims: &[u64], acked: u64, dir: &Path) -> io::Result<u64> {
    let mut kept = Vec::new();
    let mut last_kept = None;
    let mut gone = victims.iter().peekable();
    records(s, |id, _, payload| {
        while gone.next_if(|&&v| v < id).is_some() {}
        if gone.next_if(|&&v| v == id).is_some() || id <= acked {
            return;
        }
        kept.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        kept.extend_from_slice(&crc(id, payload).to_le_bytes());
        kept.extend_from_slice(&id.to_le_bytes());
        kept.extend_from_slice(payload);
        last_kept = Some(id);
    })?;
    let before = s.bytes;
    let Some(last) = last_kept else {
        fs::remove_file(&s.path).map_err(|e| ctx(&s.path, e))?;
        s.bytes = 0;
        return Ok(before);
    };
    let tmp = dir.join(format!("{}.tmp", seg_name(s.first_id)));
    let file = create_private(&tmp)?;
    let written = file.write_all_at(&kept, 0).and_then(|()| file.sync_data());
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(ctx(&tmp, e));
    }
    fs::rename(&tmp, &s.path).map_err(|e| ctx(&s.path, e))?;
    for &v in victims {
        match s.gaps.last_mut() {
            Some((_, end)) if *end + 1 == v => *end = v,
            _ => s.gaps.push((v, v)),
        }
    }
    s.gaps.sort_unstable();
    s.file = file;
    s.bytes = kept.len() as u64;
    s.last_id = s.last_id.max(last);
    Ok(before - s.bytes)
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
    let ((acked, dropped_total), _) = read_ack(&dir.join("ack"));
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
        let checked = check_segment(&file, first).map_err(|e| ctx(&path, e))?;
        out.segments += 1;
        out.bytes += len;
        if checked.damage.is_some() {
            out.damaged_segments += 1;
            out.damaged_bytes += len - checked.good;
        }
        let seg = Segment {
            first_id: first,
            last_id: checked.last_id,
            gaps: checked.gaps,
            bytes: checked.good,
            path,
            file,
        };
        out.pending += seg.unacked(acked);
    }
    Ok(out)
}

/// Whether an error says the disk (or the user's quota on it) is full.
fn disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Removes what a crash can leave half-made: temporary copies of segments (and the ack file's
/// of earlier versions, which replaced it whole); the files they were to replace are whole.
fn remove_leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().ends_with(".tmp") {
            let _ = fs::remove_file(e.path());
        }
    }
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

/// Bytes of one slot of the ack file: acknowledged-up-to id, dropped total, CRC-32 of both.
const ACK_SLOT: usize = 20;

/// The ack file, kept open: two slots written in turn, so a write cut short (a power cut)
/// spoils only the slot it was writing, and the other holds the state before it.
struct AckFile {
    file: Option<File>,
    /// The slot the next write goes to.
    slot: u64,
}

fn ack_slot(acked: u64, dropped: u64) -> [u8; ACK_SLOT] {
    let mut body = [0u8; ACK_SLOT];
    body[..8].copy_from_slice(&acked.to_le_bytes());
    body[8..16].copy_from_slice(&dropped.to_le_bytes());
    let sum = crc32fast::hash(&body[..16]);
    body[16..].copy_from_slice(&sum.to_le_bytes());
    body
}

/// One slot's state, if its checksum holds.
fn read_slot(body: &[u8]) -> Option<(u64, u64)> {
    let sum = u32::from_le_bytes(body.get(16..20)?.try_into().ok()?);
    if crc32fast::hash(body.get(..16)?) != sum {
        return None;
    }
    let acked = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let dropped = u64::from_le_bytes(body.get(8..16)?.try_into().ok()?);
    Some((acked, dropped))
}

/// Reads the ack file: the acknowledged-up-to id and the dropped total, and the slot to write
/// next. A missing or damaged file means nothing was acknowledged. Of two intact slots the
/// higher is the newer (the id only grows; the dropped total grows, but for a count taken back
/// after a failed rewrite, where reading the higher keeps the count high, never low).
fn read_ack(path: &Path) -> ((u64, u64), u64) {
    let mut body = Vec::new();
    match File::open(path).and_then(|mut f| f.read_to_end(&mut body)) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return ((0, 0), 0),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the spool ack file; resending everything spooled");
            return ((0, 0), 0);
        }
    }
    // One slot: the file as versions before slots wrote it.
    if body.len() == ACK_SLOT || body.len() == 2 * ACK_SLOT {
        let newest = body
            .chunks(ACK_SLOT)
            .zip(0u64..)
            .filter_map(|(b, i)| Some((i, read_slot(b)?)))
            .max_by_key(|(_, state)| *state);
        if let Some((i, state)) = newest {
            return (state, 1 - i);
        }
    }
    warn!(path = %path.display(), "damaged spool ack file; resending everything spooled (the collector stores each detection once)");
    ((0, 0), 0)
}

/// What [`check_segment`] found.
struct Checked {
    /// The last good record's id (`first_id - 1` when there is none).
    last_id: u64,
    /// Bytes of good records.
    good: u64,
    /// Byte ranges of the good records, in order; more than one where damage lies between.
    spans: Vec<(u64, u64)>,
    /// Why some of the file is damage, if any is (the first reason found).
    damage: Option<&'static str>,
    /// Ids missing between the good records (evicted, or lost to damage), as inclusive ranges.
    gaps: Vec<(u64, u64)>,
}

/// Ids a record found past damage may be ahead of the last good one by: more than a segment
/// can hold.
const RESYNC_IDS: u64 = 1 << 22;

/// Checks every record of a segment. Past a damaged record it searches the rest of the file
/// for the next intact one (a header whose id follows and whose checksum holds), so that damage
/// in the middle costs only the records it touched.
fn check_segment(file: &File, first_id: u64) -> io::Result<Checked> {
    let len = file.metadata()?.len();
    let mut r = io::BufReader::with_capacity(256 * 1024, file);
    let mut out = Checked {
        last_id: first_id.saturating_sub(1),
        good: 0,
        spans: Vec::new(),
        damage: None,
        gaps: Vec::new(),
    };
    let mut off = 0u64;
    let mut payload = Vec::new();
    while off < len {
        let mut head = [0u8; HEADER];
        let read = if len - off < HEADER as u64 {
            Err("torn record header")
        } else {
            r.read_exact(&mut head)?;
            let (n, _, _) = parse_header(&head);
            if n > MAX_RECORD {
                Err("record length out of range")
            } else if len - off - (HEADER as u64) < n as u64 {
                Err("torn record payload")
            } else {
                payload.resize(n, 0);
                r.read_exact(&mut payload)?;
                Ok(())
            }
        };
        let found = read.and_then(|()| record_at(&head, &payload, out.last_id, first_id));
        match found {
            Ok(id) => {
                out.accept(id, off, (HEADER + payload.len()) as u64);
                off += (HEADER + payload.len()) as u64;
            }
            Err(reason) => {
                out.damage.get_or_insert(reason);
                // The rest, in memory, to search for the next intact record; no more than a
                // segment can hold (anything past that is damage too).
                let most = MAX_SEGMENT + (HEADER + MAX_RECORD) as u64;
                let mut rest = vec![0u8; (len - off).min(most) as usize];
                file.read_exact_at(&mut rest, off)?;
                resync(&rest, off, first_id, &mut out);
                break;
            }
        }
    }
    Ok(out)
}

/// The id of the record with `head` and `payload`, when it is intact and follows `last`.
fn record_at(
    head: &[u8; HEADER],
    payload: &[u8],
    last: u64,
    first_id: u64,
) -> Result<u64, &'static str> {
    let (_, sum, id) = parse_header(head);
    if crc(id, payload) != sum {
        return Err("record checksum mismatch");
    }
    if id <= last || id < first_id {
        return Err("record id out of sequence");
    }
    Ok(id)
}

impl Checked {
    fn accept(&mut self, id: u64, off: u64, size: u64) {
        if id > self.last_id + 1 {
            self.gaps.push((self.last_id + 1, id - 1));
        }
        self.last_id = id;
        self.good += size;
        match self.spans.last_mut() {
            Some((_, end)) if *end == off => *end = off + size,
            _ => self.spans.push((off, off + size)),
        }
    }
}

/// Walks `rest` (the file from `base` on, starting at damage) for intact records: at each
/// position a header whose id follows the last good one (within [`RESYNC_IDS`]), whose length
/// fits, and whose checksum holds over id and payload.
fn resync(rest: &[u8], base: u64, first_id: u64, out: &mut Checked) {
    let mut at = 1usize;
    while at + HEADER <= rest.len() {
        let mut head = [0u8; HEADER];
        head.copy_from_slice(&rest[at..at + HEADER]);
        let (n, _, id) = parse_header(&head);
        let plausible = id > out.last_id
            && id - out.last_id <= RESYNC_IDS
            && n <= MAX_RECORD
            && at + HEADER + n <= rest.len();
        if plausible
            && let Ok(id) = record_at(
                &head,
                &rest[at + HEADER..at + HEADER + n],
                out.last_id,
                first_id,
            )
        {
            out.accept(id, base + at as u64, (HEADER + n) as u64);
            at += HEADER + n;
        } else {
            at += 1;
        }
    }
}

/// A record header's payload length, checksum and id.
fn parse_header(head: &[u8; HEADER]) -> (usize, u32, u64) {
    let n = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let sum = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let id = u64::from_le_bytes([
        head[8], head[9], head[10], head[11], head[12], head[13], head[14], head[15],
    ]);
    (n, sum, id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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
    fn the_ack_file_is_written_in_place_and_a_spoilt_slot_leaves_the_state_before() {
        let dir = tempfile::tempdir().unwrap();
        let ack = dir.path().join("ack");
        let (s, _) = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append(&(1..=10).map(det).collect::<Vec<_>>()).unwrap();
        s.ack(3).unwrap();
        let inode = || std::os::unix::fs::MetadataExt::ino(&fs::metadata(&ack).unwrap());
        let first = inode();
        s.ack(7).unwrap();
        s.ack(9).unwrap();
        assert_eq!(inode(), first, "written in place, not replaced");
        drop(s);
        assert_eq!(read_ack(&ack).0, (9, 0));
        // The slot holding 9 spoilt (a write cut short): the one before, 7, is read.
        let mut bytes = fs::read(&ack).unwrap();
        assert_eq!(bytes.len(), 2 * ACK_SLOT);
        let newest = if read_slot(&bytes[..ACK_SLOT]) == Some((9, 0)) {
            0
        } else {
            ACK_SLOT
        };
        bytes[newest + 3] ^= 0x40;
        fs::write(&ack, &bytes).unwrap();
        let (s, rec) = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((s.acked(), rec.pending), (7, 3));
        // The next write goes over the spoilt slot, and is read back.
        s.ack(10).unwrap();
        drop(s);
        assert_eq!(read_ack(&ack).0, (10, 0));
        // A file of one slot (as written before slots) is read; both slots spoilt: nothing
        // was acknowledged.
        fs::write(&ack, ack_slot(5, 2)).unwrap();
        assert_eq!(read_ack(&ack), ((5, 2), 1));
        fs::write(&ack, [0u8; 2 * ACK_SLOT - 1]).unwrap();
        assert_eq!(read_ack(&ack).0, (0, 0));
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

    /// splitmix64: a seeded stream of numbers for the damage below.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// Writes 300 records of varied sizes, overwrites a few ranges of the segment with
    /// garbage at random offsets, reopens, and checks that exactly the untouched records are
    /// read back, in order.
    fn garbage_costs_only_the_records_it_touches(seed: u64) {
        let mut rng = Rng(seed);
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path(), 64 << 20).unwrap();
        let n = 300u64;
        let records: Vec<Detection> = (1..=n)
            .map(|i| Detection {
                description: "d".repeat(rng.below(600) as usize),
                ..det(i)
            })
            .collect();
        s.append(&records).unwrap();
        drop(s);
        let seg = dir.path().join(seg_name(1));
        let mut data = fs::read(&seg).unwrap();
        // Each record's byte range, from its header.
        let mut ranges = Vec::new();
        let mut off = 0usize;
        while off < data.len() {
            let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap()) as usize;
            ranges.push(off..off + HEADER + len);
            off += HEADER + len;
        }
        assert_eq!(ranges.len() as u64, n);
        let original = data.clone();
        for _ in 0..1 + rng.below(6) {
            let at = rng.below(data.len() as u64) as usize;
            let len = (1 + rng.below(64) as usize).min(data.len() - at);
            for b in &mut data[at..at + len] {
                *b = rng.next() as u8;
            }
        }
        fs::write(&seg, &data).unwrap();
        let intact: Vec<String> = ranges
            .iter()
            .enumerate()
            .filter(|(_, r)| data[(*r).clone()] == original[(*r).clone()])
            .map(|(i, _)| format!("id-{}", i + 1))
            .collect();
        let (s, rec) = Spool::open(dir.path(), 64 << 20).unwrap();
        let got: Vec<String> = all(&s).into_iter().map(|d| d.id).collect();
        assert_eq!(got, intact, "seed {seed:#x}");
        assert_eq!(rec.pending, intact.len() as u64, "seed {seed:#x}");
        assert_eq!(
            rec.damaged_segments,
            u64::from(data != original),
            "seed {seed:#x}"
        );
        // What is left is clean: a second start finds no damage.
        drop(s);
        let (_, again) = Spool::open(dir.path(), 64 << 20).unwrap();
        assert_eq!(again.damaged_segments, 0, "seed {seed:#x}");
        assert_eq!(again.pending, intact.len() as u64, "seed {seed:#x}");
    }

    #[test]
    fn garbage_at_random_offsets_costs_only_the_records_it_touches() {
        // Fixed seeds first (add any seed that finds a bug), then one new seed per run.
        let fresh = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(7, |d| d.as_nanos() as u64);
        for seed in [1, 2, 3, 0xdead_beef, 0x5eed_0001, fresh] {
            eprintln!("spool damage seed {seed:#x}");
            garbage_costs_only_the_records_it_touches(seed);
        }
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
        // All are repeats of one rule at one score: the first stays, then the newest, in order.
        let mut expect = vec!["id-1".to_string()];
        expect.extend((dropped + 2..=n).map(|i| format!("id-{i}")));
        assert_eq!(got, expect);
        drop(s);
        let (s, rec) = Spool::open(dir.path(), MIN_CAP).unwrap();
        assert_eq!(s.dropped(), dropped, "the dropped total is persisted");
        assert_eq!(rec.pending, n - dropped, "gaps are read back as gaps");
        assert_eq!(rec.damaged_segments, 0);
    }

    fn scored(n: u64, rule: &str, score: u32) -> Detection {
        Detection {
            rule: rule.into(),
            score,
            description: "x".repeat(200),
            ..det(n)
        }
    }

    fn all(s: &Spool) -> Vec<Detection> {
        let mut got = Vec::new();
        let mut from = 1;
        while let Some(b) = s.read(from, 100, usize::MAX).unwrap() {
            from = b.last_id + 1;
            got.extend(b.detections);
        }
        got
    }

    #[test]
    fn a_flood_of_one_low_score_rule_does_not_evict_a_high_score_detection_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Spool::open(dir.path(), MIN_CAP).unwrap();
        s.append(&[scored(1, "webshell", 90), scored(2, "hacktool", 70)])
            .unwrap();
        let n = 3000u64;
        for chunk in (3..=n).collect::<Vec<_>>().chunks(25) {
            let flood: Vec<Detection> = chunk.iter().map(|&i| scored(i, "noise", 10)).collect();
            s.append(&flood).unwrap();
        }
        // Made after the flood began, and while it goes on.
        s.append(&[scored(n + 1, "miner", 80)]).unwrap();
        for i in n + 2..=n + 200 {
            s.append(&[scored(i, "noise", 10)]).unwrap();
        }
        let total = n + 200;
        assert!(s.bytes() <= MIN_CAP, "{} bytes", s.bytes());
        let dropped = s.dropped();
        assert!(dropped > total / 2, "only {dropped} dropped");
        let got = all(&s);
        assert_eq!(got.len() as u64 + dropped, total);
        let rules: Vec<&str> = got.iter().map(|d| d.rule.as_str()).collect();
        for kept in ["webshell", "hacktool", "miner"] {
            assert_eq!(
                rules.iter().filter(|r| **r == kept).count(),
                1,
                "{kept}: {rules:?}"
            );
        }
        assert_eq!(got[2].id, "id-3", "the flood's first sighting stays");
        // Ids still grow, so the collector's acks stay a prefix.
        assert!(got.windows(2).all(|w| {
            let id = |d: &Detection| d.id[3..].parse::<u64>().unwrap();
            id(&w[0]) < id(&w[1])
        }));
        // Acknowledging past the gaps empties the spool; reopening keeps the count.
        drop(s);
        let (s, rec) = Spool::open(dir.path(), MIN_CAP).unwrap();
        assert_eq!(rec.pending, total - dropped);
        assert_eq!(all(&s).len(), got.len());
        s.ack(total).unwrap();
        assert_eq!(s.pending(), 0);
        assert_eq!(s.dropped(), dropped);
    }

    /// A tmpfs mounted at a new directory (root only), unmounted on drop.
    struct Tmpfs(PathBuf);

    impl Tmpfs {
        fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
            fs::create_dir_all(at).unwrap();
            let mounted = std::process::Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0700"),
                    "tmpfs",
                ])
                .arg(at)
                .status()
                .is_ok_and(|s| s.success());
            if mounted {
                return Some(Tmpfs(at.to_owned()));
            }
            let required = std::env::var("VEDETTE_TEST_ROOT").as_deref() == Ok("required")
                || std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(
                !required,
                "this test needs root here: it mounts a small tmpfs"
            );
            eprintln!("SKIP: needs root: it mounts a small tmpfs");
            None
        }

        /// Fills what is left of the file system with one file.
        fn fill(&self) -> PathBuf {
            let path = self.0.join("filler");
            let mut f = File::create(&path).unwrap();
            let chunk = vec![0x5a_u8; 64 << 10];
            while f.write_all(&chunk).is_ok() {}
            while f.write_all(&[0u8; 512]).is_ok() {}
            path
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }

    #[test]
    fn on_a_full_disk_a_flood_of_repeats_is_refused_before_an_earlier_first_sighting_goes() {
        let dir = tempfile::tempdir().unwrap();
        let Some(disk) = Tmpfs::mount(&dir.path().join("disk"), "1m") else {
            return;
        };
        let spool_dir = disk.0.join("spool");
        let (s, _) = Spool::open(&spool_dir, 1 << 20).unwrap();
        s.append(&[scored(1, "webshell", 90)]).unwrap();
        let filler = disk.fill();
        // The flood arrives as the writer gives it: groups of up to 1000, each tried until
        // nothing of it is left (spooled, or refused and counted); every try makes progress.
        let n = 3000u64;
        let mut spooled = 1;
        for chunk in (2..=n + 1).collect::<Vec<_>>().chunks(1000) {
            let mut group: Vec<Detection> = chunk.iter().map(|&i| scored(i, "noise", 10)).collect();
            let mut tries = 0;
            while !group.is_empty() {
                let before = group.len();
                let (appended, result) = s.append_from(&mut group);
                spooled += appended.spooled;
                assert_eq!(
                    before - group.len(),
                    (appended.spooled + appended.refused) as usize
                );
                tries += 1;
                assert!(
                    tries < 50,
                    "no progress on a full disk: {result:?}, {} left",
                    group.len()
                );
            }
        }
        let got = all(&s);
        let dropped = s.dropped();
        assert!(dropped > 0, "a full disk drops");
        assert_eq!(got.len() as u64 + dropped, n + 1, "kept + dropped = made");
        assert!(spooled >= got.len() as u64);
        let rules: Vec<&str> = got.iter().map(|d| d.rule.as_str()).collect();
        assert_eq!(rules.iter().filter(|r| **r == "webshell").count(), 1);
        assert_eq!(got[1].id, "id-2", "the flood's first sighting stays");
        // Room again: the count is on disk with the next ack, and reopening keeps it.
        fs::remove_file(filler).unwrap();
        s.append(&[scored(n + 2, "miner", 80)]).unwrap();
        s.sync().unwrap();
        drop(s);
        let (s, rec) = Spool::open(&spool_dir, 1 << 20).unwrap();
        assert_eq!(s.dropped(), dropped);
        assert_eq!(rec.pending, got.len() as u64 + 1);
        assert_eq!(rec.damaged_segments, 0);
        drop(s);
        drop(disk);
    }
}
