//! Delivery guarantees with real processes: the collector killed mid-stream, the agent killed
//! with detections spooled, the collector down for a while, a spool over its cap, a damaged
//! spool tail, garbage in the spool, the scan cache and the kept bundle, failover between
//! collector addresses; and one report per incident across restarts, kills, rescans and new
//! bundles.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use vedette_tests::{Agent, Collector, SplitMix, free_port, rule_dir, wait_for, wait_until};

const RULE: &str = "delivery_marker";
const MARKER: &str = "VEDETTE-DELIVERY-MARKER";

struct Setup {
    c: Collector,
    agent: Agent,
    watch: PathBuf,
    config: PathBuf,
    // Last: removed after the processes are gone and their logs printed.
    _tmp: tempfile::TempDir,
}

/// A collector (left running) and an enrolled agent, with a config file watching a fresh
/// directory for the marker rule; `extra` is appended to the config.
fn setup(extra: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let agent = Agent::enroll(&c, &tmp.path().join("agent"));
    let watch = tmp.path().join("watch");
    std::fs::create_dir(&watch).unwrap();
    let rules = rule_dir(&tmp.path().join("rules"), RULE, MARKER);
    let config = tmp.path().join("agent.toml");
    vedette_tests::watch_config(&config, &watch, &rules, extra);
    Setup {
        _tmp: tmp,
        c,
        agent,
        watch,
        config,
    }
}

impl Setup {
    /// Starts the agent and waits until it is connected.
    fn run_agent(&mut self, extra: &[&str]) {
        let config = self.config.to_str().unwrap().to_string();
        let mut args = vec!["--config", config.as_str()];
        args.extend_from_slice(extra);
        self.agent.run(&self.c, &args);
    }

    /// Starts the agent with the collector down; returns once it watches the directory.
    fn start_agent(&mut self) {
        let config = self.config.to_str().unwrap().to_string();
        self.agent.start(&["--config", config.as_str()]);
        let p = self.agent.proc.as_ref().expect("agent started");
        wait_for(Duration::from_secs(30), "the agent to watch", || {
            p.log_text().contains("watching").then_some(())
        });
    }

    fn kill_agent(&mut self) {
        let mut p = self.agent.proc.take().expect("agent running");
        p.signal_and_wait("KILL");
    }

    fn stop_agent(&mut self) {
        let mut p = self.agent.proc.take().expect("agent running");
        assert!(p.signal_and_wait("TERM").success(), "{}", p.log_text());
    }

    fn write(&self, group: u32, range: std::ops::Range<u32>) {
        write_markers(&self.watch, group, range);
    }

