//! Rules by file class judge every file as the whole rule set does: the engine's class sets
//! against one set of the same rules, on files at each class boundary and on this machine's
//! own files. `class-diff` runs the same comparison with signature-base on whole corpora
//! (BENCHMARKS.md): compiling it twice takes both cores for seconds, too long to share them
//! with the suite's timed tests.

use std::path::{Path, PathBuf};

use vedette_engine::classes::FileClass;
use vedette_tests::classdiff::{boundary_files, compare, files_under, rule_sets};

/// Rules that exercise every way a rule is classed: pinned to each class, to none, to two,
/// to another magic; gated by a global rule; named by another rule; `pe.is_pe`.
const CLASSED: &str = r#"
import "pe"
rule pe_marker { strings: $m = "CLASS-MARKER" condition: uint16(0) == 0x5a4d and $m }
rule pe_header_only { condition: uint16(0) == 0x5a4d }
rule pe_module { condition: pe.is_pe or (uint16be(0) == 0x4d5a and filesize < 3) }
rule elf_marker { strings: $m = "CLASS-MARKER" condition: uint32(0) == 0x464c457f and $m }
rule elf_prefix { condition: uint16(0) == 0x457f and filesize < 12 }
rule macho_any { condition: uint32(0) == 0xfeedfacf or uint32(0) == 0xbebafeca or uint32be(0) == 0xfeedface }
rule pe_or_elf { strings: $m = "CLASS-MARKER" condition: (uint16(0) == 0x5a4d or uint32be(0) == 0x7f454c46) and $m }
rule ole { condition: uint16(0) == 0xcfd0 }
rule zip_marker { strings: $m = "CLASS-MARKER" condition: uint32(0) == 0x04034b50 and $m }
rule anywhere { strings: $m = "CLASS-MARKER" condition: $m }
rule not_pe { strings: $m = "CLASS-MARKER" condition: $m and not (uint16(0) == 0x5a4d) }
rule tiny { condition: filesize < 2 }
private rule elf_helper { condition: uint32(0) == 0x464c457f }
rule uses_helper { strings: $m = "HELPER-MARKER" condition: elf_helper or $m }
"#;

/// A global rule gates every rule of its file: these match only in PE files.
const GATED: &str = r#"
global rule only_pe { condition: uint16(0) == 0x5a4d }
rule gated { strings: $m = "GATED-MARKER" condition: $m }
"#;

fn system_files(limit_each: usize) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for root in [
        "/usr/bin",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/share/doc",
        "/etc",
    ] {
        files.extend(files_under(Path::new(root), limit_each, 8 << 20));
    }
    files
}

#[test]
fn class_sets_judge_every_file_as_the_whole_set_does_with_the_engines_own_rules() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(rules.join("classed.yar"), CLASSED).unwrap();
    std::fs::write(rules.join("gated.yar"), GATED).unwrap();
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/quickstart/rules");
    std::fs::copy(
        quickstart.join("quickstart.yar"),
        rules.join("quickstart.yar"),
    )
    .unwrap();
    let (classes, whole) = rule_sets(&[rules]).unwrap();
    assert!(
        classes.report().problems.is_empty(),
        "{:?}",
        classes.report()
    );
    assert_eq!(classes.yara_rules(), whole.yara_rules());
    let sets = classes.yara_sets().unwrap();
    assert_eq!(sets.len(), 4, "every class has rules of its own here");
    // Each class's set holds only what can match it: the PE set has no ELF rule.
    let names = |c: FileClass| -> Vec<String> {
        sets.of_class(c)
            .unwrap()
            .iter()
            .map(|r| r.identifier().to_string())
            .collect()
    };
    assert!(!names(FileClass::Pe).contains(&"elf_marker".to_string()));
    assert!(!names(FileClass::Other).contains(&"pe_marker".to_string()));
    assert!(names(FileClass::Other).contains(&"elf_helper".to_string()));
    assert!(names(FileClass::Other).contains(&"only_pe".to_string()));

    let corpus = dir.path().join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    let mut files = boundary_files(
        &corpus,
        &[
            "CLASS-MARKER",
            "GATED-MARKER",
            "HELPER-MARKER",
            "VEDETTE-QUICKSTART-TEST",
        ],
    );
    files.extend(system_files(150));
    let diff = compare(&classes, &whole, &files);
    assert!(diff.differences.is_empty(), "{:#?}", diff.differences);
    for class in FileClass::ALL {
        assert!(
            diff.by_class[class as usize] > 0,
            "no {} file compared",
            class.name()
        );
    }
    // The comparison is not vacuous: rules of every kind matched somewhere.
    assert!(diff.matches > 40, "{diff:?}");
}

#[test]
fn rules_check_names_a_slow_rule_first_and_needs_no_collector() {
    let dir = tempfile::tempdir().unwrap();
    let rules = vedette_tests::rules_with_a_slow_one(&dir.path().join("rules"));
    let corpus = dir.path().join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    for i in 0..5 {
        std::fs::write(
            corpus.join(format!("sample-{i}.txt")),
            "words4and2numbers ".repeat(5_000),
        )
        .unwrap();
    }
    let out = std::process::Command::new(vedette_tests::bin("vedettectl"))
        .args(["rules", "check", "--top", "3", "--profile"])
        .arg(&corpus)
        .arg(&rules)
        .env_remove("VEDETTECTL_CONFIG")
        .output()
        .unwrap();
    let text = vedette_tests::output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("42 YARA rule(s)"), "{text}");
    // yara-x's own warning names the pattern, and the profile names its rule first.
    assert!(text.contains("mixed.yar:2"), "{text}");
    let slowest: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("slowest rules on 5 file(s)"))
        .skip(1)
        .collect();
    assert_eq!(slowest.len(), 3, "{text}");
    assert!(
        slowest[0].contains("no_atoms") && slowest[0].contains("mixed.yar:2"),
        "{text}"
    );
    // With --strict the slow pattern fails the check.
    let strict = std::process::Command::new(vedette_tests::bin("vedettectl"))
        .args(["rules", "check", "--strict"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(!strict.status.success());
    assert!(
        vedette_tests::output_text(&strict).contains("would stop `rules publish --strict`"),
        "{}",
        vedette_tests::output_text(&strict)
    );
}
