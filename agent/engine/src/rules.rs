//! Building a [`RuleSet`] from YARA files and directories.
//!
//! Every YARA file compiles in its own namespace (named after the file), so two files may use the
//! same rule name. A rule that does not parse or compile is reported with its path, line and
//! reason and left out; the rest of its file and the other files still load. Callers that must
//! refuse any problem (publishing) check [`LoadReport::problems`].

use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::EngineError;
use crate::classes::ClassRules;
use crate::ioc::{IocCounts, IocKind, Iocs};
use crate::isolated::{IsolatedCompiler, IsolatedError};

/// External variables that legacy (Loki/THOR) rules use; set per scanned file.
pub(crate) const EXTERNALS: [&str; 5] = ["filename", "filepath", "extension", "filetype", "owner"];

/// Where a rule file came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Origin {
    /// A file on this host (`--rules`).
    #[default]
    Local,
    /// A file inside a signed rule bundle.
    Bundle,
}

/// What kind of file a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// A YARA rule that does not parse or compile (it is left out, not the rest of its file).
    Yara,
    /// An indicator line that does not parse (that line is left out).
    Indicator,
    /// An indicator past what a rule set may spend (its regular expressions past
    /// [`crate::intel::REGEX_BUDGET`]): left out on agents, refused at publish.
    Budget,
    /// The bundle's exceptions file does not parse: refused at publish.
    Exceptions,
    /// The bundle's settings of built-in findings do not parse: refused at publish.
    Findings,
}

/// A problem found while loading rules: `file:line: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub reason: String,
    pub kind: ProblemKind,
    pub origin: Origin,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.path.display(), self.reason),
            None => write!(f, "{}: {}", self.path.display(), self.reason),
        }
    }
}

/// The calling thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu() -> std::time::Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    std::time::Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// What loading found: counts and problems.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub yara_files: usize,
    pub yara_files_with_errors: usize,
    pub yara_rules: usize,
    pub ioc_files: usize,
    pub iocs: IocCounts,
    pub problems: Vec<Problem>,
    /// yara-x's slow-pattern warnings (rules loaded, but each such pattern may slow every
    /// scan). Only a compile in this process gives them: `vedettectl rules publish` does one.
    pub slow_patterns: Vec<Problem>,
    /// CPU time of the thread that compiled (or loaded) the YARA rules, a compiler child's
    /// aside: what a CPU budget charges for it.
    pub yara_cpu: std::time::Duration,
}

/// What kind of indicator matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MatchKind {
    Yara,
    Hash,
    Filename,
    Process,
    Connection,
}

/// Which indicator matched and where it came from, as detections carry it back.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IndicatorRef {
    /// `yara`, `loki`, `stix` or `misp` (`vedette` for built-in findings).
    pub source: String,
    /// The rule name, the `file:line` of a Loki indicator, the STIX indicator id, or the MISP
    /// attribute UUID.
    pub id: String,
    /// The MISP event UUID.
    pub event: String,
    /// `bundle` or `local` for rules; the collection, feed or file for imported intelligence.
    pub origin: String,
    /// MITRE ATT&CK technique ids (`T1505.003`).
    pub techniques: Vec<String>,
}

impl IndicatorRef {
    pub fn new(source: &str, id: &str, origin: Origin) -> IndicatorRef {
        IndicatorRef {
            source: source.into(),
            id: id.into(),
            origin: origin.name().into(),
            ..Default::default()
        }
    }
}

impl Origin {
    pub fn name(self) -> &'static str {
        match self {
            Origin::Local => "local",
            Origin::Bundle => "bundle",
        }
    }
}

/// One rule or indicator that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleMatch {
    pub kind: MatchKind,
    /// Rule name or indicator text.
    pub rule: String,
    /// Where it came from: the rule file, the IOC file and line.
    pub source: String,
    pub score: u32,
    pub description: String,
    pub author: String,
    pub reference: String,
    /// Provenance of what matched.
    pub indicator: std::sync::Arc<IndicatorRef>,
}

/// What a YARA namespace came from: the rule file's origin, or an imported indicator.
#[derive(Debug, Clone)]
pub(crate) enum NamespaceOrigin {
    File(Origin),
    Intel(std::sync::Arc<IndicatorRef>),
}

/// An immutable, compiled set of rules. Share it with `Arc`; replace it whole.
pub struct RuleSet {
    pub(crate) yara: Option<ClassRules>,
    pub(crate) iocs: Iocs,
    /// Where each YARA namespace came from.
    pub(crate) namespaces: std::collections::HashMap<String, NamespaceOrigin>,
    /// SHA-256 over every source loaded (names and bytes): two sets with the same fingerprint
    /// match the same way, so cached results stay valid.
    fingerprint: [u8; 32],
    /// The same over everything but hash indicators (see [`RuleSet::beyond_hashes`]).
    beyond_hashes: [u8; 32],
    /// Fleet bundle version these rules came from, 0 for host-local rules only.
    pub bundle_version: u64,
    report: LoadReport,
    /// What operators excepted (from the bundle): matches that are not reported and never
    /// block. Not part of the fingerprint: they change what is reported, not what matches.
    exceptions: crate::exceptions::Exceptions,
    /// How the built-in findings are reported (from the bundle).
    findings: crate::findings::Findings,
}

