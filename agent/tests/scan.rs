//! `vedette-agent scan` end to end: every indicator kind against real files, real processes and
//! real loopback connections; special files; the result cache; the real signature-base content.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // test code

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use md5::Md5;
use serde_json::Value;
use sha1::Sha1;
use sha2::{Digest, Sha256};

const AGENT: &str = env!("CARGO_BIN_EXE_vedette-agent");

/// The user cache directory the scans of these tests keep compiled rules in (not the home of
/// whoever runs them).
fn cache_home() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
        .path()
}

/// Runs `vedette-agent scan ARGS`, killing it if it runs past `limit`.
fn scan(args: &[&str], limit: Duration) -> Output {
    scan_with(args, limit, cache_home())
}

/// Runs `vedette-agent scan ARGS` with `XDG_CACHE_HOME` at `cache`.
fn scan_with(args: &[&str], limit: Duration, cache: &Path) -> Output {
    let mut child = Command::new(AGENT)
        .arg("scan")
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vedette-agent scan");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("scan {args:?} did not finish within {limit:?}: {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn json(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn every_file_indicator_kind_is_detected_and_exit_codes_follow_grep() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("rules");
    let tree = tmp.path().join("tree");
    let (md5_data, sha1_data, sha256_data) = (
        b"md5 sample".as_slice(),
        b"sha1 sample".as_slice(),
        b"sha256 sample".as_slice(),
    );
    write(&tree.join("a/md5.bin"), md5_data);
    write(&tree.join("a/sha1.bin"), sha1_data);
    write(&tree.join("a/sha256.bin"), sha256_data);
    write(
        &tree.join("b/yara.txt"),
        b"header VEDETTE-SCAN-TEST-YARA trailer",
    );
    write(&tree.join("c/implant.elf"), b"x");
    write(&tree.join("tools/vendor/implant.elf"), b"x");
    write(&tree.join("c/clean.txt"), b"nothing");
    write(
        &rules.join("hash-iocs.txt"),
        format!(
            "# hashes\n{};md5 sample\n{};sha1 sample\n{};sha256 sample\n",
            hex::encode(Md5::digest(md5_data)),
            hex::encode(Sha1::digest(sha1_data)),
            hex::encode(Sha256::digest(sha256_data))
        )
        .as_bytes(),
    );
    write(
        &rules.join("filename-iocs.txt"),
        b"# names\n/implant\\.elf$;75;/vendor/\n",
    );
    write(
        &rules.join("test.yar"),
        b"rule scan_test { meta: score = 60 strings: $a = \"VEDETTE-SCAN-TEST-YARA\" condition: $a }",
    );
    let out = scan(
        &["--json", "--rules", s(&rules), s(&tree)],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let found = json(&out);
    let by_path = |suffix: &str| -> Vec<&Value> {
        found
            .iter()
            .filter(|d| d["path"].as_str().unwrap_or("").ends_with(suffix))
            .collect()
    };
    let md5 = by_path("md5.bin");
    assert_eq!(md5.len(), 1, "{found:?}");
    assert_eq!(md5[0]["kind"], "hash");
    assert_eq!(md5[0]["md5"], hex::encode(Md5::digest(md5_data)));
    assert_eq!(
        by_path("sha1.bin")[0]["sha1"],
        hex::encode(Sha1::digest(sha1_data))
    );
    let sha256 = by_path("sha256.bin");
    assert_eq!(sha256[0]["rule"], hex::encode(Sha256::digest(sha256_data)));
    assert_eq!(sha256[0]["description"], "sha256 sample");
    let y = by_path("yara.txt");
    assert_eq!(
        (
            y[0]["kind"].as_str(),
            y[0]["rule"].as_str(),
            y[0]["score"].as_u64()
        ),
        (Some("yara"), Some("scan_test"), Some(60))
    );
    assert_eq!(y[0]["sha256"].as_str().map(str::len), Some(64));
    let names = by_path("implant.elf");
    assert_eq!(
        names.len(),
        1,
        "the false-positive regex excludes the vendor copy: {names:?}"
    );
    assert!(names[0]["path"].as_str().unwrap().contains("/c/"));
    assert_eq!(names[0]["score"], 75);
    assert!(by_path("clean.txt").is_empty());
    assert_eq!(found.len(), 5, "{found:?}");

    // Nothing matched: 0. A path that does not exist: 2.
    let clean = scan(
        &["--rules", s(&rules), s(&tree.join("c/clean.txt"))],
        Duration::from_secs(60),
    );
    assert_eq!(clean.status.code(), Some(0), "{}", stderr(&clean));
    let missing = scan(
        &["--rules", s(&rules), "/nonexistent/vedette"],
        Duration::from_secs(60),
    );
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn bad_indicator_lines_are_reported_and_strict_makes_them_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("rules");
    write(
        &rules.join("filename-iocs.txt"),
        b"ok\\.exe;50\n(unclosed;60\nno-score-here\n",
    );
    let out = scan(
        &["--rules", s(&rules), s(tmp.path())],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(0));
    let err = stderr(&out);
    assert!(
        err.contains("filename-iocs.txt:2: regex does not compile"),
        "{err}"
    );
    assert!(
        err.contains("filename-iocs.txt:3: no `;SCORE` field"),
        "{err}"
    );
    assert!(
        err.contains("1 file names") && err.contains("2 lines rejected"),
        "{err}"
    );
    let strict = scan(
        &["--strict", "--rules", s(&rules), s(tmp.path())],
        Duration::from_secs(60),
    );
    assert_eq!(strict.status.code(), Some(2));
}

#[test]
fn a_fifo_in_the_tree_does_not_hang_the_scan() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("rules");
    write(
        &rules.join("t.yar"),
        b"rule fifo_test { strings: $a = \"FIFO-NEIGHBOUR\" condition: $a }",
    );
    let tree = tmp.path().join("tree");
    write(&tree.join("x/neighbour.txt"), b"FIFO-NEIGHBOUR");
    let status = Command::new("mkfifo")
        .arg(tree.join("x/pipe"))
        .status()
        .unwrap();
    assert!(status.success());
    std::os::unix::net::UnixListener::bind(tree.join("x/sock")).unwrap();
    let out = scan(
        &["--json", "--rules", s(&rules), s(&tree)],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(json(&out).len(), 1);
    assert!(stderr(&out).contains("not_regular 2"), "{}", stderr(&out));
}

#[test]
fn unchanged_files_come_from_the_cache_and_rewritten_ones_are_rescanned() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("rules");
    write(
        &rules.join("t.yar"),
        b"rule cache_test { strings: $a = \"CACHE-MARKER\" condition: $a }",
    );
    let tree = tmp.path().join("tree");
    for i in 0..20 {
        write(
            &tree.join(format!("f{i}.txt")),
            format!("clean {i}").as_bytes(),
        );
    }
    // Too large to scan (judged by its name only), and skipped as such on every run.
    write(&tree.join("big.bin"), &[b'x'; 4096]);
    let cache = tmp.path().join("cache.bin");
    let args = [
        "--json",
        "--max-file-size",
        "1024",
        "--cache",
        s(&cache),
        "--rules",
        s(&rules),
        s(&tree),
    ];
    wait_settled(&tree);
    let first = scan(&args, Duration::from_secs(60));
    assert_eq!(first.status.code(), Some(0));
    assert!(
        stderr(&first).contains("scanned 20 files (0 unchanged, from cache)"),
        "{}",
        stderr(&first)
    );
    // The compiled rules are kept beside the cache, private; the runs below load them from
    // there and still detect.
    let compiled = tmp.path().join("cache.bin.rules");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&compiled).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        stderr(&first).contains("loaded 1 YARA rules"),
        "{}",
        stderr(&first)
    );
    let second = scan(&args, Duration::from_secs(60));
    assert!(
        stderr(&second).contains("scanned 20 files (20 unchanged, from cache)"),
        "{}",
        stderr(&second)
    );
    // Nothing to scan: the rules are not even loaded.
    assert!(
        stderr(&second).contains("rules not loaded") && !stderr(&second).contains("loaded 1 YARA"),
        "{}",
        stderr(&second)
    );
    assert!(
        stderr(&second).contains("too_large 1"),
        "{}",
        stderr(&second)
    );
    // Rewrite one file after a clean scan: it is scanned again and detected.
    write(&tree.join("f7.txt"), b"now with CACHE-MARKER inside");
    wait_settled(&tree);
    let third = scan(&args, Duration::from_secs(60));
    assert_eq!(third.status.code(), Some(1));
    assert!(
        stderr(&third).contains("scanned 20 files (19 unchanged, from cache)"),
        "{}",
        stderr(&third)
    );
    // One file to scan: the rules are loaded for it.
    assert!(
        stderr(&third).contains("loaded 1 YARA rules"),
        "{}",
        stderr(&third)
    );
    let found = json(&third);
    assert_eq!(found.len(), 1);
    assert!(found[0]["path"].as_str().unwrap().ends_with("f7.txt"));
    // Still reported from the cache on the next run (a scan reports what is there).
    let fourth = scan(&args, Duration::from_secs(60));
    assert_eq!(fourth.status.code(), Some(1));
    assert!(stderr(&fourth).contains("(20 unchanged, from cache)"));
    assert_eq!(json(&fourth).len(), 1);
    assert!(stderr(&fourth).contains("rules not loaded"));
    // Changed rules are other rules: every cached result is stale, and they load.
    write(
        &rules.join("t.yar"),
        b"rule cache_test2 { strings: $a = \"CACHE-MARKER\" condition: $a }",
    );
    let fifth = scan(&args, Duration::from_secs(60));
    assert!(
        stderr(&fifth).contains("(0 unchanged, from cache)"),
        "{}",
        stderr(&fifth)
    );
    assert_eq!(json(&fifth)[0]["rule"], "cache_test2");
}

