//! The sharing policy: what exports may carry about each participating organisation
//! (`full`, `anonymised`, `none`), its TLP marking, and the STIX and ECS output made under it.

use std::net::IpAddr;

use serde_json::{Value, json};
use vedette_proto::v1::{DetectionKind, Org, StoredDetection, detection};

use crate::{ecs, stix, stix_id};

/// What exports carry about one participating organisation (`vedettectl orgs set --share`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// Everything the agent reported: host names, paths, users, process details.
    Full,
    /// The indicator, counts, first and last seen, and the organisation's sector and country;
    /// nothing that names a host, a path, a user, a command line or an internal address.
    Anonymised,
    /// Nothing about the organisation leaves the collector.
    None,
}

impl Share {
    pub const NAMES: &'static str = "full, anonymised or none";

    pub fn parse(s: &str) -> Option<Share> {
        match s {
            "full" => Some(Share::Full),
            "anonymised" | "anonymized" => Some(Share::Anonymised),
            "none" => Some(Share::None),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Share::Full => "full",
            Share::Anonymised => "anonymised",
            Share::None => "none",
        }
    }
}

/// A Traffic Light Protocol 2.0 level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tlp {
    Clear,
    Green,
    Amber,
    AmberStrict,
    Red,
}

impl Tlp {
    pub const NAMES: &'static str = "clear, green, amber, amber+strict or red";

    pub fn parse(s: &str) -> Option<Tlp> {
        match s.to_ascii_lowercase().trim_start_matches("tlp:") {
            "clear" | "white" => Some(Tlp::Clear),
            "green" => Some(Tlp::Green),
            "amber" => Some(Tlp::Amber),
            "amber+strict" => Some(Tlp::AmberStrict),
            "red" => Some(Tlp::Red),
            _ => None,
        }
    }

    /// As the TLP 2.0 STIX extension and MISP's `tlp` taxonomy write it: `amber+strict`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tlp::Clear => "clear",
            Tlp::Green => "green",
            Tlp::Amber => "amber",
            Tlp::AmberStrict => "amber+strict",
            Tlp::Red => "red",
        }
    }

    /// The MISP tag (`tlp` taxonomy).
    pub fn misp_tag(self) -> String {
        format!("tlp:{}", self.as_str())
    }

    /// The id of the published STIX 2.1 marking definition of this TLP 2.0 level.
    pub fn marking_id(self) -> &'static str {
        match self {
            Tlp::Clear => "marking-definition--94868c89-83c2-464b-929b-a1a8aa3c8487",
            Tlp::Green => "marking-definition--bab4a63c-aed9-4cf5-a766-dfca5abac2bb",
            Tlp::Amber => "marking-definition--55d920b0-5e8b-4f79-9ee9-91f868d9b421",
            Tlp::AmberStrict => "marking-definition--939a9414-2ddd-4d32-a0cd-375ea402b003",
            Tlp::Red => "marking-definition--e828b379-4e03-4974-9ac4-e53a884c97c1",
        }
    }

    /// The marking definition itself, as the TLP 2.0 extension for STIX 2.1 publishes it.
    pub fn marking_definition(self) -> Value {
        json!({
            "type": "marking-definition",
            "spec_version": "2.1",
            "id": self.marking_id(),
            "created": "2022-10-01T00:00:00.000Z",
            "name": format!("TLP:{}", self.as_str().to_uppercase()),
            "extensions": {
                TLP_EXTENSION: {
                    "extension_type": "property-extension",
                    "tlp_2_0": self.as_str(),
                }
            }
        })
    }
}

/// The extension definition of TLP 2.0 markings in STIX 2.1.
const TLP_EXTENSION: &str = "extension-definition--60a3c5c5-0d10-413e-aab3-9e08dde9e88d";

/// An organisation's sharing policy, with what exports may say of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sharing {
    pub name: String,
    /// Its STIX identity id.
    pub stix_id: String,
    /// A STIX industry sector, or empty.
    pub sector: String,
    /// ISO 3166-1 alpha-2, or empty.
    pub country: String,
    pub share: Share,
    pub tlp: Tlp,
}

/// The organisation every collector has from the start: agents enrolled without `--org`
/// belong to it.
pub const DEFAULT_ORG: &str = "default";

