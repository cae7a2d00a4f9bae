//! PostgreSQL implementation of the store, shared by any number of collectors.
//!
//! - Migrations are numbered (table `vedette_schema`) and run at start under a transaction-level
//!   advisory lock, so collectors starting together apply each one once.
//! - Every write that must be atomic across collectors is one statement or one transaction
//!   with row locks: a token use is `UPDATE ... WHERE uses_left > 0 RETURNING`, so two
//!   collectors given one single-use token at the same moment enroll one agent.
//! - A detection batch is one multi-row `INSERT ... SELECT FROM unnest(...) ON CONFLICT (id)
//!   DO NOTHING`: a resend through another collector is stored once.
//! - Connections come from a bounded pool (`pool.rs`); a caller waits for a free one, so a
//!   slow database slows acks down instead of queueing work in memory.

mod listen;
mod migrate;
mod pool;

use std::collections::BTreeMap;
use std::path::Path;

use prost::Message;
use tokio_postgres::config::SslMode;
use vedette_proto::v1::{Detection, Inventory, StoredDetection};

use self::listen::EVENTS;
use self::migrate::migrate;
use self::pool::{Conn, Pool, Tx, tls_connector};
use super::rows::{
    self, ACTION_SELECT, AGENT_SELECT, ALERT_SELECT, AUDIT_SELECT, CERT_SELECT, DETECTION_SELECT,
    EXCEPTION_SELECT, HUNT_SELECT, IN_FORCE, TOKEN_SELECT, VERDICT_SELECT,
};
use super::{
    ActionRow, AgentRow, AlertFilter, AlertRow, AuditRow, BundleRow, CertRow, DetectionFilter,
    DetectionPage, ExceptionRow, ExportRow, HuntAgentRow, HuntRow, IntelBatch, IntelSourceRow,
    Opener, OrgRow, Schema, StagedLine, StagingCounts, Store, StoreError, StoreEvent, Tally,
    TokenError, TokenRow, UserRow, VerdictRow, approval, redact,
};

pub struct PgStore {
    pool: Pool,
}

impl PgStore {
    /// Connects (over TLS verified against `ca_cert` when given, and then required: a server
    /// that offers no TLS is refused) and migrates the schema.
    pub fn open(url: &str, ca_cert: Option<&Path>, opener: Opener) -> Result<PgStore, StoreError> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|source| StoreError::OpenPg {
                url: redact(url),
                source,
            })?;
        let tls = match ca_cert {
            Some(path) => {
                config.ssl_mode(SslMode::Require);
                Some(tls_connector(path)?)
            }
            None => {
                warn_if_remote_without_tls(&config);
                None
            }
        };
        let pool = Pool::new(config, tls)?;
        let mut conn = pool.get().map_err(|e| match e {
            StoreError::Pg(source) => StoreError::OpenPg {
                url: redact(url),
                source,
            },
            other => other,
        })?;
        migrate(&mut conn, opener)?;
        drop(conn);
        Ok(PgStore { pool })
    }

    /// Runs `f` on a pooled connection, from a blocking thread.
    fn with<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut conn = self.pool.get()?;
        f(&mut conn)
    }
}

/// Says at start when the database is on another host and the connection may be plaintext
/// (no `ca_cert`): detections and enrollment tokens would cross the network readable.
fn warn_if_remote_without_tls(config: &tokio_postgres::Config) {
    use tokio_postgres::config::Host;
    let remote = config.get_hosts().iter().any(|h| match h {
        Host::Tcp(name) => !matches!(name.as_str(), "localhost" | "127.0.0.1" | "::1"),
        Host::Unix(_) => false,
    });
    if remote {
        tracing::warn!(
            "the PostgreSQL store is on another host and `[store] ca_cert` is not set: the \
             connection is not required to use TLS (set `ca_cert` to require and verify it)"
        );
    }
}

impl PgStore {
    fn users_where(&self, name: Option<&str>) -> Result<Vec<UserRow>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                "SELECT name, password_hash, roles, org, created_at_ms FROM users
                 WHERE $1::text IS NULL OR name = $1 ORDER BY name",
                &[&name],
            )?;
            Ok(rows.iter().map(rows::user).collect::<Result<_, _>>()?)
        })
    }
}

