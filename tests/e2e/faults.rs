//! Faults the fleet survives, with real processes: the database restarting under a stream of
//! detections from several agents.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vedette_tests::{Agent, Collector, PgCluster, http_get, rule_dir, wait_for, wait_until};

const RULE: &str = "fault_marker";
const MARKER: &str = "VEDETTE-FAULT-MARKER";

/// How long the database stays down: the fault itself, not a wait for anything.
const OUTAGE: Duration = Duration::from_secs(10);

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

/// An enrolled agent watching a directory of its own for the marker rule, running.
fn agent(c: &Collector, dir: &Path, rules: &Path) -> (Agent, PathBuf) {
    let mut agent = Agent::enroll(c, &dir.join("state"));
    let watch = dir.join("watch");
    std::fs::create_dir_all(&watch).unwrap();
    let config = dir.join("agent.toml");
    vedette_tests::watch_config(&config, &watch, rules, "");
    agent.run(c, &["--config", config.to_str().unwrap()]);
    (agent, watch)
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
        .map(|i| agent(&c, &tmp.path().join(format!("agent{i}")), &rules))
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
    wait_until(
        Duration::from_secs(30),
        "store errors counted",
        || match store_errors(&c)? {
            n if n > 0.0 => Ok(()),
            _ => Err("store_errors_total is 0".to_string()),
        },
    );
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
    assert!(
        log.contains("store error"),
        "the outage was not logged: {log}"
    );
    // A clean stop: exit 0, no panic (the database client once panicked in a destructor).
    let log_path = c.proc.as_ref().unwrap().log.clone();
    let status = c.stop();
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    assert!(status.success(), "the collector's stop: {status:?}\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    drop(agents);
}
