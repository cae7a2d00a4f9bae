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

    // Restarted: the start-up scan runs again (the log says so) but the file is unchanged.
    agent.run_watching(&c, &tree, &rules);
    let proc = agent.proc.as_mut().unwrap();
    wait_for(
        Duration::from_secs(20),
        "the second start-up scan to finish",
        || proc.log_text().contains("full scan finished").then_some(()),
    );
    assert_eq!(count(), 1);
}
