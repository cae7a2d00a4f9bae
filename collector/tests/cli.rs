//! The collector binary as a user meets it: init and configuration errors.

use std::process::Command;

const COLLECTOR: &str = env!("CARGO_BIN_EXE_vedette-collector");

#[test]
fn init_refuses_to_overwrite_a_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let first = Command::new(COLLECTOR)
        .args(["init", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(first.status.success());
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(stdout.contains("CA SHA-256 fingerprint: "), "{stdout}");
    assert!(stdout.contains("vedette-agent enroll"), "{stdout}");
    let key = std::fs::read(dir.join("ca.key")).unwrap();
    let second = Command::new(COLLECTOR)
        .args(["init", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read(dir.join("ca.key")).unwrap(), key);
}

#[test]
fn serve_with_a_bad_config_exits_64_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("collector.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:99999\"\ndatabase = \"db\"\n[tls]\nca_cert = \"ca.crt\"\nca_key = \"ca.key\"\nserver_cert = \"s.crt\"\nserver_key = \"s.key\"\n",
    )
    .unwrap();
    let out = Command::new(COLLECTOR)
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`listen`") && err.contains("127.0.0.1:99999"),
        "{err}"
    );
    assert!(err.contains("`tls.ca_cert`"), "{err}");
}
