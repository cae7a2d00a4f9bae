//! Property tests over what the agent reads from disk, which a crash, a full disk or a local
//! attacker may have damaged: spool segments and ack files, the scan cache, and the
//! configuration file. Each input gives a value or an error, never a panic; a spool keeps every whole record
//! in front of damage. `PROPTEST_CASES=50000 cargo test -p vedette-agent --test props` runs
//! longer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // test code

use proptest::prelude::*;
use vedette_agent::deliver::spool::Spool;
use vedette_proto::v1::Detection;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

/// Writes `n` detections into a fresh spool in `dir` and returns the first segment's path.
fn spool_with(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    let (spool, _) = Spool::open(dir, 64 * 1024 * 1024).unwrap();
    let batch: Vec<Detection> = (0..n)
        .map(|i| Detection {
            id: format!("d{i}"),
            rule: "r".repeat(i % 50),
            ..Default::default()
        })
        .collect();
    spool.append(&batch).unwrap();
    drop(spool);
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// A segment of any bytes: the spool opens, and reading it gives records or nothing.
    #[test]
    fn any_segment_bytes_open_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("00000000000000000001.seg"), &bytes).unwrap();
        if let Ok((spool, _)) = Spool::open(tmp.path(), 1 << 20) {
            let _ = spool.read(1, 100, 1 << 20);
        }
    }

    /// Whole records followed by damage (a torn write, flipped bytes): every record before the
    /// damage is kept, in order.
    #[test]
    fn whole_records_before_damage_survive(
        n in 1usize..20,
        cut in 0usize..400,
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let seg = spool_with(tmp.path(), n);
        let mut bytes = std::fs::read(&seg).unwrap();
        let keep = bytes.len().saturating_sub(cut);
        bytes.truncate(keep);
        bytes.extend_from_slice(&garbage);
        std::fs::write(&seg, &bytes).unwrap();
        let (spool, _) = Spool::open(tmp.path(), 64 * 1024 * 1024).unwrap();
        let got = spool.read(1, 1000, 64 * 1024 * 1024).unwrap();
        let ids: Vec<String> = got
            .map(|b| b.detections.into_iter().map(|d| d.id).collect())
            .unwrap_or_default();
        // A prefix of what was written, in order.
        for (i, id) in ids.iter().enumerate() {
            prop_assert_eq!(id, &format!("d{i}"));
        }
        if cut == 0 && garbage.is_empty() {
            prop_assert_eq!(ids.len(), n);
        }
    }

    /// An ack file of any bytes is read as some position or none.
    #[test]
    fn any_ack_file_opens_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let tmp = tempfile::tempdir().unwrap();
        spool_with(tmp.path(), 3);
        std::fs::write(tmp.path().join("ack"), &bytes).unwrap();
        let (spool, _) = Spool::open(tmp.path(), 64 * 1024 * 1024).unwrap();
        let _ = spool.read(1, 10, 1 << 20);
    }

    /// A scan cache of any bytes loads (empty when damaged).
    #[test]
    fn any_scan_cache_loads_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("scan-cache.bin");
        std::fs::write(&path, &bytes).unwrap();
        let _ = vedette_agent::detect::cache::ScanCache::load(&path);
    }

    /// An agent configuration of any text, and of config-shaped text, is a value or a list of
    /// problems.
    #[test]
    fn any_agent_config_is_checked_without_panic(
        text in "[a-z_]{1,20} = (\"[^\"\\n]{0,30}\"|[0-9]{1,12}|true|\\[\"[^\"\\n]{0,20}\"\\])(\\n[a-z_]{1,20} = \"[^\"\\n]{0,30}\"){0,4}",
        raw in "\\PC{0,200}",
    ) {
        for t in [text, raw] {
            if let Ok(c) = toml::from_str::<vedette_agent::config::RawConfig>(&t) {
                let _ = c.validate(None);
            }
        }
    }
}
