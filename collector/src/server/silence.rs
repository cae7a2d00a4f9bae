//! Agents gone silent: one that sends nothing for `silent_after` without having said goodbye
//! (killed, frozen with SIGSTOP, its host down or cut off) becomes a detection of kind `agent`,
//! `vedette.agent_silent`, stored and exported like any other, so that an intruder who stops
//! the agent on one host is seen centrally. A clean stop (the agent's Goodbye) is recorded as
//! such and raises nothing.
//!
//! Each silence is reported once: the detection's id is derived from the agent and the time it
//! was last heard from, so every collector sharing a store may look, and a restarted one looks
//! again, without a second report.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;
use vedette_ops::output::rfc3339_ms;
use vedette_proto::v1::{Detection, DetectionKind, IndicatorRef};

use super::{State, blocking};
use crate::store::{AgentRow, now_ms};

/// The rule name of a silent agent's detection.
pub const SILENT_RULE: &str = "vedette.agent_silent";

/// Namespace of the ids of silence detections.
const NAMESPACE: uuid::Uuid = uuid::uuid!("6f1d2a7e-93b4-5c0a-8e21-766564657474");

/// Looks for silent agents every tenth of `after` (at least every second, at most every
/// minute) until the collector stops.
pub(super) async fn watch(state: Arc<State>, after: Duration) {
    let every = (after / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let Ok(agents) = blocking(&state.store, |s| s.list_agents()).await else {
            continue;
        };
        let now = now_ms();
        for a in agents.iter().filter(|a| silent(a, after, now)) {
            let d = detection(a, now);
            let id = a.id.clone();
            match blocking(&state.store, move |s| s.insert_detections(&id, &[d], now)).await {
                Ok(0) | Err(_) => {}
                Ok(_) => warn!(
                    agent = %a.id,
                    hostname = %vedette_ops::output::printable(&a.hostname),
                    last_seen = %rfc3339_ms(a.last_seen_ms),
                    "agent silent without a goodbye: reported as a detection"
                ),
            }
        }
    }
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
fn detection(a: &AgentRow, now_ms: i64) -> Detection {
    let id = uuid::Uuid::new_v5(
        &NAMESPACE,
        format!("{}|{}", a.id, a.last_seen_ms).as_bytes(),
    );
    let silent_for = Duration::from_millis(now_ms.saturating_sub(a.last_seen_ms).max(0) as u64);
    let silent_for = humantime::format_duration(Duration::from_secs(silent_for.as_secs()));
    Detection {
        id: id.to_string(),
        kind: DetectionKind::Agent as i32,
        rule: SILENT_RULE.into(),
        source: "vedette".into(),
        score: 70,
        description: format!(
            "agent on {} silent since {} ({silent_for}) without a goodbye: killed, frozen, or \
             its host down or cut off",
            a.hostname,
            rfc3339_ms(a.last_seen_ms)
        ),
        observed_at_ms: now_ms,
        indicator: Some(IndicatorRef {
            source: "vedette".into(),
            id: SILENT_RULE.into(),
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
        assert_eq!(detection(&a, 302_000).id, detection(&a, 900_000).id);
        let later = AgentRow {
            last_seen_ms: 5_000,
            ..a.clone()
        };
        assert_ne!(detection(&later, 302_000).id, detection(&a, 302_000).id);
    }
}
