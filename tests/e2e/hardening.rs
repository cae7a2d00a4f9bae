//! Findings of the security review, each with the test that shows it fixed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use vedette_ops::client::ClientTls;
use vedette_proto::v1::agent_message::Msg;
use vedette_proto::v1::collector_message::Msg as Down;
use vedette_proto::v1::{AgentMessage, Detection, DetectionBatch};
use vedette_tests::{
    Agent, Collector, agent_stream, enroll_simulated, json_lines, rss_of, wait_for,
};

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
            // The collector tells a new stream its labels first; the batch's answer follows.
            let mut answer = down.message().await;
            while let Ok(Some(m)) = &answer
                && matches!(m.msg, Some(Down::Labels(_)))
            {
                answer = down.message().await;
            }
            match answer {
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
                "--trust-collector-keys",
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

    // Pinned by fingerprint instead of file: the offered key with that SHA-256, only.
    let generated = c.ctl_ok(&[
        "keys",
        "generate",
        "--out",
        tmp.join("bob").to_str().unwrap(),
    ]);
    let bob_sha = generated
        .lines()
        .find_map(|l| l.strip_prefix("SHA-256 "))
        .unwrap()
        .trim()
        .to_string();
    let wrong = Agent::try_enroll_with(
        &c,
        &tmp.join("agent-wrong"),
        &c.token(&[]),
        &["--maintainer-key-sha256", &bob_sha],
    );
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !wrong.status.success() && err.contains(&bob_sha),
        "a fingerprint the collector does not offer: {err}"
    );
    let alice_key = vedette_engine::bundle::PublicKey::load(&alice_pub).unwrap()[0];
    let by_sha = Agent::enroll_with(
        &c,
        &tmp.join("agent-sha"),
        &["--maintainer-key-sha256", &alice_key.sha256()],
    );
    let pinned = std::fs::read_to_string(by_sha.state.join("maintainers.pem")).unwrap();
    assert_eq!(
        vedette_engine::bundle::PublicKey::parse_pem(&pinned).unwrap(),
        vec![alice_key]
    );
}

#[test]
fn enrollment_without_a_maintainer_key_stops_unless_told_to_trust_the_collector() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let mut c = Collector::init(&tmp.join("collector"));
    c.start();
    let token = c.token(&[]);
    let out = std::process::Command::new(vedette_tests::bin("vedette-agent"))
        .args(["enroll", "--collector", &c.addr, "--token", &token])
        .args(["--ca-sha256", &c.fingerprint, "--state-dir"])
        .arg(tmp.join("unpinned"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "a configuration error: {err}");
    assert!(
        err.contains("--maintainer-key") && err.contains("--trust-collector-keys"),
        "{err}"
    );
    assert!(!tmp.join("unpinned").exists(), "nothing written");

    // The token was not spent: told to, the agent pins what the collector offers, and says so.
    let trusting = Agent::try_enroll_with(
        &c,
        &tmp.join("trusting"),
        &token,
        &["--trust-collector-keys"],
    );
    let err = String::from_utf8_lossy(&trusting.stderr);
    assert!(trusting.status.success(), "{err}");
    assert!(
        err.contains("warning: pinning the 1 maintainer key(s) the collector offers"),
        "{err}"
    );
    let pinned = std::fs::read_to_string(tmp.join("trusting/maintainers.pem")).unwrap();
    assert_eq!(
        vedette_engine::bundle::PublicKey::parse_pem(&pinned).unwrap(),
        vedette_engine::bundle::PublicKey::load(&tmp.join("collector/maintainer.pub")).unwrap()
    );
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    rss_of(pid) / 1024
}

/// Appends a `[limits]` table to a collector's configuration.
fn set_limits(c: &Collector, limits: &str) {
    let path = c.dir.join("collector.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}\n[limits]\n{limits}\n")).unwrap();
}

