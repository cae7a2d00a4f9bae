//! Harness for the end-to-end tests: runs the real `vedette-collector`, `vedettectl` and
//! `vedette-agent` binaries as processes, on loopback, with certificates made by `init`.
//!
//! Every wait is a poll of a condition with a deadline ([`wait_for`]); every child process is
//! killed when its handle drops, and its log is printed when a test fails.

pub mod classdiff;
pub mod proxy;
pub mod storm;
pub mod web;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The value of `--name N` on a benchmark's command line, or `default`.
pub fn bench_arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The value at fraction `p` (0.5: the median) of a sorted sample; the default when empty.
pub fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

/// Resident memory of a process, in bytes (`VmRSS` of /proc/PID/status; 0 when unreadable).
pub fn rss_of(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS")
}

/// A size field of `/proc/PID/status` (`VmRSS`, `RssAnon`, `RssFile`...), in bytes; 0 when
/// the process or the field is gone.
pub fn status_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Where cargo put the workspace binaries: next to this executable (a benchmark binary), or
/// one level up (a test executable in `deps/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let here = exe.parent().expect("executable directory");
    let p = [here.join(name), here.parent().unwrap_or(here).join(name)]
        .into_iter()
        .find(|p| p.exists());
    p.unwrap_or_else(|| {
        panic!(
            "`{name}` is missing next to `{}`: build the binaries first (`cargo test --workspace` does)",
            exe.display()
        )
    })
}

/// A free TCP port on 127.0.0.1 for a process to listen on, picked at random below the
/// kernel's range for the local ports of outgoing connections (`ip_local_port_range`): a port
/// from that range (what binding port 0 gives) may be taken, between the pick and the bind, by
/// any connection a test makes meanwhile, and a restarted collector must find its port again.
pub fn free_port() -> u16 {
    use std::hash::BuildHasher;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let from = low.saturating_sub(16384).max(1024);
    // Never the same port twice to the tests of one process (each picks before it binds).
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    if from < low {
        let state = std::collections::hash_map::RandomState::new();
        for attempt in 0u32..1000 {
            let pick = state.hash_one((attempt, std::process::id(), Instant::now()));
            let port = from + (pick % u64::from(low - from)) as u16;
            if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.push(port);
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_for_every(timeout, Duration::from_millis(50), what, f)
}

/// [`wait_for`], looking every `every` (a benchmark whose look costs what it measures looks
/// less often).
pub fn wait_for_every<T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

/// Like [`wait_for`], for conditions that can say what they last saw: `f` returns `Err(state)`
/// until the condition holds, and the panic names the last state.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(state) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {state}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A seeded stream of numbers (splitmix64), for damage a test can replay from its seed.
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The seed in `VEDETTE_TEST_SEED` (decimal or `0x` hex), else a new one from the clock;
    /// printed, so that a failure can be replayed.
    pub fn from_env(what: &str) -> SplitMix {
        let seed = std::env::var("VEDETTE_TEST_SEED")
            .ok()
            .and_then(|v| match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => v.parse().ok(),
            })
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(7, |d| d.as_nanos() as u64)
            });
        eprintln!("{what}: seed {seed:#x} (replay with VEDETTE_TEST_SEED={seed:#x})");
        SplitMix(seed)
    }

    pub fn number(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.number() % n.max(1)
    }

    /// Overwrites 1 to `ranges` runs of 1 to 64 bytes of `data` at random offsets with random
    /// bytes, until at least one byte changed.
    pub fn damage(&mut self, data: &mut [u8], ranges: u64) {
        let original = data.to_vec();
        while data == original.as_slice() && !data.is_empty() {
            for _ in 0..1 + self.below(ranges) {
                let at = self.below(data.len() as u64) as usize;
                let len = (1 + self.below(64) as usize).min(data.len() - at);
                for b in &mut data[at..at + len] {
                    *b = self.number() as u8;
                }
            }
        }
    }
}

