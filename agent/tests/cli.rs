//! The agent binary as a user meets it: usage and configuration errors.

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
