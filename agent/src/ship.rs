//! Shipping detections to the collector over the agent's mutual-TLS stream.
//!
//! One task owns the connection. It sends Hello, then detections in sequence-numbered batches,
//! and heartbeats. A batch stays in `unacked` until the collector's Ack for its sequence number
//! arrives (the collector acks only after its store committed), and every unacked batch is sent
//! again on the next connection: delivery is at least once, and the collector stores each
//! detection id once, so the store sees it exactly once.
//!
//! Backpressure: at most [`MAX_IN_FLIGHT`] batches wait for an Ack; past that the task stops
//! reading new detections, the bounded channel fills, and the scan workers wait.
//!
//! On connection failure the task backs off (exponential, jittered, capped) and tries the next
//! collector address; it logs when the state changes, not on every retry.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tracing::{info, warn};
use vedette_proto::client::{ClientTls, connect};
use vedette_proto::limits::{MAX_BATCH_DETECTIONS, MAX_MESSAGE_BYTES};
use vedette_proto::v1::agent_message::Msg;
use vedette_proto::v1::agent_service_client::AgentServiceClient;
use vedette_proto::v1::collector_message::Msg as Down;
use vedette_proto::v1::{
    AgentMessage, CollectorMessage, Detection, DetectionBatch, Heartbeat, Hello,
};

use crate::counters::Counters;
use crate::inventory;

/// Batches sent and not yet acknowledged, at most.
pub const MAX_IN_FLIGHT: usize = 16;
/// Most detections per batch.
const BATCH_SIZE: usize = 500;
/// How long a detection may wait for companions before its batch is sent.
const LINGER: Duration = Duration::from_millis(20);

#[derive(Clone)]
pub struct ShipConfig {
    pub collectors: Vec<String>,
    pub tls: ClientTls,
    pub heartbeat: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long shutdown waits for the last acks.
    pub drain: Duration,
}

/// Why a connection ended.
enum End {
    Shutdown,
    Lost(String),
}

struct Shipper {
    cfg: ShipConfig,
    counters: Arc<Counters>,
    bundle_version: u64,
    /// Detections sent (or about to be) and not yet acknowledged, oldest first.
    unacked: VecDeque<Vec<Detection>>,
    /// Set when shutdown starts: the last moment to wait for acks, across reconnects.
    drain_deadline: Option<Instant>,
}

/// Runs until `shutdown` fires and every received detection has been acked, or the drain time
/// ran out (whatever is left then is logged as undelivered).
pub async fn run(
    cfg: ShipConfig,
    mut detections: mpsc::Receiver<Detection>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) {
    let mut s = Shipper {
        cfg,
        counters,
        bundle_version: 0,
        unacked: VecDeque::new(),
        drain_deadline: None,
    };
    let mut backoff = s.cfg.backoff_min;
    let mut attempt = 0usize;
    let mut connected_once = false;
    let mut last_error: Option<String> = None;
    loop {
        let addr = s.cfg.collectors[attempt % s.cfg.collectors.len()].clone();
        attempt += 1;
        let end = match open(&s.cfg, &addr, s.bundle_version).await {
            Ok((up, down)) => {
                info!(collector = %addr, "connected to collector");
                connected_once = true;
                last_error = None;
                backoff = s.cfg.backoff_min;
                s.counters.inc("connections");
                s.session(up, down, &mut detections, &shutdown).await
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
            let left: usize = s.unacked.iter().map(Vec::len).sum::<usize>() + detections.len();
            if left > 0 {
                warn!(
                    undelivered = left,
                    "stopping with detections the collector has not acknowledged"
                );
            }
            return;
        }
        // Full jitter: sleep a random time up to the current backoff.
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
    async fn session(
        &mut self,
        up: Up,
        mut down: Streaming<CollectorMessage>,
        detections: &mut mpsc::Receiver<Detection>,
        shutdown: &CancellationToken,
    ) -> End {
        // Sequence numbers are per stream: batch `first_seq + i` is `unacked[i]`.
        let first_seq: u64 = 1;
        let mut acked_upto: u64 = 0;
        for (i, batch) in self.unacked.iter().enumerate() {
            self.counters.add("detections_resent", batch.len() as u64);
            if send_batch(&up, first_seq + i as u64, batch.clone())
                .await
                .is_err()
            {
                return End::Lost("stream closed while resending".into());
            }
        }
        let mut next_seq = first_seq + self.unacked.len() as u64;
        let mut heartbeat = tokio::time::interval(self.cfg.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut input_open = true;
        loop {
            let draining = shutdown.is_cancelled();
            if draining {
                let deadline = *self
                    .drain_deadline
                    .get_or_insert_with(|| Instant::now() + self.cfg.drain);
                // Everything received is sent; stop once the collector acked it all.
                if self.unacked.is_empty() && (detections.is_empty() || !input_open) {
                    return End::Shutdown;
                }
                if Instant::now() >= deadline {
                    let left: usize =
                        self.unacked.iter().map(Vec::len).sum::<usize>() + detections.len();
                    warn!(
                        undelivered = left,
                        "drain time ran out before every detection was acknowledged"
                    );
                    return End::Shutdown;
                }
            }
            let can_take = input_open && self.unacked.len() < MAX_IN_FLIGHT;
            tokio::select! {
                biased;
                msg = down.message() => match msg {
                    Ok(Some(CollectorMessage { msg: Some(Down::Ack(ack)) })) => {
                        // Acks arrive in order; everything up to `ack.seq` is committed.
                        while acked_upto < ack.seq && !self.unacked.is_empty() {
                            let b = self.unacked.pop_front().unwrap_or_default();
                            self.counters.add("detections_acked", b.len() as u64);
                            acked_upto += 1;
                        }
                    }
                    Ok(Some(CollectorMessage { msg: Some(Down::Bundle(b)) })) => {
                        info!(version = b.version, "rule bundle offered; fleet bundles are not applied by this agent version");
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return End::Lost("the collector closed the stream".into()),
                    Err(s) => return End::Lost(format!("{}: {}", s.code(), s.message())),
                },
                first = detections.recv(), if can_take => {
                    let Some(first) = first else {
                        input_open = false;
                        continue;
                    };
                    let mut batch = vec![first];
                    let linger = tokio::time::sleep(LINGER);
                    tokio::pin!(linger);
                    while batch.len() < BATCH_SIZE.min(MAX_BATCH_DETECTIONS) {
                        tokio::select! {
                            d = detections.recv() => match d {
                                Some(d) => batch.push(d),
                                None => { input_open = false; break; }
                            },
                            () = &mut linger => break,
                        }
                    }
                    self.counters.add("detections_sent", batch.len() as u64);
                    self.unacked.push_back(batch.clone());
                    let seq = next_seq;
                    next_seq += 1;
                    if send_batch(&up, seq, batch).await.is_err() {
                        return End::Lost("stream closed".into());
                    }
                }
                _ = heartbeat.tick() => {
                    let hb = AgentMessage {
                        msg: Some(Msg::Heartbeat(Heartbeat {
                            counters: self.counters.snapshot().into_iter().collect(),
                            dropped_total: self.counters.get("detections_dropped"),
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

async fn send_batch(up: &Up, seq: u64, detections: Vec<Detection>) -> Result<(), ()> {
    up.send(AgentMessage {
        msg: Some(Msg::Batch(DetectionBatch { seq, detections })),
    })
    .await
    .map_err(|_| ())
}