impl Sharing {
    /// The policy exports apply to an organisation's detections; an unreadable share or TLP
    /// shares nothing, at TLP:RED. The default organisation is named as the exports' producer
    /// and keeps the identity exports gave it before organisations existed, so a
    /// single-organisation collector's exports do not change.
    pub fn of_org(org: &Org, producer: &str) -> Sharing {
        let (name, stix_id) = if org.name == DEFAULT_ORG {
            let legacy = stix::identity(producer);
            let id = legacy["id"].as_str().unwrap_or_default().to_string();
            (producer.to_string(), id)
        } else {
            (org.name.clone(), org.stix_id.clone())
        };
        Sharing {
            name,
            stix_id,
            sector: org.sector.clone(),
            country: org.country.clone(),
            share: Share::parse(&org.share).unwrap_or(Share::None),
            tlp: Tlp::parse(&org.tlp).unwrap_or(Tlp::Red),
        }
    }

    /// The STIX objects naming who made the sightings: the organisation's identity (`full`),
    /// or one anonymous identity per sector and country (`anonymised`); with its location when
    /// the country is known. The first object is the identity.
    pub fn identity_objects(&self) -> Vec<Value> {
        let (id, name) = match self.share {
            Share::Full => (self.stix_id.clone(), self.name.clone()),
            _ => (
                stix_id(
                    "identity",
                    &format!("anonymous|{}|{}", self.sector, self.country),
                ),
                self.anonymous_name(),
            ),
        };
        let mut identity = json!({
            "type": "identity",
            "spec_version": "2.1",
            "id": id,
            "created": "2026-01-01T00:00:00.000Z",
            "modified": "2026-01-01T00:00:00.000Z",
            "name": name,
            "identity_class": "organization",
        });
        if !self.sector.is_empty() {
            identity["sectors"] = json!([self.sector]);
        }
        let mut out = vec![identity];
        if !self.country.is_empty() {
            let location = stix_id("location", &self.country);
            out.push(json!({
                "type": "location",
                "spec_version": "2.1",
                "id": location,
                "created": "2026-01-01T00:00:00.000Z",
                "modified": "2026-01-01T00:00:00.000Z",
                "country": self.country,
            }));
            out.push(json!({
                "type": "relationship",
                "spec_version": "2.1",
                "id": stix_id("relationship", &format!("{id}|located-at|{location}")),
                "created": "2026-01-01T00:00:00.000Z",
                "modified": "2026-01-01T00:00:00.000Z",
                "relationship_type": "located-at",
                "source_ref": id,
                "target_ref": location,
            }));
        }
        out
    }

