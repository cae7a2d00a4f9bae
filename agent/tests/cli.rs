//! The agent binary as a user meets it: usage and configuration errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // test code

use std::process::Command;

const AGENT: &str = env!("CARGO_BIN_EXE_vedette-agent");

#[test]
fn enroll_requires_a_way_to_trust_the_collector() {
    let out = Command::new(AGENT)
        .args([
            "enroll",
            "--collector",
            "127.0.0.1:1",
            "--token",
            "t",
            "--state-dir",
            "/tmp/x",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ca-sha256") || err.contains("--ca"), "{err}");
}

#[test]
fn run_with_a_bad_config_exits_64_naming_key_and_value() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "heartbeat = \"sometimes\"\nwatch = [\"/nonexistent-vedette-path\"]\n",
    )
    .unwrap();
    let out = Command::new(AGENT)
        .args(["run", "--state-dir"])
        .arg(tmp.path())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`heartbeat`") && err.contains("sometimes"),
        "{err}"
    );
    assert!(err.contains("/nonexistent-vedette-path"), "{err}");
}

#[test]
fn run_without_enrollment_fails_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(AGENT)
        .args(["run", "--state-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("enroll"));
}

/// The daemon compiles YARA rules in a child: this executable, as `compile-rules`.
#[test]
fn rules_compiled_by_the_agents_own_executable_load_and_match() {
    use std::io::Write;
    use std::sync::Arc;
    use vedette_engine::child::{ChildCompiler, SUBCOMMAND};
    use vedette_engine::{FileScanner, RuleSetBuilder, ScanOptions};

    let tmp = tempfile::tempdir().unwrap();
    let sources = || {
        let mut b = RuleSetBuilder::new();
        b.add_yara_source(
            std::path::Path::new("good.yar"),
            b"rule child_marker { strings: $a = \"CHILD-COMPILED\" condition: $a }",
        );
        b.add_yara_source(
            std::path::Path::new("bad.yar"),
            b"rule ok { condition: true }\n\nrule bad { condition: nope }\n",
        );
        b
    };
    let child = Arc::new(ChildCompiler::new(AGENT, [SUBCOMMAND]));
    let cache = tmp.path().join("compiled.bin");
    let set = sources().compile_with(child).build_cached(0, &cache);
    let here = sources().build(0);
    assert_eq!(
        set.yara_rules(),
        here.yara_rules(),
        "{:?}",
        set.report().problems
    );
    assert!(set.yara_rules() >= 1);
    assert_eq!(set.report().problems, here.report().problems);
    let p = &set.report().problems[0];
    assert!(p.path.ends_with("bad.yar") && p.line == Some(3), "{p}");
    assert!(
        cache.exists(),
        "the child's rules are kept for the next start"
    );
    let file = tmp.path().join("sample");
    std::fs::write(&file, ".. CHILD-COMPILED ..").unwrap();
    let rules = |set: &vedette_engine::RuleSet| {
        let r = FileScanner::new(set, ScanOptions::default())
            .scan_path(&file)
            .unwrap();
        let mut names: Vec<String> = r.matches.iter().map(|m| m.rule.clone()).collect();
        names.sort();
        names
    };
    let matched = rules(&set);
    assert!(matched.iter().any(|r| r == "child_marker"), "{matched:?}");
    assert_eq!(matched, rules(&here));

    // Anything but a request: refused, with the reason, exit status 2.
    let mut c = Command::new(AGENT)
        .arg(SUBCOMMAND)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(b"rule x { condition: true }")
        .unwrap();
    let out = c.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not rule sources"), "{err}");
}

/// The compiler child gives up every capability before it reads anything.
#[test]
fn the_compiler_child_runs_without_capabilities() {
    let mut c = Command::new(AGENT)
        .arg(vedette_engine::child::SUBCOMMAND)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", c.id());
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut last = String::new();
    let dropped = loop {
        last = std::fs::read_to_string(&status).unwrap_or(last);
        let eff = field(&last, "CapEff:");
        let prm = field(&last, "CapPrm:");
        let nnp = field(&last, "NoNewPrivs:");
        if eff.as_deref() == Some("0000000000000000")
            && prm.as_deref() == Some("0000000000000000")
            && nnp.as_deref() == Some("1")
        {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    drop(c.stdin.take());
    let _ = c.wait();
    assert!(dropped, "{last}");
}
