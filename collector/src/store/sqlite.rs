//! SQLite implementation of the store: one file, WAL mode, schema migrations by `user_version`.
//! For one collector: the file is not shared.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};
use vedette_proto::v1::{Detection, Inventory, StoredDetection};

use super::rows::{
    self, ACTION_SELECT, AGENT_SELECT, ALERT_SELECT, AUDIT_SELECT, CERT_SELECT, DETECTION_SELECT,
    EXCEPTION_SELECT, HUNT_SELECT, IN_FORCE, TOKEN_SELECT, VERDICT_SELECT,
};
use super::{
    ActionRow, AgentRow, AlertFilter, AlertRow, AuditRow, BundleRow, CertRow, DetectionFilter,
    DetectionPage, ExceptionRow, ExportRow, HuntAgentRow, HuntRow, IntelBatch, IntelSourceRow,
    Opener, OrgRow, Schema, StagedLine, StagingCounts, Store, StoreError, Tally, TokenError,
    TokenRow, UserRow, VerdictRow, alert_subject, approval, file_md5, indexed,
};

/// Schema migrations, applied in order; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: tokens, agents, detections.
    "CREATE TABLE tokens (
        hash TEXT PRIMARY KEY,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        uses_left INTEGER NOT NULL
    );
    CREATE TABLE agents (
        id TEXT PRIMARY KEY,
        hostname TEXT NOT NULL DEFAULT '',
        os TEXT NOT NULL DEFAULT '',
        kernel TEXT NOT NULL DEFAULT '',
        arch TEXT NOT NULL DEFAULT '',
        agent_version TEXT NOT NULL DEFAULT '',
        enrolled_at_ms INTEGER NOT NULL,
        first_seen_ms INTEGER NOT NULL DEFAULT 0,
        last_seen_ms INTEGER NOT NULL DEFAULT 0,
        connected INTEGER NOT NULL DEFAULT 0,
        revoked_at_ms INTEGER,
        bundle_version INTEGER NOT NULL DEFAULT 0,
        bundle_applied_at_ms INTEGER NOT NULL DEFAULT 0,
        dropped_total INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE detections (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        agent_id TEXT NOT NULL REFERENCES agents(id),
        kind INTEGER NOT NULL,
        rule TEXT NOT NULL,
        path TEXT,
        sha256 TEXT,
        pid INTEGER,
        observed_at_ms INTEGER NOT NULL,
        received_at_ms INTEGER NOT NULL,
        bundle_version INTEGER NOT NULL,
        body BLOB NOT NULL
    );
    CREATE INDEX detections_agent ON detections(agent_id, seq);
    CREATE INDEX detections_received ON detections(received_at_ms);",
    // 2: the counters of each agent's last heartbeat (JSON object of name -> value).
    "ALTER TABLE agents ADD COLUMN counters TEXT NOT NULL DEFAULT '{}';",
    // 3: rule bundles, and what each agent last failed to apply.
    "CREATE TABLE bundles (
        version INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        publisher TEXT NOT NULL,
        published_by TEXT NOT NULL,
        published_at_ms INTEGER NOT NULL,
        digest TEXT NOT NULL,
        signer_key BLOB NOT NULL,
        files INTEGER NOT NULL,
        content BLOB NOT NULL,
        signature BLOB NOT NULL
    );
    ALTER TABLE agents ADD COLUMN bundle_failed_version INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN bundle_error TEXT NOT NULL DEFAULT '';",
    // 4: staged threat intelligence and its sources.
    "CREATE TABLE intel_indicators (
        source TEXT NOT NULL,
        id TEXT NOT NULL,
        origin TEXT NOT NULL,
        line TEXT NOT NULL,
        staged_at_ms INTEGER NOT NULL,
        PRIMARY KEY (source, id)
    );
    CREATE TABLE intel_sources (
        origin TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        last_poll_ms INTEGER NOT NULL DEFAULT 0,
        accepted INTEGER NOT NULL DEFAULT 0,
        skipped INTEGER NOT NULL DEFAULT 0,
        rejected INTEGER NOT NULL DEFAULT 0,
        revoked INTEGER NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        cursor TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE export_cursors (
        sink TEXT PRIMARY KEY,
        seq INTEGER NOT NULL DEFAULT 0,
        exported INTEGER NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        last_attempt_ms INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT NOT NULL DEFAULT '',
        lease_until_ms INTEGER NOT NULL DEFAULT 0
    );",
    // 5: certificates issued or seen, and their revocation.
    "CREATE TABLE certs (
        serial TEXT PRIMARY KEY,
        kind TEXT NOT NULL DEFAULT '',
        subject TEXT NOT NULL DEFAULT '',
        roles TEXT NOT NULL DEFAULT '',
        not_after_ms INTEGER NOT NULL DEFAULT 0,
        recorded_at_ms INTEGER NOT NULL DEFAULT 0,
        revoked_at_ms INTEGER NOT NULL DEFAULT 0
    );",
    // 6: participating organisations; the organisation of each token, agent and certificate.
    "CREATE TABLE orgs (
        name TEXT PRIMARY KEY,
        stix_id TEXT NOT NULL UNIQUE,
        sector TEXT NOT NULL DEFAULT '',
        country TEXT NOT NULL DEFAULT '',
        share TEXT NOT NULL,
        tlp TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL
    );
    ALTER TABLE tokens ADD COLUMN org TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE agents ADD COLUMN org TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE certs ADD COLUMN org TEXT NOT NULL DEFAULT '';
    CREATE INDEX agents_org ON agents(org);",
    // 7: console accounts.
    "CREATE TABLE users (
        name TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        roles TEXT NOT NULL,
        org TEXT NOT NULL DEFAULT '',
        created_at_ms INTEGER NOT NULL
    );",
    // 8: an agent's certificates, found by its id when a renewed one is first used.
    "CREATE INDEX certs_subject ON certs(subject);",
    // 9: console sign-in attempts, by account, by address and in all, shared by collectors.
    "CREATE TABLE login_attempts (
        key TEXT PRIMARY KEY,
        count INTEGER NOT NULL,
        since_ms INTEGER NOT NULL
    );",
    // 10: how far each agent's clock is from the collector's, and when it said goodbye.
    "ALTER TABLE agents ADD COLUMN clock_skew_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN stopped_at_ms INTEGER NOT NULL DEFAULT 0;",
    // 11: detections found by the SHA-256 of their file or executable.
    "CREATE INDEX detections_sha256 ON detections(sha256) WHERE sha256 IS NOT NULL;",
    // 12: detections found by the MD5 of their file, and by their agent's host name.
    "ALTER TABLE detections ADD COLUMN md5 TEXT;
    CREATE INDEX detections_md5 ON detections(md5) WHERE md5 IS NOT NULL;
    CREATE INDEX agents_hostname ON agents(hostname);",
    // 13: who made each token and its revocation, removed agents, the audit log (append-only).
    "ALTER TABLE tokens ADD COLUMN created_by TEXT NOT NULL DEFAULT '';
    ALTER TABLE tokens ADD COLUMN revoked_at_ms INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN removed_at_ms INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        org TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX audit_at ON audit(at_ms);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;",
    // 14: agent labels, and bundles published to one label only (staged rollout).
    "ALTER TABLE agents ADD COLUMN labels TEXT NOT NULL DEFAULT '';
    ALTER TABLE bundles ADD COLUMN target TEXT NOT NULL DEFAULT '';",
    // 15: alerts (detections grouped as they are stored), their verdicts (append-only), and
    // exceptions; each detection's alert and the exception that covered it.
    "CREATE TABLE alerts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        org TEXT NOT NULL,
        rule TEXT NOT NULL,
        subject TEXT NOT NULL,
        kind INTEGER NOT NULL,
        score INTEGER NOT NULL,
        first_seen_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL,
        detections INTEGER NOT NULL,
        hosts INTEGER NOT NULL,
        status TEXT NOT NULL,
        new_activity INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL,
        UNIQUE (org, rule, subject)
    );
    CREATE INDEX alerts_last ON alerts(last_seq);
    CREATE TABLE alert_hosts (
        alert_id INTEGER NOT NULL,
        agent_id TEXT NOT NULL,
        PRIMARY KEY (alert_id, agent_id)
    );
    CREATE TABLE alert_verdicts (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        alert_id INTEGER NOT NULL,
        at_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        status TEXT NOT NULL,
        note TEXT NOT NULL,
        exception_id TEXT NOT NULL
    );
    CREATE INDEX alert_verdicts_alert ON alert_verdicts(alert_id, seq);
    CREATE TRIGGER alert_verdicts_no_update BEFORE UPDATE ON alert_verdicts
        BEGIN SELECT RAISE(ABORT, 'the verdict history is append-only'); END;
    CREATE TRIGGER alert_verdicts_no_delete BEFORE DELETE ON alert_verdicts
        BEGIN SELECT RAISE(ABORT, 'the verdict history is append-only'); END;
    CREATE TABLE exceptions (
        id TEXT PRIMARY KEY,
        rule TEXT NOT NULL,
        indicator TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        path TEXT NOT NULL,
        org TEXT NOT NULL,
        agent TEXT NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        reason TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        removed_at_ms INTEGER NOT NULL DEFAULT 0,
        removed_by TEXT NOT NULL DEFAULT ''
    );
    ALTER TABLE detections ADD COLUMN alert_id INTEGER;
    ALTER TABLE detections ADD COLUMN exception_id TEXT;
    CREATE INDEX detections_alert ON detections(alert_id, seq) WHERE alert_id IS NOT NULL;",
    // 16: what each sink sent of each aggregated sighting.
    "CREATE TABLE sighting_tallies (
        sink TEXT NOT NULL,
        id TEXT NOT NULL,
        count INTEGER NOT NULL,
        first_seen_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        modified_ms INTEGER NOT NULL,
        PRIMARY KEY (sink, id)
    );",
    // 17: hunts, and the agents each one asked.
    "CREATE TABLE hunts (
        id TEXT PRIMARY KEY,
        org TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        request BLOB NOT NULL
    );
    CREATE TABLE hunt_agents (
        hunt_id TEXT NOT NULL REFERENCES hunts(id),
        agent_id TEXT NOT NULL,
        answered_at_ms INTEGER NOT NULL DEFAULT 0,
        answer BLOB NOT NULL DEFAULT x'',
        PRIMARY KEY (hunt_id, agent_id)
    );
    CREATE INDEX hunt_agents_agent ON hunt_agents(agent_id, answered_at_ms);",
    // 18: response actions, and whether each organisation's need a second operator.
    "ALTER TABLE orgs ADD COLUMN response_approval TEXT NOT NULL DEFAULT 'none';
    CREATE TABLE actions (
        id TEXT PRIMARY KEY,
        org TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        info BLOB NOT NULL
    );
    CREATE INDEX actions_agent ON actions(agent_id, state);",
    // 19: the costliest rules each agent measured on its own files, its last measurement.
    "CREATE TABLE rule_profiles (
        agent_id TEXT PRIMARY KEY,
        org TEXT NOT NULL,
        profile BLOB NOT NULL
    );",
];