/// CPU time (user + system) of a process so far, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15: indexes 11 and 12 here.
    num(11) + num(12)
}

/// A child process killed on drop, its output in a log file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    name: String,
}

impl Proc {
    pub(crate) fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Each compile in a compiler child says so.
            .env(
                "VEDETTE_LOG",
                "info,vedette_agent=debug,vedette_engine::child=debug",
            )
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            log,
            name: name.to_string(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (`TERM`, `USR1`, ...).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Sends a signal (`TERM`, `KILL`, ...) and waits for the process to exit.
    pub fn signal_and_wait(&mut self, signal: &str) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status();
        wait_for(
            Duration::from_secs(20),
            &format!("{} to exit", self.name),
            || self.child.try_wait().ok().flatten(),
        )
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- {} log ({}) -----\n{}",
                self.name,
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// A collector made with `vedette-collector init` in its own directory.
pub struct Collector {
    pub dir: PathBuf,
    pub addr: String,
    /// Where it serves Prometheus metrics (`/metrics`).
    pub metrics_addr: String,
    /// More arguments for `serve` (`--log-format json`, ...).
    pub serve_args: Vec<String>,
    pub fingerprint: String,
    pub proc: Option<Proc>,
    starts: usize,
    /// Names this collector's log and vedettectl files apart from others run from the same
    /// directory ("" for the one `init` made).
    tag: String,
}

impl Collector {
    /// Runs `init` in `dir` for a fresh port on 127.0.0.1.
    pub fn init(dir: &Path) -> Collector {
        Collector::init_with(dir, &[])
    }

    /// [`init`](Self::init) with the store at `url` (`postgres://...`).
    pub fn init_with_store(dir: &Path, url: &str) -> Collector {
        Collector::init_with(dir, &["--store", url])
    }

    /// A second collector serving from this one's configuration (and so its store), on a port
    /// of its own, with a vedettectl configuration that talks to it.
    pub fn second(&self, tag: &str) -> Collector {
        let addr = format!("127.0.0.1:{}", free_port());
        let ctl = self.file("vedettectl.toml").replace(&self.addr, &addr);
        std::fs::write(self.dir.join(format!("vedettectl{tag}.toml")), ctl)
            .expect("vedettectl config");
        Collector {
            dir: self.dir.clone(),
            addr,
            metrics_addr: format!("127.0.0.1:{}", free_port()),
            serve_args: Vec::new(),
            fingerprint: self.fingerprint.clone(),
            proc: None,
            starts: 0,
            tag: tag.to_string(),
        }
    }

    fn init_with(dir: &Path, extra: &[&str]) -> Collector {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let out = Command::new(bin("vedette-collector"))
            .args(["init", "--dir"])
            .arg(dir)
            .args(["--listen", &addr, "--with-maintainer-key"])
            .args(extra)
            .output()
            .expect("run vedette-collector init");
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let fingerprint = stdout
            .lines()
            .find_map(|l| l.strip_prefix("CA SHA-256 fingerprint: "))
            .expect("init prints the fingerprint")
            .trim()
            .to_string();
        Collector {
            dir: dir.to_owned(),
            addr,
            metrics_addr: format!("127.0.0.1:{}", free_port()),
            serve_args: Vec::new(),
            fingerprint,
            proc: None,
            starts: 0,
            tag: String::new(),
        }
    }

    /// Starts `serve` and waits until it accepts connections.
    pub fn start(&mut self) {
        self.starts += 1;
        let log = self
            .dir
            .join(format!("collector{}-{}.log", self.tag, self.starts));
        let mut cmd = Command::new(bin("vedette-collector"));
        cmd.arg("serve")
            .arg("--config")
            .arg(self.dir.join("collector.toml"))
            .args(["--listen", &self.addr])
            .args(["--metrics-listen", &self.metrics_addr])
            .args(&self.serve_args);
        self.proc = Some(Proc::spawn("collector", &mut cmd, log));
        let addr = self.addr.clone();
        wait_for(Duration::from_secs(20), "the collector to listen", || {
            std::net::TcpStream::connect(&addr).ok()
        });
    }

    /// SIGKILL and wait: a crash.
    pub fn kill(&mut self) {
        let mut p = self.proc.take().expect("collector running");
        p.signal_and_wait("KILL");
    }

    /// SIGTERM and wait: a graceful stop.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut p = self.proc.take().expect("collector running");
        p.signal_and_wait("TERM")
    }

    /// A vedettectl configuration like this collector's, with the client certificate
    /// `PREFIX.crt` and key `PREFIX.key` (made by `certs issue --out DIR/PREFIX`) instead of
    /// the operator's: written as `vedettectl-PREFIX.toml`.
    pub fn ctl_config_as(&self, prefix: &str) -> PathBuf {
        let path = self.dir.join(format!("vedettectl-{prefix}.toml"));
        let text = self
            .file("vedettectl.toml")
            .replace("operator.crt", &format!("{prefix}.crt"))
            .replace("operator.key", &format!("{prefix}.key"));
        std::fs::write(&path, text).expect("vedettectl config");
        path
    }

    pub fn ctl_config(&self) -> PathBuf {
        self.dir.join(format!("vedettectl{}.toml", self.tag))
    }

    /// Runs `vedettectl --config <this collector's> ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        vedettectl(&self.ctl_config(), args)
    }

