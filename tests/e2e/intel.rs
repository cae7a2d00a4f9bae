//! Shared threat intelligence end to end: STIX 2.1 bundles and MISP events imported with
//! `vedettectl intel import`, published in a signed bundle, matched by a real agent, and the
//! detections carrying each indicator's provenance back.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use vedette_tests::{Agent, Collector, json_lines, sink_lines, wait_for};

/// SHA-256 of `data`, hex, by the system's sha256sum (a peer implementation).
fn sha256(data: &[u8], dir: &Path) -> String {
    let f = dir.join("hash-me");
    std::fs::write(&f, data).unwrap();
    let out = std::process::Command::new("sha256sum")
        .arg(&f)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

/// Whether Python has the peer tools' modules (installed from PyPI as `packages`). Without
/// them a test skips, saying so, except where `VEDETTE_TEST_PEERS=required` (`.ci/run`).
pub(crate) fn peer_tools(modules: &[&str], packages: &str) -> bool {
    let missing: Vec<&str> = modules
        .iter()
        .copied()
        .filter(|m| {
            !std::process::Command::new("python3")
                .args(["-c", &format!("import {m}")])
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    vedette_tests::missing_peer(
        &format!("{packages} (Python modules {missing:?})"),
        &format!("pip install {packages}"),
    );
    false
}

pub(crate) fn detection(c: &Collector, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    wait_for(Duration::from_secs(30), what, || {
        c.detections().into_iter().find(|d| f(d))
    })
}

/// A running collector under `tmp`, and an enrolled agent connected to it that watches
/// `tmp/watch`.
fn watched(tmp: &Path) -> (Collector, Agent, std::path::PathBuf) {
    let mut c = Collector::init(&tmp.join("collector"));
    c.start();
    let mut agent = Agent::enroll(&c, &tmp.join("agent"));
    let watch = tmp.join("watch");
    std::fs::create_dir(&watch).unwrap();
    agent.run(&c, &["--watch", watch.to_str().unwrap()]);
    (c, agent, watch)
}

#[test]
fn stix_and_misp_indicators_reach_agents_and_detections_carry_their_provenance() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let (c, _agent, watch) = watched(tmp);

    // A rule bundle first: intel publishing keeps its files.
    let rules = vedette_tests::rule_dir(&tmp.join("rules"), "fleet_rule", "VEDETTE-FLEET-RULE");
    c.ctl_ok(&["rules", "publish", rules.to_str().unwrap()]);

    let stix_payload = b"VEDETTE-STIX-SHA256 payload\n";
    let misp_payload = b"VEDETTE-MISP-SHA256 payload\n";
    let stix = tmp.join("apt-bundle.json");
    std::fs::write(
        &stix,
        json!({"type": "bundle", "id": "bundle--5d0092c5-5f74-4287-9642-33f4c354e56d", "objects": [
            {"type": "indicator", "spec_version": "2.1",
             "id": "indicator--a3f4a4c0-4b0b-4d5c-9a7e-0a6b8b8f0001", "name": "Lazarus loader",
             "pattern_type": "stix", "valid_from": "2026-01-01T00:00:00Z",
             "pattern": format!("[file:hashes.'SHA-256' = '{}']", sha256(stix_payload, tmp)),
             "kill_chain_phases": [{"kill_chain_name": "mitre-attack", "phase_name": "T1105"}]},
            {"type": "indicator", "spec_version": "2.1",
             "id": "indicator--a3f4a4c0-4b0b-4d5c-9a7e-0a6b8b8f0002", "name": "Hafnium web shell",
             "pattern_type": "stix", "valid_from": "2026-01-01T00:00:00Z",
             "pattern": "[file:name = 'help.aspx.sh']"},
            {"type": "indicator", "spec_version": "2.1",
             "id": "indicator--a3f4a4c0-4b0b-4d5c-9a7e-0a6b8b8f0003", "name": "YARA from STIX",
             "pattern_type": "yara", "valid_from": "2026-01-01T00:00:00Z",
             "pattern": "rule stix_yara { strings: $a = \"VEDETTE-STIX-YARA\" condition: $a }"},
            {"type": "indicator", "spec_version": "2.1",
             "id": "indicator--a3f4a4c0-4b0b-4d5c-9a7e-0a6b8b8f0004", "name": "Needs correlation",
             "pattern_type": "stix", "valid_from": "2026-01-01T00:00:00Z",
             "pattern": "[file:name = 'a'] FOLLOWEDBY [file:name = 'b']"},
        ]})
        .to_string(),
    )
    .unwrap();
    let event_uuid = "5e8c2b8a-0f4a-4d36-9b3c-0e6f1a2b3c4d";
    let misp = tmp.join("lazarus-event.json");
    std::fs::write(
        &misp,
        json!({"Event": {"uuid": event_uuid, "info": "Lazarus crypto theft",
        "Tag": [{"name": "misp-galaxy:mitre-attack-pattern=\"Ingress Tool Transfer - T1105\""}],
        "Attribute": [
            {"uuid": "6a1b2c3d-0000-4000-8000-000000000001", "type": "sha256",
             "value": sha256(misp_payload, tmp), "to_ids": true},
            {"uuid": "6a1b2c3d-0000-4000-8000-000000000002", "type": "filename",
             "value": "not-for-detection.bin", "to_ids": false},
            {"uuid": "6a1b2c3d-0000-4000-8000-000000000003", "type": "btc",
             "value": "1BoatSLRHtKNngkdXEeobR76b53LETtpyT", "to_ids": true},
        ]}})
        .to_string(),
    )
    .unwrap();

    let out = c.ctl_ok(&[
        "intel",
        "import",
        stix.to_str().unwrap(),
        misp.to_str().unwrap(),
    ]);
    assert!(out.contains("accepted 3, skipped 0, rejected 1"), "{out}");
    assert!(
        out.contains("rejected indicator--a3f4a4c0-4b0b-4d5c-9a7e-0a6b8b8f0004: FOLLOWEDBY"),
        "{out}"
    );
    assert!(out.contains("accepted 1, skipped 1, rejected 1"), "{out}");
    assert!(
        out.contains("skipped  6a1b2c3d-0000-4000-8000-000000000002: filename: to_ids is false"),
        "{out}"
    );
    assert!(
        out.contains("rejected 6a1b2c3d-0000-4000-8000-000000000003: MISP type `btc`"),
        "{out}"
    );

    let status = json_lines(&c.ctl_ok(&["intel", "status", "--json"]));
    assert_eq!(status.len(), 2, "{status:?}");
    let staged: u64 = status.iter().map(|s| s["staged"].as_u64().unwrap()).sum();
    assert_eq!(
        staged, 4,
        "only the evaluable to_ids indicators are staged: {status:?}"
    );

    let out = c.ctl_ok(&["intel", "publish"]);
    assert!(
        out.contains("published bundle version 2 with 4 staged indicator(s)"),
        "{out}"
    );

    // Not matched: the to_ids=false file name. Written first, so that when the later files
    // are detected it had its chance.
    std::fs::write(watch.join("not-for-detection.bin"), "nothing").unwrap();
    std::fs::write(watch.join("loader.bin"), stix_payload).unwrap();
    std::fs::write(watch.join("help.aspx.sh"), "<% eval %>").unwrap();
    std::fs::write(watch.join("y.txt"), "VEDETTE-STIX-YARA").unwrap();
    std::fs::write(watch.join("theft.bin"), misp_payload).unwrap();
    std::fs::write(watch.join("fleet.txt"), "VEDETTE-FLEET-RULE").unwrap();

    let d = detection(&c, "the STIX hash detection", |d| {
        d["rule"] == "Lazarus loader"
    });
    assert_eq!(
        d["indicator"],
        json!({"source": "stix", "id": "indicator--a3f4a4c0-4b0b-4d5c-9a7e-0a6b8b8f0001",
               "origin": std::fs::canonicalize(&stix).unwrap().display().to_string()})
    );
    assert_eq!(d["techniques"], json!(["T1105"]));
    assert_eq!(d["kind"], "hash");
    let d = detection(&c, "the STIX file-name detection", |d| {
        d["rule"] == "Hafnium web shell"
    });
    assert_eq!(
        d["indicator"]["id"],
        "indicator--a3f4a4c0-4b0b-4d5c-9a7e-0a6b8b8f0002"
    );
    assert_eq!(d["kind"], "filename");
    let d = detection(&c, "the STIX YARA detection", |d| d["rule"] == "stix_yara");
    assert_eq!(
        d["indicator"]["id"],
        "indicator--a3f4a4c0-4b0b-4d5c-9a7e-0a6b8b8f0003"
    );
    assert_eq!(d["indicator"]["source"], "stix");
    // The collector checked that outside YARA (and the bundle) in its compiler child, never in
    // its own process.
    let log = c.proc.as_ref().map(|p| p.log_text()).unwrap_or_default();
    assert!(log.contains("rule compiler finished"), "{log}");
    let d = detection(&c, "the MISP detection", |d| {
        d["indicator"]["source"] == "misp"
    });
    assert_eq!(
        d["indicator"],
        json!({"source": "misp", "id": "6a1b2c3d-0000-4000-8000-000000000001",
               "event": event_uuid,
               "origin": std::fs::canonicalize(&misp).unwrap().display().to_string()})
    );
    assert_eq!(d["techniques"], json!(["T1105"]));
    assert_eq!(d["rule"], "Lazarus crypto theft (sha256)");
    let d = detection(&c, "the fleet rule's detection", |d| {
        d["rule"] == "fleet_rule"
    });
    assert_eq!(
        d["indicator"],
        json!({"source": "yara", "id": "fleet_rule", "origin": "bundle"})
    );

    let all = c.detections();
    assert!(
        !all.iter().any(|d| d["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("not-for-detection.bin"))),
        "{all:?}"
    );
    assert!(all.iter().all(|d| d["indicator"].is_object()), "{all:?}");
}

/// A child process killed when the test ends, whatever happens.
pub(crate) struct Helper(pub(crate) std::process::Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A python3 process holding a TCP connection to a listener of its own on `addr`; returns once
/// it is connected.
pub(crate) fn connection_to(addr: &str) -> Helper {
    use std::io::BufRead;
    let script = format!(
        "import socket, sys, time\n\
         l = socket.socket(); l.bind(('{addr}', 0)); l.listen(1)\n\
         c = socket.create_connection(l.getsockname()); s, _ = l.accept()\n\
         print('ready', flush=True)\n\
         time.sleep(120)\n"
    );
    let mut child = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    Helper(child)
}

#[test]
fn exports_of_file_process_and_connection_detections_pass_the_peer_tools() {
    if !peer_tools(&["stix2validator", "pymisp"], "stix2-validator pymisp") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let (c, agent, watch) = watched(tmp);
    let _conn = connection_to("127.0.0.77");

    let stix = tmp.join("c2.json");
    let indicator = |n: u32, name: &str, pattern: &str| {
        json!({"type": "indicator", "spec_version": "2.1",
            "id": format!("indicator--b1c2d3e4-0000-4000-8000-00000000000{n}"), "name": name,
            "created": "2026-11-01T00:00:00.000Z", "modified": "2026-11-01T00:00:00.000Z",
            "pattern_type": "stix", "valid_from": "2026-01-01T00:00:00Z", "pattern": pattern,
            "kill_chain_phases": [{"kill_chain_name": "mitre-attack", "phase_name": "T1071"}]})
    };
    std::fs::write(
        &stix,
        json!({"type": "bundle", "id": "bundle--b1c2d3e4-0000-4000-8000-000000000000", "objects": [
            indicator(1, "dropper name", "[file:name = 'export-me.bin']"),
            indicator(2, "C2 address", "[ipv4-addr:value = '127.0.0.77']"),
            indicator(3, "reverse shell", "[process:command_line MATCHES 'vedette-export-marker']"),
        ]})
        .to_string(),
    )
    .unwrap();
    c.ctl_ok(&["intel", "import", stix.to_str().unwrap()]);
    c.ctl_ok(&["intel", "publish"]);
    wait_for(Duration::from_secs(30), "the agent on bundle 1", || {
        c.agents()
            .iter()
            .any(|a| a["bundle_version"] == 1)
            .then_some(())
    });
    // Its exec wakes the process watcher, which polls everything again under the new rules.
    let _shell = Helper(
        std::process::Command::new("sh")
            .args(["-c", "sleep 60; : vedette-export-marker"])
            .spawn()
            .unwrap(),
    );
    std::fs::write(watch.join("export-me.bin"), "payload").unwrap();
    for kind in ["filename", "process", "connection"] {
        detection(&c, &format!("a {kind} detection"), |d| {
            d["kind"] == kind && d["indicator"]["source"] == "stix"
        });
    }

    // STIX 2.1: the validator finds no error; each sighting refers to the original indicator.
    let bundle_path = tmp.join("sightings.json");
    let out = c.ctl_ok(&["export", "stix", "--organisation", "CERT-Test"]);
    std::fs::write(&bundle_path, &out).unwrap();
    // The stix2_validator command, run through the Python checked above (whatever PATH says).
    let (valid, report) = stix_validated(&bundle_path);
    assert!(valid, "{report}\n{out}");
    let bundle: Value = serde_json::from_str(&out).unwrap();
    let objects = bundle["objects"].as_array().unwrap();
    let sightings: Vec<&Value> = objects.iter().filter(|o| o["type"] == "sighting").collect();
    for n in 1..=3 {
        let id = format!("indicator--b1c2d3e4-0000-4000-8000-00000000000{n}");
        assert!(
            sightings
                .iter()
                .any(|s| s["sighting_of_ref"] == id.as_str()),
            "{id}: {out}"
        );
    }
    let org = objects
        .iter()
        .find(|o| o["type"] == "identity")
        .expect("the organisation's identity");
    assert_eq!(org["name"], "CERT-Test");
    assert!(
        sightings
            .iter()
            .all(|s| s["where_sighted_refs"][0] == org["id"])
    );
    for sco in ["file", "process", "network-traffic", "ipv4-addr"] {
        assert!(
            objects.iter().any(|o| o["type"] == sco),
            "no {sco} in {out}"
        );
    }

    // MISP: PyMISP loads the event and sees what was observed.
    let event_path = tmp.join("event.json");
    std::fs::write(&event_path, c.ctl_ok(&["export", "misp"])).unwrap();
    let loaded = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys; from pymisp import MISPEvent\n\
             e = MISPEvent(); e.load_file(sys.argv[1])\n\
             print(sorted({a.type + ':' + a.value for a in e.attributes}))\n\
             print(sorted(t.name for t in e.tags))",
        ])
        .arg(&event_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&loaded.stdout);
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    assert!(text.contains("'ip-dst:127.0.0.77'"), "{text}");
    assert!(text.contains("'filename:export-me.bin'"), "{text}");
    assert!(text.contains("mitre-attack-pattern=\"T1071\""), "{text}");

    // ECS: one alert per detection, with the indicator and the technique.
    let ecs = json_lines(&c.ctl_ok(&["export", "ecs"]));
    let conn = ecs
        .iter()
        .find(|e| e["destination"]["ip"] == "127.0.0.77")
        .expect("the connection as ECS");
    assert_eq!(conn["event"]["kind"], "alert");
    assert_eq!(conn["threat"]["technique"]["id"], json!(["T1071"]));
    assert_eq!(
        conn["threat"]["indicator"]["reference"],
        "indicator--b1c2d3e4-0000-4000-8000-000000000002"
    );
    assert!(
        ecs.iter()
            .all(|e| e["@timestamp"].is_string() && e["agent"]["id"] == agent.id.as_str())
    );
}

/// A real TAXII 2.1 server (medallion, memory backend) on a free loopback port.
pub(crate) fn medallion(dir: &Path, collections: Value) -> Option<(Helper, String)> {
    medallion_on(dir, vedette_tests::free_port(), collections, 2)
}

/// The same on a given port, serving at most `page` objects per page (small pages: the
/// collector must follow `more`/`next`).
pub(crate) fn medallion_on(
    dir: &Path,
    port: u16,
    collections: Value,
    page: u32,
) -> Option<(Helper, String)> {
    if !peer_tools(&["medallion"], "medallion") {
        return None;
    }
    let base = format!("http://127.0.0.1:{port}");
    let data = dir.join("taxii-data.json");
    std::fs::write(
        &data,
        json!({
            "/discovery": {"title": "test TAXII server", "default": format!("{base}/api1/"),
                           "api_roots": [format!("{base}/api1/")]},
            "api1": {
                "information": {"title": "api1", "versions": ["application/taxii+json;version=2.1"],
                                "max_content_length": 10_000_000},
                "status": [],
                "collections": collections,
            }
        })
        .to_string(),
    )
    .unwrap();
    let config = dir.join("taxii-config.json");
    std::fs::write(
        &config,
        json!({
            "backend": {"module": "medallion.backends.memory_backend",
                        "module_class": "MemoryBackend", "filename": data},
            "users": {"vedette": "s3cret"},
            "taxii": {"max_page_size": page},
        })
        .to_string(),
    )
    .unwrap();
    let child = std::process::Command::new("python3")
        .args(["-c", "from medallion.scripts.run import main; main()"])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("medallion");
    let helper = Helper(child);
    wait_for(Duration::from_secs(30), "medallion to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    Some((helper, format!("{base}/api1/")))
}

pub(crate) fn taxii_collection(id: &str, objects: &[Value]) -> Value {
    let manifest: Vec<Value> = objects
        .iter()
        .enumerate()
        .map(|(i, o)| {
            json!({"id": o["id"], "date_added": format!("2026-11-0{}T00:00:00.000000Z", i + 1),
                   "version": o["modified"], "media_type": "application/stix+json;version=2.1"})
        })
        .collect();
    json!({"id": id, "title": "indicators", "can_read": true, "can_write": true,
           "media_types": ["application/stix+json;version=2.1"],
           "objects": objects, "manifest": manifest})
}

#[test]
fn a_taxii_collection_is_polled_page_by_page_and_its_indicators_reach_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let payload = b"VEDETTE-TAXII-SHA256 payload\n";
    let indicator = |n: u32, pattern_type: &str, pattern: String| {
        json!({"type": "indicator", "spec_version": "2.1",
               "id": format!("indicator--c0ffee00-0000-4000-8000-00000000000{n}"),
               "created": "2026-11-01T00:00:00.000Z", "modified": "2026-11-01T00:00:00.000Z",
               "name": format!("taxii indicator {n}"), "pattern_type": pattern_type,
               "pattern": pattern, "valid_from": "2026-01-01T00:00:00Z"})
    };
    let objects = [
        indicator(
            1,
            "stix",
            format!("[file:hashes.'SHA-256' = '{}']", sha256(payload, tmp)),
        ),
        indicator(2, "stix", "[file:name = 'taxii-dropper.sh']".into()),
        indicator(3, "stix", "[ipv4-addr:value = '198.51.100.0/24']".into()),
        indicator(
            4,
            "yara",
            "rule taxii_yara { strings: $a = \"VEDETTE-TAXII-YARA\" condition: $a }".into(),
        ),
        indicator(
            5,
            "stix",
            "[file:name = 'a'] FOLLOWEDBY [file:name = 'b']".into(),
        ),
    ];
    let good = "9a7b5c3d-1e2f-4a6b-8c9d-0e1f2a3b4c5d";
    let guarded = "9a7b5c3d-1e2f-4a6b-8c9d-0e1f2a3b4c5e";
    let Some((_server, api_root)) = medallion(
        tmp,
        json!([
            taxii_collection(good, &objects),
            taxii_collection(guarded, &objects[..1])
        ]),
    ) else {
        return;
    };

    let mut c = Collector::init(&tmp.join("collector"));
    configure(
        &c,
        &format!(
            "[[intel.taxii]]\nurl = \"{api_root}\"\ncollection = \"{good}\"\nusername = \"vedette\"\n\
             password = \"s3cret\"\ninterval = \"1s\"\nallow_insecure = true\n\n\
             [[intel.taxii]]\nurl = \"{api_root}\"\n\
             collection = \"{guarded}\"\nusername = \"vedette\"\npassword = \"wrong\"\n\
             interval = \"1h\"\nallow_insecure = true\n"
        ),
    );
    c.start();
    let origin = format!("{api_root}collections/{good}/");
    let status = wait_for(
        Duration::from_secs(30),
        "the TAXII collection polled",
        || {
            let s = json_lines(&c.ctl_ok(&["intel", "status", "--json"]));
            let polled = s
                .iter()
                .any(|x| x["origin"] == origin.as_str() && x["staged"] == 4);
            let refused = s.iter().any(|x| {
                x["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("credentials were refused"))
            });
            (polled && refused).then_some(s)
        },
    );
    let good_status = status
        .iter()
        .find(|x| x["origin"] == origin.as_str())
        .unwrap();
    assert_eq!(good_status["kind"], "taxii");
    // Later polls fetch only what was added after the last one: nothing new, nothing lost. A
    // poll's pages each update the status (the counts add up over the pages), so wait for a
    // poll that accepted nothing rather than for a new poll time, which a next page also sets.
    wait_for(
        Duration::from_secs(30),
        "a poll that fetched nothing new",
        || {
            let s = json_lines(&c.ctl_ok(&["intel", "status", "--json"]));
            let x = s.into_iter().find(|x| x["origin"] == origin.as_str())?;
            (x["accepted"] == 0 && x["last_poll"] != good_status["last_poll"]).then_some(x)
        },
    );
    let again = json_lines(&c.ctl_ok(&["intel", "status", "--json"]));
    let x = again
        .iter()
        .find(|x| x["origin"] == origin.as_str())
        .unwrap();
    assert_eq!(
        (x["staged"].as_u64(), x["rejected"].as_u64()),
        (Some(4), Some(0)),
        "{x}"
    );

    let mut agent = Agent::enroll(&c, &tmp.join("agent"));
    let watch = tmp.join("watch");
    std::fs::create_dir(&watch).unwrap();
    agent.run(&c, &["--watch", watch.to_str().unwrap()]);
    let out = c.ctl_ok(&["intel", "publish"]);
    assert!(out.contains("with 4 staged indicator(s)"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "the agent on the intel bundle",
        || {
            c.agents()
                .iter()
                .any(|a| a["bundle_version"] == 1)
                .then_some(())
        },
    );
    std::fs::write(watch.join("payload.bin"), payload).unwrap();
    std::fs::write(watch.join("taxii-dropper.sh"), "#!/bin/sh\n").unwrap();
    std::fs::write(watch.join("y.txt"), "VEDETTE-TAXII-YARA").unwrap();
    for n in [1, 2, 4] {
        let id = format!("indicator--c0ffee00-0000-4000-8000-00000000000{n}");
        let d = detection(&c, &id, |d| d["indicator"]["id"] == id.as_str());
        assert_eq!(d["indicator"]["origin"], origin.as_str());
        assert_eq!(d["indicator"]["source"], "stix");
    }
}

/// Appends TOML to the collector's configuration.
pub(crate) fn configure(c: &Collector, extra: &str) {
    let toml = c.dir.join("collector.toml");
    let mut text = std::fs::read_to_string(&toml).unwrap();
    text.push('\n');
    text.push_str(extra);
    std::fs::write(&toml, text).unwrap();
}

#[test]
fn the_jsonl_sink_exports_every_detection_once_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let mut c = Collector::init(&tmp.join("collector"));
    let sink = tmp.join("detections.jsonl");
    configure(
        &c,
        &format!(
            "[export]\norganisation = \"CERT-Test\"\n\n[[export.jsonl]]\npath = \"{}\"\n",
            sink.display()
        ),
    );
    c.start();
    let mut agent = Agent::enroll(&c, &tmp.join("agent"));
    let watch = tmp.join("watch");
    std::fs::create_dir(&watch).unwrap();
    let rules = vedette_tests::rule_dir(&tmp.join("rules"), "sink_rule", "VEDETTE-SINK");
    agent.run(
        &c,
        &[
            "--watch",
            watch.to_str().unwrap(),
            "--rules",
            rules.to_str().unwrap(),
        ],
    );
    let mut written = 0;
    for round in 0..3 {
        for i in 0..40 {
            std::fs::write(watch.join(format!("f{round}-{i}.txt")), "VEDETTE-SINK").unwrap();
            written += 1;
        }
        // Killed as soon as this round's first exports reach the file: mid-export.
        let before = sink_lines(&sink).len();
        wait_for(Duration::from_secs(30), "an export in this round", || {
            (sink_lines(&sink).len() > before).then_some(())
        });
        c.kill();
        c.start();
    }
    // Every detection the store holds (the rule's, and any the host itself causes) is in the
    // file exactly once.
    let all = wait_for(Duration::from_secs(60), "every detection exported", || {
        let stored = c.detections();
        let l = sink_lines(&sink);
        let rule = stored.iter().filter(|d| d["rule"] == "sink_rule").count();
        (rule == written && l.len() >= stored.len()).then_some(l)
    });
    let mut ids: Vec<&str> = all
        .iter()
        .map(|e| e["event"]["id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), all.len(), "a detection was exported twice");
    let mut stored: Vec<String> = c
        .detections()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    stored.sort();
    assert_eq!(ids, stored);
    let seqs: Vec<u64> = all
        .iter()
        .map(|e| e["event"]["sequence"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in store order: {seqs:?}"
    );
    let status = json_lines(&c.ctl_ok(&["intel", "status", "--json"]));
    let s = status
        .iter()
        .find(|s| s["kind"] == "export")
        .expect("the sink in intel status");
    assert_eq!(s["backlog"], 0, "{s}");
}

#[test]
fn sightings_reach_a_taxii_collection_that_refused_for_a_while() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let sightings = "5197b5c3-0000-4a6b-8c9d-0e1f2a3b4c5d";
    // The server is down at first: its port is held by a listener that closes every
    // connection at once (so no other test's server can take the port meanwhile).
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    holder.set_nonblocking(true).unwrap();
    let port = holder.local_addr().unwrap().port();
    let refusing = Arc::new(AtomicBool::new(true));
    let refuser = {
        let refusing = refusing.clone();
        std::thread::spawn(move || {
            while refusing.load(Ordering::Relaxed) {
                match holder.accept() {
                    Ok((conn, _)) => drop(conn),
                    // Polled: the listener is non-blocking so that the thread sees the flag.
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })
    };
    let api_root = format!("http://127.0.0.1:{port}/api1/");
    let mut c = Collector::init(&tmp.join("collector"));
    configure(
        &c,
        &format!(
            "[export]\norganisation = \"CERT-Test\"\nsighting_window = \"7d\"\n\n\
             [[export.taxii]]\nurl = \"{api_root}\"\n\
             collection = \"{sightings}\"\nusername = \"vedette\"\npassword = \"s3cret\"\n\
             allow_insecure = true\n"
        ),
    );
    c.start();
    let mut agent = Agent::enroll(&c, &tmp.join("agent"));
    let watch = tmp.join("watch");
    std::fs::create_dir(&watch).unwrap();
    // Files only: processes that run deleted executables elsewhere on the host would be
    // sightings too, and the server pages two objects at a time.
    let config = tmp.join("agent.toml");
    std::fs::write(&config, "processes = false\n").unwrap();
    agent.run(
        &c,
        &[
            "--config",
            config.to_str().unwrap(),
            "--watch",
            watch.to_str().unwrap(),
        ],
    );
    let stix = tmp.join("bundle.json");
    let id = "indicator--5197b5c3-0000-4000-8000-000000000001";
    let by_hash = "indicator--5197b5c3-0000-4000-8000-000000000002";
    std::fs::write(
        &stix,
        json!({"type": "bundle", "id": "bundle--5197b5c3-0000-4000-8000-000000000000", "objects": [
            {"type": "indicator", "spec_version": "2.1", "id": id, "name": "sink test",
             "created": "2026-11-01T00:00:00.000Z", "modified": "2026-11-01T00:00:00.000Z",
             "pattern_type": "stix", "pattern": "[file:name = 'sighted.bin']",
             "valid_from": "2026-01-01T00:00:00Z"},
            {"type": "indicator", "spec_version": "2.1", "id": by_hash, "name": "by hash",
             "created": "2026-11-01T00:00:00.000Z", "modified": "2026-11-01T00:00:00.000Z",
             "pattern_type": "stix",
             "pattern": format!("[file:hashes.'SHA-256' = '{X_SHA256}']"),
             "valid_from": "2026-01-01T00:00:00Z"}]})
        .to_string(),
    )
    .unwrap();
    c.ctl_ok(&["intel", "import", stix.to_str().unwrap()]);
    c.ctl_ok(&["intel", "publish"]);
    wait_for(Duration::from_secs(30), "the agent on bundle 1", || {
        c.agents()
            .iter()
            .any(|a| a["bundle_version"] == 1)
            .then_some(())
    });
    std::fs::write(watch.join("sighted.bin"), "x").unwrap();
    detection(&c, "the detection", |d| d["indicator"]["id"] == id);
    wait_for(
        Duration::from_secs(30),
        "the sink to report the refusal",
        || {
            json_lines(&c.ctl_ok(&["intel", "status", "--json"]))
                .into_iter()
                .find(|s| {
                    s["kind"] == "export"
                        && s["last_error"].is_string()
                        && s["backlog"].as_u64() >= Some(1)
                })
        },
    );

    refusing.store(false, Ordering::Relaxed);
    refuser.join().unwrap();
    let Some((_server, started_root)) =
        medallion_on(tmp, port, json!([taxii_collection(sightings, &[])]), 2)
    else {
        return;
    };
    assert_eq!(started_root, api_root);
    // The sink retries with a backoff of up to 64 s: the next attempt may be that far off.
    let sighting = wait_for(
        Duration::from_secs(180),
        "the sighting in the TAXII collection",
        || {
            taxii_sightings(&api_root, sightings)
                .into_iter()
                .find(|o| o["sighting_of_ref"] == id)
        },
    );
    assert_eq!(sighting["count"], 1);

    // 49 more files of the same content: the hash indicator's 50 detections in one window are
    // one sighting, sent again as they come, whose latest version counts all 50.
    for i in 0..49 {
        std::fs::write(watch.join(format!("copy-{i}.bin")), "x").unwrap();
    }
    let of_hash = |c: &Collector| {
        c.detections()
            .into_iter()
            .filter(|d| d["indicator"]["id"] == by_hash)
            .collect::<Vec<_>>()
    };
    let detected = wait_for(Duration::from_secs(60), "50 detections of the hash", || {
        let found = of_hash(&c);
        (found.len() == 50).then_some(found)
    });
    let aggregated = wait_for(Duration::from_secs(60), "the sighting counting 50", || {
        let found = taxii_sightings(&api_root, sightings);
        let of: Vec<Value> = found
            .into_iter()
            .filter(|o| o["sighting_of_ref"] == by_hash)
            .collect();
        (of.len() == 1 && of[0]["count"] == 50).then(|| of[0].clone())
    });
    let mut seen: Vec<&str> = detected
        .iter()
        .filter_map(|d| d["observed_at"].as_str())
        .collect();
    seen.sort_unstable();
    assert_eq!(
        aggregated["first_seen"].as_str(),
        seen.first().copied(),
        "{aggregated}"
    );
    assert_eq!(
        aggregated["last_seen"].as_str(),
        seen.last().copied(),
        "{aggregated}"
    );
    assert!(aggregated["modified"].as_str() >= aggregated["created"].as_str());

    // A false-positive verdict on that indicator's alert goes to the collection as an opinion
    // on the indicator, and `export stix` carries it too; the validator accepts both.
    let alert = json_lines(&c.ctl_ok(&["alerts", "list", "--json"]))
        .into_iter()
        .find(|a| a["rule"] == detected[0]["rule"])
        .expect("the hash indicator's alert");
    c.ctl_ok(&[
        "alerts",
        "set",
        &alert["id"].to_string(),
        "--status",
        "false-positive",
    ]);
    let opinion = wait_for(
        Duration::from_secs(60),
        "the opinion in the collection",
        || {
            taxii_objects(&api_root, sightings, "opinion")
                .into_iter()
                .find(|o| o["object_refs"] == json!([by_hash]))
        },
    );
    assert_eq!(opinion["opinion"], "strongly-disagree");
    let out = c.ctl_ok(&["export", "stix", "--organisation", "CERT-Test"]);
    let exported: Value = serde_json::from_str(&out).unwrap();
    let opinions: Vec<&Value> = exported["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["type"] == "opinion")
        .collect();
    assert_eq!(opinions.len(), 1, "{out}");
    assert_eq!(opinions[0]["id"], opinion["id"], "the same opinion");
    if peer_tools(&["stix2validator"], "stix2-validator") {
        let path = tmp.join("with-opinion.json");
        std::fs::write(&path, &out).unwrap();
        let (valid, report) = stix_validated(&path);
        assert!(valid, "{report}\n{out}");
    }
    let s = wait_for(Duration::from_secs(30), "the backlog drained", || {
        json_lines(&c.ctl_ok(&["intel", "status", "--json"]))
            .into_iter()
            .find(|s| s["kind"] == "export" && s["backlog"] == 0)
    });
    assert!(s["last_error"].is_null(), "{s}");
}

/// A local HTTP server that records every request (method, path, headers, body) as a JSON line
/// and answers as a MISP instance would: its version to GETs, the sighting to POSTs.
pub(crate) fn capture_server(log: &Path) -> (Helper, String) {
    use std::io::BufRead;
    let script = "import json, sys\n\
        from http.server import BaseHTTPRequestHandler, HTTPServer\n\
        log = open(sys.argv[1], 'a')\n\
        class H(BaseHTTPRequestHandler):\n\
        \x20   def answer(self, body):\n\
        \x20       n = int(self.headers.get('content-length') or 0)\n\
        \x20       sent = self.rfile.read(n).decode() if n else ''\n\
        \x20       log.write(json.dumps({'method': self.command, 'path': self.path,\n\
        \x20           'headers': {k.lower(): v for k, v in self.headers.items()}, 'body': sent}) + '\\n')\n\
        \x20       log.flush()\n\
        \x20       out = json.dumps(body).encode()\n\
        \x20       self.send_response(200); self.send_header('content-type', 'application/json')\n\
        \x20       self.send_header('content-length', str(len(out))); self.end_headers()\n\
        \x20       self.wfile.write(out)\n\
        \x20   def do_GET(self): self.answer({'version': '2.5.34', 'User': {'id': '1', 'email': 'ops@example.org'},\n\
        \x20       'Role': {'id': '1', 'name': 'admin'}, 'UserSetting': {}})\n\
        \x20   def do_POST(self): self.answer({'Sighting': {'id': '1'}})\n\
        \x20   def log_message(self, *a): pass\n\
        s = HTTPServer(('127.0.0.1', 0), H)\n\
        print(s.server_address[1], flush=True)\n\
        s.serve_forever()\n";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(log)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().expect("the capture server's port");
    (Helper(child), format!("http://127.0.0.1:{port}/"))
}

#[test]
fn misp_sightings_are_sent_as_pymisp_sends_them() {
    if !peer_tools(&["pymisp"], "pymisp") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let log = tmp.join("requests.jsonl");
    let (_server, url) = capture_server(&log);
    let key = "x1Y2z3key0000000000000000000000000000000";
    let mut c = Collector::init(&tmp.join("collector"));
    configure(
        &c,
        &format!(
            "[export]\norganisation = \"CERT-Test\"\n\n[[export.misp]]\nurl = \"{url}\"\nkey = \"{key}\"\n\
             allow_insecure = true\n"
        ),
    );
    c.start();
    let mut agent = Agent::enroll(&c, &tmp.join("agent"));
    let watch = tmp.join("watch");
    std::fs::create_dir(&watch).unwrap();
    agent.run(&c, &["--watch", watch.to_str().unwrap()]);
    let attribute = "7b1c2d3e-0000-4000-8000-000000000001";
    let event = tmp.join("event.json");
    std::fs::write(
        &event,
        json!({"Event": {"uuid": "7b1c2d3e-0000-4000-8000-00000000000e", "info": "sighting test",
            "Attribute": [{"uuid": attribute, "type": "filename", "value": "misp-sighted.bin",
                           "to_ids": true},
                          {"uuid": "7b1c2d3e-0000-4000-8000-000000000002", "type": "filename",
                           "value": "misp-anonymised.bin", "to_ids": true},
                          {"uuid": "7b1c2d3e-0000-4000-8000-000000000003", "type": "filename",
                           "value": "misp-unshared.bin", "to_ids": true}]}})
        .to_string(),
    )
    .unwrap();
    c.ctl_ok(&["intel", "import", event.to_str().unwrap()]);
    c.ctl_ok(&["intel", "publish"]);
    wait_for(Duration::from_secs(30), "the agent on bundle 1", || {
        c.agents()
            .iter()
            .any(|a| a["bundle_version"] == 1)
            .then_some(())
    });
    std::fs::write(watch.join("misp-sighted.bin"), "x").unwrap();
    let d = detection(&c, "the MISP detection", |d| {
        d["indicator"]["id"] == attribute
    });
    let requests = || -> Vec<Value> {
        std::fs::read_to_string(&log)
            .map(|t| json_lines(&t))
            .unwrap_or_default()
    };
    let ours = wait_for(Duration::from_secs(30), "Vedette's sighting", || {
        requests().into_iter().find(|r| r["method"] == "POST")
    });

    // The same sighting sent by PyMISP to the same server.
    let observed = d["observed_at"].as_str().unwrap();
    let secs = vedette_engine::import::rfc3339_ms(observed).unwrap() / 1000;
    pymisp_sighting(&url, key, attribute, secs, "0");
    let theirs = requests()
        .into_iter()
        .filter(|r| r["method"] == "POST")
        .nth(1)
        .expect("PyMISP's sighting");
    assert_eq!(ours["path"], theirs["path"]);
    assert_eq!(ours["path"], "/sightings/add");
    let body = |r: &Value| -> Value { serde_json::from_str(r["body"].as_str().unwrap()).unwrap() };
    assert_eq!(body(&ours), body(&theirs));
    for h in ["authorization", "content-type", "accept"] {
        assert_eq!(ours["headers"][h], theirs["headers"][h], "{h}");
    }

    // A false-positive verdict goes back to MISP as a sighting of type 1 of the attribute,
    // the request PyMISP's add_sighting makes for type 1.
    let alert = json_lines(&c.ctl_ok(&["alerts", "list", "--json"]))
        .into_iter()
        .find(|a| a["rule"] == d["rule"])
        .expect("the detection's alert");
    let id = alert["id"].to_string();
    c.ctl_ok(&["alerts", "set", &id, "--status", "false-positive"]);
    let judged = json_lines(&c.ctl_ok(&["alerts", "show", &id, "--json"]));
    let at = judged[0]["verdicts"][0]["at"].as_str().unwrap().to_string();
    let fp = wait_for(
        Duration::from_secs(30),
        "the false-positive sighting",
        || {
            requests()
                .into_iter()
                .filter(|r| r["method"] == "POST")
                .nth(2)
        },
    );
    let fp_secs = vedette_engine::import::rfc3339_ms(&at).unwrap() / 1000;
    pymisp_sighting(&url, key, attribute, fp_secs, "1");
    let theirs = requests()
        .into_iter()
        .filter(|r| r["method"] == "POST")
        .nth(3)
        .expect("PyMISP's type-1 sighting");
    assert_eq!(body(&fp), body(&theirs));
    assert_eq!(body(&fp)["type"], "1");
    assert_eq!(fp["path"], "/sightings/add");

    // The organisation's sharing policy applies to this sink too: `anonymised` sights by the
    // anonymous stand-in, `none` sends nothing.
    c.ctl_ok(&[
        "orgs",
        "set",
        "default",
        "--share",
        "anonymised",
        "--sector",
        "healthcare",
        "--country",
        "FR",
    ]);
    // (Other contents: detections of the file judged a false positive above are no sightings.)
    std::fs::write(watch.join("misp-anonymised.bin"), "y").unwrap();
    let posted = wait_for(Duration::from_secs(30), "the anonymised sighting", || {
        requests()
            .into_iter()
            .filter(|r| r["method"] == "POST")
            .nth(4)
    });
    let sighting = body(&posted);
    assert_eq!(sighting["uuid"], "7b1c2d3e-0000-4000-8000-000000000002");
    assert_eq!(sighting["source"], "Anonymous participant (healthcare, FR)");
    c.ctl_ok(&["orgs", "set", "default", "--share", "none"]);
    std::fs::write(watch.join("misp-unshared.bin"), "z").unwrap();
    detection(&c, "the unshared detection", |d| {
        d["indicator"]["id"] == "7b1c2d3e-0000-4000-8000-000000000003"
    });
    wait_for(Duration::from_secs(30), "the sink past it", || {
        json_lines(&c.ctl_ok(&["intel", "status", "--json"]))
            .into_iter()
            .find(|s| s["kind"] == "export" && s["backlog"] == 0)
    });
    let posts = requests()
        .into_iter()
        .filter(|r| r["method"] == "POST")
        .count();
    assert_eq!(posts, 5, "{:?}", requests());
}

/// Writes a MISP feed with PyMISP (`to_feed`, its manifest): two events, each with a SHA-256
/// marked `to_ids`, a file name (marked only in the first) and an IP address (not marked).
const MAKE_FEED: &str = r#"
import json, sys, os
from pymisp import MISPEvent, MISPOrganisation
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
manifest = {}
org = MISPOrganisation()
org.from_dict(name='CERT-Feed', uuid='a1b2c3d4-0000-4000-8000-0000000000aa')
events = [(sys.argv[2], 'feed-dropper.bin', '203.0.113.9'),
          (sys.argv[3], 'ignored-name.bin', '203.0.113.10')]
for n, (sha, name, ip) in enumerate(events):
    e = MISPEvent()
    e.info = f'feed event {n}'
    e.Orgc = org
    e.add_attribute('sha256', sha, to_ids=True)
    e.add_attribute('filename', name, to_ids=(n == 0))
    e.add_attribute('ip-dst', ip, to_ids=False)
    feed = e.to_feed(with_meta=True)
    manifest.update(feed['Event'].pop('_manifest'))
    feed['Event'].pop('_hashes', None)
    json.dump(feed, open(os.path.join(out, e.uuid + '.json'), 'w'))
json.dump(manifest, open(os.path.join(out, 'manifest.json'), 'w'))
"#;

#[test]
fn a_misp_feed_made_with_pymisp_is_imported_and_polled_honouring_to_ids() {
    if !peer_tools(&["pymisp"], "pymisp") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let payload = b"VEDETTE-MISP-FEED payload\n";
    let feed = tmp.join("feed");
    let made = std::process::Command::new("python3")
        .args(["-c", MAKE_FEED])
        .arg(&feed)
        .arg(sha256(payload, tmp))
        .arg("b".repeat(64))
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );

    let port = vedette_tests::free_port();
    let _http = Helper(
        std::process::Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
                "--directory",
            ])
            .arg(&feed)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(Duration::from_secs(30), "the feed's web server", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let url = format!("http://127.0.0.1:{port}/");

    let mut c = Collector::init(&tmp.join("collector"));
    c.start();
    // From the directory, by hand: only what is marked for detection becomes an indicator.
    let out = c.ctl_ok(&["intel", "import", feed.to_str().unwrap()]);
    assert!(out.contains("accepted 3, skipped 3, rejected 0"), "{out}");
    assert_eq!(out.matches("to_ids is false").count(), 3, "{out}");

    // Over HTTP, polled by the collector.
    c.stop();
    configure(
        &c,
        &format!("[[intel.misp_feed]]\nurl = \"{url}\"\ninterval = \"1s\"\n"),
    );
    c.start();
    let s = wait_for(Duration::from_secs(30), "the feed polled", || {
        json_lines(&c.ctl_ok(&["intel", "status", "--json"]))
            .into_iter()
            .find(|s| s["origin"] == url.as_str() && s["staged"] == 3)
    });
    assert_eq!(s["kind"], "misp_feed");
    assert!(s["last_error"].is_null(), "{s}");

    let mut agent = Agent::enroll(&c, &tmp.join("agent"));
    let watch = tmp.join("watch");
    std::fs::create_dir(&watch).unwrap();
    agent.run(&c, &["--watch", watch.to_str().unwrap()]);
    c.ctl_ok(&["intel", "publish"]);
    wait_for(Duration::from_secs(30), "the agent on bundle 1", || {
        c.agents()
            .iter()
            .any(|a| a["bundle_version"] == 1)
            .then_some(())
    });
    std::fs::write(watch.join("payload.bin"), payload).unwrap();
    let d = detection(&c, "the feed's hash", |d| {
        d["indicator"]["source"] == "misp"
    });
    assert_eq!(d["indicator"]["origin"], url.as_str());
    assert!(d["indicator"]["event"].is_string());
}

/// A bundle is rules plus intel: `rules publish` replaces the rules and keeps what `intel
/// publish` put in, unless told `--drop-intel`.
#[test]
fn publishing_rules_after_intel_keeps_the_intel_firing() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let (c, _agent, watch) = watched(tmp);
    let on_version = |v: u64| {
        wait_for(
            Duration::from_secs(30),
            &format!("the agent on {v}"),
            || {
                c.agents()
                    .iter()
                    .any(|a| a["bundle_version"] == v)
                    .then_some(())
            },
        )
    };

    let v1 = vedette_tests::rule_dir(&tmp.join("v1"), "first_rule", "VEDETTE-KEEP-FIRST");
    c.ctl_ok(&["rules", "publish", v1.to_str().unwrap()]);
    let feed = tmp.join("keep.json");
    std::fs::write(
        &feed,
        json!({"type": "bundle", "id": "bundle--0a1b2c3d-0000-4000-8000-000000000000", "objects": [
            {"type": "indicator", "spec_version": "2.1",
             "id": "indicator--0a1b2c3d-0000-4000-8000-000000000001", "name": "kept indicator",
             "pattern_type": "stix", "valid_from": "2026-01-01T00:00:00Z",
             "pattern": "[file:name = 'keep-me.bin']"}]})
        .to_string(),
    )
    .unwrap();
    c.ctl_ok(&["intel", "import", feed.to_str().unwrap()]);
    c.ctl_ok(&["intel", "publish"]);
    // New rules: the intel indicator stays in the bundle, and says so.
    let v3 = vedette_tests::rule_dir(&tmp.join("v3"), "second_rule", "VEDETTE-KEEP-SECOND");
    let out = c.ctl_ok(&["rules", "publish", v3.to_str().unwrap()]);
    assert!(out.contains("published version 3"), "{out}");
    assert!(out.contains("intel indicators are kept"), "{out}");
    on_version(3);
    std::fs::write(watch.join("keep-me.bin"), "VEDETTE-KEEP-SECOND\n").unwrap();
    let by_intel = detection(&c, "the kept indicator firing", |d| {
        d["indicator"]["id"] == "indicator--0a1b2c3d-0000-4000-8000-000000000001"
    });
    assert_eq!(by_intel["bundle_version"], 3, "{by_intel}");
    detection(&c, "the new rule firing", |d| d["rule"] == "second_rule");

    // Dropped on purpose: the same name no longer fires, the rules still do.
    let out = c.ctl_ok(&["rules", "publish", "--drop-intel", v3.to_str().unwrap()]);
    assert!(out.contains("without intel indicators"), "{out}");
    on_version(4);
    let sub = watch.join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("keep-me.bin"), "VEDETTE-KEEP-SECOND again\n").unwrap();
    let path = sub.join("keep-me.bin").display().to_string();
    detection(&c, "the rule on the new file", |d| {
        d["rule"] == "second_rule" && d["path"] == path.as_str()
    });
    assert!(
        !c.detections()
            .iter()
            .any(|d| d["path"] == path.as_str() && d["indicator"]["source"] == "stix"),
        "the dropped indicator fired"
    );
}

/// SHA-256 of the one-byte file "x".
const X_SHA256: &str = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";

/// The sightings a TAXII collection holds (the latest version of each), read as a client would.
fn taxii_sightings(api_root: &str, collection: &str) -> Vec<Value> {
    taxii_objects(api_root, collection, "sighting")
}

/// The objects of type `kind` a TAXII collection holds (the latest version of each).
fn taxii_objects(api_root: &str, collection: &str, kind: &str) -> Vec<Value> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, urllib.request, base64\n\
             r = urllib.request.Request(sys.argv[1], headers={'Accept': 'application/taxii+json;version=2.1',\n\
               'Authorization': 'Basic ' + base64.b64encode(b'vedette:s3cret').decode()})\n\
             print(urllib.request.urlopen(r).read().decode())",
        ])
        .arg(format!(
            "{api_root}collections/{collection}/objects/?match[type]={kind}&limit=1000"
        ))
        .output();
    let Ok(out) = out else {
        return Vec::new();
    };
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v["objects"].as_array().cloned())
        .unwrap_or_default()
}

/// Sends a sighting of `kind` (`0` seen, `1` false positive) with PyMISP's `add_sighting`, as
/// CERT-Test, to the MISP at `url`.
fn pymisp_sighting(url: &str, key: &str, attribute: &str, secs: i64, kind: &str) {
    let sent = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys\nfrom pymisp import PyMISP\n\
             m = PyMISP(sys.argv[1], sys.argv[2], ssl=False)\n\
             m.add_sighting({'uuid': sys.argv[3], 'timestamp': int(sys.argv[4]), \
             'source': 'CERT-Test', 'type': sys.argv[5]})\n",
        ])
        .args([url, key, attribute, &secs.to_string(), kind])
        .output()
        .unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
}

/// Runs the STIX validator on the bundle at `path`: whether it passed, and its report.
pub(crate) fn stix_validated(path: &Path) -> (bool, String) {
    let v = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys; from stix2validator.scripts.stix2_validator import main; sys.exit(main())",
        ])
        .arg(path)
        .output()
        .expect("stix2_validator");
    let report = String::from_utf8_lossy(&v.stdout).into_owned();
    (v.status.success() && !report.contains("[X]"), report)
}
