//! Benchmark: committed detections per second from N simulated agents, each enrolled with its
//! own certificate and streaming over its own mutual-TLS connection, into:
//! - one collector on SQLite;
//! - one collector on PostgreSQL;
//! - two collectors on one PostgreSQL database (agents split between them).
//!
//! All side by side in one run. Each agent sends `--batches` batches of `--batch` detections, one
//! batch in flight (the next is sent when the previous is acknowledged, and the collector
//! acknowledges only after its store committed). Reports detections/s and ack latency.
//!
//! ```text
//! cargo build --release --bins
//! VEDETTE_TEST_POSTGRES=postgres://root@127.0.0.1:5432/test \
//!     target/release/vedette-ingest --agents 100 --batches 50 --batch 100
//! ```
//! Without `VEDETTE_TEST_POSTGRES` only SQLite is measured.
//!
//! `--idle N` instead holds N simulated agents connected (each enrolled, each on its own
//! mutual-TLS stream, saying nothing after its Hello) to one collector on SQLite, and reports
//! the collector's resident memory before and with them (raise the open-file limit first):
//!
//! ```text
//! ulimit -n 65536; target/release/vedette-ingest --idle 10000
//! ```
//!
//! `--storm N` holds N simulated agents and one real agent (watching a directory, with a
//! marker rule) connected to one collector on SQLite, restarts the collector, and reports how
//! long until every agent is back (each reconnecting with the agent's own backoff: after the
//! k-th failed attempt in a row a random wait uniform between b/2 and b, b = min(0.5 s × 2^k,
//! 60 s)), the collector's peak resident memory and CPU while they come back, and the real
//! agent's detection latency (file written to detection stored) calm and during the storm:
//!
//! ```text
//! ulimit -n 65536; target/release/vedette-ingest --storm 10000
//! ```
//!
//! Against a collector of your own (to size one): give its address, its CA certificate and an
//! enrollment token for as many agents (`vedettectl token create --uses N`). The simulated
//! agents stay enrolled there: revoke them afterwards (`vedettectl agents list`, all named
//! `sim`). Its memory is for you to read on its host while the agents are held.
//!
//! ```text
//! target/release/vedette-ingest --collector collector.example:7443 --ca ca.crt \
//!     --token TOKEN --agents 100 --batches 50 --batch 100
//! target/release/vedette-ingest --collector collector.example:7443 --ca ca.crt \
//!     --token TOKEN --idle 10000 --hold 60
//! ```

use std::time::{Duration, Instant};

use vedette_ops::client::ClientTls;
use vedette_proto::v1::agent_message::Msg;
use vedette_proto::v1::collector_message::Msg as Down;
use vedette_proto::v1::{AgentMessage, Detection, DetectionBatch, FileTarget, detection};
use vedette_tests::storm::{Backoff, Fleet};
use vedette_tests::{
    Agent, AgentStream, Collector, PgDb, agent_stream, bench_arg as arg, cpu_ticks,
    enroll_simulated, enroll_simulated_at, percentile as pct, rss_of, rule_dir, wait_for,
};

/// How many different files the detections are of (so, alerts at most).
const ALERT_SUBJECTS: usize = 20_000;

/// A realistic file detection with a fresh id.
fn detection(agent: usize, n: usize) -> Detection {
    Detection {
        id: uuid::Uuid::new_v4().to_string(),
        kind: 2,
        rule: "5d41402abc4b2a76b9719d911017c592".into(),
        source: "iocs/hash-iocs.txt".into(),
        observed_at_ms: vedette_proto::now_ms(),
        score: 100,
        description: "Lazarus loader (sample hash list)".into(),
        bundle_version: 7,
        action: 0,
        retro: None,
        target: Some(detection::Target::File(FileTarget {
            path: format!("/srv/www/uploads/agent{agent}/file{n:08}.bin"),
            size: 48_213,
            // Files seen on many hosts and files seen once: up to ALERT_SUBJECTS alerts, each
            // spread over several agents.
            sha256: format!("{:064x}", (agent * 7_919 + n) % ALERT_SUBJECTS),
            md5: "5d41402abc4b2a76b9719d911017c592".into(),
            sha1: "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d".into(),
            ..Default::default()
        })),
        indicator: Some(vedette_proto::v1::IndicatorRef {
            source: "loki".into(),
            id: "hash-iocs.txt:17".into(),
            event: String::new(),
            origin: "bundle".into(),
        }),
        techniques: vec!["T1105".into()],
    }
}

