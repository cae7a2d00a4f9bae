//! Agents gone silent: one that sends nothing for `silent_after` without having said goodbye
//! (killed, frozen with SIGSTOP, its host down or cut off) becomes a detection of kind `agent`,
//! `vedette.agent_silent`, stored and exported like any other, so that an intruder who stops
//! the agent on one host is seen centrally. A clean stop (the agent's Goodbye) is recorded as
//! such and raises nothing.
//!
//! An agent that still runs an older bundle `stale_after` after a newer one was published (it
//! refused it, or cannot compile it, or someone keeps it from updating) becomes a
//! `vedette.agent_stale_bundle` detection the same way.
//!
//! Each is reported once: the detection's id is derived from the agent and the time it was
//! last heard from (or the version it is behind), so every collector sharing a store may look,
//! and a restarted one looks again, without a second report. The bundle an agent is due says,
//! in its `findings.jsonl`, the score of each and whether it is reported for the agent's
//! organisation and labels, as agents do for their own findings.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;
use vedette_ops::output::rfc3339_ms;
use vedette_proto::v1::{Detection, DetectionKind, IndicatorRef};

use vedette_engine::bundle;
use vedette_engine::findings::Findings;

use super::{State, blocking};
use crate::store::{AgentRow, BundleRow, now_ms};

/// The rule name of a silent agent's detection.
pub const SILENT_RULE: &str = vedette_engine::findings::AGENT_SILENT;

/// The rule name of the detection of an agent behind on bundles.
pub const STALE_RULE: &str = vedette_engine::findings::AGENT_STALE_BUNDLE;

/// What makes an agent worth reporting; None: not looked for.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub silent_after: Option<Duration>,
    pub stale_after: Option<Duration>,
}

/// Namespace of the ids of silence detections.
const NAMESPACE: uuid::Uuid = uuid::uuid!("6f1d2a7e-93b4-5c0a-8e21-766564657474");

/// Looks for silent and stale agents every tenth of the shorter limit (at least every second,
/// at most every minute) until the collector stops.
pub(super) async fn watch(state: Arc<State>, limits: Limits) {
    let shortest = [limits.silent_after, limits.stale_after]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(Duration::from_secs(600));
    let every = (shortest / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    // Kept between looks: a bundle's settings are decoded once, not at every look at an agent
    // that stays silent.
    let mut settings = Settings::default();
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let Ok(agents) = blocking(&state.store, |s| s.list_agents()).await else {
            continue;
        };
        let latest = match limits.stale_after {
            Some(_) => blocking(&state.store, |s| s.list_bundles())
                .await
                .ok()
                .and_then(|b| b.into_iter().max_by_key(|b| b.version)),
            None => None,
        };
        let now = now_ms();
        let rollout = state.rollout.borrow().clone();
        for a in &agents {
            let found = limits
                .silent_after
                .filter(|after| silent(a, *after, now))
                .map(|_| silent_detection(a, now))
                .or_else(|| {
                    let (after, latest) = (limits.stale_after?, latest.as_ref()?);
                    stale(a, latest, after, now).then(|| stale_detection(a, latest, now))
                });
            let found = found.and_then(|d| settle(d, settings.of(&rollout, a), a));
            if let Some(d) = found {
                report(&state, a, d, now).await;
            }
        }
    }
}

/// The settings of built-in findings of each bundle version, decoded the first time an agent
/// due that version is found.
#[derive(Default)]
struct Settings(std::collections::HashMap<u64, Findings>);

impl Settings {
    /// The settings in the bundle agent `a` is due (none without a bundle).
    fn of(&mut self, rollout: &super::rollout::Rollout, a: &AgentRow) -> &Findings {
        let due = rollout.due_for(&a.labels);
        let version = due.map_or(0, |b| b.version);
        if self.0.len() >= 64 && !self.0.contains_key(&version) {
            // Versions long replaced: decoded again should one be due once more.
            self.0.clear();
        }
        self.0.entry(version).or_insert_with(|| {
            due.and_then(|b| bundle::decode(&b.content).ok())
                .map(|c| bundle::findings_of(&c))
                .unwrap_or_default()
        })
    }
}

