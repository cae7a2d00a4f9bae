//! Many path regexes matched in one pass, small and fast: a literal every match must contain
//! is taken from each pattern, all of them go into one Aho-Corasick automaton, and a pattern
//! is run only on a path holding one of its literals. Each pattern is compiled the first time
//! a path gives it a chance, so the memory follows what the host's paths look like, not the
//! length of the list. Patterns without a usable literal (`.*\.exe` has `.exe`; `[a-z]+` has
//! none) share one regex set.
//!
//! Loki's lists are mostly literal paths with a few classes: on signature-base's 3,828
//! file-name patterns, all but about a hundred have a literal of three bytes or more, and the
//! whole matcher builds in about 4 MiB where one regex set of the same patterns takes 23 MiB
//! and grows a lazy DFA of up to its cap in every thread that uses it. At worst, with paths
//! holding every literal, every pattern ends up compiled: what compiling each alone costs.

use std::sync::OnceLock;

use aho_corasick::AhoCorasick;
use regex_syntax::hir::literal::{ExtractKind, Extractor};

/// Literals shorter than this would let through too many paths to be worth a prefilter.
const MIN_LITERAL: usize = 3;
/// More literals than this for one pattern (case-insensitive words, large alternations): it
/// goes to the shared set instead.
const MAX_LITERALS: usize = 64;
/// The compile size limit of each pattern, and of the shared set.
const SIZE_LIMIT: usize = 256 << 20;
/// Each thread's lazy DFA for the shared set is cleared past this.
const SET_DFA_BYTES: usize = 8 << 20;

/// A pattern with its literal: compiled on its first candidate path.
struct Member {
    pattern: String,
    /// The caller's index for this pattern.
    index: usize,
    re: OnceLock<Option<regex::Regex>>,
}

impl Member {
    fn is_match(&self, haystack: &str) -> bool {
        let re = self.re.get_or_init(|| {
            match regex::RegexBuilder::new(&self.pattern)
                .size_limit(SIZE_LIMIT)
                .build()
            {
                Ok(re) => Some(re),
                Err(e) => {
                    tracing::warn!(pattern = %self.pattern, error = %e, "path pattern does not compile; it never matches");
                    None
                }
            }
        });
        re.as_ref().is_some_and(|re| re.is_match(haystack))
    }
}

/// Standard-syntax path patterns matched together (see the module documentation).
pub struct PathSet {
    literals: Option<AhoCorasick>,
    /// The member of each literal of `literals`.
    owner: Vec<u32>,
    members: Vec<Member>,
    /// Patterns without a usable literal, and the caller's index of each.
    rest: Option<(regex::RegexSet, Vec<usize>)>,
}

/// What every match of `pattern` must contain: the literals one of which starts (or ends)
/// every match, or None when there is no such short list of long enough literals.
fn required_literals(pattern: &str) -> Option<Vec<Vec<u8>>> {
    let hir = regex_syntax::Parser::new().parse(pattern).ok()?;
    let mut best: Option<Vec<Vec<u8>>> = None;
    for suffix in [false, true] {
        let kind = if suffix {
            ExtractKind::Suffix
        } else {
            ExtractKind::Prefix
        };
        let mut seq = Extractor::new().kind(kind).extract(&hir);
        if suffix {
            seq.optimize_for_suffix_by_preference();
        } else {
            seq.optimize_for_prefix_by_preference();
        }
        let Some(lits) = seq.literals() else {
            continue;
        };
        if lits.is_empty()
            || lits.len() > MAX_LITERALS
            || lits.iter().any(|l| l.as_bytes().len() < MIN_LITERAL)
        {
            continue;
        }
        let shortest = |v: &[Vec<u8>]| v.iter().map(Vec::len).min().unwrap_or(0);
        let found: Vec<Vec<u8>> = lits.iter().map(|l| l.as_bytes().to_vec()).collect();
        if best.as_ref().is_none_or(|b| shortest(&found) > shortest(b)) {
            best = Some(found);
        }
    }
    best
}