impl Store for PgStore {
    fn announce(&self, event: &StoreEvent) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute("SELECT pg_notify($1, $2)", &[&EVENTS, &event.encode()])?;
            Ok(())
        })
    }

    fn subscribe(
        &self,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<StoreEvent>>, StoreError> {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let (config, tls) = (self.pool.config.clone(), self.pool.tls.clone());
        self.pool.spawn(listen::listen(config, tls, tx, stop));
        Ok(Some(rx))
    }

    fn create_token(&self, t: &TokenRow) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO tokens (hash, created_at_ms, expires_at_ms, uses_left, org, created_by)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &t.hash,
                    &t.created_at_ms,
                    &t.expires_at_ms,
                    &i64::from(t.uses_left),
                    &t.org,
                    &t.created_by,
                ],
            )?;
            Ok(())
        })
    }

    fn list_tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        self.with(|c| {
            let rows = c.query(&format!("{TOKEN_SELECT} ORDER BY created_at_ms, hash"), &[])?;
            Ok(rows.iter().map(rows::token).collect::<Result<_, _>>()?)
        })
    }

    fn revoke_token(&self, hash: &str, now_ms: i64) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE tokens SET revoked_at_ms = $2 WHERE hash = $1 AND revoked_at_ms = 0",
                &[&hash, &now_ms],
            )?;
            Ok(n > 0)
        })
    }

    fn rename_org(&self, name: &str, new_name: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE orgs SET name = $2 WHERE name = $1
                   AND NOT EXISTS (SELECT 1 FROM orgs WHERE name = $2)",
                &[&name, &new_name],
            )?;
            if n == 1 {
                tx.execute(
                    "UPDATE tokens SET org = $2 WHERE org = $1",
                    &[&name, &new_name],
                )?;
                tx.commit()?;
            }
            Ok(n == 1)
        })
    }

    fn remove_org(&self, name: &str, now_ms: i64) -> Result<Option<u32>, StoreError> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            if tx.execute("DELETE FROM orgs WHERE name = $1", &[&name])? == 0 {
                return Ok(None);
            }
            let tokens = tx.execute(
                "UPDATE tokens SET revoked_at_ms = $2 WHERE org = $1 AND revoked_at_ms = 0",
                &[&name, &now_ms],
            )?;
            tx.commit()?;
            Ok(Some(u32::try_from(tokens).unwrap_or(u32::MAX)))
        })
    }

    fn record_audit(&self, e: &AuditRow) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO audit (at_ms, actor, action, target, outcome, org, detail)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &e.at_ms, &e.actor, &e.action, &e.target, &e.outcome, &e.org, &e.detail,
                ],
            )?;
            Ok(())
        })
    }

    fn list_audit(
        &self,
        since_ms: i64,
        org: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                &format!(
                    "{AUDIT_SELECT} WHERE at_ms >= $1 AND ($2::TEXT IS NULL OR org = $2)
                     ORDER BY seq DESC LIMIT $3"
                ),
                &[&since_ms, &org, &i64::from(limit)],
            )?;
            let mut entries = rows
                .iter()
                .map(rows::audit)
                .collect::<Result<Vec<_>, _>>()?;
            entries.reverse();
            Ok(entries)
        })
    }

    fn audit_after(
        &self,
        after: u64,
        before_ms: i64,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                &format!("{AUDIT_SELECT} WHERE seq > $1 AND at_ms < $2 ORDER BY seq LIMIT $3"),
                &[&(after as i64), &before_ms, &i64::from(limit)],
            )?;
            Ok(rows.iter().map(rows::audit).collect::<Result<_, _>>()?)
        })
    }

    fn create_org(&self, o: &OrgRow) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "INSERT INTO orgs (name, stix_id, sector, country, share, tlp, created_at_ms,
                    response_approval)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (name) DO NOTHING",
                &[
                    &o.name,
                    &o.stix_id,
                    &o.sector,
                    &o.country,
                    &o.share,
                    &o.tlp,
                    &o.created_at_ms,
                    &approval(&o.response_approval),
                ],
            )?;
            Ok(n == 1)
        })
    }

    fn put_user(&self, u: &UserRow) -> Result<bool, StoreError> {
        self.with(|c| {
            // xmax is 0 on a row this statement inserted, not on one it updated.
            let row = c.query_one(
                "INSERT INTO users (name, password_hash, roles, org, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash,
                    roles = excluded.roles, org = excluded.org
                 RETURNING (xmax = 0)",
                &[
                    &u.name,
                    &u.password_hash,
                    &u.roles,
                    &u.org,
                    &u.created_at_ms,
                ],
            )?;
            Ok(row.get(0))
        })
    }

    fn user(&self, name: &str) -> Result<Option<UserRow>, StoreError> {
        Ok(self.users_where(Some(name))?.pop())
    }

    fn list_users(&self) -> Result<Vec<UserRow>, StoreError> {
        self.users_where(None)
    }

    fn remove_user(&self, name: &str) -> Result<bool, StoreError> {
        self.with(|c| Ok(c.execute("DELETE FROM users WHERE name = $1", &[&name])? == 1))
    }

    fn list_orgs(&self) -> Result<Vec<OrgRow>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                "SELECT name, stix_id, sector, country, share, tlp, created_at_ms,
                    (SELECT COUNT(*) FROM agents a WHERE a.org = o.name), response_approval
                 FROM orgs o ORDER BY name",
                &[],
            )?;
            Ok(rows.iter().map(rows::org).collect::<Result<_, _>>()?)
        })
    }

    fn update_org(&self, o: &OrgRow) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE orgs SET sector = $2, country = $3, share = $4, tlp = $5,
                    response_approval = $6 WHERE name = $1",
                &[
                    &o.name,
                    &o.sector,
                    &o.country,
                    &o.share,
                    &o.tlp,
                    &approval(&o.response_approval),
                ],
            )?;
            Ok(n == 1)
        })
    }

    fn record_cert(&self, c: &CertRow) -> Result<(), StoreError> {
        self.with(|cl| {
            cl.execute(
                "INSERT INTO certs (serial, kind, subject, roles, not_after_ms, recorded_at_ms, org)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (serial) DO NOTHING",
                &[
                    &c.serial,
                    &c.kind,
                    &c.subject,
                    &c.roles,
                    &c.not_after_ms,
                    &c.recorded_at_ms,
                    &c.org,
                ],
            )?;
            Ok(())
        })
    }

    fn list_certs(&self) -> Result<Vec<CertRow>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                &format!("{CERT_SELECT} ORDER BY recorded_at_ms, serial"),
                &[],
            )?;
            Ok(rows.iter().map(rows::cert).collect::<Result<_, _>>()?)
        })
    }

    fn revoke_cert(&self, serial: &str, now_ms: i64) -> Result<(bool, CertRow), StoreError> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "INSERT INTO certs (serial, recorded_at_ms) VALUES ($1, $2)
                 ON CONFLICT (serial) DO NOTHING",
                &[&serial, &now_ms],
            )?;
            let newly = tx.execute(
                "UPDATE certs SET revoked_at_ms = $2 WHERE serial = $1 AND revoked_at_ms = 0",
                &[&serial, &now_ms],
            )? == 1;
            let row = tx.query_one(&format!("{CERT_SELECT} WHERE serial = $1"), &[&serial])?;
            let row = rows::cert(&row)?;
            tx.commit()?;
            Ok((newly, row))
        })
    }

    fn revoked_serials(&self) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let rows = c.query("SELECT serial FROM certs WHERE revoked_at_ms != 0", &[])?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn count_login_attempt(
        &self,
        budgets: &[(String, u64)],
        now_ms: i64,
        window_ms: i64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM login_attempts WHERE since_ms <= $1",
                &[&(now_ms - window_ms)],
            )?;
            for (key, limit) in budgets {
                let row = c.query_one(
                    "INSERT INTO login_attempts (key, count, since_ms) VALUES ($1, 1, $2)
                     ON CONFLICT (key) DO UPDATE SET
                       count = CASE WHEN login_attempts.since_ms <= $2 - $3 THEN 1
                                    ELSE login_attempts.count + 1 END,
                       since_ms = CASE WHEN login_attempts.since_ms <= $2 - $3 THEN $2
                                       ELSE login_attempts.since_ms END
                     RETURNING count",
                    &[key, &now_ms, &window_ms],
                )?;
                if row.get::<_, i64>(0).max(0) as u64 > *limit {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    fn clear_login_attempts(&self, key: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute("DELETE FROM login_attempts WHERE key = $1", &[&key])?;
            Ok(())
        })
    }

    fn reset_connections(&self) -> Result<(), StoreError> {
        // Shared by several collectors: each agent's flag is the one holding its stream's.
        Ok(())
    }

    fn retire_older_certs(
        &self,
        subject: &str,
        serial: &str,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                "UPDATE certs SET revoked_at_ms = $3
                 WHERE kind = 'agent' AND subject = $1 AND revoked_at_ms = 0 AND serial != $2
                   AND recorded_at_ms < (SELECT recorded_at_ms FROM certs WHERE serial = $2)
                 RETURNING serial",
                &[&subject, &serial, &now_ms],
            )?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn check_token(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<Result<String, TokenError>, StoreError> {
        self.with(|c| {
            let row = c.query_opt(
                "SELECT expires_at_ms, uses_left, org, revoked_at_ms FROM tokens WHERE hash = $1",
                &[&token_hash],
            )?;
            Ok(super::token_verdict(
                row.map(|r| {
                    (
                        r.get::<_, i64>(0),
                        r.get::<_, i64>(1),
                        r.get(2),
                        r.get::<_, i64>(3),
                    )
                }),
                now_ms,
            ))
        })
    }

    fn enroll(
        &self,
        token_hash: &str,
        agent_id: &str,
        hostname: &str,
        now_ms: i64,
    ) -> Result<Result<String, TokenError>, StoreError> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            // One statement takes the use: the row lock orders concurrent enrollments, and the
            // second one sees uses_left already at 0.
            let spent = tx.query_opt(
                "UPDATE tokens SET uses_left = uses_left - 1
                 WHERE hash = $1 AND uses_left > 0 AND expires_at_ms > $2 AND revoked_at_ms = 0
                 RETURNING org",
                &[&token_hash, &now_ms],
            )?;
            let Some(spent) = spent else {
                let row = tx.query_opt(
                    "SELECT expires_at_ms, revoked_at_ms FROM tokens WHERE hash = $1",
                    &[&token_hash],
                )?;
                return Ok(Err(
                    match row.map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1))) {
                        None => TokenError::Unknown,
                        Some((_, revoked)) if revoked != 0 => TokenError::Revoked,
                        Some((expires, _)) if expires <= now_ms => TokenError::Expired,
                        Some(_) => TokenError::UsedUp,
                    },
                ));
            };
            let org: String = spent.get(0);
            tx.execute(
                "INSERT INTO agents (id, hostname, enrolled_at_ms, org) VALUES ($1, $2, $3, $4)",
                &[&agent_id, &hostname, &now_ms, &org],
            )?;
            tx.commit()?;
            Ok(Ok(org))
        })
    }

    fn agent(&self, id: &str) -> Result<Option<AgentRow>, StoreError> {
        self.with(|c| {
            let row = c.query_opt(&format!("{AGENT_SELECT} WHERE id = $1"), &[&id])?;
            Ok(row.as_ref().map(rows::agent).transpose()?)
        })
    }

    fn list_agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        self.with(|c| {
            let rows = c.query(&format!("{AGENT_SELECT} ORDER BY enrolled_at_ms, id"), &[])?;
            Ok(rows.iter().map(rows::agent).collect::<Result<_, _>>()?)
        })
    }

    fn agent_connected(
        &self,
        id: &str,
        inv: &Inventory,
        bundle_version: u64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE agents SET hostname = $2, os = $3, kernel = $4, arch = $5,
                    agent_version = $6,
                    first_seen_ms = CASE WHEN first_seen_ms = 0 THEN $7 ELSE first_seen_ms END,
                    last_seen_ms = $7, connected = TRUE, stopped_at_ms = 0,
                    bundle_applied_at_ms = CASE WHEN bundle_version != $8 THEN $7
                        ELSE bundle_applied_at_ms END,
                    bundle_version = $8
                 WHERE id = $1",
                &[
                    &id,
                    &inv.hostname,
                    &inv.os,
                    &inv.kernel,
                    &inv.arch,
                    &inv.agent_version,
                    &now_ms,
                    &(bundle_version as i64),
                ],
            )?;
            Ok(())
        })
    }

    fn agent_seen(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE agents SET last_seen_ms = $2 WHERE id = $1",
                &[&id, &now_ms],
            )?;
            Ok(())
        })
    }

    fn agent_heartbeat(
        &self,
        id: &str,
        dropped_total: u64,
        counters: &BTreeMap<String, u64>,
        clock_skew_ms: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let counters = serde_json::to_string(counters).unwrap_or_else(|_| "{}".into());
        self.with(|c| {
            c.execute(
                "UPDATE agents SET last_seen_ms = $2,
                    dropped_total = GREATEST(dropped_total, $3), counters = $4, clock_skew_ms = $5
                 WHERE id = $1",
                &[
                    &id,
                    &now_ms,
                    &(dropped_total as i64),
                    &counters,
                    &clock_skew_ms,
                ],
            )?;
            Ok(())
        })
    }

    fn agent_stopped(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE agents SET stopped_at_ms = $2 WHERE id = $1",
                &[&id, &now_ms],
            )?;
            Ok(())
        })
    }

    fn agent_disconnected(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE agents SET connected = FALSE, last_seen_ms = GREATEST(last_seen_ms, $2)
                 WHERE id = $1",
                &[&id, &now_ms],
            )?;
            Ok(())
        })
    }

    fn revoke_agent(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE agents SET revoked_at_ms = COALESCE(revoked_at_ms, $2) WHERE id = $1",
                &[&id, &now_ms],
            )?;
            Ok(n > 0)
        })
    }

    fn set_agent_labels(&self, id: &str, labels: &[String]) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE agents SET labels = $2 WHERE id = $1",
                &[&id, &labels.join(",")],
            )?;
            Ok(n > 0)
        })
    }

    fn promote_bundle(&self, version: u64) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE bundles SET target = '' WHERE version = $1",
                &[&(version as i64)],
            )?;
            Ok(n > 0)
        })
    }

    fn remove_agent(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE agents SET revoked_at_ms = COALESCE(revoked_at_ms, $2),
                    removed_at_ms = CASE WHEN removed_at_ms = 0 THEN $2 ELSE removed_at_ms END
                 WHERE id = $1",
                &[&id, &now_ms],
            )?;
            Ok(n > 0)
        })
    }

    fn insert_detections(
        &self,
        agent_id: &str,
        detections: &[Detection],
        received_at_ms: i64,
    ) -> Result<usize, StoreError> {
        if detections.is_empty() {
            return Ok(0);
        }
        self.with(|c| {
            let mut tx = c.transaction()?;
            let Some(Prelude {
                org,
                fresh,
                exceptions,
                seqs,
            }) = prelude(&mut tx, agent_id, detections, received_at_ms)?
            else {
                recount_stored(&mut tx, agent_id, detections)?;
                tx.commit()?;
                return Ok(0);
            };
            let mut groups = AlertGroups::default();
            let mut cols = Columns::default();
            for (d, seq) in fresh.iter().zip(&seqs) {
                let exception = exceptions.covering(d, agent_id, &org, received_at_ms);
                if exception.is_none() {
                    groups.add(d, agent_id, *seq);
                }
                cols.push(d, *seq, exception);
            }
            let alerts = groups.upsert(&mut tx, &org, received_at_ms)?;
            cols.alert = fresh
                .iter()
                .zip(&cols.exception)
                .map(|(d, ex)| match ex {
                    Some(_) => None,
                    None => alerts
                        .get(&(d.rule.clone(), super::alert_subject(d, agent_id)))
                        .copied(),
                })
                .collect();
            let stored = cols.insert(&mut tx, agent_id, received_at_ms)?;
            if stored.len() < fresh.len() {
                // Another collector stored some of them meanwhile (a resend racing the
                // original): they are not counted twice.
                groups.uncount(&mut tx, &alerts, &stored)?;
            }
            groups.count_host(&mut tx, &alerts, agent_id)?;
            recount_stored(&mut tx, agent_id, detections)?;
            tx.commit()?;
            Ok(stored.len())
        })
    }

    fn list_detections(&self, f: &DetectionFilter) -> Result<DetectionPage, StoreError> {
        self.with(|c| {
            let before = f.before_seq.map(|s| s.min(i64::MAX as u64) as i64);
            let alert = f.alert_id.map(|s| s.min(i64::MAX as u64) as i64);
            let limit = i64::from(f.sql_limit());
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 14] = [
                &f.agent_id,
                &f.since_ms,
                &before,
                &limit,
                &f.org,
                &f.until_ms,
                &f.kind,
                &f.rule,
                &f.sha256,
                &f.md5,
                &f.host,
                &f.suppressed,
                &alert,
                &f.label,
            ];
            // Rows stream in: reading stops at the byte budget, not at the whole result.
            let mut rows = c.query_raw(
                &format!(
                    "{DETECTION_SELECT}
                     WHERE ($1::text IS NULL OR d.agent_id = $1)
                       AND ($2::bigint IS NULL OR d.received_at_ms >= $2)
                       AND ($3::bigint IS NULL OR d.seq < $3)
                       AND ($5::text IS NULL OR a.org = $5)
                       AND ($6::bigint IS NULL OR d.received_at_ms < $6)
                       AND ($7::int IS NULL OR d.kind = $7)
                       AND ($8::text IS NULL OR d.rule = $8)
                       AND ($9::text IS NULL OR d.sha256 = $9)
                       AND ($10::text IS NULL OR d.md5 = $10)
                       AND ($11::text IS NULL OR a.hostname = $11)
                       AND ($12::bool OR d.exception_id IS NULL)
                       AND ($13::bigint IS NULL OR d.alert_id = $13)
                       AND ($14::text IS NULL
                            OR strpos(',' || a.labels || ',', ',' || $14 || ',') > 0)
                     ORDER BY d.seq DESC LIMIT $4"
                ),
                &params,
            )?;
            DetectionPage::collect(f, || match rows.next()? {
                Some(r) => Ok(Some(rows::detection(&r)?.decode()?)),
                None => Ok(None),
            })
        })
    }

    fn list_alerts(&self, f: &AlertFilter) -> Result<Vec<AlertRow>, StoreError> {
        let before = f.before_seq.map(|s| s.min(i64::MAX as u64) as i64);
        self.with(|c| {
            let rows = c.query(
                &format!(
                    "{ALERT_SELECT} WHERE ($1::text IS NULL OR status = $1)
                       AND ($2::text IS NULL OR org = $2) AND ($3::bigint IS NULL OR last_seq < $3)
                     ORDER BY last_seq DESC LIMIT $4"
                ),
                &[&f.status, &f.org, &before, &i64::from(f.limit)],
            )?;
            Ok(rows.iter().map(rows::alert).collect::<Result<_, _>>()?)
        })
    }

    fn alert(&self, id: u64) -> Result<Option<AlertRow>, StoreError> {
        let id = id.min(i64::MAX as u64) as i64;
        self.with(|c| {
            let row = c.query_opt(&format!("{ALERT_SELECT} WHERE id = $1"), &[&id])?;
            Ok(row.as_ref().map(rows::alert).transpose()?)
        })
    }

    fn alert_verdicts(&self, id: u64) -> Result<Vec<VerdictRow>, StoreError> {
        let id = id.min(i64::MAX as u64) as i64;
        self.with(|c| {
            let rows = c.query(
                &format!("{VERDICT_SELECT} WHERE alert_id = $1 ORDER BY seq"),
                &[&id],
            )?;
            Ok(rows.iter().map(rows::verdict).collect::<Result<_, _>>()?)
        })
    }

    fn verdicts_after(&self, after: u64, limit: u32) -> Result<Vec<VerdictRow>, StoreError> {
        let after = after.min(i64::MAX as u64) as i64;
        self.with(|c| {
            let rows = c.query(
                &format!("{VERDICT_SELECT} WHERE seq > $1 ORDER BY seq LIMIT $2"),
                &[&after, &i64::from(limit)],
            )?;
            Ok(rows.iter().map(rows::verdict).collect::<Result<_, _>>()?)
        })
    }

    fn judge_alert(&self, v: &VerdictRow) -> Result<Option<AlertRow>, StoreError> {
        let id = v.alert_id.min(i64::MAX as u64) as i64;
        self.with(|c| {
            let mut tx = c.transaction()?;
            let row = tx.query_opt(
                &format!(
                    "UPDATE alerts SET status = $2, new_activity = 0, updated_at_ms = $3
                     WHERE id = $1
                     RETURNING {}",
                    ALERT_SELECT
                        .trim_start_matches("SELECT ")
                        .trim_end_matches(" FROM alerts")
                ),
                &[&id, &v.status, &v.at_ms],
            )?;
            let Some(row) = row else {
                return Ok(None);
            };
            tx.execute(
                "INSERT INTO alert_verdicts (alert_id, at_ms, actor, status, note, exception_id)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&id, &v.at_ms, &v.actor, &v.status, &v.note, &v.exception_id],
            )?;
            tx.commit()?;
            Ok(Some(rows::alert(&row)?))
        })
    }

    fn add_exception(&self, e: &ExceptionRow) -> Result<(), StoreError> {
        let x = &e.ex;
        self.with(|c| {
            c.execute(
                "INSERT INTO exceptions (id, rule, indicator, sha256, path, org, agent,
                    expires_at_ms, reason, created_at_ms, created_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                &[
                    &x.id,
                    &x.rule,
                    &x.indicator,
                    &x.sha256,
                    &x.path,
                    &x.org,
                    &x.agent,
                    &x.expires_at_ms,
                    &x.reason,
                    &e.created_at_ms,
                    &e.created_by,
                ],
            )?;
            Ok(())
        })
    }

    fn list_exceptions(&self) -> Result<Vec<ExceptionRow>, StoreError> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            let rows = exception_rows(&mut tx)?;
            tx.commit()?;
            Ok(rows)
        })
    }

    fn remove_exception(
        &self,
        id: &str,
        by: &str,
        now_ms: i64,
    ) -> Result<Option<ExceptionRow>, StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE exceptions SET removed_at_ms = $2, removed_by = $3
                 WHERE id = $1 AND removed_at_ms = 0",
                &[&id, &now_ms, &by],
            )?;
            let row = c.query_opt(&format!("{EXCEPTION_SELECT} WHERE id = $1"), &[&id])?;
            Ok(row.as_ref().map(rows::exception).transpose()?)
        })
    }

    fn create_hunt(&self, h: &HuntRow, agents: &[String]) -> Result<(), StoreError> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "INSERT INTO hunts (id, org, created_by, created_at_ms, expires_at_ms, request)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &h.id,
                    &h.org,
                    &h.created_by,
                    &h.created_at_ms,
                    &h.expires_at_ms,
                    &h.request,
                ],
            )?;
            tx.execute(
                "INSERT INTO hunt_agents (hunt_id, agent_id) SELECT $1, unnest($2::text[])",
                &[&h.id, &agents],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn list_hunts(&self, org: Option<&str>) -> Result<Vec<HuntRow>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                &format!(
                    "{HUNT_SELECT} WHERE ($1::text IS NULL OR h.org = $1) GROUP BY h.id
                     ORDER BY h.created_at_ms DESC, h.id"
                ),
                &[&org],
            )?;
            Ok(rows.iter().map(rows::hunt).collect::<Result<_, _>>()?)
        })
    }

    fn hunt(&self, id: &str) -> Result<Option<(HuntRow, Vec<HuntAgentRow>)>, StoreError> {
        self.with(|c| {
            let Some(row) = c.query_opt(
                &format!("{HUNT_SELECT} WHERE h.id = $1 GROUP BY h.id"),
                &[&id],
            )?
            else {
                return Ok(None);
            };
            let h = rows::hunt(&row)?;
            let agents = c
                .query(
                    "SELECT agent_id, answered_at_ms, answer FROM hunt_agents
                     WHERE hunt_id = $1 ORDER BY agent_id",
                    &[&id],
                )?
                .iter()
                .map(|r| HuntAgentRow {
                    agent_id: r.get(0),
                    answered_at_ms: r.get(1),
                    answer: r.get(2),
                })
                .collect();
            Ok(Some((h, agents)))
        })
    }

    fn put_action(&self, a: &ActionRow, from_state: Option<&str>) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = match from_state {
                None => c.execute(
                    "INSERT INTO actions (id, org, agent_id, state, created_at_ms, expires_at_ms,
                        info)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                    &[
                        &a.id,
                        &a.org,
                        &a.agent_id,
                        &a.state,
                        &a.created_at_ms,
                        &a.expires_at_ms,
                        &a.info,
                    ],
                )?,
                Some(from) => c.execute(
                    "UPDATE actions SET state = $2, expires_at_ms = $3, info = $4
                     WHERE id = $1 AND state = $5",
                    &[&a.id, &a.state, &a.expires_at_ms, &a.info, &from],
                )?,
            };
            Ok(n == 1)
        })
    }

    fn action(&self, id: &str) -> Result<Option<ActionRow>, StoreError> {
        self.with(|c| {
            let row = c.query_opt(&format!("{ACTION_SELECT} WHERE id = $1"), &[&id])?;
            Ok(row.as_ref().map(rows::action).transpose()?)
        })
    }

    fn list_actions(&self, org: Option<&str>) -> Result<Vec<ActionRow>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                &format!(
                    "{ACTION_SELECT} WHERE ($1::text IS NULL OR org = $1)
                     ORDER BY created_at_ms DESC, id"
                ),
                &[&org],
            )?;
            Ok(rows.iter().map(rows::action).collect::<Result<_, _>>()?)
        })
    }

    fn due_actions(&self, agent: &str, now_ms: i64) -> Result<Vec<ActionRow>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                &format!(
                    "{ACTION_SELECT} WHERE agent_id = $1 AND state IN ('approved', 'sent')
                     AND expires_at_ms > $2 ORDER BY created_at_ms, id"
                ),
                &[&agent, &now_ms],
            )?;
            Ok(rows.iter().map(rows::action).collect::<Result<_, _>>()?)
        })
    }

    fn put_rule_profile(&self, agent: &str, profile: &[u8]) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "INSERT INTO rule_profiles (agent_id, org, profile)
                 SELECT id, org, $2 FROM agents WHERE id = $1
                 ON CONFLICT (agent_id) DO UPDATE SET org = excluded.org,
                    profile = excluded.profile",
                &[&agent, &profile],
            )?;
            Ok(n == 1)
        })
    }

    fn rule_profiles(&self, org: Option<&str>) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                "SELECT agent_id, profile FROM rule_profiles
                 WHERE ($1::text IS NULL OR org = $1) ORDER BY agent_id",
                &[&org],
            )?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn pending_hunts(&self, agent: &str, now_ms: i64) -> Result<Vec<HuntRow>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                &format!(
                    "{HUNT_SELECT} WHERE h.expires_at_ms > $2 AND h.id IN (SELECT hunt_id
                     FROM hunt_agents WHERE agent_id = $1 AND answered_at_ms = 0)
                     GROUP BY h.id ORDER BY h.created_at_ms, h.id"
                ),
                &[&agent, &now_ms],
            )?;
            Ok(rows.iter().map(rows::hunt).collect::<Result<_, _>>()?)
        })
    }

    fn answer_hunt(
        &self,
        id: &str,
        agent: &str,
        at_ms: i64,
        answer: &[u8],
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE hunt_agents SET answered_at_ms = $3, answer = $4
                 WHERE hunt_id = $1 AND agent_id = $2 AND answered_at_ms = 0",
                &[&id, &agent, &at_ms.max(1), &answer],
            )?;
            Ok(n == 1)
        })
    }

    fn insert_bundle(&self, b: &BundleRow) -> Result<Result<(), u64>, StoreError> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            // Publications through any collector are ordered by this lock.
            tx.batch_execute("LOCK TABLE bundles IN EXCLUSIVE MODE")?;
            let latest: i64 = tx
                .query_one("SELECT COALESCE(MAX(version), 0) FROM bundles", &[])?
                .get(0);
            if b.version as i64 <= latest {
                return Ok(Err(latest as u64));
            }
            tx.execute(
                "INSERT INTO bundles (version, name, created_at_ms, publisher, published_by,
                    published_at_ms, digest, signer_key, files, content, signature, target)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                &[
                    &(b.version as i64),
                    &b.name,
                    &b.created_at_ms,
                    &b.publisher,
                    &b.published_by,
                    &b.published_at_ms,
                    &b.digest,
                    &b.signer_key,
                    &i64::from(b.files),
                    &b.content,
                    &b.signature,
                    &b.target,
                ],
            )?;
            tx.commit()?;
            Ok(Ok(()))
        })
    }

    fn list_bundles(&self) -> Result<Vec<BundleRow>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                &format!("{BUNDLE_SELECT} ''::bytea, ''::bytea FROM bundles ORDER BY version DESC"),
                &[],
            )?;
            Ok(rows.iter().map(rows::bundle).collect::<Result<_, _>>()?)
        })
    }

    fn bundle(&self, version: u64) -> Result<Option<BundleRow>, StoreError> {
        self.with(|c| {
            let row = c.query_opt(
                &format!(
                    "{BUNDLE_SELECT} content, signature FROM bundles
                     WHERE version = CASE WHEN $1::bigint = 0 THEN (SELECT MAX(version) FROM bundles)
                        ELSE $1 END"
                ),
                &[&(version as i64)],
            )?;
            Ok(row.as_ref().map(rows::bundle).transpose()?)
        })
    }

    fn agent_bundle_status(
        &self,
        id: &str,
        version: u64,
        applied: bool,
        error: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let version = version as i64;
        self.with(|c| {
            if applied {
                c.execute(
                    "UPDATE agents SET bundle_version = $2, bundle_applied_at_ms = $3,
                        bundle_error = CASE WHEN bundle_failed_version <= $2 THEN ''
                            ELSE bundle_error END,
                        bundle_failed_version = CASE WHEN bundle_failed_version <= $2 THEN 0
                            ELSE bundle_failed_version END
                     WHERE id = $1",
                    &[&id, &version, &now_ms],
                )?;
            } else {
                c.execute(
                    "UPDATE agents SET bundle_failed_version = $2, bundle_error = $3 WHERE id = $1",
                    &[&id, &version, &error],
                )?;
            }
            Ok(())
        })
    }

    fn schema(&self) -> Result<Schema, StoreError> {
        self.with(|c| {
            let rows = c.query(
                "SELECT table_name::text, column_name::text, data_type::text
                 FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name <> 'vedette_schema'
                 ORDER BY table_name, ordinal_position",
                &[],
            )?;
            let mut schema = Schema::new();
            for r in rows {
                schema
                    .entry(r.get(0))
                    .or_default()
                    .push((r.get(1), r.get(2)));
            }
            Ok(schema)
        })
    }

    fn count_detections(&self) -> Result<u64, StoreError> {
        self.with(|c| {
            let n: i64 = c.query_one("SELECT COUNT(*) FROM detections", &[])?.get(0);
            Ok(n as u64)
        })
    }

    fn delete_detections_before(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM detections WHERE seq IN
                    (SELECT seq FROM detections WHERE received_at_ms < $1 ORDER BY seq LIMIT $2
                     FOR UPDATE SKIP LOCKED)",
                &[&before_ms, &i64::from(limit)],
            )
        })
    }

    fn stage_intel(&self, b: &IntelBatch<'_>, now_ms: i64) -> Result<StagingCounts, StoreError> {
        self.with(|c| {
            let mut tx = c.transaction()?;
            let mut out = StagingCounts::default();
            for l in b.lines {
                // xmax = 0 on the returned row: it was inserted, not updated.
                let row = tx.query_opt(
                    "INSERT INTO intel_indicators (source, id, origin, line, staged_at_ms)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (source, id) DO UPDATE SET origin = excluded.origin,
                        line = excluded.line, staged_at_ms = excluded.staged_at_ms
                     WHERE intel_indicators.line <> excluded.line
                     RETURNING (xmax = 0)",
                    &[&l.source, &l.id, &l.origin, &l.line, &now_ms],
                )?;
                match row.map(|r| r.get::<_, bool>(0)) {
                    Some(true) => out.added += 1,
                    Some(false) => out.updated += 1,
                    None => {}
                }
            }
            for id in b.revoked {
                out.removed += tx.execute(
                    "DELETE FROM intel_indicators WHERE source = 'stix' AND id = $1",
                    &[id],
                )?;
            }
            tx.execute(
                "INSERT INTO intel_sources (origin, kind, last_poll_ms, accepted, skipped,
                    rejected, revoked, last_error) VALUES ($1, $2, $3, $4, $5, $6, $7, '')
                 ON CONFLICT (origin) DO UPDATE SET kind = excluded.kind,
                    last_poll_ms = excluded.last_poll_ms, last_error = '',
                    accepted = excluded.accepted
                        + CASE WHEN $8 THEN intel_sources.accepted ELSE 0 END,
                    skipped = excluded.skipped
                        + CASE WHEN $8 THEN intel_sources.skipped ELSE 0 END,
                    rejected = excluded.rejected
                        + CASE WHEN $8 THEN intel_sources.rejected ELSE 0 END,
                    revoked = excluded.revoked
                        + CASE WHEN $8 THEN intel_sources.revoked ELSE 0 END,
                    cursor = CASE WHEN $9 = '' THEN intel_sources.cursor ELSE $9 END",
                &[
                    &b.origin,
                    &b.kind,
                    &now_ms,
                    &(b.lines.len() as i64),
                    &(b.skipped as i64),
                    &(b.rejected as i64),
                    &(b.revoked.len() as i64),
                    &b.continued,
                    &b.cursor,
                ],
            )?;
            tx.commit()?;
            Ok(out)
        })
    }

    fn list_intel(&self, after: (&str, &str), limit: u32) -> Result<Vec<StagedLine>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                "SELECT source, id, origin, line FROM intel_indicators
                 WHERE (source, id) > ($1, $2) ORDER BY source, id LIMIT $3",
                &[&after.0, &after.1, &i64::from(limit)],
            )?;
            Ok(rows
                .iter()
                .map(|r| StagedLine {
                    source: r.get(0),
                    id: r.get(1),
                    origin: r.get(2),
                    line: r.get(3),
                })
                .collect())
        })
    }

    fn intel_sources(&self) -> Result<Vec<IntelSourceRow>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                "SELECT origin, kind, last_poll_ms, accepted, skipped, rejected, revoked,
                    last_error,
                    (SELECT COUNT(*) FROM intel_indicators i WHERE i.origin = s.origin)
                 FROM intel_sources s ORDER BY origin",
                &[],
            )?;
            Ok(rows
                .iter()
                .map(rows::intel_source)
                .collect::<Result<_, _>>()?)
        })
    }

    fn intel_cursor(&self, origin: &str) -> Result<String, StoreError> {
        self.with(|c| {
            Ok(c.query_opt(
                "SELECT cursor FROM intel_sources WHERE origin = $1",
                &[&origin],
            )?
            .map(|r| r.get(0))
            .unwrap_or_default())
        })
    }

    fn export_lease(
        &self,
        sink: &str,
        owner: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "INSERT INTO export_cursors (sink, lease_owner, lease_until_ms)
                 VALUES ($1, $2, $3)
                 ON CONFLICT (sink) DO UPDATE SET lease_owner = excluded.lease_owner,
                    lease_until_ms = excluded.lease_until_ms
                 WHERE export_cursors.lease_owner = excluded.lease_owner
                    OR export_cursors.lease_until_ms < $4",
                &[&sink, &owner, &(now_ms + ttl_ms), &now_ms],
            )?;
            Ok(n == 1)
        })
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
        self.with(|c| {
            let rows = c.query(
                "SELECT sink, seq, exported, last_error, last_attempt_ms,
                    (SELECT COUNT(*) FROM detections d WHERE d.seq > e.seq)
                 FROM export_cursors e ORDER BY sink",
                &[],
            )?;
            Ok(rows.iter().map(rows::export).collect::<Result<_, _>>()?)
        })
    }

    fn detections_after(
        &self,
        after: u64,
        before_ms: i64,
        limit: u32,
    ) -> Result<Vec<(u64, StoredDetection)>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                &format!(
                    "{DETECTION_SELECT} WHERE d.seq > $1 AND d.received_at_ms < $2
                     ORDER BY d.seq LIMIT $3"
                ),
                &[&(after as i64), &before_ms, &i64::from(limit)],
            )?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let (seq, _, stored) = rows::detection(r)?.decode()?;
                out.push((seq, stored));
            }
            Ok(out)
        })
    }

    fn export_progress(
        &self,
        sink: &str,
        seq: u64,
        count: u64,
        error: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                EXPORT_PROGRESS,
                &[&sink, &(seq as i64), &(count as i64), &error, &now_ms],
            )?;
            Ok(())
        })
    }

    fn sighting_tallies(
        &self,
        sink: &str,
        ids: &[String],
    ) -> Result<BTreeMap<String, Tally>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                "SELECT count, first_seen_ms, last_seen_ms, created_ms, modified_ms, id
                 FROM sighting_tallies WHERE sink = $1 AND id = ANY($2)",
                &[&sink, &ids],
            )?;
            let mut out = BTreeMap::new();
            for r in &rows {
                out.insert(r.get::<_, String>(5), rows::tally(r)?);
            }
            Ok(out)
        })
    }

    fn sightings_sent(
        &self,
        sink: &str,
        tallies: &[(String, Tally)],
        seq: u64,
        count: u64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut cols: [Vec<i64>; 5] = Default::default();
        let ids: Vec<&str> = tallies.iter().map(|(id, _)| id.as_str()).collect();
        for (_, t) in tallies {
            for (col, v) in cols.iter_mut().zip([
                t.count as i64,
                t.first_seen_ms,
                t.last_seen_ms,
                t.created_ms,
                t.modified_ms,
            ]) {
                col.push(v);
            }
        }
        self.with(|c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "INSERT INTO sighting_tallies (sink, id, count, first_seen_ms, last_seen_ms,
                    created_ms, modified_ms)
                 SELECT $1, id, n, f, l, c, m FROM unnest($2::text[], $3::bigint[],
                    $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[]) AS t(id, n, f, l, c, m)
                 ON CONFLICT (sink, id) DO UPDATE SET count = excluded.count,
                    first_seen_ms = excluded.first_seen_ms, last_seen_ms = excluded.last_seen_ms,
                    modified_ms = excluded.modified_ms",
                &[
                    &sink, &ids, &cols[0], &cols[1], &cols[2], &cols[3], &cols[4],
                ],
            )?;
            tx.execute(
                EXPORT_PROGRESS,
                &[&sink, &(seq as i64), &(count as i64), &"", &now_ms],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn intel_error(
        &self,
        origin: &str,
        kind: &str,
        error: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO intel_sources (origin, kind, last_poll_ms, last_error)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (origin) DO UPDATE SET last_poll_ms = excluded.last_poll_ms,
                    last_error = excluded.last_error",
                &[&origin, &kind, &now_ms, &error],
            )?;
            Ok(())
        })
    }
}