impl RuleSet {
    /// A rule set that matches nothing.
    pub fn empty() -> RuleSet {
        RuleSet {
            yara: None,
            iocs: Iocs::default(),
            namespaces: Default::default(),
            fingerprint: [0; 32],
            beyond_hashes: [0; 32],
            bundle_version: 0,
            report: LoadReport::default(),
            exceptions: Default::default(),
            findings: Default::default(),
        }
    }

    /// The same rules with `exceptions`.
    pub fn with_exceptions(mut self, exceptions: crate::exceptions::Exceptions) -> RuleSet {
        self.exceptions = exceptions;
        self
    }

    pub fn exceptions(&self) -> &crate::exceptions::Exceptions {
        &self.exceptions
    }

    /// The same rules with these settings of the built-in findings.
    pub fn with_findings(mut self, findings: crate::findings::Findings) -> RuleSet {
        self.findings = findings;
        self
    }

    pub fn findings(&self) -> &crate::findings::Findings {
        &self.findings
    }

    pub fn iocs(&self) -> &Iocs {
        &self.iocs
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// The fingerprint of every source but hash indicators (Loki hash lists, and STIX patterns
    /// that compare nothing but file hashes for equality): two sets with the same one judge a
    /// file the same way unless its digests are listed in one and not the other. What such a
    /// change finds can be answered from the digests of files already seen.
    pub fn beyond_hashes(&self) -> [u8; 32] {
        self.beyond_hashes
    }

    /// What the indicators on files (hash lists, imported file indicators) find in a file known
    /// only by its path and digests (hex, lower case): a file seen before, not read again.
    pub fn match_known_file(
        &self,
        path: &str,
        md5: Option<&str>,
        sha1: Option<&str>,
        sha256: Option<&str>,
    ) -> Vec<RuleMatch> {
        let mut out = Vec::new();
        self.iocs.match_hashes(md5, sha1, sha256, &mut out);
        self.iocs
            .match_intel_file(path, md5, sha1, sha256, &mut out);
        out
    }

    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    /// The compiled YARA rules, one set per file class with rules of its own.
    pub fn yara_sets(&self) -> Option<&ClassRules> {
        self.yara.as_ref()
    }

    /// Number of YARA rules compiled.
    pub fn yara_rules(&self) -> usize {
        self.report.yara_rules
    }

    /// A YARA rule that matched, with its score, metadata and provenance.
    pub(crate) fn yara_match(&self, rule: &yara_x::Rule<'_, '_>) -> RuleMatch {
        let mut m = rule_match(rule);
        match self.namespaces.get(rule.namespace()) {
            Some(NamespaceOrigin::Intel(r)) => m.indicator = r.clone(),
            Some(NamespaceOrigin::File(o)) => {
                std::sync::Arc::make_mut(&mut m.indicator).origin = o.name().into()
            }
            None => {}
        }
        m
    }
}

/// Work to run while the YARA rules compile or load (see
/// [`RuleSetBuilder::build_meanwhile`]): given the parsed indicator lists and a check that
/// returns true once the YARA rules are ready.
pub type Meanwhile<'m> = &'m mut dyn FnMut(&Iocs, &dyn Fn() -> bool);

/// Collects rule sources, then compiles them.
pub struct RuleSetBuilder {
    /// YARA sources, compiled together by `build` (or not at all on a compiled-cache hit).
    yara_sources: Vec<(PathBuf, Vec<u8>)>,
    /// Indicator lists, parsed by `build` while the YARA rules compile.
    ioc_sources: Vec<(IocKind, PathBuf, Vec<u8>)>,
    /// Names of the sources that came from a bundle.
    from_bundle: std::collections::HashSet<PathBuf>,
    /// YARA sources that are imported indicators (`pattern_type: yara`), by their origin name.
    yara_intel: std::collections::HashMap<PathBuf, std::sync::Arc<IndicatorRef>>,
    digest: Sha256,
    /// [`RuleSet::beyond_hashes`] of what was added so far.
    beyond_hashes: Sha256,
    report: LoadReport,
    /// Rules freshly compiled are loaded back from their serialized form (see [`Self::compact`]).
    compact: bool,
    /// One compiled set for every file class instead of one per class (see [`Self::whole`]).
    whole: bool,
    /// Where the YARA rules are compiled, if not in this process (see [`Self::compile_with`]).
    isolated: Option<std::sync::Arc<dyn IsolatedCompiler>>,
}

impl Default for RuleSetBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl RuleSetBuilder {
    pub fn new() -> RuleSetBuilder {
        let mut digest = Sha256::new();
        digest.update(concat!("vedette-engine ", env!("CARGO_PKG_VERSION")).as_bytes());
        // How sources are compiled is part of what they mean: rules compiled before `include`
        // was refused must not be reused from a cache.
        digest.update(b"\0compile: no includes, relaxed regex syntax");
        let beyond_hashes = digest.clone();
        RuleSetBuilder {
            yara_sources: Vec::new(),
            ioc_sources: Vec::new(),
            from_bundle: std::collections::HashSet::new(),
            yara_intel: Default::default(),
            digest,
            beyond_hashes,
            report: LoadReport::default(),
            compact: false,
            whole: false,
            isolated: None,
        }
    }

