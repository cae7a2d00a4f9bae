//! DNS seen on the host: queries for listed domains, tied to the asking process and to the
//! connection that follows. Each test runs in a network namespace of its own
//! ([`Netns`]: the test's thread moves into it, so the collector, the agent, the DNS responder
//! and the clients it starts are all in it), with `lo` up and a DNS responder on 127.0.0.1:53.
//! Nothing leaves the namespace.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use vedette_tests::{Agent, Collector, Netns, json_lines, wait_for};

use crate::intel::{Helper, peer_tools, stix_validated};

/// The address the responder gives every name it is asked.
const ANSWER: &str = "127.0.0.88";

/// A network namespace of the test's own; None (the test says it skips) without root.
fn netns() -> Option<Netns> {
    match Netns::new() {
        Ok(ns) => Some(ns),
        Err(e) => {
            vedette_tests::missing_root(&format!("a network namespace of the test's own: {e}"));
            None
        }
    }
}

/// A DNS responder on 127.0.0.1:53 answering every A query with [`ANSWER`] (TTL 300).
fn responder() -> Helper {
    responder_on("127.0.0.1")
}

/// A DNS responder on `addr`:53 answering every A query with [`ANSWER`] (TTL 300).
fn responder_on(addr: &str) -> Helper {
    let script = format!(
        "import socket, struct\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('{addr}', 53))\n\
         print('ready', flush=True)\n\
         while True:\n\
         \x20   q, peer = s.recvfrom(4096)\n\
         \x20   i = 12\n\
         \x20   while q[i]: i += 1 + q[i]\n\
         \x20   question = q[12:i + 5]\n\
         \x20   rr = b'\\xc0\\x0c' + struct.pack('>HHIH', 1, 1, 300, 4) + socket.inet_aton('{ANSWER}')\n\
         \x20   s.sendto(q[:2] + b'\\x81\\x80' + struct.pack('>HHHH', 1, 1, 0, 0) + question + rr, peer)\n"
    );
    spawn_ready(Command::new("python3").args(["-c", &script]), "ready")
}

/// A client that asks 127.0.0.1:53 for each of `names` in turn, `times` times, `every`
/// seconds apart, all from one unconnected UDP socket; then connects to the last answer on
/// `port` (0: does not) and holds on until killed.
fn client(names: &[&str], times: u32, every: f64, port: u16) -> Helper {
    let script = "import os, socket, struct, sys, time\n\
         names, times, every, port = sys.argv[1].split(','), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('127.0.0.1', 0))\n\
         s.settimeout(5)\n\
         ip = None\n\
         for n in range(times):\n\
         \x20   for name in names:\n\
         \x20       q = os.urandom(2) + b'\\x01\\x00' + struct.pack('>HHHH', 1, 0, 0, 0)\n\
         \x20       q += b''.join(bytes([len(l)]) + l.encode() for l in name.split('.')) + b'\\x00\\x00\\x01\\x00\\x01'\n\
         \x20       s.sendto(q, ('127.0.0.1', 53))\n\
         \x20       r, _ = s.recvfrom(4096)\n\
         \x20       ip = socket.inet_ntoa(r[-4:])\n\
         \x20   time.sleep(every)\n\
         if port:\n\
         \x20   c = socket.create_connection((ip, port))\n\
         print('done', ip, flush=True)\n\
         time.sleep(300)\n";
    spawn_ready(
        Command::new("python3").args([
            "-c",
            script,
            &names.join(","),
            &times.to_string(),
            &every.to_string(),
            &port.to_string(),
        ]),
        "done",
    )
}

/// Spawns `cmd` and waits for a line of its output starting with `ready`.
pub(crate) fn spawn_ready(cmd: &mut Command, ready: &str) -> Helper {
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("python3");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("a line");
    let helper = Helper(child);
    assert!(line.starts_with(ready), "`{line}`");
    helper
}

/// A collector and an agent watching processes and DNS ([`enrolled`]), running.
fn setup(tmp: &Path, extra: &str) -> (Collector, Agent) {
    let (c, mut agent, config) = enrolled(tmp, extra);
    agent.run(&c, &["--config", config.to_str().unwrap()]);
    wait_for(Duration::from_secs(30), "the agent watching DNS", || {
        let log = agent.proc.as_ref()?.log_text();
        log.contains("DNS seen on every interface").then_some(())
    });
    (c, agent)
}

