//! Simulated agents that stay connected the way a real agent does: when their stream ends they
//! reconnect with the agent's backoff (after the k-th failed attempt in a row, a random wait
//! uniform between b/2 and b, b = min(`min` × 2^k, `max`)), never giving up. For reconnect
//! storms: a collector restarted under thousands of them, or one at its `max_connections`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use vedette_ops::client::ClientTls;

use crate::{SplitMix, agent_stream};

/// The agent's reconnection backoff.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The agent's own: from 0.5 s, doubling, up to `backoff_max` (default 60 s).
    pub const AGENT: Backoff = Backoff {
        min: Duration::from_millis(500),
        max: Duration::from_secs(60),
    };

    /// The wait after a backoff of `b`: uniform between b/2 and b.
    fn wait(b: Duration, rng: &mut SplitMix) -> Duration {
        let half = b.as_micros() as u64 / 2;
        Duration::from_micros(half + rng.below(half + 1))
    }
}

/// What one simulated agent has done so far.
#[derive(Debug, Default)]
pub struct Sim {
    /// Connection attempts, whatever came of them.
    pub attempts: AtomicUsize,
    /// Streams opened (Hello accepted).
    pub connections: AtomicUsize,
    /// Whether its stream is open now.
    pub up: AtomicBool,
}

/// A fleet of simulated agents, each holding a stream and reconnecting when it ends. Dropping
/// it stops them all (their streams close).
pub struct Fleet {
    pub sims: Vec<Arc<Sim>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Starts one reconnecting agent per identity against `addr`, at most 256 first handshakes
    /// at once (as an agent fleet started over minutes would), each with its own seed.
    pub fn start(
        rt: &tokio::runtime::Runtime,
        addr: &str,
        identities: Vec<(String, ClientTls)>,
        backoff: Backoff,
    ) -> Fleet {
        let first = Arc::new(tokio::sync::Semaphore::new(256));
        let mut tasks = Vec::new();
        let mut sims = Vec::with_capacity(identities.len());
        for (i, (_, tls)) in identities.into_iter().enumerate() {
            let sim = Arc::new(Sim::default());
            sims.push(sim.clone());
            let (addr, first) = (addr.to_string(), first.clone());
            tasks.push(rt.spawn(async move {
                let permit = first.acquire_owned().await;
                stay_connected(addr, tls, backoff, sim, i as u64, permit.ok()).await;
            }));
        }
        Fleet { sims, tasks }
    }

    /// How many have their stream open now.
    pub fn up(&self) -> usize {
        self.sims
            .iter()
            .filter(|s| s.up.load(Ordering::Relaxed))
            .count()
    }

    /// Connection attempts, all agents together.
    pub fn attempts(&self) -> usize {
        self.sims
            .iter()
            .map(|s| s.attempts.load(Ordering::Relaxed))
            .sum()
    }

    /// How many are still trying (none gave up): their tasks are still running.
    pub fn running(&self) -> usize {
        self.tasks.iter().filter(|t| !t.is_finished()).count()
    }

    /// Stops the first `n` agents: their streams close and they do not come back.
    pub fn stop_first(&mut self, n: usize) {
        let n = n.min(self.tasks.len());
        for t in self.tasks.drain(..n) {
            t.abort();
        }
        for s in self.sims.drain(..n) {
            s.up.store(false, Ordering::Relaxed);
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Holds a stream open; when it ends (or cannot be opened), waits the backoff and tries again,
/// forever.
async fn stay_connected(
    addr: String,
    tls: ClientTls,
    backoff: Backoff,
    sim: Arc<Sim>,
    seed: u64,
    mut first: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let mut rng = SplitMix(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5eed);
    let mut b = backoff.min;
    loop {
        sim.attempts.fetch_add(1, Ordering::Relaxed);
        if let Ok((up, mut down)) = agent_stream(&addr, &tls).await {
            first = None;
            sim.connections.fetch_add(1, Ordering::Relaxed);
            sim.up.store(true, Ordering::Relaxed);
            b = backoff.min;
            // Nothing to say: wait until the collector ends the stream.
            while let Ok(Some(_)) = down.message().await {}
            sim.up.store(false, Ordering::Relaxed);
            drop(up);
        }
        drop(first.take());
        tokio::time::sleep(Backoff::wait(b, &mut rng)).await;
        b = (b * 2).min(backoff.max);
    }
}
