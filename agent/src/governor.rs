//! The agent's self-limits: a memory ceiling (`max_rss`) it enforces on itself, and giving
//! freed memory back to the system.
//!
//! Resident memory is sampled every second ([`Governor::tick`]). Past the ceiling the agent
//! sheds and slows down rather than grow until something kills it:
//! - every scanner (pool workers, full scans, process and verdict threads) releases its YARA
//!   scanner and read buffer after its current file;
//! - files are then scanned one at a time ([`Governor::paced`]), so at most one file's bytes
//!   and one scanner's memory are in use;
//! - the allocator's free memory is given back to the system.
//!
//! It leaves that state below 90 % of the ceiling. Nothing is dropped: files wait in the scan
//! queue (whose bound slows the watcher down) and detections wait in the spool. The rules in
//! force are not shed: a ceiling below what they need keeps the agent in the slow state, and
//! the heartbeat shows it (`memory_over_limit`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tracing::{info, warn};

use crate::telemetry::{Counter, Counters};

/// Memory growth since the last trim that triggers another one.
const TRIM_AFTER_GROWTH: u64 = 16 << 20;
/// Ticks between trims in any case: memory freed after a trim that came at a peak (a burst of
/// scans, the first judgement of every process) is otherwise kept until the next growth.
const TRIM_EVERY_TICKS: u64 = 10;

/// The process-wide governor (resident memory is the process's).
pub fn governor() -> &'static Governor {
    static GOVERNOR: Governor = Governor::new();
    &GOVERNOR
}

/// Shared by every thread that scans.
pub struct Governor {
    /// The ceiling in bytes; 0: none.
    limit: AtomicU64,
    over: AtomicBool,
    /// Bumped when scanners must be released; a scanner made before is released after its
    /// current file.
    generation: AtomicU64,
    /// Held while scanning one file when over the ceiling.
    serial: Mutex<()>,
    /// Someone freed a lot (a rule set replaced, idle scanners released): trim at the next tick.
    trim_wanted: AtomicBool,
    /// Resident memory after the last trim.
    trimmed_at: AtomicU64,
    /// Samples taken.
    ticks: AtomicU64,
}

/// What one sample changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Under the ceiling, or still over it.
    Stay,
    /// Just went over the ceiling.
    Over,
    /// Back under 90 % of it.
    Under,
}

/// The state change one sample of resident memory makes, with hysteresis.
pub fn step(over: bool, rss: u64, limit: u64) -> Step {
    if limit == 0 {
        return if over { Step::Under } else { Step::Stay };
    }
    if !over && rss > limit {
        Step::Over
    } else if over && rss < limit / 10 * 9 {
        Step::Under
    } else {
        Step::Stay
    }
}

impl Governor {
    const fn new() -> Governor {
        Governor {
            limit: AtomicU64::new(0),
            over: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            serial: Mutex::new(()),
            trim_wanted: AtomicBool::new(false),
            trimmed_at: AtomicU64::new(0),
            ticks: AtomicU64::new(0),
        }
    }

    /// Sets the ceiling (0: none) and shows it in the counters.
    pub fn set_limit(&self, bytes: u64, counters: &Counters) {
        self.limit.store(bytes, Ordering::Relaxed);
        counters.set(Counter::MemoryLimitBytes, bytes);
        counters.set(Counter::MemoryOverLimit, 0);
    }

    /// Whether the agent is over its ceiling.
    pub fn over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// The current generation: remember it when making a scanner.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Whether a scanner made at generation `made` must be released now; when it must, counts
    /// it and moves `made` to the current generation.
    pub fn release_due(&self, made: &mut u64, counters: &Counters) -> bool {
        let now = self.generation();
        if *made == now {
            return false;
        }
        *made = now;
        counters.inc(Counter::ScannersReleased);
        true
    }

    /// Runs one file's scan: at once under the ceiling, one at a time over it.
    pub fn paced<R>(&self, scan: impl FnOnce() -> R) -> R {
        if self.over() {
            let _one = self.serial.lock().unwrap_or_else(|p| p.into_inner());
            scan()
        } else {
            scan()
        }
    }

    /// Asks for the allocator's free memory to be given back at the next tick.
    pub fn want_trim(&self) {
        self.trim_wanted.store(true, Ordering::Relaxed);
    }

