//! The agent's active rule set: host-local `--rules` plus the bundle pushed by the collector.
//!
//! A bundle is applied in this order, and any failure leaves the running set untouched:
//! signature by a pinned maintainer key → canonical content → compile (host-local rules beside
//! the bundle's) → atomic swap (scans in flight finish on the set they started with) → saved as
//! last-good in the state directory → reported. At start the last-good bundle is checked the
//! same way, so an agent without its collector still runs the rules it last had.
//!
//! Bundles only move forward: the highest version ever accepted is kept in a file of its own
//! (`bundle.highest`), so an older signed bundle replayed later (say after `bundle.bin` was
//! lost) is refused. A rollback is published as a new, higher version. Each bundle names the
//! fleet it is for (its CA's fingerprint), and a bundle for another fleet is refused.

pub(crate) mod applier;
pub(crate) mod costs;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use prost::Message;
use tokio::sync::Notify;
use tracing::{info, warn};
use vedette_engine::bundle::{self, BundleContent, BundleError, PublicKey};
use vedette_engine::classes::FileClass;
use vedette_engine::findings::Resolved;
use vedette_engine::{EngineError, IsolatedCompiler, Origin, ProblemKind, RuleSet, RuleSetBuilder};
use vedette_proto::v1::RuleBundle;

use crate::state::StateDir;

/// Most problems quoted in a failure report.
const MAX_REPORTED: usize = 10;

/// Why rules could not be loaded or a bundle could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}`: {source}")]
    Keys {
        path: PathBuf,
        source: vedette_engine::bundle::KeyError,
    },
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("damaged file: {0}")]
    Damaged(#[from] prost::DecodeError),
    #[error("the envelope says version {envelope} but the signed content says {content}")]
    VersionMismatch { envelope: u64, content: u64 },
    #[error("{count} problem(s) compiling the bundle: {shown}")]
    Compile { count: usize, shown: String },
    #[error(
        "version {version} is older than version {highest}, already accepted here: an old bundle replayed? (a rollback is published as a new version)"
    )]
    Older { version: u64, highest: u64 },
    #[error("no fleet CA certificate in the state directory (`{0}`): is this agent enrolled?")]
    NoFleet(PathBuf),
}

/// The rules this agent runs, and what it needs to take a new bundle.
pub struct ActiveRules {
    local: Vec<PathBuf>,
    trusted: Vec<PublicKey>,
    allow_unsigned: bool,
    last_good: PathBuf,
    /// The highest bundle version ever accepted here, kept apart from the bundle itself.
    highest_file: PathBuf,
    pub(crate) highest: AtomicU64,
    /// The fleet CA's fingerprint (None: no CA, and so no bundle is accepted).
    fleet: Option<String>,
    /// Compiled YARA rules of the last build, reused while the sources are unchanged.
    compiled: PathBuf,
    /// Where rules missing from `compiled` are compiled (None: in this process).
    compiler: Option<Arc<dyn IsolatedCompiler>>,
    /// The rule set every scanner uses.
    pub current: Arc<ArcSwap<RuleSet>>,
    /// Version of the applied bundle (0: none).
    pub applied: AtomicU64,
    /// Notified when a new bundle is applied: full scans run again over what they cached.
    pub rescan: Notify,
    /// Told of each change of rules (the old set, the new one) before a rescan is asked for;
    /// says whether one is still due (the history answers hash-only changes).
    pub on_change: std::sync::OnceLock<RulesChanged>,
    /// YARA rules in the last rule set built, and how long building it took.
    yara_rules: AtomicU64,
    load_ms: AtomicU64,
    /// This agent's id and organisation (from its certificate): which of a bundle's exceptions
    /// apply here.
    who: (String, String),
    /// This agent's labels, as the collector last said (kept in `labels_file`): which of the
    /// bundle's settings of built-in findings apply here.
    labels: std::sync::RwLock<Vec<String>>,
    labels_file: PathBuf,
    /// The costliest rules on this host's files, as last measured ([`costs`]).
    costs: std::sync::Mutex<Option<vedette_proto::v1::RuleProfile>>,
}

/// What is told of a change of rules: true when a rescan is still due.
pub type RulesChanged = Box<dyn Fn(&RuleSet, &RuleSet) -> bool + Send + Sync>;

/// Figures of the last rule set built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleStats {
    pub yara_rules: u64,
    pub load_ms: u64,
}

