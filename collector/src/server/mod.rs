//! The collector's gRPC server: `run(config, shutdown)` serves the agent and admin services over
//! mutual TLS until `shutdown` fires, then drains open streams within the configured grace period.

mod actions;
mod admin;
mod agent;
pub(crate) mod audit;
pub mod console;
mod guard;
mod hunts;
pub(crate) mod rollout;
mod rule_costs;
mod silence;
pub mod throttle;
pub mod tls;
mod triage;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use vedette_engine::bundle::PublicKey;
use vedette_proto::limits::MAX_MESSAGE_BYTES;
use vedette_proto::v1::RuleBundle;
use vedette_proto::v1::admin_service_server::AdminServiceServer;
use vedette_proto::v1::agent_service_server::AgentServiceServer;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pki::Ca;
use crate::store::{Store, StoreEvent};

/// Concurrent HTTP/2 streams (calls) on one connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 16;

/// The store every handler shares.
pub type SharedStore = Arc<dyn Store>;

/// What every handler shares.
pub(crate) struct State {
    pub store: SharedStore,
    pub ca: Ca,
    pub token_ttl: std::time::Duration,
    /// Open agent streams by agent id; cancelling one closes that stream.
    pub streams: Mutex<HashMap<String, (u64, CancellationToken)>>,
    /// Fires when the collector shuts down.
    pub shutdown: CancellationToken,
    /// Tracks stream tasks so that shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Maintainer keys whose bundles are accepted (and that agents pin at enrollment).
    pub maintainer_keys: Vec<PublicKey>,
    pub allow_unsigned: bool,
    /// What each agent is to run; every agent stream watches it and pushes what its agent is
    /// due at once.
    pub rollout: watch::Sender<Arc<rollout::Rollout>>,
    /// Per-agent rate limits.
    pub throttle: throttle::Throttle,
    /// Lifetime of agent certificates, at enrollment and renewal.
    pub agent_cert_lifetime: std::time::Duration,
    /// Serial numbers (hex) of revoked certificates: refused on every request.
    pub revoked_certs: std::sync::RwLock<HashSet<String>>,
    /// Serial numbers of certificates already seen by this collector.
    pub seen_certs: Mutex<HashSet<String>>,
    /// When each agent last renewed its certificate through this collector.
    pub renewals: agent::Renewals,
    pub metrics: Arc<Metrics>,
    /// Bumped when a hunt starts (here or through another collector): every agent stream
    /// looks for hunts its agent has not been sent.
    pub hunts: watch::Sender<hunts::HuntNews>,
    /// Bumped when a response action is approved (here or through another collector): every
    /// agent stream looks for actions due to its agent.
    pub actions: watch::Sender<u64>,
}

impl State {
    /// Refuses the certificate with this serial from now on, on this collector.
    pub(crate) fn revoke_cert_here(&self, serial: &str) {
        self.revoked_certs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(serial.to_string());
    }

    pub(crate) fn cert_revoked(&self, serial: &str) -> bool {
        self.revoked_certs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(serial)
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, CancellationToken)>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs a blocking store call off the async runtime.
pub(crate) async fn blocking<T, F>(store: &SharedStore, f: F) -> Result<T, tonic::Status>
where
    F: FnOnce(&dyn Store) -> Result<T, crate::store::StoreError> + Send + 'static,
    T: Send + 'static,
{
    let store = store.clone();
    match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
        Ok(Ok(v)) => {
            if let Some(failed) = crate::store::count_success() {
                tracing::info!(
                    failed,
                    "the store works again; agents resend what was not acknowledged"
                );
            }
            Ok(v)
        }
        Ok(Err(crate::store::StoreError::Revoked(agent))) => {
            tracing::warn!(%agent, "revoked agent refused");
            Err(tonic::Status::permission_denied(
                "this agent has been revoked",
            ))
        }
        Ok(Err(e)) => {
            if crate::store::count_error() {
                tracing::error!(
                    error = %e,
                    "store error: nothing is acknowledged until it works again (agents keep \
                     their detections); later failures are counted in \
                     vedette_collector_store_errors_total"
                );
            } else {
                tracing::debug!(error = %e, "store error");
            }
            Err(tonic::Status::unavailable(
                "the collector's store failed; retry later",
            ))
        }
        Err(e) => {
            tracing::error!(error = %e, "store task failed");
            Err(tonic::Status::internal("store task failed"))
        }
    }
}

