//! The agent daemon's own scans: a start-up full scan finds what was there before the agent,
//! and its result cache keeps a restart from reporting the same file again.

use std::os::unix::fs::MetadataExt;
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
    let implant = tree.join("deep/er/old-implant");
    std::fs::write(&implant, "VEDETTE-PRESENT-BEFORE").unwrap();
    // A file scanned within 100 ms of its last change is never a cache hit (it may change again
    // within one timestamp tick): the file is older than that when the agent first sees it.
    wait_for(Duration::from_secs(5), "the file to be 200 ms old", || {
        let m = std::fs::metadata(&implant).ok()?;
        let changed_ms = m.ctime() * 1000 + m.ctime_nsec() / 1_000_000;
        let now_ms = vedette_proto::now_ms();
        (now_ms - changed_ms >= 200).then_some(())
    });
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
    // from the cache (the scan's own counts say so) and the agent reports nothing new. The
    // store would hold one row even for a second report (the id is derived), so the row count
    // alone could not show this.
    agent.run_watching(&c, &tree, &rules);
    let proc = agent.proc.as_mut().unwrap();
    let finished = wait_for(
        Duration::from_secs(20),
        "the second start-up scan to finish",
        || {
            let log = proc.log_text();
            let line = log.lines().find(|l| l.contains("full scan finished"))?;
            Some(line.to_string())
        },
    );
    assert!(
        finished.contains("cache_hits=1") && finished.contains("files_scanned=0"),
        "the unchanged file was scanned again: {finished}"
    );
    assert_eq!(count(), 1);
}
