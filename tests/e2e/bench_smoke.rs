//! Every benchmark run once in a tiny configuration, so that none of them can rot. The
//! figures printed here mean nothing (debug build, a handful of items); `BENCHMARKS.md` gives
//! the real runs and their commands.

use vedette_tests::bin;

/// Runs a benchmark binary; its standard output, after checking that it succeeded.
fn run(name: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(bin(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{name} {args:?}:\n{text}");
    text
}

#[test]
fn ingest_benchmark_runs_in_a_tiny_configuration() {
    let text = run(
        "vedette-ingest",
        &["--agents", "2", "--batches", "2", "--batch", "5"],
    );
    assert!(text.contains("| SQLite, 1 collector | 2 | 20 |"), "{text}");
    // The alerts the detections grouped into, and how long the newest 100 take to list.
    assert!(text.contains("newest 100 alerts"), "{text}");
    assert!(text.contains("| SQLite, 1 collector | 20 | 20 |"), "{text}");
    let text = run("vedette-ingest", &["--idle", "3"]);
    assert!(text.contains("| 3 | "), "{text}");
}

#[test]
fn domain_lookup_benchmark_runs_in_a_tiny_configuration() {
    let text = run(
        "domain-lookup",
        &["--small", "10", "--large", "1000", "--queries", "1000"],
    );
    assert!(text.contains("| 10 | 1000 | 100 |"), "{text}");
    assert!(text.contains("| 1000 | 1000 | 100 |"), "{text}");
}

#[test]
fn cpu_budget_benchmark_runs_in_a_tiny_configuration() {
    let text = run(
        "cpu-budget",
        &["--files", "200", "--percent", "50", "--workers", "2"],
    );
    assert!(
        text.contains("| window (s) | CPU % of one core |"),
        "{text}"
    );
    assert!(
        text.contains("200 files, 2 workers, max_cpu_percent 50"),
        "{text}"
    );
    assert!(
        text.contains("a file written during the scan") || text.contains("| 0–"),
        "{text}"
    );
}

#[test]
fn dns_rate_benchmark_runs_in_a_tiny_configuration() {
    if vedette_tests::Netns::new().is_err() {
        vedette_tests::missing_root("dns-rate makes a network namespace");
        return;
    }
    let text = run(
        "dns-rate",
        &["--rate", "300", "--seconds", "1", "--indicators", "10"],
    );
    // Every query seen, none dropped, the one listed name reported once.
    assert!(text.contains("| 10 | 300 | 1 | 300 | "), "{text}");
    let row = text.lines().last().unwrap_or_default();
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    assert_eq!(cells[6], "0", "dropped: {text}");
    assert_eq!(cells[7], "1", "dns detections: {text}");
}

/// The ingest harness against a collector it did not start, as an operator sizing one runs it.
#[test]
fn ingest_benchmark_runs_against_a_collector_of_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = vedette_tests::Collector::init(&tmp.path().join("collector"));
    c.start();
    let ca = c.dir.join("ca.crt");
    let ca = ca.to_str().unwrap();
    let token = c.token(&["--uses", "4"]);
    let text = run(
        "vedette-ingest",
        &[
            "--collector",
            &c.addr,
            "--ca",
            ca,
            "--token",
            &token,
            "--agents",
            "2",
            "--batches",
            "2",
            "--batch",
            "5",
        ],
    );
    assert!(
        text.contains(&format!("| collector at {} | 2 | 20 |", c.addr)),
        "{text}"
    );
    let text = run(
        "vedette-ingest",
        &[
            "--collector",
            &c.addr,
            "--ca",
            ca,
            "--token",
            &token,
            "--idle",
            "2",
            "--hold",
            "0",
        ],
    );
    assert!(text.contains("2 agents enrolled"), "{text}");
    // Every simulated agent enrolled there, and its detections were committed.
    assert_eq!(c.agents().len(), 4);
    assert_eq!(c.detections().len(), 20);
}

#[test]
fn file_latency_benchmark_runs_in_a_tiny_configuration() {
    let text = run(
        "file-latency",
        &[
            "--files",
            "40",
            "--scan-files",
            "20",
            "--steady",
            "5",
            "--rate",
            "50",
        ],
    );
    assert!(text.contains("| steady, 50/s | 5 | - |"), "{text}");
    assert!(text.contains("| burst, with a full scan | 40 |"), "{text}");
    // The agent's own counters, read from its metrics at the end.
    assert!(
        text.contains("agent: vedette_agent_files_scanned_total "),
        "{text}"
    );
}

#[test]
fn idle_agent_benchmark_runs_in_a_tiny_configuration() {
    let text = run("idle-agent", &["--seconds", "1"]);
    assert!(text.contains("| the marker rule | 1 | 1 | "), "{text}");
}

#[test]
fn bundle_fanout_benchmark_runs_in_a_tiny_configuration() {
    let text = run("bundle-fanout", &["--agents", "3", "--rounds", "1"]);
    assert!(text.contains("3 agent streams open"), "{text}");
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("1 ")),
        "no round in: {text}"
    );
}

