//! Response actions end to end, on real agents: kill (by pid and start time), quarantine and
//! restore, isolation in network namespaces the tests make; the host's own allow-list;
//! two-person approval across organisations; delivery to an agent offline; the audit trail.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::hunts::scoped_operator;
use crate::intel::Helper;
use serde_json::Value;
use sha2::{Digest, Sha256};
use vedette_tests::{
    Agent, Collector, Netns, json_lines, output_text, sink_lines, vedettectl, wait_for, wait_until,
};

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A process's start time as process detections carry it: seconds since the epoch.
fn start_time(pid: u32) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    let ticks: i64 = rest.split_whitespace().nth(19).unwrap().parse().unwrap();
    let boot: i64 = std::fs::read_to_string("/proc/stat")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    boot + ticks / 100
}

/// `actions list --json` as `config` sees it, by id.
fn action(config: &Path, id: &str) -> Value {
    json_lines(&ok(vedettectl(config, &["actions", "list", "--json"])))
        .into_iter()
        .find(|a| a["id"] == id)
        .unwrap_or(Value::Null)
}

/// Waits until action `id` is in `state`.
fn wait_state(config: &Path, id: &str, state: &str) -> Value {
    wait_until(
        Duration::from_secs(30),
        &format!("action {id} {state}"),
        || {
            let a = action(config, id);
            if a["state"] == state {
                Ok(a)
            } else {
                Err(a.to_string())
            }
        },
    )
}

/// An agent of `org` (the default organisation when empty) allowing `response`, watching a
/// directory of its own for the rule `marker` matches.
fn host(
    c: &Collector,
    tmp: &Path,
    name: &str,
    org: &str,
    extra: &str,
) -> (Agent, PathBuf, PathBuf) {
    let token = if org.is_empty() {
        c.token(&[])
    } else {
        c.token(&["--org", org])
    };
    let agent = Agent::enroll_with_token(c, &tmp.join(name), &token, &[]);
    let watch = tmp.join(format!("{name}-watch"));
    std::fs::create_dir_all(&watch).unwrap();
    let rules = vedette_tests::rule_dir(
        &tmp.join(format!("{name}-rules")),
        "Response_Marker",
        "VEDETTE-RESPONSE-MARKER",
    );
    let config = tmp.join(format!("{name}.toml"));
    vedette_tests::watch_config(&config, &watch, &rules, extra);
    (agent, watch, config)
}

fn run(agent: &mut Agent, c: &Collector, config: &Path) {
    agent.run(c, &["--config", config.to_str().unwrap()]);
}

#[test]
fn kill_takes_the_process_named_by_pid_and_start_time_and_nothing_the_host_did_not_allow() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let mut c = Collector::init(&tmp.join("collector"));
    c.start();
    let (mut agent, _watch, config) = host(&c, tmp, "k", "", "response = [\"kill\"]");
    run(&mut agent, &c, &config);
    let id = agent.id.clone();
    let ctl = c.ctl_config();
    let mut victim = Helper(Command::new("sleep").arg("300").spawn().unwrap());
    let pid = victim.0.id();
    let started = start_time(pid);

    // The same pid with another start time is another process: refused, and it lives.
    let wrong = ok(c.ctl(&[
        "actions",
        "request",
        "kill",
        "--agent",
        &id,
        "--pid",
        &pid.to_string(),
        "--start",
        &(started - 7).to_string(),
        "--reason",
        "a reused pid",
    ]));
    let a = wait_state(&ctl, &wrong, "refused");
    assert!(
        a["detail"].as_str().unwrap().contains("another process"),
        "{a}"
    );
    assert!(victim.0.try_wait().unwrap().is_none(), "the process lives");

    let right = ok(c.ctl(&[
        "actions",
        "request",
        "kill",
        "--agent",
        &id,
        "--pid",
        &pid.to_string(),
        "--start",
        &started.to_string(),
        "--reason",
        "a miner",
    ]));
    let a = wait_state(&ctl, &right, "done");
    assert_eq!(a["requested_by"], "cert:operator", "{a}");
    let status = wait_for(Duration::from_secs(10), "the process to die", || {
        victim.0.try_wait().unwrap()
    });
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL");

    // Quarantine is not in this host's `response`: refused by the agent itself.
    let file = tmp.join("k-watch").join("x");
    std::fs::write(&file, "x").unwrap();
    let sha = hex::encode(Sha256::digest(b"x"));
    let q = ok(c.ctl(&[
        "actions",
        "request",
        "quarantine",
        "--agent",
        &id,
        "--path",
        file.to_str().unwrap(),
        "--sha256",
        &sha,
        "--reason",
        "not allowed here",
    ]));
    let a = wait_state(&ctl, &q, "refused");
    assert!(
        a["detail"]
            .as_str()
            .unwrap()
            .contains("does not allow `quarantine`"),
        "{a}"
    );
    assert!(file.exists(), "left in place");
}

