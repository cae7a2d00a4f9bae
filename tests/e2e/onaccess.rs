//! On-access events: fanotify on a tmpfs each test mounts itself (so a fault cannot stall the
//! host's own file systems), every exec of an indicator binary reported with its pid, and the
//! fallback to inotify without CAP_SYS_ADMIN. These tests need root (to mount and to use
//! fanotify); elsewhere they say so and skip, except under CI or with
//! `VEDETTE_TEST_ROOT=required` (`.ci/run` sets it), where they fail.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vedette_tests::{Agent, Collector, Tmpfs, rule_dir, wait_for};

const RULE: &str = "onaccess_marker";
const MARKER: &str = "VEDETTE-ONACCESS-MARKER";

struct Setup {
    c: Collector,
    agent: Agent,
    fs: Tmpfs,
    /// The watched directory on the tmpfs (the rest of it is not watched).
    watched: PathBuf,
    config: PathBuf,
    _tmp: tempfile::TempDir,
}

/// A collector, an enrolled agent, a tmpfs to watch and a config with the marker rule and a
/// hash list holding `hashes`; `extra` is appended to the config.
fn setup(hashes: &[String], extra: &str) -> Option<Setup> {
    let tmp = tempfile::tempdir().unwrap();
    let fs = match Tmpfs::mount(&tmp.path().join("fs")) {
        Ok(fs) => fs,
        Err(e) => {
            vedette_tests::missing_root(&e);
            return None;
        }
    };
    let watched = fs.path.join("watched");
    std::fs::create_dir(&watched).unwrap();
    let mut c = Collector::init(&tmp.path().join("collector"));
    c.start();
    let agent = Agent::enroll(&c, &tmp.path().join("agent"));
    let rules = rule_dir(&tmp.path().join("rules"), RULE, MARKER);
    let list: String = hashes
        .iter()
        .map(|h| format!("{h};test binary\n"))
        .collect();
    std::fs::write(rules.join("hash-iocs.txt"), list).unwrap();
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "watch = [{:?}]\nrules = [{:?}]\nheartbeat = \"1s\"\nscan_on_start = false\n\
             scan_interval = \"0s\"\nprocess_interval = \"1h\"\n{extra}\n",
            watched.to_str().unwrap(),
            rules.to_str().unwrap()
        ),
    )
    .unwrap();
    Some(Setup {
        c,
        agent,
        fs,
        watched,
        config,
        _tmp: tmp,
    })
}

impl Setup {
    fn run(&mut self, wrapper: &[&str]) {
        let config = self.config.to_str().unwrap().to_string();
        self.agent
            .start_wrapped(wrapper, &["--config", config.as_str()]);
        let (id, c) = (self.agent.id.clone(), &self.c);
        wait_for(Duration::from_secs(30), "the agent to connect", || {
            c.agents()
                .iter()
                .any(|a| a["id"] == id.as_str() && a["connected"] == true)
                .then_some(())
        });
    }

    fn log(&self) -> String {
        self.agent.log()
    }

    /// Writes `n` marker files and waits until each is stored once.
    fn write_and_detect(&self, n: usize) {
        for i in 0..n {
            std::fs::write(
                self.watched.join(format!("m{i:03}")),
                format!("{MARKER} {i}\n"),
            )
            .unwrap();
        }
        let stored = wait_for(
            Duration::from_secs(30),
            &format!("{n} marker files stored"),
            || {
                let d: Vec<Value> = self
                    .c
                    .detections()
                    .into_iter()
                    .filter(|d| d["rule"] == RULE)
                    .collect();
                (d.len() >= n).then_some(d)
            },
        );
        let names: BTreeSet<&str> = stored.iter().filter_map(|d| d["path"].as_str()).collect();
        assert_eq!(names.len(), n, "each file once: {stored:?}");
        assert_eq!(stored.len(), n, "each file once: {stored:?}");
    }
}