/// Why a [`PathSet`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PathSetError {
    #[error("more patterns than one set can number")]
    TooMany,
    #[error("the literals of the patterns: {0}")]
    Literals(#[from] aho_corasick::BuildError),
    #[error("the patterns without literals, as one set: {0}")]
    Set(#[from] regex::Error),
}

impl PathSet {
    /// Builds the matcher for `(index, pattern)` pairs; every pattern must parse as a standard
    /// regex. Fails when the patterns without literals cannot be built as one set.
    pub fn build<'a>(
        patterns: impl IntoIterator<Item = (usize, &'a str)>,
    ) -> Result<PathSet, PathSetError> {
        let mut literals = Vec::new();
        let mut owner = Vec::new();
        let mut members = Vec::new();
        let mut rest = Vec::new();
        let mut rest_index = Vec::new();
        for (index, pattern) in patterns {
            match required_literals(pattern) {
                Some(lits) => {
                    let member = u32::try_from(members.len()).map_err(|_| PathSetError::TooMany)?;
                    for l in lits {
                        literals.push(l);
                        owner.push(member);
                    }
                    members.push(Member {
                        pattern: pattern.to_string(),
                        index,
                        re: OnceLock::new(),
                    });
                }
                None => {
                    rest.push(pattern);
                    rest_index.push(index);
                }
            }
        }
        let literals = if literals.is_empty() {
            None
        } else {
            Some(AhoCorasick::new(&literals)?)
        };
        let rest = if rest.is_empty() {
            None
        } else {
            let set = regex::RegexSetBuilder::new(&rest)
                .size_limit(SIZE_LIMIT)
                .dfa_size_limit(SET_DFA_BYTES)
                .build()?;
            Some((set, rest_index))
        };
        Ok(PathSet {
            literals,
            owner,
            members,
            rest,
        })
    }

    /// Appends the caller's index of every pattern matching `haystack` (unordered; each once).
    pub fn matches(&self, haystack: &str, out: &mut Vec<usize>) {
        if let Some(ac) = &self.literals {
            let mut tried: Vec<u32> = Vec::new();
            for m in ac.find_overlapping_iter(haystack) {
                let Some(&member) = self.owner.get(m.pattern().as_usize()) else {
                    continue;
                };
                if tried.contains(&member) {
                    continue;
                }
                tried.push(member);
                if let Some(mb) = self.members.get(member as usize)
                    && mb.is_match(haystack)
                {
                    out.push(mb.index);
                }
            }
        }
        if let Some((set, index)) = &self.rest {
            out.extend(
                set.matches(haystack)
                    .into_iter()
                    .filter_map(|i| index.get(i)),
            );
        }
    }

    /// Patterns compiled so far (those some path gave a chance), of those with a literal.
    #[cfg(test)]
    fn compiled(&self) -> (usize, usize) {
        let done = self.members.iter().filter(|m| m.re.get().is_some()).count();
        (done, self.members.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pattern is matched as if alone, on paths built to hit, nearly hit and miss.
    #[test]
    fn matches_what_each_regex_matches_alone() {
        let patterns = [
            r"\\Windows\\System32\\evil\.exe",
            r"(Mailing|Shipment).*Label\.exe",
            r".*\.hta$",
            r"^/tmp/[a-z]{6}$",
            r"[a-z]+",
            r"(?i)\\temp\\svchost\.exe",
            r"\\Users\\[^\\]+\\AppData\\Roaming\\x\.dll",
            r"é\w+\.bin",
            r"a|bc",
            r"",
            r"\\never\\seen\.sys",
        ];
        let set = PathSet::build(patterns.iter().copied().enumerate()).unwrap();
        let singles: Vec<regex::Regex> = patterns
            .iter()
            .map(|p| regex::Regex::new(p).unwrap())
            .collect();
        let paths = [
            r"C:\Windows\System32\evil.exe",
            r"C:\Windows\System32\evil_exe",
            r"MailingXXLabel.exe",
            r"Shipment Label.exe",
            r"Label.exe",
            "/home/u/x.hta",
            "/home/u/x.hta.txt",
            "/tmp/abcdef",
            "/tmp/abcdefg",
            "/TMP/ABCDEF",
            r"D:\TEMP\SVCHOST.EXE",
            r"D:\temp\svchost.exe",
            r"C:\Users\bob\AppData\Roaming\x.dll",
            r"C:\Users\\AppData\Roaming\x.dll",
            "/srv/éabc.bin",
            "/srv/é.bin",
            "/srv/éü.bin",
            "",
            "12345",
        ];
        for path in paths {
            let mut got = Vec::new();
            set.matches(path, &mut got);
            got.sort_unstable();
            got.dedup();
            let want: Vec<usize> = (0..patterns.len())
                .filter(|&i| singles[i].is_match(path))
                .collect();
            assert_eq!(got, want, "path {path:?}");
        }
        let (compiled, with_literal) = set.compiled();
        assert!(
            with_literal >= 6,
            "most patterns have a literal: {with_literal}"
        );
        assert!(compiled < with_literal, "only candidates are compiled");
    }

    /// signature-base's file-name list against one regex set of the same patterns, on paths
    /// holding each pattern's literals and on this machine's own paths.
    #[test]
    fn signature_base_file_names_match_as_one_regex_set_does() {
        let list = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/data/signature-base/iocs/filename-iocs.txt");
        let Ok(text) = std::fs::read_to_string(&list) else {
            eprintln!("skipped: {} is absent", list.display());
            return;
        };
        let patterns: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| l.split(';').next().unwrap_or(l))
            .filter(|p| regex::Regex::new(p).is_ok())
            .collect();
        assert!(patterns.len() > 3000, "{} patterns", patterns.len());
        let set = PathSet::build(patterns.iter().copied().enumerate()).unwrap();
        let whole = regex::RegexSetBuilder::new(&patterns)
            .size_limit(SIZE_LIMIT)
            .dfa_size_limit(1 << 30)
            .build()
            .unwrap();
        let mut paths: Vec<String> = Vec::new();
        for p in &patterns {
            for lit in required_literals(p).unwrap_or_default() {
                let lit = String::from_utf8_lossy(&lit).into_owned();
                paths.push(format!(r"C:\Users\x\{lit}"));
                paths.push(format!("/home/x/{lit}.txt"));
            }
        }
        let mut dirs = vec![std::path::PathBuf::from("/usr/lib")];
        while let Some(d) = dirs.pop()
            && paths.len() < 12_000
        {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
                let native = e.path().to_string_lossy().into_owned();
                paths.push(native.replace('/', "\\"));
                paths.push(native);
            }
        }
        let mut hits = 0;
        for path in &paths {
            let mut got = Vec::new();
            set.matches(path, &mut got);
            got.sort_unstable();
            got.dedup();
            let want: Vec<usize> = whole.matches(path).into_iter().collect();
            assert_eq!(got, want, "path {path:?}");
            hits += usize::from(!want.is_empty());
        }
        assert!(hits > 1000, "the synthesized paths hit: {hits}");
    }

    #[test]
    fn literals_are_required_substrings() {
        assert_eq!(
            required_literals(r"(Mailing|Shipment).*Label\.exe"),
            Some(vec![b"Label.exe".to_vec()])
        );
        assert_eq!(required_literals(r"[a-z]+"), None);
        assert_eq!(required_literals(r"a|bc"), None, "too short to filter");
    }
}