/// What a batch of detections needs to know before it is written.
struct Prelude<'a> {
    /// The agent's organisation.
    org: String,
    /// The detections not stored yet.
    fresh: Vec<&'a Detection>,
    exceptions: vedette_engine::exceptions::Exceptions,
    /// A sequence number for each of `fresh`, in order.
    seqs: Vec<i64>,
}

/// Asks at once (pipelined: one round trip) whether the agent is still enrolled, which
/// detections are stored already (a resend), the exceptions in force, and sequence numbers,
/// taken before the rows are written so that each alert knows its newest detection and each
/// detection its alert in one write of each (the numbers of a resent detection go unused: a
/// gap). None when nothing of the batch is new.
fn prelude<'a>(
    tx: &mut Tx<'_>,
    agent_id: &str,
    detections: &'a [Detection],
    received_at_ms: i64,
) -> Result<Option<Prelude<'a>>, StoreError> {
    let ids: Vec<&str> = detections.iter().map(|d| d.id.as_str()).collect();
    let count = detections.len() as i32;
    let in_force = format!("{EXCEPTION_SELECT} {IN_FORCE}").replace("?1", "$1");
    let mut answers = tx
        .query_all(&[
            (
                "SELECT org FROM agents WHERE id = $1 AND revoked_at_ms IS NULL FOR SHARE",
                &[&agent_id],
            ),
            (
                "SELECT id FROM detections WHERE id = ANY($1::text[])",
                &[&ids],
            ),
            (&in_force, &[&received_at_ms]),
            (
                "SELECT nextval(pg_get_serial_sequence('detections', 'seq'))
                 FROM generate_series(1, $1::int)",
                &[&count],
            ),
        ])?
        .into_iter();
    let mut next = || answers.next().unwrap_or_default();
    let (live, known, exceptions, seqs) = (next(), next(), next(), next());
    let Some(live) = live.first() else {
        return Err(StoreError::Revoked(agent_id.to_string()));
    };
    let org: String = live.get(0);
    let fresh = fresh_detections(&known, detections);
    if fresh.is_empty() {
        return Ok(None);
    }
    let exceptions = rows::in_force(
        exceptions
            .iter()
            .map(rows::exception)
            .collect::<Result<_, _>>()?,
        &org,
        received_at_ms,
    );
    Ok(Some(Prelude {
        org,
        fresh,
        exceptions,
        seqs: seqs.iter().map(|r| r.get(0)).collect(),
    }))
}

