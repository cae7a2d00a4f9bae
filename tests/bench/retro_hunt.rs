//! Benchmark: a bundle that adds the SHA-256 of 10 files already scanned, answered from the
//! agent's history, against the same agent with `history_max_bytes = "off"`, which rescans and
//! reads every file again (what agents did before they kept a history), on the same tree in the
//! same run.
//!
//! Real collector and agent (the built binaries) on 127.0.0.1. For each side: the first full
//! scan of N small files, then idle resident memory, then `rules publish` of the hash list →
//! all 10 detections stored, and the bytes the agent read meanwhile. With the history: its size
//! on disk, per 100,000 files.
//!
//! ```text
//! cargo build --release --bins
//! target/release/retro-hunt --files 100000
//! target/release/retro-hunt --files 1000000
//! ```
//! `--idle-seconds` (10) is how long each agent idles before its memory is read.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use vedette_tests::{Agent, Collector, bench_arg as arg, rss_of};

fn write_tree(root: &Path, n: usize) {
    for i in 0..n {
        let sub = root.join(format!("d{:04}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&sub).expect("dir");
        }
        std::fs::write(sub.join(format!("f{i:07}.txt")), content(i)).expect("file");
    }
}

fn content(i: usize) -> String {
    format!("retro benchmark file {i}\n")
}

struct Side {
    first_scan: Duration,
    idle_rss: u64,
    publish_to_stored: Duration,
    bytes_read: u64,
    full_scans: u64,
    history_bytes: u64,
}

/// One agent over `watch` (history on or off), with a collector of its own: its first scan,
/// idle memory, and a hash bundle of ten of the files answered.
fn side(tmp: &Path, watch: &Path, n: usize, history: bool) -> Side {
    let name = if history { "with-history" } else { "without" };
    let mut collector = Collector::init(&tmp.join(format!("{name}-collector")));
    collector.start();
    let c = &collector;
    let mut a = Agent::enroll(c, &tmp.join(name));
    let rules = tmp.join(format!("{name}-rules"));
    std::fs::create_dir_all(&rules).expect("rules dir");
    let config = tmp.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "watch = [{watch:?}]\nrules = [{rules:?}]\nheartbeat = \"1s\"\nprocesses = false\n\
             scan_on_start = true\nscan_interval = \"0s\"\nmax_cpu_percent = 100\n{}",
            if history {
                ""
            } else {
                "history_max_bytes = \"off\"\n"
            }
        ),
    )
    .expect("config");
    let t0 = Instant::now();
    a.run(c, &["--config", config.to_str().expect("utf-8")]);
    while a.counter(c, "full_scans") < 1 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let first_scan = t0.elapsed();
    // Idle: a few heartbeats after the scan.
    std::thread::sleep(Duration::from_secs(arg("--idle-seconds", 10) as u64));
    let pid = a.proc.as_ref().expect("running").child.id();
    let idle_rss = rss_of(pid);
    let (read_before, scans_before, acked_before) = (
        a.counter(c, "scanned_bytes"),
        a.counter(c, "full_scans"),
        a.counter(c, "detections_acked"),
    );
    let bundle = tmp.join(format!("{name}-bundle"));
    std::fs::create_dir_all(&bundle).expect("bundle dir");
    let mut list = String::new();
    let chosen: Vec<usize> = (0..10).map(|k| k * (n / 10) + 3).collect();
    for i in &chosen {
        list.push_str(&format!(
            "{};bench\n",
            hex::encode(Sha256::digest(content(*i)))
        ));
    }
    std::fs::write(bundle.join("bench-hash-iocs.txt"), list).expect("list");
    let t1 = Instant::now();
    let out = c.ctl(&["rules", "publish", bundle.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", vedette_tests::output_text(&out));
    let deadline = Instant::now() + Duration::from_secs(1800);
    let publish_to_stored = loop {
        let stored = c
            .detections()
            .into_iter()
            .filter(|d: &Value| d["agent_id"] == a.id.as_str() && d["kind"] == "hash")
            .count();
        if stored >= chosen.len() {
            break t1.elapsed();
        }
        assert!(Instant::now() < deadline, "{name}: {stored} of 10 stored");
        std::thread::sleep(Duration::from_millis(50));
    };
    // A heartbeat after the detections were acknowledged (and, without a history, after the
    // rescan) says what was read meanwhile.
    let settled = |a: &Agent| {
        a.counter(c, "detections_acked") >= acked_before + chosen.len() as u64
            && (history || a.counter(c, "full_scans") > scans_before)
    };
    while !settled(&a) {
        assert!(
            Instant::now() < deadline,
            "{name}: no heartbeat after the detections"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = Side {
        first_scan,
        idle_rss,
        publish_to_stored,
        bytes_read: a.counter(c, "scanned_bytes") - read_before,
        full_scans: a.counter(c, "full_scans") - scans_before,
        history_bytes: vedette_tests::dir_bytes(&a.state.join("history")),
    };
    a.proc.take().expect("running").signal_and_wait("TERM");
    s
}

fn main() {
    let n = arg("--files", 100_000);
    let tmp = tempfile::tempdir().expect("temp dir");
    let watch: PathBuf = tmp.path().join("tree");
    let t = Instant::now();
    write_tree(&watch, n);
    println!("{n} files written in {:.1?}", t.elapsed());
    // `--off-first 1` runs the agent without a history first (the first side meets a tree whose
    // metadata the kernel may not have cached yet).
    let (with, without) = if arg("--off-first", 0) == 1 {
        let without = side(tmp.path(), &watch, n, false);
        (side(tmp.path(), &watch, n, true), without)
    } else {
        let with = side(tmp.path(), &watch, n, true);
        (with, side(tmp.path(), &watch, n, false))
    };
    println!(
        "{:<16} {:>11} {:>12} {:>18} {:>14} {:>11} {:>16}",
        "agent",
        "first scan",
        "idle RSS",
        "publish->stored",
        "bytes read",
        "full scans",
        "history on disk"
    );
    for (name, s) in [("history", &with), ("history off", &without)] {
        println!(
            "{name:<16} {:>10.1}s {:>9.1} MiB {:>17.3}s {:>14} {:>11} {:>12.1} MiB",
            s.first_scan.as_secs_f64(),
            s.idle_rss as f64 / (1 << 20) as f64,
            s.publish_to_stored.as_secs_f64(),
            s.bytes_read,
            s.full_scans,
            s.history_bytes as f64 / (1 << 20) as f64
        );
    }
    println!(
        "publish->stored: history {:.1}x faster; history per 100,000 files: {:.1} MiB; idle RSS +{:.1} MiB",
        without.publish_to_stored.as_secs_f64() / with.publish_to_stored.as_secs_f64(),
        with.history_bytes as f64 / (1 << 20) as f64 * 100_000.0 / n as f64,
        (with.idle_rss as f64 - without.idle_rss as f64) / (1 << 20) as f64
    );
}