/// Groups a batch's detections of one alert into it (`org`, `rule`, `subject`, `kind`, `score`,
/// `first_seen_ms`, `last_seen_ms`, `count`, `last_seq`, `now_ms`): a new alert, or more
/// detections of it, its times widened; an acknowledged or true-positive alert is flagged for
/// new activity.
const UPSERT_ALERT: &str = "INSERT INTO alerts (org, rule, subject, kind, score, first_seen_ms,
        last_seen_ms, detections, hosts, status, new_activity, last_seq, updated_at_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, 'open', 0, ?9, ?10)
     ON CONFLICT (org, rule, subject) DO UPDATE SET
       detections = alerts.detections + excluded.detections,
       score = MAX(alerts.score, excluded.score),
       first_seen_ms = MIN(alerts.first_seen_ms, excluded.first_seen_ms),
       last_seen_ms = MAX(alerts.last_seen_ms, excluded.last_seen_ms),
       last_seq = MAX(alerts.last_seq, excluded.last_seq),
       updated_at_ms = excluded.updated_at_ms,
       new_activity = CASE WHEN alerts.status IN ('acknowledged', 'true-positive') THEN 1
                           ELSE alerts.new_activity END
     RETURNING id";

/// Counts one sign-in attempt against a key (`key`, `now_ms`, `window_ms`): a new window when
/// the last one is over.
const COUNT_LOGIN_ATTEMPT: &str = "INSERT INTO login_attempts (key, count, since_ms)
     VALUES (?1, 1, ?2)
     ON CONFLICT (key) DO UPDATE SET
       count = CASE WHEN login_attempts.since_ms <= ?2 - ?3 THEN 1
                    ELSE login_attempts.count + 1 END,
       since_ms = CASE WHEN login_attempts.since_ms <= ?2 - ?3 THEN ?2
                       ELSE login_attempts.since_ms END
     RETURNING count";

/// Revokes an agent's certificates recorded before the one given (`subject`, `serial`,
/// `now_ms`).
const RETIRE_OLDER_CERTS: &str = "UPDATE certs SET revoked_at_ms = ?3
     WHERE kind = 'agent' AND subject = ?1 AND revoked_at_ms = 0 AND serial != ?2
       AND recorded_at_ms < (SELECT recorded_at_ms FROM certs WHERE serial = ?2)
     RETURNING serial";

/// The sequence number the next detection stored gets (AUTOINCREMENT: one past the largest
/// ever used).
fn next_seq(tx: &Connection) -> Result<i64, StoreError> {
    Ok(tx.query_row(
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'detections'), 0) + 1",
        [],
        |r| r.get(0),
    )?)
}