/// A copy of `/bin/true` with bytes after its image: it runs the same, with a hash of its own.
fn ioc_binary(dir: &Path) -> (PathBuf, String) {
    let path = dir.join("vedette-ioc-true");
    let mut image = std::fs::read("/bin/true").unwrap();
    image.extend_from_slice(b"VEDETTE-IOC-BINARY");
    std::fs::write(&path, &image).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = Command::new("sha256sum").arg(&path).output().unwrap();
    let hash = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    (path, hash)
}

#[test]
fn fanotify_sees_written_files_and_every_exec_of_an_indicator_binary_with_its_pid() {
    let tmp = tempfile::tempdir().unwrap();
    let (bin_src, hash) = ioc_binary(tmp.path());
    let Some(mut s) = setup(std::slice::from_ref(&hash), "event_source = \"fanotify\"") else {
        return;
    };
    s.run(&[]);
    assert!(s.log().contains("file events from fanotify"), "{}", s.log());
    s.write_and_detect(20);

    // Written outside the watched directory (not scanned), then moved in: detected.
    let outside = s.fs.path.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("moved"), format!("{MARKER} moved\n")).unwrap();
    std::fs::rename(outside.join("moved"), s.watched.join("moved")).unwrap();
    wait_for(
        Duration::from_secs(30),
        "the moved-in file's detection",
        || {
            s.c.detections()
                .into_iter()
                .find(|d| d["path"] == s.watched.join("moved").to_str().unwrap())
        },
    );

    // The binary lives on the marked file system; 1,000 short-lived runs.
    let exe = s.watched.join("vedette-ioc-true");
    std::fs::copy(&bin_src, &exe).unwrap();
    let mut pids = BTreeSet::new();
    for _ in 0..1000 {
        let mut child = Command::new(&exe).spawn().unwrap();
        pids.insert(child.id());
        assert!(child.wait().unwrap().success());
    }
    // Execs are reported on the process (with a pid); the copy written above, as a file.
    let (stored, files) = wait_for(Duration::from_secs(120), "1,000 exec detections", || {
        let (execs, files): (Vec<Value>, Vec<Value>) =
            s.c.detections()
                .into_iter()
                .filter(|d| d["rule"] == hash.as_str())
                .partition(|d| d["pid"].is_u64());
        (execs.len() >= 1000).then_some((execs, files))
    });
    assert_eq!(files.len(), 1, "{files:?}");
    let seen: BTreeSet<u32> = stored
        .iter()
        .filter_map(|d| d["pid"].as_u64().map(|p| p as u32))
        .collect();
    assert_eq!(stored.len(), 1000);
    assert_eq!(seen, pids, "every exec reported once, with its own pid");
    for d in &stored {
        assert_eq!(d["kind"], "hash", "{d}");
        assert_eq!(d["path"], exe.to_str().unwrap(), "{d}");
    }
}

#[test]
fn without_cap_sys_admin_the_agent_falls_back_to_inotify_and_says_so() {
    let Some(mut s) = setup(&[], "") else {
        return;
    };
    // Root without CAP_SYS_ADMIN: fanotify_init is refused.
    s.run(&[
        "setpriv",
        "--bounding-set",
        "-sys_admin",
        "--inh-caps",
        "-sys_admin",
        "--",
    ]);
    let log = s.log();
    assert!(log.contains("fanotify unavailable"), "{log}");
    assert!(log.contains("file events from inotify"), "{log}");
    s.write_and_detect(20);
}

#[test]
fn inotify_can_be_chosen() {
    let Some(mut s) = setup(&[], "event_source = \"inotify\"") else {
        return;
    };
    s.run(&[]);
    let log = s.log();
    assert!(log.contains("event_source = \"inotify\""), "{log}");
    assert!(!log.contains("fanotify"), "{log}");
    s.write_and_detect(20);
}

