//! Processes and their network connections, read from `/proc`.
//!
//! A process is judged once per (pid, start time): its name and command line against the
//! process indicators, its executable against every file rule (YARA, hashes, names; results
//! cached by the executable's inode and times). The executable is read through
//! `/proc/PID/exe`, never by its path: a binary deleted or replaced on disk after it started is
//! still the one scanned. A process whose executable is deleted or lives only in memory
//! (`memfd:`) is itself reported, as `vedette.fileless_exec`. Connections come from the
//! kernel's socket diagnostics (netlink; `/proc/net/{tcp,tcp6,udp,udp6}` where it is
//! unavailable); a remote address listed as C2 is tied to its process through the socket inode
//! found in `/proc/<pid>/fd`, and reported once per (pid, remote, indicator).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vedette_engine::{FileScanner, RuleMatch, RuleSet};
use vedette_proto::v1::detection::Target;
use vedette_proto::v1::{ConnectionTarget, Detection, ProcessTarget};

use crate::detect::cache::{ScanCache, Stamp};
use crate::detect::exeread::ExeReader;
use crate::detect::memscan::MemScanLimits;
use crate::detect::mounts::{Mounts, exe_device};
use crate::detect::{Ids, Subject, detection};

/// `/proc` clock ticks per second (USER_HZ, fixed at 100 for the `/proc` interface).
const TICKS_PER_SEC: u64 = 100;

#[derive(Debug, Clone)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    pub name: String,
    /// The executable's path, without the kernel's " (deleted)" mark.
    pub exe: Option<PathBuf>,
    /// The `/proc/PID/exe` link text ends in " (deleted)": the file is gone from disk (or was
    /// never on it: `memfd:`).
    pub exe_deleted: bool,
    pub cmdline: String,
    pub uid: u32,
    /// Start time in clock ticks after boot (identifies the process with its pid).
    pub start_ticks: u64,
}

/// Every process readable now. Processes that exit meanwhile are skipped.
pub fn list() -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(read)
        .collect()
}

