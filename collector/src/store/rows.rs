//! Result rows into the store's row types, written once for both stores. Each store's row type
//! answers [`Columns`]; a mapping reads its columns by position, in the order of the SELECT it
//! is named after (the same text in both stores, or one constant here).

use super::{
    AgentRow, AlertRow, AuditRow, BundleRow, CertRow, ExceptionRow, ExportRow, IntelSourceRow,
    OrgRow, TokenRow, UserRow, VerdictRow,
};

/// The columns of one result row, by position, in the kinds both stores share.
pub(crate) trait Columns {
    type Error;
    fn int(&self, i: usize) -> Result<i64, Self::Error>;
    fn text(&self, i: usize) -> Result<String, Self::Error>;
    fn flag(&self, i: usize) -> Result<bool, Self::Error>;
    fn bytes(&self, i: usize) -> Result<Vec<u8>, Self::Error>;

    /// A count or version: never negative as written; a negative value reads as 0.
    fn count(&self, i: usize) -> Result<u64, Self::Error> {
        Ok(u64::try_from(self.int(i)?).unwrap_or(0))
    }
}

impl Columns for rusqlite::Row<'_> {
    type Error = rusqlite::Error;
    fn int(&self, i: usize) -> rusqlite::Result<i64> {
        self.get(i)
    }
    fn text(&self, i: usize) -> rusqlite::Result<String> {
        self.get(i)
    }
    fn flag(&self, i: usize) -> rusqlite::Result<bool> {
        self.get(i)
    }
    fn bytes(&self, i: usize) -> rusqlite::Result<Vec<u8>> {
        self.get(i)
    }
}