    /// Adds a YARA file, an indicator list, or a directory: every `.yar`/`.yara` file and every
    /// indicator list (`.txt`/`.ioc` named for its kind, see [`IocKind`]) under it, recursively,
    /// in name order. Fails only when a path cannot be read or names neither kind of file.
    pub fn add_path(&mut self, path: &Path) -> Result<&mut Self, EngineError> {
        let meta = std::fs::metadata(path).map_err(|source| EngineError::Read {
            path: path.to_owned(),
            source,
        })?;
        if meta.is_dir() {
            for file in rule_files_under(path)? {
                self.add_file(&file)?;
            }
            return Ok(self);
        }
        if !is_yara_file(path) && IocKind::of_path(path).is_none() {
            return Err(EngineError::Read {
                path: path.to_owned(),
                source: std::io::Error::other(
                    "neither a YARA file (.yar, .yara), an intel file (.jsonl) nor an indicator \
                     list (a name containing hash, filename, c2, process or cmdline)",
                ),
            });
        }
        self.add_file(path)
    }

    fn add_file(&mut self, path: &Path) -> Result<&mut Self, EngineError> {
        if is_yara_file(path) {
            return self.add_yara_file(path);
        }
        let bytes = std::fs::read(path).map_err(|source| EngineError::Read {
            path: path.to_owned(),
            source,
        })?;
        if let Some(kind) = IocKind::of_path(path) {
            self.add_ioc_source(kind, path, &bytes);
        }
        Ok(self)
    }

    /// Adds an indicator list of the given kind.
    pub fn add_ioc_source(&mut self, kind: IocKind, origin: &Path, bytes: &[u8]) -> &mut Self {
        self.note_source(origin, bytes);
        self.note_beyond_hashes(Some(kind), origin, bytes);
        self.report.ioc_files += 1;
        if kind == IocKind::Intel {
            self.add_intel_yara(origin, bytes);
        }
        self.ioc_sources
            .push((kind, origin.to_owned(), bytes.to_vec()));
        self
    }

    /// The YARA indicators of an intel file join the YARA sources, one namespace each; the
    /// STIX ones are parsed with the other indicators (problems are reported there).
    fn add_intel_yara(&mut self, origin: &Path, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        for (i, line) in text.lines().enumerate() {
            let Ok(l) = crate::intel::IntelLine::parse(line.trim()) else {
                continue;
            };
            if l.pattern_type != "yara" {
                continue;
            }
            let name = PathBuf::from(format!("{}:{}", origin.display(), i + 1));
            self.report.yara_files += 1;
            self.yara_sources
                .push((name.clone(), l.pattern.clone().into_bytes()));
            self.yara_intel
                .insert(name, std::sync::Arc::new(l.reference()));
        }
    }

    /// Feeds [`RuleSet::beyond_hashes`]: YARA sources and indicator lists whole, but for hash
    /// lists (left out) and intel files (their lines that are not hash-only).
    fn note_beyond_hashes(&mut self, kind: Option<IocKind>, origin: &Path, bytes: &[u8]) {
        let name = origin.to_string_lossy();
        let mut feed = |b: &[u8]| {
            self.beyond_hashes.update((b.len() as u64).to_le_bytes());
            self.beyond_hashes.update(b);
        };
        match kind {
            Some(IocKind::Hash) => {}
            Some(IocKind::Intel) => {
                feed(name.as_bytes());
                for line in String::from_utf8_lossy(bytes).lines() {
                    if !crate::intel::hash_only(line.trim()) {
                        feed(line.as_bytes());
                    }
                }
            }
            _ => {
                feed(name.as_bytes());
                feed(bytes);
            }
        }
    }

    fn note_source(&mut self, origin: &Path, bytes: &[u8]) {
        let name = origin.to_string_lossy();
        self.digest.update((name.len() as u64).to_le_bytes());
        self.digest.update(name.as_bytes());
        self.digest.update((bytes.len() as u64).to_le_bytes());
        self.digest.update(bytes);
    }

    /// Adds one YARA file.
    pub fn add_yara_file(&mut self, path: &Path) -> Result<&mut Self, EngineError> {
        let bytes = std::fs::read(path).map_err(|source| EngineError::Read {
            path: path.to_owned(),
            source,
        })?;
        self.add_yara_source(path, &bytes);
        Ok(self)
    }

    /// Adds YARA source text that came from `origin` (a file name, or a name inside a bundle).
    pub fn add_yara_source(&mut self, origin: &Path, bytes: &[u8]) -> &mut Self {
        self.note_source(origin, bytes);
        self.note_beyond_hashes(None, origin, bytes);
        self.report.yara_files += 1;
        self.yara_sources.push((origin.to_owned(), bytes.to_vec()));
        self
    }

    /// Adds a source by its name: a YARA file or an indicator list (other names are ignored),
    /// remembering where it came from for the problems it may cause.
    pub fn add_source(&mut self, origin: Origin, name: &Path, bytes: &[u8]) -> &mut Self {
        if is_yara_file(name) {
            self.add_yara_source(name, bytes);
        } else if let Some(kind) = IocKind::of_path(name) {
            self.add_ioc_source(kind, name, bytes);
        } else {
            return self;
        }
        if origin == Origin::Bundle {
            self.from_bundle.insert(name.to_owned());
        }
        self
    }

    /// The fingerprint the rule set built from what was added so far will have
    /// ([`RuleSet::fingerprint`]), known without compiling anything.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.digest.clone().finalize().into()
    }

    /// Compiles what was added. Rules with problems are left out; see the report.
    /// For rules kept for long (the daemon's): YARA rules freshly compiled are serialized and
    /// loaded back, which holds them in much less memory than the compiler left them in, for
    /// the time of a load (about a second for signature-base). Rules from the compiled-rules
    /// cache are compact already.
    pub fn compact(mut self) -> RuleSetBuilder {
        self.compact = true;
        self
    }