/// The detections of a batch not stored yet (each id once), in batch order.
fn fresh_detections<'a>(
    tx: &Connection,
    detections: &'a [Detection],
) -> Result<Vec<&'a Detection>, StoreError> {
    let mut known = tx.prepare_cached("SELECT 1 FROM detections WHERE id = ?1")?;
    let mut seen = std::collections::HashSet::new();
    let mut fresh = Vec::with_capacity(detections.len());
    for d in detections {
        if seen.insert(d.id.as_str()) && !known.exists([&d.id])? {
            fresh.push(d);
        }
    }
    Ok(fresh)
}

/// Raises the count of the agent's stored incidents that reports of the batch count more of
/// ([`super::recount`]): an incident stays one detection however often it is seen.
fn recount_stored(
    tx: &Connection,
    agent_id: &str,
    detections: &[Detection],
) -> Result<(), StoreError> {
    let mut read =
        tx.prepare_cached("SELECT body FROM detections WHERE id = ?1 AND agent_id = ?2")?;
    let mut write =
        tx.prepare_cached("UPDATE detections SET body = ?3 WHERE id = ?1 AND agent_id = ?2")?;
    for d in detections.iter().filter(|d| super::recount(d).is_some()) {
        let stored: Option<Vec<u8>> = read
            .query_row(params![d.id, agent_id], |r| r.get(0))
            .optional()?;
        if let Some(body) = stored.and_then(|b| super::recounted(&b, d)) {
            write.execute(params![d.id, agent_id, body])?;
        }
    }
    Ok(())
}

/// Upserts the alerts of a batch's detections (grouped by rule and subject, each with its
/// sequence number), once per alert, and counts the agent as a host of each it is new to;
/// the alerts' ids.
fn upsert_alerts(
    tx: &Connection,
    org: &str,
    agent_id: &str,
    groups: &BTreeMap<(String, String), Vec<(i64, &Detection)>>,
    now_ms: i64,
) -> Result<BTreeMap<(String, String), i64>, StoreError> {
    let mut upsert = tx.prepare_cached(UPSERT_ALERT)?;
    let mut host = tx.prepare_cached(
        "INSERT INTO alert_hosts (alert_id, agent_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
    )?;
    let mut bump = tx.prepare_cached("UPDATE alerts SET hosts = hosts + 1 WHERE id = ?1")?;
    let mut ids = BTreeMap::new();
    for ((rule, subject), members) in groups {
        let observed = members.iter().map(|(_, d)| d.observed_at_ms);
        let first = observed.clone().min().unwrap_or_default();
        let last = observed.max().unwrap_or_default();
        let score = members
            .iter()
            .map(|(_, d)| d.score)
            .max()
            .unwrap_or_default();
        let last_seq = members.iter().map(|(s, _)| *s).max().unwrap_or_default();
        let kind = members.first().map_or(0, |(_, d)| d.kind);
        let id: i64 = upsert.query_row(
            params![
                org,
                rule,
                subject,
                kind,
                score,
                first,
                last,
                members.len() as i64,
                last_seq,
                now_ms
            ],
            |r| r.get(0),
        )?;
        if host.execute(params![id, agent_id])? > 0 {
            bump.execute([id])?;
        }
        ids.insert((rule.clone(), subject.clone()), id);
    }
    Ok(ids)
}