/// One process, or None when it is gone or unreadable.
pub fn read(pid: u32) -> Option<ProcInfo> {
    let base = PathBuf::from(format!("/proc/{pid}"));
    let stat = std::fs::read_to_string(base.join("stat")).ok()?;
    // `pid (comm) state ppid ...`: comm may contain spaces and parentheses.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let ppid = rest.get(1)?.parse().ok()?;
    let start_ticks = rest.get(19)?.parse().ok()?;
    let cmdline = std::fs::read(base.join("cmdline"))
        .map(|b| {
            let b = b.strip_suffix(&[0]).unwrap_or(&b);
            String::from_utf8_lossy(b).replace('\0', " ")
        })
        .unwrap_or_default();
    let link = std::fs::read_link(base.join("exe")).ok();
    // The kernel marks a gone executable with ` (deleted)`; a file whose name merely ends so,
    // and that is the very file running, is not gone.
    let exe_deleted = link.as_ref().is_some_and(|p| {
        p.as_os_str().as_bytes().ends_with(DELETED) && !same_file(p, &base.join("exe"))
    });
    let exe = link.map(|p| {
        let raw = p.as_os_str().as_bytes();
        match raw.strip_suffix(DELETED) {
            Some(t) if exe_deleted => PathBuf::from(std::ffi::OsStr::from_bytes(t)),
            _ => p,
        }
    });
    let uid = std::fs::read_to_string(base.join("status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(u32::MAX);
    Some(ProcInfo {
        pid,
        ppid,
        name,
        exe,
        exe_deleted,
        cmdline,
        uid,
        start_ticks,
    })
}

/// Whether two paths lead to the same file (device and inode).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// How the kernel marks an executable link whose file is gone.
pub(crate) const DELETED: &[u8] = b" (deleted)";

use crate::detect::fileless::fileless;

/// A process's start time in seconds since the epoch, from its start in ticks after boot.
pub(crate) fn start_time_secs(start_ticks: u64) -> i64 {
    (boot_time() + start_ticks / TICKS_PER_SEC) as i64
}

fn boot_time() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// How much of an executable larger than `max_file_size` a judge reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reading {
    /// All of it (hashed in full, YARA on its head): the judges of execs on the watched file
    /// systems, where padding a binary must not hide it.
    Whole,
    /// None of it past the name, as for any file: the process monitor, which judges every exec
    /// on the host one after another and must not fall behind.
    UpToCap,
}

/// The matches and SHA-256 of an executable open in `file` (`name` is what indicators see),
/// from `cache` while the file is unchanged; nothing when it cannot be read.
pub(crate) fn exe_matches(
    cache: &ScanCache,
    scanner: &mut FileScanner<'_>,
    file: std::fs::File,
    name: &Path,
    reading: Reading,
) -> (Vec<RuleMatch>, String) {
    let Ok(meta) = file.metadata() else {
        return (Vec::new(), String::new());
    };
    if let Some(hit) = cached_exe_matches(cache, scanner.rules(), &meta, name) {
        return hit;
    }
    if reading == Reading::UpToCap && meta.len() > scanner.max_file_size() {
        // Judged by name only, and not kept: a whole reading may judge it fully later.
        return match scanner.scan_open(file, name) {
            Ok(r) => (r.matches, r.sha256.unwrap_or_default()),
            Err(_) => (Vec::new(), String::new()),
        };
    }
    let tag = exec_tag(scanner.rules(), name);
    match scanner.scan_exec(file, name) {
        Ok(r) => {
            cache.record(Stamp::of_report(&r), tag, &r.matches, r.sha256.as_deref());
            (r.matches, r.sha256.unwrap_or_default())
        }
        Err(_) => (Vec::new(), String::new()),
    }
}

/// The matches and SHA-256 of an executable in state `meta` run as `name`, when it was judged
/// in this very state under `rules` and this name.
pub(crate) fn cached_exe_matches(
    cache: &ScanCache,
    rules: &RuleSet,
    meta: &std::fs::Metadata,
    name: &Path,
) -> Option<(Vec<RuleMatch>, String)> {
    cache
        .get(&Stamp::of(meta), exec_tag(rules, name))
        .map(|hit| (hit.matches, hit.sha256))
}

/// The cache tag of an executable's verdict: the rules, and the name it runs under.
///
/// File-name indicators (Loki lists, STIX `file:name`, MISP `filename`) and YARA's `filename`,
/// `filepath` and `extension` variables judge the path, not the content, and one file has as
/// many paths as hard links and bind mounts give it. A verdict is therefore reused only for the
/// same file state *and* the same name: an indicator's name hard-linked to a clean file is
/// judged under its own name, and a deny earned under a blocked name never follows the file
/// (`/usr/bin/sudo`, say) to its other names.
pub(crate) fn exec_tag(rules: &RuleSet, name: &Path) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(rules.fingerprint());
    h.update(name.as_os_str().as_encoded_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    // 0 is the tag of entries that are never a hit.
    u64::from_le_bytes(b).max(1)
}

/// An execution fanotify reported: who, what, and the executable's digest.
pub(crate) struct Exec<'a> {
    pub pid: u32,
    pub path: &'a Path,
    pub sha256: String,
}

/// Detections for an execution whose executable matched: one per match, on the process, with
/// what `/proc` still tells of it (a process that already exited keeps its pid and executable).
pub(crate) fn exec_detections(
    ids: &Ids,
    users: &Users,
    exec: &Exec<'_>,
    matches: Vec<RuleMatch>,
    rules: &RuleSet,
) -> Vec<Detection> {
    let info = read(exec.pid);
    let name = exec
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let target = ProcessTarget {
        pid: exec.pid,
        ppid: info.as_ref().map_or(0, |p| p.ppid),
        name: info.as_ref().map_or(name, |p| p.name.clone()),
        exe: exec.path.to_string_lossy().into_owned(),
        cmdline: info.as_ref().map(|p| p.cmdline.clone()).unwrap_or_default(),
        user: info.as_ref().map(|p| users.name(p.uid)).unwrap_or_default(),
        start_time: info
            .as_ref()
            .map_or(0, |p| (boot_time() + p.start_ticks / TICKS_PER_SEC) as i64),
        exe_sha256: exec.sha256.clone(),
    };
    let subject = Subject::Process {
        pid: exec.pid,
        start_ticks: info.as_ref().map_or(0, |p| p.start_ticks),
    };
    matches
        .into_iter()
        .map(|m| {
            let id = ids.id(&subject, &m);
            detection(id, m, rules.bundle_version, Target::Process(target.clone()))
        })
        .collect()
}

/// uid → user name from /etc/passwd (numeric when unknown).
pub struct Users(HashMap<u32, String>);