#[test]
fn quarantine_takes_the_file_of_a_detection_and_restore_gives_it_back_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let mut c = Collector::init(&tmp.join("collector"));
    c.start();
    let (mut agent, watch, config) = host(&c, tmp, "q", "", "response = [\"quarantine\"]");
    run(&mut agent, &c, &config);
    let ctl = c.ctl_config();
    let path = watch.join("dropper.sh");
    let body = b"#!/bin/sh\necho VEDETTE-RESPONSE-MARKER\n".to_vec();
    // Written elsewhere with its owner, mode and times set, then moved in whole.
    let staged = tmp.join("dropper.sh");
    std::fs::write(&staged, &body).unwrap();
    std::os::unix::fs::chown(&staged, Some(1234), Some(2345)).unwrap();
    std::fs::set_permissions(
        &staged,
        std::os::unix::fs::PermissionsExt::from_mode(0o4751),
    )
    .unwrap();
    let touched = Command::new("touch")
        .args(["-m", "-d", "2021-03-04 05:06:07.123456789"])
        .arg(&staged)
        .status()
        .unwrap();
    assert!(touched.success());
    let before = std::fs::metadata(&staged).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    let det = wait_for(Duration::from_secs(30), "the detection", || {
        c.detections()
            .into_iter()
            .find(|d| d["path"] == path.to_str().unwrap())
    });
    let seq = det["seq"].as_u64().unwrap().to_string();

    // A wrong hash: refused, the file stays.
    let wrong = ok(c.ctl(&[
        "actions",
        "request",
        "quarantine",
        "--agent",
        &agent.id,
        "--path",
        path.to_str().unwrap(),
        "--sha256",
        &"0".repeat(64),
        "--reason",
        "wrong hash",
    ]));
    let a = wait_state(&ctl, &wrong, "refused");
    assert!(
        a["detail"].as_str().unwrap().contains("not quarantined"),
        "{a}"
    );
    assert!(path.exists());

    let q = ok(c.ctl(&[
        "actions",
        "request",
        "quarantine",
        "--detection",
        &seq,
        "--reason",
        "dropper, INC-1",
    ]));
    let a = wait_state(&ctl, &q, "done");
    assert_eq!(a["path"], path.to_str().unwrap(), "{a}");
    assert!(!path.exists(), "gone from its path");
    let kept = agent.state.join("quarantine").join(&q).join("file");
    let mode = std::fs::metadata(&kept).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o400, "readable by root alone, executable by no one");
    let marked = c
        .detections()
        .into_iter()
        .find(|d| d["seq"] == det["seq"])
        .unwrap();
    assert_eq!(marked["response"], "quarantined", "{marked}");

    let undo = ok(c.ctl(&["actions", "undo", &q, "--reason", "false positive"]));
    let u = wait_state(&ctl, &undo, "done");
    assert_eq!(u["kind"], "restore");
    assert_eq!(u["undoes"], q.as_str());
    assert_eq!(std::fs::read(&path).unwrap(), body, "the same bytes");
    let after = std::fs::metadata(&path).unwrap();
    assert_eq!((after.uid(), after.gid()), (1234, 2345), "the owner");
    assert_eq!(
        after.mode() & 0o7777,
        before.mode() & 0o7777,
        "the mode, set-user-id too"
    );
    assert_eq!(
        (after.mtime(), after.mtime_nsec()),
        (before.mtime(), before.mtime_nsec()),
        "the modification time"
    );
    assert_eq!(action(&ctl, &q)["undone_by"], undo.as_str());
    let marked = c
        .detections()
        .into_iter()
        .find(|d| d["seq"] == det["seq"])
        .unwrap();
    assert!(marked.get("response").is_none(), "restored: {marked}");
    // Undone once only.
    let again = c.ctl(&["actions", "undo", &q]);
    assert!(!again.status.success(), "{}", output_text(&again));
}