    /// How an anonymised organisation is named: by its sector and country only.
    pub fn anonymous_name(&self) -> String {
        let what: Vec<&str> = [self.sector.as_str(), self.country.as_str()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect();
        if what.is_empty() {
            "Anonymous participant".to_string()
        } else {
            format!("Anonymous participant ({})", what.join(", "))
        }
    }

    /// What `misp` sightings give as their source.
    pub fn sighting_source(&self) -> String {
        match self.share {
            Share::Full => self.name.clone(),
            _ => self.anonymous_name(),
        }
    }
}

/// A stored detection with everything that could name a host, a path, a user, a command line
/// or an internal address removed: what `anonymised` exports are made from. What stays is
/// the indicator (rule, its source and ids, techniques), the hashes and size of a file, a public
/// remote address and port of a connection, a DNS query's name, and the times. The description goes too: it may
/// quote what was observed.
pub fn anonymise(s: &StoredDetection) -> StoredDetection {
    let mut d = s.detection.clone().unwrap_or_default();
    match &mut d.target {
        Some(detection::Target::File(f)) => {
            // A file name stays only when the indicator spells it out (a literal file-name
            // indicator): a pattern's match is the host's own name.
            let name = f.path.rsplit('/').next().unwrap_or_default();
            let name = if d.kind == DetectionKind::Filename as i32 && spells(&d.rule, name) {
                name.to_string()
            } else {
                String::new()
            };
            f.path = name;
            f.raw_path.clear();
        }
        Some(detection::Target::Process(p)) => {
            *p = vedette_proto::v1::ProcessTarget {
                exe_sha256: std::mem::take(&mut p.exe_sha256),
                ..Default::default()
            };
        }
        Some(detection::Target::Connection(c)) => anonymise_connection(c),
        Some(detection::Target::Dns(q)) => anonymise_dns(q),
        None => {}
    }
    anonymise_rest(d, s)
}

/// A connection keeps its protocol, and its remote address and port when the address is public.
fn anonymise_connection(c: &mut vedette_proto::v1::ConnectionTarget) {
    // An internal address names an internal host.
    let remote = std::mem::take(&mut c.remote_addr);
    let public = remote.parse::<IpAddr>().is_ok_and(is_public);
    // The name it was resolved from goes with it: public names for public addresses.
    let domain = std::mem::take(&mut c.domain);
    *c = vedette_proto::v1::ConnectionTarget {
        protocol: std::mem::take(&mut c.protocol),
        remote_addr: if public { remote } else { String::new() },
        remote_port: c.remote_port,
        domain: if public { domain } else { String::new() },
        ..Default::default()
    };
}

/// A DNS query keeps its name (the indicator), its type, the public addresses it resolved to
/// and its count; the process, the user, the local address and an internal resolver go.
fn anonymise_dns(q: &mut vedette_proto::v1::DnsTarget) {
    let public = |a: &String| a.parse::<IpAddr>().is_ok_and(is_public);
    let resolver = std::mem::take(&mut q.resolver_addr);
    *q = vedette_proto::v1::DnsTarget {
        name: std::mem::take(&mut q.name),
        qtype: std::mem::take(&mut q.qtype),
        answers: q.answers.iter().filter(|a| public(a)).cloned().collect(),
        resolver_addr: if public(&resolver) {
            resolver
        } else {
            String::new()
        },
        count: q.count,
        ..Default::default()
    };
}

/// What every anonymised detection loses besides its target: the description, a host's own
/// rule names.
fn anonymise_rest(mut d: vedette_proto::v1::Detection, s: &StoredDetection) -> StoredDetection {
    // A description may quote what was observed (a built-in finding names the process and
    // its executable, a memory match its region).
    d.description.clear();
    // A host's own rules are named by the host's own file, and their names are the host's too:
    // a stable stand-in is left, so that repeats of one rule still count together.
    let local = match &d.indicator {
        Some(i) => i.origin == "local",
        None => d.bundle_version == 0,
    };
    if local {
        let stand_in = format!(
            "local-{}",
            &uuid::Uuid::new_v5(&crate::NAMESPACE, d.rule.as_bytes())
                .simple()
                .to_string()[..12]
        );
        d.source = "local".into();
        d.rule = stand_in.clone();
        if let Some(i) = &mut d.indicator {
            i.origin = "local".into();
            i.id = stand_in;
        }
    }
    StoredDetection {
        detection: Some(d),
        agent_id: String::new(),
        hostname: String::new(),
        received_at_ms: s.received_at_ms,
        seq: s.seq,
        org: String::new(),
        alert_id: s.alert_id,
        alert_status: s.alert_status.clone(),
        exception_id: String::new(),
        response: s.response.clone(),
    }
}

/// Whether a file-name indicator's text names `name` literally: as one of its words once the
/// regular expression's escapes (`\.`) are taken off, between separators (`\`, `/`, quotes,
/// anchors, brackets, spaces).
fn spells(indicator: &str, name: &str) -> bool {
    if name.is_empty() {
        return false;
    }
    let mut text = String::with_capacity(indicator.len());
    let mut chars = indicator.chars();
    while let Some(c) = chars.next() {
        match c {
            // `\\` is a path separator, `\.` a dot.
            '\\' => match chars.next() {
                Some(n) if n.is_ascii_alphanumeric() => text.push(' '),
                Some('\\') => text.push(' '),
                Some(n) => text.push(n),
                None => {}
            },
            c => text.push(c),
        }
    }
    text.split(|c: char| " /'\"^$[]()|=,".contains(c))
        .any(|word| word == name)
}

/// Whether an address may name a host outside any private network: not loopback, private
/// (RFC 1918, unique local), link-local, shared (RFC 6598), unspecified or multicast.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

/// Detections of one indicator by one organisation (as it is shared) in one window: one STIX
/// sighting, however many detections. Its id is derived from the three, so a later batch of
/// the same window sends the same sighting again, a later version with the higher count.
#[derive(Debug, Clone)]
pub struct SightingGroup {
    /// The sighting's id.
    pub id: String,
    pub count: u64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub window_start_ms: i64,
    pub window_ms: i64,
    /// Under `anonymised`: the sighting carries the window's bounds, not the detections'
    /// times, and no observed data.
    pub anonymised: bool,
    /// The sighting as the group's first detection made it (count and times set by
    /// [`SightingGroup::sighting`]).
    template: Value,
    /// What it refers to: the identities, TLP marking, the indicator generated for a rule, and
    /// (`full` only) the observed data and its observables.
    pub companions: Vec<Value>,
}

/// How far a group of detections reached: what a sink keeps of a sighting between batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub count: u64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub created_ms: i64,
    pub modified_ms: i64,
}