/// A collector with `limits` in its `[limits]`, and one real agent watching a directory with
/// a rule matching `PROBE-MARKER` (see [`detection_latencies`]).
struct Probe {
    tmp: tempfile::TempDir,
    c: Collector,
    agent: Agent,
    watch: std::path::PathBuf,
}

fn probe_setup(limits: &str) -> Probe {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    set_limits(&c, limits);
    c.start();
    let watch = tmp.path().join("watch");
    std::fs::create_dir_all(&watch).unwrap();
    let rules = vedette_tests::rule_dir(&tmp.path().join("rules"), "probe", "PROBE-MARKER");
    let mut agent = Agent::enroll(&c, &tmp.path().join("agent"));
    agent.run_watching(&c, &watch, &rules);
    Probe {
        tmp,
        c,
        agent,
        watch,
    }
}

/// Writes `n` files with the rule's marker into `watch`, one at a time, each once the previous
/// one's detection is stored; returns how long each took from write to listing.
fn detection_latencies(
    c: &Collector,
    agent: &str,
    watch: &std::path::Path,
    n: usize,
) -> Vec<Duration> {
    let mut out = Vec::new();
    for i in 0..n {
        let before = stored_of(c, agent);
        let start = std::time::Instant::now();
        std::fs::write(
            watch.join(format!("probe-{i}.txt")),
            format!("PROBE-MARKER {i}"),
        )
        .unwrap();
        wait_for(Duration::from_secs(60), "the probe's detection", || {
            (stored_of(c, agent) > before).then_some(())
        });
        out.push(start.elapsed());
    }
    out
}

/// A cert-less call that holds its stream open: an enrollment whose request never comes.
async fn held_enrollment(addr: String, ca: String) -> (Duration, tonic::Code) {
    use vedette_proto::v1::{EnrollRequest, EnrollResponse};
    let start = std::time::Instant::now();
    let tls = ClientTls {
        ca_pem: ca,
        identity: None,
    };
    let code = match vedette_ops::client::connect(&addr, &tls).await {
        Err(_) => tonic::Code::Unavailable,
        Ok(ch) => {
            let mut grpc = tonic::client::Grpc::new(ch);
            match grpc.ready().await {
                Err(_) => tonic::Code::Unavailable,
                Ok(()) => {
                    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                        "/vedette.v1.AgentService/Enroll",
                    );
                    let codec = tonic_prost::ProstCodec::<EnrollRequest, EnrollResponse>::default();
                    let never = tokio_stream::pending::<EnrollRequest>();
                    match grpc
                        .client_streaming(tonic::Request::new(never), path, codec)
                        .await
                    {
                        Ok(_) => tonic::Code::Ok,
                        Err(s) => s.code(),
                    }
                }
            }
        }
    };
    (start.elapsed(), code)
}

