//! Applying the bundles the collector pushes: the newest offer waits in a watch channel, one
//! is verified and compiled at a time off the async threads, and each outcome is reported back
//! on the agent's stream.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prost::Message;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};
use vedette_proto::v1::{BundleStatus, RuleBundle};

use super::ActiveRules;
use crate::state::write_atomic;

/// Takes offers until the offer channel closes; sends each verdict to `statuses`.
pub async fn run(
    rules: Arc<ActiveRules>,
    mut offered: watch::Receiver<Option<RuleBundle>>,
    statuses: mpsc::Sender<BundleStatus>,
) {
    while offered.changed().await.is_ok() {
        let Some(b) = offered.borrow_and_update().clone() else {
            continue;
        };
        let rules = rules.clone();
        let Ok(status) = tokio::task::spawn_blocking(move || rules.apply(&b)).await else {
            continue;
        };
        if statuses.send(status).await.is_err() {
            return;
        }
    }
}

impl ActiveRules {
    /// Applies a pushed bundle (blocking: it compiles). Returns the status to report.
    pub fn apply(&self, b: &RuleBundle) -> BundleStatus {
        let fail = |error: String| {
            warn!(version = b.version, error = %error, "rule bundle refused; the previous rules keep running");
            BundleStatus {
                version: b.version,
                applied: false,
                error,
            }
        };
        let current = self.applied.load(Ordering::Relaxed);
        if b.version <= current {
            return BundleStatus {
                version: current,
                applied: true,
                error: String::new(),
            };
        }
        let content = match self.check(b) {
            Ok(c) => c,
            Err(e) => return fail(e.to_string()),
        };
        // Charged to the scanning budget (the compiler child is paced as it runs): a debt
        // the rescan pays.
        let cpu = crate::budget::thread_time();
        let compiled = self.compile(Some(&content));
        crate::budget::budget().charge(crate::budget::thread_time() - cpu);
        let rules = match compiled {
            Ok(r) => r,
            Err(e) => return fail(e.to_string()),
        };
        self.accepted(b.version);
        let rules = Arc::new(rules);
        let old = self.current.swap(rules.clone());
        self.applied.store(b.version, Ordering::Relaxed);
        let rescan = self.on_change.get().is_none_or(|f| f(&old, &rules));
        if rescan {
            self.rescan.notify_one();
        }
        if let Err(e) = write_atomic(&self.last_good, &b.encode_to_vec(), 0o600) {
            // Running it anyway: the collector pushes it again after a restart.
            warn!(error = %e, "cannot save the bundle as last-good");
        }
        info!(version = b.version, name = %content.name, publisher = %content.publisher, files = content.files.len(), "rule bundle applied");
        BundleStatus {
            version: b.version,
            applied: true,
            error: String::new(),
        }
    }
}
