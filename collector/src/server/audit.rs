//! The audit log: every operator action, who did it (a certificate, a console account, an
//! enrollment token, a command on the collector's host), when, to what, and how it ended.
//! Entries are appended to the store, which refuses to change or delete them.

use tonic::{Code, Request, Status};
use tracing::error;

use super::{SharedStore, blocking};
use crate::peer::{OnBehalfOf, Peer};
use crate::store::{AuditRow, Store, now_ms};

/// One action being done, filled in as what it concerns becomes known.
#[derive(Debug, Clone)]
pub(crate) struct Act {
    pub actor: String,
    pub action: &'static str,
    pub target: String,
    pub org: String,
    pub detail: String,
}

impl Act {
    /// An action by the caller of `request`: `console:NAME` when the web console makes the call
    /// for a signed-in user, else `cert:NAME` (the client certificate's name). Its organisation
    /// is the caller's own when the caller is limited to one.
    pub fn by<T>(request: &Request<T>, who: &Peer, action: &'static str) -> Act {
        let via = if request.extensions().get::<OnBehalfOf>().is_some() {
            "console"
        } else {
            "cert"
        };
        Act {
            actor: format!("{via}:{}", who.name()),
            action,
            target: String::new(),
            org: who.scope().unwrap_or_default().to_string(),
            detail: String::new(),
        }
    }

    /// An action by `actor` (already in `kind:name` form).
    pub fn as_actor(actor: String, action: &'static str) -> Act {
        Act {
            actor,
            action,
            target: String::new(),
            org: String::new(),
            detail: String::new(),
        }
    }

    /// An action by whoever runs this command on the collector's host: `local:NAME`, the
    /// name of the process's user in /etc/passwd (else `uid N`).
    pub fn local(action: &'static str) -> Act {
        Act::as_actor(format!("local:{}", local_user()), action)
    }

    pub fn target(mut self, target: impl Into<String>) -> Act {
        self.target = target.into();
        self
    }

    pub fn org(mut self, org: impl Into<String>) -> Act {
        self.org = org.into();
        self
    }

    /// The entry, with the outcome given.
    pub fn entry(self, outcome: String) -> AuditRow {
        AuditRow {
            seq: 0,
            at_ms: now_ms(),
            actor: self.actor,
            action: self.action.to_string(),
            target: self.target,
            outcome,
            org: self.org,
            detail: self.detail,
        }
    }

    /// Appends the entry of a command run on the collector's host that succeeded; a failure to
    /// append is a warning on standard error (the action itself stands).
    pub fn record_local(self, store: &dyn Store) {
        if let Err(e) = store.record_audit(&self.entry("ok".into())) {
            eprintln!("warning: cannot append to the audit log: {e}");
        }
    }
}

/// The name of this process's real user: from /proc/self/status and /etc/passwd (the
/// environment's `USER` can say anything).
fn local_user() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(uid) = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .map(str::to_string)
    else {
        return "unknown".into();
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == uid)
        .map_or_else(|| format!("uid {uid}"), |f| f[0].to_string())
}

/// `ok`, `refused: WHY` (the caller was told no) or `failed: WHY`.
pub(crate) fn outcome<T>(r: &Result<T, Status>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(s) => {
            let word = match s.code() {
                Code::PermissionDenied
                | Code::Unauthenticated
                | Code::NotFound
                | Code::InvalidArgument
                | Code::AlreadyExists
                | Code::FailedPrecondition
                | Code::ResourceExhausted => "refused",
                _ => "failed",
            };
            format!("{word}: {}", first_line(s.message()))
        }
    }
}

/// The first line of a message, at most 300 characters.
fn first_line(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect()
}

/// Appends the entry for `act` with the outcome of `r`. A failure to append is logged: the
/// action itself stands (it is also in the collector's log).
pub(crate) async fn record<T>(store: &SharedStore, act: Act, r: &Result<T, Status>) {
    let entry = act.entry(outcome(r));
    let what = format!("{} {} {}", entry.actor, entry.action, entry.target);
    if let Err(e) = blocking(store, move |s| s.record_audit(&entry)).await {
        error!(error = %e.message(), entry = %what, "cannot append to the audit log");
    }
}