#[test]
fn connections_without_a_certificate_and_oversized_enrollments_are_bounded_while_agents_deliver() {
    const HELD: usize = 200;
    const ALLOWED: usize = 150;
    let Probe {
        tmp: _tmp,
        c,
        mut agent,
        watch,
    } = probe_setup(&format!(
        "max_unauthenticated_connections = {ALLOWED}\nunauthenticated_timeout = \"4s\""
    ));
    let pid = c.proc.as_ref().unwrap().child.id();
    detection_latencies(&c, &agent.id, &watch, 1);
    let rss_before = rss_kib(pid);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ca = c.file("ca.crt");
    // Oversized enrollments: refused once the cap is passed, whatever size the frame claims.
    let oversized = rt.block_on(async {
        let tls = ClientTls {
            ca_pem: ca.clone(),
            identity: None,
        };
        let mut codes = Vec::new();
        for _ in 0..10 {
            let ch = vedette_ops::client::connect(&c.addr, &tls).await.unwrap();
            let r = vedette_proto::v1::agent_service_client::AgentServiceClient::new(ch)
                .enroll(vedette_proto::v1::EnrollRequest {
                    token: "x".repeat(200),
                    csr_pem: "A".repeat(8 * 1024 * 1024),
                    hostname: "big".into(),
                })
                .await;
            codes.push(r.map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code()));
        }
        codes
    });
    let held: Vec<_> = (0..HELD)
        .map(|_| rt.spawn(held_enrollment(c.addr.clone(), ca.clone())))
        .collect();
    // Without a certificate, nothing but enrollment is served.
    let anonymous_admin = rt.block_on(async {
        let tls = ClientTls {
            ca_pem: ca.clone(),
            identity: None,
        };
        let ch = vedette_ops::client::connect(&c.addr, &tls).await.unwrap();
        vedette_proto::v1::admin_service_client::AdminServiceClient::new(ch)
            .list_agents(vedette_proto::v1::ListAgentsRequest::default())
            .await
            .map(|_| ())
            .unwrap_err()
            .code()
    });
    // While the cert-less connections are held, the agent keeps delivering.
    let latencies = detection_latencies(&c, &agent.id, &watch, 3);
    let rss_during = rss_kib(pid);
    let ended: Vec<(Duration, tonic::Code)> =
        held.into_iter().map(|h| rt.block_on(h).unwrap()).collect();
    let rss_after = rss_kib(pid);
    eprintln!(
        "collector RSS: {rss_before} KiB before, {rss_during} KiB with {HELD} held connections, {rss_after} KiB after; probe latencies {latencies:?}"
    );
    assert!(
        oversized
            .iter()
            .all(|c| *c == tonic::Code::ResourceExhausted),
        "oversized enrollments: {oversized:?}"
    );
    assert_eq!(anonymous_admin, tonic::Code::Unauthenticated);
    // Past the cap, connections are closed at once; the others when their time is up (4 s).
    let refused = ended
        .iter()
        .filter(|(t, _)| *t < Duration::from_secs(3))
        .count();
    let timed_out = ended
        .iter()
        .filter(|(t, _)| *t >= Duration::from_secs(4))
        .count();
    assert!(
        refused >= HELD - ALLOWED,
        "{refused} refused at once: {ended:?}"
    );
    assert!(
        timed_out > 0 && timed_out <= ALLOWED,
        "{timed_out} held to the end: {ended:?}"
    );
    assert!(
        ended.iter().all(|(_, code)| *code != tonic::Code::Ok),
        "an enrollment without a request succeeded: {ended:?}"
    );
    let longest = ended.iter().map(|(t, _)| *t).max().unwrap();
    assert!(
        longest < Duration::from_secs(15),
        "a connection was held {longest:?}"
    );
    // Memory stays bounded: 200 held connections and 80 MiB of oversized requests cost the
    // collector less than 64 MiB.
    assert!(
        rss_during.saturating_sub(rss_before) < 64 * 1024,
        "RSS grew from {rss_before} to {rss_during} KiB"
    );
    assert!(
        latencies.iter().all(|l| *l < Duration::from_secs(10)),
        "{latencies:?}"
    );
    assert!(agent.proc.as_mut().unwrap().is_running());
}

