//! Property test over `collector.toml`: any values under the known keys give a configuration
//! or a list of problems, never a panic.
//! `PROPTEST_CASES=50000 cargo test -p vedette-collector --test props` runs longer.

#![allow(clippy::unwrap_used)] // test code

use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// A collector configuration of config-shaped text is a value or a list of problems.
    #[test]
    fn any_collector_config_is_checked_without_panic(
        keys in proptest::collection::vec(
            ("(listen|retention|token_ttl|shutdown_grace|database)", "[^\"\\n]{0,30}"), 0..5),
        limits in proptest::collection::vec(
            ("(max_connections|agent_detections_per_second|agent_detections_burst|agent_messages_per_second|unauthenticated_timeout|agent_cert_lifetime)", "[0-9a-z]{0,12}"), 0..4),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for (k, v) in &keys {
            text.push_str(&format!("{k} = \"{v}\"\n"));
        }
        text.push_str("[tls]\nca_cert = \"a\"\nca_key = \"b\"\nserver_cert = \"c\"\nserver_key = \"d\"\n[limits]\n");
        for (k, v) in &limits {
            match v.parse::<u64>() {
                Ok(n) => text.push_str(&format!("{k} = {n}\n")),
                Err(_) => text.push_str(&format!("{k} = \"{v}\"\n")),
            }
        }
        let path = tmp.path().join("collector.toml");
        std::fs::write(&path, &text).unwrap();
        let _ = vedette_collector::config::Config::load(&path);
    }
}
