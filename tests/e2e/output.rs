//! One detection, two printers: `vedette-agent scan --json` on the host and
//! `vedettectl detections list --json` at the collector print the same fields the same way.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vedette_tests::{Agent, Collector, bin, rule_dir, wait_for};

#[test]
fn scan_json_and_detections_list_json_agree_on_every_field_of_a_detection() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let mut agent = Agent::enroll(&c, &tmp.path().join("agent"));
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let rules = rule_dir(
        &tmp.path().join("rules"),
        "same_output",
        "VEDETTE-SAME-OUTPUT",
    );
    agent.run_watching(&c, &tree, &rules);
    let file = tree.join("sample.bin");
    std::fs::write(&file, "xx VEDETTE-SAME-OUTPUT xx").unwrap();
    let stored = wait_for(
        Duration::from_secs(20),
        "the detection at the collector",
        || {
            c.detections()
                .into_iter()
                .find(|d| d["rule"] == "same_output")
        },
    );

    let out = Command::new(bin("vedette-agent"))
        .args(["scan", "--json", "--no-compiled-cache", "--rules"])
        .arg(&rules)
        .arg(&file)
        .output()
        .expect("vedette-agent scan");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let scanned: Value = serde_json::from_str(text.lines().next().expect("one line")).unwrap();

    let (scan_obj, stored_obj) = (scanned.as_object().unwrap(), stored.as_object().unwrap());
    let only_stored = [
        "agent_id",
        "hostname",
        "org",
        "received_at",
        "seq",
        "alert_id",
        "alert_status",
    ];
    for key in scan_obj.keys() {
        assert!(
            stored_obj.contains_key(key),
            "`{key}` missing from detections list"
        );
    }
    for key in stored_obj.keys() {
        assert!(
            scan_obj.contains_key(key) || only_stored.contains(&key.as_str()),
            "`{key}` missing from scan --json"
        );
    }
    // What describes the finding itself is equal; ids and times differ per observation.
    for key in [
        "kind",
        "rule",
        "source",
        "score",
        "description",
        "path",
        "size",
        "sha256",
        "md5",
        "sha1",
        "pid",
        "action",
    ] {
        let (scanned, stored) = (scan_obj.get(key), stored_obj.get(key));
        assert!(scanned.is_some() && stored.is_some(), "`{key}` missing");
        assert_eq!(scanned, stored, "`{key}`");
    }
    for key in ["observed_at", "received_at"] {
        let t = stored[key].as_str().unwrap();
        assert!(t.ends_with('Z') && t.contains('T'), "`{key}` = {t}");
    }
    assert!(scanned["observed_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(scanned["bundle_version"], 0);
    assert_eq!(scanned["action"], "alert");
    assert_eq!(scanned["id"].as_str().unwrap().len(), 36);
}