/// The push message for a stored bundle.
pub(crate) fn rule_bundle(b: &crate::store::BundleRow) -> RuleBundle {
    RuleBundle {
        name: b.name.clone(),
        version: b.version,
        content: b.content.clone(),
        signature: b.signature.clone(),
        signer_key: b.signer_key.clone(),
    }
}

/// Runs the collector until SIGTERM or SIGINT, then drains; returns the exit status.
pub fn run_until_signal(config: Config) -> std::process::ExitCode {
    use vedette_ops::cli::{exit, fail, wait_for_signal};
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}"), exit::FAILURE),
    };
    let result = rt.block_on(async {
        let listener = bind(&config).await?;
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signal.cancel();
        });
        serve(config, listener, shutdown).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(&format!("{e:#}"), exit::FAILURE),
    }
}

/// Binds the listener; separate from [`serve`] so callers learn the bound address first.
pub async fn bind(config: &Config) -> anyhow::Result<TcpListener> {
    TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on `{}`", config.listen))
}

/// Serves until `shutdown` fires, then drains.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls = tls::server_config(&config.ca_cert, &config.server_cert, &config.server_key)
        .context("cannot set up TLS")?;
    let state = open_state(&config, shutdown.clone()).await?;
    // The listener is bound (a second `serve` stops before this): no agent is connected yet.
    blocking(&state.store, |s| s.reset_connections())
        .await
        .map_err(|e| anyhow::anyhow!("cannot reset agents' connection state: {}", e.message()))?;
    follow_other_collectors(&state)?;
    start_intel_and_export(&config, &state, &shutdown);
    if let Some(keep) = config.retention {
        tokio::spawn(retention(state.clone(), keep));
    }
    if config.silent_after.is_some() || config.stale_after.is_some() {
        let limits = silence::Limits {
            silent_after: config.silent_after,
            stale_after: config.stale_after,
        };
        tokio::spawn(silence::watch(state.clone(), limits));
    }
    if let Some(addr) = config.metrics_listen {
        let metrics = vedette_ops::metrics::bind(addr).await?;
        info!(address = %addr, "serving metrics at /metrics");
        let registry = Arc::new(state.metrics.registry(&state.throttle));
        tokio::spawn(vedette_ops::metrics::serve(
            metrics,
            registry,
            shutdown.clone().cancelled_owned(),
        ));
        tokio::spawn(sample_export_backlog(state.clone()));
    }
    if let Some(addr) = config.console_listen {
        let console = TcpListener::bind(addr)
            .await
            .with_context(|| format!("`console_listen`: cannot listen on `{addr}`"))?;
        console::serve(state.clone(), &config, console, shutdown.clone()).await?;
    }
    let local: SocketAddr = listener.local_addr()?;
    info!(address = %local, store = %config.store.display(), "collector listening");

    let (conn_tx, conn_rx) = mpsc::channel(64);
    let accept_stop = shutdown.child_token();
    let limits = tls::ConnLimits {
        max_connections: config.limits.max_connections,
        max_unauthenticated: config.limits.max_unauthenticated_connections,
        unauthenticated_timeout: config.limits.unauthenticated_timeout,
    };
    let accept = tokio::spawn(tls::accept_loop(
        listener,
        Arc::new(tls),
        limits,
        conn_tx,
        accept_stop.clone(),
        state.metrics.clone(),
    ));
    let server = tokio::spawn(grpc_server(&state, conn_rx, &shutdown));
    shutdown.cancelled().await;
    info!("shutting down: draining agent streams");
    accept_stop.cancel();
    drain(&state, server, config.shutdown_grace).await;
    let _ = accept.await;
    Ok(())
}

