//! The agent's configuration file (TOML). Read raw, then validated into [`Config`] with every
//! problem reported at once; command-line flags override the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
pub use vedette_ops::config::ConfigError;

/// The file as written. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Paths watched in real time, recursively.
    #[serde(default)]
    pub watch: Vec<PathBuf>,
    /// YARA rule files or directories of `.yar`/`.yara` files.
    #[serde(default)]
    pub rules: Vec<PathBuf>,
    /// Scan worker threads; default: half the cores, at least 1.
    pub scan_workers: Option<usize>,
    /// Files larger than this are not scanned (executables: hashed, matched on their head);
    /// bytes or a size like `64MiB`; default 64 MiB.
    pub max_file_size: Option<ByteSize>,
    /// YARA time budget per file, e.g. `30s`.
    pub scan_timeout: Option<String>,
    /// Interval between heartbeats, e.g. `30s`.
    pub heartbeat: Option<String>,
    /// Longest wait between reconnection attempts, e.g. `60s`.
    pub backoff_max: Option<String>,
    /// Collector addresses (`host:port`), replacing those recorded at enrollment.
    #[serde(default)]
    pub collectors: Vec<String>,
    /// Paths walked by full scans; default: the watched paths.
    #[serde(default)]
    pub scan_paths: Vec<PathBuf>,
    /// Run a full scan when the agent starts; default true.
    pub scan_on_start: Option<bool>,
    /// Interval between full scans, e.g. `6h`; `0s` turns periodic scans off. Default `6h`.
    pub scan_interval: Option<String>,
    /// After each full scan, measure which YARA rules cost the most on a sample of the files
    /// it read (in the rule compiler process, within `max_cpu_percent`), and send the costliest
    /// in the heartbeat; default true.
    pub profile_rules: Option<bool>,
    /// Percentage of one core all scanning work together may use (full scans, the rescan after a
    /// bundle, rule compilation), over 10-second windows (1-100); default 50.
    pub max_cpu_percent: Option<u32>,
    /// The most resident memory the agent allows itself, in bytes or with a unit (`512MiB`,
    /// `1GiB`), or `off`. Past it the agent releases its scanners and scans one file at a
    /// time until it is back under 90 %. Default 512MiB, at least 32MiB.
    pub max_rss: Option<ByteSize>,
    /// Glob patterns of paths full scans skip (e.g. `/var/lib/docker/**`).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Where file events come from: `auto` (fanotify when the agent may use it, else
    /// inotify), `fanotify` (refuse to start without it) or `inotify`. Default `auto`.
    pub event_source: Option<EventSource>,
    /// Watch processes (names, command lines, executables, C2 connections); default true.
    pub processes: Option<bool>,
    /// Interval between connection polls, and between walks of `/proc` when the process
    /// connector gives no exec events, e.g. `1s`.
    pub process_interval: Option<String>,
    /// Also match YARA rules against each new process's readable private memory; default false.
    pub memory_scan: Option<bool>,
    /// Watch DNS queries (UDP port 53, every interface; needs CAP_NET_RAW) for domain
    /// indicators; default true. Only matches are kept or sent.
    pub dns: Option<bool>,
    /// One `dns` detection per process (or host) per domain per this long, with the count of
    /// queries, e.g. `10m`. Default `10m`.
    pub dns_window: Option<String>,
    /// Prevention: deny the exec of a file on the watched file systems that matches a rule or
    /// indicator scoring at least `prevent_min_score` (needs fanotify). Default false.
    pub prevent: Option<bool>,
    /// The lowest score that blocks an exec (0-100); default 80.
    pub prevent_min_score: Option<u32>,
    /// How long an exec may wait for a verdict before it is allowed (and counted), e.g.
    /// `250ms`; at most 5s. Default 250ms.
    pub prevent_timeout: Option<String>,
    /// What an exec gets when no verdict can be given in time (past `prevent_timeout`, or too
    /// many waiting): `allow` (default; it is judged afterwards and reported as `late`), or
    /// `deny` for executables in places a user other than root can write (their file, or a
    /// directory above it, owned by another user or writable by group or others).
    pub prevent_on_timeout: Option<OnTimeout>,
    /// Most bytes of undelivered detections kept on disk; past it the oldest are dropped and
    /// counted. Bytes or a size like `256MiB`; default 256 MiB, at least 64 KiB.
    pub spool_max_bytes: Option<ByteSize>,
    /// Most bytes of history kept on disk: every file read (its state and MD5, SHA-1 and
    /// SHA-256) and every executable run (path, user, first and last run), so that a hash
    /// published later is answered without reading the disks again (retro-hunt). Past it the
    /// oldest go first, counted. Bytes or a size like `256MiB`, or `off`; default 256 MiB, at
    /// least 1 MiB. Nothing of it leaves the host but matches.
    pub history_max_bytes: Option<ByteSize>,
    /// More maintainer public keys (PEM files) whose signed bundles this agent applies, beside
    /// those pinned at enrollment.
    #[serde(default)]
    pub maintainer_keys: Vec<PathBuf>,
    /// Apply bundles that carry no signature at all. Insecure: whoever controls the collector
    /// decides what this agent looks for.
    #[serde(default)]
    pub insecure_allow_unsigned_bundles: bool,
    /// Where Prometheus scrapes `/metrics` (plain HTTP), or `off` (the default).
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// The response actions the collector may have this agent do: any of `kill`,
    /// `quarantine`, `isolate`. Default none: every action is refused, whatever the collector
    /// says.
    #[serde(default)]
    pub response: Vec<String>,
    /// Networks (`CIDR`) an isolated host may still reach, beside the collectors, the DNS
    /// resolvers of /etc/resolv.conf and loopback.
    #[serde(default)]
    pub isolation_allow: Vec<String>,
}