impl SightingGroup {
    /// The sighting as of `tally` (this group's detections counted in it).
    pub fn sighting(&self, tally: &Tally) -> Value {
        let mut o = self.template.clone();
        let (first, last) = match self.anonymised {
            true => (
                self.window_start_ms,
                self.window_start_ms + self.window_ms - 1,
            ),
            false => (tally.first_seen_ms, tally.last_seen_ms),
        };
        o["id"] = json!(self.id);
        o["count"] = json!(tally.count.min(999_999_999));
        o["first_seen"] = json!(crate::ts(first));
        o["last_seen"] = json!(crate::ts(last));
        o["created"] = json!(crate::ts(tally.created_ms));
        o["modified"] = json!(crate::ts(tally.modified_ms.max(tally.created_ms)));
        o
    }

    /// This group's own tally, as if nothing of its window had been sent before.
    pub fn tally(&self, now_ms: i64) -> Tally {
        Tally {
            count: self.count,
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.last_seen_ms,
            created_ms: now_ms,
            modified_ms: now_ms,
        }
    }
}

impl Tally {
    /// `before` with `group` added: counts add up, first and last seen widen, modified moves
    /// strictly forward (TAXII keeps each version by it).
    pub fn after(before: &Tally, group: &SightingGroup, now_ms: i64) -> Tally {
        Tally {
            count: before.count + group.count,
            first_seen_ms: before.first_seen_ms.min(group.first_seen_ms),
            last_seen_ms: before.last_seen_ms.max(group.last_seen_ms),
            created_ms: before.created_ms,
            modified_ms: now_ms.max(before.modified_ms + 1),
        }
    }
}

/// The sightings of `detections`, each organisation's under its policy, grouped per indicator,
/// organisation and window of `window_ms` (by observation time).
pub fn sighting_groups(
    detections: &[StoredDetection],
    policy: &dyn Fn(&str) -> Option<Sharing>,
    producer: &str,
    window_ms: i64,
) -> Vec<SightingGroup> {
    let window_ms = window_ms.max(1);
    let who = stix::identity(producer);
    let who_id = who["id"].as_str().unwrap_or_default().to_string();
    let mut groups: std::collections::BTreeMap<String, SightingGroup> = Default::default();
    for s in detections {
        let Some(policy) = policy(&s.org) else {
            continue;
        };
        let Some(shared) = under(s, policy.share) else {
            continue;
        };
        let anonymised = policy.share == Share::Anonymised;
        let marking = policy.tlp.marking_id();
        let made_by = policy.identity_objects();
        let by_id = made_by[0]["id"].as_str().unwrap_or_default().to_string();
        let mut objects = stix::sighting(&shared, &by_id);
        let Some(mut sighting) = objects.pop() else {
            continue;
        };
        let observed_at = shared.detection.as_ref().map_or(0, |d| d.observed_at_ms);
        let (seen_first, seen_last) = seen(&shared);
        let window_start = observed_at.div_euclid(window_ms) * window_ms;
        let key = format!(
            "{}|{by_id}|{window_start}",
            sighting["sighting_of_ref"].as_str().unwrap_or_default()
        );
        let mut companions = vec![who.clone(), policy.tlp.marking_definition()];
        companions.extend(made_by);
        for mut o in objects {
            let observed = matches!(o["type"].as_str(), Some("observed-data")) || is_sco(&o);
            if anonymised && observed {
                continue;
            }
            if !is_sco(&o) {
                o["created_by_ref"] = json!(who_id);
            }
            o["object_marking_refs"] = json!([marking]);
            companions.push(o);
        }
        sighting["created_by_ref"] = json!(who_id);
        sighting["object_marking_refs"] = json!([marking]);
        let refs = sighting["observed_data_refs"].as_array().cloned();
        let g = groups.entry(key.clone()).or_insert_with(|| {
            if let Some(o) = sighting.as_object_mut() {
                o.remove("observed_data_refs");
            }
            SightingGroup {
                id: crate::stix_id("sighting", &key),
                count: 0,
                first_seen_ms: seen_first,
                last_seen_ms: seen_last,
                window_start_ms: window_start,
                window_ms,
                anonymised,
                template: sighting,
                companions: Vec::new(),
            }
        });
        g.count += 1;
        g.first_seen_ms = g.first_seen_ms.min(seen_first);
        g.last_seen_ms = g.last_seen_ms.max(seen_last);
        if let (false, Some(refs)) = (anonymised, refs) {
            let all = g.template["observed_data_refs"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            g.template["observed_data_refs"] =
                json!(all.into_iter().chain(refs).collect::<Vec<_>>());
        }
        g.companions.extend(companions);
    }
    groups.into_values().collect()
}

/// The STIX objects of `groups`, each sighting as its tally says, every object once.
pub fn group_objects(
    groups: &[SightingGroup],
    tally: &dyn Fn(&SightingGroup) -> Tally,
) -> Vec<Value> {
    let mut objects = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for g in groups {
        for o in g.companions.iter().cloned().chain([g.sighting(&tally(g))]) {
            if seen.insert(o["id"].as_str().unwrap_or_default().to_string()) {
                objects.push(o);
            }
        }
    }
    objects
}

/// A false-positive verdict on detections of an outside indicator, as it may leave: the
/// indicator (`source` stix or misp, its id), the organisation the alert belongs to, when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FalsePositive {
    pub source: String,
    pub indicator: String,
    pub org: String,
    pub verdict: u64,
    pub at_ms: i64,
}