/// The intel polls (intel in) and the export sinks (export out), each a task of its own.
fn start_intel_and_export(config: &Config, state: &Arc<State>, shutdown: &CancellationToken) {
    for source in &config.intel_sources {
        info!(origin = %source.origin(), every = ?source.interval, "polling intel source");
        tokio::spawn(crate::intel::poll::run(
            state.store.clone(),
            source.clone(),
            shutdown.clone(),
        ));
    }
    // This collector in sink leases: its host and listening address.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let owner = format!("{}/{}", host.trim(), config.listen);
    for sink in &config.sinks {
        info!(sink = %sink.name(), "exporting detections");
        tokio::spawn(crate::export::run(
            state.store.clone(),
            sink.clone(),
            config.producer.clone(),
            owner.clone(),
            shutdown.clone(),
        ));
    }
}

/// The agent and admin gRPC services over the connections `accept_loop` hands on (TLS done,
/// pre-authentication limits applied), until `shutdown`.
fn grpc_server(
    state: &Arc<State>,
    connections: mpsc::Receiver<Result<tls::Conn, std::io::Error>>,
    shutdown: &CancellationToken,
) -> impl std::future::Future<Output = Result<(), tonic::transport::Error>> + use<> {
    let agent_svc = AgentServiceServer::new(agent::AgentSvc::new(state.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin_svc = AdminServiceServer::new(admin::AdminSvc::new(state.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        // An agent needs one stream; vedettectl one call at a time.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_max_header_list_size(Some(16 * 1024))
        .layer(guard::GuardLayer {
            state: state.clone(),
        })
        .add_service(agent_svc)
        .add_service(admin_svc)
        .serve_with_incoming_shutdown(
            ReceiverStream::new(connections),
            shutdown.clone().cancelled_owned(),
        )
}

/// Samples each export sink's backlog for the metrics, every 15 s.
async fn sample_export_backlog(state: Arc<State>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(15));
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(rows) = blocking(&state.store, |s| s.export_states()).await else {
            continue;
        };
        for row in rows {
            state
                .metrics
                .export_backlog
                .get_or_create(&[("sink", row.sink.clone())])
                .set(i64::try_from(row.backlog).unwrap_or(i64::MAX));
        }
    }
}

/// Opens the store and the CA and loads the latest bundle: everything handlers share.
async fn open_state(config: &Config, shutdown: CancellationToken) -> anyhow::Result<Arc<State>> {
    let ca = Ca::load(&config.ca_cert, &config.ca_key).context("cannot load the CA")?;
    let store = {
        let location = config.store.clone();
        tokio::task::spawn_blocking(move || crate::store::open(&location))
            .await
            .context("store task failed")??
    };
    let latest = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || rollout::load(store.as_ref()))
            .await
            .context("store task failed")?
            .context("cannot read the bundles published")?
    };
    let (rollout, _) = watch::channel(Arc::new(latest));
    let revoked = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.revoked_serials())
            .await
            .context("store task failed")?
            .context("cannot read the revoked certificates")?
    };
    if config.maintainer_keys.is_empty() && !config.insecure_allow_unsigned_bundles {
        warn!("no maintainer_keys configured: rule bundles cannot be published");
    }
    Ok(Arc::new(State {
        maintainer_keys: config.maintainer_keys.clone(),
        allow_unsigned: config.insecure_allow_unsigned_bundles,
        rollout,
        store,
        ca,
        token_ttl: config.token_ttl,
        throttle: throttle::Throttle::new(
            config.limits.agent_detections_per_second,
            config.limits.agent_detections_burst,
            config.limits.agent_messages_per_second,
        ),
        agent_cert_lifetime: config.limits.agent_cert_lifetime,
        revoked_certs: std::sync::RwLock::new(revoked.into_iter().collect()),
        seen_certs: Mutex::new(HashSet::new()),
        renewals: agent::Renewals::default(),
        metrics: Arc::new(Metrics::default()),
        hunts: watch::channel(hunts::HuntNews::default()).0,
        actions: watch::channel(0).0,
        streams: Mutex::new(HashMap::new()),
        shutdown,
        tasks: TaskTracker::new(),
    }))
}

