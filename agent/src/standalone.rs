//! `vedette-agent scan`: a one-shot scan without any collector, like `yara -r` or Loki.
//!
//! Exit status, like grep: 0 when nothing matched, 1 when something matched, 2 on an error that
//! stopped the scan (unusable rules or paths). Files that cannot be scanned are counted and
//! summarised, not errors.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde_json::json;
use vedette_engine::{FileScanner, RuleSet, RuleSetBuilder};
use vedette_proto::v1::{Detection, detection};

use crate::cache::ScanCache;
use crate::counters::Counters;
use crate::procmon::ProcessJudge;
use crate::scan::detections_of;
use crate::walk::{Outcome, WalkOptions, scan_tree};

pub struct ScanArgs {
    pub rules: Vec<PathBuf>,
    pub paths: Vec<PathBuf>,
    pub json: bool,
    pub processes: bool,
    pub strict: bool,
    pub walk: WalkOptions,
    pub cache: Option<PathBuf>,
}

/// Loads rules for a scan, printing problems to stderr. None when loading must stop the scan.
/// With `compiled`, compiled YARA rules are kept there and reused while the sources are
/// unchanged.
pub fn load_rules(paths: &[PathBuf], strict: bool, compiled: Option<&Path>) -> Option<RuleSet> {
    let mut b = RuleSetBuilder::new();
    for p in paths {
        if let Err(e) = b.add_path(p) {
            eprintln!("error: {e}");
            return None;
        }
    }
    let rules = match compiled {
        Some(c) => b.build_cached(0, c),
        None => b.build(0),
    };
    let r = rules.report();
    for p in &r.problems {
        eprintln!("{}: {p}", if strict { "error" } else { "warning" });
    }
    let i = &r.iocs;
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

/// Runs the scan; returns the exit status.
pub fn run(args: ScanArgs) -> u8 {
    for p in &args.paths {
        if std::fs::symlink_metadata(p).is_err() {
            eprintln!("error: `{}` does not exist", p.display());
            return 2;
        }
    }
    if let Err(e) = crate::walk::exclusions(&args.walk.excludes) {
        eprintln!("error: {e}");
        return 2;
    }
    // Beside the result cache: the compiled rules, so a second run does not compile again.
    let compiled = args.cache.as_ref().map(|c| {
        let mut p = c.as_os_str().to_owned();
        p.push(".rules");
        PathBuf::from(p)
    });
    let Some(rules) = load_rules(&args.rules, args.strict, compiled.as_deref()) else {
        return 2;
    };
    let started = Instant::now();
    let counters = Counters::default();
    let cache = args
        .cache
        .as_ref()
        .map(|p| ScanCache::load(p, rules.fingerprint()));
    let matched = AtomicBool::new(false);
    let detections = AtomicU64::new(0);
    let out = Mutex::new(std::io::stdout());
    let emit = |d: &Detection| {
        matched.store(true, Ordering::Relaxed);
        detections.fetch_add(1, Ordering::Relaxed);
        let line = if args.json {
            detection_json(d).to_string()
        } else {
            detection_line(d)
        };
        let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(o, "{line}");
    };
    let on_file = |path: &std::path::Path, outcome: Outcome| match outcome {
        Outcome::Scanned { report, .. } => {
            for d in detections_of(path, &report, 0) {
                emit(&d);
            }
        }
        Outcome::Skipped(vedette_engine::SkipReason::Unreadable(e)) => {
            tracing::debug!(path = %path.display(), error = %e, "unreadable");
        }
        Outcome::Skipped(_) => {}
    };
    let stop = AtomicBool::new(false);
    if let Err(e) = scan_tree(
        &args.paths,
        &args.walk,
        &rules,
        cache.as_ref(),
        &counters,
        &stop,
        &on_file,
    ) {
        eprintln!("error: {e}");
        return 2;
    }
    if args.processes {
        let mut judge = ProcessJudge::new(&rules);
        let mut scanner = FileScanner::new(&rules, args.walk.scan);
        for d in judge.new_processes(&mut scanner) {
            emit(&d);
        }
        for d in judge.c2_connections(&rules) {
            emit(&d);
        }
    }
    if let (Some(cache), Some(path)) = (&cache, &args.cache)
        && let Err(e) = cache.save(path)
    {
        eprintln!(
            "warning: cannot save the scan cache `{}`: {e}",
            path.display()
        );
    }
    let snap = counters.snapshot();
    let skipped: u64 = snap
        .iter()
        .filter(|(k, _)| k.starts_with("files_skipped_"))
        .map(|(_, v)| v)
        .sum();
    let reasons: Vec<String> = snap
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("files_skipped_").map(|r| format!("{r} {v}")))
        .collect();
    eprintln!(
        "scanned {} files ({} unchanged, from cache), skipped {}{}; {} detections in {:.2} s",
        counters.get("files_scanned") + counters.get("cache_hits"),
        counters.get("cache_hits"),
        skipped,
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join(", "))
        },
        detections.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    u8::from(matched.load(Ordering::Relaxed))
}

/// The `--json` form of a detection.
pub fn detection_json(d: &Detection) -> serde_json::Value {
    let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let mut v = json!({
        "kind": vedette_proto::kind_name(d.kind),
        "rule": d.rule,
        "score": d.score,
        "source": d.source,
        "description": nonempty(&d.description),
    });
    match &d.target {
        Some(detection::Target::File(f)) => {
            v["path"] = json!(f.path);
            v["size"] = json!(f.size);
            v["sha256"] = json!(nonempty(&f.sha256));
            if !f.md5.is_empty() {
                v["md5"] = json!(f.md5);
            }
            if !f.sha1.is_empty() {
                v["sha1"] = json!(f.sha1);
            }
        }
        Some(detection::Target::Process(p)) => {
            v["pid"] = json!(p.pid);
            v["ppid"] = json!(p.ppid);
            v["name"] = json!(p.name);
            v["path"] = json!(p.exe);
            v["cmdline"] = json!(p.cmdline);
            v["user"] = json!(p.user);
            v["sha256"] = json!(nonempty(&p.exe_sha256));
        }
        Some(detection::Target::Connection(c)) => {
            v["pid"] = json!(c.pid);
            v["path"] = json!(c.exe);
            v["protocol"] = json!(c.protocol);
            v["remote"] = json!(format!("{}:{}", bracket(&c.remote_addr), c.remote_port));
        }
        None => {}
    }
    v
}

fn bracket(addr: &str) -> String {
    if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr.to_string()
    }
}

/// The human form of a detection.
pub fn detection_line(d: &Detection) -> String {
    let target = match &d.target {
        Some(detection::Target::File(f)) => f.path.clone(),
        Some(detection::Target::Process(p)) => format!("pid {} {} ({})", p.pid, p.exe, p.cmdline),
        Some(detection::Target::Connection(c)) => {
            format!(
                "pid {} {} -> {}:{}",
                c.pid,
                c.exe,
                bracket(&c.remote_addr),
                c.remote_port
            )
        }
        None => String::new(),
    };
    format!(
        "{:<10} {:>3}  {}  {}",
        vedette_proto::kind_name(d.kind),
        d.score,
        d.rule,
        target
    )
}