    /// Measures which YARA rules cost the most on `corpus` (each file's bytes): the `top`
    /// costliest, costliest first (see [`crate::profile`]).
    pub fn profile(&self, corpus: &[Vec<u8>], top: usize) -> crate::profile::Profile {
        let names = assign_namespaces(&self.yara_sources);
        crate::profile::profile(&self.yara_sources, &names, corpus, top)
    }

    /// [`Self::profile`] in the process `compiler` runs (see [`crate::isolated`]): this
    /// process neither compiles the rules nor scans with them.
    pub fn profile_with(
        &self,
        compiler: &dyn IsolatedCompiler,
        corpus: &[Vec<u8>],
        top: usize,
    ) -> Result<crate::profile::Profile, IsolatedError> {
        let names = assign_namespaces(&self.yara_sources);
        let request = crate::isolated::profile_request(&self.yara_sources, &names, corpus, top);
        crate::isolated::profile_response(&compiler.compile(&request)?)
    }

    /// Compiles every YARA rule into one set that judges files of every class, instead of one
    /// set per file class with rules of its own (see [`crate::classes`]): what the class sets
    /// are compared with, and all that checking rules for problems needs (the problems are the
    /// same). Never kept in or taken from a compiled-rules cache.
    pub fn whole(mut self) -> RuleSetBuilder {
        self.whole = true;
        self
    }

    /// Compiles the YARA rules in another process, through `compiler` (see
    /// [`crate::isolated`]), and loads what it returns: this process never holds the compiler,
    /// and a compiler that crashes or hangs leaves the YARA rules out of the set (reported as a
    /// problem, of the bundle's origin when the set holds a bundle, so that the bundle is
    /// refused) instead of taking this process down. Compact as with [`Self::compact`]. When the process cannot be
    /// started at all, the rules are compiled here.
    pub fn compile_with(
        mut self,
        compiler: std::sync::Arc<dyn IsolatedCompiler>,
    ) -> RuleSetBuilder {
        self.isolated = Some(compiler);
        self
    }

    pub fn build(self, bundle_version: u64) -> RuleSet {
        self.build_inner(bundle_version, None, None)
    }

    /// Like [`build`](Self::build) (with the compiled-rules `cache` of
    /// [`build_cached`](Self::build_cached) if given), and while the YARA rules compile or load
    /// on their thread, runs `meanwhile` on this one once the indicator lists are parsed. It is
    /// given those lists and a check that says when the YARA rules are ready, and should return
    /// soon after: work done there is work the other core would otherwise not do.
    pub fn build_meanwhile(
        self,
        bundle_version: u64,
        cache: Option<&Path>,
        meanwhile: Meanwhile<'_>,
    ) -> RuleSet {
        self.build_inner(bundle_version, cache, Some(meanwhile))
    }

    /// Like [`build`](Self::build), reusing the YARA rules compiled for the same sources by an
    /// earlier run, kept in `cache` (see [`crate::compiled`]). A missing, stale, damaged or
    /// untrusted cache is rebuilt; failing to save it is not an error.
    pub fn build_cached(self, bundle_version: u64, cache: &Path) -> RuleSet {
        self.build_inner(bundle_version, Some(cache), None)
    }

    /// Where each YARA namespace came from.
    fn namespace_origins(
        &self,
        names: &[Option<String>],
    ) -> std::collections::HashMap<String, NamespaceOrigin> {
        let mut namespaces = std::collections::HashMap::new();
        for ((origin, _), ns) in self.yara_sources.iter().zip(names) {
            let Some(ns) = ns else { continue };
            let from = match self.yara_intel.get(origin) {
                Some(r) => NamespaceOrigin::Intel(r.clone()),
                None if self.from_bundle.contains(origin) => NamespaceOrigin::File(Origin::Bundle),
                None => NamespaceOrigin::File(Origin::Local),
            };
            namespaces.insert(ns.clone(), from);
        }
        namespaces
    }

