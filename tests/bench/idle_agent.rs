//! Benchmark: what an idle agent costs. A real agent, enrolled and connected to a real
//! collector on 127.0.0.1, watching an empty directory, with the marker rule alone and then
//! with the rules given with `--rules DIR` as well. After its start-up work (the first full
//! scan of the watched directory, the first judgement of every running process), the agent's
//! resident memory (largest `VmRSS` seen) and CPU time (`utime + stime` of /proc/PID/stat)
//! are sampled over `--seconds N`. The largest resident memory since the agent started
//! (`VmHWM`: its start-up, loading or compiling the rules included) is read at the end.
//!
//! ```text
//! cargo build --release --bins
//! target/release/idle-agent --seconds 60 --rules ../shared/data/signature-base/yara \
//!     --rules ../shared/data/signature-base/iocs
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use vedette_tests::{
    Agent, Collector, bench_arg as arg, cpu_ticks, rss_of, rule_dir, status_bytes, wait_for,
};

/// What one idle agent cost.
struct Idle {
    /// Largest `VmRSS` seen, bytes.
    peak: u64,
    /// `VmHWM`: the largest resident memory since the start, bytes.
    hwm: u64,
    /// `RssAnon` and `RssFile` (mapped files: the executable, libraries) at the end, bytes.
    anon: u64,
    file: u64,
    /// CPU time over the run, % of one core.
    share: f64,
    /// YARA rules loaded.
    loaded: usize,
}

/// Runs one idle agent for `seconds` after its start-up work.
fn measure(c: &Collector, dir: &Path, rules: &[&Path], seconds: u64) -> Idle {
    let watch = dir.join("watch");
    std::fs::create_dir_all(&watch).expect("watch dir");
    let mut agent = Agent::enroll(c, &dir.join("agent"));
    let mut args = vec!["--watch".to_string(), watch.display().to_string()];
    for r in rules {
        args.extend(["--rules".to_string(), r.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    agent.run(c, &args);
    // Start-up work is over: the watched directory scanned, every running process judged.
    wait_for(Duration::from_secs(300), "the first full scan", || {
        agent.log().contains("full scan finished").then_some(())
    });
    wait_for(Duration::from_secs(300), "the first process walk", || {
        agent
            .log()
            .contains("first process walk finished")
            .then_some(())
    });
    // The agent then gives back the pages of its executable only start-up ran, at its next
    // memory sample (within a second); agents before that change do not say so.
    let said = Instant::now();
    while !agent.log().contains("start-up finished") && said.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let loaded = agent
        .log()
        .lines()
        .find(|l| l.contains("rule set built"))
        .and_then(|l| l.split("rules=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let pid = agent.proc.as_ref().expect("agent running").child.id();
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let start_cpu = cpu_ticks(pid);
    let start = Instant::now();
    let mut peak = rss_of(pid);
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(500));
        peak = peak.max(rss_of(pid));
    }
    let cpu = (cpu_ticks(pid) - start_cpu) as f64 / ticks_per_s;
    let share = 100.0 * cpu / start.elapsed().as_secs_f64();
    let (anon, file) = (status_bytes(pid, "RssAnon"), status_bytes(pid, "RssFile"));
    let hwm = status_bytes(pid, "VmHWM");
    let mut p = agent.proc.take().expect("agent running");
    p.signal_and_wait("TERM");
    Idle {
        peak,
        hwm,
        anon,
        file,
        share,
        loaded,
    }
}

fn main() {
    let seconds = arg("--seconds", 60) as u64;
    // Every `--rules DIR` given.
    let args: Vec<String> = std::env::args().collect();
    let extra: Vec<std::path::PathBuf> = args
        .windows(2)
        .filter(|w| w[0] == "--rules")
        .map(|w| std::path::PathBuf::from(&w[1]))
        .collect();
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let marker = rule_dir(
        &tmp.path().join("rules"),
        "idle_marker",
        "VEDETTE-IDLE-MARKER",
    );
    let mut runs: Vec<(String, Vec<&Path>)> = vec![("the marker rule".into(), vec![&marker])];
    if !extra.is_empty() {
        let names: Vec<String> = extra.iter().map(|p| p.display().to_string()).collect();
        let mut dirs: Vec<&Path> = vec![&marker];
        dirs.extend(extra.iter().map(|p| p.as_path()));
        runs.push((format!("the marker rule and {}", names.join(", ")), dirs));
    }
    println!(
        "| rules | YARA rules loaded | seconds | peak RSS | of it at the end: anonymous, files | CPU (% of one core) | since the start (`VmHWM`) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    for (i, (name, rules)) in runs.iter().enumerate() {
        let m = measure(&c, &tmp.path().join(format!("run{i}")), rules, seconds);
        println!(
            "| {name} | {} | {seconds} | {:.1} MiB | {:.1} MiB, {:.1} MiB | {:.2} % | {:.1} MiB |",
            m.loaded,
            mib(m.peak),
            mib(m.anon),
            mib(m.file),
            m.share,
            mib(m.hwm)
        );
    }
}
