//! Settings of Vedette's built-in findings (the agents' `vedette.fileless_exec`, …, and the
//! collector's about agents, `vedette.agent_silent`, …): their score, and whether they are
//! reported at all, for every agent or for those of some organisations or labels.
//!
//! A rule maintainer puts them in the bundle as [`FILE`] at the top of the rules directory,
//! one JSON object per line:
//!
//! ```text
//! {"rule": "vedette.fileless_exec", "score": 50}
//! {"rule": "vedette.unscannable_exec", "enabled": false, "labels": ["ci"]}
//! {"rule": "vedette.fileless_exec", "enabled": true, "orgs": ["acme"], "score": 90}
//! ```
//!
//! A line applies to an agent when its organisation is among `orgs` (or `orgs` is absent) and
//! one of its labels among `labels` (or `labels` is absent). The lines that apply are read in
//! order: each sets what it names, so a later line wins over an earlier one.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Where a bundle carries the settings.
pub const FILE: &str = "findings.jsonl";

/// A process runs an executable that is deleted, or lives only in memory.
pub const FILELESS_EXEC: &str = "vedette.fileless_exec";
/// A process runs an executable the agent cannot read.
pub const UNSCANNABLE_EXEC: &str = "vedette.unscannable_exec";

/// An agent sends nothing for `silent_after` without having said goodbye (the collector's).
pub const AGENT_SILENT: &str = "vedette.agent_silent";
/// An agent still runs an older bundle `stale_after` after a newer one (the collector's).
pub const AGENT_STALE_BUNDLE: &str = "vedette.agent_stale_bundle";

/// The findings Vedette makes itself (agents, and the collector about agents), and their
/// scores when nothing says otherwise.
pub const BUILT_IN: &[(&str, u32)] = &[
    (FILELESS_EXEC, 70),
    (UNSCANNABLE_EXEC, 40),
    (AGENT_SILENT, 70),
    (AGENT_STALE_BUNDLE, 50),
];

/// The score of a built-in finding when no setting changes it.
pub fn default_score(rule: &str) -> u32 {
    BUILT_IN
        .iter()
        .find(|(name, _)| *name == rule)
        .map_or(50, |(_, score)| *score)
}

/// Most lines one settings file holds.
pub const MAX_LINES: usize = 1000;

/// One line of the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setting {
    pub rule: String,
    #[serde(default)]
    pub score: Option<u32>,
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub orgs: Vec<String>,
    #[serde(default)]
    pub labels: Vec<String>,
}

/// What is wrong with a settings file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FindingsError {
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("more than {MAX_LINES} lines")]
    TooMany,
}

/// A bundle's settings, for every agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    lines: Vec<Setting>,
}

/// How one built-in finding is reported on one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub enabled: bool,
    pub score: u32,
}

impl Findings {
    /// Parses the file; every problem names its line.
    pub fn parse(text: &str) -> Result<Findings, FindingsError> {
        let mut lines = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let raw = raw.trim();
            if raw.is_empty() || raw.starts_with('#') {
                continue;
            }
            if lines.len() == MAX_LINES {
                return Err(FindingsError::TooMany);
            }
            let line = i + 1;
            let bad = |reason: String| FindingsError::Line { line, reason };
            let s: Setting = serde_json::from_str(raw).map_err(|e| bad(e.to_string()))?;
            if !BUILT_IN.iter().any(|(name, _)| *name == s.rule) {
                let known: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
                return Err(bad(format!(
                    "`{}` is not a built-in finding (these are: {})",
                    s.rule,
                    known.join(", ")
                )));
            }
            if s.score.is_none() && s.enabled.is_none() {
                return Err(bad("says neither `score` nor `enabled`".into()));
            }
            if let Some(score) = s.score
                && !(1..=100).contains(&score)
            {
                return Err(bad(format!("score {score} is not between 1 and 100")));
            }
            lines.push(s);
        }
        Ok(Findings { lines })
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// How each built-in finding is reported on an agent of `org` with `labels`.
    pub fn resolve(&self, org: &str, labels: &[String]) -> BTreeMap<&'static str, Resolved> {
        let mut out: BTreeMap<&'static str, Resolved> = BUILT_IN
            .iter()
            .map(|&(name, score)| {
                let r = Resolved {
                    enabled: true,
                    score,
                };
                (name, r)
            })
            .collect();
        for s in &self.lines {
            let org_ok = s.orgs.is_empty() || s.orgs.iter().any(|o| o == org);
            let label_ok = s.labels.is_empty() || s.labels.iter().any(|l| labels.contains(l));
            if !(org_ok && label_ok) {
                continue;
            }
            if let Some(r) = out.get_mut(s.rule.as_str()) {
                r.enabled = s.enabled.unwrap_or(r.enabled);
                r.score = s.score.unwrap_or(r.score);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn later_lines_win_and_scope_by_organisation_and_label() {
        let f = Findings::parse(
            "# fleet defaults\n\
             {\"rule\": \"vedette.fileless_exec\", \"score\": 50}\n\
             {\"rule\": \"vedette.fileless_exec\", \"enabled\": false, \"labels\": [\"ci\"]}\n\
             {\"rule\": \"vedette.fileless_exec\", \"enabled\": true, \"orgs\": [\"acme\"], \"labels\": [\"ci\"]}\n\
             {\"rule\": \"vedette.unscannable_exec\", \"enabled\": false, \"orgs\": [\"beta\"]}\n",
        )
        .unwrap();
        let r = f.resolve("beta", &labels(&["web"]));
        assert_eq!(
            r[FILELESS_EXEC],
            Resolved {
                enabled: true,
                score: 50
            }
        );
        assert!(!r[UNSCANNABLE_EXEC].enabled);
        assert!(!f.resolve("beta", &labels(&["web", "ci"]))[FILELESS_EXEC].enabled);
        let acme = f.resolve("acme", &labels(&["ci"]));
        assert!(acme[FILELESS_EXEC].enabled);
        assert_eq!(
            acme[UNSCANNABLE_EXEC],
            Resolved {
                enabled: true,
                score: 40
            }
        );
        assert_eq!(
            Findings::default().resolve("x", &[])[FILELESS_EXEC].score,
            70
        );
    }

    #[test]
    fn every_bad_line_is_named() {
        let cases = [
            (
                "{\"rule\": \"vedette.nope\", \"score\": 5}",
                "not a built-in finding",
            ),
            (
                "{\"rule\": \"vedette.fileless_exec\"}",
                "neither `score` nor `enabled`",
            ),
            (
                "{\"rule\": \"vedette.fileless_exec\", \"score\": 0}",
                "score 0 is not between",
            ),
            (
                "{\"rule\": \"vedette.fileless_exec\", \"scor\": 5}",
                "unknown field `scor`",
            ),
            ("not json", "line 2"),
        ];
        for (line, want) in cases {
            let text = format!("\n{line}\n");
            let e = Findings::parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{line}: {e}");
            assert!(e.starts_with("line 2:"), "{e}");
        }
    }
}
