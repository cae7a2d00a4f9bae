//! Operating Vedette: the metrics endpoints, JSON logs, `doctor`, the deploy/ files, finding
//! which hosts saw a file.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use vedette_tests::{
    Agent, Collector, bin, free_port, http_get, output_text, rule_dir, wait_for, wait_until,
};

use crate::intel::peer_tools;

/// Parses an exposition with the Prometheus project's own OpenMetrics parser (the
/// `prometheus_client` Python package), which refuses anything malformed: every sample as
/// `name{label="value",...}` (labels sorted) to its value.
fn parse_exposition(text: &str) -> Result<BTreeMap<String, f64>, String> {
    const PARSER: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join('%s="%s"' % (k, v) for k, v in sorted(s.labels.items()))
        out[s.name + ("{%s}" % labels if labels else "")] = s.value
print(json.dumps(out))
"#;
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args(["-c", PARSER])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("python3: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "the OpenMetrics parser refused the exposition: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// Scrapes `addr` and parses what it answers.
fn scrape(addr: &str) -> Result<BTreeMap<String, f64>, String> {
    let (status, body) = http_get(addr, "/metrics")?;
    if !status.contains(" 200 ") {
        return Err(format!("{status}: {body}"));
    }
    parse_exposition(&body)
}

fn value(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample `{key}` in {:#?}", m.keys().collect::<Vec<_>>()))
}

/// Every line of a log is a JSON object with a timestamp, a level and a message.
fn assert_json_log(log: &Path, must_hold: &[&str]) {
    let text = std::fs::read_to_string(log).expect("log");
    let mut messages = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{}: not a JSON line ({e}): {line}", log.display()));
        for key in ["timestamp", "level", "message"] {
            assert!(v.get(key).is_some(), "no `{key}` in {line}");
        }
        messages.push(v["message"].as_str().unwrap_or_default().to_string());
    }
    for m in must_hold {
        assert!(
            messages.iter().any(|x| x.contains(m)),
            "{}: no line says {m:?}; lines: {messages:#?}",
            log.display()
        );
    }
}

#[test]
fn metrics_of_a_running_collector_and_agent_parse_and_move_with_scans_and_detections() {
    if !peer_tools(&["prometheus_client"], "prometheus-client") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.serve_args = vec!["--log-format".into(), "json".into()];
    c.start();
    let mut agent = Agent::enroll(&c, &tmp.path().join("agent"));
    let refused = Agent::try_enroll(&c, &tmp.path().join("other"), "vdt_not-a-token");
    assert!(!refused.status.success());
    let watch = tmp.path().join("watch");
    std::fs::create_dir_all(&watch).unwrap();
    let rules = rule_dir(
        &tmp.path().join("rules"),
        "metrics_marker",
        "VEDETTE-METRICS-MARKER",
    );
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        "heartbeat = \"1s\"\nprocesses = false\nmax_rss = \"300MiB\"\nmax_cpu_percent = 40\n",
    )
    .unwrap();
    let agent_metrics = format!("127.0.0.1:{}", free_port());
    agent.run(
        &c,
        &[
            "--config",
            config.to_str().unwrap(),
            "--watch",
            watch.to_str().unwrap(),
            "--rules",
            rules.to_str().unwrap(),
            "--metrics-listen",
            &agent_metrics,
            "--log-format",
            "json",
        ],
    );

    let a0 = wait_until(Duration::from_secs(20), "the agent's metrics", || {
        scrape(&agent_metrics)
    });
    let c0 = scrape(&c.metrics_addr).expect("collector metrics");
    assert_eq!(value(&c0, "vedette_collector_agents_connected"), 1.0);
    assert_eq!(
        value(&c0, r#"vedette_collector_enrollments_total{result="ok"}"#),
        1.0
    );
    assert_eq!(
        value(
            &c0,
            r#"vedette_collector_enrollments_total{result="unknown_token"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &c0,
            r#"vedette_collector_agents_by_bundle_version{version="0"}"#
        ),
        1.0
    );
    assert_eq!(value(&a0, "vedette_agent_rules_yara"), 1.0);
    assert!(value(&a0, "vedette_agent_resident_memory_bytes") > 1e6);
    // The self-limits from agent.toml, as the agent applies them.
    assert_eq!(
        value(&a0, "vedette_agent_memory_limit_bytes"),
        (300u64 << 20) as f64
    );
    assert_eq!(value(&a0, "vedette_agent_memory_over_limit"), 0.0);
    assert_eq!(value(&a0, "vedette_agent_cpu_budget_percent"), 40.0);
    // CPU time is counted in 10 ms ticks: a young agent may not have used one yet.
    wait_until(
        Duration::from_secs(30),
        "the agent's CPU time counted",
        || {
            let m = scrape(&agent_metrics)?;
            if value(&m, "vedette_agent_cpu_seconds_total") > 0.0 {
                Ok(())
            } else {
                Err("vedette_agent_cpu_seconds_total is 0".to_string())
            }
        },
    );
    let committed0 = value(&c0, "vedette_collector_detections_committed_total");

    std::fs::write(watch.join("bad.txt"), "xx VEDETTE-METRICS-MARKER xx\n").unwrap();
    std::fs::write(watch.join("clean-1.txt"), "nothing here\n").unwrap();
    std::fs::write(watch.join("clean-2.txt"), "nothing here either\n").unwrap();
    wait_for(Duration::from_secs(30), "the detection", || {
        c.detections()
            .into_iter()
            .find(|d| d["rule"] == "metrics_marker")
    });
    let scanned0 = value(&a0, "vedette_agent_files_scanned_total");
    let a1 = wait_until(Duration::from_secs(20), "three more files scanned", || {
        let m = scrape(&agent_metrics)?;
        let scanned = value(&m, "vedette_agent_files_scanned_total");
        let acked = value(&m, "vedette_agent_detections_acked_total");
        let pending = value(&m, "vedette_agent_spool_pending");
        if scanned >= scanned0 + 3.0 && acked >= 1.0 && pending == 0.0 {
            Ok(m)
        } else {
            Err(format!(
                "scanned {scanned}, acked {acked}, pending {pending}"
            ))
        }
    });
    assert!(
        value(&a1, "vedette_agent_scanned_bytes_total")
            >= value(&a0, "vedette_agent_scanned_bytes_total") + 40.0
    );
    assert!(
        value(&a1, "vedette_agent_scan_seconds_count")
            >= value(&a0, "vedette_agent_scan_seconds_count") + 3.0
    );
    assert!(value(&a1, "vedette_agent_detections_total") >= 1.0);
    assert!(a1.contains_key(r#"vedette_agent_files_skipped_total{reason="too_large"}"#));

    let c1 = scrape(&c.metrics_addr).expect("collector metrics");
    assert_eq!(
        value(&c1, "vedette_collector_detections_committed_total"),
        committed0 + 1.0
    );
    assert!(value(&c1, "vedette_collector_detections_received_total") >= 1.0);
    assert!(value(&c1, "vedette_collector_store_commit_seconds_count") >= 1.0);

    // One source of truth: the heartbeat carries the counter the exposition shows.
    let scanned = value(&a1, "vedette_agent_files_scanned_total") as u64;
    wait_until(
        Duration::from_secs(20),
        "a heartbeat with the count",
        || {
            let row = agent.info(&c).ok_or("agent not listed")?;
            let n = row["counters"]["files_scanned"].as_u64().unwrap_or(0);
            if n >= scanned {
                Ok(())
            } else {
                Err(format!("heartbeat says {n}, metrics said {scanned}"))
            }
        },
    );

    // Anything but GET /metrics is refused.
    let (status, _) = http_get(&agent_metrics, "/spool").unwrap();
    assert!(status.contains(" 404 "), "{status}");

    let agent_log = agent.proc.as_ref().unwrap().log.clone();
    let collector_log = c.proc.as_ref().unwrap().log.clone();
    agent.proc.take().unwrap().signal_and_wait("TERM");
    c.stop();
    assert_json_log(
        &agent_log,
        &["rule set built", "connected to collector", "stopping"],
    );
    assert_json_log(
        &collector_log,
        &[
            "collector listening",
            "serving metrics",
            "agent connected",
            "enrollment refused",
        ],
    );
}

/// Runs `vedette-agent doctor`; its exit code and output.
fn agent_doctor(state: &Path, config: Option<&Path>) -> (i32, String) {
    let mut cmd = std::process::Command::new(vedette_tests::bin("vedette-agent"));
    cmd.arg("doctor").arg("--state-dir").arg(state);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let out = cmd.output().expect("run vedette-agent doctor");
    (out.status.code().unwrap_or(-1), output_text(&out))
}

/// The problem saying `needle` (its lines up to its fix), and the fix printed under it.
fn problem_and_fix(report: &str, needle: &str) -> (String, String) {
    let lines: Vec<&str> = report.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with("PROBLEM") {
            continue;
        }
        let Some(fix_at) = (i + 1..lines.len()).find(|&j| lines[j].contains("fix: ")) else {
            panic!("no fix under {line:?} in:\n{report}");
        };
        let block = lines[i..fix_at].join("\n");
        if block.contains(needle) {
            return (block, lines[fix_at].to_string());
        }
    }
    panic!("no problem saying {needle:?} in:\n{report}");
}

#[test]
fn agent_doctor_names_each_problem_with_its_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let state = tmp.path().join("agent");
    let _agent = Agent::enroll(&c, &state);
    let watch = tmp.path().join("watch");
    std::fs::create_dir_all(&watch).unwrap();
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "watch = [\"{}\"]\nspool_max_bytes = 65536\n",
            watch.display()
        ),
    )
    .unwrap();

    let (code, report) = agent_doctor(&state, Some(&config));
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("healthy"), "{report}");
    assert!(report.contains("clock"), "{report}");
    assert!(report.contains("knows this agent as"), "{report}");
    assert!(report.contains("history      none yet"), "{report}");

    // A history others can read.
    let history = state.join("history");
    std::fs::create_dir_all(&history).unwrap();
    std::fs::set_permissions(
        &history,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (code, report) = agent_doctor(&state, Some(&config));
    assert_eq!(code, 1, "{report}");
    let (_, fix) = problem_and_fix(&report, "history directory");
    assert!(
        fix.contains(&format!("chmod 700 {}", history.display())),
        "{fix}"
    );
    std::fs::set_permissions(
        &history,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let (code, report) = agent_doctor(&state, Some(&config));
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("0 MiB of 256 MiB"), "{report}");

    // A private key anyone can read.
    let key = state.join("agent.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (code, report) = agent_doctor(&state, Some(&config));
    assert_eq!(code, 1, "{report}");
    let (_, fix) = problem_and_fix(&report, "has mode 0644");
    assert!(
        fix.contains(&format!("chmod 600 {}", key.display())),
        "{fix}"
    );
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    // A wrong CA: another collector's in ca.crt.
    let other = Collector::init(&tmp.path().join("other"));
    let ca = state.join("ca.crt");
    let saved_ca = std::fs::read(&ca).unwrap();
    std::fs::copy(other.dir.join("ca.crt"), &ca).unwrap();
    let (code, report) = agent_doctor(&state, Some(&config));
    assert_eq!(code, 1, "{report}");
    let (_, fix) = problem_and_fix(&report, "was not issued by the CA in ca.crt");
    assert!(fix.contains("enroll again"), "{fix}");
    let (_, fix) = problem_and_fix(&report, "TLS with");
    assert!(fix.contains("signed by the CA in ca.crt"), "{fix}");
    std::fs::write(&ca, saved_ca).unwrap();

    // An expired certificate, issued by the right CA.
    let cert = state.join("agent.crt");
    let saved_cert = std::fs::read(&cert).unwrap();
    let saved_key = std::fs::read(&key).unwrap();
    write_expired_cert(&c, &cert, &key);
    let (code, report) = agent_doctor(&state, Some(&config));
    assert_eq!(code, 1, "{report}");
    let (_, fix) = problem_and_fix(&report, "expired on 2021-01-01");
    assert!(fix.contains("vedette-agent enroll"), "{fix}");
    std::fs::write(&cert, saved_cert).unwrap();
    std::fs::write(&key, saved_key).unwrap();

    // The collector down.
    c.stop();
    let (code, report) = agent_doctor(&state, Some(&config));
    assert_eq!(code, 1, "{report}");
    let (_, fix) = problem_and_fix(&report, &format!("cannot reach {}", c.addr));
    assert!(fix.contains("systemctl status vedette-collector"), "{fix}");
}

#[test]
fn agent_doctor_says_when_the_state_directory_cannot_be_written() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let state = tmp.path().join("agent");
    let disk = match vedette_tests::Tmpfs::mount_sized(&state, "4m") {
        Ok(d) => d,
        Err(why) => return vedette_tests::missing_root(&why),
    };
    let _agent = Agent::enroll(&c, &state);
    let (_, report) = agent_doctor(&state, None);
    assert!(report.contains("writable"), "{report}");
    let ro = std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&disk.path)
        .status()
        .unwrap();
    assert!(ro.success());
    let (code_ro, report) = agent_doctor(&state, None);
    assert_eq!(code_ro, 1, "{report}");
    let (_, fix) = problem_and_fix(&report, "cannot write in");
    assert!(fix.contains("read-write"), "{fix}");
}