/// Raises the count of the agent's stored incidents that reports of the batch count more of
/// ([`super::recount`]): an incident stays one detection however often it is seen. The row is
/// locked while it is read, so two collectors raising one count keep the higher.
fn recount_stored(
    tx: &mut Tx<'_>,
    agent_id: &str,
    detections: &[Detection],
) -> Result<(), StoreError> {
    for d in detections.iter().filter(|d| super::recount(d).is_some()) {
        let stored = tx.query_opt(
            "SELECT body FROM detections WHERE id = $1 AND agent_id = $2 FOR UPDATE",
            &[&d.id, &agent_id],
        )?;
        let body = stored.and_then(|r| super::recounted(&r.get::<_, Vec<u8>>(0), d));
        if let Some(body) = body {
            tx.execute(
                "UPDATE detections SET body = $3 WHERE id = $1 AND agent_id = $2",
                &[&d.id, &agent_id, &body],
            )?;
        }
    }
    Ok(())
}

/// The detections of a batch not stored yet (each id once), in batch order.
fn fresh_detections<'a>(
    known: &[tokio_postgres::Row],
    detections: &'a [Detection],
) -> Vec<&'a Detection> {
    let known: std::collections::HashSet<String> = known.iter().map(|r| r.get(0)).collect();
    let mut seen = std::collections::HashSet::new();
    detections
        .iter()
        .filter(|d| !known.contains(&d.id) && seen.insert(d.id.as_str()))
        .collect()
}

