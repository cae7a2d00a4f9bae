//! Exceptions: what operators judged not worth reporting, and the one test of whether a
//! detection is covered by one.
//!
//! An exception always names a rule or an indicator; a hash, a path glob, an organisation and
//! an agent narrow it further. A path alone is refused: an attacker who learns of it drops the
//! payload there. The collector tests each detection it stores against the exceptions in its
//! store; agents test what they find against the exceptions a maintainer signed into the
//! bundle ([`FILE`], one JSON object per line), so the same code decides on both sides.

use globset::{GlobBuilder, GlobMatcher};
use serde::{Deserialize, Serialize};
use vedette_proto::v1::{Detection, detection::Target};

/// Where a bundle carries its exceptions.
pub const FILE: &str = "exceptions.jsonl";

/// Most exceptions one bundle (or one collector) holds.
pub const MAX_EXCEPTIONS: usize = 10_000;

/// Longest text of any one field.
pub const MAX_FIELD: usize = 1024;

/// One exception, as stored at the collector and carried in bundles.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Exception {
    /// `ex-` and 12 hex digits, made by the collector.
    pub id: String,
    /// The rule name a detection carries (a YARA rule, a Loki list entry, a built-in finding).
    pub rule: String,
    /// The indicator id a detection carries (a STIX indicator id, a MISP attribute UUID).
    pub indicator: String,
    /// Only the file or executable with this SHA-256 (lowercase hex).
    pub sha256: String,
    /// Only paths matching this glob (`*` stays within a directory, `**` crosses them).
    pub path: String,
    /// Only agents of this organisation (empty: every organisation).
    pub org: String,
    /// Only this agent (empty: every agent).
    pub agent: String,
    /// When it stops applying, ms since the epoch (0: never).
    pub expires_at_ms: i64,
    /// Why it was made.
    pub reason: String,
}

/// Why an exception is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExceptionError {
    #[error(
        "an exception must name a rule (--rule) or an indicator (--indicator): a path alone \
         would let anything dropped there go unseen"
    )]
    NoRule,
    #[error("`{0}` is not a SHA-256 (64 hex digits)")]
    Sha256(String),
    #[error("path glob `{glob}`: {reason}")]
    Glob { glob: String, reason: String },
    #[error("{field} is longer than {MAX_FIELD} bytes")]
    TooLong { field: &'static str },
    #[error("a reason is required: say why this is not worth reporting")]
    NoReason,
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("more than {MAX_EXCEPTIONS} exceptions")]
    TooMany,
}

impl Exception {
    /// Checks what an operator gave and puts it in its one form (hash in lowercase). The id
    /// and the expiry are the caller's.
    pub fn checked(mut self) -> Result<Exception, ExceptionError> {
        self.rule = self.rule.trim().to_string();
        self.indicator = self.indicator.trim().to_string();
        self.sha256 = self.sha256.trim().to_ascii_lowercase();
        self.path = self.path.trim().to_string();
        self.reason = self.reason.trim().to_string();
        for (field, value) in [
            ("the rule", &self.rule),
            ("the indicator", &self.indicator),
            ("the path", &self.path),
            ("the reason", &self.reason),
            ("the organisation", &self.org),
            ("the agent", &self.agent),
        ] {
            if value.len() > MAX_FIELD {
                return Err(ExceptionError::TooLong { field });
            }
        }
        if self.rule.is_empty() && self.indicator.is_empty() {
            return Err(ExceptionError::NoRule);
        }
        if !self.sha256.is_empty()
            && (self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(ExceptionError::Sha256(self.sha256));
        }
        if self.reason.is_empty() {
            return Err(ExceptionError::NoReason);
        }
        glob(&self.path)?;
        Ok(self)
    }

    /// Whether it is in force at `now_ms`.
    pub fn active(&self, now_ms: i64) -> bool {
        self.expires_at_ms == 0 || self.expires_at_ms > now_ms
    }
}

/// A glob matching exactly `path` (its `*`, `?`, `[` and `{` taken literally).
pub fn literal_glob(path: &str) -> String {
    globset::escape(path)
}

fn glob(path: &str) -> Result<Option<GlobMatcher>, ExceptionError> {
    if path.is_empty() {
        return Ok(None);
    }
    GlobBuilder::new(path)
        .literal_separator(true)
        .build()
        .map(|g| Some(g.compile_matcher()))
        .map_err(|e| ExceptionError::Glob {
            glob: path.to_string(),
            reason: e.kind().to_string(),
        })
}