/// With a shared store: bundles published and agents revoked through any collector act here
/// too (a bundle is pushed to this collector's agents, a revoked agent's stream is closed).
fn follow_other_collectors(state: &Arc<State>) -> anyhow::Result<()> {
    let Some(mut events) = state
        .store
        .subscribe(state.shutdown.clone())
        .context("cannot follow the other collectors")?
    else {
        return Ok(());
    };
    let state = state.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                StoreEvent::Bundle(version) => newer_bundle(&state, version).await,
                // Any role that may connect to the database may NOTIFY: an event only says
                // where to look, and what the store says is acted on.
                StoreEvent::Revoked(agent) => {
                    let id = agent.clone();
                    match blocking(&state.store, move |s| s.agent(&id)).await {
                        Ok(Some(row)) if row.revoked => close_stream(&state, &agent),
                        Ok(_) => warn!(agent, "ignored a revocation the store does not hold"),
                        Err(_) => {}
                    }
                }
                StoreEvent::CertRevoked(serial) => {
                    let held = blocking(&state.store, |s| s.revoked_serials()).await;
                    match held {
                        Ok(serials) if serials.contains(&serial) => state.revoke_cert_here(&serial),
                        Ok(_) => {
                            warn!(
                                serial,
                                "ignored a certificate revocation the store does not hold"
                            );
                        }
                        Err(_) => {}
                    }
                }
                StoreEvent::Hunt(id) => hunts::hunts_changed(&state, Some(&id)),
                StoreEvent::Actions => actions::actions_changed(&state, false).await,
                StoreEvent::Resync => {
                    hunts::hunts_changed(&state, None);
                    actions::actions_changed(&state, false).await;
                    newer_bundle(&state, 0).await;
                    if let Ok(serials) = blocking(&state.store, |s| s.revoked_serials()).await {
                        for serial in serials {
                            state.revoke_cert_here(&serial);
                        }
                    }
                    let open: Vec<String> = state.streams().keys().cloned().collect();
                    let Ok(agents) = blocking(&state.store, |s| s.list_agents()).await else {
                        continue;
                    };
                    for a in agents.iter().filter(|a| a.revoked && open.contains(&a.id)) {
                        close_stream(&state, &a.id);
                    }
                }
            }
        }
    });
    Ok(())
}

/// Deletes detections older than `keep`, a small batch at a time, every few minutes (every
/// collector sharing a store may run it: batches skip rows another one is deleting).
async fn retention(state: Arc<State>, keep: std::time::Duration) {
    const BATCH: u32 = 1000;
    const EVERY: std::time::Duration = std::time::Duration::from_secs(300);
    loop {
        let cutoff = crate::store::now_ms() - keep.as_millis() as i64;
        let mut deleted = 0u64;
        loop {
            match blocking(&state.store, move |s| {
                s.delete_detections_before(cutoff, BATCH)
            })
            .await
            {
                Ok(n) => {
                    deleted += n;
                    if n < u64::from(BATCH) {
                        break;
                    }
                }
                Err(_) => break,
            }
            if state.shutdown.is_cancelled() {
                return;
            }
            // Between batches, agents' inserts get the database.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if deleted > 0 {
            info!(deleted, "retention: old detections deleted");
        }
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// Reads the rollout again after a change through another collector (a bundle published or
/// promoted, labels changed; `version` 0 when no new version came with it).
async fn newer_bundle(state: &State, version: u64) {
    let held = state.rollout.borrow().newest();
    rollout::refresh(state).await;
    if version > held {
        info!(version, "bundle published through another collector");
    }
}

/// Closes the stream of an agent revoked through another collector.
fn close_stream(state: &State, agent: &str) {
    if let Some((_, stop)) = state.streams().remove(agent) {
        stop.cancel();
        info!(
            agent,
            "agent revoked through another collector: stream closed"
        );
    }
}

/// Waits up to `grace` for stream tasks and the server to finish. Stream tasks see the
/// shutdown token: each finishes the batch it is committing, acks it, and closes its stream;
/// then the HTTP/2 connections close and the server future ends.
async fn drain(
    state: &State,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    grace: std::time::Duration,
) {
    state.tasks.close();
    let drained = tokio::time::timeout(grace, async {
        state.tasks.wait().await;
        server.await
    })
    .await;
    match drained {
        Ok(Ok(Ok(()))) => info!("collector stopped"),
        Ok(Ok(Err(e))) => warn!(error = %e, "server ended with an error"),
        Ok(Err(e)) => warn!(error = %e, "server task failed"),
        Err(_) => warn!(
            ?grace,
            "grace period elapsed; closing remaining connections"
        ),
    }
}
