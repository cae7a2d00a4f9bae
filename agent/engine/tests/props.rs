//! Property tests over every parser that takes outside input: whatever the bytes, each one
//! returns a value or an error, never panics.
//!
//! 2,000 cases per property in the test run; a longer run:
//! `PROPTEST_CASES=200000 cargo test --release -p vedette-engine --test props`.

use std::path::Path;

use proptest::prelude::*;
use serde_json::Value;
use vedette_engine::intel::{Intel, IntelLine};
use vedette_engine::{IocKind, Iocs, Origin, bundle, import, stix};

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(2_000);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Text built from the pieces STIX patterns are made of, so that generated cases get past the
/// lexer and exercise the parser.
fn pattern_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("[".to_string()),
        Just("]".to_string()),
        Just("(".to_string()),
        Just(")".to_string()),
        Just(" AND ".to_string()),
        Just(" OR ".to_string()),
        Just(" NOT ".to_string()),
        Just(" FOLLOWEDBY ".to_string()),
        Just(" WITHIN 5 SECONDS".to_string()),
        Just("file:name".to_string()),
        Just("file:hashes.'SHA-256'".to_string()),
        Just("file:hashes.MD5".to_string()),
        Just("ipv4-addr:value".to_string()),
        Just("process:command_line".to_string()),
        Just("domain-name:value".to_string()),
        Just(" = ".to_string()),
        Just(" != ".to_string()),
        Just(" MATCHES ".to_string()),
        Just(" LIKE ".to_string()),
        Just(" IN ".to_string()),
        Just(" ISSUBSET ".to_string()),
        Just(",".to_string()),
        Just("'10.0.0.0/8'".to_string()),
        Just("'d41d8cd98f00b204e9800998ecf8427e'".to_string()),
        Just("'a\\'b'".to_string()),
        Just("'(unclosed'".to_string()),
        Just("t'2026-01-01T00:00:00Z'".to_string()),
        "[a-z:.'\\[\\]()=!<> ]{0,6}",
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

/// Arbitrary JSON, a few levels deep, with the keys MISP and STIX documents use.
fn json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("type"),
        Just("id"),
        Just("objects"),
        Just("pattern"),
        Just("pattern_type"),
        Just("valid_until"),
        Just("revoked"),
        Just("kill_chain_phases"),
        Just("phase_name"),
        Just("kill_chain_name"),
        Just("Event"),
        Just("Attribute"),
        Just("Object"),
        Just("uuid"),
        Just("value"),
        Just("to_ids"),
        Just("Tag"),
        Just("name"),
        Just("source_ref"),
        Just("target_ref"),
        Just("relationship_type"),
        Just("external_references"),
        Just("external_id"),
        Just("source_name"),
        Just("deleted"),
        Just("response"),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop_oneof![
            Just("indicator--1".to_string()),
            Just("stix".to_string()),
            Just("yara".to_string()),
            Just("bundle".to_string()),
            Just("indicator".to_string()),
            Just("mitre-attack".to_string()),
            Just("T1059.001".to_string()),
            Just("sha256".to_string()),
            Just("filename|md5".to_string()),
            Just("ip-dst".to_string()),
            Just("[file:name = 'x']".to_string()),
            Just("2026-01-01T00:00:00Z".to_string()),
            ".{0,12}",
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::vec((key.clone(), inner), 0..6).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn stix_patterns_never_panic(text in pattern_like()) {
        let _ = stix::parse(&text);
    }

    #[test]
    fn stix_patterns_from_any_text_never_panic(text in ".{0,200}") {
        let _ = stix::parse(&text);
    }

    #[test]
    fn stix_and_misp_documents_never_panic(doc in json()) {
        let _ = import::document(&doc, "origin", 1_800_000_000_000);
        let _ = import::feed_events(&doc);
    }

    #[test]
    fn timestamps_never_panic(text in "[0-9T:.Zz+-]{0,30}") {
        let _ = import::rfc3339_ms(&text);
    }

    #[test]
    fn intel_lines_never_panic(text in ".{0,300}", pattern in pattern_like()) {
        let mut problems = Vec::new();
        let mut intel = Intel::default();
        intel.add_file(Path::new("x.jsonl"), &text, &mut problems);
        let line = serde_json::json!({"source": "stix", "id": "indicator--p",
            "pattern_type": "stix", "pattern": pattern}).to_string();
        intel.add_file(Path::new("x.jsonl"), &line, &mut problems);
        let _ = IntelLine::parse(&text);
    }

    #[test]
    fn ioc_lines_never_panic(text in ".{0,300}") {
        for kind in [IocKind::Hash, IocKind::Filename, IocKind::C2, IocKind::ProcessName, IocKind::Cmdline] {
            let mut iocs = Iocs::default();
            let mut problems = Vec::new();
            iocs.add_file(kind, Path::new("t.txt"), Origin::Local, &text, &mut problems);
            iocs.finish();
        }
    }

    #[test]
    fn bundle_decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = bundle::decode(&bytes);
    }
}
