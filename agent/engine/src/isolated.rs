//! YARA rules compiled in another process, so that what compiling costs stays out of a
//! long-running one (the agent's daemon): the compiler's peak memory (signature-base: well over
//! 100 MiB), the code pages of the compiler itself, and a compiler that crashes or never ends
//! on some rule file. The caller runs the process (an [`IsolatedCompiler`]: the agent runs its
//! own executable, `vedette-agent compile-rules`); this module writes what goes to it and reads
//! what comes back.
//!
//! ```text
//! request:  "VEDETTE-COMPILE-2\n" | by file class: u8 (0 = one whole set) | sources: u32le
//!   | per source: origin (u64le len + bytes) | namespace (u8 0 = none, 1 + u32le len + text)
//!   | bytes (u64le len + bytes) | sha256 of everything before: 32
//! response: "VEDETTE-COMPILED-RULES-2\n" | files_with_errors: u64le | problems: u32le
//!   | per problem: path (u32le len + bytes) | line (u64le, 0 = none) | reason (u32le len + bytes)
//!   | rules: u64le len + the class sets (see `ClassRules::serialize`) | sha256 of everything before: 32
//! ```
//!
//! The same process measures which rules cost the most (see [`crate::profile`]), as it compiles
//! them, so that a caller that profiles its rules never holds the compiler either:
//!
//! ```text
//! request:  "VEDETTE-PROFILE-1\n" | top: u8 | sources as above | files: u32
//!   | per file: bytes (u64le len + bytes) | sha256 of everything before: 32
//! response: "VEDETTE-PROFILE-RESULT-1\n" | files: u32le | bytes: u64le | total ns: u64le
//!   | rules: u32le | per rule: name (u32le len + text) | file (u64le len + bytes) | line: u64le
//!   | ns: u64le | share, ppm: u32le | sha256 of everything before: 32
//! ```
//!
//! The serialized rules are loaded back only from the process the caller started, through the
//! pipe it holds, and only when their seal matches: the same trust as the compiled-rules cache
//! (written by this user, see [`crate::compiled`]).

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::codec::{Reader, Writer, unseal};
use crate::profile::{Profile, RuleCost};
use crate::rules::{YaraPart, compile_yara};
use crate::{Origin, Problem, ProblemKind};

const REQUEST: &[u8] = b"VEDETTE-COMPILE-2\n";
const RESPONSE: &[u8] = b"VEDETTE-COMPILED-RULES-2\n";
const PROFILE_REQUEST: &[u8] = b"VEDETTE-PROFILE-1\n";
const PROFILE_RESPONSE: &[u8] = b"VEDETTE-PROFILE-RESULT-1\n";
/// Most rules a profile answer names.
const MAX_PROFILE_RULES: usize = 255;

/// Why an [`IsolatedCompiler`] gave no compiled rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IsolatedError {
    /// The process could not be started (the rules were not looked at): the builder compiles
    /// in this process instead.
    #[error("the rule compiler could not be started: {0}")]
    Unavailable(String),
    /// The process started and failed (crashed, ran past its deadline, answered nonsense):
    /// the YARA rules are reported as not loaded, and are not compiled here, where the same
    /// failure would take the caller down.
    #[error("the rule compiler failed: {0}")]
    Failed(String),
}

/// Runs a compiler process: gives it `request` (see the module's text) and returns what it
/// wrote back.
pub trait IsolatedCompiler: Send + Sync {
    fn compile(&self, request: &[u8]) -> Result<Vec<u8>, IsolatedError>;
}

impl<F> IsolatedCompiler for F
where
    F: Fn(&[u8]) -> Result<Vec<u8>, IsolatedError> + Send + Sync,
{
    fn compile(&self, request: &[u8]) -> Result<Vec<u8>, IsolatedError> {
        self(request)
    }
}

/// The compiler for rules that come from outside the process, once one is set.
static OUTSIDE: std::sync::OnceLock<std::sync::Arc<dyn IsolatedCompiler>> =
    std::sync::OnceLock::new();