    /// Like [`ctl`](Self::ctl), panicking with stderr unless it succeeds; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "vedettectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn token(&self, extra: &[&str]) -> String {
        let mut args = vec!["token", "create"];
        args.extend_from_slice(extra);
        self.ctl_ok(&args).trim().to_string()
    }

    /// `detections list --json --limit 10000`, parsed.
    pub fn detections(&self) -> Vec<Value> {
        json_lines(&self.ctl_ok(&["detections", "list", "--json", "--limit", "10000"]))
    }

    /// `agents list --json`, parsed.
    pub fn agents(&self) -> Vec<Value> {
        json_lines(&self.ctl_ok(&["agents", "list", "--json"]))
    }

    pub fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).expect("collector file")
    }
}

/// Runs `vedettectl --config CONFIG ARGS` (another operator's configuration and certificate).
pub fn vedettectl(config: &Path, args: &[&str]) -> Output {
    Command::new(bin("vedettectl"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run vedettectl")
}

pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// The complete lines of a JSONL file another process may be appending to: a last line without its
/// newline is still being written and is left for the next read.
pub fn sink_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    json_lines(complete)
}

/// An agent with its own state directory.
pub struct Agent {
    pub state: PathBuf,
    pub id: String,
    pub proc: Option<Proc>,
    /// Environment variables for `run` (`VEDETTE_HOSTNAME`, ...).
    pub env: Vec<(String, String)>,
    runs: usize,
}

impl Agent {
    /// Runs `vedette-agent enroll` (pinning the CA by fingerprint); returns the raw output.
    pub fn try_enroll(c: &Collector, state: &Path, token: &str) -> Output {
        Agent::try_enroll_with(c, state, token, &[])
    }

    /// [`try_enroll`](Self::try_enroll) with extra arguments. Unless they say which maintainer
    /// keys to pin, the agent pins the key `init --with-maintainer-key` made, given as a file
    /// as an operator would.
    pub fn try_enroll_with(c: &Collector, state: &Path, token: &str, extra: &[&str]) -> Output {
        let says_keys = extra.iter().any(|a| {
            [
                "--maintainer-key",
                "--maintainer-key-sha256",
                "--trust-collector-keys",
            ]
            .contains(a)
        });
        let own_key = c.dir.join("maintainer.pub");
        let keys: Vec<&std::ffi::OsStr> = if says_keys {
            Vec::new()
        } else if own_key.exists() {
            vec!["--maintainer-key".as_ref(), own_key.as_os_str()]
        } else {
            vec!["--trust-collector-keys".as_ref()]
        };
        Command::new(bin("vedette-agent"))
            .args([
                "enroll",
                "--collector",
                &c.addr,
                "--token",
                token,
                "--ca-sha256",
                &c.fingerprint,
            ])
            .arg("--state-dir")
            .arg(state)
            .args(keys)
            .args(extra)
            .output()
            .expect("run vedette-agent enroll")
    }

    /// Enrolls with a fresh token, panicking on failure.
    pub fn enroll(c: &Collector, state: &Path) -> Agent {
        Agent::enroll_with(c, state, &[])
    }

    /// [`enroll`](Self::enroll) with extra arguments.
    pub fn enroll_with(c: &Collector, state: &Path, extra: &[&str]) -> Agent {
        Agent::enroll_with_token(c, state, &c.token(&[]), extra)
    }

    /// Enrolls with the given token, panicking on failure.
    pub fn enroll_with_token(c: &Collector, state: &Path, token: &str, extra: &[&str]) -> Agent {
        let out = Agent::try_enroll_with(c, state, token, extra);
        assert!(
            out.status.success(),
            "enroll failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let id = stdout
            .split_whitespace()
            .skip_while(|w| *w != "agent")
            .nth(1)
            .map(|s| s.trim_end_matches(';').to_string())
            .expect("enroll prints the agent id");
        Agent {
            state: state.to_owned(),
            id,
            proc: None,
            env: Vec::new(),
            runs: 0,
        }
    }

    /// Starts `vedette-agent run` with the given extra arguments and waits until the collector
    /// lists it as connected.
    pub fn run(&mut self, c: &Collector, args: &[&str]) {
        self.start(args);
        let id = self.id.clone();
        wait_for(Duration::from_secs(30), "the agent to connect", || {
            c.agents()
                .iter()
                .any(|a| a["id"] == id.as_str() && a["connected"] == true)
                .then_some(())
        });
    }

    /// Starts `vedette-agent run` without waiting for anything (the collector may be down).
    pub fn start(&mut self, args: &[&str]) {
        self.start_wrapped(&[], args);
    }

    /// [`start`](Self::start) through a wrapper command (`setpriv ...`), when not empty.
    pub fn start_wrapped(&mut self, wrapper: &[&str], args: &[&str]) {
        self.runs += 1;
        let log = self.state.join(format!("agent-{}.log", self.runs));
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("vedette-agent"));
                c
            }
            None => Command::new(bin("vedette-agent")),
        };
        cmd.arg("run")
            .arg("--state-dir")
            .arg(&self.state)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        self.proc = Some(Proc::spawn("agent", &mut cmd, log));
    }

    /// `vedette-agent spool --json`: what waits in the spool (read-only); `None` until the
    /// agent made its spool.
    pub fn spool(&self) -> Option<Value> {
        if !self.state.join("spool").exists() {
            return None;
        }
        let out = Command::new(bin("vedette-agent"))
            .args(["spool", "--json", "--state-dir"])
            .arg(&self.state)
            .output()
            .expect("run vedette-agent spool");
        assert!(
            out.status.success(),
            "vedette-agent spool failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(serde_json::from_slice(&out.stdout).expect("spool JSON"))
    }

    /// What the running (or last) agent process logged so far.
    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }

    /// This agent's row in `vedettectl agents list --json`.
    pub fn info(&self, c: &Collector) -> Option<Value> {
        c.agents().into_iter().find(|a| a["id"] == self.id.as_str())
    }

    /// A counter of this agent's last heartbeat (0 before the first).
    pub fn counter(&self, c: &Collector, name: &str) -> u64 {
        self.info(c)
            .and_then(|i| i["counters"][name].as_u64())
            .unwrap_or(0)
    }

    /// Enrolls an agent with its state in `dir/state`, and runs it on a [`watch_config`] of
    /// its own (`dir/agent.toml`) watching `dir/watch` for `rules`; returns it and the watched
    /// directory.
    pub fn watching(c: &Collector, dir: &Path, rules: &Path) -> (Agent, PathBuf) {
        let mut agent = Agent::enroll(c, &dir.join("state"));
        let watch = dir.join("watch");
        std::fs::create_dir_all(&watch).expect("the watched directory");
        let config = dir.join("agent.toml");
        watch_config(&config, &watch, rules, "");
        agent.run(c, &["--config", config.to_str().expect("utf-8 path")]);
        (agent, watch)
    }

    /// [`run`](Self::run) watching `watch` with the rules in `rules`.
    pub fn run_watching(&mut self, c: &Collector, watch: &Path, rules: &Path) {
        let (w, r) = (
            watch.to_str().expect("utf-8 path"),
            rules.to_str().expect("utf-8 path"),
        );
        self.run(c, &["--watch", w, "--rules", r]);
    }

    pub fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.state.join(name)).expect("agent file")
    }
}