impl Users {
    pub fn load() -> Users {
        let map = std::fs::read_to_string("/etc/passwd")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let uid = f.nth(1)?.parse().ok()?;
                Some((uid, name.to_string()))
            })
            .collect();
        Users(map)
    }
    pub fn name(&self, uid: u32) -> String {
        self.0.get(&uid).cloned().unwrap_or_else(|| uid.to_string())
    }
}

/// Judges processes against a rule set, remembering what it already judged.
pub struct ProcessJudge {
    seen: HashSet<(u32, u64)>,
    reported_conns: HashSet<(u32, IpAddr, u16, String)>,
    exe_cache: Arc<ScanCache>,
    users: Users,
    boot: u64,
    ids: Ids,
    /// Also scan each new process's memory, within these limits.
    memory: Option<MemScanLimits>,
    /// File systems (devices) whose execs fanotify reports with the executable's descriptor:
    /// an exec event leaves their executables to it.
    exec_covered: HashSet<u64>,
    counters: Option<Arc<crate::telemetry::Counters>>,
    /// Reads executables on a worker, within a deadline (without it: here, as long as it takes).
    exe_reader: Option<ExeReader>,
    /// Which file systems may never answer a read.
    mounts: Mounts,
    mounts_read: std::time::Instant,
    /// The names DNS answers gave addresses (when DNS is seen).
    dns: Option<Arc<crate::detect::dns::DnsLinks>>,
    /// Whether the TCP tables need reading this poll.
    tcp_gate: TcpGate,
    /// Where each executable run is kept.
    history: Option<Arc<crate::history::History>>,
}

/// The longest the TCP tables go unread while no connection was opened: a change of
/// indicators that the rule set's identity does not show is caught within it.
const TCP_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// Reading the TCP tables makes the kernel walk its whole established-connections hash table,
/// twice (IPv4, IPv6), whatever few sockets are in it: on a host with much memory, that was
/// most of the idle agent's CPU, every second. They are read again only when the kernel counted
/// a connection opened since the last read (`ActiveOpens` and `PassiveOpens` of
/// `/proc/net/snmp`, IPv4 and IPv6 together, read before the tables), when the indicators or
/// the DNS links changed, or after [`TCP_RECHECK`]. UDP sockets are read every poll (cheap).
#[derive(Default)]
struct TcpGate {
    opens: Option<u64>,
    rules: usize,
    links: u64,
    read: Option<std::time::Instant>,
}

impl TcpGate {
    /// Whether the TCP tables must be read now (the state is then taken as read).
    fn due(&mut self, rules: usize, links: u64) -> bool {
        let opens = tcp_opens();
        let fresh = self.read.is_some_and(|t| t.elapsed() < TCP_RECHECK);
        let same =
            opens.is_some() && opens == self.opens && rules == self.rules && links == self.links;
        if fresh && same {
            return false;
        }
        *self = TcpGate {
            opens,
            rules,
            links,
            read: Some(std::time::Instant::now()),
        };
        true
    }
}

/// TCP connections the kernel opened so far (actively and passively), from `/proc/net/snmp`.
fn tcp_opens() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut rows = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (rows.next()?, rows.next()?);
    let mut sum = 0u64;
    let mut found = 0;
    for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
        if n == "ActiveOpens" || n == "PassiveOpens" {
            sum = sum.wrapping_add(v.parse::<u64>().ok()?);
            found += 1;
        }
    }
    (found == 2).then_some(sum)
}

/// How long the mounts read are trusted before they are read again.
const MOUNTS_FRESH: std::time::Duration = std::time::Duration::from_secs(10);

impl ProcessJudge {
    /// Reads each executable with `reader`: on a worker, within its deadline.
    pub(crate) fn with_exe_reader(mut self, reader: ExeReader) -> ProcessJudge {
        self.exe_reader = Some(reader);
        self
    }

    fn refresh_mounts(&mut self) {
        if self.mounts_read.elapsed() >= MOUNTS_FRESH {
            self.mounts = Mounts::read();
            self.mounts_read = std::time::Instant::now();
        }
    }

    /// Keeps every executable run in `history`.
    pub(crate) fn with_history(mut self, history: Option<Arc<crate::history::History>>) -> Self {
        self.history = history;
        self
    }