/// `d` as the settings say for agent `a`: with their score, or None when turned off for it.
fn settle(mut d: Detection, settings: &Findings, a: &AgentRow) -> Option<Detection> {
    let resolved = settings.resolve(&a.org, &a.labels);
    let this = resolved.get(d.rule.as_str())?;
    if !this.enabled {
        return None;
    }
    d.score = this.score;
    Some(d)
}

/// Stores a detection about agent `a`, and logs it the first time.
async fn report(state: &State, a: &AgentRow, d: Detection, now: i64) {
    let (id, rule) = (a.id.clone(), d.rule.clone());
    match blocking(&state.store, move |s| s.insert_detections(&id, &[d], now)).await {
        Ok(0) | Err(_) => {}
        Ok(_) => warn!(
            agent = %a.id,
            hostname = %vedette_ops::output::printable(&a.hostname),
            last_seen = %rfc3339_ms(a.last_seen_ms),
            bundle_version = a.bundle_version,
            rule = %rule,
            "agent reported as a detection"
        ),
    }
}

/// Whether an agent heard from runs an older bundle than `latest`, published longer than
/// `after` ago.
fn stale(a: &AgentRow, latest: &BundleRow, after: Duration, now_ms: i64) -> bool {
    !a.revoked
        && a.first_seen_ms != 0
        && a.bundle_version < latest.version
        && now_ms.saturating_sub(latest.published_at_ms) > after.as_millis() as i64
}

/// The detection of an agent still on an older bundle than `latest`.
fn stale_detection(a: &AgentRow, latest: &BundleRow, now_ms: i64) -> Detection {
    let id = uuid::Uuid::new_v5(
        &NAMESPACE,
        format!("{}|stale|{}", a.id, latest.version).as_bytes(),
    );
    let why = if a.bundle_failed_version != 0 {
        format!(
            "; it failed to apply version {}: {}",
            a.bundle_failed_version, a.bundle_error
        )
    } else {
        String::new()
    };
    let description = format!(
        "agent on {} runs bundle version {} while version {} was published at {}{why}",
        a.hostname,
        a.bundle_version,
        latest.version,
        rfc3339_ms(latest.published_at_ms)
    );
    about_agent(id, STALE_RULE, description, now_ms)
}

/// Whether an agent has been silent for `after` at `now_ms`: seen once, not revoked, not
/// stopped on purpose.
fn silent(a: &AgentRow, after: Duration, now_ms: i64) -> bool {
    !a.revoked
        && a.first_seen_ms != 0
        && a.stopped_at_ms == 0
        && now_ms.saturating_sub(a.last_seen_ms) > after.as_millis() as i64
}

/// The detection of an agent silent since it was last heard from.
fn silent_detection(a: &AgentRow, now_ms: i64) -> Detection {
    let id = uuid::Uuid::new_v5(
        &NAMESPACE,
        format!("{}|{}", a.id, a.last_seen_ms).as_bytes(),
    );
    let silent_for = Duration::from_millis(now_ms.saturating_sub(a.last_seen_ms).max(0) as u64);
    let silent_for = humantime::format_duration(Duration::from_secs(silent_for.as_secs()));
    let description = format!(
        "agent on {} silent since {} ({silent_for}) without a goodbye: killed, frozen, or its \
         host down or cut off",
        a.hostname,
        rfc3339_ms(a.last_seen_ms)
    );
    about_agent(id, SILENT_RULE, description, now_ms)
}