/// The STIX opinions of the false positives of STIX indicators, each under its
/// organisation's policy (none of an organisation that shares nothing), with the identities
/// and markings they refer to.
pub fn opinion_objects(
    verdicts: &[FalsePositive],
    policy: &dyn Fn(&str) -> Option<Sharing>,
    producer: &str,
) -> Vec<Value> {
    let who = stix::identity(producer);
    let who_id = who["id"].as_str().unwrap_or_default().to_string();
    let mut objects = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for fp in verdicts.iter().filter(|f| f.source == "stix") {
        let Some(policy) = policy(&fp.org).filter(|p| p.share != Share::None) else {
            continue;
        };
        let mut opinion =
            stix::false_positive_opinion(&fp.indicator, fp.verdict, fp.at_ms, &who_id);
        opinion["object_marking_refs"] = json!([policy.tlp.marking_id()]);
        for o in [who.clone(), policy.tlp.marking_definition(), opinion] {
            if seen.insert(o["id"].as_str().unwrap_or_default().to_string()) {
                objects.push(o);
            }
        }
    }
    objects
}

/// The STIX objects of a set of detections as `vedettectl export stix` writes them: sightings
/// grouped per indicator, organisation and window of `window_ms`, each counting its
/// detections, under each organisation's policy.
pub fn stix_objects(
    detections: &[StoredDetection],
    policy: &dyn Fn(&str) -> Option<Sharing>,
    producer: &str,
    window_ms: i64,
    now_ms: i64,
) -> Vec<Value> {
    let groups = sighting_groups(detections, policy, producer, window_ms);
    group_objects(&groups, &|g| g.tally(now_ms))
}

fn is_sco(o: &Value) -> bool {
    matches!(
        o["type"].as_str(),
        Some("file" | "process" | "ipv4-addr" | "ipv6-addr" | "network-traffic")
    )
}

/// The detections a MISP event may hold, each under its organisation's policy: none of an
/// organisation that shares nothing (or has no policy), anonymised ones of an `anonymised` one.
pub fn shared_detections(
    detections: &[StoredDetection],
    policy: &dyn Fn(&str) -> Option<Sharing>,
) -> Vec<StoredDetection> {
    detections
        .iter()
        .filter_map(|s| under(s, policy(&s.org)?.share))
        .collect()
}

/// What of a detection a policy lets out: all of it, its anonymised form, or nothing.
fn under(s: &StoredDetection, share: Share) -> Option<StoredDetection> {
    match share {
        Share::None => None,
        Share::Full => Some(s.clone()),
        Share::Anonymised => Some(anonymise(s)),
    }
}

/// The ECS document a sink writes for one detection under its organisation's policy; None
/// when the policy shares nothing.
pub fn ecs_document(s: &StoredDetection, policy: &Sharing) -> Option<Value> {
    let mut v = match policy.share {
        Share::None => return None,
        Share::Full => {
            let mut v = ecs::document(s);
            v["organization"] = json!({"id": policy.stix_id, "name": policy.name});
            v
        }
        Share::Anonymised => {
            let mut v = ecs::document(&anonymise(s));
            // Of a process, only its image's hash stays.
            let image_hash = v["process"].get("hash").cloned();
            if let Some(m) = v.as_object_mut() {
                m.remove("host");
                m.remove("agent");
                m.remove("process");
                m.remove("user");
                m.remove("source");
                let no_ip = m
                    .get("destination")
                    .is_some_and(|d| d["ip"].as_str() == Some(""));
                if no_ip && let Some(d) = m.get_mut("destination").and_then(Value::as_object_mut) {
                    d.remove("ip");
                }
            }
            if let Some(rule) = v.get_mut("rule").and_then(Value::as_object_mut) {
                rule.remove("description");
            }
            if let Some(file) = v.get_mut("file").and_then(Value::as_object_mut) {
                file.remove("path");
                if file.get("name").and_then(Value::as_str) == Some("") {
                    file.remove("name");
                }
            }
            if let Some(hash) = image_hash {
                v["process"] = json!({"hash": hash});
            }
            v["organization"] = json!({"name": policy.anonymous_name()});
            v
        }
    };
    v["threat"]["indicator"]["marking"] = json!({"tlp": policy.tlp.as_str().to_uppercase()});
    v["labels"]["tlp"] = json!(policy.tlp.as_str());
    if !policy.sector.is_empty() {
        v["labels"]["sector"] = json!(policy.sector);
    }
    if !policy.country.is_empty() {
        v["labels"]["country"] = json!(policy.country);
    }
    Some(v)
}

