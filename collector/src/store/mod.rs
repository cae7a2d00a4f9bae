//! Durable state of the collector: enrollment tokens, agents, detections, rule bundles.
//!
//! The store is synchronous (SQLite calls block); async callers go through
//! `tokio::task::spawn_blocking`. Invariant: when a write method returns `Ok`, the change is
//! committed (in SQLite's WAL, `synchronous = FULL`), so an Ack sent afterwards never promises
//! something a crash could take back.

mod sqlite;

pub use sqlite::Store;

use std::path::PathBuf;

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
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
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
}

/// An agent as the store knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentRow {
    pub id: String,
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
    pub size: u64,
    pub content: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Which detections to list.
#[derive(Debug, Clone, Default)]
pub struct DetectionFilter {
    pub agent_id: Option<String>,
    pub since_ms: Option<i64>,
    pub limit: u32,
}

pub use vedette_proto::now_ms;
