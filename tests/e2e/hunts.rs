//! Hunts end to end: digests asked of the agents in scope, answered from their histories; an
//! agent offline answers when it reconnects, not after the hunt expired; a scoped operator's
//! hunt never reaches another organisation's agent.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use vedette_tests::{Agent, Collector, bin, output_text, vedettectl, wait_until};

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An operator certificate limited to `org`, and a vedettectl configuration using it.
pub(crate) fn scoped_operator(c: &Collector, name: &str, org: &str) -> PathBuf {
    let issued = std::process::Command::new(bin("vedette-collector"))
        .args(["certs", "issue", "--config"])
        .arg(c.dir.join("collector.toml"))
        .args(["--name", name, "--role", "operator", "--org", org, "--out"])
        .arg(c.dir.join(name))
        .output()
        .unwrap();
    assert!(issued.status.success(), "{}", output_text(&issued));
    c.ctl_config_as(name)
}

/// `hunt show ID --json` as `config` sees it.
fn show(config: &Path, id: &str) -> Value {
    serde_json::from_str(&ok(vedettectl(config, &["hunt", "show", id, "--json"]))).unwrap()
}

/// Waits until the hunt shows `answered` of `asked` agents answered.
fn wait_answers(config: &Path, id: &str, answered: u64, asked: u64) -> Value {
    wait_until(
        Duration::from_secs(30),
        &format!("{answered} of {asked} agents answering {id}"),
        || {
            let v = show(config, id);
            let h = &v["hunt"];
            if h["answered"] == answered && h["asked"] == asked {
                Ok(v)
            } else {
                Err(v.to_string())
            }
        },
    )
}

struct Host {
    agent: Agent,
    config: PathBuf,
    sample: PathBuf,
}

/// An agent of `org` watching a directory of its own, holding the sample.
fn host(c: &Collector, tmp: &Path, name: &str, org: &str, sample: &[u8]) -> Host {
    let token = c.token(&["--org", org]);
    let mut agent = Agent::enroll_with_token(c, &tmp.join(name), &token, &[]);
    agent
        .env
        .push(("VEDETTE_HOSTNAME".into(), format!("host-{name}")));
    let watch = tmp.join(format!("{name}-watch"));
    let rules = tmp.join(format!("{name}-rules"));
    std::fs::create_dir_all(&watch).unwrap();
    std::fs::create_dir_all(&rules).unwrap();
    let config = tmp.join(format!("{name}.toml"));
    vedette_tests::watch_config(&config, &watch, &rules, "");
    agent.run(c, &["--config", config.to_str().unwrap()]);
    let sample_path = watch.join("invoice.pdf.exe");
    std::fs::write(&sample_path, sample).unwrap();
    wait_until(
        Duration::from_secs(30),
        "the sample in the history",
        || match agent.counter(c, "history_records") {
            0 => Err("no history record yet".into()),
            _ => Ok(()),
        },
    );
    Host {
        agent,
        config,
        sample: sample_path,
    }
}

#[test]
fn hunts_reach_agents_in_scope_now_or_when_back_and_never_after_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let mut c = Collector::init(&tmp.join("collector"));
    c.start();
    for org in ["alpha", "bravo"] {
        c.ctl_ok(&["orgs", "create", org]);
    }
    let alpha_soc = scoped_operator(&c, "alpha-soc", "alpha");
    let sample = b"MZ vedette hunt sample\n";
    let digest = hex::encode(Sha256::digest(sample));
    let a0 = host(&c, tmp, "a0", "alpha", sample);
    let mut a1 = host(&c, tmp, "a1", "alpha", sample);
    let b0 = host(&c, tmp, "b0", "bravo", sample);
    let a1_config = a1.config.clone();
    // a1 goes offline before any hunt.
    a1.agent.proc.take().unwrap().signal_and_wait("TERM");

    // Every organisation's agents (the collector's operator); and alpha's (its own operator).
    let all = ok(c.ctl(&["hunt", "--sha256", &digest]));
    let all = all.trim().to_string();
    let mine = ok(vedettectl(
        &alpha_soc,
        &["hunt", "--sha256", &digest.to_uppercase()],
    ));
    let mine = mine.trim().to_string();
    let out = vedettectl(&alpha_soc, &["hunt", "--sha256", &digest, "--org", "bravo"]);
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("own organisation"),
        "{}",
        output_text(&out)
    );
    // One that expires while a1 is away (long enough for the agents online to answer it on a
    // loaded machine).
    let brief = ok(c.ctl(&["hunt", "--md5", &"0".repeat(32), "--expires", "8s"]));
    let brief = brief.trim().to_string();

    let v = wait_answers(&c.ctl_config(), &all, 2, 3);
    let pending: Vec<&Value> = v["agents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["answered"] == false)
        .collect();
    assert_eq!(pending.len(), 1, "{v}");
    assert_eq!(pending[0]["agent_id"], a1.agent.id.as_str(), "{v}");
    let a0_row = v["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent_id"] == a0.agent.id.as_str())
        .unwrap();
    let hit = &a0_row["hits"][0];
    assert_eq!(hit["path"], a0.sample.to_str().unwrap(), "{v}");
    assert_eq!(hit["sha256"], digest.as_str(), "{v}");
    assert_eq!(hit["presence"], "present", "{v}");
    assert_eq!(hit["kind"], "file", "{v}");
    // The scoped operator's hunt asked alpha's agents only, and sees only them in the other.
    wait_answers(&alpha_soc, &mine, 1, 2);
    let seen = show(&alpha_soc, &all);
    assert!(
        seen["agents"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["org"] == "alpha"),
        "{seen}"
    );

    // The brief hunt expires (by the collector's clock) before a1 is back.
    wait_until(Duration::from_secs(30), "the brief hunt to expire", || {
        let v = show(&c.ctl_config(), &brief);
        if v["hunt"]["expired"] == true {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });
    a1.agent.run(&c, &["--config", a1_config.to_str().unwrap()]);
    wait_answers(&c.ctl_config(), &all, 3, 3);
    wait_answers(&alpha_soc, &mine, 2, 2);
    let v = show(&c.ctl_config(), &brief);
    assert_eq!(v["hunt"]["answered"], 2, "answered by a0 and b0 only: {v}");
    let a1_row = v["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent_id"] == a1.agent.id.as_str())
        .unwrap()
        .clone();
    assert_eq!(a1_row["answered"], false, "{v}");

    // bravo's agent answered the two hunts that asked it, never alpha's own.
    wait_until(Duration::from_secs(30), "b0's heartbeat", || {
        match b0.agent.counter(&c, "hunts_answered") {
            2 => Ok(()),
            n => Err(format!("{n}")),
        }
    });
    let log = b0.agent.log();
    assert!(!log.contains(&mine), "{log}");
    // Every hunt is in the audit log.
    let audit = ok(c.ctl(&["audit", "list", "--json"]));
    assert_eq!(audit.matches("\"hunt.start\"").count(), 4, "{audit}");
    let listed = ok(vedettectl(&alpha_soc, &["hunt", "list", "--json"]));
    assert!(listed.contains(&mine) && listed.contains(&all), "{listed}");
}