/// When what a detection saw was seen: at the detection, or (a match found in an agent's
/// history) from its first to its last sighting there.
fn seen(s: &StoredDetection) -> (i64, i64) {
    let d = s.detection.as_ref();
    let at = d.map_or(0, |d| d.observed_at_ms);
    match d.and_then(|d| d.retro) {
        Some(r) if r.first_seen_ms > 0 => (r.first_seen_ms, r.last_seen_ms),
        _ => (at, at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vedette_proto::v1::{ConnectionTarget, Detection, FileTarget, IndicatorRef, ProcessTarget};

    fn policy(share: Share) -> Sharing {
        Sharing {
            name: "acme".into(),
            stix_id: "identity--00000000-0000-4000-8000-000000000001".into(),
            sector: "energy".into(),
            country: "DE".into(),
            share,
            tlp: Tlp::AmberStrict,
        }
    }

    fn stored(target: detection::Target, kind: DetectionKind) -> StoredDetection {
        StoredDetection {
            detection: Some(Detection {
                id: "d1".into(),
                kind: kind as i32,
                rule: "evil".into(),
                description: "process 42 runs /home/alice/x".into(),
                target: Some(target),
                indicator: Some(IndicatorRef {
                    source: "yara".into(),
                    id: "evil".into(),
                    origin: "bundle".into(),
                    ..Default::default()
                }),
                source: "apt.yar".into(),
                bundle_version: 3,
                ..Default::default()
            }),
            agent_id: "agent-1".into(),
            hostname: "db01.acme.internal".into(),
            received_at_ms: 1,
            seq: 1,
            org: "acme".into(),
            ..Default::default()
        }
    }

    const SECRETS: &[&str] = &[
        "db01.acme.internal",
        "agent-1",
        "/home/alice",
        "alice",
        "curl http://10.0.0.5",
        "10.0.0.9",
        "/etc/vedette/rules",
        "acme_db01_backdoor",
        "192.168.7.20",
        "fd00::7",
        "payroll-2026",
    ];

    fn all_kinds() -> Vec<StoredDetection> {
        vec![
            stored(
                detection::Target::File(FileTarget {
                    path: "/home/alice/payload.bin".into(),
                    sha256: "ab".repeat(32),
                    size: 3,
                    ..Default::default()
                }),
                DetectionKind::Yara,
            ),
            stored(
                detection::Target::Process(ProcessTarget {
                    pid: 42,
                    name: "curl".into(),
                    exe: "/home/alice/bin/curl".into(),
                    cmdline: "curl http://10.0.0.5".into(),
                    user: "alice".into(),
                    ..Default::default()
                }),
                DetectionKind::Process,
            ),
            stored(
                detection::Target::Connection(ConnectionTarget {
                    pid: 42,
                    exe: "/home/alice/bin/curl".into(),
                    protocol: "TCP".into(),
                    local_addr: "10.0.0.9".into(),
                    local_port: 5555,
                    remote_addr: "203.0.113.7".into(),
                    remote_port: 443,
                    domain: "c2.example.org".into(),
                }),
                DetectionKind::Connection,
            ),
            stored(
                detection::Target::Dns(vedette_proto::v1::DnsTarget {
                    name: "c2.example.org".into(),
                    qtype: "A".into(),
                    answers: vec!["203.0.113.7".into(), "10.0.0.5".into()],
                    resolver_addr: "192.168.7.20".into(),
                    attributed: true,
                    pid: 42,
                    start_time: 1_700_000_000,
                    exe: "/home/alice/bin/curl".into(),
                    cmdline: "curl http://10.0.0.5".into(),
                    user: "alice".into(),
                    local_addr: "10.0.0.9".into(),
                    local_port: 5555,
                    count: 3,
                }),
                DetectionKind::Dns,
            ),
            // A host's own rule, loaded beside a bundle.
            local_rule(),
            // Connections to internal addresses.
            internal("192.168.7.20"),
            internal("fd00::7"),
            // A pattern's match: the file name is the host's.
            stored_named("/srv/share/payroll-2026.xlsm", "(?i)\\.xlsm$"),
        ]
    }

    fn local_rule() -> StoredDetection {
        let mut s = stored(
            detection::Target::File(FileTarget {
                path: "/srv/x".into(),
                sha256: "cd".repeat(32),
                ..Default::default()
            }),
            DetectionKind::Yara,
        );
        let d = s.detection.as_mut().unwrap();
        d.rule = "acme_db01_backdoor".into();
        d.source = "/etc/vedette/rules/local.yar".into();
        d.indicator = Some(IndicatorRef {
            source: "yara".into(),
            id: "acme_db01_backdoor".into(),
            origin: "local".into(),
            ..Default::default()
        });
        s
    }

    fn internal(addr: &str) -> StoredDetection {
        stored(
            detection::Target::Connection(ConnectionTarget {
                protocol: "TCP".into(),
                remote_addr: addr.into(),
                remote_port: 445,
                ..Default::default()
            }),
            DetectionKind::Connection,
        )
    }

    fn stored_named(path: &str, indicator: &str) -> StoredDetection {
        let mut s = stored(
            detection::Target::File(FileTarget {
                path: path.into(),
                ..Default::default()
            }),
            DetectionKind::Filename,
        );
        s.detection.as_mut().unwrap().rule = indicator.into();
        s
    }

    #[test]
    fn anonymised_exports_name_no_host_path_user_command_line_or_local_address() {
        let list = all_kinds();
        let p = policy(Share::Anonymised);
        let mut text = String::new();
        for s in &list {
            text.push_str(&ecs_document(s, &p).unwrap().to_string());
        }
        text.push_str(
            &json!(stix_objects(
                &list,
                &|_| Some(p.clone()),
                "CSIRT",
                3_600_000,
                1
            ))
            .to_string(),
        );
        for secret in SECRETS {
            assert!(!text.contains(secret), "`{secret}` in {text}");
        }
        // What stays: the indicator, the hash, the remote address, sector, country and TLP.
        for kept in [
            "evil",
            &"ab".repeat(32),
            "203.0.113.7",
            "c2.example.org",
            "Anonymous participant (energy, DE)",
            "amber+strict",
            "marking-definition--939a9414-2ddd-4d32-a0cd-375ea402b003",
        ] {
            assert!(text.contains(kept), "`{kept}` missing from {text}");
        }
    }

    #[test]
    fn a_retro_detection_is_exported_with_when_it_was_first_and_last_seen() {
        let mut s = stored(
            detection::Target::File(FileTarget {
                path: "/srv/www/up.php".into(),
                sha256: "ab".repeat(32),
                ..Default::default()
            }),
            DetectionKind::Hash,
        );
        s.detection.as_mut().unwrap().retro = Some(vedette_proto::v1::Retro {
            first_seen_ms: 1_700_000_000_000,
            last_seen_ms: 1_700_000_600_000,
            presence: vedette_proto::v1::Presence::Gone as i32,
            runs: 0,
        });
        for share in [Share::Full, Share::Anonymised] {
            let doc = ecs_document(&s, &policy(share)).unwrap();
            assert_eq!(doc["vedette"]["retro"]["presence"], "gone", "{doc}");
            assert_eq!(doc["event"]["start"], "2023-11-14T22:13:20.000Z", "{doc}");
            assert_eq!(doc["event"]["end"], "2023-11-14T22:23:20.000Z", "{doc}");
            let objects = stix_objects(
                std::slice::from_ref(&s),
                &|_| Some(policy(share)),
                "CSIRT",
                3_600_000,
                1,
            );
            let text = json!(objects).to_string();
            if share == Share::Anonymised {
                // Anonymised sightings give their reporting window, not times.
                continue;
            }
            assert!(
                text.contains("\"first_seen\":\"2023-11-14T22:13:20.000Z\""),
                "{text}"
            );
            assert!(
                text.contains("\"last_seen\":\"2023-11-14T22:23:20.000Z\""),
                "{text}"
            );
        }
    }

    #[test]
    fn full_exports_carry_the_host_and_none_exports_nothing() {
        let list = all_kinds();
        let full = ecs_document(&list[1], &policy(Share::Full)).unwrap();
        assert_eq!(full["host"]["name"], "db01.acme.internal");
        assert_eq!(full["process"]["command_line"], "curl http://10.0.0.5");
        assert_eq!(full["organization"]["name"], "acme");
        assert_eq!(
            full["threat"]["indicator"]["marking"]["tlp"],
            "AMBER+STRICT"
        );
        for s in &list {
            assert!(ecs_document(s, &policy(Share::None)).is_none());
        }
        assert!(
            stix_objects(&list, &|_| Some(policy(Share::None)), "CSIRT", 3_600_000, 1).is_empty()
        );
        // An organisation without a policy shares nothing either.
        assert!(stix_objects(&list, &|_| None, "CSIRT", 3_600_000, 1).is_empty());
        let objects = stix_objects(&list, &|_| Some(policy(Share::Full)), "CSIRT", 3_600_000, 1);
        let sighting = objects.iter().find(|o| o["type"] == "sighting").unwrap();
        assert_eq!(
            sighting["where_sighted_refs"][0],
            "identity--00000000-0000-4000-8000-000000000001"
        );
        assert!(objects.iter().any(|o| o["type"] == "process"));
    }

    #[test]
    fn a_local_rule_is_named_by_a_stand_in_and_repeats_still_count_together() {
        let a = anonymise(&local_rule()).detection.unwrap();
        let b = anonymise(&local_rule()).detection.unwrap();
        assert!(a.rule.starts_with("local-"), "{}", a.rule);
        assert_eq!(a.rule, b.rule);
        assert_eq!(a.source, "local");
        assert_eq!(a.indicator.unwrap().origin, "local");
        // A bundle's rule keeps its name.
        let shared = anonymise(&all_kinds()[0]).detection.unwrap();
        assert_eq!(
            (shared.rule.as_str(), shared.source.as_str()),
            ("evil", "apt.yar")
        );
    }

    #[test]
    fn public_remote_addresses_stay_and_internal_ones_go() {
        for (addr, kept) in [
            ("203.0.113.7", true),
            ("2001:db8::1", true),
            ("10.1.2.3", false),
            ("172.16.0.1", false),
            ("192.168.1.1", false),
            ("100.64.0.1", false),
            ("127.0.0.1", false),
            ("169.254.1.1", false),
            ("::1", false),
            ("fe80::1", false),
            ("fd12::1", false),
            ("::ffff:10.0.0.1", false),
            ("not an address", false),
        ] {
            let d = anonymise(&internal(addr)).detection.unwrap();
            let Some(detection::Target::Connection(c)) = d.target else {
                panic!("a connection");
            };
            assert_eq!(c.remote_addr == addr, kept, "{addr}");
            assert_eq!(c.remote_port, 445);
        }
        // With no address left, STIX names the rule and ECS no destination address.
        let objects = stix_objects(
            &[internal("10.0.0.1")],
            &|_| Some(policy(Share::Anonymised)),
            "CSIRT",
            3_600_000,
            1,
        );
        assert!(
            objects.iter().all(|o| o["type"] != "ipv4-addr"),
            "{objects:?}"
        );
        let doc = ecs_document(&internal("10.0.0.1"), &policy(Share::Anonymised)).unwrap();
        assert_eq!(doc["destination"], json!({"port": 445}));
    }

    #[test]
    fn a_file_name_stays_only_when_it_is_the_indicator() {
        let file = |kind| {
            stored(
                detection::Target::File(FileTarget {
                    path: "/srv/www/shell.php".into(),
                    ..Default::default()
                }),
                kind,
            )
        };
        let p = policy(Share::Anonymised);
        // Literal indicators: a Loki line for Windows paths, a STIX or MISP file name.
        for literal in ["\\\\shell\\.php$", "[file:name = 'shell.php']", "shell.php"] {
            let mut named = file(DetectionKind::Filename);
            named.detection.as_mut().unwrap().rule = literal.into();
            let by_name = ecs_document(&named, &p).unwrap();
            assert_eq!(by_name["file"]["name"], "shell.php", "{literal}");
            assert!(by_name["file"].get("path").is_none());
        }
        // A pattern: the name is the host's.
        for pattern in ["\\.php$", "evil", "[file:name LIKE '%.php']", "hell.php"] {
            let mut named = file(DetectionKind::Filename);
            named.detection.as_mut().unwrap().rule = pattern.into();
            let by_pattern = ecs_document(&named, &p).unwrap();
            assert!(
                !by_pattern.to_string().contains("shell.php"),
                "{pattern}: {by_pattern}"
            );
        }
        let by_yara = ecs_document(&file(DetectionKind::Yara), &p).unwrap();
        assert!(by_yara["file"].get("name").is_none(), "{by_yara}");
        assert!(!by_yara.to_string().contains("shell.php"));
    }
}