/// A peer tool a test runs against is missing: a failure where `.ci/run` installs them
/// (`VEDETTE_TEST_PEERS=required`) or under CI (`CI=true`), else the test says it skips (the
/// caller returns).
pub fn missing_peer(what: &str, install: &str) {
    assert!(
        std::env::var("VEDETTE_TEST_PEERS").as_deref() != Ok("required") && !under_ci(),
        "{what} required here ({install})"
    );
    eprintln!("SKIP: {what} not installed ({install}; .ci/run installs it)");
}

/// A test needs root (to mount, to use fanotify, to make namespaces) and cannot have it: a
/// failure where `.ci/run` runs the tests as root (`VEDETTE_TEST_ROOT=required`) or under CI
/// (`CI=true`), else the test says it skips (the caller returns).
pub fn missing_root(why: &str) {
    assert!(
        std::env::var("VEDETTE_TEST_ROOT").as_deref() != Ok("required") && !under_ci(),
        "this test needs root here: {why}"
    );
    eprintln!("SKIP: needs root: {why}");
}

/// Whether the tests run under CI (`CI=true`), where a missing prerequisite fails.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Standard output then standard error of a finished command, as text.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `GET http://ADDR/PATH` over plain HTTP/1.1: the status line and the body.
pub fn http_get(addr: &str, path: &str) -> Result<(String, String), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {text:?}"))?;
    let status = head.lines().next().unwrap_or_default().to_string();
    Ok((status, body.to_string()))
}