/// A detection batch, column by column, for one `unnest` insert.
#[derive(Default)]
struct Columns {
    seq: Vec<i64>,
    id: Vec<String>,
    kind: Vec<i32>,
    rule: Vec<String>,
    path: Vec<Option<String>>,
    sha256: Vec<Option<String>>,
    pid: Vec<Option<i64>>,
    observed: Vec<i64>,
    bundle: Vec<i64>,
    body: Vec<Vec<u8>>,
    md5: Vec<Option<String>>,
    exception: Vec<Option<String>>,
    alert: Vec<Option<i64>>,
}

impl Columns {
    fn push(&mut self, d: &Detection, seq: i64, exception: Option<&str>) {
        let (path, sha256, pid) = super::indexed(d);
        self.seq.push(seq);
        self.id.push(d.id.clone());
        self.kind.push(d.kind);
        self.rule.push(d.rule.clone());
        self.path.push(path.map(str::to_string));
        self.sha256
            .push(sha256.filter(|s| !s.is_empty()).map(str::to_string));
        self.pid.push(pid.map(i64::from));
        self.exception.push(exception.map(str::to_string));
        self.observed.push(d.observed_at_ms);
        self.bundle.push(d.bundle_version as i64);
        self.body.push(d.encode_to_vec());
        self.md5.push(super::file_md5(d).map(str::to_string));
    }