/// A built-in detection about an agent itself (kind `agent`), found at `now_ms`.
fn about_agent(id: uuid::Uuid, rule: &str, description: String, now_ms: i64) -> Detection {
    Detection {
        id: id.to_string(),
        kind: DetectionKind::Agent as i32,
        rule: rule.into(),
        source: "vedette".into(),
        score: vedette_engine::findings::default_score(rule),
        description,
        observed_at_ms: now_ms,
        indicator: Some(IndicatorRef {
            source: "vedette".into(),
            id: rule.into(),
            origin: "built-in".into(),
            ..Default::default()
        }),
        // Impair Defenses: Disable or Modify Tools.
        techniques: vec!["T1562.001".into()],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bundle's `findings.jsonl` rescores the collector's findings about agents and turns
    /// them off for some organisations or labels.
    #[test]
    fn the_bundle_settles_findings_about_agents() {
        let settings = Findings::parse(
            "{\"rule\": \"vedette.agent_silent\", \"score\": 90}\n\
             {\"rule\": \"vedette.agent_silent\", \"enabled\": false, \"labels\": [\"laptops\"]}\n\
             {\"rule\": \"vedette.agent_stale_bundle\", \"enabled\": false, \"orgs\": [\"acme\"]}\n",
        )
        .unwrap();
        let server = AgentRow {
            id: "a".into(),
            org: "acme".into(),
            first_seen_ms: 1,
            last_seen_ms: 1_000,
            ..Default::default()
        };
        let laptop = AgentRow {
            labels: vec!["laptops".into()],
            org: "beta".into(),
            ..server.clone()
        };
        let silent = silent_detection(&server, 400_000);
        assert_eq!(silent.score, 70, "the built-in score");
        assert_eq!(
            settle(silent.clone(), &settings, &server).unwrap().score,
            90
        );
        assert!(settle(silent.clone(), &settings, &laptop).is_none());
        assert_eq!(
            settle(silent, &Findings::default(), &laptop).unwrap().score,
            70
        );
        let latest = BundleRow {
            version: 2,
            ..Default::default()
        };
        let stale = stale_detection(&server, &latest, 400_000);
        assert!(settle(stale.clone(), &settings, &server).is_none());
        assert_eq!(settle(stale, &settings, &laptop).unwrap().score, 50);
    }

    #[test]
    fn only_agents_heard_from_not_stopped_nor_revoked_go_silent() {
        let after = Duration::from_secs(300);
        let a = AgentRow {
            id: "a".into(),
            first_seen_ms: 1,
            last_seen_ms: 1_000,
            ..Default::default()
        };
        assert!(!silent(&a, after, 300_000));
        assert!(silent(&a, after, 302_000));
        assert!(!silent(
            &AgentRow {
                stopped_at_ms: 1_000,
                ..a.clone()
            },
            after,
            302_000
        ));
        assert!(!silent(
            &AgentRow {
                revoked: true,
                ..a.clone()
            },
            after,
            302_000
        ));
        assert!(!silent(
            &AgentRow {
                first_seen_ms: 0,
                ..a.clone()
            },
            after,
            302_000
        ));
        // The same silence, the same id; a later one, another.
        assert_eq!(
            silent_detection(&a, 302_000).id,
            silent_detection(&a, 900_000).id
        );
        let later = AgentRow {
            last_seen_ms: 5_000,
            ..a.clone()
        };
        assert_ne!(
            silent_detection(&later, 302_000).id,
            silent_detection(&a, 302_000).id
        );
    }

    #[test]
    fn an_agent_behind_the_latest_bundle_long_enough_is_stale_once_per_version() {
        let after = Duration::from_secs(3600);
        let a = AgentRow {
            id: "a".into(),
            first_seen_ms: 1,
            bundle_version: 2,
            ..Default::default()
        };
        let v3 = BundleRow {
            version: 3,
            published_at_ms: 1_000,
            ..Default::default()
        };
        assert!(!stale(&a, &v3, after, 3_600_000));
        assert!(stale(&a, &v3, after, 3_602_000));
        assert!(!stale(
            &AgentRow {
                bundle_version: 3,
                ..a.clone()
            },
            &v3,
            after,
            9_000_000
        ));
        let v4 = BundleRow {
            version: 4,
            ..v3.clone()
        };
        assert_eq!(
            stale_detection(&a, &v3, 1).id,
            stale_detection(&a, &v3, 2).id
        );
        assert_ne!(
            stale_detection(&a, &v3, 1).id,
            stale_detection(&a, &v4, 1).id
        );
    }
}