/// Waits until no file in `dir` changed within the last 150 ms: the result cache keeps no
/// answer for a file that changed just before its scan (it might change again within the same
/// timestamp tick), see `RACY_NS` in the agent's `detect/cache.rs`.
#[test]
fn compiled_rules_are_kept_for_the_user_privately_unless_told_not_to() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    write(
        &rules.join("r.yar"),
        b"rule kept_marker { strings: $m = \"KEPT-MARKER\" condition: $m }",
    );
    let file = tmp.path().join("f.txt");
    write(&file, b"xx KEPT-MARKER xx");
    let home = tmp.path().join("xdg");
    let args = ["--rules", s(&rules), s(&file)];
    let first = scan_with(&args, Duration::from_secs(60), &home);
    assert_eq!(first.status.code(), Some(1), "{}", stderr(&first));
    let dir = home.join("vedette");
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode(&dir), 0o700);
    let kept: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].to_string_lossy().ends_with(".rules"), "{kept:?}");
    assert_eq!(mode(&kept[0]), 0o600);
    // A scan with `home` as cache directory, logging at `level`: its exit code and log.
    let logged = |level: &str| {
        let out = Command::new(AGENT)
            .args(["scan", "--rules", s(&rules), s(&file)])
            .env("XDG_CACHE_HOME", &home)
            .env("VEDETTE_LOG", level)
            .env("VEDETTE_LOG_FORMAT", "text")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The next run loads them from there (and still detects).
    let (code, log) = logged("debug");
    assert_eq!(code, Some(1));
    assert!(log.contains("compiled rules loaded from cache"), "{log}");
    // A file someone else could have written is not loaded: compiled again from source.
    std::fs::set_permissions(
        &kept[0],
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let (code, log) = logged("info");
    assert_eq!(code, Some(1));
    assert!(log.contains("not trusted"), "{log}");
    // --no-compiled-cache keeps nothing.
    let elsewhere = tmp.path().join("xdg2");
    let out = scan_with(
        &["--no-compiled-cache", "--rules", s(&rules), s(&file)],
        Duration::from_secs(60),
        &elsewhere,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(!elsewhere.exists());
}

/// While the YARA rules compile on one core, the other hashes the files the scan will meet;
/// the scan takes those digests for files unchanged since, and every hash indicator is still
/// found with the right digests.
#[test]
fn files_hashed_while_the_rules_compile_are_judged_by_their_digests() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("rules");
    let tree = tmp.path().join("tree");
    // Enough rules that compiling them takes a while; compiled afresh each run.
    let mut yara = String::new();
    for i in 0..3000 {
        yara.push_str(&format!(
            "rule r{i} {{ strings: $a = \"vedette-ahead-{i:05}\" $b = /ahead-{i}-[0-9a-f]{{8}}x/ condition: $a or $b }}\n"
        ));
    }
    write(&rules.join("many.yar"), yara.as_bytes());
    let mut listed = String::new();
    let mut files = Vec::new();
    for i in 0..40u8 {
        // Larger than the size below which files are not hashed ahead.
        let data = vec![i; 64 * 1024 + usize::from(i)];
        let name = format!("f{i:02}.bin");
        write(&tree.join(&name), &data);
        // Each kind of digest.
        let digest = match i % 3 {
            0 => hex::encode(Md5::digest(&data)),
            1 => hex::encode(Sha1::digest(&data)),
            _ => hex::encode(Sha256::digest(&data)),
        };
        listed.push_str(&format!("{digest};sample {i}\n"));
        files.push((name, data));
    }
    write(&rules.join("hash-iocs.txt"), listed.as_bytes());
    // Files changed in the last two seconds are left to the scan: wait until these are older.
    let written = std::time::SystemTime::now();
    while written.elapsed().unwrap_or_default() < Duration::from_millis(2100) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = scan(
        &[
            "--json",
            "--no-compiled-cache",
            "-p",
            "2",
            "--rules",
            s(&rules),
            s(&tree),
        ],
        Duration::from_secs(120),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let ahead: u64 = err
        .split(" files hashed while the rules loaded")
        .next()
        .and_then(|head| head.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no file hashed while the rules compiled: {err}"));
    assert!((1..=40).contains(&ahead), "{err}");
    let found = json(&out);
    assert_eq!(found.len(), 40, "{err}\n{found:?}");
    for (i, (name, data)) in files.iter().enumerate() {
        let d: Vec<&Value> = found
            .iter()
            .filter(|d| d["path"].as_str().unwrap_or("").ends_with(name.as_str()))
            .collect();
        assert_eq!(d.len(), 1, "{name}: {found:?}");
        assert_eq!(d[0]["kind"], "hash", "{name}");
        assert_eq!(d[0]["md5"], hex::encode(Md5::digest(data)), "{name}");
        assert_eq!(d[0]["sha1"], hex::encode(Sha1::digest(data)), "{name}");
        assert_eq!(d[0]["sha256"], hex::encode(Sha256::digest(data)), "{name}");
        let rule = d[0]["rule"].as_str().unwrap_or("");
        assert_eq!(rule.len(), [32, 40, 64][i % 3], "{name}: {rule}");
    }
}

fn wait_settled(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let newest = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let m = e.unwrap().metadata().unwrap();
                Duration::new(m.ctime() as u64, m.ctime_nsec() as u32)
            })
            .max()
            .unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        if now.saturating_sub(newest) > Duration::from_millis(150) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "files in {} keep changing",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A process started from a copy of `sleep` under a telling name, matched by name, command line
/// and executable hash; and a process connected to a loopback address listed as C2.
#[test]
fn processes_and_c2_connections_are_reported_with_their_pid() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("rules");
    let exe = tmp.path().join("vedette-evilproc");
    std::fs::copy("/bin/sleep", &exe).unwrap();
    let exe_hash = hex::encode(Sha256::digest(std::fs::read(&exe).unwrap()));
    let mut evil = Command::new(&exe).arg("313.37").spawn().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut client = Command::new("python3")
        .args(["-c", &format!("import socket,time\ns=socket.create_connection(('127.0.0.2',{port}))\ntime.sleep(60)")])
        .spawn()
        .unwrap();
    // The connection is established once accepted: no guessing.
    let (_conn, _) = listener.accept().unwrap();
    write(&rules.join("process-iocs.txt"), b"^vedette-evilpro;90\n");
    write(
        &rules.join("cmdline-iocs.txt"),
        b"vedette-evilproc 313\\.37;85\n",
    );
    write(
        &rules.join("hash-iocs.txt"),
        format!("{exe_hash};sleep copy\n").as_bytes(),
    );
    write(&rules.join("c2-iocs.txt"), b"127.0.0.2\n");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = scan(
        &["--json", "--processes", "--rules", s(&rules), s(&empty)],
        Duration::from_secs(120),
    );
    let _ = evil.kill();
    let _ = client.kill();
    let _ = (evil.wait(), client.wait());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let found = json(&out);
    let of_pid = |pid: u32, kind: &str| -> Vec<Value> {
        found
            .iter()
            .filter(|d| d["pid"] == pid && d["kind"] == kind)
            .cloned()
            .collect()
    };
    let evil_hits = of_pid(evil.id(), "process");
    let rules_hit: Vec<&str> = evil_hits
        .iter()
        .filter_map(|d| d["rule"].as_str())
        .collect();
    assert!(rules_hit.contains(&"^vedette-evilpro"), "{found:?}");
    assert!(
        rules_hit.contains(&"vedette-evilproc 313\\.37"),
        "{found:?}"
    );
    assert_eq!(evil_hits[0]["path"], s(&exe));
    let hash_hit = of_pid(evil.id(), "hash");
    assert_eq!(hash_hit.len(), 1, "{found:?}");
    assert_eq!(hash_hit[0]["rule"], exe_hash);
    let c2 = of_pid(client.id(), "connection");
    assert_eq!(c2.len(), 1, "{found:?}");
    assert_eq!(c2[0]["remote"], format!("127.0.0.2:{port}"));
    assert_eq!(c2[0]["rule"], "127.0.0.2");
}

/// The detections of `found` on process `pid` by `rule`.
fn of_pid_rule(found: &[Value], pid: u32, rule: &str) -> Vec<Value> {
    found
        .iter()
        .filter(|d| d["pid"] == pid && d["rule"] == rule)
        .cloned()
        .collect()
}

/// Waits until `/proc/PID/exe` of `pid` satisfies `ok`.
fn wait_exe(pid: u32, ok: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let link = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if ok(&link.to_string_lossy()) {
            return;
        }
        assert!(Instant::now() < deadline, "pid {pid} runs {link:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A binary deleted while it runs and one run from a memfd are reported as fileless; a running
/// binary whose file on disk was replaced by a harmless one is still judged by what it runs.
#[test]
fn fileless_and_replaced_executables_are_judged_by_what_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let gone = tmp.path().join("vedette-gone");
    std::fs::copy("/bin/sleep", &gone).unwrap();
    let mut deleted = Command::new(&gone).arg("313.41").spawn().unwrap();
    std::fs::remove_file(&gone).unwrap();

    let mut memfd = Command::new("python3")
        .args([
            "-c",
            "import os\nfd = os.memfd_create('vedette-mem', 0)\n\
             os.write(fd, open('/bin/sleep', 'rb').read())\n\
             os.execv('/proc/self/fd/%d' % fd, ['sleep', '313.42'])",
        ])
        .spawn()
        .unwrap();
    wait_exe(memfd.id(), |l| l.starts_with("/memfd:vedette-mem"));

    // A marked copy of sleep (bytes after the ELF image change its hash, not how it runs).
    let swapped = tmp.path().join("vedette-swapped");
    let mut image = std::fs::read("/bin/sleep").unwrap();
    image.extend_from_slice(b"VEDETTE-SWAPPED");
    write(&swapped, &image);
    std::fs::set_permissions(
        &swapped,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let hash = hex::encode(Sha256::digest(&image));
    let mut replaced = Command::new(&swapped).arg("313.43").spawn().unwrap();
    let harmless = tmp.path().join("harmless");
    write(&harmless, b"#!/bin/sh\nexit 0\n");
    std::fs::rename(&harmless, &swapped).unwrap();

    let rules = tmp.path().join("rules");
    write(
        &rules.join("hash-iocs.txt"),
        format!("{hash};marked sleep\n").as_bytes(),
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = scan(
        &["--json", "--processes", "--rules", s(&rules), s(&empty)],
        Duration::from_secs(120),
    );
    for c in [&mut deleted, &mut memfd, &mut replaced] {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let found = json(&out);
    let of_pid = |pid: u32, rule: &str| of_pid_rule(&found, pid, rule);
    let d = of_pid(deleted.id(), "vedette.fileless_exec");
    assert_eq!(d.len(), 1, "{found:?}");
    assert_eq!(d[0]["kind"], "process");
    assert_eq!(d[0]["path"], format!("{} (deleted)", gone.display()));
    let m = of_pid(memfd.id(), "vedette.fileless_exec");
    assert_eq!(m.len(), 1, "{found:?}");
    let path = m[0]["path"].as_str().unwrap();
    assert!(path.starts_with("/memfd:vedette-mem"), "{path}");
    let r = of_pid(replaced.id(), &hash);
    assert_eq!(r.len(), 1, "{found:?}");
    assert_eq!(r[0]["kind"], "hash");
    // Renaming over it unlinked the image that runs: that too is a deleted executable.
    assert_eq!(of_pid(replaced.id(), "vedette.fileless_exec").len(), 1);
}

/// Runs `src` (plus `extra` bytes) from a sealed memfd as `argv0`.
fn run_sealed(src: &Path, argv0: &str, extra: &str) -> std::process::Child {
    let child = Command::new("python3")
        .args([
            "-c",
            "import fcntl, os, sys\nsrc, argv0, extra = sys.argv[1:4]\n\
             data = open(src, 'rb').read() + extra.encode()\n\
             fd = os.memfd_create('vedette-sealed', os.MFD_ALLOW_SEALING)\n\
             view = memoryview(data)\nwhile view:\n    view = view[os.write(fd, view):]\n\
             fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK \
             | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)\n\
             os.execv('/proc/self/fd/%d' % fd, [argv0, '313.5'])",
            s(src),
            argv0,
            extra,
        ])
        .spawn()
        .unwrap();
    wait_exe(child.id(), |l| l.starts_with("/memfd:vedette-sealed"));
    child
}

/// A sealed memfd that is byte for byte an executable on disk (as runc re-executes itself) is
/// not fileless: no finding for it, but its content is still judged, so a copy of a listed
/// executable is reported by its indicator. A sealed image that is no file on disk is fileless.
#[test]
fn a_sealed_memfd_copy_of_an_executable_on_disk_is_judged_by_its_content() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = run_sealed(Path::new("/bin/sleep"), "sleep", "");
    let altered = run_sealed(Path::new("/bin/sleep"), "sleep", "VEDETTE-ALTERED");
    let listed = tmp.path().join("vedette-listed");
    let mut image = std::fs::read("/bin/sleep").unwrap();
    image.extend_from_slice(b"VEDETTE-LISTED");
    write(&listed, &image);
    std::fs::set_permissions(&listed, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let hash = hex::encode(Sha256::digest(&image));
    let copy_of_listed = run_sealed(&listed, s(&listed), "");

    let rules = tmp.path().join("rules");
    write(
        &rules.join("hash-iocs.txt"),
        format!("{hash};listed sleep\n").as_bytes(),
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = scan(
        &["--json", "--processes", "--rules", s(&rules), s(&empty)],
        Duration::from_secs(120),
    );
    let pids: Vec<u32> = [&copy, &altered, &copy_of_listed]
        .iter()
        .map(|c| c.id())
        .collect();
    for mut c in [copy, altered, copy_of_listed] {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let found = json(&out);
    let of_pid = |pid: u32, rule: &str| of_pid_rule(&found, pid, rule);
    assert!(
        of_pid(pids[0], "vedette.fileless_exec").is_empty(),
        "{found:?}"
    );
    let m = of_pid(pids[1], "vedette.fileless_exec");
    assert_eq!(m.len(), 1, "{found:?}");
    assert!(
        m[0]["path"]
            .as_str()
            .unwrap()
            .starts_with("/memfd:vedette-sealed"),
        "{m:?}"
    );
    assert!(
        of_pid(pids[2], "vedette.fileless_exec").is_empty(),
        "{found:?}"
    );
    let h = of_pid(pids[2], &hash);
    assert_eq!(h.len(), 1, "{found:?}");
    assert_eq!(h[0]["kind"], "hash");
}

/// A marker that exists only in a process's heap (built at run time from pieces, so neither its
/// command line nor any file holds it) is found by `--processes --memory`, with the pid, and
/// not without `--memory`.
#[test]
fn a_marker_held_only_in_a_process_heap_is_found_by_the_memory_scan() {
    let tmp = tempfile::tempdir().unwrap();
    let ready = tmp.path().join("ready");
    let mut holder = Command::new("python3")
        .args([
            "-c",
            "import sys, time\nparts = ['VEDETTE', 'HEAP', 'ONLY', 'MARKER']\n\
             held = bytearray('-'.join(parts).encode() * 4)\n\
             open(sys.argv[1], 'w').close()\ntime.sleep(120)",
        ])
        .arg(&ready)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the holder never became ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    let rules = tmp.path().join("rules");
    // The rule holds the marker in two halves joined by a one-byte wildcard, so that the rule
    // text itself (in this test's memory and the scanner's) does not match.
    write(
        &rules.join("heap.yar"),
        b"rule heap_marker { meta: description = \"marker in memory\" strings: $m = { 56 45 44 45 54 54 45 2D 48 45 41 50 ?? 4F 4E 4C 59 2D 4D 41 52 4B 45 52 } condition: $m }",
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let run = |memory: bool| {
        let mut args = vec!["--json", "--processes"];
        if memory {
            args.push("--memory");
        }
        args.extend(["--rules", s(&rules), s(&empty)]);
        json(&scan(&args, Duration::from_secs(120)))
    };
    let without = run(false);
    let with = run(true);
    let _ = holder.kill();
    let _ = holder.wait();
    let of_holder = |found: &[Value]| -> Vec<Value> {
        found
            .iter()
            .filter(|d| d["pid"] == holder.id() && d["rule"] == "heap_marker")
            .cloned()
            .collect()
    };
    assert!(of_holder(&without).is_empty(), "{without:?}");
    let hits = of_holder(&with);
    assert_eq!(hits.len(), 1, "{with:?}");
    assert_eq!(hits[0]["kind"], "process");
    let desc = hits[0]["description"].as_str().unwrap();
    assert!(desc.contains("in memory region"), "{desc}");
}

fn signature_base() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/signature-base");
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!(
            "skipped: {} is absent (the shared signature-base data is not part of this repository)",
            p.display()
        );
        None
    }
}

#[test]
fn real_signature_base_rules_and_iocs_load() {
    let Some(sb) = signature_base() else { return };
    let tmp = tempfile::tempdir().unwrap();
    write(&tmp.path().join("clean.txt"), b"nothing here");
    let out = scan(
        &[
            "--rules",
            s(&sb.join("yara")),
            "--rules",
            s(&sb.join("iocs")),
            s(tmp.path()),
        ],
        Duration::from_secs(300),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("loaded "))
        .expect("load summary");
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    // loaded R YARA rules from F files (E with errors); H hashes, N names, C c2, D domains, ...
    assert!(numbers[0] > 5_800, "{line}");
    assert!(numbers[1] >= 737, "{line}");
    assert!(
        numbers[3] > 3_000 && numbers[4] > 3_000 && numbers[5] > 100,
        "{line}"
    );
    eprintln!("{line}");
}

#[test]
fn a_file_whose_name_is_not_utf8_is_scanned_and_reported() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("rules");
    write(
        &rules.join("t.yar"),
        b"rule odd_name { strings: $a = \"ODD-NAME-MARKER\" condition: $a }",
    );
    let tree = tmp.path().join("tree");
    let odd = tree.join(std::ffi::OsStr::from_bytes(b"caf\xe9-\xff.bin"));
    write(&odd, b"ODD-NAME-MARKER");
    let out = scan(
        &["--json", "--rules", s(&rules), s(&tree)],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let found = json(&out);
    assert_eq!(found.len(), 1);
    assert!(
        found[0]["path"]
            .as_str()
            .unwrap()
            .contains("caf\u{fffd}-\u{fffd}.bin"),
        "{found:?}"
    );
}

/// A file named with terminal escape sequences is shown with them escaped in text output, so
/// a user on a watched host cannot rewrite the screen of whoever reads the detections; JSON
/// keeps the exact name.
#[test]
fn escape_sequences_in_file_names_are_shown_escaped() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("rules");
    write(
        &rules.join("esc.yar"),
        b"rule esc_test { strings: $a = \"VEDETTE-ESC-TEST\" condition: $a }",
    );
    let name = "evil\u{1b}]0;pwned\u{7}\u{1b}[2J.txt";
    let tree = tmp.path().join("tree");
    write(&tree.join(name), b"VEDETTE-ESC-TEST");
    let out = scan(&["--rules", s(&rules), s(&tree)], Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("esc_test"), "{text}");
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "{text:?}"
    );
    assert!(
        text.contains("evil\\x1b]0;pwned\\x07\\x1b[2J.txt"),
        "{text}"
    );
    let out = scan(
        &["--json", "--rules", s(&rules), s(&tree)],
        Duration::from_secs(60),
    );
    let found = json(&out);
    assert!(
        found[0]["path"].as_str().unwrap().ends_with(name),
        "{found:?}"
    );
}