impl ActiveRules {
    /// Loads the pinned maintainer keys and the host-local rules, and the last-good bundle if
    /// one is saved (a bad one is logged and left unused). Rules not in the compiled-rules
    /// cache are compiled by `compiler` (the daemon's: [`vedette_engine::child::ChildCompiler`]), or in this
    /// process without one.
    pub fn start(
        state: &StateDir,
        local: Vec<PathBuf>,
        extra_keys: &[PathBuf],
        allow_unsigned: bool,
        compiler: Option<Arc<dyn IsolatedCompiler>>,
    ) -> Result<ActiveRules, RulesError> {
        let trusted = trusted_keys(state, extra_keys)?;
        if trusted.is_empty() && !allow_unsigned {
            warn!(
                "no maintainer keys are trusted: rule bundles from the collector will be refused"
            );
        }
        let highest_file = state.dir.join("bundle.highest");
        let highest = match std::fs::read_to_string(&highest_file) {
            Ok(text) => text.trim().parse::<u64>().unwrap_or_else(|_| {
                warn!(path = %highest_file.display(), "damaged; the last-good bundle's version is used instead");
                0
            }),
            Err(_) => 0,
        };
        let fleet_ca = std::fs::read_to_string(state.ca())
            .ok()
            .and_then(|pem| bundle::fleet_of_ca_pem(&pem));
        let who = state.identity();
        let labels_file = state.dir.join("labels");
        let labels = std::fs::read_to_string(&labels_file)
            .map(|t| t.lines().map(str::to_string).collect())
            .unwrap_or_default();
        let mut fleet = ActiveRules {
            local,
            trusted,
            allow_unsigned,
            highest_file,
            highest: AtomicU64::new(highest),
            fleet: fleet_ca,
            last_good: state.bundle(),
            compiled: state.dir.join("compiled-rules.bin"),
            compiler,
            current: Arc::new(ArcSwap::from_pointee(RuleSet::empty())),
            applied: AtomicU64::new(0),
            rescan: Notify::new(),
            on_change: std::sync::OnceLock::new(),
            yara_rules: AtomicU64::new(0),
            load_ms: AtomicU64::new(0),
            who,
            labels: std::sync::RwLock::new(labels),
            labels_file,
            costs: std::sync::Mutex::new(None),
        };
        let saved = match fleet.read_last_good() {
            Ok(saved) => saved,
            Err(e) => {
                warn!(path = %fleet.last_good.display(), error = %e, "last-good bundle not usable; running host-local rules only");
                None
            }
        };
        let rules = match &saved {
            Some(content) => match fleet.compile(Some(content)) {
                Ok(r) => {
                    info!(version = content.version, name = %content.name, "running the last-good rule bundle");
                    fleet.applied.store(content.version, Ordering::Relaxed);
                    fleet.highest.fetch_max(content.version, Ordering::Relaxed);
                    r
                }
                Err(e) => {
                    warn!(version = content.version, error = %e, "last-good bundle does not compile; running host-local rules only");
                    fleet.compile(None)?
                }
            },
            None => fleet.compile(None)?,
        };
        fleet.current = Arc::new(ArcSwap::from_pointee(rules));
        Ok(fleet)
    }

    /// Takes the labels the collector says this agent has, and keeps them for the next start.
    pub fn set_labels(&self, mut labels: Vec<String>) {
        // What the collector allows (16 labels of at most 32 characters), with room to spare.
        labels.truncate(64);
        labels.retain(|l| l.len() <= 64);
        labels.sort();
        labels.dedup();
        let Ok(mut held) = self.labels.write() else {
            return;
        };
        if *held == labels {
            return;
        }
        info!(labels = %labels.join(","), "agent labels");
        let text: String = labels.iter().map(|l| format!("{l}\n")).collect();
        if let Err(e) = crate::state::write_atomic(&self.labels_file, text.as_bytes(), 0o600) {
            warn!(path = %self.labels_file.display(), error = %e, "cannot keep the agent labels");
        }
        *held = labels;
    }