/// Writes a YARA rule file matching `marker` into `dir` and returns its directory.
pub fn rule_dir(dir: &Path, name: &str, marker: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("rules dir");
    std::fs::write(
        dir.join(format!("{name}.yar")),
        format!(
            "rule {name} {{\n  meta:\n    score = 80\n    description = \"test rule\"\n  strings:\n    $m = \"{marker}\"\n  condition:\n    $m\n}}\n"
        ),
    )
    .expect("rule file");
    dir.to_owned()
}

/// A PostgreSQL database of its own for one test, dropped afterwards. The server is the one
/// at `VEDETTE_TEST_POSTGRES` (a URL to a database the test may create databases from;
/// `.ci/run` sets it).
pub struct PgDb {
    admin: String,
    name: String,
    /// The URL of the new database.
    pub url: String,
}

impl PgDb {
    /// None, with a message, where `VEDETTE_TEST_POSTGRES` is not set; under CI (`CI=true`)
    /// that is a failure instead.
    pub fn create(test: &str) -> Option<PgDb> {
        let Ok(admin) = std::env::var("VEDETTE_TEST_POSTGRES") else {
            assert!(
                !under_ci(),
                "{test}: VEDETTE_TEST_POSTGRES is not set, and CI=true makes that a failure"
            );
            eprintln!("skipped on PostgreSQL ({test}): VEDETTE_TEST_POSTGRES is not set");
            return None;
        };
        let name = format!("vedette_{test}_{}", std::process::id())
            + &format!(
                "_{}",
                TEST_DB_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
        let mut c = postgres::Client::connect(&admin, postgres::NoTls)
            .unwrap_or_else(|e| panic!("VEDETTE_TEST_POSTGRES: cannot connect: {e}"));
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create the test database");
        let url = url_with_db(&admin, &name);
        Some(PgDb { admin, name, url })
    }
}

/// Forty quick rules (`quick.yar`) and, in `mixed.yar` line 2, `no_atoms`, whose regex has no
/// atoms: tried at every byte of a file, it costs more than all the others together. Written
/// into `dir` (made if missing), which is returned.
pub fn rules_with_a_slow_one(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("rule dir");
    let quick: String = (0..40)
        .map(|i| format!("rule quick_{i} {{ strings: $a = \"MARKER-{i:04}\" condition: $a }}\n"))
        .collect();
    std::fs::write(dir.join("quick.yar"), quick).expect("quick.yar");
    std::fs::write(
        dir.join("mixed.yar"),
        "rule cheap { strings: $a = \"CHEAP\" condition: $a }\n\
         rule no_atoms { strings: $r = /[a-z]+[0-9]+[a-z]+[0-9]/ condition: $r }\n",
    )
    .expect("mixed.yar");
    dir.to_owned()
}

/// Writes an agent configuration at `path` watching `watch` for `rules`, with heartbeats every
/// second, reconnects within a second, no process monitor and no scheduled scans (each test
/// says what it wants scanned); `extra` is appended.
pub fn watch_config(path: &Path, watch: &Path, rules: &Path, extra: &str) {
    std::fs::write(
        path,
        format!(
            "watch = [{:?}]\nrules = [{:?}]\nheartbeat = \"1s\"\nbackoff_max = \"1s\"\n\
             processes = false\nscan_on_start = false\nscan_interval = \"0s\"\n{extra}\n",
            watch.to_str().expect("utf-8 path"),
            rules.to_str().expect("utf-8 path")
        ),
    )
    .expect("agent config");
}

/// A throw-away PostgreSQL cluster of a test's own (Debian's server programs, run as the
/// `postgres` user), on a free port of 127.0.0.1: the test may stop and start it at will,
/// which it must never do to the machine's own server. Stopped and removed when dropped.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl PgCluster {
    /// A new cluster, started; None (the test says it skips) without Debian's PostgreSQL
    /// server, which under CI is a failure instead.
    pub fn start() -> Option<PgCluster> {
        let Some(bin) = postgres_bin() else {
            missing_peer(
                "PostgreSQL's server programs (initdb, pg_ctl)",
                "apt-get install postgresql",
            );
            return None;
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let chown = Command::new("chown")
            .arg("postgres")
            .arg(dir.path())
            .status()
            .expect("chown");
        assert!(
            chown.success(),
            "cannot give the cluster's directory to `postgres`"
        );
        let data = dir.path().join("data");
        let out = as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .output()
            .expect("initdb");
        assert!(out.status.success(), "initdb: {}", output_text(&out));
        let cluster = PgCluster {
            dir,
            bin,
            port: free_port(),
        };
        cluster.start_again();
        Some(cluster)
    }

    /// Its `postgres` database, as the `postgres` user.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "-o", &options, "start"])
            .output()
            .expect("pg_ctl start");
        assert!(out.status.success(), "pg_ctl start: {}", output_text(&out));
    }

