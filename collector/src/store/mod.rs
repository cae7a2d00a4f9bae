//! Durable state of the collector: enrollment tokens, agents, detections, rule bundles.
//!
//! [`Store`] is the interface; [`open`] picks the implementation from the configured
//! location: SQLite (one file, one collector) or PostgreSQL (shared by any number of
//! collectors). The store is synchronous (both implementations block); async callers go
//! through `tokio::task::spawn_blocking`. Invariant: when a write method returns `Ok`, the
//! change is committed, so an Ack sent afterwards never promises something a crash could take
//! back.

mod postgres;
mod rows;
mod sqlite;
#[cfg(test)]
mod suite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vedette_proto::v1::{Detection, Inventory, StoredDetection};
pub use vedette_share::sharing::Tally;

/// Where the store lives (`[store] url` in collector.toml).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite file (`sqlite:PATH` or a plain path).
    Sqlite(PathBuf),
    /// A PostgreSQL database (`postgres://...`); TLS to it when `ca_cert` is given.
    Postgres {
        url: String,
        ca_cert: Option<PathBuf>,
    },
}

impl StoreLocation {
    /// The location a `[store] url` names; relative SQLite paths are taken from `base`.
    pub fn parse(url: &str, base: &std::path::Path) -> Result<StoreLocation, StoreUrlError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            url.parse::<tokio_postgres::Config>()
                .map_err(|e| StoreUrlError::Postgres {
                    url: redact(url),
                    reason: e.to_string(),
                })?;
            return Ok(StoreLocation::Postgres {
                url: url.to_string(),
                ca_cert: None,
            });
        }
        if url.contains("://") {
            return Err(StoreUrlError::Scheme(redact(url)));
        }
        let path = url.strip_prefix("sqlite:").unwrap_or(url);
        if path.is_empty() {
            return Err(StoreUrlError::EmptyPath);
        }
        Ok(StoreLocation::Sqlite(base.join(path)))
    }

    /// For messages: the URL without its password.
    pub fn display(&self) -> String {
        match self {
            StoreLocation::Sqlite(p) => p.display().to_string(),
            StoreLocation::Postgres { url, .. } => redact(url),
        }
    }
}

/// Why a `[store] url` names no store (the URL shown without its password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreUrlError {
    #[error("`{url}`: {reason}")]
    Postgres { url: String, reason: String },
    #[error("`{0}` is neither a SQLite path (`sqlite:PATH`) nor a `postgres://` URL")]
    Scheme(String),
    #[error("an empty SQLite path")]
    EmptyPath,
}

/// A URL with any password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(p) => p,
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// Who opens a store, which decides what opening may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opener {
    /// `serve`: brings the schema up to date.
    Server,
    /// A tool (`doctor`, `certs issue`, `users`): schema changes are the server's; a tool
    /// sets up only a store that is new, and refuses one whose schema is older than it knows
    /// (a collector of the older version may be running on it).
    Tool,
}

/// Opens the store at `location` as `serve` does, bringing its schema up to date.
pub fn open(location: &StoreLocation) -> Result<Arc<dyn Store>, StoreError> {
    open_as(location, Opener::Server)
}

/// Opens the store at `location` for `opener`.
pub fn open_as(location: &StoreLocation, opener: Opener) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match location {
        StoreLocation::Sqlite(path) => Arc::new(SqliteStore::open(path, opener)?),
        StoreLocation::Postgres { url, ca_cert } => {
            Arc::new(PgStore::open(url, ca_cert.as_deref(), opener)?)
        }
    })
}

/// Store calls of the server that failed in this process (the database down, a disk full):
/// what `vedette_collector_store_errors_total` reports.
static ERRORS: AtomicU64 = AtomicU64::new(0);

/// Whether the last store call of the server failed: an outage is logged when it starts and
/// when it ends, not at every failed call.
static FAILING: AtomicBool = AtomicBool::new(false);

/// The error count when the current outage started.
static OUTAGE_START: AtomicU64 = AtomicU64::new(0);

/// Counts one failed store call; true for the first failure of an outage (the one to log).
pub fn count_error() -> bool {
    let before = ERRORS.fetch_add(1, Ordering::Relaxed);
    let first = !FAILING.swap(true, Ordering::Relaxed);
    if first {
        OUTAGE_START.store(before, Ordering::Relaxed);
    }
    first
}

/// Notes a store call that succeeded: when it ends an outage, how many calls failed in it.
pub fn count_success() -> Option<u64> {
    if !FAILING.load(Ordering::Relaxed) || !FAILING.swap(false, Ordering::Relaxed) {
        return None;
    }
    Some(errors().saturating_sub(OUTAGE_START.load(Ordering::Relaxed)))
}

/// Store calls that failed so far.
pub fn errors() -> u64 {
    ERRORS.load(Ordering::Relaxed)
}

/// What one collector tells the others that share its store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// A bundle of this version was published.
    Bundle(u64),
    /// This agent was revoked: whoever holds its stream closes it.
    Revoked(String),
    /// The certificate with this serial number (hex) was revoked.
    CertRevoked(String),
    /// A hunt was started: every agent stream looks for hunts to send.
    Hunt(String),
    /// A response action was approved: every agent stream looks for actions due.
    Actions,
    /// Events may have been missed (the listening connection was re-made): compare what is
    /// held with the store.
    Resync,
}