    /// Also scans the memory of every new process (not this one).
    pub fn with_memory(mut self, limits: MemScanLimits) -> ProcessJudge {
        self.memory = Some(limits);
        self
    }

    /// On an exec event, executables on these devices are not scanned: fanotify reports them.
    pub fn with_exec_covered(mut self, devices: HashSet<u64>) -> ProcessJudge {
        self.exec_covered = devices;
        self
    }

    /// Counts each process judged ([`Counter::ProcessesSeen`](crate::telemetry::Counter)).
    pub fn with_counters(mut self, counters: Arc<crate::telemetry::Counters>) -> ProcessJudge {
        self.counters = Some(counters);
        self
    }

    fn count_judged(&self, n: u64) {
        if let Some(c) = &self.counters {
            c.add(crate::telemetry::Counter::ProcessesSeen, n);
        }
    }

    /// Shares the results for executables with the agent's other judges of executions.
    pub fn with_exe_cache(mut self, cache: Arc<ScanCache>) -> ProcessJudge {
        self.exe_cache = cache;
        self
    }

    pub fn new(ids: Ids) -> ProcessJudge {
        ProcessJudge {
            seen: HashSet::new(),
            reported_conns: HashSet::new(),
            exe_cache: Arc::new(ScanCache::new()),
            users: Users::load(),
            boot: boot_time(),
            ids,
            memory: None,
            exec_covered: HashSet::new(),
            counters: None,
            exe_reader: None,
            mounts: Mounts::read(),
            mounts_read: std::time::Instant::now(),
            dns: None,
            history: None,
            tcp_gate: TcpGate::default(),
        }
    }

    /// Reports connections to the addresses DNS answers gave for listed domains, and names
    /// the domain in every connection detection.
    pub fn with_dns(mut self, links: Option<Arc<crate::detect::dns::DnsLinks>>) -> ProcessJudge {
        self.dns = links;
        self
    }

    /// Detections for processes not judged before (all of them on the first call).
    pub fn new_processes(&mut self, scanner: &mut FileScanner<'_>) -> Vec<Detection> {
        let procs = list();
        let alive: HashSet<(u32, u64)> = procs.iter().map(|p| (p.pid, p.start_ticks)).collect();
        self.seen.retain(|k| alive.contains(k));
        self.refresh_mounts();
        let mut out = Vec::new();
        let mut judged = 0;
        for p in procs {
            if !self.seen.insert((p.pid, p.start_ticks)) {
                continue;
            }
            judged += 1;
            out.extend(self.judge(&p, scanner, true));
        }
        self.count_judged(judged);
        out
    }

    /// Detections for a process that has just called exec: judged again even when it was seen
    /// before, since its executable and command line changed.
    pub fn exec(&mut self, pid: u32, scanner: &mut FileScanner<'_>) -> Vec<Detection> {
        let Some(p) = read(pid) else {
            return Vec::new();
        };
        self.seen.insert((p.pid, p.start_ticks));
        self.count_judged(1);
        self.refresh_mounts();
        // An executable fanotify reports is judged from its exec event; the rest is judged here.
        // (One on a file system that may never answer is not even looked at here.)
        let may_hang = p
            .exe
            .as_ref()
            .and_then(|e| exe_device(pid, e))
            .is_some_and(|d| self.mounts.may_hang(d));
        let covered = !self.exec_covered.is_empty()
            && !may_hang
            && std::fs::metadata(format!("/proc/{pid}/exe")).is_ok_and(|m| {
                self.exec_covered
                    .contains(&std::os::unix::fs::MetadataExt::dev(&m))
            });
        self.judge(&p, scanner, !covered)
    }

