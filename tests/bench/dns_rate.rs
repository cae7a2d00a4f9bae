//! Benchmark: what watching DNS costs the agent. In a network namespace of its own (root), a
//! real collector and agent run; a sender makes `--rate` queries a second for `--seconds` to
//! 127.0.0.1:53 (a socket there reads and discards them), every name unlisted but one, asked
//! once half-way. The agent's CPU time (`utime + stime`) over the run, its resident memory,
//! the packets it saw and the kernel dropped, and its `dns` detections are reported; so is the
//! CPU time of `tcpdump` capturing the same traffic with the same filter into `/dev/null`,
//! side by side (when it is installed), as a floor: a capture that does nothing with what it
//! reads. `--indicators N` lists N domains (all but one never asked) in the Loki C2 list.
//!
//! ```text
//! cargo build --release --bins
//! target/release/dns-rate --rate 10000 --seconds 10 --indicators 1
//! target/release/dns-rate --rate 10000 --seconds 10 --indicators 1000000
//! ```

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vedette_tests::{Agent, Collector, Netns, bench_arg as arg, cpu_ticks, rss_of, wait_for};

const LISTED: &str = "listed.dns-bench.example";

/// A DNS query for `name` (type A), with id `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Sends `rate` queries a second for `seconds` from one socket, in steps of 10 ms; the
/// listed name once, half-way. Returns how many were sent.
fn send(rate: usize, seconds: usize) -> u64 {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("sender socket");
    let per_step = (rate / 100).max(1);
    let steps = seconds * 100;
    let start = Instant::now();
    let mut sent = 0u64;
    for step in 0..steps {
        for i in 0..per_step {
            let n = step * per_step + i;
            let name = if step == steps / 2 && i == 0 {
                LISTED.to_string()
            } else {
                format!("q{n}.host{}.unlisted.example", n % 997)
            };
            if sock
                .send_to(&query(n as u16, &name), "127.0.0.1:53")
                .is_ok()
            {
                sent += 1;
            }
        }
        let due = start + Duration::from_millis(10 * (step as u64 + 1));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    sent
}

fn main() {
    let rate = arg("--rate", 10_000);
    let seconds = arg("--seconds", 10);
    let indicators = arg("--indicators", 1).max(1);
    let ns = Netns::new().unwrap_or_else(|e| panic!("dns-rate needs root: {e}"));
    ns.enter().expect("into the benchmark's network namespace");
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let rules = tmp.path().join("rules");
    std::fs::create_dir_all(&rules).expect("rules dir");
    let mut list = format!("{LISTED};the one asked\n");
    for i in 1..indicators {
        list.push_str(&format!("d{i}.never-asked.example;bench\n"));
    }
    std::fs::write(rules.join("c2-iocs.txt"), list).expect("C2 list");
    let watch = tmp.path().join("watch");
    std::fs::create_dir_all(&watch).expect("watch dir");
    let config = tmp.path().join("agent.toml");
    vedette_tests::watch_config(&config, &watch, &rules, "");
    let mut agent = Agent::enroll(&c, &tmp.path().join("agent"));
    agent.run(&c, &["--config", config.to_str().expect("utf-8 path")]);
    wait_for(Duration::from_secs(600), "the agent watching DNS", || {
        agent
            .log()
            .contains("DNS seen on every interface")
            .then_some(())
    });
    // A resolver that reads and says nothing: no port-unreachable replies.
    let sink = UdpSocket::bind("127.0.0.1:53").expect("127.0.0.1:53 in the namespace");
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while sink.recv(&mut buf).is_ok() {}
    });
    let tcpdump = Command::new("tcpdump")
        .args([
            "-i",
            "any",
            "-n",
            "-q",
            "-w",
            "/dev/null",
            "udp",
            "port",
            "53",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .ok()
        .map(|mut p| {
            // It says "listening on any" once its capture is open.
            use std::io::BufRead;
            let err = p.stderr.take().expect("stderr");
            let mut lines = std::io::BufReader::new(err).lines();
            let _ = lines.find(|l| l.as_ref().map_or(true, |l| l.contains("listening")));
            p
        });
    let pid = agent.proc.as_ref().expect("agent running").child.id();
    let rss_before = rss_of(pid);
    let (agent_start, peer_start) = (cpu_ticks(pid), tcpdump.as_ref().map(|p| cpu_ticks(p.id())));
    let sent = send(rate, seconds);
    let agent_ticks = cpu_ticks(pid) - agent_start;
    let peer_ticks = tcpdump
        .as_ref()
        .zip(peer_start)
        .map(|(p, t)| cpu_ticks(p.id()) - t);
    let rss_after = rss_of(pid);
    if let Some(mut p) = tcpdump {
        let _ = p.kill();
        let _ = p.wait();
    }
    // The heartbeat's counters once it counted every packet, and the one detection.
    let row = wait_for(Duration::from_secs(60), "every packet counted", || {
        let row = agent.info(&c)?;
        (row["counters"]["dns_packets"].as_u64()?
            + row["counters"]["dns_packets_dropped"].as_u64()?
            >= sent)
            .then_some(row)
    });
    let found = wait_for(Duration::from_secs(60), "the dns detection", || {
        let d: Vec<_> = c
            .detections()
            .into_iter()
            .filter(|d| d["kind"] == "dns")
            .collect();
        (!d.is_empty()).then_some(d)
    });
    let share = |ticks: u64| ticks as f64 / (seconds as f64 * 100.0) * 100.0;
    println!(
        "| listed domains | queries/s | seconds | sent | seen | dropped | dns detections | agent CPU % of a core | tcpdump CPU % | agent RSS MiB (before → after) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {indicators} | {rate} | {seconds} | {sent} | {} | {} | {} | {:.2} | {} | {:.1} → {:.1} |",
        row["counters"]["dns_packets"],
        row["counters"]["dns_packets_dropped"],
        found.len(),
        share(agent_ticks),
        peer_ticks.map_or("not installed".to_string(), |t| format!("{:.2}", share(t))),
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0,
    );
}
