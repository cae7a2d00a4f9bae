//! Benchmark: what the agent adds to each exec. Runs a copy of `/bin/true` N times and times
//! each run (spawn to exit), in one run, on one tmpfs the benchmark mounts itself:
//! - with no agent;
//! - with the agent watching the tmpfs (fanotify exec events, detection only);
//! - with prevention on (every exec on the tmpfs waits for a verdict);
//! - with prevention on, running an indicator binary (every exec refused).
//!
//! ```text
//! cargo build --release --bins
//! target/release/exec-latency --execs 2000 --rounds 2      # as root
//! ```
//! The agent is the built release binary, enrolled with a real collector on 127.0.0.1.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vedette_tests::{
    Agent, Collector, Tmpfs, bench_arg as arg, percentile as pct, rule_dir, wait_for,
};

/// Times `n` runs of `exe`; each must end as `refused` says (refused: EPERM at exec).
fn time_execs(exe: &Path, n: usize, refused: bool) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let result = Command::new(exe).status();
        out.push(t.elapsed());
        match result {
            Ok(s) if !refused && s.success() => {}
            Err(e) if refused && e.raw_os_error() == Some(1) => {}
            other => panic!("run {i} of {}: {other:?}", exe.display()),
        }
    }
    out.sort();
    out
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let n = arg("--execs", 2000);
    let rounds = arg("--rounds", 2);
    let tmp = tempfile::tempdir().expect("temp dir");
    let mounted = Tmpfs::mount(&tmp.path().join("fs")).expect("a tmpfs (run as root)");
    let fs = mounted.path.clone();
    let benign = fs.join("bench-true");
    std::fs::copy("/bin/true", &benign).expect("copy /bin/true");
    let ioc = fs.join("bench-ioc");
    let mut image = std::fs::read("/bin/true").expect("read /bin/true");
    image.extend_from_slice(b"VEDETTE-BENCH-IOC");
    std::fs::write(&ioc, &image).expect("write the indicator binary");
    std::fs::set_permissions(&ioc, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let hash = Command::new("sha256sum")
        .arg(&ioc)
        .output()
        .expect("sha256sum");
    let hash = String::from_utf8_lossy(&hash.stdout)[..64].to_string();

    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let rules = rule_dir(
        &tmp.path().join("rules"),
        "bench_marker",
        "VEDETTE-BENCH-MARKER",
    );
    std::fs::write(rules.join("hash-iocs.txt"), format!("{hash};bench\n")).expect("iocs");
    let config = |name: &str, extra: &str| {
        let path = tmp.path().join(name);
        std::fs::write(
            &path,
            format!(
                "watch = [{:?}]\nrules = [{:?}]\nscan_on_start = false\nscan_interval = \"0s\"\n\
                 event_source = \"fanotify\"\n{extra}\n",
                fs.to_str().expect("utf-8"),
                rules.to_str().expect("utf-8"),
            ),
        )
        .expect("config");
        path
    };
    let detect = config("detect.toml", "");
    let prevent = config("prevent.toml", "prevent = true");
    let mut agent = Agent::enroll(&c, &tmp.path().join("agent"));

    println!("| round | setup | execs | p50 | p99 | mean | p50 vs none |");
    println!("|---|---|---|---|---|---|---|");
    for round in 1..=rounds {
        let none = time_execs(&benign, n, false);
        let base = pct(&none, 0.5);
        let row = |setup: &str, t: &[Duration]| {
            let mean = t.iter().sum::<Duration>() / t.len().max(1) as u32;
            println!(
                "| {round} | {setup} | {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.2}× |",
                t.len(),
                us(pct(t, 0.5)),
                us(pct(t, 0.99)),
                us(mean),
                us(pct(t, 0.5)) / us(base),
            );
        };
        row("no agent", &none);
        for (setup, cfg) in [
            ("agent, detection", &detect),
            ("agent, prevention", &prevent),
        ] {
            agent.run(&c, &["--config", cfg.to_str().expect("utf-8")]);
            wait_for(Duration::from_secs(30), "fanotify in use", || {
                agent
                    .log()
                    .contains("file events from fanotify")
                    .then_some(())
            });
            // One exec first, so both runs time warm caches.
            time_execs(&benign, 1, false);
            row(setup, &time_execs(&benign, n, false));
            if cfg == &prevent {
                time_execs(&ioc, 1, true);
                row("agent, prevention, refused", &time_execs(&ioc, n, true));
            }
            agent
                .proc
                .as_mut()
                .expect("agent running")
                .signal_and_wait("TERM");
        }
    }
}