    /// `pg_ctl stop -m fast`: every session is ended at once, as for an upgrade.
    pub fn stop_fast(&self) {
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .output()
            .expect("pg_ctl stop");
        assert!(out.status.success(), "pg_ctl stop: {}", output_text(&out));
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// The directory of Debian's newest PostgreSQL server programs.
fn postgres_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").is_file())
        .collect();
    found.sort_by_key(|b| {
        b.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop()
}

/// `program` run as the `postgres` user (the server refuses to run as root).
fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(program);
    c
}

static TEST_DB_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `url` with its database name replaced by `db`.
pub fn url_with_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{db}{query}", &base[..host_end])
}

impl Drop for PgDb {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.admin, postgres::NoTls) {
            let _ = c.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// Enrolls `n` simulated agents with `token` over the real enrollment RPC, each with its own
/// key and certificate, in parallel; returns their ids and TLS identities.
pub async fn enroll_simulated(
    c: &Collector,
    token: &str,
    n: usize,
) -> Vec<(String, vedette_ops::client::ClientTls)> {
    enroll_simulated_at(&c.addr, &c.file("ca.crt"), token, n).await
}

/// [`enroll_simulated`] with the collector at `addr` whose CA certificate is `ca_pem` (a
/// collector this process did not start).
pub async fn enroll_simulated_at(
    addr: &str,
    ca_pem: &str,
    token: &str,
    n: usize,
) -> Vec<(String, vedette_ops::client::ClientTls)> {
    use vedette_ops::client::{ClientTls, connect};
    use vedette_proto::v1::EnrollRequest;
    use vedette_proto::v1::agent_service_client::AgentServiceClient;
    // Enrollments come without a client certificate, and the collector bounds how many such
    // connections it holds at once: at most 32 are open here at a time.
    let open = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut enrolls = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (addr, ca, token) = (addr.to_string(), ca_pem.to_string(), token.to_string());
        let open = open.clone();
        enrolls.spawn(async move {
            let _slot = open.acquire_owned().await.expect("enrollment slots");
            let key = rcgen::KeyPair::generate().expect("key");
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&key)
                .and_then(|c| c.pem())
                .expect("csr");
            let tls = ClientTls {
                ca_pem: ca.clone(),
                identity: None,
            };
            let ch = connect(&addr, &tls).await.expect("connect");
            let r = AgentServiceClient::new(ch)
                .enroll(EnrollRequest {
                    token,
                    csr_pem: csr,
                    hostname: "sim".into(),
                })
                .await
                .expect("enroll")
                .into_inner();
            let tls = ClientTls {
                ca_pem: ca,
                identity: Some((r.certificate_pem, key.serialize_pem())),
            };
            (r.agent_id, tls)
        });
    }
    enrolls.join_all().await
}

