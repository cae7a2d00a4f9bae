//! `domain-lookup`: what one domain lookup costs with few listed domains and with many. The
//! same query names are looked up in an index of `--small` listed domains and in one of
//! `--large` (Loki C2 lists, through the agent's own loader), and the memory the large index
//! takes is read from `/proc/self/status`.
//!
//! ```text
//! domain-lookup [--small 10] [--large 1000000] [--queries 1000000]
//! ```
//!
//! Every tenth query is a subdomain of a listed domain; the others are listed nowhere.

use std::time::Instant;

use vedette_engine::domains::{DomainIndex, Reach};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: `{v}` is not a number"))
        })
        .unwrap_or(default)
}

/// The `i`th listed domain.
fn listed(i: usize) -> String {
    format!("c2-{i:07}.threat{}.example", i % 97)
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn build(n: usize) -> DomainIndex<usize> {
    let mut index = DomainIndex::default();
    for i in 0..n {
        index.insert(&listed(i), Reach::AndSubdomains, i);
    }
    index
}

/// Nanoseconds per lookup of `queries`, and how many found something.
fn time(index: &DomainIndex<usize>, queries: &[String]) -> (f64, usize) {
    let started = Instant::now();
    let mut found = 0;
    for q in queries {
        found += usize::from(!index.lookup(q).is_empty());
    }
    (
        started.elapsed().as_nanos() as f64 / queries.len().max(1) as f64,
        found,
    )
}

fn main() {
    let small = arg("--small", 10);
    let large = arg("--large", 1_000_000);
    let count = arg("--queries", 1_000_000);
    // Names as resolvers see them: three to five labels, one in ten under a listed domain
    // present in both indexes.
    let queries: Vec<String> = (0..count)
        .map(|i| match i % 10 {
            0 => format!("www.{}", listed(i % small.max(1))),
            k => format!("host{i}.svc{k}.cdn{}.example.net", i % 13),
        })
        .collect();
    let small_index = build(small);
    let before = rss_kib();
    let large_index = build(large);
    let grown = rss_kib().saturating_sub(before);
    // Warm both, then time each twice and keep the faster run.
    let _ = time(&small_index, &queries);
    let _ = time(&large_index, &queries);
    let best = |index: &DomainIndex<usize>| {
        let (a, found) = time(index, &queries);
        let (b, _) = time(index, &queries);
        (a.min(b), found)
    };
    let (small_ns, small_found) = best(&small_index);
    let (large_ns, large_found) = best(&large_index);
    println!("| listed domains | queries | found | ns per lookup |");
    println!("|---|---|---|---|");
    println!("| {small} | {count} | {small_found} | {small_ns:.0} |");
    println!("| {large} | {count} | {large_found} | {large_ns:.0} |");
    println!();
    println!(
        "{large} listed domains: {:.2}x the cost per lookup of {small}; the index took {:.1} MiB",
        large_ns / small_ns.max(f64::MIN_POSITIVE),
        grown as f64 / 1024.0
    );
    assert_eq!(
        small_found, large_found,
        "the same names are listed in both"
    );
}