    /// Writes the rows; the ids of those written (a row another collector wrote meanwhile
    /// is left as it is).
    fn insert(
        &self,
        tx: &mut Tx<'_>,
        agent_id: &str,
        received_at_ms: i64,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let rows = tx.query(
            "INSERT INTO detections (seq, id, agent_id, kind, rule, path, sha256, pid,
                observed_at_ms, received_at_ms, bundle_version, body, md5, exception_id, alert_id)
             SELECT seq, id, $2, kind, rule, path, sha256, pid, observed, $3, bundle, body, md5,
                ex, alert
             FROM unnest($1::text[], $4::int[], $5::text[], $6::text[], $7::text[],
                $8::bigint[], $9::bigint[], $10::bigint[], $11::bytea[], $12::text[],
                $13::text[], $14::bigint[], $15::bigint[])
                AS t(id, kind, rule, path, sha256, pid, observed, bundle, body, md5, ex, alert, seq)
             ON CONFLICT (id) DO NOTHING
             RETURNING id",
            &[
                &self.id,
                &agent_id,
                &received_at_ms,
                &self.kind,
                &self.rule,
                &self.path,
                &self.sha256,
                &self.pid,
                &self.observed,
                &self.bundle,
                &self.body,
                &self.md5,
                &self.exception,
                &self.alert,
                &self.seq,
            ],
        )?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

/// The new detections of one batch by alert (rule and subject; the organisation is the
/// agent's), in key order so that concurrent batches lock alerts in the same order.
#[derive(Default)]
struct AlertGroups {
    groups: BTreeMap<(String, String), AlertGroup>,
}

struct AlertGroup {
    kind: i64,
    score: i64,
    first_seen: i64,
    last_seen: i64,
    last_seq: i64,
    /// The detections' ids.
    ids: Vec<String>,
}

/// Alert ids by (rule, subject).
type AlertIds = BTreeMap<(String, String), i64>;

impl AlertGroups {
    fn add(&mut self, d: &Detection, agent_id: &str, seq: i64) {
        let key = (d.rule.clone(), super::alert_subject(d, agent_id));
        let g = self.groups.entry(key).or_insert(AlertGroup {
            kind: i64::from(d.kind),
            score: 0,
            first_seen: d.observed_at_ms,
            last_seen: d.observed_at_ms,
            last_seq: seq,
            ids: Vec::new(),
        });
        g.score = g.score.max(i64::from(d.score));
        g.first_seen = g.first_seen.min(d.observed_at_ms);
        g.last_seen = g.last_seen.max(d.observed_at_ms);
        g.last_seq = g.last_seq.max(seq);
        g.ids.push(d.id.clone());
    }