/// Every exception, oldest first.
fn exception_rows(conn: &Connection) -> Result<Vec<ExceptionRow>, StoreError> {
    let mut stmt =
        conn.prepare_cached(&format!("{EXCEPTION_SELECT} ORDER BY created_at_ms, id"))?;
    let rows = stmt.query_map([], |r| rows::exception(r))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The exceptions in force at `now_ms` (removed and expired ones are history, not read on
/// every batch).
fn exceptions_in_force(conn: &Connection, now_ms: i64) -> Result<Vec<ExceptionRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("{EXCEPTION_SELECT} {IN_FORCE}"))?;
    let rows = stmt.query_map([now_ms], |r| rows::exception(r))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Moves a sink's cursor (`sink`, `seq`, `count`, `error`, `now_ms`).
const EXPORT_PROGRESS: &str = "INSERT INTO export_cursors (sink, seq, exported, last_error,
        last_attempt_ms)
     VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT (sink) DO UPDATE SET seq = MAX(seq, excluded.seq),
        exported = exported + excluded.exported, last_error = excluded.last_error,
        last_attempt_ms = excluded.last_attempt_ms";

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    fn list_users_where(&self, name: Option<&str>) -> Result<Vec<UserRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, password_hash, roles, org, created_at_ms FROM users
             WHERE ?1 IS NULL OR name = ?1 ORDER BY name",
        )?;
        let rows = stmt.query_map(params![name], |r| rows::user(r))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Opens (creating if needed) the database; for the server, brings its schema up to date
    /// (see [`Opener`]).
    pub fn open(path: &Path, opener: Opener) -> Result<SqliteStore, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        // FULL: a commit is on disk when it returns, so an Ack never outruns durability.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(open_err)?;
        let found: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open_err)?;
        let known = MIGRATIONS.len() as i64;
        if found > known {
            return Err(StoreError::TooNew {
                path: path.to_owned(),
                found,
                known,
            });
        }
        if opener == Opener::Tool && found != 0 && found < known {
            return Err(StoreError::TooOld {
                path: path.to_owned(),
                found,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        conn.execute(
            "INSERT INTO orgs (name, stix_id, share, tlp, created_at_ms)
             VALUES (?1, ?2, 'full', 'amber', ?3) ON CONFLICT (name) DO NOTHING",
            params![
                crate::orgs::DEFAULT_ORG,
                crate::orgs::new_stix_id(),
                super::now_ms()
            ],
        )?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back on
        // drop), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for SqliteStore {
    fn create_token(&self, t: &TokenRow) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO tokens (hash, created_at_ms, expires_at_ms, uses_left, org, created_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                t.hash,
                t.created_at_ms,
                t.expires_at_ms,
                t.uses_left,
                t.org,
                t.created_by
            ],
        )?;
        Ok(())
    }

    fn list_tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached(&format!("{TOKEN_SELECT} ORDER BY created_at_ms, hash"))?;
        let rows = stmt.query_map([], |r| rows::token(r))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn revoke_token(&self, hash: &str, now_ms: i64) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE tokens SET revoked_at_ms = ?2 WHERE hash = ?1 AND revoked_at_ms = 0",
            params![hash, now_ms],
        )?;
        Ok(n > 0)
    }

    fn rename_org(&self, name: &str, new_name: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE orgs SET name = ?2 WHERE name = ?1
               AND NOT EXISTS (SELECT 1 FROM orgs WHERE name = ?2)",
            params![name, new_name],
        )?;
        if n == 1 {
            tx.execute(
                "UPDATE tokens SET org = ?2 WHERE org = ?1",
                params![name, new_name],
            )?;
            tx.commit()?;
        }
        Ok(n == 1)
    }

    fn remove_org(&self, name: &str, now_ms: i64) -> Result<Option<u32>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if tx.execute("DELETE FROM orgs WHERE name = ?1", [name])? == 0 {
            return Ok(None);
        }
        let tokens = tx.execute(
            "UPDATE tokens SET revoked_at_ms = ?2 WHERE org = ?1 AND revoked_at_ms = 0",
            params![name, now_ms],
        )?;
        tx.commit()?;
        Ok(Some(u32::try_from(tokens).unwrap_or(u32::MAX)))
    }

    fn record_audit(&self, e: &AuditRow) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO audit (at_ms, actor, action, target, outcome, org, detail)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                e.at_ms, e.actor, e.action, e.target, e.outcome, e.org, e.detail
            ],
        )?;
        Ok(())
    }

    fn list_audit(
        &self,
        since_ms: i64,
        org: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{AUDIT_SELECT} WHERE at_ms >= ?1 AND (?2 IS NULL OR org = ?2) ORDER BY seq DESC LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![since_ms, org, limit], |r| rows::audit(r))?;
        let mut entries = rows.collect::<Result<Vec<_>, _>>()?;
        entries.reverse();
        Ok(entries)
    }

    fn audit_after(
        &self,
        after: u64,
        before_ms: i64,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{AUDIT_SELECT} WHERE seq > ?1 AND at_ms < ?2 ORDER BY seq LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![after as i64, before_ms, limit], |r| rows::audit(r))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn create_org(&self, o: &OrgRow) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "INSERT INTO orgs (name, stix_id, sector, country, share, tlp, created_at_ms,
                response_approval)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (name) DO NOTHING",
            params![
                o.name,
                o.stix_id,
                o.sector,
                o.country,
                o.share,
                o.tlp,
                o.created_at_ms,
                approval(&o.response_approval)
            ],
        )?;
        Ok(n == 1)
    }

    fn list_orgs(&self) -> Result<Vec<OrgRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, stix_id, sector, country, share, tlp, created_at_ms,
                (SELECT COUNT(*) FROM agents a WHERE a.org = o.name), response_approval
             FROM orgs o ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| rows::org(r))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn put_user(&self, u: &UserRow) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let existed: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM users WHERE name = ?1)",
            params![u.name],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO users (name, password_hash, roles, org, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash,
                roles = excluded.roles, org = excluded.org",
            params![u.name, u.password_hash, u.roles, u.org, u.created_at_ms],
        )?;
        tx.commit()?;
        Ok(!existed)
    }

    fn user(&self, name: &str) -> Result<Option<UserRow>, StoreError> {
        Ok(self.list_users_where(Some(name))?.pop())
    }

    fn list_users(&self) -> Result<Vec<UserRow>, StoreError> {
        self.list_users_where(None)
    }

    fn remove_user(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM users WHERE name = ?1", params![name])?
            == 1)
    }

    fn update_org(&self, o: &OrgRow) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE orgs SET sector = ?2, country = ?3, share = ?4, tlp = ?5,
                response_approval = ?6 WHERE name = ?1",
            params![
                o.name,
                o.sector,
                o.country,
                o.share,
                o.tlp,
                approval(&o.response_approval)
            ],
        )?;
        Ok(n == 1)
    }

    /// Spends one use of a token and records the new agent, in one transaction.
    fn record_cert(&self, c: &CertRow) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO certs (serial, kind, subject, roles, not_after_ms, recorded_at_ms, org)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (serial) DO NOTHING",
            params![
                c.serial,
                c.kind,
                c.subject,
                c.roles,
                c.not_after_ms,
                c.recorded_at_ms,
                c.org
            ],
        )?;
        Ok(())
    }

    fn list_certs(&self) -> Result<Vec<CertRow>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached(&format!("{CERT_SELECT} ORDER BY recorded_at_ms, serial"))?;
        let rows = stmt.query_map([], |r| rows::cert(r))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn revoke_cert(&self, serial: &str, now_ms: i64) -> Result<(bool, CertRow), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO certs (serial, recorded_at_ms) VALUES (?1, ?2)
             ON CONFLICT (serial) DO NOTHING",
            params![serial, now_ms],
        )?;
        let newly = tx.execute(
            "UPDATE certs SET revoked_at_ms = ?2 WHERE serial = ?1 AND revoked_at_ms = 0",
            params![serial, now_ms],
        )? == 1;
        let row = tx.query_row(&format!("{CERT_SELECT} WHERE serial = ?1"), [serial], |r| {
            rows::cert(r)
        })?;
        tx.commit()?;
        Ok((newly, row))
    }

    fn revoked_serials(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT serial FROM certs WHERE revoked_at_ms != 0")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn count_login_attempt(
        &self,
        budgets: &[(String, u64)],
        now_ms: i64,
        window_ms: i64,
    ) -> Result<bool, StoreError> {
        let conn = self.conn();
        conn.execute(
            "DELETE FROM login_attempts WHERE since_ms <= ?1",
            params![now_ms - window_ms],
        )?;
        let mut stmt = conn.prepare_cached(COUNT_LOGIN_ATTEMPT)?;
        for (key, limit) in budgets {
            let n: i64 = stmt.query_row(params![key, now_ms, window_ms], |r| r.get(0))?;
            if n.max(0) as u64 > *limit {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn clear_login_attempts(&self, key: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM login_attempts WHERE key = ?1", params![key])?;
        Ok(())
    }

    fn reset_connections(&self) -> Result<(), StoreError> {
        self.conn()
            .execute("UPDATE agents SET connected = 0 WHERE connected != 0", [])?;
        Ok(())
    }

    fn retire_older_certs(
        &self,
        subject: &str,
        serial: &str,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(RETIRE_OLDER_CERTS)?;
        let rows = stmt.query_map(params![subject, serial, now_ms], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn check_token(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<Result<String, TokenError>, StoreError> {
        let row: Option<(i64, i64, String, i64)> = self
            .conn()
            .query_row(
                "SELECT expires_at_ms, uses_left, org, revoked_at_ms FROM tokens WHERE hash = ?1",
                [token_hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        Ok(super::token_verdict(row, now_ms))
    }

    fn enroll(
        &self,
        token_hash: &str,
        agent_id: &str,
        hostname: &str,
        now_ms: i64,
    ) -> Result<Result<String, TokenError>, StoreError> {
        let mut conn = self.conn();
        // IMMEDIATE: the write lock is taken before the read, so two handles on one file
        // cannot both see the last use left.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row: Option<(i64, i64, String, i64)> = tx
            .query_row(
                "SELECT expires_at_ms, uses_left, org, revoked_at_ms FROM tokens WHERE hash = ?1",
                [token_hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let verdict = super::token_verdict(row, now_ms);
        if let Ok(org) = &verdict {
            tx.execute(
                "UPDATE tokens SET uses_left = uses_left - 1 WHERE hash = ?1",
                [token_hash],
            )?;
            tx.execute(
                "INSERT INTO agents (id, hostname, enrolled_at_ms, org) VALUES (?1, ?2, ?3, ?4)",
                params![agent_id, hostname, now_ms, org],
            )?;
            tx.commit()?;
        }
        Ok(verdict)
    }

    /// The agent's row, if it was ever enrolled.
    fn agent(&self, id: &str) -> Result<Option<AgentRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(&format!("{AGENT_SELECT} WHERE id = ?1"), [id], |r| {
                rows::agent(r)
            })
            .optional()?)
    }

    fn list_agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("{AGENT_SELECT} ORDER BY enrolled_at_ms, id"))?;
        let rows = stmt.query_map([], |r| rows::agent(r))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records that an agent opened its stream, with the inventory of its Hello.
    fn agent_connected(
        &self,
        id: &str,
        inv: &Inventory,
        bundle_version: u64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE agents SET hostname = ?2, os = ?3, kernel = ?4, arch = ?5, agent_version = ?6,
                first_seen_ms = CASE WHEN first_seen_ms = 0 THEN ?7 ELSE first_seen_ms END,
                last_seen_ms = ?7, connected = 1, stopped_at_ms = 0,
                bundle_applied_at_ms = CASE WHEN bundle_version != ?8 THEN ?7 ELSE bundle_applied_at_ms END,
                bundle_version = ?8
             WHERE id = ?1",
            params![
                id,
                inv.hostname,
                inv.os,
                inv.kernel,
                inv.arch,
                inv.agent_version,
                now_ms,
                bundle_version as i64
            ],
        )?;
        Ok(())
    }

    fn agent_seen(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE agents SET last_seen_ms = ?2 WHERE id = ?1",
            params![id, now_ms],
        )?;
        Ok(())
    }

    /// Records a heartbeat: the dropped total (never decreasing) and the agent's counters.
    fn agent_heartbeat(
        &self,
        id: &str,
        dropped_total: u64,
        counters: &BTreeMap<String, u64>,
        clock_skew_ms: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let counters = serde_json::to_string(counters).unwrap_or_else(|_| "{}".into());
        self.conn().execute(
            "UPDATE agents SET last_seen_ms = ?2, dropped_total = MAX(dropped_total, ?3), counters = ?4,
                clock_skew_ms = ?5
             WHERE id = ?1",
            params![id, now_ms, dropped_total as i64, counters, clock_skew_ms],
        )?;
        Ok(())
    }

    fn agent_stopped(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE agents SET stopped_at_ms = ?2 WHERE id = ?1",
            params![id, now_ms],
        )?;
        Ok(())
    }

    fn agent_disconnected(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE agents SET connected = 0, last_seen_ms = MAX(last_seen_ms, ?2) WHERE id = ?1",
            params![id, now_ms],
        )?;
        Ok(())
    }

    /// Marks an agent revoked. Returns false when no such agent exists.
    fn revoke_agent(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE agents SET revoked_at_ms = COALESCE(revoked_at_ms, ?2) WHERE id = ?1",
            params![id, now_ms],
        )?;
        Ok(n > 0)
    }

    fn set_agent_labels(&self, id: &str, labels: &[String]) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE agents SET labels = ?2 WHERE id = ?1",
            params![id, labels.join(",")],
        )?;
        Ok(n > 0)
    }

    fn promote_bundle(&self, version: u64) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE bundles SET target = '' WHERE version = ?1",
            params![version as i64],
        )?;
        Ok(n > 0)
    }

    fn remove_agent(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE agents SET revoked_at_ms = COALESCE(revoked_at_ms, ?2),
                removed_at_ms = CASE WHEN removed_at_ms = 0 THEN ?2 ELSE removed_at_ms END
             WHERE id = ?1",
            params![id, now_ms],
        )?;
        Ok(n > 0)
    }

    /// Stores a batch of detections of one agent in one transaction. A detection whose id is
    /// already stored is skipped (resends are idempotent). Returns how many were new.
    fn insert_detections(
        &self,
        agent_id: &str,
        detections: &[Detection],
        received_at_ms: i64,
    ) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let org: Option<String> = tx
            .query_row(
                "SELECT org FROM agents WHERE id = ?1 AND revoked_at_ms IS NULL",
                [agent_id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(org) = org else {
            return Err(StoreError::Revoked(agent_id.to_string()));
        };
        // One writer at a time: a detection not stored now is not stored by anyone else before
        // this transaction ends, and the sequence numbers it takes are known beforehand.
        let fresh = fresh_detections(&tx, detections)?;
        if fresh.is_empty() {
            recount_stored(&tx, agent_id, detections)?;
            tx.commit()?;
            return Ok(0);
        }
        let exceptions = rows::in_force(
            exceptions_in_force(&tx, received_at_ms)?,
            &org,
            received_at_ms,
        );
        let next = next_seq(&tx)?;
        let covered: Vec<Option<&str>> = fresh
            .iter()
            .map(|d| exceptions.covering(d, agent_id, &org, received_at_ms))
            .collect();
        let mut groups: BTreeMap<(String, String), Vec<(i64, &Detection)>> = BTreeMap::new();
        for (i, d) in fresh.iter().enumerate() {
            if covered[i].is_none() {
                let key = (d.rule.clone(), alert_subject(d, agent_id));
                groups.entry(key).or_default().push((next + i as i64, d));
            }
        }
        let alerts = upsert_alerts(&tx, &org, agent_id, &groups, received_at_ms)?;
        let mut insert = tx.prepare_cached(
            "INSERT INTO detections (seq, id, agent_id, kind, rule, path, sha256, pid,
                observed_at_ms, received_at_ms, bundle_version, body, md5, exception_id, alert_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )?;
        for (i, d) in fresh.iter().enumerate() {
            let (path, sha256, pid) = indexed(d);
            let alert = match covered[i] {
                Some(_) => None,
                None => alerts
                    .get(&(d.rule.clone(), alert_subject(d, agent_id)))
                    .copied(),
            };
            insert.execute(params![
                next + i as i64,
                d.id,
                agent_id,
                d.kind,
                d.rule,
                path,
                sha256.filter(|s| !s.is_empty()),
                pid,
                d.observed_at_ms,
                received_at_ms,
                d.bundle_version as i64,
                d.encode_to_vec(),
                file_md5(d),
                covered[i],
                alert,
            ])?;
        }
        drop(insert);
        recount_stored(&tx, agent_id, detections)?;
        tx.commit()?;
        Ok(fresh.len())
    }

    /// The most recent detections matching the filter, oldest first.
    fn list_detections(&self, f: &DetectionFilter) -> Result<DetectionPage, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{DETECTION_SELECT}
             WHERE (?1 IS NULL OR d.agent_id = ?1) AND (?2 IS NULL OR d.received_at_ms >= ?2)
               AND (?3 IS NULL OR d.seq < ?3) AND (?5 IS NULL OR a.org = ?5)
               AND (?6 IS NULL OR d.received_at_ms < ?6) AND (?7 IS NULL OR d.kind = ?7)
               AND (?8 IS NULL OR d.rule = ?8) AND (?9 IS NULL OR d.sha256 = ?9)
               AND (?10 IS NULL OR d.md5 = ?10) AND (?11 IS NULL OR a.hostname = ?11)
               AND (?12 OR d.exception_id IS NULL) AND (?13 IS NULL OR d.alert_id = ?13)
               AND (?14 IS NULL OR instr(',' || a.labels || ',', ',' || ?14 || ',') > 0)
             ORDER BY d.seq DESC LIMIT ?4"
        ))?;
        let before = f.before_seq.map(|s| s.min(i64::MAX as u64) as i64);
        let alert = f.alert_id.map(|s| s.min(i64::MAX as u64) as i64);
        let mut rows = stmt.query(params![
            f.agent_id,
            f.since_ms,
            before,
            f.sql_limit(),
            f.org,
            f.until_ms,
            f.kind,
            f.rule,
            f.sha256,
            f.md5,
            f.host,
            f.suppressed,
            alert,
            f.label,
        ])?;
        DetectionPage::collect(f, || match rows.next()? {
            Some(r) => Ok(Some(rows::detection(r)?.decode()?)),
            None => Ok(None),
        })
    }

    fn list_alerts(&self, f: &AlertFilter) -> Result<Vec<AlertRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{ALERT_SELECT} WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR org = ?2)
               AND (?3 IS NULL OR last_seq < ?3)
             ORDER BY last_seq DESC LIMIT ?4"
        ))?;
        let before = f.before_seq.map(|s| s.min(i64::MAX as u64) as i64);
        let rows = stmt.query_map(params![f.status, f.org, before, f.limit], |r| {
            rows::alert(r)
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn alert(&self, id: u64) -> Result<Option<AlertRow>, StoreError> {
        let conn = self.conn();
        let id = id.min(i64::MAX as u64) as i64;
        Ok(conn
            .query_row(&format!("{ALERT_SELECT} WHERE id = ?1"), [id], |r| {
                rows::alert(r)
            })
            .optional()?)
    }

    fn alert_verdicts(&self, id: u64) -> Result<Vec<VerdictRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{VERDICT_SELECT} WHERE alert_id = ?1 ORDER BY seq"
        ))?;
        let id = id.min(i64::MAX as u64) as i64;
        let rows = stmt.query_map([id], |r| rows::verdict(r))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn verdicts_after(&self, after: u64, limit: u32) -> Result<Vec<VerdictRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{VERDICT_SELECT} WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![after.min(i64::MAX as u64) as i64, limit], |r| {
            rows::verdict(r)
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn judge_alert(&self, v: &VerdictRow) -> Result<Option<AlertRow>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let id = v.alert_id.min(i64::MAX as u64) as i64;
        let n = tx.execute(
            "UPDATE alerts SET status = ?2, new_activity = 0, updated_at_ms = ?3 WHERE id = ?1",
            params![id, v.status, v.at_ms],
        )?;
        if n == 0 {
            return Ok(None);
        }
        tx.execute(
            "INSERT INTO alert_verdicts (alert_id, at_ms, actor, status, note, exception_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, v.at_ms, v.actor, v.status, v.note, v.exception_id],
        )?;
        let row = tx.query_row(&format!("{ALERT_SELECT} WHERE id = ?1"), [id], |r| {
            rows::alert(r)
        })?;
        tx.commit()?;
        Ok(Some(row))
    }

    fn add_exception(&self, e: &ExceptionRow) -> Result<(), StoreError> {
        let x = &e.ex;
        self.conn().execute(
            "INSERT INTO exceptions (id, rule, indicator, sha256, path, org, agent, expires_at_ms,
                reason, created_at_ms, created_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                x.id,
                x.rule,
                x.indicator,
                x.sha256,
                x.path,
                x.org,
                x.agent,
                x.expires_at_ms,
                x.reason,
                e.created_at_ms,
                e.created_by
            ],
        )?;
        Ok(())
    }

    fn list_exceptions(&self) -> Result<Vec<ExceptionRow>, StoreError> {
        exception_rows(&self.conn())
    }

    fn create_hunt(&self, h: &HuntRow, agents: &[String]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO hunts (id, org, created_by, created_at_ms, expires_at_ms, request)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                h.id,
                h.org,
                h.created_by,
                h.created_at_ms,
                h.expires_at_ms,
                h.request
            ],
        )?;
        for a in agents {
            tx.execute(
                "INSERT INTO hunt_agents (hunt_id, agent_id) VALUES (?1, ?2)",
                params![h.id, a],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn list_hunts(&self, org: Option<&str>) -> Result<Vec<HuntRow>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!(
            "{HUNT_SELECT} WHERE (?1 IS NULL OR h.org = ?1) GROUP BY h.id
             ORDER BY h.created_at_ms DESC, h.id"
        ))?;
        let rows = st.query_map([org], |r| rows::hunt(r))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn hunt(&self, id: &str) -> Result<Option<(HuntRow, Vec<HuntAgentRow>)>, StoreError> {
        let conn = self.conn();
        let Some(h) = conn
            .query_row(
                &format!("{HUNT_SELECT} WHERE h.id = ?1 GROUP BY h.id"),
                [id],
                |r| rows::hunt(r),
            )
            .optional()?
        else {
            return Ok(None);
        };
        let mut st = conn.prepare(
            "SELECT agent_id, answered_at_ms, answer FROM hunt_agents WHERE hunt_id = ?1
             ORDER BY agent_id",
        )?;
        let agents = st
            .query_map([id], |r| {
                Ok(HuntAgentRow {
                    agent_id: r.get(0)?,
                    answered_at_ms: r.get(1)?,
                    answer: r.get(2)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(Some((h, agents)))
    }

    fn pending_hunts(&self, agent: &str, now_ms: i64) -> Result<Vec<HuntRow>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!(
            "{HUNT_SELECT} WHERE h.expires_at_ms > ?2 AND h.id IN (SELECT hunt_id FROM
             hunt_agents WHERE agent_id = ?1 AND answered_at_ms = 0)
             GROUP BY h.id ORDER BY h.created_at_ms, h.id"
        ))?;
        let rows = st.query_map(params![agent, now_ms], |r| rows::hunt(r))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn put_action(&self, a: &ActionRow, from_state: Option<&str>) -> Result<bool, StoreError> {
        let conn = self.conn();
        let n = match from_state {
            None => conn.execute(
                "INSERT INTO actions (id, org, agent_id, state, created_at_ms, expires_at_ms, info)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING",
                params![
                    a.id,
                    a.org,
                    a.agent_id,
                    a.state,
                    a.created_at_ms,
                    a.expires_at_ms,
                    a.info
                ],
            )?,
            Some(from) => conn.execute(
                "UPDATE actions SET state = ?2, expires_at_ms = ?3, info = ?4
                 WHERE id = ?1 AND state = ?5",
                params![a.id, a.state, a.expires_at_ms, a.info, from],
            )?,
        };
        Ok(n == 1)
    }

    fn action(&self, id: &str) -> Result<Option<ActionRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(&format!("{ACTION_SELECT} WHERE id = ?1"), [id], |r| {
                rows::action(r)
            })
            .optional()?)
    }

    fn list_actions(&self, org: Option<&str>) -> Result<Vec<ActionRow>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!(
            "{ACTION_SELECT} WHERE (?1 IS NULL OR org = ?1) ORDER BY created_at_ms DESC, id"
        ))?;
        let rows = st.query_map([org], |r| rows::action(r))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn due_actions(&self, agent: &str, now_ms: i64) -> Result<Vec<ActionRow>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!(
            "{ACTION_SELECT} WHERE agent_id = ?1 AND state IN ('approved', 'sent')
             AND expires_at_ms > ?2 ORDER BY created_at_ms, id"
        ))?;
        let rows = st.query_map(params![agent, now_ms], |r| rows::action(r))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn put_rule_profile(&self, agent: &str, profile: &[u8]) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "INSERT INTO rule_profiles (agent_id, org, profile)
             SELECT id, org, ?2 FROM agents WHERE id = ?1
             ON CONFLICT (agent_id) DO UPDATE SET org = excluded.org, profile = excluded.profile",
            params![agent, profile],
        )?;
        Ok(n == 1)
    }

    fn rule_profiles(&self, org: Option<&str>) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT agent_id, profile FROM rule_profiles WHERE (?1 IS NULL OR org = ?1)
             ORDER BY agent_id",
        )?;
        let rows = st.query_map([org], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn answer_hunt(
        &self,
        id: &str,
        agent: &str,
        at_ms: i64,
        answer: &[u8],
    ) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE hunt_agents SET answered_at_ms = ?3, answer = ?4
             WHERE hunt_id = ?1 AND agent_id = ?2 AND answered_at_ms = 0",
            params![id, agent, at_ms.max(1), answer],
        )?;
        Ok(n == 1)
    }

    fn remove_exception(
        &self,
        id: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<Option<ExceptionRow>, StoreError> {
        let conn = self.conn();
        conn.execute(
            "UPDATE exceptions SET removed_at_ms = ?2, removed_by = ?3
             WHERE id = ?1 AND removed_at_ms = 0",
            params![id, now_ms, by],
        )?;
        Ok(conn
            .query_row(&format!("{EXCEPTION_SELECT} WHERE id = ?1"), [id], |r| {
                rows::exception(r)
            })
            .optional()?)
    }

    /// Stores a bundle if its version is above every stored one. `Err(latest)` otherwise.
    fn insert_bundle(&self, b: &BundleRow) -> Result<Result<(), u64>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let latest: i64 =
            tx.query_row("SELECT COALESCE(MAX(version), 0) FROM bundles", [], |r| {
                r.get(0)
            })?;
        if b.version as i64 <= latest {
            return Ok(Err(latest as u64));
        }
        tx.execute(
            "INSERT INTO bundles (version, name, created_at_ms, publisher, published_by,
                published_at_ms, digest, signer_key, files, content, signature, target)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                b.version as i64,
                b.name,
                b.created_at_ms,
                b.publisher,
                b.published_by,
                b.published_at_ms,
                b.digest,
                b.signer_key,
                b.files,
                b.content,
                b.signature,
                b.target
            ],
        )?;
        tx.commit()?;
        Ok(Ok(()))
    }

    /// Every bundle, newest first, without content.
    fn list_bundles(&self) -> Result<Vec<BundleRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "{BUNDLE_SELECT} X'', X'' FROM bundles ORDER BY version DESC"
        ))?;
        let rows = stmt.query_map([], |r| rows::bundle(r))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One bundle with its content; version 0 means the latest.
    fn bundle(&self, version: u64) -> Result<Option<BundleRow>, StoreError> {
        let sql = format!(
            "{BUNDLE_SELECT} content, signature FROM bundles
             WHERE version = CASE WHEN ?1 = 0 THEN (SELECT MAX(version) FROM bundles) ELSE ?1 END"
        );
        Ok(self
            .conn()
            .query_row(&sql, [version as i64], |r| rows::bundle(r))
            .optional()?)
    }

    /// Records an agent's report on a bundle: applied (its running version now), or failed.
    fn agent_bundle_status(
        &self,
        id: &str,
        version: u64,
        applied: bool,
        error: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if applied {
            self.conn().execute(
                "UPDATE agents SET bundle_version = ?2, bundle_applied_at_ms = ?3,
                    bundle_failed_version = CASE WHEN bundle_failed_version <= ?2 THEN 0 ELSE bundle_failed_version END,
                    bundle_error = CASE WHEN bundle_failed_version <= ?2 THEN '' ELSE bundle_error END
                 WHERE id = ?1",
                params![id, version as i64, now_ms],
            )?;
        } else {
            self.conn().execute(
                "UPDATE agents SET bundle_failed_version = ?2, bundle_error = ?3 WHERE id = ?1",
                params![id, version as i64, error],
            )?;
        }
        Ok(())
    }

    /// Number of stored detections (all agents).
    fn schema(&self) -> Result<Schema, StoreError> {
        let conn = self.conn();
        let mut tables = conn.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        )?;
        let names = tables
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut schema = Schema::new();
        for table in names {
            let mut columns = conn.prepare("SELECT name, type FROM pragma_table_info(?1)")?;
            let columns = columns
                .query_map(params![table], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            schema.insert(table, columns);
        }
        Ok(schema)
    }

    fn count_detections(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM detections", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    fn delete_detections_before(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError> {
        let n = self.conn().execute(
            "DELETE FROM detections WHERE seq IN
                (SELECT seq FROM detections WHERE received_at_ms < ?1 ORDER BY seq LIMIT ?2)",
            params![before_ms, limit],
        )?;
        Ok(n as u64)
    }

    fn stage_intel(&self, b: &IntelBatch<'_>, now_ms: i64) -> Result<StagingCounts, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut out = StagingCounts::default();
        for l in b.lines {
            let old: Option<String> = tx
                .query_row(
                    "SELECT line FROM intel_indicators WHERE source = ?1 AND id = ?2",
                    params![l.source, l.id],
                    |r| r.get(0),
                )
                .optional()?;
            match old {
                Some(old) if old == l.line => continue,
                Some(_) => out.updated += 1,
                None => out.added += 1,
            }
            tx.execute(
                "INSERT INTO intel_indicators (source, id, origin, line, staged_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (source, id) DO UPDATE SET origin = excluded.origin,
                    line = excluded.line, staged_at_ms = excluded.staged_at_ms",
                params![l.source, l.id, l.origin, l.line, now_ms],
            )?;
        }
        for id in b.revoked {
            out.removed += tx.execute(
                "DELETE FROM intel_indicators WHERE source = 'stix' AND id = ?1",
                [id],
            )? as u64;
        }
        tx.execute(
            "INSERT INTO intel_sources (origin, kind, last_poll_ms, accepted, skipped, rejected,
                revoked, last_error) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, '')
             ON CONFLICT (origin) DO UPDATE SET kind = excluded.kind,
                last_poll_ms = excluded.last_poll_ms, last_error = '',
                accepted = excluded.accepted + CASE WHEN ?8 THEN accepted ELSE 0 END,
                skipped = excluded.skipped + CASE WHEN ?8 THEN skipped ELSE 0 END,
                rejected = excluded.rejected + CASE WHEN ?8 THEN rejected ELSE 0 END,
                revoked = excluded.revoked + CASE WHEN ?8 THEN revoked ELSE 0 END,
                cursor = CASE WHEN ?9 = '' THEN cursor ELSE ?9 END",
            params![
                b.origin,
                b.kind,
                now_ms,
                b.lines.len() as i64,
                b.skipped as i64,
                b.rejected as i64,
                b.revoked.len() as i64,
                b.continued,
                b.cursor
            ],
        )?;
        tx.commit()?;
        Ok(out)
    }

    fn list_intel(&self, after: (&str, &str), limit: u32) -> Result<Vec<StagedLine>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT source, id, origin, line FROM intel_indicators
             WHERE (source, id) > (?1, ?2) ORDER BY source, id LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![after.0, after.1, limit], |r| {
            Ok(StagedLine {
                source: r.get(0)?,
                id: r.get(1)?,
                origin: r.get(2)?,
                line: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn intel_sources(&self) -> Result<Vec<IntelSourceRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT origin, kind, last_poll_ms, accepted, skipped, rejected, revoked, last_error,
                (SELECT COUNT(*) FROM intel_indicators i WHERE i.origin = s.origin)
             FROM intel_sources s ORDER BY origin",
        )?;
        let rows = stmt.query_map([], |r| rows::intel_source(r))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn intel_cursor(&self, origin: &str) -> Result<String, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT cursor FROM intel_sources WHERE origin = ?1",
                [origin],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or_default())
    }

    fn export_lease(
        &self,
        sink: &str,
        owner: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "INSERT INTO export_cursors (sink, lease_owner, lease_until_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (sink) DO UPDATE SET lease_owner = excluded.lease_owner,
                lease_until_ms = excluded.lease_until_ms
             WHERE export_cursors.lease_owner = excluded.lease_owner
                OR export_cursors.lease_until_ms < ?4",
            params![sink, owner, now_ms + ttl_ms, now_ms],
        )?;
        Ok(n == 1)
    }

    fn export_state(&self, sink: &str) -> Result<ExportRow, StoreError> {
        Ok(self
            .export_states()?
            .into_iter()
            .find(|r| r.sink == sink)
            .unwrap_or_else(|| ExportRow {
                sink: sink.into(),
                ..Default::default()
            }))
    }

    fn export_states(&self) -> Result<Vec<ExportRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT sink, seq, exported, last_error, last_attempt_ms,
                (SELECT COUNT(*) FROM detections d WHERE d.seq > e.seq)
             FROM export_cursors e ORDER BY sink",
        )?;
        let rows = stmt.query_map([], |r| rows::export(r))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn detections_after(
        &self,
        after: u64,
        before_ms: i64,
        limit: u32,
    ) -> Result<Vec<(u64, StoredDetection)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{DETECTION_SELECT} WHERE d.seq > ?1 AND d.received_at_ms < ?2 ORDER BY d.seq LIMIT ?3"
        ))?;
        let mut rows = stmt.query(params![after as i64, before_ms, limit])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let (seq, _, stored) = rows::detection(r)?.decode()?;
            out.push((seq, stored));
        }
        Ok(out)
    }

    fn export_progress(
        &self,
        sink: &str,
        seq: u64,
        count: u64,
        error: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            EXPORT_PROGRESS,
            params![sink, seq as i64, count as i64, error, now_ms],
        )?;
        Ok(())
    }

    fn sighting_tallies(
        &self,
        sink: &str,
        ids: &[String],
    ) -> Result<BTreeMap<String, Tally>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT count, first_seen_ms, last_seen_ms, created_ms, modified_ms
             FROM sighting_tallies WHERE sink = ?1 AND id = ?2",
        )?;
        let mut out = BTreeMap::new();
        for id in ids {
            let row = stmt
                .query_row(params![sink, id], |r| rows::tally(r))
                .optional()?;
            if let Some(t) = row {
                out.insert(id.clone(), t);
            }
        }
        Ok(out)
    }

    fn sightings_sent(
        &self,
        sink: &str,
        tallies: &[(String, Tally)],
        seq: u64,
        count: u64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO sighting_tallies (sink, id, count, first_seen_ms, last_seen_ms,
                    created_ms, modified_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (sink, id) DO UPDATE SET count = excluded.count,
                    first_seen_ms = excluded.first_seen_ms, last_seen_ms = excluded.last_seen_ms,
                    modified_ms = excluded.modified_ms",
            )?;
            for (id, t) in tallies {
                stmt.execute(params![
                    sink,
                    id,
                    t.count as i64,
                    t.first_seen_ms,
                    t.last_seen_ms,
                    t.created_ms,
                    t.modified_ms
                ])?;
            }
        }
        tx.execute(
            EXPORT_PROGRESS,
            params![sink, seq as i64, count as i64, "", now_ms],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn intel_error(
        &self,
        origin: &str,
        kind: &str,
        error: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO intel_sources (origin, kind, last_poll_ms, last_error)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (origin) DO UPDATE SET last_poll_ms = excluded.last_poll_ms,
                last_error = excluded.last_error",
            params![origin, kind, now_ms, error],
        )?;
        Ok(())
    }
}

const BUNDLE_SELECT: &str = "SELECT version, name, created_at_ms, publisher, published_by,
    published_at_ms, digest, signer_key, files, target, length(content),";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_sets_up_a_new_store_but_never_migrates_an_older_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        SqliteStore::open(&path, Opener::Tool).unwrap();
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", MIGRATIONS.len() as i64 - 1)
            .unwrap();
        drop(conn);
        let e = SqliteStore::open(&path, Opener::Tool).err().unwrap();
        assert!(matches!(e, StoreError::TooOld { .. }), "{e}");
        assert!(e.to_string().contains("vedette-collector serve"), "{e}");
        let conn = Connection::open(&path).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64 - 1, "nothing was applied");
    }
}
