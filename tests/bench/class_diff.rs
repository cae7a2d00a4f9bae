//! `class-diff`: the engine's rules by file class against one whole set, on whole corpora.
//! Every file is scanned with both; a file judged differently is printed and the exit status
//! is 1. Also prints each class set's compiled size.
//!
//! ```text
//! cargo build -p vedette-tests --bin class-diff
//! [SAMPLES=1] target/debug/class-diff --rules ../shared/data/signature-base/yara [--rules DIR]... PATH...
//! ```
//!
//! With `SAMPLES=1`, files built from each rule's own strings (after `MZ`, `\x7fELF` and
//! nothing) are compared too, so that rules of every class match something.

use std::path::PathBuf;
use std::time::Instant;

use vedette_engine::classes::FileClass;
use vedette_tests::classdiff::{compare, files_under, rule_samples, rule_sets};

fn main() {
    let mut rules = Vec::new();
    let mut paths = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--rules", Some(dir)) => rules.push(PathBuf::from(dir)),
            ("--rules", None) => fail("--rules needs a directory or file"),
            (_, next) => {
                paths.push(PathBuf::from(&a));
                paths.extend(next.map(PathBuf::from));
            }
        }
    }
    if rules.is_empty() || paths.is_empty() {
        fail("usage: class-diff --rules DIR [--rules DIR]... PATH...");
    }
    let start = Instant::now();
    let (classes, whole) = rule_sets(&rules).unwrap_or_else(|e| fail(&e));
    println!(
        "rules: {} YARA rules, compiled both ways in {:.1} s",
        whole.yara_rules(),
        start.elapsed().as_secs_f64()
    );
    if let Some(sets) = classes.yara_sets() {
        for class in FileClass::ALL {
            let set = sets.of_class(class).unwrap_or_else(|e| fail(&e));
            let size = set.serialize().map(|b| b.len()).unwrap_or(0);
            println!(
                "  {:<6} {:>5} rules, {:>6.1} MiB compiled",
                class.name(),
                set.iter().len(),
                size as f64 / (1 << 20) as f64
            );
        }
    }
    let mut files = Vec::new();
    let samples = std::env::temp_dir().join(format!("class-diff-{}", std::process::id()));
    if std::env::var_os("SAMPLES").is_some() {
        // Files built from every rule's own strings (see `rule_samples`), beside the corpus.
        let _ = std::fs::create_dir_all(&samples);
        for r in &rules {
            files.extend(rule_samples(r, &samples, 1));
        }
    }
    for p in &paths {
        files.extend(files_under(p, usize::MAX, 64 << 20));
    }
    let start = Instant::now();
    let diff = compare(&classes, &whole, &files);
    println!(
        "files: {} (pe {}, elf {}, macho {}, other {}), {} YARA matches, {} differences, {:.1} s",
        diff.files,
        diff.by_class[0],
        diff.by_class[1],
        diff.by_class[2],
        diff.by_class[3],
        diff.matches,
        diff.differences.len(),
        start.elapsed().as_secs_f64()
    );
    for d in &diff.differences {
        println!("  {d}");
    }
    let _ = std::fs::remove_dir_all(&samples);
    if !diff.differences.is_empty() {
        std::process::exit(1);
    }
}

fn fail(why: &str) -> ! {
    eprintln!("class-diff: {why}");
    std::process::exit(2);
}
