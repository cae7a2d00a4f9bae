//! A TCP proxy that makes a bad link between an agent and a collector on loopback, where the
//! kernel's `netem` is not available: latency with jitter (order kept), a bandwidth cap,
//! connections cut at random moments, and a blackhole that accepts and then never answers.
//! Threads and blocking sockets; every decision comes from a seeded [`SplitMix`].

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::SplitMix;

/// What the link does.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Added to every chunk, each way.
    pub latency: Duration,
    /// Latency varies by up to this much either way (order is kept).
    pub jitter: Duration,
    /// Bytes per second, each way, per connection.
    pub bytes_per_second: u64,
    /// Chance that a connection is cut in any one second.
    pub cut_per_second: f64,
}

/// How often a pump looks at the cut and blackhole switches.
const TICK: Duration = Duration::from_millis(100);

struct Shared {
    target: String,
    faults: Faults,
    stop: AtomicBool,
    blackhole: AtomicBool,
    cuts: AtomicU64,
    connections: AtomicU64,
    rng: Mutex<SplitMix>,
}

impl Shared {
    fn chance(&self, p: f64) -> bool {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        (rng.below(1_000_000) as f64) < p * 1_000_000.0
    }

    fn latency(&self) -> Duration {
        let jitter = self.faults.jitter.as_millis() as u64;
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let ms = self.faults.latency.as_millis() as u64 + rng.below(2 * jitter + 1);
        Duration::from_millis(ms.saturating_sub(jitter))
    }
}

/// A running proxy; stopped when dropped.
pub struct FaultProxy {
    /// Where agents connect: `127.0.0.1:PORT`.
    pub addr: String,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `target` through `faults`.
    pub fn start(target: &str, faults: Faults, rng: SplitMix) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        listener.set_nonblocking(true).expect("non-blocking accept");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let shared = Arc::new(Shared {
            target: target.to_string(),
            faults,
            stop: AtomicBool::new(false),
            blackhole: AtomicBool::new(false),
            cuts: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            rng: Mutex::new(rng),
        });
        let s = shared.clone();
        std::thread::spawn(move || accept_loop(&listener, &s));
        FaultProxy { addr, shared }
    }

    /// Starts or ends the blackhole: connections are accepted, and nothing is forwarded either
    /// way until it ends (held, as TCP holds what a dead link did not carry).
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let s = shared.clone();
                std::thread::spawn(move || connect(client, &s));
            }
            Err(_) => std::thread::sleep(TICK / 10),
        }
    }
}

/// One connection: held while the blackhole lasts, then joined to the target by two pumps.
fn connect(client: TcpStream, shared: &Arc<Shared>) {
    let _ = client.set_nonblocking(false);
    // Accepted, never answered: a connection made in the blackhole stays silent and is closed
    // when it ends.
    if shared.blackhole.load(Ordering::SeqCst) {
        while shared.blackhole.load(Ordering::SeqCst) && !shared.stop.load(Ordering::SeqCst) {
            std::thread::sleep(TICK);
        }
        return;
    }
    let Ok(server) = TcpStream::connect(&shared.target) else {
        return;
    };
    let cut = Arc::new(AtomicBool::new(false));
    for (from, to) in [
        (client.try_clone(), server.try_clone()),
        (server.try_clone(), client.try_clone()),
    ] {
        let (Ok(from), Ok(to)) = (from, to) else {
            return;
        };
        let (s, c) = (shared.clone(), cut.clone());
        std::thread::spawn(move || pump(from, to, &s, &c));
    }
}

/// Chunks on their way, each with the moment it may be written.
type Queue = Arc<(Mutex<VecDeque<(Instant, Vec<u8>)>>, Condvar)>;

/// Reads one way, and hands chunks to a writer that delays them; cuts the connection now and
/// then; stops reading while the blackhole lasts.
fn pump(mut from: TcpStream, to: TcpStream, shared: &Arc<Shared>, cut: &Arc<AtomicBool>) {
    let _ = from.set_read_timeout(Some(TICK));
    let queue: Queue = Arc::new((Mutex::new(VecDeque::new()), Condvar::new()));
    let writer = {
        let (q, s, c) = (queue.clone(), shared.clone(), cut.clone());
        std::thread::spawn(move || deliver(to, &q, &s, &c))
    };
    let mut last_due = Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    let cut_per_tick = shared.faults.cut_per_second * TICK.as_secs_f64();
    while !cut.load(Ordering::SeqCst) && !shared.stop.load(Ordering::SeqCst) {
        if shared.chance(cut_per_tick) && !cut.swap(true, Ordering::SeqCst) {
            shared.cuts.fetch_add(1, Ordering::SeqCst);
            break;
        }
        if shared.blackhole.load(Ordering::SeqCst) {
            std::thread::sleep(TICK);
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                last_due = last_due.max(Instant::now() + shared.latency());
                let (q, ready) = &*queue;
                q.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_back((last_due, buf[..n].to_vec()));
                ready.notify_one();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    cut.store(true, Ordering::SeqCst);
    queue.1.notify_one();
    let _ = writer.join();
    let _ = from.shutdown(Shutdown::Both);
}

/// Writes queued chunks when they are due, no faster than the bandwidth cap.
fn deliver(mut to: TcpStream, queue: &Queue, shared: &Arc<Shared>, cut: &Arc<AtomicBool>) {
    let (q, ready) = &**queue;
    loop {
        let next = {
            let mut g = q.lock().unwrap_or_else(|p| p.into_inner());
            while g.is_empty() && !cut.load(Ordering::SeqCst) {
                g = ready
                    .wait_timeout(g, TICK)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            g.pop_front()
        };
        let Some((due, chunk)) = next else {
            break;
        };
        if cut.load(Ordering::SeqCst) {
            break;
        }
        // The delay is the fault being made, not a wait for anything.
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        if to.write_all(&chunk).is_err() {
            break;
        }
        let rate = shared.faults.bytes_per_second.max(1);
        std::thread::sleep(Duration::from_secs_f64(chunk.len() as f64 / rate as f64));
    }
    let _ = to.shutdown(Shutdown::Both);
}
