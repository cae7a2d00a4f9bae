//! `vedette-agent run`: starts every stage, runs until the shutdown token fires, then drains.
//!
//! ```text
//! watch (inotify) ──paths──► scan pool (threads) ─┐
//! full scans (thread) ────────────────────────────┼─detections─► spool writer ─► spool (disk)
//! procmon (thread) ───────────────────────────────┘                                │
//!                                                      collector ◄── shipper (gRPC) ◄┘
//! ```
//! Every channel is bounded. One [`CancellationToken`] stops everything, in pipeline order: the
//! watcher stops queueing, the full-scan and process threads return, the pool finishes its
//! queue, the spool writer makes the last detections durable, and the shipper gets its drain
//! time to have them acknowledged; whatever is not acknowledged by then is sent after the next
//! start.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use vedette_engine::{FileScanner, ScanOptions};
use vedette_proto::client::ClientTls;
use vedette_proto::v1::{BundleStatus, Detection, RuleBundle};

use crate::config::EventSource;
use crate::config::Settings;
use crate::deliver::shipper::{BundleLink, ShipConfig, Shipper};
use crate::deliver::spool::Spool;
use crate::deliver::writer::{Spooled, write_spool};
use crate::detect::cache::ScanCache;
use crate::detect::execmon;
use crate::detect::fanotify::{FanTarget, FanWatch};
use crate::detect::full_scan::{FullScans, ScanPlan};
use crate::detect::memory::MemoryLimits;
use crate::detect::pool::ScanPool;
use crate::detect::prevent::{Guard, GuardTarget};
use crate::detect::procmon::ProcessJudge;
use crate::detect::walk::{WalkRules, exclusions};
use crate::detect::watch::{FileWatch, WatchTarget};
use crate::detect::{Ids, Incidents};
use crate::governor::governor;
use crate::rules::ActiveRules;
use crate::rules::compiler::ChildCompiler;
use crate::state::{Credentials, StateDir};
use crate::telemetry::{Counter, Counters};

/// Detections buffered between the scanning stages and the spool writer.
const DETECTION_QUEUE: usize = 1024;

/// How often resident memory is checked against `max_rss`.
const GOVERNOR_TICK: Duration = Duration::from_secs(1);

/// How often the result cache is saved while it changes.
const CACHE_SAVE_INTERVAL: Duration = Duration::from_secs(30);

/// How often the process monitor walks all of `/proc` while the process connector reports
/// execs (without it, every `process_interval`).
const PROCESS_WALK: Duration = Duration::from_secs(30);

