//! Response actions relayed by the collector: kill a process, quarantine (and restore) a
//! file, isolate (and release) the host.
//!
//! The host decides: an action whose kind is not in `response` (agent.toml) is refused,
//! whatever the collector says, so a compromised collector can do no more than each host's
//! team allowed. Actions come only from the collector stream; nothing a local user writes
//! starts one. Each action id is done at most once: a journal entry is written (and synced)
//! before the action starts and holds its outcome after, so a resend after a reconnect, or a
//! restart, answers from the journal. Nothing is done after the action's expiry.

mod isolate;
mod kill;
mod quarantine;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vedette_proto::v1::{ActionResult, ResponseAction};

pub use isolate::Isolation;

/// Why an action was not done: refused (not allowed, expired, not the target named) or failed.
#[derive(Debug)]
pub enum Refusal {
    Refused(String),
    Failed(String),
}

fn refused(why: impl Into<String>) -> Refusal {
    Refusal::Refused(why.into())
}

fn failed(why: impl Into<String>) -> Refusal {
    Refusal::Failed(why.into())
}

/// A journal entry: `started` until the outcome is known.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    outcome: String,
    detail: String,
}

/// What this host allows, and where it keeps its journal and quarantined files.
pub struct Responder {
    allowed: Vec<String>,
    journal: PathBuf,
    quarantine: PathBuf,
    isolation: Isolation,
}

impl Responder {
    /// `state` is the agent's state directory; `collectors` (`host:port`) and `allow`
    /// (networks) are what an isolated host still reaches.
    pub fn new(
        allowed: Vec<String>,
        state: &Path,
        collectors: Vec<String>,
        allow: Vec<String>,
    ) -> Responder {
        Responder {
            allowed,
            journal: state.join("actions"),
            quarantine: state.join("quarantine"),
            isolation: Isolation::new(state.join("isolation.json"), collectors, allow),
        }
    }

    /// What one action came to: done, refused or failed, with the words why.
    pub fn handle(&self, a: &ResponseAction) -> ActionResult {
        let (outcome, detail) = match self.journaled(a) {
            Ok(detail) => ("done", detail),
            Err(Refusal::Refused(why)) => ("refused", why),
            Err(Refusal::Failed(why)) => ("failed", why),
        };
        ActionResult {
            id: a.id.clone(),
            outcome: outcome.into(),
            detail,
        }
    }

    /// The action done once: its journal entry answers any repeat.
    fn journaled(&self, a: &ResponseAction) -> Result<String, Refusal> {
        let valid = a.id.len() == 20
            && a.id.starts_with("act-")
            && a.id[4..].bytes().all(|b| b.is_ascii_hexdigit());
        if !valid {
            return Err(refused("not an action id"));
        }
        let entry = self.journal.join(&a.id);
        if let Ok(text) = std::fs::read(&entry) {
            let e: Entry = serde_json::from_slice(&text).map_err(|_| {
                failed("its journal entry on the host cannot be read; not done again")
            })?;
            return match e.outcome.as_str() {
                "done" => Ok(e.detail),
                "refused" => Err(refused(e.detail)),
                "started" => Err(failed("the agent stopped while doing it; not done again")),
                _ => Err(failed(e.detail)),
            };
        }
        let r = self.check(a).and_then(|()| {
            self.write(&entry, "started", "")?;
            self.apply(a)
        });
        let (outcome, detail) = match &r {
            Ok(d) => ("done", d.as_str()),
            Err(Refusal::Refused(d)) => ("refused", d.as_str()),
            Err(Refusal::Failed(d)) => ("failed", d.as_str()),
        };
        if let Err(Refusal::Failed(e) | Refusal::Refused(e)) = self.write(&entry, outcome, detail) {
            warn!(action = %a.id, error = %e, "cannot record the action's outcome");
        }
        r
    }

    /// Refuses what this host does not allow, or what comes too late.
    fn check(&self, a: &ResponseAction) -> Result<(), Refusal> {
        let needs = match a.kind.as_str() {
            "kill" => "kill",
            "quarantine" | "restore" => "quarantine",
            "isolate" => "isolate",
            // Releasing the agent's own isolation only ever gives the host its network back.
            "release" => "",
            other => {
                return Err(refused(format!(
                    "`{}` is not an action this agent knows",
                    other.chars().take(40).collect::<String>()
                )));
            }
        };
        if !needs.is_empty() && !self.allowed.iter().any(|k| k == needs) {
            return Err(refused(format!(
                "this host does not allow `{needs}`: it is not in `response` in its agent.toml"
            )));
        }
        if vedette_proto::now_ms() >= a.expires_at_ms {
            return Err(refused("it expired before it reached the agent"));
        }
        Ok(())
    }

    fn apply(&self, a: &ResponseAction) -> Result<String, Refusal> {
        info!(action = %a.id, kind = %a.kind, "response action");
        match a.kind.as_str() {
            "kill" => kill::kill(a.pid, a.start_time),
            "quarantine" => quarantine::quarantine(&self.quarantine, &a.id, &a.path, &a.sha256),
            "restore" => quarantine::restore(&self.quarantine, &a.undoes),
            "isolate" => self.isolation.isolate(&a.id, a.expires_at_ms),
            _ => self.isolation.release(&a.undoes),
        }
    }

    fn write(&self, path: &Path, outcome: &str, detail: &str) -> Result<(), Refusal> {
        std::fs::create_dir_all(&self.journal)
            .map_err(|e| failed(format!("cannot make {}: {e}", self.journal.display())))?;
        let entry = Entry {
            outcome: outcome.into(),
            detail: detail.into(),
        };
        let bytes = serde_json::to_vec(&entry).unwrap_or_default();
        crate::state::write_atomic(path, &bytes, 0o600)
            .map_err(|e| failed(format!("cannot write the action's journal entry: {e}")))
    }
}

/// Does the actions the collector relays, one at a time, and sends back their outcomes.
/// An isolation in force when the agent starts is applied again (or released, past its
/// expiry), and released at its expiry whether or not the collector can be reached.
pub async fn run(
    responder: Responder,
    mut requests: mpsc::Receiver<ResponseAction>,
    results: mpsc::Sender<ActionResult>,
    stop: CancellationToken,
) {
    let responder = std::sync::Arc::new(responder);
    let r = responder.clone();
    let mut until = tokio::task::spawn_blocking(move || r.isolation.resume())
        .await
        .unwrap_or(None);
    loop {
        let wait = until.map(|t: i64| {
            Duration::from_millis(u64::try_from(t - vedette_proto::now_ms()).unwrap_or(0))
        });
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait.unwrap_or(Duration::MAX)), if wait.is_some() => {
                let r = responder.clone();
                until = tokio::task::spawn_blocking(move || r.isolation.expire())
                    .await
                    .unwrap_or(None);
            }
            a = requests.recv() => {
                let Some(a) = a else { return };
                let r = responder.clone();
                let Ok((result, next)) = tokio::task::spawn_blocking(move || {
                    (r.handle(&a), r.isolation.until())
                })
                .await
                else {
                    continue;
                };
                info!(action = %result.id, outcome = %result.outcome, detail = %result.detail, "response action outcome");
                until = next;
                if results.send(result).await.is_err() {
                    return;
                }
            }
        }
    }
}
