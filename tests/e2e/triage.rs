//! Triage through the real `vedettectl` with real agents: one alert per organisation and file
//! however many hosts saw it, verdicts kept with who gave them, and exceptions that suppress
//! at the collector at once and on the agents once a maintainer publishes them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use vedette_tests::{
    Agent, Collector, bin, json_lines, output_text, rule_dir, vedettectl, wait_for, wait_until,
    watch_config,
};

const RULE: &str = "triage_marker";
const MARKER: &str = "VEDETTE-TRIAGE-MARKER";

/// An agent enrolled with `token`, running with the test rules, watching a directory of its
/// own (heartbeats every second); the agent and that directory.
fn agent(c: &Collector, dir: &Path, token: &str, rules: &Path) -> (Agent, PathBuf) {
    let mut a = Agent::enroll_with_token(c, &dir.join("state"), token, &[]);
    let watch = dir.join("watch");
    std::fs::create_dir_all(&watch).unwrap();
    let config = dir.join("agent.toml");
    watch_config(&config, &watch, rules, "");
    a.run(c, &["--config", config.to_str().unwrap()]);
    (a, watch)
}

/// The marker rule's alerts, by organisation.
fn alerts(c: &Collector) -> Vec<Value> {
    json_lines(&c.ctl_ok(&["alerts", "list", "--json"]))
        .into_iter()
        .filter(|a| a["rule"] == RULE)
        .collect()
}

fn alert_of(c: &Collector, org: &str) -> Option<Value> {
    alerts(c).into_iter().find(|a| a["org"] == org)
}

/// Waits until organisation `org`'s alert has `detections` detections.
fn wait_detections(c: &Collector, org: &str, detections: u64) -> Value {
    wait_until(
        Duration::from_secs(30),
        &format!("{org}'s alert with {detections} detections"),
        || match alert_of(c, org) {
            Some(a) if a["detections"] == detections => Ok(a),
            other => Err(format!("{other:?}")),
        },
    )
}

/// The marker's detections stored (with `--suppressed`, those an exception covered too).
fn marked(c: &Collector, suppressed: bool) -> Vec<Value> {
    let mut args = vec![
        "detections",
        "list",
        "--json",
        "--rule",
        RULE,
        "--limit",
        "1000",
    ];
    if suppressed {
        args.push("--suppressed");
    }
    json_lines(&c.ctl_ok(&args))
}

fn refused(config: &Path, args: &[&str]) -> String {
    let out = vedettectl(config, args);
    assert!(!out.status.success(), "{args:?}: {}", output_text(&out));
    output_text(&out)
}