/// From now on, YARA rules from outside this process (a bundle checked with
/// [`crate::bundle::validate`], intel items checked with [`crate::import::check`]) are compiled
/// through `compiler`: the collector's own `compile-rules` child. False when one was set
/// already (it stays).
pub fn compile_outside_rules_with(compiler: std::sync::Arc<dyn IsolatedCompiler>) -> bool {
    OUTSIDE.set(compiler).is_ok()
}

/// The compiler [`compile_outside_rules_with`] set, if any.
pub(crate) fn outside() -> Option<std::sync::Arc<dyn IsolatedCompiler>> {
    OUTSIDE.get().cloned()
}

/// The request for these sources and their namespaces.
pub(crate) fn request(
    sources: &[(PathBuf, Vec<u8>)],
    names: &[Option<String>],
    by_class: bool,
) -> Vec<u8> {
    let mut w = Writer::default();
    w.bytes(REQUEST);
    w.u8(by_class as u8);
    write_sources(&mut w, sources, names);
    w.seal()
}

/// The request to profile these sources on `corpus`, naming the `top` costliest rules.
pub(crate) fn profile_request(
    sources: &[(PathBuf, Vec<u8>)],
    names: &[Option<String>],
    corpus: &[Vec<u8>],
    top: usize,
) -> Vec<u8> {
    let mut w = Writer::default();
    w.bytes(PROFILE_REQUEST);
    w.u8(top.min(MAX_PROFILE_RULES) as u8);
    write_sources(&mut w, sources, names);
    w.u32(corpus.len() as u32);
    for data in corpus {
        w.blob(data);
    }
    w.seal()
}

/// The profile in a response.
pub(crate) fn profile_response(data: &[u8]) -> Result<Profile, IsolatedError> {
    let bad = |why: &str| IsolatedError::Failed(format!("its answer {why}"));
    if !data.starts_with(PROFILE_RESPONSE) {
        return Err(bad(&format!("is not a profile ({} bytes)", data.len())));
    }
    let body = unseal(data).ok_or_else(|| bad("is damaged (checksum mismatch)"))?;
    let mut r = Reader(&body[PROFILE_RESPONSE.len()..]);
    read_profile(&mut r).ok_or_else(|| bad("is truncated"))
}

fn read_profile(r: &mut Reader<'_>) -> Option<Profile> {
    let files = r.u32()? as usize;
    let bytes = r.u64()?;
    let total = Duration::from_nanos(r.u64()?);
    let count = r.u32()? as usize;
    let mut rules = Vec::with_capacity(count.min(MAX_PROFILE_RULES));
    for _ in 0..count {
        rules.push(RuleCost {
            rule: r.text()?,
            file: Path::new(OsStr::from_bytes(r.blob()?)).to_owned(),
            line: usize::try_from(r.u64()?).ok()?,
            time: Duration::from_nanos(r.u64()?),
            share: f64::from(r.u32()?) / 1e6,
        });
    }
    Some(Profile {
        files,
        bytes,
        total,
        rules,
    })
}

fn write_profile(w: &mut Writer, p: &Profile) {
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    w.u32(p.files as u32);
    w.u64(p.bytes);
    w.u64(ns(p.total));
    w.u32(p.rules.len() as u32);
    for c in &p.rules {
        w.text(&c.rule);
        w.blob(c.file.as_os_str().as_bytes());
        w.u64(c.line as u64);
        w.u64(ns(c.time));
        w.u32((c.share.clamp(0.0, 1.0) * 1e6).round() as u32);
    }
}

fn write_sources(w: &mut Writer, sources: &[(PathBuf, Vec<u8>)], names: &[Option<String>]) {
    w.u32(sources.len() as u32);
    for ((origin, bytes), ns) in sources.iter().zip(names) {
        w.blob(origin.as_os_str().as_bytes());
        match ns {
            Some(ns) => {
                w.u8(1);
                w.text(ns);
            }
            None => w.u8(0),
        }
        w.blob(bytes);
    }
}

