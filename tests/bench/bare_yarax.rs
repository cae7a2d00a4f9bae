//! `bare-yarax`: the peer for `vedette-agent scan` in `scan_vs_yara.sh`. A minimal program
//! over yara-x itself, with what Vedette's scan does to files and nothing else: the same rules
//! (each file in its own namespace, relaxed regex syntax, the legacy external variables
//! defined), the same files and threads, the same size cap. No digests, no indicator lists,
//! no result cache, no detections built: what yara-x alone costs.
//!
//! ```text
//! bare-yarax [-p THREADS] [--max-file-size BYTES] [--fast-scan] RULES_DIR PATH...
//! ```
//!
//! `--fast-scan` stops searching for a pattern at its first match where the rule's condition
//! only tests for its presence, as Vedette's scanner does (yara-x's `Scanner::fast_scan`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::Instant;

const EXTERNALS: [&str; 5] = ["filename", "filepath", "extension", "filetype", "owner"];

struct Args {
    threads: usize,
    max_file_size: u64,
    fast_scan: bool,
    rules: PathBuf,
    paths: Vec<PathBuf>,
}

fn args() -> Result<Args, String> {
    let mut threads = 2;
    let mut max_file_size = 64 << 20;
    let mut fast_scan = false;
    let mut rest = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| format!("{name} needs a value"))?
                .parse::<u64>()
                .map_err(|e| format!("{name}: {e}"))
        };
        match a.as_str() {
            "-p" => threads = value("-p")?.max(1) as usize,
            "--max-file-size" => max_file_size = value("--max-file-size")?,
            "--fast-scan" => fast_scan = true,
            "-h" | "--help" => {
                return Err(
                    "usage: bare-yarax [-p THREADS] [--max-file-size BYTES] [--fast-scan] RULES_DIR PATH..."
                        .into(),
                );
            }
            _ => rest.push(PathBuf::from(a)),
        }
    }
    if rest.len() < 2 {
        return Err("give a rules directory and at least one path (--help)".into());
    }
    let rules = rest.remove(0);
    Ok(Args {
        threads,
        max_file_size,
        fast_scan,
        rules,
        paths: rest,
    })
}

fn compile(dir: &Path) -> Result<(yara_x::Rules, usize), String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("yar") || x.eq_ignore_ascii_case("yara"))
        })
        .collect();
    files.sort();
    let mut compiler = yara_x::Compiler::new();
    compiler.relaxed_re_syntax(true);
    for name in EXTERNALS {
        compiler
            .define_global(name, "")
            .map_err(|e| e.to_string())?;
    }
    let mut failed = 0;
    for (i, f) in files.iter().enumerate() {
        let Ok(text) = std::fs::read_to_string(f) else {
            failed += 1;
            continue;
        };
        compiler.new_namespace(&format!("ns{i}"));
        if compiler.add_source(text.as_str()).is_err() {
            failed += 1;
        }
    }
    Ok((compiler.build(), failed))
}

fn walk(path: &Path, out: &std::sync::mpsc::SyncSender<PathBuf>) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        for e in entries.flatten() {
            walk(&e.path(), out);
        }
    } else if meta.is_file() {
        let _ = out.send(path.to_path_buf());
    }
}

fn worker(
    rules: &yara_x::Rules,
    jobs: &Mutex<Receiver<PathBuf>>,
    cap: u64,
    fast_scan: bool,
    files: &AtomicU64,
    matched: &AtomicU64,
) {
    let mut scanner = yara_x::Scanner::new(rules);
    scanner.fast_scan(fast_scan);
    loop {
        let job = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(path) = job else { return };
        if std::fs::metadata(&path).map_or(true, |m| m.len() > cap) {
            continue;
        }
        files.fetch_add(1, Ordering::Relaxed);
        if let Ok(r) = scanner.scan_file(&path) {
            matched.fetch_add(r.matching_rules().len() as u64, Ordering::Relaxed);
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let (rules, failed) = match compile(&args.rules) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let compiled = started.elapsed();
    let (tx, rx) = sync_channel::<PathBuf>(1024);
    let jobs = Mutex::new(rx);
    let (files, matched) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        for _ in 0..args.threads {
            s.spawn(|| {
                worker(
                    &rules,
                    &jobs,
                    args.max_file_size,
                    args.fast_scan,
                    &files,
                    &matched,
                )
            });
        }
        for p in &args.paths {
            walk(p, &tx);
        }
        drop(tx);
    });
    eprintln!(
        "bare yara-x: {} rules ({failed} files with errors), compiled in {:.2} s; scanned {} files, {} matches, in {:.2} s",
        rules.iter().len(),
        compiled.as_secs_f64(),
        files.load(Ordering::Relaxed),
        matched.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    std::process::ExitCode::SUCCESS
}