impl StoreEvent {
    pub(crate) fn encode(&self) -> String {
        match self {
            StoreEvent::Bundle(v) => format!("bundle:{v}"),
            StoreEvent::Revoked(id) => format!("revoked:{id}"),
            StoreEvent::CertRevoked(serial) => format!("cert:{serial}"),
            StoreEvent::Hunt(id) => format!("hunt:{id}"),
            StoreEvent::Actions => "actions".into(),
            StoreEvent::Resync => "resync".into(),
        }
    }

    pub(crate) fn decode(text: &str) -> Option<StoreEvent> {
        match text.split_once(':') {
            Some(("bundle", v)) => v.parse().ok().map(StoreEvent::Bundle),
            Some(("revoked", id)) if !id.is_empty() => Some(StoreEvent::Revoked(id.to_string())),
            Some(("cert", serial)) if !serial.is_empty() => {
                Some(StoreEvent::CertRevoked(serial.to_string()))
            }
            Some(("hunt", id)) if !id.is_empty() => Some(StoreEvent::Hunt(id.to_string())),
            _ if text == "resync" => Some(StoreEvent::Resync),
            _ if text == "actions" => Some(StoreEvent::Actions),
            _ => None,
        }
    }
}

/// The collector's durable state. Every method commits before it returns `Ok`.
pub trait Store: Send + Sync {
    /// Tells every collector sharing this store, this one included (nothing to tell with
    /// SQLite: one collector).
    fn announce(&self, _event: &StoreEvent) -> Result<(), StoreError> {
        Ok(())
    }