    /// Paths of the stored marker detections (file names), with repeats.
    fn stored(&self) -> Vec<String> {
        self.c
            .detections()
            .iter()
            .filter(|d| d["rule"] == RULE)
            .map(|d| {
                let p = d["path"].as_str().unwrap_or_default();
                Path::new(p)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Waits until `n` distinct files are stored; returns the stored names.
    fn wait_stored(&self, n: usize, timeout: Duration) -> Vec<String> {
        wait_for(timeout, &format!("{n} files' detections stored"), || {
            let s = self.stored();
            (s.iter().collect::<BTreeSet<_>>().len() >= n).then_some(s)
        })
    }

    /// Waits until the agent's heartbeat says its spool is empty (everything acknowledged) and
    /// `expected` distinct files are stored; returns the agent's row.
    fn wait_all_acked(&self, expected: usize) -> Value {
        wait_until(
            Duration::from_secs(30),
            &format!("an empty spool and {expected} files stored"),
            || {
                let a = self.agent.info(&self.c).ok_or("agent not listed")?;
                let distinct = self.stored().into_iter().collect::<BTreeSet<_>>().len();
                if a["counters"]["spool_pending"] == 0 && distinct == expected {
                    Ok(a)
                } else {
                    Err(format!("{distinct} stored; agent {a}"))
                }
            },
        )
    }

    fn spool_waiting(&self) -> u64 {
        let Some(s) = self.agent.spool() else {
            return 0;
        };
        s["pending"].as_u64().unwrap_or(0) + s["dropped_total"].as_u64().unwrap_or(0)
    }
}

/// Writes marker files `g<group>-<i>` for each `i` in `range`.
fn write_markers(dir: &Path, group: u32, range: std::ops::Range<u32>) {
    for i in range {
        std::fs::write(
            dir.join(format!("g{group:02}-{i:05}")),
            format!("{MARKER} {group} {i}\n"),
        )
        .unwrap();
    }
}

fn assert_once(stored: &[String], expected: usize) {
    let distinct: BTreeSet<&String> = stored.iter().collect();
    assert_eq!(distinct.len(), expected, "distinct files stored");
    assert_eq!(stored.len(), expected, "every file's detection stored once");
}

#[test]
fn collector_killed_mid_stream_loses_and_repeats_nothing() {
    let mut s = setup("");
    s.run_agent(&[]);
    // Files keep coming while the collector is killed: some detections are stored, some in
    // flight, the rest spooled while it is dead.
    let watch = s.watch.clone();
    let writer = std::thread::spawn(move || write_markers(&watch, 0, 0..5000));
    let seen = wait_for(
        Duration::from_secs(60),
        "the first detections stored",
        || {
            let n = s.stored().len();
            (n >= 1).then_some(n)
        },
    );
    s.c.kill();
    writer.join().unwrap();
    s.c.start();
    s.wait_stored(5000, Duration::from_secs(120));
    // A heartbeat from after the reconnection: the one before the kill may also show an
    // empty spool.
    wait_for(
        Duration::from_secs(30),
        "a heartbeat after reconnecting",
        || {
            let a = s.agent.info(&s.c)?;
            (a["counters"]["connections"].as_u64() >= Some(2)).then_some(())
        },
    );
    let a = s.wait_all_acked(5000);
    assert_once(&s.stored(), 5000);
    eprintln!(
        "{seen} stored when the collector was killed; agent counters: {}",
        a["counters"]
    );
}

#[test]
fn agent_killed_with_unacked_detections_delivers_them_after_restart() {
    let mut s = setup("");
    s.c.stop();
    s.start_agent();
    s.write(0, 0..300);
    wait_for(Duration::from_secs(30), "300 detections spooled", || {
        (s.spool_waiting() == 300).then_some(())
    });
    s.kill_agent();
    s.c.start();
    s.run_agent(&[]);
    s.wait_stored(300, Duration::from_secs(30));
    s.wait_all_acked(300);
    assert_once(&s.stored(), 300);
    let log = s.agent.proc.as_ref().unwrap().log_text();
    assert!(
        log.contains("spooled detections waiting for delivery"),
        "{log}"
    );
}

#[test]
fn detections_made_while_the_collector_is_down_arrive_after_backoff() {
    let mut s = setup("");
    s.c.stop();
    // Something answers on the collector's port and hangs up: every attempt fails.
    let listener = TcpListener::bind(&s.c.addr).unwrap();
    listener.set_nonblocking(true).unwrap();
    let attempts = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let door = {
        let (attempts, stop) = (attempts.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        attempts.fetch_add(1, Ordering::Relaxed);
                        drop(conn);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })
    };
    s.start_agent();
    s.write(0, 0..100);
    wait_for(Duration::from_secs(30), "the agent to try 5 times", || {
        (attempts.load(Ordering::Relaxed) >= 5).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    door.join().unwrap();
    s.c.start();
    s.wait_stored(100, Duration::from_secs(30));
    s.wait_all_acked(100);
    assert_once(&s.stored(), 100);
    // State changes are logged, not every retry.
    let log = s.agent.proc.as_ref().unwrap().log_text();
    let warnings = log.matches("cannot reach the collector").count();
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} warnings for {} attempts:\n{log}",
        attempts.load(Ordering::Relaxed)
    );
}

#[test]
fn over_a_tiny_spool_cap_repeats_go_oldest_first_the_first_sighting_stays_and_the_loss_is_counted()
{
    let mut s = setup("spool_max_bytes = 65536");
    s.c.stop();
    s.start_agent();
    // Groups are spooled one after another, so spool order follows group order.
    let (groups, per_group) = (6u32, 100u32);
    for g in 0..groups {
        s.write(g, 0..per_group);
        let want = u64::from((g + 1) * per_group);
        wait_for(
            Duration::from_secs(30),
            &format!("{want} detections spooled or dropped"),
            || (s.spool_waiting() == want).then_some(()),
        );
    }
    let dropped = s.agent.spool().unwrap()["dropped_total"].as_u64().unwrap();
    assert!(dropped > 0, "the cap was reached");
    s.c.start();
    let total = (groups * per_group) as usize;
    let a = s.wait_all_acked(total - dropped as usize);
    assert_eq!(a["dropped_total"].as_u64(), Some(dropped), "{a}");
    let stored = s.stored();
    assert_eq!(stored.len() + dropped as usize, total, "missing == dropped");
    assert_once(&stored, total - dropped as usize);
    // All are repeats of one rule at one score: the first sighting stays, and of the repeats
    // the newest do: no missing file comes from a later group than a stored one.
    let all: BTreeSet<String> = (0..groups)
        .flat_map(|g| (0..per_group).map(move |i| format!("g{g:02}-{i:05}")))
        .collect();
    let mut kept: BTreeSet<String> = stored.into_iter().collect();
    let first = kept.pop_first().unwrap();
    assert!(
        first.starts_with("g00-"),
        "the first sighting was dropped: {first}"
    );
    let group = |n: &String| n[1..3].parse::<u32>().unwrap();
    let oldest_kept = kept.iter().map(group).min().unwrap();
    let newest_lost = all.difference(&kept).map(group).max().unwrap();
    assert!(
        newest_lost <= oldest_kept,
        "lost group {newest_lost}, kept group {oldest_kept}"
    );
}

#[test]
fn a_damaged_spool_tail_is_cut_and_the_records_before_it_are_delivered() {
    let mut s = setup("");
    s.c.stop();
    s.start_agent();
    s.write(0, 0..50);
    wait_for(Duration::from_secs(30), "50 detections spooled", || {
        (s.spool_waiting() == 50).then_some(())
    });
    s.stop_agent();
    // Tear the last record, as a crash in the middle of a write would.
    let dir = s.agent.state.join("spool");
    let mut segments: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    let last = segments.last().expect("a spool segment");
    let len = std::fs::metadata(last).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(last).unwrap();
    f.set_len(len - 10).unwrap();
    drop(f);
    let before = s.agent.spool().unwrap();
    assert_eq!(before["pending"], 49, "{before}");
    assert_eq!(before["damaged_segments"], 1, "{before}");

    s.c.start();
    s.run_agent(&[]);
    s.wait_stored(49, Duration::from_secs(30));
    let a = s.wait_all_acked(49);
    assert_once(&s.stored(), 49);
    assert!(
        a["counters"]["spool_damaged_bytes"].as_u64() > Some(0),
        "{a}"
    );
    let log = s.agent.proc.as_ref().unwrap().log_text();
    assert!(log.contains("damaged spool record"), "{log}");
}

#[test]
fn the_agent_fails_over_to_the_next_collector_address() {
    let mut s = setup("");
    let dead = format!("127.0.0.1:{}", free_port());
    let live = s.c.addr.clone();
    s.run_agent(&["--collector", &dead, "--collector", &live]);
    s.write(0, 0..10);
    s.wait_stored(10, Duration::from_secs(30));
    s.wait_all_acked(10);
    assert_once(&s.stored(), 10);
}

/// Waits for a heartbeat sent after `scans` full scans in which every detection made is in the
/// spool and every spooled one acknowledged; returns the agent's row.
fn wait_quiet(s: &Setup, scans: u64) -> Value {
    wait_until(
        Duration::from_secs(30),
        &format!("{scans} full scans and every detection acknowledged"),
        || {
            let a = s.agent.info(&s.c).ok_or("agent not listed")?;
            let n = |k: &str| a["counters"][k].as_u64().unwrap_or(0);
            if n("full_scans") >= scans
                && n("detections") == n("detections_spooled")
                && n("spool_pending") == 0
            {
                Ok(a)
            } else {
                Err(format!("agent {a}"))
            }
        },
    )
}

/// Publishes the rules in `dir` as a bundle and waits until the agent applied `version`.
fn publish_and_wait(s: &Setup, dir: &Path, version: u64) {
    s.c.ctl_ok(&["rules", "publish", dir.to_str().unwrap()]);
    wait_for(
        Duration::from_secs(30),
        &format!("the agent on bundle {version}"),
        || {
            let a = s.agent.info(&s.c)?;
            (a["bundle_version"] == version).then_some(())
        },
    );
}

#[test]
fn each_incident_is_stored_once_across_kills_restarts_rescans_and_bundles() {
    let mut s = setup("");
    // Full scans of the watched directory (the default `scan_paths`) at every start.
    let base = std::fs::read_to_string(&s.config).unwrap();
    let config = base.replace("scan_on_start = false", "scan_on_start = true");
    assert_ne!(config, base);
    std::fs::write(&s.config, config).unwrap();

    // 50 files detected in real time while the collector is down, then a kill -9 with all 50
    // pending (and the result cache most likely not saved yet).
    s.c.stop();
    s.start_agent();
    s.write(0, 0..50);
    wait_for(Duration::from_secs(30), "50 detections spooled", || {
        (s.spool_waiting() == 50).then_some(())
    });
    s.kill_agent();
    s.c.start();
    // The spool is replayed and the start-up scan finds the same 50 files.
    s.run_agent(&[]);
    wait_quiet(&s, 1);
    assert_once(&s.stored(), 50);

    // A clean restart: the start-up scan answers from the cache and reports nothing.
    s.stop_agent();
    s.run_agent(&[]);
    let a = wait_quiet(&s, 1);
    // Counters that stayed at zero are left out of heartbeats.
    assert_eq!(a["counters"]["cache_hits"], 50, "{a}");
    assert_eq!(a["counters"]["detections"].as_u64().unwrap_or(0), 0, "{a}");
    assert_once(&s.stored(), 50);

    // A forced rescan (SIGUSR1).
    s.agent.proc.as_ref().expect("agent running").signal("USR1");
    wait_quiet(&s, 2);
    assert_once(&s.stored(), 50);

    // A bundle with an unrelated rule: every file is scanned again, nothing new is reported.
    let tmp = tempfile::tempdir().unwrap();
    let unrelated = rule_dir(&tmp.path().join("v1"), "unrelated", "NOT-IN-ANY-FILE");
    publish_and_wait(&s, &unrelated, 1);
    let a = wait_quiet(&s, 3);
    assert_eq!(a["counters"]["detections"].as_u64().unwrap_or(0), 0, "{a}");
    assert_once(&s.stored(), 50);
    assert_eq!(s.c.detections().len(), 50);

    // A bundle whose new rule matches one old file: a new incident, reported once.
    let one = rule_dir(
        &tmp.path().join("v2"),
        "file_seven",
        &format!("{MARKER} 0 7\\n"),
    );
    publish_and_wait(&s, &one, 2);
    wait_quiet(&s, 4);
    let d = wait_for(Duration::from_secs(30), "the new rule's detection", || {
        let all = s.c.detections();
        all.into_iter().find(|d| d["rule"] == "file_seven")
    });
    assert!(
        d["path"]
            .as_str()
            .unwrap_or_default()
            .ends_with("g00-00007"),
        "{d}"
    );
    assert_eq!(s.c.detections().len(), 51);
    assert_once(&s.stored(), 50);
}

/// Each record of a spool segment: its byte range and the marker file it names.
fn spool_records(data: &[u8]) -> Vec<(std::ops::Range<usize>, String)> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + 16 <= data.len() {
        let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap()) as usize;
        let range = off..off + 16 + len;
        let payload = &data[off + 16..range.end];
        let at = payload
            .windows(4)
            .position(|w| w == b"g00-")
            .expect("a marker file's name in the record");
        out.push((
            range.clone(),
            String::from_utf8_lossy(&payload[at..at + 9]).into_owned(),
        ));
        off = range.end;
    }
    out
}

