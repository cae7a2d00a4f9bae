//! What the collector counts, exposed at `metrics_listen` (`/metrics`, OpenMetrics text).
//!
//! One [`Metrics`] per process, shared by the accept loop, the request guard and the handlers.
//! Every name starts with `vedette_collector_`; counters end in `_total` and durations are
//! histograms in seconds.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A label set of one label.
pub type Label = [(&'static str, String); 1];

/// Why a connection or request was refused (the `reason` label).
#[derive(Debug, Clone, Copy)]
pub enum Refused {
    /// Over `max_unauthenticated_connections`: closed after the handshake.
    UnauthenticatedLimit,
    /// Without a certificate past `unauthenticated_timeout`.
    UnauthenticatedTimeout,
    /// A call other than Enroll without a client certificate.
    NoCertificate,
    /// A revoked certificate.
    Revoked,
    /// An enrollment request over its size cap.
    OversizedEnrollment,
    /// The TLS handshake failed or timed out.
    Handshake,
    /// Over `max_connections`: closed on accept.
    ConnectionLimit,
}

impl Refused {
    fn label(self) -> &'static str {
        match self {
            Refused::UnauthenticatedLimit => "unauthenticated_limit",
            Refused::UnauthenticatedTimeout => "unauthenticated_timeout",
            Refused::NoCertificate => "no_certificate",
            Refused::Revoked => "revoked",
            Refused::OversizedEnrollment => "oversized_enrollment",
            Refused::Handshake => "tls_handshake",
            Refused::ConnectionLimit => "connection_limit",
        }
    }
}

/// The collector's metrics.
#[derive(Debug)]
pub struct Metrics {
    pub agents_connected: Gauge,
    pub detections_received: Counter,
    pub detections_committed: Counter,
    pub heartbeats: Counter,
    pub store_commit_seconds: Histogram,
    enrollments: Family<Label, Counter>,
    refused: Family<Label, Counter>,
    /// Backlog of each export sink, sampled by [`crate::server`] every few seconds.
    pub export_backlog: Family<Label, Gauge>,
    /// The bundle version each connected agent applied.
    applied: Mutex<HashMap<String, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            agents_connected: Gauge::default(),
            detections_received: Counter::default(),
            detections_committed: Counter::default(),
            heartbeats: Counter::default(),
            // 0.5 ms to about 16 s.
            store_commit_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            enrollments: Family::default(),
            refused: Family::default(),
            export_backlog: Family::default(),
            applied: Mutex::new(HashMap::new()),
        }
    }
}

impl Metrics {
    /// An enrollment's outcome: `ok`, or why it was refused (`unknown_token`, `expired`, ...).
    pub fn enrollment(&self, result: &str) {
        self.enrollments
            .get_or_create(&[("result", result.to_string())])
            .inc();
    }

    pub fn refused(&self, why: Refused) {
        self.refused
            .get_or_create(&[("reason", why.label().to_string())])
            .inc();
    }

    /// Records the bundle version a connected agent runs.
    pub fn agent_applied(&self, agent: &str, version: u64) {
        self.applied_map().insert(agent.to_string(), version);
    }

    pub fn agent_gone(&self, agent: &str) {
        self.applied_map().remove(agent);
    }

    fn applied_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.applied.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The registry to serve: every metric above plus the throttle's counters.
    pub fn registry(
        self: &std::sync::Arc<Self>,
        throttle: &crate::server::throttle::Throttle,
    ) -> Registry {
        let mut r = Registry::with_prefix("vedette_collector");
        r.register(
            "agents_connected",
            "Agents with an open stream to this collector",
            self.agents_connected.clone(),
        );
        r.register(
            "detections_received",
            "Detections received in batches (resends included)",
            self.detections_received.clone(),
        );
        r.register(
            "detections_committed",
            "Detections newly committed to the store (each detection id once)",
            self.detections_committed.clone(),
        );
        r.register(
            "heartbeats",
            "Agent heartbeats received",
            self.heartbeats.clone(),
        );
        r.register(
            "store_commit_seconds",
            "Time to commit one detection batch to the store",
            self.store_commit_seconds.clone(),
        );
        r.register(
            "enrollments",
            "Enrollment requests, by result (ok or the reason for refusing)",
            self.enrollments.clone(),
        );
        r.register(
            "refused",
            "Connections and requests refused, by reason",
            self.refused.clone(),
        );
        r.register(
            "export_backlog_detections",
            "Detections stored but not yet exported, per sink",
            self.export_backlog.clone(),
        );
        r.register(
            "throttle_delays",
            "Agent messages held back by the per-agent rate limits",
            throttle.delayed.clone(),
        );
        r.register(
            "throttle_delay_seconds",
            "Time agent messages were held back by the per-agent rate limits",
            throttle.delay_seconds.clone(),
        );
        r.register_collector(Box::new(Sampled(self.clone())));
        r
    }
}

/// What is computed at each scrape.
#[derive(Debug)]
struct Sampled(std::sync::Arc<Metrics>);

impl Collector for Sampled {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let errors = ConstCounter::new(crate::store::errors());
        let family = encoder.encode_descriptor(
            "store_errors",
            "Store calls that failed (the database down or refusing, a disk full); what they \
             carried was not acknowledged and is sent again",
            None,
            errors.metric_type(),
        )?;
        errors.encode(family)?;
        let mut per_version: BTreeMap<u64, i64> = BTreeMap::new();
        for v in self.0.applied_map().values() {
            *per_version.entry(*v).or_default() += 1;
        }
        let g = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "agents_by_bundle_version",
            "Connected agents by the rule bundle version they applied (0: none)",
            None,
            g.metric_type(),
        )?;
        for (version, n) in per_version {
            let labels = [("version", version.to_string())];
            ConstGauge::new(n).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