/// A running collector and an agent enrolled with it, not started, with its configuration:
/// a Loki C2 list naming `c2.vedette-test.example`, processes watched every second, and
/// `extra`.
fn enrolled(tmp: &Path, extra: &str) -> (Collector, Agent, std::path::PathBuf) {
    let mut c = Collector::init(&tmp.join("collector"));
    c.start();
    let rules = tmp.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("c2-iocs.txt"),
        "c2.vedette-test.example;test C2 domain\n",
    )
    .unwrap();
    let watch = tmp.join("watch");
    std::fs::create_dir_all(&watch).unwrap();
    let agent = Agent::enroll(&c, &tmp.join("agent"));
    let config = tmp.join("agent.toml");
    vedette_tests::watch_config(&config, &watch, &rules, extra);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "processes = false",
        "processes = true\nprocess_interval = \"1s\"",
    );
    std::fs::write(&config, text).unwrap();
    (c, agent, config)
}

fn dns_detections(c: &Collector, name: &str) -> Vec<Value> {
    c.detections()
        .into_iter()
        .filter(|d| d["kind"] == "dns" && d["domain"] == name)
        .collect()
}

#[test]
fn a_lookup_of_a_listed_domain_and_the_connection_after_it_name_the_process() {
    let Some(ns) = netns() else {
        return;
    };
    ns.run(|| {
        let dir = tempfile::tempdir().unwrap();
        let (c, _agent) = setup(dir.path(), "");
        let _dns = responder();
        let listener = std::net::TcpListener::bind((ANSWER, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        // An unlisted name, then a subdomain of the listed one; then the connection.
        let asked = "beacon.cdn.c2.vedette-test.example";
        let me = client(&["fine.vedette-test.example", asked], 1, 0.0, port);
        let pid = u64::from(me.0.id());
        let dns = wait_for(Duration::from_secs(30), "the dns detection", || {
            dns_detections(&c, asked).into_iter().next()
        });
        assert_eq!(dns["pid"], pid, "{dns}");
        assert_eq!(dns["attributed"], true, "{dns}");
        assert_eq!(dns["rule"], "c2.vedette-test.example", "{dns}");
        assert_eq!(dns["answers"], json!([ANSWER]), "{dns}");
        assert_eq!(dns["resolver"], "127.0.0.1", "{dns}");
        assert_eq!(dns["qtype"], "A", "{dns}");
        assert_eq!(dns["indicator"]["source"], "loki", "{dns}");
        let conn = wait_for(Duration::from_secs(30), "the connection detection", || {
            c.detections().into_iter().find(|d| {
                d["kind"] == "connection" && d["remote"] == format!("{ANSWER}:{port}").as_str()
            })
        });
        assert_eq!(conn["pid"], pid, "{conn}");
        assert_eq!(conn["domain"], asked, "{conn}");
        assert_eq!(conn["rule"], "c2.vedette-test.example", "{conn}");
        assert!(
            dns_detections(&c, "fine.vedette-test.example").is_empty(),
            "an unlisted name is not reported"
        );

        // What leaves: ECS with the DNS fields; STIX that the validator passes.
        let ecs = json_lines(&c.ctl_ok(&["export", "ecs"]));
        let doc = ecs
            .iter()
            .find(|e| e["dns"]["question"]["name"] == asked && e["event"]["kind"] == "alert")
            .expect("the dns detection as ECS");
        assert_eq!(doc["dns"]["question"]["type"], "A");
        assert_eq!(doc["dns"]["resolved_ip"], json!([ANSWER]));
        assert_eq!(doc["process"]["pid"], pid);
        if peer_tools(&["stix2validator"], "stix2-validator") {
            let out = c.ctl_ok(&["export", "stix", "--organisation", "CERT-Test"]);
            let path = dir.path().join("sightings.json");
            std::fs::write(&path, &out).unwrap();
            let (valid, report) = stix_validated(&path);
            assert!(valid, "{report}\n{out}");
            let bundle: Value = serde_json::from_str(&out).unwrap();
            let domain = bundle["objects"]
                .as_array()
                .unwrap()
                .iter()
                .find(|o| o["type"] == "domain-name" && o["value"] == asked)
                .expect("a domain-name SCO");
            assert!(domain["resolves_to_refs"][0].is_string(), "{domain}");
        }
    });
}

#[test]
fn stix_equality_is_exact_and_misp_domain_ip_matches_the_name() {
    let Some(ns) = netns() else {
        return;
    };
    ns.run(|| {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path();
        let (c, _agent) = setup(tmp, "");
        let stix = tmp.join("domains.json");
        std::fs::write(
            &stix,
            json!({"type": "bundle", "id": "bundle--c1d2e3f4-0000-4000-8000-000000000000",
                "objects": [{"type": "indicator", "spec_version": "2.1",
                "id": "indicator--c1d2e3f4-0000-4000-8000-000000000001", "name": "exact C2",
                "created": "2026-11-01T00:00:00.000Z", "modified": "2026-11-01T00:00:00.000Z",
                "pattern_type": "stix", "valid_from": "2026-01-01T00:00:00Z",
                "pattern": "[domain-name:value = 'exact.stix-test.example']"}]})
            .to_string(),
        )
        .unwrap();
        let misp = tmp.join("event.json");
        std::fs::write(
            &misp,
            json!({"Event": {"uuid": "c1d2e3f4-0000-4000-8000-00000000000e", "info": "C2",
                "Attribute": [{"uuid": "c1d2e3f4-0000-4000-8000-000000000002",
                    "type": "domain|ip", "value": "misp-c2.example|192.0.2.9", "to_ids": true}]}})
            .to_string(),
        )
        .unwrap();
        c.ctl_ok(&[
            "intel",
            "import",
            stix.to_str().unwrap(),
            misp.to_str().unwrap(),
        ]);
        c.ctl_ok(&["intel", "publish"]);
        wait_for(Duration::from_secs(30), "the agent on bundle 1", || {
            c.agents()
                .iter()
                .any(|a| a["bundle_version"] == 1)
                .then_some(())
        });
        let _dns = responder();
        let _me = client(
            &[
                "sub.exact.stix-test.example",
                "exact.stix-test.example",
                "misp-c2.example",
            ],
            1,
            0.0,
            0,
        );
        let stix_hit = wait_for(Duration::from_secs(30), "the STIX match", || {
            dns_detections(&c, "exact.stix-test.example")
                .into_iter()
                .next()
        });
        assert_eq!(
            stix_hit["indicator"]["id"],
            "indicator--c1d2e3f4-0000-4000-8000-000000000001"
        );
        let misp_hit = wait_for(Duration::from_secs(30), "the MISP match", || {
            dns_detections(&c, "misp-c2.example").into_iter().next()
        });
        assert_eq!(
            misp_hit["indicator"]["id"],
            "c1d2e3f4-0000-4000-8000-000000000002"
        );
        // Asked before both: a subdomain of an exact STIX name is no match.
        assert!(dns_detections(&c, "sub.exact.stix-test.example").is_empty());
    });
}

#[test]
fn a_beacon_makes_one_detection_per_window_with_its_count() {
    let Some(ns) = netns() else {
        return;
    };
    ns.run(|| {
        let dir = tempfile::tempdir().unwrap();
        let (c, agent) = setup(dir.path(), "dns_window = \"6s\"");
        let _dns = responder();
        // 25 queries 100 ms apart: all within one window.
        let asked = "c2.vedette-test.example";
        let me = client(&[asked], 25, 0.1, 0);
        let pid = u64::from(me.0.id());
        // Reported at its first query, at once: one detection, counting one.
        let first = wait_for(Duration::from_secs(10), "the first query's report", || {
            dns_detections(&c, asked).into_iter().next()
        });
        assert_eq!(first["pid"], pid, "{first}");
        // The window ends: the same detection counts all 25.
        let counted = wait_for(Duration::from_secs(30), "the window's count", || {
            dns_detections(&c, asked)
                .into_iter()
                .find(|d| d["count"] == 25)
        });
        assert_eq!(counted["id"], first["id"]);
        assert_eq!(counted["pid"], pid);
        let all = dns_detections(&c, asked);
        assert_eq!(all.len(), 1, "one incident, one detection: {all:?}");
        let row = agent.info(&c).unwrap();
        assert!(
            row["counters"]["dns_repeats"].as_u64().unwrap_or(0) >= 24,
            "{row}"
        );
        assert_eq!(row["counters"]["dns_packets_dropped"], 0, "{row}");
    });
}

#[test]
fn without_cap_net_raw_the_agent_says_so_once_and_command_lines_still_match() {
    let dir = tempfile::tempdir().unwrap();
    let (c, mut agent, config) = enrolled(dir.path(), "");
    agent.start_wrapped(
        &[
            "setpriv",
            "--bounding-set",
            "-net_raw",
            "--inh-caps",
            "-net_raw",
            "--",
        ],
        &["--config", config.to_str().unwrap()],
    );
    let log = wait_for(
        Duration::from_secs(30),
        "the agent saying DNS is not seen",
        || {
            let log = agent.proc.as_ref()?.log_text();
            log.contains("DNS is not seen").then_some(log)
        },
    );
    assert!(
        log.contains("CAP_NET_RAW"),
        "the log names what is missing: {log}"
    );
    assert!(!log.contains("DNS seen on every interface"), "{log}");
    let _shell = Helper(
        Command::new("sh")
            .args(["-c", "sleep 60; : https://x.c2.vedette-test.example/"])
            .spawn()
            .unwrap(),
    );
    let d = wait_for(Duration::from_secs(30), "the command-line match", || {
        c.detections()
            .into_iter()
            .find(|d| d["kind"] == "process" && d["rule"] == "c2.vedette-test.example")
    });
    assert!(
        d["cmdline"]
            .as_str()
            .unwrap()
            .contains("c2.vedette-test.example")
    );
    let log = agent.proc.as_ref().unwrap().log_text();
    assert_eq!(log.matches("DNS is not seen").count(), 1, "{log}");
}

#[test]
fn a_query_a_local_resolver_forwards_is_reported_once_as_the_asking_process() {
    let Some(ns) = netns() else {
        return;
    };
    ns.run(|| {
        // The upstream resolver on an address of a veth pair of the namespace's own (not
        // loopback), and a stub on 127.0.0.1:53 that forwards every query to it from a socket
        // of its own.
        for args in [
            &["link", "add", "up0", "type", "veth", "peer", "name", "up1"][..],
            &["addr", "add", "10.99.0.1/24", "dev", "up0"],
            &["link", "set", "up0", "up"],
            &["link", "set", "up1", "up"],
        ] {
            let ok = Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip {args:?} in the test's namespace");
        }
        let dir = tempfile::tempdir().unwrap();
        let (c, _agent) = setup(dir.path(), "");
        let _upstream = responder_on("10.99.0.1");
        let stub = spawn_ready(
            Command::new("python3").args([
                "-c",
                "import socket\n\
                 s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                 s.bind(('127.0.0.1', 53))\n\
                 u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                 print('ready', flush=True)\n\
                 while True:\n\
                 \x20   q, peer = s.recvfrom(4096)\n\
                 \x20   u.sendto(q, ('10.99.0.1', 53))\n\
                 \x20   r, _ = u.recvfrom(4096)\n\
                 \x20   s.sendto(r, peer)\n",
            ]),
            "ready",
        );
        let asked = "www.c2.vedette-test.example";
        let me = client(&[asked], 1, 0.0, 0);
        let d = wait_for(Duration::from_secs(30), "the dns detection", || {
            dns_detections(&c, asked).into_iter().next()
        });
        assert_eq!(d["pid"], u64::from(me.0.id()), "{d}");
        // A second client, later: its detection is stored after anything about the first.
        let later = client(&["later.c2.vedette-test.example"], 1, 0.0, 0);
        wait_for(Duration::from_secs(30), "the later detection", || {
            dns_detections(&c, "later.c2.vedette-test.example")
                .into_iter()
                .next()
        });
        let all = dns_detections(&c, asked);
        assert_eq!(
            all.len(),
            1,
            "the stub's forwarding is not reported: {all:?}"
        );
        assert!(
            c.detections()
                .iter()
                .all(|d| d["pid"] != u64::from(stub.0.id())),
            "nothing is the stub's"
        );
        drop(later);
    });
}
