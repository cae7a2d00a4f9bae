//! `vedette-agent scan`: a one-shot scan without any collector, like `yara -r` or Loki.
//!
//! Exit status, like grep: 0 when nothing matched, 1 when something matched, 2 on an error that
//! stopped the scan (unusable rules or paths). Files that cannot be scanned are counted and
//! summarised, not errors.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use vedette_engine::digests::{Ahead, DigestMemo, Wanted};
use vedette_engine::{FileScanner, Iocs, Meanwhile, RuleSet, RuleSetBuilder};
use vedette_ops::cli::exit;
use vedette_ops::output::{detection_json, detection_line};
use vedette_proto::v1::Detection;

use crate::detect::cache::ScanCache;
use crate::detect::full_scan::{Outcome, ScanContext, ScanPlan, ScanRules, scan_tree};
use crate::detect::memscan::MemScanLimits;
use crate::detect::procmon::ProcessJudge;
use crate::detect::walk::each_file;
use crate::detect::{Ids, file_detections};
use crate::telemetry::{Counter, Counters};

pub struct ScanArgs {
    pub rules: Vec<PathBuf>,
    pub paths: Vec<PathBuf>,
    pub json: bool,
    pub processes: bool,
    pub memory: bool,
    pub strict: bool,
    pub plan: ScanPlan,
    pub cache: Option<PathBuf>,
    /// Keep the compiled YARA rules between runs (in the user's cache directory, or beside
    /// `cache`).
    pub compiled_cache: bool,
}

/// Where the compiled rules of `rule_paths` are kept for this user: one file per set of rule
/// paths under `$XDG_CACHE_HOME/vedette` (else `$HOME/.cache/vedette`), in a directory only
/// this user may open. None without a home, or when the directory cannot be made.
fn user_compiled_cache(rule_paths: &[PathBuf]) -> Option<PathBuf> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let dir = base.join("vedette");
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
    {
        eprintln!(
            "warning: compiled rules not kept: cannot create `{}`: {e}",
            dir.display()
        );
        return None;
    }
    let mut key = Sha256::new();
    for p in rule_paths {
        let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        key.update(p.as_os_str().as_encoded_bytes());
        key.update([0]);
    }
    let key = hex::encode(&key.finalize()[..8]);
    Some(dir.join(format!("compiled-{key}.rules")))
}

/// Reads the rule sources of a scan (nothing is compiled yet); None after printing why when
/// one cannot be read.
fn rule_sources(paths: &[PathBuf]) -> Option<RuleSetBuilder> {
    let mut b = RuleSetBuilder::new();
    for p in paths {
        if let Err(e) = b.add_path(p) {
            eprintln!("error: {e}");
            return None;
        }
    }
    Some(b)
}

/// Builds the rules of a scan and prints what was loaded and every problem to stderr; None
/// when the problems must stop the scan (`strict`). With `compiled`, compiled YARA rules are
/// kept there and reused while the sources are unchanged.
fn build_rules(
    b: RuleSetBuilder,
    strict: bool,
    compiled: Option<&Path>,
    meanwhile: Option<Meanwhile<'_>>,
) -> Option<RuleSet> {
    let rules = match (compiled, meanwhile) {
        (c, Some(m)) => b.build_meanwhile(0, c, m),
        (Some(c), None) => b.build_cached(0, c),
        (None, None) => b.build(0),
    };
    let r = rules.report();
    for p in &r.problems {
        eprintln!("{}: {p}", if strict { "error" } else { "warning" });
    }
    let i = &r.iocs;
    if let Some(c) = rules.yara_sets().filter(|c| c.len() > 1) {
        eprintln!("YARA rules by file class: {}", c.summary());
    }
    eprintln!(
        "loaded {} YARA rules from {} files ({} with errors); indicators: {} hashes, {} file names, {} C2 addresses/networks, {} C2 domains, {} process names, {} command lines; {} lines rejected",
        r.yara_rules,
        r.yara_files,
        r.yara_files_with_errors,
        i.hashes,
        i.filenames,
        i.c2_ips + i.c2_networks,
        i.c2_domains,
        i.process_names,
        i.cmdlines,
        i.rejected
    );
    if strict && !r.problems.is_empty() {
        eprintln!(
            "error: {} problem(s) in the rules and --strict is set",
            r.problems.len()
        );
        return None;
    }
    Some(rules)
}

/// Prints detections as they come, from any thread.
struct Printer {
    json: bool,
    out: Mutex<std::io::Stdout>,
    count: AtomicU64,
}

impl Printer {
    fn emit(&self, d: &Detection) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let line = if self.json {
            detection_json(d).to_string()
        } else {
            detection_line(d)
        };
        let mut o = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(o, "{line}");
    }
}