    /// The events any collector sharing this store announces, until `stop` fires; None where
    /// the store is not shared.
    fn subscribe(
        &self,
        _stop: tokio_util::sync::CancellationToken,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<StoreEvent>>, StoreError> {
        Ok(None)
    }

    /// Records a token that enrolls agents into organisation `org`.
    fn create_token(&self, t: &TokenRow) -> Result<(), StoreError>;

    /// Every token, oldest first.
    fn list_tokens(&self) -> Result<Vec<TokenRow>, StoreError>;

    /// Revokes a token by its hash: it enrolls nothing from now on. False when there is no such
    /// token or it was revoked already.
    fn revoke_token(&self, hash: &str, now_ms: i64) -> Result<bool, StoreError>;

    /// Renames an organisation and moves its tokens with it; false when it does not exist or
    /// the new name is taken. The caller checks first that nothing else names it.
    fn rename_org(&self, name: &str, new_name: &str) -> Result<bool, StoreError>;

    /// Removes an organisation and revokes its unrevoked tokens (how many); None when it does
    /// not exist. The caller checks first that nothing else names it.
    fn remove_org(&self, name: &str, now_ms: i64) -> Result<Option<u32>, StoreError>;

    /// Appends an entry to the audit log (which has no update and no delete).
    fn record_audit(&self, e: &AuditRow) -> Result<(), StoreError>;

    /// The most recent `limit` audit entries at or after `since_ms`, of organisation `org`
    /// when given; oldest first.
    fn list_audit(
        &self,
        since_ms: i64,
        org: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError>;

    /// Audit entries after sequence number `after` made before `before_ms`, oldest first, at
    /// most `limit` (for export).
    fn audit_after(
        &self,
        after: u64,
        before_ms: i64,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError>;

    /// Alerts matching the filter, newest activity first.
    fn list_alerts(&self, f: &AlertFilter) -> Result<Vec<AlertRow>, StoreError>;

    /// One alert.
    fn alert(&self, id: u64) -> Result<Option<AlertRow>, StoreError>;

    /// Every verdict given on an alert, oldest first.
    fn alert_verdicts(&self, id: u64) -> Result<Vec<VerdictRow>, StoreError>;

    /// Gives an alert a verdict: appended to its history, its status set, its new activity
    /// cleared, in one transaction. None when there is no such alert.
    fn judge_alert(&self, v: &VerdictRow) -> Result<Option<AlertRow>, StoreError>;

    /// Verdicts given after sequence number `after`, oldest first, at most `limit` (for the
    /// feedback sinks send to indicators' producers).
    fn verdicts_after(&self, after: u64, limit: u32) -> Result<Vec<VerdictRow>, StoreError>;

    /// Records an exception (checked by the caller); detections stored from now on that it
    /// covers are marked with it.
    fn add_exception(&self, e: &ExceptionRow) -> Result<(), StoreError>;

    /// Every exception, removed and expired ones included, oldest first.
    fn list_exceptions(&self) -> Result<Vec<ExceptionRow>, StoreError>;

    /// Removes an exception (it stays listed, as removed); its row as it is now, None when
    /// there is no such exception. Removing one removed already changes nothing.
    fn remove_exception(
        &self,
        id: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<Option<ExceptionRow>, StoreError>;

    /// Stores a hunt and the agents it asks (those in its scope when it starts).
    fn create_hunt(&self, h: &HuntRow, agents: &[String]) -> Result<(), StoreError>;

    /// Hunts, newest first, with how many agents each asked and how many answered; of one
    /// organisation when `org` is given.
    fn list_hunts(&self, org: Option<&str>) -> Result<Vec<HuntRow>, StoreError>;

    /// One hunt and the agents it asked, each with its answer when it gave one.
    fn hunt(&self, id: &str) -> Result<Option<(HuntRow, Vec<HuntAgentRow>)>, StoreError>;

    /// The hunts that asked this agent, not answered by it and not expired at `now_ms`.
    fn pending_hunts(&self, agent: &str, now_ms: i64) -> Result<Vec<HuntRow>, StoreError>;

    /// Records an agent's answer to a hunt: true the first time, false when it answered before
    /// (the first answer stays) or was not asked.
    fn answer_hunt(
        &self,
        id: &str,
        agent: &str,
        at_ms: i64,
        answer: &[u8],
    ) -> Result<bool, StoreError>;

    /// Stores a response action: a new one when `from_state` is None (false when the id
    /// exists), else a change of the stored one that holds only while its state is still
    /// `from_state` (false when another change came first).
    fn put_action(&self, a: &ActionRow, from_state: Option<&str>) -> Result<bool, StoreError>;

    /// One response action.
    fn action(&self, id: &str) -> Result<Option<ActionRow>, StoreError>;

    /// Response actions, newest first; of one organisation when `org` is given.
    fn list_actions(&self, org: Option<&str>) -> Result<Vec<ActionRow>, StoreError>;

    /// The actions due to an agent: approved or sent, without an outcome, not expired at
    /// `now_ms`; oldest first.
    fn due_actions(&self, agent: &str, now_ms: i64) -> Result<Vec<ActionRow>, StoreError>;

    /// Keeps an agent's last rule profile (a [`RuleProfile`](vedette_proto::v1::RuleProfile),
    /// encoded), replacing the one before, under the organisation it was enrolled into; false
    /// when no such agent exists.
    fn put_rule_profile(&self, agent: &str, profile: &[u8]) -> Result<bool, StoreError>;

    /// Each agent's last rule profile (agent id, encoded profile); of one organisation when
    /// `org` is given.
    fn rule_profiles(&self, org: Option<&str>) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Creates an organisation; false when one of that name exists (left as it is).
    fn create_org(&self, org: &OrgRow) -> Result<bool, StoreError>;

    /// Every organisation by name, with its agent count.
    fn list_orgs(&self) -> Result<Vec<OrgRow>, StoreError>;

    /// Replaces an organisation's sector, country, share and tlp; false when it does not exist.
    fn update_org(&self, org: &OrgRow) -> Result<bool, StoreError>;

    /// Creates a console account, or replaces its password, roles and organisation; true
    /// when it was created.
    fn put_user(&self, user: &UserRow) -> Result<bool, StoreError>;

    /// One console account.
    fn user(&self, name: &str) -> Result<Option<UserRow>, StoreError>;

    /// Every console account, by name.
    fn list_users(&self) -> Result<Vec<UserRow>, StoreError>;

    /// Removes a console account; false when there was none.
    fn remove_user(&self, name: &str) -> Result<bool, StoreError>;

    /// Records a certificate issued (or first seen in use); a serial already known is left as
    /// it is.
    fn record_cert(&self, cert: &CertRow) -> Result<(), StoreError>;

    /// Every recorded certificate, by serial number.
    fn list_certs(&self) -> Result<Vec<CertRow>, StoreError>;

    /// Revokes a certificate by serial number (recorded or not); whether it was newly revoked,
    /// and its row.
    fn revoke_cert(&self, serial: &str, now_ms: i64) -> Result<(bool, CertRow), StoreError>;

    /// Serial numbers of every revoked certificate.
    fn revoked_serials(&self) -> Result<Vec<String>, StoreError>;

    /// Marks every agent disconnected: `serve` calls it once its listeners are bound, since no
    /// agent can be connected to a collector that was not running. A store shared by several
    /// collectors keeps the flags, which are the other collectors' to change.
    fn reset_connections(&self) -> Result<(), StoreError>;

    /// Counts one sign-in attempt against each budget in turn (a key: an address, all
    /// addresses, an account; and its limit), each in a window of `window_ms` that starts at
    /// its first attempt; false at the first budget spent (the keys after it are not counted).
    /// Counted before the password is checked, in one statement per key, so that concurrent
    /// attempts (through any collector) cannot all pass a limit.
    fn count_login_attempt(
        &self,
        budgets: &[(String, u64)],
        now_ms: i64,
        window_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Forgets the attempts counted against `key` (an account that signed in).
    fn clear_login_attempts(&self, key: &str) -> Result<(), StoreError>;

    /// Revokes the agent certificates of `subject` recorded before the one with `serial`
    /// (once a renewed certificate is used, the ones it replaced); the serials revoked.
    fn retire_older_certs(
        &self,
        subject: &str,
        serial: &str,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError>;

    /// Whether a token could enroll an agent now, without spending it, and into which
    /// organisation: checked before any work is done for an enrollment.
    fn check_token(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<Result<String, TokenError>, StoreError>;

    /// Spends one use of a token and records the new agent in the token's organisation,
    /// atomically: two collectors given the same single-use token at once enroll one agent.
    /// Returns the organisation.
    fn enroll(
        &self,
        token_hash: &str,
        agent_id: &str,
        hostname: &str,
        now_ms: i64,
    ) -> Result<Result<String, TokenError>, StoreError>;

    /// The agent's row, if it was ever enrolled.
    fn agent(&self, id: &str) -> Result<Option<AgentRow>, StoreError>;

    fn list_agents(&self) -> Result<Vec<AgentRow>, StoreError>;

    /// Records that an agent opened its stream, with the inventory of its Hello.
    fn agent_connected(
        &self,
        id: &str,
        inv: &Inventory,
        bundle_version: u64,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    fn agent_seen(&self, id: &str, now_ms: i64) -> Result<(), StoreError>;

    /// Records a heartbeat: the dropped total (never decreasing) and the agent's counters.
    fn agent_heartbeat(
        &self,
        id: &str,
        dropped_total: u64,
        counters: &BTreeMap<String, u64>,
        clock_skew_ms: i64,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    fn agent_disconnected(&self, id: &str, now_ms: i64) -> Result<(), StoreError>;

    /// Records that an agent said goodbye (a clean stop); cleared when it connects again.
    fn agent_stopped(&self, id: &str, now_ms: i64) -> Result<(), StoreError>;

    /// Marks an agent revoked. Returns false when no such agent exists.
    fn revoke_agent(&self, id: &str, now_ms: i64) -> Result<bool, StoreError>;

    /// Replaces an agent's labels (sorted, comma-free); false when no such agent exists.
    fn set_agent_labels(&self, id: &str, labels: &[String]) -> Result<bool, StoreError>;

    /// Sends a version published to a label to every agent (its target becomes empty); false
    /// when no such version exists.
    fn promote_bundle(&self, version: u64) -> Result<bool, StoreError>;

    /// Marks an agent revoked and removed (hidden from default listings; its detections stay).
    /// Returns false when no such agent exists.
    fn remove_agent(&self, id: &str, now_ms: i64) -> Result<bool, StoreError>;

    /// Stores a batch of detections of one agent in one transaction. A detection whose id is
    /// already stored is skipped (resends are idempotent). Returns how many were new. Refused
    /// with [`StoreError::Revoked`] (nothing stored) once the agent is revoked: the agent's row
    /// is read-locked in the same transaction, so a revocation returns only after a batch in
    /// flight committed, and no batch commits after it.
    fn insert_detections(
        &self,
        agent_id: &str,
        detections: &[Detection],
        received_at_ms: i64,
    ) -> Result<usize, StoreError>;

    /// The most recent detections matching the filter, oldest first, reading no more than
    /// `f.max_bytes` of stored detections (but always one); with the sequence number to page on
    /// from when older ones match too.
    fn list_detections(&self, f: &DetectionFilter) -> Result<DetectionPage, StoreError>;

    /// Stores a bundle if its version is above every stored one. `Err(latest)` otherwise.
    fn insert_bundle(&self, b: &BundleRow) -> Result<Result<(), u64>, StoreError>;

    /// Every bundle, newest first, without content.
    fn list_bundles(&self) -> Result<Vec<BundleRow>, StoreError>;

    /// One bundle with its content; version 0 means the latest.
    fn bundle(&self, version: u64) -> Result<Option<BundleRow>, StoreError>;

    /// Records an agent's report on a bundle: applied (its running version now), or failed.
    fn agent_bundle_status(
        &self,
        id: &str,
        version: u64,
        applied: bool,
        error: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// Number of stored detections (all agents).
    fn count_detections(&self) -> Result<u64, StoreError>;

    /// The store's tables, each with its columns and their kinds in the store's own words
    /// (SQLite's declared type, PostgreSQL's `data_type`), without the schema's bookkeeping:
    /// what the schema drift test compares across stores.
    fn schema(&self) -> Result<Schema, StoreError>;

    /// Deletes at most `limit` detections received before `before_ms`, oldest first; returns
    /// how many (retention deletes in small batches so that ingest is never blocked long).
    fn delete_detections_before(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError>;

    /// Stages what one import or poll of a source found: lines are added or replace the
    /// staged line of the same (source, id); revoked STIX ids are unstaged; the source's row
    /// records the counts and clears its last error.
    fn stage_intel(&self, batch: &IntelBatch<'_>, now_ms: i64)
    -> Result<StagingCounts, StoreError>;

    /// Staged indicators after (source, id), in that order.
    fn list_intel(&self, after: (&str, &str), limit: u32) -> Result<Vec<StagedLine>, StoreError>;

    /// Every intel source with its last counts and error, and how many it has staged.
    fn intel_sources(&self) -> Result<Vec<IntelSourceRow>, StoreError>;

    /// Where the next poll of a source starts (TAXII `added_after`, a MISP feed's newest event
    /// timestamp); empty before the first.
    fn intel_cursor(&self, origin: &str) -> Result<String, StoreError>;

    /// Takes or renews the lease on a sink for `owner` until `now_ms + ttl_ms`; false when
    /// another collector holds it (several collectors sharing a store export each detection
    /// through one of them).
    fn export_lease(
        &self,
        sink: &str,
        owner: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Where an export sink is: the sequence number of the last detection it took, how many it
    /// exported, and its last error.
    fn export_state(&self, sink: &str) -> Result<ExportRow, StoreError>;

    /// Every sink known to the store, with its backlog (detections after its cursor).
    fn export_states(&self) -> Result<Vec<ExportRow>, StoreError>;

    /// Detections after sequence number `after`, received before `before_ms`, in sequence
    /// order, with their sequence numbers.
    fn detections_after(
        &self,
        after: u64,
        before_ms: i64,
        limit: u32,
    ) -> Result<Vec<(u64, StoredDetection)>, StoreError>;

    /// Moves a sink's cursor to `seq` after `count` more detections were exported; an error
    /// (empty when it succeeded) is recorded with it.
    fn export_progress(
        &self,
        sink: &str,
        seq: u64,
        count: u64,
        error: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// What a sink sent before of each of these sightings (by STIX id): their tallies.
    fn sighting_tallies(
        &self,
        sink: &str,
        ids: &[String],
    ) -> Result<BTreeMap<String, Tally>, StoreError>;

    /// Records the tallies of the sightings a sink sent and moves its cursor to `seq` after
    /// `count` detections, in one transaction: a crash between the two cannot count a
    /// detection twice.
    fn sightings_sent(
        &self,
        sink: &str,
        tallies: &[(String, Tally)],
        seq: u64,
        count: u64,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// Records a failed poll of a source (what it staged stays).
    fn intel_error(
        &self,
        origin: &str,
        kind: &str,
        error: &str,
        now_ms: i64,
    ) -> Result<(), StoreError>;
}

/// An export sink's progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportRow {
    pub sink: String,
    pub seq: u64,
    pub exported: u64,
    pub last_error: String,
    pub last_attempt_ms: i64,
    pub backlog: u64,
}

/// One staged indicator: its intel line and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedLine {
    pub source: String,
    pub id: String,
    pub origin: String,
    pub line: String,
}

/// What one import or poll of a source brought: its intel lines as they arrive (`L = String`,
/// what `intel::stage` takes) or once checked (`StagedLine`, what the store stages).
pub struct IntelBatch<'a, L = StagedLine> {
    pub origin: &'a str,
    pub kind: &'a str,
    pub lines: &'a [L],
    pub revoked: &'a [String],
    pub skipped: u64,
    pub rejected: u64,
    /// Continues the previous batch of the same import (a large import comes in several):
    /// the source's counts add up instead of being replaced.
    pub continued: bool,
    /// Where the next poll starts, saved with what this batch staged; empty keeps the old one.
    pub cursor: &'a str,
}

impl<'a, L> IntelBatch<'a, L> {
    /// The same batch carrying `lines` instead.
    pub fn with_lines<M>(&self, lines: &'a [M]) -> IntelBatch<'a, M> {
        IntelBatch {
            origin: self.origin,
            kind: self.kind,
            lines,
            revoked: self.revoked,
            skipped: self.skipped,
            rejected: self.rejected,
            continued: self.continued,
            cursor: self.cursor,
        }
    }
}

/// Tables by name, each with its columns (name, kind) in order.
pub type Schema = BTreeMap<String, Vec<(String, String)>>;

/// What staging one batch changed in the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StagingCounts {
    pub added: u64,
    pub updated: u64,
    pub removed: u64,
}

/// A source of indicators: an imported file, a MISP feed, a TAXII collection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntelSourceRow {
    pub origin: String,
    pub kind: String,
    pub last_poll_ms: i64,
    pub accepted: u64,
    pub skipped: u64,
    pub rejected: u64,
    pub revoked: u64,
    pub staged: u64,
    pub last_error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database `{path}`: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "the database `{path}` has schema version {found}, newer than this collector knows ({known}); upgrade the collector"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error(
        "the database `{path}` has schema version {found}, older than this program knows \
         ({known}); `vedette-collector serve` of this version brings it up to date (tools never \
         change the schema under a running collector)"
    )]
    TooOld {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("cannot open the database `{url}`: {source}")]
    OpenPg {
        url: String,
        source: tokio_postgres::Error,
    },
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database error: {0}")]
    Pg(#[from] tokio_postgres::Error),
    #[error("the database's connection pool: {0}")]
    Pool(String),
    #[error("the database's TLS set-up failed: {0}")]
    Tls(String),
    #[error("agent `{0}` is revoked (or unknown): its detections are refused")]
    Revoked(String),
    #[error("cannot start the thread listening to other collectors: {0}")]
    Thread(std::io::Error),
    #[error("no database connection within {0:?}: the pool is exhausted or the database is down")]
    PoolTimeout(std::time::Duration),
    #[error("stored detection `{id}` cannot be decoded: {reason}")]
    Corrupt { id: String, reason: String },
}

/// Why an enrollment token was refused. The messages are shown to the person enrolling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("unknown enrollment token")]
    Unknown,
    #[error("the enrollment token has expired")]
    Expired,
    #[error("the enrollment token has already been used")]
    UsedUp,
    #[error("the enrollment token was revoked")]
    Revoked,
}

/// An enrollment token as stored (its hash, never the token).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenRow {
    pub hash: String,
    pub org: String,
    pub uses_left: u32,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// Who created it (`cert:SUBJECT`, `console:ACCOUNT`).
    pub created_by: String,
    /// 0 while not revoked.
    pub revoked_at_ms: i64,
}

impl TokenRow {
    /// What names a token in listings: the first 16 hex digits of its hash.
    pub fn id(&self) -> &str {
        &self.hash[..self.hash.len().min(16)]
    }
}

/// Detections of one organisation, rule or indicator, and subject, however many hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertRow {
    pub id: u64,
    pub org: String,
    pub rule: String,
    /// See [`alert_subject`].
    pub subject: String,
    pub kind: i32,
    pub score: u32,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub detections: u64,
    pub hosts: u32,
    /// One of [`ALERT_STATUSES`].
    pub status: String,
    /// Detections arrived since the verdict on an acknowledged or true-positive alert.
    pub new_activity: bool,
    pub last_seq: u64,
    pub updated_at_ms: i64,
}

/// What an alert can be: open until judged.
pub const ALERT_STATUSES: &[&str] = &[
    "open",
    "acknowledged",
    "true-positive",
    "false-positive",
    "benign",
];

/// The statuses that close an alert: new detections do not reopen or flag it.
pub const CLOSED_STATUSES: &[&str] = &["false-positive", "benign"];

/// One verdict on an alert.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerdictRow {
    /// Its place in the history (set by the store).
    pub seq: u64,
    pub alert_id: u64,
    pub at_ms: i64,
    /// `cert:SUBJECT` or `console:ACCOUNT`.
    pub actor: String,
    pub status: String,
    pub note: String,
    /// The exception made with it, if any.
    pub exception_id: String,
}

/// A hunt as the store keeps it: who asked what, of which organisation (empty: every one),
/// until when; `request` is the encoded `HuntRequest` agents are sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HuntRow {
    pub id: String,
    pub org: String,
    pub created_by: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub request: Vec<u8>,
    /// Agents asked, and of those the ones that answered (filled in by lists).
    pub asked: u32,
    pub answered: u32,
}

/// An organisation's response approval as stored: `none` when not said.
pub(crate) fn approval(value: &str) -> &str {
    if value.is_empty() { "none" } else { value }
}

/// A response action as the store keeps it: the columns it is found by, and `info`, the
/// encoded `ActionInfo` with everything else (its state too, the same as the column's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActionRow {
    pub id: String,
    pub org: String,
    pub agent_id: String,
    pub state: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub info: Vec<u8>,
}

/// One agent a hunt asked: its answer (an encoded `HuntAnswer`) once it gave one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HuntAgentRow {
    pub agent_id: String,
    /// 0 while it has not answered.
    pub answered_at_ms: i64,
    pub answer: Vec<u8>,
}

/// An exception as the store keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExceptionRow {
    pub ex: vedette_engine::exceptions::Exception,
    pub created_at_ms: i64,
    /// `cert:SUBJECT` or `console:ACCOUNT`.
    pub created_by: String,
    /// 0 while not removed.
    pub removed_at_ms: i64,
    pub removed_by: String,
}

impl ExceptionRow {
    /// In force at `now_ms`: not removed, not expired.
    pub fn active(&self, now_ms: i64) -> bool {
        self.removed_at_ms == 0 && self.ex.active(now_ms)
    }
}

/// Which alerts to list.
#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    pub status: Option<String>,
    pub org: Option<String>,
    /// Only alerts whose newest detection has a lower sequence number (the next page).
    pub before_seq: Option<u64>,
    pub limit: u32,
}

/// What an alert groups a detection by besides its organisation and rule: `sha256:HEX` for
/// files and executables, `addr:ADDRESS:PORT` for connections, `domain:NAME` for DNS queries,
/// `path:PATH` when there is no hash, `agent:ID` for findings about the agent itself.
pub fn alert_subject(d: &Detection, agent_id: &str) -> String {
    use vedette_proto::v1::detection::Target;
    match &d.target {
        Some(Target::File(f)) if !f.sha256.is_empty() => format!("sha256:{}", f.sha256),
        Some(Target::File(f)) => format!("path:{}", f.path),
        Some(Target::Process(p)) if !p.exe_sha256.is_empty() => {
            format!("sha256:{}", p.exe_sha256)
        }
        Some(Target::Process(p)) => format!("path:{}", p.exe),
        Some(Target::Connection(c)) if c.remote_addr.contains(':') => {
            format!("addr:[{}]:{}", c.remote_addr, c.remote_port)
        }
        Some(Target::Connection(c)) => format!("addr:{}:{}", c.remote_addr, c.remote_port),
        Some(Target::Dns(q)) => format!("domain:{}", q.name),
        None => format!("agent:{agent_id}"),
    }
}

/// One entry of the audit log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditRow {
    /// Its place in the log (set by the store).
    pub seq: u64,
    pub at_ms: i64,
    /// Who: `cert:SUBJECT`, `console:ACCOUNT`, `token:ID`, `local:USER`.
    pub actor: String,
    /// What: `token.create`, `agent.revoke`, ...
    pub action: String,
    /// What it was done to.
    pub target: String,
    /// `ok`, or `refused: WHY` / `failed: WHY`.
    pub outcome: String,
    /// The organisation it concerns; empty for collector-wide actions.
    pub org: String,
    pub detail: String,
}

/// A participating organisation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrgRow {
    pub name: String,
    pub stix_id: String,
    pub sector: String,
    pub country: String,
    /// full, anonymised or none.
    pub share: String,
    /// TLP 2.0 level, as `vedette_share::sharing::Tlp::as_str` writes it.
    pub tlp: String,
    pub created_at_ms: i64,
    /// Agents enrolled in it (listings only).
    pub agents: u32,
    /// `none` or `two-person`: whether response actions on its agents wait for a second
    /// operator.
    pub response_approval: String,
}