/// Streams `batches` batches from one agent to `addr`; returns each batch's ack latency.
async fn stream(
    addr: String,
    tls: ClientTls,
    agent: usize,
    batches: usize,
    size: usize,
) -> Vec<Duration> {
    let (up, mut down) = agent_stream(&addr, &tls).await.expect("agent stream");
    let mut lat = Vec::with_capacity(batches);
    for b in 0..batches {
        let seq = b as u64 + 1;
        let detections = (0..size).map(|i| detection(agent, b * size + i)).collect();
        let sent = Instant::now();
        up.send(AgentMessage {
            msg: Some(Msg::Batch(DetectionBatch { seq, detections })),
        })
        .await
        .expect("send batch");
        loop {
            let m = down.message().await.expect("stream").expect("stream open");
            if let Some(Down::Ack(a)) = m.msg
                && a.seq == seq
            {
                break;
            }
        }
        lat.push(sent.elapsed());
    }
    lat
}

struct Setup {
    name: &'static str,
    collectors: Vec<Collector>,
    _db: Option<PgDb>,
    _tmp: tempfile::TempDir,
}

fn setup(name: &'static str, db: Option<PgDb>, two: bool) -> Setup {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("collector");
    let mut a = match &db {
        Some(db) => Collector::init_with_store(&dir, &db.url),
        None => Collector::init(&dir),
    };
    a.start();
    let mut collectors = vec![a];
    if two {
        let mut b = collectors[0].second("-b");
        b.start();
        collectors.push(b);
    }
    Setup {
        name,
        collectors,
        _db: db,
        _tmp: tmp,
    }
}

async fn measure(s: &Setup, agents: usize, batches: usize, size: usize) -> String {
    let first = &s.collectors[0];
    let token = first.token(&["--uses", &agents.to_string()]);
    let identities = enroll_simulated(first, &token, agents).await;
    let addrs: Vec<String> = s.collectors.iter().map(|c| c.addr.clone()).collect();
    stream_all(s.name, &addrs, identities, batches, size).await;
    newest_alerts(s.name, first)
}

/// How long `vedettectl alerts list --limit 100` takes (the median of 5, process start and
/// TLS handshake included) once everything is stored, and how many alerts there are: a row.
fn newest_alerts(name: &str, c: &Collector) -> String {
    let mut times = Vec::new();
    let mut shown = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let out = c.ctl_ok(&["alerts", "list", "--limit", "100", "--json"]);
        times.push(t.elapsed());
        shown = out.lines().count();
    }
    times.sort();
    let all = c.ctl_ok(&["alerts", "list", "--limit", "1000000", "--json"]);
    format!(
        "| {name} | {} | {shown} | {:.1} ms |",
        all.lines().count(),
        times[times.len() / 2].as_secs_f64() * 1e3
    )
}

/// Streams from every enrolled agent at once (agent i to `addrs[i % len]`) and prints a row.
async fn stream_all(
    name: &str,
    addrs: &[String],
    identities: Vec<(String, ClientTls)>,
    batches: usize,
    size: usize,
) {
    let agents = identities.len();
    let t = Instant::now();
    let mut runs = tokio::task::JoinSet::new();
    for (i, (_, tls)) in identities.into_iter().enumerate() {
        let addr = addrs[i % addrs.len()].clone();
        runs.spawn(stream(addr, tls, i, batches, size));
    }
    let mut lat: Vec<Duration> = runs.join_all().await.into_iter().flatten().collect();
    let elapsed = t.elapsed();
    lat.sort();
    let total = agents * batches * size;
    println!(
        "| {name} | {agents} | {total} | {:.2} s | {:.0} | {:.1} ms | {:.1} ms |",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
    );
}

/// Enrolls `n` simulated agents with the collector at `addr`, 500 at a time: thousands of
/// handshakes at once would overflow its listen backlog.
fn enroll_in_rounds(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    ca: &str,
    token: &str,
    n: usize,
) -> Vec<(String, ClientTls)> {
    let mut identities = Vec::with_capacity(n);
    while identities.len() < n {
        let round = (n - identities.len()).min(500);
        identities.extend(rt.block_on(enroll_simulated_at(addr, ca, token, round)));
    }
    identities
}

/// Opens an agent stream for each identity to `addr`, 256 handshakes at a time, and keeps them.
fn open_streams(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    identities: Vec<(String, ClientTls)>,
) -> Vec<AgentStream> {
    rt.block_on(async {
        let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
        let mut opens = tokio::task::JoinSet::new();
        for (_, tls) in identities {
            let (addr, limit) = (addr.to_string(), limit.clone());
            opens.spawn(async move {
                let _permit = limit.acquire_owned().await;
                agent_stream(&addr, &tls).await.expect("agent stream")
            });
        }
        opens.join_all().await
    })
}

