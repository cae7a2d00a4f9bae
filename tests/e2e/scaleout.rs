//! Several collectors sharing one PostgreSQL database: one token enrolls once whichever
//! collectors get it, a bundle published through one reaches agents on the other, an agent
//! fails over when its collector is killed with every detection stored once, and a revocation
//! through one closes the stream held by the other, while a `NOTIFY` the store does not back
//! changes nothing. Needs `VEDETTE_TEST_POSTGRES` (set by
//! `.ci/run`); without it the test says so and skips.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use vedette_tests::{Agent, Collector, PgDb, rule_dir, wait_for};

const RULE: &str = "scaleout_marker";
const MARKER: &str = "VEDETTE-SCALEOUT-MARKER";

fn marker_paths(c: &Collector) -> Vec<String> {
    c.detections()
        .into_iter()
        .filter(|d| d["rule"] == RULE)
        .filter_map(|d| d["path"].as_str().map(str::to_string))
        .collect()
}

fn agent_row(c: &Collector, id: &str) -> Option<Value> {
    c.agents().into_iter().find(|a| a["id"] == id)
}

fn log_of(c: &Collector) -> String {
    c.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
}

fn yara(dir: &Path, name: &str, marker: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join(format!("{name}.yar")),
        format!("rule {name} {{ strings: $m = \"{marker}\" condition: $m }}\n"),
    )
    .unwrap();
}

