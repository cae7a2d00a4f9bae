//! The costliest YARA rules, as agents measure them on their own files: each agent's heartbeat
//! carries the profile of its last full scan; the collector keeps the last one per agent, and
//! answers per bundle version which rules cost the most, on which host, and on how many.

use std::collections::{BTreeMap, HashMap};

use prost::Message;
use tonic::Status;
use vedette_proto::v1::{RuleCostSeen, RuleProfile, VersionRuleCosts};

use super::admin::{AdminSvc, listing_scope};
use super::{State, blocking};
use crate::peer::Peer;

/// Most rules a profile may name (agents send their 10 costliest).
const MAX_RULES: usize = 32;
/// Longest rule name and file path kept; longer ones are cut.
const MAX_NAME: usize = 256;
const MAX_FILE: usize = 1024;
/// Most rules answered per version.
const TOP: usize = 20;

/// Checks a heartbeat's profile and keeps it as the agent's last.
pub(super) async fn record(
    state: &State,
    agent_id: &str,
    mut profile: RuleProfile,
) -> Result<(), Status> {
    if profile.rules.len() > MAX_RULES {
        return Err(Status::invalid_argument(format!(
            "a rule profile names {} rules; at most {MAX_RULES} are allowed",
            profile.rules.len()
        )));
    }
    for r in &mut profile.rules {
        cut(&mut r.rule, MAX_NAME);
        cut(&mut r.file, MAX_FILE);
        r.share_ppm = r.share_ppm.min(1_000_000);
    }
    let id = agent_id.to_string();
    let bytes = profile.encode_to_vec();
    blocking(&state.store, move |s| s.put_rule_profile(&id, &bytes)).await?;
    Ok(())
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let end = (0..=max)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        s.truncate(end);
    }
}

impl AdminSvc {
    /// Per bundle version, the costliest rules its agents measured, newest version first;
    /// only agents the caller may see.
    pub(super) async fn slow_rules_as(
        &self,
        who: &Peer,
        org: &str,
    ) -> Result<Vec<VersionRuleCosts>, Status> {
        let only = listing_scope(who, org)?;
        let (profiles, agents) = blocking(&self.state.store, move |s| {
            Ok((s.rule_profiles(only.as_deref())?, s.list_agents()?))
        })
        .await?;
        let hosts: HashMap<String, String> =
            agents.into_iter().map(|a| (a.id, a.hostname)).collect();
        let decoded = profiles.into_iter().filter_map(|(agent, bytes)| {
            // Stored only after it was decoded and checked: a row that does not decode now
            // was damaged in the store, and is left out.
            let p = RuleProfile::decode(bytes.as_slice()).ok()?;
            let host = hosts.get(&agent).cloned().unwrap_or_default();
            Some((agent, host, p))
        });
        Ok(by_version(decoded))
    }
}

/// Groups agents' profiles by the bundle version they measured.
fn by_version(
    profiles: impl IntoIterator<Item = (String, String, RuleProfile)>,
) -> Vec<VersionRuleCosts> {
    type Key = (String, String, u32);
    let mut versions: BTreeMap<u64, (u32, BTreeMap<Key, RuleCostSeen>)> = BTreeMap::new();
    for (agent, host, p) in profiles {
        let (agents, rules) = versions.entry(p.bundle_version).or_default();
        *agents += 1;
        for r in p.rules {
            let seen = rules
                .entry((r.rule.clone(), r.file.clone(), r.line))
                .or_insert_with(|| RuleCostSeen {
                    rule: r.rule.clone(),
                    file: r.file.clone(),
                    line: r.line,
                    ..Default::default()
                });
            seen.agents += 1;
            if seen.agent_id.is_empty() || r.share_ppm > seen.max_share_ppm {
                seen.max_share_ppm = r.share_ppm;
                seen.agent_id = agent.clone();
                seen.hostname = host.clone();
            }
            seen.max_time_us = seen.max_time_us.max(r.time_us);
        }
    }
    versions
        .into_iter()
        .rev()
        .map(|(bundle_version, (agents, rules))| {
            let mut rules: Vec<RuleCostSeen> = rules.into_values().collect();
            rules.sort_by(|a, b| {
                b.max_share_ppm
                    .cmp(&a.max_share_ppm)
                    .then_with(|| b.agents.cmp(&a.agents))
                    .then_with(|| a.rule.cmp(&b.rule))
            });
            rules.truncate(TOP);
            VersionRuleCosts {
                bundle_version,
                agents,
                rules,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use vedette_proto::v1::RuleCost;

    use super::*;

    fn profile(version: u64, rules: &[(&str, u32)]) -> RuleProfile {
        RuleProfile {
            bundle_version: version,
            rules: rules
                .iter()
                .map(|(rule, share_ppm)| RuleCost {
                    rule: rule.to_string(),
                    file: "r.yar".into(),
                    line: 1,
                    time_us: u64::from(*share_ppm),
                    share_ppm: *share_ppm,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn rules_are_ranked_per_version_by_the_highest_share_any_host_measured() {
        let v = by_version([
            (
                "a1".into(),
                "web".into(),
                profile(3, &[("slow", 400_000), ("mid", 100_000)]),
            ),
            (
                "a2".into(),
                "db".into(),
                profile(3, &[("mid", 500_000), ("slow", 300_000)]),
            ),
            ("a3".into(), "old".into(), profile(2, &[("gone", 900_000)])),
        ]);
        assert_eq!(
            v.iter()
                .map(|v| (v.bundle_version, v.agents))
                .collect::<Vec<_>>(),
            [(3, 2), (2, 1)]
        );
        let three: Vec<(&str, u32, u32, &str)> = v[0]
            .rules
            .iter()
            .map(|r| {
                (
                    r.rule.as_str(),
                    r.max_share_ppm,
                    r.agents,
                    r.hostname.as_str(),
                )
            })
            .collect();
        assert_eq!(
            three,
            [("mid", 500_000, 2, "db"), ("slow", 400_000, 2, "web")]
        );
        assert_eq!(v[0].rules[0].max_time_us, 500_000);
        assert_eq!(v[1].rules[0].rule, "gone");
    }

    #[test]
    fn over_long_names_are_cut_on_a_character_boundary() {
        let mut s = "é".repeat(200);
        cut(&mut s, 255);
        assert_eq!(s.len(), 254);
        let mut short = "rule".to_string();
        cut(&mut short, 255);
        assert_eq!(short, "rule");
    }
}
