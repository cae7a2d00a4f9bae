//! Which held exec prevention judges next, so that one user cannot keep the verdict threads
//! from everyone else, and which execs were let through without a verdict.
//!
//! - Small files (and files whose verdict is cached) go first, and one verdict thread takes
//!   nothing else: a flood of large executables never delays the judgement of a small one.
//! - Each user (the uid of the process asking) has at most [`PER_UID`] execs waiting or being
//!   judged; large ones are taken from the user served least recently.
//! - An exec that gets its answer without a verdict (its time ran out, or too many wait) is
//!   judged afterwards, from the late lane, and reported as `late` (or `blocked` when
//!   `prevent_on_timeout = "deny"` refused it). [`Unjudged`] tells the exec events of the scan
//!   pool to leave those to prevention, so each one is reported once.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Held execs waiting for a verdict thread, in all; past this an exec gets its answer without
/// a verdict at once.
pub(crate) const VERDICT_QUEUE: usize = 256;

/// Held execs of one user waiting or being judged; past this the user's next exec gets its
/// answer without a verdict at once.
pub(crate) const PER_UID: usize = 16;

/// Execs answered without a verdict and waiting to be judged afterwards; past this they are
/// left to the exec events (reported as alerts) and counted.
pub(crate) const LATE_QUEUE: usize = 1024;

/// Files up to this size are judged first.
pub(crate) const SMALL: u64 = 1 << 20;

/// One exec to judge.
pub(crate) struct Verdict {
    pub seq: u64,
    pub file: File,
    pub path: PathBuf,
    pub pid: u32,
    pub uid: u32,
    /// Judged quickly: a small file, or one whose verdict is cached.
    pub quick: bool,
    /// The answer it gets without a verdict: true to allow.
    pub fallback: bool,
    /// Device and inode of the executable.
    pub key: (u64, u64),
}

impl Verdict {
    /// Whether a fresh judgement of it can be long.
    fn is_large(&self) -> bool {
        !self.quick
    }
}

#[derive(Default)]
struct Lanes {
    small: VecDeque<Verdict>,
    large: VecDeque<Verdict>,
    late: VecDeque<Verdict>,
    /// Held execs per uid, waiting or being judged.
    per_uid: HashMap<u32, usize>,
    /// When each uid last had a large exec taken (a running count).
    turn: HashMap<u32, u64>,
    taken: u64,
    closed: bool,
}

impl Lanes {
    fn held(&self) -> usize {
        self.small.len() + self.large.len()
    }

    fn release(&mut self, uid: u32) {
        if let Some(n) = self.per_uid.get_mut(&uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_uid.remove(&uid);
            }
        }
    }

    /// The next job for a thread; `quick_only` for the thread that judges small files only.
    fn next(&mut self, quick_only: bool) -> Option<Taken> {
        if let Some(job) = self.small.pop_front() {
            return Some(Taken { job, held: true });
        }
        if quick_only {
            let i = self.late.iter().position(|j| j.quick)?;
            return self.late.remove(i).map(|job| Taken { job, held: false });
        }
        if !self.large.is_empty() {
            // The oldest exec of the user served least recently.
            let turn = &self.turn;
            let i = (0..self.large.len())
                .min_by_key(|&i| turn.get(&self.large[i].uid).copied().unwrap_or(0))
                .unwrap_or(0);
            let job = self.large.remove(i)?;
            self.taken += 1;
            self.turn.insert(job.uid, self.taken);
            return Some(Taken { job, held: true });
        }
        self.late.pop_front().map(|job| Taken { job, held: false })
    }
}

/// A job a verdict thread took; `held` when it came from a held lane (and counts against its
/// user until [`Queue::done`]).
pub(crate) struct Taken {
    pub job: Verdict,
    pub held: bool,
}

/// The lanes, shared by the reader and the verdict threads.
#[derive(Default)]
pub(crate) struct Queue {
    lanes: Mutex<Lanes>,
    ready: Condvar,
}

impl Queue {
    fn lanes(&self) -> std::sync::MutexGuard<'_, Lanes> {
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a held exec; gives it back when the queue, or its user's share, is full.
    pub(crate) fn push_held(&self, job: Verdict) -> Result<(), Verdict> {
        let mut l = self.lanes();
        let mine = l.per_uid.get(&job.uid).copied().unwrap_or(0);
        if l.closed || l.held() >= VERDICT_QUEUE || mine >= PER_UID {
            return Err(job);
        }
        *l.per_uid.entry(job.uid).or_default() += 1;
        if job.is_large() {
            l.large.push_back(job);
        } else {
            l.small.push_back(job);
        }
        drop(l);
        self.ready.notify_all();
        Ok(())
    }

    /// Takes held exec `seq` out of its lane (its time ran out before a thread took it).
    pub(crate) fn withdraw(&self, seq: u64) -> Option<Verdict> {
        let mut l = self.lanes();
        let job = match l.small.iter().position(|j| j.seq == seq) {
            Some(i) => l.small.remove(i),
            None => {
                let i = l.large.iter().position(|j| j.seq == seq)?;
                l.large.remove(i)
            }
        }?;
        l.release(job.uid);
        Some(job)
    }

