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
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tracing::{error, info, warn};
use vedette_proto::client::{ClientTls, connect};
use vedette_proto::limits::{MAX_BATCH_DETECTIONS, MAX_MESSAGE_BYTES};
use vedette_proto::v1::agent_message::Msg;
use vedette_proto::v1::agent_service_client::AgentServiceClient;
use vedette_proto::v1::collector_message::Msg as Down;
use vedette_proto::v1::{
    AgentMessage, BundleStatus, CollectorMessage, Detection, DetectionBatch, Heartbeat, Hello,
    RuleBundle,
};

use crate::counters::Counters;
use crate::inventory;
use crate::spool::Spool;

/// Batches sent and not yet acknowledged, at most.
pub const MAX_IN_FLIGHT: usize = 16;
/// Most detections per batch.
const BATCH_SIZE: usize = 500;
/// About the most payload bytes per batch (well under the message cap).
const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Most detections the spool writer takes from the channel per sync.
const WRITE_GROUP: usize = 1000;

#[derive(Clone)]
pub struct ShipConfig {
    pub collectors: Vec<String>,
    pub tls: ClientTls,
    pub heartbeat: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long shutdown waits for the last acks (what is left stays spooled for the next start).
    pub drain: Duration,
}

/// The spool shared by its writer thread and the shipper task.
pub struct Spooled {
    pub spool: Spool,
    /// Signalled when new records are durable.
    pub written: Notify,
    /// Set when the writer has taken its last detection (shutdown).
    pub writer_done: CancellationToken,
}

impl Spooled {
    pub fn new(spool: Spool) -> Arc<Spooled> {
        Arc::new(Spooled {
            spool,
            written: Notify::new(),
            writer_done: CancellationToken::new(),
        })
    }
}

