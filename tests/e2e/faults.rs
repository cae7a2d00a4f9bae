//! Faults the fleet survives, with real processes: the database restarting under a stream of
//! detections from several agents, the collector's disk and the agent's disk filling up, and a
//! bad link (latency, a bandwidth cap, cut connections and a blackhole) made by a proxy.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vedette_tests::{
    Agent, Collector, PgCluster, Tmpfs, cpu_ticks, http_get, rule_dir, wait_for, wait_until,
};

const RULE: &str = "fault_marker";
const MARKER: &str = "VEDETTE-FAULT-MARKER";

/// How long the database stays down: the fault itself, not a wait for anything.
const OUTAGE: Duration = Duration::from_secs(10);

/// How long the bad link answers nothing: the fault itself.
const BLACKHOLE: Duration = Duration::from_secs(30);

/// Files (so detections) per agent: 5,000 in all.
const PER_AGENT: [u32; 3] = [1_667, 1_667, 1_666];

/// Writes marker files `range` into `dir`, each its own detection.
fn write_markers(dir: &Path, agent: usize, range: std::ops::Range<u32>) {
    for i in range {
        std::fs::write(
            dir.join(format!("a{agent}-{i:05}")),
            format!("{MARKER} {agent} {i}\n"),
        )
        .unwrap();
    }
}