/// What an agent stream gives a simulated agent: where to send its messages, and the
/// collector's replies.
pub type AgentStream = (
    tokio::sync::mpsc::Sender<vedette_proto::v1::AgentMessage>,
    tonic::Streaming<vedette_proto::v1::CollectorMessage>,
);

/// Opens an agent stream to `addr` as `tls` and says Hello, as an agent does first (for
/// simulated agents). A connection that cannot be made is `unavailable`.
pub async fn agent_stream(
    addr: &str,
    tls: &vedette_ops::client::ClientTls,
) -> Result<AgentStream, tonic::Status> {
    use vedette_proto::v1::agent_message::Msg;
    use vedette_proto::v1::agent_service_client::AgentServiceClient;
    use vedette_proto::v1::{AgentMessage, Hello};
    let ch = vedette_ops::client::connect(addr, tls)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (up, rx) = tokio::sync::mpsc::channel(8);
    let hello = AgentMessage {
        msg: Some(Msg::Hello(Hello::default())),
    };
    up.send(hello)
        .await
        .map_err(|_| tonic::Status::internal("the outbound queue closed"))?;
    let down = AgentServiceClient::new(ch)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((up, down))
}

/// A tmpfs mounted for one test or benchmark, unmounted on drop: fanotify marks on it cannot
/// touch the host's own file systems.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a 64 MiB tmpfs at `path` (created if missing); the reason when this process may
    /// not mount (it takes root).
    pub fn mount(path: &Path) -> Result<Tmpfs, String> {
        Tmpfs::mount_sized(path, "64m")
    }

    /// [`Tmpfs::mount`] of `size` (`8m`, say): a small disk to fill.
    pub fn mount_sized(path: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "vedette-test",
            ])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount(8): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cannot mount a tmpfs (this needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            path: path.to_owned(),
        })
    }
}

