//! The lifecycle of tokens, agents and organisations through the real `vedettectl`, and the
//! audit log that records every operator action, as a collector-wide and as a scoped operator
//! read it.

use std::time::Duration;

use serde_json::Value;
use vedette_tests::{
    Agent, Collector, bin, json_lines, output_text, rule_dir, sink_lines, vedettectl, wait_for,
};

const RULE: &str = "lifecycle_marker";
const MARKER: &str = "VEDETTE-LIFECYCLE-MARKER";

/// `vedettectl token list --json` (with `--all` when `all`).
fn tokens(c: &Collector, all: bool) -> Vec<Value> {
    let mut args = vec!["token", "list", "--json"];
    if all {
        args.push("--all");
    }
    json_lines(&c.ctl_ok(&args))
}

/// The error text of a vedettectl run that must fail.
fn refused(c: &Collector, args: &[&str]) -> String {
    let out = c.ctl(args);
    assert!(
        !out.status.success(),
        "{args:?} succeeded: {}",
        output_text(&out)
    );
    output_text(&out)
}

#[test]
fn tokens_agents_and_organisations_have_a_lifecycle_and_every_action_is_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    let sink = tmp.path().join("siem.jsonl");
    let toml = c.dir.join("collector.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    let export = format!(
        "\n[export]\naudit = true\n\n[[export.jsonl]]\npath = \"{}\"\n",
        sink.display()
    );
    std::fs::write(&toml, text + &export).unwrap();
    c.start();

    // A token for three agents: listed with its creator, never with the token itself.
    let token = c.token(&["--uses", "3"]);
    let listed = tokens(&c, false);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let id = listed[0]["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 16);
    assert!(!token.contains(&id), "the id is not part of the token");
    assert_eq!(listed[0]["uses_left"], 3);
    assert_eq!(listed[0]["org"], "default");
    assert_eq!(listed[0]["created_by"], "cert:operator");
    let text = c.ctl_ok(&["token", "list"]);
    assert!(
        text.contains(&id) && text.contains("cert:operator"),
        "{text}"
    );

    // One agent enrolls with it and makes a detection.
    let rules = rule_dir(&tmp.path().join("rules"), RULE, MARKER);
    let mut agent = Agent::enroll_with_token(&c, &tmp.path().join("agent"), &token, &[]);
    let watch = tmp.path().join("watch");
    std::fs::create_dir(&watch).unwrap();
    agent.run_watching(&c, &watch, &rules);
    std::fs::write(watch.join("seen.txt"), MARKER).unwrap();
    let marked = |c: &Collector| {
        c.detections()
            .into_iter()
            .filter(|d| d["rule"] == RULE)
            .count()
    };
    wait_for(Duration::from_secs(30), "the agent's detection", || {
        (marked(&c) > 0).then_some(())
    });
    assert_eq!(tokens(&c, false)[0]["uses_left"], 2);
    // In text: a header, and the organisation beside the host.
    let listed = c.ctl_ok(&["detections", "list"]);
    let mut lines = listed.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("RECEIVED") && header.contains("ORG"),
        "{listed}"
    );
    // (The agent also judges the host's processes: only the marker's row is looked at.)
    let row = lines.find(|l| l.contains(RULE)).expect("the marker's row");
    assert!(
        row.contains("default") && row.contains("seen.txt"),
        "{listed}"
    );

    // Revoked by a start of its id: it enrolls no one, and leaves the default listing.
    let short = &id[..8];
    let out = c.ctl_ok(&["token", "revoke", short]);
    assert!(
        out.contains(&id) && out.contains("2 uses were left"),
        "{out}"
    );
    let again = Agent::try_enroll(&c, &tmp.path().join("late"), &token);
    assert!(!again.status.success());
    assert!(
        output_text(&again).contains("revoked"),
        "{}",
        output_text(&again)
    );
    assert!(tokens(&c, false).is_empty());
    let all = tokens(&c, true);
    assert!(all[0]["revoked_at"].is_string(), "{all:?}");
    let twice = refused(&c, &["token", "revoke", &id]);
    assert!(twice.contains("revoked already"), "{twice}");
    let unknown = refused(&c, &["token", "revoke", "abc"]);
    assert!(unknown.contains("at least 6"), "{unknown}");

    // Removed: revoked, its stream closed, out of the default listing; its detection stays.
    let out = c.ctl_ok(&["agents", "remove", &agent.id]);
    assert!(
        out.contains("removed") && out.contains("stream was closed"),
        "{out}"
    );
    let listed = json_lines(&c.ctl_ok(&["agents", "list", "--json"]));
    assert!(
        listed.iter().all(|a| a["id"] != agent.id.as_str()),
        "{listed:?}"
    );
    let with_removed = json_lines(&c.ctl_ok(&["agents", "list", "--json", "--removed"]));
    let removed = with_removed
        .iter()
        .find(|a| a["id"] == agent.id.as_str())
        .expect("listed with --removed");
    assert_eq!(removed["state"], "removed");
    assert!(removed["removed_at"].is_string());
    assert_eq!(marked(&c), 1, "its detection is kept");
    wait_for(
        Duration::from_secs(10),
        "the removed agent disconnected",
        || {
            json_lines(&c.ctl_ok(&["agents", "list", "--json", "--removed"]))
                .iter()
                .any(|a| a["id"] == agent.id.as_str() && a["connected"] == false)
                .then_some(())
        },
    );

    // Organisations: renamed while nothing belongs to them (their tokens follow), removed
    // with their tokens; refused while an agent belongs to them, saying so.
    c.ctl_ok(&["orgs", "create", "acme"]);
    let acme_token = c.token(&["--org", "acme"]);
    let out = c.ctl_ok(&["orgs", "rename", "acme", "acme-energy"]);
    assert!(out.contains("acme-energy"), "{out}");
    assert!(tokens(&c, false).iter().any(|t| t["org"] == "acme-energy"));
    Agent::enroll_with_token(&c, &tmp.path().join("acme-agent"), &acme_token, &[]);
    let held = refused(&c, &["orgs", "remove", "acme-energy"]);
    assert!(held.contains("still has 1 agents"), "{held}");
    let held = refused(&c, &["orgs", "rename", "acme-energy", "acme2"]);
    assert!(held.contains("still has 1 agents"), "{held}");
    let default = refused(&c, &["orgs", "remove", "default"]);
    assert!(default.contains("cannot be removed"), "{default}");
    c.ctl_ok(&["orgs", "create", "spare"]);
    let spare_token = c.token(&["--org", "spare"]);
    let out = c.ctl_ok(&["orgs", "remove", "spare"]);
    assert!(out.contains("1 unspent tokens"), "{out}");
    let gone = Agent::try_enroll(&c, &tmp.path().join("spare-agent"), &spare_token);
    assert!(
        output_text(&gone).contains("revoked"),
        "{}",
        output_text(&gone)
    );

    // A console account and an operator of acme-energy made on the collector's host.
    let issued = std::process::Command::new(bin("vedette-collector"))
        .args(["certs", "issue", "--config"])
        .arg(c.dir.join("collector.toml"))
        .args(["--name", "acme-soc", "--role", "operator"])
        .args(["--org", "acme-energy", "--out"])
        .arg(c.dir.join("acme-soc"))
        .output()
        .unwrap();
    assert!(issued.status.success(), "{}", output_text(&issued));

    // The audit log holds each action, in order, with who and how it ended.
    let entries = json_lines(&c.ctl_ok(&["audit", "list", "--json", "--limit", "1000"]));
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    let expected = [
        ("token.create", "ok"),
        ("agent.enroll", "ok"),
        ("token.revoke", "ok"),
        ("token.revoke", "refused"),
        ("agent.remove", "ok"),
        ("org.create", "ok"),
        ("token.create", "ok"),
        ("org.rename", "ok"),
        ("agent.enroll", "ok"),
        ("org.remove", "refused"),
        ("org.rename", "refused"),
        ("org.remove", "refused"),
        ("org.create", "ok"),
        ("token.create", "ok"),
        ("org.remove", "ok"),
        ("cert.issue", "ok"),
    ];
    let mut at = 0;
    for (action, outcome) in expected {
        let found = actions[at..]
            .iter()
            .position(|(a, o)| *a == action && o.starts_with(outcome))
            .unwrap_or_else(|| panic!("no {action} {outcome} after entry {at}: {actions:?}"));
        at += found + 1;
    }
    let remove = entries
        .iter()
        .find(|e| e["action"] == "agent.remove")
        .unwrap();
    assert_eq!(remove["actor"], "cert:operator");
    assert_eq!(remove["target"], agent.id.as_str());
    assert_eq!(remove["org"], "default");
    let enroll = entries
        .iter()
        .find(|e| e["action"] == "agent.enroll")
        .unwrap();
    assert_eq!(enroll["actor"], format!("token:{id}"));
    let issue = entries
        .iter()
        .find(|e| e["action"] == "cert.issue")
        .unwrap();
    let me = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    let me = String::from_utf8_lossy(&me.stdout).trim().to_string();
    assert_eq!(
        issue["actor"],
        format!("local:{me}"),
        "the user who ran the command"
    );
    assert_eq!(issue["org"], "acme-energy");
    let text = c.ctl_ok(&["audit", "list"]);
    assert!(
        text.contains("org.remove") && text.contains("refused:"),
        "{text}"
    );

    // The JSONL sink carries every entry once beside the detection, as ECS events; the
    // anonymised organisation's without their detail.
    let lines = wait_for(Duration::from_secs(30), "the audit log in the sink", || {
        let lines = sink_lines(&sink);
        let audit = lines
            .iter()
            .filter(|l| l["event"]["dataset"] == "vedette.audit")
            .count();
        (audit >= entries.len()).then_some(lines)
    });
    let (audit, detections): (Vec<&Value>, Vec<&Value>) = lines
        .iter()
        .partition(|l| l["event"]["dataset"] == "vedette.audit");
    let marker = detections
        .iter()
        .filter(|l| l.to_string().contains(RULE))
        .count();
    assert_eq!(marker, 1, "the detection, once");
    let seqs: std::collections::BTreeSet<u64> = audit
        .iter()
        .map(|l| l["event"]["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs.len(), audit.len(), "each entry once");
    let refusal = audit
        .iter()
        .find(|l| l["event"]["action"] == "org.remove" && l["event"]["outcome"] == "failure")
        .expect("the refused removal");
    assert!(
        refusal["event"]["reason"]
            .as_str()
            .unwrap()
            .contains("still has")
    );
    let acme = audit
        .iter()
        .find(|l| l["event"]["action"] == "token.create" && l["organization"]["name"] == "acme")
        .expect("acme's token");
    assert!(
        acme["vedette"]["audit"]["detail"].is_null(),
        "anonymised: {acme}"
    );
    let first = audit
        .iter()
        .find(|l| l["event"]["action"] == "token.create")
        .unwrap();
    assert_eq!(first["user"]["name"], "cert:operator");
    assert!(
        first["vedette"]["audit"]["detail"]
            .as_str()
            .unwrap()
            .contains("uses 3")
    );

    // Export by organisation: the marker is the default organisation's, none of acme-energy's.
    let of = |org: &str| {
        json_lines(&c.ctl_ok(&["export", "ecs", "--org", org]))
            .iter()
            .filter(|l| l.to_string().contains(RULE))
            .count()
    };
    assert_eq!((of("default"), of("acme-energy")), (1, 0));

    // The operator of acme-energy reads its organisation's entries only.
    let scoped = c.ctl_config_as("acme-soc");
    let out = vedettectl(&scoped, &["audit", "list", "--json", "--limit", "1000"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let own = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert!(!own.is_empty());
    assert!(own.iter().all(|e| e["org"] == "acme-energy"), "{own:?}");
    assert!(own.len() < entries.len());
}

/// `certs issue --csr` signs a request whose key was made elsewhere (and writes no key), with
/// the name and roles given on the command line; `--ctl-config` writes a vedettectl
/// configuration that works as it is once the key is beside it. A file that is no CSR is named.
#[test]
fn an_operator_key_made_elsewhere_is_certified_from_its_csr_with_a_ready_configuration() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let elsewhere = tmp.path().join("laptop");
    std::fs::create_dir(&elsewhere).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(vec!["ignored.example".to_string()])
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    let csr_file = elsewhere.join("bob.csr");
    std::fs::write(&csr_file, csr.pem().unwrap()).unwrap();
    let issue = |csr: &std::path::Path, out: &std::path::Path| {
        std::process::Command::new(bin("vedette-collector"))
            .args(["certs", "issue", "--config"])
            .arg(c.dir.join("collector.toml"))
            .args([
                "--name",
                "bob",
                "--role",
                "operator",
                "--ctl-config",
                "--csr",
            ])
            .arg(csr)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let out = issue(&csr_file, &elsewhere.join("bob"));
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        !elsewhere.join("bob.key").exists(),
        "no key is made for a CSR"
    );
    for f in ["bob.crt", "bob.ca.crt", "bob.vedettectl.toml"] {
        assert!(elsewhere.join(f).is_file(), "{f}: {}", output_text(&out));
    }
    std::fs::write(elsewhere.join("bob.key"), key.serialize_pem()).unwrap();
    let listed =
        vedette_tests::vedettectl(&elsewhere.join("bob.vedettectl.toml"), &["agents", "list"]);
    assert!(listed.status.success(), "{}", output_text(&listed));
    let audit = json_lines(&c.ctl_ok(&["audit", "list", "--json"]));
    assert!(
        audit.iter().any(|e| e["action"] == "cert.issue"
            && e["detail"].as_str().is_some_and(|d| d.contains("bob"))),
        "{audit:?}"
    );

    let bad = elsewhere.join("not-a.csr");
    std::fs::write(&bad, "hello").unwrap();
    let out = issue(&bad, &elsewhere.join("bad"));
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("not-a.csr"),
        "{}",
        output_text(&out)
    );
    assert!(!elsewhere.join("bad.crt").exists());
}