/// The compiled rules in a response, and their serialized form (for the compiled-rules cache).
pub(crate) fn response(data: &[u8]) -> Result<(YaraPart, &[u8]), IsolatedError> {
    let bad = |why: &str| IsolatedError::Failed(format!("its answer {why}"));
    if !data.starts_with(RESPONSE) {
        return Err(bad(&format!(
            "is not compiled rules ({} bytes)",
            data.len()
        )));
    }
    let body = unseal(data).ok_or_else(|| bad("is damaged (checksum mismatch)"))?;
    let mut r = Reader(&body[RESPONSE.len()..]);
    let (files_with_errors, problems, serialized) =
        crate::compiled::parse_body(&mut r).ok_or_else(|| bad("is truncated"))?;
    let rules = crate::classes::ClassRules::deserialize(serialized)
        .map_err(|e| bad(&format!("does not load: {e}")))?;
    Ok((
        YaraPart {
            rules: Some(rules),
            files_with_errors,
            problems,
            failure: None,
            slow_patterns: Vec::new(),
        },
        serialized,
    ))
}

/// The compiler process's side: reads a request from `input` to its end, compiles, writes the
/// response to `output`. An error names what was wrong with the request or the output.
pub fn serve(input: &mut dyn Read, output: &mut dyn Write) -> Result<(), ServeError> {
    let mut data = Vec::new();
    input.read_to_end(&mut data).map_err(ServeError::Read)?;
    if data.starts_with(PROFILE_REQUEST) {
        return serve_profile(&data, output);
    }
    let (sources, names, by_class) = parse_request(&data)?;
    drop(data);
    let part = compile_yara(&sources, &names, by_class, 1);
    drop(sources);
    let serialized = match &part.rules {
        Some(rules) => rules.serialize().map_err(ServeError::Serialize)?,
        None => return Err(ServeError::NoRules),
    };
    let mut w = Writer::default();
    w.bytes(RESPONSE);
    crate::compiled::write_body(&mut w, part.files_with_errors, &part.problems, &serialized);
    output
        .write_all(&w.seal())
        .and_then(|()| output.flush())
        .map_err(ServeError::Write)
}

/// Profiles what `data` asks for (see [`crate::profile`]) and writes the answer.
fn serve_profile(data: &[u8], output: &mut dyn Write) -> Result<(), ServeError> {
    let body = unseal(data).ok_or(ServeError::Damaged)?;
    let mut r = Reader(&body[PROFILE_REQUEST.len()..]);
    let top = usize::from(r.u8().ok_or(ServeError::Truncated)?);
    let (sources, names) = read_sources(&mut r)?;
    let count = r.u32().ok_or(ServeError::Truncated)?;
    let mut corpus = Vec::new();
    for _ in 0..count {
        corpus.push(r.blob().ok_or(ServeError::Truncated)?.to_vec());
    }
    let profile = crate::profile::profile(&sources, &names, &corpus, top);
    let mut w = Writer::default();
    w.bytes(PROFILE_RESPONSE);
    write_profile(&mut w, &profile);
    output
        .write_all(&w.seal())
        .and_then(|()| output.flush())
        .map_err(ServeError::Write)
}

/// What went wrong in the compiler process.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot read the request: {0}")]
    Read(std::io::Error),
    #[error("the request is not rule sources ({0} bytes)")]
    NotARequest(usize),
    #[error("the request is damaged or truncated")]
    Damaged,
    #[error("the request is truncated")]
    Truncated,
    #[error("cannot serialize the compiled rules: {0}")]
    Serialize(String),
    #[error("the compiler gave no rules")]
    NoRules,
    #[error("cannot write the compiled rules: {0}")]
    Write(std::io::Error),
}

/// The sources, their namespaces, and whether to compile a set per file class.
type Sources = (Vec<(PathBuf, Vec<u8>)>, Vec<Option<String>>, bool);

fn parse_request(data: &[u8]) -> Result<Sources, ServeError> {
    if !data.starts_with(REQUEST) {
        return Err(ServeError::NotARequest(data.len()));
    }
    let body = unseal(data).ok_or(ServeError::Damaged)?;
    let mut r = Reader(&body[REQUEST.len()..]);
    let by_class = r.u8().ok_or(ServeError::Truncated)? != 0;
    let (sources, names) = read_sources(&mut r)?;
    Ok((sources, names, by_class))
}

type Named = (Vec<(PathBuf, Vec<u8>)>, Vec<Option<String>>);

