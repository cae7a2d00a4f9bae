//! `vedette-agent run`: starts every stage, runs until the shutdown token fires, then drains.
//!
//! ```text
//! fanotify | inotify ──files, execs──► scan pool (threads) ─┐
//! prevention (fanotify, held execs) ── verdict threads ──────┤
//! full scans (thread) ──────────────────────────────────────┼─detections─► spool writer ─► spool
//! process monitor (exec events, /proc walk) ────────────────┘                              │
//!                                                      collector ◄── shipper (gRPC) ◄──────┘
//! ```
//! Which event source runs is `detect::sources`; the process monitor's loop is
//! `detect::processes`.
//! Every channel is bounded. One [`CancellationToken`] stops everything, in pipeline order: the
//! watcher stops queueing, the full-scan and process threads return, the pool finishes its
//! queue, the spool writer makes the last detections durable, and the shipper gets its drain
//! time to have them acknowledged; whatever is not acknowledged by then is sent after the next
//! start.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vedette_engine::ScanOptions;
use vedette_ops::client::ClientTls;
use vedette_proto::v1::{BundleStatus, Detection, RuleBundle};

use crate::config::Config;
use crate::deliver::shipper::{BundleLink, ShipConfig, Shipper};
use crate::deliver::spool::Spool;
use crate::deliver::writer::{Spooled, write_spool};
use crate::detect::cache::ScanCache;
use crate::detect::dns::{DnsLinks, DnsWatch};
use crate::detect::dnscap::Capture;
use crate::detect::execmon;
use crate::detect::full_scan::{FullScans, ScanPlan};
use crate::detect::pool::ScanPool;
use crate::detect::prevent::{ExecGate, GateTarget};
use crate::detect::processes::ProcessWatch;
use crate::detect::sources::{Events, start_prevention};
use crate::detect::walk::{WalkRules, exclusions};
use crate::detect::{Ids, ReportFilter};
use crate::governor::governor;
use crate::history::History;
use crate::rules::ActiveRules;
use crate::state::{Credentials, StateDir};
use crate::telemetry::{Counter, Counters};
use vedette_engine::child::ChildCompiler;

/// Detections buffered between the scanning stages and the spool writer.
const DETECTION_QUEUE: usize = 1024;

/// How often resident memory is checked against `max_rss`.
const GOVERNOR_TICK: Duration = Duration::from_secs(1);

/// How often the result cache is saved while it changes.
const CACHE_SAVE_INTERVAL: Duration = Duration::from_secs(30);

/// Runs the agent until `shutdown` fires, then drains every stage.
pub async fn run(
    state: StateDir,
    settings: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    crate::governor::tune_allocator();
    let creds = state.load()?;
    let cache_path = state.scan_cache();
    let history = open_history(&state, &settings).await?;
    let reports = load_report_filter(&cache_path, &creds, history.clone()).await?;
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
    serve_metrics(&settings, &counters, &shutdown).await?;
    let writer = {
        let (sp, counters, rules) = (spooled.clone(), counters.clone(), rules.clone());
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || write_spool(&sp, det_rx, &counters, &rules))?
    };
    let options = ScanOptions {
        max_file_size: settings.max_file_size,
        timeout: settings.scan_timeout,
        all_digests: history.is_some(),
    };
    let shared = Shared {
        rules: rules.clone(),
        reports: reports.clone(),
        det: det_tx,
        counters: counters.clone(),
        stop: shutdown.clone(),
    };
    let (pool, events, gate, walk) = shared.start_on_access(&settings, &watch_roots, options)?;
    shared.answer_from_history();
    let (shipper, applier) = start_delivery(&settings, creds, state.clone(), &spooled, &shared);
    let background = Background {
        exec_covered: events.exec_devices(&watch_roots, &settings),
        shared,
        cache_path: cache_path.clone(),
        rt: Handle::current(),
    };
    let threads = background.start(&settings, scan_roots, walk, options)?;

    shutdown.cancelled().await;
    info!("stopping");
    let running = Running {
        gate,
        events,
        threads,
        pool,
        writer,
        shipper,
        applier,
    };
    running.drain(&spooled, &counters).await;
    save_at_exit(reports, cache_path).await;
    Ok(())
}