impl Tmpfs {
    /// Fills what is left of the file system with `filler` (written until ENOSPC).
    pub fn fill(&self, filler: &str) -> PathBuf {
        use std::io::Write;
        let path = self.path.join(filler);
        let mut f = std::fs::File::create(&path).expect("the filler file");
        let chunk = vec![0x5a_u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let small = [0u8; 512];
        while f.write_all(&small).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A FUSE file system of one executable, `prog` (a copy of a binary), served by
/// `tinyfuse.py` (the kernel's protocol spoken on `/dev/fuse`, no libfuse); killed and
/// unmounted on drop, which also ends any read left hanging on it.
pub struct Fuse {
    pub prog: PathBuf,
    mountpoint: PathBuf,
    daemon: Child,
}

impl Fuse {
    /// Mounts at `mountpoint` (created) a copy of `source` owned by `uid`; `allow_other` lets
    /// other users (root) reach it; `hang_uid`'s opens and reads are never answered. The
    /// reason when it cannot mount (it takes root and `/dev/fuse`).
    pub fn mount(
        mountpoint: &Path,
        source: &Path,
        uid: u32,
        allow_other: bool,
        hang_uid: Option<u32>,
    ) -> Result<Fuse, String> {
        std::fs::create_dir_all(mountpoint).map_err(|e| e.to_string())?;
        let script = mountpoint.with_extension("tinyfuse.py");
        std::fs::write(&script, include_str!("tinyfuse.py")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .arg(mountpoint)
            .arg(source)
            .arg(uid.to_string())
            .stdout(Stdio::piped());
        if allow_other {
            cmd.arg("--allow-other");
        }
        if let Some(h) = hang_uid {
            cmd.args(["--hang-uid", &h.to_string()]);
        }
        let mut daemon = cmd
            .spawn()
            .map_err(|e| format!("cannot run python3: {e}"))?;
        let mut line = String::new();
        let out = daemon.stdout.take().ok_or("no stdout")?;
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)
            .map_err(|e| e.to_string())?;
        if line.trim() != "mounted" {
            let _ = daemon.kill();
            let _ = daemon.wait();
            return Err(format!("tinyfuse did not mount {}", mountpoint.display()));
        }
        Ok(Fuse {
            prog: mountpoint.join("prog"),
            mountpoint: mountpoint.to_owned(),
            daemon,
        })
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
    }
}

/// A network namespace of a test's own (`ip netns add`, which unshares one), with `lo` up;
/// removed when dropped. A thread that [`enter`](Self::enter)s it starts every process after
/// that inside it: nothing it does on the network leaves the namespace.
pub struct Netns(String);

impl Netns {
    /// A new namespace; an error (most often: not root) says why there is none.
    pub fn new() -> Result<Netns, String> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "vedette-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let run = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("ip {}: {e}", args.join(" ")))
                .and_then(|o| {
                    o.status
                        .success()
                        .then_some(())
                        .ok_or_else(|| format!("ip {}: {}", args.join(" "), output_text(&o)))
                })
        };
        run(&["netns", "add", &name])?;
        let ns = Netns(name);
        run(&["-n", &ns.0, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name, for `ip netns exec NAME` and `ip link set DEV netns NAME`.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) -> std::io::Result<()> {
        let file = std::fs::File::open(format!("/run/netns/{}", self.0))?;
        rustix::thread::move_into_thread_name_spaces(
            std::os::fd::AsFd::as_fd(&file),
            rustix::thread::ThreadNameSpaceType::NETWORK,
        )?;
        Ok(())
    }

    /// Runs `f` on a new thread inside the namespace (a panic in it is this caller's).
    pub fn run(&self, f: impl FnOnce() + Send) {
        let joined = std::thread::scope(|s| {
            s.spawn(|| {
                self.enter()
                    .expect("setns into the test's network namespace");
                f();
            })
            .join()
        });
        if let Err(panic) = joined {
            std::panic::resume_unwind(panic);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The bytes of the files directly in `dir` (0 when it cannot be read).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