#[test]
fn two_collectors_on_one_postgres_database_serve_one_fleet() {
    let Some(db) = PgDb::create("scaleout") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Collector::init_with_store(&tmp.path().join("collector"), &db.url);
    a.start();
    let mut b = a.second("-b");
    b.start();

    // One single-use token, sent to both collectors at the same moment: one enrollment.
    let token = a.token(&[]);
    let barrier = std::sync::Barrier::new(2);
    let outs: Vec<std::process::Output> = std::thread::scope(|s| {
        let runs: Vec<_> = [(&a, "race-a"), (&b, "race-b")]
            .into_iter()
            .map(|(c, dir)| {
                let (barrier, token, state) = (&barrier, &token, tmp.path().join(dir));
                s.spawn(move || {
                    barrier.wait();
                    Agent::try_enroll(c, &state, token)
                })
            })
            .collect();
        runs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let enrolled = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(enrolled, 1, "{outs:?}");
    let refused = outs.iter().find(|o| !o.status.success()).unwrap();
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("already been used"),
        "{refused:?}"
    );

    // An agent that knows both, on A first.
    let mut agent = Agent::enroll(&a, &tmp.path().join("agent"));
    let watch = tmp.path().join("watch");
    std::fs::create_dir(&watch).unwrap();
    let rules = rule_dir(&tmp.path().join("rules"), RULE, MARKER);
    let config = tmp.path().join("agent.toml");
    let extra = format!(
        "collectors = [{:?}, {:?}]\nevent_source = \"inotify\"",
        a.addr, b.addr
    );
    vedette_tests::watch_config(&config, &watch, &rules, &extra);
    agent.run(&a, &["--config", config.to_str().unwrap()]);
    assert!(log_of(&a).contains(&format!("agent connected agent={}", agent.id)));

    // Published through B: the agent on A applies it.
    let v1 = tmp.path().join("v1");
    yara(&v1, "scaleout_bundle", "VEDETTE-SCALEOUT-BUNDLE");
    let out = b.ctl(&["rules", "publish", v1.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let published = Instant::now();
    wait_for(
        Duration::from_secs(30),
        "the agent on A to apply v1",
        || agent_row(&a, &agent.id).filter(|r| r["bundle_version"] == 1),
    );
    eprintln!(
        "bundle published through B applied by the agent on A after {:?}",
        published.elapsed()
    );

    // A hunt started through B is answered by the agent on A.
    let hunted = b.ctl(&["hunt", "--md5", &"0".repeat(32)]);
    assert!(hunted.status.success(), "{hunted:?}");
    let id = String::from_utf8_lossy(&hunted.stdout).trim().to_string();
    wait_for(
        Duration::from_secs(30),
        "the agent on A to answer B's hunt",
        || {
            let out = a.ctl(&["hunt", "show", &id, "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["hunt"]["answered"] == 1).then_some(())
        },
    );

    // A is killed while 5,000 detections stream in: the agent fails over to B. The second
    // half is written after the kill, so B takes part of the stream for sure.
    let write = |range: std::ops::Range<u32>| {
        let dir = watch.clone();
        std::thread::spawn(move || {
            for i in range {
                std::fs::write(dir.join(format!("m{i:05}")), format!("{MARKER} {i}\n")).unwrap();
            }
        })
    };
    let first = write(0..2500);
    wait_for(Duration::from_secs(60), "the first detections", || {
        (!marker_paths(&b).is_empty()).then_some(())
    });
    a.kill();
    let at_kill = marker_paths(&b).len();
    first.join().unwrap();
    write(2500..5000).join().unwrap();
    let stored = wait_for(
        Duration::from_secs(180),
        "5,000 detections through B",
        || {
            let p = marker_paths(&b);
            (p.len() >= 5000).then_some(p)
        },
    );
    let distinct: BTreeSet<&String> = stored.iter().collect();
    assert_eq!(distinct.len(), 5000);
    assert_eq!(stored.len(), 5000, "every detection stored once");
    assert!(log_of(&b).contains(&format!("agent connected agent={}", agent.id)));
    eprintln!("{at_kill} of 5,000 stored when A was killed");

    // A comes back; revoked through A, the stream the agent holds on B closes.
    a.start();
    let out = a.ctl(&["agents", "revoke", &agent.id]);
    assert!(out.status.success(), "{out:?}");
    let revoked = Instant::now();
    wait_for(
        Duration::from_secs(10),
        "B to close the revoked agent's stream",
        || {
            log_of(&b)
                .contains("agent revoked through another collector: stream closed")
                .then_some(())
        },
    );
    eprintln!(
        "stream on B closed {:?} after the revoke through A",
        revoked.elapsed()
    );
    wait_for(
        Duration::from_secs(10),
        "the agent shown disconnected",
        || agent_row(&b, &agent.id).filter(|r| r["connected"] == false && r["state"] == "revoked"),
    );
    // It is refused everywhere from now on.
    wait_for(Duration::from_secs(20), "the agent to be refused", || {
        agent
            .log()
            .contains("this agent has been revoked")
            .then_some(())
    });
}

#[test]
fn two_collectors_export_each_detection_once_through_a_shared_sink() {
    let Some(db) = PgDb::create("scaleout_sink") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Collector::init_with_store(&tmp.path().join("collector"), &db.url);
    let sink = tmp.path().join("detections.jsonl");
    let toml = a.dir.join("collector.toml");
    let mut text = std::fs::read_to_string(&toml).unwrap();
    text.push_str(&format!(
        "\n[[export.jsonl]]\npath = \"{}\"\n",
        sink.display()
    ));
    std::fs::write(&toml, text).unwrap();
    a.start();
    let mut b = a.second("-b");
    b.start();
    let rules = rule_dir(&tmp.path().join("rules"), RULE, MARKER);
    let mut agents = Vec::new();
    for (i, c) in [&a, &b].into_iter().enumerate() {
        let mut agent = Agent::enroll(c, &tmp.path().join(format!("agent{i}")));
        let watch = tmp.path().join(format!("watch{i}"));
        std::fs::create_dir(&watch).unwrap();
        agent.run(
            c,
            &[
                "--watch",
                watch.to_str().unwrap(),
                "--rules",
                rules.to_str().unwrap(),
            ],
        );
        agents.push((agent, watch));
    }
    for (_, watch) in &agents {
        for n in 0..30 {
            std::fs::write(watch.join(format!("m{n}.txt")), MARKER).unwrap();
        }
    }
    let lines = wait_for(
        Duration::from_secs(60),
        "every detection in the sink",
        || {
            // In this order: all 60 stored, then the stored count, then the sink, so the
            // count compared is never older than the 60.
            if marker_paths(&a).len() != 60 {
                return None;
            }
            let stored = a.detections().len();
            let lines: Vec<Value> = vedette_tests::sink_lines(&sink);
            (lines.len() >= stored).then_some(lines)
        },
    );
    let ids: BTreeSet<&str> = lines
        .iter()
        .map(|l| l["event"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), lines.len(), "a detection was exported twice");
    assert_eq!(ids.len(), a.detections().len());
    // One collector holds the sink's lease and exports; the other waits. (Its log line comes
    // just after the lines it wrote: waited for.)
    let exporting = wait_for(
        Duration::from_secs(20),
        "a collector to log its exports",
        || {
            let n = [&a, &b]
                .iter()
                .filter(|c| log_of(c).contains("detections exported"))
                .count();
            (n > 0).then_some(n)
        },
    );
    assert_eq!(exporting, 1, "A:\n{}\nB:\n{}", log_of(&a), log_of(&b));
}

/// Any role that may connect to the shared database may `NOTIFY` on the collectors' channel:
/// an event that the store does not back (a revocation nobody made) changes nothing.
#[test]
fn a_notify_from_an_unprivileged_database_role_revokes_nothing() {
    let Some(db) = PgDb::create("spoofed_notify") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init_with_store(&tmp.path().join("collector"), &db.url);
    c.start();
    let mut agent = Agent::enroll(&c, &tmp.path().join("agent"));
    let watch = tmp.path().join("watch");
    std::fs::create_dir(&watch).unwrap();
    let rules = rule_dir(&tmp.path().join("rules"), RULE, MARKER);
    let config = tmp.path().join("agent.toml");
    vedette_tests::watch_config(&config, &watch, &rules, "event_source = \"inotify\"");
    agent.run(&c, &["--config", config.to_str().unwrap()]);
    let certs = vedette_tests::json_lines(&c.ctl_ok(&["certs", "list", "--json"]));
    let serial = certs
        .iter()
        .find(|x| x["subject"] == agent.id.as_str())
        .and_then(|x| x["serial"].as_str())
        .expect("the agent's certificate")
        .to_string();

    // A role with no privilege on any table, only the database's default CONNECT.
    let role = format!("vedette_nobody_{}", std::process::id());
    let mut admin = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN"
        ))
        .unwrap();
    let mut cfg: postgres::Config = db.url.parse().unwrap();
    cfg.user(&role);
    let mut nobody = cfg.connect(postgres::NoTls).unwrap();
    assert!(
        nobody.batch_execute("SELECT count(*) FROM agents").is_err(),
        "the role reads no table"
    );
    nobody
        .batch_execute(&format!(
            "NOTIFY vedette_events, 'cert:{serial}'; NOTIFY vedette_events, 'revoked:{}'",
            agent.id
        ))
        .unwrap();
    drop(nobody);
    wait_for(Duration::from_secs(10), "both events ignored", || {
        let log = log_of(&c);
        (log.contains("ignored a revocation the store does not hold")
            && log.contains("ignored a certificate revocation the store does not hold"))
        .then_some(())
    });
    admin.batch_execute(&format!("DROP ROLE {role}")).unwrap();

    // The agent keeps its stream and its certificate: a new detection is stored.
    std::fs::write(watch.join("after"), format!("{MARKER} after\n")).unwrap();
    wait_for(
        Duration::from_secs(30),
        "a detection after the NOTIFY",
        || {
            marker_paths(&c)
                .iter()
                .any(|p| p.ends_with("/after"))
                .then_some(())
        },
    );
    let row = agent_row(&c, &agent.id).unwrap();
    assert_eq!(row["state"], "connected", "{row}");
    assert!(!log_of(&c).contains("stream closed"), "{}", log_of(&c));
}
