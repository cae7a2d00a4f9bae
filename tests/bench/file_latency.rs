//! Benchmark: file closed → detection committed at the collector, on a real agent and
//! collector over mutual TLS on 127.0.0.1.
//!
//! Two phases, each with its own files, every one matching a rule:
//! - **steady**: `--steady N` files, one every `1 / --rate` seconds;
//! - **burst**: `--files N` files written as fast as one thread can, while the agent's full
//!   scan of `--scan-files N` other files (copies of `/usr/bin` and `/usr/lib` files) runs.
//!
//! The latency of a file is the collector's receive time of its detection (stamped in the
//! transaction that commits it) minus the time the file was closed, both from this machine's
//! clock, in milliseconds. Every file must be reported.
//!
//! ```text
//! cargo build --release --bins
//! target/release/file-latency --files 10000 --scan-files 3000 --steady 300 --rate 30 \
//!     [--rules ../shared/data/signature-base/yara] [--poll-ms 500]
//! ```
//!
//! The benchmark asks the collector for new detections every `--poll-ms` (a `vedettectl` run
//! each time, on the cores the agent scans with). How often it asks changes when it sees the
//! last one, not the times it measures, which the agent and the collector stamp.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vedette_tests::{
    Agent, Collector, bench_arg as arg, json_lines, percentile as pct, rule_dir, wait_for_every,
};

const MARKER: &str = "VEDETTE-LATENCY-MARKER";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Writes `n` marker files named `PREFIX-i` into `dir`, `gap` apart; each file's close time.
fn write_files(dir: &Path, prefix: &str, n: usize, gap: Duration) -> Vec<(PathBuf, i64)> {
    let start = Instant::now();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        if !gap.is_zero() {
            let due = gap * i as u32;
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let path = dir.join(format!("{prefix}-{i}.txt"));
        std::fs::write(&path, format!("{MARKER} {prefix} {i}\n")).expect("write a file");
        out.push((path, now_ms()));
    }
    out
}

/// Copies up to `n` regular files of at most 8 MiB from system directories into `dir`.
fn scan_corpus(dir: &Path, n: usize) -> (usize, u64) {
    std::fs::create_dir_all(dir).expect("corpus dir");
    let (mut files, mut bytes) = (0usize, 0u64);
    for src in [
        "/usr/bin",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib",
        "/usr/share/doc",
    ] {
        let Ok(entries) = std::fs::read_dir(src) else {
            continue;
        };
        for e in entries.flatten() {
            if files >= n {
                return (files, bytes);
            }
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if !meta.is_file() || meta.len() > 8 << 20 {
                continue;
            }
            if std::fs::copy(
                e.path(),
                dir.join(format!("{files}-{}", e.file_name().to_string_lossy())),
            )
            .is_ok()
            {
                files += 1;
                bytes += meta.len();
            }
        }
    }
    (files, bytes)
}

/// Each file's latencies in ms, sorted: close → committed, and of it, close → detected by
/// the agent (`observed_at`) and detected → committed.
struct Latencies {
    total: Vec<i64>,
    detect: Vec<i64>,
    deliver: Vec<i64>,
}

/// Waits until every file has its detection, asking every `poll`.
fn latencies(
    c: &Collector,
    files: &[(PathBuf, i64)],
    timeout: Duration,
    poll: Duration,
) -> Latencies {
    let wanted: std::collections::HashMap<String, i64> = files
        .iter()
        .map(|(p, t)| {
            let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
            (p.to_string_lossy().into_owned(), *t)
        })
        .collect();
    let limit = (files.len() * 2 + 1000).to_string();
    // Each poll asks only for what was received since the last one saw (the collector and
    // vedettectl listing every detection 20 times a second would take a core from the agent
    // being measured). The times measured are the agent's and the collector's own.
    let mut since: Option<(i64, String)> = None;
    let mut seen: std::collections::HashMap<String, (i64, i64, i64)> = Default::default();
    let found = wait_for_every(timeout, poll, "every file's detection", || {
        let mut args = vec!["detections", "list", "--json", "--limit", &limit];
        if let Some((_, t)) = &since {
            args.extend(["--since", t.as_str()]);
        }
        for d in json_lines(&c.ctl_ok(&args)) {
            let (Some(path), Some(received_text), Some(observed)) = (
                d["path"].as_str(),
                d["received_at"].as_str(),
                d["observed_at"].as_str(),
            ) else {
                continue;
            };
            let (received, observed) = (rfc3339_ms(received_text), rfc3339_ms(observed));
            if since.as_ref().is_none_or(|(ms, _)| received > *ms) {
                since = Some((received, received_text.to_string()));
            }
            if let Some(closed) = wanted.get(path) {
                seen.entry(path.to_string()).or_insert((
                    received - closed,
                    observed - closed,
                    received - observed,
                ));
            }
        }
        (seen.len() >= wanted.len()).then(|| seen.values().copied().collect::<Vec<_>>())
    });
    let sorted = |f: fn(&(i64, i64, i64)) -> i64| {
        let mut v: Vec<i64> = found.iter().map(f).collect();
        v.sort_unstable();
        v
    };
    Latencies {
        total: sorted(|l| l.0),
        detect: sorted(|l| l.1),
        deliver: sorted(|l| l.2),
    }
}