#[test]
fn a_flooding_agent_is_slowed_down_and_does_not_delay_another_agents_detections() {
    const RATE: u64 = 2_000;
    const BURST: u64 = 2_000;
    const BATCH: usize = 100;
    let Probe {
        tmp: _tmp,
        c,
        agent,
        watch,
    } = probe_setup(&format!(
        "agent_detections_per_second = {RATE}\nagent_detections_burst = {BURST}"
    ));
    let quiet = detection_latencies(&c, &agent.id, &watch, 3);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let token = c.token(&[]);
    let (flooder, tls) = rt.block_on(enroll_simulated(&c, &token, 1)).remove(0);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(AtomicUsize::new(0));
    let (up, mut down) = rt.block_on(agent_stream(&c.addr, &tls)).unwrap();
    let started = std::time::Instant::now();
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        rt.spawn(async move {
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let detections = (0..BATCH)
                    .map(|_| Detection {
                        id: uuid::Uuid::new_v4().to_string(),
                        kind: 1,
                        rule: "flood".into(),
                        ..Default::default()
                    })
                    .collect();
                let msg = AgentMessage {
                    msg: Some(Msg::Batch(DetectionBatch { seq, detections })),
                };
                if up.send(msg).await.is_err() {
                    break;
                }
                sent.store(seq as usize * BATCH, Ordering::Relaxed);
            }
            up
        })
    };
    let reader = {
        let acked = acked.clone();
        rt.spawn(async move {
            while let Ok(Some(m)) = down.message().await {
                if let Some(Down::Ack(a)) = m.msg {
                    acked.store(a.seq as usize * BATCH, Ordering::Relaxed);
                }
            }
        })
    };
    wait_for(
        Duration::from_secs(30),
        "the flood to pass the burst",
        || (acked.load(Ordering::Relaxed) >= BURST as usize).then_some(()),
    );
    let flooded = detection_latencies(&c, &agent.id, &watch, 5);
    let elapsed = started.elapsed();
    let acked_then = acked.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let up = rt.block_on(sender).unwrap();
    // Delayed, not dropped: every batch sent is acknowledged in the end.
    let total = sent.load(Ordering::Relaxed);
    wait_for(
        Duration::from_secs(60),
        "every flood batch acknowledged",
        || (acked.load(Ordering::Relaxed) >= total).then_some(()),
    );
    drop(up);
    reader.abort();
    let allowed = BURST as f64 + RATE as f64 * elapsed.as_secs_f64() + 2.0 * BATCH as f64;
    eprintln!(
        "probe latency quiet {quiet:?}, during the flood {flooded:?}; flooder acked {acked_then} in {elapsed:?} (allowed {allowed:.0}); {total} sent, all acked"
    );
    assert!(
        (acked_then as f64) <= allowed,
        "the flooder got {acked_then} detections through in {elapsed:?}; its limit allows {allowed:.0}"
    );
    // The bound: another agent's detection is stored within 3 s of its file being written,
    // flood or not (quiet, it takes about 0.1 s with this polling).
    for l in &flooded {
        assert!(
            *l < Duration::from_secs(3),
            "a probe took {l:?} during the flood: {flooded:?}"
        );
    }
    assert_eq!(stored_of(&c, &flooder), total);
}

/// Copies a SQLite store's files (`vedette.db`, `-wal`, `-shm`) from one directory to another,
/// replacing what is there.
fn copy_store(from: &std::path::Path, to: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let name = format!("vedette.db{suffix}");
        let _ = std::fs::remove_file(to.join(&name));
        if from.join(&name).exists() {
            std::fs::copy(from.join(&name), to.join(&name)).unwrap();
        }
    }
}