    /// YARA rules compile (or load) on one thread while the indicator lists parse on this one.
    fn build_inner(
        self,
        bundle_version: u64,
        cache: Option<&Path>,
        meanwhile: Option<Meanwhile<'_>>,
    ) -> RuleSet {
        let names = assign_namespaces(&self.yara_sources);
        let namespaces = self.namespace_origins(&names);
        let fingerprint: [u8; 32] = self.digest.finalize().into();
        let cache = cache.filter(|_| !self.whole);
        let mut report = self.report;
        let from_bundle = &self.from_bundle;
        // A set that holds a bundle (or is built for one) is that bundle's: if its YARA rules
        // cannot be compiled, the bundle is what fails, not only the files it brought.
        let for_bundle = bundle_version > 0 || !from_bundle.is_empty();
        let isolated = self.isolated;
        let (yara, (iocs, ioc_problems)) = std::thread::scope(|s| {
            let sources = self.yara_sources;
            let how = Compile {
                compact: self.compact,
                by_class: !self.whole,
                isolated: isolated.as_deref(),
            };
            let yara = s.spawn(move || {
                let cpu = thread_cpu();
                let part = yara_part(sources, names, cache, &fingerprint, how);
                (part, thread_cpu().saturating_sub(cpu))
            });
            let iocs = parse_iocs(self.ioc_sources, from_bundle);
            if let Some(meanwhile) = meanwhile {
                meanwhile(&iocs.0, &|| yara.is_finished());
            }
            match yara.join() {
                Ok(y) => (y, iocs),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        });
        let (yara, yara_cpu) = yara;
        report.yara_cpu = yara_cpu;
        report.problems.extend(ioc_problems);
        report.problems.extend(yara.problems);
        for p in &mut report.problems {
            if self.from_bundle.contains(&p.path) {
                p.origin = Origin::Bundle;
            }
        }
        if let Some(mut failure) = yara.failure {
            if for_bundle {
                failure.origin = Origin::Bundle;
            }
            report.problems.push(failure);
        }
        report.yara_files_with_errors = yara.files_with_errors;
        report.slow_patterns = yara.slow_patterns;
        for p in &mut report.slow_patterns {
            if self.from_bundle.contains(&p.path) {
                p.origin = Origin::Bundle;
            }
        }
        report.yara_rules = yara.rules.as_ref().map_or(0, ClassRules::count);
        report.iocs = iocs.counts.clone();
        RuleSet {
            yara: yara.rules.filter(|_| report.yara_rules > 0),
            iocs,
            namespaces,
            fingerprint,
            beyond_hashes: self.beyond_hashes.finalize().into(),
            bundle_version,
            report,
            exceptions: Default::default(),
            findings: Default::default(),
        }
    }

    /// Compiles, failing with every problem when any file did not load.
    pub fn build_strict(self, bundle_version: u64) -> Result<RuleSet, EngineError> {
        let set = self.build(bundle_version);
        if !set.report.problems.is_empty() {
            return Err(EngineError::Invalid {
                count: set.report.problems.len(),
                problems: set.report.problems,
            });
        }
        Ok(set)
    }
}

/// Compiled YARA rules with what compiling found.
pub(crate) struct YaraPart {
    /// None only when the compiler process failed.
    pub rules: Option<ClassRules>,
    pub files_with_errors: usize,
    pub problems: Vec<Problem>,
    /// Why no rule was loaded, when the compiler process failed.
    pub failure: Option<Problem>,
    /// Slow-pattern warnings of a compile in this process (none from the cache or a child).
    pub slow_patterns: Vec<Problem>,
}

/// The class sets compiled at once in this process (the compiler process, paced by the agent's
/// CPU budget, compiles one at a time: parallel, it would only hold twice the memory).
const COMPILE_THREADS: usize = 2;

/// How rules missing from the cache are compiled.
struct Compile<'a> {
    compact: bool,
    by_class: bool,
    isolated: Option<&'a dyn IsolatedCompiler>,
}

/// Loads the rules from `cache` when it holds these sources compiled; compiles them otherwise
/// (and saves them there).
fn yara_part(
    sources: Vec<(PathBuf, Vec<u8>)>,
    names: Vec<Option<String>>,
    cache: Option<&Path>,
    fingerprint: &[u8; 32],
    how: Compile<'_>,
) -> YaraPart {
    if let Some(hit) = cache.and_then(|c| crate::compiled::load(c, fingerprint)) {
        return hit;
    }
    if let Some(compiler) = how.isolated {
        let request = crate::isolated::request(&sources, &names, how.by_class);
        let answer = compiler.compile(&request).and_then(|data| {
            let (part, serialized) = crate::isolated::response(&data)?;
            if let Some(c) = cache {
                crate::compiled::save_serialized(c, fingerprint, &part, serialized);
            }
            Ok(part)
        });
        match answer {
            Ok(part) => return part,
            Err(e @ IsolatedError::Failed(_)) => {
                tracing::error!(error = %e, "YARA rules not loaded");
                return crate::isolated::failed(sources.len(), &e);
            }
            Err(e @ IsolatedError::Unavailable(_)) => {
                tracing::warn!(error = %e, "compiling the YARA rules in this process instead");
            }
        }
    }
    let compact = how.compact || how.isolated.is_some();
    let part = compile_yara(&sources, &names, how.by_class, COMPILE_THREADS);
    if let Some(c) = cache {
        crate::compiled::save(c, fingerprint, &part);
    }
    if !compact {
        return part;
    }
    // The compiler leaves its rules spread over memory among what it freed; loaded back from
    // their serialized form they take a fraction of it (signature-base: about 75 MiB less,
    // once the allocator gives the freed memory back). Each class set is loaded when first
    // used (see `ClassRules`); the compiled copy goes first, so that what is loaded fills the
    // holes it leaves.
    let Some(Ok(bytes)) = part.rules.as_ref().map(ClassRules::serialize) else {
        return part;
    };
    let YaraPart {
        rules,
        files_with_errors,
        problems,
        failure,
        slow_patterns,
    } = part;
    drop(rules);
    match ClassRules::deserialize(&bytes) {
        Ok(rules) => YaraPart {
            rules: Some(rules),
            files_with_errors,
            problems,
            failure,
            slow_patterns,
        },
        // Rules serialized a moment ago always load; should they not, compile them again.
        Err(_) => compile_yara(&sources, &names, how.by_class, COMPILE_THREADS),
    }
}

/// The namespace of each YARA source (none for one that is not UTF-8 text), unique, derived
/// from its name.
fn assign_namespaces(sources: &[(PathBuf, Vec<u8>)]) -> Vec<Option<String>> {
    let mut seen = std::collections::HashMap::new();
    sources
        .iter()
        .map(|(origin, bytes)| {
            std::str::from_utf8(bytes)
                .is_ok()
                .then(|| namespace_for(&mut seen, origin))
        })
        .collect()
}