/// Runs the agent until `shutdown` fires, then drains every stage.
pub async fn run(
    state: StateDir,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    crate::governor::tune_allocator();
    let creds = state.load()?;
    let cache_path = state.scan_cache();
    let cache = {
        let path = cache_path.clone();
        tokio::task::spawn_blocking(move || ScanCache::load(&path))
            .await
            .context("scan cache loading failed")?
    };
    let incidents = Incidents {
        ids: Ids::for_agent(&creds.enrollment.agent_id),
        cache: Arc::new(cache),
        execs: Arc::new(ScanCache::new()),
    };
    let watch_roots = canonical(&settings.watch, "watch")?;
    let scan_roots = canonical(&settings.scan_paths, "scan")?;
    let rules = load_rules(&state, &settings).await?;
    let counters = Arc::new(Counters::default());
    let spooled = open_spool(&state, &settings, &counters).await?;
    let (det_tx, det_rx) = mpsc::channel(DETECTION_QUEUE);
    counters.attach_detection_queue(&det_tx);
    counters.attach_rules(&rules);
    governor().set_limit(settings.max_rss, &counters);
    counters.set(
        Counter::CpuBudgetPercent,
        u64::from(settings.max_cpu_percent),
    );
    if let Some(addr) = settings.metrics_listen {
        let listener = vedette_proto::metrics::bind(addr)
            .await
            .map_err(anyhow::Error::msg)?;
        info!(address = %addr, "serving metrics at /metrics");
        tokio::spawn(vedette_proto::metrics::serve(
            listener,
            Arc::new(counters.registry()),
            shutdown.clone().cancelled_owned(),
        ));
    }
    let writer = {
        let (sp, counters) = (spooled.clone(), counters.clone());
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || write_spool(&sp, det_rx, &counters))?
    };
    let options = ScanOptions {
        max_file_size: settings.max_file_size,
        timeout: settings.scan_timeout,
    };
    let pool = ScanPool::start(
        settings.scan_workers,
        rules.current.clone(),
        options,
        det_tx.clone(),
        incidents.clone(),
        counters.clone(),
    )
    .context("cannot start scan workers")?;
    let walk = WalkRules {
        one_file_system: true,
        excludes: exclusions(&settings.exclude)?,
    };
    let events = Events::start(
        &settings,
        &watch_roots,
        &pool,
        walk.clone(),
        &counters,
        &shutdown,
    )?;
    let guard = settings.prevent.and_then(|policy| {
        let target = GuardTarget {
            rules: rules.current.clone(),
            options,
            policy,
            incidents: incidents.clone(),
            detections: det_tx.clone(),
            counters: counters.clone(),
        };
        start_prevention(&watch_roots, target)
    });
    let (shipper, applier) = start_delivery(
        &settings,
        creds,
        state.clone(),
        &rules,
        &spooled,
        &counters,
        &shutdown,
    );
    let background = Background {
        exec_covered: events.exec_devices(&watch_roots, &settings),
        rules: rules.clone(),
        incidents: incidents.clone(),
        cache_path: cache_path.clone(),
        det: det_tx,
        counters: counters.clone(),
        stop: shutdown.clone(),
        rt: Handle::current(),
    };
    let threads = background.start(&settings, scan_roots, walk, options)?;

    shutdown.cancelled().await;
    info!("stopping");
    let running = Running {
        guard,
        events,
        threads,
        pool,
        writer,
        shipper,
        applier,
    };
    running.drain(&spooled, &counters).await;
    let cache = incidents.cache.clone();
    let saved = tokio::task::spawn_blocking(move || cache.save_if_changed(&cache_path)).await;
    if let Ok(Err(e)) = saved {
        warn!(error = %e, "cannot save the scan cache; unchanged files will be scanned again (and their detections stored once)");
    }
    Ok(())
}

/// Starts the shipper and the bundle applier it hands offered bundles to.
fn start_delivery(
    settings: &Settings,
    creds: Credentials,
    state: StateDir,
    rules: &Arc<ActiveRules>,
    spooled: &Arc<Spooled>,
    counters: &Arc<Counters>,
    shutdown: &CancellationToken,
) -> (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>) {
    let (offers, offered) = watch::channel::<Option<RuleBundle>>(None);
    let (status_tx, statuses) = mpsc::channel::<BundleStatus>(8);
    let applier = tokio::spawn(crate::rules::applier::run(
        rules.clone(),
        offered,
        status_tx,
    ));
    let link = BundleLink {
        rules: rules.clone(),
        offers,
        statuses,
    };
    let shipper = Shipper::new(
        ship_config(settings, creds, state),
        spooled.clone(),
        link,
        counters.clone(),
    );
    let shipper = tokio::spawn(shipper.run(shutdown.clone()));
    (shipper, applier)
}

/// The source of file events. With fanotify, inotify still reports files renamed into the
/// trees (a file written outside them and moved in raises no fanotify event there).
enum Events {
    Fanotify(FanWatch, FileWatch),
    Inotify(FileWatch),
}

impl Events {
    /// fanotify when configured so or (`auto`) when the agent may use it; else inotify. Says
    /// once which, and why.
    fn start(
        settings: &Settings,
        roots: &[PathBuf],
        pool: &ScanPool,
        walk: WalkRules,
        counters: &Arc<Counters>,
        stop: &CancellationToken,
    ) -> anyhow::Result<Events> {
        let wanted = settings.event_source;
        if wanted == EventSource::Inotify {
            info!("file events from inotify (event_source = \"inotify\")");
        } else if !roots.is_empty() {
            let target = FanTarget {
                queue: pool.sender(),
                rules: walk.clone(),
                counters: counters.clone(),
                stop: stop.clone(),
                execs: settings.processes,
            };
            match FanWatch::start(roots, target) {
                Ok(w) => {
                    info!(execs = settings.processes, "file events from fanotify");
                    let renames = WatchTarget {
                        queue: pool.sender(),
                        rules: walk,
                        counters: counters.clone(),
                        stop: stop.clone(),
                        renames_only: true,
                    };
                    return Ok(Events::Fanotify(w, FileWatch::start(roots, renames)?));
                }
                Err(e) if wanted == EventSource::Auto => {
                    warn!(reason = %e, "fanotify unavailable; file events from inotify");
                }
                Err(e) => anyhow::bail!("event_source = \"fanotify\": {e}"),
            }
        }
        let target = WatchTarget {
            queue: pool.sender(),
            rules: walk,
            counters: counters.clone(),
            stop: stop.clone(),
            renames_only: false,
        };
        Ok(Events::Inotify(FileWatch::start(roots, target)?))
    }

