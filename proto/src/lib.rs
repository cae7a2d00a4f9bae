//! The Vedette wire protocol (`vedette.v1`): generated message types and gRPC services, plus the
//! size limits both peers enforce.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("vedette.v1");
}

/// Short lowercase name of a `Detection.kind` value (`yara`, `hash`, `filename`, `process`,
/// `connection`, `agent`, `dns`; `unknown` for anything else), as printed by the command-line tools.
pub fn kind_name(kind: i32) -> &'static str {
    use v1::DetectionKind;
    match DetectionKind::try_from(kind).unwrap_or(DetectionKind::Unspecified) {
        DetectionKind::Yara => "yara",
        DetectionKind::Hash => "hash",
        DetectionKind::Filename => "filename",
        DetectionKind::Process => "process",
        DetectionKind::Connection => "connection",
        DetectionKind::Agent => "agent",
        DetectionKind::Dns => "dns",
        DetectionKind::Unspecified => "unknown",
    }
}

/// The kind named by `name` (`yara`, `hash`, `filename`, `process`, `connection`, `agent`,
/// `dns`), as
/// its `DetectionKind` value.
pub fn kind_from_name(name: &str) -> Option<i32> {
    use v1::DetectionKind;
    [
        DetectionKind::Yara,
        DetectionKind::Hash,
        DetectionKind::Filename,
        DetectionKind::Process,
        DetectionKind::Connection,
        DetectionKind::Agent,
        DetectionKind::Dns,
    ]
    .into_iter()
    .map(|k| k as i32)
    .find(|k| kind_name(*k) == name)
}

/// The name of a detection's action: `alert`, `blocked` or `late`.
pub fn action_name(action: i32) -> &'static str {
    match v1::DetectionAction::try_from(action) {
        Ok(v1::DetectionAction::Blocked) => "blocked",
        Ok(v1::DetectionAction::Late) => "late",
        _ => "alert",
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it), as timestamps travel.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Size limits every peer applies to what it receives.
pub mod limits {
    /// Largest encoded message on the agent stream or admin API (a detection batch, a rule bundle).
    pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
    /// Most detections in one batch.
    pub const MAX_BATCH_DETECTIONS: usize = 1_000;
    /// Longest string field (paths, command lines, rule names), in bytes.
    pub const MAX_STRING_BYTES: usize = 8 * 1024;
    /// Longest enrollment request (token + CSR).
    pub const MAX_ENROLL_BYTES: usize = 16 * 1024;
    /// Most counters in one heartbeat.
    pub const MAX_COUNTERS: usize = 256;
    /// Longest heartbeat counter name.
    pub const MAX_COUNTER_NAME: usize = 128;
    /// Most digests one hunt asks about.
    pub const MAX_HUNT_HASHES: usize = 10_000;
    /// Most hits one agent gives in its answer to a hunt (it says how many it had).
    pub const MAX_HUNT_HITS: usize = 1_000;
}

/// Current protocol version, sent nowhere but named in logs and `--version` output.
pub const PROTOCOL: &str = "vedette.v1";
