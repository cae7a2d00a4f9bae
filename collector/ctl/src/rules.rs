//! `vedettectl keys` and `vedettectl rules`: the maintainers' side of rule bundles.
//!
//! Publishing validates locally first (every YARA file compiled with yara-x, every indicator
//! list parsed), so nothing is sent while a problem remains; then the content is signed with the
//! maintainer's Ed25519 key for the next version and sent. The collector checks it all again.

use std::path::PathBuf;

use anyhow::bail;
use vedette_engine::ProblemKind;
use vedette_engine::RuleSetBuilder;
use vedette_engine::bundle::{self, BundleContent, SigningKey};
use vedette_proto::v1::{
    BundleFile, BundleInfo, BundleRolloutRequest, BundleRolloutResponse, GetBundleRequest,
    ListBundlesRequest, ListExceptionsRequest, PublishBundleRequest, PublishBundleResponse,
    SlowRulesRequest, VersionRuleCosts,
};

use vedette_proto::now_ms;

use crate::client::{CtlConfig, status_error};
use crate::intel::INTEL_FILE;

/// Checks a bundle's content as `rules publish` and `intel publish` both do: every YARA
/// problem, every indicator over a rule set's budget, and every problem of the staged
/// indicators (`intel publish`'s file), stops the publish; another indicator line that does not parse stops it with `strict` and is a warning
/// otherwise (agents skip that line). The warnings.
pub(crate) fn check(content: &BundleContent, strict: bool) -> anyhow::Result<Vec<String>> {
    let Err(problems) = bundle::validate(content, true) else {
        return Ok(Vec::new());
    };
    let intel = PathBuf::from(format!("{}{INTEL_FILE}", bundle::ORIGIN_PREFIX));
    let (fatal, warnings): (Vec<_>, Vec<_>) = problems
        .into_iter()
        .partition(|p| strict || p.kind != ProblemKind::Indicator || p.path == intel);
    if !fatal.is_empty() {
        let list: Vec<String> = fatal.iter().take(20).map(|p| format!("  {p}")).collect();
        bail!(
            "{} problem(s); nothing was published:\n{}",
            fatal.len(),
            list.join("\n")
        );
    }
    Ok(warnings.iter().map(skipped).collect())
}

/// The warning of an indicator line that does not parse.
fn skipped(p: &vedette_engine::Problem) -> String {
    format!("{p} (line skipped by agents; --strict refuses it)")
}

/// Options of `rules publish` and `rules rollback`.
pub struct PublishOptions {
    pub sign_key: Option<PathBuf>,
    pub insecure_unsigned: bool,
    pub publisher: Option<String>,
    /// Only agents with this label get the version.
    pub to_label: Option<String>,
}

impl PublishOptions {
    fn key(&self, cfg: &CtlConfig) -> anyhow::Result<Option<SigningKey>> {
        if self.insecure_unsigned {
            return Ok(None);
        }
        let Some(path) = self.sign_key.as_ref().or(cfg.sign_key.as_ref()) else {
            bail!(
                "no signing key: pass --sign-key KEY or set `sign_key` in vedettectl.toml \
                 (make one with `vedettectl keys generate --out PREFIX`)"
            );
        };
        Ok(Some(SigningKey::load(path)?))
    }

    fn publisher(&self) -> String {
        self.publisher
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "vedettectl".into())
    }
}