    /// Detections for one process; its executable is scanned when `exe` says so.
    fn judge(&mut self, p: &ProcInfo, scanner: &mut FileScanner<'_>, exe: bool) -> Vec<Detection> {
        let rules = scanner.rules();
        let mut matches: Vec<RuleMatch> = Vec::new();
        rules
            .iocs()
            .match_process(&p.name, &p.cmdline, &mut matches);
        matches.extend(fileless(p));
        if let Some(limits) = self.memory
            && p.pid != std::process::id()
        {
            let found = crate::detect::memscan::scan(scanner, p.pid, limits, &self.mounts);
            for (mut m, region) in found {
                m.description = format!("{} (in memory region {region})", m.description)
                    .trim_start()
                    .to_string();
                matches.push(m);
            }
        }
        let mut exe_sha256 = String::new();
        if let Some(path) = p.exe.as_ref().filter(|_| exe) {
            let (m, sha) = self.scan_exe(p.pid, path, scanner);
            if let Some(h) = &self.history
                && let Ok(meta) = std::fs::metadata(format!("/proc/{}/exe", p.pid))
                && !sha.is_empty()
            {
                h.exec(path, &sha, Stamp::of(&meta), p.uid);
            }
            matches.extend(m);
            exe_sha256 = sha;
        }
        let target = ProcessTarget {
            pid: p.pid,
            ppid: p.ppid,
            name: p.name.clone(),
            exe: p
                .exe
                .as_ref()
                .map(|e| {
                    let mut text = e.to_string_lossy().into_owned();
                    if p.exe_deleted {
                        text.push_str(" (deleted)");
                    }
                    text
                })
                .unwrap_or_default(),
            cmdline: p.cmdline.clone(),
            user: self.users.name(p.uid),
            start_time: (self.boot + p.start_ticks / TICKS_PER_SEC) as i64,
            exe_sha256,
        };
        let subject = Subject::Process {
            pid: p.pid,
            start_ticks: p.start_ticks,
        };
        matches
            .into_iter()
            .map(|m| {
                let id = self.ids.id(&subject, &m);
                detection(id, m, rules.bundle_version, Target::Process(target.clone()))
            })
            .collect()
    }

    /// Matches of the executable the process runs (read through `/proc/PID/exe`; `exe` is the
    /// name indicators see), from the cache when it is unchanged.
    fn scan_exe(
        &mut self,
        pid: u32,
        exe: &Path,
        scanner: &mut FileScanner<'_>,
    ) -> (Vec<RuleMatch>, String) {
        if let Some(reader) = self.exe_reader.as_mut() {
            return reader.judge(pid, exe);
        }
        let Ok(file) = std::fs::File::open(format!("/proc/{pid}/exe")) else {
            return (Vec::new(), String::new());
        };
        exe_matches(&self.exe_cache, scanner, file, exe, Reading::UpToCap)
    }

    /// Detections for connections to C2 addresses not reported before: listed addresses, and
    /// addresses a DNS answer gave for a listed domain (the domain named).
    pub fn c2_connections(&mut self, rules: &RuleSet) -> Vec<Detection> {
        let links = self.dns.clone();
        let linked = links.as_ref().is_some_and(|l| l.has_listed());
        if !rules.iocs().has_c2() && !linked {
            return Vec::new();
        }
        let tcp = self.tcp_gate.due(
            std::ptr::from_ref(rules) as usize,
            links.as_ref().map_or(0, |l| l.listed_changes()),
        );
        let hits: Vec<(Conn, RuleMatch)> = connections(tcp)
            .into_iter()
            .flat_map(|c| {
                let mut found = rules.iocs().match_ip(c.remote.0);
                if linked && let Some(link) = links.as_ref().and_then(|l| l.listed(c.remote.0)) {
                    let mut m = link.rule;
                    m.description = format!("{} was an answer for {}", c.remote.0, link.name);
                    found.push(m);
                }
                found.into_iter().map(move |m| (c.clone(), m))
            })
            .collect();
        if hits.is_empty() {
            return Vec::new();
        }
        let inodes: HashSet<u64> = hits.iter().map(|(c, _)| c.inode).collect();
        let owners = socket_owners(&inodes);
        let mut out = Vec::new();
        for (c, m) in hits {
            let Some(&pid) = owners.get(&c.inode) else {
                continue;
            };
            if !self
                .reported_conns
                .insert((pid, c.remote.0, c.remote.1, m.rule.clone()))
            {
                continue;
            }
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let subject = Subject::Connection {
                pid,
                start_ticks: read(pid).map_or(0, |p| p.start_ticks),
                remote: c.remote.0,
                port: c.remote.1,
            };
            let id = self.ids.id(&subject, &m);
            let target = Target::Connection(ConnectionTarget {
                pid,
                exe,
                protocol: c.protocol.to_string(),
                local_addr: c.local.0.to_string(),
                local_port: u32::from(c.local.1),
                remote_addr: c.remote.0.to_string(),
                remote_port: u32::from(c.remote.1),
                domain: links
                    .as_ref()
                    .and_then(|l| l.name_of(c.remote.0))
                    .unwrap_or_default(),
            });
            out.push(detection(id, m, rules.bundle_version, target));
        }
        out
    }
}

