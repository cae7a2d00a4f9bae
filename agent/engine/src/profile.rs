//! Which YARA rules cost the most on a corpus, measured before they ship.
//!
//! yara-x measures the time of each rule only when built with its `rules-profiling` feature,
//! and that build calls back into the host for every rule that does not match, on every file:
//! the cost rules by file class take away. The agent is built without it, so the engine
//! measures instead, by compiling parts of the rules apart and scanning the corpus with each,
//! as the agent scans (fast scan, the same compile options):
//!
//! 1. every rule file alone, less the time of scanning with no rule at all: each file's cost;
//! 2. in the costliest files, each rule alone with the rules its file's conditions name (they
//!    are compiled in every measurement of that file, and their own time is taken off): each
//!    rule's cost.
//!
//! A rule's share is its cost over the sum of every file's. The corpus is read once into
//! memory, so the disk is not measured; what it costs grows with rules × corpus, so a sample of
//! a few megabytes of what hosts hold is enough to find a rule that is slow everywhere.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::rules::{Found, compile_set, line_at};

/// One rule's measured cost.
#[derive(Debug, Clone)]
pub struct RuleCost {
    pub rule: String,
    pub file: PathBuf,
    pub line: usize,
    pub time: Duration,
    /// Of the time of every rule file together, 0 to 1.
    pub share: f64,
}

/// What profiling found.
#[derive(Debug, Default)]
pub struct Profile {
    pub files: usize,
    pub bytes: u64,
    /// The corpus scanned with every rule file, each file's time added.
    pub total: Duration,
    /// The costliest rules first.
    pub rules: Vec<RuleCost>,
}

/// How long scanning `corpus` with `rules` takes, the best of `rounds`: this thread's CPU
/// time, not the clock's, so that neither other work on the machine nor the pauses of a
/// process paced within a CPU budget (the agent's rule compiler) count.
fn measure(rules: &yara_x::Rules, corpus: &[Vec<u8>], rounds: usize) -> Duration {
    let mut scanner = yara_x::Scanner::new(rules);
    scanner.fast_scan(true);
    scanner.set_timeout(Duration::from_secs(60));
    (0..rounds.max(1))
        .map(|_| {
            let start = crate::thread_cpu();
            for data in corpus {
                // A timeout is a cost like any other: the time is what counts.
                let _ = scanner.scan(data);
            }
            crate::thread_cpu().saturating_sub(start)
        })
        .min()
        .unwrap_or_default()
}

/// One source compiled alone, as `text`.
fn alone(origin: &Path, ns: &str, text: &[u8]) -> yara_x::Rules {
    compile_set(
        &[(origin.to_path_buf(), Vec::new())],
        &[Cow::Borrowed(text)],
        &[Some(ns.to_string())],
        &mut Found::default(),
    )
}

/// Profiles `sources` (YARA files with their namespaces) on `corpus`: the `top` costliest
/// rules, looked for in the costliest rule files (`top` of them, and at least 5).
pub(crate) fn profile(
    sources: &[(PathBuf, Vec<u8>)],
    names: &[Option<String>],
    corpus: &[Vec<u8>],
    top: usize,
) -> Profile {
    let files = top.max(5);
    let nothing = alone(Path::new("empty"), "empty", b"");
    let base = measure(&nothing, corpus, 3);
    let mut by_file: Vec<(usize, Duration)> = Vec::new();
    for (i, ((origin, bytes), ns)) in sources.iter().zip(names).enumerate() {
        let Some(ns) = ns else { continue };
        // The best of two, as each rule is measured below: the first scan with a set pays for
        // its warming up.
        let t = measure(&alone(origin, ns, bytes), corpus, 2);
        by_file.push((i, t.saturating_sub(base)));
    }
    let total: Duration = by_file.iter().map(|(_, t)| *t).sum();
    by_file.sort_by_key(|f| std::cmp::Reverse(f.1));
    let mut rules = Vec::new();
    for &(i, _) in by_file.iter().take(files) {
        let (origin, bytes) = &sources[i];
        let Some(ns) = &names[i] else { continue };
        rules.extend(rule_costs(origin, ns, bytes, corpus));
    }
    rules.sort_by_key(|r| std::cmp::Reverse(r.time));
    rules.truncate(top);
    let all = total.as_secs_f64().max(f64::MIN_POSITIVE);
    for r in &mut rules {
        r.share = (r.time.as_secs_f64() / all).min(1.0);
    }
    Profile {
        files: corpus.len(),
        bytes: corpus.iter().map(|d| d.len() as u64).sum(),
        total,
        rules,
    }
}

/// Each rule of one file alone (with the rules the file's conditions name), less those.
fn rule_costs(origin: &Path, ns: &str, bytes: &[u8], corpus: &[Vec<u8>]) -> Vec<RuleCost> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Vec::new();
    };
    let Some((rules, named)) = crate::classes::declared_rules(text) else {
        return Vec::new();
    };
    let keep_only = |wanted: Option<usize>| -> Vec<u8> {
        let left_out = rules
            .iter()
            .enumerate()
            .filter(|(j, (_, name))| Some(*j) != wanted && !named.contains(name))
            .map(|(_, (span, _))| span);
        crate::classes::blanked(bytes, left_out)
    };
    let helpers = measure(&alone(origin, ns, &keep_only(None)), corpus, 2);
    rules
        .iter()
        .enumerate()
        .filter(|(_, (_, name))| !named.contains(name))
        .map(|(j, (span, name))| {
            let t = measure(&alone(origin, ns, &keep_only(Some(j))), corpus, 2);
            RuleCost {
                rule: name.clone(),
                file: origin.to_path_buf(),
                line: line_at(text, span.start),
                time: t.saturating_sub(helpers),
                share: 0.0,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::RuleSetBuilder;

    #[test]
    fn a_rule_whose_regex_has_no_atoms_is_named_first() {
        let mut b = RuleSetBuilder::new();
        let mut quick = String::new();
        for i in 0..30 {
            quick.push_str(&format!(
                "rule quick_{i} {{ strings: $a = \"MARKER-{i:04}-QUICK\" condition: $a }}\n"
            ));
        }
        b.add_yara_source(Path::new("quick.yar"), quick.as_bytes());
        b.add_yara_source(
            Path::new("mixed.yar"),
            b"rule cheap { strings: $a = \"CHEAP-MARKER\" condition: $a }\n\
              rule slow_regex { strings: $r = /[a-z]+[0-9]+[a-z]+[0-9]/ condition: $r }\n",
        );
        let line: Vec<u8> = b"abcdefgh12345ijklmnop ".repeat(4_000);
        let corpus = vec![line.clone(), line.clone(), line];
        let p = b.profile(&corpus, 3);
        assert_eq!(p.files, 3);
        let first = &p.rules[0];
        assert_eq!(
            (first.rule.as_str(), first.line),
            ("slow_regex", 2),
            "{p:?}"
        );
        assert!(first.file.ends_with("mixed.yar"));
        assert!(first.share > 0.5, "{p:?}");
    }
}
