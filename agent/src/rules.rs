//! The agent's rule set: host-local `--rules` plus the fleet bundle pushed by the collector.
//!
//! A bundle is applied in this order, and any failure leaves the running set untouched:
//! signature by a pinned maintainer key → canonical content → compile (host-local rules beside
//! the bundle's) → atomic swap (scans in flight finish on the set they started with) → saved as
//! last-good in the state directory → reported. At start the last-good bundle is checked the
//! same way, so an agent without its collector still runs the rules it last had.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::Context;
use arc_swap::ArcSwap;
use prost::Message;
use tracing::{info, warn};
use vedette_engine::bundle::{self, BundleContent, PublicKey};
use vedette_engine::{RuleSet, RuleSetBuilder};
use vedette_proto::v1::{BundleStatus, RuleBundle};

use crate::state::{StateDir, write_atomic};

/// Most problems quoted in a failure report.
const MAX_REPORTED: usize = 10;

pub struct Fleet {
    local: Vec<PathBuf>,
    trusted: Vec<PublicKey>,
    allow_unsigned: bool,
    last_good: PathBuf,
    /// Compiled YARA rules of the last build, reused while the sources are unchanged.
    compiled: PathBuf,
    /// The rule set every scanner uses.
    pub current: Arc<ArcSwap<RuleSet>>,
    /// Version of the applied bundle (0: none).
    pub applied: AtomicU64,
    /// Set when a new bundle is applied: full scans run again over what they cached.
    pub rescan: AtomicBool,
}

impl Fleet {
    /// Loads the pinned maintainer keys and the host-local rules, and the last-good bundle if
    /// one is saved (a bad one is logged and left unused).
    pub fn start(
        state: &StateDir,
        local: Vec<PathBuf>,
        extra_keys: &[PathBuf],
        allow_unsigned: bool,
    ) -> anyhow::Result<Fleet> {
        let mut trusted = Vec::new();
        let pinned = state.maintainers();
        if pinned.exists() {
            let text = std::fs::read_to_string(&pinned)
                .with_context(|| format!("cannot read `{}`", pinned.display()))?;
            if !text.trim().is_empty() {
                trusted.extend(
                    PublicKey::parse_pem(&text)
                        .map_err(|e| anyhow::anyhow!("`{}`: {e}", pinned.display()))?,
                );
            }
        }
        for p in extra_keys {
            trusted.extend(PublicKey::load(p)?);
        }
        if trusted.is_empty() && !allow_unsigned {
            warn!(
                "no maintainer keys are trusted: rule bundles from the collector will be refused"
            );
        }
        let mut fleet = Fleet {
            local,
            trusted,
            allow_unsigned,
            last_good: state.bundle(),
            compiled: state.dir.join("compiled-rules.bin"),
            current: Arc::new(ArcSwap::from_pointee(RuleSet::empty())),
            applied: AtomicU64::new(0),
            rescan: AtomicBool::new(false),
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
                    r
                }
                Err(e) => {
                    warn!(version = content.version, error = %e, "last-good bundle does not compile; running host-local rules only");
                    fleet.compile(None).map_err(anyhow::Error::msg)?
                }
            },
            None => fleet.compile(None).map_err(anyhow::Error::msg)?,
        };
        fleet.current = Arc::new(ArcSwap::from_pointee(rules));
        Ok(fleet)
    }

    fn read_last_good(&self) -> anyhow::Result<Option<BundleContent>> {
        let bytes = match std::fs::read(&self.last_good) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let b = RuleBundle::decode(bytes.as_slice()).context("damaged file")?;
        Ok(Some(self.check(&b)?))
    }

    /// Signature and content checks.
    fn check(&self, b: &RuleBundle) -> anyhow::Result<BundleContent> {
        bundle::verify(
            &b.content,
            &b.signature,
            &b.signer_key,
            &self.trusted,
            self.allow_unsigned,
        )?;
        let content = bundle::decode(&b.content)?;
        if content.version != b.version {
            anyhow::bail!(
                "the envelope says version {} but the signed content says {}",
                b.version,
                content.version
            );
        }
        Ok(content)
    }

    /// Builds host-local rules plus the bundle. Problems in host-local files are logged (the
    /// rest loads, as at start); any problem in the bundle's YARA files fails the build.
    fn compile(&self, content: Option<&BundleContent>) -> Result<RuleSet, String> {
        let mut b = RuleSetBuilder::new();
        for p in &self.local {
            b.add_path(p).map_err(|e| e.to_string())?;
        }
        if let Some(c) = content {
            bundle::add_to(&mut b, c);
        }
        let set = b.build_cached(content.map_or(0, |c| c.version), &self.compiled);
        let report = set.report();
        let bad: Vec<String> = report
            .problems
            .iter()
            .filter(|p| bundle::is_bundle_problem(p) && bundle::is_yara_problem(p))
            .map(ToString::to_string)
            .collect();
        if !bad.is_empty() {
            let shown: Vec<&str> = bad.iter().take(MAX_REPORTED).map(String::as_str).collect();
            return Err(format!(
                "{} problem(s) compiling the bundle: {}",
                bad.len(),
                shown.join("; ")
            ));
        }
        for p in report.problems.iter() {
            warn!(problem = %p, "rule not loaded");
        }
        info!(
            yara_files = report.yara_files,
            rules = report.yara_rules,
            ioc_files = report.ioc_files,
            bundle = content.map_or(0, |c| c.version),
            "rule set built"
        );
        Ok(set)
    }

    /// Applies a pushed bundle (blocking: it compiles). Returns the status to report.
    pub fn apply(&self, b: &RuleBundle) -> BundleStatus {
        let fail = |error: String| {
            warn!(version = b.version, error = %error, "rule bundle refused; the previous rules keep running");
            BundleStatus {
                version: b.version,
                applied: false,
                error,
            }
        };
        let current = self.applied.load(Ordering::Relaxed);
        if b.version <= current {
            return BundleStatus {
                version: current,
                applied: true,
                error: String::new(),
            };
        }
        let content = match self.check(b) {
            Ok(c) => c,
            Err(e) => return fail(format!("{e:#}")),
        };
        let rules = match self.compile(Some(&content)) {
            Ok(r) => r,
            Err(e) => return fail(e),
        };
        self.current.store(Arc::new(rules));
        self.applied.store(b.version, Ordering::Relaxed);
        self.rescan.store(true, Ordering::Relaxed);
        if let Err(e) = write_atomic(&self.last_good, &b.encode_to_vec(), 0o600) {
            // Running it anyway: the collector pushes it again after a restart.
            warn!(error = %format!("{e:#}"), "cannot save the bundle as last-good");
        }
        info!(version = b.version, name = %content.name, publisher = %content.publisher, files = content.files.len(), "rule bundle applied");
        BundleStatus {
            version: b.version,
            applied: true,
            error: String::new(),
        }
    }
}