/// The value of `vedette_collector_store_errors_total` (0 when absent).
fn store_errors(c: &Collector) -> Result<f64, String> {
    let (_, body) = http_get(&c.metrics_addr, "/metrics")?;
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix("vedette_collector_store_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// Waits until the collector counted a failed store call.
fn store_errors_counted(c: &Collector) {
    wait_until(
        Duration::from_secs(60),
        "store errors counted",
        || match store_errors(c)? {
            n if n > 0.0 => Ok(()),
            _ => Err("store_errors_total is 0".to_string()),
        },
    );
}

/// A collector whose configuration starts with `line` (a top-level key), not started.
fn collector_with(dir: &Path, line: &str) -> Collector {
    let c = Collector::init(dir);
    let toml = c.dir.join("collector.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(&toml, format!("{line}\n{text}")).unwrap();
    c
}

#[test]
fn a_postgresql_restart_mid_stream_loses_nothing_and_needs_no_collector_restart() {
    let Some(pg) = PgCluster::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init_with_store(&tmp.path().join("collector"), &pg.url());
    c.start();
    let rules = rule_dir(&tmp.path().join("rules"), RULE, MARKER);
    let agents: Vec<(Agent, PathBuf)> = (0..PER_AGENT.len())
        .map(|i| Agent::watching(&c, &tmp.path().join(format!("agent{i}")), &rules))
        .collect();

    // A third of each agent's files while the database is up; the rest while it is down.
    for (i, (_, watch)) in agents.iter().enumerate() {
        write_markers(watch, i, 0..PER_AGENT[i] / 3);
    }
    wait_for(
        Duration::from_secs(60),
        "detections stored before the outage",
        || (!c.detections().is_empty()).then_some(()),
    );
    pg.stop_fast();
    for (i, (_, watch)) in agents.iter().enumerate() {
        write_markers(watch, i, PER_AGENT[i] / 3..PER_AGENT[i]);
    }
    // The collector sees the outage, counts it, and stays up; `doctor` names it.
    store_errors_counted(&c);
    let doctor = std::process::Command::new(vedette_tests::bin("vedette-collector"))
        .args(["doctor", "--config"])
        .arg(c.dir.join("collector.toml"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert!(!doctor.status.success(), "doctor saw no problem: {report}");
    assert!(
        report
            .lines()
            .any(|l| l.contains("store") && !l.starts_with("ok")),
        "doctor did not name the store: {report}"
    );
    std::thread::sleep(OUTAGE);
    assert!(
        c.proc.as_mut().unwrap().is_running(),
        "the collector stopped"
    );
    pg.start_again();

    // Every detection is stored once, by the same collector process: its pool reconnected.
    let total: u32 = PER_AGENT.iter().sum();
    let stored = wait_until(
        Duration::from_secs(180),
        &format!("{total} detections stored"),
        || {
            let paths: Vec<String> = c
                .detections()
                .iter()
                .filter(|d| d["rule"] == RULE)
                .map(|d| d["path"].as_str().unwrap_or_default().to_string())
                .collect();
            let distinct = paths.iter().collect::<BTreeSet<_>>().len();
            if distinct >= total as usize {
                Ok(paths)
            } else {
                Err(format!("{distinct} stored"))
            }
        },
    );
    assert_eq!(stored.len(), total as usize, "a detection was stored twice");
    let log = c.proc.as_ref().unwrap().log_text();
    // One outage, logged once when it starts and once when it ends, however many calls failed.
    assert_eq!(
        log.matches("store error:").count(),
        1,
        "the outage was not logged once: {log}"
    );
    assert!(log.contains("the store works again"), "{log}");
    // A clean stop: exit 0, no panic (the database client once panicked in a destructor).
    let log_path = c.proc.as_ref().unwrap().log.clone();
    let status = c.stop();
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    assert!(status.success(), "the collector's stop: {status:?}\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    drop(agents);
}

/// Marker detections stored: (all of them, distinct paths).
fn stored_markers(c: &Collector) -> (usize, usize) {
    stored_matching(c, "")
}

/// Marker detections stored whose path contains `part`: (all of them, distinct paths).
fn stored_matching(c: &Collector, part: &str) -> (usize, usize) {
    let paths: Vec<String> = c
        .detections()
        .into_iter()
        .filter(|d| d["rule"] == RULE)
        .filter_map(|d| d["path"].as_str().map(str::to_string))
        .filter(|p| p.contains(part))
        .collect();
    let distinct = paths.iter().collect::<BTreeSet<_>>().len();
    (paths.len(), distinct)
}

#[test]
fn a_full_disk_under_the_collector_acknowledges_nothing_it_did_not_write_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // Room, once the filler is gone, for the store with its write-ahead log (up to 4 MiB
    // before a checkpoint) and the sink's 2,000 lines.
    let disk = match Tmpfs::mount_sized(&tmp.path().join("disk"), "16m") {
        Ok(d) => d,
        Err(e) => {
            vedette_tests::missing_root(&e);
            return;
        }
    };
    // The store and the JSONL sink on the small disk; the rest (logs, certificates) elsewhere.
    let store = format!("sqlite:{}", disk.path.join("vedette.db").display());
    let mut c = Collector::init_with_store(&tmp.path().join("collector"), &store);
    let sink = disk.path.join("detections.jsonl");
    crate::intel::configure(&c, &format!("[[export.jsonl]]\npath = {:?}\n", sink));
    c.start();
    let rules = rule_dir(&tmp.path().join("rules"), RULE, MARKER);
    let (agent, watch) = Agent::watching(&c, &tmp.path().join("agent"), &rules);
    write_markers(&watch, 0, 0..200);
    wait_for(Duration::from_secs(60), "200 detections stored", || {
        (stored_markers(&c).1 >= 200).then_some(())
    });

    // The disk fills; 1,800 more detections come.
    let filler = disk.fill("filler");
    write_markers(&watch, 0, 200..2000);
    store_errors_counted(&c);
    // What was not written is not acknowledged: the agent holds it.
    wait_until(
        Duration::from_secs(30),
        "detections held by the agent",
        || {
            let pending = agent
                .spool()
                .and_then(|s| s["pending"].as_u64())
                .unwrap_or(0);
            if pending > 0 {
                Ok(())
            } else {
                Err(format!("{pending} pending"))
            }
        },
    );
    let (during, _) = stored_markers(&c);
    assert!(during < 2000, "everything stored on a full disk?");
    assert!(
        c.proc.as_mut().unwrap().is_running(),
        "the collector stays up"
    );

    // Space again: everything arrives, once, in the store and in the sink.
    std::fs::remove_file(&filler).unwrap();
    wait_until(
        Duration::from_secs(180),
        "2,000 detections stored",
        || match stored_markers(&c) {
            (all, distinct) if distinct >= 2000 => {
                assert_eq!(all, distinct, "a detection was stored twice");
                Ok(())
            }
            (_, distinct) => Err(format!("{distinct} stored")),
        },
    );
    wait_until(Duration::from_secs(120), "2,000 lines in the sink", || {
        let lines = vedette_tests::sink_lines(&sink);
        let markers: Vec<&serde_json::Value> =
            lines.iter().filter(|l| l["rule"]["name"] == RULE).collect();
        let ids: BTreeSet<String> = markers
            .iter()
            .map(|l| l["event"]["id"].to_string())
            .collect();
        assert_eq!(ids.len(), markers.len(), "a line written twice");
        if markers.len() >= 2000 {
            Ok(())
        } else {
            Err(format!("{} lines", markers.len()))
        }
    });
    let log = c.proc.as_ref().unwrap().log_text();
    assert!(log.contains("store error:"), "{log}");
    assert!(
        log.contains("disk is full") || log.contains("No space left"),
        "the error says why: {log}"
    );
    assert!(log.contains("the store works again"), "{log}");
}

#[test]
fn agents_an_hour_ahead_or_behind_deliver_and_show_their_skew() {
    // libfaketime, preloaded into the agent itself (the `faketime` program would stand
    // between the test and the agent, which would outlive it).
    let Some(lib) = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|arch| arch.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
    else {
        vedette_tests::missing_peer("libfaketime", "apt-get install faketime");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let rules = rule_dir(&tmp.path().join("rules"), RULE, MARKER);
    let mut skewed = Vec::new();
    for (name, offset) in [("ahead", "+1h"), ("behind", "-1h")] {
        let dir = tmp.path().join(name);
        let mut agent = Agent::enroll(&c, &dir.join("state"));
        let watch = dir.join("watch");
        std::fs::create_dir_all(&watch).unwrap();
        let config = dir.join("agent.toml");
        vedette_tests::watch_config(&config, &watch, &rules, "");
        // The agent's clock only: its monotonic clock stays true.
        agent.env.extend([
            ("LD_PRELOAD".into(), lib.display().to_string()),
            ("FAKETIME".into(), offset.into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ]);
        agent.start(&["--config", config.to_str().unwrap()]);
        skewed.push((name, agent, watch));
    }
    for (i, (name, agent, watch)) in skewed.iter().enumerate() {
        wait_until(
            Duration::from_secs(30),
            &format!("the {name} agent connected"),
            || {
                c.agents()
                    .iter()
                    .any(|a| a["id"] == agent.id.as_str() && a["connected"] == true)
                    .then_some(())
                    .ok_or_else(|| agent.log())
            },
        );
        write_markers(watch, i, 0..3);
    }
    let expected = |name: &str| {
        if name == "ahead" {
            3_600_000
        } else {
            -3_600_000
        }
    };
    for (name, agent, watch) in &skewed {
        // Stored, with the agent's time as observed_at and the collector's as received_at.
        let stored = wait_for(
            Duration::from_secs(60),
            &format!("the {name} agent's detections"),
            || {
                let d: Vec<serde_json::Value> = c
                    .detections()
                    .into_iter()
                    .filter(|d| {
                        d["path"]
                            .as_str()
                            .is_some_and(|p| p.starts_with(watch.to_str().unwrap()))
                    })
                    .collect();
                (d.len() >= 3).then_some(d)
            },
        );
        for d in &stored {
            let at = |key: &str| {
                humantime::parse_rfc3339(d[key].as_str().unwrap())
                    .unwrap()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as i64
            };
            let gap = at("observed_at") - at("received_at");
            assert!(
                (gap - expected(name)).abs() < 60_000,
                "{name}: observed {gap} ms from received: {d}"
            );
        }
        // Seen at a heartbeat, and told by `agents list`.
        let skew = wait_for(Duration::from_secs(30), "the skew recorded", || {
            c.agents()
                .into_iter()
                .find(|a| a["id"] == agent.id.as_str())
                .and_then(|a| a["clock_skew_ms"].as_i64())
                .filter(|s| *s != 0)
        });
        assert!((skew - expected(name)).abs() < 60_000, "{name}: {skew}");
    }
    let table = c.ctl_ok(&["agents", "list"]);
    assert!(
        table.contains("clock 1h 0m") && table.contains("ahead") && table.contains("behind"),
        "{table}"
    );
}

#[test]
fn a_frozen_or_killed_agent_is_reported_silent_and_a_stopped_one_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = collector_with(&tmp.path().join("collector"), "silent_after = \"3s\"");
    c.start();
    let rules = rule_dir(&tmp.path().join("rules"), RULE, MARKER);
    let mut agents: Vec<(Agent, PathBuf)> = ["stopped", "frozen", "killed"]
        .iter()
        .map(|name| Agent::watching(&c, &tmp.path().join(name), &rules))
        .collect();
    let ids: Vec<String> = agents.iter().map(|(a, _)| a.id.clone()).collect();
    // A clean stop first: it has been quiet the longest when the others are reported.
    let status = agents[0].0.proc.as_mut().unwrap().signal_and_wait("TERM");
    assert!(status.success(), "{status}");
    agents[1].0.proc.as_ref().unwrap().signal("STOP");
    agents[2].0.proc.as_mut().unwrap().signal_and_wait("KILL");
    let silent = |id: &str| {
        c.detections()
            .into_iter()
            .filter(|d| d["rule"] == "vedette.agent_silent" && d["agent_id"] == id)
            .collect::<Vec<_>>()
    };
    for id in &ids[1..] {
        let found = wait_for(Duration::from_secs(60), "a silent agent reported", || {
            let d = silent(id);
            (!d.is_empty()).then_some(d)
        });
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0]["kind"], "agent", "{}", found[0]);
        assert!(
            found[0]["description"]
                .as_str()
                .is_some_and(|d| d.contains("silent since")),
            "{}",
            found[0]
        );
    }
    assert!(silent(&ids[0]).is_empty(), "a clean stop is not silence");
    let stopped = c
        .agents()
        .into_iter()
        .find(|a| a["id"] == ids[0].as_str())
        .unwrap();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    // Reported once, however often the collector looks.
    let log = c.proc.as_ref().unwrap().log_text();
    let reported = log
        .lines()
        .filter(|l| l.contains("agent reported as a detection") && l.contains("agent_silent"))
        .count();
    assert_eq!(reported, 2, "{log}");
    agents[1].0.proc.as_ref().unwrap().signal("CONT");
}

#[test]
fn an_agent_that_stays_behind_the_latest_bundle_is_reported_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = collector_with(&tmp.path().join("collector"), "stale_after = \"2s\"");
    c.start();
    // The agent pins a maintainer key of its own; the bundle comes signed by another one the
    // collector trusts, so the agent refuses it and stays on what it had.
    let alice = tmp.path().join("alice");
    c.ctl_ok(&["keys", "generate", "--out", alice.to_str().unwrap()]);
    let alice_pub = tmp.path().join("alice.pub");
    let mut agent = Agent::enroll_with(
        &c,
        &tmp.path().join("agent"),
        &["--maintainer-key", alice_pub.to_str().unwrap()],
    );
    let watch = tmp.path().join("watch");
    std::fs::create_dir(&watch).unwrap();
    let config = tmp.path().join("agent.toml");
    let rules = rule_dir(&tmp.path().join("rules"), RULE, MARKER);
    vedette_tests::watch_config(&config, &watch, &rules, "");
    agent.run(&c, &["--config", config.to_str().unwrap()]);
    let v1 = rule_dir(&tmp.path().join("v1"), "bundle_rule", "VEDETTE-STALE");
    c.ctl_ok(&["rules", "publish", v1.to_str().unwrap()]);
    let found = wait_for(Duration::from_secs(60), "the stale agent reported", || {
        let d: Vec<serde_json::Value> = c
            .detections()
            .into_iter()
            .filter(|d| d["rule"] == "vedette.agent_stale_bundle")
            .collect();
        (!d.is_empty()).then_some(d)
    });
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["agent_id"], agent.id.as_str());
    let what = found[0]["description"].as_str().unwrap_or_default();
    assert!(
        what.contains("runs bundle version 0 while version 1")
            && what.contains("failed to apply version 1"),
        "{what}"
    );
    // Once per version, however often the collector looks.
    let log = c.proc.as_ref().unwrap().log_text();
    assert_eq!(
        log.matches("agent reported as a detection").count(),
        1,
        "{log}"
    );
}

#[test]
fn a_full_disk_under_the_agent_drops_repeats_first_counts_them_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let rules = tmp.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    for (name, marker, score) in [
        ("flood_marker", "VEDETTE-FLOOD-MARKER", 10),
        ("rare_marker", "VEDETTE-RARE-MARKER", 90),
    ] {
        std::fs::write(
            rules.join(format!("{name}.yar")),
            format!(
                "rule {name} {{\n  meta:\n    score = {score}\n  strings:\n    $m = \"{marker}\"\n  condition:\n    $m\n}}\n"
            ),
        )
        .unwrap();
    }
    let dir = tmp.path().join("agent");
    let mut agent = Agent::enroll(&c, &dir.join("state"));
    // The spool on a small disk of its own; the rest of the state (and the log) elsewhere.
    let disk = match Tmpfs::mount_sized(&dir.join("state/spool"), "3m") {
        Ok(d) => d,
        Err(e) => {
            vedette_tests::missing_root(&e);
            return;
        }
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&disk.path, std::fs::Permissions::from_mode(0o700)).unwrap();
    let watch = dir.join("watch");
    std::fs::create_dir_all(&watch).unwrap();
    let config = dir.join("agent.toml");
    vedette_tests::watch_config(&config, &watch, &rules, "spool_max_bytes = 1048576");
    agent.run(&c, &["--config", config.to_str().unwrap()]);
    c.stop();

    // One rare, high-score detection; then the disk fills, and a flood of one low-score rule.
    std::fs::write(watch.join("rare"), "VEDETTE-RARE-MARKER\n").unwrap();
    let pending = |agent: &Agent| {
        let s = agent.spool().unwrap_or_default();
        (
            s["pending"].as_u64().unwrap_or(0),
            s["dropped_total"].as_u64().unwrap_or(0),
        )
    };
    wait_for(
        Duration::from_secs(30),
        "the rare detection spooled",
        || (pending(&agent).0 == 1).then_some(()),
    );
    let filler = disk.fill("filler");
    let flood = 3000u64;
    for i in 0..flood {
        std::fs::write(
            watch.join(format!("f{i:05}")),
            format!("VEDETTE-FLOOD-MARKER {i}\n"),
        )
        .unwrap();
    }
    wait_until(
        Duration::from_secs(120),
        "every detection spooled or counted as dropped",
        || match pending(&agent) {
            (p, d) if p + d > flood && d > 0 => Ok(()),
            (p, d) => Err(format!("{p} pending, {d} dropped")),
        },
    );
    let (_, spooled_dropped) = pending(&agent);
    assert!(spooled_dropped > 0);
    let proc = agent.proc.as_mut().unwrap();
    assert!(proc.is_running(), "the agent stays up");
    // Neither crashed nor spinning: idle on a disk that is still full.
    let pid = proc.child.id();
    let (before, since) = (cpu_ticks(pid), std::time::Instant::now());
    wait_for(Duration::from_secs(10), "a 3 s window", || {
        (since.elapsed() >= Duration::from_secs(3)).then_some(())
    });
    let ticks = cpu_ticks(pid) - before;
    assert!(ticks < 100, "{ticks} ticks of CPU in 3 s on a full disk");
    let log = proc.log_text();
    assert!(log.contains("spool full"), "{log}");

    // Room again, and the collector back: the rare one arrives, and stored + dropped = made.
    std::fs::remove_file(&filler).unwrap();
    c.start();
    let made = flood as usize + 1;
    // Delivered once the agent's heartbeat says its spool is empty; its dropped total then is
    // the one it keeps in memory (a count written on a full disk may have stayed high, never
    // low, until the next write).
    let (stored, dropped) = wait_until(Duration::from_secs(120), "the spool delivered", || {
        let row = agent.info(&c).ok_or("agent not listed")?;
        let rows = c.detections();
        let ours: Vec<(String, String)> = rows
            .iter()
            .filter(|d| d["rule"] == "flood_marker" || d["rule"] == "rare_marker")
            .map(|d| (d["rule"].to_string(), d["path"].to_string()))
            .collect();
        let total = row["dropped_total"].as_u64().unwrap_or(0);
        if row["counters"]["spool_pending"] == 0 && ours.len() + total as usize >= made {
            Ok((ours, total))
        } else {
            Err(format!("{} stored, {total} dropped; {row}", ours.len()))
        }
    });
    assert!(dropped > 0, "drops reported in the heartbeat");
    assert_eq!(
        stored.len() + dropped as usize,
        made,
        "stored + dropped = made"
    );
    let distinct: BTreeSet<&(String, String)> = stored.iter().collect();
    assert_eq!(distinct.len(), stored.len(), "a detection stored twice");
    assert_eq!(
        stored
            .iter()
            .filter(|(rule, _)| rule == "\"rare_marker\"")
            .count(),
        1,
        "the rare, high-score detection survived the flood"
    );
    // New detections are spooled and delivered again.
    std::fs::write(watch.join("after"), "VEDETTE-RARE-MARKER after\n").unwrap();
    wait_for(
        Duration::from_secs(60),
        "a detection after the episode",
        || {
            c.detections()
                .iter()
                .any(|d| d["path"].as_str().is_some_and(|p| p.ends_with("/after")))
                .then_some(())
        },
    );
}

#[test]
fn over_a_bad_link_every_detection_arrives_once_beside_a_clean_one() {
    use vedette_tests::SplitMix;
    use vedette_tests::proxy::{FaultProxy, Faults};
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let rules = rule_dir(&tmp.path().join("rules"), RULE, MARKER);
    let proxy = FaultProxy::start(
        &c.addr,
        Faults {
            latency: Duration::from_millis(300),
            jitter: Duration::from_millis(100),
            bytes_per_second: 256 * 1024,
            cut_per_second: 0.05,
        },
        SplitMix::from_env("fault proxy"),
    );
    // Side by side: agent 0 on the clean link, agent 1 through the proxy.
    let (_clean, clean_watch) = Agent::watching(&c, &tmp.path().join("clean"), &rules);
    let dir = tmp.path().join("bad");
    let mut bad = Agent::enroll(&c, &dir.join("state"));
    let bad_watch = dir.join("watch");
    std::fs::create_dir_all(&bad_watch).unwrap();
    let config = dir.join("agent.toml");
    let link = format!("collectors = [{:?}]", proxy.addr);
    vedette_tests::watch_config(&config, &bad_watch, &rules, &link);
    bad.run(&c, &["--config", config.to_str().unwrap()]);

    let n = 2000u32;
    let started = std::time::Instant::now();
    write_markers(&clean_watch, 0, 0..n / 2);
    write_markers(&bad_watch, 1, 0..n / 2);
    // Half way, the link goes dead for 30 s while the rest are made.
    proxy.blackhole(true);
    write_markers(&clean_watch, 0, n / 2..n);
    write_markers(&bad_watch, 1, n / 2..n);
    // When each agent's last detection was stored.
    let mut done = [None, None];
    let check = |done: &mut [Option<Duration>; 2]| {
        for (agent, at) in done.iter_mut().enumerate() {
            if at.is_none() {
                let (all, distinct) = stored_matching(&c, &format!("/a{agent}-"));
                assert_eq!(all, distinct, "agent {agent}: a detection stored twice");
                if distinct == n as usize {
                    *at = Some(started.elapsed());
                }
            }
        }
    };
    let dark = std::time::Instant::now();
    while dark.elapsed() < BLACKHOLE {
        check(&mut done);
        std::thread::sleep(Duration::from_millis(200));
    }
    proxy.blackhole(false);
    let light = started.elapsed();
    wait_until(
        Duration::from_secs(300),
        "both agents' detections stored",
        || {
            check(&mut done);
            match done {
                [Some(_), Some(_)] => Ok(()),
                _ => Err(format!("{done:?}")),
            }
        },
    );
    // The bad link's agent is connected again, by itself.
    wait_for(
        Duration::from_secs(60),
        "the agent behind the bad link connected",
        || (bad.info(&c)?["connected"] == true).then_some(()),
    );
    let [Some(clean), Some(slow)] = done else {
        unreachable!("both were waited for");
    };
    eprintln!(
        "{n} detections each: clean link {clean:.1?}, bad link {slow:.1?} ({:.1}x) with a {BLACKHOLE:?} blackhole, the last arriving {:.1?} after the link came back; {} connections through the proxy, {} cut",
        slow.as_secs_f64() / clean.as_secs_f64().max(0.001),
        slow.saturating_sub(light),
        proxy.connections(),
        proxy.cuts()
    );
}

/// A sample of the collector's metrics: `name` (with its labels, if any), 0 when absent.
fn metric(c: &Collector, name: &str) -> Result<f64, String> {
    let (_, body) = http_get(&c.metrics_addr, "/metrics")?;
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

const CONNECTED: &str = "vedette_collector_agents_connected";
const SHED: &str = "vedette_collector_refused_total{reason=\"connection_limit\"}";

#[test]
fn a_restarted_collector_gets_every_agent_back_and_a_full_one_sheds_the_excess_until_room_frees() {
    use std::sync::atomic::Ordering;
    use vedette_tests::storm::{Backoff, Fleet};
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    let toml = c.dir.join("collector.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(&toml, format!("{text}\n[limits]\nmax_connections = 120\n")).unwrap();
    c.start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let token = c.token(&["--uses", "150"]);
    // In two rounds: 150 enrollments at once would pass the limit themselves.
    let identities = rt.block_on(vedette_tests::enroll_simulated(&c, &token, 100));
    let later = rt.block_on(vedette_tests::enroll_simulated(&c, &token, 50));
    // The agent's backoff, capped at 4 s so that the test stays short.
    let backoff = Backoff {
        max: Duration::from_secs(4),
        ..Backoff::AGENT
    };
    let mut fleet = Fleet::start(&rt, &c.addr, identities, backoff);
    let rules = rule_dir(&tmp.path().join("rules"), RULE, MARKER);
    let (_agent, watch) = Agent::watching(&c, &tmp.path().join("real"), &rules);
    wait_until(Duration::from_secs(60), "101 agents connected", || {
        match (fleet.up(), metric(&c, CONNECTED)? as usize) {
            (100, 101) => Ok(()),
            (up, n) => Err(format!("{up} simulated up, gauge {n}")),
        }
    });

    // The storm: every agent loses its stream at once and comes back by itself.
    c.stop();
    c.start();
    std::fs::write(watch.join("during-the-storm.txt"), MARKER).unwrap();
    wait_until(Duration::from_secs(60), "every agent back", || {
        let again = fleet
            .sims
            .iter()
            .filter(|s| s.connections.load(Ordering::Relaxed) >= 2)
            .count();
        match (fleet.up(), again, metric(&c, CONNECTED)? as usize) {
            (100, 100, 101) => Ok(()),
            (up, again, n) => Err(format!("{up} up, {again} reconnected, gauge {n}")),
        }
    });
    wait_for(
        Duration::from_secs(30),
        "the real agent's detection",
        || {
            c.detections()
                .iter()
                .any(|d| {
                    d["path"]
                        .as_str()
                        .unwrap_or("")
                        .ends_with("during-the-storm.txt")
                })
                .then_some(())
        },
    );
    assert_eq!(fleet.running(), 100, "a simulated agent gave up");

    // 50 more than the limit leaves room for: the excess is closed on accept, the collector
    // stays up, and the shed agents keep trying.
    let late = Fleet::start(&rt, &c.addr, later, backoff);
    let shed_at_first = wait_until(Duration::from_secs(60), "the excess shed", || {
        let shed = metric(&c, SHED)?;
        match (metric(&c, CONNECTED)? as usize, late.up()) {
            (120, 19) if shed >= 31.0 => Ok(shed),
            (n, up) => Err(format!("gauge {n}, {up} of the late ones up, {shed} shed")),
        }
    });
    wait_until(Duration::from_secs(30), "the shed agents retrying", || {
        let retried = late
            .sims
            .iter()
            .filter(|s| !s.up.load(Ordering::Relaxed) && s.attempts.load(Ordering::Relaxed) >= 3)
            .count();
        match metric(&c, SHED)? {
            shed if retried == 31 && shed >= shed_at_first + 31.0 => Ok(()),
            shed => Err(format!("{retried} of 31 retried 3 times, {shed} shed")),
        }
    });
    assert!(
        c.proc.as_mut().unwrap().is_running(),
        "the collector fell over"
    );
    assert_eq!(metric(&c, CONNECTED).unwrap() as usize, 120);

    // Room frees: 40 of the first fleet leave, and every shed agent gets in.
    fleet.stop_first(40);
    wait_until(
        Duration::from_secs(60),
        "the shed agents connected",
        || match (late.up(), metric(&c, CONNECTED)? as usize) {
            (50, 111) => Ok(()),
            (up, n) => Err(format!("{up} of 50 late ones up, gauge {n}")),
        },
    );
    assert_eq!(late.running(), 50, "a shed agent gave up");
    assert_eq!(fleet.running(), 60);
    drop((fleet, late));
}