/// The collector's `agents_connected` gauge, from its metrics endpoint.
fn connected(c: &Collector) -> Option<usize> {
    let (_, body) = vedette_tests::http_get(&c.metrics_addr, "/metrics").ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix("vedette_collector_agents_connected "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as usize)
}

/// A collector on SQLite with room for `n` agents and the benchmark's own requests, started.
fn roomy_collector(dir: &std::path::Path, n: usize) -> Collector {
    let mut c = Collector::init(dir);
    let toml = c.dir.join("collector.toml");
    let mut text = std::fs::read_to_string(&toml).expect("collector.toml");
    text.push_str(&format!(
        "\n[limits]\nmax_connections = {0}\nmax_unauthenticated_connections = {0}\n",
        n + 1_000
    ));
    std::fs::write(&toml, text).expect("collector.toml");
    c.start();
    c
}

/// Holds `n` idle agents connected and reports the collector's memory.
fn idle(n: usize) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let c = roomy_collector(&tmp.path().join("collector"), n);
    let pid = c.proc.as_ref().expect("collector running").child.id();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let token = c.token(&["--uses", &n.to_string()]);
    let t = Instant::now();
    let identities = enroll_in_rounds(&rt, &c.addr, &c.file("ca.crt"), &token, n);
    let enrolled = t.elapsed();
    let before = rss_of(pid);
    let t = Instant::now();
    let streams = open_streams(&rt, &c.addr, identities);
    vedette_tests::wait_for(
        Duration::from_secs(120),
        "every agent counted as connected",
        || (connected(&c) == Some(n)).then_some(()),
    );
    let opened = t.elapsed();
    // Let what connecting allocated settle, then sample.
    let rss = (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_secs(1));
            rss_of(pid)
        })
        .max()
        .unwrap_or(0);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "| idle agents | enrolled in | connected in | collector RSS before | with them | per agent |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {n} | {:.1} s | {:.1} s | {:.1} MiB | {:.1} MiB | {:.1} KiB |",
        enrolled.as_secs_f64(),
        opened.as_secs_f64(),
        mib(before),
        mib(rss),
        rss.saturating_sub(before) as f64 / 1024.0 / n.max(1) as f64
    );
    drop(streams);
    drop(rt);
}

const STORM_RULE: &str = "storm_marker";
const STORM_MARKER: &str = "VEDETTE-STORM-MARKER";

/// Writes a marker file into `watch` and returns how long until its detection was stored.
fn detection_latency(c: &Collector, watch: &std::path::Path, name: &str) -> Duration {
    let t = Instant::now();
    std::fs::write(watch.join(name), STORM_MARKER).expect("marker file");
    wait_for(
        Duration::from_secs(300),
        "the real agent's detection",
        || {
            c.detections()
                .iter()
                .any(|d| d["path"].as_str().unwrap_or("").ends_with(name))
                .then_some(())
        },
    );
    t.elapsed()
}

/// The collector's peak resident memory and CPU time (% of one core) from now until `done`.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
    started: Instant,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let ticks = cpu_ticks(pid);
            let mut peak = rss_of(pid);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                peak = peak.max(rss_of(pid));
            }
            (peak, cpu_ticks(pid) - ticks)
        });
        Sampler {
            stop,
            thread,
            started: Instant::now(),
        }
    }

    /// (peak RSS in bytes, CPU in % of one core).
    fn done(self) -> (u64, f64) {
        let elapsed = self.started.elapsed().as_secs_f64();
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (peak, ticks) = self.thread.join().expect("sampler");
        // USER_HZ on Linux is 100.
        (peak, ticks as f64 / 100.0 / elapsed * 100.0)
    }
}