    /// The devices whose execs fanotify reports (none with inotify).
    fn exec_devices(&self, roots: &[PathBuf], settings: &Settings) -> HashSet<u64> {
        match self {
            Events::Fanotify(..) if settings.processes => roots
                .iter()
                .filter_map(|r| std::fs::metadata(r).ok())
                .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
                .collect(),
            _ => HashSet::new(),
        }
    }

    fn stop(self) {
        match self {
            Events::Fanotify(w, renames) => {
                w.stop();
                renames.stop();
            }
            Events::Inotify(w) => w.stop(),
        }
    }
}

/// Prevention mode on the file systems of the watched paths; when it cannot start, the log
/// says loudly that nothing is blocked (detection goes on).
fn start_prevention(roots: &[PathBuf], target: GuardTarget) -> Option<Guard> {
    let policy = target.policy;
    if roots.is_empty() {
        error!("prevent = true, but no path is watched: no execution is held, nothing is blocked");
        return None;
    }
    match Guard::start(roots, target) {
        Ok(g) => {
            info!(
                min_score = policy.min_score,
                timeout_ms = policy.timeout.as_millis() as u64,
                "prevention on: executions on the watched file systems wait for a verdict"
            );
            Some(g)
        }
        Err(e) => {
            error!(reason = %e, "prevent = true, but executions cannot be held: nothing is blocked");
            None
        }
    }
}

/// The stages a running agent stops, in pipeline order.
struct Running {
    guard: Option<Guard>,
    events: Events,
    threads: Vec<JoinHandle<()>>,
    pool: ScanPool,
    writer: JoinHandle<()>,
    shipper: tokio::task::JoinHandle<()>,
    applier: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Called once the shutdown token fired.
    async fn drain(self, spooled: &Spooled, counters: &Counters) {
        // Held executions are allowed first: nothing waits on an agent that is going away.
        if let Some(g) = self.guard {
            g.stop();
        }
        self.events.stop();
        // The threads return, the workers finish what is queued, and their detections still
        // reach the spool before the writer ends.
        let (threads, pool, writer) = (self.threads, self.pool, self.writer);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
            pool.join();
            let _ = writer.join();
        })
        .await;
        let _ = self.shipper.await;
        self.applier.abort();
        if let Err(e) = spooled.spool.sync() {
            warn!(error = %e, "cannot save the spool's ack mark; some detections will be sent twice (stored once)");
        }
        info!(
            scanned = counters.get(Counter::FilesScanned),
            detections = counters.get(Counter::Detections),
            acked = counters.get(Counter::DetectionsAcked),
            pending = spooled.spool.pending(),
            "agent stopped"
        );
    }
}

/// Pinned keys, host-local rules and the last-good bundle, compiled off the async threads.
async fn load_rules(state: &StateDir, settings: &Settings) -> anyhow::Result<Arc<ActiveRules>> {
    let (state, local, keys, unsigned) = (
        state.clone(),
        settings.rules.clone(),
        settings.maintainer_keys.clone(),
        settings.insecure_allow_unsigned_bundles,
    );
    let rules = tokio::task::spawn_blocking(move || {
        let compiler = Arc::new(ChildCompiler::this_executable());
        ActiveRules::start(&state, local, &keys, unsigned, Some(compiler))
    })
    .await
    .context("rule loading failed")??;
    Ok(Arc::new(rules))
}

