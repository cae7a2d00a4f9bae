//! Shipping detections to the collector over the agent's mutual-TLS stream.
//!
//! ```text
//! scan workers ──bounded channel──► spool writer (thread: append + fdatasync) ──► spool (disk)
//!                                                                                  │ read
//! collector ◄── DetectionBatch(seq) ── shipper task ◄─────────────────────────────┘
//!           ──► Ack(seq) ─────────────► spool.ack(last id of the batch): segments deleted
//! ```
//!
//! One task owns the connection. It sends Hello, then batches read from the spool, each with a
//! sequence number, and heartbeats. The collector acks a batch after its store committed; the
//! ack moves the spool's acknowledged-up-to mark. On every new connection the task starts again
//! from the first unacknowledged record, so delivery is at least once, and the collector stores
//! each detection id once: exactly once in the store. Detections are never behind heartbeats:
//! a heartbeat is skipped when the stream is congested.
//!
//! Backpressure: at most [`MAX_IN_FLIGHT`] batches wait for an ack. A slow collector makes the
//! spool grow on disk (up to its cap, past which the oldest records are dropped and counted),
//! never the agent's memory.
//!
//! On connection failure the task backs off (exponential, jittered, capped) and tries the next
//! collector address; it logs when the state changes, not on every retry.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{error, info, warn};
use vedette_ops::client::{ClientTls, connect};
use vedette_proto::limits::{MAX_BATCH_DETECTIONS, MAX_MESSAGE_BYTES};
use vedette_proto::v1::agent_message::Msg;
use vedette_proto::v1::agent_service_client::AgentServiceClient;
use vedette_proto::v1::collector_message::Msg as Down;
use vedette_proto::v1::{
    ActionResult, AgentMessage, BundleStatus, CollectorMessage, DetectionBatch, Goodbye, Heartbeat,
    Hello, HuntAnswer, HuntRequest, ResponseAction, RuleBundle,
};

use super::inventory;
use super::spool::Batch;
use super::writer::Spooled;
use crate::rules::ActiveRules;
use crate::telemetry::{Counter, Counters};

/// Batches sent and not yet acknowledged, at most.
pub const MAX_IN_FLIGHT: usize = 16;
/// Most detections per batch.
const BATCH_SIZE: usize = 500;
/// Shortest time between two batches that are not full: under a burst, detections gather into
/// fewer, larger batches (at most 40 a second) instead of one message each, which the
/// collector's per-agent message rate would delay. A detection waits at most this long.
const LINGER: Duration = Duration::from_millis(25);
/// About the most payload bytes per batch (well under the message cap).
const BATCH_BYTES: usize = 4 * 1024 * 1024;

#[derive(Clone)]
pub struct ShipConfig {
    pub collectors: Vec<String>,
    pub tls: ClientTls,
    pub heartbeat: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long shutdown waits for the last acks (what is left stays spooled for the next start).
    pub drain: Duration,
    /// Where the agent's certificate is renewed into, once two thirds of its life passed
    /// (None: never renewed).
    pub renew_in: Option<crate::state::StateDir>,
}

/// The shipper's side of rule bundles: it offers what the collector pushes, reports what the
/// applier decided, and says in Hello which version runs.
pub struct BundleLink {
    pub rules: Arc<ActiveRules>,
    pub offers: watch::Sender<Option<RuleBundle>>,
    pub statuses: mpsc::Receiver<BundleStatus>,
    /// Hunts go to the history, and its answers come back.
    pub hunts: mpsc::Sender<HuntRequest>,
    pub answers: mpsc::Receiver<HuntAnswer>,
    /// Response actions go to the responder, and their outcomes come back.
    pub actions: mpsc::Sender<ResponseAction>,
    pub results: mpsc::Receiver<ActionResult>,
}

/// Why a connection ended.
#[derive(Debug, PartialEq)]
enum End {
    Shutdown,
    Lost(String),
    /// The certificate is due for renewal: reconnect at once, renewing first.
    Renew,
}

/// A batch on the wire.
struct InFlight {
    seq: u64,
    last_id: u64,
    count: u64,
}