/// Milliseconds since the epoch of an RFC 3339 time (`2026-11-27T10:00:00.123Z`).
fn rfc3339_ms(text: &str) -> i64 {
    humantime::parse_rfc3339(text)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .unwrap_or_else(|| panic!("not an RFC 3339 time: {text}"))
}

fn main() {
    let burst = arg("--files", 10_000);
    let scan_files = arg("--scan-files", 3_000);
    let steady = arg("--steady", 300);
    let rate = arg("--rate", 30).max(1);
    let poll = Duration::from_millis(arg("--poll-ms", 500) as u64);
    let extra_rules = std::env::args()
        .skip_while(|a| a != "--rules")
        .nth(1)
        .map(PathBuf::from);
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut c = Collector::init(&tmp.path().join("collector"));
    // `--messages-per-second N`: the collector's per-agent message rate (`[limits]
    // agent_messages_per_second`, default 50), to see what the throttle adds.
    let messages = arg("--messages-per-second", 0);
    if messages > 0 {
        let toml = c.file("collector.toml");
        std::fs::write(
            c.dir.join("collector.toml"),
            format!("{toml}\n[limits]\nagent_messages_per_second = {messages}\n"),
        )
        .expect("collector.toml");
    }
    c.start();
    let rules = rule_dir(&tmp.path().join("rules"), "latency_marker", MARKER);
    let watch = tmp.path().join("watch");
    let bulk = tmp.path().join("bulk");
    std::fs::create_dir_all(&watch).expect("watch dir");
    let (copied, bytes) = scan_corpus(&bulk, scan_files);

    let mut agent = Agent::enroll(&c, &tmp.path().join("agent"));
    let mut args = vec![
        "--watch".to_string(),
        watch.display().to_string(),
        "--rules".to_string(),
        rules.display().to_string(),
    ];
    if let Some(r) = &extra_rules {
        args.extend(["--rules".to_string(), r.display().to_string()]);
    }
    let metrics = format!("127.0.0.1:{}", vedette_tests::free_port());
    args.extend(["--metrics-listen".to_string(), metrics.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    agent.run(&c, &args);
    println!(
        "rules: the marker rule{}; scan corpus: {copied} files, {} MiB",
        extra_rules
            .as_ref()
            .map(|r| format!(" and {}", r.display()))
            .unwrap_or_default(),
        bytes >> 20
    );

    // Steady.
    let files = write_files(
        &watch,
        "steady",
        steady,
        Duration::from_secs(1) / rate as u32,
    );
    let steady_lat = latencies(&c, &files, Duration::from_secs(120), poll);

    // Burst, during a full scan: the bulk tree is added to the watched set by a forced rescan.
    let log_before = agent.log().len();
    std::fs::rename(&bulk, watch.join("bulk")).expect("move the corpus under the watch");
    agent.proc.as_ref().expect("agent running").signal("USR1");
    let t = Instant::now();
    let files = write_files(&watch, "burst", burst, Duration::ZERO);
    let written = t.elapsed();
    let burst_lat = latencies(&c, &files, Duration::from_secs(600), poll);
    let log = agent.log();
    let scan_done = log[log_before.min(log.len())..].contains("full scan finished");

    println!();
    println!(
        "| phase | files | written in | p50 ms | p99 ms | max ms | detected p50 / p99 ms | committed after detection p50 / p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, lat, took) in [
        (format!("steady, {rate}/s"), &steady_lat, None),
        (
            "burst, with a full scan".to_string(),
            &burst_lat,
            Some(written),
        ),
    ] {
        let t = &lat.total;
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} / {} | {} / {} |",
            t.len(),
            took.map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64())),
            pct(t, 0.5),
            pct(t, 0.99),
            t.last().copied().unwrap_or_default(),
            pct(&lat.detect, 0.5),
            pct(&lat.detect, 0.99),
            pct(&lat.deliver, 0.5),
            pct(&lat.deliver, 0.99),
        );
    }
    println!();
    println!(
        "full scan of the corpus (forced with SIGUSR1 as the burst began) finished by the end: {}",
        if scan_done { "yes" } else { "no" }
    );
    // What the agent says of its own work, from its metrics.
    let text = vedette_tests::http_get(&metrics, "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_else(|e| {
            eprintln!("cannot read the agent's metrics at {metrics}: {e}");
            String::new()
        });
    let shown: Vec<&str> = text
        .lines()
        .filter(|l| {
            [
                "vedette_agent_files_scanned_total ",
                "vedette_agent_helper_scans_total ",
                "vedette_agent_fs_events_total ",
                "vedette_agent_watch_overflows_total ",
                "vedette_agent_scanners_released_total ",
                "vedette_agent_memory_limit_exceeded_total ",
                "vedette_agent_resident_memory_bytes ",
                "vedette_agent_cpu_seconds_total ",
            ]
            .iter()
            .any(|name| l.starts_with(name))
        })
        .collect();
    println!("agent: {}", shown.join(", "));
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_parse() {
        assert_eq!(super::rfc3339_ms("1970-01-01T00:00:01.5Z"), 1500);
        assert_eq!(
            super::rfc3339_ms("2026-11-27T00:00:00.000Z"),
            1_795_737_600_000
        );
    }
}