/// Compiles every YARA source: one namespace per file; a rule that does not parse or compile
/// is left out and reported (yara-x keeps the others of the file). One set is compiled per file
/// class that has rules of its own (see [`crate::classes`]); what compiling finds is reported
/// once, whichever sets found it.
pub(crate) fn compile_yara(
    sources: &[(PathBuf, Vec<u8>)],
    names: &[Option<String>],
    by_class: bool,
    threads: usize,
) -> YaraPart {
    let plan = match by_class {
        true => crate::classes::plan(sources),
        false => crate::classes::Plan::whole(sources),
    };
    let (sets, found) = compile_sets(sources, &plan.sets, names, threads);
    YaraPart {
        rules: Some(ClassRules::new(sets, plan.pick)),
        files_with_errors: found.files_with_errors.len(),
        problems: found.problems,
        failure: None,
        slow_patterns: found.slow_patterns,
    }
}

/// Compiles each set, on up to `threads` threads; what they found in set order.
fn compile_sets(
    sources: &[(PathBuf, Vec<u8>)],
    sets: &[Vec<std::borrow::Cow<'_, [u8]>>],
    names: &[Option<String>],
    threads: usize,
) -> (Vec<yara_x::Rules>, Found) {
    let threads = threads.clamp(1, sets.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut done: Vec<(usize, yara_x::Rules, Found)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(texts) = sets.get(i) else { break mine };
                        let mut found = Found::default();
                        let rules = compile_set(sources, texts, names, &mut found);
                        mine.push((i, rules, found));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    done.sort_by_key(|(i, _, _)| *i);
    let mut all = Found::default();
    let mut rules = Vec::with_capacity(done.len());
    for (_, set, found) in done {
        all.files_with_errors.extend(found.files_with_errors);
        for p in found.problems {
            all.problem(p);
        }
        for p in found.slow_patterns {
            all.slow_pattern(p);
        }
        rules.push(set);
    }
    (rules, all)
}

/// What compiling the sets found, each thing once.
#[derive(Default)]
pub(crate) struct Found {
    files_with_errors: std::collections::HashSet<PathBuf>,
    problems: Vec<Problem>,
    slow_patterns: Vec<Problem>,
}

impl Found {
    fn problem(&mut self, p: Problem) {
        self.files_with_errors.insert(p.path.clone());
        if !self.problems.contains(&p) {
            self.problems.push(p);
        }
    }

    fn slow_pattern(&mut self, p: Problem) {
        if !self.slow_patterns.contains(&p) {
            self.slow_patterns.push(p);
        }
    }
}

/// Compiles one set: `texts` are the sources' bytes as this set has them.
pub(crate) fn compile_set(
    sources: &[(PathBuf, Vec<u8>)],
    texts: &[std::borrow::Cow<'_, [u8]>],
    names: &[Option<String>],
    found: &mut Found,
) -> yara_x::Rules {
    let mut compiler = yara_x::Compiler::new();
    // Legacy rules use regex syntax that strict mode refuses (e.g. `{` unescaped).
    compiler.relaxed_re_syntax(true);
    // No `include`: a bundle could otherwise read any file of the collector or an agent
    // (`include "/dev/zero"` exhausts memory, `include "/etc/..."` probes), and what a rule
    // set means would depend on files outside it and outside the compiled-rules fingerprint.
    // Every rule file is self-contained; an `include` line is reported as a problem.
    compiler.enable_includes(false);
    for name in EXTERNALS {
        // Defining a fresh name in a fresh compiler cannot fail.
        let _ = compiler.define_global(name, "");
    }
    let mut by_origin: std::collections::HashMap<String, (&Path, &str)> = Default::default();
    for (((origin, _), bytes), ns) in sources.iter().zip(texts).zip(names) {
        let (Ok(text), Some(ns)) = (std::str::from_utf8(bytes), ns) else {
            found.problem(Problem {
                path: origin.clone(),
                line: None,
                reason: "not UTF-8 text".into(),
                kind: ProblemKind::Yara,
                origin: Origin::Local,
            });
            continue;
        };
        compiler.new_namespace(ns);
        by_origin.insert(origin.display().to_string(), (origin, text));
        let src = yara_x::SourceCode::from(text).with_origin(origin.display().to_string());
        if let Err(e) = compiler.add_source(src) {
            found.problem(problem_of(origin, text, &e));
        }
    }
    for w in compiler
        .warnings()
        .iter()
        .filter(|w| w.code() == "slow_pattern")
    {
        let Some(label) = w.labels().next() else {
            continue;
        };
        let Some((origin, text)) = label.origin().and_then(|o| by_origin.get(o)) else {
            continue;
        };
        found.slow_pattern(Problem {
            path: origin.to_path_buf(),
            line: Some(line_at(text, label.span().0.start as usize)),
            reason: format!("{} ({})", w.title(), label.text()),
            kind: ProblemKind::Yara,
            origin: Origin::Local,
        });
    }
    compiler.build()
}

/// The line of byte `offset` in `text`, from 1.
pub(crate) fn line_at(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Unique namespace per file, derived from its name.
fn namespace_for(seen: &mut std::collections::HashMap<String, usize>, origin: &Path) -> String {
    let stem = origin
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rules".into());
    let stem: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let n = seen.entry(stem.clone()).or_insert(0);
    *n += 1;
    if *n == 1 { stem } else { format!("{stem}_{n}") }
}

/// Parses every indicator list; their problems in load order.
fn parse_iocs(
    sources: Vec<(IocKind, PathBuf, Vec<u8>)>,
    from_bundle: &std::collections::HashSet<PathBuf>,
) -> (Iocs, Vec<Problem>) {
    let mut iocs = Iocs::default();
    let mut problems = Vec::new();
    for (kind, origin, bytes) in sources {
        // Lists in the wild carry stray Latin-1 bytes in comments: decode lossily.
        let text = String::from_utf8_lossy(&bytes);
        let from = if from_bundle.contains(&origin) {
            Origin::Bundle
        } else {
            Origin::Local
        };
        iocs.add_file(kind, &origin, from, &text, &mut problems);
    }
    iocs.finish();
    (iocs, problems)
}

/// Rule files under `dir`, sorted, not following symlinked directories.
pub(crate) fn rule_files_under(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| EngineError::Read {
            path: d.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| EngineError::Read {
                path: d.clone(),
                source,
            })?;
            let path = entry.path();
            let ft = entry.file_type().map_err(|source| EngineError::Read {
                path: path.clone(),
                source,
            })?;
            if ft.is_dir() {
                stack.push(path);
            } else if is_rule_file(&path) && (ft.is_file() || path.is_file()) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// In a directory: YARA files, intel files, and indicator lists named for their kind.
fn is_rule_file(path: &Path) -> bool {
    is_yara_file(path)
        || IocKind::of_path(path) == Some(IocKind::Intel)
        || (matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("txt" | "ioc")
        ) && IocKind::of_path(path).is_some())
}

pub(crate) fn is_yara_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yar" | "yara")
    )
}

/// Turns a yara-x error into `file:line: reason`.
fn problem_of(origin: &Path, text: &str, e: &yara_x::errors::CompileError) -> Problem {
    let line = e
        .labels()
        .next()
        .map(|l| line_at(text, l.span().0.start as usize));
    let detail = e
        .labels()
        .next()
        .map(|l| l.text().to_string())
        .filter(|t| !t.is_empty() && t != e.title());
    let reason = match detail {
        Some(d) => format!("{} ({})", e.title(), d),
        None => e.title().to_string(),
    };
    Problem {
        path: origin.to_owned(),
        line,
        reason,
        kind: ProblemKind::Yara,
        origin: Origin::Local,
    }
}

/// Reads the score of a rule from its metadata (`score`, or `severity` as a number or a word).
pub(crate) fn rule_match(rule: &yara_x::Rule<'_, '_>) -> RuleMatch {
    let mut m = RuleMatch {
        kind: MatchKind::Yara,
        rule: rule.identifier().to_string(),
        source: rule.namespace().to_string(),
        score: 75,
        description: String::new(),
        author: String::new(),
        reference: String::new(),
        indicator: Default::default(),
    };
    let mut indicator = IndicatorRef::new("yara", rule.identifier(), Origin::Local);
    for (key, value) in rule.metadata() {
        let text = match &value {
            yara_x::MetaValue::String(s) => Some(s.to_string()),
            yara_x::MetaValue::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        };
        let number = match value {
            yara_x::MetaValue::Integer(i) => Some(i.clamp(0, 100) as u32),
            yara_x::MetaValue::Float(f) => Some(f.clamp(0.0, 100.0) as u32),
            _ => text.as_deref().and_then(|t| t.trim().parse::<u32>().ok()),
        };
        match key {
            "score" => m.score = number.unwrap_or(m.score).min(100),
            "severity" => {
                m.score = number
                    .unwrap_or_else(|| match text.as_deref().map(str::to_lowercase).as_deref() {
                        Some("critical") => 100,
                        Some("high") => 80,
                        Some("medium") => 60,
                        Some("low") => 40,
                        Some("info" | "informational") => 20,
                        _ => m.score,
                    })
                    .min(100)
            }
            "description" => m.description = text.unwrap_or_default(),
            "author" => m.author = text.unwrap_or_default(),
            "reference" => m.reference = text.unwrap_or_default(),
            "mitre_attack" | "attack_id" | "technique" | "mitre_att" => {
                for t in text.as_deref().unwrap_or("").split([',', ' ', ';']) {
                    if let Some(id) = technique_id(t)
                        && !indicator.techniques.contains(&id)
                    {
                        indicator.techniques.push(id);
                    }
                }
            }
            _ => {}
        }
    }
    m.indicator = std::sync::Arc::new(indicator);
    m
}

/// A MITRE ATT&CK technique id (`T1059`, `T1505.003`) in canonical form, if `text` is one.
pub fn technique_id(text: &str) -> Option<String> {
    let t = text.trim().to_ascii_uppercase();
    let digits = t.strip_prefix('T')?;
    let (main, sub) = digits.split_once('.').unwrap_or((digits, ""));
    let ok = main.len() == 4
        && main.chars().all(|c| c.is_ascii_digit())
        && (sub.is_empty() || (sub.len() == 3 && sub.chars().all(|c| c.is_ascii_digit())));
    ok.then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_that_does_not_compile_or_parse_is_left_out_and_the_rest_of_its_file_loads() {
        let mut b = RuleSetBuilder::new();
        b.add_yara_source(
            Path::new("semantic.yar"),
            b"rule before { condition: true }\nrule bad { condition: nope }\nrule after { condition: true }\n",
        );
        b.add_yara_source(
            Path::new("syntax.yar"),
            b"rule fine { condition: true }\nrule broken { condition: \n",
        );
        let set = b.build(0);
        let mut names: Vec<String> = set
            .yara
            .as_ref()
            .unwrap()
            .set(0)
            .unwrap()
            .iter()
            .map(|r| r.identifier().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["after", "before", "fine"]);
        let p = &set.report().problems;
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].path.ends_with("semantic.yar") && p[0].line == Some(2),
            "{}",
            p[0]
        );
        assert!(p[1].path.ends_with("syntax.yar"), "{}", p[1]);
        assert_eq!(set.report().yara_files_with_errors, 2);
    }

    #[test]
    fn a_change_of_hash_indicators_alone_keeps_the_fingerprint_beyond_hashes() {
        let sha = "a".repeat(64);
        let stix_hash = format!(
            r#"{{"id":"indicator--1","pattern_type":"stix","pattern":"[file:hashes.'SHA-256' = '{sha}']","source":"stix"}}"#
        );
        let stix_name = r#"{"id":"indicator--2","pattern_type":"stix","pattern":"[file:name = 'x.exe']","source":"stix"}"#;
        let set = |hashes: &str, intel: &str, yara: &str| {
            let mut b = RuleSetBuilder::new();
            b.add_yara_source(Path::new("r.yar"), yara.as_bytes());
            b.add_ioc_source(IocKind::Hash, Path::new("hash-iocs.txt"), hashes.as_bytes());
            b.add_ioc_source(IocKind::Intel, Path::new("intel.jsonl"), intel.as_bytes());
            b.build(0)
        };
        let yara = "rule a { condition: false }";
        let base = set("", stix_name, yara);
        let more_hashes = set(
            &format!("{sha};x\n"),
            &format!("{stix_name}\n{stix_hash}"),
            yara,
        );
        assert_ne!(base.fingerprint(), more_hashes.fingerprint());
        assert_eq!(base.beyond_hashes(), more_hashes.beyond_hashes());
        // A name indicator, or a YARA rule, is beyond hashes.
        let other_name = stix_name.replace("x.exe", "y.exe");
        assert_ne!(
            base.beyond_hashes(),
            set("", &other_name, yara).beyond_hashes()
        );
        let other_yara = "rule b { condition: false }";
        assert_ne!(
            base.beyond_hashes(),
            set("", stix_name, other_yara).beyond_hashes()
        );
        // What the new hashes find in a file known by its digests alone.
        let found = more_hashes.match_known_file("/srv/f", None, None, Some(&sha));
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            base.match_known_file("/srv/f", None, None, Some(&sha))
                .is_empty()
        );
    }

    #[test]
    fn a_broken_rule_is_reported_with_its_line_and_the_rest_loads() {
        let mut b = RuleSetBuilder::new();
        b.add_yara_source(
            Path::new("good.yar"),
            b"rule a { strings: $a = \"x\" condition: $a }",
        );
        b.add_yara_source(
            Path::new("bad.yar"),
            b"rule ok { condition: true }\n\nrule b { condition: $nope }",
        );
        let rs = b.build(0);
        // yara-x keeps the rules of a file that compiled: `a` and `ok`, not `b`.
        assert_eq!(rs.yara_rules(), 2);
        let p = &rs.report().problems;
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].path, Path::new("bad.yar"));
        assert_eq!(p[0].line, Some(3), "{}", p[0]);
    }

    #[test]
    fn strict_build_refuses_any_problem() {
        let mut b = RuleSetBuilder::new();
        b.add_yara_source(Path::new("x.yar"), b"rule {");
        let e = b.build_strict(0).err().expect("must fail");
        assert!(e.to_string().contains("x.yar:1:"), "{e}");
    }

    #[test]
    fn include_is_refused_and_the_rest_loads() {
        for target in ["/dev/zero", "/etc/passwd", "other.yar"] {
            let mut b = RuleSetBuilder::new();
            b.add_yara_source(
                Path::new("inc.yar"),
                format!("include \"{target}\"\nrule i {{ condition: true }}").as_bytes(),
            );
            b.add_yara_source(Path::new("ok.yar"), b"rule ok { condition: true }");
            let rs = b.build(0);
            // The include is refused (nothing outside the set is read); yara-x keeps the
            // file's own rule, as for other errors, and the other file loads.
            assert_eq!(rs.yara_rules(), 2, "{target}");
            let p = &rs.report().problems;
            assert_eq!(p.len(), 1, "{target}: {p:?}");
            assert_eq!(p[0].path, Path::new("inc.yar"));
            assert!(p[0].reason.contains("include"), "{}", p[0]);
        }
    }

    #[test]
    fn same_rule_name_in_two_files_is_fine() {
        let mut b = RuleSetBuilder::new();
        b.add_yara_source(Path::new("a/x.yar"), b"rule r { condition: true }");
        b.add_yara_source(Path::new("b/x.yar"), b"rule r { condition: true }");
        assert_eq!(b.build(0).yara_rules(), 2);
    }
}
#[cfg(test)]
mod slow_patterns {
    /// yara-x's slow-pattern warnings are kept with their file and line; the rules still load.
    #[test]
    fn slow_patterns_are_named_by_file_and_line() {
        let src = "rule quick { strings: $a = \"VEDETTE-QUICK\" condition: $a }\n\
                   rule slow { strings: $b = { 00 00 } condition: $b }\n";
        let mut b = super::RuleSetBuilder::new();
        b.add_source(
            super::Origin::Local,
            std::path::Path::new("r.yar"),
            src.as_bytes(),
        );
        let set = b.build(0);
        let slow: Vec<String> = set
            .report()
            .slow_patterns
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            slow,
            ["r.yar:2: slow pattern (this pattern may slow down the scan)"]
        );
        assert_eq!(set.report().yara_rules, 2);
        assert!(set.report().problems.is_empty());
    }
}
