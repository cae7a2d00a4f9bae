//! DNS seen on the host, judged against the domain indicators, and tied to the process that
//! asked and to the connection that follows.
//!
//! [`dnscap`](super::dnscap) hands over each UDP datagram from or to port 53. A query's names
//! are looked up in the rule set's domain indicators (a suffix lookup: a listed domain covers
//! its subdomains where its source says so). A match is tied to its process through the
//! query's source port (the kernel's socket diagnostics, then `/proc/PID/fd`), waits up to
//! [`ANSWER_WAIT`] for its answer, and becomes one `dns` detection per process (or host, when
//! no process could be found) per domain per reporting window, with the count of queries.
//!
//! Answers link names to addresses: the addresses a matched name resolved to are indicators
//! for their TTL (at least a minute, at most a day), so the C2 connection check reports the
//! process that connects to one, with the domain named; and a connection detection to any
//! address a recent answer gave carries that name.
//!
//! Nothing about DNS is kept or sent but matches: names asked are looked up and forgotten;
//! the name-to-address links of answers live in memory only, within fixed bounds.
//!
//! A query to a resolver on this host (a stub such as 127.0.0.53, or dnsmasq) shows the asking
//! process; the resolver's own query upstream for the same name, moments later, is that one
//! forwarded, and is not reported again as the resolver's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use simple_dns::rdata::RData;
use simple_dns::{Packet, PacketFlag, QTYPE};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use vedette_engine::RuleMatch;
use vedette_proto::v1::{Detection, DetectionKind, DnsTarget, detection::Target};

use crate::detect::dnscap::{Capture, Datagram};
use crate::detect::procmon::{self, Users};
use crate::detect::{Ids, Subject, detection};
use crate::rules::ActiveRules;
use crate::telemetry::{Counter, Counters};

/// After a round that read more than one packet, how long the next round waits to gather
/// more: at 10,000 queries a second, one wake-up reads about 50.
const GATHER: Duration = Duration::from_millis(5);
/// How long a matched query waits for its answer before it is reported without one.
pub const ANSWER_WAIT: Duration = Duration::from_secs(2);
/// A query from this host for a name a resolver on this host was asked within this long is
/// that resolver forwarding it.
const FORWARD_WINDOW: Duration = Duration::from_secs(5);
/// Bounds of how long an answer's address stays an indicator (its TTL within them).
const LINK_MIN: Duration = Duration::from_secs(60);
const LINK_MAX: Duration = Duration::from_secs(24 * 3600);
/// How long any answer names its addresses for connection detections, at most.
const NAME_MAX: Duration = Duration::from_secs(3600);
/// Bounds of what is held in memory: listed names asked of a local resolver, answers'
/// addresses, matched queries waiting, incidents in their window.
const MAX_LOCAL_ASKS: usize = 16_384;
const MAX_RESOLVED: usize = 65_536;
const MAX_PENDING: usize = 4_096;
const MAX_INCIDENTS: usize = 65_536;
/// Most answers a detection carries.
const MAX_ANSWERS: usize = 32;