/// The response actions a host may allow.
pub const RESPONSE_KINDS: &[&str] = &["kill", "quarantine", "isolate"];

/// A size in bytes: a number, or a string with a unit (`B`, `KiB`, `MiB`, `GiB`, or `KB`,
/// `MB`, `GB` in powers of 1000), or `off`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ByteSize {
    Bytes(u64),
    Text(String),
}

impl ByteSize {
    /// Bytes, None for `off`.
    fn bytes(&self) -> Result<Option<u64>, SizeError> {
        let text = match self {
            ByteSize::Bytes(n) => return Ok(Some(*n)),
            ByteSize::Text(t) => t.trim(),
        };
        if text.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(digits);
        let n: u64 = number
            .parse()
            .map_err(|_| SizeError::NotASize(text.to_string()))?;
        let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kib" | "k" => 1 << 10,
            "mib" | "m" => 1 << 20,
            "gib" | "g" => 1 << 30,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            other => {
                return Err(SizeError::Unit {
                    text: text.to_string(),
                    unit: other.to_string(),
                });
            }
        };
        n.checked_mul(scale)
            .map(Some)
            .ok_or_else(|| SizeError::TooLarge(text.to_string()))
    }
}

/// A size given on the command line (`--max-file-size 64MiB`), never `off` or 0.
pub fn parse_size(text: &str) -> Result<u64, String> {
    match ByteSize::Text(text.to_string()).bytes() {
        Ok(Some(0)) => Err("must be at least 1 byte".into()),
        Ok(Some(n)) => Ok(n),
        Ok(None) => Err(SizeError::NotOff.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// A key that holds a size, never `off`: None when not given.
fn size_key(v: &Option<ByteSize>) -> Result<Option<u64>, SizeError> {
    match v.as_ref().map(ByteSize::bytes) {
        None => Ok(None),
        Some(Ok(Some(n))) => Ok(Some(n)),
        Some(Ok(None)) => Err(SizeError::NotOff),
        Some(Err(e)) => Err(e),
    }
}

/// Why a size is not one.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("`{0}` is not a size (e.g. `512MiB`, or `off`)")]
    NotASize(String),
    #[error("`{text}`: unknown unit `{unit}` (B, KiB, MiB, GiB, KB, MB, GB)")]
    Unit { text: String, unit: String },
    #[error("`{0}` is too large")]
    TooLarge(String),
    #[error("`off` is not allowed here: give a size (e.g. `64MiB`)")]
    NotOff,
}

/// `max_rss` when the configuration does not set it.
pub const DEFAULT_MAX_RSS: u64 = 512 << 20;

/// The smallest `max_rss`: the agent with a handful of rules needs about this much.
pub const MIN_MAX_RSS: u64 = 32 << 20;

/// Where file events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventSource {
    #[default]
    Auto,
    Fanotify,
    Inotify,
}

/// What an exec without a verdict gets (`prevent_on_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    #[default]
    Allow,
    Deny,
}