    /// Upserts the alerts, one statement whatever the batch; their ids.
    fn upsert(&self, tx: &mut Tx<'_>, org: &str, now_ms: i64) -> Result<AlertIds, StoreError> {
        if self.groups.is_empty() {
            return Ok(AlertIds::new());
        }
        let mut c: [Vec<i64>; 6] = Default::default();
        let (mut rules, mut subjects) = (Vec::new(), Vec::new());
        for ((rule, subject), g) in &self.groups {
            rules.push(rule.as_str());
            subjects.push(subject.as_str());
            for (col, v) in c.iter_mut().zip([
                g.kind,
                g.score,
                g.first_seen,
                g.last_seen,
                g.ids.len() as i64,
                g.last_seq,
            ]) {
                col.push(v);
            }
        }
        let upserted = tx.query(
            "INSERT INTO alerts (org, rule, subject, kind, score, first_seen_ms, last_seen_ms,
                detections, hosts, status, new_activity, last_seq, updated_at_ms)
             SELECT $1, rule, subject, kind, score, first_seen, last_seen, n, 0, 'open', 0,
                last_seq, $2
             FROM unnest($3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[],
                $8::bigint[], $9::bigint[], $10::bigint[])
                AS t(rule, subject, kind, score, first_seen, last_seen, n, last_seq)
             ON CONFLICT (org, rule, subject) DO UPDATE SET
               detections = alerts.detections + excluded.detections,
               score = GREATEST(alerts.score, excluded.score),
               first_seen_ms = LEAST(alerts.first_seen_ms, excluded.first_seen_ms),
               last_seen_ms = GREATEST(alerts.last_seen_ms, excluded.last_seen_ms),
               last_seq = GREATEST(alerts.last_seq, excluded.last_seq),
               updated_at_ms = excluded.updated_at_ms,
               new_activity = CASE WHEN alerts.status IN ('acknowledged', 'true-positive')
                                   THEN 1 ELSE alerts.new_activity END
             RETURNING id, rule, subject",
            &[
                &org, &now_ms, &rules, &subjects, &c[0], &c[1], &c[2], &c[3], &c[4], &c[5],
            ],
        )?;
        Ok(upserted
            .iter()
            .map(|r| ((r.get(1), r.get(2)), r.get(0)))
            .collect())
    }