#[test]
fn hunt_fanout_benchmark_runs_in_a_tiny_configuration() {
    let text = run("hunt-fanout", &["--agents", "3", "--rounds", "1"]);
    assert!(text.contains("3 agent streams open"), "{text}");
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("1 ")),
        "no round in: {text}"
    );
}

#[test]
fn retro_hunt_benchmark_runs_in_a_tiny_configuration() {
    let text = run("retro-hunt", &["--files", "200", "--idle-seconds", "1"]);
    let row = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no `{name}` row in: {text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // With the history: nothing read, no rescan; without: a rescan.
    let with = row("history ");
    assert_eq!((with[5].as_str(), with[6].as_str()), ("0", "0"), "{text}");
    let without = row("history off");
    assert_eq!(without[7].as_str(), "1", "{text}");
}

#[test]
fn exec_latency_benchmark_runs_in_a_tiny_configuration() {
    let text = run("exec-latency", &["--execs", "20", "--rounds", "1"]);
    assert!(text.contains("| 1 | no agent | 20 |"), "{text}");
}

/// The scan benchmark against Debian's `yara` (and `bc` for its arithmetic), on a tiny
/// corpus with one rule and one hash list of its own, with the debug build.
#[test]
fn scan_benchmark_runs_in_a_tiny_configuration() {
    let have = |tool: &str, arg: &str| {
        std::process::Command::new(tool)
            .arg(arg)
            .stdin(std::process::Stdio::null())
            .output()
            .is_ok()
    };
    if !have("yara", "--version") || !have("bc", "--version") {
        vedette_tests::missing_peer("yara and bc", "apt-get install yara bc");
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = tempfile::tempdir().unwrap();
    let sb = tmp.path().join("signature-base");
    std::fs::create_dir_all(sb.join("yara")).unwrap();
    std::fs::create_dir_all(sb.join("iocs")).unwrap();
    std::fs::write(
        sb.join("yara/smoke.yar"),
        "rule smoke_marker { strings: $m = \"VEDETTE-BENCH-SMOKE\" condition: $m }\n",
    )
    .unwrap();
    std::fs::write(
        sb.join("iocs/hash-iocs.txt"),
        "0123456789abcdef0123456789abcdef;smoke hash\n",
    )
    .unwrap();
    let corpus = tmp.path().join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    for i in 0..20 {
        std::fs::write(corpus.join(format!("f{i}.txt")), format!("file {i}\n")).unwrap();
    }
    std::fs::write(corpus.join("hit.txt"), "xx VEDETTE-BENCH-SMOKE xx\n").unwrap();
    let out = std::process::Command::new("bash")
        .arg(root.join("tests/bench/scan_vs_yara.sh"))
        .env("SIGNATURE_BASE", &sb)
        .env("CORPUS", &corpus)
        .env("AGENT", bin("vedette-agent"))
        .env("RUNS", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "scan_vs_yara.sh: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("scan_vs_yara.sh:\n{text}");
    assert!(text.contains("yara matches:    1 lines"), "{text}");
    assert!(text.contains("vedette matches: 1 detections"), "{text}");
    // The bare yara-x peer ran the same rule over the same files.
    assert!(
        text.contains("bare: bare yara-x: 1 rules (0 files with errors)")
            && text.contains("scanned 21 files, 1 matches"),
        "{text}"
    );
}