    /// Queues an exec answered without a verdict, to be judged afterwards; false when full.
    pub(crate) fn push_late(&self, job: Verdict) -> bool {
        let mut l = self.lanes();
        if l.closed || l.late.len() >= LATE_QUEUE {
            return false;
        }
        l.late.push_back(job);
        drop(l);
        self.ready.notify_all();
        true
    }

    /// Waits for the next job; None once the queue is closed.
    pub(crate) fn take(&self, quick_only: bool) -> Option<Taken> {
        let mut l = self.lanes();
        loop {
            if l.closed {
                return None;
            }
            if let Some(t) = l.next(quick_only) {
                return Some(t);
            }
            l = self.ready.wait(l).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// A held job's judgement is over.
    pub(crate) fn done(&self, taken: &Taken) {
        if taken.held {
            self.lanes().release(taken.job.uid);
        }
    }

    /// Wakes the threads to return; nothing more is queued.
    pub(crate) fn close(&self) {
        let mut l = self.lanes();
        l.closed = true;
        l.small.clear();
        l.large.clear();
        l.late.clear();
        drop(l);
        self.ready.notify_all();
    }
}

/// How long an entry of [`Unjudged`] waits for its exec event.
const UNJUDGED_TTL: Duration = Duration::from_secs(120);

/// Most entries kept in [`Unjudged`].
const UNJUDGED_MAX: usize = 4096;

/// Execs that prevention let through without a verdict and judges afterwards, by pid, device
/// and inode: the scan pool's exec event for one of them is left to prevention.
#[derive(Default)]
pub(crate) struct Unjudged(Mutex<HashMap<(u32, u64, u64), Instant>>);

impl Unjudged {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(u32, u64, u64), Instant>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one; false when there is no room (the exec event then reports it too).
    pub(crate) fn insert(&self, pid: u32, key: (u64, u64)) -> bool {
        let mut m = self.map();
        if m.len() >= UNJUDGED_MAX {
            m.retain(|_, at| at.elapsed() < UNJUDGED_TTL);
        }
        if m.len() >= UNJUDGED_MAX {
            return false;
        }
        m.insert((pid, key.0, key.1), Instant::now());
        true
    }

    /// True (once) when the exec of `file` by `pid` is prevention's to report.
    pub(crate) fn take(&self, pid: u32, file: &File) -> bool {
        let Ok(meta) = file.metadata() else {
            return false;
        };
        let mut m = self.map();
        if m.is_empty() {
            return false;
        }
        m.remove(&(pid, meta.dev(), meta.ino()))
            .is_some_and(|at| at.elapsed() < UNJUDGED_TTL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(seq: u64, uid: u32, quick: bool) -> Verdict {
        Verdict {
            seq,
            file: File::open("/dev/null").unwrap(),
            path: PathBuf::from("/x"),
            pid: 1,
            uid,
            quick,
            fallback: true,
            key: (0, 0),
        }
    }

    #[test]
    fn small_files_go_first_and_the_quick_thread_takes_nothing_large() {
        let q = Queue::default();
        q.push_held(job(1, 1000, false)).ok().unwrap();
        q.push_held(job(2, 1000, true)).ok().unwrap();
        let t = q.take(true).unwrap();
        assert_eq!(t.job.seq, 2);
        q.done(&t);
        assert!(
            q.lanes().next(true).is_none(),
            "the large one is not for it"
        );
        assert_eq!(q.take(false).unwrap().job.seq, 1);
    }

    #[test]
    fn one_user_cannot_fill_the_queue_and_large_ones_are_taken_in_turn() {
        let q = Queue::default();
        for seq in 0..PER_UID as u64 {
            q.push_held(job(seq, 1000, false)).ok().unwrap();
        }
        let refused = q.push_held(job(99, 1000, false));
        assert_eq!(refused.err().map(|j| j.seq), Some(99));
        // Another user still gets in, and is taken before the flooder's second.
        q.push_held(job(100, 0, false)).ok().unwrap();
        let first = q.take(false).unwrap();
        assert_eq!(first.job.seq, 0);
        assert_eq!(q.take(false).unwrap().job.seq, 100);
        // Done (or withdrawn) execs give their user's room back.
        q.done(&first);
        q.push_held(job(101, 1000, false)).ok().unwrap();
        assert!(q.withdraw(101).is_some());
        q.push_held(job(102, 1000, false)).ok().unwrap();
    }

    #[test]
    fn late_jobs_wait_behind_held_ones_and_closing_wakes_the_threads() {
        let q = std::sync::Arc::new(Queue::default());
        assert!(q.push_late(job(1, 0, true)));
        q.push_held(job(2, 0, true)).ok().unwrap();
        assert_eq!(q.take(false).unwrap().job.seq, 2);
        let t = q.take(true).unwrap();
        assert!(!t.held);
        assert_eq!(t.job.seq, 1);
        let waiting = {
            let q = q.clone();
            std::thread::spawn(move || q.take(false).is_none())
        };
        q.close();
        assert!(waiting.join().unwrap());
        assert!(!q.push_late(job(3, 0, true)));
    }

    #[test]
    fn an_unjudged_exec_is_left_to_prevention_once() {
        let u = Unjudged::default();
        let f = File::open("/dev/null").unwrap();
        let m = f.metadata().unwrap();
        assert!(u.insert(7, (m.dev(), m.ino())));
        assert!(!u.take(8, &f), "another process");
        assert!(u.take(7, &f));
        assert!(!u.take(7, &f), "once");
    }
}