pub struct Shipper {
    cfg: ShipConfig,
    sp: Arc<Spooled>,
    counters: Arc<Counters>,
    bundles: BundleLink,
    /// Highest record id sent on any connection: records at or below it are resends.
    max_sent: u64,
    /// Set when shutdown starts: the last moment to wait for acks, across reconnects.
    drain_deadline: Option<Instant>,
    /// After a refused renewal, no new attempt before this moment.
    renew_after: Option<Instant>,
}

/// One connection's progress.
struct Session {
    /// Sequence numbers are per stream.
    next_seq: u64,
    /// When the rule profile sent on this stream was measured (0: none sent): a profile goes
    /// once per stream and measurement, not in every heartbeat.
    profile_sent: i64,
    /// The next spool record to send.
    cursor: u64,
    in_flight: VecDeque<InFlight>,
    /// Whether the spool had nothing more to read; cleared when the writer signals.
    idle: bool,
    /// When the last batch was sent.
    last_sent: Option<Instant>,
    heartbeat: Interval,
}

type Up = mpsc::Sender<AgentMessage>;

impl Shipper {
    pub fn new(
        cfg: ShipConfig,
        sp: Arc<Spooled>,
        bundles: BundleLink,
        counters: Arc<Counters>,
    ) -> Shipper {
        Shipper {
            cfg,
            sp,
            counters,
            bundles,
            max_sent: 0,
            drain_deadline: None,
            renew_after: None,
        }
    }