/// The history's last runs, then the result cache: what the cache says was read, the history
/// holds.
async fn save_at_exit(reports: ReportFilter, cache_path: PathBuf) {
    let saved = tokio::task::spawn_blocking(move || {
        if let Some(h) = &reports.history {
            h.flush_runs(true);
        }
        reports.cache.save_if_changed(&cache_path)
    })
    .await;
    if let Ok(Err(e)) = saved {
        warn!(error = %e, "cannot save the scan cache; unchanged files will be scanned again (and their detections stored once)");
    }
}

/// The result cache (loaded off the async threads) and the ids of this agent's detections.
async fn load_report_filter(
    cache_path: &std::path::Path,
    creds: &Credentials,
    history: Option<Arc<History>>,
) -> anyhow::Result<ReportFilter> {
    let path = cache_path.to_owned();
    let cache = tokio::task::spawn_blocking(move || ScanCache::load(&path))
        .await
        .context("scan cache loading failed")?;
    Ok(ReportFilter {
        ids: Ids::for_agent(&creds.enrollment.agent_id),
        cache: Arc::new(cache),
        execs: Arc::new(ScanCache::keeping_digests()),
        unjudged: Arc::default(),
        history,
    })
}

/// The history of what was read and run (`history_max_bytes`), opened off the async threads.
async fn open_history(state: &StateDir, settings: &Config) -> anyhow::Result<Option<Arc<History>>> {
    let Some(max) = settings.history_max_bytes else {
        return Ok(None);
    };
    let dir = state.history();
    let at = dir.clone();
    let (history, opened) = tokio::task::spawn_blocking(move || History::open(&at, max))
        .await
        .context("history opening failed")?
        .with_context(|| format!("cannot open the history in `{}`", dir.display()))?;
    if opened.cut > 0 {
        warn!(dir = %dir.display(), bytes = opened.cut, "the history's last record was torn (the agent was stopped while writing it); cut off");
    }
    info!(dir = %dir.display(), bytes = opened.bytes, max_bytes = max, "history open");
    Ok(Some(Arc::new(history)))
}

/// The metrics endpoint, when `metrics_listen` is set.
async fn serve_metrics(
    settings: &Config,
    counters: &Arc<Counters>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let Some(addr) = settings.metrics_listen else {
        return Ok(());
    };
    let listener = vedette_ops::metrics::bind(addr).await?;
    info!(address = %addr, "serving metrics at /metrics");
    tokio::spawn(vedette_ops::metrics::serve(
        listener,
        Arc::new(counters.registry()),
        shutdown.clone().cancelled_owned(),
    ));
    Ok(())
}

/// What every detecting stage works with.
#[derive(Clone)]
struct Shared {
    rules: Arc<ActiveRules>,
    reports: ReportFilter,
    det: mpsc::Sender<Detection>,
    counters: Arc<Counters>,
    stop: CancellationToken,
}

impl Shared {
    /// With a history: counts what it keeps, and answers changes of rules from it first.
    fn answer_from_history(&self) {
        let Some(h) = &self.reports.history else {
            return;
        };
        h.attach(self.counters.clone());
        let retro = crate::history::retro::Retro {
            history: h.clone(),
            reports: self.reports.clone(),
            det: self.det.downgrade(),
            counters: self.counters.clone(),
        };
        let hook: crate::rules::RulesChanged =
            Box::new(move |old, new| retro.rules_changed(old, new));
        let _ = self.rules.on_change.set(hook);
    }

    /// The scan pool, the event source feeding it, and prevention when `prevent` is set.
    fn start_on_access(
        &self,
        settings: &Config,
        roots: &[PathBuf],
        options: ScanOptions,
    ) -> anyhow::Result<(ScanPool, Events, Option<ExecGate>, WalkRules)> {
        let pool = ScanPool::start(
            settings.scan_workers,
            self.rules.current.clone(),
            options,
            self.det.clone(),
            self.reports.clone(),
            self.counters.clone(),
        )
        .context("cannot start scan workers")?;
        let walk = WalkRules {
            one_file_system: true,
            excludes: exclusions(&settings.exclude)?,
        };
        let events = Events::start(
            settings,
            roots,
            &pool,
            walk.clone(),
            &self.counters,
            &self.stop,
        )?;
        let gate = settings.prevent.and_then(|policy| {
            let target = GateTarget {
                rules: self.rules.current.clone(),
                options,
                policy,
                reports: self.reports.clone(),
                detections: self.det.clone(),
                counters: self.counters.clone(),
            };
            start_prevention(roots, target)
        });
        Ok((pool, events, gate, walk))
    }
}