/// A console account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserRow {
    pub name: String,
    /// PHC string (argon2id).
    pub password_hash: String,
    /// Comma-separated roles, as in certificates.
    pub roles: String,
    /// The organisation the account is limited to (empty: collector-wide).
    pub org: String,
    pub created_at_ms: i64,
}

/// An agent as the store knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentRow {
    pub id: String,
    /// The organisation it was enrolled into.
    pub org: String,
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub arch: String,
    pub agent_version: String,
    pub enrolled_at_ms: i64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub connected: bool,
    pub revoked: bool,
    pub bundle_version: u64,
    pub bundle_applied_at_ms: i64,
    pub dropped_total: u64,
    /// Counters of the last heartbeat.
    pub counters: std::collections::BTreeMap<String, u64>,
    /// The last bundle version the agent failed to apply (0: none) and why.
    pub bundle_failed_version: u64,
    pub bundle_error: String,
    /// The agent's clock less the collector's at its last heartbeat, in ms.
    pub clock_skew_ms: i64,
    /// When it said goodbye; 0 since it connected again.
    pub stopped_at_ms: i64,
    /// When `agents remove` removed it; 0 when not removed.
    pub removed_at_ms: i64,
    /// Its labels (`agents label`), sorted.
    pub labels: Vec<String>,
}

