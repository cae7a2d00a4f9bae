//! ARCHITECTURE.md's code map names every source file of the workspace exactly once, and
//! nothing that is not there: the map is the first thing a newcomer reads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The repository, from this crate's manifest directory.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the repository")
        .to_owned()
}

/// Source files (Rust, and the benchmark scripts) under `dir`, relative to `root`.
fn sources(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                sources(root, &path, out);
            }
        } else if name.ends_with(".rs") || name.ends_with(".sh") {
            let rel = path.strip_prefix(root).expect("under the root");
            out.push(rel.to_string_lossy().into_owned());
        }
    }
}

#[test]
fn the_code_map_names_every_source_file_once() {
    let root = root();
    let map = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let start = map.find("## Code map").expect("a `## Code map` section");
    let section = &map[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let section = &section[..end];
    let mut files = Vec::new();
    for top in ["agent", "collector", "proto", "tests"] {
        sources(&root, &root.join(top), &mut files);
    }
    assert!(files.len() > 100, "found only {} source files", files.len());
    let mut named: BTreeMap<&str, usize> = BTreeMap::new();
    for quoted in section.split('`').skip(1).step_by(2) {
        *named.entry(quoted).or_default() += 1;
    }
    let mut problems = Vec::new();
    for f in &files {
        match named.get(f.as_str()) {
            None => problems.push(format!("{f}: not in the code map")),
            Some(1) => {}
            Some(n) => problems.push(format!("{f}: named {n} times")),
        }
    }
    for name in named.keys() {
        let looks_like_a_file = name.ends_with(".rs") || name.ends_with(".sh");
        if looks_like_a_file && name.contains('/') && !files.iter().any(|f| f == name) {
            problems.push(format!("{name}: in the code map, but no such file"));
        }
    }
    assert!(
        problems.is_empty(),
        "ARCHITECTURE.md, code map:\n{}",
        problems.join("\n")
    );
}

/// Every `.rs` file under `dir` with its text.
fn rust_sources(root: &Path, dir: &str) -> Vec<(String, String)> {
    let mut files = Vec::new();
    sources(root, &root.join(dir), &mut files);
    files
        .into_iter()
        .filter(|f| f.ends_with(".rs"))
        .map(|f| {
            let text = std::fs::read_to_string(root.join(&f)).unwrap_or_default();
            (f, text)
        })
        .collect()
}

#[test]
fn system_calls_go_through_rustix_with_nix_only_for_fanotify_and_libc_only_where_documented() {
    let root = root();
    let mut problems = Vec::new();
    let files = rust_sources(&root, "agent");
    assert!(files.len() > 30, "found only {} agent files", files.len());
    for (file, text) in &files {
        let uses = |krate: &str| {
            text.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .any(|word| word.starts_with(&format!("{krate}::")))
        };
        let nix_allowed = [
            "agent/src/detect/fanotify.rs",
            "agent/src/detect/prevent.rs",
        ];
        if uses("nix") && !nix_allowed.contains(&file.as_str()) {
            problems.push(format!("{file}: names nix (only fanotify's files may)"));
        }
        let libc_allowed = ["agent/src/governor.rs", "agent/src/detect/dnscap.rs"];
        if uses("libc") && !libc_allowed.contains(&file.as_str()) {
            problems.push(format!(
                "{file}: names libc (only governor.rs and detect/dnscap.rs may)"
            ));
        }
    }
    for (file, text) in rust_sources(&root, "collector")
        .into_iter()
        .chain(rust_sources(&root, "proto"))
    {
        if text.contains("libc::") || text.contains("nix::sys") {
            problems.push(format!("{file}: names libc or nix (use rustix)"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