/// Starts the shipper and the bundle applier it hands offered bundles to.
/// Hunts are answered from the history on a task of their own.
fn start_delivery(
    settings: &Config,
    creds: Credentials,
    state: StateDir,
    spooled: &Arc<Spooled>,
    shared: &Shared,
) -> (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>) {
    let (rules, counters) = (&shared.rules, &shared.counters);
    let (offers, offered) = watch::channel::<Option<RuleBundle>>(None);
    let (status_tx, statuses) = mpsc::channel::<BundleStatus>(8);
    let applier = tokio::spawn(crate::rules::applier::run(
        rules.clone(),
        offered,
        status_tx,
    ));
    let (hunts, requests) = mpsc::channel(8);
    let (answers_tx, answers) = mpsc::channel(8);
    tokio::spawn(crate::history::hunt::run(
        shared.reports.history.clone(),
        requests,
        answers_tx,
        counters.clone(),
    ));
    let cfg = ship_config(settings, creds, state.clone());
    let responder = crate::response::Responder::new(
        settings.response.clone(),
        &state.dir,
        cfg.collectors.clone(),
        settings.isolation_allow.clone(),
    );
    let (actions, requested) = mpsc::channel(8);
    let (results_tx, results) = mpsc::channel(8);
    tokio::spawn(crate::response::run(
        responder,
        requested,
        results_tx,
        shared.stop.clone(),
    ));
    let link = BundleLink {
        rules: rules.clone(),
        offers,
        statuses,
        hunts,
        answers,
        actions,
        results,
    };
    let shipper = Shipper::new(cfg, spooled.clone(), link, counters.clone());
    let shipper = tokio::spawn(shipper.run(shared.stop.clone()));
    (shipper, applier)
}