#[test]
fn one_file_on_five_hosts_of_two_organisations_is_two_alerts_judged_and_excepted_at_the_collector_and_on_the_agents()
 {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    c.ctl_ok(&["orgs", "create", "beta"]);
    let rules = rule_dir(&tmp.path().join("rules"), RULE, MARKER);
    let default_token = c.token(&["--uses", "3"]);
    let beta_token = c.token(&["--uses", "2", "--org", "beta"]);
    let mut fleet = Vec::new();
    for i in 0..5 {
        let token = if i < 3 { &default_token } else { &beta_token };
        fleet.push(agent(&c, &tmp.path().join(format!("a{i}")), token, &rules));
    }

    // The same file on every host: one alert per organisation, hosts and detections counted.
    for (_, watch) in &fleet {
        std::fs::write(watch.join("dropper.bin"), MARKER).unwrap();
    }
    let default = wait_detections(&c, "default", 3);
    let beta = wait_detections(&c, "beta", 2);
    assert_eq!(
        (default["hosts"].as_u64(), beta["hosts"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(alerts(&c).len(), 2, "{:?}", alerts(&c));
    assert_eq!(default["status"], "open");
    let subject = default["subject"].as_str().unwrap();
    assert!(subject.starts_with("sha256:"), "{subject}");
    assert_eq!(subject, beta["subject"].as_str().unwrap(), "the same file");
    // A second copy on a host already counted: one more detection, no more hosts.
    std::fs::write(fleet[0].1.join("copy.bin"), MARKER).unwrap();
    let default = wait_detections(&c, "default", 4);
    assert_eq!(default["hosts"], 3);
    let (first, last) = (
        default["first_seen"].as_str(),
        default["last_seen"].as_str(),
    );
    assert!(first <= last, "{default}");
    let did = default["id"].as_u64().unwrap().to_string();
    let bid = beta["id"].as_u64().unwrap().to_string();
    let shown = c.ctl_ok(&["alerts", "show", &did]);
    assert!(
        shown.contains("no verdict yet") && shown.contains("dropper.bin"),
        "{shown}"
    );

    // A true-positive stays one when its file shows up again, flagged as new activity.
    c.ctl_ok(&[
        "alerts",
        "set",
        &bid,
        "--status",
        "true-positive",
        "--note",
        "confirmed",
    ]);
    std::fs::write(fleet[3].1.join("again.bin"), MARKER).unwrap();
    let beta = wait_detections(&c, "beta", 3);
    assert_eq!(beta["status"], "true-positive");
    assert_eq!(beta["new_activity"], true, "{beta}");
    let text = c.ctl_ok(&["alerts", "list", "--org", "beta"]);
    assert!(text.contains("true-positive (new)"), "{text}");

    // A scoped operator of beta judges beta's alerts only: another organisation's alert is
    // refused exactly as one that does not exist.
    let issued = std::process::Command::new(bin("vedette-collector"))
        .args(["certs", "issue", "--config"])
        .arg(c.dir.join("collector.toml"))
        .args([
            "--name", "beta-soc", "--role", "operator", "--org", "beta", "--out",
        ])
        .arg(c.dir.join("beta-soc"))
        .output()
        .unwrap();
    assert!(issued.status.success(), "{}", output_text(&issued));
    let scoped = c.ctl_config_as("beta-soc");
    let other = refused(&scoped, &["alerts", "set", &did, "--status", "benign"]);
    let none = refused(&scoped, &["alerts", "set", "999999", "--status", "benign"]);
    assert!(other.contains("permission denied"), "{other}");
    assert_eq!(
        other.replace(&did, "N"),
        none.replace("999999", "N"),
        "the same answer"
    );
    let listed = json_lines(&String::from_utf8_lossy(
        &vedettectl(&scoped, &["alerts", "list", "--json"]).stdout,
    ));
    assert!(listed.iter().all(|a| a["org"] == "beta"), "{listed:?}");
    let ex = refused(
        &scoped,
        &[
            "exceptions",
            "add",
            "--rule",
            RULE,
            "--org",
            "default",
            "--reason",
            "x",
        ],
    );
    assert!(ex.contains("permission denied"), "{ex}");
    // A path alone names nothing to except.
    let path_only = refused(
        &c.ctl_config(),
        &[
            "exceptions",
            "add",
            "--path",
            "/tmp/**",
            "--reason",
            "noise",
        ],
    );
    assert!(path_only.contains("a path alone"), "{path_only}");

    // False positive, with an exception: from now on the collector stores the file's
    // detections marked, out of listings, alerts and exports.
    let set = c.ctl_ok(&[
        "alerts",
        "set",
        &did,
        "--status",
        "false-positive",
        "--note",
        "our packer",
        "--except",
        "--expires",
        "45s",
    ]);
    assert!(set.contains("exception ex-"), "{set}");
    let exceptions = json_lines(&c.ctl_ok(&["exceptions", "list", "--json"]));
    assert_eq!(exceptions.len(), 1, "{exceptions:?}");
    let exception = exceptions[0]["id"].as_str().unwrap().to_string();
    assert_eq!(exceptions[0]["org"], "default");
    assert_eq!(
        exceptions[0]["sha256"],
        subject.trim_start_matches("sha256:")
    );
    let shown = json_lines(&c.ctl_ok(&["alerts", "show", &did, "--json"]));
    let verdicts = shown[0]["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 1);
    assert_eq!(verdicts[0]["by"], "cert:operator");
    assert_eq!(verdicts[0]["status"], "false-positive");
    assert_eq!(verdicts[0]["note"], "our packer");
    assert_eq!(verdicts[0]["exception_id"], exception.as_str());

    let before = marked(&c, false).len();
    std::fs::write(fleet[1].1.join("later.bin"), MARKER).unwrap();
    let suppressed = wait_for(Duration::from_secs(30), "the suppressed detection", || {
        marked(&c, true)
            .into_iter()
            .find(|d| d["exception_id"] == exception.as_str())
    });
    assert!(suppressed["path"].as_str().unwrap().ends_with("later.bin"));
    assert_eq!(marked(&c, false).len(), before, "hidden unless asked for");
    assert_eq!(alert_of(&c, "default").unwrap()["detections"], 4);
    let ecs = c.ctl_ok(&["export", "ecs", "--org", "default"]);
    assert!(!ecs.contains("later.bin"), "{ecs}");

    // Published, the exception reaches the agents, which drop the file's detections at the
    // source and count them.
    let other_rules = rule_dir(
        &tmp.path().join("fleet"),
        "fleet_rule",
        "VEDETTE-FLEET-ONLY",
    );
    c.ctl_ok(&["rules", "publish", other_rules.to_str().unwrap()]);
    wait_until(Duration::from_secs(30), "every agent on bundle 1", || {
        let on = c
            .agents()
            .iter()
            .filter(|a| a["bundle_version"] == 1)
            .count();
        (on == fleet.len())
            .then_some(())
            .ok_or(format!("{on} on it"))
    });
    let suppressed_count = |c: &Collector, id: &str| {
        c.agents()
            .iter()
            .find(|a| a["id"] == id)
            .and_then(|a| a["counters"]["suppressed"].as_u64())
            .unwrap_or(0)
    };
    let stored = marked(&c, true).len();
    std::fs::write(fleet[2].1.join("on-agent.bin"), MARKER).unwrap();
    wait_for(
        Duration::from_secs(30),
        "the agent's suppressed count",
        || (suppressed_count(&c, &fleet[2].0.id) >= 1).then_some(()),
    );
    assert_eq!(marked(&c, true).len(), stored, "nothing was sent for it");
    // Beta's agents are not covered: their detection still arrives.
    std::fs::write(fleet[4].1.join("beta.bin"), MARKER).unwrap();
    wait_detections(&c, "beta", 4);

    // Expired, on both sides: the file is detected again.
    let expires = exceptions[0]["expires_at"].as_str().unwrap().to_string();
    wait_until(Duration::from_secs(60), "the exception's expiry", || {
        let listed = json_lines(&c.ctl_ok(&["exceptions", "list", "--json"]));
        listed.is_empty().then_some(()).ok_or(expires.clone())
    });
    std::fs::write(fleet[2].1.join("expired.bin"), MARKER).unwrap();
    let default = wait_detections(&c, "default", 5);
    assert_eq!(
        default["status"], "false-positive",
        "a false positive stays closed"
    );
    assert_eq!(default["new_activity"], false);

    // Every verdict and exception is in the audit log.
    let audit = c.ctl_ok(&["audit", "list"]);
    assert!(
        audit.contains("alert.judge") && audit.contains("exception.add"),
        "{audit}"
    );
}
