//! Rule bundles end to end: publish, push to every agent, new rules firing without restarts,
//! every way a bundle is refused, and the last-good bundle when the collector is down.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use vedette_engine::bundle::{self, BundleContent, BundleFile, SigningKey};
use vedette_ops::client::{ClientTls, connect};
use vedette_proto::v1::PublishBundleRequest;
use vedette_proto::v1::admin_service_client::AdminServiceClient;
use vedette_tests::{Agent, Collector, wait_for, wait_until};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A YARA rule `name` matching `marker`, written as `dir/<name>.yar`.
fn yara(dir: &Path, name: &str, marker: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join(format!("{name}.yar")),
        format!(
            "rule {name} {{\n  meta:\n    score = 70\n  strings:\n    $m = \"{marker}\"\n  condition:\n    $m\n}}\n"
        ),
    )
    .unwrap();
}

fn publish(c: &Collector, args: &[&str]) -> Output {
    let mut all = vec!["rules", "publish"];
    all.extend_from_slice(args);
    c.ctl(&all)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Waits until every agent reports `version` as applied.
fn wait_version(c: &Collector, agents: &[&Agent], version: u64) {
    wait_until(
        Duration::from_secs(30),
        &format!("every agent on bundle {version}"),
        || {
            let list = c.agents();
            let on = agents
                .iter()
                .filter(|a| {
                    list.iter()
                        .any(|x| x["id"] == a.id.as_str() && x["bundle_version"] == version)
                })
                .count();
            if on == agents.len() {
                Ok(())
            } else {
                Err(format!("{list:?}"))
            }
        },
    );
}

fn detection(c: &Collector, rule: &str) -> Value {
    wait_for(
        Duration::from_secs(20),
        &format!("a `{rule}` detection"),
        || c.detections().into_iter().find(|d| d["rule"] == rule),
    )
}

struct Fleet {
    c: Collector,
    agents: Vec<(Agent, PathBuf)>,
    tmp: PathBuf,
    // Last: removed after the processes are gone and their logs printed.
    _dir: tempfile::TempDir,
}

/// A running collector and `n` agents each watching its own directory, no local rules.
fn fleet(n: usize) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().to_owned();
    let mut c = Collector::init(&tmp.join("collector"));
    c.start();
    let mut agents = Vec::new();
    for i in 0..n {
        let mut a = Agent::enroll(&c, &tmp.join(format!("agent{i}")));
        let watch = tmp.join(format!("watch{i}"));
        std::fs::create_dir(&watch).unwrap();
        a.run(&c, &["--watch", watch.to_str().unwrap()]);
        agents.push((a, watch));
    }
    Fleet {
        c,
        agents,
        tmp,
        _dir: dir,
    }
}

