//! Retro-hunt end to end: indicators published after the files were seen are answered from each
//! agent's history, without reading a file again and without a rescan.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use vedette_tests::{Agent, Collector, wait_until};

/// Files the agent scans before the bundle (`VEDETTE_RETRO_FILES` to change).
fn file_count() -> usize {
    std::env::var("VEDETTE_RETRO_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// An agent's configuration: heartbeats every second, no scheduled scans, and `extra`.
fn agent_config(path: &Path, watch: &Path, rules: &Path, extra: &str) {
    std::fs::write(
        path,
        format!(
            "watch = [{watch:?}]\nrules = [{rules:?}]\nheartbeat = \"1s\"\nbackoff_max = \"1s\"\n\
             scan_interval = \"0s\"\n{extra}\n"
        ),
    )
    .unwrap();
}

/// Starts `vedettectl hunt ARGS` and waits for the one agent's answer (`hunt show --json`).
fn hunted(c: &Collector, args: &[&str]) -> Value {
    let mut all = vec!["hunt"];
    all.extend_from_slice(args);
    let out = c.ctl(&all);
    assert!(out.status.success(), "{}", vedette_tests::output_text(&out));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    wait_until(Duration::from_secs(60), "the hunt's answer", || {
        let out = c.ctl(&["hunt", "show", &id, "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        if v["hunt"]["answered"] == 1 {
            Ok(v)
        } else {
            Err(v.to_string())
        }
    })
}

fn write_tree(root: &Path, n: usize) {
    for i in 0..n {
        let sub = root.join(format!("d{:03}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&sub).unwrap();
        }
        std::fs::write(
            sub.join(format!("f{i:06}.txt")),
            format!("retro file {i}\n"),
        )
        .unwrap();
    }
}

fn path_of(root: &Path, i: usize) -> std::path::PathBuf {
    root.join(format!("d{:03}", i / 1000))
        .join(format!("f{i:06}.txt"))
}

#[test]
fn a_hash_bundle_is_answered_from_history_without_reading_or_rescanning() {
    let n = file_count();
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let mut c = Collector::init(&tmp.join("collector"));
    c.start();
    let watch = tmp.join("watch");
    write_tree(&watch, n);
    let mut a = Agent::enroll(&c, &tmp.join("state"));
    let config = tmp.join("agent.toml");
    let rules = tmp.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    agent_config(
        &config,
        &watch,
        &rules,
        "processes = false\nscan_on_start = true\nmax_cpu_percent = 100",
    );
    let started_ms = vedette_proto::now_ms();
    a.run(&c, &["--config", config.to_str().unwrap()]);
    wait_until(
        Duration::from_secs(120),
        "the first full scan read every file",
        || {
            let scanned = a.counter(&c, "files_scanned");
            let records = a.counter(&c, "history_records");
            // A scan counts itself once its cache is saved, after its last file.
            let scans = a.counter(&c, "full_scans");
            if scanned >= n as u64 && records >= n as u64 && scans >= 1 {
                Ok(())
            } else {
                Err(format!(
                    "{scanned} files scanned, {records} history records, {scans} full scans finished"
                ))
            }
        },
    );
    let scanned_ms = vedette_proto::now_ms();
    let bytes_before = a.counter(&c, "scanned_bytes");
    let scans_before = a.counter(&c, "full_scans");

    // Ten of them get listed; five of those are deleted first.
    let chosen: Vec<usize> = (0..10).map(|k| k * (n / 10) + 7).collect();
    let mut list = String::from("# sha256;comment\n");
    for (k, i) in chosen.iter().enumerate() {
        let digest = hex::encode(Sha256::digest(format!("retro file {i}\n")));
        list.push_str(&format!("{digest};retro sample {k}\n"));
        if k % 2 == 1 {
            std::fs::remove_file(path_of(&watch, *i)).unwrap();
        }
    }
    let bundle = tmp.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("retro-hash-iocs.txt"), list).unwrap();
    let out = c.ctl(&["rules", "publish", bundle.to_str().unwrap()]);
    assert!(out.status.success(), "{}", vedette_tests::output_text(&out));

    let found: Vec<Value> = wait_until(Duration::from_secs(60), "10 retro detections", || {
        let retro: Vec<Value> = c
            .detections()
            .into_iter()
            .filter(|d| d["retro"].is_object())
            .collect();
        if retro.len() >= 10 {
            Ok(retro)
        } else {
            Err(format!("{} so far", retro.len()))
        }
    });
    assert_eq!(found.len(), 10, "{found:#?}");
    for (k, i) in chosen.iter().enumerate() {
        let path = path_of(&watch, *i);
        let d = found
            .iter()
            .find(|d| d["path"] == path.to_str().unwrap())
            .unwrap_or_else(|| panic!("no retro detection of {}: {found:#?}", path.display()));
        assert_eq!(d["kind"], "hash", "{d}");
        let presence = if k % 2 == 1 { "gone" } else { "present" };
        assert_eq!(d["retro"]["presence"], presence, "{d}");
        let first = d["retro"]["first_seen_ms"].as_i64().unwrap();
        assert!(
            (started_ms..=scanned_ms).contains(&first),
            "first seen {first} not during the first scan ({started_ms}..{scanned_ms}): {d}"
        );
    }
    // The heartbeat that counts them was sent after the bundle was applied: by then a rescan
    // would have started and been counted.
    wait_until(
        Duration::from_secs(30),
        "a heartbeat counting the retro detections",
        || match a.counter(&c, "retro_detections") {
            10 => Ok(()),
            n => Err(format!("{n}")),
        },
    );
    assert_eq!(
        a.counter(&c, "scanned_bytes"),
        bytes_before,
        "no file was read"
    );
    assert_eq!(
        a.counter(&c, "full_scans"),
        scans_before,
        "no full scan started"
    );
    let log = a.log();
    assert!(
        log.contains("new rules matched against the history"),
        "{log}"
    );
}

#[test]
fn a_binary_run_then_deleted_is_found_by_a_hash_published_later() {
    if !rustix::process::geteuid().is_root() {
        vedette_tests::missing_root("the process connector's exec events need root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let mut c = Collector::init(&tmp.join("collector"));
    c.start();
    let (watch, rules, bin) = (tmp.join("watch"), tmp.join("rules"), tmp.join("bin"));
    for d in [&watch, &rules, &bin] {
        std::fs::create_dir_all(d).unwrap();
    }
    // A binary of its own (sleep with bytes appended), outside the watched tree: only its runs
    // can put it in the history.
    let tool = bin.join("vedette-retro-tool");
    let mut bytes = std::fs::read("/bin/sleep").unwrap();
    bytes.extend_from_slice(b"vedette retro tool");
    std::fs::write(&tool, &bytes).unwrap();
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let digest = hex::encode(Sha256::digest(&bytes));
    let mut a = Agent::enroll(&c, &tmp.join("state"));
    let config = tmp.join("agent.toml");
    agent_config(
        &config,
        &watch,
        &rules,
        "processes = true\nevent_source = \"inotify\"\nscan_on_start = false",
    );
    a.run(&c, &["--config", config.to_str().unwrap()]);
    vedette_tests::wait_for(Duration::from_secs(60), "the first process walk", || {
        a.log()
            .contains("first process walk finished")
            .then_some(())
    });
    let before_ms = vedette_proto::now_ms();
    for _ in 0..3 {
        let status = std::process::Command::new(&tool).arg("1").status().unwrap();
        assert!(status.success());
    }
    let after_ms = vedette_proto::now_ms();
    std::fs::remove_file(&tool).unwrap();

    let bundle = tmp.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(
        bundle.join("tool-hash-iocs.txt"),
        format!("{digest};retro tool\n"),
    )
    .unwrap();
    let out = c.ctl(&["rules", "publish", bundle.to_str().unwrap()]);
    assert!(out.status.success(), "{}", vedette_tests::output_text(&out));
    let d = vedette_tests::wait_for(
        Duration::from_secs(60),
        "the tool's retro detection",
        || {
            c.detections()
                .into_iter()
                .find(|d| d["retro"].is_object() && d["path"] == tool.to_str().unwrap())
        },
    );
    assert_eq!(d["kind"], "hash", "{d}");
    assert_eq!(d["sha256"], digest.as_str(), "{d}");
    assert_eq!(d["user"], "root", "{d}");
    assert_eq!(d["retro"]["presence"], "gone", "{d}");
    assert_eq!(d["retro"]["runs"], 3, "{d}");
    let (first, last) = (
        d["retro"]["first_seen_ms"].as_i64().unwrap(),
        d["retro"]["last_seen_ms"].as_i64().unwrap(),
    );
    assert!(
        before_ms <= first && first < last && last <= after_ms,
        "{d}"
    );

    // An ad-hoc hunt finds it too, without publishing anything.
    let v = hunted(&c, &["--sha256", &digest]);
    let hits = v["agents"][0]["hits"].as_array().unwrap();
    let hit = hits
        .iter()
        .find(|h| h["path"] == tool.to_str().unwrap())
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(hit["kind"], "exec", "{v}");
    assert_eq!(hit["user"], "root", "{v}");
    assert_eq!(hit["runs"], 3, "{v}");
    assert_eq!(hit["presence"], "gone", "{v}");
    assert_eq!(hit["first_seen"], d["retro"]["first_seen"], "{v}");
    assert_eq!(hit["last_seen"], d["retro"]["last_seen"], "{v}");
}

#[test]
fn an_agent_killed_while_writing_its_history_loads_the_intact_records_at_restart() {
    let n = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let mut c = Collector::init(&tmp.join("collector"));
    c.start();
    let (watch, rules) = (tmp.join("watch"), tmp.join("rules"));
    write_tree(&watch, n);
    std::fs::create_dir_all(&rules).unwrap();
    let mut a = Agent::enroll(&c, &tmp.join("state"));
    let config = tmp.join("agent.toml");
    agent_config(
        &config,
        &watch,
        &rules,
        "processes = false\nscan_on_start = true\nmax_cpu_percent = 100",
    );
    let history = a.state.join("history");
    let seg_bytes = || vedette_tests::dir_bytes(&history);
    a.start(&["--config", config.to_str().unwrap()]);
    // Killed in the middle of its first scan, while records are being appended.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seg_bytes() < 100_000 {
        assert!(std::time::Instant::now() < deadline, "no history written");
        std::thread::sleep(Duration::from_millis(2));
    }
    a.proc.take().unwrap().signal_and_wait("KILL");
    let killed_at = vedette_proto::now_ms();
    let on_disk = seg_bytes();
    // Each record holds at least its 8-byte header, 137 fixed bytes and a path.
    assert!(
        on_disk < n as u64 * 145,
        "the scan was over before the kill ({on_disk} bytes): not killed while writing"
    );

    a.run(&c, &["--config", config.to_str().unwrap()]);
    let log = a.log();
    assert!(log.contains("history open"), "{log}");
    // Files recorded before the kill are found with a first sighting from before it.
    let mut list = String::new();
    for i in (0..n).step_by(20) {
        list.push_str(&hex::encode(Sha256::digest(format!("retro file {i}\n"))));
        list.push('\n');
    }
    let file = tmp.join("digests.txt");
    std::fs::write(&file, list).unwrap();
    let v = hunted(&c, &["--file", file.to_str().unwrap()]);
    let agent = &v["agents"][0];
    assert!(agent["error"].is_null(), "{agent}");
    let before_kill = agent["hits"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| {
            let first = h["first_seen"].as_str().unwrap();
            humantime::parse_rfc3339(first)
                .map(|t| {
                    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64 <= killed_at
                })
                .unwrap()
        })
        .count();
    assert!(before_kill > 0, "no record from before the kill: {agent}");
}
