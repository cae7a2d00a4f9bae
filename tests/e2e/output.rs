//! One detection, two printers: `vedette-agent scan --json` on the host and
//! `vedettectl detections list --json` at the collector print the same fields the same way.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vedette_tests::{Agent, Collector, bin, rule_dir, wait_for, wait_until};

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

/// What a syslog receiver got: one RFC 5424 message per string, in arrival order.
type Received = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// A syslog receiver on loopback (over TLS with `tls`, as server certificate and key): every
/// connection is read to its end and split into its octet-counted frames (RFC 6587).
fn syslog_receiver(tls: Option<(Vec<u8>, Vec<u8>)>) -> (String, Received) {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let got: Received = Default::default();
    let config = tls.map(|(cert, key)| {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.into());
        std::sync::Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.into()], key)
                .unwrap(),
        )
    });
    let sink = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(tcp) = conn else { return };
            let mut bytes = Vec::new();
            let _ = match &config {
                Some(cfg) => {
                    let server = rustls::ServerConnection::new(cfg.clone()).unwrap();
                    rustls::StreamOwned::new(server, tcp).read_to_end(&mut bytes)
                }
                None => {
                    let mut tcp = tcp;
                    tcp.read_to_end(&mut bytes)
                }
            };
            let mut rest = bytes.as_slice();
            while let Some(space) = rest.iter().position(|b| *b == b' ') {
                let len: usize = std::str::from_utf8(&rest[..space])
                    .unwrap()
                    .parse()
                    .unwrap();
                let frame = &rest[space + 1..space + 1 + len];
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8(frame.to_vec()).unwrap());
                rest = &rest[space + 1 + len..];
            }
        }
    });
    (addr, got)
}

/// An RFC 5424 message's header fields and its message, checked to be Vedette's form.
fn parse_5424(msg: &str) -> (u8, String, Value) {
    let mut parts = msg.splitn(8, ' ');
    let mut next = || parts.next().unwrap_or_default().to_string();
    let (pri, time, host, app, procid, msgid, sd, body) = (
        next(),
        next(),
        next(),
        next(),
        next(),
        next(),
        next(),
        next(),
    );
    let pri: u8 = pri
        .strip_prefix('<')
        .and_then(|p| p.strip_suffix(">1"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not an RFC 5424 header: {msg}"));
    assert!(humantime::parse_rfc3339(&time).is_ok(), "{time}");
    assert_eq!(
        (app.as_str(), procid.as_str(), msgid.as_str(), sd.as_str()),
        ("vedette", "-", "detection", "-")
    );
    (pri, host, serde_json::from_str(&body).unwrap())
}

/// `[[export.webhook]]` posts each new alert once (JSON with a bearer token, and Slack's
/// `{"text": …}`), however many detections it gathers; `[[export.syslog]]` sends every
/// detection as RFC 5424 with its ECS document, over TCP and over TLS.
#[test]
fn new_alerts_reach_webhooks_once_and_detections_reach_syslog_over_tcp_and_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("posts.jsonl");
    let (_server, url) = crate::intel::capture_server(&log);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(vec!["syslog test CA".to_string()]).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let ca_pem = tmp.path().join("syslog-ca.pem");
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.pem(), ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let (plain, plain_got) = syslog_receiver(None);
    let (tls, tls_got) = syslog_receiver(Some((leaf.der().to_vec(), leaf_key.serialize_der())));

    let mut c = Collector::init(&tmp.path().join("collector"));
    crate::intel::configure(
        &c,
        &format!(
            "[[export.webhook]]\nurl = \"{url}hook\"\ntoken = \"hook-token\"\nallow_insecure = true\n\n\
             [[export.webhook]]\nurl = \"{url}chat\"\nformat = \"slack\"\nallow_insecure = true\n\n\
             [[export.syslog]]\naddress = \"{plain}\"\n\n\
             [[export.syslog]]\naddress = \"{tls}\"\ntls = true\nca_cert = \"{}\"\n",
            ca_pem.display()
        ),
    );
    c.start();
    let mut agent = Agent::enroll(&c, &tmp.path().join("agent"));
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let rules = rule_dir(&tmp.path().join("rules"), "alert_out", "VEDETTE-ALERT-OUT");
    agent.run_watching(&c, &tree, &rules);
    // Three files of one content: one alert; a fourth content: a second alert.
    for name in ["a.bin", "b.bin", "c.bin"] {
        std::fs::write(tree.join(name), "xx VEDETTE-ALERT-OUT xx").unwrap();
    }
    std::fs::write(tree.join("d.bin"), "yy VEDETTE-ALERT-OUT yy").unwrap();

    // The agent also judges the host's processes: only this test's rule is counted.
    let ours = |got: &Received| -> Vec<String> {
        let msgs = got.lock().unwrap().clone();
        msgs.into_iter()
            .filter(|m| m.contains("\"name\":\"alert_out\""))
            .collect()
    };
    let posts = |path: &str| -> Vec<Value> {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        vedette_tests::json_lines(&text)
            .into_iter()
            .filter(|r| {
                r["path"] == path && r["body"].as_str().unwrap_or_default().contains("alert_out")
            })
            .collect()
    };
    wait_until(Duration::from_secs(60), "every sink caught up", || {
        let status = vedette_tests::json_lines(&c.ctl_ok(&["intel", "status", "--json"]));
        let sinks: Vec<&Value> = status.iter().filter(|s| s["kind"] == "export").collect();
        let got = (ours(&plain_got).len(), ours(&tls_got).len());
        let done = sinks.len() == 4
            && sinks
                .iter()
                .all(|s| s["backlog"] == 0 && s["last_error"].is_null())
            && got == (4, 4);
        match done {
            true => Ok(()),
            false => Err(format!("syslog messages {got:?}, sinks {sinks:?}")),
        }
    });

    let hook = posts("/hook");
    assert_eq!(hook.len(), 2, "one post per alert: {hook:?}");
    let alerts: std::collections::BTreeSet<String> = hook
        .iter()
        .map(|p| {
            assert_eq!(p["headers"]["authorization"], "Bearer hook-token");
            let body: Value = serde_json::from_str(p["body"].as_str().unwrap()).unwrap();
            assert_eq!(body["detection"]["rule"]["name"], "alert_out", "{body}");
            assert_eq!(
                body["detection"]["vedette"]["alert"]["id"],
                body["alert"]["id"]
            );
            body["alert"]["id"].to_string()
        })
        .collect();
    assert_eq!(alerts.len(), 2, "{hook:?}");
    let chat = posts("/chat");
    assert_eq!(chat.len(), 2, "{chat:?}");
    for p in &chat {
        let body: Value = serde_json::from_str(p["body"].as_str().unwrap()).unwrap();
        let text = body["text"].as_str().unwrap();
        assert!(
            text.starts_with("Vedette alert ") && text.contains("alert_out (score"),
            "{text}"
        );
        assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    }

    let hostname = c.agents()[0]["hostname"].as_str().unwrap().to_string();
    for got in [&plain_got, &tls_got] {
        let msgs = ours(got);
        let mut seqs = std::collections::BTreeSet::new();
        for m in &msgs {
            let (pri, host, doc) = parse_5424(m);
            assert!((16 * 8 + 2..=16 * 8 + 5).contains(&pri), "{m}");
            assert_eq!(host, hostname);
            assert_eq!(doc["rule"]["name"], "alert_out");
            seqs.insert(doc["event"]["sequence"].as_u64().unwrap());
        }
        assert_eq!(seqs.len(), 4, "one message per detection: {msgs:?}");
    }
}