    /// One sample: resident memory against the ceiling. Called every second by the daemon.
    pub fn tick(&self, counters: &Counters) {
        let Some(rss) = crate::telemetry::resident_bytes() else {
            return;
        };
        counters.set(Counter::RssBytes, rss);
        let limit = self.limit.load(Ordering::Relaxed);
        let tick = self.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        let mut trim = self.trim_wanted.swap(false, Ordering::Relaxed)
            || rss > self.trimmed_at.load(Ordering::Relaxed) + TRIM_AFTER_GROWTH
            || tick.is_multiple_of(TRIM_EVERY_TICKS);
        match step(self.over(), rss, limit) {
            Step::Stay => {}
            Step::Over => {
                self.over.store(true, Ordering::Relaxed);
                self.generation.fetch_add(1, Ordering::Relaxed);
                counters.inc(Counter::MemoryLimitExceeded);
                counters.set(Counter::MemoryOverLimit, 1);
                warn!(
                    resident_mib = rss >> 20,
                    max_rss_mib = limit >> 20,
                    "over max_rss: releasing scanners, scanning one file at a time"
                );
                trim = true;
            }
            Step::Under => {
                self.over.store(false, Ordering::Relaxed);
                counters.set(Counter::MemoryOverLimit, 0);
                info!(
                    resident_mib = rss >> 20,
                    "back under max_rss: scanning at full speed"
                );
            }
        }
        if trim {
            release_free_memory();
            let after = crate::telemetry::resident_bytes().unwrap_or(rss);
            self.trimmed_at.store(after, Ordering::Relaxed);
            counters.set(Counter::RssBytes, after);
        }
    }
}

/// Buffers from this size up are mapped for themselves and unmapped when freed.
const MMAP_THRESHOLD: i32 = 8 << 20;
/// Free memory past this at the top of a heap is given back at once.
const TRIM_THRESHOLD: i32 = 2 << 20;

/// Fixes the allocator's thresholds for a long-running daemon. By default glibc raises both
/// after each large buffer is freed (up to 32 and 64 MiB): scanning one large file then
/// leaves tens of MiB free at the top of a thread's heap, which `malloc_trim` does not return
/// for heaps other than the main one.
#[allow(unsafe_code)]
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; it touches no allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Gives the allocator's free memory back to the system.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions: it returns the free pages of every glibc heap
    // to the system and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn over_the_ceiling_then_back_under_ninety_percent() {
        assert_eq!(step(false, 99 * MIB, 100 * MIB), Step::Stay);
        assert_eq!(step(false, 101 * MIB, 100 * MIB), Step::Over);
        assert_eq!(step(true, 120 * MIB, 100 * MIB), Step::Stay);
        // Hysteresis: under the ceiling is not enough.
        assert_eq!(step(true, 95 * MIB, 100 * MIB), Step::Stay);
        assert_eq!(step(true, 89 * MIB, 100 * MIB), Step::Under);
    }

    #[test]
    fn no_ceiling_never_sheds() {
        assert_eq!(step(false, u64::MAX, 0), Step::Stay);
        assert_eq!(step(true, 10, 0), Step::Under);
    }

    #[test]
    fn scanners_made_before_shedding_are_released_once() {
        let g = Governor::new();
        let counters = Counters::default();
        let mut made = g.generation();
        assert!(!g.release_due(&mut made, &counters));
        g.generation.fetch_add(1, Ordering::Relaxed);
        assert!(g.release_due(&mut made, &counters));
        assert!(!g.release_due(&mut made, &counters));
        assert_eq!(counters.get(Counter::ScannersReleased), 1);
    }

    #[test]
    fn a_tick_over_a_tiny_ceiling_sheds_and_counts() {
        let g = Governor::new();
        let counters = Counters::default();
        // Any process is over one byte.
        g.set_limit(1, &counters);
        let before = g.generation();
        g.tick(&counters);
        assert!(g.over());
        assert_eq!(g.generation(), before + 1);
        assert_eq!(counters.get(Counter::MemoryLimitExceeded), 1);
        assert_eq!(counters.get(Counter::MemoryOverLimit), 1);
        assert!(counters.get(Counter::RssBytes) > 0);
        // Still over: counted once.
        g.tick(&counters);
        assert_eq!(counters.get(Counter::MemoryLimitExceeded), 1);
        // paced still runs the scan while over.
        assert_eq!(g.paced(|| 7), 7);
        g.set_limit(0, &counters);
        g.tick(&counters);
        assert!(!g.over());
        assert_eq!(counters.get(Counter::MemoryOverLimit), 0);
    }
}
