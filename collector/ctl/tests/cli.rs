//! vedettectl as a user meets it: configuration errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // test code

use std::process::Command;

const CTL: &str = env!("CARGO_BIN_EXE_vedettectl");

#[test]
fn vedettectl_without_a_config_explains_where_it_looked() {
    let out = Command::new(CTL)
        .args(["--config", "/nonexistent/vedettectl.toml", "agents", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/vedettectl.toml"), "{err}");
}