/// A published rule bundle. `content` and `signature` are empty in listings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleRow {
    pub version: u64,
    pub name: String,
    pub created_at_ms: i64,
    pub publisher: String,
    /// The certificate name that published it.
    pub published_by: String,
    pub published_at_ms: i64,
    pub digest: String,
    /// Raw Ed25519 key; empty when unsigned.
    pub signer_key: Vec<u8>,
    pub files: u32,
    /// The label it was published to (`rules publish --to`); empty: every agent.
    pub target: String,
    pub size: u64,
    pub content: Vec<u8>,
    pub signature: Vec<u8>,
}

/// A certificate the collector issued or saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertRow {
    /// Lowercase hex.
    pub serial: String,
    /// `agent` or `client`.
    pub kind: String,
    pub subject: String,
    /// Comma-separated.
    pub roles: String,
    pub not_after_ms: i64,
    pub recorded_at_ms: i64,
    /// 0 unless revoked.
    pub revoked_at_ms: i64,
    /// The agent's organisation, or the one a client is limited to (empty: collector-wide).
    pub org: String,
}

/// Which detections to list.
#[derive(Debug, Clone, Default)]
pub struct DetectionFilter {
    pub agent_id: Option<String>,
    /// Only this organisation's detections.
    pub org: Option<String>,
    pub since_ms: Option<i64>,
    /// Only detections received before this time.
    pub until_ms: Option<i64>,
    /// Only this kind (`DetectionKind` value).
    pub kind: Option<i32>,
    /// Only this rule or indicator name.
    pub rule: Option<String>,
    /// Only detections of the file or executable with this SHA-256 (lowercase hex).
    pub sha256: Option<String>,
    /// Only detections of the file with this MD5 (lowercase hex).
    pub md5: Option<String>,
    /// Only detections of agents with this label now.
    pub label: Option<String>,
    /// Only detections of agents with this host name.
    pub host: Option<String>,
    /// Only detections whose path, process name or command line holds this text (any case).
    /// Matching rows are looked for among at most [`TEXT_SCAN_ROWS`] rows; a page that stops
    /// there says where to go on with `next_before_seq`.
    pub text: Option<String>,
    /// Only detections with a lower sequence number (the next page).
    pub before_seq: Option<u64>,
    pub limit: u32,
    /// Stop reading once this many bytes of stored detections are read.
    pub max_bytes: usize,
    /// Detections an exception covers too.
    pub suppressed: bool,
    /// Only the detections of this alert.
    pub alert_id: Option<u64>,
}

