//! Findings of the security review, each with the test that shows it fixed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use vedette_proto::client::ClientTls;
use vedette_proto::v1::agent_message::Msg;
use vedette_proto::v1::collector_message::Msg as Down;
use vedette_proto::v1::{AgentMessage, Detection, DetectionBatch};
use vedette_tests::{Collector, agent_stream, enroll_simulated, json_lines, wait_for};

/// What one reconnecting agent has seen.
#[derive(Default)]
struct Tally {
    acks: AtomicUsize,
    refusals: AtomicUsize,
    stop: AtomicBool,
}

/// Connects, sends one detection per batch until the stream fails, and starts again, as fast
/// as it can, until told to stop.
async fn reconnect_loop(addr: String, tls: ClientTls, tally: Arc<Tally>) {
    while !tally.stop.load(Ordering::Relaxed) {
        let (up, mut down) = match agent_stream(&addr, &tls).await {
            Ok(stream) => stream,
            Err(s) => {
                if s.code() == tonic::Code::PermissionDenied {
                    tally.refusals.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
        };
        for seq in 1..=3u64 {
            let batch = DetectionBatch {
                seq,
                detections: vec![Detection {
                    id: uuid::Uuid::new_v4().to_string(),
                    kind: 1,
                    rule: "race".into(),
                    ..Default::default()
                }],
            };
            if up
                .send(AgentMessage {
                    msg: Some(Msg::Batch(batch)),
                })
                .await
                .is_err()
            {
                break;
            }
            match down.message().await {
                Ok(Some(m)) if matches!(m.msg, Some(Down::Ack(_))) => {
                    tally.acks.fetch_add(1, Ordering::Relaxed);
                }
                Err(s) if s.code() == tonic::Code::PermissionDenied => {
                    tally.refusals.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                _ => break,
            }
        }
        // Dropping the stream here is a reconnect, as an agent does after a failure.
    }
}

fn stored_of(c: &Collector, agent: &str) -> usize {
    let out = c.ctl_ok(&[
        "detections",
        "list",
        "--json",
        "--limit",
        "100000",
        "--agent",
        agent,
    ]);
    json_lines(&out).len()
}

#[test]
fn revoking_an_agent_that_reconnects_in_a_loop_stores_nothing_after_the_revoke_returns() {
    const ROUNDS: usize = 10;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let token = c.token(&["--uses", &ROUNDS.to_string()]);
    let agents = rt.block_on(enroll_simulated(&c, &token, ROUNDS));
    for (round, (id, tls)) in agents.into_iter().enumerate() {
        let tally = Arc::new(Tally::default());
        let task = rt.spawn(reconnect_loop(c.addr.clone(), tls, tally.clone()));
        // Revoked at a different point of its loop each round.
        let before = 5 + round * 7;
        wait_for(Duration::from_secs(30), "acks before the revoke", || {
            (tally.acks.load(Ordering::Relaxed) >= before).then_some(())
        });
        c.ctl_ok(&["agents", "revoke", &id]);
        let at_revoke = stored_of(&c, &id);
        let refused_then = tally.refusals.load(Ordering::Relaxed);
        // It keeps trying; every try is refused, and nothing more is stored.
        wait_for(
            Duration::from_secs(30),
            "twenty refusals after the revoke",
            || (tally.refusals.load(Ordering::Relaxed) >= refused_then + 20).then_some(()),
        );
        tally.stop.store(true, Ordering::Relaxed);
        rt.block_on(task).unwrap();
        assert_eq!(
            stored_of(&c, &id),
            at_revoke,
            "round {round}: a detection was stored after the revoke returned"
        );
        assert!(
            at_revoke >= before,
            "round {round}: {at_revoke} stored, {before} acked"
        );
    }
}

#[test]
fn the_enrollment_token_can_come_from_a_file_instead_of_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let enroll = |extra: &[&std::ffi::OsStr]| {
        std::process::Command::new(vedette_tests::bin("vedette-agent"))
            .args([
                "enroll",
                "--collector",
                &c.addr,
                "--ca-sha256",
                &c.fingerprint,
            ])
            .arg("--state-dir")
            .arg(tmp.path().join("agent"))
            .args(extra)
            .output()
            .unwrap()
    };
    let missing = tmp.path().join("no-such-token");
    let out = enroll(&["--token-file".as_ref(), missing.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no-such-token"),
        "{err}"
    );
    let file = tmp.path().join("token.txt");
    std::fs::write(&file, format!("{}\n", c.token(&[]))).unwrap();
    let out = enroll(&["--token-file".as_ref(), file.as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.agents().len(), 1);
}

#[test]
fn an_agent_refuses_a_state_directory_others_can_write() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = vedette_tests::Collector::init(&tmp.path().join("collector"));
    c.start();
    let agent = vedette_tests::Agent::enroll(&c, &tmp.path().join("agent"));
    let mode = |m| {
        std::fs::set_permissions(
            &agent.state,
            std::os::unix::fs::PermissionsExt::from_mode(m),
        )
        .unwrap()
    };
    mode(0o777);
    let out = std::process::Command::new(vedette_tests::bin("vedette-agent"))
        .arg("run")
        .arg("--state-dir")
        .arg(&agent.state)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("writable by others") && err.contains("chmod 700"),
        "{err}"
    );
    mode(0o700);
}

#[test]
fn an_agent_pins_the_maintainer_keys_its_operator_gives_not_those_the_collector_offers() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let mut c = Collector::init(&tmp.join("collector"));
    c.start();
    // A maintainer's key made off the collector host.
    let alice = tmp.join("alice");
    c.ctl_ok(&["keys", "generate", "--out", alice.to_str().unwrap()]);
    let alice_pub = tmp.join("alice.pub");
    let mut agent = vedette_tests::Agent::enroll_with(
        &c,
        &tmp.join("agent"),
        &["--maintainer-key", alice_pub.to_str().unwrap()],
    );
    let watch = tmp.join("watch");
    std::fs::create_dir(&watch).unwrap();
    agent.run(&c, &["--watch", watch.to_str().unwrap()]);

    // Signed with the key the collector offers (its own, from `init`): the collector takes
    // it, the agent does not.
    let v1 = vedette_tests::rule_dir(&tmp.join("v1"), "offered_key_rule", "VEDETTE-OFFERED");
    c.ctl_ok(&["rules", "publish", v1.to_str().unwrap()]);
    let row = wait_for(
        Duration::from_secs(30),
        "the agent to refuse bundle 1",
        || {
            c.agents()
                .into_iter()
                .find(|a| a["id"] == agent.id.as_str() && a["bundle_failed_version"] == 1)
        },
    );
    assert_eq!(row["bundle_version"], 0, "{row}");
    assert!(
        row["bundle_error"]
            .as_str()
            .is_some_and(|e| e.contains("which is not trusted here")),
        "{row}"
    );

    // Signed by the maintainer the operator pinned (the collector trusts her too): applied.
    c.stop();
    let toml = tmp.join("collector/collector.toml");
    let text = std::fs::read_to_string(&toml).unwrap().replace(
        "maintainer_keys = [\"maintainer.pub\"]",
        &format!(
            "maintainer_keys = [\"maintainer.pub\", \"{}\"]",
            alice_pub.display()
        ),
    );
    std::fs::write(&toml, text).unwrap();
    c.start();
    let v2 = vedette_tests::rule_dir(&tmp.join("v2"), "alice_rule", "VEDETTE-ALICE");
    c.ctl_ok(&[
        "rules",
        "publish",
        "--sign-key",
        tmp.join("alice.key").to_str().unwrap(),
        v2.to_str().unwrap(),
    ]);
    wait_for(Duration::from_secs(30), "the agent on bundle 2", || {
        c.agents()
            .into_iter()
            .find(|a| a["id"] == agent.id.as_str() && a["bundle_version"] == 2)
    });
}