    /// Takes back the count of detections that were not written after all.
    fn uncount(
        &self,
        tx: &mut Tx<'_>,
        alerts: &AlertIds,
        stored: &std::collections::HashSet<String>,
    ) -> Result<(), StoreError> {
        for (key, g) in &self.groups {
            let lost = g.ids.iter().filter(|id| !stored.contains(*id)).count() as i64;
            if let (Some(id), true) = (alerts.get(key), lost > 0) {
                tx.execute(
                    "UPDATE alerts SET detections = detections - $2 WHERE id = $1",
                    &[id, &lost],
                )?;
            }
        }
        Ok(())
    }

    /// Counts the agent as a host of each alert it is new to.
    fn count_host(
        &self,
        tx: &mut Tx<'_>,
        alerts: &AlertIds,
        agent_id: &str,
    ) -> Result<(), StoreError> {
        if alerts.is_empty() {
            return Ok(());
        }
        let mut ids: Vec<i64> = alerts.values().copied().collect();
        ids.sort_unstable();
        tx.execute(
            "WITH h AS (INSERT INTO alert_hosts (alert_id, agent_id)
                 SELECT unnest($1::bigint[]), $2 ON CONFLICT DO NOTHING RETURNING alert_id)
             UPDATE alerts SET hosts = alerts.hosts + 1 FROM h WHERE alerts.id = h.alert_id",
            &[&ids, &agent_id],
        )?;
        Ok(())
    }
}

/// Every exception, oldest first.
fn exception_rows(c: &mut Tx<'_>) -> Result<Vec<ExceptionRow>, StoreError> {
    let rows = c.query(
        &format!("{EXCEPTION_SELECT} ORDER BY created_at_ms, id"),
        &[],
    )?;
    Ok(rows.iter().map(rows::exception).collect::<Result<_, _>>()?)
}

/// Moves a sink's cursor (`sink`, `seq`, `count`, `error`, `now_ms`).
const EXPORT_PROGRESS: &str = "INSERT INTO export_cursors (sink, seq, exported, last_error,
        last_attempt_ms)
     VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (sink) DO UPDATE SET
        seq = GREATEST(export_cursors.seq, excluded.seq),
        exported = export_cursors.exported + excluded.exported,
        last_error = excluded.last_error, last_attempt_ms = excluded.last_attempt_ms";

const BUNDLE_SELECT: &str = "SELECT version, name, created_at_ms, publisher, published_by,
    published_at_ms, digest, signer_key, files, target, length(content)::bigint,";