/// One page of a detection listing.
#[derive(Debug, Default)]
pub struct DetectionPage {
    /// Oldest first.
    pub detections: Vec<StoredDetection>,
    /// Set when older matching detections are left: the `before_seq` of the next page.
    pub next_before_seq: Option<u64>,
}

/// Most rows one text search reads for a page.
pub const TEXT_SCAN_ROWS: u32 = 20_000;

impl DetectionFilter {
    /// How many rows the query may return: one more than a page, or the text-search scan.
    pub fn sql_limit(&self) -> u32 {
        if self.text.is_some() {
            TEXT_SCAN_ROWS + 1
        } else {
            self.limit.saturating_add(1)
        }
    }
}

/// The columns a detection is found by: its path (of the file or executable), SHA-256 and pid.
pub(crate) fn indexed(d: &Detection) -> (Option<&str>, Option<&str>, Option<u32>) {
    use vedette_proto::v1::detection::Target;
    match &d.target {
        Some(Target::File(f)) => (Some(f.path.as_str()), Some(f.sha256.as_str()), None),
        Some(Target::Process(p)) => (
            Some(p.exe.as_str()),
            Some(p.exe_sha256.as_str()),
            Some(p.pid),
        ),
        Some(Target::Connection(c)) => (Some(c.exe.as_str()), None, Some(c.pid)),
        Some(Target::Dns(q)) => (Some(q.exe.as_str()), None, Some(q.pid)),
        None => (None, None, None),
    }
}