    /// Runs until `shutdown` fires and everything spooled has been acknowledged, or the drain
    /// time ran out (what is left stays in the spool for the next start).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = self.cfg.backoff_min;
        let mut attempt = 0usize;
        let mut connected_once = false;
        let mut last_error: Option<String> = None;
        loop {
            let addr = self.cfg.collectors[attempt % self.cfg.collectors.len()].clone();
            attempt += 1;
            self.counters.inc(Counter::ConnectAttempts);
            self.renew_if_due(&addr).await;
            let applied = self.bundles.rules.applied.load(Ordering::Relaxed);
            let end = match open(&self.cfg, &addr, applied).await {
                Ok((up, down)) => {
                    info!(collector = %addr, "connected to collector");
                    connected_once = true;
                    last_error = None;
                    backoff = self.cfg.backoff_min;
                    self.counters.inc(Counter::Connections);
                    self.session(up, down, &shutdown).await
                }
                Err(e) => End::Lost(e.to_string()),
            };
            if end == End::Renew {
                continue;
            }
            if let End::Lost(e) = end {
                if last_error.as_deref() != Some(e.as_str()) {
                    let what = if connected_once {
                        "collector connection lost; retrying with backoff"
                    } else {
                        "cannot reach the collector; retrying with backoff"
                    };
                    warn!(collector = %addr, error = %e, "{what}");
                    last_error = Some(e);
                }
            } else {
                return;
            }
            if shutdown.is_cancelled() {
                self.warn_undelivered();
                return;
            }
            // Full jitter: sleep a random time between half and all of the current backoff.
            let sleep = rand::rng().random_range(backoff / 2..=backoff);
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(sleep) => {}
            }
            backoff = (backoff * 2).min(self.cfg.backoff_max);
        }
    }

    /// Whether this agent's certificate has lived two thirds of its life.
    fn renewal_due(&self) -> bool {
        self.cfg.renew_in.is_some()
            && self.renew_after.is_none_or(|t| Instant::now() >= t)
            && self
                .cfg
                .tls
                .identity
                .as_ref()
                .is_some_and(|(cert, _)| renewal_due(cert, std::time::SystemTime::now()))
    }

    /// Renews the certificate over mutual TLS when it is due; on failure the current one is
    /// kept (and tried again at the next connection).
    async fn renew_if_due(&mut self, addr: &str) {
        if !self.renewal_due() {
            return;
        }
        let Some(state) = self.cfg.renew_in.clone() else {
            return;
        };
        match renew(&self.cfg.tls, addr, &state).await {
            Ok(tls) => {
                info!(collector = %addr, "agent certificate renewed");
                self.cfg.tls = tls;
                self.renew_after = None;
            }
            Err(e) => {
                // Not again at every heartbeat: a collector that refused (a clock ahead of its
                // own, a renewal already made) is asked again a while later.
                let pause = RENEW_RETRY;
                warn!(collector = %addr, error = %e, retry_in = ?pause, "cannot renew the agent certificate; keeping the current one");
                self.renew_after = Some(Instant::now() + pause);
            }
        }
    }

    fn warn_undelivered(&self) {
        let left = self.sp.spool.pending();
        if left > 0 {
            warn!(
                undelivered = left,
                "stopping with detections the collector has not acknowledged; they stay spooled for the next start"
            );
        }
    }

    /// Reads the next batch from the spool (off the async threads: it is file I/O).
    async fn read(&self, from: u64) -> Result<Option<Batch>, ShipError> {
        let sp = self.sp.clone();
        let max = BATCH_SIZE.min(MAX_BATCH_DETECTIONS);
        tokio::task::spawn_blocking(move || sp.spool.read(from, max, BATCH_BYTES))
            .await?
            .map_err(ShipError::Spool)
    }

    async fn ack(&self, id: u64) {
        let sp = self.sp.clone();
        let r = tokio::task::spawn_blocking(move || sp.spool.ack(id)).await;
        if let Ok(Err(e)) = r {
            // The ack mark stays behind: those detections are sent again next time, and the
            // collector stores each id once.
            warn!(error = %e, "cannot record the ack in the spool");
        }
    }

    /// One connection: batches up, acks and bundles down, heartbeats, until the stream ends or
    /// shutdown has drained.
    async fn session<D>(&mut self, up: Up, mut down: D, shutdown: &CancellationToken) -> End
    where
        D: Stream<Item = Result<CollectorMessage, Status>> + Unpin,
    {
        // Each connection starts from the first record the collector has not acknowledged.
        let mut heartbeat = tokio::time::interval(self.cfg.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut s = Session {
            next_seq: 1,
            profile_sent: 0,
            cursor: self.sp.spool.acked() + 1,
            in_flight: VecDeque::new(),
            idle: false,
            last_sent: None,
            heartbeat,
        };
        loop {
            let draining = shutdown.is_cancelled();
            if draining && let Some(end) = self.drained(&s) {
                goodbye(&up, &mut down).await;
                return end;
            }
            // A batch that is not full waits for LINGER after the previous one.
            let unsent = self
                .sp
                .spool
                .pending()
                .saturating_sub(s.in_flight.iter().map(|b| b.count).sum());
            let linger_until = s
                .last_sent
                .map(|t| t + LINGER)
                .filter(|t| *t > Instant::now() && unsent < BATCH_SIZE as u64);
            if !s.idle && s.in_flight.len() < MAX_IN_FLIGHT && linger_until.is_none() {
                match self.send_next(&mut s, &up).await {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(end) => return end,
                }
            }
            let step = tokio::select! {
                biased;
                msg = down.next() => self.on_message(&mut s, msg).await,
                () = self.sp.written.notified(), if s.idle => {
                    s.idle = false;
                    Ok(())
                }
                () = tokio::time::sleep_until(linger_until.unwrap_or_else(Instant::now)),
                    if linger_until.is_some() && !s.idle => Ok(()),
                Some(status) = self.bundles.statuses.recv() => {
                    let msg = AgentMessage { msg: Some(Msg::BundleStatus(status)) };
                    up.send(msg).await.map_err(|_| End::Lost("stream closed".into()))
                }
                Some(answer) = self.bundles.answers.recv() => {
                    let msg = AgentMessage { msg: Some(Msg::HuntAnswer(answer)) };
                    up.send(msg).await.map_err(|_| End::Lost("stream closed".into()))
                }
                Some(result) = self.bundles.results.recv() => {
                    let msg = AgentMessage { msg: Some(Msg::ActionResult(result)) };
                    up.send(msg).await.map_err(|_| End::Lost("stream closed".into()))
                }
                _ = s.heartbeat.tick() => {
                    self.heartbeat(&up, &mut s.profile_sent);
                    if !draining && self.renewal_due() {
                        Err(End::Renew)
                    } else {
                        Ok(())
                    }
                }
                () = shutdown.cancelled(), if !draining => Ok(()),
                () = tokio::time::sleep(Duration::from_millis(100)), if draining => Ok(()),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// While draining: whether everything is acknowledged, or the drain time ran out.
    fn drained(&mut self, s: &Session) -> Option<End> {
        let deadline = *self
            .drain_deadline
            .get_or_insert_with(|| Instant::now() + self.cfg.drain);
        if self.sp.writer_done.is_cancelled()
            && s.in_flight.is_empty()
            && self.sp.spool.pending() == 0
        {
            return Some(End::Shutdown);
        }
        if Instant::now() >= deadline {
            warn!(
                undelivered = self.sp.spool.pending(),
                "drain time ran out; unacknowledged detections stay spooled for the next start"
            );
            return Some(End::Shutdown);
        }
        None
    }

    /// Sends the next batch from the spool; Ok(false) when there was none.
    async fn send_next(&mut self, s: &mut Session, up: &Up) -> Result<bool, End> {
        let batch = match self.read(s.cursor).await {
            Ok(Some(batch)) => batch,
            Ok(None) => {
                s.idle = true;
                return Ok(false);
            }
            Err(e) => {
                error!(error = %e, "spool read failed");
                s.idle = true;
                return Ok(false);
            }
        };
        let count = batch.detections.len() as u64;
        let resent = count.min(self.max_sent.saturating_sub(s.cursor - 1));
        self.counters.add(Counter::DetectionsResent, resent);
        self.counters.add(Counter::DetectionsSent, count);
        self.max_sent = self.max_sent.max(batch.last_id);
        s.cursor = batch.last_id + 1;
        s.last_sent = Some(Instant::now());
        let seq = s.next_seq;
        s.next_seq += 1;
        s.in_flight.push_back(InFlight {
            seq,
            last_id: batch.last_id,
            count,
        });
        let msg = AgentMessage {
            msg: Some(Msg::Batch(DetectionBatch {
                seq,
                detections: batch.detections,
            })),
        };
        up.send(msg)
            .await
            .map_err(|_| End::Lost("stream closed".into()))?;
        Ok(true)
    }

    /// One message from the collector (or the end of its stream).
    async fn on_message(
        &mut self,
        s: &mut Session,
        msg: Option<Result<CollectorMessage, Status>>,
    ) -> Result<(), End> {
        let msg = match msg {
            None => return Err(End::Lost("the collector closed the stream".into())),
            Some(Err(st)) => return Err(End::Lost(format!("{}: {}", st.code(), st.message()))),
            Some(Ok(CollectorMessage { msg: Some(m) })) => m,
            Some(Ok(_)) => return Ok(()),
        };
        match msg {
            Down::Ack(ack) => {
                // An ack covers every batch up to its sequence number; an older one is a no-op.
                let mut upto = None;
                while s.in_flight.front().is_some_and(|b| b.seq <= ack.seq) {
                    if let Some(b) = s.in_flight.pop_front() {
                        self.counters.add(Counter::DetectionsAcked, b.count);
                        upto = Some(b.last_id);
                    }
                }
                if let Some(id) = upto {
                    self.ack(id).await;
                }
            }
            Down::Bundle(b) => {
                info!(version = b.version, name = %b.name, "rule bundle received");
                self.bundles.offers.send_replace(Some(b));
            }
            Down::Hunt(h) => {
                info!(hunt = %h.id, "hunt received");
                if self.bundles.hunts.try_send(h).is_err() {
                    // Asked again at the next connection, while it has not expired.
                    warn!("too many hunts waiting; this one is answered after a reconnect");
                }
            }
            Down::Action(a) => {
                info!(action = %a.id, kind = %a.kind, "response action received");
                if self.bundles.actions.try_send(a).is_err() {
                    // Sent again at the next connection, while it has not expired.
                    warn!("too many response actions waiting; this one is taken after a reconnect");
                }
            }
            Down::Labels(l) => {
                // Kept on disk (a synced write): off the stream's task.
                let rules = self.bundles.rules.clone();
                let _ = tokio::task::spawn_blocking(move || rules.set_labels(l.labels)).await;
            }
        }
        Ok(())
    }

    /// Never waits: when the stream is congested the heartbeat is skipped. Carries the rule
    /// profile when this stream has not had this measurement yet (`profile_sent`).
    fn heartbeat(&self, up: &Up, profile_sent: &mut i64) {
        self.counters
            .set(Counter::SpoolPending, self.sp.spool.pending());
        self.counters
            .set(Counter::SpoolBytes, self.sp.spool.bytes());
        let profile = self
            .bundles
            .rules
            .costs()
            .filter(|p| p.measured_at_ms != *profile_sent);
        let hb = AgentMessage {
            msg: Some(Msg::Heartbeat(Heartbeat {
                counters: self.counters.snapshot().into_iter().collect(),
                dropped_total: self.sp.spool.dropped(),
                sent_at_ms: vedette_proto::now_ms(),
                rule_profile: profile.clone(),
            })),
        };
        if up.try_send(hb).is_ok()
            && let Some(p) = profile
        {
            *profile_sent = p.measured_at_ms;
        }
    }
}

/// Says goodbye at a clean stop: the collector records it, and does not take the silence that
/// follows for a killed or frozen agent. It closes the stream once it has recorded it; the
/// process may end only then, or the goodbye could be lost unsent.
async fn goodbye<D>(up: &Up, down: &mut D)
where
    D: Stream<Item = Result<CollectorMessage, Status>> + Unpin,
{
    let bye = AgentMessage {
        msg: Some(Msg::Goodbye(Goodbye {
            reason: "stopped".into(),
        })),
    };
    if up.send(bye).await.is_ok() {
        let _ = tokio::time::timeout(GOODBYE_WAIT, async {
            while let Some(Ok(_)) = down.next().await {}
        })
        .await;
    }
}

/// How long a clean stop waits for the collector to record the agent's goodbye.
const GOODBYE_WAIT: Duration = Duration::from_secs(2);

/// How long after a failed renewal the agent asks again.
const RENEW_RETRY: Duration = Duration::from_secs(5);

/// Whether a certificate (PEM) at `now` has lived two thirds of its validity.
fn renewal_due(cert_pem: &str, now: std::time::SystemTime) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Some(block) = pem::parse_many(cert_pem)
        .ok()
        .and_then(|b| b.into_iter().find(|b| b.tag() == "CERTIFICATE"))
    else {
        return false;
    };
    let Ok((_, cert)) = X509Certificate::from_der(block.contents()) else {
        return false;
    };
    let (from, to) = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    now >= from + (to - from) * 2 / 3
}

/// Asks the collector for a certificate for a new key, and puts both in place.
async fn renew(
    tls: &ClientTls,
    addr: &str,
    state: &crate::state::StateDir,
) -> Result<ClientTls, ShipError> {
    let key = rcgen::KeyPair::generate().map_err(ShipError::Key)?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(ShipError::Key)?;
    let channel = connect(addr, tls)
        .await
        .map_err(|e| ShipError::Connect(error_chain(&e)))?;
    let response = AgentServiceClient::new(channel)
        .renew(vedette_proto::v1::RenewRequest { csr_pem: csr })
        .await
        .map_err(ShipError::refused)?
        .into_inner();
    let key_pem = key.serialize_pem();
    let (state, cert) = (state.clone(), response.certificate_pem.clone());
    let k = key_pem.clone();
    tokio::task::spawn_blocking(move || state.replace_credentials(&cert, &k)).await??;
    Ok(ClientTls {
        ca_pem: tls.ca_pem.clone(),
        identity: Some((response.certificate_pem, key_pem)),
    })
}

/// Opens the stream and sends Hello.
async fn open(
    cfg: &ShipConfig,
    addr: &str,
    bundle_version: u64,
) -> Result<(Up, tonic::Streaming<CollectorMessage>), ShipError> {
    let channel = connect(addr, &cfg.tls)
        .await
        .map_err(|e| ShipError::Connect(error_chain(&e)))?;
    let mut client = AgentServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (up, rx) = mpsc::channel(MAX_IN_FLIGHT + 4);
    let hello = AgentMessage {
        msg: Some(Msg::Hello(Hello {
            inventory: Some(inventory::collect()),
            applied_bundle_version: bundle_version,
        })),
    };
    up.send(hello).await.map_err(|_| ShipError::Closed)?;
    let down = client
        .connect(ReceiverStream::new(rx))
        .await
        .map_err(ShipError::refused)?
        .into_inner();
    Ok((up, down))
}

/// Why the shipper could not open a stream, renew its certificate or read its spool.
#[derive(Debug, thiserror::Error)]
enum ShipError {
    /// The connection or its TLS handshake failed (the causes `: `-joined).
    #[error("{0}")]
    Connect(String),
    /// The collector answered with an error status.
    #[error("{code}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("stream closed")]
    Closed,
    #[error("cannot read the spool: {0}")]
    Spool(std::io::Error),
    #[error("cannot make a key or a certificate request: {0}")]
    Key(rcgen::Error),
    #[error("cannot put the renewed certificate in place: {0}")]
    State(#[from] crate::state::StateError),
    #[error("a blocking task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl ShipError {
    fn refused(s: tonic::Status) -> ShipError {
        ShipError::Refused {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// An error and its causes, `: `-joined.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use tokio::task::JoinHandle;
    use vedette_proto::v1::{Ack, Detection};

    use super::*;
    use crate::deliver::spool::Spool;
    use crate::state::StateDir;

    const DEADLINE: Duration = Duration::from_secs(10);

    struct Rig {
        _dir: tempfile::TempDir,
        sp: Arc<Spooled>,
        offered: watch::Receiver<Option<RuleBundle>>,
        statuses: mpsc::Sender<BundleStatus>,
        shipper: Option<Shipper>,
        counters: Arc<Counters>,
    }

    fn rig(detections: usize) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(&dir.path().join("spool"), 64 * 1024 * 1024).unwrap();
        let batch: Vec<Detection> = (0..detections)
            .map(|i| Detection {
                id: format!("d{i}"),
                ..Default::default()
            })
            .collect();
        spool.append(&batch).unwrap();
        let sp = Spooled::new(spool);
        let state = StateDir::new(dir.path());
        let rules = Arc::new(ActiveRules::start(&state, Vec::new(), &[], false, None).unwrap());
        let (offers, offered) = watch::channel(None);
        let (status_tx, statuses) = mpsc::channel(8);
        let cfg = ShipConfig {
            collectors: vec!["127.0.0.1:1".into()],
            tls: vedette_ops::client::ClientTls {
                ca_pem: String::new(),
                identity: None,
            },
            heartbeat: Duration::from_secs(3600),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(10),
            drain: Duration::from_secs(5),
            renew_in: None,
        };
        let counters = Arc::new(Counters::default());
        let (hunts, _) = mpsc::channel(1);
        let (_, answers) = mpsc::channel(1);
        let (actions, _) = mpsc::channel(1);
        let (_, results) = mpsc::channel(1);
        let link = BundleLink {
            rules,
            offers,
            statuses,
            hunts,
            answers,
            actions,
            results,
        };
        let shipper = Shipper::new(cfg, sp.clone(), link, counters.clone());
        Rig {
            _dir: dir,
            sp,
            offered,
            statuses: status_tx,
            shipper: Some(shipper),
            counters,
        }
    }

    /// The collector's ends of one connection.
    struct Peer {
        up: mpsc::Receiver<AgentMessage>,
        down: mpsc::Sender<Result<CollectorMessage, Status>>,
        task: JoinHandle<(Shipper, End)>,
    }

    fn connect(rig: &mut Rig, shutdown: &CancellationToken) -> Peer {
        let (up_tx, up) = mpsc::channel(MAX_IN_FLIGHT + 4);
        let (down, down_rx) = mpsc::channel(16);
        let mut shipper = rig.shipper.take().expect("shipper free");
        let shutdown = shutdown.clone();
        let task = tokio::spawn(async move {
            let end = shipper
                .session(up_tx, ReceiverStream::new(down_rx), &shutdown)
                .await;
            (shipper, end)
        });
        Peer { up, down, task }
    }

    impl Peer {
        /// The next message other than a heartbeat.
        async fn next(&mut self) -> Msg {
            loop {
                let m = tokio::time::timeout(DEADLINE, self.up.recv())
                    .await
                    .expect("a message in time")
                    .expect("stream open");
                match m.msg {
                    Some(Msg::Heartbeat(_)) | None => continue,
                    Some(m) => return m,
                }
            }
        }
        async fn batch(&mut self) -> DetectionBatch {
            match self.next().await {
                Msg::Batch(b) => b,
                other => panic!("expected a batch, got {other:?}"),
            }
        }
        async fn send(&self, m: Down) {
            let msg = CollectorMessage { msg: Some(m) };
            self.down.send(Ok(msg)).await.unwrap();
        }
        async fn end(self, rig: &mut Rig) -> End {
            drop(self.down);
            let (shipper, end) = tokio::time::timeout(DEADLINE, self.task)
                .await
                .expect("session ends in time")
                .unwrap();
            rig.shipper = Some(shipper);
            end
        }
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn ids(b: &DetectionBatch) -> Vec<String> {
        b.detections.iter().map(|d| d.id.clone()).collect()
    }

    #[tokio::test]
    async fn unacknowledged_batches_are_resent_from_the_first_record_after_a_reconnect() {
        let mut rig = rig(3);
        let shutdown = CancellationToken::new();
        let mut peer = connect(&mut rig, &shutdown);
        let first = peer.batch().await;
        assert_eq!((first.seq, ids(&first).len()), (1, 3));
        assert!(matches!(peer.end(&mut rig).await, End::Lost(_)));

        let mut peer = connect(&mut rig, &shutdown);
        let again = peer.batch().await;
        assert_eq!(again.seq, 1, "sequence numbers restart per stream");
        assert_eq!(ids(&again), ids(&first));
        assert_eq!(rig.counters.get(Counter::DetectionsResent), 3);
        peer.send(Down::Ack(Ack { seq: 1 })).await;
        until("the ack to reach the spool", || rig.sp.spool.pending() == 0).await;
        rig.sp.writer_done.cancel();
        shutdown.cancel();
        let task = peer.task;
        let (_, end) = tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
        assert_eq!(end, End::Shutdown);
    }

    #[tokio::test]
    async fn a_later_ack_covers_earlier_batches_and_a_late_older_ack_changes_nothing() {
        let mut rig = rig(1200);
        let shutdown = CancellationToken::new();
        let mut peer = connect(&mut rig, &shutdown);
        let sizes = [peer.batch().await, peer.batch().await, peer.batch().await]
            .map(|b| (b.seq, b.detections.len()));
        assert_eq!(sizes, [(1, 500), (2, 500), (3, 200)]);
        peer.send(Down::Ack(Ack { seq: 2 })).await;
        until("batches 1 and 2 acknowledged", || {
            rig.sp.spool.acked() == 1000
        })
        .await;
        peer.send(Down::Ack(Ack { seq: 1 })).await;
        peer.send(Down::Ack(Ack { seq: 3 })).await;
        until("batch 3 acknowledged", || rig.sp.spool.acked() == 1200).await;
        assert_eq!(rig.counters.get(Counter::DetectionsAcked), 1200);
        assert!(matches!(peer.end(&mut rig).await, End::Lost(_)));
    }

    #[tokio::test]
    async fn a_bundle_offered_between_batches_is_handed_over_and_delivery_goes_on() {
        let mut rig = rig(600);
        let shutdown = CancellationToken::new();
        let mut peer = connect(&mut rig, &shutdown);
        let b1 = peer.batch().await;
        let bundle = RuleBundle {
            version: 7,
            name: "fleet".into(),
            ..Default::default()
        };
        peer.send(Down::Bundle(bundle)).await;
        let b2 = peer.batch().await;
        assert_eq!((b1.seq, b2.seq, b2.detections.len()), (1, 2, 100));
        until("the bundle offered to the applier", || {
            rig.offered
                .borrow()
                .as_ref()
                .is_some_and(|b| b.version == 7)
        })
        .await;
        let status = BundleStatus {
            version: 7,
            applied: true,
            error: String::new(),
        };
        rig.statuses.send(status.clone()).await.unwrap();
        match peer.next().await {
            Msg::BundleStatus(s) => assert_eq!(s, status),
            other => panic!("expected the bundle status, got {other:?}"),
        }
        peer.send(Down::Ack(Ack { seq: 2 })).await;
        until("everything acknowledged", || rig.sp.spool.pending() == 0).await;
        assert!(matches!(peer.end(&mut rig).await, End::Lost(_)));
    }
}
