//! The collector binary as a user meets it: init and configuration errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // test code

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

#[test]
fn init_trusts_the_maintainer_keys_it_is_given_and_makes_one_only_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let init = |dir: &str, extra: &[&str]| {
        Command::new(COLLECTOR)
            .args(["init", "--dir"])
            .arg(tmp.path().join(dir))
            .args(extra)
            .output()
            .unwrap()
    };
    let text = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();

    // The default: no signing key on the collector host, and it says what to do.
    let out = init("plain", &[]);
    assert!(out.status.success());
    let d = tmp.path().join("plain");
    assert!(!d.join("maintainer.key").exists());
    assert!(text(d.join("collector.toml")).contains("maintainer_keys = []"));
    assert!(!text(d.join("vedettectl.toml")).contains("sign_key"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("No rule maintainer is trusted yet"));

    // A maintainer's public key, made elsewhere.
    let (_, alice_pub, alice) =
        vedette_engine::bundle::write_key_pair(&tmp.path().join("alice")).unwrap();
    let out = init("given", &["--maintainer-key", alice_pub.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = tmp.path().join("given");
    assert!(!d.join("maintainer.key").exists());
    let trusted = vedette_engine::bundle::PublicKey::load(&d.join("maintainers.pub")).unwrap();
    assert_eq!(trusted, vec![alice]);
    assert!(text(d.join("collector.toml")).contains("maintainers.pub"));

    // The one-command trial setup, with its warning.
    let out = init("trial", &["--with-maintainer-key"]);
    assert!(out.status.success());
    assert!(tmp.path().join("trial/maintainer.key").exists());
    assert!(String::from_utf8_lossy(&out.stdout).contains("WARNING: the rule-signing key"));

    // A key file that is not one: refused, naming it, before anything is written.
    let bogus = tmp.path().join("bogus.pub");
    std::fs::write(&bogus, "not a key").unwrap();
    let out = init("bad", &["--maintainer-key", bogus.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus.pub"));
    assert!(!tmp.path().join("bad/ca.key").exists());
}