    /// How each built-in finding is reported here now: the running bundle's settings for this
    /// agent's organisation and labels.
    pub fn findings(&self) -> BTreeMap<&'static str, Resolved> {
        let labels = self.labels.read().map(|l| l.clone()).unwrap_or_default();
        self.current.load().findings().resolve(&self.who.1, &labels)
    }

    /// Figures of the last rule set built.
    pub fn stats(&self) -> RuleStats {
        RuleStats {
            yara_rules: self.yara_rules.load(Ordering::Relaxed),
            load_ms: self.load_ms.load(Ordering::Relaxed),
        }
    }

    fn read_last_good(&self) -> Result<Option<BundleContent>, RulesError> {
        let bytes = match std::fs::read(&self.last_good) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(RulesError::Read {
                    path: self.last_good.clone(),
                    source,
                });
            }
        };
        let b = RuleBundle::decode(bytes.as_slice())?;
        Ok(Some(self.check(&b)?))
    }

    /// Signature and content checks.
    fn check(&self, b: &RuleBundle) -> Result<BundleContent, RulesError> {
        bundle::verify(
            &b.content,
            &b.signature,
            &b.signer_key,
            &self.trusted,
            self.allow_unsigned,
        )?;
        let content = bundle::decode(&b.content)?;
        if content.version != b.version {
            return Err(RulesError::VersionMismatch {
                envelope: b.version,
                content: content.version,
            });
        }
        let fleet = self
            .fleet
            .as_deref()
            .ok_or_else(|| RulesError::NoFleet(self.last_good.with_file_name("ca.crt")))?;
        bundle::check_fleet(&content, fleet)?;
        let highest = self.highest.load(Ordering::Relaxed);
        if content.version < highest {
            return Err(RulesError::Older {
                version: content.version,
                highest,
            });
        }
        Ok(content)
    }

    /// Records `version` as accepted: lower ones are refused from now on, across restarts.
    fn accepted(&self, version: u64) {
        if self.highest.fetch_max(version, Ordering::Relaxed) >= version {
            return;
        }
        if let Err(e) =
            crate::state::write_atomic(&self.highest_file, version.to_string().as_bytes(), 0o600)
        {
            warn!(path = %self.highest_file.display(), error = %e, "cannot record the bundle version accepted");
        }
    }

    /// The sources of host-local rules plus the bundle's.
    fn sources(&self, content: Option<&BundleContent>) -> Result<RuleSetBuilder, RulesError> {
        let mut b = RuleSetBuilder::new();
        for p in &self.local {
            b.add_path(p)?;
        }
        if let Some(c) = content {
            bundle::add_to(&mut b, c);
        }
        Ok(b)
    }

    /// Builds host-local rules plus the bundle. Problems in host-local files are logged (the
    /// rest loads, as at start); any problem in the bundle's YARA files fails the build.
    fn compile(&self, content: Option<&BundleContent>) -> Result<RuleSet, RulesError> {
        let started = std::time::Instant::now();
        let b = self.sources(content)?;
        let b = match &self.compiler {
            Some(c) => b.compile_with(c.clone()),
            None => b.compact(),
        };
        let exceptions = content
            .map(|c| bundle::exceptions_of(c).narrowed_to(&self.who.0, &self.who.1))
            .unwrap_or_default();
        let set = b
            .build_cached(content.map_or(0, |c| c.version), &self.compiled)
            .with_exceptions(exceptions)
            .with_findings(content.map(bundle::findings_of).unwrap_or_default());
        // What compiling freed goes back to the system now, not at the next growth.
        crate::governor::release_free_memory();
        let report = set.report();
        // Loading what the child compiled ran on a thread of its own: scanning work too, a
        // debt the scans pay (the child itself is paced as it runs).
        crate::budget::budget().charge(report.yara_cpu);
        let bad: Vec<String> = report
            .problems
            .iter()
            .filter(|p| p.origin == Origin::Bundle && p.kind == ProblemKind::Yara)
            .map(ToString::to_string)
            .collect();
        if !bad.is_empty() {
            let shown: Vec<&str> = bad.iter().take(MAX_REPORTED).map(String::as_str).collect();
            return Err(RulesError::Compile {
                count: bad.len(),
                shown: shown.join("; "),
            });
        }
        for p in report.problems.iter() {
            warn!(problem = %p, "rule not loaded");
        }
        // Every host has executables and other files: their rules are loaded here, not by the
        // first file that needs them. PE and Mach-O rules wait for a file of theirs.
        if let Some(Err(e)) = set
            .yara_sets()
            .map(|c| c.preload(&[FileClass::Elf, FileClass::Other]))
        {
            return Err(RulesError::Compile { count: 1, shown: e });
        }
        self.yara_rules
            .store(report.yara_rules as u64, Ordering::Relaxed);
        self.load_ms
            .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        info!(
            yara_files = report.yara_files,
            rules = report.yara_rules,
            by_file_class = set.yara_sets().map(|c| c.summary()).unwrap_or_default(),
            ioc_files = report.ioc_files,
            bundle = content.map_or(0, |c| c.version),
            exceptions = set.exceptions().len(),
            "rule set built"
        );
        Ok(set)
    }
}

/// The maintainer keys pinned at enrollment plus those the configuration adds.
fn trusted_keys(state: &StateDir, extra: &[PathBuf]) -> Result<Vec<PublicKey>, RulesError> {
    let mut trusted = Vec::new();
    let pinned = state.maintainers();
    if pinned.exists() {
        let text = std::fs::read_to_string(&pinned).map_err(|source| RulesError::Read {
            path: pinned.clone(),
            source,
        })?;
        if !text.trim().is_empty() {
            let keys = PublicKey::parse_pem(&text).map_err(|source| RulesError::Keys {
                path: pinned.clone(),
                source,
            })?;
            trusted.extend(keys);
        }
    }
    for p in extra {
        trusted.extend(PublicKey::load(p)?);
    }
    Ok(trusted)
}
