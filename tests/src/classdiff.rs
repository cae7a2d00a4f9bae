//! The differential check of rules by file class: every file is scanned with the engine's
//! class sets (what the agent runs) and with one whole set of the same rules, and the YARA
//! rules each reports are compared. Used by the engine tests (boundary files, samples of this
//! machine's files) and by `class-diff` (whole corpora).

use std::path::{Path, PathBuf};

use vedette_engine::classes::FileClass;
use vedette_engine::{FileScanner, RuleSet, RuleSetBuilder, ScanOptions};

/// What comparing found.
#[derive(Debug, Default)]
pub struct Diff {
    pub files: usize,
    /// Files per class, by [`FileClass`] index.
    pub by_class: [usize; 4],
    /// YARA rule matches reported by the whole set.
    pub matches: usize,
    /// One line per file judged differently: the path and both verdicts.
    pub differences: Vec<String>,
}

/// The rules under `paths` compiled both ways: (class sets, whole set).
pub fn rule_sets(paths: &[PathBuf]) -> Result<(RuleSet, RuleSet), String> {
    let builder = || -> Result<RuleSetBuilder, String> {
        let mut b = RuleSetBuilder::new();
        for p in paths {
            b.add_path(p).map_err(|e| e.to_string())?;
        }
        Ok(b)
    };
    let classes = builder()?.build(0);
    let whole = builder()?.whole().build(0);
    Ok((classes, whole))
}

/// Scans each file with both rule sets and compares what YARA found.
pub fn compare(classes: &RuleSet, whole: &RuleSet, files: &[PathBuf]) -> Diff {
    let mut a = FileScanner::new(classes, ScanOptions::default());
    let mut b = FileScanner::new(whole, ScanOptions::default());
    let mut diff = Diff::default();
    for file in files {
        let Some(head) = first_bytes(file) else {
            continue;
        };
        diff.files += 1;
        diff.by_class[FileClass::of(&head) as usize] += 1;
        let (got, want) = (verdict(&mut a, file), verdict(&mut b, file));
        diff.matches += want.len();
        if got != want {
            diff.differences.push(format!(
                "{}: class sets {got:?}, whole set {want:?}",
                file.display()
            ));
        }
    }
    diff
}

fn first_bytes(file: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(file)
        .ok()?
        .take(2)
        .read_to_end(&mut head)
        .ok()?;
    Some(head)
}

/// The YARA rules that matched (sorted `source rule`), or why the file was skipped.
fn verdict(scanner: &mut FileScanner<'_>, file: &Path) -> Vec<String> {
    match scanner.scan_path(file) {
        Ok(report) => {
            let mut v: Vec<String> = report
                .matches
                .iter()
                .filter(|m| m.kind == vedette_engine::MatchKind::Yara)
                .map(|m| format!("{} {}", m.source, m.rule))
                .collect();
            v.sort();
            v
        }
        Err(e) => vec![format!("skipped: {}", e.as_str())],
    }
}

/// Writes files at each class boundary into `dir`: empty, one byte, each class's magic alone,
/// on a few bytes, on text and on a line of every marker a rule may look for; returns them.
pub fn boundary_files(dir: &Path, markers: &[&str]) -> Vec<PathBuf> {
    let heads: [&[u8]; 12] = [
        b"",
        b"M",
        b"MZ",
        b"\x7f",
        b"\x7fE",
        b"\x7fELF",
        b"\xcf\xfa\xed\xfe",
        b"\xca\xfe\xba\xbe",
        b"\xfe\xed\xfa\xce",
        b"\xd0\xcf\x11\xe0",
        b"PK\x03\x04",
        b"ZM",
    ];
    let tails: [&[u8]; 4] = [b"", b"\x00\x01\x02\x03\x04\x05", b"a line of text\n", b""];
    let mut out = Vec::new();
    for (i, head) in heads.iter().enumerate() {
        for (j, tail) in tails.iter().enumerate() {
            let mut data = head.to_vec();
            data.extend_from_slice(tail);
            if j == 3 {
                for m in markers {
                    data.extend_from_slice(m.as_bytes());
                    data.push(b'\n');
                }
            }
            let path = dir.join(format!("boundary-{i:02}-{j}"));
            if std::fs::write(&path, &data).is_ok() {
                out.push(path);
            }
        }
    }
    out
}

/// Up to `limit` regular files under `root`, in directory order, each at most `max_size`.
pub fn files_under(root: &Path, limit: usize, max_size: u64) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                dirs.push(e.path());
            } else if t.is_file()
                && e.metadata().is_ok_and(|m| m.len() <= max_size)
                && out.len() < limit
            {
                out.push(e.path());
            }
        }
        if out.len() >= limit {
            break;
        }
    }
    out
}

/// Files built to match real rules: for every `step`-th rule with text patterns under `rules`,
/// one file holding all its text patterns (with a `wide` copy where the pattern asks for it)
/// after each of `MZ`, `\x7fELF` and nothing. Rules that test the first bytes, the size and
/// their strings then match some of them, so the comparison is not of silence alone.
pub fn rule_samples(rules: &Path, out: &Path, step: usize) -> Vec<PathBuf> {
    use yara_x_parser::ast::{AST, Pattern};
    let mut files = Vec::new();
    let mut n = 0usize;
    for source in files_under(rules, usize::MAX, 16 << 20) {
        let Ok(text) = std::fs::read_to_string(&source) else {
            continue;
        };
        let ast = AST::from(text.as_str());
        for rule in ast.rules() {
            let mut body = Vec::new();
            for p in rule.patterns.iter().flatten() {
                if let Pattern::Text(t) = p {
                    body.extend_from_slice(&t.text.value);
                    body.push(b'\n');
                    if t.modifiers.wide().is_some() {
                        body.extend(t.text.value.iter().flat_map(|&b| [b, 0]));
                        body.push(b'\n');
                    }
                }
            }
            if body.is_empty() {
                continue;
            }
            n += 1;
            if !n.is_multiple_of(step.max(1)) {
                continue;
            }
            for (i, head) in [&b"MZ\x90\x00\x03\x00"[..], b"\x7fELF\x02\x01\x01", b""]
                .iter()
                .enumerate()
            {
                let path = out.join(format!("sample-{n:05}-{i}"));
                let mut data = head.to_vec();
                data.extend_from_slice(&body);
                if std::fs::write(&path, &data).is_ok() {
                    files.push(path);
                }
            }
        }
    }
    files
}
