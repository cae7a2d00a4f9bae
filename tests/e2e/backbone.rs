//! Enrollment, identity, detections end to end, revocation, restart.

use std::time::Duration;

use serde_json::Value;
use vedette_ops::client::{ClientTls, connect};
use vedette_proto::v1::admin_service_client::AdminServiceClient;
use vedette_proto::v1::agent_message::Msg;
use vedette_proto::v1::agent_service_client::AgentServiceClient;
use vedette_proto::v1::{AgentMessage, Hello, ListAgentsRequest};
use vedette_tests::{Agent, Collector, rule_dir, wait_for};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Detections of one rule, from `vedettectl detections list --json`.
fn detections_of(c: &Collector, rule: &str) -> Vec<Value> {
    c.detections()
        .into_iter()
        .filter(|d| d["rule"] == rule)
        .collect()
}

#[test]
fn enrolled_agent_detection_is_stored_once_under_its_certificate_id() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let mut agent = Agent::enroll(&c, &tmp.path().join("agent"));
    // The id the collector put in the certificate is the one recorded on the agent.
    assert!(agent.file("agent.toml").contains(&agent.id));
    let watch = tmp.path().join("watch");
    std::fs::create_dir(&watch).unwrap();
    let rules = rule_dir(
        &tmp.path().join("rules"),
        "e2e_marker",
        "VEDETTE-E2E-MARKER",
    );
    agent.run_watching(&c, &watch, &rules);

    std::fs::write(watch.join("clean.txt"), "nothing to see").unwrap();
    let bad = watch.join("dropper.sh");
    std::fs::write(&bad, "#!/bin/sh\necho VEDETTE-E2E-MARKER\n").unwrap();
    let found = wait_for(
        Duration::from_secs(10),
        "the detection to be stored",
        || {
            let d = detections_of(&c, "e2e_marker");
            (!d.is_empty()).then_some(d)
        },
    );
    let d = &found[0];
    assert_eq!(d["agent_id"], agent.id.as_str());
    assert_eq!(d["kind"], "yara");
    assert_eq!(d["score"], 80);
    let path = std::fs::canonicalize(&bad).unwrap();
    assert_eq!(d["path"], path.to_str().unwrap());
    assert_eq!(d["sha256"].as_str().map(str::len), Some(64));

    // Stop the agent gracefully (drains) and check the store holds the detection exactly once
    // and nothing for the clean file.
    let mut p = agent.proc.take().unwrap();
    assert!(p.signal_and_wait("TERM").success(), "{}", p.log_text());
    let all = c.detections();
    assert_eq!(
        all.iter().filter(|d| d["rule"] == "e2e_marker").count(),
        1,
        "{all:?}"
    );
    assert!(
        all.iter()
            .all(|d| !d["path"].as_str().unwrap_or("").ends_with("clean.txt"))
    );

    // A restarted collector keeps every detection and agent.
    let before_agents = c.agents();
    assert_eq!(c.stop().code(), Some(0));
    c.start();
    assert_eq!(c.detections(), all);
    let after_agents = c.agents();
    assert_eq!(after_agents.len(), before_agents.len());
    assert_eq!(after_agents[0]["id"], agent.id.as_str());
    assert_eq!(after_agents[0]["hostname"], before_agents[0]["hostname"]);
}

#[test]
fn bad_expired_and_used_tokens_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();

    let out = Agent::try_enroll(&c, &tmp.path().join("a1"), "vdt_not-a-real-token");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown enrollment token"), "{err}");
    assert!(!tmp.path().join("a1/agent.crt").exists());

    let once = c.token(&["--uses", "1"]);
    let ok = Agent::try_enroll(&c, &tmp.path().join("a2"), &once);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let again = Agent::try_enroll(&c, &tmp.path().join("a3"), &once);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already been used"), "{err}");

    let short = c.token(&["--ttl", "1s"]);
    // Waiting for the token's lifetime to pass is the point of this step, not synchronisation.
    std::thread::sleep(Duration::from_millis(1200));
    let late = Agent::try_enroll(&c, &tmp.path().join("a4"), &short);
    assert!(!late.status.success());
    let err = String::from_utf8_lossy(&late.stderr);
    assert!(err.contains("expired"), "{err}");

    // A wrong CA pin never reaches the token check.
    let out = std::process::Command::new(vedette_tests::bin("vedette-agent"))
        .args([
            "enroll",
            "--collector",
            &c.addr,
            "--token",
            &c.token(&[]),
            "--ca-sha256",
            &"00".repeat(32),
            "--trust-collector-keys",
        ])
        .arg("--state-dir")
        .arg(tmp.path().join("a5"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fingerprint"));

    // Only the one good enrollment exists.
    assert_eq!(c.agents().len(), 1);
}

#[test]
fn clients_without_a_certificate_or_from_another_ca_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let other = Collector::init(&tmp.path().join("other"));
    let ca = c.file("ca.crt");
    rt().block_on(async {
        // No certificate: the admin API and the agent stream answer UNAUTHENTICATED.
        let tls = ClientTls {
            ca_pem: ca.clone(),
            identity: None,
        };
        let ch = connect(&c.addr, &tls)
            .await
            .expect("TLS without a client cert connects");
        let e = AdminServiceClient::new(ch.clone())
            .list_agents(ListAgentsRequest::default())
            .await
            .expect_err("no cert must be refused");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let hello = AgentMessage {
            msg: Some(Msg::Hello(Hello::default())),
        };
        let e = AgentServiceClient::new(ch)
            .connect(tokio_stream::iter(vec![hello]))
            .await
            .expect_err("no cert must be refused");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

        // An operator certificate from another CA: the handshake is refused, nothing is served.
        let foreign = ClientTls {
            ca_pem: ca.clone(),
            identity: Some((other.file("operator.crt"), other.file("operator.key"))),
        };
        let refused = match connect(&c.addr, &foreign).await {
            Err(_) => true,
            Ok(ch) => AdminServiceClient::new(ch)
                .list_agents(ListAgentsRequest::default())
                .await
                .is_err(),
        };
        assert!(refused, "a certificate from another CA was accepted");
    });
    // The same through vedettectl: a config naming the foreign certificate fails.
    let cfg = tmp.path().join("foreign.toml");
    std::fs::write(
        &cfg,
        format!(
            "collector = \"{}\"\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            c.addr,
            c.dir.join("ca.crt").display(),
            other.dir.join("operator.crt").display(),
            other.dir.join("operator.key").display()
        ),
    )
    .unwrap();
    let out = vedette_tests::vedettectl(&cfg, &["agents", "list"]);
    assert!(!out.status.success());
}