/// One socket from `/proc/net`.
#[derive(Debug, Clone)]
pub struct Conn {
    pub protocol: &'static str,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
    pub inode: u64,
}

/// Sockets with a remote end (TCP ones only when `tcp`): from the kernel's socket
/// diagnostics, else from `/proc/net`.
pub fn connections(tcp: bool) -> Vec<Conn> {
    crate::detect::sockdiag::connections(tcp).unwrap_or_else(|| proc_net_connections(tcp))
}

/// Sockets with a remote end (TCP ones only when `tcp`), from `/proc/net/{udp,udp6,tcp,tcp6}`.
pub fn proc_net_connections(tcp: bool) -> Vec<Conn> {
    let mut out = Vec::new();
    let all = ["udp", "udp6", "tcp", "tcp6"];
    for proto in &all[..if tcp { 4 } else { 2 }] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/net/{proto}")) else {
            continue;
        };
        out.extend(parse_net(proto, &text));
    }
    out
}

fn parse_net(proto: &'static str, text: &str) -> Vec<Conn> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = parse_addr(f.get(1)?)?;
            let remote = parse_addr(f.get(2)?)?;
            let inode = f.get(9)?.parse().ok()?;
            (!remote.0.is_unspecified() && inode != 0).then_some(Conn {
                protocol: proto,
                local,
                remote,
                inode,
            })
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6), in the kernel's byte order.
fn parse_addr(s: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(addr, 16).ok()?.swap_bytes(),
        )),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.swap_bytes().to_be_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((ip, port))
}

/// Which process holds each socket inode (first found), from `/proc/<pid>/fd`.
pub fn socket_owners(inodes: &HashSet<u64>) -> HashMap<u64, u32> {
    let mut out = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            if let Some(inode) = t
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
                && inodes.contains(&inode)
            {
                out.entry(inode).or_insert(pid);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tcp_tables_are_read_again_after_a_connection_opens_or_the_indicators_change() {
        let before = tcp_opens().expect("/proc/net/snmp counts TCP opens");
        let mut gate = TcpGate::default();
        assert!(gate.due(1, 0), "the first poll reads them");
        assert!(gate.due(2, 0), "another rule set");
        assert!(gate.due(2, 1), "a new DNS link");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _conn = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _accepted = listener.accept().unwrap();
        let after = tcp_opens().unwrap();
        assert!(
            after >= before + 2,
            "one active and one passive open: {before} -> {after}"
        );
        assert!(gate.due(2, 1), "a connection opened since");
    }

    #[test]
    fn proc_net_lines_parse() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 0200007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 12345 1 0000000000000000 20 4 30 10 -1\n   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 999 1\n";
        let c = parse_net("tcp", text);
        assert_eq!(c.len(), 1, "listening sockets have no remote end");
        assert_eq!(c[0].local, ("127.0.0.1".parse().unwrap(), 8080));
        assert_eq!(c[0].remote, ("127.0.0.2".parse().unwrap(), 50000));
        assert_eq!(c[0].inode, 12345);
        let v6 = parse_addr("0000000000000000FFFF00000100007F:0050").unwrap();
        assert_eq!(v6, ("::ffff:127.0.0.1".parse().unwrap(), 80));
    }

    #[test]
    fn an_executable_whose_name_ends_in_deleted_is_not_taken_for_a_deleted_one() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("sleep (deleted)");
        std::fs::copy("/bin/sleep", &exe).unwrap();
        let mut child = std::process::Command::new(&exe).arg("30").spawn().unwrap();
        let seen = read(child.id()).unwrap();
        assert!(!seen.exe_deleted, "{seen:?}");
        assert_eq!(seen.exe.as_deref(), Some(exe.as_path()));
        assert!(fileless(&seen).is_none());
        // Removed while it runs: now it is.
        std::fs::remove_file(&exe).unwrap();
        let gone = read(child.id()).unwrap();
        assert!(gone.exe_deleted, "{gone:?}");
        assert_eq!(gone.exe.as_deref(), Some(exe.as_path()));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn this_process_is_listed_with_its_command_line() {
        let me = read(std::process::id()).unwrap();
        assert_eq!(me.ppid, std::os::unix::process::parent_id());
        assert!(me.exe.is_some());
        assert!(!me.cmdline.is_empty());
    }
}
