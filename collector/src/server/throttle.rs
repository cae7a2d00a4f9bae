//! Per-agent rate limits: token buckets that delay, never drop. A message over an agent's
//! rate is handled later, so its Ack comes later; the agent keeps what is not yet acknowledged
//! in its spool, and HTTP/2 flow control stops it sending more while the stream is not read.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A token bucket that may go into debt: taking more than it holds is allowed, and the debt
/// is the wait before the next message is handled.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32, now: Instant) -> Bucket {
        Bucket {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            at: now,
        }
    }

    /// Takes `n` tokens; how long the caller must wait before going on.
    fn take(&mut self, n: f64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// The two buckets of one agent.
#[derive(Debug)]
struct AgentBuckets {
    detections: Bucket,
    messages: Bucket,
}

/// The limits, the buckets of every agent seen, and what throttling cost.
#[derive(Debug)]
pub struct Throttle {
    detections_per_second: u32,
    detections_burst: u32,
    messages_per_second: u32,
    agents: Mutex<HashMap<String, Arc<Mutex<AgentBuckets>>>>,
    /// Messages that were delayed, and the delay in all (exposed as metrics).
    pub delayed: Counter,
    pub delay_seconds: Counter<f64, AtomicU64>,
}

impl Throttle {
    pub fn new(
        detections_per_second: u32,
        detections_burst: u32,
        messages_per_second: u32,
    ) -> Self {
        Throttle {
            detections_per_second,
            detections_burst,
            messages_per_second,
            agents: Mutex::new(HashMap::new()),
            delayed: Counter::default(),
            delay_seconds: Counter::default(),
        }
    }

    /// How long to wait before handling a message from `agent` carrying `detections`. The
    /// buckets belong to the agent, not to its stream: reconnecting does not refill them.
    pub fn delay(&self, agent: &str, detections: usize) -> Duration {
        let now = Instant::now();
        let buckets = {
            let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
            agents
                .entry(agent.to_string())
                .or_insert_with(|| {
                    Arc::new(Mutex::new(AgentBuckets {
                        detections: Bucket::new(
                            self.detections_per_second,
                            self.detections_burst,
                            now,
                        ),
                        messages: Bucket::new(
                            self.messages_per_second,
                            self.messages_per_second.saturating_mul(5),
                            now,
                        ),
                    }))
                })
                .clone()
        };
        let mut b = buckets.lock().unwrap_or_else(|p| p.into_inner());
        let wait = b
            .messages
            .take(1.0, now)
            .max(b.detections.take(detections as f64, now));
        if !wait.is_zero() {
            self.delayed.inc();
            self.delay_seconds.inc_by(wait.as_secs_f64());
        }
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, 1000, t0);
        assert_eq!(b.take(1000.0, t0), Duration::ZERO);
        // 100 more right away: a second's worth of debt.
        let wait = b.take(100.0, t0);
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        // After that second, even.
        assert_eq!(b.take(0.0, t0 + Duration::from_secs(1)), Duration::ZERO);
        // Refills only up to the burst.
        assert_eq!(
            b.take(1000.0, t0 + Duration::from_secs(100)),
            Duration::ZERO
        );
        assert!(b.take(1.0, t0 + Duration::from_secs(100)) > Duration::ZERO);
    }

    #[test]
    fn agents_have_buckets_of_their_own() {
        let t = Throttle::new(10, 10, 1000);
        assert_eq!(t.delay("a", 10), Duration::ZERO);
        assert!(t.delay("a", 10) >= Duration::from_millis(900));
        assert_eq!(t.delay("b", 10), Duration::ZERO);
        assert_eq!(t.delayed.get(), 1);
    }
}
