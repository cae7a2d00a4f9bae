//! The agent daemon's own scans: a start-up full scan finds what was there before the agent,
//! and its result cache keeps a restart from reporting the same file again.

use std::time::Duration;

use vedette_tests::{Agent, Collector, rule_dir, wait_for};

#[test]
fn startup_full_scan_finds_existing_files_once_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let mut agent = Agent::enroll(&c, &tmp.path().join("agent"));
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("deep/er")).unwrap();
    std::fs::write(tree.join("deep/er/old-implant"), "VEDETTE-PRESENT-BEFORE").unwrap();
    let rules = rule_dir(
        &tmp.path().join("rules"),
        "present_before",
        "VEDETTE-PRESENT-BEFORE",
    );
    agent.run_watching(&c, &tree, &rules);
    let count = || {
        c.detections()
            .iter()
            .filter(|d| d["rule"] == "present_before")
            .count()
    };
    wait_for(
        Duration::from_secs(20),
        "the start-up scan detection",
        || (count() == 1).then_some(()),
    );
    let mut p = agent.proc.take().unwrap();
    assert!(p.signal_and_wait("TERM").success());
    assert!(agent.state.join("scan-cache.bin").exists());

    // Restarted: the start-up scan runs again but the file is unchanged, so its result comes
    // from the cache (the agent's own counters say so) and the agent reports nothing new. The
    // store would hold one row even for a second report (the id is derived), so the row count
    // alone could not show this.
    agent.run_watching(&c, &tree, &rules);
    let proc = agent.proc.as_mut().unwrap();
    wait_for(
        Duration::from_secs(20),
        "the second start-up scan to finish",
        || proc.log_text().contains("full scan finished").then_some(()),
    );
    let counters = wait_for(
        Duration::from_secs(20),
        "a heartbeat of the restarted agent after its start-up scan",
        || {
            // The first run made no cache hit: a heartbeat with one is the restarted agent's.
            let a = c.agents().into_iter().next()?;
            let counters = a["counters"].clone();
            let done = counters["full_scans"].as_u64() >= Some(1)
                && counters["cache_hits"].as_u64().is_some();
            done.then_some(counters)
        },
    );
    assert_eq!(counters["cache_hits"], 1, "{counters}");
    // Counters that stayed at zero are left out of heartbeats.
    assert_eq!(
        counters["detections"].as_u64().unwrap_or(0),
        0,
        "{counters}"
    );
    assert_eq!(
        counters["files_scanned"].as_u64().unwrap_or(0),
        0,
        "{counters}"
    );
    assert_eq!(count(), 1);
}