/// Holds `n` simulated agents and a real one, restarts the collector, and reports the storm.
fn storm(n: usize) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut c = roomy_collector(&tmp.path().join("collector"), n);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let token = c.token(&["--uses", &n.to_string()]);
    let identities = enroll_in_rounds(&rt, &c.addr, &c.file("ca.crt"), &token, n);
    let rules = rule_dir(&tmp.path().join("rules"), STORM_RULE, STORM_MARKER);
    let (_agent, watch) = Agent::watching(&c, &tmp.path().join("real"), &rules);
    let t = Instant::now();
    let fleet = Fleet::start(&rt, &c.addr, identities, Backoff::AGENT);
    wait_for(Duration::from_secs(600), "every agent connected", || {
        (fleet.up() == n && connected(&c) == Some(n + 1)).then_some(())
    });
    let first = t.elapsed();
    let calm = detection_latency(&c, &watch, "calm.txt");
    let attempts = fleet.attempts();

    // From the stop signal: the agents lose their streams then.
    let t = Instant::now();
    c.stop();
    c.start();
    let pid = c.proc.as_ref().expect("collector running").child.id();
    let sampler = Sampler::start(pid);
    let during = detection_latency(&c, &watch, "storm.txt");
    let back = |f: &Fleet| {
        f.sims
            .iter()
            .all(|s| s.connections.load(std::sync::atomic::Ordering::Relaxed) >= 2)
    };
    wait_for(Duration::from_secs(600), "every agent back", || {
        (fleet.up() == n && back(&fleet) && connected(&c) == Some(n + 1)).then_some(())
    });
    let all_back = t.elapsed();
    let (peak, cpu) = sampler.done();
    let retries = fleet.attempts() - attempts;
    assert_eq!(fleet.running(), n, "a simulated agent gave up");
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "| agents | first connected in | restart to all back | attempts per agent | collector peak RSS | collector CPU (% of one core) | real agent's detection: calm | during the storm |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {n} + 1 real | {:.1} s | {:.1} s | {:.2} | {:.1} MiB | {:.0} % | {:.2} s | {:.2} s |",
        first.as_secs_f64(),
        all_back.as_secs_f64(),
        retries as f64 / n.max(1) as f64,
        mib(peak),
        cpu,
        calm.as_secs_f64(),
        during.as_secs_f64(),
    );
    drop(fleet);
    drop(rt);
}

/// Collectors and databases are made and dropped outside the runtime (their clients block).
/// The value after `name` on the command line.
fn text_arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

/// `--collector ADDR`: the detection or idle run against that collector.
fn remote(addr: &str) {
    let ca_path = text_arg("--ca").expect("--ca: the collector's CA certificate (ca.crt)");
    let ca = std::fs::read_to_string(&ca_path)
        .unwrap_or_else(|e| panic!("cannot read the CA certificate `{ca_path}`: {e}"));
    let token = text_arg("--token")
        .expect("--token: a token for as many agents (`vedettectl token create --uses N`)");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let idle_agents = arg("--idle", 0);
    if idle_agents > 0 {
        let t = Instant::now();
        let identities = enroll_in_rounds(&rt, addr, &ca, &token, idle_agents);
        let enrolled = t.elapsed();
        let t = Instant::now();
        let streams = open_streams(&rt, addr, identities);
        let hold = arg("--hold", 60);
        println!(
            "{idle_agents} agents enrolled in {:.1} s, connected in {:.1} s; holding them {hold} s: read the collector's RSS on its host now",
            enrolled.as_secs_f64(),
            t.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_secs(hold as u64));
        drop(streams);
        return;
    }
    let agents = arg("--agents", 100);
    let identities = enroll_in_rounds(&rt, addr, &ca, &token, agents);
    println!("| store | agents | detections | time | committed/s | ack p50 | ack p99 |");
    println!("|---|---|---|---|---|---|---|");
    rt.block_on(stream_all(
        &format!("collector at {addr}"),
        &[addr.to_string()],
        identities,
        arg("--batches", 50),
        arg("--batch", 100),
    ));
}

fn main() {
    if let Some(addr) = text_arg("--collector") {
        remote(&addr);
        return;
    }
    let idle_agents = arg("--idle", 0);
    if idle_agents > 0 {
        idle(idle_agents);
        return;
    }
    let storm_agents = arg("--storm", 0);
    if storm_agents > 0 {
        storm(storm_agents);
        return;
    }
    let agents = arg("--agents", 100);
    let batches = arg("--batches", 50);
    let size = arg("--batch", 100);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    println!("| store | agents | detections | time | committed/s | ack p50 | ack p99 |");
    println!("|---|---|---|---|---|---|---|");
    let mut setups = vec![setup("SQLite, 1 collector", None, false)];
    if let Some(db) = PgDb::create("ingest_one") {
        setups.push(setup("PostgreSQL, 1 collector", Some(db), false));
    }
    if let Some(db) = PgDb::create("ingest_two") {
        setups.push(setup("PostgreSQL, 2 collectors", Some(db), true));
    }
    let mut listings = Vec::new();
    for s in &setups {
        listings.push(rt.block_on(measure(s, agents, batches, size)));
    }
    println!();
    println!("| store | alerts | listed | newest 100 alerts (vedettectl) |");
    println!("|---|---|---|---|");
    for row in listings {
        println!("{row}");
    }
}