#[test]
fn published_bundles_reach_every_agent_and_new_rules_fire_without_restart() {
    let f = fleet(2);
    let pids: Vec<u32> = f
        .agents
        .iter()
        .map(|(a, _)| a.proc.as_ref().unwrap().child.id())
        .collect();
    // Already on disk before any rule could match it: found by the rescan a new bundle starts.
    std::fs::write(f.agents[1].1.join("before.txt"), "VEDETTE-BUNDLE-ONE").unwrap();
    let v1 = f.tmp.join("v1");
    yara(&v1, "bundle_one", "VEDETTE-BUNDLE-ONE");
    let out = publish(&f.c, &[v1.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("published version 1"), "{text}");
    let agents: Vec<&Agent> = f.agents.iter().map(|(a, _)| a).collect();
    wait_version(&f.c, &agents, 1);

    std::fs::write(f.agents[0].1.join("a.txt"), "xx VEDETTE-BUNDLE-ONE xx").unwrap();
    let of = |agent: &Agent, rule: &str| {
        let (c, id, rule) = (&f.c, agent.id.clone(), rule.to_string());
        wait_for(
            Duration::from_secs(20),
            &format!("a `{rule}` detection from {id}"),
            move || {
                c.detections()
                    .into_iter()
                    .find(|d| d["rule"] == rule.as_str() && d["agent_id"] == id.as_str())
            },
        )
    };
    let d = of(&f.agents[0].0, "bundle_one");
    assert_eq!(d["bundle_version"], 1);
    assert!(d["path"].as_str().unwrap().ends_with("a.txt"), "{d}");
    let d = of(&f.agents[1].0, "bundle_one");
    assert!(d["path"].as_str().unwrap().ends_with("before.txt"), "{d}");

    // v2 adds a rule; both agents switch to it and it fires on a file written afterwards.
    let v2 = f.tmp.join("v2");
    yara(&v2, "bundle_one", "VEDETTE-BUNDLE-ONE");
    yara(&v2, "bundle_two", "VEDETTE-BUNDLE-TWO");
    let out = publish(&f.c, &[v2.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_version(&f.c, &agents, 2);
    std::fs::write(f.agents[1].1.join("b.txt"), "VEDETTE-BUNDLE-TWO").unwrap();
    let d = detection(&f.c, "bundle_two");
    assert_eq!(d["bundle_version"], 2);
    assert_eq!(d["agent_id"], f.agents[1].0.id.as_str());

    let status = f.c.ctl_ok(&["rules", "status", "2", "--json"]);
    let s: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(s["on_version"], 2, "{s}");
    assert_eq!(s["behind"], 0, "{s}");
    let list = vedette_tests::json_lines(&f.c.ctl_ok(&["rules", "list", "--json"]));
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["version"], 2);
    assert_eq!(list[0]["files"], 2);
    let shown = f.c.ctl_ok(&["rules", "show", "2"]);
    assert!(shown.contains("bundle_two.yar"), "{shown}");
    // The signer as `keys generate` names a key: its id and SHA-256, not the raw key.
    let signer = shown.lines().find(|l| l.starts_with("signed by:")).unwrap();
    assert!(
        signer.contains("key id ") && signer.contains("(SHA-256 "),
        "{signer}"
    );

    // Nothing was restarted.
    for ((a, _), pid) in f.agents.iter().zip(pids) {
        assert_eq!(a.proc.as_ref().unwrap().child.id(), pid);
    }
    // Rollback republishes v1's content as v3: the agents run it.
    let out = f.c.ctl(&["rules", "rollback", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_version(&f.c, &agents, 3);
    let shown = f.c.ctl_ok(&["rules", "show", "3"]);
    assert!(!shown.contains("bundle_two.yar"), "{shown}");
}

#[test]
fn bad_bundles_are_refused_with_a_clear_error_and_change_nothing() {
    let mut f = fleet(1);
    let good = f.tmp.join("good");
    yara(&good, "good_rule", "VEDETTE-GOOD");
    let out = publish(&f.c, &[good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let agent = &f.agents[0].0;
    wait_version(&f.c, &[agent], 1);
    let versions = |c: &Collector| {
        vedette_tests::json_lines(&c.ctl_ok(&["rules", "list", "--json"]))
            .iter()
            .map(|b| b["version"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };

    // A YARA syntax error: the message names the file and line; nothing is sent.
    let broken = f.tmp.join("broken");
    yara(&broken, "fine", "VEDETTE-FINE");
    std::fs::write(
        broken.join("broken.yar"),
        "rule ok { condition: true }\n\nrule broken {\n  condition: nope\n}\n",
    )
    .unwrap();
    let out = publish(&f.c, &[broken.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("broken.yar:4:"), "{err}");
    assert!(err.contains("nothing was published"), "{err}");

    // An indicator line that does not parse, with --strict.
    let iocs = f.tmp.join("iocs");
    std::fs::create_dir_all(&iocs).unwrap();
    std::fs::write(
        iocs.join("fleet-hash-iocs.txt"),
        "# hashes\nd41d8cd98f00b204e9800998ecf8427e;empty file\nnot-a-hash;oops\n",
    )
    .unwrap();
    let out = publish(&f.c, &["--strict", iocs.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("fleet-hash-iocs.txt:3:"), "{err}");

    // Signed by a key nobody trusts.
    let other = f.tmp.join("other");
    let out =
        f.c.ctl(&["keys", "generate", "--out", other.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let other_key = f.tmp.join("other.key");
    let out = publish(
        &f.c,
        &[
            "--sign-key",
            other_key.to_str().unwrap(),
            good.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not trusted"), "{}", stderr(&out));

    // Unsigned.
    let out = publish(&f.c, &["--insecure-unsigned", good.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not signed"), "{}", stderr(&out));

    // Content altered after signing, sent with the operator certificate.
    let key = SigningKey::load(&f.c.dir.join("maintainer.key")).unwrap();
    let content = BundleContent {
        name: "rules".into(),
        version: 2,
        created_at_ms: 1,
        publisher: "test".into(),
        files: vec![BundleFile {
            path: "x.yar".into(),
            data: b"rule x { strings: $a = \"A\" condition: $a }".to_vec(),
        }],
        fleet: f.c.fingerprint.clone(),
    };
    let bytes = bundle::encode(&content);
    let signature = key.sign(&bytes);
    let mut altered = bytes.clone();
    let at = altered.len() - 3;
    altered[at] = b'B';
    let operator = ClientTls {
        ca_pem: f.c.file("ca.crt"),
        identity: Some((f.c.file("operator.crt"), f.c.file("operator.key"))),
    };
    let agent_tls = ClientTls {
        ca_pem: agent.file("ca.crt"),
        identity: Some((agent.file("agent.crt"), agent.file("agent.key"))),
    };
    let send = |tls: &ClientTls, content: Vec<u8>| {
        let req = PublishBundleRequest {
            content,
            signature: signature.clone(),
            signer_key: key.public().0.to_vec(),
            to_label: String::new(),
        };
        rt().block_on(async {
            let ch = connect(&f.c.addr, tls).await.expect("connects");
            AdminServiceClient::new(ch).publish_bundle(req).await
        })
    };
    let e = send(&operator, altered).expect_err("altered content");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("does not match"), "{e:?}");
    // Correctly signed but not compiling, sent past vedettectl's own check: the collector
    // compiles it again and names the file and line.
    let broken = BundleContent {
        files: vec![BundleFile {
            path: "x.yar".into(),
            data: b"rule x {\n  condition: nope\n}\n".to_vec(),
        }],
        ..content.clone()
    };
    let broken = bundle::encode(&broken);
    let req = PublishBundleRequest {
        signature: key.sign(&broken),
        content: broken,
        signer_key: key.public().0.to_vec(),
        to_label: String::new(),
    };
    let e = rt()
        .block_on(async {
            let ch = connect(&f.c.addr, &operator).await.expect("connects");
            AdminServiceClient::new(ch).publish_bundle(req).await
        })
        .expect_err("broken YARA");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("bundle:x.yar:2:"), "{e:?}");
    // An agent certificate cannot publish, even a correctly signed bundle.
    let e = send(&agent_tls, bytes.clone()).expect_err("agent publishing");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // An operator certificate without the maintainer role.
    let out = std::process::Command::new(vedette_tests::bin("vedette-collector"))
        .args(["certs", "issue", "--config"])
        .arg(f.c.dir.join("collector.toml"))
        .args(["--name", "bob", "--role", "operator", "--out"])
        .arg(f.c.dir.join("bob"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let bob = f.c.dir.join("bob.toml");
    std::fs::write(
        &bob,
        format!(
            "collector = \"{}\"\nca_cert = \"ca.crt\"\ncert = \"bob.crt\"\nkey = \"bob.key\"\nsign_key = \"maintainer.key\"\n",
            f.c.addr
        ),
    )
    .unwrap();
    let out = vedette_tests::vedettectl(&bob, &["rules", "publish", good.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("maintainer role"), "{}", stderr(&out));

    // Nothing changed anywhere.
    assert_eq!(versions(&f.c), vec![1]);
    let a = agent.info(&f.c).unwrap();
    assert_eq!(a["bundle_version"], 1, "{a}");

    // A bundle the collector accepts but the agent does not: signed by a key added to the
    // collector after this agent enrolled (the agent pinned only the first one). The agent
    // keeps running version 1 and reports why.
    let cfg = f.c.dir.join("collector.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "maintainer_keys = [\"maintainer.pub\"]",
        &format!(
            "maintainer_keys = [\"maintainer.pub\", {:?}]",
            f.tmp.join("other.pub").to_str().unwrap()
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    f.c.stop();
    f.c.start();
    wait_for(Duration::from_secs(30), "the agent to reconnect", || {
        (agent.info(&f.c)?["connected"] == true).then_some(())
    });
    let out = publish(
        &f.c,
        &[
            "--sign-key",
            other_key.to_str().unwrap(),
            good.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let s = wait_until(
        Duration::from_secs(30),
        "the agent to refuse version 2",
        || {
            let s: Value = serde_json::from_str(&f.c.ctl_ok(&["rules", "status", "2", "--json"]))
                .map_err(|e| e.to_string())?;
            if s["failed"] == 1 {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    );
    assert!(
        s["agents"][0]["error"]
            .as_str()
            .unwrap()
            .contains("not trusted"),
        "{s}"
    );
    let a = agent.info(&f.c).unwrap();
    assert_eq!(a["bundle_version"], 1, "{a}");
    assert_eq!(a["bundle_failed_version"], 2, "{a}");
}

#[test]
fn an_agent_restarted_while_the_collector_is_down_runs_its_last_good_bundle() {
    let mut f = fleet(1);
    let rules = f.tmp.join("rules");
    yara(&rules, "kept_rule", "VEDETTE-KEPT");
    let out = publish(&f.c, &[rules.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_version(&f.c, &[&f.agents[0].0], 1);

    let (agent, watch) = &mut f.agents[0];
    let mut p = agent.proc.take().unwrap();
    assert!(p.signal_and_wait("TERM").success(), "{}", p.log_text());
    f.c.stop();
    agent.start(&["--watch", watch.to_str().unwrap()]);
    let log = wait_for(
        Duration::from_secs(30),
        "the agent to load its last-good bundle",
        || {
            let log = agent.proc.as_ref()?.log_text();
            (log.contains("running the last-good rule bundle") && log.contains("watching"))
                .then_some(log)
        },
    );
    assert!(log.contains("version=1"), "{log}");
    std::fs::write(watch.join("k.txt"), "VEDETTE-KEPT").unwrap();
    wait_for(
        Duration::from_secs(20),
        "the detection to be spooled",
        || (agent.spool()?["pending"].as_u64()? >= 1).then_some(()),
    );
    f.c.start();
    let d = detection(&f.c, "kept_rule");
    assert_eq!(d["bundle_version"], 1);
}

/// Each agent's `bundle_version`, by id.
fn versions(c: &Collector) -> std::collections::BTreeMap<String, u64> {
    c.agents()
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_string(),
                a["bundle_version"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_version_published_to_a_label_reaches_only_its_agents_until_it_is_promoted() {
    let f = fleet(3);
    let agents: Vec<&Agent> = f.agents.iter().map(|(a, _)| a).collect();
    let (canary, second, other) = (agents[0], agents[1], agents[2]);
    let v1 = f.tmp.join("v1");
    yara(&v1, "staged_one", "VEDETTE-STAGED-ONE");
    assert!(publish(&f.c, &[v1.to_str().unwrap()]).status.success());
    wait_version(&f.c, &agents, 1);

    // Labels, by a start of the agent's id; shown and filtered on.
    let out = f.c.ctl_ok(&[
        "agents",
        "label",
        &canary.id[..8],
        "--add",
        "canary",
        "--add",
        "web",
    ]);
    assert!(out.contains("canary, web"), "{out}");
    let listed =
        vedette_tests::json_lines(&f.c.ctl_ok(&["agents", "list", "--json", "--label", "canary"]));
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], canary.id.as_str());
    assert_eq!(listed[0]["labels"], serde_json::json!(["canary", "web"]));
    let bad =
        f.c.ctl(&["agents", "label", &canary.id, "--add", "no spaces"]);
    assert!(
        !bad.status.success() && stderr(&bad).contains("is not a label"),
        "{}",
        stderr(&bad)
    );

    // v2 to the canary only: it runs v2, the others stay on v1.
    let v2 = f.tmp.join("v2");
    yara(&v2, "staged_two", "VEDETTE-STAGED-TWO");
    let out = publish(&f.c, &["--to", "canary", v2.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("pushed to 1 connected agent(s) with label canary"),
        "{text}"
    );
    wait_version(&f.c, &[canary], 2);
    std::fs::write(f.agents[0].1.join("two.txt"), "VEDETTE-STAGED-TWO").unwrap();
    let d = detection(&f.c, "staged_two");
    assert_eq!(d["agent_id"], canary.id.as_str());
    // Detections by label: the canary's, and none from an agent without it.
    let by_label = |label: &str| {
        let text =
            f.c.ctl_ok(&["detections", "list", "--json", "--label", label]);
        vedette_tests::json_lines(&text)
    };
    let canaries = by_label("canary");
    assert!(!canaries.is_empty(), "{canaries:?}");
    assert!(
        canaries.iter().all(|d| d["agent_id"] == canary.id.as_str()),
        "{canaries:?}"
    );
    assert!(by_label("nobody").is_empty());
    let v = versions(&f.c);
    assert_eq!((v[&second.id], v[&other.id]), (1, 1), "{v:?}");
    let s: Value = serde_json::from_str(&f.c.ctl_ok(&["rules", "status", "2", "--json"])).unwrap();
    assert_eq!(
        (s["on_version"].as_u64(), s["not_due"].as_u64()),
        (Some(1), Some(2)),
        "{s}"
    );
    assert_eq!(s["behind"], 0, "{s}");
    assert_eq!(s["to_label"], "canary", "{s}");

    // A second agent labelled canary gets v2 at once.
    f.c.ctl_ok(&["agents", "label", &second.id, "--add", "canary"]);
    wait_version(&f.c, &[second], 2);
    assert_eq!(versions(&f.c)[&other.id], 1);

    // Promoted: everyone runs v2; a version already everyone's cannot be promoted again.
    let out = f.c.ctl_ok(&["rules", "promote", "2"]);
    assert!(out.contains("every agent"), "{out}");
    wait_version(&f.c, &agents, 2);
    let again = f.c.ctl(&["rules", "promote", "2"]);
    assert!(
        stderr(&again).contains("every agent already"),
        "{}",
        stderr(&again)
    );
    let list = vedette_tests::json_lines(&f.c.ctl_ok(&["rules", "list", "--json"]));
    assert!(list.iter().all(|b| b["to_label"].is_null()), "{list:?}");

    // Versions only go forward: v3 to the canaries, then v1's content republished to all as
    // v4 reaches everyone, canaries included.
    let v3 = f.tmp.join("v3");
    yara(&v3, "staged_three", "VEDETTE-STAGED-THREE");
    assert!(
        publish(&f.c, &["--to", "canary", v3.to_str().unwrap()])
            .status
            .success()
    );
    wait_version(&f.c, &[canary, second], 3);
    assert_eq!(versions(&f.c)[&other.id], 2);
    assert!(f.c.ctl(&["rules", "rollback", "1"]).status.success());
    wait_version(&f.c, &agents, 4);

    // Each step is in the audit log.
    let audit = vedette_tests::json_lines(&f.c.ctl_ok(&["audit", "list", "--json"]));
    let labelled = audit
        .iter()
        .filter(|e| e["action"] == "agent.label")
        .count();
    assert_eq!(labelled, 3, "two labels set, one refused: {audit:?}");
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "bundle.promote" && e["outcome"] == "ok")
    );
}

/// `findings.jsonl` in the rules directory sets the built-in findings: a new score for every
/// agent, and `vedette.fileless_exec` turned off on agents labelled `ci` (which count what
/// they leave out). A bad line is refused at publish, named by its line.
#[test]
fn the_bundle_rescores_built_in_findings_and_turns_them_off_per_label() {
    let f = fleet(2);
    let (ci, other) = (&f.agents[0].0, &f.agents[1].0);
    f.c.ctl_ok(&["agents", "label", &ci.id, "--add", "ci"]);
    wait_until(
        Duration::from_secs(30),
        "the agent to know its label",
        || {
            let held = std::fs::read_to_string(ci.state.join("labels")).unwrap_or_default();
            if held == "ci\n" { Ok(()) } else { Err(held) }
        },
    );

    let bad = f.tmp.join("bad");
    yara(&bad, "findings_bad", "VEDETTE-FINDINGS-BAD");
    std::fs::write(
        bad.join("findings.jsonl"),
        "{\"rule\": \"vedette.fileless_exec\", \"score\": 500}\n",
    )
    .unwrap();
    let out = publish(&f.c, &[bad.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("findings.jsonl") && err.contains("line 1: score 500"),
        "{err}"
    );

    let rules = f.tmp.join("rules");
    yara(&rules, "findings_rule", "VEDETTE-FINDINGS");
    std::fs::write(
        rules.join("findings.jsonl"),
        "{\"rule\": \"vedette.fileless_exec\", \"score\": 35}\n\
         {\"rule\": \"vedette.fileless_exec\", \"enabled\": false, \"labels\": [\"ci\"]}\n",
    )
    .unwrap();
    let out = publish(&f.c, &[rules.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_version(&f.c, &[ci, other], 1);

    // A process whose executable is deleted once it runs.
    let gone = f.tmp.join("vedette-findings-gone");
    std::fs::copy("/bin/sleep", &gone).unwrap();
    let mut child = std::process::Command::new(&gone)
        .arg("313.61")
        .spawn()
        .unwrap();
    std::fs::remove_file(&gone).unwrap();
    let pid = u64::from(child.id());
    let off_count = |c: &Collector| {
        c.agents()
            .iter()
            .find(|a| a["id"] == ci.id.as_str())
            .and_then(|a| a["counters"]["findings_off"].as_u64())
            .unwrap_or(0)
    };
    let found = wait_for(Duration::from_secs(60), "the fileless finding", || {
        let all = f.c.detections();
        let ours: Vec<Value> = all
            .into_iter()
            .filter(|d| d["rule"] == "vedette.fileless_exec" && d["pid"].as_u64() == Some(pid))
            .collect();
        (!ours.is_empty() && off_count(&f.c) >= 1).then_some(ours)
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["agent_id"], other.id.as_str());
    assert_eq!(found[0]["score"], 35, "{found:?}");
}

/// `rules publish` names the patterns yara-x says may slow down every scan, by file and line,
/// and publishes; with `--strict` it refuses and publishes nothing.
#[test]
fn slow_patterns_are_named_at_publish_and_refused_with_strict() {
    let f = fleet(0);
    let dir = f.tmp.join("slow");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("slow.yar"),
        "rule quick { strings: $a = \"VEDETTE-QUICK\" condition: $a }\n\
         rule slow { strings: $b = { 00 00 } condition: $b }\n",
    )
    .unwrap();
    let strict = publish(&f.c, &["--strict", dir.to_str().unwrap()]);
    let err = stderr(&strict);
    assert!(!strict.status.success(), "{err}");
    assert!(
        err.contains("slow.yar:2: slow pattern") && err.contains("--strict"),
        "{err}"
    );
    let listed = f.c.ctl_ok(&["rules", "list", "--json"]);
    assert!(listed.trim().is_empty(), "nothing published: {listed}");
    let out = publish(&f.c, &[dir.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: ") && err.contains("slow.yar:2: slow pattern"),
        "{err}"
    );
}