#[test]
fn two_person_approval_needs_a_second_operator_of_the_organisation_and_every_step_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let mut c = Collector::init(&tmp.join("collector"));
    let sink = tmp.join("siem.jsonl");
    let toml = c.dir.join("collector.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    let export = format!(
        "\n[export]\naudit = true\n\n[[export.jsonl]]\npath = \"{}\"\n",
        sink.display()
    );
    std::fs::write(&toml, text + &export).unwrap();
    c.start();
    for org in ["alpha", "bravo"] {
        c.ctl_ok(&["orgs", "create", org, "--share", "full"]);
    }
    c.ctl_ok(&["orgs", "set", "alpha", "--response-approval", "two-person"]);
    let alice = scoped_operator(&c, "alice", "alpha");
    let bob = scoped_operator(&c, "bob", "alpha");
    let eve = scoped_operator(&c, "eve", "bravo");
    let (mut agent, _watch, config) = host(&c, tmp, "a", "alpha", "response = [\"kill\"]");
    run(&mut agent, &c, &config);
    let mut victim = Helper(Command::new("sleep").arg("300").spawn().unwrap());
    let pid = victim.0.id();

    let id = ok(vedettectl(
        &alice,
        &[
            "actions",
            "request",
            "kill",
            "--agent",
            &agent.id,
            "--pid",
            &pid.to_string(),
            "--start",
            &start_time(pid).to_string(),
            "--reason",
            "ransomware staging",
        ],
    ));
    assert_eq!(action(&alice, &id)["state"], "pending");
    // Another organisation's operator neither sees it nor acts on it.
    let out = vedettectl(&eve, &["actions", "approve", &id]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).to_lowercase().contains("permission"),
        "{}",
        output_text(&out)
    );
    assert!(action(&eve, &id).is_null(), "not listed to bravo");
    // The requester cannot approve their own.
    let out = vedettectl(&alice, &["actions", "approve", &id]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("second operator"),
        "{}",
        output_text(&out)
    );
    assert!(
        victim.0.try_wait().unwrap().is_none(),
        "nothing done while pending"
    );
    // A second operator of alpha can.
    ok(vedettectl(&bob, &["actions", "approve", &id]));
    let a = wait_state(&alice, &id, "done");
    assert_eq!(a["decided_by"], "cert:bob", "{a}");
    wait_for(Duration::from_secs(10), "the process to die", || {
        victim.0.try_wait().unwrap()
    });

    // Each step on record, in the store and in the JSONL sink.
    let steps = [
        "action.request",
        "action.approve",
        "action.deliver",
        "action.outcome",
    ];
    let audit = json_lines(&c.ctl_ok(&["audit", "list", "--json"]));
    for step in steps {
        assert!(
            audit
                .iter()
                .any(|e| e["action"] == step && e["target"] == id.as_str()),
            "{step} in {audit:?}"
        );
    }
    let refused = audit
        .iter()
        .filter(|e| e["action"] == "action.approve" && e["target"] == id.as_str())
        .filter(|e| e["outcome"].as_str().unwrap().starts_with("refused"))
        .count();
    assert_eq!(refused, 2, "eve's and alice's attempts: {audit:?}");
    wait_for(
        Duration::from_secs(30),
        "the steps in the JSONL sink",
        || {
            let lines = sink_lines(&sink);
            steps
                .iter()
                .all(|s| {
                    lines.iter().any(|l| {
                        l["event"]["dataset"] == "vedette.audit"
                            && l["event"]["action"] == *s
                            && l["vedette"]["audit"]["target"] == id.as_str()
                    })
                })
                .then_some(())
        },
    );
}

#[test]
fn an_action_approved_while_the_agent_is_down_runs_once_when_it_returns_unless_it_expired() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let mut c = Collector::init(&tmp.join("collector"));
    c.start();
    let (mut agent, _watch, config) = host(&c, tmp, "o", "", "response = [\"kill\"]");
    run(&mut agent, &c, &config);
    let ctl = c.ctl_config();
    agent.proc.take().unwrap().signal_and_wait("TERM");
    let mut first = Helper(Command::new("sleep").arg("300").spawn().unwrap());
    let mut second = Helper(Command::new("sleep").arg("300").spawn().unwrap());
    let kill = |p: &Helper, expires: &str| {
        ok(c.ctl(&[
            "actions",
            "request",
            "kill",
            "--agent",
            &agent.id,
            "--pid",
            &p.0.id().to_string(),
            "--start",
            &start_time(p.0.id()).to_string(),
            "--expires",
            expires,
            "--reason",
            "offline",
        ]))
    };
    let live = kill(&first, "1h");
    let lapsed = kill(&second, "1s");
    wait_state(&ctl, &lapsed, "expired");
    run(&mut agent, &c, &config);
    wait_state(&ctl, &live, "done");
    wait_for(Duration::from_secs(10), "the first process to die", || {
        first.0.try_wait().unwrap()
    });
    assert!(
        second.0.try_wait().unwrap().is_none(),
        "the expired one was not done"
    );
    assert_eq!(action(&ctl, &lapsed)["state"], "expired");
    // Restarted, the agent is sent nothing again (and would answer from its journal).
    agent.proc.take().unwrap().signal_and_wait("TERM");
    run(&mut agent, &c, &config);
    wait_until(Duration::from_secs(30), "the agent back", || {
        match agent.info(&c).map(|a| a["connected"].clone()) {
            Some(Value::Bool(true)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let outcomes = json_lines(&c.ctl_ok(&["audit", "list", "--json"]))
        .into_iter()
        .filter(|e| e["action"] == "action.outcome" && e["target"] == live.as_str())
        .count();
    assert_eq!(outcomes, 1, "done once");
}

/// Runs `ip ARGS`, which must succeed.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", output_text(&out));
}

/// Whether a TCP connection to `addr` opens within a second.
fn reachable(addr: &str) -> bool {
    std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1)).is_ok()
}

