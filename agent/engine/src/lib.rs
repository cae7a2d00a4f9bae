//! The Vedette rule engine: loads YARA rules and indicators, compiles them into one immutable
//! [`RuleSet`], and matches files against it.
//!
//! The same code runs on agents (to detect), in `vedettectl` (to validate before publishing) and
//! in the collector (to validate on receipt), so a rule set that validates is one agents can run.
//! It does no async work and watches nothing: callers decide what to scan and on which thread.

pub mod bundle;
pub mod child;
pub mod classes;
pub mod codec;
mod compiled;
pub mod digests;
pub mod domains;
pub mod exceptions;
mod file;
pub mod findings;
pub mod import;
pub mod intel;
mod ioc;
pub mod isolated;
mod pathset;
pub mod profile;
mod rules;
pub mod stix;

pub use file::{FileReport, FileScanner, ScanOptions, SkipReason};

/// Why an indicator, a pattern or an imported document was refused: the message shown to
/// whoever imports or publishes it (the caller adds the file, line or id).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

impl ParseError {
    /// An input over its size cap.
    pub fn too_long(what: &str, len: usize, max: usize) -> ParseError {
        ParseError(format!("{what} of {len} bytes is longer than {max}"))
    }
}

impl From<String> for ParseError {
    fn from(s: String) -> ParseError {
        ParseError(s)
    }
}

impl From<&str> for ParseError {
    fn from(s: &str) -> ParseError {
        ParseError(s.to_string())
    }
}
pub use ioc::{IocCounts, IocKind, Iocs};
pub use isolated::{IsolatedCompiler, IsolatedError};
pub use rules::{
    IndicatorRef, LoadReport, MatchKind, Meanwhile, Origin, Problem, ProblemKind, RuleMatch,
    RuleSet, RuleSetBuilder, thread_cpu,
};

/// Error that stops a rule set from being built at all.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{count} problem(s) in the rules:\n{}", problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        count: usize,
        problems: Vec<Problem>,
    },
}