/// A later report of an incident that counts more of it (a DNS window's count, sent when the
/// window ends under the id of its first query): the count, when there is one to raise.
pub(crate) fn recount(d: &Detection) -> Option<u32> {
    match &d.target {
        Some(vedette_proto::v1::detection::Target::Dns(q)) if q.count > 1 => Some(q.count),
        _ => None,
    }
}

/// The stored body of an incident with the count and description of a later report of it
/// ([`recount`]); None when the stored one counts as many already (or cannot be read: it is
/// left as it is). What was first reported (when, by whom, the answers) stays.
pub(crate) fn recounted(stored: &[u8], later: &Detection) -> Option<Vec<u8>> {
    use prost::Message;
    use vedette_proto::v1::detection::Target;
    let count = recount(later)?;
    let mut d = Detection::decode(stored).ok()?;
    let Some(Target::Dns(q)) = &mut d.target else {
        return None;
    };
    if q.count >= count {
        return None;
    }
    q.count = count;
    if q.answers.is_empty()
        && let Some(Target::Dns(l)) = &later.target
    {
        q.answers.clone_from(&l.answers);
    }
    d.description.clone_from(&later.description);
    Some(d.encode_to_vec())
}

/// The MD5 of a file detection's file, kept in its own column (executables carry SHA-256 only).
pub(crate) fn file_md5(d: &vedette_proto::v1::Detection) -> Option<&str> {
    match &d.target {
        Some(vedette_proto::v1::detection::Target::File(f)) if !f.md5.is_empty() => {
            Some(f.md5.as_str())
        }
        _ => None,
    }
}