/// The stages a running agent stops, in pipeline order.
struct Running {
    gate: Option<ExecGate>,
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
        if let Some(g) = self.gate {
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
async fn load_rules(state: &StateDir, settings: &Config) -> anyhow::Result<Arc<ActiveRules>> {
    // The compile at start-up is scanning work too: within the budget.
    crate::budget::budget().set_percent(settings.max_cpu_percent);
    let (state, local, keys, unsigned) = (
        state.clone(),
        settings.rules.clone(),
        settings.maintainer_keys.clone(),
        settings.insecure_allow_unsigned_bundles,
    );
    let rules = tokio::task::spawn_blocking(move || {
        let compiler = Arc::new(
            ChildCompiler::this_executable("vedette-agent")
                .with_pacer(Arc::new(|used| crate::budget::budget().charge(used))),
        );
        // Reading the rules and loading what the child compiled are charged too: a debt the
        // first scans pay, rather than a pause before the agent can judge anything.
        let cpu = crate::budget::thread_time();
        let rules = ActiveRules::start(&state, local, &keys, unsigned, Some(compiler));
        crate::budget::budget().charge(crate::budget::thread_time() - cpu);
        rules
    })
    .await
    .context("rule loading failed")??;
    Ok(Arc::new(rules))
}

/// Opens (and recovers) the spool; its figures start the counters.
async fn open_spool(
    state: &StateDir,
    settings: &Config,
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

fn ship_config(settings: &Config, creds: Credentials, state: StateDir) -> ShipConfig {
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
    /// Devices whose execs fanotify reports (see `ProcessJudge::with_exec_covered`).
    exec_covered: HashSet<u64>,
    shared: Shared,
    cache_path: PathBuf,
    /// To wait on the token and timers from plain threads.
    rt: Handle,
}

impl Background {
    fn start(
        self,
        settings: &Config,
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
            threads.push(this.start_full_scans(settings, scan_roots, walk, options)?);
        }
        let dns = if settings.dns {
            this.start_dns(settings, &mut threads)?
        } else {
            info!("DNS is not watched (`dns = false`); domain indicators match command lines");
            None
        };
        if settings.processes {
            threads.extend(this.start_process_watch(settings, options, dns)?);
        }
        let s = &this.shared;
        this.rt
            .spawn(rescan_on_signal(s.rules.clone(), s.stop.clone()));
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
                        governor().tick(&b.shared.counters);
                        // What the history buffered reaches the disk within a second.
                        if let Some(h) = &b.shared.reports.history {
                            h.flush();
                        }
                    }
                })?,
        );
        Ok(threads)
    }

    fn start_full_scans(
        self: &Arc<Self>,
        settings: &Config,
        roots: Vec<PathBuf>,
        walk: WalkRules,
        options: ScanOptions,
    ) -> std::io::Result<JoinHandle<()>> {
        let scans = FullScans {
            roots,
            plan: ScanPlan {
                threads: settings.scan_workers,
                walk,
                max_cpu_percent: settings.max_cpu_percent,
                scan: options,
            },
            on_start: settings.scan_on_start,
            interval: settings.scan_interval,
            reports: self.shared.reports.clone(),
            cache_path: self.cache_path.clone(),
            profile_rules: settings.profile_rules,
        };
        let b = self.clone();
        std::thread::Builder::new()
            .name("full-scan".into())
            .spawn(move || {
                let s = &b.shared;
                scans.run(&s.rules, &s.det, &s.counters, &s.stop, &b.rt);
            })
    }

    /// The DNS watcher, when a packet socket can be had (`CAP_NET_RAW`); without one, says
    /// once what is missing, and domain indicators keep matching command lines. The links it
    /// keeps between names and addresses.
    fn start_dns(
        self: &Arc<Self>,
        settings: &Config,
        threads: &mut Vec<JoinHandle<()>>,
    ) -> std::io::Result<Option<Arc<DnsLinks>>> {
        let capture = match Capture::open(Duration::from_millis(200)) {
            Ok(c) => c,
            Err(e) => {
                warn!(
                    error = %e,
                    "DNS is not seen: no packet socket (it needs CAP_NET_RAW); domain indicators match command lines only"
                );
                return Ok(None);
            }
        };
        info!("DNS seen on every interface (UDP port 53)");
        let s = &self.shared;
        let links = DnsLinks::new();
        let watch = DnsWatch {
            rules: s.rules.clone(),
            ids: s.reports.ids.clone(),
            det: s.det.clone(),
            counters: s.counters.clone(),
            stop: s.stop.clone(),
            window: settings.dns_window,
            links: links.clone(),
        };
        threads.push(
            std::thread::Builder::new()
                .name("dns".into())
                .spawn(move || watch.run(&capture))?,
        );
        Ok(Some(links))
    }

    /// The process connector's listener (when the kernel lets the agent have it) and the
    /// process monitor.
    fn start_process_watch(
        self: &Arc<Self>,
        settings: &Config,
        options: ScanOptions,
        dns: Option<Arc<DnsLinks>>,
    ) -> std::io::Result<Vec<JoinHandle<()>>> {
        let s = &self.shared;
        let mut threads = Vec::new();
        let execs = match execmon::start(s.stop.clone(), s.counters.clone()) {
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
        let watch = ProcessWatch {
            rules: s.rules.clone(),
            reports: s.reports.clone(),
            exec_covered: self.exec_covered.clone(),
            det: s.det.clone(),
            counters: s.counters.clone(),
            stop: s.stop.clone(),
            rt: self.rt.clone(),
            interval: settings.process_interval,
            memory: settings.memory_scan,
            options,
            dns,
        };
        threads.push(
            std::thread::Builder::new()
                .name("procmon".into())
                .spawn(move || watch.run(execs))?,
        );
        Ok(threads)
    }

    /// Saves the result cache every [`CACHE_SAVE_INTERVAL`] while it changes, so that a crash
    /// loses at most that much (and what it loses is only scanned again).
    fn save_cache(&self) {
        while self.pause(CACHE_SAVE_INTERVAL) {
            // The history first: what the cache says was read, the history holds.
            if let Some(h) = &self.shared.reports.history {
                h.flush_runs(false);
            }
            if let Err(e) = self.shared.reports.cache.save_if_changed(&self.cache_path) {
                warn!(path = %self.cache_path.display(), error = %e, "cannot save the scan cache");
            }
        }
    }

    /// Sleeps up to `d`; false when shutdown came first.
    fn pause(&self, d: Duration) -> bool {
        crate::detect::pause(&self.rt, &self.shared.stop, d)
    }
}