/// Checks rule files locally: every problem as `file:line: reason`. YARA problems and
/// indicators over a rule set's budget always stop the publish; indicator lines that do not
/// parse stop it with `strict`, and are warnings otherwise (agents skip those lines).
pub fn validate_paths(paths: &[PathBuf], strict: bool) -> anyhow::Result<Vec<String>> {
    let mut b = RuleSetBuilder::new();
    for p in paths {
        b.add_path(p)?;
    }
    let set = b.whole().build(0);
    let (fatal, warnings): (Vec<_>, Vec<_>) = set
        .report()
        .problems
        .iter()
        .partition(|p| strict || p.kind != ProblemKind::Indicator);
    if !fatal.is_empty() {
        let list: Vec<String> = fatal.iter().map(|p| format!("  {p}")).collect();
        bail!(
            "{} problem(s); nothing was published:\n{}",
            fatal.len(),
            list.join("\n")
        );
    }
    // yara-x's slow-pattern warnings: each such pattern would slow every scan on every agent.
    let slow = &set.report().slow_patterns;
    if strict && !slow.is_empty() {
        let list: Vec<String> = slow.iter().map(|p| format!("  {p}")).collect();
        bail!(
            "{} slow pattern(s), refused with --strict; nothing was published:\n{}",
            slow.len(),
            list.join("\n")
        );
    }
    Ok(warnings
        .iter()
        .map(|p| skipped(p))
        .chain(
            slow.iter()
                .map(|p| format!("{p}: published; --strict refuses it")),
        )
        .collect())
}

/// At most this much of a corpus is read for `rules check --profile`.
const MAX_CORPUS_FILES: usize = 20_000;
const MAX_CORPUS_BYTES: u64 = 512 << 20;

/// `rules check`: what publishing would report, without publishing; with `corpus`, the `top`
/// rules that cost the most on it.
pub fn check_paths(
    paths: &[PathBuf],
    strict: bool,
    corpus: Option<&std::path::Path>,
    top: usize,
) -> anyhow::Result<()> {
    let builder = || -> anyhow::Result<RuleSetBuilder> {
        let mut b = RuleSetBuilder::new();
        for p in paths {
            b.add_path(p)?;
        }
        Ok(b)
    };
    let set = builder()?.whole().build(0);
    let report = set.report();
    for p in &report.problems {
        println!("{p}");
    }
    for p in &report.slow_patterns {
        println!("warning: {p}");
    }
    let fatal = report
        .problems
        .iter()
        .filter(|p| strict || p.kind != ProblemKind::Indicator)
        .count()
        + if strict {
            report.slow_patterns.len()
        } else {
            0
        };
    println!(
        "{} YARA rule(s), {} indicator(s); {} problem(s), {} slow pattern(s)",
        set.yara_rules(),
        {
            let c = &report.iocs;
            c.hashes
                + c.filenames
                + c.c2_ips
                + c.c2_networks
                + c.c2_domains
                + c.process_names
                + c.cmdlines
                + c.intel
        },
        report.problems.len(),
        report.slow_patterns.len()
    );
    if let Some(dir) = corpus {
        let files = read_corpus(dir)?;
        print_profile(&builder()?.profile(&files, top));
    }
    if fatal > 0 {
        let how = if strict {
            "rules publish --strict"
        } else {
            "rules publish"
        };
        bail!("{fatal} problem(s) would stop `{how}`");
    }
    Ok(())
}

/// The files under `dir` (or `dir` itself), in name order, up to the corpus caps.
fn read_corpus(dir: &std::path::Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut total = 0u64;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(path) = todo.pop() {
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&path)
                .map_err(|e| anyhow::anyhow!("cannot list {}: {e}", path.display()))?
                .flatten()
                .map(|e| e.path())
                .collect();
            entries.sort();
            todo.extend(entries.into_iter().rev());
        } else if meta.is_file() {
            if out.len() >= MAX_CORPUS_FILES || total + meta.len() > MAX_CORPUS_BYTES {
                eprintln!(
                    "warning: the corpus is cut at {} files ({} MiB): more is not needed",
                    out.len(),
                    total >> 20
                );
                break;
            }
            // A file that cannot be read is left out, as agents skip it.
            if let Ok(data) = std::fs::read(&path) {
                total += data.len() as u64;
                out.push(data);
            }
        }
    }
    if out.is_empty() {
        bail!("no readable file in the corpus {}", dir.display());
    }
    Ok(out)
}

