//! The PostgreSQL schema: numbered migrations (table `vedette_schema`), applied at start under
//! a transaction-level advisory lock, so collectors starting together apply each one once.

use super::pool::Conn;

use crate::store::{Opener, StoreError};

/// Schema migrations, applied in order; `vedette_schema.version` is the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: the schema of SQLite's migrations 1 to 3, in PostgreSQL's types.
    "CREATE TABLE tokens (
        hash TEXT PRIMARY KEY,
        created_at_ms BIGINT NOT NULL,
        expires_at_ms BIGINT NOT NULL,
        uses_left BIGINT NOT NULL
    );
    CREATE TABLE agents (
        id TEXT PRIMARY KEY,
        hostname TEXT NOT NULL DEFAULT '',
        os TEXT NOT NULL DEFAULT '',
        kernel TEXT NOT NULL DEFAULT '',
        arch TEXT NOT NULL DEFAULT '',
        agent_version TEXT NOT NULL DEFAULT '',
        enrolled_at_ms BIGINT NOT NULL,
        first_seen_ms BIGINT NOT NULL DEFAULT 0,
        last_seen_ms BIGINT NOT NULL DEFAULT 0,
        connected BOOLEAN NOT NULL DEFAULT FALSE,
        revoked_at_ms BIGINT,
        bundle_version BIGINT NOT NULL DEFAULT 0,
        bundle_applied_at_ms BIGINT NOT NULL DEFAULT 0,
        dropped_total BIGINT NOT NULL DEFAULT 0,
        counters TEXT NOT NULL DEFAULT '{}',
        bundle_failed_version BIGINT NOT NULL DEFAULT 0,
        bundle_error TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE detections (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        agent_id TEXT NOT NULL REFERENCES agents(id),
        kind INTEGER NOT NULL,
        rule TEXT NOT NULL,
        path TEXT,
        sha256 TEXT,
        pid BIGINT,
        observed_at_ms BIGINT NOT NULL,
        received_at_ms BIGINT NOT NULL,
        bundle_version BIGINT NOT NULL,
        body BYTEA NOT NULL
    );
    CREATE INDEX detections_agent ON detections(agent_id, seq);
    CREATE INDEX detections_received ON detections(received_at_ms);
    CREATE TABLE bundles (
        version BIGINT PRIMARY KEY,
        name TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        publisher TEXT NOT NULL,
        published_by TEXT NOT NULL,
        published_at_ms BIGINT NOT NULL,
        digest TEXT NOT NULL,
        signer_key BYTEA NOT NULL,
        files BIGINT NOT NULL,
        content BYTEA NOT NULL,
        signature BYTEA NOT NULL
    );",
    // 2: staged threat intelligence and its sources.
    "CREATE TABLE intel_indicators (
        source TEXT NOT NULL,
        id TEXT NOT NULL,
        origin TEXT NOT NULL,
        line TEXT NOT NULL,
        staged_at_ms BIGINT NOT NULL,
        PRIMARY KEY (source, id)
    );
    CREATE TABLE intel_sources (
        origin TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        last_poll_ms BIGINT NOT NULL DEFAULT 0,
        accepted BIGINT NOT NULL DEFAULT 0,
        skipped BIGINT NOT NULL DEFAULT 0,
        rejected BIGINT NOT NULL DEFAULT 0,
        revoked BIGINT NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        cursor TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE export_cursors (
        sink TEXT PRIMARY KEY,
        seq BIGINT NOT NULL DEFAULT 0,
        exported BIGINT NOT NULL DEFAULT 0,
        last_error TEXT NOT NULL DEFAULT '',
        last_attempt_ms BIGINT NOT NULL DEFAULT 0,
        lease_owner TEXT NOT NULL DEFAULT '',
        lease_until_ms BIGINT NOT NULL DEFAULT 0
    );",
    // 3: certificates issued or seen, and their revocation.
    "CREATE TABLE certs (
        serial TEXT PRIMARY KEY,
        kind TEXT NOT NULL DEFAULT '',
        subject TEXT NOT NULL DEFAULT '',
        roles TEXT NOT NULL DEFAULT '',
        not_after_ms BIGINT NOT NULL DEFAULT 0,
        recorded_at_ms BIGINT NOT NULL DEFAULT 0,
        revoked_at_ms BIGINT NOT NULL DEFAULT 0
    );",
    // 4: participating organisations; the organisation of each token, agent and certificate.
    "CREATE TABLE orgs (
        name TEXT PRIMARY KEY,
        stix_id TEXT NOT NULL UNIQUE,
        sector TEXT NOT NULL DEFAULT '',
        country TEXT NOT NULL DEFAULT '',
        share TEXT NOT NULL,
        tlp TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL
    );
    ALTER TABLE tokens ADD COLUMN org TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE agents ADD COLUMN org TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE certs ADD COLUMN org TEXT NOT NULL DEFAULT '';
    CREATE INDEX agents_org ON agents(org);",
    // 5: console accounts.
    "CREATE TABLE users (
        name TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        roles TEXT NOT NULL,
        org TEXT NOT NULL DEFAULT '',
        created_at_ms BIGINT NOT NULL
    );",
    // 6: an agent's certificates, found by its id when a renewed one is first used.
    "CREATE INDEX certs_subject ON certs(subject);",
    // 7: console sign-in attempts, by account, by address and in all, shared by collectors.
    "CREATE TABLE login_attempts (
        key TEXT PRIMARY KEY,
        count BIGINT NOT NULL,
        since_ms BIGINT NOT NULL
    );",
    // 8: how far each agent's clock is from the collector's, and when it said goodbye.
    "ALTER TABLE agents ADD COLUMN clock_skew_ms BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN stopped_at_ms BIGINT NOT NULL DEFAULT 0;",
    // 9: detections found by the SHA-256 of their file or executable.
    "CREATE INDEX detections_sha256 ON detections(sha256) WHERE sha256 IS NOT NULL;",
    // 10: detections found by the MD5 of their file, and by their agent's host name.
    "ALTER TABLE detections ADD COLUMN md5 TEXT;
    CREATE INDEX detections_md5 ON detections(md5) WHERE md5 IS NOT NULL;
    CREATE INDEX agents_hostname ON agents(hostname);",
    // 11: who made each token and its revocation, removed agents, the audit log (append-only).
    "ALTER TABLE tokens ADD COLUMN created_by TEXT NOT NULL DEFAULT '';
    ALTER TABLE tokens ADD COLUMN revoked_at_ms BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN removed_at_ms BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE audit (
        seq BIGSERIAL PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        org TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX audit_at ON audit(at_ms);
    CREATE FUNCTION vedette_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
    CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
        FOR EACH ROW EXECUTE FUNCTION vedette_audit_append_only();",
    // 12: agent labels, and bundles published to one label only (staged rollout).
    "ALTER TABLE agents ADD COLUMN labels TEXT NOT NULL DEFAULT '';
    ALTER TABLE bundles ADD COLUMN target TEXT NOT NULL DEFAULT '';",
    // 13: alerts (detections grouped as they are stored), their verdicts (append-only), and
    // exceptions; each detection's alert and the exception that covered it.
    "CREATE TABLE alerts (
        id BIGSERIAL PRIMARY KEY,
        org TEXT NOT NULL,
        rule TEXT NOT NULL,
        subject TEXT NOT NULL,
        kind BIGINT NOT NULL,
        score BIGINT NOT NULL,
        first_seen_ms BIGINT NOT NULL,
        last_seen_ms BIGINT NOT NULL,
        detections BIGINT NOT NULL,
        hosts BIGINT NOT NULL,
        status TEXT NOT NULL,
        new_activity BIGINT NOT NULL,
        last_seq BIGINT NOT NULL,
        updated_at_ms BIGINT NOT NULL,
        UNIQUE (org, rule, subject)
    );
    CREATE INDEX alerts_last ON alerts(last_seq);
    CREATE TABLE alert_hosts (
        alert_id BIGINT NOT NULL,
        agent_id TEXT NOT NULL,
        PRIMARY KEY (alert_id, agent_id)
    );
    CREATE TABLE alert_verdicts (
        seq BIGSERIAL PRIMARY KEY,
        alert_id BIGINT NOT NULL,
        at_ms BIGINT NOT NULL,
        actor TEXT NOT NULL,
        status TEXT NOT NULL,
        note TEXT NOT NULL,
        exception_id TEXT NOT NULL
    );
    CREATE INDEX alert_verdicts_alert ON alert_verdicts(alert_id, seq);
    CREATE FUNCTION vedette_verdicts_append_only() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'the verdict history is append-only'; END $$;
    CREATE TRIGGER alert_verdicts_append_only BEFORE UPDATE OR DELETE ON alert_verdicts
        FOR EACH ROW EXECUTE FUNCTION vedette_verdicts_append_only();
    CREATE TABLE exceptions (
        id TEXT PRIMARY KEY,
        rule TEXT NOT NULL,
        indicator TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        path TEXT NOT NULL,
        org TEXT NOT NULL,
        agent TEXT NOT NULL,
        expires_at_ms BIGINT NOT NULL,
        reason TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        created_by TEXT NOT NULL,
        removed_at_ms BIGINT NOT NULL DEFAULT 0,
        removed_by TEXT NOT NULL DEFAULT ''
    );
    ALTER TABLE detections ADD COLUMN alert_id BIGINT;
    ALTER TABLE detections ADD COLUMN exception_id TEXT;
    CREATE INDEX detections_alert ON detections(alert_id, seq) WHERE alert_id IS NOT NULL;",
    // 14: what each sink sent of each aggregated sighting.
    "CREATE TABLE sighting_tallies (
        sink TEXT NOT NULL,
        id TEXT NOT NULL,
        count BIGINT NOT NULL,
        first_seen_ms BIGINT NOT NULL,
        last_seen_ms BIGINT NOT NULL,
        created_ms BIGINT NOT NULL,
        modified_ms BIGINT NOT NULL,
        PRIMARY KEY (sink, id)
    );",
    // 15: hunts, and the agents each one asked.
    "CREATE TABLE hunts (
        id TEXT PRIMARY KEY,
        org TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        expires_at_ms BIGINT NOT NULL,
        request BYTEA NOT NULL
    );
    CREATE TABLE hunt_agents (
        hunt_id TEXT NOT NULL REFERENCES hunts(id),
        agent_id TEXT NOT NULL,
        answered_at_ms BIGINT NOT NULL DEFAULT 0,
        answer BYTEA NOT NULL DEFAULT '',
        PRIMARY KEY (hunt_id, agent_id)
    );
    CREATE INDEX hunt_agents_agent ON hunt_agents(agent_id, answered_at_ms);",
    // 16: response actions, and whether each organisation's need a second operator.
    "ALTER TABLE orgs ADD COLUMN response_approval TEXT NOT NULL DEFAULT 'none';
    CREATE TABLE actions (
        id TEXT PRIMARY KEY,
        org TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        expires_at_ms BIGINT NOT NULL,
        info BYTEA NOT NULL
    );
    CREATE INDEX actions_agent ON actions(agent_id, state);",
    // 17: the costliest rules each agent measured on its own files, its last measurement.
    "CREATE TABLE rule_profiles (
        agent_id TEXT PRIMARY KEY,
        org TEXT NOT NULL,
        profile BYTEA NOT NULL
    );",
];