/// The table the agent makes, in the namespace the caller is in.
fn isolation_table() -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", "vedette_isolation"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn isolation_leaves_only_the_collector_is_released_expires_and_survives_a_restart() {
    let Ok(ns) = Netns::new() else {
        vedette_tests::missing_root("network namespaces of the test's own");
        return;
    };
    if !Path::new("/usr/sbin/nft").exists() {
        vedette_tests::missing_peer("nft", "apt-get install nftables");
        return;
    }
    // "The internet": a second namespace at the other end of a veth pair, listening on
    // 10.98.0.2:8080.
    let internet = Netns::new().unwrap();
    let outside = internet.name().to_string();
    ns.run(|| {
        ip(&[
            "link", "add", "iso0", "type", "veth", "peer", "name", "iso1",
        ]);
        ip(&["link", "set", "iso1", "netns", &outside]);
        ip(&["addr", "add", "10.98.0.1/24", "dev", "iso0"]);
        ip(&["link", "set", "iso0", "up"]);
        ip(&["-n", &outside, "addr", "add", "10.98.0.2/24", "dev", "iso1"]);
        ip(&["-n", &outside, "link", "set", "iso1", "up"]);
        let _server = crate::dns::spawn_ready(
            Command::new("ip")
                .args(["netns", "exec", &outside, "python3", "-c"])
                .arg(
                    "import socket\ns = socket.socket()\ns.bind(('10.98.0.2', 8080))\n\
                     s.listen(16)\nprint('ready', flush=True)\nwhile True:\n    \
                     c, _ = s.accept()\n    c.close()\n",
                ),
            "ready",
        );
        let the_internet = "10.98.0.2:8080";
        wait_for(Duration::from_secs(10), "the internet", || {
            reachable(the_internet).then_some(())
        });

        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path();
        let mut c = Collector::init(&tmp.join("collector"));
        c.start();
        let (mut agent, watch, config) = host(&c, tmp, "i", "", "response = [\"isolate\"]");
        run(&mut agent, &c, &config);
        let ctl = c.ctl_config();
        let agent_id = agent.id.clone();
        let isolate = |expires: &str| {
            ok(c.ctl(&[
                "actions",
                "request",
                "isolate",
                "--agent",
                &agent_id,
                "--expires",
                expires,
                "--reason",
                "C2 beacon",
            ]))
        };
        let first = isolate("1h");
        wait_state(&ctl, &first, "done");
        assert!(
            !reachable(the_internet),
            "isolated: the internet is cut off"
        );
        // Detections still reach the collector.
        std::fs::write(watch.join("seen.txt"), "VEDETTE-RESPONSE-MARKER").unwrap();
        wait_for(
            Duration::from_secs(30),
            "a detection while isolated",
            || {
                c.detections()
                    .into_iter()
                    .find(|d| d["path"].as_str().is_some_and(|p| p.ends_with("seen.txt")))
            },
        );
        // A restarted agent (here: after the table was lost, as at a reboot) applies it again.
        agent.proc.take().unwrap().signal_and_wait("TERM");
        let deleted = Command::new("nft")
            .args(["delete", "table", "inet", "vedette_isolation"])
            .status()
            .unwrap();
        assert!(deleted.success());
        assert!(reachable(the_internet));
        run(&mut agent, &c, &config);
        wait_for(Duration::from_secs(30), "the isolation again", || {
            isolation_table().then_some(())
        });
        assert!(!reachable(the_internet), "isolated again after the restart");
        // Release restores the connection.
        let release = ok(c.ctl(&["actions", "undo", &first, "--reason", "contained"]));
        wait_state(&ctl, &release, "done");
        assert!(reachable(the_internet), "released");
        assert!(!isolation_table(), "exactly the agent's table is gone");
        // An isolation ends at its expiry, the collector gone or not.
        let short = isolate("4s");
        wait_state(&ctl, &short, "done");
        assert!(!reachable(the_internet));
        c.kill();
        wait_for(Duration::from_secs(30), "the isolation to expire", || {
            reachable(the_internet).then_some(())
        });
        assert!(!isolation_table());
    });
}