/// Checked settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub watch: Vec<PathBuf>,
    pub rules: Vec<PathBuf>,
    pub scan_workers: usize,
    pub max_file_size: u64,
    pub scan_timeout: Duration,
    pub heartbeat: Duration,
    pub backoff_max: Duration,
    pub collectors: Vec<String>,
    pub scan_paths: Vec<PathBuf>,
    pub scan_on_start: bool,
    pub profile_rules: bool,
    /// None: no periodic full scans.
    pub scan_interval: Option<Duration>,
    pub max_cpu_percent: u32,
    /// The memory ceiling in bytes; 0: none.
    pub max_rss: u64,
    pub exclude: Vec<String>,
    pub event_source: EventSource,
    pub processes: bool,
    pub process_interval: Duration,
    pub memory_scan: bool,
    pub dns: bool,
    pub dns_window: Duration,
    /// Prevention mode, when on.
    pub prevent: Option<Prevention>,
    pub spool_max_bytes: u64,
    /// None: no history kept.
    pub history_max_bytes: Option<u64>,
    pub maintainer_keys: Vec<PathBuf>,
    pub insecure_allow_unsigned_bundles: bool,
    /// None: no metrics endpoint.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The response actions allowed here (of [`RESPONSE_KINDS`]).
    pub response: Vec<String>,
    /// Networks an isolated host may reach, as `address/prefix`.
    pub isolation_allow: Vec<String>,
}

/// Prevention mode: which execs are denied, and how long one may wait for its verdict.
#[derive(Debug, Clone, Copy)]
pub struct Prevention {
    pub min_score: u32,
    pub timeout: Duration,
    pub on_timeout: OnTimeout,
}

/// A network as `address/prefix` (an address alone is the host itself), checked.
pub fn cidr(text: &str) -> Result<String, String> {
    let (addr, prefix) = text.trim().split_once('/').unwrap_or((text.trim(), ""));
    let bad = || format!("`{text}` is not a network like `192.0.2.0/24` or `2001:db8::/32`");
    let ip: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let bits: u8 = match prefix {
        "" => max,
        p => p.parse().ok().filter(|b| *b <= max).ok_or_else(bad)?,
    };
    Ok(format!("{ip}/{bits}"))
}

/// The smallest `history_max_bytes`.
const MIN_HISTORY: u64 = 1 << 20;

/// The longest `prevent_timeout`: every exec on the marked file systems waits for the verdict.
const MAX_PREVENT_TIMEOUT: Duration = Duration::from_secs(5);

impl RawConfig {
    pub fn load(path: &Path) -> Result<RawConfig, ConfigError> {
        vedette_ops::config::read_toml(path)
    }

    /// Checks every value; `path` is only used in messages.
    pub fn validate(self, path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let times = self.durations(&mut problems);
        self.check_values(&mut problems);
        self.check_paths(&mut problems);
        if !problems.is_empty() {
            return Err(ConfigError::new(path, problems));
        }
        Ok(self.into_config(times))
    }