/// The spool writer: takes detections from the scan stages and makes them durable, one sync
/// per group. Runs on its own thread until every sender is gone. A write that fails (disk full,
/// I/O error) is retried, and the channel fills meanwhile, so the scanners wait: nothing is
/// dropped for a full disk.
pub fn write_spool(sp: &Spooled, mut rx: mpsc::Receiver<Detection>, counters: &Counters) {
    let mut failing = false;
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < WRITE_GROUP {
            match rx.try_recv() {
                Ok(d) => group.push(d),
                Err(_) => break,
            }
        }
        // A detection too large for a spool record cannot happen within the protocol's string
        // caps; should one appear, it is logged and counted, and the others are kept.
        let before = group.len();
        group.retain(|d| prost::Message::encoded_len(d) <= crate::spool::MAX_RECORD);
        if group.len() < before {
            error!(
                count = before - group.len(),
                "detection larger than a spool record; not spooled"
            );
            counters.add("detections_dropped", (before - group.len()) as u64);
        }
        let mut pause = Duration::from_millis(100);
        while !group.is_empty() {
            match sp.spool.append(&group) {
                Ok(dropped) => {
                    if failing {
                        info!("spool writes work again");
                        failing = false;
                    }
                    counters.add("detections_spooled", group.len() as u64);
                    counters.add("detections_dropped", dropped);
                    sp.written.notify_one();
                    break;
                }
                Err(e) => {
                    if !failing {
                        error!(error = %e, "cannot write the spool; detections wait until it works");
                        failing = true;
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
        counters.set("spool_bytes", sp.spool.bytes());
    }
    sp.writer_done.cancel();
    sp.written.notify_one();
}

/// The shipper's side of fleet bundles: it offers what the collector pushes, reports what the
/// applier decided, and says in Hello which version runs.
pub struct BundleLink {
    pub fleet: Arc<crate::rules::Fleet>,
    pub offers: tokio::sync::watch::Sender<Option<RuleBundle>>,
    pub statuses: mpsc::Receiver<BundleStatus>,
}

/// Why a connection ended.
enum End {
    Shutdown,
    Lost(String),
}

/// A batch on the wire.
struct InFlight {
    seq: u64,
    last_id: u64,
    count: u64,
}

struct Shipper {
    cfg: ShipConfig,
    sp: Arc<Spooled>,
    counters: Arc<Counters>,
    bundles: BundleLink,
    /// Highest record id sent on any connection: records at or below it are resends.
    max_sent: u64,
    /// Set when shutdown starts: the last moment to wait for acks, across reconnects.
    drain_deadline: Option<Instant>,
}

/// Runs until `shutdown` fires and everything spooled has been acknowledged, or the drain time
/// ran out (what is left stays in the spool for the next start).
pub async fn run(
    cfg: ShipConfig,
    sp: Arc<Spooled>,
    bundles: BundleLink,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) {
    let mut s = Shipper {
        cfg,
        sp,
        counters,
        bundles,
        max_sent: 0,
        drain_deadline: None,
    };
    let mut backoff = s.cfg.backoff_min;
    let mut attempt = 0usize;
    let mut connected_once = false;
    let mut last_error: Option<String> = None;
    loop {
        let addr = s.cfg.collectors[attempt % s.cfg.collectors.len()].clone();
        attempt += 1;
        s.counters.inc("connect_attempts");
        let applied = s
            .bundles
            .fleet
            .applied
            .load(std::sync::atomic::Ordering::Relaxed);
        let end = match open(&s.cfg, &addr, applied).await {
            Ok((up, down)) => {
                info!(collector = %addr, "connected to collector");
                connected_once = true;
                last_error = None;
                backoff = s.cfg.backoff_min;
                s.counters.inc("connections");
                s.session(up, down, &shutdown).await
            }
            Err(e) => End::Lost(e),
        };
        match end {
            End::Shutdown => return,
            End::Lost(e) => {
                if last_error.as_deref() != Some(e.as_str()) {
                    if connected_once {
                        warn!(collector = %addr, error = %e, "collector connection lost; retrying with backoff");
                    } else {
                        warn!(collector = %addr, error = %e, "cannot reach the collector; retrying with backoff");
                    }
                    last_error = Some(e);
                }
            }
        }
        if shutdown.is_cancelled() {
            let left = s.sp.spool.pending();
            if left > 0 {
                warn!(
                    undelivered = left,
                    "stopping with detections the collector has not acknowledged; they stay spooled for the next start"
                );
            }
            return;
        }
        // Full jitter: sleep a random time between half and all of the current backoff.
        let sleep = rand::rng().random_range(backoff / 2..=backoff);
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(sleep) => {}
        }
        backoff = (backoff * 2).min(s.cfg.backoff_max);
    }
}

type Up = mpsc::Sender<AgentMessage>;

/// Opens the stream and sends Hello.
async fn open(
    cfg: &ShipConfig,
    addr: &str,
    bundle_version: u64,
) -> Result<(Up, Streaming<CollectorMessage>), String> {
    let channel = connect(addr, &cfg.tls).await.map_err(|e| error_chain(&e))?;
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
    up.send(hello)
        .await
        .map_err(|_| "stream closed".to_string())?;
    let down = client
        .connect(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    Ok((up, down))
}

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

impl Shipper {
    /// Reads the next batch from the spool (off the async threads: it is file I/O).
    async fn read(&self, from: u64) -> Result<Option<crate::spool::Batch>, String> {
        let sp = self.sp.clone();
        let max = BATCH_SIZE.min(MAX_BATCH_DETECTIONS);
        tokio::task::spawn_blocking(move || sp.spool.read(from, max, BATCH_BYTES))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot read the spool: {e}"))
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

    async fn session(
        &mut self,
        up: Up,
        mut down: Streaming<CollectorMessage>,
        shutdown: &CancellationToken,
    ) -> End {
        // Sequence numbers are per stream; each connection starts from the first record the
        // collector has not acknowledged.
        let mut next_seq: u64 = 1;
        let mut cursor = self.sp.spool.acked() + 1;
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        // Whether the spool had nothing more to read; cleared when the writer signals.
        let mut idle = false;
        let mut heartbeat = tokio::time::interval(self.cfg.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let draining = shutdown.is_cancelled();
            if draining {
                let deadline = *self
                    .drain_deadline
                    .get_or_insert_with(|| Instant::now() + self.cfg.drain);
                if self.sp.writer_done.is_cancelled()
                    && in_flight.is_empty()
                    && self.sp.spool.pending() == 0
                {
                    return End::Shutdown;
                }
                if Instant::now() >= deadline {
                    warn!(
                        undelivered = self.sp.spool.pending(),
                        "drain time ran out; unacknowledged detections stay spooled for the next start"
                    );
                    return End::Shutdown;
                }
            }
            if !idle && in_flight.len() < MAX_IN_FLIGHT {
                match self.read(cursor).await {
                    Ok(Some(batch)) => {
                        let count = batch.detections.len() as u64;
                        let resent = batch
                            .detections
                            .len()
                            .min(self.max_sent.saturating_sub(cursor - 1) as usize);
                        self.counters.add("detections_resent", resent as u64);
                        self.counters.add("detections_sent", count);
                        self.max_sent = self.max_sent.max(batch.last_id);
                        cursor = batch.last_id + 1;
                        let seq = next_seq;
                        next_seq += 1;
                        in_flight.push_back(InFlight {
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
                        if up.send(msg).await.is_err() {
                            return End::Lost("stream closed".into());
                        }
                        continue;
                    }
                    Ok(None) => idle = true,
                    Err(e) => {
                        error!(error = %e, "spool read failed");
                        idle = true;
                    }
                }
            }
            tokio::select! {
                biased;
                msg = down.message() => match msg {
                    Ok(Some(CollectorMessage { msg: Some(Down::Ack(ack)) })) => {
                        // Acks arrive in order; every batch up to `ack.seq` is committed.
                        let mut upto = None;
                        while in_flight.front().is_some_and(|b| b.seq <= ack.seq) {
                            if let Some(b) = in_flight.pop_front() {
                                self.counters.add("detections_acked", b.count);
                                upto = Some(b.last_id);
                            }
                        }
                        if let Some(id) = upto {
                            self.ack(id).await;
                        }
                    }
                    Ok(Some(CollectorMessage { msg: Some(Down::Bundle(b)) })) => {
                        info!(version = b.version, name = %b.name, "rule bundle received");
                        self.bundles.offers.send_replace(Some(b));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return End::Lost("the collector closed the stream".into()),
                    Err(s) => return End::Lost(format!("{}: {}", s.code(), s.message())),
                },
                () = self.sp.written.notified(), if idle => idle = false,
                Some(status) = self.bundles.statuses.recv() => {
                    let msg = AgentMessage { msg: Some(Msg::BundleStatus(status)) };
                    if up.send(msg).await.is_err() {
                        return End::Lost("stream closed".into());
                    }
                }
                _ = heartbeat.tick() => {
                    self.counters.set("spool_pending", self.sp.spool.pending());
                    self.counters.set("spool_bytes", self.sp.spool.bytes());
                    let hb = AgentMessage {
                        msg: Some(Msg::Heartbeat(Heartbeat {
                            counters: self.counters.snapshot().into_iter().collect(),
                            dropped_total: self.sp.spool.dropped(),
                        })),
                    };
                    // Never wait on a heartbeat: if the stream is congested, skip it.
                    let _ = up.try_send(hb);
                }
                () = shutdown.cancelled(), if !draining => {}
                () = tokio::time::sleep(Duration::from_millis(100)), if draining => {}
            }
        }
    }
}
