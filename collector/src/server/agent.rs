//! `AgentService`: enrollment and the agents' long-lived streams.
//!
//! Invariant: `Ack(seq)` is sent only after every detection of batch `seq` is committed to the
//! store, so an agent may forget what was acknowledged.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};
use vedette_proto::limits::{
    MAX_BATCH_DETECTIONS, MAX_COUNTER_NAME, MAX_COUNTERS, MAX_STRING_BYTES,
};
use vedette_proto::v1::agent_message::Msg;
use vedette_proto::v1::agent_service_server::AgentService;
use vedette_proto::v1::collector_message::Msg as DownMsg;
use vedette_proto::v1::{
    Ack, AgentLabels, AgentMessage, CollectorMessage, Detection, DetectionBatch, EnrollRequest,
    EnrollResponse, Heartbeat, Hello, Inventory, PingRequest, PingResponse, RenewRequest,
    RenewResponse, RuleBundle, detection,
};

use super::audit::{self, Act};
use super::{State, blocking};
use crate::peer::Peer;
use crate::store::{TokenError, now_ms};

/// How long a new stream may take to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest token accepted at enrollment.
const MAX_TOKEN_BYTES: usize = 256;
/// Longest CSR accepted at enrollment.
const MAX_CSR_BYTES: usize = 8 * 1024;

/// Numbers the streams so that a reconnecting agent's old stream does not unregister the new one.
static STREAM_IDS: AtomicU64 = AtomicU64::new(1);

pub struct AgentSvc {
    state: Arc<State>,
}

impl AgentSvc {
    pub(super) fn new(state: Arc<State>) -> Self {
        AgentSvc { state }
    }
}

/// Records a certificate just issued (a failure is logged: the certificate still works, and
/// `certs revoke` takes serials the store never saw).
async fn record_issued(state: &State, cert_pem: &str) {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let Some(row) = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .ok()
        .and_then(|der| Peer::cert_row(der.as_ref(), now_ms()))
    else {
        return;
    };
    let serial = row.serial.clone();
    if let Err(e) = blocking(&state.store, move |s| s.record_cert(&row)).await {
        warn!(serial = %serial, error = %e.message(), "cannot record the certificate issued");
    }
}

/// When each agent last renewed its certificate through this collector, and whether it may
/// renew now: only in the last third of its certificate's life (less a twentieth, for clocks
/// that disagree), and at most once per tenth of the agents' certificate lifetime. A stolen
/// key cannot mint certificates at will, and the certificate a renewal replaced is revoked
/// once the new one is used (see `guard`).
#[derive(Default)]
pub(crate) struct Renewals(Mutex<HashMap<String, Instant>>);

impl Renewals {
    /// Takes a renewal of `agent`'s certificate, valid over `validity` (seconds since the
    /// epoch), at `now`; refused with the reason.
    pub(crate) fn take(
        &self,
        agent: &str,
        validity: Option<(i64, i64)>,
        lifetime: Duration,
        now: (i64, Instant),
    ) -> Result<(), Status> {
        let Some((from, to)) = validity else {
            return Err(Status::unauthenticated("a client certificate is required"));
        };
        let (now_s, now) = now;
        let life = (to - from).max(0);
        let opens = from + life * 2 / 3 - life / 20;
        if now_s < opens {
            return Err(Status::failed_precondition(format!(
                "renewal opens in {} s, two thirds into the certificate's life",
                opens - now_s
            )));
        }
        let pause = (lifetime / 10).max(Duration::from_secs(1));
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = last.get(agent)
            && now.duration_since(*at) < pause
        {
            return Err(Status::resource_exhausted(format!(
                "renewed {} s ago; the next renewal is allowed {} s after the last",
                now.duration_since(*at).as_secs(),
                pause.as_secs()
            )));
        }
        last.insert(agent.to_string(), now);
        Ok(())
    }
}