/// The names answers gave addresses: shared with the C2 connection check.
#[derive(Default)]
pub struct DnsLinks {
    inner: Mutex<Links>,
    /// Grows each time an answer for a matched name is linked: the connections open then are
    /// checked again.
    listed_changes: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Links {
    /// Addresses a matched name resolved to: indicators while their TTL lasts.
    listed: HashMap<IpAddr, Link>,
    /// Addresses any recent answer gave, with the name asked.
    resolved: HashMap<IpAddr, (String, Instant)>,
}

/// An address a matched name resolved to.
#[derive(Debug, Clone)]
pub struct Link {
    /// The name asked.
    pub name: String,
    /// The indicator the name matched.
    pub rule: RuleMatch,
    until: Instant,
}

impl DnsLinks {
    pub fn new() -> Arc<DnsLinks> {
        Arc::new(DnsLinks::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Links> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many times answers for matched names were linked so far.
    pub fn listed_changes(&self) -> u64 {
        self.listed_changes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether any answer for a matched name holds now (the expired ones are forgotten).
    pub fn has_listed(&self) -> bool {
        let now = Instant::now();
        let mut g = self.lock();
        g.listed.retain(|_, l| l.until > now);
        !g.listed.is_empty()
    }

    /// The matched name `ip` was an answer for, and its indicator, while the answer's TTL
    /// lasts.
    pub fn listed(&self, ip: IpAddr) -> Option<Link> {
        let g = self.lock();
        g.listed
            .get(&ip)
            .filter(|l| l.until > Instant::now())
            .cloned()
    }

    /// The name a recent answer gave `ip` for.
    pub fn name_of(&self, ip: IpAddr) -> Option<String> {
        let g = self.lock();
        g.resolved
            .get(&ip)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(n, _)| n.clone())
    }

    fn add(&self, name: &str, answers: &[(IpAddr, u32)], rule: Option<&RuleMatch>) {
        let now = Instant::now();
        let mut g = self.lock();
        if g.resolved.len() + answers.len() > MAX_RESOLVED {
            g.resolved.retain(|_, (_, until)| *until > now);
        }
        if g.listed.len() + answers.len() > MAX_RESOLVED {
            g.listed.retain(|_, l| l.until > now);
        }
        for &(ip, ttl) in answers {
            let ttl = Duration::from_secs(u64::from(ttl));
            if g.resolved.len() < MAX_RESOLVED {
                g.resolved
                    .insert(ip, (name.to_string(), now + ttl.min(NAME_MAX)));
            }
            if let Some(rule) = rule
                && g.listed.len() < MAX_RESOLVED
            {
                let until = now + ttl.clamp(LINK_MIN, LINK_MAX);
                g.listed.insert(
                    ip,
                    Link {
                        name: name.to_string(),
                        rule: rule.clone(),
                        until,
                    },
                );
                self.listed_changes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// What the DNS watcher runs with.
pub(crate) struct DnsWatch {
    pub rules: Arc<ActiveRules>,
    pub ids: Ids,
    pub det: mpsc::Sender<Detection>,
    pub counters: Arc<Counters>,
    pub stop: CancellationToken,
    /// One detection per process (or host) per domain per this long (`dns_window`).
    pub window: Duration,
    pub links: Arc<DnsLinks>,
}

/// A matched query: the name asked, its type, the process that asked (if found) and the
/// window it opens.
struct Seen<'a> {
    name: &'a str,
    qtype: String,
    owner: Option<procmon::ProcInfo>,
    window_ms: i64,
}

/// A matched query waiting for its answer.
struct Pending {
    detection: Detection,
    key: IncidentKey,
    until: Instant,
}

/// Who asked what: pid and start time (0, 0 for the host), and the name.
type IncidentKey = (u32, u64, String);

struct Incident {
    since: Instant,
    /// Queries in the window, the first included.
    count: u32,
    /// The first query's detection (its answers once they came): what the count is sent in.
    first: Detection,
}

/// The watcher's memory: all of it bounded.
#[derive(Default)]
struct Memory {
    /// By query id and the asking port.
    pending: HashMap<(u16, u16), Pending>,
    incidents: HashMap<IncidentKey, Incident>,
    /// Listed names asked of a resolver on this host, and when.
    local_asks: HashMap<String, Instant>,
}

impl Memory {
    /// Whether a query for a listed `name` is a resolver on this host forwarding one it was
    /// asked moments ago. Only listed names are remembered (`local`: a query to a resolver on
    /// this host).
    fn forwarded(&mut self, name: &str, local: bool) -> bool {
        if local {
            if self.local_asks.len() >= MAX_LOCAL_ASKS {
                self.local_asks.retain(|_, t| t.elapsed() < FORWARD_WINDOW);
            }
            if self.local_asks.len() < MAX_LOCAL_ASKS {
                self.local_asks.insert(name.to_string(), Instant::now());
            }
            return false;
        }
        self.local_asks
            .get(name)
            .is_some_and(|t| t.elapsed() < FORWARD_WINDOW)
    }
}

impl DnsWatch {
    /// Reads DNS off `capture` until shutdown.
    pub(crate) fn run(&self, capture: &Capture) {
        let mut buf = vec![0u8; 65_536];
        let mut memory = Memory::default();
        let mut last_sweep = Instant::now();
        while !self.stop.is_cancelled() {
            // One wake-up for what came meanwhile: the first packet waited for, the others
            // taken while there are any; after a busy round, a pause lets the next gather.
            let mut read = 0u32;
            loop {
                match capture.next(&mut buf, read > 0) {
                    Ok(Some(d)) => {
                        read += 1;
                        self.counters.inc(Counter::DnsPackets);
                        self.on_datagram(&d, &mut memory);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        warn!(error = %e, "reading DNS packets failed; DNS is no longer seen");
                        return;
                    }
                }
            }
            if read > 1 {
                std::thread::sleep(GATHER);
            }
            if last_sweep.elapsed() >= Duration::from_millis(250) {
                last_sweep = Instant::now();
                self.counters
                    .add(Counter::DnsPacketsDropped, capture.dropped());
                if !self.sweep(&mut memory) {
                    return;
                }
            }
        }
    }

    fn on_datagram(&self, d: &Datagram<'_>, memory: &mut Memory) {
        let Ok(msg) = Packet::parse(d.payload) else {
            self.counters.inc(Counter::DnsUnreadable);
            return;
        };
        if msg.has_flags(PacketFlag::RESPONSE) {
            if d.src.1 == 53 {
                self.on_answer(d, &msg, memory);
            }
        } else if d.dst.1 == 53 {
            self.on_query(d, &msg, memory);
        }
    }

    fn on_query(&self, d: &Datagram<'_>, msg: &Packet<'_>, memory: &mut Memory) {
        let rules = self.rules.current.load();
        let local_resolver = d.dst.0.is_loopback();
        for q in &msg.questions {
            let Some(name) = name_of(&q.qname) else {
                continue;
            };
            if !rules.iocs().has_domains() {
                continue;
            }
            let Some(m) = best(rules.iocs().match_domain_normal(&name)) else {
                continue;
            };
            if memory.forwarded(&name, local_resolver) {
                continue;
            }
            let owner = owner_of(d.src);
            let key: IncidentKey = owner.as_ref().map_or((0, 0, name.clone()), |p| {
                (p.pid, p.start_ticks, name.clone())
            });
            if let Some(i) = memory.incidents.get_mut(&key)
                && i.since.elapsed() < self.window
            {
                i.count = i.count.saturating_add(1);
                self.counters.inc(Counter::DnsRepeats);
                if let Some(p) = memory.pending.values_mut().find(|p| p.key == key) {
                    set_count(&mut p.detection, i.count);
                }
                continue;
            }
            if memory.incidents.len() >= MAX_INCIDENTS && !self.end_windows(memory, true) {
                return;
            }
            let seen = Seen {
                name: &name,
                qtype: qtype_name(q.qtype),
                owner,
                window_ms: vedette_proto::now_ms(),
            };
            let detection = self.detection(d, &seen, m);
            memory.incidents.insert(
                key.clone(),
                Incident {
                    since: Instant::now(),
                    count: 1,
                    first: detection.clone(),
                },
            );
            if memory.pending.len() >= MAX_PENDING {
                // Reported at once, without its answer, rather than held.
                if !self.send(detection) {
                    return;
                }
                continue;
            }
            let earlier = memory.pending.insert(
                (msg.id(), d.src.1),
                Pending {
                    detection,
                    key,
                    until: Instant::now() + ANSWER_WAIT,
                },
            );
            // The same id from the same port again before its answer: the earlier one is
            // reported as it stands.
            if let Some(p) = earlier
                && !self.send(p.detection)
            {
                return;
            }
        }
    }

    fn on_answer(&self, d: &Datagram<'_>, msg: &Packet<'_>, memory: &mut Memory) {
        let mut addresses: Vec<(IpAddr, u32)> = Vec::new();
        let mut texts: Vec<String> = Vec::new();
        for rr in &msg.answers {
            let text = match &rr.rdata {
                RData::A(a) => {
                    let ip = IpAddr::from(std::net::Ipv4Addr::from(a.address));
                    addresses.push((ip, rr.ttl));
                    ip.to_string()
                }
                RData::AAAA(a) => {
                    let ip = IpAddr::from(std::net::Ipv6Addr::from(a.address));
                    addresses.push((ip, rr.ttl));
                    ip.to_string()
                }
                RData::CNAME(c) => c.0.to_string(),
                _ => continue,
            };
            if texts.len() < MAX_ANSWERS {
                texts.push(text);
            }
        }
        let asked = msg.questions.first().and_then(|q| name_of(&q.qname));
        if let Some(name) = asked.as_deref()
            && !addresses.is_empty()
        {
            let rules = self.rules.current.load();
            let rule = if rules.iocs().has_domains() {
                best(rules.iocs().match_domain_normal(name))
            } else {
                None
            };
            self.links.add(name, &addresses, rule.as_ref());
        }
        if let Some(mut p) = memory.pending.remove(&(msg.id(), d.dst.1)) {
            if let Some(Target::Dns(t)) = &mut p.detection.target {
                t.answers.clone_from(&texts);
            }
            if let Some(Some(Target::Dns(t))) = memory
                .incidents
                .get_mut(&p.key)
                .map(|i| &mut i.first.target)
            {
                t.answers = texts;
            }
            self.send(p.detection);
        }
    }

    /// Reports the queries whose answer did not come in time; forgets incidents whose window
    /// ended. False once the spool writer is gone.
    fn sweep(&self, memory: &mut Memory) -> bool {
        let now = Instant::now();
        let late: Vec<(u16, u16)> = memory
            .pending
            .iter()
            .filter(|(_, p)| p.until <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in late {
            if let Some(p) = memory.pending.remove(&k)
                && !self.send(p.detection)
            {
                return false;
            }
        }
        memory
            .local_asks
            .retain(|_, t| t.elapsed() < FORWARD_WINDOW);
        self.end_windows(memory, false)
    }

    /// Ends the incidents whose window is over (all of them when `all`, to make room): each
    /// with more than one query is reported again with the count of all of them. False once
    /// the spool writer is gone.
    fn end_windows(&self, memory: &mut Memory, all: bool) -> bool {
        let window = self.window;
        let waiting: std::collections::HashSet<&IncidentKey> =
            memory.pending.values().map(|p| &p.key).collect();
        let over: Vec<IncidentKey> = memory
            .incidents
            .iter()
            .filter(|(k, i)| (all || i.since.elapsed() >= window) && !waiting.contains(k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in over {
            let Some(i) = memory.incidents.remove(&key) else {
                continue;
            };
            if i.count > 1 && !self.send(Self::summary(i, window)) {
                return false;
            }
        }
        true
    }

    /// The report that counts the queries of a window: the first query's detection (its id,
    /// so the collector raises the count of the one incident it stored) with the count.
    fn summary(i: Incident, window: Duration) -> Detection {
        let mut d = i.first;
        let Some(Target::Dns(t)) = &mut d.target else {
            return d;
        };
        t.count = i.count;
        d.description = format!(
            "{} queries for {} within {}",
            i.count,
            t.name,
            humantime::format_duration(window)
        );
        d
    }

    fn detection(&self, d: &Datagram<'_>, seen: &Seen<'_>, m: RuleMatch) -> Detection {
        let (name, owner) = (seen.name, &seen.owner);
        let (pid, start_ticks) = owner.as_ref().map_or((0, 0), |p| (p.pid, p.start_ticks));
        let subject = Subject::Dns {
            pid,
            start_ticks,
            name,
            window_ms: seen.window_ms,
        };
        let id = self.ids.id(&subject, &m);
        let mut target = DnsTarget {
            name: name.to_string(),
            qtype: seen.qtype.clone(),
            resolver_addr: d.dst.0.to_string(),
            local_addr: d.src.0.to_string(),
            local_port: u32::from(d.src.1),
            count: 1,
            ..Default::default()
        };
        let description = match owner {
            Some(p) => {
                target.attributed = true;
                target.pid = p.pid;
                target.start_time = procmon::start_time_secs(p.start_ticks);
                target.exe = p
                    .exe
                    .as_ref()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_default();
                target.cmdline = p.cmdline.clone();
                target.user = Users::load().name(p.uid);
                format!("{} asked for {name}", p.name)
            }
            None => format!("a query for {name}, from no process found on this host"),
        };
        let version = self.rules.current.load().bundle_version;
        let mut out = detection(id, m, version, Target::Dns(target));
        out.kind = DetectionKind::Dns as i32;
        out.description = description;
        out
    }

    /// Hands a detection to the spool writer; false once it is gone.
    fn send(&self, d: Detection) -> bool {
        debug!(rule = %d.rule, "DNS query for a listed domain");
        self.counters.inc(Counter::Detections);
        self.det.blocking_send(d).is_ok()
    }
}

fn set_count(d: &mut Detection, count: u32) {
    if let Some(Target::Dns(t)) = &mut d.target {
        t.count = count;
    }
}

/// The match to report of several: the highest score, the first of equals.
fn best(matches: Vec<RuleMatch>) -> Option<RuleMatch> {
    let top = matches.iter().map(|m| m.score).max()?;
    matches.into_iter().find(|m| m.score == top)
}

/// A name asked, in the one form domains are compared in; None for no domain name (a label
/// holding a dot, an empty label, a name too long).
fn name_of(name: &simple_dns::Name<'_>) -> Option<String> {
    let mut text = String::with_capacity(64);
    for label in name.as_bytes() {
        if label.contains(&b'.') {
            return None;
        }
        if !text.is_empty() {
            text.push('.');
        }
        text.push_str(&String::from_utf8_lossy(label));
    }
    vedette_engine::domains::normalise(&text)
}

/// `A`, `AAAA`, `TXT`, ... as the query asked.
fn qtype_name(q: QTYPE) -> String {
    match q {
        QTYPE::TYPE(t) => format!("{t:?}"),
        other => format!("{other:?}"),
    }
}

/// The process whose UDP socket sent from `src` (a port on this host), if any.
fn owner_of(src: (IpAddr, u16)) -> Option<procmon::ProcInfo> {
    let inode = crate::detect::sockdiag::udp_socket(src)?;
    let owners = procmon::socket_owners(&std::collections::HashSet::from([inode]));
    owners.get(&inode).and_then(|&pid| procmon::read(pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, score: u32) -> RuleMatch {
        RuleMatch {
            kind: vedette_engine::MatchKind::Connection,
            rule: name.into(),
            source: "c2-iocs.txt".into(),
            score,
            description: String::new(),
            author: String::new(),
            reference: String::new(),
            indicator: Default::default(),
        }
    }

    #[test]
    fn links_hold_for_the_ttl_within_bounds_and_name_answers() {
        let links = DnsLinks::new();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let rule = rule("evil.example", 75);
        links.add("cdn.evil.example", &[(ip, 0)], Some(&rule));
        links.add("fine.example", &[(other, 30)], None);
        let l = links.listed(ip).expect("a listed answer");
        assert_eq!(l.name, "cdn.evil.example");
        assert_eq!(l.rule.rule, "evil.example");
        // A TTL of 0 still holds the link a minute.
        assert!(l.until >= Instant::now() + LINK_MIN - Duration::from_secs(1));
        assert!(links.listed(other).is_none());
        assert_eq!(links.name_of(other).as_deref(), Some("fine.example"));
        // A TTL of 0 names nothing for connections.
        assert!(links.name_of(ip).is_none());
    }

    #[test]
    fn the_best_match_is_the_highest_score_first() {
        let m = rule;
        assert_eq!(
            best(vec![m("a", 50), m("b", 80), m("c", 80)]).unwrap().rule,
            "b"
        );
        assert!(best(Vec::new()).is_none());
    }
}
