//! Benchmark: whether the CPU budget holds. A real agent and collector on 127.0.0.1; the agent
//! starts with a full scan of `--files` small files (text of 1 to 8 KiB) at
//! `max_cpu_percent = --percent` with `--workers` scan threads, the marker rule and the
//! `--rules` given (signature-base, say). From the agent's start to the end of that scan, its
//! CPU time (`utime + stime` of the agent and of its rule compiler child) is read every second
//! and printed per 10-second window, start-up (the compile) included. 25 s after the start,
//! while the scan runs, a file with the marker is written into the watched directory: its
//! detection must not wait for the budget.
//!
//! ```text
//! cargo build --bins
//! target/debug/cpu-budget --files 20000 --percent 25 --workers 2 \
//!     --rules ../shared/data/signature-base/yara
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vedette_tests::{Agent, Collector, bench_arg as arg, rule_dir, wait_for};

const MARKER: &str = "VEDETTE-BUDGET-MARKER";

/// `n` text files of 1 to 8 KiB under `dir`, 500 to a directory.
fn corpus(dir: &Path, n: usize) {
    let words = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliett", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for i in 0..n {
        let sub = dir.join(format!("d{}", i / 500));
        std::fs::create_dir_all(&sub).expect("corpus dir");
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let size = 1024 + (seed % (7 * 1024)) as usize;
        let mut text = String::with_capacity(size + 16);
        let mut w = seed;
        while text.len() < size {
            w = w.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            text.push_str(words[(w >> 33) as usize % words.len()]);
            text.push(if w.is_multiple_of(11) { '\n' } else { ' ' });
        }
        std::fs::write(sub.join(format!("f{i}.txt")), text).expect("corpus file");
    }
}

/// `utime + stime` of `pid`, and with `children` its reaped children's too (`cutime +
/// cstime`), in ticks.
fn ticks(pid: u32, children: bool) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| fields.get(i).copied().unwrap_or(0);
    at(11) + at(12) + if children { at(13) + at(14) } else { 0 }
}

/// CPU ticks of `pid`, of its children reaped, and of those alive now (the rule compiler,
/// started by any of its threads).
fn ticks_with_children(pid: u32) -> u64 {
    let mut children = String::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let list = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            children.push_str(&list);
            children.push(' ');
        }
    }
    ticks(pid, true)
        + children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
            .map(|c| ticks(c, false))
            .sum::<u64>()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn main() {
    let files = arg("--files", 20_000);
    let percent = arg("--percent", 25);
    let workers = arg("--workers", 2);
    let extra: Option<PathBuf> = std::env::args()
        .skip_while(|a| a != "--rules")
        .nth(1)
        .map(PathBuf::from);
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let rules = rule_dir(&tmp.path().join("rules"), "budget_marker", MARKER);
    let (watch, bulk) = (tmp.path().join("watch"), tmp.path().join("bulk"));
    std::fs::create_dir_all(&watch).expect("watch dir");
    corpus(&bulk, files);
    let mut rule_list = format!("{:?}", rules.display().to_string());
    if let Some(r) = &extra {
        rule_list.push_str(&format!(", {:?}", r.display().to_string()));
    }
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "watch = [{:?}]\nscan_paths = [{:?}]\nrules = [{rule_list}]\nheartbeat = \"1s\"\n\
             processes = false\nscan_on_start = true\nscan_interval = \"0s\"\n\
             max_cpu_percent = {percent}\nscan_workers = {workers}\n",
            watch.display().to_string(),
            bulk.display().to_string(),
        ),
    )
    .expect("agent.toml");
    let mut agent = Agent::enroll(&c, &tmp.path().join("agent"));
    agent.start(&["--config", config.to_str().expect("utf-8 path")]);
    let pid = agent.proc.as_ref().expect("agent running").child.id();
    let started = Instant::now();
    let mut samples = vec![ticks_with_children(pid)];
    let mut live: Option<(PathBuf, i64)> = None;
    // One sample a second until the scan is over; the live file when the scan is under way.
    while !agent.log().contains("full scan finished") {
        let due = started + Duration::from_secs(samples.len() as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        samples.push(ticks_with_children(pid));
        // Once the watcher is up (the rules loaded) and the scan has run a while.
        if live.is_none() && samples.len() >= 25 && agent.log().contains("watching path=") {
            let path = watch.join("live.txt");
            std::fs::write(&path, format!("{MARKER} live\n")).expect("live file");
            live = Some((path, now_ms()));
        }
        assert!(samples.len() < 3600, "the scan took over an hour");
    }
    let per_second: Vec<u64> = samples
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .collect();
    println!("| window (s) | CPU % of one core |");
    println!("|---|---|");
    let mut worst: f64 = 0.0;
    for (i, w) in samples.windows(11).step_by(10).enumerate() {
        let share = w[10].saturating_sub(w[0]) as f64 / 10.0;
        worst = worst.max((share - percent as f64).abs());
        println!("| {}–{} | {share:.1} |", i * 10, i * 10 + 10);
    }
    let tail = (samples.len() - 1) % 10;
    if tail > 0 {
        let n = samples.len();
        let share = samples[n - 1].saturating_sub(samples[n - 1 - tail]) as f64 / tail as f64;
        println!("| {}–{} (end) | {share:.1} |", n - 1 - tail, n - 1);
    }
    let total =
        samples[samples.len() - 1].saturating_sub(samples[0]) as f64 / (samples.len() - 1) as f64;
    println!(
        "\n{files} files, {workers} workers, max_cpu_percent {percent}: {} s, {total:.1} % on average, the full 10 s windows within {worst:.1} points of the cap",
        samples.len() - 1
    );
    println!("CPU ticks (1/100 s) in each second: {per_second:?}");
    if let Some((path, closed)) = live {
        let path = path.display().to_string();
        let found = wait_for(Duration::from_secs(60), "the live file's detection", || {
            c.detections()
                .into_iter()
                .find(|d| d["path"].as_str() == Some(path.as_str()))
        });
        let observed = found["observed_at"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64);
        println!(
            "a file written during the scan: detected {} ms after it was closed",
            observed - closed
        );
    }
}