/// Whether a detection's path, process name or command line holds `needle` (lower case).
pub fn holds_text(d: &vedette_proto::v1::Detection, needle: &str) -> bool {
    use vedette_proto::v1::detection::Target;
    let has = |s: &str| s.to_lowercase().contains(needle);
    match &d.target {
        Some(Target::File(f)) => has(&f.path),
        Some(Target::Process(p)) => has(&p.exe) || has(&p.name) || has(&p.cmdline),
        Some(Target::Connection(c)) => has(&c.exe) || has(&c.remote_addr) || has(&c.domain),
        Some(Target::Dns(q)) => has(&q.name) || has(&q.exe) || has(&q.cmdline),
        None => false,
    }
}

impl DetectionPage {
    /// Collects rows read newest first until the limit or the byte budget is reached; one row
    /// more than the limit may be offered, to learn whether more are left.
    /// `next_row` gives each row's sequence number, stored size and detection.
    pub fn collect<E>(
        f: &DetectionFilter,
        mut next_row: impl FnMut() -> Result<Option<(u64, usize, StoredDetection)>, E>,
    ) -> Result<DetectionPage, E> {
        let mut page = DetectionPage::default();
        let mut bytes = 0usize;
        let needle = f.text.as_deref().map(str::to_lowercase);
        let mut scanned = 0u32;
        let mut last_seq = None;
        while let Some((seq, size, stored)) = next_row()? {
            if page.detections.len() >= f.limit as usize || (bytes >= f.max_bytes && bytes > 0) {
                page.next_before_seq = page.detections.last().map(|d| d.seq);
                break;
            }
            if let Some(needle) = &needle {
                if scanned >= TEXT_SCAN_ROWS {
                    // Rows are left unread: the next page goes on below the last one read.
                    page.next_before_seq = last_seq;
                    break;
                }
                scanned += 1;
                last_seq = Some(seq);
                if !stored
                    .detection
                    .as_ref()
                    .is_some_and(|d| holds_text(d, needle))
                {
                    continue;
                }
            }
            bytes += size;
            page.detections.push(StoredDetection { seq, ..stored });
        }
        page.detections.reverse();
        Ok(page)
    }
}

pub use vedette_proto::now_ms;

/// What a token row (expiry, uses left, organisation, revoked at) allows at `now_ms`: the
/// organisation it enrolls into.
pub(crate) fn token_verdict(
    row: Option<(i64, i64, String, i64)>,
    now_ms: i64,
) -> Result<String, TokenError> {
    match row {
        None => Err(TokenError::Unknown),
        Some((_, _, _, revoked)) if revoked != 0 => Err(TokenError::Revoked),
        Some((expires, _, _, _)) if expires <= now_ms => Err(TokenError::Expired),
        Some((_, uses, _, _)) if uses <= 0 => Err(TokenError::UsedUp),
        Some((_, _, org, _)) => Ok(org),
    }
}