/// The advisory lock key migrations run under ("vedette" in ASCII).
const MIGRATION_LOCK: i64 = 0x0076_6564_6574_7465;

/// Applies the migrations not applied yet, under an advisory lock held until commit.
pub(super) fn migrate(client: &mut Conn, opener: Opener) -> Result<(), StoreError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS vedette_schema (version BIGINT NOT NULL);
         INSERT INTO vedette_schema SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM vedette_schema);",
    )?;
    let found: i64 = tx
        .query_one("SELECT version FROM vedette_schema", &[])?
        .get(0);
    let known = MIGRATIONS.len() as i64;
    if found > known {
        return Err(StoreError::TooNew {
            path: "postgres".into(),
            found,
            known,
        });
    }
    if opener == Opener::Tool && found != 0 && found < known {
        return Err(StoreError::TooOld {
            path: "postgres".into(),
            found,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.batch_execute(sql)?;
        tx.execute(
            "UPDATE vedette_schema SET version = $1",
            &[&((i + 1) as i64)],
        )?;
    }
    tx.execute(
        "INSERT INTO orgs (name, stix_id, share, tlp, created_at_ms)
         VALUES ($1, $2, 'full', 'amber', $3) ON CONFLICT (name) DO NOTHING",
        &[
            &crate::orgs::DEFAULT_ORG,
            &crate::orgs::new_stix_id(),
            &crate::store::now_ms(),
        ],
    )?;
    tx.commit()?;
    Ok(())
}