#[test]
fn an_old_signed_bundle_replayed_after_the_agent_lost_its_bundle_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let watch = tmp.path().join("watch");
    std::fs::create_dir_all(&watch).unwrap();
    let mut agent = vedette_tests::Agent::enroll(&c, &tmp.path().join("agent"));
    let v1 = vedette_tests::rule_dir(&tmp.path().join("v1"), "old_rule", "OLD-MARKER");
    let v2 = vedette_tests::rule_dir(&tmp.path().join("v2"), "new_rule", "NEW-MARKER");
    let on_version = |c: &Collector, v: u64| {
        wait_for(
            Duration::from_secs(30),
            &format!("the agent on bundle {v}"),
            || {
                c.agents()
                    .into_iter()
                    .find(|a| a["bundle_version"] == v)
                    .map(|_| ())
            },
        )
    };
    c.ctl_ok(&["rules", "publish", v1.to_str().unwrap()]);
    agent.start(&["--watch", watch.to_str().unwrap()]);
    on_version(&c, 1);
    // What a collector knew when only version 1 existed: what it could replay later.
    c.stop();
    let snapshot = tmp.path().join("snapshot");
    std::fs::create_dir_all(&snapshot).unwrap();
    copy_store(&c.dir, &snapshot);
    c.start();
    c.ctl_ok(&["rules", "publish", v2.to_str().unwrap()]);
    on_version(&c, 2);

    // The agent loses its bundle; its collector offers version 1 again.
    agent.proc.as_mut().unwrap().signal_and_wait("TERM");
    std::fs::remove_file(agent.state.join("bundle.bin")).unwrap();
    c.stop();
    copy_store(&snapshot, &c.dir);
    c.start();
    agent.start(&["--watch", watch.to_str().unwrap()]);
    let row = wait_for(
        Duration::from_secs(30),
        "the replayed bundle refused",
        || agent.info(&c).filter(|a| a["bundle_failed_version"] == 1),
    );
    let error = row["bundle_error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains("older than version 2"),
        "bundle_error: {error}"
    );
    assert!(
        !agent.state.join("bundle.bin").exists(),
        "the old bundle was saved"
    );
    assert_eq!(
        std::fs::read_to_string(agent.state.join("bundle.highest"))
            .unwrap()
            .trim(),
        "2"
    );
}

/// Renews `tls`'s certificate over the agent RPC with a new key; the new identity.
async fn renew_over_rpc(addr: &str, tls: &ClientTls) -> Result<ClientTls, tonic::Status> {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .unwrap();
    let ch = vedette_ops::client::connect(addr, tls).await.unwrap();
    let r = vedette_proto::v1::agent_service_client::AgentServiceClient::new(ch)
        .renew(vedette_proto::v1::RenewRequest { csr_pem: csr })
        .await?
        .into_inner();
    Ok(ClientTls {
        ca_pem: tls.ca_pem.clone(),
        identity: Some((r.certificate_pem, key.serialize_pem())),
    })
}

/// One `Ping` with `tls`'s certificate.
async fn ping(addr: &str, tls: &ClientTls) -> Result<(), tonic::Status> {
    let ch = vedette_ops::client::connect(addr, tls)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    vedette_proto::v1::agent_service_client::AgentServiceClient::new(ch)
        .ping(vedette_proto::v1::PingRequest {})
        .await
        .map(|_| ())
}

/// The serial number `vedettectl certs list` shows for `subject`'s certificates.
fn certs_of(c: &Collector, subject: &str) -> Vec<serde_json::Value> {
    json_lines(&c.ctl_ok(&["certs", "list", "--json"]))
        .into_iter()
        .filter(|r| r["subject"] == subject)
        .collect()
}