/// Runs `exe` from a shell that first prints its pid: (pid, status, stderr). An exec that is
/// refused leaves the shell running, so the pid is the one the agent saw asking.
fn exec_via_sh(exe: &Path) -> (u32, std::process::ExitStatus, String) {
    let out = Command::new("sh")
        .args(["-c", "echo $$; exec \"$0\""])
        .arg(exe)
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("the shell prints its pid");
    (
        pid,
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits until the agent's heartbeat counter `name` reaches `min`.
fn counter_reaches(s: &Setup, name: &str, min: u64) {
    wait_for(
        Duration::from_secs(30),
        &format!("counter {name} at {min} or more"),
        || {
            s.agent
                .info(&s.c)
                .and_then(|a| a["counters"][name].as_u64())
                .filter(|&n| n >= min)
        },
    );
}

#[test]
fn prevention_denies_every_exec_of_an_indicator_binary_and_lets_others_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (bin_src, hash) = ioc_binary(tmp.path());
    let extra = "event_source = \"fanotify\"\nprevent = true\nprevent_timeout = \"1s\"";
    let Some(mut s) = setup(std::slice::from_ref(&hash), extra) else {
        return;
    };
    s.run(&[]);
    assert!(s.log().contains("prevention on"), "{}", s.log());
    let exe = s.watched.join("vedette-ioc-true");
    std::fs::copy(&bin_src, &exe).unwrap();
    let benign = s.watched.join("benign-true");
    std::fs::copy("/bin/true", &benign).unwrap();

    let mut pids = BTreeSet::new();
    for i in 0..1000 {
        let (pid, status, stderr) = exec_via_sh(&exe);
        assert!(
            !status.success() && stderr.contains("Operation not permitted"),
            "exec {i} was not refused with EPERM: {status}, {stderr}"
        );
        pids.insert(pid);
        if i % 100 == 0 {
            assert!(Command::new(&benign).status().unwrap().success());
        }
    }
    let blocked = wait_for(Duration::from_secs(120), "1,000 blocked execs", || {
        let d: Vec<Value> =
            s.c.detections()
                .into_iter()
                .filter(|d| d["rule"] == hash.as_str() && d["action"] == "blocked")
                .collect();
        (d.len() >= 1000).then_some(d)
    });
    assert_eq!(blocked.len(), 1000);
    let seen: BTreeSet<u32> = blocked
        .iter()
        .filter_map(|d| d["pid"].as_u64().map(|p| p as u32))
        .collect();
    assert_eq!(seen, pids, "every refused exec reported once, with its pid");
    for d in &blocked {
        assert_eq!(d["kind"], "hash", "{d}");
        assert_eq!(d["path"], exe.to_str().unwrap(), "{d}");
    }
    counter_reaches(&s, "execs_blocked", 1000);
    // The binary never ran: no process alert for it, only the file's own detection. (Other
    // tests run copies of the same binary elsewhere at the same time; the agent sees every
    // exec on the host, so only this copy's path counts.)
    let others: Vec<Value> =
        s.c.detections()
            .into_iter()
            .filter(|d| {
                d["rule"] == hash.as_str()
                    && d["action"] != "blocked"
                    && d["path"] == exe.to_str().unwrap()
            })
            .collect();
    assert_eq!(others.len(), 1, "{others:?}");
    assert!(others[0]["pid"].is_null(), "{others:?}");

    // A killed agent holds nothing: the kernel lets the exec run.
    s.agent.proc.as_mut().unwrap().signal_and_wait("KILL");
    let ran = Command::new("timeout")
        .arg("10")
        .arg(&exe)
        .status()
        .unwrap();
    assert!(ran.success(), "exec after the agent died: {ran}");
}

/// Waits until `path`'s last status change is older than the agent's racy window, so that a
/// verdict on it is a cache hit from then on.
fn settle(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    wait_for(Duration::from_secs(10), "the file's ctime to age", || {
        let m = std::fs::metadata(path).unwrap();
        let ctime = std::time::UNIX_EPOCH + Duration::new(m.ctime() as u64, m.ctime_nsec() as u32);
        let age = std::time::SystemTime::now().duration_since(ctime).ok()?;
        (age > Duration::from_millis(500)).then_some(())
    });
}

#[test]
fn a_name_indicator_is_judged_under_each_name_of_a_hard_linked_binary() {
    let extra = "event_source = \"fanotify\"\nprevent = true\nprevent_timeout = \"1s\"\n\
                 processes = false";
    let Some(mut s) = setup(&[], extra) else {
        return;
    };
    std::fs::write(
        s._tmp.path().join("rules/filename-iocs.txt"),
        "/mimikatz\\.exe$;90\n",
    )
    .unwrap();
    s.run(&[]);
    // One file, two names: a clean one and one a name indicator blocks. The file stands for a
    // system binary (`sudo`, say) that a local user reaches through a name of their choosing.
    let clean = s.watched.join("a");
    std::fs::copy("/bin/true", &clean).unwrap();
    let named = s.watched.join("mimikatz.exe");
    std::fs::hard_link(&clean, &named).unwrap();
    settle(&clean);

    let refused =
        |(_, status, stderr): (u32, std::process::ExitStatus, String)| -> Result<(), String> {
            if !status.success() && stderr.contains("Operation not permitted") {
                Ok(())
            } else {
                Err(format!("{status}, {stderr}"))
            }
        };
    // Judged clean under its clean name, the file is still judged by name under the other.
    let (_, status, stderr) = exec_via_sh(&clean);
    assert!(status.success(), "the clean name runs: {stderr}");
    refused(exec_via_sh(&named)).expect("the indicator's name is refused after a clean exec");
    // And the deny earned under that name does not follow the file to its clean name.
    for round in 0..3 {
        let (_, status, stderr) = exec_via_sh(&clean);
        assert!(
            status.success(),
            "round {round}: the clean name runs: {stderr}"
        );
        refused(exec_via_sh(&named))
            .unwrap_or_else(|e| panic!("round {round}: the named exec ran: {e}"));
    }
    let blocked = wait_for(Duration::from_secs(30), "4 blocked execs", || {
        let d: Vec<Value> =
            s.c.detections()
                .into_iter()
                .filter(|d| d["action"] == "blocked")
                .collect();
        (d.len() >= 4).then_some(d)
    });
    assert_eq!(blocked.len(), 4, "{blocked:?}");
    for d in &blocked {
        assert_eq!(d["kind"], "filename", "{d}");
        assert_eq!(d["path"], named.to_str().unwrap(), "{d}");
    }
}

#[test]
fn prevention_fails_open_when_no_verdict_comes_in_time_and_blocks_once_judged() {
    let tmp = tempfile::tempdir().unwrap();
    // An indicator binary too big to hash within the timeout on its first exec.
    let big = tmp.path().join("vedette-big-true");
    let mut image = std::fs::read("/bin/true").unwrap();
    image.resize(image.len() + (40 << 20), 0x5a);
    std::fs::write(&big, &image).unwrap();
    let out = Command::new("sha256sum").arg(&big).output().unwrap();
    let hash = String::from_utf8_lossy(&out.stdout)[..64].to_string();
    let extra = "event_source = \"fanotify\"\nprevent = true\nprevent_timeout = \"5ms\"\n\
                 max_file_size = 104857600\nprocesses = false";
    let Some(mut s) = setup(std::slice::from_ref(&hash), extra) else {
        return;
    };
    s.run(&[]);
    let exe = s.watched.join("vedette-big-true");
    std::fs::copy(&big, &exe).unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (_, status, stderr) = exec_via_sh(&exe);
    assert!(
        status.success(),
        "the first exec waits for no verdict: {stderr}"
    );
    counter_reaches(&s, "exec_verdicts_late", 1);
    // The verdict still finishes and is kept: a later exec is refused.
    wait_for(
        Duration::from_secs(30),
        "an exec refused once judged",
        || {
            let (_, status, stderr) = exec_via_sh(&exe);
            (!status.success() && stderr.contains("Operation not permitted")).then_some(())
        },
    );
}

/// A copy of `/bin/true` followed by `tag`, padded (sparsely) to `size` bytes: it runs the
/// same, and its judgement reads every byte.
fn padded_true(path: &Path, tag: &str, size: u64) {
    let mut image = std::fs::read("/bin/true").unwrap();
    image.extend_from_slice(tag.as_bytes());
    std::fs::write(path, &image).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// The marker rule's detections on `exe`.
fn marker_detections(s: &Setup, exe: &Path) -> Vec<Value> {
    s.c.detections()
        .into_iter()
        .filter(|d| d["rule"] == RULE && d["path"] == exe.to_str().unwrap())
        .collect()
}

#[test]
fn a_padded_binary_that_outlasts_the_verdict_runs_and_is_reported_late_once() {
    // The default max_file_size (64 MiB): the binary is three times that, and its marker is in
    // its first bytes, where an executable's code is.
    let extra = "event_source = \"fanotify\"\nprevent = true\nprevent_timeout = \"5ms\"";
    let Some(mut s) = setup(&[], extra) else {
        return;
    };
    s.run(&[]);
    let exe = s.watched.join("padded-true");
    padded_true(&exe, &format!("{MARKER} padded"), 200 << 20);
    let (pid, status, stderr) = exec_via_sh(&exe);
    assert!(
        status.success(),
        "no verdict in 5 ms: the exec runs: {stderr}"
    );
    let late = wait_for(Duration::from_secs(60), "the exec reported late", || {
        let d: Vec<Value> = marker_detections(&s, &exe)
            .into_iter()
            .filter(|d| d["pid"].as_u64() == Some(u64::from(pid)))
            .collect();
        (!d.is_empty()).then_some(d)
    });
    assert_eq!(late.len(), 1, "reported once: {late:?}");
    assert_eq!(late[0]["action"], "late", "{}", late[0]);
    assert_eq!(late[0]["kind"], "yara", "{}", late[0]);
    assert_eq!(
        late[0]["sha256"].as_str().map(str::len),
        Some(64),
        "{}",
        late[0]
    );
    counter_reaches(&s, "exec_verdicts_late", 1);
}

#[test]
fn with_deny_on_timeout_an_unjudged_exec_is_refused_where_users_can_write_only() {
    let extra = "event_source = \"fanotify\"\nprevent = true\nprevent_timeout = \"5ms\"\n\
                 prevent_on_timeout = \"deny\"";
    let Some(mut s) = setup(&[], extra) else {
        return;
    };
    s.run(&[]);
    // Root's own directory: a slow verdict still lets a root-owned binary run.
    let system = s.watched.join("system-true");
    padded_true(&system, "system", 100 << 20);
    let (_, status, stderr) = exec_via_sh(&system);
    assert!(status.success(), "a root-owned binary runs: {stderr}");
    // A user's file: refused without a verdict, and reported as blocked once judged.
    let exe = s.watched.join("user-true");
    padded_true(&exe, &format!("{MARKER} user"), 100 << 20);
    std::os::unix::fs::chown(&exe, Some(65534), Some(65534)).unwrap();
    let (pid, status, stderr) = exec_via_sh(&exe);
    assert!(
        !status.success() && stderr.contains("Operation not permitted"),
        "refused without a verdict: {status}, {stderr}"
    );
    counter_reaches(&s, "exec_verdicts_denied", 1);
    // (The file itself may be reported as written too, before the exec: that one has no pid.)
    let blocked = wait_for(Duration::from_secs(60), "the refusal reported", || {
        let d: Vec<Value> = marker_detections(&s, &exe)
            .into_iter()
            .filter(|d| d["pid"].is_u64())
            .collect();
        (!d.is_empty()).then_some(d)
    });
    assert_eq!(blocked.len(), 1, "{blocked:?}");
    assert_eq!(blocked[0]["action"], "blocked", "{}", blocked[0]);
    assert_eq!(blocked[0]["pid"].as_u64(), Some(u64::from(pid)));
}

#[test]
fn one_user_flooding_with_large_executables_leaves_other_users_execs_judged() {
    let extra = "event_source = \"fanotify\"\nprevent = true\nprevent_timeout = \"100ms\"\n\
                 processes = false";
    let Some(mut s) = setup(&[], extra) else {
        return;
    };
    s.run(&[]);
    // The flooder (uid 65534) runs eight fresh 40 MB executables at once, over and over,
    // touching each first so that every exec needs a full judgement (some 30 ms each: eight
    // of them outlast the 100 ms timeout on the one thread that takes large files).
    let flood = s.fs.path.join("flood");
    std::fs::create_dir(&flood).unwrap();
    for i in 0..8 {
        let f = flood.join(format!("big{i}"));
        padded_true(&f, &format!("flood {i}"), 40 << 20);
        std::os::unix::fs::chown(&f, Some(65534), Some(65534)).unwrap();
    }
    std::os::unix::fs::chown(&flood, Some(65534), Some(65534)).unwrap();
    let stop = s.fs.path.join("stop-flood");
    let script = format!(
        "while [ ! -e {stop} ]; do for f in {dir}/big*; do touch \"$f\"; \"$f\" & done; wait; done",
        stop = stop.display(),
        dir = flood.display()
    );
    let flooder = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "sh",
            "-c",
        ])
        .arg(&script)
        .spawn()
        .unwrap();
    // Stopped however the test ends.
    struct Flood(std::process::Child);
    impl Drop for Flood {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let flooder = Flood(flooder);
    counter_reaches(&s, "exec_verdicts_late", 1);
    // Meanwhile root's small execs get their verdicts: the indicator binary is refused every
    // time (not let through unjudged), and a clean one runs.
    let exe = s.watched.join("marker-true");
    let mut image = std::fs::read("/bin/true").unwrap();
    image.extend_from_slice(MARKER.as_bytes());
    std::fs::write(&exe, &image).unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let benign = s.watched.join("benign-true");
    std::fs::copy("/bin/true", &benign).unwrap();
    let before = s
        .agent
        .info(&s.c)
        .and_then(|a| a["counters"]["exec_verdicts_late"].as_u64())
        .unwrap_or(0);
    let mut refused = 0;
    for i in 0..10 {
        let (_, status, stderr) = exec_via_sh(&exe);
        if !status.success() && stderr.contains("Operation not permitted") {
            refused += 1;
        }
        // Fresh each time: no cached verdict helps.
        std::fs::write(&exe, [image.as_slice(), format!("{i}").as_bytes()].concat()).unwrap();
        assert!(Command::new(&benign).status().unwrap().success());
    }
    std::fs::write(&stop, "").unwrap();
    drop(flooder);
    assert_eq!(
        refused, 10,
        "each of root's indicator execs judged and refused"
    );
    // The flood did outrun the verdicts: the flooder's execs went unjudged meanwhile.
    counter_reaches(&s, "exec_verdicts_late", before + 1);
}

/// `exe` run as uid 65534 with `args`, as a child to kill.
fn run_as_nobody(exe: &Path, args: &[&str]) -> std::process::Child {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(exe)
        .args(args)
        .spawn()
        .unwrap()
}

/// The agent's `vedette.unscannable_exec` detection on process `pid` running `exe` (the same
/// pid ran `setpriv` first, which a loaded host may report too).
fn unscannable(s: &Setup, pid: u32, exe: &Path) -> Value {
    wait_for(
        Duration::from_secs(30),
        &format!("process {pid} reported unscannable"),
        || {
            s.c.detections().into_iter().find(|d| {
                d["rule"] == "vedette.unscannable_exec"
                    && d["pid"].as_u64() == Some(u64::from(pid))
                    && d["path"].as_str() == exe.to_str()
            })
        },
    )
}

#[test]
fn executables_the_agent_cannot_read_are_reported_and_a_hung_read_stops_nothing_else() {
    // Memory scans on: a mapping of a file on a hung FUSE mount must not be read either.
    let extra = "scan_timeout = \"2s\"\nmemory_scan = true";
    let Some(mut s) = setup(&[], extra) else {
        return;
    };
    std::fs::write(
        s._tmp.path().join("rules/process-iocs.txt"),
        "^vedette-later$;90\n",
    )
    .unwrap();
    let sleep = Path::new("/bin/sleep");
    // A user's own FUSE mount, without allow_other: even root is refused.
    let private = match vedette_tests::Fuse::mount(
        &s._tmp.path().join("fuse-private"),
        sleep,
        65534,
        false,
        None,
    ) {
        Ok(f) => f,
        Err(e) => {
            vedette_tests::missing_root(&e);
            return;
        }
    };
    // One whose daemon never answers root's opens and reads.
    let hung = vedette_tests::Fuse::mount(
        &s._tmp.path().join("fuse-hung"),
        sleep,
        65534,
        true,
        Some(0),
    )
    .unwrap();
    s.run(&[]);
    let mut refused = run_as_nobody(&private.prog, &["60"]);
    let d = unscannable(&s, refused.id(), &private.prog);
    let text = d["description"].as_str().unwrap();
    assert!(text.contains("on fuse"), "{d}");
    assert!(text.contains("Permission denied"), "{d}");
    assert_eq!(d["path"], private.prog.to_str().unwrap(), "{d}");

    let mut stuck = run_as_nobody(&hung.prog, &["60"]);
    let d = unscannable(&s, stuck.id(), &hung.prog);
    assert!(
        d["description"]
            .as_str()
            .unwrap()
            .contains("not read within 2s"),
        "{d}"
    );
    // The process monitor goes on: a process indicator still fires.
    let after = s._tmp.path().join("vedette-later");
    std::fs::copy(sleep, &after).unwrap();
    let mut child = Command::new(&after).arg("30").spawn().unwrap();
    let pid = child.id();
    wait_for(
        Duration::from_secs(30),
        "the later process detected",
        || {
            s.c.detections()
                .into_iter()
                .find(|d| d["kind"] == "process" && d["pid"].as_u64() == Some(u64::from(pid)))
        },
    );
    // A second exec on the hung mount is not read again, and says why.
    let mut again = run_as_nobody(&hung.prog, &["60"]);
    let d = unscannable(&s, again.id(), &hung.prog);
    assert!(
        d["description"]
            .as_str()
            .unwrap()
            .contains("an earlier read"),
        "{d}"
    );
    for c in [&mut refused, &mut stuck, &mut child, &mut again] {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop(hung);
    drop(private);
}

#[test]
fn exec_events_catch_short_lived_processes_between_polls() {
    // inotify: no fanotify exec events. Processes are polled once at start, then hourly: only
    // the process connector can see these.
    let Some(mut s) = setup(&[], "event_source = \"inotify\"") else {
        return;
    };
    let rules = s._tmp.path().join("rules");
    std::fs::write(rules.join("process-iocs.txt"), "^vedette-short$;90\n").unwrap();
    let short = s._tmp.path().join("vedette-short");
    std::fs::copy("/bin/sleep", &short).unwrap();
    s.run(&[]);
    assert!(
        s.log().contains("exec events from the process connector"),
        "{}",
        s.log()
    );
    // Between polls: once the first walk of /proc (the processes from before the agent) is
    // over, and only exec events can show a process that lives 1 s.
    wait_for(Duration::from_secs(60), "the first process walk", || {
        s.log()
            .contains("first process walk finished")
            .then_some(())
    });
    // Twenty processes of one second each, all at once: the next walk is an hour away.
    let children: Vec<std::process::Child> = (0..20)
        .map(|_| Command::new(&short).arg("1").spawn().unwrap())
        .collect();
    let pids: BTreeSet<u32> = children.iter().map(|c| c.id()).collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    let found = wait_for(Duration::from_secs(30), "20 short processes", || {
        let d: Vec<Value> =
            s.c.detections()
                .into_iter()
                .filter(|d| d["kind"] == "process" && d["name"] == "vedette-short")
                .collect();
        (d.len() >= 20).then_some(d)
    });
    let seen: BTreeSet<u32> = found
        .iter()
        .filter_map(|d| d["pid"].as_u64().map(|p| p as u32))
        .collect();
    assert_eq!(seen, pids);
    assert_eq!(found.len(), 20);
}