/// Opens (and recovers) the spool; its figures start the counters.
async fn open_spool(
    state: &StateDir,
    settings: &Settings,
    counters: &Counters,
) -> anyhow::Result<Arc<Spooled>> {
    let (dir, cap) = (state.spool(), settings.spool_max_bytes);
    let (spool, recovery) = tokio::task::spawn_blocking(move || Spool::open(&dir, cap))
        .await
        .context("spool recovery failed")?
        .context("cannot open the spool")?;
    counters.add(Counter::SpoolDamagedSegments, recovery.damaged_segments);
    counters.add(Counter::SpoolDamagedBytes, recovery.damaged_bytes);
    counters.set(Counter::SpoolPending, recovery.pending);
    Ok(Spooled::new(spool))
}

/// Absolute, resolved paths: detections then carry clean absolute paths.
fn canonical(paths: &[PathBuf], what: &str) -> anyhow::Result<Vec<PathBuf>> {
    paths
        .iter()
        .map(|p| {
            std::fs::canonicalize(p).with_context(|| format!("cannot {what} `{}`", p.display()))
        })
        .collect()
}

fn ship_config(settings: &Settings, creds: Credentials, state: StateDir) -> ShipConfig {
    let collectors = if settings.collectors.is_empty() {
        creds.enrollment.collectors.clone()
    } else {
        settings.collectors.clone()
    };
    info!(agent = %creds.enrollment.agent_id, collectors = ?collectors, "starting agent");
    ShipConfig {
        collectors,
        tls: ClientTls {
            ca_pem: creds.ca_pem,
            identity: Some((creds.cert_pem, creds.key_pem)),
        },
        heartbeat: settings.heartbeat,
        backoff_min: Duration::from_millis(500),
        backoff_max: settings.backoff_max,
        drain: Duration::from_secs(5),
        renew_in: Some(state),
    }
}

/// SIGUSR1 starts a full scan now (of the scan paths; unchanged files come from the cache).
async fn rescan_on_signal(rules: Arc<ActiveRules>, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
        warn!("cannot listen for SIGUSR1; forced rescans are unavailable");
        return;
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            got = usr1.recv() => {
                if got.is_none() {
                    return;
                }
                info!("SIGUSR1: full scan requested");
                rules.rescan.notify_one();
            }
        }
    }
}

/// What the full-scan, process and cache threads share.
struct Background {
    /// Devices whose execs fanotify reports (see [`ProcessJudge::with_exec_covered`]).
    exec_covered: HashSet<u64>,
    rules: Arc<ActiveRules>,
    incidents: Incidents,
    cache_path: PathBuf,
    det: mpsc::Sender<Detection>,
    counters: Arc<Counters>,
    stop: CancellationToken,
    /// To wait on the token and timers from plain threads.
    rt: Handle,
}