    /// Every duration, parsed (defaults where absent or bad; bad ones are problems).
    fn durations(&self, problems: &mut Vec<String>) -> Durations {
        let mut duration = |key: &str, v: &Option<String>, default: Duration| match v {
            None => default,
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    problems.push(format!("`{key}`: `{s}` must be longer than zero"));
                    default
                }
                Err(e) => {
                    problems.push(format!("`{key}`: `{s}` is not a duration like `30s` ({e})"));
                    default
                }
            },
        };
        let scan_timeout = duration("scan_timeout", &self.scan_timeout, Duration::from_secs(30));
        let heartbeat = duration("heartbeat", &self.heartbeat, Duration::from_secs(30));
        let backoff_max = duration("backoff_max", &self.backoff_max, Duration::from_secs(60));
        let process_interval = duration(
            "process_interval",
            &self.process_interval,
            Duration::from_secs(1),
        );
        let dns_window = duration("dns_window", &self.dns_window, Duration::from_secs(600));
        let prevent_timeout = duration(
            "prevent_timeout",
            &self.prevent_timeout,
            Duration::from_millis(250),
        );
        if prevent_timeout > MAX_PREVENT_TIMEOUT {
            problems.push(format!(
                "`prevent_timeout`: `{}` is longer than {}: every exec waits for the verdict",
                self.prevent_timeout.as_deref().unwrap_or_default(),
                humantime::format_duration(MAX_PREVENT_TIMEOUT)
            ));
        }
        let scan_interval = match &self.scan_interval {
            None => Some(Duration::from_secs(6 * 3600)),
            Some(s) => match humantime::parse_duration(s) {
                Ok(d) if d.is_zero() => None,
                Ok(d) => Some(d),
                Err(e) => {
                    problems.push(format!(
                        "`scan_interval`: `{s}` is not a duration like `6h` ({e})"
                    ));
                    None
                }
            },
        };
        Durations {
            scan_timeout,
            heartbeat,
            backoff_max,
            process_interval,
            dns_window,
            prevent_timeout,
            scan_interval,
        }
    }

    fn check_values(&self, problems: &mut Vec<String>) {
        if let Some(p) = self.max_cpu_percent
            && !(1..=100).contains(&p)
        {
            problems.push(format!(
                "`max_cpu_percent`: `{p}` must be between 1 and 100"
            ));
        }
        if let Err(e) = crate::detect::walk::exclusions(&self.exclude) {
            problems.push(format!("`exclude`: {e}"));
        }
        if let Some(s) = self.prevent_min_score
            && !(1..=100).contains(&s)
        {
            problems.push(format!(
                "`prevent_min_score`: `{s}` must be between 1 and 100"
            ));
        }
        if self.prevent == Some(true) && self.event_source == Some(EventSource::Inotify) {
            problems
                .push("`prevent`: `true` needs fanotify, but `event_source` is `inotify`".into());
        }
        if self.scan_workers == Some(0) {
            problems.push("`scan_workers`: `0` must be at least 1".into());
        }
        match size_key(&self.max_file_size) {
            Err(e) => problems.push(format!("`max_file_size`: {e}")),
            Ok(Some(0)) => problems.push("`max_file_size`: `0` must be at least 1".into()),
            Ok(_) => {}
        }
        match self.max_rss.as_ref().map(ByteSize::bytes) {
            Some(Err(e)) => problems.push(format!("`max_rss`: {e}")),
            Some(Ok(Some(n))) if n < MIN_MAX_RSS => problems.push(format!(
                "`max_rss`: `{n}` bytes is below the least the agent needs ({}MiB)",
                MIN_MAX_RSS >> 20
            )),
            _ => {}
        }
        match size_key(&self.spool_max_bytes) {
            Err(e) => problems.push(format!("`spool_max_bytes`: {e}")),
            Ok(Some(n)) if n < crate::deliver::spool::MIN_CAP => problems.push(format!(
                "`spool_max_bytes`: `{n}` bytes is less than the least allowed, {} (64KiB)",
                crate::deliver::spool::MIN_CAP
            )),
            Ok(_) => {}
        }
        match self.history_max_bytes.as_ref().map(ByteSize::bytes) {
            Some(Err(e)) => problems.push(format!("`history_max_bytes`: {e}")),
            Some(Ok(Some(n))) if n < MIN_HISTORY => problems.push(format!(
                "`history_max_bytes`: `{n}` bytes is less than the least allowed, {MIN_HISTORY} \
                 (1MiB); `off` keeps no history"
            )),
            _ => {}
        }
        if let Some(v) = &self.metrics_listen
            && let Err(e) = vedette_ops::metrics::parse_listen(v)
        {
            problems.push(format!("`metrics_listen`: {e}"));
        }
        for c in &self.collectors {
            if !c.contains(':') {
                problems.push(format!("`collectors`: `{c}` is not a host:port"));
            }
        }
        for r in &self.response {
            if !RESPONSE_KINDS.contains(&r.as_str()) {
                problems.push(format!(
                    "`response`: `{r}` is not an action; use {}",
                    RESPONSE_KINDS.join(", ")
                ));
            }
        }
        for n in &self.isolation_allow {
            if let Err(e) = cidr(n) {
                problems.push(format!("`isolation_allow`: {e}"));
            }
        }
    }

    fn check_paths(&self, problems: &mut Vec<String>) {
        for (key, paths) in [
            ("scan_paths", &self.scan_paths),
            ("watch", &self.watch),
            ("rules", &self.rules),
        ] {
            for p in paths.iter().filter(|p| !p.exists()) {
                problems.push(format!("`{key}`: `{}` does not exist", p.display()));
            }
        }
        for p in &self.maintainer_keys {
            if let Err(e) = vedette_engine::bundle::PublicKey::load(p) {
                problems.push(format!("`maintainer_keys`: {e}"));
            }
        }
    }

    /// The checked settings, defaults filled in.
    fn into_config(self, t: Durations) -> Config {
        let isolation_allow = self
            .isolation_allow
            .iter()
            .filter_map(|n| cidr(n).ok())
            .collect();
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Config {
            scan_paths: if self.scan_paths.is_empty() {
                self.watch.clone()
            } else {
                self.scan_paths
            },
            watch: self.watch,
            rules: self.rules,
            scan_workers: self.scan_workers.unwrap_or((cores / 2).max(1)),
            // Refused by `check` before when they do not parse.
            max_file_size: size_key(&self.max_file_size)
                .ok()
                .flatten()
                .unwrap_or(64 * 1024 * 1024),
            scan_timeout: t.scan_timeout,
            heartbeat: t.heartbeat,
            backoff_max: t.backoff_max,
            collectors: self.collectors,
            scan_on_start: self.scan_on_start.unwrap_or(true),
            profile_rules: self.profile_rules.unwrap_or(true),
            scan_interval: t.scan_interval,
            max_cpu_percent: self.max_cpu_percent.unwrap_or(50),
            max_rss: match self.max_rss.as_ref().map(ByteSize::bytes) {
                None => DEFAULT_MAX_RSS,
                Some(Ok(n)) => n.unwrap_or(0),
                // Refused by `check` before.
                Some(Err(_)) => DEFAULT_MAX_RSS,
            },
            response: self.response,
            isolation_allow,
            exclude: self.exclude,
            event_source: self.event_source.unwrap_or_default(),
            processes: self.processes.unwrap_or(true),
            process_interval: t.process_interval,
            memory_scan: self.memory_scan.unwrap_or(false),
            dns: self.dns.unwrap_or(true),
            dns_window: t.dns_window,
            prevent: self.prevent.unwrap_or(false).then_some(Prevention {
                min_score: self.prevent_min_score.unwrap_or(80),
                timeout: t.prevent_timeout,
                on_timeout: self.prevent_on_timeout.unwrap_or_default(),
            }),
            spool_max_bytes: size_key(&self.spool_max_bytes)
                .ok()
                .flatten()
                .unwrap_or(256 * 1024 * 1024),
            history_max_bytes: match self.history_max_bytes.as_ref().map(ByteSize::bytes) {
                None => Some(256 << 20),
                Some(Ok(n)) => n,
                // Refused by `check` before.
                Some(Err(_)) => None,
            },
            maintainer_keys: self.maintainer_keys,
            insecure_allow_unsigned_bundles: self.insecure_allow_unsigned_bundles,
            metrics_listen: self
                .metrics_listen
                .as_deref()
                .and_then(|v| vedette_ops::metrics::parse_listen(v).ok().flatten()),
        }
    }
}