/// Runs the scan; returns the exit status.
pub fn run(args: ScanArgs) -> u8 {
    for p in &args.paths {
        if std::fs::symlink_metadata(p).is_err() {
            eprintln!("error: `{}` does not exist", p.display());
            return exit::SCAN_ERROR;
        }
    }
    // Digests of the files to scan, computed while the rules load (when they load first).
    let digests = DigestMemo::default();
    let mut hashed_ahead = 0;
    let Some(rules) = scan_rules(&args, &digests, &mut hashed_ahead) else {
        return exit::SCAN_ERROR;
    };
    let started = Instant::now();
    let counters = Counters::default();
    let cache = args.cache.as_ref().map(|p| ScanCache::load(p));
    let printer = Printer {
        json: args.json,
        out: Mutex::new(std::io::stdout()),
        count: AtomicU64::new(0),
    };
    let on_file = |path: &Path, outcome: Outcome| {
        // Like grep: every match, every run, whether the file was scanned or cached.
        if let Outcome::Scanned { report, .. } = outcome {
            for d in file_detections(&Ids::local(), path, &report, &report.matches, 0) {
                printer.emit(&d);
            }
        }
    };
    let stop = CancellationToken::new();
    let cx = ScanContext {
        rules,
        cache: cache.as_ref(),
        counters: &counters,
        stop: &stop,
        digests: Some(&digests),
    };
    scan_tree(&args.paths, &args.plan, &cx, &on_file);
    if args.processes {
        scan_processes(cx.rules.get(), &args.plan, args.memory, &printer);
    }
    if cx.rules.loaded().is_none() {
        eprintln!(
            "rules not loaded: no file needed scanning (every one is unchanged since the cached scan)"
        );
    }
    if let (Some(cache), Some(path)) = (&cache, &args.cache)
        && let Err(e) = cache.save(path)
    {
        eprintln!(
            "warning: cannot save the scan cache `{}`: {e}",
            path.display()
        );
    }
    let detections = printer.count.load(Ordering::Relaxed);
    summarise(&counters, detections, hashed_ahead, started);
    if detections > 0 {
        exit::MATCHED
    } else {
        exit::OK
    }
}

/// The rules the scan runs: loaded when the first file misses the result cache (a scan of an
/// unchanged tree never loads them), or first, while files are hashed on the other core
/// (`hashed_ahead` says how many). None when they cannot be had (said on standard error).
fn scan_rules<'a>(
    args: &ScanArgs,
    digests: &DigestMemo,
    hashed_ahead: &mut u64,
) -> Option<ScanRules<'a>> {
    // The compiled rules, so that a second run does not compile again: beside the result
    // cache, else in the user's cache directory.
    let compiled = match &args.cache {
        _ if !args.compiled_cache => None,
        Some(c) => {
            let mut p = c.as_os_str().to_owned();
            p.push(".rules");
            Some(PathBuf::from(p))
        }
        None => user_compiled_cache(&args.rules),
    };
    let sources = rule_sources(&args.rules)?;
    // --strict (which must see every problem first) and --processes (every process is
    // judged) load them first.
    if args.cache.is_some() && !args.strict && !args.processes {
        let fingerprint = sources.fingerprint();
        return Some(ScanRules::lazy(
            fingerprint,
            Box::new(move || {
                build_rules(sources, false, compiled.as_deref(), None)
                    .unwrap_or_else(RuleSet::empty)
            }),
        ));
    }
    let mut ahead = |iocs: &Iocs, ready: &dyn Fn() -> bool| {
        *hashed_ahead = hash_while_loading(&args.paths, &args.plan, iocs, ready, digests);
    };
    build_rules(sources, args.strict, compiled.as_deref(), Some(&mut ahead)).map(ScanRules::owned)
}

fn scan_processes(rules: &RuleSet, plan: &ScanPlan, memory: bool, printer: &Printer) {
    let mut judge = ProcessJudge::new(Ids::local());
    if memory {
        judge = judge.with_memory(MemScanLimits::default());
    }
    let mut scanner = FileScanner::new(rules, plan.scan);
    for d in judge.new_processes(&mut scanner) {
        printer.emit(&d);
    }
    for d in judge.c2_connections(rules) {
        printer.emit(&d);
    }
}

fn summarise(counters: &Counters, detections: u64, hashed_ahead: u64, started: Instant) {
    let (skipped, reasons) = counters.skipped();
    let hits = counters.get(Counter::CacheHits);
    eprintln!(
        "scanned {} files ({hits} unchanged, from cache), skipped {skipped}{}; {detections} detections in {:.2} s{}",
        counters.get(Counter::FilesScanned) + hits,
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join(", "))
        },
        started.elapsed().as_secs_f64(),
        if hashed_ahead > 0 {
            format!(" ({hashed_ahead} files hashed while the rules loaded)")
        } else {
            String::new()
        }
    );
}

/// While the rules compile or load on one core, hashes the files the scan will meet on this
/// one (only the digests the indicator lists need; see [`DigestMemo`]), until the rules are
/// ready. Only when the scan may use a second core at full speed. Returns how many files.
fn hash_while_loading(
    paths: &[PathBuf],
    plan: &ScanPlan,
    iocs: &Iocs,
    ready: &dyn Fn() -> bool,
    memo: &DigestMemo,
) -> u64 {
    let wanted = Wanted::of(iocs);
    if !wanted.any() || plan.threads < 2 || plan.max_cpu_percent < 100 {
        return 0;
    }
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let (mut buf, mut hashed) = (Vec::new(), 0);
    // The scan's own walk counts what it skips; this one counts nothing.
    let (counters, stop) = (Counters::default(), CancellationToken::new());
    each_file(paths, &plan.walk, &counters, &stop, |found| {
        if ready() {
            return false;
        }
        match memo.hash_ahead(
            &found.path,
            wanted,
            plan.scan.max_file_size,
            now_ns,
            &mut buf,
        ) {
            Ahead::Hashed => hashed += 1,
            Ahead::Left => {}
            Ahead::Full => return false,
        }
        true
    });
    hashed
}