/// The `result` label of a refused enrollment.
fn token_refusal(e: &TokenError) -> &'static str {
    match e {
        TokenError::Unknown => "unknown_token",
        TokenError::Expired => "expired_token",
        TokenError::UsedUp => "used_token",
        TokenError::Revoked => "revoked_token",
    }
}

/// Records an enrollment in the audit log, by the token that allowed it.
async fn audit_enrolled(state: &State, token_id: &str, agent_id: &str, org: &str, host: &str) {
    let mut act = Act::as_actor(format!("token:{token_id}"), "agent.enroll")
        .target(agent_id)
        .org(org);
    act.detail = format!("host {host}");
    audit::record(&state.store, act, &Ok::<(), Status>(())).await;
}

/// SHA-256 of a token, as stored: the collector never keeps a usable token.
pub(crate) fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

type DownStream = Pin<Box<dyn Stream<Item = Result<CollectorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentSvc {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        let metrics = &self.state.metrics;
        if req.token.is_empty() || req.token.len() > MAX_TOKEN_BYTES {
            metrics.enrollment(token_refusal(&TokenError::Unknown));
            return Err(Status::permission_denied(TokenError::Unknown.to_string()));
        }
        if req.csr_pem.len() > MAX_CSR_BYTES || req.hostname.len() > MAX_STRING_BYTES {
            metrics.enrollment("oversized_request");
            return Err(Status::invalid_argument("enrollment request too large"));
        }
        // The token first: without a usable one, no CSR is parsed and nothing is signed.
        let hash = token_hash(&req.token);
        let token_id = hash[..16].to_string();
        let h = hash.clone();
        let org = match blocking(&self.state.store, move |s| s.check_token(&h, now_ms())).await? {
            Ok(org) => org,
            Err(e) => {
                metrics.enrollment(token_refusal(&e));
                warn!(peer = ?peer, reason = %e, "enrollment refused");
                return Err(Status::permission_denied(e.to_string()));
            }
        };
        let agent_id = uuid::Uuid::new_v4().to_string();
        // The organisation comes from the token, never from the request.
        let cert_pem = self
            .state
            .ca
            .sign_agent_csr(
                &req.csr_pem,
                &agent_id,
                &org,
                self.state.agent_cert_lifetime,
            )
            .map_err(|e| {
                metrics.enrollment("bad_csr");
                Status::invalid_argument(e.to_string())
            })?;
        let (id, host) = (agent_id.clone(), req.hostname.clone());
        let verdict = blocking(&self.state.store, move |s| {
            s.enroll(&hash, &id, &host, now_ms())
        })
        .await?;
        match verdict {
            Err(e) => {
                metrics.enrollment(token_refusal(&e));
                warn!(peer = ?peer, reason = %e, "enrollment refused");
                return Err(Status::permission_denied(e.to_string()));
            }
            // The organisation was renamed between the check and the use (refused once it has
            // agents): what was signed names the old one.
            Ok(stored) if stored != org => {
                return Err(Status::aborted(
                    "the token's organisation was renamed meanwhile; enroll again",
                ));
            }
            Ok(_) => {}
        }
        metrics.enrollment("ok");
        info!(agent = %agent_id, org = %org, hostname = %req.hostname, "agent enrolled");
        audit_enrolled(&self.state, &token_id, &agent_id, &org, &req.hostname).await;
        record_issued(&self.state, &cert_pem).await;
        Ok(Response::new(EnrollResponse {
            agent_id,
            certificate_pem: cert_pem,
            ca_pem: self.state.ca.cert_pem().to_string(),
            maintainer_keys: self
                .state
                .maintainer_keys
                .iter()
                .map(|k| k.0.to_vec())
                .collect(),
        }))
    }

    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        let (agent_id, org) = Peer::of(&request)?.require_agent()?;
        let validity = Peer::leaf_der(&request).and_then(|der| Peer::validity(&der));
        let req = request.into_inner();
        if req.csr_pem.len() > MAX_CSR_BYTES {
            return Err(Status::invalid_argument("certificate request too large"));
        }
        let id = agent_id.clone();
        let row = blocking(&self.state.store, move |s| s.agent(&id)).await?;
        check_agent(&agent_id, &org, row)?;
        self.state.renewals.take(
            &agent_id,
            validity,
            self.state.agent_cert_lifetime,
            (now_ms() / 1000, Instant::now()),
        )?;
        let cert_pem = self
            .state
            .ca
            .sign_agent_csr(
                &req.csr_pem,
                &agent_id,
                &org,
                self.state.agent_cert_lifetime,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        record_issued(&self.state, &cert_pem).await;
        info!(agent = %agent_id, "agent certificate renewed");
        Ok(Response::new(RenewResponse {
            certificate_pem: cert_pem,
        }))
    }

    type ConnectStream = DownStream;

    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        let (agent_id, org) = Peer::of(&request)?.require_agent()?;
        let id = agent_id.clone();
        let row = blocking(&self.state.store, move |s| s.agent(&id)).await?;
        check_agent(&agent_id, &org, row)?;
        Ok(Response::new(PingResponse {
            now_ms: now_ms(),
            agent_id,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let (agent_id, org) = Peer::of(&request)?.require_agent()?;
        let id = agent_id.clone();
        let row = blocking(&self.state.store, move |s| s.agent(&id)).await?;
        check_agent(&agent_id, &org, row)?;
        if self.state.shutdown.is_cancelled() {
            return Err(Status::unavailable("the collector is shutting down"));
        }
        let (tx, rx) = mpsc::channel(64);
        let stream_id = STREAM_IDS.fetch_add(1, Ordering::Relaxed);
        let stop = self.state.shutdown.child_token();
        if let Some((_, old)) = self
            .state
            .streams()
            .insert(agent_id.clone(), (stream_id, stop.clone()))
        {
            // One stream per agent: a reconnect replaces a stream the agent has given up on.
            old.cancel();
        }
        // A revocation between the check above and the registration would have found no
        // stream to close: look again now that the stream is registered.
        let id = agent_id.clone();
        let again = blocking(&self.state.store, move |s| s.agent(&id)).await;
        if !matches!(&again, Ok(Some(r)) if !r.revoked) {
            let mut streams = self.state.streams();
            if streams
                .get(&agent_id)
                .is_some_and(|(sid, _)| *sid == stream_id)
            {
                streams.remove(&agent_id);
            }
            warn!(agent = %agent_id, "agent revoked while connecting: refused");
            return Err(again
                .err()
                .unwrap_or_else(|| Status::permission_denied("this agent has been revoked")));
        }
        let state = self.state.clone();
        let inbound = request.into_inner();
        self.state.tasks.spawn(async move {
            state.metrics.agents_connected.inc();
            let reason = run_stream(&state, &agent_id, inbound, &tx, &stop).await;
            state.metrics.agents_connected.dec();
            if let Err(status) = reason {
                let _ = tx.send(Err(status)).await;
            }
            {
                let mut streams = state.streams();
                if streams
                    .get(&agent_id)
                    .is_some_and(|(sid, _)| *sid == stream_id)
                {
                    streams.remove(&agent_id);
                    state.metrics.agent_gone(&agent_id);
                }
            }
            let id = agent_id.clone();
            let _ = blocking(&state.store, move |s| s.agent_disconnected(&id, now_ms())).await;
            info!(agent = %agent_id, "agent stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Refuses an agent the store does not know, has revoked, or knows in another organisation
/// than its certificate names (a certificate this collector did not issue for it).
fn check_agent(
    agent_id: &str,
    org: &str,
    row: Option<crate::store::AgentRow>,
) -> Result<(), Status> {
    match row {
        None => Err(Status::permission_denied("unknown agent")),
        Some(r) if r.revoked => {
            warn!(agent = %agent_id, "revoked agent refused");
            Err(Status::permission_denied("this agent has been revoked"))
        }
        Some(r) if r.org != org => {
            warn!(agent = %agent_id, certificate = %org, enrolled = %r.org,
                "agent refused: its certificate names another organisation than its enrollment");
            Err(Status::permission_denied(
                "this certificate names another organisation than the agent was enrolled into",
            ))
        }
        Some(_) => Ok(()),
    }
}

/// Serves one agent stream until it ends, is revoked or replaced, or the collector stops.
/// Waits for the agent's Hello and records it connected; the bundle version it runs (None:
/// the stream ended first).
async fn connected(
    state: &Arc<State>,
    agent_id: &str,
    inbound: &mut Streaming<AgentMessage>,
    stop: &CancellationToken,
) -> Result<Option<u64>, Status> {
    let Some(hello) = receive_hello(state, inbound, stop).await? else {
        return Ok(None);
    };
    let inventory = clamp_inventory(hello.inventory.unwrap_or_default());
    info!(agent = %agent_id, hostname = %inventory.hostname, version = %inventory.agent_version, "agent connected");
    let id = agent_id.to_string();
    let bundle = hello.applied_bundle_version;
    state.metrics.agent_applied(agent_id, bundle);
    blocking(&state.store, move |s| {
        s.agent_connected(&id, &inventory, bundle, now_ms())
    })
    .await?;
    Ok(Some(bundle))
}

async fn run_stream(
    state: &Arc<State>,
    agent_id: &str,
    mut inbound: Streaming<AgentMessage>,
    tx: &Down,
    stop: &CancellationToken,
) -> Result<(), Status> {
    let Some(applied) = connected(state, agent_id, &mut inbound, stop).await? else {
        return Ok(());
    };
    // Push what the agent is due now if it runs an older version, then each newer one as the
    // rollout changes (a version published to all or to one of its labels, promoted, labels).
    let mut pusher = BundlePusher {
        pushed: applied,
        rollout: state.rollout.subscribe(),
        labels_sent: None,
    };
    if !pusher.follow(agent_id, tx).await {
        return Ok(());
    }
    // Hunts that ask this agent: those waiting now, then each one started later.
    let (mut hunts, mut hunter) = super::hunts::HuntPusher::start(state);
    if !hunter.push(state, agent_id, tx).await? {
        return Ok(());
    }
    // Response actions due to this agent: those waiting now, then each one approved later.
    let (mut actions, mut relay) = super::actions::ActionPusher::start(state);
    if !relay.push(state, agent_id, tx).await? {
        return Ok(());
    }
    let mut throttled = false;
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => return Err(closed_reason(state)),
            changed = pusher.rollout.changed() => {
                if changed.is_ok() && !pusher.follow(agent_id, tx).await {
                    return Ok(());
                }
                continue;
            }
            changed = hunts.changed() => {
                let news = hunts.borrow_and_update().clone();
                if changed.is_ok() && !hunter.follow(state, news, agent_id, tx).await? {
                    return Ok(());
                }
                continue;
            }
            changed = actions.changed() => {
                if changed.is_ok() && !relay.push(state, agent_id, tx).await? {
                    return Ok(());
                }
                continue;
            }
            m = inbound.message() => m?,
        };
        let Some(AgentMessage { msg: Some(msg) }) = msg else {
            return Ok(());
        };
        // Over its rate, an agent waits here: nothing more is read from its stream, and its
        // Ack comes later.
        let detections = match &msg {
            Msg::Batch(b) => b.detections.len(),
            _ => 0,
        };
        let wait = state.throttle.delay(agent_id, detections);
        if !wait.is_zero() {
            if !throttled {
                warn!(agent = %agent_id, wait = ?wait, "agent over its rate limit: its messages are delayed");
                throttled = true;
            }
            tokio::select! {
                () = stop.cancelled() => return Err(closed_reason(state)),
                () = tokio::time::sleep(wait) => {}
            }
        }
        if !on_message(state, agent_id, msg, tx).await? {
            return Ok(());
        }
    }
}

pub(super) type Down = mpsc::Sender<Result<CollectorMessage, Status>>;

/// The first message, which must be Hello; None when the agent hung up first.
async fn receive_hello(
    state: &State,
    inbound: &mut Streaming<AgentMessage>,
    stop: &CancellationToken,
) -> Result<Option<Hello>, Status> {
    tokio::select! {
        () = stop.cancelled() => Err(closed_reason(state)),
        m = tokio::time::timeout(HELLO_TIMEOUT, inbound.message()) => match m {
            Err(_) => Err(Status::deadline_exceeded("no Hello within 30 s")),
            Ok(Err(e)) => Err(e),
            Ok(Ok(None)) => Ok(None),
            Ok(Ok(Some(AgentMessage { msg: Some(Msg::Hello(h)) }))) => Ok(Some(h)),
            Ok(Ok(Some(_))) => Err(Status::invalid_argument("the first message must be Hello")),
        },
    }
}

/// The bundle an agent is due and its labels, as the rollout says now.
fn due_and_labels(
    rollout: &mut tokio::sync::watch::Receiver<Arc<super::rollout::Rollout>>,
    agent_id: &str,
) -> (Option<Arc<RuleBundle>>, Vec<String>) {
    let now = rollout.borrow_and_update();
    (now.due(agent_id).cloned(), now.labels_of(agent_id))
}

/// Tells the agent its labels; false when the stream is gone.
async fn send_labels(labels: Vec<String>, tx: &Down) -> bool {
    let msg = CollectorMessage {
        msg: Some(DownMsg::Labels(AgentLabels { labels })),
    };
    tx.send(Ok(msg)).await.is_ok()
}

/// Sends each bundle newer than what the agent runs, once.
struct BundlePusher {
    pushed: u64,
    rollout: tokio::sync::watch::Receiver<Arc<super::rollout::Rollout>>,
    /// The labels last sent (None: none yet).
    labels_sent: Option<Vec<String>>,
}

impl BundlePusher {
    /// Sends what the rollout says now, when the agent does not have it yet: a newer bundle,
    /// its labels. False when the stream is gone.
    async fn follow(&mut self, agent_id: &str, tx: &Down) -> bool {
        let (due, labels) = due_and_labels(&mut self.rollout, agent_id);
        if !self.push(&due, tx).await {
            return false;
        }
        if self.labels_sent.as_ref() == Some(&labels) {
            return true;
        }
        self.labels_sent = Some(labels.clone());
        send_labels(labels, tx).await
    }

    /// False when the stream is gone.
    async fn push(&mut self, latest: &Option<Arc<RuleBundle>>, tx: &Down) -> bool {
        match latest {
            Some(b) if b.version > self.pushed => {
                self.pushed = b.version;
                let msg = CollectorMessage {
                    msg: Some(DownMsg::Bundle((**b).clone())),
                };
                tx.send(Ok(msg)).await.is_ok()
            }
            _ => true,
        }
    }
}

/// Handles one message after Hello; Ok(false) when the stream is gone.
async fn on_message(state: &State, agent_id: &str, msg: Msg, tx: &Down) -> Result<bool, Status> {
    let id = agent_id.to_string();
    match msg {
        Msg::Hello(_) => return Err(Status::invalid_argument("Hello sent twice")),
        Msg::Batch(batch) => {
            let seq = batch.seq;
            let detections = check_batch(batch)?;
            state
                .metrics
                .detections_received
                .inc_by(detections.len() as u64);
            let started = std::time::Instant::now();
            // Committed when this returns: only then is the Ack sent.
            let stored = blocking(&state.store, move |s| {
                let now = now_ms();
                let stored = s.insert_detections(&id, &detections, now)?;
                s.agent_seen(&id, now)?;
                Ok(stored)
            })
            .await?;
            state
                .metrics
                .store_commit_seconds
                .observe(started.elapsed().as_secs_f64());
            state.metrics.detections_committed.inc_by(stored as u64);
            let ack = CollectorMessage {
                msg: Some(DownMsg::Ack(Ack { seq })),
            };
            return Ok(tx.send(Ok(ack)).await.is_ok());
        }
        Msg::Heartbeat(mut hb) => {
            check_heartbeat(&hb)?;
            if let Some(profile) = hb.rule_profile.take() {
                super::rule_costs::record(state, agent_id, profile).await?;
            }
            state.metrics.heartbeats.inc();
            let dropped = hb.dropped_total;
            let counters = hb.counters.into_iter().collect();
            let now = now_ms();
            // The agent's clock against this one's (the transit time counts as skew: it is
            // small beside what is worth showing).
            let skew = match hb.sent_at_ms {
                0 => 0,
                sent => sent.saturating_sub(now),
            };
            blocking(&state.store, move |s| {
                s.agent_heartbeat(&id, dropped, &counters, skew, now)
            })
            .await?;
        }
        Msg::BundleStatus(st) => {
            let error: String = st.error.chars().take(MAX_STRING_BYTES / 4).collect();
            if st.applied {
                state.metrics.agent_applied(agent_id, st.version);
                info!(agent = %agent_id, version = st.version, "agent applied bundle");
            } else {
                warn!(agent = %agent_id, version = st.version, error = %error, "agent could not apply bundle");
            }
            blocking(&state.store, move |s| {
                s.agent_bundle_status(&id, st.version, st.applied, &error, now_ms())
            })
            .await?;
        }
        Msg::HuntAnswer(a) => super::hunts::record_answer(state, agent_id, a).await?,
        Msg::ActionResult(r) => super::actions::record_result(state, agent_id, r).await?,
        Msg::Goodbye(g) => {
            let reason: String = g.reason.chars().take(64).collect();
            info!(agent = %agent_id, reason = %vedette_ops::output::printable(&reason), "agent stopped");
            blocking(&state.store, move |s| s.agent_stopped(&id, now_ms())).await?;
            // Recorded: closing the stream tells the agent so.
            return Ok(false);
        }
    }
    Ok(true)
}

fn check_heartbeat(hb: &Heartbeat) -> Result<(), Status> {
    if hb.counters.len() > MAX_COUNTERS {
        return Err(Status::invalid_argument("too many heartbeat counters"));
    }
    if hb.counters.keys().any(|k| k.len() > MAX_COUNTER_NAME) {
        return Err(Status::invalid_argument(format!(
            "heartbeat counter name longer than {MAX_COUNTER_NAME} bytes"
        )));
    }
    Ok(())
}

/// Why a stream was closed from this side: shutdown, or revoked/replaced.
fn closed_reason(state: &State) -> Status {
    if state.shutdown.is_cancelled() {
        Status::unavailable("the collector is shutting down")
    } else {
        Status::permission_denied(
            "this stream was closed by the collector (agent revoked or reconnected)",
        )
    }
}

/// Most answers a `dns` detection keeps; the rest are cut.
const MAX_DNS_ANSWERS: usize = 64;

/// Checks a batch's shape; over-long strings are cut, never dropped.
fn check_batch(batch: DetectionBatch) -> Result<Vec<Detection>, Status> {
    if batch.detections.len() > MAX_BATCH_DETECTIONS {
        return Err(Status::invalid_argument(format!(
            "batch {} has {} detections; at most {MAX_BATCH_DETECTIONS} are allowed",
            batch.seq,
            batch.detections.len()
        )));
    }
    let mut out = batch.detections;
    for d in &mut out {
        if uuid::Uuid::parse_str(&d.id).is_err() {
            return Err(Status::invalid_argument(format!(
                "detection id `{}` is not a UUID",
                clip_owned(&d.id)
            )));
        }
        for s in [&mut d.rule, &mut d.source, &mut d.description] {
            clip(s);
        }
        match &mut d.target {
            Some(detection::Target::File(f)) => {
                clip(&mut f.path);
                f.raw_path.truncate(MAX_STRING_BYTES);
                for s in [&mut f.sha256, &mut f.md5, &mut f.sha1] {
                    clip(s);
                }
            }
            Some(detection::Target::Process(p)) => {
                for s in [
                    &mut p.name,
                    &mut p.exe,
                    &mut p.cmdline,
                    &mut p.user,
                    &mut p.exe_sha256,
                ] {
                    clip(s);
                }
            }
            Some(detection::Target::Connection(c)) => {
                for s in [
                    &mut c.exe,
                    &mut c.protocol,
                    &mut c.local_addr,
                    &mut c.remote_addr,
                    &mut c.domain,
                ] {
                    clip(s);
                }
            }
            Some(detection::Target::Dns(q)) => {
                q.answers.truncate(MAX_DNS_ANSWERS);
                for s in [
                    &mut q.name,
                    &mut q.qtype,
                    &mut q.resolver_addr,
                    &mut q.exe,
                    &mut q.cmdline,
                    &mut q.user,
                    &mut q.local_addr,
                ]
                .into_iter()
                .chain(q.answers.iter_mut())
                {
                    clip(s);
                }
            }
            None => {}
        }
    }
    Ok(out)
}

fn clamp_inventory(mut inv: Inventory) -> Inventory {
    for s in [
        &mut inv.hostname,
        &mut inv.os,
        &mut inv.kernel,
        &mut inv.agent_version,
        &mut inv.arch,
    ] {
        clip(s);
    }
    inv
}

/// Cuts a string to the protocol's length cap on a character boundary.
fn clip(s: &mut String) {
    if s.len() > MAX_STRING_BYTES {
        let mut end = MAX_STRING_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

fn clip_owned(s: &str) -> String {
    let mut s = s.chars().take(64).collect::<String>();
    clip(&mut s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_waits_for_the_last_third_and_then_for_a_tenth_of_the_lifetime() {
        let r = Renewals::default();
        let lifetime = Duration::from_secs(300);
        // Valid from 0 to 300 s: renewal opens at 200 s less 15 s.
        let v = Some((0, 300));
        let t0 = Instant::now();
        let early = r.take("a", v, lifetime, (150, t0)).unwrap_err();
        assert_eq!(early.code(), tonic::Code::FailedPrecondition, "{early}");
        assert!(early.message().contains("renewal opens in 35 s"), "{early}");
        r.take("a", v, lifetime, (186, t0)).unwrap();
        // Again within a tenth of the lifetime (30 s): refused; another agent is not.
        let again = r
            .take("a", v, lifetime, (200, t0 + Duration::from_secs(20)))
            .unwrap_err();
        assert_eq!(again.code(), tonic::Code::ResourceExhausted, "{again}");
        r.take("b", v, lifetime, (200, t0 + Duration::from_secs(20)))
            .unwrap();
        r.take("a", v, lifetime, (220, t0 + Duration::from_secs(31)))
            .unwrap();
        assert_eq!(
            r.take("a", None, lifetime, (220, t0)).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn long_strings_are_cut_on_a_char_boundary() {
        let mut s = "é".repeat(MAX_STRING_BYTES);
        clip(&mut s);
        assert!(s.len() <= MAX_STRING_BYTES && s.len() >= MAX_STRING_BYTES - 1);
    }

    #[test]
    fn oversized_batch_and_bad_ids_are_refused() {
        let big = DetectionBatch {
            seq: 1,
            detections: vec![Detection::default(); MAX_BATCH_DETECTIONS + 1],
        };
        assert_eq!(
            check_batch(big).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let bad = DetectionBatch {
            seq: 1,
            detections: vec![Detection {
                id: "x".into(),
                ..Default::default()
            }],
        };
        assert_eq!(
            check_batch(bad).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