/// A set of exceptions, ready to test detections against.
#[derive(Debug, Clone, Default)]
pub struct Exceptions {
    list: Vec<(Exception, Option<GlobMatcher>)>,
}

impl Exceptions {
    /// The exceptions given, each checked.
    pub fn new(list: Vec<Exception>) -> Result<Exceptions, ExceptionError> {
        if list.len() > MAX_EXCEPTIONS {
            return Err(ExceptionError::TooMany);
        }
        let mut out = Vec::with_capacity(list.len());
        for e in list {
            let matcher = glob(&e.path)?;
            out.push((e, matcher));
        }
        Ok(Exceptions { list: out })
    }

    /// The exceptions of a bundle's [`FILE`]: one JSON object per line.
    pub fn parse(text: &str) -> Result<Exceptions, ExceptionError> {
        let mut list = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let e: Exception = serde_json::from_str(line).map_err(|err| ExceptionError::Line {
                line: i + 1,
                reason: err.to_string(),
            })?;
            let e = e.checked().map_err(|err| ExceptionError::Line {
                line: i + 1,
                reason: err.to_string(),
            })?;
            list.push(e);
        }
        Exceptions::new(list)
    }

    /// The [`FILE`] of a bundle carrying `list`: one line each, in the order given.
    pub fn encode(list: &[Exception]) -> String {
        let mut out = String::new();
        for e in list {
            if let Ok(line) = serde_json::to_string(e) {
                out.push_str(&line);
                out.push('\n');
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The first exception in force at `now_ms` that covers `d`, found by agent `agent` of
    /// organisation `org`.
    pub fn covering(&self, d: &Detection, agent: &str, org: &str, now_ms: i64) -> Option<&str> {
        if self.list.is_empty() {
            return None;
        }
        self.covering_seen(&Seen::of(d), agent, org, now_ms)
    }

    /// As [`Self::covering`], for what is known before a detection is made (an exec held for
    /// a verdict).
    pub fn covering_seen(
        &self,
        seen: &Seen<'_>,
        agent: &str,
        org: &str,
        now_ms: i64,
    ) -> Option<&str> {
        self.list
            .iter()
            .find(|(e, glob)| e.active(now_ms) && covers(e, glob.as_ref(), seen, agent, org))
            .map(|(e, _)| e.id.as_str())
    }

    /// Those that apply to agent `agent` of organisation `org`, no longer naming either: what
    /// an agent keeps of a bundle's exceptions.
    pub fn narrowed_to(self, agent: &str, org: &str) -> Exceptions {
        let list = self
            .list
            .into_iter()
            .filter(|(e, _)| {
                (e.org.is_empty() || e.org == org) && (e.agent.is_empty() || e.agent == agent)
            })
            .map(|(mut e, glob)| {
                e.org.clear();
                e.agent.clear();
                (e, glob)
            })
            .collect();
        Exceptions { list }
    }
}

/// What of a detection an exception can name.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen<'a> {
    pub rule: &'a str,
    pub indicator: &'a str,
    /// Of the file or executable.
    pub sha256: &'a str,
    /// Of the file or executable.
    pub path: &'a str,
}

impl<'a> Seen<'a> {
    pub fn of(d: &'a Detection) -> Seen<'a> {
        let (sha256, path) = match &d.target {
            Some(Target::File(f)) => (f.sha256.as_str(), f.path.as_str()),
            Some(Target::Process(p)) => (p.exe_sha256.as_str(), p.exe.as_str()),
            Some(Target::Connection(c)) => ("", c.exe.as_str()),
            Some(Target::Dns(q)) => ("", q.exe.as_str()),
            None => ("", ""),
        };
        Seen {
            rule: &d.rule,
            indicator: d.indicator.as_ref().map_or("", |i| i.id.as_str()),
            sha256,
            path,
        }
    }
}

fn covers(e: &Exception, glob: Option<&GlobMatcher>, s: &Seen<'_>, agent: &str, org: &str) -> bool {
    let named = (!e.rule.is_empty() && e.rule == s.rule)
        || (!e.indicator.is_empty() && (e.indicator == s.indicator || e.indicator == s.rule));
    named
        && (e.sha256.is_empty() || e.sha256.eq_ignore_ascii_case(s.sha256))
        && glob.is_none_or(|g| !s.path.is_empty() && g.is_match(s.path))
        && (e.org.is_empty() || e.org == org)
        && (e.agent.is_empty() || e.agent == agent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vedette_proto::v1::{FileTarget, IndicatorRef};

    const H: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn file(rule: &str, path: &str, sha256: &str) -> Detection {
        Detection {
            rule: rule.into(),
            target: Some(Target::File(FileTarget {
                path: path.into(),
                sha256: sha256.into(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn ex(rule: &str) -> Exception {
        Exception {
            id: "ex-1".into(),
            rule: rule.into(),
            reason: "test".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_path_alone_is_refused_and_a_reason_is_required() {
        let path_only = Exception {
            path: "/opt/**".into(),
            reason: "x".into(),
            ..Default::default()
        };
        assert_eq!(path_only.checked(), Err(ExceptionError::NoRule));
        let no_reason = Exception {
            rule: "R".into(),
            ..Default::default()
        };
        assert_eq!(no_reason.checked(), Err(ExceptionError::NoReason));
        let bad_hash = Exception {
            sha256: "abc".into(),
            ..ex("R")
        };
        assert!(matches!(bad_hash.checked(), Err(ExceptionError::Sha256(_))));
    }

    #[test]
    fn rule_hash_path_org_and_agent_each_narrow_it() {
        let set = Exceptions::new(vec![Exception {
            sha256: H.into(),
            path: "/srv/**".into(),
            org: "acme".into(),
            agent: "a1".into(),
            ..ex("Evil")
        }])
        .unwrap();
        let d = file("Evil", "/srv/app/x.bin", H);
        assert_eq!(set.covering(&d, "a1", "acme", 0), Some("ex-1"));
        assert_eq!(set.covering(&d, "a2", "acme", 0), None, "another agent");
        assert_eq!(set.covering(&d, "a1", "other", 0), None, "another org");
        let other_hash = file("Evil", "/srv/app/x.bin", &"b".repeat(64));
        assert_eq!(set.covering(&other_hash, "a1", "acme", 0), None);
        let other_path = file("Evil", "/tmp/x.bin", H);
        assert_eq!(set.covering(&other_path, "a1", "acme", 0), None);
        let other_rule = file("Other", "/srv/app/x.bin", H);
        assert_eq!(set.covering(&other_rule, "a1", "acme", 0), None);
    }

    #[test]
    fn a_single_star_stays_in_its_directory() {
        let set = Exceptions::new(vec![Exception {
            path: "/srv/*.bin".into(),
            ..ex("Evil")
        }])
        .unwrap();
        assert!(
            set.covering(&file("Evil", "/srv/x.bin", H), "", "", 0)
                .is_some()
        );
        assert!(
            set.covering(&file("Evil", "/srv/sub/x.bin", H), "", "", 0)
                .is_none()
        );
    }

    #[test]
    fn an_indicator_id_and_expiry_are_honoured() {
        let set = Exceptions::new(vec![Exception {
            id: "ex-2".into(),
            indicator: "indicator--1".into(),
            reason: "r".into(),
            expires_at_ms: 1000,
            ..Default::default()
        }])
        .unwrap();
        let d = Detection {
            rule: "some name".into(),
            indicator: Some(IndicatorRef {
                id: "indicator--1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(set.covering(&d, "", "", 999), Some("ex-2"));
        assert_eq!(set.covering(&d, "", "", 1000), None, "expired");
    }

    #[test]
    fn the_bundle_file_round_trips_and_names_a_bad_line() {
        let list = vec![
            ex("A"),
            Exception {
                id: "ex-2".into(),
                ..ex("B")
            },
        ];
        let text = Exceptions::encode(&list);
        assert_eq!(Exceptions::parse(&text).unwrap().len(), 2);
        let bad = format!("{text}{{\"id\":\"ex-3\",\"path\":\"/x\",\"reason\":\"r\"}}\n");
        let err = Exceptions::parse(&bad).unwrap_err();
        assert!(err.to_string().starts_with("line 3:"), "{err}");
    }

    #[test]
    fn an_agent_keeps_what_applies_to_it() {
        let set = Exceptions::new(vec![
            Exception {
                org: "acme".into(),
                ..ex("A")
            },
            Exception {
                agent: "a2".into(),
                ..ex("B")
            },
            ex("C"),
        ])
        .unwrap()
        .narrowed_to("a1", "acme");
        assert_eq!(set.len(), 2, "acme's and everyone's, not a2's");
        assert!(set.covering(&file("A", "/x", H), "", "", 0).is_some());
        assert!(set.covering(&file("B", "/x", H), "", "", 0).is_none());
    }
}