#[test]
fn agents_renew_their_certificates_and_a_revoked_operator_certificate_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    set_limits(&c, "agent_cert_lifetime = \"30s\"");
    c.start();
    let watch = tmp.path().join("watch");
    std::fs::create_dir_all(&watch).unwrap();
    let rules = vedette_tests::rule_dir(&tmp.path().join("rules"), "probe", "PROBE-MARKER");
    let mut agent = vedette_tests::Agent::enroll(&c, &tmp.path().join("agent"));
    let first = agent.file("agent.crt");
    let enrolled = std::time::Instant::now();
    let first_serial = certs_of(&c, &agent.id)[0]["serial"]
        .as_str()
        .unwrap()
        .to_string();
    // A second agent, driven by the test over the renewal RPC itself.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (sim_id, sim) = rt
        .block_on(enroll_simulated(&c, &c.token(&[]), 1))
        .remove(0);
    let renew = |tls: &ClientTls| rt.block_on(renew_over_rpc(&c.addr, tls));
    let early = renew(&sim).err().expect("an early renewal refused");
    assert_eq!(early.code(), tonic::Code::FailedPrecondition, "{early}");
    assert!(early.message().contains("renewal opens in"), "{early}");
    let config = tmp.path().join("agent.toml");
    std::fs::write(&config, "heartbeat = \"1s\"\n").unwrap();
    agent.run(
        &c,
        &[
            "--config",
            config.to_str().unwrap(),
            "--watch",
            watch.to_str().unwrap(),
            "--rules",
            rules.to_str().unwrap(),
        ],
    );
    // Renewed at two thirds of its 30 s (plus 3 s backdated): about 17 s after enrollment.
    wait_for(
        Duration::from_secs(40),
        "the agent certificate renewed",
        || (agent.file("agent.crt") != first).then_some(()),
    );
    // Used, the renewed certificate retires the one it replaced.
    wait_for(
        Duration::from_secs(20),
        "the replaced certificate revoked",
        || {
            certs_of(&c, &agent.id)
                .iter()
                .any(|r| r["serial"] == first_serial.as_str() && r["revoked"] == true)
                .then_some(())
        },
    );
    // Two thirds into its life, the second agent renews once; at once again, it is refused.
    let renewed = renew(&sim).expect("a renewal in the last third");
    let again = renew(&sim).err().expect("a second renewal at once refused");
    assert_eq!(again.code(), tonic::Code::ResourceExhausted, "{again}");
    // Its old certificate works until the new one is used, and then never again.
    rt.block_on(ping(&c.addr, &sim))
        .expect("the old certificate, not replaced yet");
    rt.block_on(ping(&c.addr, &renewed))
        .expect("the renewed certificate");
    wait_for(
        Duration::from_secs(20),
        "the old certificate refused",
        || {
            rt.block_on(ping(&c.addr, &sim))
                .err()
                .filter(|e| e.message().contains("revoked"))
        },
    );
    assert!(
        certs_of(&c, &sim_id).iter().any(|r| r["revoked"] == false),
        "the renewed certificate stays valid"
    );
    let mode = std::fs::metadata(agent.state.join("agent.key"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // Past the first certificate's end, the agent still delivers.
    wait_for(
        Duration::from_secs(40),
        "the first certificate expired",
        || (enrolled.elapsed() > Duration::from_secs(32)).then_some(()),
    );
    detection_latencies(&c, &agent.id, &watch, 1);
    let certs = certs_of(&c, &agent.id);
    assert!(certs.len() >= 2, "{certs:?}");
    assert!(certs.iter().all(|r| r["kind"] == "agent"), "{certs:?}");

    // An operator certificate issued, used, revoked: refused from then on.
    let out = std::process::Command::new(vedette_tests::bin("vedette-collector"))
        .args(["certs", "issue", "--config"])
        .arg(c.dir.join("collector.toml"))
        .args(["--name", "mallory", "--role", "operator", "--out"])
        .arg(c.dir.join("mallory"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mallory = c.dir.join("mallory.toml");
    std::fs::write(
        &mallory,
        format!(
            "collector = \"{}\"\nca_cert = \"ca.crt\"\ncert = \"mallory.crt\"\nkey = \"mallory.key\"\n",
            c.addr
        ),
    )
    .unwrap();
    let as_mallory = || vedette_tests::vedettectl(&mallory, &["agents", "list"]);
    assert!(as_mallory().status.success());
    let listed = certs_of(&c, "mallory");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["revoked"], false);
    let serial = listed[0]["serial"].as_str().unwrap().to_string();
    let out = c.ctl_ok(&[
        "certs",
        "revoke",
        "--cert",
        c.dir.join("mallory.crt").to_str().unwrap(),
    ]);
    assert!(out.contains(&serial) && out.contains("mallory"), "{out}");
    let refused = as_mallory();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("revoked"),
        "{err}"
    );
    assert_eq!(certs_of(&c, "mallory")[0]["revoked"], true);
    // Refused again after a restart: the revocation is in the store.
    c.stop();
    c.start();
    let err = String::from_utf8_lossy(&as_mallory().stderr).into_owned();
    assert!(err.contains("revoked"), "{err}");
    // The operator who revoked it is not affected.
    c.ctl_ok(&["agents", "list"]);
}
