//! The one error a configuration file gives, in the agent and the collector alike: every
//! problem found, each naming its key and value, under the file's path.

use std::path::{Path, PathBuf};

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid configuration{}:\n  {}",
    path.as_ref().map(|p| format!(" `{}`", p.display())).unwrap_or_default(),
    problems.join("\n  ")
)]
pub struct ConfigError {
    /// The file, when the configuration came from one.
    pub path: Option<PathBuf>,
    pub problems: Vec<String>,
}

impl ConfigError {
    pub fn new(path: Option<&Path>, problems: Vec<String>) -> ConfigError {
        ConfigError {
            path: path.map(Path::to_owned),
            problems,
        }
    }
}

/// Reads and parses a TOML file (unknown keys refused where the type says so); a problem
/// names the file, and the line and key (see [`parse_toml`]).
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let fail = |p: Vec<String>| ConfigError::new(Some(path), p);
    let text =
        std::fs::read_to_string(path).map_err(|e| fail(vec![format!("cannot read: {e}")]))?;
    parse_toml(&text).map_err(fail)
}

/// Most unknown keys reported from one file.
const MAX_UNKNOWN: usize = 64;

/// Parses TOML, reporting every problem at once, in line order: each unknown key with the
/// known key it is nearest to (`did you mean`), each value of the wrong type; a syntax error
/// or a missing key ends the reading there.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Vec<String>> {
    let mut text = text.to_string();
    let mut problems: Vec<(usize, String)> = Vec::new();
    let done = |mut p: Vec<(usize, String)>| {
        p.sort_by_key(|(line, _)| *line);
        p.into_iter().map(|(_, text)| text).collect::<Vec<_>>()
    };
    loop {
        let e = match toml::from_str::<T>(&text) {
            Ok(v) if problems.is_empty() => return Ok(v),
            Ok(_) => return Err(done(problems)),
            Err(e) => e,
        };
        let Some(span) = e.span().filter(|_| problems.len() < MAX_UNKNOWN) else {
            problems.push((usize::MAX, e.to_string().trim_end().to_string()));
            return Err(done(problems));
        };
        let line = text[..span.start].matches('\n').count() + 1;
        let message = e.message().trim_end();
        let Some(key) = unknown_field(message) else {
            problems.push((line, format!("line {line}: {message}")));
            if message.starts_with("missing field") || !comment_out(&mut text, span.start) {
                return Err(done(problems));
            }
            continue;
        };
        let known = expected_fields(message);
        let hint = match nearest(&key, &known) {
            Some(k) => format!("; did you mean `{k}`?"),
            None if known.is_empty() => String::new(),
            None => format!(" (known here: {})", known.join(", ")),
        };
        problems.push((line, format!("line {line}: unknown key `{key}`{hint}")));
        if !comment_out(&mut text, span.start) {
            return Err(done(problems));
        }
    }
}

/// Turns the line holding byte `at` into a comment (line numbers stay), so that the rest can
/// be read again; false when there is nothing to take out.
fn comment_out(text: &mut String, at: usize) -> bool {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    if start >= end || text[start..end].trim_start().starts_with('#') {
        return false;
    }
    text.replace_range(start..end, "#");
    true
}

/// The key of serde's "unknown field `KEY`, expected ..." message.
fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split_once('`').map(|(k, _)| k.to_string())
}

/// The keys that message says are expected.
fn expected_fields(message: &str) -> Vec<String> {
    let Some((_, expected)) = message.split_once("expected") else {
        return Vec::new();
    };
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The known key nearest to `key`, when near enough to be a typo.
fn nearest(key: &str, known: &[String]) -> Option<String> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.clone())
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        max_connections: Option<u64>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        watch: Option<Vec<String>>,
        heartbeat: Option<String>,
        limits: Option<Inner>,
    }

    #[test]
    fn every_unknown_key_is_reported_at_once_with_its_line_and_a_suggestion() {
        let text = "wach = [\"/srv\"]\nheartbeat = \"30s\"\nhartbeat = \"1s\"\n\n[limits]\nmax_conections = 5\nzzz = 1\n";
        let problems = parse_toml::<Outer>(text).unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert_eq!(
            problems[0],
            "line 1: unknown key `wach`; did you mean `watch`?"
        );
        assert_eq!(
            problems[1],
            "line 3: unknown key `hartbeat`; did you mean `heartbeat`?"
        );
        assert_eq!(
            problems[2],
            "line 6: unknown key `max_conections`; did you mean `max_connections`?"
        );
        assert!(
            problems[3].starts_with("line 7: unknown key `zzz` (known here: max_connections"),
            "{problems:?}"
        );
    }

    #[test]
    fn wrong_types_are_reported_beside_unknown_keys_and_a_good_file_parses() {
        let problems = parse_toml::<Outer>("wach = []\nheartbeat = 5\n").unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("line 1: unknown key `wach`"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("line 2: invalid type: integer `5`"),
            "{problems:?}"
        );
        let syntax = parse_toml::<Outer>("wach = []\nheartbeat = \n").unwrap_err();
        assert!(syntax.iter().any(|p| p.contains("line 2")), "{syntax:?}");
        let ok: Outer = parse_toml("watch = [\"/srv\"]\n[limits]\nmax_connections = 3\n").unwrap();
        assert_eq!(ok.limits.and_then(|l| l.max_connections), Some(3));
    }
}