fn read_sources(r: &mut Reader<'_>) -> Result<Named, ServeError> {
    let count = r.u32().ok_or(ServeError::Truncated)?;
    let mut sources = Vec::new();
    let mut names = Vec::new();
    for _ in 0..count {
        let origin =
            Path::new(OsStr::from_bytes(r.blob().ok_or(ServeError::Truncated)?)).to_owned();
        let ns = match r.u8().ok_or(ServeError::Truncated)? {
            0 => None,
            _ => Some(r.text().ok_or(ServeError::Truncated)?),
        };
        let bytes = r.blob().ok_or(ServeError::Truncated)?.to_vec();
        sources.push((origin, bytes));
        names.push(ns);
    }
    Ok((sources, names))
}

/// What the report says when the compiler process failed: every YARA source is left out.
pub(crate) fn failed(sources: usize, why: &IsolatedError) -> YaraPart {
    YaraPart {
        rules: None,
        files_with_errors: sources,
        problems: Vec::new(),
        failure: Some(Problem {
            path: PathBuf::from("<rule compiler>"),
            line: None,
            reason: format!("{why}; no YARA rule of this set was loaded"),
            kind: ProblemKind::Yara,
            origin: Origin::Local,
        }),
        slow_patterns: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{FileScanner, RuleSetBuilder, ScanOptions};

    fn builder() -> RuleSetBuilder {
        let mut b = RuleSetBuilder::new();
        b.add_yara_source(
            Path::new("good.yar"),
            b"rule isolated_marker { strings: $a = \"ISOLATED-MARKER\" condition: $a }",
        );
        b.add_yara_source(Path::new("bad.yar"), b"rule bad { condition: nope }");
        b.add_ioc_source(
            crate::IocKind::Filename,
            Path::new("filename-iocs.txt"),
            b"evil\\.exe;80\n",
        );
        b
    }

    /// A compiler that answers every request with `e`.
    fn refusing(e: IsolatedError) -> Arc<dyn IsolatedCompiler> {
        Arc::new(move |_: &[u8]| -> Result<Vec<u8>, IsolatedError> { Err(e.clone()) })
    }

    /// The compiler process's side run in a thread of this one: the bytes go through the same
    /// functions as through a pipe.
    fn in_thread(request: &[u8]) -> Result<Vec<u8>, IsolatedError> {
        let mut out = Vec::new();
        serve(&mut &request[..], &mut out).map_err(|e| IsolatedError::Failed(e.to_string()))?;
        Ok(out)
    }

    #[test]
    fn rules_compiled_elsewhere_match_and_report_like_rules_compiled_here() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("rules.bin");
        let here = builder().build(0);
        let there = builder()
            .compile_with(Arc::new(in_thread))
            .build_cached(0, &cache);
        assert_eq!(there.yara_rules(), 1);
        assert_eq!(there.report().problems, here.report().problems);
        assert_eq!(there.report().yara_files_with_errors, 1);
        assert_eq!(there.fingerprint(), here.fingerprint());
        let file = dir.path().join("sample");
        std::fs::write(&file, "xx ISOLATED-MARKER xx").unwrap();
        let r = FileScanner::new(&there, ScanOptions::default())
            .scan_path(&file)
            .unwrap();
        assert_eq!(r.matches.len(), 1);
        assert_eq!(r.matches[0].rule, "isolated_marker");
        // What came back was kept: the next build loads it without asking.
        let never = refusing(IsolatedError::Failed("asked again".into()));
        let hit = builder().compile_with(never).build_cached(0, &cache);
        assert_eq!(hit.yara_rules(), 1);
        assert_eq!(hit.report().problems, here.report().problems);
    }

    #[test]
    fn rules_profiled_elsewhere_are_named_as_when_profiled_here() {
        let mut b = RuleSetBuilder::new();
        b.add_yara_source(
            Path::new("mixed.yar"),
            b"rule cheap { strings: $a = \"CHEAP-MARKER\" condition: $a }\n\
              rule slow_regex { strings: $r = /[a-z]+[0-9]+[a-z]+[0-9]/ condition: $r }\n",
        );
        let line: Vec<u8> = b"abcdefgh12345ijklmnop ".repeat(4_000);
        let corpus = vec![line.clone(), line];
        let p = b.profile_with(&in_thread, &corpus, 2).unwrap();
        assert_eq!((p.files, p.bytes), (2, 2 * 22 * 4_000));
        assert_eq!(p.rules.len(), 2, "{p:?}");
        let first = &p.rules[0];
        assert_eq!(
            (first.rule.as_str(), first.line),
            ("slow_regex", 2),
            "{p:?}"
        );
        assert_eq!(first.file, Path::new("mixed.yar"));
        assert!(first.share > 0.5 && first.share <= 1.0, "{p:?}");
        assert!(first.time >= p.rules[1].time && !p.total.is_zero(), "{p:?}");
        // A compiler that fails is a failure, not an empty profile.
        let fails = refusing(IsolatedError::Failed("killed by signal 9".into()));
        assert!(b.profile_with(fails.as_ref(), &corpus, 2).is_err());
    }

    #[test]
    fn a_failed_compiler_leaves_the_yara_rules_out_and_says_so_with_their_origin() {
        let fails = refusing(IsolatedError::Failed("killed by signal 9".into()));
        let set = builder().compile_with(fails.clone()).build(0);
        assert_eq!(set.yara_rules(), 0);
        assert_eq!(set.report().yara_files_with_errors, 2);
        // The indicator lists are parsed here and still load.
        assert_eq!(set.report().iocs.filenames, 1);
        let p = &set.report().problems;
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].reason.contains("killed by signal 9"), "{}", p[0]);
        assert_eq!(p[0].origin, Origin::Local);
        // With a bundle's YARA file in the set, the failure is the bundle's: it is refused.
        let mut b = builder();
        b.add_source(
            Origin::Bundle,
            Path::new("bundle/extra.yar"),
            b"rule from_bundle { condition: true }",
        );
        let set = b.compile_with(fails.clone()).build(7);
        let p = &set.report().problems;
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].origin, Origin::Bundle);
        // Also a bundle of indicator lists only, beside host-local YARA rules: applying it
        // would run without them.
        let set = builder().compile_with(fails).build(8);
        assert_eq!(set.report().problems[0].origin, Origin::Bundle);
        // Answers that are not compiled rules are failures too, never loaded.
        for answer in [
            b"".to_vec(),
            b"running 0 tests\n".to_vec(),
            in_thread(&request(&[], &[], true)).unwrap()[..40].to_vec(),
        ] {
            let garbage = move |_: &[u8]| -> Result<Vec<u8>, IsolatedError> { Ok(answer.clone()) };
            let set = builder().compile_with(Arc::new(garbage)).build(0);
            assert_eq!(set.yara_rules(), 0);
            assert!(
                set.report().problems[0].reason.contains("its answer"),
                "{:?}",
                set.report().problems
            );
        }
    }

    #[test]
    fn a_compiler_that_cannot_start_is_replaced_by_compiling_here() {
        let absent = refusing(IsolatedError::Unavailable("no such file".into()));
        let set = builder().compile_with(absent).build(0);
        assert_eq!(set.yara_rules(), 1);
        assert_eq!(set.report().problems.len(), 1);
        assert!(set.report().problems[0].path.ends_with("bad.yar"));
    }

    #[test]
    fn a_damaged_or_truncated_request_is_refused_with_its_reason() {
        let good = request(
            &[(
                PathBuf::from("a.yar"),
                b"rule a { condition: true }".to_vec(),
            )],
            &[Some("a".into())],
            true,
        );
        let mut out = Vec::new();
        assert!(serve(&mut &good[..], &mut out).is_ok());
        let mut damaged = good.clone();
        damaged[REQUEST.len() + 2] ^= 1;
        let e = serve(&mut &damaged[..], &mut Vec::new()).unwrap_err();
        assert!(matches!(e, ServeError::Damaged), "{e}");
        let e = serve(&mut &good[..good.len() - 1], &mut Vec::new()).unwrap_err();
        assert!(matches!(e, ServeError::Damaged), "{e}");
        let e = serve(&mut &b"hello"[..], &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("not rule sources"), "{e}");
    }
}