impl Columns for tokio_postgres::Row {
    type Error = tokio_postgres::Error;
    fn int(&self, i: usize) -> Result<i64, tokio_postgres::Error> {
        self.try_get(i)
    }
    fn text(&self, i: usize) -> Result<String, tokio_postgres::Error> {
        self.try_get(i)
    }
    fn flag(&self, i: usize) -> Result<bool, tokio_postgres::Error> {
        self.try_get(i)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>, tokio_postgres::Error> {
        self.try_get(i)
    }
}

/// `SELECT name, password_hash, roles, org, created_at_ms FROM users`.
pub(crate) fn user<R: Columns<Error = E> + ?Sized, E>(r: &R) -> Result<UserRow, E> {
    Ok(UserRow {
        name: r.text(0)?,
        password_hash: r.text(1)?,
        roles: r.text(2)?,
        org: r.text(3)?,
        created_at_ms: r.int(4)?,
    })
}

/// `SELECT name, stix_id, sector, country, share, tlp, created_at_ms, (agent count),
/// response_approval FROM orgs`.
pub(crate) fn org<R: Columns<Error = E> + ?Sized, E>(r: &R) -> Result<OrgRow, E> {
    Ok(OrgRow {
        name: r.text(0)?,
        stix_id: r.text(1)?,
        sector: r.text(2)?,
        country: r.text(3)?,
        share: r.text(4)?,
        tlp: r.text(5)?,
        created_at_ms: r.int(6)?,
        agents: u32::try_from(r.count(7)?).unwrap_or(u32::MAX),
        response_approval: r.text(8)?,
    })
}

/// `SELECT origin, kind, last_poll_ms, accepted, skipped, rejected, revoked, last_error,
/// (staged count) FROM intel_sources`.
pub(crate) fn intel_source<R: Columns<Error = E> + ?Sized, E>(r: &R) -> Result<IntelSourceRow, E> {
    Ok(IntelSourceRow {
        origin: r.text(0)?,
        kind: r.text(1)?,
        last_poll_ms: r.int(2)?,
        accepted: r.count(3)?,
        skipped: r.count(4)?,
        rejected: r.count(5)?,
        revoked: r.count(6)?,
        last_error: r.text(7)?,
        staged: r.count(8)?,
    })
}

/// `SELECT sink, seq, exported, last_error, last_attempt_ms, (backlog) FROM export_cursors`.
pub(crate) fn export<R: Columns<Error = E> + ?Sized, E>(r: &R) -> Result<ExportRow, E> {
    Ok(ExportRow {
        sink: r.text(0)?,
        seq: r.count(1)?,
        exported: r.count(2)?,
        last_error: r.text(3)?,
        last_attempt_ms: r.int(4)?,
        backlog: r.count(5)?,
    })
}

/// Each store's `BUNDLE_SELECT` (the content's length is spelt apart), then content and
/// signature, or two empty values in listings.
pub(crate) fn bundle<R: Columns<Error = E> + ?Sized, E>(r: &R) -> Result<BundleRow, E> {
    Ok(BundleRow {
        version: r.count(0)?,
        name: r.text(1)?,
        created_at_ms: r.int(2)?,
        publisher: r.text(3)?,
        published_by: r.text(4)?,
        published_at_ms: r.int(5)?,
        digest: r.text(6)?,
        signer_key: r.bytes(7)?,
        files: u32::try_from(r.count(8)?).unwrap_or(u32::MAX),
        target: r.text(9)?,
        size: r.count(10)?,
        content: r.bytes(11)?,
        signature: r.bytes(12)?,
    })
}

/// What [`agent`] reads.
pub(crate) const AGENT_SELECT: &str = "SELECT id, hostname, os, kernel, arch, agent_version,
    enrolled_at_ms, first_seen_ms, last_seen_ms, connected, revoked_at_ms IS NOT NULL,
    bundle_version, bundle_applied_at_ms, dropped_total, counters, bundle_failed_version,
    bundle_error, org, clock_skew_ms, stopped_at_ms, removed_at_ms, labels
    FROM agents";

pub(crate) fn agent<R: Columns<Error = E> + ?Sized, E>(r: &R) -> Result<AgentRow, E> {
    Ok(AgentRow {
        id: r.text(0)?,
        hostname: r.text(1)?,
        os: r.text(2)?,
        kernel: r.text(3)?,
        arch: r.text(4)?,
        agent_version: r.text(5)?,
        enrolled_at_ms: r.int(6)?,
        first_seen_ms: r.int(7)?,
        last_seen_ms: r.int(8)?,
        connected: r.flag(9)?,
        revoked: r.flag(10)?,
        bundle_version: r.count(11)?,
        bundle_applied_at_ms: r.int(12)?,
        dropped_total: r.count(13)?,
        // Written by this code only; a damaged value shows as no counters.
        counters: serde_json::from_str(&r.text(14)?).unwrap_or_default(),
        bundle_failed_version: r.count(15)?,
        bundle_error: r.text(16)?,
        org: r.text(17)?,
        clock_skew_ms: r.int(18)?,
        stopped_at_ms: r.int(19)?,
        removed_at_ms: r.int(20)?,
        labels: r
            .text(21)?
            .split(',')
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

/// What [`cert`] reads.
pub(crate) const CERT_SELECT: &str = "SELECT serial, kind, subject, roles, not_after_ms,
    recorded_at_ms, revoked_at_ms, org FROM certs";

pub(crate) fn cert<R: Columns<Error = E> + ?Sized, E>(r: &R) -> Result<CertRow, E> {
    Ok(CertRow {
        serial: r.text(0)?,
        kind: r.text(1)?,
        subject: r.text(2)?,
        roles: r.text(3)?,
        not_after_ms: r.int(4)?,
        recorded_at_ms: r.int(5)?,
        revoked_at_ms: r.int(6)?,
        org: r.text(7)?,
    })
}

/// What [`token`] reads.
pub(crate) const TOKEN_SELECT: &str = "SELECT hash, org, uses_left, created_at_ms, expires_at_ms,
    created_by, revoked_at_ms FROM tokens";

pub(crate) fn token<R: Columns<Error = E> + ?Sized, E>(r: &R) -> Result<TokenRow, E> {
    Ok(TokenRow {
        hash: r.text(0)?,
        org: r.text(1)?,
        uses_left: u32::try_from(r.count(2)?).unwrap_or(u32::MAX),
        created_at_ms: r.int(3)?,
        expires_at_ms: r.int(4)?,
        created_by: r.text(5)?,
        revoked_at_ms: r.int(6)?,
    })
}

/// What [`audit`] reads.
pub(crate) const AUDIT_SELECT: &str =
    "SELECT seq, at_ms, actor, action, target, outcome, org, detail FROM audit";

pub(crate) fn audit<R: Columns<Error = E> + ?Sized, E>(r: &R) -> Result<AuditRow, E> {
    Ok(AuditRow {
        seq: r.count(0)?,
        at_ms: r.int(1)?,
        actor: r.text(2)?,
        action: r.text(3)?,
        target: r.text(4)?,
        outcome: r.text(5)?,
        org: r.text(6)?,
        detail: r.text(7)?,
    })
}

pub(crate) const ALERT_SELECT: &str = "SELECT id, org, rule, subject, kind, score, first_seen_ms,
    last_seen_ms, detections, hosts, status, new_activity, last_seq, updated_at_ms FROM alerts";

pub(crate) fn alert<R: Columns<Error = E> + ?Sized, E>(r: &R) -> Result<AlertRow, E> {
    Ok(AlertRow {
        id: r.count(0)?,
        org: r.text(1)?,
        rule: r.text(2)?,
        subject: r.text(3)?,
        kind: i32::try_from(r.int(4)?).unwrap_or_default(),
        score: u32::try_from(r.count(5)?).unwrap_or(u32::MAX),
        first_seen_ms: r.int(6)?,
        last_seen_ms: r.int(7)?,
        detections: r.count(8)?,
        hosts: u32::try_from(r.count(9)?).unwrap_or(u32::MAX),
        status: r.text(10)?,
        new_activity: r.int(11)? != 0,
        last_seq: r.count(12)?,
        updated_at_ms: r.int(13)?,
    })
}

pub(crate) const VERDICT_SELECT: &str =
    "SELECT seq, alert_id, at_ms, actor, status, note, exception_id FROM alert_verdicts";

pub(crate) fn verdict<R: Columns<Error = E> + ?Sized, E>(r: &R) -> Result<VerdictRow, E> {
    Ok(VerdictRow {
        seq: r.count(0)?,
        alert_id: r.count(1)?,
        at_ms: r.int(2)?,
        actor: r.text(3)?,
        status: r.text(4)?,
        note: r.text(5)?,
        exception_id: r.text(6)?,
    })
}

pub(crate) const EXCEPTION_SELECT: &str = "SELECT id, rule, indicator, sha256, path, org, agent,
    expires_at_ms, reason, created_at_ms, created_by, removed_at_ms, removed_by FROM exceptions";

pub(crate) fn exception<R: Columns<Error = E> + ?Sized, E>(r: &R) -> Result<ExceptionRow, E> {
    Ok(ExceptionRow {
        ex: vedette_engine::exceptions::Exception {
            id: r.text(0)?,
            rule: r.text(1)?,
            indicator: r.text(2)?,
            sha256: r.text(3)?,
            path: r.text(4)?,
            org: r.text(5)?,
            agent: r.text(6)?,
            expires_at_ms: r.int(7)?,
            reason: r.text(8)?,
        },
        created_at_ms: r.int(9)?,
        created_by: r.text(10)?,
        removed_at_ms: r.int(11)?,
        removed_by: r.text(12)?,
    })
}

/// After [`EXCEPTION_SELECT`]: only those in force at `?1` (ms), oldest first.
pub(crate) const IN_FORCE: &str = "WHERE removed_at_ms = 0
    AND (expires_at_ms = 0 OR expires_at_ms > ?1) ORDER BY created_at_ms, id";

/// The exceptions in force at `now_ms` for agents of `org`, ready to test detections against;
/// none when they cannot be read back (a detection is then stored unsuppressed, never lost).
pub(crate) fn in_force(
    rows: Vec<ExceptionRow>,
    org: &str,
    now_ms: i64,
) -> vedette_engine::exceptions::Exceptions {
    let list = rows
        .into_iter()
        .filter(|e| e.active(now_ms) && (e.ex.org.is_empty() || e.ex.org == org))
        .map(|e| e.ex)
        .collect();
    vedette_engine::exceptions::Exceptions::new(list).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "stored exceptions cannot be used; detections are stored unsuppressed");
        Default::default()
    })
}

/// A stored detection with its agent, organisation, alert and exception, in the columns
/// [`detection`] reads.
pub(crate) const DETECTION_SELECT: &str = "SELECT d.seq, d.id, d.agent_id, a.hostname,
    d.received_at_ms, d.body, a.org, COALESCE(d.alert_id, 0), COALESCE(d.exception_id, ''),
    COALESCE(al.status, '')
    FROM detections d JOIN agents a ON a.id = d.agent_id LEFT JOIN alerts al ON al.id = d.alert_id";

/// A stored detection as read, its body not decoded yet.
pub(crate) struct RawDetection {
    id: String,
    body: Vec<u8>,
    stored: vedette_proto::v1::StoredDetection,
}

pub(crate) fn detection<R: Columns<Error = E> + ?Sized, E>(r: &R) -> Result<RawDetection, E> {
    Ok(RawDetection {
        id: r.text(1)?,
        body: r.bytes(5)?,
        stored: vedette_proto::v1::StoredDetection {
            detection: None,
            agent_id: r.text(2)?,
            hostname: r.text(3)?,
            received_at_ms: r.int(4)?,
            seq: r.count(0)?,
            org: r.text(6)?,
            alert_id: r.count(7)?,
            exception_id: r.text(8)?,
            alert_status: r.text(9)?,
            response: String::new(),
        },
    })
}

impl RawDetection {
    /// Its sequence number, stored size and the detection decoded.
    pub(crate) fn decode(
        self,
    ) -> Result<(u64, usize, vedette_proto::v1::StoredDetection), super::StoreError> {
        use prost::Message;
        let detection =
            vedette_proto::v1::Detection::decode(self.body.as_slice()).map_err(|e| {
                super::StoreError::Corrupt {
                    id: self.id,
                    reason: e.to_string(),
                }
            })?;
        Ok((
            self.stored.seq,
            self.body.len(),
            vedette_proto::v1::StoredDetection {
                detection: Some(detection),
                ..self.stored
            },
        ))
    }
}

/// `SELECT count, first_seen_ms, last_seen_ms, created_ms, modified_ms FROM sighting_tallies`.
pub(crate) fn tally<R: Columns<Error = E> + ?Sized, E>(r: &R) -> Result<super::Tally, E> {
    Ok(super::Tally {
        count: r.count(0)?,
        first_seen_ms: r.int(1)?,
        last_seen_ms: r.int(2)?,
        created_ms: r.int(3)?,
        modified_ms: r.int(4)?,
    })
}

/// The columns [`hunt`] reads, over `hunts h` joined with its agents (grouped by hunt).
pub(crate) const HUNT_SELECT: &str = "SELECT h.id, h.org, h.created_by, h.created_at_ms,
    h.expires_at_ms, h.request, COUNT(a.agent_id),
    COALESCE(SUM(CASE WHEN a.answered_at_ms > 0 THEN 1 ELSE 0 END), 0)
    FROM hunts h LEFT JOIN hunt_agents a ON a.hunt_id = h.id";

/// A hunt row of [`HUNT_SELECT`].
pub(crate) fn hunt<R: Columns>(r: &R) -> Result<super::HuntRow, R::Error> {
    Ok(super::HuntRow {
        id: r.text(0)?,
        org: r.text(1)?,
        created_by: r.text(2)?,
        created_at_ms: r.int(3)?,
        expires_at_ms: r.int(4)?,
        request: r.bytes(5)?,
        asked: r.int(6)? as u32,
        answered: r.int(7)? as u32,
    })
}

/// The columns of a response action, in the order [`action`] reads them.
pub(crate) const ACTION_SELECT: &str =
    "SELECT id, org, agent_id, state, created_at_ms, expires_at_ms, info FROM actions";

/// A response action row of [`ACTION_SELECT`].
pub(crate) fn action<R: Columns>(r: &R) -> Result<super::ActionRow, R::Error> {
    Ok(super::ActionRow {
        id: r.text(0)?,
        org: r.text(1)?,
        agent_id: r.text(2)?,
        state: r.text(3)?,
        created_at_ms: r.int(4)?,
        expires_at_ms: r.int(5)?,
        info: r.bytes(6)?,
    })
}