#[test]
fn agent_certificate_cannot_call_the_admin_api_and_revoked_agent_is_cut_off() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let mut agent = Agent::enroll(&c, &tmp.path().join("agent"));
    let watch = tmp.path().join("watch");
    std::fs::create_dir(&watch).unwrap();
    let rules = rule_dir(
        &tmp.path().join("rules"),
        "revoke_marker",
        "VEDETTE-REVOKE-MARKER",
    );
    agent.run_watching(&c, &watch, &rules);

    let agent_tls = ClientTls {
        ca_pem: agent.file("ca.crt"),
        identity: Some((agent.file("agent.crt"), agent.file("agent.key"))),
    };
    rt().block_on(async {
        let ch = connect(&c.addr, &agent_tls).await.expect("agent connects");
        let e = AdminServiceClient::new(ch)
            .list_agents(ListAgentsRequest::default())
            .await
            .expect_err("agent cert must not list agents");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    });

    let out = c.ctl_ok(&["agents", "revoke", &agent.id]);
    assert!(out.contains("stream was closed"), "{out}");
    // Cut off: the collector shows it disconnected and revoked, and its reconnects are refused.
    wait_for(
        Duration::from_secs(10),
        "the revoked agent to be disconnected",
        || {
            c.agents()
                .iter()
                .any(|a| {
                    a["id"] == agent.id.as_str()
                        && a["connected"] == false
                        && a["state"] == "revoked"
                })
                .then_some(())
        },
    );
    rt().block_on(async {
        let ch = connect(&c.addr, &agent_tls)
            .await
            .expect("TLS still completes");
        let hello = AgentMessage {
            msg: Some(Msg::Hello(Hello::default())),
        };
        let e = AgentServiceClient::new(ch)
            .connect(tokio_stream::iter(vec![hello]))
            .await
            .expect_err("a revoked agent must be refused");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    });
    // What it detects from now on never reaches the store.
    std::fs::write(watch.join("after-revoke"), "VEDETTE-REVOKE-MARKER").unwrap();
    let proc = agent.proc.as_mut().unwrap();
    wait_for(
        Duration::from_secs(15),
        "the agent to try again and be refused",
        || {
            proc.log_text()
                .contains("this agent has been revoked")
                .then_some(())
        },
    );
    assert!(detections_of(&c, "revoke_marker").is_empty());
}

/// The README's first command: `deploy/quickstart.sh` brings up a collector and an enrolled
/// agent; a file with the quick-start marker shows up in `vedettectl detections list`.
#[test]
fn quickstart_script_detects_a_marker_file() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = tmp.path().join("demo");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/quickstart.sh");
    let bin_dir = vedette_tests::bin("vedette-agent")
        .parent()
        .unwrap()
        .to_owned();
    let port = vedette_tests::free_port().to_string();
    let run = |arg: &str| {
        std::process::Command::new("bash")
            .arg(&script)
            .arg(arg)
            .env("VEDETTE_DEMO_DIR", &demo)
            .env("VEDETTE_PORT", &port)
            .env("VEDETTE_BIN_DIR", &bin_dir)
            .output()
            .expect("run quickstart.sh")
    };
    // Stops whatever the script started, even if an assertion fails.
    struct Stop<'a>(&'a dyn Fn(&str) -> std::process::Output);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = (self.0)("stop");
        }
    }
    let out = run("start");
    let _stop = Stop(&run);
    let log = |f: &str| std::fs::read_to_string(demo.join(f)).unwrap_or_default();
    assert!(
        out.status.success(),
        "quickstart failed: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        log("collector.log"),
        log("agent.log")
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("detections list"), "{stdout}");
    std::fs::write(
        demo.join("watch/suspicious.txt"),
        "VEDETTE-QUICKSTART-TEST\n",
    )
    .unwrap();
    let ctl = || {
        vedette_tests::vedettectl(
            &demo.join("collector/vedettectl.toml"),
            &["detections", "list"],
        )
    };
    wait_for(
        Duration::from_secs(20),
        "the quick-start detection to be listed",
        || {
            let o = ctl();
            String::from_utf8_lossy(&o.stdout)
                .contains("Vedette_Quickstart_Marker")
                .then_some(())
        },
    );
    let stopped = run("stop");
    assert!(String::from_utf8_lossy(&stopped.stdout).contains("stopped agent"));
}
