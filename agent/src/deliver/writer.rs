//! The spool writer: one thread that takes detections from every scanning stage and makes
//! them durable in the [`Spool`], one `fdatasync` per group, before the shipper may send them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};
use vedette_proto::v1::Detection;

use super::spool::{MAX_RECORD, Spool};
use crate::rules::ActiveRules;
use crate::telemetry::{Counter, Counters};

/// Most detections the spool writer takes from the channel per sync.
const WRITE_GROUP: usize = 1000;

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

/// Applies the bundle's settings of built-in findings: drops those turned off here (counted),
/// and gives the others their score.
fn settle_findings(group: &mut Vec<Detection>, rules: &ActiveRules, counters: &Counters) {
    if !group.iter().any(|d| d.rule.starts_with("vedette.")) {
        return;
    }
    let findings = rules.findings();
    group.retain_mut(|d| match findings.get(d.rule.as_str()) {
        Some(f) if !f.enabled => {
            debug!(rule = %d.rule, "built-in finding turned off here by the bundle");
            counters.inc(Counter::FindingsOff);
            false
        }
        Some(f) => {
            d.score = f.score;
            true
        }
        None => true,
    });
}

/// Drops the detections an exception covers, counting them.
fn suppress(group: &mut Vec<Detection>, rules: &ActiveRules, counters: &Counters) {
    let set = rules.current.load();
    let exceptions = set.exceptions();
    if exceptions.is_empty() {
        return;
    }
    let now = vedette_proto::now_ms();
    group.retain(|d| match exceptions.covering(d, "", "", now) {
        Some(id) => {
            debug!(rule = %d.rule, exception = %id, "detection suppressed by an exception");
            counters.inc(Counter::Suppressed);
            false
        }
        None => true,
    });
}

/// The spool writer: takes detections from the scan stages and makes them durable, one sync
/// per group. Runs on its own thread until every sender is gone. A write that fails (an I/O
/// error, a disk still full) is retried, and the channel fills meanwhile, so the scanners wait;
/// on a full disk the spool makes room, or refuses what ranks below what it holds (counted as
/// dropped, never silent).
/// Detections an exception of the running bundle covers are dropped here, the one place
/// every stage's detections pass, and counted (`suppressed`).
pub fn write_spool(
    sp: &Spooled,
    mut rx: mpsc::Receiver<Detection>,
    counters: &Counters,
    rules: &ActiveRules,
) {
    let mut failing = false;
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < WRITE_GROUP {
            match rx.try_recv() {
                Ok(d) => group.push(d),
                Err(_) => break,
            }
        }
        settle_findings(&mut group, rules, counters);
        suppress(&mut group, rules, counters);
        if group.is_empty() {
            continue;
        }
        // A detection too large for a spool record cannot happen within the protocol's string
        // caps; should one appear, it is logged and counted, and the others are kept.
        let before = group.len();
        group.retain(|d| prost::Message::encoded_len(d) <= MAX_RECORD);
        if group.len() < before {
            error!(
                count = before - group.len(),
                "detection larger than a spool record; not spooled"
            );
            counters.add(Counter::DetectionsDropped, (before - group.len()) as u64);
        }
        let mut pause = Duration::from_millis(100);
        while !group.is_empty() {
            // What a failed write left in the spool, or refused, is taken from the group and
            // not written again.
            let (appended, result) = sp.spool.append_from(&mut group);
            counters.add(Counter::DetectionsSpooled, appended.spooled);
            counters.add(
                Counter::DetectionsDropped,
                appended.evicted + appended.refused,
            );
            if appended.spooled > 0 {
                sp.written.notify_one();
            }
            match result {
                Ok(()) => {
                    if failing {
                        info!("spool writes work again");
                        failing = false;
                    }
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
        counters.set(Counter::SpoolBytes, sp.spool.bytes());
    }
    sp.writer_done.cancel();
    sp.written.notify_one();
}
