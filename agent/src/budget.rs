//! The CPU budget of all scanning work together: full scans (scheduled, and the rescan after a
//! new bundle) and the rule compiler child. `max_cpu_percent` is a share of one core for all
//! of it, as users read a cap: two scan threads and a compile at 25 % use 25 % of one core
//! between them, not 25 % each.
//!
//! The budget is a bucket of CPU time that fills at the cap's rate with wall time, holding at
//! most [`BURST`] of it. Each piece of work is charged the CPU time it used (the thread's own
//! clock, or the child's); when the bucket is below empty, the worker pauses until it has
//! filled back to empty. So over any 10-second window the work uses the cap, give or take one
//! burst. Real-time work (the file watcher, exec events, DNS) is never charged: its latency does
//! not wait for a scan's budget. A lower priority (the unit's `Nice=`) is not a cap; the unit's
//! `CPUQuota=` stays a hard backstop above it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Most CPU time the bucket holds, as wall time at the cap's rate: work after an idle spell
/// may run this long at full speed.
const BURST: Duration = Duration::from_millis(500);
/// The longest single pause (a huge charge is paid in several).
const MAX_PAUSE: Duration = Duration::from_secs(5);
/// Seconds the used-CPU gauge averages over.
const WINDOW: usize = 10;

/// The agent's one budget.
pub fn budget() -> &'static CpuBudget {
    static BUDGET: CpuBudget = CpuBudget::new();
    &BUDGET
}

pub struct CpuBudget {
    /// The cap, percent of one core; 100: none.
    percent: AtomicU32,
    bucket: Mutex<Bucket>,
    /// CPU time charged since the start, ns.
    charged: AtomicU64,
    /// `charged` at each of the last [`WINDOW`] + 1 samples (one a second).
    samples: Mutex<Vec<u64>>,
}

struct Bucket {
    /// CPU time that may still be used, ns (negative: owed).
    tokens: i64,
    at: Option<Instant>,
}

impl CpuBudget {
    const fn new() -> CpuBudget {
        CpuBudget {
            percent: AtomicU32::new(100),
            bucket: Mutex::new(Bucket {
                tokens: 0,
                at: None,
            }),
            charged: AtomicU64::new(0),
            samples: Mutex::new(Vec::new()),
        }
    }

    /// Sets the cap (1-100 % of one core; 100: none).
    pub fn set_percent(&self, percent: u32) {
        self.percent.store(percent.clamp(1, 100), Ordering::Relaxed);
    }

    pub fn percent(&self) -> u32 {
        self.percent.load(Ordering::Relaxed)
    }

    /// Charges `used` CPU time to the budget; how long the worker that used it must pause
    /// before its next piece of work (zero within the budget).
    pub fn charge(&self, used: Duration) -> Duration {
        let used_ns = i64::try_from(used.as_nanos()).unwrap_or(i64::MAX);
        self.charged
            .fetch_add(used_ns.unsigned_abs(), Ordering::Relaxed);
        let percent = self.percent();
        if percent >= 100 {
            return Duration::ZERO;
        }
        let rate = f64::from(percent) / 100.0;
        let now = Instant::now();
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let full = (BURST.as_nanos() as f64 * rate) as i64;
        let earned = b.at.map_or(full, |at| {
            (now.duration_since(at).as_nanos() as f64 * rate) as i64
        });
        b.tokens = b.tokens.saturating_add(earned).min(full);
        b.at = Some(now);
        b.tokens = b.tokens.saturating_sub(used_ns);
        if b.tokens >= 0 {
            return Duration::ZERO;
        }
        // Until the bucket is back to empty, at the rate it fills.
        let wait = Duration::from_nanos(((-b.tokens) as f64 / rate) as u64);
        wait.min(MAX_PAUSE)
    }

    /// One sample a second: the CPU share the budgeted work used over the last 10 seconds
    /// (or since the first sample), percent of one core.
    pub fn sample(&self) -> u64 {
        let now = self.charged.load(Ordering::Relaxed);
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.push(now);
        if s.len() > WINDOW + 1 {
            s.remove(0);
        }
        let seconds = (s.len() - 1).max(1) as u64;
        let first = s.first().copied().unwrap_or(now);
        (now - first) / seconds / 10_000_000
    }
}

/// The calling thread's CPU time.
pub fn thread_time() -> Duration {
    vedette_engine::thread_cpu()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_past_the_budget_pauses_until_it_is_paid() {
        let b = CpuBudget::new();
        assert_eq!(b.charge(Duration::from_secs(1)), Duration::ZERO, "no cap");
        b.set_percent(25);
        // A burst of 125 ms of CPU at 25 % is free; 100 ms more is owed: 400 ms of pause.
        assert_eq!(b.charge(Duration::from_millis(125)), Duration::ZERO);
        let pause = b.charge(Duration::from_millis(100));
        assert!(
            pause >= Duration::from_millis(390) && pause <= Duration::from_millis(410),
            "{pause:?}"
        );
        // Two workers charging at once share the budget: the second owes the first's debt too.
        let second = b.charge(Duration::from_millis(100));
        assert!(second > pause, "{second:?} after {pause:?}");
        assert!(b.charge(Duration::from_secs(60)) <= MAX_PAUSE);
    }

    #[test]
    fn the_gauge_averages_the_charged_time_over_the_samples() {
        let b = CpuBudget::new();
        assert_eq!(b.sample(), 0);
        b.charge(Duration::from_millis(500));
        // 500 ms over one second between the two samples: 50 %.
        assert_eq!(b.sample(), 50);
        b.charge(Duration::from_millis(100));
        assert_eq!(b.sample(), 30);
    }

    #[test]
    fn a_thread_clock_counts_this_thread_only() {
        let before = thread_time();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(thread_time() > before);
    }
}