fn print_profile(p: &vedette_engine::profile::Profile) {
    println!(
        "slowest rules on {} file(s) ({:.1} MiB), {:.3} s with every rule file:",
        p.files,
        p.bytes as f64 / (1 << 20) as f64,
        p.total.as_secs_f64()
    );
    for r in &p.rules {
        println!(
            "  {:>5.1}%  {:>8.3} s  {}  {}:{}",
            r.share * 100.0,
            r.time.as_secs_f64(),
            r.rule,
            r.file.display(),
            r.line
        );
    }
}

pub(crate) async fn latest(cfg: &CtlConfig) -> anyhow::Result<Option<BundleInfo>> {
    let mut c = cfg.client().await?;
    let list = c
        .list_bundles(ListBundlesRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(list.bundles.into_iter().max_by_key(|b| b.version))
}

/// The latest bundle's content, if any was published.
pub(crate) async fn latest_content(cfg: &CtlConfig) -> anyhow::Result<Option<BundleContent>> {
    match latest(cfg).await? {
        Some(b) => Ok(Some(fetch(cfg, b.version).await?.1)),
        None => Ok(None),
    }
}

/// The exceptions in force at the collector now, as a bundle's exceptions file (None when
/// there are none).
async fn exceptions_file(cfg: &CtlConfig) -> anyhow::Result<Option<BundleFile>> {
    use vedette_engine::exceptions::{self, Exception, Exceptions};
    let mut c = cfg.client().await?;
    let list = c
        .list_exceptions(ListExceptionsRequest { all: false })
        .await
        .map_err(status_error)?
        .into_inner()
        .exceptions;
    if list.is_empty() {
        return Ok(None);
    }
    let list: Vec<Exception> = list
        .into_iter()
        .map(|e| Exception {
            id: e.id,
            rule: e.rule,
            indicator: e.indicator,
            sha256: e.sha256,
            path: e.path,
            org: e.org,
            agent: e.agent,
            expires_at_ms: e.expires_at_ms,
            reason: e.reason,
        })
        .collect();
    Ok(Some(BundleFile {
        path: exceptions::FILE.into(),
        data: Exceptions::encode(&list).into_bytes(),
    }))
}

/// Signs `content` as the next version, with the exceptions in force at the collector in
/// place of any it carried, and sends it.
pub(crate) async fn send(
    cfg: &CtlConfig,
    mut content: BundleContent,
    opts: &PublishOptions,
    name: Option<String>,
) -> anyhow::Result<PublishBundleResponse> {
    let key = opts.key(cfg)?;
    content
        .files
        .retain(|f| f.path != vedette_engine::exceptions::FILE);
    content.files.extend(exceptions_file(cfg).await?);
    content.files.sort_by(|a, b| a.path.cmp(&b.path));
    let prev = latest(cfg).await?;
    content.version = prev.as_ref().map_or(0, |b| b.version) + 1;
    content.name = name
        .or_else(|| prev.map(|b| b.name))
        .unwrap_or_else(|| "rules".into());
    content.created_at_ms = now_ms();
    content.publisher = opts.publisher();
    content.fleet = cfg.fleet()?;
    let bytes = bundle::encode(&content);
    if bytes.len() > bundle::MAX_CONTENT_BYTES {
        bail!(
            "the bundle is {} bytes, more than the {} allowed",
            bytes.len(),
            bundle::MAX_CONTENT_BYTES
        );
    }
    let (signature, signer_key) = match &key {
        Some(k) => (k.sign(&bytes), k.public().0.to_vec()),
        None => (Vec::new(), Vec::new()),
    };
    let mut c = cfg.client().await?;
    Ok(c.publish_bundle(PublishBundleRequest {
        content: bytes,
        signature,
        signer_key,
        to_label: opts.to_label.clone().unwrap_or_default(),
    })
    .await
    .map_err(status_error)?
    .into_inner())
}

/// What `rules publish` did.
pub struct Published {
    pub response: PublishBundleResponse,
    /// Local problems that do not stop a publish.
    pub warnings: Vec<String>,
    /// Staged indicators carried forward from the latest bundle (`intel publish`'s file).
    pub kept_intel: bool,
}

/// `rules publish`: the rules in `paths` replace the latest bundle's rules; the indicators
/// `intel publish` put in it are carried forward unless `drop_intel`.
pub async fn publish(
    cfg: &CtlConfig,
    paths: &[PathBuf],
    name: Option<String>,
    strict: bool,
    drop_intel: bool,
    opts: &PublishOptions,
) -> anyhow::Result<Published> {
    let mut warnings = validate_paths(paths, strict)?;
    let mut files = bundle::files_from_paths(paths)?;
    if files.is_empty() {
        bail!("no YARA files (.yar, .yara) or indicator lists found in the given paths");
    }
    if let Some(f) = files
        .iter()
        .find(|f| f.path == INTEL_FILE || f.path == vedette_engine::exceptions::FILE)
    {
        if f.path != INTEL_FILE {
            bail!(
                "`{}` is where bundles carry the collector's exceptions (`vedettectl exceptions`); \
                 rename that file",
                f.path
            );
        }
        bail!(
            "`{INTEL_FILE}` is where `intel publish` keeps the staged indicators; rename that file"
        );
    }
    let intel = match drop_intel {
        true => None,
        false => latest_content(cfg)
            .await?
            .and_then(|c| c.files.into_iter().find(|f| f.path == INTEL_FILE)),
    };
    // The settings of built-in findings are not rules: checked on their own.
    let settings = BundleContent {
        files: files
            .iter()
            .filter(|f| f.path == vedette_engine::findings::FILE)
            .cloned()
            .collect(),
        ..Default::default()
    };
    if !settings.files.is_empty() {
        warnings.extend(check(&settings, strict)?);
    }
    let kept_intel = intel.is_some();
    files.extend(intel);
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let content = BundleContent {
        files,
        ..Default::default()
    };
    if kept_intel {
        // The rules were checked above under their own names; the carried indicators here.
        let only_intel = BundleContent {
            files: content
                .files
                .iter()
                .filter(|f| f.path == INTEL_FILE)
                .cloned()
                .collect(),
            ..Default::default()
        };
        warnings.extend(check(&only_intel, strict)?);
    }
    let response = send(cfg, content, opts, name).await?;
    Ok(Published {
        response,
        warnings,
        kept_intel,
    })
}

/// Fetches a version's content (checked to decode).
pub async fn fetch(cfg: &CtlConfig, version: u64) -> anyhow::Result<(BundleInfo, BundleContent)> {
    let mut c = cfg.client().await?;
    let r = c
        .get_bundle(GetBundleRequest { version })
        .await
        .map_err(status_error)?
        .into_inner();
    let content = bundle::decode(&r.content)?;
    Ok((r.info.unwrap_or_default(), content))
}

/// `rules rollback VERSION`: the content of VERSION, signed and published as a new version.
pub async fn rollback(
    cfg: &CtlConfig,
    version: u64,
    opts: &PublishOptions,
) -> anyhow::Result<PublishBundleResponse> {
    let (info, content) = fetch(cfg, version).await?;
    send(cfg, content, opts, Some(info.name)).await
}

pub async fn list(cfg: &CtlConfig) -> anyhow::Result<Vec<BundleInfo>> {
    let mut c = cfg.client().await?;
    Ok(c.list_bundles(ListBundlesRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .bundles)
}

/// The costliest rules per bundle version, as the agents measured them.
pub async fn slow(cfg: &CtlConfig, org: String) -> anyhow::Result<Vec<VersionRuleCosts>> {
    let mut c = cfg.client().await?;
    Ok(c.slow_rules(SlowRulesRequest { org })
        .await
        .map_err(status_error)?
        .into_inner()
        .versions)
}

pub async fn rollout(cfg: &CtlConfig, version: u64) -> anyhow::Result<BundleRolloutResponse> {
    let mut c = cfg.client().await?;
    Ok(c.bundle_rollout(BundleRolloutRequest { version })
        .await
        .map_err(status_error)?
        .into_inner())
}