impl Background {
    fn start(
        self,
        settings: &Settings,
        scan_roots: Vec<PathBuf>,
        walk: WalkRules,
        options: ScanOptions,
    ) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let mut threads = Vec::new();
        let this = Arc::new(self);
        // Start-up ends with the first full scan and the first walk of the processes.
        let full_scan_at_start = !scan_roots.is_empty() && settings.scan_on_start;
        governor().expect_startup(u32::from(full_scan_at_start) + u32::from(settings.processes));
        if !scan_roots.is_empty() {
            let scans = FullScans {
                roots: scan_roots,
                plan: ScanPlan {
                    threads: settings.scan_workers,
                    walk,
                    max_cpu_percent: settings.max_cpu_percent,
                    scan: options,
                },
                on_start: settings.scan_on_start,
                interval: settings.scan_interval,
                incidents: this.incidents.clone(),
                cache_path: this.cache_path.clone(),
            };
            let b = this.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("full-scan".into())
                    .spawn(move || scans.run(&b.rules, &b.det, &b.counters, &b.stop, &b.rt))?,
            );
        }
        if settings.processes {
            let execs = match execmon::start(this.stop.clone(), this.counters.clone()) {
                Ok((rx, thread)) => {
                    info!("exec events from the process connector; processes also polled");
                    threads.push(thread);
                    Some(rx)
                }
                Err(e) => {
                    warn!(reason = %e, "no exec events; processes are polled only");
                    None
                }
            };
            let (b, interval, memory) = (
                this.clone(),
                settings.process_interval,
                settings.memory_scan,
            );
            threads.push(
                std::thread::Builder::new()
                    .name("procmon".into())
                    .spawn(move || b.watch_processes(interval, memory, options, execs))?,
            );
        }
        this.rt
            .spawn(rescan_on_signal(this.rules.clone(), this.stop.clone()));
        let b = this.clone();
        threads.push(
            std::thread::Builder::new()
                .name("cache-saver".into())
                .spawn(move || b.save_cache())?,
        );
        let b = this.clone();
        threads.push(
            std::thread::Builder::new()
                .name("governor".into())
                .spawn(move || {
                    while b.pause(GOVERNOR_TICK) {
                        governor().tick(&b.counters);
                    }
                })?,
        );
        Ok(threads)
    }

    /// Saves the result cache every [`CACHE_SAVE_INTERVAL`] while it changes, so that a crash
    /// loses at most that much (and what it loses is only scanned again).
    fn save_cache(&self) {
        while self.pause(CACHE_SAVE_INTERVAL) {
            if let Err(e) = self.incidents.cache.save_if_changed(&self.cache_path) {
                warn!(path = %self.cache_path.display(), error = %e, "cannot save the scan cache");
            }
        }
    }

    /// Sleeps up to `d`; false when shutdown came first.
    fn pause(&self, d: Duration) -> bool {
        self.rt.block_on(async {
            tokio::select! {
                () = self.stop.cancelled() => false,
                () = tokio::time::sleep(d) => true,
            }
        })
    }

    /// Judges each exec the process connector reports as it comes, polls connections every
    /// `interval`, and walks `/proc` for processes not judged yet: every `interval` without
    /// exec events, every [`PROCESS_WALK`] with them (and at once when the kernel dropped
    /// some). Each process is judged once per rule set (and again after an exec).
    fn watch_processes(
        &self,
        interval: Duration,
        memory: bool,
        options: ScanOptions,
        mut execs: Option<Receiver<u32>>,
    ) {
        let mut walked = false;
        loop {
            let current = self.rules.current.load_full();
            let mut judge = ProcessJudge::new(self.incidents.ids.clone())
                .with_exe_cache(self.incidents.execs.clone())
                .with_counters(self.counters.clone())
                .with_exec_covered(self.exec_covered.clone());
            if memory {
                judge = judge.with_memory(MemoryLimits::default());
            }
            let mut scanner = FileScanner::new(&current, options);
            let mut made = governor().generation();
            let mut next_poll = Instant::now();
            let mut next_walk = Instant::now();
            let mut lost = self.counters.get(Counter::ExecEventsLost);
            while Arc::ptr_eq(&self.rules.current.load(), &current) {
                if governor().release_due(&mut made, &self.counters) {
                    scanner.release();
                }
                let mut found = Vec::new();
                let now = Instant::now();
                if now >= next_poll {
                    // With exec events, the walk of /proc only catches what they cannot
                    // show: processes from before the agent, and events the kernel dropped.
                    let lost_now = self.counters.get(Counter::ExecEventsLost);
                    if execs.is_none() || now >= next_walk || lost_now != lost {
                        found = judge.new_processes(&mut scanner);
                        if !walked {
                            walked = true;
                            governor().startup_job_done();
                            info!(
                                took_ms = now.elapsed().as_millis() as u64,
                                detections = found.len(),
                                "first process walk finished"
                            );
                        }
                        lost = lost_now;
                        next_walk = Instant::now() + interval.max(PROCESS_WALK);
                    }
                    found.extend(judge.c2_connections(&current));
                    next_poll = Instant::now() + interval;
                }
                for d in found {
                    self.counters.inc(Counter::Detections);
                    if self.det.blocking_send(d).is_err() {
                        return;
                    }
                }
                let Some(rx) = &execs else {
                    if !self.pause(interval) {
                        return;
                    }
                    continue;
                };
                match rx.recv_timeout(next_poll.saturating_duration_since(Instant::now())) {
                    Ok(pid) => {
                        let more = std::iter::from_fn(|| rx.try_recv().ok());
                        for pid in std::iter::once(pid).chain(more.take(255)) {
                            for d in judge.exec(pid, &mut scanner) {
                                self.counters.inc(Counter::Detections);
                                if self.det.blocking_send(d).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    // The listener stops with the agent (or on an error it logged).
                    Err(RecvTimeoutError::Disconnected) => execs = None,
                }
                if self.stop.is_cancelled() {
                    return;
                }
            }
        }
    }
}