#[test]
fn garbage_in_the_spool_scan_cache_and_kept_bundle_costs_only_what_it_touched() {
    let mut rng = SplitMix::from_env("spool, scan cache and bundle damage");
    let mut s = setup("");
    s.run_agent(&[]);
    let bundle_rules = rule_dir(
        &s._tmp.path().join("bundle"),
        "bundle_marker",
        "VEDETTE-BUNDLE-MARKER",
    );
    publish_and_wait(&s, &bundle_rules, 1);
    s.c.stop();
    s.write(0, 0..120);
    wait_for(Duration::from_secs(30), "120 detections spooled", || {
        (s.spool_waiting() == 120).then_some(())
    });
    s.stop_agent();
    // The files go, so that no rescan finds them again: what arrives is what the spool kept.
    for e in std::fs::read_dir(&s.watch).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }

    let state = s.agent.state.clone();
    for kept in ["scan-cache.bin", "bundle.bin"] {
        let path = state.join(kept);
        let mut data = std::fs::read(&path).unwrap_or_else(|e| panic!("{kept}: {e}"));
        rng.damage(&mut data, 4);
        std::fs::write(&path, data).unwrap();
    }
    let mut intact = BTreeSet::new();
    let mut segments: Vec<PathBuf> = std::fs::read_dir(state.join("spool"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    assert!(!segments.is_empty());
    for seg in &segments {
        let original = std::fs::read(seg).unwrap();
        let mut data = original.clone();
        rng.damage(&mut data, 6);
        for (range, name) in spool_records(&original) {
            if data[range.clone()] == original[range] {
                intact.insert(name);
            }
        }
        std::fs::write(seg, data).unwrap();
    }
    assert!(intact.len() < 120, "the damage touched a record");

    s.c.start();
    s.run_agent(&[]);
    s.wait_all_acked(intact.len());
    let stored = s.stored();
    assert_once(&stored, intact.len());
    assert_eq!(stored.into_iter().collect::<BTreeSet<_>>(), intact);
    // It said what it skipped, and took the bundle again from the collector.
    let log = s.agent.log();
    for said in [
        "damaged spool records",
        "scan cache unusable",
        "last-good bundle not usable",
    ] {
        assert!(log.contains(said), "{said}: {log}");
    }
    wait_for(Duration::from_secs(30), "bundle 1 applied again", || {
        (s.agent.info(&s.c)?["bundle_version"] == 1).then_some(())
    });
}