/// Replaces the agent's certificate and key with a pair the collector's CA signed for 2020.
fn write_expired_cert(c: &Collector, cert: &Path, key: &Path) {
    let ca_key = rcgen::KeyPair::from_pem(&c.file("ca.key")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&c.file("ca.crt"), ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["agent".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let pair = rcgen::KeyPair::generate().unwrap();
    let signed = params.signed_by(&pair, &issuer).unwrap();
    std::fs::write(cert, signed.pem()).unwrap();
    std::fs::write(key, pair.serialize_pem()).unwrap();
}

/// A too-small `fs.inotify.max_user_watches`, seen by the doctor in a mount namespace of its
/// own where a file holding 10 is bind-mounted over the sysctl (the host's value is untouched).
#[test]
fn agent_doctor_reports_a_too_small_inotify_watch_limit() {
    let unshare_works = std::process::Command::new("unshare")
        .args(["--mount", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !unshare_works {
        vedette_tests::missing_root("unshare(1) for a mount namespace");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let state = tmp.path().join("agent");
    let _agent = Agent::enroll(&c, &state);
    let watch = tmp.path().join("watch");
    for i in 0..20 {
        std::fs::create_dir_all(watch.join(format!("d{i}"))).unwrap();
    }
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "watch = [\"{}\"]\nevent_source = \"inotify\"\nspool_max_bytes = 65536\n",
            watch.display()
        ),
    )
    .unwrap();
    let limit = tmp.path().join("max_user_watches");
    std::fs::write(&limit, "10\n").unwrap();
    let script = format!(
        "mount --bind {} /proc/sys/fs/inotify/max_user_watches && exec {} doctor --state-dir {} --config {}",
        limit.display(),
        vedette_tests::bin("vedette-agent").display(),
        state.display(),
        config.display()
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let report = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let (_, fix) = problem_and_fix(&report, "max_user_watches is 10");
    assert!(
        fix.contains("sysctl -w fs.inotify.max_user_watches="),
        "{fix}"
    );
    // Outside the namespace the host's own limit stands, and the same set-up is healthy.
    let (code, report) = agent_doctor(&state, Some(&config));
    assert_eq!(code, 0, "{report}");
}

#[test]
fn collector_doctor_checks_config_keys_store_and_addresses() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let doctor = || {
        let out = std::process::Command::new(vedette_tests::bin("vedette-collector"))
            .args(["doctor", "--config"])
            .arg(c.dir.join("collector.toml"))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, report) = doctor();
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("agents)"), "{report}");
    let key = c.dir.join("ca.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (code, report) = doctor();
    assert_eq!(code, 1, "{report}");
    let (_, fix) = problem_and_fix(&report, "has mode 0644");
    assert!(fix.contains("chmod 600"), "{fix}");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cfg = c.dir.join("collector.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    // Whatever address `init` wrote, replaced by one that is no address.
    let line = text
        .lines()
        .find(|l| l.starts_with("metrics_listen = "))
        .unwrap_or_else(|| panic!("no metrics_listen in {text}"));
    std::fs::write(&cfg, text.replace(line, "metrics_listen = \"nowhere\"")).unwrap();
    let (code, report) = doctor();
    assert_eq!(code, 1, "{report}");
    problem_and_fix(&report, "`metrics_listen`: `nowhere`");
}

/// Routine tools on the collector host (`doctor`, `users`, `certs issue`, a second `serve` that
/// cannot bind) leave the agents' connection state as the running collector set it.
#[test]
fn routine_tools_leave_live_agents_connected() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let mut agent = vedette_tests::Agent::enroll(&c, &tmp.path().join("agent"));
    let watch = tmp.path().join("watch");
    std::fs::create_dir(&watch).unwrap();
    agent.run(&c, &["--watch", watch.to_str().unwrap()]);
    let config = c.dir.join("collector.toml");
    let tool = |args: &[&str], stdin: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new(vedette_tests::bin("vedette-collector"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        output_text(&child.wait_with_output().unwrap())
    };
    let connected = |after: &str| {
        let row = c
            .agents()
            .into_iter()
            .find(|a| a["id"] == agent.id.as_str())
            .unwrap();
        assert_eq!(row["connected"], true, "after {after}: {row}");
    };
    connected("start");
    tool(&["doctor"], "");
    connected("doctor");
    tool(
        &["users", "add", "carol", "--role", "operator"],
        "a long enough password\n",
    );
    connected("users add");
    tool(&["users", "list"], "");
    connected("users list");
    let out = c.dir.join("dave");
    tool(
        &[
            "certs",
            "issue",
            "--name",
            "dave",
            "--role",
            "operator",
            "--out",
            out.to_str().unwrap(),
        ],
        "",
    );
    assert!(c.dir.join("dave.crt").exists(), "certs issue ran");
    connected("certs issue");
    // A second `serve` of the same configuration finds its address taken and stops.
    let second = std::process::Command::new(vedette_tests::bin("vedette-collector"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!second.status.success(), "{}", output_text(&second));
    connected("a second serve");
}

/// `deploy/NAME` with every commented-out key and table header (`# key = ...`, `# [table]`)
/// turned on: the examples must stay true to what the programs accept.
fn example_with_every_key(name: &str) -> (String, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("example config");
    let mut on = String::new();
    let mut turned_on = 0;
    for line in text.lines() {
        let rest = line.strip_prefix("# ").unwrap_or("");
        let key = rest.split_once(" = ").is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        });
        if key || rest.starts_with('[') {
            on.push_str(rest);
            turned_on += 1;
        } else {
            on.push_str(line);
        }
        on.push('\n');
    }
    assert!(
        turned_on > 10,
        "{name}: only {turned_on} commented keys found"
    );
    (text, on)
}

/// Moves the absolute paths a configuration names under `root`, and makes them there:
/// directories, parent directories of files, maintainer keys (`*.pub`).
fn rooted(text: &str, root: &Path) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("\"/") {
        out.push_str(&rest[..i + 1]);
        let tail = &rest[i + 1..];
        let end = tail.find('"').unwrap_or(tail.len());
        let path = &tail[..end];
        let moved = format!("{}{path}", root.display());
        let p = Path::new(&moved);
        if path.ends_with(".pub") && p.exists() {
        } else if path.ends_with(".pub") {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            let out = std::process::Command::new(vedette_tests::bin("vedettectl"))
                .args(["keys", "generate", "--out"])
                .arg(p.with_extension(""))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else if path.contains('*') {
        } else if Path::new(path).extension().is_some() {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        } else {
            std::fs::create_dir_all(p).unwrap();
        }
        out.push_str(&moved);
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[test]
fn example_configs_parse_as_shipped_and_with_every_key_on() {
    let tmp = tempfile::tempdir().unwrap();
    // The collector's, next to the files `init` makes (its relative paths resolve there).
    let c = Collector::init(&tmp.path().join("collector"));
    for name in ["taxii-ca.pem", "misp-ca.pem", "siem-ca.pem"] {
        std::fs::copy(c.dir.join("ca.crt"), c.dir.join(name)).unwrap();
    }
    std::fs::copy(c.dir.join("maintainer.pub"), c.dir.join("maintainers.pub")).unwrap();
    let (shipped, every) = example_with_every_key("collector.toml");
    for (what, text) in [("as shipped", &shipped), ("every key on", &every)] {
        let path = c.dir.join("example.toml");
        std::fs::write(&path, rooted(text, tmp.path())).unwrap();
        let out = std::process::Command::new(vedette_tests::bin("vedette-collector"))
            .args(["doctor", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            report
                .lines()
                .any(|l| l.starts_with("ok") && l.contains("config")),
            "deploy/collector.toml {what}: {report}\n{text}"
        );
    }
    // The agent's.
    let state = tmp.path().join("state");
    let (shipped, every) = example_with_every_key("agent.toml");
    for (what, text) in [("as shipped", &shipped), ("every key on", &every)] {
        let path = tmp.path().join("agent.toml");
        std::fs::write(&path, rooted(text, tmp.path())).unwrap();
        let (_, report) = agent_doctor(&state, Some(&path));
        assert!(
            report
                .lines()
                .any(|l| l.starts_with("ok") && l.contains("config")),
            "deploy/agent.toml {what}: {report}\n{text}"
        );
    }
}

/// The systemd units pass `systemd-analyze verify` (with the built programs in the place
/// of /usr/bin's), and their exposure scores are printed.
#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let present = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        vedette_tests::missing_peer("systemd-analyze", "apt-get install systemd");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let mut paths = Vec::new();
    for name in ["vedette-agent", "vedette-collector"] {
        let text = std::fs::read_to_string(units.join(format!("{name}.service"))).unwrap();
        let binary = format!("/usr/bin/{name} ");
        assert!(text.contains(&binary), "{name}.service runs {binary}");
        let built = vedette_tests::bin(name);
        let path = tmp.path().join(format!("{name}.service"));
        std::fs::write(
            &path,
            text.replace(&binary, &format!("{} ", built.display())),
        )
        .unwrap();
        paths.push(path);
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .unwrap();
    let said = output_text(&out);
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    assert!(
        !said.contains("vedette"),
        "systemd-analyze verify complains: {said}"
    );
    for p in &paths {
        let out = std::process::Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(p)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let score = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no exposure level for {}: {text}", p.display()));
        eprintln!("{score}");
    }
}

/// `deploy/install-agent.sh` under `root` (not started), enrolling with the token in `token`.
fn install_agent(c: &Collector, token: &Path, root: &Path, extra: &[&str]) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/install-agent.sh");
    std::process::Command::new("sh")
        .arg(&script)
        .args(["--collector", &c.addr, "--ca-sha256", &c.fingerprint])
        .arg("--maintainer-key")
        .arg(c.dir.join("maintainer.pub"))
        .arg("--token-file")
        .arg(token)
        .arg("--binary")
        .arg(vedette_tests::bin("vedette-agent"))
        .args(extra)
        .arg("--root")
        .arg(root)
        .arg("--no-start")
        .env_remove("VEDETTE_TOKEN")
        .output()
        .unwrap()
}

/// `deploy/install-agent.sh` installs and enrolls once; run again it changes nothing and
/// spends no token (the one-use token would be refused).
#[test]
fn install_agent_script_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let root = tmp.path().join("root");
    let token = tmp.path().join("token");
    std::fs::write(&token, c.token(&["--uses", "1"])).unwrap();
    let watch = tmp.path().join("watch");
    let rules = rule_dir(
        &tmp.path().join("rules"),
        "install_marker",
        "VEDETTE-INSTALL-MARKER",
    );
    std::fs::create_dir_all(&watch).unwrap();
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "watch = [\"{}\"]\nrules = [\"{}\"]\nspool_max_bytes = 65536\n",
            watch.display(),
            rules.display()
        ),
    )
    .unwrap();
    let run = || {
        let out = install_agent(&c, &token, &root, &["--config", config.to_str().unwrap()]);
        let text = output_text(&out);
        assert!(out.status.success(), "install-agent.sh failed: {text}");
        text
    };
    let first = run();
    assert!(first.contains("enrolled as agent"), "{first}");
    assert!(first.contains("healthy"), "{first}");
    assert!(root.join("usr/bin/vedette-agent").exists());
    assert!(
        root.join("etc/systemd/system/vedette-agent.service")
            .exists()
    );
    let key = root.join("var/lib/vedette/agent.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let second = run();
    assert!(second.contains("not enrolling again"), "{second}");
    assert!(!second.contains("installed"), "{second}");
    assert_eq!(c.agents().len(), 1, "{:?}", c.agents());
}

/// Under `--root` with the example configuration, the agent's rules directory is the one
/// under that root: the script and its closing doctor never look at the host's /etc/vedette.
#[test]
fn install_agent_script_under_a_root_uses_that_roots_etc() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let root = tmp.path().join("image");
    let token = tmp.path().join("token");
    std::fs::write(&token, c.token(&["--uses", "1"])).unwrap();
    let out = install_agent(&c, &token, &root, &[]);
    let text = output_text(&out);
    assert!(out.status.success(), "install-agent.sh failed: {text}");
    let written = std::fs::read_to_string(root.join("etc/vedette/agent.toml")).unwrap();
    let own = format!("\"{}/etc/vedette/rules\"", root.display());
    assert!(written.contains(&own), "{written}");
    assert!(!written.contains("\"/etc/vedette/"), "{written}");
}

#[test]
fn which_hosts_saw_a_file_is_found_by_its_sha256() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let rules = rule_dir(
        &tmp.path().join("rules"),
        "hash_marker",
        "VEDETTE-HASH-MARKER",
    );
    let mut agents = Vec::new();
    for name in ["one", "two"] {
        agents.push(Agent::watching(&c, &tmp.path().join(name), &rules));
    }
    // The same file on both hosts (twice on the first), another only on the second.
    let shared = "VEDETTE-HASH-MARKER shared\n";
    std::fs::write(agents[0].1.join("a"), shared).unwrap();
    std::fs::write(agents[0].1.join("b"), shared).unwrap();
    std::fs::write(agents[1].1.join("c"), shared).unwrap();
    std::fs::write(agents[1].1.join("d"), "VEDETTE-HASH-MARKER other\n").unwrap();
    wait_for(Duration::from_secs(30), "four detections", || {
        let all = c.ctl_ok(&["detections", "list", "--json", "--rule", "hash_marker"]);
        (vedette_tests::json_lines(&all).len() == 4).then_some(())
    });
    // The digest as coreutils computes it.
    let sum = std::process::Command::new("sha256sum")
        .arg(agents[1].1.join("c"))
        .output()
        .expect("run sha256sum");
    let sha = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string();
    let listed =
        vedette_tests::json_lines(&c.ctl_ok(&["detections", "list", "--json", "--sha256", &sha]));
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed.iter().all(|d| d["sha256"] == sha.as_str()));
    let hosts = vedette_tests::json_lines(&c.ctl_ok(&[
        "detections",
        "hosts",
        "--json",
        "--sha256",
        &sha.to_uppercase(),
    ]));
    let mut seen: Vec<(String, u64)> = hosts
        .iter()
        .map(|h| {
            (
                h["agent_id"].as_str().unwrap().to_string(),
                h["detections"].as_u64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    let mut want = vec![(agents[0].0.id.clone(), 2), (agents[1].0.id.clone(), 1)];
    want.sort();
    assert_eq!(seen, want, "{hosts:?}");
    for h in &hosts {
        assert!(
            h["first_seen"].as_str().unwrap() <= h["last_seen"].as_str().unwrap(),
            "{h}"
        );
    }
    // Nobody saw an unknown file; a malformed hash is an error naming the parameter.
    let none = c.ctl(&["detections", "hosts", "--sha256", &"0".repeat(64)]);
    assert!(none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("no host saw"));
    let bad = c.ctl(&["detections", "list", "--sha256", "abc"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("`sha256`"),
        "{bad:?}"
    );
    finding_by_md5_host_agent_and_time(&c, &agents[0].0.id, &agents[1].1.join("c"));
}

/// The other ways `detections list` finds things: `--md5`, `--host`, `--agent` by a start of
/// its id or its host name, `--since`/`--until` as dates and times ago. The two agents share
/// this machine's host name; `first` is one's id, `file` a file the other saw, shared by both.
fn finding_by_md5_host_agent_and_time(c: &Collector, first: &str, file: &Path) {
    let count = |args: &[&str]| {
        let mut all = vec!["detections", "list", "--json", "--rule", "hash_marker"];
        all.extend_from_slice(args);
        vedette_tests::json_lines(&c.ctl_ok(&all)).len()
    };
    let sum = std::process::Command::new("md5sum")
        .arg(file)
        .output()
        .expect("run md5sum");
    let md5 = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string();
    assert_eq!(count(&["--md5", &md5]), 3);
    assert_eq!(count(&["--md5", &md5.to_uppercase()]), 3);
    let host = c.agents()[0]["hostname"].as_str().unwrap().to_string();
    assert_eq!(count(&["--host", &host]), 4);
    assert_eq!(count(&["--host", "no-such-host"]), 0);
    assert_eq!(count(&["--agent", &first[..8]]), 2);
    assert_eq!(count(&["--since", "1h"]), 4);
    assert_eq!(count(&["--since", "yesterday"]), 4);
    assert_eq!(count(&["--until", "2020-01-01"]), 0);
    // An agent that is none, or several, is an error that says so.
    let none = c.ctl(&["detections", "list", "--agent", "no-such-agent"]);
    assert!(!none.status.success());
    let text = String::from_utf8_lossy(&none.stderr);
    assert!(text.contains("no agent is `no-such-agent`"), "{text}");
    let two = c.ctl(&["detections", "list", "--agent", &host]);
    assert!(!two.status.success());
    let text = String::from_utf8_lossy(&two.stderr);
    assert!(text.contains("names 2 agents"), "{text}");
    let bad = c.ctl(&["detections", "list", "--since", "last tuesday"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a time"));
}

#[test]
fn config_files_name_every_unknown_key_with_a_suggestion_and_every_bad_value_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = tmp.path().join("agent.toml");
    std::fs::write(
        &agent,
        "wach = [\"/srv\"]\nheartbeat = 5\nmax_file_size = \"64MiB\"\nscan_wrokers = 2\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("vedette-agent"))
        .args(["run", "--config"])
        .arg(&agent)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", output_text(&out));
    let text = output_text(&out);
    for line in [
        "line 1: unknown key `wach`; did you mean `watch`?",
        "line 2: invalid type: integer `5`, expected a string",
        "line 4: unknown key `scan_wrokers`; did you mean `scan_workers`?",
    ] {
        assert!(text.contains(line), "{line} missing in {text}");
    }
    assert!(!text.contains("error: error"), "{text}");

    let collector = tmp.path().join("collector.toml");
    std::fs::write(
        &collector,
        "listen = \"127.0.0.1:1\"\n[limits]\nmax_conections = 5\nmax_unauthenticated_connection = 9\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("vedette-collector"))
        .args(["doctor", "--config"])
        .arg(&collector)
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("line 3: unknown key `max_conections`; did you mean `max_connections`?"),
        "{text}"
    );
    assert!(
        text.contains("line 4: unknown key `max_unauthenticated_connection`; did you mean `max_unauthenticated_connections`?"),
        "{text}"
    );
}