/// The durations of a configuration, parsed.
struct Durations {
    scan_timeout: Duration,
    heartbeat: Duration,
    backoff_max: Duration,
    process_interval: Duration,
    dns_window: Duration,
    prevent_timeout: Duration,
    scan_interval: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_problems_are_reported_with_key_and_value() {
        let raw: RawConfig = toml::from_str(
            "watch = [\"/nonexistent-vedette\"]\nheartbeat = \"often\"\nscan_workers = 0\ncollectors = [\"nohost\"]",
        )
        .unwrap();
        let e = raw
            .validate(Some(Path::new("a.toml")))
            .unwrap_err()
            .to_string();
        for s in [
            "`watch`",
            "/nonexistent-vedette",
            "`heartbeat`",
            "`often`",
            "`scan_workers`",
            "`nohost`",
            "a.toml",
        ] {
            assert!(e.contains(s), "{s} missing in {e}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<RawConfig>("wach = []")
            .unwrap_err()
            .to_string();
        assert!(e.contains("wach"), "{e}");
    }

    #[test]
    fn max_rss_takes_bytes_units_or_off_and_names_a_bad_value() {
        let settings = |text: &str| {
            let raw: RawConfig = toml::from_str(text).unwrap();
            raw.validate(None).map(|s| s.max_rss)
        };
        assert_eq!(settings("").unwrap(), DEFAULT_MAX_RSS);
        assert_eq!(settings("max_rss = \"300MiB\"").unwrap(), 300 << 20);
        assert_eq!(settings("max_rss = \"1 GiB\"").unwrap(), 1 << 30);
        assert_eq!(settings("max_rss = 100000000").unwrap(), 100_000_000);
        assert_eq!(settings("max_rss = \"off\"").unwrap(), 0);
        for (bad, says) in [
            ("max_rss = \"lots\"", "`lots` is not a size"),
            ("max_rss = \"5XB\"", "unknown unit `xb`"),
            ("max_rss = \"1MiB\"", "below the least"),
        ] {
            let e = settings(bad).unwrap_err().to_string();
            assert!(e.contains("`max_rss`") && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn file_and_spool_sizes_take_bytes_or_units_and_name_a_bad_value() {
        let settings = |text: &str| {
            let raw: RawConfig = toml::from_str(text).unwrap();
            raw.validate(None)
                .map(|s| (s.max_file_size, s.spool_max_bytes))
        };
        assert_eq!(settings("").unwrap(), (64 << 20, 256 << 20));
        assert_eq!(
            settings("max_file_size = \"16MiB\"\nspool_max_bytes = \"1GiB\"").unwrap(),
            (16 << 20, 1 << 30)
        );
        assert_eq!(
            settings("max_file_size = 1000\nspool_max_bytes = 70000").unwrap(),
            (1000, 70_000)
        );
        for (bad, key, says) in [
            (
                "max_file_size = \"big\"",
                "`max_file_size`",
                "`big` is not a size",
            ),
            (
                "max_file_size = \"off\"",
                "`max_file_size`",
                "`off` is not allowed here",
            ),
            ("max_file_size = 0", "`max_file_size`", "at least 1"),
            (
                "spool_max_bytes = \"1KiB\"",
                "`spool_max_bytes`",
                "less than the least",
            ),
            (
                "spool_max_bytes = \"9QB\"",
                "`spool_max_bytes`",
                "unknown unit `qb`",
            ),
        ] {
            let e = settings(bad).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(says), "{bad}: {e}");
        }
    }
}
